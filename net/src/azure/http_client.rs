//! A minimal, strict HTTP/1.1 client (RFC 9112) for the Azure endpoints, as a state
//! machine over one smoltcp TCP socket.
//!
//! Two layers:
//! - [`ResponseParser`]: pure. Bytes from an untrusted server go in, in pieces of any
//!   size; out comes a [`Response`] or an [`HttpError`] that says what the server got
//!   wrong. It never panics, bounds everything it keeps (head [`MAX_RESPONSE_HEAD`],
//!   [`MAX_HEADERS`] fields, a caller-chosen body limit, chunk lines
//!   [`MAX_CHUNK_LINE`]) and refuses a body that announces more than the limit before
//!   reading any of it.
//! - [`Exchange`]: one request and its response on a fresh connection: connect, write
//!   the request, feed the parser, give up at the deadline. Time is passed in; nothing
//!   here waits. The caller polls it after smoltcp has run and hands the socket to
//!   [`Linger`] when it is done with it, so the connection ends cleanly (or with a
//!   reset) before the socket is removed from its set.
//!
//! What is accepted, on purpose narrowly: `HTTP/1.x` status lines with a three-digit
//! code in 100..=599; header fields `token ":" value` without obsolete folding or
//! control characters (a bare LF ends a line as well as CRLF, which RFC 9112 section 2.2
//! permits); a body framed by one `Content-Length` (repeats must agree), by
//! `Transfer-Encoding: chunked` alone, or by the end of the connection. Both framings at
//! once are refused (a request-smuggling shape), and so is any other transfer coding.
//! Interim (1xx) responses are skipped, at most [`MAX_INTERIM`] of them.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use hvnet_runtime::{Duration, Instant};
use smoltcp::iface::{Interface as SmolInterface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

use crate::iface::to_net_duration;
use crate::services::http::is_tchar;

/// Largest response head (status line and header fields) accepted.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Most header fields in one response head.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (with extensions) or trailer line.
pub const MAX_CHUNK_LINE: usize = 256;
/// Interim (1xx) responses skipped before the final one.
pub const MAX_INTERIM: u8 = 4;
/// Receive buffer of an exchange's socket; the parser drains it every poll.
pub const RX_BUFFER: usize = 8 * 1024;
/// After the response, how long a connection may take to close before it is reset.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong with an exchange; the variants name what the server (or the path to
/// it) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// smoltcp could not open the connection (no address or route on the interface).
    Unaddressable,
    /// The connection was refused (reset during the handshake).
    Refused,
    /// No connection within the time allowed.
    ConnectTimeout,
    /// The response was not complete within the time allowed.
    Timeout,
    /// The server reset the connection before the response was complete.
    Reset,
    /// The connection ended inside the response head or body.
    Truncated,
    /// The request could not be written to the socket.
    SendFailed,
    /// The response head is longer than [`MAX_RESPONSE_HEAD`] or has more than
    /// [`MAX_HEADERS`] fields.
    HeadTooLarge,
    /// The body is, or says it will be, longer than the limit.
    BodyTooLarge,
    /// The status line is not `HTTP/1.x NNN reason`.
    BadStatusLine,
    /// A header field is malformed (no colon, bad name, control bytes, folding).
    BadHeader,
    /// `Content-Length` is not a decimal number, or several disagree.
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    AmbiguousLength,
    /// A transfer coding other than `chunked`.
    UnsupportedTransferEncoding,
    /// Malformed chunked framing.
    BadChunk,
    /// More interim (1xx) responses than [`MAX_INTERIM`], or a 101.
    UnexpectedInterim,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            HttpError::Unaddressable => "no route to the server",
            HttpError::Refused => "connection refused",
            HttpError::ConnectTimeout => "connection timed out",
            HttpError::Timeout => "response timed out",
            HttpError::Reset => "connection reset",
            HttpError::Truncated => "response truncated",
            HttpError::SendFailed => "request could not be sent",
            HttpError::HeadTooLarge => "response head too large",
            HttpError::BodyTooLarge => "response body too large",
            HttpError::BadStatusLine => "malformed status line",
            HttpError::BadHeader => "malformed header field",
            HttpError::BadContentLength => "malformed Content-Length",
            HttpError::AmbiguousLength => "both Content-Length and Transfer-Encoding",
            HttpError::UnsupportedTransferEncoding => "unsupported Transfer-Encoding",
            HttpError::BadChunk => "malformed chunked body",
            HttpError::UnexpectedInterim => "unexpected interim responses",
        };
        f.write_str(text)
    }
}

