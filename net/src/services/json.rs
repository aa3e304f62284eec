//! A small JSON writer (RFC 8259) for the status endpoint: no serde in the image.
//!
//! It only writes; callers nest [`JsonWriter::begin_object`]/[`JsonWriter::end_object`]
//! and friends, and the writer puts the commas and colons in. Strings are escaped
//! completely: `"` and `\`, every control character below U+0020 (short forms where JSON
//! has them, `\u00XX` otherwise), and U+2028/U+2029 so the output is also valid
//! JavaScript. Anything else is copied as UTF-8, which JSON allows.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

/// Builds one JSON text into a `String`.
#[derive(Debug, Default)]
pub struct JsonWriter {
    out: String,
    /// One entry per open object or array: whether it has had an element yet.
    open: Vec<bool>,
    /// An object key was just written; the next value follows its colon.
    after_key: bool,
}

impl JsonWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    /// Puts a comma before every element but the first of its container.
    fn element(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        if let Some(has_elements) = self.open.last_mut() {
            if *has_elements {
                self.out.push(',');
            }
            *has_elements = true;
        }
    }

    /// `{`
    pub fn begin_object(&mut self) -> &mut Self {
        self.element();
        self.out.push('{');
        self.open.push(false);
        self
    }

    /// `}`
    pub fn end_object(&mut self) -> &mut Self {
        self.open.pop();
        self.out.push('}');
        self
    }

    /// `[`
    pub fn begin_array(&mut self) -> &mut Self {
        self.element();
        self.out.push('[');
        self.open.push(false);
        self
    }

    /// `]`
    pub fn end_array(&mut self) -> &mut Self {
        self.open.pop();
        self.out.push(']');
        self
    }

    /// An object member's key; the next call writes its value.
    pub fn key(&mut self, key: &str) -> &mut Self {
        self.element();
        write_escaped(&mut self.out, key);
        self.out.push(':');
        self.after_key = true;
        self
    }

    /// A string value.
    pub fn string(&mut self, value: &str) -> &mut Self {
        self.element();
        write_escaped(&mut self.out, value);
        self
    }

    /// A string value written with `Display` (an address, say), escaped like any string.
    pub fn display(&mut self, value: impl fmt::Display) -> &mut Self {
        let mut text = String::new();
        let _ = write!(text, "{value}");
        self.string(&text)
    }

    /// An unsigned number.
    pub fn number(&mut self, value: u64) -> &mut Self {
        self.element();
        let _ = write!(self.out, "{value}");
        self
    }

    /// `true` or `false`.
    pub fn boolean(&mut self, value: bool) -> &mut Self {
        self.element();
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// `null`.
    pub fn null(&mut self) -> &mut Self {
        self.element();
        self.out.push_str("null");
        self
    }
}

/// Appends `text` to `out` as a JSON string, quotes included.
pub fn write_escaped(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_puts_commas_and_colons_in() {
        let mut w = JsonWriter::new();
        w.begin_object();
        w.key("a").number(1);
        w.key("b").begin_array();
        w.boolean(true).null().string("x");
        w.begin_object().end_object();
        w.end_array();
        w.key("c").begin_object().key("d").display(1.5).end_object();
        w.end_object();
        assert_eq!(
            w.finish(),
            r#"{"a":1,"b":[true,null,"x",{}],"c":{"d":"1.5"}}"#
        );
    }

    #[test]
    fn strings_are_escaped() {
        let mut out = String::new();
        write_escaped(&mut out, "q\"b\\n\nr\rt\t\u{0}\u{1f}\u{7f}é\u{2028}😀");
        assert_eq!(
            out,
            "\"q\\\"b\\\\n\\nr\\rt\\t\\u0000\\u001f\u{7f}é\\u2028😀\""
        );
    }
}
