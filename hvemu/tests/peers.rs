//! The simulated LAN peers among themselves, on a [`Hub`]: two hosts ping and echo TCP and
//! UDP through each other; smoltcp's own DHCP client gets, renews and keeps leases from the
//! DHCP server; an HTTP client reads a page; and garbage on the wire breaks nothing.

use std::net::Ipv4Addr;

use hvemu::peers::{
    shared, DhcpServer, DhcpServerConfig, Endpoint, FlowState, Hub, PeerHost, PeerHostConfig,
    QueueDevice, Shared, ECHO_PORT,
};
use hvemu::SplitMix64;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Cidr, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};

const MIB: u64 = 1 << 20;

fn mac(n: u8) -> [u8; 6] {
    [0x02, 0x00, 0x5e, 0x10, 0x00, n]
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn host(n: u8) -> Shared<PeerHost> {
    shared(PeerHost::new(PeerHostConfig {
        mac: mac(n),
        ip: ip(n),
        prefix_len: 24,
        gateway: None,
    }))
}

/// A hub with hosts 10.0.0.1 and 10.0.0.2.
fn two_hosts() -> (Hub, Shared<PeerHost>, Shared<PeerHost>) {
    let (a, b) = (host(1), host(2));
    let mut hub = Hub::new();
    hub.attach(a.clone());
    hub.attach(b.clone());
    (hub, a, b)
}

#[test]
fn ping_between_two_hosts() {
    let (mut hub, a, b) = two_hosts();
    let id = a.borrow_mut().ping(ip(2), 4);
    assert!(hub.run_until(10_000, || a.borrow().ping_status(id).unwrap().done));
    let status = a.borrow().ping_status(id).unwrap().clone();
    assert_eq!(
        (status.sent, status.received, status.bad_replies),
        (4, 4, 0)
    );
    assert_eq!(status.seqs, vec![0, 1, 2, 3]);
    // Requests go out every 100 ms, so the run takes about 300 ms of simulated time.
    let now = hub.now_ms();
    assert!((300..1000).contains(&now), "finished at {now} ms");

    // Nobody at .9: every request goes unanswered and the run ends after its wait.
    let id = b.borrow_mut().ping(ip(9), 2);
    assert!(hub.run_until(20_000, || b.borrow().ping_status(id).unwrap().done));
    let status = b.borrow().ping_status(id).unwrap().clone();
    assert_eq!(status.received, 0);
}

#[test]
fn tcp_echo_of_one_mib_is_verified() {
    let (mut hub, a, b) = two_hosts();
    let id = a.borrow_mut().tcp_echo(ip(2), ECHO_PORT, MIB, 7);
    let finished = hub.run_until(120_000, || {
        a.borrow().tcp_echo_status(id).unwrap().state.is_finished()
    });
    let status = a.borrow().tcp_echo_status(id).unwrap().clone();
    assert!(finished, "not finished by {} ms: {status:?}", hub.now_ms());
    assert_eq!(status.state, FlowState::Done, "{status:?}");
    assert_eq!((status.bytes_sent, status.bytes_verified), (MIB, MIB));
    let server = b.borrow().stats();
    assert_eq!(server.tcp_echo_accepted, 1);
    assert_eq!(server.tcp_echo_bytes, MIB);
    // Both sides close cleanly afterwards: the listener is back for the next client.
    hub.run_for(30_000);
    let id = a.borrow_mut().tcp_echo(ip(2), ECHO_PORT, 1000, 8);
    assert!(hub.run_within(10_000, || {
        a.borrow().tcp_echo_status(id).unwrap().state == FlowState::Done
    }));
}

#[test]
fn tcp_echo_of_sixteen_mib_takes_few_rounds() {
    let (mut hub, a, _b) = two_hosts();
    let id = a.borrow_mut().tcp_echo(ip(2), ECHO_PORT, 16 * MIB, 0x16);
    let finished = hub.run_until(60_000, || {
        a.borrow().tcp_echo_status(id).unwrap().state.is_finished()
    });
    let status = a.borrow().tcp_echo_status(id).unwrap().clone();
    assert!(finished && status.state == FlowState::Done, "{status:?}");
    assert_eq!(status.bytes_verified, 16 * MIB);
    // 64 KiB windows each way: a window's worth of segments per round.
    let rounds = hub.stats().rounds;
    assert!(rounds < 2000, "{rounds} rounds");
}

#[test]
fn four_concurrent_tcp_echoes_and_a_refused_one() {
    let (mut hub, a, b) = two_hosts();
    let ids: Vec<_> = (0..4)
        .map(|i| {
            a.borrow_mut()
                .tcp_echo(ip(2), ECHO_PORT, 200_000 + i * 12_345, i)
        })
        .collect();
    let all_done = hub.run_until(120_000, || {
        ids.iter()
            .all(|&id| a.borrow().tcp_echo_status(id).unwrap().state.is_finished())
    });
    assert!(all_done);
    for &id in &ids {
        let status = a.borrow().tcp_echo_status(id).unwrap().clone();
        assert_eq!(status.state, FlowState::Done, "{status:?}");
        assert_eq!(status.bytes_verified, status.total_bytes);
    }
    let ports: std::collections::BTreeSet<u16> = ids
        .iter()
        .map(|&id| a.borrow().tcp_echo_status(id).unwrap().local_port)
        .collect();
    assert_eq!(ports.len(), 4);
    assert_eq!(b.borrow().stats().tcp_echo_accepted, 4);

    // Nothing listens on port 9: the SYN is answered with a reset.
    let id = a.borrow_mut().tcp_echo(ip(2), 9, 1000, 1);
    assert!(hub.run_within(10_000, || {
        a.borrow().tcp_echo_status(id).unwrap().state.is_finished()
    }));
    let state = a.borrow().tcp_echo_status(id).unwrap().state.clone();
    assert!(matches!(state, FlowState::Failed(_)), "{state:?}");
}

#[test]
fn tcp_echo_survives_frame_loss() {
    let (mut hub, a, _b) = two_hosts();
    hub.set_loss(99, 20_000); // 2 % of frames vanish
    let id = a.borrow_mut().tcp_echo(ip(2), ECHO_PORT, 256 * 1024, 3);
    let finished = hub.run_until(600_000, || {
        a.borrow().tcp_echo_status(id).unwrap().state.is_finished()
    });
    let status = a.borrow().tcp_echo_status(id).unwrap().clone();
    assert!(finished, "{status:?}");
    assert_eq!(status.state, FlowState::Done, "{status:?}");
    assert!(hub.stats().dropped > 0);
}

#[test]
fn runs_are_deterministic() {
    let run = || {
        let (mut hub, a, _b) = two_hosts();
        hub.set_loss(5, 10_000);
        hub.start_capture();
        let id = a.borrow_mut().tcp_echo(ip(2), ECHO_PORT, 100_000, 11);
        let ping = a.borrow_mut().ping(ip(2), 3);
        hub.run_until(300_000, || {
            a.borrow().tcp_echo_status(id).unwrap().state.is_finished()
                && a.borrow().ping_status(ping).unwrap().done
        });
        (hub.now_ms(), hub.stats(), hub.take_capture())
    };
    let (first, second) = (run(), run());
    assert_eq!(first.0, second.0);
    assert_eq!(first.1, second.1);
    assert!(first.2 == second.2, "frame captures differ");
}

#[test]
fn udp_flows_from_many_ports_are_echoed() {
    let (mut hub, a, b) = two_hosts();
    let id = a.borrow_mut().udp_flows(ip(2), ECHO_PORT, 8, 50);
    assert!(hub.run_until(30_000, || a.borrow().udp_status(id).unwrap().done));
    let status = a.borrow().udp_status(id).unwrap().clone();
    assert!(status.all_echoed(), "{status:?}");
    assert_eq!(status.total_received(), 400);
    assert_eq!(status.invalid, 0);
    let ports: std::collections::BTreeSet<u16> = status.local_ports.iter().copied().collect();
    assert_eq!(ports.len(), 8);
    assert_eq!(b.borrow().stats().udp_echoed, 400);
}

// ---------------------------------------------------------------------------------------
// smoltcp endpoints written in the test: a DHCP client and a one-page HTTP server.

/// A bare smoltcp interface on a [`QueueDevice`], driven like an [`Endpoint`].
struct Stack {
    mac: [u8; 6],
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    next_poll: Option<u64>,
    pending: bool,
}

impl Stack {
    fn new(mac: [u8; 6]) -> Self {
        let mut device = QueueDevice::new();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = u64::from(mac[5]) * 0x1234_5678;
        let iface = Interface::new(config, &mut device, Instant::from_millis(0));
        Stack {
            mac,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            next_poll: Some(0),
            pending: false,
        }
    }

    fn receive(&mut self, frame: &[u8]) {
        self.device.push_rx(frame);
        self.pending = true;
    }

    /// Polls until quiet, calling `app` after each poll; hands out what was sent.
    fn transmit(
        &mut self,
        now_ms: u64,
        out: &mut dyn FnMut(&[u8]),
        mut app: impl FnMut(&mut Interface, &mut SocketSet<'static>) -> bool,
    ) {
        let now = Instant::from_millis(now_ms as i64);
        for _ in 0..64 {
            let changed = self.iface.poll(now, &mut self.device, &mut self.sockets);
            let acted = app(&mut self.iface, &mut self.sockets);
            if changed == smoltcp::iface::PollResult::None && !acted {
                break;
            }
        }
        while let Some(frame) = self.device.pop_tx() {
            out(&frame);
        }
        self.pending = false;
        self.next_poll = self
            .iface
            .poll_at(now, &self.sockets)
            .map(|t| t.total_millis().max(0) as u64);
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        if self.pending {
            Some(now_ms)
        } else {
            self.next_poll
        }
    }
}

/// What a DHCP client was configured with.
#[derive(Clone, Debug, PartialEq)]
struct DhcpLease {
    address: Ipv4Cidr,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
}

struct DhcpClient {
    stack: Stack,
    dhcp: SocketHandle,
    lease: Option<DhcpLease>,
    configured: u32,
}

impl DhcpClient {
    fn new(mac: [u8; 6]) -> Self {
        let mut stack = Stack::new(mac);
        let dhcp = stack.sockets.add(dhcpv4::Socket::new());
        DhcpClient {
            stack,
            dhcp,
            lease: None,
            configured: 0,
        }
    }
}

impl Endpoint for DhcpClient {
    fn mac(&self) -> [u8; 6] {
        self.stack.mac
    }

    fn receive(&mut self, _now_ms: u64, frame: &[u8]) {
        self.stack.receive(frame);
    }

    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        let (dhcp, lease, configured) = (self.dhcp, &mut self.lease, &mut self.configured);
        self.stack.transmit(now_ms, out, |iface, sockets| {
            let event = match sockets.get_mut::<dhcpv4::Socket>(dhcp).poll() {
                None => return false,
                Some(dhcpv4::Event::Configured(config)) => Some(DhcpLease {
                    address: config.address,
                    router: config.router,
                    dns: config.dns_servers.iter().copied().collect(),
                }),
                Some(dhcpv4::Event::Deconfigured) => None,
            };
            iface.update_ip_addrs(|addrs| {
                addrs.clear();
                if let Some(l) = &event {
                    addrs.push(IpCidr::Ipv4(l.address)).unwrap();
                }
            });
            iface.routes_mut().remove_default_ipv4_route();
            if let Some(router) = event.as_ref().and_then(|l| l.router) {
                iface.routes_mut().add_default_ipv4_route(router).unwrap();
            }
            if event.is_some() {
                *configured += 1;
            }
            *lease = event;
            true
        });
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        self.stack.poll_at(now_ms)
    }
}

struct HttpServer {
    stack: Stack,
    listener: SocketHandle,
    request: Vec<u8>,
    response: Vec<u8>,
    answered: bool,
}

impl HttpServer {
    fn new(n: u8, response: &[u8]) -> Self {
        let mut stack = Stack::new(mac(n));
        stack.iface.update_ip_addrs(|addrs| {
            addrs.push(IpCidr::new(IpAddress::Ipv4(ip(n)), 24)).unwrap();
        });
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        socket.listen(80).unwrap();
        let listener = stack.sockets.add(socket);
        HttpServer {
            stack,
            listener,
            request: Vec::new(),
            response: response.to_vec(),
            answered: false,
        }
    }
}

impl Endpoint for HttpServer {
    fn mac(&self) -> [u8; 6] {
        self.stack.mac
    }

    fn receive(&mut self, _now_ms: u64, frame: &[u8]) {
        self.stack.receive(frame);
    }

    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        let (listener, request, response, answered) = (
            self.listener,
            &mut self.request,
            &self.response,
            &mut self.answered,
        );
        self.stack.transmit(now_ms, out, |_, sockets| {
            let socket = sockets.get_mut::<tcp::Socket>(listener);
            let mut buf = [0u8; 4096];
            let mut acted = false;
            while let Ok(n @ 1..) = socket.recv_slice(&mut buf) {
                request.extend_from_slice(&buf[..n]);
                acted = true;
            }
            let complete = request.windows(4).any(|w| w == b"\r\n\r\n");
            if complete && !*answered && socket.may_send() {
                assert_eq!(socket.send_slice(response).unwrap(), response.len());
                socket.close();
                *answered = true;
                acted = true;
            }
            acted
        });
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        self.stack.poll_at(now_ms)
    }
}

