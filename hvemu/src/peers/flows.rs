//! Client-side actions of a [`PeerHost`](super::PeerHost): ping, TCP echo streams, UDP
//! flows and HTTP GETs, each a small state machine over smoltcp sockets.

use std::net::Ipv4Addr;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::time::Duration;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, IpEndpoint};

use super::http::{get_request, parse_response, HttpResponse};
use super::pattern::{fill_pattern, first_mismatch};

/// Milliseconds between two echo requests of one ping run.
pub const PING_INTERVAL_MS: u64 = 100;
/// How long a ping run waits for replies after its last request.
pub const PING_TIMEOUT_MS: u64 = 1000;
/// How long a UDP flow run waits for echoes after its last datagram.
pub const UDP_TIMEOUT_MS: u64 = 2000;
/// Bytes of payload in each echo request.
const PING_PAYLOAD: usize = 56;
/// Bytes in each UDP flow datagram.
const UDP_PAYLOAD: usize = 64;
const UDP_MAGIC: &[u8; 4] = b"HVUD";
/// A client TCP connection that hears nothing for this long is aborted.
const TCP_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest HTTP response collected.
const MAX_HTTP_RESPONSE: usize = 16 << 20;
/// First local port handed to client sockets.
const EPHEMERAL_FIRST: u16 = 49152;

/// Names one client action of a [`PeerHost`](super::PeerHost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(pub u32);

/// Where a TCP client flow is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// SYN sent, no connection yet.
    Connecting,
    /// Connected, data moving.
    Running,
    /// Finished as expected.
    Done,
    /// Gave up; the reason says why.
    Failed(String),
}

impl FlowState {
    /// Done or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self, FlowState::Done | FlowState::Failed(_))
    }
}

/// Progress of a ping run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingStatus {
    /// Who is pinged.
    pub target: Ipv4Addr,
    /// Requests to send.
    pub count: u16,
    /// Requests sent so far.
    pub sent: u16,
    /// Distinct, intact replies received.
    pub received: u16,
    /// Sequence numbers of the replies, in arrival order.
    pub seqs: Vec<u16>,
    /// Round-trip time of each reply (same order), in simulated milliseconds.
    pub rtt_ms: Vec<u64>,
    /// Replies that were duplicates, came from elsewhere or carried the wrong data.
    pub bad_replies: u16,
    /// All replies are in, or the wait after the last request ran out.
    pub done: bool,
}

/// Progress of a TCP echo stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpEchoStatus {
    /// Server address.
    pub target: Ipv4Addr,
    /// Server port.
    pub port: u16,
    /// Local port of the connection.
    pub local_port: u16,
    /// Bytes to send and get back.
    pub total_bytes: u64,
    /// Bytes handed to TCP so far.
    pub bytes_sent: u64,
    /// Bytes echoed back and checked equal to what was sent.
    pub bytes_verified: u64,
    /// Where the flow is.
    pub state: FlowState,
}

/// Progress of a set of UDP echo flows (one local port each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpFlowsStatus {
    /// Server address.
    pub target: Ipv4Addr,
    /// Server port.
    pub port: u16,
    /// Datagrams each flow sends.
    pub packets_per_flow: u32,
    /// Local (source) port of each flow.
    pub local_ports: Vec<u16>,
    /// Datagrams sent, per flow.
    pub sent: Vec<u32>,
    /// Distinct, intact echoes received, per flow.
    pub received: Vec<u32>,
    /// Echoes that were duplicates or did not match anything sent.
    pub invalid: u64,
    /// Everything echoed, or the wait after the last datagram ran out.
    pub done: bool,
}

impl UdpFlowsStatus {
    /// Datagrams sent by all flows.
    pub fn total_sent(&self) -> u64 {
        self.sent.iter().map(|&n| u64::from(n)).sum()
    }

    /// Echoes received by all flows.
    pub fn total_received(&self) -> u64 {
        self.received.iter().map(|&n| u64::from(n)).sum()
    }