/// A complete response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Status code (100..=599).
    pub status: u16,
    /// Header fields in arrival order: names in lower case, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Writes a request with `Host`, the given fields, `Content-Length` (when there is a body
/// or the method is `POST`) and `Connection: close`. Field names and values containing
/// CR or LF are dropped rather than let them split the head.
pub fn encode_request(
    method: &str,
    host: Ipv4Addr,
    path: &str,
    fields: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = String::new();
    let path = if path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()) {
        path
    } else {
        "/"
    };
    // Writing into a String cannot fail.
    let _ = write!(head, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in fields {
        let clean = |s: &str| !s.bytes().any(|b| b == b'\r' || b == b'\n');
        if clean(name) && clean(value) && !name.is_empty() {
            let _ = write!(head, "{name}: {value}\r\n");
        }
    }
    if !body.is_empty() || method == "POST" {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Bytes allowed in a field value or reason phrase: HTAB, SP, VCHAR, obs-text.
fn is_field_byte(byte: u8) -> bool {
    byte == b'\t' || byte == b' ' || byte.is_ascii_graphic() || byte >= 0x80
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (`line` bytes of it so far).
    Size {
        line: usize,
        value: u64,
        digits: u8,
        in_ext: bool,
        cr: bool,
    },
    /// Reading chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: expecting CR LF (or a bare LF).
    DataEnd { cr: bool },
    /// In the trailer section: `line` bytes into the current line, `total` in all.
    Trailer { line: usize, total: usize, cr: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Body(Body),
    Done,
    Failed(HttpError),
}

/// The incremental response parser. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ResponseParser {
    max_body: usize,
    state: State,
    head: Vec<u8>,
    interim: u8,
    response: Response,
}

impl ResponseParser {
    /// A parser for one response whose body may be at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        ResponseParser {
            max_body,
            state: State::Head,
            head: Vec::new(),
            interim: 0,
            response: Response::default(),
        }
    }

    /// Whether a complete response has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds bytes received. Bytes after the end of the response are ignored. Once it
    /// has failed, every call returns the same error.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), HttpError> {
        while !bytes.is_empty() {
            let used = match self.state {
                State::Failed(error) => return Err(error),
                State::Done => return Ok(()),
                State::Head => self.push_head(bytes),
                State::Body(body) => self.push_body(body, bytes),
            };
            match used {
                Ok(n) => bytes = bytes.get(n..).unwrap_or(&[]),
                Err(error) => {
                    self.state = State::Failed(error);
                    return Err(error);
                }
            }
        }
        match self.state {
            State::Failed(error) => Err(error),
            _ => Ok(()),
        }
    }

    /// The server closed its side: completes a body framed by the connection's end,
    /// anything else is [`HttpError::Truncated`].
    pub fn finish(&mut self) -> Result<(), HttpError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed(error) => Err(error),
            State::Body(Body::UntilClose) => {
                self.state = State::Done;
                Ok(())
            }
            State::Head | State::Body(_) => {
                self.state = State::Failed(HttpError::Truncated);
                Err(HttpError::Truncated)
            }
        }
    }

    /// The response, once [`is_done`](Self::is_done).
    pub fn into_response(self) -> Option<Response> {
        (self.state == State::Done).then_some(self.response)
    }

    /// Takes head bytes up to and including the blank line; returns how many it used.
    fn push_head(&mut self, bytes: &[u8]) -> Result<usize, HttpError> {
        for (index, &byte) in bytes.iter().enumerate() {
            if self.head.len() >= MAX_RESPONSE_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            self.head.push(byte);
            // Refuse a server that is not speaking HTTP as soon as it shows.
            let prefix = b"HTTP/1.";
            let n = self.head.len().min(prefix.len());
            if self.head[..n] != prefix[..n] {
                return Err(HttpError::BadStatusLine);
            }
            if byte == b'\n' && (self.head.ends_with(b"\n\n") || self.head.ends_with(b"\n\r\n")) {
                self.parse_head()?;
                return Ok(index + 1);
            }
        }
        Ok(bytes.len())
    }

    /// Parses the complete head in `self.head` and picks the body framing.
    fn parse_head(&mut self) -> Result<(), HttpError> {
        let head = core::mem::take(&mut self.head);
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let status_line = lines.next().ok_or(HttpError::BadStatusLine)?;
        let status = parse_status_line(status_line)?;
        let mut headers = Vec::new();
        for line in lines {
            if line.is_empty() {
                break;
            }
            if headers.len() >= MAX_HEADERS {
                return Err(HttpError::HeadTooLarge);
            }
            headers.push(parse_field(line)?);
        }
        if (100..200).contains(&status) {
            // RFC 9110 section 15.2: a client must accept interim responses it did not
            // ask for; 101 switches protocols, which nothing here asked for.
            self.interim += 1;
            if status == 101 || self.interim > MAX_INTERIM {
                return Err(HttpError::UnexpectedInterim);
            }
            self.head = head;
            self.head.clear();
            return Ok(());
        }
        let body = framing(&headers, status, self.max_body)?;
        self.response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        self.state = match body {
            Body::Length(0) => State::Done,
            body => State::Body(body),
        };
        Ok(())
    }

    fn push_body(&mut self, body: Body, bytes: &[u8]) -> Result<usize, HttpError> {
        match body {
            Body::Length(left) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                self.append(&bytes[..take])?;
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::Done
                } else {
                    State::Body(Body::Length(left))
                };
                Ok(take)
            }
            Body::UntilClose => {
                self.append(bytes)?;
                Ok(bytes.len())
            }
            Body::Chunked(chunk) => self.push_chunked(chunk, bytes),
        }
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        if self.response.body.len() + bytes.len() > self.max_body {
            return Err(HttpError::BodyTooLarge);
        }
        self.response.body.extend_from_slice(bytes);
        Ok(())
    }

    fn push_chunked(&mut self, chunk: Chunk, bytes: &[u8]) -> Result<usize, HttpError> {
        if let Chunk::Data(left) = chunk {
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
            self.append(&bytes[..take])?;
            let left = left - take as u64;
            self.state = State::Body(Body::Chunked(if left == 0 {
                Chunk::DataEnd { cr: false }
            } else {
                Chunk::Data(left)
            }));
            return Ok(take);
        }
        // Framing bytes go one at a time (`push` never passes an empty slice).
        let Some(&byte) = bytes.first() else {
            return Err(HttpError::BadChunk);
        };
        let next = match chunk {
            // Handled above.
            Chunk::Data(_) => return Err(HttpError::BadChunk),
            Chunk::Size {
                line,
                value,
                digits,
                in_ext,
                cr,
            } => {
                if line >= MAX_CHUNK_LINE {
                    return Err(HttpError::BadChunk);
                }
                match byte {
                    b'\n' => {
                        if digits == 0 {
                            return Err(HttpError::BadChunk);
                        }
                        if value == 0 {
                            Some(Chunk::Trailer {
                                line: 0,
                                total: 0,
                                cr: false,
                            })
                        } else {
                            let room = (self.max_body - self.response.body.len()) as u64;
                            if value > room {
                                return Err(HttpError::BodyTooLarge);
                            }
                            Some(Chunk::Data(value))
                        }
                    }
                    _ if cr => return Err(HttpError::BadChunk),
                    b'\r' => Some(Chunk::Size {
                        line: line + 1,
                        value,
                        digits,
                        in_ext,
                        cr: true,
                    }),
                    _ if in_ext => {
                        if !is_field_byte(byte) {
                            return Err(HttpError::BadChunk);
                        }
                        Some(Chunk::Size {
                            line: line + 1,
                            value,
                            digits,
                            in_ext,
                            cr,
                        })
                    }
                    b';' | b' ' | b'\t' if digits > 0 => Some(Chunk::Size {
                        line: line + 1,
                        value,
                        digits,
                        in_ext: true,
                        cr,
                    }),
                    _ => {
                        let digit = (byte as char).to_digit(16).ok_or(HttpError::BadChunk)?;
                        // Sixteen hex digits fill a u64; more is not a size we could take.
                        if digits >= 16 {
                            return Err(HttpError::BodyTooLarge);
                        }
                        Some(Chunk::Size {
                            line: line + 1,
                            value: (value << 4) | u64::from(digit),
                            digits: digits + 1,
                            in_ext,
                            cr,
                        })
                    }
                }
            }
            Chunk::DataEnd { cr } => match byte {
                b'\r' if !cr => Some(Chunk::DataEnd { cr: true }),
                b'\n' => Some(Chunk::Size {
                    line: 0,
                    value: 0,
                    digits: 0,
                    in_ext: false,
                    cr: false,
                }),
                _ => return Err(HttpError::BadChunk),
            },
            Chunk::Trailer { line, total, cr } => {
                if total >= MAX_RESPONSE_HEAD || line >= MAX_CHUNK_LINE {
                    return Err(HttpError::HeadTooLarge);
                }
                match byte {
                    b'\n' if line == 0 || (cr && line == 1) => None,
                    b'\n' => Some(Chunk::Trailer {
                        line: 0,
                        total: total + 1,
                        cr: false,
                    }),
                    _ if cr => return Err(HttpError::BadChunk),
                    b'\r' => Some(Chunk::Trailer {
                        line: line + 1,
                        total: total + 1,
                        cr: true,
                    }),
                    _ if is_field_byte(byte) => Some(Chunk::Trailer {
                        line: line + 1,
                        total: total + 1,
                        cr: false,
                    }),
                    _ => return Err(HttpError::BadChunk),
                }
            }
        };
        self.state = match next {
            Some(chunk) => State::Body(Body::Chunked(chunk)),
            None => State::Done,
        };
        Ok(1)
    }
}

