//! A DHCPv4 server (RFC 2131) for the simulated LAN, written on smoltcp's wire types.
//!
//! It is what hands the appliance its address in host tests, so it follows the RFC where
//! smoltcp's client looks (server identifier in every reply, subnet mask and lease time in
//! every ACK, reply addressing of RFC 2131 4.1) and is strict in what it accepts: anything
//! malformed is counted in [`DhcpCounters::garbage`] and dropped, never a panic.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr,
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, UdpPacket, UdpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

use super::{Endpoint, BROADCAST_MAC};

/// How long an offered address stays reserved for the client it was offered to.
pub const OFFER_HOLD_MS: u64 = 30_000;

/// Smallest DHCP message the server sends (the BOOTP minimum of RFC 1542; some clients
/// drop shorter ones).
const MIN_DHCP_LEN: usize = 300;

const OPT_DOMAIN_NAME_SERVER: u8 = 6;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;

/// What the server hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpServerConfig {
    /// The server's Ethernet address.
    pub mac: [u8; 6],
    /// The server's own address; also its server identifier.
    pub server_ip: Ipv4Addr,
    /// Prefix length of the served subnet (the subnet mask option).
    pub prefix_len: u8,
    /// First address of the pool.
    pub pool_start: Ipv4Addr,
    /// Addresses in the pool (the server's own, network and broadcast addresses are skipped).
    pub pool_size: u32,
    /// Default gateway handed out (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers handed out (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds; T1 is half of it and T2 seven eighths.
    pub lease_secs: u32,
}

/// A bound address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The client's hardware address (chaddr).
    pub mac: [u8; 6],
    /// The address it holds.
    pub ip: Ipv4Addr,
    /// When the lease runs out unless renewed (simulated milliseconds).
    pub expires_ms: u64,
}

/// What the server has seen and done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DhcpCounters {
    /// DHCPDISCOVER messages received.
    pub discovers: u64,
    /// DHCPOFFER messages sent.
    pub offers: u64,
    /// DHCPREQUEST messages received (every kind: selecting, init-reboot, renew, rebind).
    pub requests: u64,
    /// DHCPACK messages sent.
    pub acks: u64,
    /// DHCPNAK messages sent.
    pub naks: u64,
    /// ACKs that extended a lease for a client in RENEWING or REBINDING state.
    pub renewals: u64,
    /// Of those, the ones that came by broadcast (REBINDING).
    pub rebinds: u64,
    /// DHCPRELEASE messages that released a lease.
    pub releases: u64,
    /// DHCPDECLINE messages received.
    pub declines: u64,
    /// DHCPINFORM messages answered.
    pub informs: u64,
    /// ARP requests for the server's address answered.
    pub arp_replies: u64,
    /// DISCOVERs left unanswered because no address was free.
    pub pool_exhausted: u64,
    /// Well-formed DHCP messages not answered (another server chosen, no record of an
    /// INIT-REBOOT client, relayed messages, messages a server never receives).
    pub ignored: u64,
    /// Malformed frames and packets (truncated, bad checksum, bad DHCP).
    pub garbage: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binding {
    /// Offered, waiting for the client's REQUEST.
    Offered { until_ms: u64 },
    /// Leased.
    Bound { expires_ms: u64 },
    /// Expired, released or never taken: the address is free, but this client gets it
    /// back first.
    Free,
}

#[derive(Clone, Copy, Debug)]
struct Record {
    ip: Ipv4Addr,
    binding: Binding,
}

impl Record {
    fn active(&self, now_ms: u64) -> bool {
        match self.binding {
            Binding::Offered { until_ms } => until_ms > now_ms,
            Binding::Bound { expires_ms } => expires_ms > now_ms,
            Binding::Free => false,
        }
    }
}

