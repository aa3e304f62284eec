//! Command-line parsing: `run` (boot a VM) and `ctl` (talk to a running one). Pure code,
//! unit-tested; the same request parser reads the control socket's lines.

use std::fmt;
use std::path::PathBuf;

/// Usage text printed by `--help`.
pub const USAGE: &str = "\
hvemu-vmm: boot the hvnet image under KVM with an emulated Hyper-V (VMBus host in user space)

usage:
  hvemu-vmm run --kernel PATH [--mem SIZE] [--cpus 1] [--cmdline TEXT]
                [--serial stdout|FILE] [--control SOCKET] [--poll-ms N]
                [--nic [queues=N][,mac=MAC][,tap=NAME]]...
  hvemu-vmm ctl --control SOCKET status
  hvemu-vmm ctl --control SOCKET nic add [--queues N] [--mac MAC] [--tap NAME]
  hvemu-vmm ctl --control SOCKET nic remove ID
  hvemu-vmm ctl --control SOCKET nic list
  hvemu-vmm ctl --control SOCKET shutdown
  hvemu-vmm ctl --control SOCKET kvp

run options:
  --kernel PATH     ELF kernel with a Xen PVH note (what `scripts/build` prints)
  --mem SIZE        guest RAM, e.g. 256M (default), 1G; a plain number is MiB; 32M..3G
  --cpus N          virtual processors (only 1 is supported)
  --cmdline TEXT    kernel command line, e.g. \"exit=debug test=ready\"
  --serial TARGET   where COM1 output goes: stdout (default) or a file path
  --control SOCKET  serve the control socket (Unix domain) at this path
  --poll-ms N       host poll period in milliseconds (device polls, NIC back ends); 5
  --nic SPEC        hot-plug a NIC at boot (same settings as `nic add`); repeatable

NICs without --tap sit on an internal LAN (a learning switch) with a DHCP server at
10.0.2.2 that leases 10.0.2.15 and up and an emulated Azure fabric as the gateway
(10.0.2.1: WireServer 168.63.129.16 and IMDS 169.254.169.254 behind it); --tap NAME
bridges a NIC to a host TAP device.

The VM also gets Hyper-V's integration services: heartbeat, time sync (the host's clock),
KVP (`ctl kvp` shows what the guest reports: host name, addresses, OS) and shutdown
(`ctl shutdown` is Hyper-V Manager's \"Shut Down\": the guest closes its channels,
unloads VMBus and powers off, and the VMM exits with status 0).

The VM's exit status is the guest's: isa-debug-exit port 0xf4 value v gives (v << 1) | 1
(0x10 -> 33 success, 0x11 -> 35 failure), ACPI S5 power-off gives 0, SIGINT/SIGTERM give
130, a guest or VMM failure gives 1; a missing /dev/kvm, a bad kernel image or bad options
give 2. HVEMU_LOG=info|debug logs the VMM's work on stderr; HVEMU_PROFILE=1 samples the
guest's RIP every poll period and prints the hottest addresses at the end (symbolize
them with `addr2line -f -e KERNEL ADDR...`).
";

/// Largest guest RAM: RAM stays below the 3 GiB line so the MMIO hole (I/O APIC, local
/// APIC) never overlaps it.
pub const MAX_MEM: u64 = 3 << 30;
/// Smallest guest RAM the image boots in (heap, page tables, DMA pages).
pub const MIN_MEM: u64 = 32 << 20;
/// Most queues a NIC may ask for (the netvsc indirection table has 16 entries; RSS up to
/// 64 queues; keep it small here).
pub const MAX_QUEUES: u16 = 64;

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Print usage.
    Help,
    /// Boot a VM.
    Run(RunOptions),
    /// Send one request to a running VM.
    Ctl(CtlOptions),
}

/// Where COM1's output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