/// `HTTP/1.x NNN [reason]` → NNN.
fn parse_status_line(line: &[u8]) -> Result<u16, HttpError> {
    let rest = line
        .strip_prefix(b"HTTP/1.")
        .ok_or(HttpError::BadStatusLine)?;
    let (minor, rest) = rest.split_first().ok_or(HttpError::BadStatusLine)?;
    if !minor.is_ascii_digit() {
        return Err(HttpError::BadStatusLine);
    }
    let rest = rest.strip_prefix(b" ").ok_or(HttpError::BadStatusLine)?;
    let (code, reason) = match rest {
        [a, b, c] => ([*a, *b, *c], &[][..]),
        [a, b, c, b' ', reason @ ..] => ([*a, *b, *c], reason),
        _ => return Err(HttpError::BadStatusLine),
    };
    if !code.iter().all(u8::is_ascii_digit) || !reason.iter().all(|&b| is_field_byte(b)) {
        return Err(HttpError::BadStatusLine);
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(HttpError::BadStatusLine);
    }
    Ok(status)
}

/// `name ":" OWS value OWS` → (lower-case name, trimmed value).
fn parse_field(line: &[u8]) -> Result<(String, String), HttpError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        // Obsolete line folding (RFC 9112 section 5.2): refused.
        return Err(HttpError::BadHeader);
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HttpError::BadHeader)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(HttpError::BadHeader);
    }
    if !value.iter().copied().all(is_field_byte) {
        return Err(HttpError::BadHeader);
    }
    let value = value.trim_ascii();
    let mut lower = String::with_capacity(name.len());
    lower.extend(name.iter().map(|b| char::from(b.to_ascii_lowercase())));
    Ok((lower, String::from_utf8_lossy(value).into_owned()))
}