#[test]
fn http_get_reads_status_headers_and_body() {
    let json = br#"{"interfaces":[{"name":"eth0","queues":4}]}"#;
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        json.len()
    )
    .into_bytes();
    response.extend_from_slice(json);
    let a = host(1);
    let server = shared(HttpServer::new(3, &response));
    let mut hub = Hub::new();
    hub.attach(a.clone());
    hub.attach(server.clone());
    let id = a.borrow_mut().http_get(ip(3), 80, "/status");
    assert!(hub.run_until(30_000, || {
        a.borrow().http_status(id).unwrap().state.is_finished()
    }));
    let status = a.borrow().http_status(id).unwrap().clone();
    assert_eq!(status.state, FlowState::Done, "{status:?}");
    let reply = status.response.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.body, json);
    let request = String::from_utf8(server.borrow().request.clone()).unwrap();
    assert!(request.starts_with("GET /status HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
}

// ---------------------------------------------------------------------------------------
// DHCP

const SERVER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0xfe];
const LEASE_SECS: u32 = 600;

fn dhcp_config(pool_size: u32) -> DhcpServerConfig {
    DhcpServerConfig {
        mac: SERVER_MAC,
        server_ip: ip(254),
        prefix_len: 24,
        pool_start: ip(100),
        pool_size,
        router: Some(ip(1)),
        dns: vec![Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(10, 0, 0, 54)],
        lease_secs: LEASE_SECS,
    }
}

