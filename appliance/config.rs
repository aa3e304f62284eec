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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            test: None,
            exit: ExitMode::Halt,
            echo: false,
            queues: 8,
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
                "echo" => match value {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                }
                .map(|e| cfg.echo = e)
                .is_some(),
                "queues" => match value.parse::<u16>() {
                    Ok(n @ 1..=64) => {
                        cfg.queues = n;
                        true
                    }
                    _ => false,
                },
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
}
