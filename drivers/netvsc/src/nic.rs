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

/// The future of [`Nic::set_mtu`].
pub type MtuFuture<'a> = Pin<Box<dyn Future<Output = Result<(), MtuError>> + 'a>>;

/// The smallest IP MTU a NIC accepts (IPv4's minimum, as Linux's `ETH_MIN_MTU`).
pub const MIN_MTU: usize = 68;

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

/// Why an MTU change was refused or did not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtuError {
    /// The MTU is outside what the NIC and its host allow; nothing changed.
    OutOfRange {
        /// The MTU asked for.
        mtu: usize,
        /// The smallest allowed ([`MIN_MTU`]).
        min: usize,
        /// The largest allowed ([`Nic::max_mtu`]).
        max: usize,
    },
    /// This NIC cannot change its MTU at run time; nothing changed.
    Unsupported,
    /// Another MTU change is in progress; nothing changed.
    Busy,
    /// The NIC was removed before or during the change.
    Removed,
    /// The host did not take the new MTU. `restored` is the MTU the NIC runs with again,
    /// or `None` if it could not be brought back and stays down.
    Failed {
        /// The MTU in effect now, if the NIC is up.
        restored: Option<usize>,
    },
}

impl core::fmt::Display for MtuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange { mtu, min, max } => {
                write!(f, "MTU {mtu} is outside the allowed range {min}..={max}")
            }
            Self::Unsupported => f.write_str("the NIC cannot change its MTU"),
            Self::Busy => f.write_str("another MTU change is in progress"),
            Self::Removed => f.write_str("the NIC was removed"),
            Self::Failed {
                restored: Some(mtu),
            } => write!(f, "the host did not take the new MTU; back to MTU {mtu}"),
            Self::Failed { restored: None } => {
                f.write_str("the host did not take the new MTU and the NIC could not be restored")
            }
        }
    }
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
    /// Opens a batch: until [`Nic::end_batch`] the driver may hold back what it owes
    /// the host - sends not yet made visible, completions of received frames, the
    /// consumed ring space - so that a whole poll's worth costs one publication and at
    /// most one signal per queue instead of one per frame (Linux's `xmit_more` and the
    /// NAPI poll's single completion flush). The network side opens one at the start of
    /// every poll of the interface and ends it before it waits. Without one, every
    /// `receive` and `transmit` reaches the host before it returns.
    ///
    /// A driver that defers must still be safe if a batch is never ended: it flushes
    /// before [`Nic::changed`] waits, and it bounds how much it holds back.
    fn begin_batch(&self) {}
    /// Ends the batch [`Nic::begin_batch`] opened: everything held back reaches the host
    /// now, with at most one signal per queue. Harmless without an open batch.
    fn end_batch(&self) {}
    /// Resolves once something may have changed since the last call: a frame arrived,
    /// send room freed up, the link changed, or the NIC was removed.
    fn changed(&self) -> NicFuture<'_>;
    /// Counters of queue `queue` (`0..queue_count()`); zeros for an unknown queue.
    fn queue_stats(&self, queue: usize) -> QueueStats;
    /// The largest IP MTU [`Nic::set_mtu`] accepts.
    fn max_mtu(&self) -> usize {
        self.mtu()
    }
    /// Changes the IP MTU to `mtu` ([`MIN_MTU`]`..=`[`Nic::max_mtu`]). The MTU is
    /// configuration: call this with the configuration lock held. While the change runs
    /// the NIC's queues are stopped ([`Nic::transmit`] says `Busy`, nothing is received);
    /// afterwards [`Nic::mtu`] is the new value and [`Nic::changed`] resolves. NICs that
    /// cannot change it accept only their current MTU.
    fn set_mtu(&self, mtu: usize) -> MtuFuture<'_> {
        let current = self.mtu();
        alloc::boxed::Box::pin(async move {
            if mtu == current {
                Ok(())
            } else {
                Err(MtuError::Unsupported)
            }
        })
    }
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
