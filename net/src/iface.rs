//! One network interface: a smoltcp [`Interface`](smoltcp::iface::Interface), its
//! sockets, the [`NicDevice`] under it, its IPv4 configuration and its services.
//!
//! [`Interface`] is synchronous: [`Interface::poll`] does all the work that is due at
//! `now` and [`Interface::poll_delay`] says when to call it again. The async shell that
//! waits in between is the interface task in [`manager`](crate::manager); keeping the
//! logic here means it can be driven step by step.
//!
//! # Addresses
//! With [`Addressing::Dhcp`] a DHCPv4 client socket runs on the interface. A lease is
//! applied as it arrives: the address with its prefix, the default route through the
//! router, the DNS servers (kept for whoever needs them). Renewal and rebinding are
//! smoltcp's; a renewal that changes nothing produces no event. When the lease is lost
//! (expired, NAK, or the link went down) the address and the route are removed. Link
//! down restarts the client, and so does link up, so a NIC moved to another network
//! asks again at once.
//!
//! ICMP echo requests to the interface's address are answered by smoltcp itself.
//!
//! # The Azure agent
//! With an [`AzureLink`] set ([`Interface::set_azure`]), the interface polls the shared
//! [`AzureAgent`](crate::azure::AzureAgent) after smoltcp, like a service; the agent
//! runs only on the interface that owns it and keeps its socket in that interface's
//! set. Dropping the interface hands the agent back (see [`azure`](crate::azure)).

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use hvnet_netvsc::nic::Nic;
use hvnet_runtime::sync::Event;
use hvnet_runtime::{Duration, Instant};
use smoltcp::iface::{
    Config, Interface as SmolInterface, PollResult as SmolPollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::dhcpv4;
use smoltcp::time::{Duration as NetDuration, Instant as NetInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::azure::AzureLink;
use crate::device::{DeviceStats, NicDevice, DEFAULT_RX_BUDGET, MAX_IP_MTU, MIN_IP_MTU};
use crate::services::echo::{EchoConfig, EchoCounters, EchoServer};
use crate::services::status::{StatusConfig, StatusCounters, StatusServer, StatusSource};

/// Egress passes one poll may run (each sends at most one packet per socket) before the
/// task yields.
pub const EGRESS_BUDGET: usize = 64;

/// Converts the runtime's clock to smoltcp's (microseconds).
pub fn to_net_instant(now: Instant) -> NetInstant {
    NetInstant::from_micros(i64::try_from(now.as_nanos() / 1000).unwrap_or(i64::MAX))
}

/// Converts a runtime duration to smoltcp's.
pub fn to_net_duration(duration: Duration) -> NetDuration {
    NetDuration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}

/// Converts a smoltcp duration to the runtime's.
pub fn from_net_duration(duration: NetDuration) -> Duration {
    Duration::from_micros(duration.total_micros())
}

/// How an interface gets its IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// DHCPv4.
    Dhcp,
    /// A fixed configuration, applied at creation.
    Static(IpConfig),
}

/// Settings of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Where the address comes from (DHCP by default).
    pub addressing: Addressing,
    /// The status endpoint (on by default).
    pub status: Option<StatusConfig>,
    /// The echo service (off by default; tests turn it on).
    pub echo: Option<EchoConfig>,
    /// smoltcp's `max_burst_size`; see [`NicDevice::new`].
    pub max_burst: Option<usize>,
    /// Frames received per poll before the task yields.
    pub rx_budget: usize,
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        InterfaceConfig {
            addressing: Addressing::Dhcp,
            status: Some(StatusConfig::default()),
            echo: None,
            max_burst: None,
            rx_budget: DEFAULT_RX_BUDGET,
        }
    }
}

/// An interface's IPv4 configuration (from a lease, or static).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// Address and prefix length.
    pub address: Ipv4Cidr,
    /// Default gateway.
    pub gateway: Option<Ipv4Address>,
    /// DNS servers.
    pub dns: Vec<Ipv4Address>,
}

/// Something that changed during a poll, for the interface table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceEvent {
    /// The link came up.
    LinkUp,
    /// The link went down.
    LinkDown,
    /// A configuration was applied (a new lease, or a renewal that changed it).
    Configured(IpConfig),
    /// The configuration was removed (lease lost).
    Deconfigured,
}

/// What a poll found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollResult {
    /// Changes, in order.
    pub events: Vec<InterfaceEvent>,
    /// The receive or send budget ran out with work possibly left: poll again soon.
    pub more: bool,
    /// smoltcp wanted to send and the NIC had no room: wait for the NIC.
    pub tx_blocked: bool,
}

