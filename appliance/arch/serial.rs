//! COM1 at 115200 8N1: the appliance's console (Azure's serial console reads it).

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Initialises COM1. Output before this (or if the UART is absent) is dropped.
pub fn init() {
    // SAFETY: 0x3f8..0x400 is the standard COM1 range and only this module drives it.
    let Ok(mut uart) = (unsafe { Uart16550::new_port(COM1) }) else {
        return;
    };
    let config = Config {
        baud_rate: uart_16550::BaudRate::Baud115200,
        ..Config::DEFAULT
    };
    if uart.init(config).is_ok() {
        *PORT.lock() = Some(uart);
    }
}

/// Writes `bytes`, translating `\n` to `\r\n` for terminals.
pub fn write(bytes: &[u8]) {
    let mut guard = PORT.lock();
    if let Some(uart) = guard.as_mut() {
        write_to(uart, bytes);
    }
}

fn write_to(uart: &mut Uart16550<PioBackend>, bytes: &[u8]) {
    for chunk in bytes.split_inclusive(|&b| b == b'\n') {
        if let Some(line) = chunk.strip_suffix(b"\n") {
            uart.send_bytes_exact(line);
            uart.send_bytes_exact(b"\r\n");
        } else {
            uart.send_bytes_exact(chunk);
        }
    }
}

/// A writer for fatal paths: if the console lock is held (the fault hit while logging),
/// it takes the port anyway rather than deadlocking; the only cost is interleaved output.
pub struct EmergencyWriter;

impl core::fmt::Write for EmergencyWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        if let Some(mut guard) = PORT.try_lock() {
            if let Some(uart) = guard.as_mut() {
                write_to(uart, s.as_bytes());
            }
            return Ok(());
        }
        // SAFETY: we are on the fatal path with interrupts off and will never return to
        // the code holding the lock; breaking it is the only way to report the fault.
        unsafe { PORT.force_unlock() };
        if let Some(uart) = PORT.lock().as_mut() {
            write_to(uart, s.as_bytes());
        }
        Ok(())
    }
}