fn dhcp_lan(pool_size: u32) -> (Hub, Shared<DhcpServer>) {
    let server = shared(DhcpServer::new(dhcp_config(pool_size)));
    let mut hub = Hub::new();
    hub.attach(server.clone());
    (hub, server)
}

#[test]
fn smoltcp_client_gets_a_lease_renews_it_and_a_second_client_gets_another_address() {
    let (mut hub, server) = dhcp_lan(16);
    let c1 = shared(DhcpClient::new(mac(1)));
    hub.attach(c1.clone());
    assert!(hub.run_until(60_000, || c1.borrow().lease.is_some()));
    let lease = c1.borrow().lease.clone().unwrap();
    assert_eq!(
        lease,
        DhcpLease {
            address: Ipv4Cidr::new(ip(100), 24),
            router: Some(ip(1)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(10, 0, 0, 54)],
        }
    );
    let counters = server.borrow().counters();
    assert_eq!((counters.discovers, counters.offers), (1, 1));
    assert_eq!((counters.requests, counters.acks, counters.naks), (1, 1, 0));
    let leases = server.borrow().leases();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].mac, leases[0].ip), (mac(1), ip(100)));
    let granted_at = leases[0].expires_ms - u64::from(LEASE_SECS) * 1000;
    assert!(granted_at <= hub.now_ms() && granted_at + 5 >= hub.now_ms());
    let first_expiry = leases[0].expires_ms;
    let bound_at = hub.now_ms();

    // T1 is half the lease: the client unicasts a renewal to the server (after ARPing for
    // it), and the ACK moves the expiry on.
    assert!(hub.run_until(bound_at + 500_000, || {
        server.borrow().counters().renewals >= 1
    }));
    let now = hub.now_ms();
    assert!(
        now >= bound_at + u64::from(LEASE_SECS) * 500,
        "renewed early, at {now} ms"
    );
    hub.run_for(1000);
    let counters = server.borrow().counters();
    assert_eq!(
        (counters.renewals, counters.rebinds, counters.naks),
        (1, 0, 0)
    );
    assert_eq!(counters.acks, 2);
    assert!(counters.arp_replies >= 1);
    let lease_after = server.borrow().lease_of(mac(1)).unwrap();
    assert_eq!(lease_after.ip, ip(100));
    assert!(lease_after.expires_ms > first_expiry);
    assert_eq!(
        c1.borrow().lease.as_ref().unwrap().address.address(),
        ip(100)
    );
    assert_eq!(
        c1.borrow().configured,
        1,
        "the renewal changed nothing the client sees"
    );

    // A second client gets the next address.
    let c2 = shared(DhcpClient::new(mac(2)));
    hub.attach(c2.clone());
    assert!(hub.run_within(60_000, || c2.borrow().lease.is_some()));
    assert_eq!(
        c2.borrow().lease.as_ref().unwrap().address.address(),
        ip(101)
    );
    let leases = server.borrow().leases();
    assert_eq!(
        leases.iter().map(|l| (l.mac, l.ip)).collect::<Vec<_>>(),
        vec![(mac(1), ip(100)), (mac(2), ip(101))]
    );

    // Much later both still hold their addresses: renewals keep the leases alive.
    hub.run_for(4 * u64::from(LEASE_SECS) * 1000);
    assert_eq!(server.borrow().leases().len(), 2);
    assert_eq!(c1.borrow().configured, 1);
    assert!(server.borrow().counters().renewals >= 8);
}

