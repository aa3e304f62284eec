//! One offered channel: its state, the replies the host owes it, the resources it owns
//! (GPADL buffers, ring), and the handles drivers use ([`Device`], [`OpenedChannel`]).
//!
//! Every wait on a channel races against its rescind: the message task, on
//! RESCINDCHANNEL, sets [`ChannelState::rescinded`] and completes every pending reply with
//! [`ChannelError::Rescinded`], so no task is left waiting for an answer the host will
//! never send.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::future::Future;
use core::pin::Pin;

use hvnet_runtime::sync::Event;
use hvnet_wire::vmbus::{Guid, OfferChannel};

use crate::memory::{MemoryError, SharedBuffer};
use crate::ring::RingError;

/// A boxed, non-`Send` future (everything here runs on one CPU's executor).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Why a channel operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// The host rescinded the channel; it will not answer anything more.
    Rescinded,
    /// The host answered with a failure status (OPENCHANNEL_RESULT, GPADL_CREATED).
    HostStatus(u32),
    /// Posting the message failed (hypercall status).
    Post(u16),
    /// No memory for rings or buffers.
    OutOfMemory,
    /// A buffer is too large to describe by one GPADL, or otherwise invalid.
    InvalidBuffer,
    /// The channel is not in the state the operation needs (e.g. send before open).
    WrongState,
    /// Ring-buffer failure (full, or the host corrupted it).
    Ring(RingError),
    /// No reply within the allowed time.
    Timeout,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rescinded => f.write_str("channel rescinded by the host"),
            Self::HostStatus(s) => write!(f, "host returned status {s:#x}"),
            Self::Post(s) => write!(f, "HvPostMessage failed with status {s:#x}"),
            Self::OutOfMemory => f.write_str("out of host-visible memory"),
            Self::InvalidBuffer => f.write_str("buffer cannot be described by a GPADL"),
            Self::WrongState => f.write_str("channel is not in the required state"),
            Self::Ring(e) => write!(f, "ring buffer: {e:?}"),
            Self::Timeout => f.write_str("timed out waiting for the host"),
        }
    }
}

impl From<MemoryError> for ChannelError {
    fn from(_: MemoryError) -> Self {
        Self::OutOfMemory
    }
}

impl From<RingError> for ChannelError {
    fn from(e: RingError) -> Self {
        Self::Ring(e)
    }
}

/// A reply the host owes: filled once by the message task (or by rescind), awaited once.
pub(crate) struct Reply<T> {
    slot: RefCell<Option<Result<T, ChannelError>>>,
    done: Event,
}

impl<T> Reply<T> {
    pub(crate) fn new(name: &'static str) -> Rc<Self> {
        Rc::new(Self {
            slot: RefCell::new(None),
            done: Event::named(name),
        })
    }

    /// Stores the first answer; later ones are ignored (the first one wins, so a rescind
    /// racing a real reply cannot overwrite it).
    pub(crate) fn complete(&self, value: Result<T, ChannelError>) {
        let mut slot = self.slot.borrow_mut();
        if slot.is_none() && !self.done.is_set() {
            *slot = Some(value);
            drop(slot);
            self.done.set();
        }
    }

    pub(crate) async fn wait(&self) -> Result<T, ChannelError> {
        self.done.wait().await;
        self.slot
            .borrow_mut()
            .take()
            .unwrap_or(Err(ChannelError::WrongState))
    }
}

/// Where a channel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Offered; no driver has opened it.
    Offered,
    /// OPENCHANNEL sent, result pending.
    Opening,
    /// Open: rings live.
    Open,
    /// Closed by the driver (may be reopened).
    Closed,
}

/// Handler a primary's driver installs for its sub-channels (runs on the sub-channel
/// worker; must never take the config lock).
pub type SubchannelHandler = Rc<dyn Fn(Device) -> BoxFuture<'static, ()>>;

/// What a driver leaves behind after a successful probe: called when the device goes away.
pub trait DeviceInstance {
    /// The host rescinded the device: stop using it and release what the driver holds
    /// (may take the config lock). Runs after the probe has finished.
    fn remove(&self) -> BoxFuture<'static, ()>;

