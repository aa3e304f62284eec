//! The status endpoint: HTTP/1.1 on TCP port 80 of every interface.
//!
//! `GET /` or `GET /status` answers `application/json` describing every interface (not
//! just the one asked on): name, NIC id, MAC, MTU, link, addresses with prefix, gateway,
//! DNS servers, per-queue counters and the glue's drop counters, plus uptime and, when
//! the snapshot has one, an `azure` object with the Azure agent's progress (Ready report
//! and IMDS; see [`azure`](crate::azure)). Other paths get 404, other methods 405,
//! malformed requests 400, heads over [`MAX_REQUEST_HEAD`] 431, and a request that does
//! not arrive within [`REQUEST_TIMEOUT`] 408. Every response says `Connection: close`.
//!
//! The JSON comes from [`status_json`], a pure function of a [`StatusSnapshot`], so its
//! shape is unit-tested apart from any socket. The snapshot is taken only when a
//! complete request asks for it, through [`StatusSource`].
//!
//! Several listening sockets serve several connections at once; each socket goes back to
//! listening when its connection ends. The server closes first after writing a response,
//! so a finished socket would sit in TIME-WAIT for smoltcp's 10 s; it is aborted instead
//! (the peer has closed by then: its FIN is what moved the socket to TIME-WAIT) so the
//! socket listens again at once.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use hvnet_netvsc::nic::QueueStats;
use hvnet_runtime::{Duration, Instant};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

use super::http::{check_head, write_response, Head, Status, MAX_REQUEST_HEAD};
use super::json::JsonWriter;
use crate::azure::{write_status_json, AzureStatus};
use crate::device::DeviceStats;
use crate::iface::to_net_duration;

/// A client has this long from connecting to completing its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response is queued, the connection is aborted if it is not gone by then.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the status server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusConfig {
    /// TCP port (80).
    pub port: u16,
    /// Listening sockets: connections served at once.
    pub sockets: usize,
    /// Receive buffer per socket (requests are small).
    pub rx_buffer: usize,
    /// Transmit buffer per socket (responses larger than this are sent in pieces).
    pub tx_buffer: usize,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            port: 80,
            sockets: 4,
            rx_buffer: 2048,
            tx_buffer: 8192,
        }
    }
}

/// Everything the status JSON shows, taken at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// Time since boot.
    pub uptime: Duration,
    /// Every interface, in name order.
    pub interfaces: Vec<InterfaceStatus>,
    /// The Azure agent (shown as the `azure` object when present).
    pub azure: Option<AzureStatus>,
}

/// One interface in a [`StatusSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// `ethN`.
    pub name: String,
    /// The NIC's identity (netvsc: the VMBus instance GUID).
    pub id: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// IP MTU.
    pub mtu: usize,
    /// Link up.
    pub link_up: bool,
    /// Addresses with their prefix length.
    pub addresses: Vec<Ipv4Cidr>,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Address>,
    /// DNS servers from the lease.
    pub dns: Vec<Ipv4Address>,
    /// Counters of each queue.
    pub queues: Vec<QueueStats>,
    /// Counters of the smoltcp glue (drops on the way out).
    pub device: DeviceStats,
}

/// Where the server gets a snapshot when a request asks for one.
pub trait StatusSource {
    /// The state of every interface now.
    fn snapshot(&self) -> StatusSnapshot;
}

/// Renders `snapshot` as the endpoint's JSON document.
pub fn status_json(snapshot: &StatusSnapshot) -> String {
    let mut w = JsonWriter::new();
    w.begin_object();
    let uptime_ms = u64::try_from(snapshot.uptime.as_millis()).unwrap_or(u64::MAX);
    w.key("uptime_ms").number(uptime_ms);
    w.key("interfaces").begin_array();
    for iface in &snapshot.interfaces {
        write_interface(&mut w, iface);
    }
    w.end_array();
    if let Some(azure) = &snapshot.azure {
        w.key("azure");
        write_status_json(&mut w, azure);
    }
    w.end_object();
    let mut text = w.finish();
    text.push('\n');
    text
}

