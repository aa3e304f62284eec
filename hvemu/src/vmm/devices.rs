//! The port-I/O devices the VMM emulates itself: COM1 (a 16550 register model good for
//! the `uart_16550` crate's init and transmit path) and the fixed ports of the machine.
//! The PIC, PIT (with port 0x61), local APIC and I/O APIC are KVM's in-kernel models.

use std::io::Write;
use std::time::Instant;

/// COM1 base port.
pub const COM1: u16 = 0x3F8;
/// QEMU's isa-debug-exit device: a write of `v` ends the VM with status `(v << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// The private port of the hypercall page's `out`/`in` pair.
pub const HYPERCALL_PORT: u16 = 0x8000;

const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_EMPTY: u8 = 0x40;
const MCR_LOOPBACK: u8 = 0x10;
const LCR_DLAB: u8 = 0x80;
/// Modem status with a remote attached: CTS, DSR, DCD.
const MSR_CONNECTED: u8 = 0xB0;

/// The line the guest prints when it is up (the appliance's ready line).
pub const READY_MARK: &str = "hvnet: ready";

/// A 16550 UART that transmits into a writer and never receives.
pub struct Serial {
    out: Box<dyn Write + Send>,
    dll: u8,
    dlm: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fifo: bool,
    /// The current output line (for the ready mark and the status tail).
    line: Vec<u8>,
    /// Last complete lines, newest last.
    tail: Vec<String>,
    /// When the ready line was printed, and the line itself.
    pub ready: Option<(Instant, String)>,
    /// Bytes transmitted.
    pub bytes: u64,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("bytes", &self.bytes)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

const TAIL_LINES: usize = 20;

impl Serial {
    /// A UART writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Serial {
            out,
            dll: 1,
            dlm: 0,
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            fifo: false,
            line: Vec::new(),
            tail: Vec::new(),
            ready: None,
            bytes: 0,
        }
    }

    /// A register read at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // receive buffer: nothing is ever received
            1 if dlab => self.dlm,
            1 => self.ier,
            // IIR: no interrupt pending; FIFOs enabled shows as bits 6-7.
            2 => 0x01 | if self.fifo { 0xC0 } else { 0 },
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_EMPTY,
            6 if self.mcr & MCR_LOOPBACK != 0 => {
                // Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                let m = self.mcr;
                ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            6 => MSR_CONNECTED,
            7 => self.scr,
            _ => 0xFF,
        }
    }

    /// A register write at `offset` from the base port.
    pub fn write(&mut self, offset: u16, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 if self.mcr & MCR_LOOPBACK != 0 => {} // looped back, not transmitted
            0 => self.transmit(value),
            1 if dlab => self.dlm = value,
            1 => self.ier = value & 0x0F,
            2 => self.fifo = value & 1 != 0,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1F,
            7 => self.scr = value,
            _ => {}
        }
    }

    fn transmit(&mut self, byte: u8) {
        self.bytes += 1;
        let _ = self.out.write_all(&[byte]);
        match byte {
            b'\n' => {
                let _ = self.out.flush();
                let line = String::from_utf8_lossy(&self.line).trim_end().to_string();
                self.line.clear();
                if self.ready.is_none() && line.contains(READY_MARK) {
                    self.ready = Some((Instant::now(), line.clone()));
                }
                if self.tail.len() == TAIL_LINES {
                    self.tail.remove(0);
                }
                self.tail.push(line);
            }
            b'\r' => {}
            _ if self.line.len() < 4096 => self.line.push(byte),
            _ => {}
        }
    }

    /// The last lines printed.
    pub fn tail(&self) -> &[String] {
        &self.tail
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The register sequence of `uart_16550`'s `check_present` + `init`, then text.
    #[test]
    fn uart_16550_init_and_transmit() {
        let sink = Sink::default();
        let mut s = Serial::new(Box::new(sink.clone()));
        // Scratch register presence test.
        s.write(7, 0x42);
        assert_eq!(s.read(7), 0x42);
        s.write(7, 0x73);
        assert_eq!(s.read(7), 0x73);
        // Divisor latch, line control, FIFO enable.
        s.write(3, 0x80);
        s.write(0, 1);
        s.write(1, 0);
        assert_eq!((s.read(0), s.read(1)), (1, 0));
        s.write(3, 0x03);
        s.write(2, 0xC7);
        assert_eq!(s.read(2) & 0xC0, 0xC0, "FIFOs enabled");
        assert_eq!(s.read(5) & 0x01, 0, "no data ready");
        s.write(4, 0x0B);
        assert_ne!(s.read(5) & LSR_TX_EMPTY, 0);
        assert_eq!(s.read(6) & 0x10, 0x10, "CTS");
        for &b in b"hello\r\nhvnet: ready, VMBus 5.3\r\n" {
            assert_ne!(s.read(5) & LSR_THR_EMPTY, 0);
            s.write(0, b);
        }
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"hello\r\nhvnet: ready, VMBus 5.3\r\n"
        );
        assert_eq!(s.tail(), ["hello", "hvnet: ready, VMBus 5.3"]);
        assert!(s.ready.as_ref().unwrap().1.ends_with("VMBus 5.3"));
        // Loopback mode transmits nothing and mirrors the modem lines.
        s.write(4, MCR_LOOPBACK | 0x03);
        s.write(0, b'x');
        assert_eq!(s.read(6) & 0x30, 0x30);
        assert_eq!(s.bytes, 32);
    }
}