/// Settings of one emulated NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicSpec {
    /// Queues (primary channel plus sub-channels).
    pub queues: u16,
    /// MAC address; the VMM picks one (00:15:5d:..., Hyper-V's prefix) when absent.
    pub mac: Option<[u8; 6]>,
    /// Host TAP device to bridge the NIC to; absent: the VMM's internal switch.
    pub tap: Option<String>,
}

/// `run` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The kernel ELF.
    pub kernel: PathBuf,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Kernel command line.
    pub cmdline: String,
    /// COM1 output.
    pub serial: SerialTarget,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Host poll period.
    pub poll_ms: u64,
    /// NICs present at boot.
    pub nics: Vec<NicSpec>,
}

/// One control request (the `ctl` words after `--control SOCKET`, and one line on the
/// socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// VM and VMBus state.
    Status,
    /// Hot-add a NIC.
    NicAdd(NicSpec),
    /// Hot-remove the NIC with this id.
    NicRemove(u32),
    /// List the NICs.
    NicList,
    /// Ask the guest to shut down (shutdown integration service).
    Shutdown,
    /// The guest's KVP auto-pool pairs (host name, addresses, OS).
    Kvp,
}

/// `ctl` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlOptions {
    /// The control socket.
    pub control: PathBuf,
    /// What to ask.
    pub request: Request,
}

/// A command-line mistake, described for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// Parses the whole command line (without the program name).
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let Some(first) = args.first() else {
        return err("missing command: `run` or `ctl`");
    };
    match first.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "run" => parse_run(&args[1..]).map(Command::Run),
        "ctl" => parse_ctl(&args[1..]).map(Command::Ctl),
        other => err(format!(
            "unknown command '{other}': expected `run` or `ctl`"
        )),
    }
}

/// The value after option `name`, advancing `i` past it.
fn value<'a>(args: &'a [String], i: &mut usize, name: &str) -> Result<&'a str, CliError> {
    *i += 1;
    match args.get(*i) {
        Some(v) => Ok(v.as_str()),
        None => err(format!("{name} needs a value")),
    }
}

fn parse_run(args: &[String]) -> Result<RunOptions, CliError> {
    let mut kernel = None;
    let mut opts = RunOptions {
        kernel: PathBuf::new(),
        mem_bytes: 256 << 20,
        cpus: 1,
        cmdline: String::new(),
        serial: SerialTarget::Stdout,
        control: None,
        poll_ms: 5,
        nics: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        // Accept both `--opt value` and `--opt=value`.
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (a, None),
        };
        let val = |i: &mut usize| -> Result<String, CliError> {
            match inline {
                Some(v) => Ok(v.to_string()),
                None => value(args, i, name).map(str::to_string),
            }
        };
        match name {
            "--kernel" => kernel = Some(PathBuf::from(val(&mut i)?)),
            "--mem" => opts.mem_bytes = parse_mem(&val(&mut i)?)?,
            "--cpus" => {
                let v = val(&mut i)?;
                opts.cpus = v
                    .parse()
                    .map_err(|_| CliError(format!("--cpus: '{v}' is not a number")))?;
                if opts.cpus != 1 {
                    return err(format!(
                        "--cpus {}: only 1 vCPU is supported by this VMM",
                        opts.cpus
                    ));
                }
            }
            "--cmdline" => opts.cmdline = val(&mut i)?,
            "--serial" => {
                let v = val(&mut i)?;
                opts.serial = match v.as_str() {
                    "stdout" | "-" => SerialTarget::Stdout,
                    "" => return err("--serial needs `stdout` or a file path"),
                    path => SerialTarget::File(PathBuf::from(path)),
                };
            }
            "--control" => opts.control = Some(PathBuf::from(val(&mut i)?)),
            "--poll-ms" => {
                let v = val(&mut i)?;
                opts.poll_ms = match v.parse::<u64>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => return err(format!("--poll-ms: '{v}' is not a number in 1..=1000")),
                };
            }
            "--nic" => {
                let v = val(&mut i)?;
                opts.nics.push(parse_nic_spec(&v)?);
            }
            other => return err(format!("run: unknown option '{other}'")),
        }
        i += 1;
    }
    opts.kernel = kernel.ok_or_else(|| CliError("run: --kernel PATH is required".into()))?;
    Ok(opts)
}

