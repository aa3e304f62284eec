//! The VMBus connection: version negotiation, the message task, offer classification, the
//! two offer workers, rescind, and the device handles drivers use.
//!
//! # Who runs what
//! - The **message task** takes host messages from the SynIC, decodes and validates them,
//!   records their effect in the channel table and hands work off. It never awaits
//!   anything that needs another host message (a worker, a probe, `probe_done`): a rescind
//!   must always be processed, or an open waiting for a result the host will never send
//!   blocks the very rescind that would fail it.
//! - The **primary worker** runs new primary channels' probes, one at a time, in offer order.
//!   A probe may take the config lock and wait (holding it) for its sub-channels.
//! - The **sub-channel worker** hands sub-channel offers to their primary's handler, which
//!   opens them. It never takes the config lock, so it can always make progress while
//!   probes hold it: several multi-queue NICs hot-plugged at once cannot deadlock.
//! - A **rescind task** per rescinded channel waits for `probe_done`, lets the driver
//!   remove the device, closes the channel, gives back its GPADLs and memory, and sends
//!   RELID_RELEASED exactly once.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;

use hvnet_runtime::sync::Event;
use hvnet_runtime::{ConfigLock, Handle, Worker};
use hvnet_wire::synic::HvMessageType;
use hvnet_wire::vmbus::{
    encode_body, ChannelMessage, ChannelMessageBuf, CloseChannel, GpadlTeardown, Guid,
    InitiateContact, OfferChannel, OpenChannel, RelidReleased, VersionResponse, VmbusVersion,
    INVALID_RELID, VMBUS_GUEST_VERSIONS, VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_SINT,
};
use log::{debug, info, trace, warn};

use crate::channel::{
    BoxFuture, ChannelError, ChannelState, DeviceInstance, Lifecycle, Reply, SubchannelHandler,
};
use crate::memory::{DmaAllocator, SharedBuffer, PAGE_SIZE};
use crate::platform::{HvStatus, Hypervisor};
use crate::ring::RingPair;

/// A driver for one device class.
pub trait Driver {
    /// For logs.
    fn name(&self) -> &'static str;
    /// The class GUID of the devices it drives.
    fn class_id(&self) -> Guid;
    /// Brings a newly offered primary channel up (on the primary worker). On success the
    /// returned instance is told when the device is removed.
    fn probe(
        &self,
        device: Device,
    ) -> BoxFuture<'static, Result<Rc<dyn DeviceInstance>, ChannelError>>;
}

/// Tunables (defaults suit the appliance; tests change them).
#[derive(Clone, Debug)]
pub struct VmBusConfig {
    /// Versions to offer, newest first.
    pub versions: Vec<VmbusVersion>,
    /// How long to wait for VERSION_RESPONSE to each INITIATE_CONTACT.
    pub contact_timeout: Duration,
    /// How long to wait for ALLOFFERS_DELIVERED.
    pub offers_timeout: Duration,
    /// Test only: run sub-channel offers on the primary worker, as Linux did before the
    /// two-workqueue fix. This reintroduces the deadlock the design prevents; it exists so
    /// tests can show the watchdog catches it.
    pub single_worker: bool,
}

impl Default for VmBusConfig {
    fn default() -> Self {
        Self {
            versions: VMBUS_GUEST_VERSIONS.to_vec(),
            contact_timeout: Duration::from_secs(1),
            offers_timeout: Duration::from_secs(10),
            single_worker: false,
        }
    }
}

/// Why connecting failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// No offered version was accepted.
    NoCommonVersion,
    /// Memory for the connection pages could not be allocated.
    OutOfMemory,
}

/// Counters, for tests and the status endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    pub messages: u64,
    pub bad_messages: u64,
    pub offers: u64,
    pub duplicate_offers: u64,
    pub rescinds: u64,
    pub relids_released: u64,
    pub probes_failed: u64,
    pub orphan_subchannels: u64,
}

struct Connection {
    version: VmbusVersion,
    msg_conn_id: u32,
}