/// A malformed input, with the reason for the log.
struct Garbage(&'static str);

/// A DHCPv4 server on the simulated LAN. It also answers ARP for its own address (clients
/// in RENEWING state unicast to it).
#[derive(Debug)]
pub struct DhcpServer {
    config: DhcpServerConfig,
    mask: u32,
    /// Every client the server knows, by hardware address (ordered: deterministic).
    records: BTreeMap<[u8; 6], Record>,
    /// Addresses a client declined (in use by someone else), until when.
    declined: BTreeMap<u32, u64>,
    out: VecDeque<Vec<u8>>,
    counters: DhcpCounters,
}

fn u32_of(ip: Ipv4Addr) -> u32 {
    u32::from(ip)
}

impl DhcpServer {
    /// A server with an empty lease table.
    ///
    /// # Panics
    /// If `prefix_len` is more than 32 (a test configuration error).
    pub fn new(config: DhcpServerConfig) -> Self {
        assert!(
            config.prefix_len <= 32,
            "prefix_len {} > 32",
            config.prefix_len
        );
        let mask = u32::MAX
            .checked_shl(32 - u32::from(config.prefix_len))
            .unwrap_or(0);
        DhcpServer {
            config,
            mask,
            records: BTreeMap::new(),
            declined: BTreeMap::new(),
            out: VecDeque::new(),
            counters: DhcpCounters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DhcpServerConfig {
        &self.config
    }

    /// Counters so far.
    pub fn counters(&self) -> DhcpCounters {
        self.counters
    }

    /// The bound leases (as of the last time the server was driven), by address.
    pub fn leases(&self) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self
            .records
            .iter()
            .filter_map(|(mac, record)| match record.binding {
                Binding::Bound { expires_ms } => Some(Lease {
                    mac: *mac,
                    ip: record.ip,
                    expires_ms,
                }),
                _ => None,
            })
            .collect();
        leases.sort_by_key(|lease| u32_of(lease.ip));
        leases
    }

    /// The bound lease of `mac`, if any.
    pub fn lease_of(&self, mac: [u8; 6]) -> Option<Lease> {
        self.leases().into_iter().find(|lease| lease.mac == mac)
    }

    fn subnet_mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask)
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        u32_of(ip) & self.mask == u32_of(self.config.server_ip) & self.mask
    }

    fn subnet_broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32_of(self.config.server_ip) | !self.mask)
    }

    /// Whether `ip` is one the server may hand out at all.
    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let (ip_n, start) = (u32_of(ip), u32_of(self.config.pool_start));
        let host = ip_n & !self.mask;
        ip_n >= start
            && ip_n - start < self.config.pool_size
            && ip != self.config.server_ip
            && self.in_subnet(ip)
            // Not the network or broadcast address (when the subnet has those).
            && (self.config.prefix_len >= 31 || (host != 0 && host != !self.mask))
    }

    fn is_declined(&self, ip: Ipv4Addr, now_ms: u64) -> bool {
        self.declined
            .get(&u32_of(ip))
            .is_some_and(|&until| until > now_ms)
    }

    /// Whether `mac` may be given `ip` now.
    fn usable_by(&self, mac: [u8; 6], ip: Ipv4Addr, now_ms: u64) -> bool {
        self.in_pool(ip)
            && !self.is_declined(ip, now_ms)
            && !self
                .records
                .iter()
                .any(|(m, r)| *m != mac && r.ip == ip && r.active(now_ms))
    }

    /// Picks an address for `mac`: its own previous one, else the one it asks for, else a
    /// never-used one, else any free one.
    fn allocate(&self, mac: [u8; 6], requested: Option<Ipv4Addr>, now_ms: u64) -> Option<Ipv4Addr> {
        if let Some(record) = self.records.get(&mac) {
            if self.usable_by(mac, record.ip, now_ms) {
                return Some(record.ip);
            }
        }
        if let Some(ip) = requested.filter(|&ip| self.usable_by(mac, ip, now_ms)) {
            return Some(ip);
        }
        let start = u32_of(self.config.pool_start);
        let pool = (0..self.config.pool_size)
            .map_while(|k| start.checked_add(k))
            .map(Ipv4Addr::from);
        let remembered = |ip: Ipv4Addr| self.records.values().any(|r| r.ip == ip);
        pool.clone()
            .find(|&ip| self.usable_by(mac, ip, now_ms) && !remembered(ip))
            .or_else(|| pool.clone().find(|&ip| self.usable_by(mac, ip, now_ms)))
    }

    /// Gives `ip` to `mac` with `binding`; any other client's memory of `ip` is dropped.
    fn assign(&mut self, mac: [u8; 6], ip: Ipv4Addr, binding: Binding) {
        self.records.retain(|m, r| *m == mac || r.ip != ip);
        self.records.insert(mac, Record { ip, binding });
    }

    fn expire(&mut self, now_ms: u64) {
        for (mac, record) in self.records.iter_mut() {
            if record.binding != Binding::Free && !record.active(now_ms) {
                if let Binding::Bound { .. } = record.binding {
                    log::info!(
                        "dhcp: lease of {} by {} expired",
                        record.ip,
                        EthernetAddress(*mac)
                    );
                }
                record.binding = Binding::Free;
            }
        }
        self.declined.retain(|_, until| *until > now_ms);
    }

    fn next_expiry(&self) -> Option<u64> {
        let leases = self.records.values().filter_map(|r| match r.binding {
            Binding::Offered { until_ms } => Some(until_ms),
            Binding::Bound { expires_ms } => Some(expires_ms),
            Binding::Free => None,
        });
        leases.chain(self.declined.values().copied()).min()
    }

    fn handle_frame(&mut self, now_ms: u64, frame: &[u8]) -> Result<(), Garbage> {
        let eth = EthernetFrame::new_checked(frame).map_err(|_| Garbage("short Ethernet frame"))?;
        let dst = eth.dst_addr();
        if dst != EthernetAddress(self.config.mac) && !dst.is_broadcast() {
            return Ok(());
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.handle_arp(eth.payload()),
            EthernetProtocol::Ipv4 => self.handle_ipv4(now_ms, eth.payload()),
            _ => Ok(()),
        }
    }

    fn handle_arp(&mut self, payload: &[u8]) -> Result<(), Garbage> {
        let packet = ArpPacket::new_checked(payload).map_err(|_| Garbage("short ARP packet"))?;
        let repr = ArpRepr::parse(&packet).map_err(|_| Garbage("unsupported ARP packet"))?;
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return Ok(());
        };
        if operation != ArpOperation::Request || target_protocol_addr != self.config.server_ip {
            return Ok(());
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.config.mac),
            source_protocol_addr: self.config.server_ip,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut frame = vec![0; 14 + reply.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.config.mac),
            dst_addr: source_hardware_addr,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        reply.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        self.out.push_back(frame);
        self.counters.arp_replies += 1;
        Ok(())
    }

    fn handle_ipv4(&mut self, now_ms: u64, payload: &[u8]) -> Result<(), Garbage> {
        let caps = ChecksumCapabilities::default();
        let packet = Ipv4Packet::new_checked(payload).map_err(|_| Garbage("short IPv4 packet"))?;
        let ip = Ipv4Repr::parse(&packet, &caps).map_err(|_| Garbage("bad IPv4 header"))?;
        let to_broadcast =
            ip.dst_addr == Ipv4Addr::BROADCAST || ip.dst_addr == self.subnet_broadcast();
        if !to_broadcast && ip.dst_addr != self.config.server_ip {
            return Ok(());
        }
        if ip.next_header != IpProtocol::Udp {
            return Ok(());
        }
        if packet.more_frags() || packet.frag_offset() != 0 {
            // DHCP messages fit a frame; nobody fragments them.
            self.counters.ignored += 1;
            return Ok(());
        }
        let udp =
            UdpPacket::new_checked(packet.payload()).map_err(|_| Garbage("short UDP packet"))?;
        let udp_repr = UdpRepr::parse(&udp, &ip.src_addr.into(), &ip.dst_addr.into(), &caps)
            .map_err(|_| Garbage("bad UDP header"))?;
        if udp_repr.dst_port != DHCP_SERVER_PORT {
            return Ok(());
        }
        let dhcp = DhcpPacket::new_checked(udp.payload()).map_err(|_| Garbage("short DHCP"))?;
        let repr = DhcpRepr::parse(&dhcp).map_err(|_| Garbage("bad DHCP message"))?;
        self.handle_dhcp(now_ms, &repr, to_broadcast);
        Ok(())
    }

    fn handle_dhcp(&mut self, now_ms: u64, req: &DhcpRepr<'_>, to_broadcast: bool) {
        let mac = req.client_hardware_address.0;
        log::debug!(
            "dhcp: {:?} from {} xid {:#x} ciaddr {} requested {:?} server {:?}",
            req.message_type,
            req.client_hardware_address,
            req.transaction_id,
            req.client_ip,
            req.requested_ip,
            req.server_identifier
        );
        if !req.relay_agent_ip.is_unspecified() {
            log::debug!(
                "dhcp: relayed message (giaddr {}) ignored",
                req.relay_agent_ip
            );
            self.counters.ignored += 1;
            return;
        }
        match req.message_type {
            DhcpMessageType::Discover => self.on_discover(now_ms, req, mac),
            DhcpMessageType::Request => self.on_request(now_ms, req, mac, to_broadcast),
            DhcpMessageType::Release => self.on_release(req, mac),
            DhcpMessageType::Decline => self.on_decline(now_ms, req, mac),
            DhcpMessageType::Inform => self.on_inform(req),
            _ => self.counters.ignored += 1,
        }
    }

    fn on_discover(&mut self, now_ms: u64, req: &DhcpRepr<'_>, mac: [u8; 6]) {
        self.counters.discovers += 1;
        let Some(ip) = self.allocate(mac, req.requested_ip, now_ms) else {
            self.counters.pool_exhausted += 1;
            log::warn!(
                "dhcp: pool exhausted ({} addresses from {}), no offer for {}",
                self.config.pool_size,
                self.config.pool_start,
                req.client_hardware_address
            );
            return;
        };
        let still_bound = self.records.get(&mac).is_some_and(|r| {
            r.ip == ip && matches!(r.binding, Binding::Bound { .. }) && r.active(now_ms)
        });
        if !still_bound {
            let until_ms = now_ms + OFFER_HOLD_MS;
            self.assign(mac, ip, Binding::Offered { until_ms });
        }
        self.counters.offers += 1;
        self.reply(req, DhcpMessageType::Offer, ip, true);
    }

    fn on_request(&mut self, now_ms: u64, req: &DhcpRepr<'_>, mac: [u8; 6], to_broadcast: bool) {
        self.counters.requests += 1;
        let own = self.config.server_ip;
        let record = self.records.get(&mac).copied();
        if let Some(server) = req.server_identifier {
            // SELECTING: the client answers an OFFER.
            if server != own {
                // It chose another server: forget our offer.
                if let Some(Record {
                    binding: Binding::Offered { .. },
                    ..
                }) = record
                {
                    if let Some(r) = self.records.get_mut(&mac) {
                        r.binding = Binding::Free;
                    }
                }
                self.counters.ignored += 1;
                return;
            }
            let wanted = req.requested_ip.unwrap_or(req.client_ip);
            let ok = record.is_some_and(|r| r.ip == wanted) && self.usable_by(mac, wanted, now_ms);
            if ok {
                self.ack(now_ms, req, mac, wanted);
            } else {
                self.nak(req, "no offer for that address");
            }
            return;
        }
        if req.client_ip.is_unspecified() {
            // INIT-REBOOT: the client asks to keep an address it had.
            let Some(wanted) = req.requested_ip else {
                self.counters.ignored += 1;
                return;
            };
            if !self.in_subnet(wanted) {
                self.nak(req, "address not on this subnet");
                return;
            }
            match record {
                Some(r) if r.ip == wanted && self.usable_by(mac, wanted, now_ms) => {
                    self.ack(now_ms, req, mac, wanted)
                }
                Some(_) => self.nak(req, "not the client's address"),
                // RFC 2131 4.3.2: no record of the client, stay silent.
                None => self.counters.ignored += 1,
            }
            return;
        }
        // RENEWING (unicast to us) or REBINDING (broadcast): ciaddr is the address held.
        let held = req.client_ip;
        let ok = match record {
            Some(r) => r.ip == held && self.usable_by(mac, held, now_ms),
            // No record (say the server restarted): let the client keep a free pool address.
            None => self.usable_by(mac, held, now_ms),
        };
        if ok {
            self.counters.renewals += 1;
            if to_broadcast {
                self.counters.rebinds += 1;
            }
            self.ack(now_ms, req, mac, held);
        } else {
            self.nak(req, "lease not renewable");
        }
    }

    fn on_release(&mut self, req: &DhcpRepr<'_>, mac: [u8; 6]) {
        if req
            .server_identifier
            .is_some_and(|s| s != self.config.server_ip)
        {
            self.counters.ignored += 1;
            return;
        }
        match self.records.get_mut(&mac) {
            Some(r) if r.ip == req.client_ip => {
                log::info!("dhcp: {} released {}", req.client_hardware_address, r.ip);
                r.binding = Binding::Free;
                self.counters.releases += 1;
            }
            _ => self.counters.ignored += 1,
        }
    }

    fn on_decline(&mut self, now_ms: u64, req: &DhcpRepr<'_>, mac: [u8; 6]) {
        self.counters.declines += 1;
        if req
            .server_identifier
            .is_some_and(|s| s != self.config.server_ip)
        {
            return;
        }
        let Some(ip) = req.requested_ip else { return };
        log::warn!(
            "dhcp: {} declined {} (in use)",
            req.client_hardware_address,
            ip
        );
        if self.records.get(&mac).is_some_and(|r| r.ip == ip) {
            self.records.remove(&mac);
        }
        let until = now_ms + u64::from(self.config.lease_secs) * 1000;
        self.declined.insert(u32_of(ip), until);
    }

    fn on_inform(&mut self, req: &DhcpRepr<'_>) {
        if req.client_ip.is_unspecified() {
            self.counters.ignored += 1;
            return;
        }
        self.counters.informs += 1;
        self.counters.acks += 1;
        self.reply(req, DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED, false);
    }

    fn ack(&mut self, now_ms: u64, req: &DhcpRepr<'_>, mac: [u8; 6], ip: Ipv4Addr) {
        let expires_ms = now_ms + u64::from(self.config.lease_secs) * 1000;
        self.assign(mac, ip, Binding::Bound { expires_ms });
        log::info!(
            "dhcp: {} bound to {} until {expires_ms} ms",
            req.client_hardware_address,
            ip
        );
        self.counters.acks += 1;
        self.reply(req, DhcpMessageType::Ack, ip, true);
    }

    fn nak(&mut self, req: &DhcpRepr<'_>, why: &str) {
        log::info!("dhcp: NAK to {}: {why}", req.client_hardware_address);
        self.counters.naks += 1;
        self.reply(req, DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED, false);
    }

    /// Builds and queues a reply to `req` (RFC 2131 table 3 for the fields, 4.1 for where
    /// it goes).
    fn reply(&mut self, req: &DhcpRepr<'_>, kind: DhcpMessageType, your_ip: Ipv4Addr, lease: bool) {
        let nak = kind == DhcpMessageType::Nak;
        let lease_secs = self.config.lease_secs;
        let t1 = (lease_secs / 2).to_be_bytes();
        let t2 = ((u64::from(lease_secs) * 7 / 8) as u32).to_be_bytes();
        let dns: Vec<u8> = self
            .config
            .dns
            .iter()
            .take(63)
            .flat_map(|a| a.octets())
            .collect();
        let mut extra = Vec::new();
        if !nak && !dns.is_empty() {
            extra.push(DhcpOption {
                kind: OPT_DOMAIN_NAME_SERVER,
                data: &dns,
            });
        }
        if lease {
            extra.push(DhcpOption {
                kind: OPT_RENEWAL_TIME,
                data: &t1,
            });
            extra.push(DhcpOption {
                kind: OPT_REBINDING_TIME,
                data: &t2,
            });
        }
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip: if kind == DhcpMessageType::Ack {
                req.client_ip
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            your_ip,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: if nak { None } else { self.config.router },
            subnet_mask: (!nak).then(|| self.subnet_mask()),
            relay_agent_ip: req.relay_agent_ip,
            broadcast: req.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.config.server_ip),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: lease.then_some(lease_secs),
            renew_duration: None,
            rebind_duration: None,
            additional_options: &extra,
        };
        let client_mac = req.client_hardware_address.0;
        let (dst_mac, dst_ip) = if nak {
            (BROADCAST_MAC, Ipv4Addr::BROADCAST)
        } else if !req.client_ip.is_unspecified() {
            (client_mac, req.client_ip)
        } else if req.broadcast {
            (BROADCAST_MAC, Ipv4Addr::BROADCAST)
        } else {
            (client_mac, your_ip)
        };
        log::debug!(
            "dhcp: {kind:?} {your_ip} to {dst_ip} xid {:#x}",
            req.transaction_id
        );
        match self.frame(&repr, dst_mac, dst_ip) {
            Some(frame) => self.out.push_back(frame),
            None => log::error!("dhcp: could not encode {kind:?}"),
        }
    }

    /// An Ethernet/IPv4/UDP frame from the server carrying `repr`.
    fn frame(&self, repr: &DhcpRepr<'_>, dst_mac: [u8; 6], dst_ip: Ipv4Addr) -> Option<Vec<u8>> {
        let caps = ChecksumCapabilities::default();
        let dhcp_len = repr.buffer_len().max(MIN_DHCP_LEN);
        let udp_len = 8 + dhcp_len;
        let mut frame = vec![0; 14 + 20 + udp_len];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.config.mac),
            dst_addr: EthernetAddress(dst_mac),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let ip = Ipv4Repr {
            src_addr: self.config.server_ip,
            dst_addr: dst_ip,
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: 64,
        };
        let mut ip_packet = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut ip_packet, &caps);
        let mut udp = UdpPacket::new_unchecked(ip_packet.payload_mut());
        let mut encoded = false;
        UdpRepr {
            src_port: DHCP_SERVER_PORT,
            dst_port: DHCP_CLIENT_PORT,
        }
        .emit(
            &mut udp,
            &ip.src_addr.into(),
            &ip.dst_addr.into(),
            dhcp_len,
            |payload| encoded = repr.emit(&mut DhcpPacket::new_unchecked(payload)).is_ok(),
            &caps,
        );
        encoded.then_some(frame)
    }
}

