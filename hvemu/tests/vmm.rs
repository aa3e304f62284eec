//! hvemu-vmm end to end: the real hvnet image booted under KVM with the user-space
//! Hyper-V, the control socket's hot-plug commands, and the VMM's error paths.
//!
//! Tests that need KVM print why they skip when `/dev/kvm` cannot be opened. The kernel
//! is `HVNET_KERNEL` if set (e.g. what `scripts/build` printed), else it is built here
//! with cargo into `<target>/hvemu-vmm-kernel` (a separate target directory, so it never
//! waits for the lock of the build running these tests; the first build takes minutes).
#![cfg(target_os = "linux")]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_hvemu-vmm");

/// Why KVM cannot be used here, if it cannot.
fn kvm_unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

macro_rules! require_kvm {
    () => {
        if let Some(why) = kvm_unusable() {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The kernel to boot (built once per test process).
fn kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| {
        if let Some(k) = std::env::var_os("HVNET_KERNEL") {
            return PathBuf::from(k);
        }
        // VMM is <target>/<profile>/hvemu-vmm.
        let target = Path::new(VMM)
            .parent()
            .and_then(Path::parent)
            .expect("target dir");
        let dir = target.join("hvemu-vmm-kernel");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("building the hvnet kernel into {} ...", dir.display());
        let t0 = Instant::now();
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-none",
                "-p",
                "hvnet",
            ])
            .env("CARGO_TARGET_DIR", &dir)
            .current_dir(workspace())
            .status()
            .expect("running cargo to build the kernel");
        let built = dir.join("x86_64-unknown-none/release/hvnet");
        if status.success() && built.exists() {
            eprintln!("kernel built in {:.1} s", t0.elapsed().as_secs_f64());
            return built;
        }
        let fallback = workspace().join("target/x86_64-unknown-none/release/hvnet");
        assert!(
            fallback.exists(),
            "the kernel build failed ({status}) and there is no {}",
            fallback.display()
        );
        eprintln!(
            "kernel build failed ({status}); using {}",
            fallback.display()
        );
        fallback
    })
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvemu-vmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for `child` at most `timeout`; kills it on expiry.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

fn ctl(sock: &Path, words: &[&str]) -> Output {
    Command::new(VMM)
        .args(["ctl", "--control"])
        .arg(sock)
        .args(words)
        .output()
        .unwrap()
}

/// The VMM booting the real image with one 2-queue NIC on the internal LAN, its serial
/// log in a file and a control socket; stderr is piped.
struct LanVm {
    child: Child,
    dir: PathBuf,
    serial: PathBuf,
    sock: PathBuf,
}