#[test]
fn same_mac_gets_the_same_address_back() {
    let (mut hub, server) = dhcp_lan(16);
    let c1 = shared(DhcpClient::new(mac(1)));
    let c2 = shared(DhcpClient::new(mac(2)));
    hub.attach(c1.clone());
    hub.attach(c2.clone());
    assert!(hub.run_until(60_000, || {
        c1.borrow().lease.is_some() && c2.borrow().lease.is_some()
    }));
    let addr2 = c2.borrow().lease.as_ref().unwrap().address.address();

    // Client 2 "reboots": a fresh DHCP client with the same MAC starts from DISCOVER.
    let reborn = shared(DhcpClient::new(mac(2)));
    *c2.borrow_mut() = DhcpClient::new(mac(99)); // the old one goes quiet on another MAC
    hub.attach(reborn.clone());
    assert!(hub.run_within(60_000, || reborn.borrow().lease.is_some()));
    assert_eq!(
        reborn.borrow().lease.as_ref().unwrap().address.address(),
        addr2
    );
    assert_eq!(server.borrow().counters().naks, 0);
}

#[test]
fn exhausted_pool_makes_no_offer() {
    let (mut hub, server) = dhcp_lan(1);
    let c1 = shared(DhcpClient::new(mac(1)));
    hub.attach(c1.clone());
    assert!(hub.run_until(60_000, || c1.borrow().lease.is_some()));
    let c2 = shared(DhcpClient::new(mac(2)));
    hub.attach(c2.clone());
    hub.run_for(30_000);
    assert!(c2.borrow().lease.is_none());
    let counters = server.borrow().counters();
    assert!(counters.pool_exhausted >= 2, "{counters:?}"); // DISCOVER retried every 10 s
    assert_eq!(counters.offers, 1);
}