impl Endpoint for DhcpServer {
    fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    fn receive(&mut self, now_ms: u64, frame: &[u8]) {
        self.expire(now_ms);
        if let Err(Garbage(why)) = self.handle_frame(now_ms, frame) {
            self.counters.garbage += 1;
            log::debug!("dhcp: dropped a {}-byte frame: {why}", frame.len());
        }
    }

    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        self.expire(now_ms);
        while let Some(frame) = self.out.pop_front() {
            out(&frame);
        }
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        if self.out.is_empty() {
            // Wake at the next expiry so `leases()` stays current.
            self.next_expiry()
        } else {
            Some(now_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(pool_start: Ipv4Addr, pool_size: u32, prefix_len: u8) -> DhcpServer {
        DhcpServer::new(DhcpServerConfig {
            mac: [2, 0, 0, 0, 0, 1],
            server_ip: Ipv4Addr::new(192, 168, 7, 2),
            prefix_len,
            pool_start,
            pool_size,
            router: None,
            dns: Vec::new(),
            lease_secs: 60,
        })
    }

    #[test]
    fn pool_skips_network_broadcast_and_server_addresses() {
        let s = server(Ipv4Addr::new(192, 168, 7, 0), 300, 24);
        let usable: Vec<Ipv4Addr> = (0..300u32)
            .map(|k| Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 7, 0)) + k))
            .filter(|&ip| s.in_pool(ip))
            .collect();
        // .0 (network), .2 (server), .255 (broadcast) and everything past the subnet are out.
        assert_eq!(usable.len(), 253);
        assert_eq!(usable[0], Ipv4Addr::new(192, 168, 7, 1));
        assert_eq!(usable[1], Ipv4Addr::new(192, 168, 7, 3));
        assert_eq!(*usable.last().unwrap(), Ipv4Addr::new(192, 168, 7, 254));
        assert_eq!(s.subnet_mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.subnet_broadcast(), Ipv4Addr::new(192, 168, 7, 255));
    }

    #[test]
    fn allocation_prefers_own_then_requested_then_unused() {
        let mut s = server(Ipv4Addr::new(192, 168, 7, 10), 3, 24);
        let (a, b, c) = (
            [2, 0, 0, 0, 0, 0xa],
            [2, 0, 0, 0, 0, 0xb],
            [2, 0, 0, 0, 0, 0xc],
        );
        let ip = |n| Ipv4Addr::new(192, 168, 7, n);
        assert_eq!(s.allocate(a, Some(ip(12)), 0), Some(ip(12)));
        s.assign(a, ip(12), Binding::Bound { expires_ms: 1000 });
        assert_eq!(
            s.allocate(a, Some(ip(10)), 0),
            Some(ip(12)),
            "own address first"
        );
        assert_eq!(
            s.allocate(b, Some(ip(12)), 0),
            Some(ip(10)),
            "taken: first unused"
        );
        s.assign(b, ip(10), Binding::Bound { expires_ms: 1000 });
        s.assign(c, ip(11), Binding::Bound { expires_ms: 2000 });
        assert_eq!(
            s.allocate([2, 0, 0, 0, 0, 0xd], None, 500),
            None,
            "pool full"
        );
        // a's lease runs out: a new client may take .12, a gets .12 back if still free.
        s.expire(1000);
        assert_eq!(s.allocate(a, None, 1000), Some(ip(12)));
        assert_eq!(s.allocate([2, 0, 0, 0, 0, 0xd], None, 1000), Some(ip(10)));
    }

    #[test]
    fn extreme_prefixes_do_not_panic() {
        for prefix_len in [0, 1, 30, 31, 32] {
            let s = server(Ipv4Addr::new(192, 168, 7, 2), 4, prefix_len);
            let _ = s.in_pool(Ipv4Addr::new(192, 168, 7, 3));
            let _ = s.subnet_broadcast();
        }
    }
}
