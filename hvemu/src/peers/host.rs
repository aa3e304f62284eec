//! A simulated host: a smoltcp interface with a static address, echo servers, and the
//! client actions of [`flows`](super::flows).

use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::device::QueueDevice;
use super::flows::{
    tcp_socket, Apps, FlowId, HttpStatus, PingStatus, TcpEchoStatus, UdpFlowsStatus,
};
use super::stack::{run_until_idle, StackPeer};
use super::Endpoint;

/// The port the TCP and UDP echo servers listen on (RFC 862).
pub const ECHO_PORT: u16 = 7;
/// Receive and send buffer of every TCP socket, each way: a full window of data in flight.
pub const TCP_BUFFER_SIZE: usize = 64 * 1024;
/// Listening TCP echo sockets (concurrent echo connections).
const TCP_ECHO_LISTENERS: usize = 4;

/// Addressing of a [`PeerHost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHostConfig {
    /// Ethernet address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the attached subnet.
    pub prefix_len: u8,
    /// Default gateway, if the host should reach other subnets.
    pub gateway: Option<Ipv4Addr>,
}

/// Counters of a [`PeerHost`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerHostStats {
    /// Frames handed to the host (all of them, before MAC filtering).
    pub rx_frames: u64,
    /// Frames dropped before the stack: too short for Ethernet, or for another unicast MAC.
    pub rx_filtered: u64,
    /// Frames the host sent.
    pub tx_frames: u64,
    /// TCP echo connections accepted.
    pub tcp_echo_accepted: u64,
    /// Bytes the TCP echo server sent back.
    pub tcp_echo_bytes: u64,
    /// Datagrams the UDP echo server sent back.
    pub udp_echoed: u64,
    /// Datagrams the UDP echo server could not send back (its send buffer was full).
    pub udp_echo_dropped: u64,
}

struct EchoListener {
    handle: SocketHandle,
    connected: bool,
}

/// A host on the simulated LAN with a fixed address. smoltcp answers ARP and ping; the
/// host serves TCP and UDP echo on [`ECHO_PORT`] (several TCP connections at once) and
/// runs client actions started by the test: [`ping`](PeerHost::ping),
/// [`tcp_echo`](PeerHost::tcp_echo), [`udp_flows`](PeerHost::udp_flows) and
/// [`http_get`](PeerHost::http_get), each watched through its [`FlowId`].
pub struct PeerHost {
    config: PeerHostConfig,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    listeners: Vec<EchoListener>,
    udp_echo: SocketHandle,
    apps: Apps,
    scratch: Vec<u8>,
    /// A new action was started: transmit as soon as possible.
    kick: bool,
    /// The last time the host was driven.
    now_ms: u64,
    next_poll: Option<u64>,
    stats: PeerHostStats,
}

