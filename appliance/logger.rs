//! `log` backend: timestamped lines on COM1, e.g. `[    1.234567] INFO  hvnet::acpi: ...`.
//! Plain ASCII without colour codes, so Azure's serial console shows it cleanly.

use core::fmt::{self, Write};

use log::{LevelFilter, Log, Metadata, Record};

use crate::arch::serial;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

/// A fixed buffer so a whole line goes out under one console lock.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::time::now_ns();
        let mut line = Line {
            buf: [0; 512],
            len: 0,
        };
        let _ = write!(
            line,
            "[{:5}.{:06}] {:5} {}: {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        );
        if line.len == line.buf.len() {
            line.buf[line.len - 3..].copy_from_slice(b"...");
        }
        // Interrupt handlers never log, but keep the console lock interrupt-free anyway so
        // a future one that does cannot deadlock against us.
        x86_64::instructions::interrupts::without_interrupts(|| {
            serial::write(&line.buf[..line.len]);
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