// Hand-written client messages, for the cases smoltcp's client never produces.

struct Msg {
    kind: DhcpMessageType,
    mac: [u8; 6],
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    broadcast: bool,
}

fn msg(kind: DhcpMessageType, mac: [u8; 6]) -> Msg {
    Msg {
        kind,
        mac,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        requested: None,
        server: None,
        dst: Ipv4Addr::BROADCAST,
        broadcast: false,
    }
}

fn client_frame(m: &Msg) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let repr = DhcpRepr {
        message_type: m.kind,
        transaction_id: 0x1234,
        secs: 0,
        client_hardware_address: EthernetAddress(m.mac),
        client_ip: m.ciaddr,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: m.broadcast,
        requested_ip: m.requested,
        client_identifier: Some(EthernetAddress(m.mac)),
        server_identifier: m.server,
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let dhcp_len = repr.buffer_len();
    let mut frame = vec![0; 14 + 20 + 8 + dhcp_len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    let dst_mac = if m.dst == Ipv4Addr::BROADCAST {
        [0xff; 6]
    } else {
        SERVER_MAC
    };
    EthernetRepr {
        src_addr: EthernetAddress(m.mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let ip_repr = Ipv4Repr {
        src_addr: m.ciaddr,
        dst_addr: m.dst,
        next_header: IpProtocol::Udp,
        payload_len: 8 + dhcp_len,
        hop_limit: 64,
    };
    let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut packet, &caps);
    let mut udp = UdpPacket::new_unchecked(packet.payload_mut());
    UdpRepr {
        src_port: 68,
        dst_port: 67,
    }
    .emit(
        &mut udp,
        &ip_repr.src_addr.into(),
        &ip_repr.dst_addr.into(),
        dhcp_len,
        |payload| repr.emit(&mut DhcpPacket::new_unchecked(payload)).unwrap(),
        &caps,
    );
    frame
}

/// Feeds `frame` to the server and returns its replies, parsed: (kind, yiaddr, dst IP).
fn exchange(
    server: &mut DhcpServer,
    now: u64,
    frame: &[u8],
) -> Vec<(DhcpMessageType, Ipv4Addr, Ipv4Addr)> {
    server.receive(now, frame);
    let mut replies = Vec::new();
    server.transmit(now, &mut |f| replies.push(f.to_vec()));
    replies
        .iter()
        .map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            let packet = Ipv4Packet::new_checked(eth.payload()).unwrap();
            let ip_repr = Ipv4Repr::parse(&packet, &ChecksumCapabilities::default()).unwrap();
            let udp = UdpPacket::new_checked(packet.payload()).unwrap();
            let dhcp = DhcpPacket::new_checked(udp.payload()).unwrap();
            let repr = DhcpRepr::parse(&dhcp).unwrap();
            assert_eq!(repr.server_identifier, Some(ip(254)));
            (repr.message_type, repr.your_ip, ip_repr.dst_addr)
        })
        .collect()
}

