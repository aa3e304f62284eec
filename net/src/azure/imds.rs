//! The Azure Instance Metadata Service: `GET /metadata/instance?api-version=2021-02-01`
//! with `Metadata: true` (IMDS answers 400 without it; facts sheet section 9), read
//! once at boot for the log and the status page.
//!
//! The answer is JSON from the network, read by [`JsonReader`]: a bounded recursive
//! descent over the whole document (RFC 8259 grammar: strings with every escape
//! including surrogate pairs, numbers, literals) that never panics, limits nesting to
//! [`MAX_DEPTH`], and hands each string value to a visitor with the path that leads to
//! it. [`parse_instance`] keeps only `compute.name`, `compute.vmSize`,
//! `compute.location` and, per `network.interface[i]`, `macAddress` and every
//! `ipv4.ipAddress[j].privateIpAddress`.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

use super::http_client::encode_request;

/// The document read.
pub const IMDS_PATH: &str = "/metadata/instance?api-version=2021-02-01";
/// Deepest nesting of arrays and objects read.
pub const MAX_DEPTH: usize = 32;
/// Longest name, size or location kept (bytes).
pub const MAX_FIELD_LEN: usize = 256;
/// Interfaces kept.
pub const MAX_INTERFACES: usize = 32;
/// Addresses kept per interface.
pub const MAX_ADDRESSES: usize = 32;

/// Why a document is not JSON this reader takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonError {
    /// Not UTF-8.
    NotText,
    /// The document ends inside a value.
    Truncated,
    /// Deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Not JSON; the text says where it broke.
    Malformed(&'static str),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::NotText => f.write_str("JSON is not UTF-8"),
            JsonError::Truncated => f.write_str("JSON truncated"),
            JsonError::TooDeep => f.write_str("JSON nested too deeply"),
            JsonError::Malformed(what) => write!(f, "malformed JSON: {what}"),
        }
    }
}

/// One step of the path to a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// An object member.
    Key(String),
    /// An array element.
    Index(usize),
}

