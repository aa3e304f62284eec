//! Simulated machines on the appliance's LAN: the "other hosts" host tests talk to.
//!
//! Every peer is an [`Endpoint`]: it takes Ethernet frames in ([`Endpoint::receive`]) and
//! hands frames out ([`Endpoint::transmit`]), so it plugs into the virtual switch, a
//! [`Hub`] or any other wire. Nothing here reads a clock or spawns a thread: the caller
//! passes the time in (milliseconds), and the same inputs always give the same frames.
//!
//! * [`DhcpServer`]: a hand-written DHCPv4 server (RFC 2131) on smoltcp's wire types, with
//!   a lease table, expiry, NAKs, RELEASE/DECLINE and counters.
//! * [`PeerHost`]: a smoltcp host with a static address that answers ARP and ping, serves
//!   TCP and UDP echo on port 7, and runs client actions for tests: ping, verified TCP echo
//!   streams, multi-port UDP flows and HTTP GETs.
//! * [`AzureFabric`]: the LAN's gateway playing Azure's host side: the WireServer
//!   (goal state, health reports) and IMDS behind it, with fault injection.
//! * [`Hub`] and [`run_until`]: a broadcast wire and an event-driven loop, so peers can be
//!   tested among themselves without the switch.
//! * [`QueueDevice`]: a smoltcp `Device` over two frame queues, for tests that want their
//!   own smoltcp interface (e.g. a DHCP client) on the wire.

mod azure;
mod device;
mod dhcp;
mod flows;
mod host;
mod http;
mod hub;
mod pattern;
mod stack;

use std::cell::RefCell;
use std::rc::Rc;

pub use azure::{
    AzureFabric, AzureFabricConfig, FabricCounters, FabricFaults, FabricPath, HealthReport,
    ImdsNic, Malformation, RequestRecord, IMDS_IP, WIRESERVER_IP,
};
pub use device::QueueDevice;
pub use dhcp::{DhcpCounters, DhcpServer, DhcpServerConfig, Lease, OFFER_HOLD_MS};
pub use flows::{
    FlowId, FlowState, HttpStatus, PingStatus, TcpEchoStatus, UdpFlowsStatus, PING_INTERVAL_MS,
    PING_TIMEOUT_MS, UDP_TIMEOUT_MS,
};
pub use host::{PeerHost, PeerHostConfig, PeerHostStats, ECHO_PORT, TCP_BUFFER_SIZE};
pub use http::HttpResponse;
pub use hub::{run_until, Hub, HubStats};
pub use pattern::fill_pattern;

/// A machine on a simulated Ethernet segment, driven by frames and by the caller's clock.
///
/// The driver (a switch port, a [`Hub`]) calls [`receive`](Endpoint::receive) for every
/// frame that reaches the endpoint, [`transmit`](Endpoint::transmit) to collect what the
/// endpoint wants to send now, and [`poll_at`](Endpoint::poll_at) to learn when to call
/// `transmit` again if no frame arrives in between. Frames are whole Ethernet frames
/// (destination MAC first, no FCS). Endpoints filter by destination MAC themselves, so a
/// wire may hand them everything.
pub trait Endpoint {
    /// The endpoint's Ethernet address.
    fn mac(&self) -> [u8; 6];
    /// A frame arrived from the network.
    fn receive(&mut self, now_ms: u64, frame: &[u8]);
    /// Emit frames due now (replies, retransmissions, new requests).
    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8]));
    /// When the endpoint next wants `transmit` called even if no frame arrives (None = idle).
    /// A value at or before `now_ms` means "as soon as possible".
    fn poll_at(&self, now_ms: u64) -> Option<u64>;
}

/// An endpoint shared between a wire (which drives it) and the test (which inspects it).
pub type Shared<T> = Rc<RefCell<T>>;

/// Wraps `endpoint` for [`Hub::attach`] (or any other wire) while the test keeps a handle.
pub fn shared<T>(endpoint: T) -> Shared<T> {
    Rc::new(RefCell::new(endpoint))
}

/// The broadcast Ethernet address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