/// One interface. See the [module docs](self).
pub struct Interface {
    name: String,
    device: NicDevice,
    iface: SmolInterface,
    sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    status: Option<StatusServer>,
    echo: Option<EchoServer>,
    azure: Option<AzureLink>,
    ip: Option<IpConfig>,
    link_up: bool,
    /// Events found outside a poll (the static configuration), reported by the next.
    pending: Vec<InterfaceEvent>,
}

impl Interface {
    /// Creates the interface `name` over `nic`. `random_seed` seeds smoltcp (TCP initial
    /// sequence numbers, DHCP transaction ids, ephemeral ports): take it from the
    /// runtime's [`Handle::random_u64`](hvnet_runtime::Handle::random_u64).
    pub fn new(
        name: impl Into<String>,
        nic: Rc<dyn Nic>,
        config: &InterfaceConfig,
        now: Instant,
        random_seed: u64,
    ) -> Self {
        let name = name.into();
        let mac = nic.mac();
        let mtu = nic.mtu().clamp(MIN_IP_MTU, MAX_IP_MTU);
        let link_up = nic.link_up();
        let mut device = NicDevice::new(nic, config.max_burst);
        device.set_rx_budget(config.rx_budget);
        let mut smol_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        smol_config.random_seed = random_seed;
        let iface = SmolInterface::new(smol_config, &mut device, to_net_instant(now));
        let mut sockets = SocketSet::new(vec![]);
        let dhcp = match config.addressing {
            Addressing::Dhcp => Some(sockets.add(dhcpv4::Socket::new())),
            Addressing::Static(_) => None,
        };
        let status = config
            .status
            .as_ref()
            .map(|c| StatusServer::new(c, &mut sockets));
        let echo = config
            .echo
            .as_ref()
            .map(|c| EchoServer::new(c, mtu, &mut sockets));
        let mut interface = Interface {
            name,
            device,
            iface,
            sockets,
            dhcp,
            status,
            echo,
            azure: None,
            ip: None,
            link_up,
            pending: Vec::new(),
        };
        if let Addressing::Static(ip) = &config.addressing {
            if interface.apply(ip.clone()) {
                interface
                    .pending
                    .push(InterfaceEvent::Configured(ip.clone()));
            }
        }
        interface
    }

    /// Lets this interface run the Azure agent (see the [module docs](self)).
    pub fn set_azure(&mut self, link: AzureLink) {
        if let Some(old) = self.azure.replace(link) {
            old.detach(&mut self.sockets);
        }
    }

    /// The event to wait on, besides the NIC and the poll delay, for the Azure agent to
    /// be handed to this interface (`None`: nothing to wait for).
    pub fn azure_claim_event(&self) -> Option<&Event> {
        self.azure
            .as_ref()
            .and_then(|link| link.claim_event(self.ip.as_ref()))
    }

    /// The name (`ethN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NIC.
    pub fn nic(&self) -> &Rc<dyn Nic> {
        self.device.nic()
    }

    /// The IPv4 configuration in force.
    pub fn ip_config(&self) -> Option<&IpConfig> {
        self.ip.as_ref()
    }

    /// The glue's counters.
    pub fn device_stats(&self) -> DeviceStats {
        self.device.stats()
    }

    /// The glue's counters' cell, readable from outside the interface's task.
    pub fn shared_device_stats(&self) -> Rc<Cell<DeviceStats>> {
        self.device.shared_stats()
    }

    /// The status server's counters (zeros when it is off).
    pub fn status_counters(&self) -> StatusCounters {
        self.status
            .as_ref()
            .map(StatusServer::counters)
            .unwrap_or_default()
    }

    /// The echo service's counters (zeros when it is off).
    pub fn echo_counters(&self) -> EchoCounters {
        self.echo
            .as_ref()
            .map(EchoServer::counters)
            .unwrap_or_default()
    }