    /// Every datagram of every flow came back.
    pub fn all_echoed(&self) -> bool {
        self.received.iter().all(|&n| n == self.packets_per_flow)
    }
}

/// Progress of an HTTP GET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpStatus {
    /// Server address.
    pub target: Ipv4Addr,
    /// Server port.
    pub port: u16,
    /// The requested path.
    pub path: String,
    /// Response bytes received so far.
    pub bytes_received: usize,
    /// Where the request is. `Done` once the server closed and the response parsed.
    pub state: FlowState,
    /// The parsed response (when `Done`).
    pub response: Option<HttpResponse>,
}

struct PingRun {
    handle: Option<SocketHandle>,
    ident: u16,
    next_send_ms: u64,
    sent_at: Vec<u64>,
    seen: Vec<bool>,
    status: PingStatus,
}

struct EchoFlow {
    seed: u64,
    status: TcpEchoStatus,
}

struct HttpFlow {
    request: Vec<u8>,
    sent: usize,
    raw: Vec<u8>,
    status: HttpStatus,
}

enum TcpKind {
    Echo(EchoFlow),
    Http(HttpFlow),
}

struct TcpFlow {
    handle: Option<SocketHandle>,
    kind: TcpKind,
}

struct UdpRun {
    run: u32,
    handles: Vec<SocketHandle>,
    seen: Vec<Vec<bool>>,
    last_send_ms: Option<u64>,
    status: UdpFlowsStatus,
}

enum Activity {
    Ping(PingRun),
    Tcp(TcpFlow),
    Udp(UdpRun),
}

/// The client actions of one host, keyed by [`FlowId`].
pub(crate) struct Apps {
    activities: Vec<(FlowId, Activity)>,
    next_id: u32,
    next_port: u16,
    /// Bytes of send and receive buffer of each client TCP socket.
    tcp_buffer: usize,
    scratch: Vec<u8>,
}

/// A TCP socket set up for simulated links: `buffer` bytes each way, no Nagle, no delayed
/// ACKs, and a timeout so a dead peer ends the connection.
pub(crate) fn tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer]),
        tcp::SocketBuffer::new(vec![0; buffer]),
    );
    // Simulated time is cheap but every round trip is a round: no waiting on ACKs.
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket.set_timeout(Some(TCP_TIMEOUT));
    socket
}

fn udp_datagram(run: u32, flow: u16, seq: u32) -> [u8; UDP_PAYLOAD] {
    let mut d = [0u8; UDP_PAYLOAD];
    d[..4].copy_from_slice(UDP_MAGIC);
    d[4..8].copy_from_slice(&run.to_be_bytes());
    d[8..10].copy_from_slice(&flow.to_be_bytes());
    d[10..14].copy_from_slice(&seq.to_be_bytes());
    let seed = (u64::from(run) << 16) | u64::from(flow);
    fill_pattern(seed, u64::from(seq) * UDP_PAYLOAD as u64, &mut d[14..]);
    d
}

impl Apps {
    pub(crate) fn new(mac: [u8; 6], tcp_buffer: usize) -> Self {
        // Hosts start at different ports, so flows of two hosts are easy to tell apart.
        let offset = u16::from_be_bytes([mac[4], mac[5]]) % 1024;
        Apps {
            activities: Vec::new(),
            next_id: 1,
            next_port: EPHEMERAL_FIRST + offset * 8,
            tcp_buffer,
            scratch: vec![0; 65536],
        }
    }

    fn new_id(&mut self) -> FlowId {
        let id = FlowId(self.next_id);
        self.next_id += 1;
        id
    }