impl PeerHost {
    /// A host with `config`'s address; servers listening, no client actions yet.
    pub fn new(config: PeerHostConfig) -> Self {
        let mut device = QueueDevice::new();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(config.mac)));
        // Deterministic, but different per host (initial sequence numbers, ports).
        let mut seed = [0u8; 8];
        seed[..6].copy_from_slice(&config.mac);
        iface_config.random_seed = u64::from_le_bytes(seed) ^ 0x005e_ed0f_9ee7;
        let mut iface = Interface::new(iface_config, &mut device, Instant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            let cidr = IpCidr::new(IpAddress::Ipv4(config.ip), config.prefix_len);
            if addrs.push(cidr).is_err() {
                log::error!("peer: no room for address {cidr}");
            }
        });
        if let Some(gateway) = config.gateway {
            if iface.routes_mut().add_default_ipv4_route(gateway).is_err() {
                log::error!("peer: route table full");
            }
        }
        let mut sockets = SocketSet::new(Vec::new());
        let listeners = (0..TCP_ECHO_LISTENERS)
            .map(|_| {
                let mut socket = tcp_socket(TCP_BUFFER_SIZE);
                // A fresh socket on a valid port always listens.
                let _ = socket.listen(ECHO_PORT);
                EchoListener {
                    handle: sockets.add(socket),
                    connected: false,
                }
            })
            .collect();
        let mut udp = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0; 256 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0; 256 * 1024]),
        );
        let _ = udp.bind(ECHO_PORT);
        let udp_echo = sockets.add(udp);
        PeerHost {
            apps: Apps::new(config.mac, TCP_BUFFER_SIZE),
            config,
            iface,
            device,
            sockets,
            listeners,
            udp_echo,
            scratch: vec![0; TCP_BUFFER_SIZE],
            kick: false,
            now_ms: 0,
            next_poll: None,
            stats: PeerHostStats::default(),
        }
    }

    /// The host's addressing.
    pub fn config(&self) -> &PeerHostConfig {
        &self.config
    }

    /// The host's IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.config.ip
    }

    /// Counters so far.
    pub fn stats(&self) -> PeerHostStats {
        self.stats
    }

    /// Sends `count` echo requests to `target`, one every
    /// [`PING_INTERVAL_MS`](super::PING_INTERVAL_MS); see [`ping_status`](Self::ping_status).
    pub fn ping(&mut self, target: Ipv4Addr, count: u16) -> FlowId {
        self.kick = true;
        self.apps
            .ping(&mut self.sockets, self.now_ms, target, count)
    }

    /// Progress of a [`ping`](Self::ping) run.
    pub fn ping_status(&self, id: FlowId) -> Option<&PingStatus> {
        self.apps.ping_status(id)
    }

    /// Connects to `target:port`, sends `total_bytes` of the pseudo-random stream named by
    /// `seed`, and checks byte by byte that the same stream comes back. The flow is `Done`
    /// when every byte is verified; it then closes the connection.
    pub fn tcp_echo(&mut self, target: Ipv4Addr, port: u16, total_bytes: u64, seed: u64) -> FlowId {
        self.kick = true;
        self.apps.tcp_echo(
            &mut self.iface,
            &mut self.sockets,
            target,
            port,
            total_bytes,
            seed,
        )
    }

    /// Progress of a [`tcp_echo`](Self::tcp_echo) flow.
    pub fn tcp_echo_status(&self, id: FlowId) -> Option<&TcpEchoStatus> {
        self.apps.tcp_echo_status(id)
    }

    /// Sends `packets_per_flow` datagrams from each of `n_flows` distinct source ports to
    /// `target:port` and counts the echoes (distinct 4-tuples, to spread over RSS queues).
    pub fn udp_flows(
        &mut self,
        target: Ipv4Addr,
        port: u16,
        n_flows: u16,
        packets_per_flow: u32,
    ) -> FlowId {
        self.kick = true;
        self.apps
            .udp_flows(&mut self.sockets, target, port, n_flows, packets_per_flow)
    }

    /// Progress of a [`udp_flows`](Self::udp_flows) run.
    pub fn udp_status(&self, id: FlowId) -> Option<&UdpFlowsStatus> {
        self.apps.udp_status(id)
    }

    /// `GET path` over HTTP/1.1 with `Connection: close`; the response is parsed once the
    /// server closes the connection.
    pub fn http_get(&mut self, target: Ipv4Addr, port: u16, path: &str) -> FlowId {
        self.kick = true;
        self.apps
            .http_get(&mut self.iface, &mut self.sockets, target, port, path)
    }

    /// Progress of an [`http_get`](Self::http_get).
    pub fn http_status(&self, id: FlowId) -> Option<&HttpStatus> {
        self.apps.http_status(id)
    }

    /// Runs the echo servers once; true if anything moved.
    fn serve_echo(&mut self) -> bool {
        let mut progress = false;
        for listener in &mut self.listeners {
            let socket = self.sockets.get_mut::<tcp::Socket>(listener.handle);
            if socket.state() == tcp::State::Closed {
                listener.connected = false;
                progress |= socket.listen(ECHO_PORT).is_ok();
                continue;
            }
            if !listener.connected && socket.state() != tcp::State::Listen {
                listener.connected = true;
                self.stats.tcp_echo_accepted += 1;
                progress = true;
            }
            loop {
                let space = socket.send_capacity() - socket.send_queue();
                if space == 0 || !socket.can_recv() || !socket.may_send() {
                    break;
                }
                let take = space.min(self.scratch.len());
                let n = match socket.recv_slice(&mut self.scratch[..take]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                // Fits: there were `space` free bytes.
                let sent = socket.send_slice(&self.scratch[..n]).unwrap_or(0);
                self.stats.tcp_echo_bytes += sent as u64;
                progress = true;
            }
            if socket.state() == tcp::State::CloseWait && !socket.can_recv() {
                // The client is done sending and everything is echoed (or queued).
                socket.close();
                progress = true;
            }
        }
        let socket = self.sockets.get_mut::<udp::Socket>(self.udp_echo);
        while socket.can_recv() && socket.can_send() {
            let Ok((n, meta)) = socket.recv_slice(&mut self.scratch) else {
                break;
            };
            match socket.send_slice(&self.scratch[..n], meta.endpoint) {
                Ok(()) => self.stats.udp_echoed += 1,
                Err(_) => self.stats.udp_echo_dropped += 1,
            }
            progress = true;
        }
        progress
    }
}

impl StackPeer for PeerHost {
    fn stack(&mut self) -> (&mut Interface, &mut QueueDevice, &mut SocketSet<'static>) {
        (&mut self.iface, &mut self.device, &mut self.sockets)
    }

    fn serve(&mut self) -> bool {
        let echoed = self.serve_echo();
        echoed | self.apps.service(&mut self.sockets, self.now_ms)
    }
}

impl Endpoint for PeerHost {
    fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    fn receive(&mut self, now_ms: u64, frame: &[u8]) {
        self.stats.rx_frames += 1;
        self.now_ms = self.now_ms.max(now_ms);
        // Drop what the stack would drop anyway, without queueing it: runts and unicast
        // frames for other hosts (the hub hands everyone everything).
        let for_us = frame.len() >= 14 && (frame[..6] == self.config.mac || frame[0] & 1 == 1);
        if for_us {
            self.device.push_rx(frame);
        } else {
            self.stats.rx_filtered += 1;
        }
    }

    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = Instant::from_millis(self.now_ms as i64);
        run_until_idle(self, now);
        while let Some(frame) = self.device.pop_tx() {
            self.stats.tx_frames += 1;
            out(&frame);
        }
        self.kick = false;
        let stack = self
            .iface
            .poll_at(now, &self.sockets)
            .map(|t| t.total_millis().max(0) as u64);
        self.next_poll = match (stack, self.apps.poll_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        if self.kick || self.device.rx_pending() > 0 {
            Some(now_ms)
        } else {
            self.next_poll
        }
    }
}