/// Picks the body framing of a final response (RFC 9112 section 6.3).
fn framing(headers: &[(String, String)], status: u16, max_body: usize) -> Result<Body, HttpError> {
    if status == 204 || status == 304 {
        return Ok(Body::Length(0));
    }
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for (name, value) in headers {
        match name.as_str() {
            "content-length" => {
                // A list of equal values is tolerated (RFC 9110 section 8.6).
                for item in value.split(',') {
                    let item = item.trim();
                    if item.is_empty()
                        || item.len() > 19
                        || !item.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Err(HttpError::BadContentLength);
                    }
                    let n: u64 = item.parse().map_err(|_| HttpError::BadContentLength)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(HttpError::BadContentLength);
                    }
                    length = Some(n);
                }
            }
            "transfer-encoding" => {
                if chunked.is_some() || !value.trim().eq_ignore_ascii_case("chunked") {
                    return Err(HttpError::UnsupportedTransferEncoding);
                }
                chunked = Some(());
            }
            _ => {}
        }
    }
    match (length, chunked) {
        (Some(_), Some(())) => Err(HttpError::AmbiguousLength),
        (Some(n), None) if n > max_body as u64 => Err(HttpError::BodyTooLarge),
        (Some(n), None) => Ok(Body::Length(n)),
        (None, Some(())) => Ok(Body::Chunked(Chunk::Size {
            line: 0,
            value: 0,
            digits: 0,
            in_ext: false,
            cr: false,
        })),
        (None, None) => Ok(Body::UntilClose),
    }
}