    fn local_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port == u16::MAX {
            EPHEMERAL_FIRST
        } else {
            port + 1
        };
        port
    }

    fn find(&self, id: FlowId) -> Option<&Activity> {
        self.activities
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| a)
    }

    pub(crate) fn ping_status(&self, id: FlowId) -> Option<&PingStatus> {
        match self.find(id)? {
            Activity::Ping(p) => Some(&p.status),
            _ => None,
        }
    }

    pub(crate) fn tcp_echo_status(&self, id: FlowId) -> Option<&TcpEchoStatus> {
        match self.find(id)? {
            Activity::Tcp(TcpFlow {
                kind: TcpKind::Echo(e),
                ..
            }) => Some(&e.status),
            _ => None,
        }
    }

    pub(crate) fn http_status(&self, id: FlowId) -> Option<&HttpStatus> {
        match self.find(id)? {
            Activity::Tcp(TcpFlow {
                kind: TcpKind::Http(h),
                ..
            }) => Some(&h.status),
            _ => None,
        }
    }

    pub(crate) fn udp_status(&self, id: FlowId) -> Option<&UdpFlowsStatus> {
        match self.find(id)? {
            Activity::Udp(u) => Some(&u.status),
            _ => None,
        }
    }

    pub(crate) fn ping(
        &mut self,
        sockets: &mut SocketSet<'static>,
        now_ms: u64,
        target: Ipv4Addr,
        count: u16,
    ) -> FlowId {
        let id = self.new_id();
        let ident = 0x4000 | (id.0 as u16 & 0x3fff);
        let mut socket = icmp::Socket::new(
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 32], vec![0; 8192]),
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 32], vec![0; 8192]),
        );
        // A fresh socket binds unless the ident is taken, and idents are unique per host.
        let bound = socket.bind(icmp::Endpoint::Ident(ident)).is_ok();
        let status = PingStatus {
            target,
            count,
            sent: 0,
            received: 0,
            seqs: Vec::new(),
            rtt_ms: Vec::new(),
            bad_replies: 0,
            done: count == 0 || !bound,
        };
        let handle = (!status.done).then(|| sockets.add(socket));
        self.activities.push((
            id,
            Activity::Ping(PingRun {
                handle,
                ident,
                next_send_ms: now_ms,
                sent_at: Vec::new(),
                seen: vec![false; usize::from(count)],
                status,
            }),
        ));
        id
    }

    pub(crate) fn tcp_echo(
        &mut self,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        target: Ipv4Addr,
        port: u16,
        total_bytes: u64,
        seed: u64,
    ) -> FlowId {
        let id = self.new_id();
        let local_port = self.local_port();
        let (handle, state) = self.connect(iface, sockets, target, port, local_port);
        let status = TcpEchoStatus {
            target,
            port,
            local_port,
            total_bytes,
            bytes_sent: 0,
            bytes_verified: 0,
            state,
        };
        let flow = EchoFlow { seed, status };
        self.activities.push((
            id,
            Activity::Tcp(TcpFlow {
                handle,
                kind: TcpKind::Echo(flow),
            }),
        ));
        id
    }

    pub(crate) fn http_get(
        &mut self,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        target: Ipv4Addr,
        port: u16,
        path: &str,
    ) -> FlowId {
        let id = self.new_id();
        let local_port = self.local_port();
        let (handle, state) = self.connect(iface, sockets, target, port, local_port);
        let host = if port == 80 {
            target.to_string()
        } else {
            format!("{target}:{port}")
        };
        let flow = HttpFlow {
            request: get_request(&host, path),
            sent: 0,
            raw: Vec::new(),
            status: HttpStatus {
                target,
                port,
                path: path.to_string(),
                bytes_received: 0,
                state,
                response: None,
            },
        };
        self.activities.push((
            id,
            Activity::Tcp(TcpFlow {
                handle,
                kind: TcpKind::Http(flow),
            }),
        ));
        id
    }

    fn connect(
        &mut self,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        target: Ipv4Addr,
        port: u16,
        local_port: u16,
    ) -> (Option<SocketHandle>, FlowState) {
        let mut socket = tcp_socket(self.tcp_buffer);
        let remote = IpEndpoint::new(IpAddress::Ipv4(target), port);
        match socket.connect(iface.context(), remote, local_port) {
            Ok(()) => (Some(sockets.add(socket)), FlowState::Connecting),
            Err(e) => (
                None,
                FlowState::Failed(format!("connect to {remote}: {e:?}")),
            ),
        }
    }

    pub(crate) fn udp_flows(
        &mut self,
        sockets: &mut SocketSet<'static>,
        target: Ipv4Addr,
        port: u16,
        n_flows: u16,
        packets_per_flow: u32,
    ) -> FlowId {
        let id = self.new_id();
        let mut handles = Vec::new();
        let mut local_ports = Vec::new();
        for _ in 0..n_flows {
            let local = self.local_port();
            let mut socket = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 128]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 128]),
            );
            if socket.bind(local).is_err() {
                continue;
            }
            handles.push(sockets.add(socket));
            local_ports.push(local);
        }
        let flows = local_ports.len();
        let status = UdpFlowsStatus {
            target,
            port,
            packets_per_flow,
            local_ports,
            sent: vec![0; flows],
            received: vec![0; flows],
            invalid: 0,
            done: flows == 0 || packets_per_flow == 0,
        };
        self.activities.push((
            id,
            Activity::Udp(UdpRun {
                run: id.0,
                handles,
                seen: vec![vec![false; packets_per_flow as usize]; flows],
                last_send_ms: None,
                status,
            }),
        ));
        id
    }

    /// Moves every action on; true if anything happened (bytes moved, state changed).
    pub(crate) fn service(&mut self, sockets: &mut SocketSet<'static>, now_ms: u64) -> bool {
        let mut progress = false;
        let scratch = &mut self.scratch;
        for (_, activity) in self.activities.iter_mut() {
            progress |= match activity {
                Activity::Ping(p) => service_ping(p, sockets, now_ms),
                Activity::Tcp(f) => service_tcp(f, sockets, scratch),
                Activity::Udp(u) => service_udp(u, sockets, now_ms),
            };
        }
        progress
    }

    /// The next time an action needs service without any frame arriving.
    pub(crate) fn poll_at(&self) -> Option<u64> {
        self.activities
            .iter()
            .filter_map(|(_, a)| match a {
                Activity::Ping(p) if !p.status.done => Some(if p.status.sent < p.status.count {
                    p.next_send_ms
                } else {
                    p.sent_at.last().copied().unwrap_or(0) + PING_TIMEOUT_MS
                }),
                Activity::Udp(u) if !u.status.done => u.last_send_ms.map(|t| t + UDP_TIMEOUT_MS),
                _ => None,
            })
            .min()
    }
}

