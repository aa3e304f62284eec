//! Just enough HTTP/1.1 (RFC 9112) for a status endpoint: checks a request head that
//! arrives in pieces from an untrusted peer, and writes `Connection: close` responses.
//!
//! The parser never panics and never allocates. It rejects a request as soon as the bytes
//! seen so far cannot start a valid one (binary garbage is answered without waiting for
//! a blank line that may never come), and it bounds the head's size. Bodies are not
//! read: the server only implements `GET`, and every response closes the connection.

use alloc::vec::Vec;
use core::fmt::Write as _;

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_HEAD: usize = 2048;

/// What the bytes received so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head<'a> {
    /// Valid so far, not complete yet.
    Incomplete,
    /// A complete, well-formed head.
    Complete(Request<'a>),
    /// Not HTTP, or malformed: answer 400.
    Invalid(&'static str),
    /// A version other than HTTP/1.x: answer 505.
    UnsupportedVersion,
    /// Longer than [`MAX_REQUEST_HEAD`] without ending: answer 431.
    TooLarge,
}

/// A parsed request line (headers are checked for form, not kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The request target's path, without the query.
    pub path: &'a str,
    /// The minor version of HTTP/1.x.
    pub minor_version: u8,
}

/// A response status this server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200
    Ok,
    /// 400
    BadRequest,
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 408
    RequestTimeout,
    /// 431
    HeadTooLarge,
    /// 505
    VersionNotSupported,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::HeadTooLarge => 431,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// `tchar` of RFC 9110 section 5.6.2: what methods and header names are made of.
pub(crate) fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Bytes that may appear anywhere in a request head: visible ASCII, space, tab, CR, LF.
/// (obs-text, bytes >= 0x80 in header values, is refused: nothing here needs it.)
fn is_head_byte(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | b'\r' | b' '..=b'~')
}

/// Splits the next line off `bytes` (ending in LF, an optional CR before it removed).
fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    let line = &bytes[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, &bytes[end + 1..]))
}

/// Checks a request line: `method SP target SP HTTP/1.x`.
fn parse_request_line(line: &[u8]) -> Result<Request<'_>, Head<'static>> {
    let text = core::str::from_utf8(line).map_err(|_| Head::Invalid("request line not text"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Head::Invalid("request line is not three words"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Head::Invalid("bad method"));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Head::Invalid("bad request target"));
    }
    let minor_version = match version.as_bytes() {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor @ b'0'..=b'9'] => minor - b'0',
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(Head::UnsupportedVersion)
        }
        _ => return Err(Head::Invalid("bad version")),
    };
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method,
        path,
        minor_version,
    })
}

/// Checks a header line: `name ":" value` with a token name and no obsolete folding.
fn check_header_line(line: &[u8]) -> Result<(), Head<'static>> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(Head::Invalid("header without colon"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(Head::Invalid("bad header name"));
    }
    if line[colon + 1..].contains(&b'\r') {
        return Err(Head::Invalid("stray CR in header"));
    }
    Ok(())
}

/// Checks the bytes of a request head received so far. `buffer` holds everything
/// received on the connection; `closed` says the peer sent FIN (no more will come).
pub fn check_head(buffer: &[u8], closed: bool) -> Head<'_> {
    let limit = buffer.len().min(MAX_REQUEST_HEAD);
    if let Some(&byte) = buffer[..limit].iter().find(|&&b| !is_head_byte(b)) {
        log::trace!("http: byte {byte:#04x} in request head");
        return Head::Invalid("not a text request");
    }
    // RFC 9112 section 2.2: ignore at least one empty line before the request line.
    let mut rest = buffer;
    while let Some(after) = rest
        .strip_prefix(b"\r\n")
        .or_else(|| rest.strip_prefix(b"\n"))
    {
        rest = after;
    }
    let request = match split_line(rest) {
        Some((line, after)) => match parse_request_line(line) {
            Ok(request) => {
                rest = after;
                request
            }
            Err(head) => return head,
        },
        None => {
            // No full line yet: refuse a start that can never become a method.
            if let Some(space) = rest.iter().position(|&b| b == b' ') {
                if space == 0 || !rest[..space].iter().copied().all(is_tchar) {
                    return Head::Invalid("bad method");
                }
            } else if !rest.iter().copied().all(is_tchar) {
                return Head::Invalid("bad method");
            }
            return incomplete(buffer, closed);
        }
    };
    loop {
        match split_line(rest) {
            Some((line, _)) if line.is_empty() => {
                let consumed = buffer.len() - rest.len() + line.len();
                if consumed > MAX_REQUEST_HEAD {
                    return Head::TooLarge;
                }
                return Head::Complete(request);
            }
            Some((line, after)) => {
                if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                    return Head::Invalid("obsolete header folding");
                }
                if let Err(head) = check_header_line(line) {
                    return head;
                }
                rest = after;
            }
            None => return incomplete(buffer, closed),
        }
    }
}