/// Limits of one [`Exchange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connect, send and receive must all be done within this.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_body: usize,
}

/// One request and its response over a connection of its own. See the
/// [module docs](self).
#[derive(Debug)]
pub struct Exchange {
    handle: SocketHandle,
    request: Vec<u8>,
    sent: usize,
    parser: ResponseParser,
    connected: bool,
    deadline: Instant,
}

impl Exchange {
    /// Adds a socket to `sockets` and connects it from `local_port` to `server`; the
    /// request goes out once connected. Fails (with nothing left behind) when smoltcp
    /// cannot address the server from this interface.
    pub fn start(
        iface: &mut SmolInterface,
        sockets: &mut SocketSet<'static>,
        server: (Ipv4Addr, u16),
        local_port: u16,
        request: Vec<u8>,
        limits: Limits,
        now: Instant,
    ) -> Result<Exchange, HttpError> {
        let tx = request.len().clamp(512, 16 * 1024);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        // smoltcp's own backstop, well behind the deadline below so that the deadline is
        // what reports a silent server.
        socket.set_timeout(Some(to_net_duration(limits.timeout * 2)));
        let remote = (IpAddress::Ipv4(server.0), server.1);
        if socket
            .connect(iface.context(), remote, local_port.max(1))
            .is_err()
        {
            return Err(HttpError::Unaddressable);
        }
        Ok(Exchange {
            handle: sockets.add(socket),
            request,
            sent: 0,
            parser: ResponseParser::new(limits.max_body),
            connected: false,
            deadline: now + limits.timeout,
        })
    }

    /// The socket (for [`Linger`] once the exchange is over).
    pub fn handle(&self) -> SocketHandle {
        self.handle
    }

    /// When [`poll`](Self::poll) must run again even if nothing arrives.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the exchange along: `None` while it is still going.
    pub fn poll(
        &mut self,
        sockets: &mut SocketSet<'static>,
        now: Instant,
    ) -> Option<Result<Response, HttpError>> {
        let socket = sockets.get_mut::<tcp::Socket>(self.handle);
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                return (now >= self.deadline).then_some(Err(HttpError::ConnectTimeout));
            }
            tcp::State::Closed if !self.connected => return Some(Err(HttpError::Refused)),
            _ => self.connected = true,
        }
        while self.sent < self.request.len() && socket.can_send() {
            match socket.send_slice(&self.request[self.sent..]) {
                Ok(0) => break,
                Ok(n) => self.sent += n,
                Err(_) => return Some(Err(HttpError::SendFailed)),
            }
        }
        while socket.can_recv() && !self.parser.is_done() {
            let parser = &mut self.parser;
            let fed = socket.recv(|data| (data.len(), parser.push(data)));
            match fed {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Some(Err(error)),
                Err(_) => break,
            }
        }
        if !self.parser.is_done() {
            match socket.state() {
                // Reset (or smoltcp's timeout) before the response was complete.
                tcp::State::Closed => return Some(Err(HttpError::Reset)),
                _ if !socket.may_recv() && socket.recv_queue() == 0 => {
                    if let Err(error) = self.parser.finish() {
                        return Some(Err(error));
                    }
                }
                _ => {}
            }
        }
        if self.parser.is_done() {
            let parser = core::mem::replace(&mut self.parser, ResponseParser::new(0));
            return parser.into_response().map(Ok);
        }
        (now >= self.deadline).then_some(Err(HttpError::Timeout))
    }
}