fn service_ping(p: &mut PingRun, sockets: &mut SocketSet<'static>, now_ms: u64) -> bool {
    let Some(handle) = p.handle else { return false };
    let caps = ChecksumCapabilities::default();
    let socket = sockets.get_mut::<icmp::Socket>(handle);
    let mut progress = false;
    let mut data = [0u8; PING_PAYLOAD];
    while let Ok((bytes, from)) = socket.recv() {
        progress = true;
        let reply =
            Icmpv4Packet::new_checked(bytes).ok().and_then(|packet| {
                match Icmpv4Repr::parse(&packet, &caps) {
                    Ok(Icmpv4Repr::EchoReply {
                        ident,
                        seq_no,
                        data: got,
                    }) if ident == p.ident => {
                        fill_pattern(u64::from(ident), u64::from(seq_no) << 8, &mut data);
                        (got == data).then_some(seq_no)
                    }
                    _ => None,
                }
            });
        let fresh = reply.filter(|&seq| {
            from == IpAddress::Ipv4(p.status.target) && p.seen.get(usize::from(seq)) == Some(&false)
        });
        match fresh {
            Some(seq) => {
                p.seen[usize::from(seq)] = true;
                p.status.received += 1;
                p.status.seqs.push(seq);
                let sent_at = p.sent_at.get(usize::from(seq)).copied().unwrap_or(now_ms);
                p.status.rtt_ms.push(now_ms.saturating_sub(sent_at));
            }
            None => p.status.bad_replies += 1,
        }
    }
    if p.status.sent < p.status.count && now_ms >= p.next_send_ms && socket.can_send() {
        let seq_no = p.status.sent;
        fill_pattern(u64::from(p.ident), u64::from(seq_no) << 8, &mut data);
        let repr = Icmpv4Repr::EchoRequest {
            ident: p.ident,
            seq_no,
            data: &data,
        };
        if let Ok(buf) = socket.send(repr.buffer_len(), IpAddress::Ipv4(p.status.target)) {
            repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            p.status.sent += 1;
            p.sent_at.push(now_ms);
            p.next_send_ms = now_ms + PING_INTERVAL_MS;
            progress = true;
        }
    }
    let all_in = p.status.received == p.status.count;
    let waited = p.status.sent == p.status.count
        && p.sent_at
            .last()
            .is_some_and(|&t| now_ms >= t + PING_TIMEOUT_MS);
    if all_in || waited {
        p.status.done = true;
        sockets.remove(handle);
        p.handle = None;
        progress = true;
    }
    progress
}