struct BusInner {
    handle: Handle,
    hv: Rc<dyn Hypervisor>,
    mem: Rc<dyn DmaAllocator>,
    config: VmBusConfig,
    connection: RefCell<Option<Connection>>,
    contact_reply: RefCell<Option<Rc<Reply<VersionResponse>>>>,
    offers_delivered: Event,
    unload_done: Event,
    channels: RefCell<BTreeMap<u32, Rc<ChannelState>>>,
    /// Instance GUID bytes -> relid of the live primary.
    primaries: RefCell<BTreeMap<[u8; 16], u32>>,
    drivers: RefCell<Vec<Rc<dyn Driver>>>,
    primary_worker: Worker,
    subchannel_worker: Worker,
    /// CPU (target VP) assignment, shared by both workers: its own lock, never the config
    /// lock (Linux `init_vp_index` got one for the same reason).
    cpu_assignment: ConfigLock<u32>,
    next_gpadl: Cell<u32>,
    /// The pre-5.0 interrupt page and the two monitor pages, kept for the connection's life.
    connection_pages: RefCell<Vec<Box<dyn SharedBuffer>>>,
    stats: RefCell<BusStats>,
}

impl Drop for BusInner {
    /// Channels hold their driver's instance, which holds handles on those channels:
    /// break those cycles so a torn-down bus frees everything.
    fn drop(&mut self) {
        for ch in self.channels.borrow().values() {
            ch.instance.borrow_mut().take();
            ch.subchannel_handler.borrow_mut().take();
            ch.ring.borrow_mut().take();
        }
    }
}

/// The guest's VMBus. Cheap to clone.
#[derive(Clone)]
pub struct VmBus {
    inner: Rc<BusInner>,
}

fn guid_key(g: &Guid) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(zerocopy::IntoBytes::as_bytes(g));
    k
}

impl VmBus {
    /// Creates the bus and starts its message task. Register drivers, then [`connect`](Self::connect).
    pub fn new(
        handle: &Handle,
        hv: Rc<dyn Hypervisor>,
        mem: Rc<dyn DmaAllocator>,
        config: VmBusConfig,
    ) -> Self {
        let primary_worker = Worker::new(handle, "vmbus primary");
        let subchannel_worker = if config.single_worker {
            primary_worker.clone()
        } else {
            Worker::new(handle, "vmbus subchannel")
        };
        let bus = VmBus {
            inner: Rc::new(BusInner {
                handle: handle.clone(),
                hv,
                mem,
                config,
                connection: RefCell::new(None),
                contact_reply: RefCell::new(None),
                offers_delivered: Event::named("ALLOFFERS_DELIVERED"),
                unload_done: Event::named("UNLOAD_RESPONSE"),
                channels: RefCell::new(BTreeMap::new()),
                primaries: RefCell::new(BTreeMap::new()),
                drivers: RefCell::new(Vec::new()),
                primary_worker,
                subchannel_worker,
                cpu_assignment: ConfigLock::new("vmbus cpu assignment", 0),
                next_gpadl: Cell::new(0xe1e1_0000),
                connection_pages: RefCell::new(Vec::new()),
                stats: RefCell::new(BusStats::default()),
            }),
        };
        let task_bus = bus.clone();
        handle.spawn(
            "vmbus messages",
            async move { task_bus.message_loop().await },
        );
        bus
    }

    /// Registers a driver; offers of its class that arrive later are probed with it.
    pub fn register_driver(&self, driver: Rc<dyn Driver>) {
        self.inner.drivers.borrow_mut().push(driver);
    }

    /// The runtime handle the bus runs on.
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// The allocator of host-visible memory (drivers allocate their GPADL buffers from it).
    pub fn allocator(&self) -> &Rc<dyn DmaAllocator> {
        &self.inner.mem
    }

    /// Counters.
    pub fn stats(&self) -> BusStats {
        *self.inner.stats.borrow()
    }

    /// The negotiated version, once connected.
    pub fn version(&self) -> Option<VmbusVersion> {
        self.inner.connection.borrow().as_ref().map(|c| c.version)
    }

    /// Relids of the channels the guest still holds (offered and not yet released).
    pub fn live_relids(&self) -> Vec<u32> {
        self.inner.channels.borrow().keys().copied().collect()
    }

    /// Number of established GPADLs over all channels.
    pub fn live_gpadls(&self) -> usize {
        self.inner
            .channels
            .borrow()
            .values()
            .map(|c| c.gpadls.borrow().len())
            .sum()
    }

    /// Waits until both workers have nothing queued or running.
    pub async fn settle(&self) {
        loop {
            self.inner.primary_worker.flush().await;
            self.inner.subchannel_worker.flush().await;
            if self.inner.primary_worker.is_idle() && self.inner.subchannel_worker.is_idle() {
                return;
            }
        }
    }