/// A finished exchange's socket on its way out: closed gracefully when the server has
/// closed (its FIN is in), reset otherwise, and removed from the set once smoltcp has
/// sent what that takes, or after [`LINGER_TIMEOUT`] whatever happened.
#[derive(Debug)]
pub struct Linger {
    handle: SocketHandle,
    deadline: Instant,
    /// Reset requested: look again soon, the reset goes out with the next egress.
    recheck: Option<Instant>,
}

/// How soon an aborted socket is looked at again (its reset needs one egress pass).
const RECHECK: Duration = Duration::from_millis(10);

impl Linger {
    /// Starts ending the connection of `handle`.
    pub fn new(sockets: &mut SocketSet<'static>, handle: SocketHandle, now: Instant) -> Self {
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        let recheck = if socket.state() == tcp::State::CloseWait {
            socket.close();
            None
        } else {
            socket.abort();
            Some(now + RECHECK)
        };
        Linger {
            handle,
            deadline: now + LINGER_TIMEOUT,
            recheck,
        }
    }

    /// When [`poll`](Self::poll) must run again even if nothing arrives.
    pub fn deadline(&self) -> Instant {
        self.recheck.map_or(self.deadline, |r| r.min(self.deadline))
    }

    /// Returns true once the socket is gone from `sockets`.
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, now: Instant) -> bool {
        let socket = sockets.get_mut::<tcp::Socket>(self.handle);
        // An aborted socket keeps its endpoints until its reset has been sent.
        let quiet = socket.state() == tcp::State::Closed && socket.local_endpoint().is_none();
        if quiet || (self.recheck.is_some() && now >= self.deadline) {
            sockets.remove(self.handle);
            return true;
        }
        if self.recheck.is_none()
            && (socket.state() == tcp::State::TimeWait || now >= self.deadline)
        {
            socket.abort();
            self.deadline = now + LINGER_TIMEOUT;
        }
        if socket.state() == tcp::State::Closed {
            self.recheck = Some(now + RECHECK);
        }
        false
    }

    /// Removes the socket at once (the interface is going away).
    pub fn remove(self, sockets: &mut SocketSet<'static>) {
        sockets.remove(self.handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn parse_all(bytes: &[u8], max_body: usize) -> Result<Response, HttpError> {
        let mut parser = ResponseParser::new(max_body);
        parser.push(bytes)?;
        parser.finish()?;
        parser.into_response().ok_or(HttpError::Truncated)
    }

    /// Feeds `bytes` in pieces of `step` and closes.
    fn parse_in_steps(bytes: &[u8], step: usize) -> Result<Response, HttpError> {
        let mut parser = ResponseParser::new(64 * 1024);
        for piece in bytes.chunks(step.max(1)) {
            parser.push(piece)?;
        }
        parser.finish()?;
        parser.into_response().ok_or(HttpError::Truncated)
    }

    const LENGTH: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
    const CHUNKED: &[u8] = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: yes\r\n\r\n";
    const CLOSE: &[u8] = b"HTTP/1.0 202 Accepted\nServer: x\n\nuntil the end";

    #[test]
    fn the_three_framings() {
        let r = parse_all(LENGTH, 1024).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("CONTENT-TYPE"), Some("text/xml; charset=utf-8"));
        assert_eq!(r.body, b"hello");
        let r = parse_all(CHUNKED, 1024).unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"wikipedia in\r\n\r\nchunks.");
        let r = parse_all(CLOSE, 1024).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (202, &b"until the end"[..]));
        // Done without waiting for the close; extra bytes ignored.
        let mut parser = ResponseParser::new(1024);
        parser.push(LENGTH).unwrap();
        parser.push(b"trailing junk").unwrap();
        assert!(parser.is_done());
        let r = parse_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", 10).unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn any_split_gives_the_same_response() {
        for sample in [LENGTH, CHUNKED, CLOSE] {
            let whole = parse_all(sample, 64 * 1024).unwrap();
            for step in 1..sample.len() {
                assert_eq!(
                    parse_in_steps(sample, step),
                    Ok(whole.clone()),
                    "step {step}"
                );
            }
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        bytes.extend_from_slice(LENGTH);
        assert_eq!(parse_all(&bytes, 64).unwrap().status, 200);
        let many = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(5);
        assert_eq!(parse_all(&many, 64), Err(HttpError::UnexpectedInterim));
        assert_eq!(
            parse_all(b"HTTP/1.1 101 Switching\r\n\r\n", 64),
            Err(HttpError::UnexpectedInterim)
        );
    }

    #[test]
    fn hostile_responses_get_their_own_errors() {
        let cases: &[(&[u8], HttpError)] = &[
            (b"SSH-2.0-OpenSSH\r\n", HttpError::BadStatusLine),
            (b"\x16\x03\x01", HttpError::BadStatusLine),
            (b"HTTP/2 200 OK\r\n\r\n", HttpError::BadStatusLine),
            (b"HTTP/1.1 20 OK\r\n\r\n", HttpError::BadStatusLine),
            (b"HTTP/1.1 2000 OK\r\n\r\n", HttpError::BadStatusLine),
            (b"HTTP/1.1 099 Low\r\n\r\n", HttpError::BadStatusLine),
            (b"HTTP/1.1 200 O\x01K\r\n\r\n", HttpError::BadStatusLine),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", HttpError::BadHeader),
            (
                b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
                HttpError::BadHeader,
            ),
            (
                b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
                HttpError::BadHeader,
            ),
            (b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n", HttpError::BadHeader),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n",
                HttpError::BodyTooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::AmbiguousLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                HttpError::BadChunk,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
                HttpError::BadChunk,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",
                HttpError::BadChunk,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
                HttpError::BodyTooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
                HttpError::BodyTooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                HttpError::Truncated,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Le", HttpError::Truncated),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                HttpError::Truncated,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                parse_all(bytes, 64 * 1024).map(|r| r.status),
                Err(*expected),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(100));
        assert_eq!(parse_all(big.as_bytes(), 99), Err(HttpError::BodyTooLarge));
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        while long.len() <= MAX_RESPONSE_HEAD {
            long.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(parse_all(&long, 64), Err(HttpError::HeadTooLarge));
        let many: Vec<u8> = [
            &b"HTTP/1.1 200 OK\r\n"[..],
            &b"A: b\r\n".repeat(MAX_HEADERS + 1),
            b"\r\n",
        ]
        .concat();
        assert_eq!(parse_all(&many, 64), Err(HttpError::HeadTooLarge));
        let endless_trailer: Vec<u8> = [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"[..],
            &b"T: v\r\n".repeat(MAX_RESPONSE_HEAD),
        ]
        .concat();
        assert_eq!(
            parse_all(&endless_trailer, 64),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        for (n, sample) in [LENGTH, CHUNKED, CLOSE].into_iter().enumerate() {
            for cut in 0..=sample.len() {
                let _ = parse_all(&sample[..cut], 64);
                let _ = parse_in_steps(&sample[..cut], 3);
            }
            crate::azure::bit_flips(sample, n as u64, 4000, |bytes, step| {
                if let Ok(r) = parse_in_steps(bytes, step) {
                    assert!(r.body.len() <= 64 * 1024);
                    assert!((100..=599).contains(&r.status));
                }
            });
        }
    }

    #[test]
    fn requests_carry_the_fields_and_close() {
        let out = encode_request(
            "POST",
            Ipv4Addr::new(168, 63, 129, 16),
            "/machine?comp=health",
            &[("x-ms-version", "2012-11-30"), ("Evil", "a\r\nInjected: 1")],
            b"<Health/>",
        );
        let text = core::str::from_utf8(&out).unwrap();
        assert_eq!(
            text,
            "POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\n\
             x-ms-version: 2012-11-30\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<Health/>"
        );
        let get = encode_request("GET", Ipv4Addr::new(1, 2, 3, 4), "bad path", &[], b"");
        assert!(core::str::from_utf8(&get)
            .unwrap()
            .starts_with("GET / HTTP/1.1\r\n"));
        assert!(!core::str::from_utf8(&get)
            .unwrap()
            .contains("Content-Length"));
    }
}