/// A validating JSON walker. See the [module docs](self).
pub struct JsonReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> JsonReader<'a> {
    /// Walks the whole of `bytes` (one JSON text), calling `visit` with the path and the
    /// decoded value of every string.
    pub fn walk(bytes: &'a [u8], visit: &mut dyn FnMut(&[Segment], &str)) -> Result<(), JsonError> {
        core::str::from_utf8(bytes).map_err(|_| JsonError::NotText)?;
        let mut reader = JsonReader { bytes, pos: 0 };
        let mut path = Vec::new();
        reader.skip_ws();
        reader.value(&mut path, visit)?;
        reader.skip_ws();
        if reader.pos != bytes.len() {
            return Err(JsonError::Malformed("data after the value"));
        }
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        match self.peek() {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(JsonError::Malformed(what)),
            None => Err(JsonError::Truncated),
        }
    }

    fn value(
        &mut self,
        path: &mut Vec<Segment>,
        visit: &mut dyn FnMut(&[Segment], &str),
    ) -> Result<(), JsonError> {
        match self.peek().ok_or(JsonError::Truncated)? {
            b'{' => self.object(path, visit),
            b'[' => self.array(path, visit),
            b'"' => {
                let text = self.string()?;
                visit(path, &text);
                Ok(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(JsonError::Malformed("not a value")),
        }
    }

    fn object(
        &mut self,
        path: &mut Vec<Segment>,
        visit: &mut dyn FnMut(&[Segment], &str),
    ) -> Result<(), JsonError> {
        if path.len() >= MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.peek().map_or(JsonError::Truncated, |_| {
                    JsonError::Malformed("object key is not a string")
                }));
            }
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':', "no colon after a key")?;
            self.skip_ws();
            path.push(Segment::Key(key));
            let result = self.value(path, visit);
            path.pop();
            result?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => return Err(JsonError::Malformed("expected ',' or '}'")),
                None => return Err(JsonError::Truncated),
            }
        }
    }

    fn array(
        &mut self,
        path: &mut Vec<Segment>,
        visit: &mut dyn FnMut(&[Segment], &str),
    ) -> Result<(), JsonError> {
        if path.len() >= MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        let mut index = 0;
        loop {
            self.skip_ws();
            path.push(Segment::Index(index));
            let result = self.value(path, visit);
            path.pop();
            result?;
            index += 1;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => return Err(JsonError::Malformed("expected ',' or ']'")),
                None => return Err(JsonError::Truncated),
            }
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        let rest = &self.bytes[self.pos..];
        if rest.starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else if word.starts_with(rest) {
            Err(JsonError::Truncated)
        } else {
            Err(JsonError::Malformed("bad literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            Some(_) => return Err(JsonError::Malformed("bad number")),
            None => return Err(JsonError::Truncated),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.end_or(JsonError::Malformed("bad fraction")));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.end_or(JsonError::Malformed("bad exponent")));
            }
        }
        Ok(())
    }

    fn end_or(&self, error: JsonError) -> JsonError {
        if self.pos >= self.bytes.len() {
            JsonError::Truncated
        } else {
            error
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or(JsonError::Truncated)?;
        let mut value = 0;
        for &d in digits {
            value = value * 16
                + (d as char)
                    .to_digit(16)
                    .ok_or(JsonError::Malformed("bad \\u escape"))?;
        }
        self.pos += 4;
        Ok(value)
    }

    /// A string (the cursor on its opening quote), decoded.
    fn string(&mut self) -> Result<String, JsonError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // The input is UTF-8 and the run stops only at ASCII bytes, so the run is
            // whole characters.
            let run = core::str::from_utf8(&self.bytes[start..self.pos])
                .map_err(|_| JsonError::NotText)?;
            out.push_str(run);
            match self.peek().ok_or(JsonError::Truncated)? {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let escape = self.peek().ok_or(JsonError::Truncated)?;
                    self.pos += 1;
                    let c = match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(JsonError::Malformed("bad escape")),
                    };
                    out.push(c);
                }
                _ => return Err(JsonError::Malformed("control character in a string")),
            }
        }
    }

    /// After `\u`: one code point, from a surrogate pair if it takes two escapes.
    fn unicode_escape(&mut self) -> Result<char, JsonError> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.bytes.get(self.pos..self.pos + 2) != Some(&b"\\u"[..]) {
                return Err(self.end_or(JsonError::Malformed("lone surrogate")));
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return Err(JsonError::Malformed("lone surrogate"));
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or(JsonError::Malformed("lone surrogate"))
    }
}

/// One network interface as IMDS describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImdsInterface {
    /// `macAddress` (IMDS writes twelve hex digits without separators), if it parses.
    pub mac: Option<[u8; 6]>,
    /// Every `ipv4.ipAddress[].privateIpAddress` that is a dotted quad.
    pub ipv4: Vec<Ipv4Addr>,
}

/// What the appliance keeps from IMDS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImdsInfo {
    /// `compute.name`.
    pub name: String,
    /// `compute.vmSize`.
    pub vm_size: String,
    /// `compute.location`.
    pub location: String,
    /// `network.interface[]`, in order.
    pub interfaces: Vec<ImdsInterface>,
}

/// Why an IMDS answer was not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImdsError {
    /// Not JSON.
    Json(JsonError),
    /// A field is missing, not a string, or too long (its path).
    Missing(&'static str),
}

impl fmt::Display for ImdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImdsError::Json(error) => write!(f, "IMDS: {error}"),
            ImdsError::Missing(what) => write!(f, "IMDS document without a usable {what}"),
        }
    }
}

/// Parses a MAC written as twelve hex digits, optionally split by `:` or `-`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut digits = 0usize;
    for c in text.chars() {
        if c == ':' || c == '-' {
            continue;
        }
        let value = c.to_digit(16)? as u8;
        let byte = mac.get_mut(digits / 2)?;
        *byte = (*byte << 4) | value;
        digits += 1;
    }
    (digits == 12).then_some(mac)
}