#[test]
fn naks_releases_declines_and_expiry() {
    use DhcpMessageType::*;
    let mut server = DhcpServer::new(dhcp_config(4));
    let (a, b) = (mac(1), mac(2));
    // SELECTING for an address never offered: NAK (broadcast).
    let mut m = msg(Request, a);
    m.requested = Some(ip(102));
    m.server = Some(ip(254));
    assert_eq!(
        exchange(&mut server, 0, &client_frame(&m)),
        vec![(Nak, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)]
    );

    // DISCOVER asking for .102 gets it; REQUEST binds it; the ACK goes to yiaddr (no
    // broadcast flag, no ciaddr).
    let mut m = msg(Discover, a);
    m.requested = Some(ip(102));
    assert_eq!(
        exchange(&mut server, 0, &client_frame(&m)),
        vec![(Offer, ip(102), ip(102))]
    );
    let mut m = msg(Request, a);
    m.requested = Some(ip(102));
    m.server = Some(ip(254));
    assert_eq!(
        exchange(&mut server, 10, &client_frame(&m)),
        vec![(Ack, ip(102), ip(102))]
    );
    assert_eq!(server.lease_of(a).unwrap().expires_ms, 10 + 600_000);

    // Another client renewing .102 (it is a's): NAK. a renewing: ACK unicast to ciaddr.
    let mut m = msg(Request, b);
    m.ciaddr = ip(102);
    m.dst = ip(254);
    assert_eq!(exchange(&mut server, 20, &client_frame(&m))[0].0, Nak);
    let mut m = msg(Request, a);
    m.ciaddr = ip(102);
    m.dst = ip(254);
    assert_eq!(
        exchange(&mut server, 30, &client_frame(&m)),
        vec![(Ack, ip(102), ip(102))]
    );
    assert_eq!(server.counters().renewals, 1);

    // INIT-REBOOT: a asking for its own address is ACKed, for another one NAKed; an unknown
    // client gets silence.
    let mut m = msg(Request, a);
    m.requested = Some(ip(102));
    assert_eq!(exchange(&mut server, 40, &client_frame(&m))[0].0, Ack);
    m.requested = Some(ip(103));
    assert_eq!(exchange(&mut server, 40, &client_frame(&m))[0].0, Nak);
    let mut m = msg(Request, mac(7));
    m.requested = Some(ip(103));
    assert!(exchange(&mut server, 40, &client_frame(&m)).is_empty());

    // A client that picked another server's offer: silence, and the offer is dropped.
    let offer = exchange(&mut server, 50, &client_frame(&msg(Discover, b)));
    assert_eq!(offer[0].0, Offer);
    let mut m = msg(Request, b);
    m.requested = Some(offer[0].1);
    m.server = Some(ip(253));
    assert!(exchange(&mut server, 60, &client_frame(&m)).is_empty());

    // DECLINE: the address is taken out of the pool; RELEASE frees a's lease.
    let mut m = msg(Decline, b);
    m.requested = Some(ip(100));
    m.server = Some(ip(254));
    assert!(exchange(&mut server, 70, &client_frame(&m)).is_empty());
    let mut m = msg(Release, a);
    m.ciaddr = ip(102);
    m.server = Some(ip(254));
    m.dst = ip(254);
    assert!(exchange(&mut server, 80, &client_frame(&m)).is_empty());
    assert!(server.leases().is_empty());
    let c = server.counters();
    assert_eq!((c.declines, c.releases), (1, 1));
    // b's next DISCOVER skips the declined .100; with the broadcast flag set, the OFFER is
    // broadcast.
    let mut m = msg(Discover, b);
    m.broadcast = true;
    assert_eq!(
        exchange(&mut server, 90, &client_frame(&m)),
        vec![(Offer, ip(101), Ipv4Addr::BROADCAST)]
    );

    // Leases run out: bind b, then drive the server past the expiry.
    let mut m = msg(Request, b);
    m.requested = Some(ip(101));
    m.server = Some(ip(254));
    assert_eq!(exchange(&mut server, 100, &client_frame(&m))[0].0, Ack);
    assert_eq!(server.leases().len(), 1);
    // The server wants to be driven at each expiry: first the declined .100 comes back,
    // then b's lease runs out.
    assert_eq!(server.poll_at(200), Some(70 + 600_000));
    server.transmit(70 + 600_000, &mut |_| panic!("nothing to send"));
    assert_eq!(server.poll_at(70 + 600_000), Some(100 + 600_000));
    assert_eq!(server.leases().len(), 1);
    server.transmit(100 + 600_000, &mut |_| panic!("nothing to send"));
    assert!(server.leases().is_empty());
    assert_eq!(server.poll_at(100 + 600_000), None);
}