    /// Negotiates a version (newest first), then requests offers and waits (bounded) for
    /// ALLOFFERS_DELIVERED.
    pub async fn connect(&self) -> Result<VmbusVersion, ConnectError> {
        let inner = &self.inner;
        if inner.connection_pages.borrow().is_empty() {
            for _ in 0..3 {
                let page = inner.mem.alloc(1).map_err(|_| ConnectError::OutOfMemory)?;
                inner.connection_pages.borrow_mut().push(page);
            }
        }
        let (int_page, mon1, mon2) = {
            let p = inner.connection_pages.borrow();
            (
                p[0].pfn(0) * PAGE_SIZE as u64,
                p[1].pfn(0) * PAGE_SIZE as u64,
                p[2].pfn(0) * PAGE_SIZE as u64,
            )
        };
        let versions = inner.config.versions.clone();
        for version in versions {
            let msg = encode_body(&InitiateContact::new(
                version,
                inner.hv.vp_index(),
                VMBUS_MESSAGE_SINT,
                0,
                int_page,
                mon1,
                mon2,
            ));
            let reply = Reply::new("VERSION_RESPONSE");
            *inner.contact_reply.borrow_mut() = Some(reply.clone());
            let conn_id = version.initiate_contact_connection_id();
            if let Err(e) = self.post_on(conn_id, &msg).await {
                debug!("vmbus: INITIATE_CONTACT {version} on connection {conn_id} refused ({e}); trying older");
                continue;
            }
            let answer = inner
                .handle
                .timeout(inner.config.contact_timeout, reply.wait())
                .await;
            *inner.contact_reply.borrow_mut() = None;
            match answer {
                Ok(Ok(resp)) if resp.supported() => {
                    let msg_conn_id = if version.uses_msg_sint() {
                        resp.msg_conn_id.get()
                    } else {
                        VMBUS_MESSAGE_CONNECTION_ID
                    };
                    info!(
                        "vmbus: connected, version {version}, message connection id {msg_conn_id}"
                    );
                    *inner.connection.borrow_mut() = Some(Connection {
                        version,
                        msg_conn_id,
                    });
                    break;
                }
                Ok(Ok(_)) => debug!("vmbus: host declined version {version}"),
                Ok(Err(e)) => debug!("vmbus: version {version}: {e}"),
                Err(_) => warn!("vmbus: no VERSION_RESPONSE for {version}; trying older"),
            }
        }
        let Some(version) = self.version() else {
            warn!("vmbus: the host accepted none of the offered versions");
            return Err(ConnectError::NoCommonVersion);
        };
        let posted = match ChannelMessage::RequestOffers.encode() {
            Ok(msg) => self.post(&msg).await.is_ok(),
            Err(_) => false,
        };
        if !posted {
            warn!("vmbus: REQUESTOFFERS could not be posted");
        }
        if inner
            .handle
            .timeout(inner.config.offers_timeout, inner.offers_delivered.wait())
            .await
            .is_err()
        {
            warn!(
                "vmbus: no ALLOFFERS_DELIVERED within {:?}; continuing",
                inner.config.offers_timeout
            );
        }
        Ok(version)
    }

