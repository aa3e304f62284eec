//! The interface between a NIC driver and the network side.
//!
//! A driver hands each NIC it brings up to a [`NicRegistry`] while it holds the
//! configuration lock, and takes it back (again under the lock) when the NIC goes away.
//! The network side reads frames, sends frames and waits for changes through [`Nic`].
//! Everything here is single-threaded (one executor), so the trait objects are `Rc`s.

use alloc::boxed::Box;
use alloc::rc::Rc;
use core::future::Future;
use core::pin::Pin;

use hvnet_runtime::ConfigLock;

/// A boxed future borrowed from a NIC.
pub type NicFuture<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Why a frame could not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicError {
    /// No send section or ring space right now; retry after [`Nic::changed`] resolves.
    Busy,
    /// The frame is longer than the NIC's maximum frame.
    TooLong,
    /// The link is down; the frame was not sent.
    LinkDown,
    /// The NIC was removed (hot-unplugged); it will never send again.
    Removed,
}

/// Counters of one queue (one VMBus channel for netvsc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames received and handed to the network side.
    pub rx_packets: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Received frames or messages dropped as malformed or for lack of room.
    pub rx_dropped: u64,
    /// Frames sent (accepted by the host).
    pub tx_packets: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Sends refused with [`NicError::Busy`].
    pub tx_busy: u64,
    /// Sends the host completed with an error, or that failed on removal.
    pub tx_errors: u64,
}

/// One network interface card as the network side sees it. (`Any` lets diagnostics and
/// tests reach the driver's own type by upcasting an `Rc<dyn Nic>` to `Rc<dyn Any>`.)
pub trait Nic: core::any::Any {
    /// Stable identity for logs and the status endpoint (netvsc: the VMBus instance GUID).
    fn id(&self) -> alloc::string::String;
    /// The permanent MAC address.
    fn mac(&self) -> [u8; 6];
    /// The IP MTU (1500 for a standard Ethernet frame of 1514 bytes).
    fn mtu(&self) -> usize;
    /// Whether the link is up (the host's last media-state indication).
    fn link_up(&self) -> bool;
    /// Whether the NIC was removed; a removed NIC receives and sends nothing more.
    fn is_removed(&self) -> bool;
    /// Number of queues (channels) that carry traffic.
    fn queue_count(&self) -> usize;
    /// Hands up to `budget` received frames (from any queue, round robin) to `deliver`,
    /// returning each buffer to the host after `deliver` returns. Returns how many were
    /// delivered.
    fn receive(&self, budget: usize, deliver: &mut dyn FnMut(&[u8])) -> usize;
    /// Sends one Ethernet frame of `len` bytes (without FCS) that `fill` writes. The driver
    /// picks the queue from the frame's flow.
    fn transmit(&self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Result<(), NicError>;
    /// Whether [`Nic::transmit`] of a maximum-size frame would not return `Busy` now.
    fn can_transmit(&self) -> bool;
    /// Resolves once something may have changed since the last call: a frame arrived,
    /// send room freed up, the link changed, or the NIC was removed.
    fn changed(&self) -> NicFuture<'_>;
    /// Counters of queue `queue` (`0..queue_count()`); zeros for an unknown queue.
    fn queue_stats(&self, queue: usize) -> QueueStats;
}

/// Where drivers register the NICs they bring up: the network side's interface manager.
///
/// The configuration lock is the product's rtnl. A NIC probe holds it from before it
/// opens its queues until the NIC is registered; removal holds it while unregistering.
/// Sub-channel handling never takes it.
pub trait NicRegistry {
    /// What the configuration lock protects (the interface table).
    type Config;
    /// The configuration lock.
    fn config_lock(&self) -> &ConfigLock<Self::Config>;
    /// Adds `nic` as a new interface; called with the lock held.
    fn register(&self, config: &mut Self::Config, nic: Rc<dyn Nic>);
    /// Removes the interface for `nic` (matched by `Rc::ptr_eq`); called with the lock
    /// held. Unknown NICs are ignored.
    fn unregister(&self, config: &mut Self::Config, nic: &Rc<dyn Nic>);
}