fn boot_on_lan(name: &str) -> LanVm {
    let dir = scratch(name);
    let serial = dir.join("serial.log");
    let sock = dir.join("control.sock");
    let child = Command::new(VMM)
        .args(["run", "--kernel"])
        .arg(kernel())
        .arg("--serial")
        .arg(&serial)
        .arg("--control")
        .arg(&sock)
        .args(["--nic", "queues=2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    LanVm {
        child,
        dir,
        serial,
        sock,
    }
}

#[test]
fn real_image_boots_to_vmbus_ready_and_exits_through_the_debug_port() {
    require_kvm!();
    let dir = scratch("boot");
    let serial = dir.join("serial.log");
    let t0 = Instant::now();
    let mut child = Command::new(VMM)
        .args(["run", "--kernel"])
        .arg(kernel())
        .args(["--mem", "256M", "--serial"])
        .arg(&serial)
        .args(["--cmdline", "exit=debug test=ready"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(180));
    let wall = t0.elapsed();
    let err = stderr_of(&mut child);
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("VMM timed out\n{err}\n--- serial\n{log}"));
    eprintln!("{}", err.trim_end());
    eprintln!("boot test: wall time {:.3} s", wall.as_secs_f64());
    assert_eq!(
        status.code(),
        Some(33),
        "expected the guest's success exit (0x10 -> 33)\n{err}\n--- serial\n{log}"
    );
    let ready = log
        .lines()
        .find(|l| l.contains("hvnet: ready"))
        .unwrap_or_else(|| panic!("no ready line\n--- serial\n{log}"));
    assert!(
        ready.contains("hvnet: ready, VMBus "),
        "the guest did not connect to the emulated VMBus: {ready}\n--- serial\n{log}"
    );
    assert!(log.contains("hypervisor: Microsoft Hyper-V"), "{log}");
    assert!(log.contains("test passed"), "{log}");
    assert!(
        err.contains("VM stopped (debug-exit port value 0x10), status 33"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_socket_hot_adds_and_removes_nics_while_the_guest_runs() {
    require_kvm!();
    let dir = scratch("ctl");
    let serial = dir.join("serial.log");
    let sock = dir.join("control.sock");
    let mut child = Command::new(VMM)
        .args(["run", "--kernel"])
        .arg(kernel())
        .arg("--serial")
        .arg(&serial)
        .arg("--control")
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the guest to be up (connected to VMBus).
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if sock.exists() {
            let out = ctl(&sock, &["status"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && text.contains("guest ready after") {
                break text;
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("VMM ended early ({s}): {}", stderr_of(&mut child));
        }
        assert!(
            Instant::now() < deadline,
            "guest never became ready\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{status}");
    assert!(status.contains("vmbus: connected, version"), "{status}");

    // Three NICs hot-added at the same moment, each with four queues.
    let adds: Vec<_> = (0..3)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || ctl(&sock, &["nic", "add", "--queues", "4"]))
        })
        .collect();
    for a in adds {
        let out = a.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("added"), "{text}");
    }
    let list = ctl(&sock, &["nic", "list"]);
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert_eq!(list.lines().count(), 3, "{list}");
    for id in 1..=3 {
        assert!(
            list.contains(&format!("nic {id}: mac 00:15:5d:00:00:0{id} queues 4")),
            "{list}"
        );
    }

    let out = ctl(&sock, &["nic", "remove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&sock, &["nic", "remove", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no NIC 2"));
    let out = ctl(&sock, &["nic", "add", "--mac", "00:15:5d:00:00:01"]);
    assert_eq!(out.status.code(), Some(1), "duplicate MAC refused");

    let status = String::from_utf8_lossy(&ctl(&sock, &["status"]).stdout).to_string();
    // Four integration services and three NICs were offered; one NIC was rescinded.
    assert!(status.contains("offers sent 7, rescinds 1"), "{status}");
    assert!(status.contains("nics: 2"), "{status}");

    // SIGTERM: clean stop, status 130, socket removed.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let code = wait_with_timeout(&mut child, Duration::from_secs(30)).map(|s| s.code());
    let err = stderr_of(&mut child);
    assert_eq!(code, Some(Some(130)), "{err}");
    assert!(err.contains("VM stopped (signal)"), "{err}");
    assert!(!sock.exists(), "control socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole guest network stack under the VMM: a NIC on the internal LAN is probed by
/// the guest's netvsc over VMBus (two queues), and the guest's DHCP client gets a lease
/// from the LAN's DHCP server.
#[test]
fn nic_on_the_internal_lan_gets_a_dhcp_lease() {
    require_kvm!();
    let t0 = Instant::now();
    let LanVm {
        mut child,
        dir,
        serial,
        sock,
    } = boot_on_lan("lan");
    // NIC bring-up is slow when guest code is emulated (buffers are zeroed by the guest
    // CPU): allow minutes.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut outcome = None;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("VMM ended early ({s}): {}", stderr_of(&mut child));
        }
        if sock.exists() {
            let list = String::from_utf8_lossy(&ctl(&sock, &["nic", "list"]).stdout).to_string();
            if list.contains("(lease 10.0.2.") {
                outcome = Some(Ok(list));
                break;
            }
            // A guest without a netvsc driver never opens the channel.
            if t0.elapsed() > Duration::from_secs(60) && list.contains("0 open") {
                outcome = Some(Err(list));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = t0.elapsed();
    // The server records the lease when it sends the ACK; the guest logs it once it has
    // processed that ACK, a moment later.
    if matches!(outcome, Some(Ok(_))) {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until
            && !std::fs::read_to_string(&serial)
                .unwrap_or_default()
                .contains("lease acquired: 10.0.2.")
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = wait_with_timeout(&mut child, Duration::from_secs(30));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    match outcome {
        Some(Ok(list)) => {
            eprintln!(
                "lease after {:.1} s: {}",
                elapsed.as_secs_f64(),
                list.trim()
            );
            assert!(list.contains("2 open"), "{list}");
            assert!(log.contains("lease acquired: 10.0.2."), "{log}");
        }
        Some(Err(list)) => {
            eprintln!("SKIP: this image has no netvsc driver (channel never opened): {list}");
        }
        None => panic!("no DHCP lease within 240 s\n--- serial\n{log}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The appliance as an Azure and Hyper-V citizen, whole system: on the internal LAN its
/// Azure agent reports Ready to the emulated WireServer (through the LAN gateway, as on
/// Azure), the integration services come up (heartbeats answered, clock set by time
/// sync, its DHCP address in KVP), and Hyper-V Manager's "Shut Down" (`ctl shutdown`)
/// ends in a clean stop: every channel closed, VMBus unloaded, ACPI power-off, status 0.
#[test]
fn reports_ready_serves_integration_services_and_shuts_down_cleanly() {
    require_kvm!();
    let t0 = Instant::now();
    let LanVm {
        mut child,
        dir,
        serial,
        sock,
    } = boot_on_lan("citizen");
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut status, mut kvp) = (String::new(), String::new());
    let mut up = false;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("VMM ended early ({s}): {}", stderr_of(&mut child));
        }
        if sock.exists() {
            status = String::from_utf8_lossy(&ctl(&sock, &["status"]).stdout).into_owned();
            kvp = String::from_utf8_lossy(&ctl(&sock, &["kvp"]).stdout).into_owned();
            if status.contains("azure ready reports: 1 ")
                && kvp.contains("NetworkAddressIPv4=10.0.2.")
                && !status.contains("(0/0 answered)")
            {
                up = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = t0.elapsed();
    if !up {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!("not up within 240 s\n--- status\n{status}\n--- kvp\n{kvp}\n--- serial\n{log}");
    }
    eprintln!(
        "ready reported and KVP filled after {:.1} s",
        elapsed.as_secs_f64()
    );
    assert!(status.contains("heartbeat up"), "{status}");
    assert!(status.contains("time sync up"), "{status}");
    assert!(status.contains("KVP up"), "{status}");
    assert!(status.contains("violations 0"), "{status}");
    assert!(kvp.contains("OSName=hvnet"), "{kvp}");

    let answer = ctl(&sock, &["shutdown"]);
    assert!(answer.status.success(), "{answer:?}");
    let t1 = Instant::now();
    let exit = wait_with_timeout(&mut child, Duration::from_secs(60));
    let err = stderr_of(&mut child);
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let exit = exit.unwrap_or_else(|| panic!("no power-off within 60 s\n{err}\n{log}"));
    eprintln!("shutdown took {:.2} s", t1.elapsed().as_secs_f64());
    assert_eq!(exit.code(), Some(0), "{err}\n{log}");
    assert!(err.contains("VM stopped (ACPI power-off)"), "{err}");
    assert!(err.contains("guest reported Ready (incarnation 1"), "{err}");
    assert!(
        err.contains("VMBus at stop: 0 channel(s) open,")
            && err.contains("UNLOAD received 1 time(s), 0 violation(s)"),
        "{err}"
    );
    for line in [
        "azure: reported Ready to the WireServer (incarnation 1",
        "timesync: wall clock set to 20",
        "ic shutdown: host requests power off",
        "hvnet: VMBus unloaded",
    ] {
        assert!(log.contains(line), "missing {line:?} in\n{log}");
    }
    // The console stays plain text for Azure's serial console.
    assert!(
        log.bytes()
            .all(|b| b == b'\n' || b == b'\r' || b == b'\t' || (b' '..=b'~').contains(&b)),
        "control characters on the console"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal x86-64 ELF executable with one PT_LOAD at 1 MiB and optionally the PVH note.
fn tiny_elf(with_note: bool) -> Vec<u8> {
    let phnum: u16 = if with_note { 2 } else { 1 };
    let code_off = 64 + 56 * u64::from(phnum);
    let mut f = vec![0u8; code_off as usize];
    f[..4].copy_from_slice(b"\x7fELF");
    (f[4], f[5], f[6]) = (2, 1, 1);
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let code = [0xF4u8; 16]; // hlt
    f.extend_from_slice(&code);
    let ph = |f: &mut Vec<u8>, i: usize, kind: u32, off: u64, addr: u64, len: u64| {
        let p = 64 + i * 56;
        f[p..p + 4].copy_from_slice(&kind.to_le_bytes());
        f[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        f[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
        f[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
        f[p + 32..p + 40].copy_from_slice(&len.to_le_bytes());
        f[p + 40..p + 48].copy_from_slice(&len.to_le_bytes());
    };
    ph(&mut f, 0, 1, code_off, 0x10_0000, code.len() as u64);
    if with_note {
        let note_off = f.len() as u64;
        for w in [4u32, 4, 18] {
            f.extend_from_slice(&w.to_le_bytes());
        }
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&0x10_0000u32.to_le_bytes());
        ph(&mut f, 1, 4, note_off, 0, 20);
    }
    f
}

fn run_vmm(args: &[&str], kernel: Option<&Path>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(VMM);
    cmd.args(args);
    if let Some(k) = kernel {
        cmd.arg("--kernel").arg(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Needs no KVM: every refusal is explained and ends with status 2.
#[test]
fn clear_errors_for_bad_options_images_and_a_missing_kvm() {
    let dir = scratch("errors");
    let (code, err) = run_vmm(&["run"], None, &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--kernel PATH is required"), "{err}");
    let (code, err) = run_vmm(&["run", "--mem", "1T"], None, &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--mem"), "{err}");
    let (code, err) = run_vmm(&["frobnicate"], None, &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown command"), "{err}");
    let (code, out) = {
        let o = Command::new(VMM).arg("--help").output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        out.contains("hvemu-vmm ctl --control SOCKET nic add"),
        "{out}"
    );

    let missing = dir.join("nope");
    let (code, err) = run_vmm(&["run"], Some(&missing), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read kernel"), "{err}");

    let garbage = dir.join("garbage");
    std::fs::write(
        &garbage,
        b"this is not an ELF file at all, not even close......................",
    )
    .unwrap();
    let (code, err) = run_vmm(&["run"], Some(&garbage), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not an ELF file"), "{err}");

    let no_note = dir.join("no-note");
    std::fs::write(&no_note, tiny_elf(false)).unwrap();
    let (code, err) = run_vmm(&["run"], Some(&no_note), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no PVH entry"), "{err}");

    // A good image but no KVM device.
    let good = dir.join("good");
    std::fs::write(&good, tiny_elf(true)).unwrap();
    let (code, err) = run_vmm(
        &["run"],
        Some(&good),
        &[("HVEMU_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/kvm does not exist"), "{err}");

    // A control socket nobody serves.
    let o = ctl(&dir.join("none.sock"), &["status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the control socket"));
    let _ = std::fs::remove_dir_all(&dir);
}
