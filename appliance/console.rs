//! One console line, made safe for Azure's serial console and terminal emulators.
//!
//! Log messages carry text the appliance does not control: names and addresses from the
//! host (IMDS, KVP), HTTP reason phrases, peers' data. An escape sequence in any of them
//! would reach the operator's terminal as a command (clear screen, retitle, colour), so
//! the line keeps printable ASCII, tabs and newlines and shows everything else as `?`
//! (one `?` per character, not per byte). It is a fixed buffer so a line never allocates
//! and goes out whole; an over-long line ends in `...`.

use core::fmt;

/// Bytes one line may hold before it is truncated.
pub const LINE_CAPACITY: usize = 512;

/// A line being formatted for the console.
pub struct ConsoleLine {
    buf: [u8; LINE_CAPACITY],
    len: usize,
    truncated: bool,
}

impl ConsoleLine {
    /// An empty line.
    pub const fn new() -> Self {
        ConsoleLine {
            buf: [0; LINE_CAPACITY],
            len: 0,
            truncated: false,
        }
    }

    /// The bytes to send: console-safe ASCII, ending in `...` if something was cut.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        if self.len < LINE_CAPACITY {
            self.buf[self.len] = b;
            self.len += 1;
        } else if !self.truncated {
            self.truncated = true;
            self.buf[LINE_CAPACITY - 3..].copy_from_slice(b"...");
        }
    }
}

impl Default for ConsoleLine {
    fn default() -> Self {
        Self::new()
    }
}

/// What a character becomes on the console.
pub fn console_byte(c: char) -> u8 {
    match c {
        '\n' | '\t' | ' '..='~' => c as u8,
        _ => b'?',
    }
}

impl fmt::Write for ConsoleLine {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.truncated {
                break;
            }
            self.push(console_byte(c));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    fn line(s: &str) -> ConsoleLine {
        let mut l = ConsoleLine::new();
        l.write_str(s).unwrap();
        l
    }

    #[test]
    fn printable_ascii_passes_unchanged() {
        let s = "[    1.000000] INFO  hvnet: ready, VMBus 5.3\tok\nnext";
        assert_eq!(line(s).as_bytes(), s.as_bytes());
    }

    #[test]
    fn escape_sequences_and_controls_become_question_marks() {
        assert_eq!(line("a\x1b[2Jb\rc\x07d\x7f").as_bytes(), b"a?[2Jb?c?d?");
    }

    #[test]
    fn non_ascii_is_one_mark_per_character() {
        assert_eq!(line("vm-\u{e9}t\u{e9}-\u{1f600}").as_bytes(), b"vm-?t?-?");
    }

    #[test]
    fn long_lines_end_in_an_ellipsis_and_never_overflow() {
        let mut l = ConsoleLine::new();
        for _ in 0..100 {
            write!(l, "0123456789").unwrap();
        }
        let b = l.as_bytes();
        assert_eq!(b.len(), LINE_CAPACITY);
        assert!(b.ends_with(b"..."));
        assert!(b[..LINE_CAPACITY - 3].iter().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn exactly_full_line_is_not_marked_truncated() {
        let s = "x".repeat(LINE_CAPACITY);
        assert_eq!(line(&s).as_bytes(), s.as_bytes());
    }
}