fn parse_ctl(args: &[String]) -> Result<CtlOptions, CliError> {
    let mut control = None;
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--control" {
            control = Some(PathBuf::from(value(args, &mut i, "--control")?));
        } else if let Some(v) = a.strip_prefix("--control=") {
            control = Some(PathBuf::from(v));
        } else {
            rest.push(args[i].clone());
        }
        i += 1;
    }
    let control = control.ok_or_else(|| CliError("ctl: --control SOCKET is required".into()))?;
    let words: Vec<&str> = rest.iter().map(String::as_str).collect();
    Ok(CtlOptions {
        control,
        request: parse_request(&words)?,
    })
}

/// Parses a control request from its words (`status`, `nic add --queues 4`, ...).
pub fn parse_request(words: &[&str]) -> Result<Request, CliError> {
    match words {
        [] => err("missing request: status, shutdown, kvp, nic add, nic remove ID or nic list"),
        ["status"] => Ok(Request::Status),
        ["shutdown"] => Ok(Request::Shutdown),
        ["kvp"] => Ok(Request::Kvp),
        ["nic", "list"] => Ok(Request::NicList),
        ["nic", "remove", id] => id
            .parse()
            .map(Request::NicRemove)
            .map_err(|_| CliError(format!("nic remove: '{id}' is not a NIC id"))),
        ["nic", "remove", ..] => err("nic remove needs exactly one NIC id"),
        ["nic", "add", opts @ ..] => {
            let mut spec = NicSpec {
                queues: 1,
                ..NicSpec::default()
            };
            let mut i = 0;
            while i < opts.len() {
                let (name, inline) = match opts[i].split_once('=') {
                    Some((n, v)) if n.starts_with("--") => (n, Some(v)),
                    _ => (opts[i], None),
                };
                let v = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        *opts
                            .get(i)
                            .ok_or_else(|| CliError(format!("nic add: {name} needs a value")))?
                    }
                };
                match name {
                    "--queues" => spec.queues = parse_queues(v)?,
                    "--mac" => spec.mac = Some(parse_mac(v)?),
                    "--tap" => spec.tap = Some(parse_tap_name(v)?),
                    other => return err(format!("nic add: unknown option '{other}'")),
                }
                i += 1;
            }
            Ok(Request::NicAdd(spec))
        }
        _ => err(format!(
            "unknown request '{}': expected status, shutdown, kvp, nic add, nic remove ID or nic list",
            words.join(" ")
        )),
    }
}

impl Request {
    /// The request as one line of the control protocol (what [`parse_request`] reads).
    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::NicList => "nic list".into(),
            Request::Shutdown => "shutdown".into(),
            Request::Kvp => "kvp".into(),
            Request::NicRemove(id) => format!("nic remove {id}"),
            Request::NicAdd(spec) => {
                let mut s = format!("nic add --queues {}", spec.queues);
                if let Some(mac) = spec.mac {
                    s.push_str(&format!(" --mac {}", format_mac(&mac)));
                }
                if let Some(tap) = &spec.tap {
                    s.push_str(&format!(" --tap {tap}"));
                }
                s
            }
        }
    }
}

/// `--nic` at boot: `queues=N,mac=MAC,tap=NAME`, every part optional.
pub fn parse_nic_spec(s: &str) -> Result<NicSpec, CliError> {
    let mut spec = NicSpec {
        queues: 1,
        ..NicSpec::default()
    };
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return err(format!(
                "--nic: '{part}' is not key=value (queues, mac, tap)"
            ));
        };
        match k {
            "queues" => spec.queues = parse_queues(v)?,
            "mac" => spec.mac = Some(parse_mac(v)?),
            "tap" => spec.tap = Some(parse_tap_name(v)?),
            other => return err(format!("--nic: unknown key '{other}' (queues, mac, tap)")),
        }
    }
    Ok(spec)
}