    /// Does everything due at `now`: link changes, received frames, DHCP, services,
    /// frames to send. `status` provides the status page's data when a request asks.
    pub fn poll(&mut self, now: Instant, status: &dyn StatusSource) -> PollResult {
        let mut result = PollResult {
            events: core::mem::take(&mut self.pending),
            ..PollResult::default()
        };
        let link_up = self.device.nic().link_up();
        if link_up != self.link_up {
            self.link_up = link_up;
            log::info!(
                "{}: link {}",
                self.name,
                if link_up { "up" } else { "down" }
            );
            result.events.push(if link_up {
                InterfaceEvent::LinkUp
            } else {
                InterfaceEvent::LinkDown
            });
            if let Some(dhcp) = self.dhcp {
                // Down: drop the lease (a reset while bound reports Deconfigured). Up:
                // discover at once instead of waiting out the retry timer.
                self.sockets.get_mut::<dhcpv4::Socket>(dhcp).reset();
            }
        }

        let net_now = to_net_instant(now);
        self.device.begin_poll();
        self.iface
            .poll(net_now, &mut self.device, &mut self.sockets);
        self.poll_dhcp(&mut result.events);

        if let Some(link) = &self.azure {
            link.poll(
                &self.name,
                now,
                self.ip.as_ref(),
                &mut self.iface,
                &mut self.sockets,
            );
        }
        if let Some(server) = &mut self.status {
            server.poll(now, &mut self.sockets, status);
        }
        if let Some(echo) = &mut self.echo {
            echo.poll(now, &mut self.sockets);
        }
        // smoltcp sends at most one packet per socket per egress pass: run passes until
        // nothing is left, the NIC is full, or the budget is spent.
        let mut egress_left = EGRESS_BUDGET;
        while egress_left > 0 && !self.device.tx_blocked() {
            egress_left -= 1;
            let sent = self
                .iface
                .poll_egress(net_now, &mut self.device, &mut self.sockets);
            if sent == SmolPollResult::None {
                break;
            }
        }
        self.device.end_poll();
        result.more = self.device.rx_budget_spent() || egress_left == 0;
        result.tx_blocked = self.device.tx_blocked();
        result
    }

    /// How long until [`poll`](Self::poll) is due again (`None`: only when the NIC
    /// changes). Zero means at once.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let smol = self
            .iface
            .poll_delay(to_net_instant(now), &self.sockets)
            .map(from_net_duration);
        let services = [
            self.status.as_ref().and_then(StatusServer::next_deadline),
            self.echo.as_ref().and_then(EchoServer::next_deadline),
            self.azure.as_ref().and_then(AzureLink::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|deadline| deadline.saturating_duration_since(now));
        match (smol, services) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_dhcp(&mut self, events: &mut Vec<InterfaceEvent>) {
        let Some(handle) = self.dhcp else {
            return;
        };
        let event = match self.sockets.get_mut::<dhcpv4::Socket>(handle).poll() {
            None => return,
            Some(dhcpv4::Event::Configured(lease)) => Some(IpConfig {
                address: lease.address,
                gateway: lease.router,
                dns: lease.dns_servers.iter().copied().collect(),
            }),
            Some(dhcpv4::Event::Deconfigured) => None,
        };
        match event {
            Some(ip) => {
                log::info!(
                    "{}: lease acquired: {} gateway {:?} dns {:?}",
                    self.name,
                    ip.address,
                    ip.gateway,
                    ip.dns
                );
                if self.apply(ip.clone()) {
                    events.push(InterfaceEvent::Configured(ip));
                }
            }
            None => {
                if self.ip.is_some() {
                    log::info!("{}: lease lost", self.name);
                    self.unapply();
                    events.push(InterfaceEvent::Deconfigured);
                }
            }
        }
    }

    /// Puts `ip` into smoltcp. Refuses (and keeps the old one) a configuration that
    /// smoltcp would panic on: the address comes from the network.
    fn apply(&mut self, ip: IpConfig) -> bool {
        let address = ip.address.address();
        if address.is_broadcast()
            || address.is_multicast()
            || address.is_unspecified()
            || ip.address.prefix_len() > 32
        {
            log::warn!("{}: refusing address {}", self.name, ip.address);
            return false;
        }
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            // Capacity is at least one address.
            let _ = addrs.push(IpCidr::Ipv4(ip.address));
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        if let Some(gateway) = ip.gateway {
            if let Err(error) = routes.add_default_ipv4_route(gateway) {
                log::warn!("{}: no default route via {gateway}: {error:?}", self.name);
            }
        }
        self.ip = Some(ip);
        true
    }

    fn unapply(&mut self) {
        self.iface.update_ip_addrs(|addrs| addrs.clear());
        self.iface.routes_mut().remove_default_ipv4_route();
        self.ip = None;
    }
}

impl Drop for Interface {
    /// An interface that goes (NIC removed or unregistered) hands the Azure agent back
    /// so another can take it over.
    fn drop(&mut self) {
        if let Some(link) = self.azure.take() {
            link.detach(&mut self.sockets);
        }
    }
}