    /// Closes every open channel and sends UNLOAD (bounded wait for the response).
    pub async fn unload(&self) {
        let channels: Vec<_> = self.inner.channels.borrow().values().cloned().collect();
        for ch in channels {
            if ch.lifecycle.get() == Lifecycle::Open {
                let _ = self
                    .post(&encode_body(&CloseChannel {
                        child_relid: ch.relid.into(),
                    }))
                    .await;
                ch.lifecycle.set(Lifecycle::Closed);
            }
        }
        if let Ok(msg) = ChannelMessage::Unload.encode() {
            if self.post(&msg).await.is_ok()
                && self
                    .inner
                    .handle
                    .timeout(Duration::from_secs(1), self.inner.unload_done.wait())
                    .await
                    .is_err()
            {
                warn!("vmbus: no UNLOAD_RESPONSE");
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Posting.

    async fn post(&self, msg: &ChannelMessageBuf) -> Result<(), ChannelError> {
        let conn = self
            .inner
            .connection
            .borrow()
            .as_ref()
            .map_or(VMBUS_MESSAGE_CONNECTION_ID, |c| c.msg_conn_id);
        self.post_on(conn, msg).await
    }

    /// HvPostMessage with retries while the host's queue is full (Linux retries too).
    async fn post_on(
        &self,
        connection_id: u32,
        msg: &ChannelMessageBuf,
    ) -> Result<(), ChannelError> {
        let mut delay = Duration::from_micros(100);
        for _ in 0..20 {
            match self
                .inner
                .hv
                .post_message(connection_id, HvMessageType::VMBUS.0, msg.as_bytes())
            {
                Ok(()) => return Ok(()),
                Err(HvStatus::INSUFFICIENT_BUFFERS) => {
                    self.inner.handle.sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(20));
                }
                Err(HvStatus(s)) => return Err(ChannelError::Post(s)),
            }
        }
        Err(ChannelError::Post(HvStatus::INSUFFICIENT_BUFFERS.0))
    }

    // ---------------------------------------------------------------------------------
    // The message task.

    async fn message_loop(self) {
        let signal = self.inner.hv.interrupt();
        loop {
            while let Some(m) = self.inner.hv.take_message() {
                self.handle_synic_message(&m);
            }
            let hv = self.inner.hv.clone();
            hv.drain_events(&mut |relid| {
                if let Some(ch) = self.inner.channels.borrow().get(&relid) {
                    ch.data_event.set();
                } else {
                    trace!("vmbus: event for unknown relid {relid}");
                }
            });
            signal.wait().await;
        }
    }

    fn bad(&self, what: core::fmt::Arguments<'_>) {
        self.inner.stats.borrow_mut().bad_messages += 1;
        warn!("vmbus: dropped host message: {what}");
    }

    fn handle_synic_message(&self, m: &crate::platform::SynicMessage) {
        self.inner.stats.borrow_mut().messages += 1;
        if m.message_type != HvMessageType::VMBUS.0 {
            self.bad(format_args!("SynIC message type {:#x}", m.message_type));
            return;
        }
        let len = usize::from(m.payload_size);
        let Some(bytes) = m.payload.get(..len) else {
            self.bad(format_args!("payload size {len} exceeds the 240-byte slot"));
            return;
        };
        match ChannelMessage::decode(bytes) {
            Ok(msg) => self.handle_message(msg),
            Err(e) => self.bad(format_args!("undecodable channel message ({e:?})")),
        }
    }

    fn channel(&self, relid: u32) -> Option<Rc<ChannelState>> {
        self.inner.channels.borrow().get(&relid).cloned()
    }

    fn handle_message(&self, msg: ChannelMessage<'_>) {
        match msg {
            ChannelMessage::VersionResponse(r) => {
                match self.inner.contact_reply.borrow().as_ref() {
                    Some(reply) => reply.complete(Ok(r)),
                    None => self.bad(format_args!("unsolicited VERSION_RESPONSE")),
                }
            }
            ChannelMessage::OfferChannel(offer) => self.handle_offer(offer),
            ChannelMessage::AllOffersDelivered => self.inner.offers_delivered.set(),
            ChannelMessage::RescindChannelOffer(r) => self.handle_rescind(r.child_relid.get()),
            ChannelMessage::OpenResult(r) => {
                let relid = r.child_relid.get();
                let Some(ch) = self.channel(relid) else {
                    return self.bad(format_args!("OPENCHANNEL_RESULT for unknown relid {relid}"));
                };
                let Some(reply) = ch.open_reply.borrow_mut().take() else {
                    return self.bad(format_args!(
                        "OPENCHANNEL_RESULT for relid {relid} that is not opening"
                    ));
                };
                let status = r.status.get();
                reply.complete(if status == 0 {
                    Ok(())
                } else {
                    Err(ChannelError::HostStatus(status))
                });
            }
            ChannelMessage::GpadlCreated(c) => {
                let (relid, gpadl, status) =
                    (c.child_relid.get(), c.gpadl.get(), c.creation_status.get());
                let reply = self
                    .channel(relid)
                    .and_then(|ch| ch.gpadl_pending.borrow_mut().remove(&gpadl));
                match reply {
                    Some(r) => r.complete(if status == 0 {
                        Ok(())
                    } else {
                        Err(ChannelError::HostStatus(status))
                    }),
                    None => self.bad(format_args!(
                        "GPADL_CREATED for unknown gpadl {gpadl:#x} (relid {relid})"
                    )),
                }
            }
            ChannelMessage::GpadlTorndown(t) => {
                let gpadl = t.gpadl.get();
                let reply = self
                    .inner
                    .channels
                    .borrow()
                    .values()
                    .find_map(|ch| ch.teardown_pending.borrow_mut().remove(&gpadl));
                match reply {
                    Some(r) => r.complete(Ok(())),
                    // After a rescind we stop waiting; a late answer lands here.
                    None => debug!("vmbus: GPADL_TORNDOWN for gpadl {gpadl:#x} nobody waits for"),
                }
            }
            ChannelMessage::UnloadResponse => self.inner.unload_done.set(),
            other => self.bad(format_args!(
                "message type {:?} is not sent by hosts",
                other.message_type()
            )),
        }
    }

    fn handle_offer(&self, offer: OfferChannel) {
        let relid = offer.child_relid.get();
        let index = offer.sub_channel_index();
        if relid == INVALID_RELID || relid == 0 {
            return self.bad(format_args!("offer with invalid relid {relid:#x}"));
        }
        if self.inner.channels.borrow().contains_key(&relid) {
            self.inner.stats.borrow_mut().duplicate_offers += 1;
            warn!("vmbus: offer reuses live relid {relid}; dropped");
            return;
        }
        let key = guid_key(&offer.offer.if_instance);
        if index == 0 && self.inner.primaries.borrow().contains_key(&key) {
            self.inner.stats.borrow_mut().duplicate_offers += 1;
            warn!(
                "vmbus: duplicate primary offer for instance {} (relid {relid}); dropped",
                offer.offer.if_instance
            );
            return;
        }
        self.inner.stats.borrow_mut().offers += 1;
        let ch = ChannelState::new(offer);
        self.inner.channels.borrow_mut().insert(relid, ch.clone());
        let bus = self.clone();
        if index == 0 {
            self.inner.primaries.borrow_mut().insert(key, relid);
            debug!(
                "vmbus: offer relid {relid} class {} instance {}: primary",
                ch.class_id(),
                ch.instance_id()
            );
            let name = format!("probe relid {relid}");
            if self
                .inner
                .primary_worker
                .queue(name, async move { bus.probe(ch).await })
                .is_err()
            {
                warn!("vmbus: primary worker stopped; offer {relid} not probed");
            }
        } else {
            debug!(
                "vmbus: offer relid {relid} instance {}: sub-channel {index}",
                ch.instance_id()
            );
            let name = format!("subchannel relid {relid}");
            if self
                .inner
                .subchannel_worker
                .queue(name, async move { bus.attach_subchannel(ch).await })
                .is_err()
            {
                warn!("vmbus: sub-channel worker stopped; offer {relid} not handled");
            }
        }
    }

    fn handle_rescind(&self, relid: u32) {
        let Some(ch) = self.channel(relid) else {
            return self.bad(format_args!("RESCINDCHANNEL for unknown relid {relid}"));
        };
        if ch.is_rescinded() {
            return self.bad(format_args!("second RESCINDCHANNEL for relid {relid}"));
        }
        self.inner.stats.borrow_mut().rescinds += 1;
        info!("vmbus: relid {relid} rescinded");
        ch.mark_rescinded();
        let bus = self.clone();
        self.inner
            .handle
            .spawn(format!("rescind relid {relid}"), async move {
                bus.finish_rescind(ch).await
            });
    }

    // ---------------------------------------------------------------------------------
    // Worker items.

    async fn probe(&self, ch: Rc<ChannelState>) {
        let class = ch.class_id();
        let driver = self
            .inner
            .drivers
            .borrow()
            .iter()
            .find(|d| d.class_id() == class)
            .cloned();
        match driver {
            None => debug!("vmbus: no driver for class {class} (relid {})", ch.relid),
            Some(_) if ch.is_rescinded() => {
                debug!("vmbus: relid {} rescinded before its probe", ch.relid)
            }
            Some(driver) => {
                debug!("vmbus: probing relid {} with {}", ch.relid, driver.name());
                match driver
                    .probe(Device {
                        bus: Rc::downgrade(&self.inner),
                        channel: ch.clone(),
                    })
                    .await
                {
                    Ok(instance) => *ch.instance.borrow_mut() = Some(instance),
                    Err(e) => {
                        self.inner.stats.borrow_mut().probes_failed += 1;
                        warn!(
                            "vmbus: {} probe of relid {} failed: {e}",
                            driver.name(),
                            ch.relid
                        );
                        // Unregister: give back everything the failed probe left behind.
                        ch.subchannel_handler.borrow_mut().take();
                        self.release_resources(&ch).await;
                    }
                }
            }
        }
        // Always, also on failure: a later rescind waits for this.
        ch.probe_done.set();
    }

    async fn attach_subchannel(&self, ch: Rc<ChannelState>) {
        let primary = self
            .inner
            .primaries
            .borrow()
            .get(&guid_key(&ch.instance_id()))
            .and_then(|relid| self.channel(*relid));
        let handler = primary
            .as_ref()
            .filter(|p| !p.is_rescinded())
            .and_then(|p| p.subchannel_handler.borrow().clone());
        match handler {
            Some(_) if ch.is_rescinded() => debug!(
                "vmbus: sub-channel relid {} rescinded before hand-off",
                ch.relid
            ),
            Some(h) => {
                h(Device {
                    bus: Rc::downgrade(&self.inner),
                    channel: ch.clone(),
                })
                .await
            }
            None => {
                self.inner.stats.borrow_mut().orphan_subchannels += 1;
                info!(
                    "vmbus: sub-channel relid {} has no live primary or handler; left unclaimed until rescinded",
                    ch.relid
                );
            }
        }
        ch.probe_done.set();
    }

    async fn finish_rescind(&self, ch: Rc<ChannelState>) {
        ch.probe_done.wait().await;
        let index = ch.sub_channel_index();
        if index == 0 {
            let instance = ch.instance.borrow_mut().take();
            if let Some(instance) = instance {
                instance.remove().await;
            }
            ch.subchannel_handler.borrow_mut().take();
        } else {
            let primary_instance = self
                .inner
                .primaries
                .borrow()
                .get(&guid_key(&ch.instance_id()))
                .and_then(|relid| self.channel(*relid))
                .and_then(|p| p.instance.borrow().clone());
            if let Some(instance) = primary_instance {
                instance.subchannel_removed(index).await;
            }
        }
        self.release_resources(&ch).await;
        {
            let mut primaries = self.inner.primaries.borrow_mut();
            let key = guid_key(&ch.instance_id());
            if index == 0 && primaries.get(&key) == Some(&ch.relid) {
                primaries.remove(&key);
            }
        }
        self.inner.channels.borrow_mut().remove(&ch.relid);
        if !ch.released.replace(true) {
            match self
                .post(&encode_body(&RelidReleased {
                    child_relid: ch.relid.into(),
                }))
                .await
            {
                Ok(()) => self.inner.stats.borrow_mut().relids_released += 1,
                Err(e) => warn!("vmbus: RELID_RELEASED for {} failed: {e}", ch.relid),
            }
        }
        debug!("vmbus: relid {} released", ch.relid);
    }

    /// Closes the channel if open and gives back its GPADLs and ring memory. Without a
    /// rescind it waits for each GPADL_TORNDOWN (the host may still use the memory until
    /// then); after a rescind the host answers nothing more, so it only posts.
    async fn release_resources(&self, ch: &Rc<ChannelState>) {
        if matches!(ch.lifecycle.get(), Lifecycle::Open | Lifecycle::Opening) {
            let _ = self
                .post(&encode_body(&CloseChannel {
                    child_relid: ch.relid.into(),
                }))
                .await;
            ch.lifecycle.set(Lifecycle::Closed);
        }
        ch.ring.borrow_mut().take();
        ch.ring_gpadl.set(None);
        let handles: Vec<u32> = ch.gpadls.borrow().keys().copied().collect();
        for gpadl in handles {
            let _ = self.teardown_gpadl(ch, gpadl).await;
        }
    }

    async fn teardown_gpadl(&self, ch: &Rc<ChannelState>, gpadl: u32) -> Result<(), ChannelError> {
        // Out of the table before the first await: a rescind's cleanup running meanwhile
        // must not see it and post a second teardown. The buffer stays alive here until
        // the host has let go of it.
        let Some(buffer) = ch.gpadls.borrow_mut().remove(&gpadl) else {
            return Err(ChannelError::WrongState);
        };
        if ch.released.get() {
            // RELID_RELEASED is out: the host dropped the channel's GPADLs with it and
            // knows the relid no more (an open that raced the rescind gets here).
            return Ok(());
        }
        trace!("vmbus: relid {} GPADL_TEARDOWN {gpadl:#x}", ch.relid);
        let msg = encode_body(&GpadlTeardown {
            child_relid: ch.relid.into(),
            gpadl: gpadl.into(),
        });
        let result = if ch.is_rescinded() {
            let _ = self.post(&msg).await;
            Ok(())
        } else {
            let reply = Reply::new("GPADL_TORNDOWN");
            ch.teardown_pending
                .borrow_mut()
                .insert(gpadl, reply.clone());
            match self.post(&msg).await {
                Ok(()) => match reply.wait().await {
                    // A rescind while waiting: the host will not answer, memory is ours.
                    Ok(()) | Err(ChannelError::Rescinded) => Ok(()),
                    Err(e) => Err(e),
                },
                Err(e) => {
                    ch.teardown_pending.borrow_mut().remove(&gpadl);
                    Err(e)
                }
            }
        };
        if result.is_err() {
            // Not torn down: the host may still use the memory; a later cleanup retries.
            ch.gpadls.borrow_mut().insert(gpadl, buffer);
        }
        result
    }

    async fn assign_cpu(&self) -> u32 {
        let mut next = self.inner.cpu_assignment.lock().await;
        // One CPU today: every channel targets this VP. The counter keeps the
        // round-robin ready for SMP.
        *next = next.wrapping_add(1);
        self.inner.hv.vp_index()
    }

    async fn create_gpadl(
        &self,
        ch: &Rc<ChannelState>,
        buffer: Rc<dyn SharedBuffer>,
    ) -> Result<u32, ChannelError> {
        if ch.is_rescinded() {
            return Err(ChannelError::Rescinded);
        }
        let pages = buffer.pages();
        let pfns: Vec<u64> = (0..pages).map(|i| buffer.pfn(i)).collect();
        let gpadl = self.inner.next_gpadl.get();
        self.inner.next_gpadl.set(gpadl.wrapping_add(1).max(1));
        let messages = crate::gpadl::encode(gpadl, ch.relid, &pfns)
            .map_err(|_| ChannelError::InvalidBuffer)?;
        let reply = Reply::new("GPADL_CREATED");
        ch.gpadl_pending.borrow_mut().insert(gpadl, reply.clone());
        for m in &messages {
            if let Err(e) = self.post(m).await {
                ch.gpadl_pending.borrow_mut().remove(&gpadl);
                return Err(e);
            }
        }
        ch.or_rescind(reply.wait()).await?;
        ch.gpadls.borrow_mut().insert(gpadl, buffer);
        Ok(gpadl)
    }
}

/// A driver's handle on one channel (primary or sub-channel).
#[derive(Clone)]
pub struct Device {
    /// Weak: drivers keep device handles inside the bus's channel table, and a handle
    /// must not keep the bus alive (or the bus could never be torn down).
    bus: Weak<BusInner>,
    channel: Rc<ChannelState>,
}

/// Ring sizes for [`Device::open`], in pages including each ring's control page.
#[derive(Clone, Copy, Debug)]
pub struct RingSizes {
    pub outgoing_pages: usize,
    pub incoming_pages: usize,
}

impl Device {
    /// The channel record.
    pub fn channel(&self) -> &ChannelState {
        &self.channel
    }

    /// The bus.
    pub fn bus(&self) -> Result<VmBus, ChannelError> {
        self.bus
            .upgrade()
            .map(|inner| VmBus { inner })
            .ok_or(ChannelError::WrongState)
    }

    /// Installs the handler for this primary's sub-channel offers. Call it in `probe`
    /// before asking the host for sub-channels.
    pub fn set_subchannel_handler(&self, handler: SubchannelHandler) {
        *self.channel.subchannel_handler.borrow_mut() = Some(handler);
    }

    /// Describes `buffer` to the host by a GPADL (GPADL_HEADER + bodies, then waits for
    /// GPADL_CREATED). The channel keeps the buffer alive until the GPADL is torn down.
    pub async fn create_gpadl(&self, buffer: Rc<dyn SharedBuffer>) -> Result<u32, ChannelError> {
        self.bus()?.create_gpadl(&self.channel, buffer).await
    }

    /// Tears a GPADL down (waits for GPADL_TORNDOWN unless the channel was rescinded).
    pub async fn teardown_gpadl(&self, gpadl: u32) -> Result<(), ChannelError> {
        self.bus()?.teardown_gpadl(&self.channel, gpadl).await
    }

    /// Allocates the rings, describes them by a GPADL, sends OPENCHANNEL and waits for the
    /// result. Any failure (or a rescind meanwhile) gives back what was set up.
    pub async fn open(&self, sizes: RingSizes) -> Result<OpenedChannel, ChannelError> {
        let ch = &self.channel;
        if ch.is_rescinded() {
            return Err(ChannelError::Rescinded);
        }
        if matches!(ch.lifecycle.get(), Lifecycle::Open | Lifecycle::Opening) {
            return Err(ChannelError::WrongState);
        }
        let bus = self.bus()?;
        let target_vp = bus.assign_cpu().await;
        ch.target_vp.set(target_vp);
        let total = sizes.outgoing_pages + sizes.incoming_pages;
        let buffer: Rc<dyn SharedBuffer> = Rc::from(bus.inner.mem.alloc(total)?);
        let ring = Rc::new(RingPair::new(buffer.clone(), sizes.outgoing_pages)?);
        // The awaits above and in `create_gpadl` may have let a rescind through, and its
        // cleanup may already have released the relid: nothing may be posted for the
        // channel after that (`create_gpadl` checks before its own posts).
        let gpadl = self.create_gpadl(buffer).await?;
        ch.ring_gpadl.set(Some(gpadl));
        if ch.is_rescinded() {
            ch.ring_gpadl.set(None);
            let _ = bus.teardown_gpadl(ch, gpadl).await;
            return Err(ChannelError::Rescinded);
        }
        let reply = Reply::new("OPENCHANNEL_RESULT");
        *ch.open_reply.borrow_mut() = Some(reply.clone());
        ch.lifecycle.set(Lifecycle::Opening);
        let msg = encode_body(&OpenChannel::new(
            ch.relid,
            ch.relid,
            gpadl,
            target_vp,
            ring.downstream_page_offset(),
        ));
        let result = match bus.post(&msg).await {
            Ok(()) => ch.or_rescind(reply.wait()).await,
            Err(e) => Err(e),
        };
        ch.open_reply.borrow_mut().take();
        match result {
            Ok(()) => {
                ch.lifecycle.set(Lifecycle::Open);
                *ch.ring.borrow_mut() = Some(ring.clone());
                debug!(
                    "vmbus: relid {} open (gpadl {gpadl:#x}, vp {target_vp})",
                    ch.relid
                );
                Ok(OpenedChannel {
                    device: self.clone(),
                    ring,
                })
            }
            Err(e) => {
                // Refused, not posted, or rescinded: in each case the host holds no open
                // channel, so there is nothing to close; only the ring goes back.
                ch.lifecycle.set(Lifecycle::Closed);
                ch.ring_gpadl.set(None);
                let _ = bus.teardown_gpadl(ch, gpadl).await;
                Err(e)
            }
        }
    }
}

/// An open channel: its rings and the operations on them.
#[derive(Clone)]
pub struct OpenedChannel {
    device: Device,
    ring: Rc<RingPair>,
}

impl OpenedChannel {
    /// The device handle.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The ring pair (packet-level access for drivers).
    pub fn ring(&self) -> &RingPair {
        &self.ring
    }

    /// Signals the host that the outgoing ring has new data (HvSignalEvent on the offer's
    /// connection id).
    pub fn signal_host(&self) {
        let conn = self.device.channel.offer.connection_id.get();
        let Ok(bus) = self.device.bus() else { return };
        if let Err(e) = bus.inner.hv.signal_event(conn) {
            warn!("vmbus: HvSignalEvent({conn}) failed: {e:?}");
        }
    }

    /// Waits until the host signals this channel (or it is rescinded), then clears the
    /// signal. Callers re-check the ring after it returns.
    pub async fn wait_signal(&self) -> Result<(), ChannelError> {
        let ch = &self.device.channel;
        ch.data_event.wait().await;
        ch.data_event.reset();
        if ch.is_rescinded() {
            Err(ChannelError::Rescinded)
        } else {
            Ok(())
        }
    }

    /// Closes the channel: CLOSECHANNEL, then the ring GPADL is torn down and its memory
    /// freed.
    pub async fn close(self) -> Result<(), ChannelError> {
        let ch = &self.device.channel;
        if ch.lifecycle.get() != Lifecycle::Open {
            return Err(ChannelError::WrongState);
        }
        let bus = &self.device.bus()?;
        if !ch.is_rescinded() {
            bus.post(&encode_body(&CloseChannel {
                child_relid: ch.relid.into(),
            }))
            .await?;
        }
        ch.lifecycle.set(Lifecycle::Closed);
        ch.ring.borrow_mut().take();
        if let Some(gpadl) = ch.ring_gpadl.take() {
            bus.teardown_gpadl(ch, gpadl).await?;
        }
        Ok(())
    }
}