fn parse_queues(v: &str) -> Result<u16, CliError> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => err(format!("queues: '{v}' is not a number in 1..={MAX_QUEUES}")),
    }
}

fn parse_tap_name(v: &str) -> Result<String, CliError> {
    // Linux interface names: at most 15 bytes, no '/', no whitespace.
    if v.is_empty() || v.len() > 15 || v.contains('/') || v.contains(char::is_whitespace) {
        return err(format!("tap: '{v}' is not a valid interface name"));
    }
    Ok(v.to_string())
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`). Multicast addresses are refused.
pub fn parse_mac(v: &str) -> Result<[u8; 6], CliError> {
    let parts: Vec<&str> = v.split([':', '-']).collect();
    let bad = || {
        CliError(format!(
            "mac: '{v}' is not a MAC address like 00:15:5d:00:00:01"
        ))
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return err(format!("mac: {v} is a multicast address"));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses a RAM size: `256M`, `1G`, `524288K`, `512MiB`; a plain number is MiB.
pub fn parse_mem(v: &str) -> Result<u64, CliError> {
    let s = v.trim();
    let lower = s.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        _ => (lower, 20),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| CliError(format!("--mem: '{v}' is not a size like 256M or 1G")))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| CliError(format!("--mem: '{v}' is too large")))?;
    if !(MIN_MEM..=MAX_MEM).contains(&bytes) {
        return err(format!(
            "--mem: {v} is outside {}M..={}G",
            MIN_MEM >> 20,
            MAX_MEM >> 30
        ));
    }
    if bytes % (2 << 20) != 0 {
        return err(format!("--mem: {v} is not a multiple of 2 MiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn run_defaults_and_options() {
        let Command::Run(o) = parse(&args("run --kernel /k")).unwrap() else {
            panic!()
        };
        assert_eq!(o.kernel, PathBuf::from("/k"));
        assert_eq!(o.mem_bytes, 256 << 20);
        assert_eq!((o.cpus, o.poll_ms), (1, 5));
        assert_eq!(o.serial, SerialTarget::Stdout);
        assert!(o.control.is_none() && o.nics.is_empty() && o.cmdline.is_empty());

        let mut a = args("run --kernel=/k --mem 1G --serial /tmp/s.log --control /tmp/c.sock");
        a.extend(["--cmdline".into(), "exit=debug test=ready".into()]);
        a.extend(args(
            "--poll-ms 2 --nic queues=4,mac=00:15:5d:00:00:07 --nic tap=tap0",
        ));
        let Command::Run(o) = parse(&a).unwrap() else {
            panic!()
        };
        assert_eq!(o.mem_bytes, 1 << 30);
        assert_eq!(o.cmdline, "exit=debug test=ready");
        assert_eq!(o.serial, SerialTarget::File("/tmp/s.log".into()));
        assert_eq!(o.control, Some(PathBuf::from("/tmp/c.sock")));
        assert_eq!(o.poll_ms, 2);
        assert_eq!(
            o.nics,
            vec![
                NicSpec {
                    queues: 4,
                    mac: Some([0, 0x15, 0x5d, 0, 0, 7]),
                    tap: None
                },
                NicSpec {
                    queues: 1,
                    mac: None,
                    tap: Some("tap0".into())
                }
            ]
        );
    }

    #[test]
    fn run_errors_are_explained() {
        let e = |s: &str| parse(&args(s)).unwrap_err().0;
        assert!(e("").contains("missing command"));
        assert!(e("boot").contains("unknown command 'boot'"));
        assert!(e("run").contains("--kernel PATH is required"));
        assert!(e("run --kernel").contains("--kernel needs a value"));
        assert!(e("run --kernel k --mem 10M").contains("outside 32M..=3G"));
        assert!(e("run --kernel k --mem 4G").contains("outside"));
        assert!(e("run --kernel k --mem lots").contains("not a size"));
        assert!(e("run --kernel k --mem 33M").contains("multiple of 2 MiB"));
        assert!(e("run --kernel k --cpus 2").contains("only 1 vCPU"));
        assert!(e("run --kernel k --frobnicate").contains("unknown option '--frobnicate'"));
        assert!(e("run --kernel k --poll-ms 0").contains("--poll-ms"));
        assert!(e("run --kernel k --nic queues=0").contains("queues"));
        assert!(e("run --kernel k --nic speed=10").contains("unknown key 'speed'"));
        assert_eq!(parse(&args("--help")), Ok(Command::Help));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_mem("256M"), Ok(256 << 20));
        assert_eq!(parse_mem("256"), Ok(256 << 20));
        assert_eq!(parse_mem("512MiB"), Ok(512 << 20));
        assert_eq!(parse_mem("2g"), Ok(2 << 30));
        assert_eq!(parse_mem("65536K"), Ok(64 << 20));
        assert!(parse_mem("99999999999999999G").is_err());
    }

    #[test]
    fn ctl_requests_round_trip() {
        let Command::Ctl(c) = parse(&args(
            "ctl --control /s nic add --queues 4 --mac 00-15-5d-aa-bb-cc --tap hv0",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.control, PathBuf::from("/s"));
        let want = Request::NicAdd(NicSpec {
            queues: 4,
            mac: Some([0, 0x15, 0x5d, 0xaa, 0xbb, 0xcc]),
            tap: Some("hv0".into()),
        });
        assert_eq!(c.request, want);
        // The socket line parses back to the same request.
        let line = want.to_line();
        assert_eq!(line, "nic add --queues 4 --mac 00:15:5d:aa:bb:cc --tap hv0");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parse_request(&words), Ok(want));

        for (s, r) in [
            ("status", Request::Status),
            ("nic list", Request::NicList),
            ("shutdown", Request::Shutdown),
            ("kvp", Request::Kvp),
            ("nic remove 3", Request::NicRemove(3)),
            (
                "nic add",
                Request::NicAdd(NicSpec {
                    queues: 1,
                    ..NicSpec::default()
                }),
            ),
        ] {
            let words: Vec<&str> = s.split_whitespace().collect();
            assert_eq!(parse_request(&words), Ok(r.clone()), "{s}");
            let line = r.to_line();
            let back: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parse_request(&back), Ok(r), "{line}");
        }
    }

    #[test]
    fn ctl_errors() {
        let e = |s: &str| parse(&args(s)).unwrap_err().0;
        assert!(e("ctl status").contains("--control SOCKET is required"));
        assert!(e("ctl --control /s").contains("missing request"));
        assert!(e("ctl --control /s nic remove x").contains("'x' is not a NIC id"));
        assert!(e("ctl --control /s nic remove").contains("exactly one"));
        assert!(e("ctl --control /s nic add --queues 100").contains("1..=64"));
        assert!(e("ctl --control /s nic add --mac 01:00:5e:00:00:01").contains("multicast"));
        assert!(e("ctl --control /s nic add --mac zz").contains("not a MAC"));
        assert!(e("ctl --control /s nic add --tap a/b").contains("interface name"));
        assert!(e("ctl --control /s nic add --speed 1").contains("unknown option '--speed'"));
        assert!(e("ctl --control /s reboot now").contains("unknown request 'reboot now'"));
    }

    #[test]
    fn macs() {
        assert_eq!(
            format_mac(&[0, 0x15, 0x5d, 1, 2, 0xff]),
            "00:15:5d:01:02:ff"
        );
        assert!(parse_mac("00:15:5d:01:02").is_err());
        assert!(parse_mac("000:15:5d:01:02:03").is_err());
    }
}