fn write_interface(w: &mut JsonWriter, iface: &InterfaceStatus) {
    w.begin_object();
    w.key("name").string(&iface.name);
    w.key("id").string(&iface.id);
    let m = iface.mac;
    w.key("mac").display(format_args!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    ));
    w.key("mtu").number(iface.mtu as u64);
    w.key("link")
        .string(if iface.link_up { "up" } else { "down" });
    w.key("addresses").begin_array();
    for cidr in &iface.addresses {
        w.begin_object();
        w.key("address").display(cidr.address());
        w.key("prefix").number(u64::from(cidr.prefix_len()));
        w.end_object();
    }
    w.end_array();
    w.key("gateway");
    match iface.gateway {
        Some(gateway) => w.display(gateway),
        None => w.null(),
    };
    w.key("dns").begin_array();
    for server in &iface.dns {
        w.display(server);
    }
    w.end_array();
    w.key("queues").begin_array();
    for (index, q) in iface.queues.iter().enumerate() {
        w.begin_object();
        w.key("queue").number(index as u64);
        w.key("rx_packets").number(q.rx_packets);
        w.key("rx_bytes").number(q.rx_bytes);
        w.key("rx_dropped").number(q.rx_dropped);
        w.key("tx_packets").number(q.tx_packets);
        w.key("tx_bytes").number(q.tx_bytes);
        w.key("tx_busy").number(q.tx_busy);
        w.key("tx_errors").number(q.tx_errors);
        w.end_object();
    }
    w.end_array();
    let d = &iface.device;
    w.key("drops").begin_object();
    w.key("tx_busy").number(d.tx_dropped_busy);
    w.key("tx_link_down").number(d.tx_dropped_link_down);
    w.key("tx_too_long").number(d.tx_dropped_too_long);
    w.key("tx_removed").number(d.tx_dropped_removed);
    w.key("rx_over_budget").number(d.rx_over_budget);
    w.end_object();
    w.end_object();
}

/// The response to a complete or refused request head. `None` while incomplete.
pub fn respond(head: Head<'_>, source: &dyn StatusSource, out: &mut Vec<u8>) -> Option<Status> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let status = match head {
        Head::Incomplete => return None,
        Head::Complete(request) if request.method != "GET" => Status::MethodNotAllowed,
        Head::Complete(request) if request.path == "/" || request.path == "/status" => {
            let body = status_json(&source.snapshot());
            write_response(out, Status::Ok, "application/json", body.as_bytes(), None);
            return Some(Status::Ok);
        }
        Head::Complete(_) => Status::NotFound,
        Head::Invalid(why) => {
            log::debug!("status: bad request: {why}");
            Status::BadRequest
        }
        Head::UnsupportedVersion => Status::VersionNotSupported,
        Head::TooLarge => Status::HeadTooLarge,
    };
    let allow = (status == Status::MethodNotAllowed).then_some("GET");
    let mut body = String::from(status.reason());
    body.push('\n');
    write_response(out, status, TEXT, body.as_bytes(), allow);
    Some(status)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Listening (or handshaking): nothing to do.
    Idle,
    /// Connected, reading the request head.
    Reading,
    /// Sending `response[sent..]`.
    Writing,
    /// Response queued and FIN requested; waiting for the connection to end.
    Closing,
}

struct Connection {
    handle: SocketHandle,
    phase: Phase,
    deadline: Option<Instant>,
    request: Vec<u8>,
    response: Vec<u8>,
    sent: usize,
}

/// Requests answered, by outcome (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounters {
    /// 200 responses.
    pub ok: u64,
    /// 4xx/5xx responses.
    pub errors: u64,
    /// Connections aborted on a timeout.
    pub timeouts: u64,
}