fn service_tcp(f: &mut TcpFlow, sockets: &mut SocketSet<'static>, scratch: &mut [u8]) -> bool {
    let Some(handle) = f.handle else { return false };
    let socket = sockets.get_mut::<tcp::Socket>(handle);
    let state = match &mut f.kind {
        TcpKind::Echo(e) => &mut e.status.state,
        TcpKind::Http(h) => &mut h.status.state,
    };
    if state.is_finished() {
        // Let a finished flow close gracefully, then give the socket back.
        if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
            sockets.remove(handle);
            f.handle = None;
            return true;
        }
        return false;
    }
    let mut progress = false;
    if *state == FlowState::Connecting {
        if socket.may_send() {
            *state = FlowState::Running;
            progress = true;
        } else if socket.state() == tcp::State::Closed {
            *state = FlowState::Failed("connection refused, reset or timed out".to_string());
            return true;
        } else {
            return false;
        }
    }
    progress
        | match &mut f.kind {
            TcpKind::Echo(e) => service_echo(e, socket),
            TcpKind::Http(h) => service_http(h, socket, scratch),
        }
}

/// Marks the flow failed and aborts the connection; returns true (progress) for the caller.
fn fail_tcp(socket: &mut tcp::Socket<'_>, state: &mut FlowState, why: String) -> bool {
    log::warn!("peer flow failed: {why}");
    *state = FlowState::Failed(why);
    socket.abort();
    true
}

/// Sends more of the stream and checks what came back; true if anything moved.
fn service_echo(e: &mut EchoFlow, socket: &mut tcp::Socket<'_>) -> bool {
    let st = &mut e.status;
    let before = (st.bytes_sent, st.bytes_verified);
    while st.bytes_sent < st.total_bytes && socket.can_send() {
        let (seed, offset, left) = (e.seed, st.bytes_sent, st.total_bytes - st.bytes_sent);
        let queued = socket.send(|buf| {
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            fill_pattern(seed, offset, &mut buf[..n]);
            (n, n)
        });
        match queued {
            Ok(0) | Err(_) => break,
            Ok(n) => st.bytes_sent += n as u64,
        }
    }
    while socket.can_recv() {
        let (seed, offset) = (e.seed, st.bytes_verified);
        let checked =
            socket.recv(|buf| (buf.len(), (buf.len(), first_mismatch(seed, offset, buf))));
        let Ok((n, mismatch)) = checked else { break };
        if let Some((at, expected)) = mismatch {
            let why = format!(
                "echo mismatch at byte {}: expected {expected:#04x}",
                offset + at as u64
            );
            return fail_tcp(socket, &mut st.state, why);
        }
        st.bytes_verified += n as u64;
        if st.bytes_verified > st.bytes_sent {
            let why = format!(
                "peer echoed {} bytes but only {} were sent",
                st.bytes_verified, st.bytes_sent
            );
            return fail_tcp(socket, &mut st.state, why);
        }
    }
    if st.bytes_verified == st.total_bytes {
        // Close only now, with the whole echo in hand. Half-closing right after the last
        // byte would put the echo server in CLOSE-WAIT/LAST-ACK with data in flight, where
        // smoltcp 0.12 lets a duplicate ACK cancel its retransmit timer: one lost segment
        // then stalls the connection until it times out.
        socket.close();
        st.state = FlowState::Done;
        return true;
    }
    if !socket.may_recv() {
        let why = format!(
            "connection closed ({}) after {} of {} bytes echoed",
            socket.state(),
            st.bytes_verified,
            st.total_bytes
        );
        return fail_tcp(socket, &mut st.state, why);
    }
    before != (st.bytes_sent, st.bytes_verified)
}

