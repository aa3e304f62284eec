//! `log` backend: timestamped lines on COM1, e.g. `[    1.234567] INFO  hvnet::acpi: ...`.
//! Plain ASCII without colour codes, control characters filtered (see `console`), so
//! Azure's serial console shows it cleanly.

use core::fmt::Write;

use log::{LevelFilter, Log, Metadata, Record};

use crate::arch::serial;
use crate::console::ConsoleLine;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::time::now_ns();
        let mut line = ConsoleLine::new();
        let _ = write!(
            line,
            "[{:5}.{:06}] {:5} {}: {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        );
        // Interrupt handlers never log, but keep the console lock interrupt-free anyway so
        // a future one that does cannot deadlock against us.
        x86_64::instructions::interrupts::without_interrupts(|| {
            serial::write(line.as_bytes());
            serial::write(b"\n");
        });
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
