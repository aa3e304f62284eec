//! `hvemu-vmm`: boots the hvnet image under KVM with a user-space Hyper-V (see
//! `src/vmm/mod.rs` for the design). Linux only.

#[cfg(target_os = "linux")]
#[path = "../vmm/mod.rs"]
mod vmm;

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    init_log();
    vmm::main(std::env::args().skip(1).collect())
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("hvemu-vmm: needs Linux with KVM");
    std::process::ExitCode::from(2)
}

/// A minimal `log` sink on stderr: level from `HVEMU_LOG` (error, warn, info, debug,
/// trace; default warn).
#[cfg(target_os = "linux")]
fn init_log() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                eprintln!("hvemu-vmm: {} {}: {}", r.level(), r.target(), r.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let level = match std::env::var("HVEMU_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