/// The status server of one interface: its sockets and per-connection state.
pub struct StatusServer {
    port: u16,
    connections: Vec<Connection>,
    counters: StatusCounters,
}

impl StatusServer {
    /// Adds `config.sockets` listening sockets to `sockets`.
    pub fn new(config: &StatusConfig, sockets: &mut SocketSet<'static>) -> Self {
        let connections = (0..config.sockets.max(1))
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; config.rx_buffer]),
                    tcp::SocketBuffer::new(vec![0; config.tx_buffer]),
                );
                // smoltcp resets a connection silent for this long: a backstop behind
                // the server's own deadlines, which answer 408 first.
                socket.set_timeout(Some(to_net_duration(REQUEST_TIMEOUT + CLOSE_TIMEOUT)));
                Connection {
                    handle: sockets.add(socket),
                    phase: Phase::Idle,
                    deadline: None,
                    request: Vec::new(),
                    response: Vec::new(),
                    sent: 0,
                }
            })
            .collect();
        let mut server = StatusServer {
            port: config.port,
            connections,
            counters: StatusCounters::default(),
        };
        for index in 0..server.connections.len() {
            server.relisten(index, sockets);
        }
        server
    }

    /// Counters so far.
    pub fn counters(&self) -> StatusCounters {
        self.counters
    }

    /// The earliest connection deadline, for the interface's poll delay.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.connections.iter().filter_map(|c| c.deadline).min()
    }

    fn relisten(&mut self, index: usize, sockets: &mut SocketSet<'static>) {
        let port = self.port;
        let conn = &mut self.connections[index];
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        socket.abort();
        if let Err(error) = socket.listen(port) {
            log::warn!("status: cannot listen on port {port}: {error:?}");
        }
        conn.phase = Phase::Idle;
        conn.deadline = None;
        conn.request = Vec::new();
        conn.response = Vec::new();
        conn.sent = 0;
    }

    /// Moves every connection along. Returns whether anything was queued for sending
    /// (the interface then runs smoltcp's egress again).
    pub fn poll(
        &mut self,
        now: Instant,
        sockets: &mut SocketSet<'static>,
        source: &dyn StatusSource,
    ) -> bool {
        let mut queued = false;
        for index in 0..self.connections.len() {
            queued |= self.poll_connection(index, now, sockets, source);
        }
        queued
    }

    fn poll_connection(
        &mut self,
        index: usize,
        now: Instant,
        sockets: &mut SocketSet<'static>,
        source: &dyn StatusSource,
    ) -> bool {
        let state = sockets
            .get::<tcp::Socket>(self.connections[index].handle)
            .state();
        match state {
            tcp::State::Closed | tcp::State::TimeWait => {
                self.relisten(index, sockets);
                return false;
            }
            tcp::State::Listen | tcp::State::SynReceived => return false,
            _ => {}
        }
        let conn = &mut self.connections[index];
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        if conn.phase == Phase::Idle {
            conn.phase = Phase::Reading;
            conn.deadline = Some(now + REQUEST_TIMEOUT);
        }
        if conn.deadline.is_some_and(|d| now >= d) {
            if conn.phase == Phase::Reading && socket.may_send() {
                // Say why before closing, as servers do for idle connections.
                write_response(
                    &mut conn.response,
                    Status::RequestTimeout,
                    "text/plain; charset=utf-8",
                    b"Request Timeout\n",
                    None,
                );
                conn.sent = 0;
                conn.phase = Phase::Writing;
                conn.deadline = Some(now + CLOSE_TIMEOUT);
                self.counters.errors += 1;
            } else {
                log::debug!("status: connection timed out in {:?}", conn.phase);
                self.counters.timeouts += 1;
                socket.abort();
                return true;
            }
        }
        let mut queued = false;
        if conn.phase == Phase::Reading {
            let mut chunk = [0u8; 512];
            while socket.can_recv() && conn.request.len() <= MAX_REQUEST_HEAD {
                let room = (MAX_REQUEST_HEAD + 1 - conn.request.len()).min(chunk.len());
                match socket.recv_slice(&mut chunk[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => conn.request.extend_from_slice(&chunk[..n]),
                }
            }
            let closed = !socket.may_recv();
            let head = check_head(&conn.request, closed);
            if let Some(status) = respond(head, source, &mut conn.response) {
                if status == Status::Ok {
                    self.counters.ok += 1;
                } else {
                    self.counters.errors += 1;
                }
                conn.request = Vec::new();
                conn.sent = 0;
                conn.phase = Phase::Writing;
                conn.deadline = Some(now + CLOSE_TIMEOUT);
            } else if closed {
                // The peer went away without a request (`check_head` answers 400 to a
                // partial one; an empty one gets nothing).
                socket.close();
                conn.phase = Phase::Closing;
            }
        }
        if conn.phase == Phase::Writing {
            if let Some(rest) = conn.response.get(conn.sent..) {
                match socket.send_slice(rest) {
                    Ok(n) => {
                        conn.sent += n;
                        queued |= n > 0;
                    }
                    Err(_) => {
                        socket.abort();
                        return true;
                    }
                }
            }
            if conn.sent >= conn.response.len() {
                conn.response = Vec::new();
                socket.close();
                conn.phase = Phase::Closing;
                queued = true;
            }
        }
        if conn.phase == Phase::Closing {
            // Discard whatever else the client sends so its window stays open until the
            // FIN exchange completes.
            while socket.can_recv() {
                match socket.recv(|data| (data.len(), data.len())) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Ipv4Cidr;

    struct Fixed(StatusSnapshot);

    impl StatusSource for Fixed {
        fn snapshot(&self) -> StatusSnapshot {
            self.0.clone()
        }
    }

    fn sample() -> StatusSnapshot {
        StatusSnapshot {
            uptime: Duration::from_millis(12_345),
            interfaces: vec![
                InterfaceStatus {
                    name: "eth0".into(),
                    id: "id \"quoted\"\n".into(),
                    mac: [0x00, 0x15, 0x5d, 0x01, 0x02, 0xab],
                    mtu: 1500,
                    link_up: true,
                    addresses: vec![Ipv4Cidr::new(Ipv4Address::new(10, 0, 0, 5), 24)],
                    gateway: Some(Ipv4Address::new(10, 0, 0, 1)),
                    dns: vec![Ipv4Address::new(10, 0, 0, 53)],
                    queues: vec![
                        QueueStats {
                            rx_packets: 3,
                            rx_bytes: 300,
                            ..QueueStats::default()
                        },
                        QueueStats {
                            tx_packets: 4,
                            tx_bytes: 400,
                            tx_busy: 1,
                            ..QueueStats::default()
                        },
                    ],
                    device: DeviceStats {
                        tx_dropped_busy: 2,
                        ..DeviceStats::default()
                    },
                },
                InterfaceStatus {
                    name: "eth1".into(),
                    mtu: 9000,
                    ..InterfaceStatus::default()
                },
            ],
            azure: None,
        }
    }

    #[test]
    fn json_of_a_snapshot() {
        let text = status_json(&sample());
        let expected = concat!(
            r#"{"uptime_ms":12345,"interfaces":[{"name":"eth0","id":"id \"quoted\"\n","#,
            r#""mac":"00:15:5d:01:02:ab","mtu":1500,"link":"up","#,
            r#""addresses":[{"address":"10.0.0.5","prefix":24}],"gateway":"10.0.0.1","#,
            r#""dns":["10.0.0.53"],"queues":[{"queue":0,"rx_packets":3,"rx_bytes":300,"#,
            r#""rx_dropped":0,"tx_packets":0,"tx_bytes":0,"tx_busy":0,"tx_errors":0},"#,
            r#"{"queue":1,"rx_packets":0,"rx_bytes":0,"rx_dropped":0,"tx_packets":4,"#,
            r#""tx_bytes":400,"tx_busy":1,"tx_errors":0}],"drops":{"tx_busy":2,"#,
            r#""tx_link_down":0,"tx_too_long":0,"tx_removed":0,"rx_over_budget":0}},"#,
            r#"{"name":"eth1","id":"","mac":"00:00:00:00:00:00","mtu":9000,"link":"down","#,
            r#""addresses":[],"gateway":null,"dns":[],"queues":[],"drops":{"tx_busy":0,"#,
            r#""tx_link_down":0,"tx_too_long":0,"tx_removed":0,"rx_over_budget":0}}]}"#,
            "\n"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn the_azure_object_follows_the_interfaces() {
        let mut snapshot = sample();
        snapshot.azure = Some(crate::azure::AzureStatus {
            enabled: true,
            state: crate::azure::AzureState::GoalState,
            attempts: 3,
            ..Default::default()
        });
        let text = status_json(&snapshot);
        let without = status_json(&sample());
        // Same document up to the end of the interface list, then the agent.
        let cut = without.len() - "}\n".len();
        assert_eq!(text[..cut], without[..cut]);
        assert!(text[cut..].starts_with(
            r#","azure":{"enabled":true,"state":"goal-state","interface":null,"attempts":3,"#
        ));
        assert!(text.ends_with("}}\n"), "{text}");
    }

    #[test]
    fn routes_and_errors() {
        let source = Fixed(sample());
        let mut out = Vec::new();
        let cases: [(&[u8], Option<u16>); 8] = [
            (b"GET / HTTP/1.1\r\n\r\n", Some(200)),
            (b"GET /status HTTP/1.0\r\n\r\n", Some(200)),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Some(404)),
            (b"DELETE / HTTP/1.1\r\n\r\n", Some(405)),
            (b"\x00\x01garbage", Some(400)),
            (b"GET / HTTP/3.0\r\n\r\n", Some(505)),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Some(200)),
        ];
        for (request, expected) in cases {
            let got = respond(check_head(request, false), &source, &mut out).map(Status::code);
            assert_eq!(got, expected, "{:?}", core::str::from_utf8(request));
            if let Some(code) = expected {
                let text = core::str::from_utf8(&out).unwrap();
                assert!(
                    text.starts_with(&alloc::format!("HTTP/1.1 {code} ")),
                    "{text}"
                );
                assert!(text.contains("Connection: close"));
            }
        }
    }

    /// The server on a smoltcp loopback interface, with clients on the same interface:
    /// the socket life cycle (accept, respond, close, listen again, timeouts) without
    /// a simulation.
    struct Bench {
        iface: smoltcp::iface::Interface,
        device: smoltcp::phy::Loopback,
        sockets: SocketSet<'static>,
        server: StatusServer,
        now: Instant,
        next_port: u16,
    }

    impl Bench {
        fn new() -> Self {
            use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
            let mut device = smoltcp::phy::Loopback::new(smoltcp::phy::Medium::Ethernet);
            let config = smoltcp::iface::Config::new(HardwareAddress::Ethernet(EthernetAddress([
                2, 0, 0, 0, 0, 1,
            ])));
            let mut iface =
                smoltcp::iface::Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8));
            });
            let mut sockets = SocketSet::new(vec![]);
            let server = StatusServer::new(&StatusConfig::default(), &mut sockets);
            Bench {
                iface,
                device,
                sockets,
                server,
                now: Instant::ZERO,
                next_port: 40000,
            }
        }

        /// Runs the interface and the server until the loopback is quiet.
        fn run(&mut self) {
            let source = Fixed(sample());
            for _ in 0..50 {
                let now = crate::iface::to_net_instant(self.now);
                self.iface.poll(now, &mut self.device, &mut self.sockets);
                self.server.poll(self.now, &mut self.sockets, &source);
                self.iface.poll(now, &mut self.device, &mut self.sockets);
                self.now += Duration::from_micros(100);
            }
        }

        fn connect(&mut self) -> SocketHandle {
            use smoltcp::wire::IpAddress;
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 4096]),
                tcp::SocketBuffer::new(vec![0; 16384]),
            );
            self.next_port += 1;
            socket
                .connect(
                    self.iface.context(),
                    (IpAddress::v4(127, 0, 0, 1), 80),
                    self.next_port,
                )
                .expect("connect");
            let handle = self.sockets.add(socket);
            self.run();
            handle
        }

        fn send(&mut self, client: SocketHandle, bytes: &[u8]) {
            let socket = self.sockets.get_mut::<tcp::Socket>(client);
            assert_eq!(socket.send_slice(bytes), Ok(bytes.len()));
            self.run();
        }

        /// Sends `request`, lets the server answer, closes: returns the response.
        fn exchange(&mut self, request: &[u8]) -> Vec<u8> {
            let client = self.connect();
            self.send(client, request);
            let response = self.drain(client);
            self.finish(client);
            response
        }

        fn drain(&mut self, client: SocketHandle) -> Vec<u8> {
            let socket = self.sockets.get_mut::<tcp::Socket>(client);
            let mut data = vec![0; socket.recv_queue()];
            let n = socket.recv_slice(&mut data).unwrap_or(0);
            data.truncate(n);
            data
        }

        fn finish(&mut self, client: SocketHandle) {
            self.sockets.get_mut::<tcp::Socket>(client).close();
            self.run();
            self.sockets.remove(client);
        }

        fn listening(&self) -> usize {
            self.server
                .connections
                .iter()
                .filter(|c| self.sockets.get::<tcp::Socket>(c.handle).is_listening())
                .count()
        }
    }

    fn status_line(response: &[u8]) -> &str {
        let text = core::str::from_utf8(response).unwrap_or("");
        text.lines().next().unwrap_or("")
    }

    #[test]
    fn sockets_listen_again_after_each_response() {
        let mut bench = Bench::new();
        for round in 0..10 {
            let response = bench.exchange(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(status_line(&response), "HTTP/1.1 200 OK", "round {round}");
            let text = core::str::from_utf8(&response).unwrap();
            assert!(text.ends_with(&status_json(&sample())), "round {round}");
        }
        assert_eq!(bench.listening(), StatusConfig::default().sockets);
        assert_eq!(bench.server.counters().ok, 10);
    }

    #[test]
    fn errors_over_a_connection() {
        let mut bench = Bench::new();
        let cases: [(&[u8], &str); 4] = [
            (
                b"POST / HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"\x16\x03\x01\x00\xa5\x01", "HTTP/1.1 400 Bad Request"),
            (b"GET /x HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
        ];
        for (request, expected) in cases {
            assert_eq!(status_line(&bench.exchange(request)), expected);
        }
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        long.resize(MAX_REQUEST_HEAD + 100, b'a');
        assert_eq!(
            status_line(&bench.exchange(&long)),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        assert_eq!(bench.listening(), StatusConfig::default().sockets);
    }

    #[test]
    fn a_silent_client_gets_408_and_a_lingering_one_is_cut_off() {
        let mut bench = Bench::new();
        let silent = bench.connect();
        bench.now += REQUEST_TIMEOUT;
        bench.run();
        assert_eq!(
            status_line(&bench.drain(silent)),
            "HTTP/1.1 408 Request Timeout"
        );
        // The client never closes: the server gives up after CLOSE_TIMEOUT.
        bench.now += CLOSE_TIMEOUT;
        bench.run();
        bench.run();
        assert_eq!(bench.listening(), StatusConfig::default().sockets);
        assert_eq!(bench.server.counters().errors, 1);
        assert_eq!(bench.server.counters().timeouts, 1);
    }
}