    /// One of the device's sub-channels was rescinded (its rings are closed next).
    fn subchannel_removed(&self, _sub_channel_index: u16) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The per-channel record shared by the bus, its tasks and the driver's handles.
pub struct ChannelState {
    pub(crate) relid: u32,
    pub(crate) offer: OfferChannel,
    pub(crate) lifecycle: Cell<Lifecycle>,
    rescinded: Cell<bool>,
    rescind_event: Event,
    /// Set when the probe (primary) or the sub-channel hand-off (sub-channel) has finished,
    /// successfully or not. The rescind task waits for it.
    pub(crate) probe_done: Event,
    pub(crate) open_reply: RefCell<Option<Rc<Reply<()>>>>,
    /// GPADL creations in flight: handle -> reply.
    pub(crate) gpadl_pending: RefCell<BTreeMap<u32, Rc<Reply<()>>>>,
    /// GPADL teardowns in flight: handle -> reply.
    pub(crate) teardown_pending: RefCell<BTreeMap<u32, Rc<Reply<()>>>>,
    /// Established GPADLs and the memory they describe (shared with the driver).
    pub(crate) gpadls: RefCell<BTreeMap<u32, Rc<dyn SharedBuffer>>>,
    /// The ring GPADL while open.
    pub(crate) ring_gpadl: Cell<Option<u32>>,
    pub(crate) ring: RefCell<Option<Rc<crate::ring::RingPair>>>,
    /// Set by the event path when the host signalled this channel.
    pub(crate) data_event: Event,
    pub(crate) target_vp: Cell<u32>,
    pub(crate) instance: RefCell<Option<Rc<dyn DeviceInstance>>>,
    pub(crate) subchannel_handler: RefCell<Option<SubchannelHandler>>,
    pub(crate) released: Cell<bool>,
}

impl ChannelState {
    pub(crate) fn new(offer: OfferChannel) -> Rc<Self> {
        Rc::new(Self {
            relid: offer.child_relid.get(),
            offer,
            lifecycle: Cell::new(Lifecycle::Offered),
            rescinded: Cell::new(false),
            rescind_event: Event::named("channel rescind"),
            probe_done: Event::named("probe_done"),
            open_reply: RefCell::new(None),
            gpadl_pending: RefCell::new(BTreeMap::new()),
            teardown_pending: RefCell::new(BTreeMap::new()),
            gpadls: RefCell::new(BTreeMap::new()),
            ring_gpadl: Cell::new(None),
            ring: RefCell::new(None),
            data_event: Event::named("channel data"),
            target_vp: Cell::new(0),
            instance: RefCell::new(None),
            subchannel_handler: RefCell::new(None),
            released: Cell::new(false),
        })
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// Class GUID.
    pub fn class_id(&self) -> Guid {
        self.offer.offer.if_type
    }

    /// Instance GUID (shared by a primary and its sub-channels).
    pub fn instance_id(&self) -> Guid {
        self.offer.offer.if_instance
    }

    /// 0 for a primary.
    pub fn sub_channel_index(&self) -> u16 {
        self.offer.sub_channel_index()
    }

    /// Whether the host rescinded the channel.
    pub fn is_rescinded(&self) -> bool {
        self.rescinded.get()
    }

    /// Completes when the channel is rescinded.
    pub async fn rescinded(&self) {
        self.rescind_event.wait().await
    }

    /// Marks the channel rescinded and fails every wait on it at once. Called by the
    /// message task; never awaits.
    pub(crate) fn mark_rescinded(&self) {
        self.rescinded.set(true);
        self.rescind_event.set();
        if let Some(r) = self.open_reply.borrow_mut().take() {
            r.complete(Err(ChannelError::Rescinded));
        }
        for (_, r) in core::mem::take(&mut *self.gpadl_pending.borrow_mut()) {
            r.complete(Err(ChannelError::Rescinded));
        }
        for (_, r) in core::mem::take(&mut *self.teardown_pending.borrow_mut()) {
            r.complete(Err(ChannelError::Rescinded));
        }
        // Wake readers so they see the rescind.
        self.data_event.set();
    }

    /// Runs `f`, failing with `Rescinded` as soon as the channel is rescinded.
    pub async fn or_rescind<T>(
        &self,
        f: impl Future<Output = Result<T, ChannelError>>,
    ) -> Result<T, ChannelError> {
        if self.is_rescinded() {
            return Err(ChannelError::Rescinded);
        }
        match crate::race::race(f, self.rescinded()).await {
            crate::race::Either::Left(r) => r,
            crate::race::Either::Right(()) => Err(ChannelError::Rescinded),
        }
    }
}

pub use crate::bus::{Device, OpenedChannel};
