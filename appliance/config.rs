//! Kernel command-line options.
//!
//! Words are `key=value` or bare flags, separated by spaces; unknown words are reported
//! (not fatal) so a typo on the GRUB line shows up in the log instead of silently doing
//! nothing. Recognised:
//!
//! | word | meaning |
//! |---|---|
//! | `log=error\|warn\|info\|debug\|trace` | log level (default `info`) |
//! | `test=ready` | after the ready line, check the timer and exit with success |
//! | `test=pagefault` | after the ready line, touch an unmapped page (the report must follow) |
//! | `test=stackoverflow` | after the ready line, recurse into the stack guard page |
//! | `exit=debug` | exit through QEMU's `isa-debug-exit` port (tests) instead of halting |
//! | `echo=on\|off` | TCP/UDP echo (RFC 862) on port 7 of every interface (default off) |
//! | `queues=N` | queues asked of each synthetic NIC, 1..=64 (default 8) |
//! | `azure=on\|off` | report Ready to the WireServer and read IMDS once networking is up (default on; harmless off Azure: the attempts time out and stop) |
//! | `wireserver=A.B.C.D` | the WireServer's address (default 168.63.129.16) |
//! | `imds=A.B.C.D` | the instance metadata service's address (default 169.254.169.254) |

use log::LevelFilter;

/// What a test run should do once the appliance is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestAction {
    /// Sleep on the executor to prove timer interrupts work, then exit with success.
    Ready,
    /// Deliberately read an unmapped address; the exception report must appear.
    PageFault,
    /// Recurse until the kernel stack hits its guard page; the report (taken on an IST
    /// stack) must name the overflow.
    StackOverflow,
}

/// How the kernel ends when it has to stop (fatal error or a finished test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMode {
    /// Halt the CPU forever (production: the log stays on the serial console).
    Halt,
    /// Write a status to QEMU's `isa-debug-exit` device (port 0xf4).
    DebugPort,
}

/// Options parsed from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub log_level: LevelFilter,
    pub test: Option<TestAction>,
    pub exit: ExitMode,
    /// Echo service on port 7 (for smoke tests; an open UDP echo reflects traffic).
    pub echo: bool,
    /// Queues wanted per synthetic NIC.
    pub queues: u16,
    /// Azure guest agent duties (Ready report, IMDS read).
    pub azure: bool,
    /// WireServer address override.
    pub wireserver: Option<[u8; 4]>,
    /// IMDS address override.
    pub imds: Option<[u8; 4]>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            test: None,
            exit: ExitMode::Halt,
            echo: false,
            queues: 8,
            azure: true,
            wireserver: None,
            imds: None,
        }
    }
}

/// A word the parser did not accept, to be logged once logging is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownWord<'a>(pub &'a str);

impl Config {
    /// Parses `cmdline`, calling `unknown` for every word it does not understand.
    pub fn parse<'a>(cmdline: &'a str, mut unknown: impl FnMut(UnknownWord<'a>)) -> Self {
        let mut cfg = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let ok = match key {
                "log" => match value {
                    "off" => Some(LevelFilter::Off),
                    "error" => Some(LevelFilter::Error),
                    "warn" => Some(LevelFilter::Warn),
                    "info" => Some(LevelFilter::Info),
                    "debug" => Some(LevelFilter::Debug),
                    "trace" => Some(LevelFilter::Trace),
                    _ => None,
                }
                .map(|l| cfg.log_level = l)
                .is_some(),
                "test" => match value {
                    "ready" => Some(TestAction::Ready),
                    "pagefault" => Some(TestAction::PageFault),
                    "stackoverflow" => Some(TestAction::StackOverflow),
                    _ => None,
                }
                .map(|t| cfg.test = Some(t))
                .is_some(),
                "exit" => match value {
                    "debug" => Some(ExitMode::DebugPort),
                    "halt" => Some(ExitMode::Halt),
                    _ => None,
                }
                .map(|e| cfg.exit = e)
                .is_some(),
                "echo" => on_off(value).map(|e| cfg.echo = e).is_some(),
                "queues" => match value.parse::<u16>() {
                    Ok(n @ 1..=64) => {
                        cfg.queues = n;
                        true
                    }
                    _ => false,
                },
                "azure" => on_off(value).map(|a| cfg.azure = a).is_some(),
                "wireserver" => ipv4(value).map(|a| cfg.wireserver = Some(a)).is_some(),
                "imds" => ipv4(value).map(|a| cfg.imds = Some(a)).is_some(),
                // GRUB and loaders sometimes pass the image path first.
                _ if word.starts_with('/') => true,
                _ => false,
            };
            if !ok {
                unknown(UnknownWord(word));
            }
        }
        cfg
    }
}

fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// A dotted-quad IPv4 address: exactly four decimal octets, no leading `+`, no extras.
fn ipv4(value: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = value.split('.');
    for octet in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn parse(s: &str) -> (Config, Vec<&str>) {
        let mut bad = Vec::new();
        let c = Config::parse(s, |UnknownWord(w)| bad.push(w));
        (c, bad)
    }

    #[test]
    fn defaults_when_empty() {
        assert_eq!(parse("   "), (Config::default(), Vec::new()));
    }

    #[test]
    fn recognised_words() {
        let (c, bad) = parse("/boot/hvnet log=trace  test=pagefault exit=debug echo=on queues=4");
        assert!(bad.is_empty());
        assert!(c.echo);
        assert_eq!(c.queues, 4);
        assert_eq!(c.log_level, LevelFilter::Trace);
        assert_eq!(c.test, Some(TestAction::PageFault));
        assert_eq!(c.exit, ExitMode::DebugPort);
    }

    #[test]
    fn unknown_words_and_values_are_reported_and_ignored() {
        let (c, bad) = parse("log=loud test= quiet exit=debug queues=0 queues=65 echo=yes");
        assert_eq!(
            bad,
            [
                "log=loud",
                "test=",
                "quiet",
                "queues=0",
                "queues=65",
                "echo=yes"
            ]
        );
        assert_eq!(c.queues, 8);
        assert!(!c.echo);
        assert_eq!(c.log_level, LevelFilter::Info);
        assert_eq!(c.test, None);
        assert_eq!(c.exit, ExitMode::DebugPort);
    }

    #[test]
    fn azure_words() {
        let (c, bad) = parse("azure=off wireserver=10.0.2.16 imds=169.254.169.254");
        assert!(bad.is_empty(), "{bad:?}");
        assert!(!c.azure);
        assert_eq!(c.wireserver, Some([10, 0, 2, 16]));
        assert_eq!(c.imds, Some([169, 254, 169, 254]));
        assert!(Config::default().azure);
    }

    #[test]
    fn malformed_addresses_are_reported() {
        for word in [
            "wireserver=",
            "wireserver=1.2.3",
            "wireserver=1.2.3.4.5",
            "wireserver=256.1.1.1",
            "wireserver=1..2.3",
            "imds=+1.2.3.4",
            "imds=0001.2.3.4",
            "imds=a.b.c.d",
            "azure=yes",
        ] {
            let (c, bad) = parse(word);
            assert_eq!(bad, [word]);
            assert_eq!(
                (c.wireserver, c.imds, c.azure),
                (None, None, true),
                "{word}"
            );
        }
    }
}