/// Reads what the appliance keeps out of an IMDS `instance` document.
pub fn parse_instance(json: &[u8]) -> Result<ImdsInfo, ImdsError> {
    let mut name = None;
    let mut vm_size = None;
    let mut location = None;
    let mut interfaces: BTreeMap<usize, ImdsInterface> = BTreeMap::new();
    let mut visit = |path: &[Segment], value: &str| {
        let key = |i: usize| match path.get(i) {
            Some(Segment::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let index = |i: usize| match path.get(i) {
            Some(Segment::Index(n)) => Some(*n),
            _ => None,
        };
        let field = |slot: &mut Option<String>| {
            if slot.is_none()
                && value.len() <= MAX_FIELD_LEN
                && !value.chars().any(char::is_control)
            {
                *slot = Some(String::from(value));
            }
        };
        match (path.len(), key(0), key(1)) {
            (2, Some("compute"), Some("name")) => field(&mut name),
            (2, Some("compute"), Some("vmSize")) => field(&mut vm_size),
            (2, Some("compute"), Some("location")) => field(&mut location),
            (_, Some("network"), Some("interface")) => {
                let Some(i) = index(2) else { return };
                if i >= MAX_INTERFACES {
                    return;
                }
                let nic = interfaces.entry(i).or_default();
                if path.len() == 4 && key(3) == Some("macAddress") {
                    if nic.mac.is_none() {
                        nic.mac = parse_mac(value);
                    }
                } else if path.len() == 7
                    && key(3) == Some("ipv4")
                    && key(4) == Some("ipAddress")
                    && index(5).is_some()
                    && key(6) == Some("privateIpAddress")
                    && nic.ipv4.len() < MAX_ADDRESSES
                {
                    if let Ok(ip) = value.parse::<Ipv4Addr>() {
                        nic.ipv4.push(ip);
                    }
                }
            }
            _ => {}
        }
    };
    JsonReader::walk(json, &mut visit).map_err(ImdsError::Json)?;
    Ok(ImdsInfo {
        name: name.ok_or(ImdsError::Missing("compute.name"))?,
        vm_size: vm_size.ok_or(ImdsError::Missing("compute.vmSize"))?,
        location: location.ok_or(ImdsError::Missing("compute.location"))?,
        interfaces: interfaces.into_values().collect(),
    })
}

/// The IMDS request.
pub fn imds_request(imds: Ipv4Addr) -> Vec<u8> {
    encode_request("GET", imds, IMDS_PATH, &[("Metadata", "true")], b"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    const INSTANCE: &str = r#"{
  "compute": {
    "azEnvironment": "AzurePublicCloud",
    "location": "westeurope",
    "name": "hvnet-\u00e9dge-01",
    "offer": "",
    "osProfile": {"adminUsername": "azureuser", "computerName": "hvnet-edge-01"},
    "platformFaultDomain": "0",
    "publicKeys": [{"keyData": "ssh-rsa AAAA\/B+C==", "path": "/home/azureuser/.ssh/authorized_keys"}],
    "tagsList": [],
    "vmId": "6f1c5a8e-2b7d-4e39-9a0c-1d2e3f4a5b6c",
    "vmSize": "Standard_D2s_v5",
    "zone": "",
    "weird": [1, -0.5e+3, true, false, null, {"a": "\ud83d\ude00"}]
  },
  "network": {
    "interface": [
      {
        "ipv4": {
          "ipAddress": [
            {"privateIpAddress": "10.0.0.4", "publicIpAddress": "20.1.2.3"},
            {"privateIpAddress": "10.0.0.5", "publicIpAddress": ""}
          ],
          "subnet": [{"address": "10.0.0.0", "prefix": "24"}]
        },
        "ipv6": {"ipAddress": []},
        "macAddress": "000D3A1B2C3D"
      },
      {
        "ipv4": {"ipAddress": [{"privateIpAddress": "10.1.0.4"}, {"privateIpAddress": "not an address"}]},
        "macAddress": "00-0D-3A-AA-BB-CC"
      }
    ]
  }
}"#;

    #[test]
    fn an_instance_document_is_read() {
        let info = parse_instance(INSTANCE.as_bytes()).unwrap();
        assert_eq!(info.name, "hvnet-\u{e9}dge-01");
        assert_eq!(info.vm_size, "Standard_D2s_v5");
        assert_eq!(info.location, "westeurope");
        assert_eq!(
            info.interfaces,
            vec![
                ImdsInterface {
                    mac: Some([0x00, 0x0d, 0x3a, 0x1b, 0x2c, 0x3d]),
                    ipv4: vec![Ipv4Addr::new(10, 0, 0, 4), Ipv4Addr::new(10, 0, 0, 5)],
                },
                ImdsInterface {
                    mac: Some([0x00, 0x0d, 0x3a, 0xaa, 0xbb, 0xcc]),
                    ipv4: vec![Ipv4Addr::new(10, 1, 0, 4)],
                },
            ]
        );
        let request = imds_request(Ipv4Addr::new(169, 254, 169, 254));
        let text = core::str::from_utf8(&request).unwrap();
        assert!(text.starts_with("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\n"));
        assert!(text.contains("\r\nMetadata: true\r\n"));
    }

    #[test]
    fn broken_documents_are_refused() {
        let cases: &[(&str, ImdsError)] = &[
            ("", ImdsError::Json(JsonError::Truncated)),
            ("{", ImdsError::Json(JsonError::Truncated)),
            (
                "{\"compute\": {\"name\": \"x",
                ImdsError::Json(JsonError::Truncated),
            ),
            (
                "{\"a\" 1}",
                ImdsError::Json(JsonError::Malformed("no colon after a key")),
            ),
            (
                "{a: 1}",
                ImdsError::Json(JsonError::Malformed("object key is not a string")),
            ),
            ("[1,]", ImdsError::Json(JsonError::Malformed("not a value"))),
            (
                "[01]",
                ImdsError::Json(JsonError::Malformed("expected ',' or ']'")),
            ),
            (
                "[1.]",
                ImdsError::Json(JsonError::Malformed("bad fraction")),
            ),
            (
                "[tru]",
                ImdsError::Json(JsonError::Malformed("bad literal")),
            ),
            (
                "\"\\x\"",
                ImdsError::Json(JsonError::Malformed("bad escape")),
            ),
            (
                "\"\\ud800\"",
                ImdsError::Json(JsonError::Malformed("lone surrogate")),
            ),
            (
                "\"\\udc00\"",
                ImdsError::Json(JsonError::Malformed("lone surrogate")),
            ),
            (
                "\"a\u{1}\"",
                ImdsError::Json(JsonError::Malformed("control character in a string")),
            ),
            (
                "{} {}",
                ImdsError::Json(JsonError::Malformed("data after the value")),
            ),
            (
                "<html>",
                ImdsError::Json(JsonError::Malformed("not a value")),
            ),
            ("{}", ImdsError::Missing("compute.name")),
            (
                "{\"compute\": {\"name\": 5, \"vmSize\": \"s\", \"location\": \"l\"}}",
                ImdsError::Missing("compute.name"),
            ),
            (
                "{\"compute\": {\"name\": \"n\", \"location\": \"l\"}}",
                ImdsError::Missing("compute.vmSize"),
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(parse_instance(json.as_bytes()), Err(*expected), "{json}");
        }
        assert_eq!(
            parse_instance(b"\"\xff\""),
            Err(ImdsError::Json(JsonError::NotText))
        );
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(
            parse_instance(deep.as_bytes()),
            Err(ImdsError::Json(JsonError::TooDeep))
        );
        let long = format!(
            "{{\"compute\": {{\"name\": \"{}\", \"vmSize\": \"s\", \"location\": \"l\"}}}}",
            "n".repeat(MAX_FIELD_LEN + 1)
        );
        assert_eq!(
            parse_instance(long.as_bytes()),
            Err(ImdsError::Missing("compute.name"))
        );
        assert_eq!(
            parse_mac("00:15:5d:00:00:01"),
            Some([0, 0x15, 0x5d, 0, 0, 1])
        );
        assert_eq!(parse_mac("00155d0000"), None);
        assert_eq!(parse_mac("00155d00000102"), None);
        assert_eq!(parse_mac("00155d00000g"), None);
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let sample = INSTANCE.as_bytes();
        for cut in 0..sample.len() {
            assert!(parse_instance(&sample[..cut]).is_err(), "cut at {cut}");
        }
        crate::azure::bit_flips(sample, 11, 20_000, |bytes, _| {
            if let Ok(info) = parse_instance(bytes) {
                assert!(info.name.len() <= MAX_FIELD_LEN);
                assert!(info.interfaces.len() <= MAX_INTERFACES);
            }
        });
    }
}