fn incomplete(buffer: &[u8], closed: bool) -> Head<'static> {
    if buffer.len() > MAX_REQUEST_HEAD {
        Head::TooLarge
    } else if closed {
        Head::Invalid("connection closed inside the request head")
    } else {
        Head::Incomplete
    }
}

/// Writes a complete response with `Connection: close` into `out` (cleared first).
/// `allow` adds an `Allow` header (for 405).
pub fn write_response(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    body: &[u8],
    allow: Option<&str>,
) {
    out.clear();
    let mut head = alloc::string::String::new();
    // Writing into a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n",
        status.code(),
        status.reason(),
        body.len()
    );
    if let Some(allow) = allow {
        let _ = write!(head, "Allow: {allow}\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn complete(text: &[u8]) -> Request<'_> {
        match check_head(text, false) {
            Head::Complete(request) => request,
            other => panic!("{:?}: {other:?}", core::str::from_utf8(text)),
        }
    }

    #[test]
    fn a_plain_get_parses() {
        let request = complete(b"GET /status?pretty=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/status");
        assert_eq!(request.minor_version, 1);
        let request = complete(b"\r\nPOST / HTTP/1.0\n\n");
        assert_eq!((request.method, request.path), ("POST", "/"));
    }

    #[test]
    fn pieces_are_incomplete_until_the_blank_line() {
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                check_head(&full[..cut], false),
                Head::Incomplete,
                "cut {cut}"
            );
        }
        assert!(matches!(check_head(full, false), Head::Complete(_)));
        assert!(matches!(check_head(&full[..10], true), Head::Invalid(_)));
    }

    #[test]
    fn garbage_is_refused_early() {
        assert!(matches!(
            check_head(b"\x16\x03\x01\x02", false),
            Head::Invalid(_)
        ));
        assert!(matches!(check_head(b"GE(T", false), Head::Invalid(_)));
        assert!(matches!(check_head(b" GET", false), Head::Invalid(_)));
        assert!(matches!(
            check_head(b"hello world\r\n", false),
            Head::Invalid(_)
        ));
        assert!(matches!(check_head(b"GET /\r\n", false), Head::Invalid(_)));
        assert!(matches!(
            check_head(b"GET x HTTP/1.1\r\n", false),
            Head::Invalid(_)
        ));
        assert!(matches!(
            check_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", false),
            Head::Invalid(_)
        ));
        assert!(matches!(
            check_head(b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", false),
            Head::Invalid(_)
        ));
        assert!(matches!(
            check_head("GET /\u{e9} HTTP/1.1\r\n\r\n".as_bytes(), false),
            Head::Invalid(_)
        ));
        assert_eq!(
            check_head(b"GET / HTTP/2.0\r\n\r\n", false),
            Head::UnsupportedVersion
        );
    }

    #[test]
    fn heads_are_bounded() {
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        while long.len() <= MAX_REQUEST_HEAD {
            long.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(check_head(&long, false), Head::TooLarge);
        long.extend_from_slice(b"\r\n");
        assert_eq!(check_head(&long, false), Head::TooLarge);
        let endless = vec![b'A'; MAX_REQUEST_HEAD + 1];
        assert_eq!(check_head(&endless, false), Head::TooLarge);
    }

    #[test]
    fn responses_close_and_carry_the_length() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            Status::MethodNotAllowed,
            "text/plain",
            b"no\n",
            Some("GET"),
        );
        let text = core::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("\r\nContent-Length: 3\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nAllow: GET\r\n"));
        assert!(text.ends_with("\r\n\r\nno\n"));
    }
}