/// Sends the request and collects the response; true if anything moved.
fn service_http(h: &mut HttpFlow, socket: &mut tcp::Socket<'_>, scratch: &mut [u8]) -> bool {
    let before = (h.sent, h.raw.len());
    while h.sent < h.request.len() && socket.can_send() {
        match socket.send_slice(&h.request[h.sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => h.sent += n,
        }
    }
    while socket.can_recv() {
        match socket.recv_slice(scratch) {
            Ok(0) | Err(_) => break,
            Ok(n) => h.raw.extend_from_slice(&scratch[..n]),
        }
        if h.raw.len() > MAX_HTTP_RESPONSE {
            let why = format!("response larger than {MAX_HTTP_RESPONSE} bytes");
            return fail_tcp(socket, &mut h.status.state, why);
        }
    }
    h.status.bytes_received = h.raw.len();
    if socket.may_recv() {
        return before != (h.sent, h.raw.len());
    }
    // The server closed: the response is complete.
    match parse_response(&h.raw) {
        Ok(response) => {
            h.status.response = Some(response);
            h.status.state = FlowState::Done;
            socket.close();
            true
        }
        Err(why) => fail_tcp(
            socket,
            &mut h.status.state,
            format!("bad HTTP response: {why}"),
        ),
    }
}

fn service_udp(u: &mut UdpRun, sockets: &mut SocketSet<'static>, now_ms: u64) -> bool {
    if u.status.done {
        return false;
    }
    let mut progress = false;
    let target = IpEndpoint::new(IpAddress::Ipv4(u.status.target), u.status.port);
    for (flow, &handle) in u.handles.iter().enumerate() {
        let socket = sockets.get_mut::<udp::Socket>(handle);
        while let Ok((data, meta)) = socket.recv() {
            progress = true;
            let seq = data
                .get(10..14)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(u32::MAX);
            let intact = meta.endpoint == target
                && seq < u.status.packets_per_flow
                && data == udp_datagram(u.run, flow as u16, seq);
            match u.seen[flow].get_mut(seq as usize) {
                Some(seen) if intact && !*seen => {
                    *seen = true;
                    u.status.received[flow] += 1;
                }
                _ => u.status.invalid += 1,
            }
        }
        while u.status.sent[flow] < u.status.packets_per_flow && socket.can_send() {
            let datagram = udp_datagram(u.run, flow as u16, u.status.sent[flow]);
            if socket.send_slice(&datagram, target).is_err() {
                break;
            }
            u.status.sent[flow] += 1;
            u.last_send_ms = Some(now_ms);
            progress = true;
        }
    }
    let all_sent = u
        .status
        .sent
        .iter()
        .all(|&n| n == u.status.packets_per_flow);
    let waited = u.last_send_ms.is_some_and(|t| now_ms >= t + UDP_TIMEOUT_MS);
    if u.status.all_echoed() || (all_sent && waited) {
        u.status.done = true;
        for handle in u.handles.drain(..) {
            sockets.remove(handle);
        }
        progress = true;
    }
    progress
}
