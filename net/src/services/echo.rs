//! The echo service of RFC 862 on port 7, over TCP and UDP, for tests.
//!
//! TCP: several listening sockets, each echoing one connection at a time; data is copied
//! from the socket's receive buffer to its send buffer through one scratch buffer shared
//! by the sockets, as fast as the send buffer drains. When the client closes its side,
//! the rest is flushed and the server closes too (a passive close: no TIME-WAIT here).
//! A connection silent for [`EchoConfig::idle_timeout`] is aborted.
//!
//! UDP: each datagram goes back to its sender from the address it was sent to; when the
//! send buffer is full the datagram is dropped (and counted), as UDP allows.
//!
//! Off by default on the appliance ([`InterfaceConfig`](crate::InterfaceConfig)): an open
//! UDP echo port is a traffic reflector.

use alloc::vec;
use alloc::vec::Vec;

use hvnet_runtime::{Duration, Instant};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};

use crate::iface::to_net_duration;

/// Settings of the echo service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoConfig {
    /// Port for both protocols (7).
    pub port: u16,
    /// TCP connections served at once.
    pub tcp_sockets: usize,
    /// TCP receive and send buffer, each, per socket.
    pub tcp_buffer: usize,
    /// UDP datagrams buffered each way.
    pub udp_packets: usize,
    /// UDP payload bytes buffered each way.
    pub udp_buffer: usize,
    /// A TCP connection that moves no data for this long is aborted.
    pub idle_timeout: Duration,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            port: 7,
            tcp_sockets: 4,
            tcp_buffer: 16 * 1024,
            // As many datagrams as one poll receives (the receive budget), so a burst is
            // echoed without drops.
            udp_packets: 64,
            udp_buffer: 64 * 1024,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What the service has done (for tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoCounters {
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// TCP bytes echoed.
    pub tcp_bytes: u64,
    /// UDP datagrams echoed.
    pub udp_datagrams: u64,
    /// UDP datagrams dropped (send buffer full, or larger than the scratch buffer).
    pub udp_dropped: u64,
    /// TCP connections aborted as idle.
    pub idle_aborts: u64,
}

struct TcpEcho {
    handle: SocketHandle,
    active: bool,
    last_activity: Instant,
}

/// The echo service of one interface.
pub struct EchoServer {
    port: u16,
    idle_timeout: Duration,
    tcp: Vec<TcpEcho>,
    udp: SocketHandle,
    scratch: Vec<u8>,
    counters: EchoCounters,
}

impl EchoServer {
    /// Adds the service's sockets to `sockets`; `max_datagram` sizes the UDP scratch
    /// buffer (the interface's IP MTU is enough: there is no IP reassembly).
    pub fn new(config: &EchoConfig, max_datagram: usize, sockets: &mut SocketSet<'static>) -> Self {
        let tcp = (0..config.tcp_sockets)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; config.tcp_buffer]),
                    tcp::SocketBuffer::new(vec![0; config.tcp_buffer]),
                );
                // Also bounds a connection whose peer stops acknowledging (LAST-ACK).
                socket.set_timeout(Some(to_net_duration(config.idle_timeout)));
                if let Err(error) = socket.listen(config.port) {
                    log::warn!("echo: cannot listen on TCP port {}: {error:?}", config.port);
                }
                TcpEcho {
                    handle: sockets.add(socket),
                    active: false,
                    last_activity: Instant::ZERO,
                }
            })
            .collect();
        let mut udp = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; config.udp_packets],
                vec![0; config.udp_buffer],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; config.udp_packets],
                vec![0; config.udp_buffer],
            ),
        );
        if let Err(error) = udp.bind(config.port) {
            log::warn!("echo: cannot bind UDP port {}: {error:?}", config.port);
        }
        EchoServer {
            port: config.port,
            idle_timeout: config.idle_timeout,
            tcp,
            udp: sockets.add(udp),
            scratch: vec![0; max_datagram.max(config.tcp_buffer.min(16 * 1024)).max(512)],
            counters: EchoCounters::default(),
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> EchoCounters {
        self.counters
    }

    /// When the next idle connection would time out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tcp
            .iter()
            .filter(|c| c.active)
            .map(|c| c.last_activity + self.idle_timeout)
            .min()
    }

    /// Echoes what arrived. Returns whether anything was queued for sending.
    pub fn poll(&mut self, now: Instant, sockets: &mut SocketSet<'static>) -> bool {
        let mut queued = false;
        for index in 0..self.tcp.len() {
            queued |= self.poll_tcp(index, now, sockets);
        }
        queued | self.poll_udp(sockets)
    }

    fn poll_tcp(&mut self, index: usize, now: Instant, sockets: &mut SocketSet<'static>) -> bool {
        let conn = &mut self.tcp[index];
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        match socket.state() {
            tcp::State::Closed | tcp::State::TimeWait => {
                socket.abort();
                if let Err(error) = socket.listen(self.port) {
                    log::warn!("echo: cannot listen on TCP port {}: {error:?}", self.port);
                }
                conn.active = false;
                return false;
            }
            tcp::State::Listen | tcp::State::SynReceived => return false,
            _ => {}
        }
        if !conn.active {
            conn.active = true;
            conn.last_activity = now;
            self.counters.tcp_connections += 1;
        }
        let mut moved = 0;
        while socket.can_recv() && socket.can_send() {
            let room = socket.send_capacity() - socket.send_queue();
            let n = room.min(self.scratch.len());
            match socket.recv_slice(&mut self.scratch[..n]) {
                Ok(0) | Err(_) => break,
                Ok(got) => {
                    // `got` fits: it was bounded by the free send space.
                    let sent = socket.send_slice(&self.scratch[..got]).unwrap_or(0);
                    moved += sent;
                    if sent < got {
                        log::warn!("echo: {} bytes lost on a full send buffer", got - sent);
                        break;
                    }
                }
            }
        }
        self.counters.tcp_bytes += moved as u64;
        if moved > 0 {
            conn.last_activity = now;
        }
        if !socket.may_recv() && socket.recv_queue() == 0 && socket.send_queue() == 0 {
            socket.close();
        } else if now >= conn.last_activity + self.idle_timeout {
            log::debug!("echo: idle TCP connection aborted");
            self.counters.idle_aborts += 1;
            socket.abort();
            return true;
        }
        moved > 0
    }

    fn poll_udp(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let socket = sockets.get_mut::<udp::Socket>(self.udp);
        let mut queued = false;
        while socket.can_recv() {
            match socket.recv_slice(&mut self.scratch) {
                Ok((n, meta)) => match socket.send_slice(&self.scratch[..n], meta) {
                    Ok(()) => {
                        self.counters.udp_datagrams += 1;
                        queued = true;
                    }
                    Err(_) => self.counters.udp_dropped += 1,
                },
                Err(udp::RecvError::Truncated) => self.counters.udp_dropped += 1,
                Err(udp::RecvError::Exhausted) => break,
            }
        }
        queued
    }
}