// ---------------------------------------------------------------------------------------
// Garbage

fn garbage_frames(seed: u64, valid: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut rng = SplitMix64::new(seed);
    let mut frames = Vec::new();
    for _ in 0..300 {
        let mut f = vec![0; rng.below(1600) as usize];
        rng.fill(&mut f);
        frames.push(f);
    }
    for v in valid {
        // Every truncation of a valid frame.
        for len in 0..v.len() {
            frames.push(v[..len].to_vec());
        }
        // Random bit flips, with the checksums left as they are (most are then bad).
        for _ in 0..200 {
            let mut f = v.clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
            frames.push(f);
        }
    }
    frames
}

#[test]
fn dhcp_server_and_hosts_survive_garbage() {
    let mut discover = msg(DhcpMessageType::Discover, mac(1));
    discover.requested = Some(ip(100));
    let mut request = msg(DhcpMessageType::Request, mac(1));
    request.ciaddr = ip(100);
    request.dst = ip(254);
    let valid = vec![client_frame(&discover), client_frame(&request)];
    let frames = garbage_frames(1, &valid);

    let (mut hub, server) = dhcp_lan(8);
    let (a, b) = (host(1), host(2));
    hub.attach(a.clone());
    hub.attach(b.clone());
    let mut now = 0;
    for (i, frame) in frames.iter().enumerate() {
        server.borrow_mut().receive(now, frame);
        a.borrow_mut().receive(now, frame);
        if i % 50 == 0 {
            now += 10;
            hub.step(now);
        }
    }
    hub.run_for(5_000);
    let counters = server.borrow().counters();
    assert!(counters.garbage > 300, "{counters:?}");

    // Everyone still works.
    let id = a.borrow_mut().ping(ip(2), 2);
    assert!(hub.run_within(10_000, || a.borrow().ping_status(id).unwrap().done));
    assert_eq!(a.borrow().ping_status(id).unwrap().received, 2);
    let client = shared(DhcpClient::new(mac(9)));
    hub.attach(client.clone());
    assert!(hub.run_within(60_000, || client.borrow().lease.is_some()));
}
