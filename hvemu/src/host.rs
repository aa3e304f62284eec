//! The VMBus host: connection, offers, GPADLs, open/close, rescind and release.
//!
//! A synchronous state machine in the manner of OpenVMM's `vmbus_server/src/channels.rs`:
//! one `handle_<message>` per guest message, every side effect either a queued host
//! message, an event flag, or a call into a device back end. Guest input is never trusted:
//! whatever breaks a rule is recorded as a [`Violation`] and otherwise ignored (the host
//! answers only when the protocol has an answer for the failure, e.g. a failed
//! OPENCHANNEL_RESULT or GPADL_CREATED status).
//!
//! Rules for a rescinded channel (after Linux "Fix a rescind handling bug": once a channel
//! is rescinded the host does not respond to requests on it; OpenVMM accepts teardowns of a
//! revoked channel's GPADLs):
//! * GPADL_HEADER/BODY and OPENCHANNEL are ignored without an answer (counted in
//!   [`ChannelSummary::ignored_after_rescind`]);
//! * GPADL_TEARDOWN of a GPADL that exists is answered with GPADL_TORNDOWN, so the guest
//!   can reclaim its memory;
//! * CLOSECHANNEL is accepted (the host closed the ring ends when it rescinded);
//! * RELID_RELEASED frees the relid; GPADLs still alive are dropped and counted.
//!
//! Relids are allocated like a real host: the lowest free small integer from 1, reused only
//! after RELID_RELEASED (or UNLOAD). The event connection id of a channel is OpenVMM's
//! `relid | (SINT 2 << 12)`.

use std::collections::{BTreeMap, BTreeSet};

use hvnet_wire::vmbus::{
    encode_body, ChannelMessage, ChannelOffer, CloseChannel, GpadlBodyMsg, GpadlCreated,
    GpadlHeader, GpadlHeaderMsg, GpadlTeardown, GpadlTorndown, Guid, InitiateContact, MessageBody,
    ModifyChannel, ModifyChannelResponse, OfferChannel, OpenChannel, OpenResult, RelidReleased,
    RescindChannelOffer, VersionResponse, VmbusVersion, MAX_CHANNEL_MESSAGE_SIZE,
    VMBUS_GUEST_VERSIONS, VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_CONNECTION_ID_4,
    VMBUS_MESSAGE_SINT,
};
use hvnet_wire::U64;
use zerocopy::FromBytes;

use crate::device::{ChannelCtx, DeviceBackend, DeviceId, DeviceSpec, HostActions};
use crate::faults::{DuplicateOffer, Faults, HostFaults, RescindTiming};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::queue::{OrderKey, OutQueue};
use crate::ring::{HostRing, OwnedGpaRange};
use crate::rng::SplitMix64;
use crate::stats::{ChannelState, ChannelSummary, HostStats, Violation, ViolationKind};
use crate::status;

/// The failure status the host uses in OPENCHANNEL_RESULT and GPADL_CREATED when it
/// rejects a request (NTSTATUS `STATUS_UNSUCCESSFUL`).
pub const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;

/// SynIC message type of VMBus messages.
const HV_MESSAGE_TYPE_VMBUS: u32 = 1;
/// Highest relid: one event flag bit per relid in the SINT's 2048-bit SIEF block.
const MAX_RELID: u32 = 2047;

/// How the host is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Versions the host accepts in INITIATE_CONTACT.
    pub versions: Vec<VmbusVersion>,
    /// Behave like a pre-5.0 (pre-Windows 10 RS3) host: there is no message port 4, so a
    /// post to connection id 4 fails with INVALID_CONNECTION_ID, and no version from 5.0
    /// on is accepted whatever `versions` says.
    pub pre_win10_v5_connection_ids: bool,
    /// Message connection id returned in VERSION_RESPONSE for versions from 5.0 on; the
    /// guest must post every later message there. OpenVMM returns 1.
    pub msg_conn_id: u32,
    /// Virtual processors: valid target VPs are `0..vp_count`.
    pub vp_count: u32,
    /// Seed for every randomised behaviour (delay, reordering).
    pub seed: u64,
    /// Host-wide faults.
    pub faults: HostFaults,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            versions: VMBUS_GUEST_VERSIONS.to_vec(),
            pre_win10_v5_connection_ids: false,
            msg_conn_id: VMBUS_MESSAGE_CONNECTION_ID,
            vp_count: 8,
            seed: 0,
            faults: HostFaults::none(),
        }
    }
}

/// The negotiated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Negotiated version.
    pub version: VmbusVersion,
    /// Connection id the guest must post messages to.
    pub message_connection_id: u32,
    /// VP that receives channel messages (from 3.0; 0 before).
    pub target_vcpu: u32,
    /// Whether REQUESTOFFERS arrived.
    pub offers_requested: bool,
}

/// A GPADL as the host knows it.
#[derive(Debug)]
pub(crate) struct Gpadl {
    pub(crate) relid: u32,
    pub(crate) device: DeviceId,
    header: GpadlHeader,
    /// Range data gathered so far (header and bodies).
    words: Vec<u64>,
    bodies: u32,
    /// Set once complete and accepted.
    ready: Option<ReadyGpadl>,
}

#[derive(Debug)]
struct ReadyGpadl {
    ranges: Vec<OwnedGpaRange>,
    pfns: Vec<u64>,
}

impl Gpadl {
    pub(crate) fn ranges(&self) -> Option<&[OwnedGpaRange]> {
        self.ready.as_ref().map(|r| r.ranges.as_slice())
    }
}

#[derive(Debug)]
struct PendingOpen {
    request: OpenChannel,
}

enum ChanState {
    Closed,
    Opening(PendingOpen),
    Open { ring: Box<HostRing>, gpadl: u32 },
    Revoked,
}

struct Channel {
    device: DeviceId,
    sum: ChannelSummary,
    state: ChanState,
}

struct Device {
    class_id: Guid,
    instance_id: Guid,
    offer_flags: u16,
    mmio_megabytes: u16,
    user_def: [u8; 120],
    backend: Box<dyn DeviceBackend>,
    faults: Faults,
    /// Sub-channels wanted: indices `1..=subchannels`.
    subchannels: u16,
    /// Offered, unreleased channels of this connection, by sub-channel index.
    channels: BTreeMap<u16, u32>,
    /// Relids of duplicate ("ghost") primary offers.
    ghosts: Vec<u32>,
    removed: bool,
    /// Guest messages concerning this device (for `rescind_at_step`).
    steps: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Connection {
    Disconnected,
    Connected(ConnectionInfo),
}

#[derive(Default)]
struct Counters {
    messages_in: u64,
    messages_out: u64,
    posts_rejected: u64,
    signals: u64,
    stray_signals: u64,
    events_set: u64,
    gpadls_created: u64,
    gpadls_torn_down: u64,
    gpadls_dropped: u64,
    offers_sent: u64,
    rescinds_sent: u64,
    relids_released: u64,
    unloads: u64,
    implicit_resets: u64,
}

/// The emulated VMBus host (see the module docs for the rules it enforces).
pub struct VmbusHost {
    config: HostConfig,
    mem: GuestMemory,
    rng: SplitMix64,
    conn: Connection,
    devices: BTreeMap<DeviceId, Device>,
    next_device: u32,
    channels: BTreeMap<u32, Channel>,
    /// Channels released (or dropped by UNLOAD), oldest first.
    history: Vec<ChannelSummary>,
    /// Relids released and not reused since: a second release is a double release.
    released_relids: BTreeSet<u32>,
    gpadls: BTreeMap<u32, Gpadl>,
    /// GPADL handles whose header arrived after the channel's rescind (ignored), so their
    /// bodies and teardowns are ignored quietly too: handle -> relid.
    ignored_gpadls: BTreeMap<u32, u32>,
    out: OutQueue,
    events: BTreeSet<u32>,
    notify: Option<Box<dyn FnMut()>>,
    notify_pending: bool,
    now: u64,
    counters: Counters,
    violations: Vec<Violation>,
}

impl std::fmt::Debug for VmbusHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmbusHost")
            .field("conn", &self.conn)
            .field("devices", &self.devices.len())
            .field("channels", &self.channels.len())
            .field("gpadls", &self.gpadls.len())
            .field("queued", &self.out.len())
            .field("violations", &self.violations.len())
            .finish_non_exhaustive()
    }
}

fn guid(bytes: &[u8; 16]) -> Guid {
    Guid::read_from_bytes(bytes.as_slice()).unwrap_or(Guid::ZERO)
}

/// The relid a guest message is about, if any.
fn message_relid(msg: &ChannelMessage<'_>) -> Option<u32> {
    Some(match msg {
        ChannelMessage::OpenChannel(m) => m.child_relid.get(),
        ChannelMessage::CloseChannel(m) => m.child_relid.get(),
        ChannelMessage::GpadlHeader(m) => m.header.child_relid.get(),
        ChannelMessage::GpadlTeardown(m) => m.child_relid.get(),
        ChannelMessage::RelidReleased(m) => m.child_relid.get(),
        ChannelMessage::ModifyChannel(m) => m.child_relid.get(),
        _ => return None,
    })
}

impl VmbusHost {
    /// A disconnected host with no devices over `memory`.
    pub fn new(config: HostConfig, memory: GuestMemory) -> Self {
        let rng = SplitMix64::new(config.seed);
        VmbusHost {
            config,
            mem: memory,
            rng,
            conn: Connection::Disconnected,
            devices: BTreeMap::new(),
            next_device: 1,
            channels: BTreeMap::new(),
            history: Vec::new(),
            released_relids: BTreeSet::new(),
            gpadls: BTreeMap::new(),
            ignored_gpadls: BTreeMap::new(),
            out: OutQueue::default(),
            events: BTreeSet::new(),
            notify: None,
            notify_pending: false,
            now: 0,
            counters: Counters::default(),
            violations: Vec::new(),
        }
    }

    /// The guest memory the host works on.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The configuration.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Replaces the host-wide faults.
    pub fn set_host_faults(&mut self, faults: HostFaults) {
        self.config.faults = faults;
    }

    /// Sets the callback run whenever a message is queued or an event flag set (the
    /// adapter raises the guest's SINT interrupt from it). Runs at the end of the host
    /// call that caused it, at most once per call, while that call still borrows the
    /// host: it must not call back into the host.
    pub fn set_notify(&mut self, notify: Box<dyn FnMut()>) {
        self.notify = Some(notify);
    }

    /// The negotiated connection, if connected.
    pub fn connection(&self) -> Option<ConnectionInfo> {
        match self.conn {
            Connection::Connected(info) => Some(info),
            Connection::Disconnected => None,
        }
    }

    // -----------------------------------------------------------------------------------
    // Bookkeeping helpers.

    fn violation(&mut self, kind: ViolationKind, relid: Option<u32>, detail: impl Into<String>) {
        let v = Violation {
            kind,
            relid,
            detail: detail.into(),
        };
        log::debug!("hvemu: guest violation: {v}");
        self.violations.push(v);
    }

    fn queue_raw(&mut self, message_type: u32, bytes: Vec<u8>, key: OrderKey) {
        let max = self.config.faults.max_delay;
        let due = if max > 0 {
            self.now + self.rng.below(max + 1)
        } else {
            self.now
        };
        self.out.push(message_type, bytes, key, due);
        self.notify_pending = true;
    }

    fn send<T: MessageBody>(&mut self, body: &T, key: OrderKey) {
        let buf = encode_body(body);
        self.queue_raw(HV_MESSAGE_TYPE_VMBUS, buf.as_bytes().to_vec(), key);
    }

    fn send_header_only(&mut self, msg: ChannelMessage<'static>, key: OrderKey) {
        match msg.encode() {
            Ok(buf) => self.queue_raw(HV_MESSAGE_TYPE_VMBUS, buf.as_bytes().to_vec(), key),
            Err(e) => log::error!("hvemu: cannot encode {:?}: {e}", msg.message_type()),
        }
    }

    fn set_event(&mut self, relid: u32) {
        self.events.insert(relid);
        self.counters.events_set += 1;
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.events += 1;
        }
        self.notify_pending = true;
    }

    fn flush_notify(&mut self) {
        if std::mem::take(&mut self.notify_pending) {
            if let Some(n) = self.notify.as_mut() {
                n();
            }
        }
    }

    fn offers_live(&self) -> bool {
        matches!(
            self.conn,
            Connection::Connected(ConnectionInfo {
                offers_requested: true,
                ..
            })
        )
    }

    fn version(&self) -> VmbusVersion {
        match self.conn {
            Connection::Connected(info) => info.version,
            Connection::Disconnected => VmbusVersion(0),
        }
    }

    fn alloc_relid(&mut self) -> Option<u32> {
        let relid = (1..=MAX_RELID).find(|r| !self.channels.contains_key(r))?;
        self.released_relids.remove(&relid);
        Some(relid)
    }

    // -----------------------------------------------------------------------------------
    // Host -> guest.

    /// Takes the next message from the SynIC slot (and EOMs it): `(message type,
    /// payload)`. The payload of a VMBus message (type 1) is a channel message of at most
    /// 240 bytes; [`VmbusHost::inject_raw`] can queue anything.
    pub fn take_message(&mut self) -> Option<(u32, Vec<u8>)> {
        let window = self.config.faults.reorder_window;
        let m = self.out.pop(self.now, window, &mut self.rng)?;
        self.counters.messages_out += 1;
        Some(m)
    }

    /// Messages queued for the guest (deliverable now or later).
    pub fn pending_messages(&self) -> usize {
        self.out.len()
    }

    /// Calls `f` with the relid of every channel whose event flag is set, lowest first,
    /// clearing the flags.
    pub fn drain_events(&mut self, f: &mut dyn FnMut(u32)) {
        for relid in std::mem::take(&mut self.events) {
            f(relid);
        }
    }

    /// Whether any event flag is set.
    pub fn events_pending(&self) -> bool {
        !self.events.is_empty()
    }

    /// Queues `bytes` as a message of SynIC type `message_type`, unchecked (truncated to
    /// 240 bytes), ordered with everything else. For testing the guest's handling of
    /// malformed host messages.
    pub fn inject_raw(&mut self, message_type: u32, bytes: &[u8]) {
        let n = bytes.len().min(MAX_CHANNEL_MESSAGE_SIZE);
        self.queue_raw(message_type, bytes[..n].to_vec(), OrderKey::Barrier);
        self.flush_notify();
    }

    /// The host clock (ticks), used only by [`HostFaults::max_delay`].
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Advances the host clock; notifies if a delayed message became deliverable.
    pub fn advance_time(&mut self, ticks: u64) {
        let was_ready = self.out.ready(self.now);
        self.now = self.now.saturating_add(ticks);
        if !was_ready && self.out.ready(self.now) {
            self.notify_pending = true;
        }
        self.flush_notify();
    }

    /// When the next delayed message becomes deliverable, if one is waiting.
    pub fn next_due(&self) -> Option<u64> {
        self.out.next_due(self.now)
    }

    // -----------------------------------------------------------------------------------
    // Guest -> host: HvPostMessage.

    fn known_port(&self, connection_id: u32) -> bool {
        connection_id == VMBUS_MESSAGE_CONNECTION_ID
            || (connection_id == VMBUS_MESSAGE_CONNECTION_ID_4
                && !self.config.pre_win10_v5_connection_ids)
            || connection_id == self.config.msg_conn_id
    }

    /// HvPostMessage from the guest: `payload` is a channel message posted with SynIC
    /// `message_type` (1 for VMBus) to `connection_id`. Returns the hypercall status on
    /// failure. Malformed or out-of-state messages succeed as posts and are recorded as
    /// violations.
    pub fn post_message(
        &mut self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), u16> {
        let r = self.post_message_inner(connection_id, message_type, payload);
        if r.is_err() {
            self.counters.posts_rejected += 1;
        }
        self.flush_notify();
        r
    }

    fn post_message_inner(
        &mut self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), u16> {
        if self.config.faults.busy_posts > 0 {
            self.config.faults.busy_posts -= 1;
            return Err(status::INSUFFICIENT_BUFFERS);
        }
        if payload.len() > MAX_CHANNEL_MESSAGE_SIZE {
            self.violation(
                ViolationKind::PayloadTooLong,
                None,
                format!("{} bytes posted", payload.len()),
            );
            return Err(status::INVALID_PARAMETER);
        }
        if message_type & 0x8000_0000 != 0 {
            self.violation(
                ViolationKind::ReservedMessageType,
                None,
                format!("message type {message_type:#x}"),
            );
            return Err(status::INVALID_PARAMETER);
        }
        if !self.known_port(connection_id) {
            // A pre-5.0 host has no port 4: this is how the guest learns to fall back, not
            // a violation.
            let probing_port_4 = connection_id == VMBUS_MESSAGE_CONNECTION_ID_4;
            if !probing_port_4 {
                self.violation(
                    ViolationKind::UnknownConnectionId,
                    None,
                    format!("post to connection id {connection_id:#x}"),
                );
            }
            return Err(status::INVALID_CONNECTION_ID);
        }
        if message_type != HV_MESSAGE_TYPE_VMBUS {
            self.violation(
                ViolationKind::NotVmbusMessage,
                None,
                format!("message type {message_type:#x} on a VMBus port"),
            );
            return Ok(());
        }
        self.counters.messages_in += 1;
        let msg = match ChannelMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let t = payload
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                self.violation(
                    ViolationKind::Malformed,
                    None,
                    format!("type {t:?}, {} bytes: {e}", payload.len()),
                );
                return Ok(());
            }
        };
        // `decode` tolerates trailing bytes (OpenVMM's 6.0 extensions append fields); a
        // 5.3-or-older guest sends exactly the structure, so say so, then go on.
        let canonical = msg.encode().map_or(0, |b| b.len());
        if canonical != payload.len() {
            self.violation(
                ViolationKind::Overlong,
                message_relid(&msg),
                format!(
                    "{:?} of {} bytes, expected {canonical}",
                    msg.message_type(),
                    payload.len()
                ),
            );
        }
        if let ChannelMessage::InitiateContact(ic) = msg {
            self.handle_initiate_contact(connection_id, &ic);
            return Ok(());
        }
        let Connection::Connected(info) = self.conn else {
            self.violation(
                ViolationKind::NotConnected,
                message_relid(&msg),
                format!(
                    "{:?} before a successful INITIATE_CONTACT",
                    msg.message_type()
                ),
            );
            return Ok(());
        };
        if connection_id != info.message_connection_id {
            self.violation(
                ViolationKind::WrongConnectionId,
                message_relid(&msg),
                format!(
                    "{:?} on connection id {connection_id:#x}, expected {:#x}",
                    msg.message_type(),
                    info.message_connection_id
                ),
            );
            return Ok(());
        }
        self.dispatch(msg);
        Ok(())
    }

    fn dispatch(&mut self, msg: ChannelMessage<'_>) {
        match msg {
            ChannelMessage::RequestOffers => self.handle_request_offers(),
            ChannelMessage::Unload => self.handle_unload(),
            ChannelMessage::GpadlHeader(_)
            | ChannelMessage::GpadlBody(_)
            | ChannelMessage::GpadlTeardown(_)
            | ChannelMessage::OpenChannel(_)
            | ChannelMessage::CloseChannel(_)
            | ChannelMessage::ModifyChannel(_)
            | ChannelMessage::RelidReleased(_) => self.dispatch_channel_message(msg),
            ChannelMessage::TlConnectRequest(_) => self.violation(
                ViolationKind::Unsupported,
                None,
                "TL_CONNECT_REQUEST (hv_sock)",
            ),
            ChannelMessage::InitiateContact(_) => {}
            other => self.violation(
                ViolationKind::HostOnlyMessage,
                None,
                format!("{:?} sent by the guest", other.message_type()),
            ),
        }
    }

    /// Counts steps for `rescind_at_step`, then handles a channel message.
    fn dispatch_channel_message(&mut self, msg: ChannelMessage<'_>) {
        let relid = match &msg {
            ChannelMessage::GpadlBody(b) => self.gpadls.get(&b.body.gpadl.get()).map(|g| g.relid),
            other => message_relid(other),
        };
        let device = relid.and_then(|r| self.channels.get(&r)).map(|c| c.device);
        let mut rescind_after = None;
        if let Some(dev) = device {
            if let Some(d) = self.devices.get_mut(&dev) {
                d.steps += 1;
                if let Some((k, timing)) = d.faults.rescind_at_step {
                    if d.steps == k && !d.removed {
                        match timing {
                            RescindTiming::BeforeReply => self.remove_device_inner(dev),
                            RescindTiming::AfterReply => rescind_after = Some(dev),
                        }
                    }
                }
            }
        }
        match msg {
            ChannelMessage::GpadlHeader(m) => self.handle_gpadl_header(&m),
            ChannelMessage::GpadlBody(m) => self.handle_gpadl_body(&m),
            ChannelMessage::GpadlTeardown(m) => self.handle_gpadl_teardown(&m),
            ChannelMessage::OpenChannel(m) => self.handle_open_channel(&m),
            ChannelMessage::CloseChannel(m) => self.handle_close_channel(&m),
            ChannelMessage::ModifyChannel(m) => self.handle_modify_channel(&m),
            ChannelMessage::RelidReleased(m) => self.handle_relid_released(&m),
            _ => {}
        }
        if let Some(dev) = rescind_after {
            self.remove_device_inner(dev);
        }
    }

    // -----------------------------------------------------------------------------------
    // Connection.

    fn handle_initiate_contact(&mut self, connection_id: u32, ic: &InitiateContact) {
        if connection_id != VMBUS_MESSAGE_CONNECTION_ID
            && connection_id != VMBUS_MESSAGE_CONNECTION_ID_4
        {
            self.violation(
                ViolationKind::WrongConnectionId,
                None,
                format!("INITIATE_CONTACT on connection id {connection_id:#x}"),
            );
            return;
        }
        if matches!(self.conn, Connection::Connected(_)) {
            // A guest that restarts without UNLOAD (kexec after a crash): reset, then
            // treat the contact as new, as OpenVMM does.
            self.counters.implicit_resets += 1;
            self.reset();
        }
        let version = ic.version();
        let new_style = version.uses_msg_sint();
        let mut ok = self.config.versions.contains(&version)
            && !(self.config.pre_win10_v5_connection_ids && new_style);
        if new_style != (connection_id == VMBUS_MESSAGE_CONNECTION_ID_4) {
            self.violation(
                ViolationKind::WrongConnectionId,
                None,
                format!("INITIATE_CONTACT for {version} on connection id {connection_id}"),
            );
        }
        if new_style && (ic.msg_sint() != VMBUS_MESSAGE_SINT || ic.msg_vtl() != 0) {
            self.violation(
                ViolationKind::BadInitiateContact,
                None,
                format!("msg_sint {} msg_vtl {}", ic.msg_sint(), ic.msg_vtl()),
            );
            ok = false;
        }
        if (ic.monitor_page1.get() == 0) != (ic.monitor_page2.get() == 0) {
            self.violation(
                ViolationKind::BadInitiateContact,
                None,
                "only one monitor page given",
            );
            ok = false;
        }
        let target_vcpu = if version >= VmbusVersion::WIN8_1 {
            ic.target_vcpu.get()
        } else {
            0
        };
        if target_vcpu >= self.config.vp_count {
            self.violation(
                ViolationKind::BadInitiateContact,
                None,
                format!("target_vcpu {target_vcpu}"),
            );
            ok = false;
        }
        let msg_conn_id = if !ok {
            0
        } else if new_style {
            self.config.msg_conn_id
        } else {
            // OpenVMM puts the version here below 5.0; Linux ignores it.
            version.0
        };
        self.send(
            &VersionResponse {
                version_supported: u8::from(ok),
                connection_state: 0,
                padding: 0.into(),
                msg_conn_id: msg_conn_id.into(),
            },
            OrderKey::Barrier,
        );
        if ok {
            self.conn = Connection::Connected(ConnectionInfo {
                version,
                message_connection_id: if new_style {
                    self.config.msg_conn_id
                } else {
                    VMBUS_MESSAGE_CONNECTION_ID
                },
                target_vcpu,
                offers_requested: false,
            });
        }
    }

    fn handle_request_offers(&mut self) {
        let Connection::Connected(mut info) = self.conn else {
            return;
        };
        if info.offers_requested {
            self.violation(
                ViolationKind::OffersAlreadyRequested,
                None,
                "REQUESTOFFERS twice",
            );
            return;
        }
        info.offers_requested = true;
        self.conn = Connection::Connected(info);
        let devs: Vec<DeviceId> = self.devices.keys().copied().collect();
        for dev in devs {
            self.offer_device(dev);
        }
        self.send_header_only(ChannelMessage::AllOffersDelivered, OrderKey::Barrier);
    }

    fn handle_unload(&mut self) {
        self.counters.unloads += 1;
        self.reset();
        self.send_header_only(ChannelMessage::UnloadResponse, OrderKey::Barrier);
    }

    /// Drops the connection: closes every channel, forgets every GPADL and relid, and
    /// withdraws sub-channels (the devices re-create them on request in the next
    /// connection, as netvsp does).
    fn reset(&mut self) {
        let relids: Vec<u32> = self.channels.keys().copied().collect();
        for &relid in &relids {
            self.close_ring(relid);
        }
        let gpadl_ids: Vec<u32> = self.gpadls.keys().copied().collect();
        for id in gpadl_ids {
            self.drop_gpadl(id);
        }
        for relid in relids {
            self.retire_channel(relid);
        }
        self.ignored_gpadls.clear();
        self.released_relids.clear();
        self.events.clear();
        for d in self.devices.values_mut() {
            d.channels.clear();
            d.ghosts.clear();
            d.subchannels = 0;
        }
        self.conn = Connection::Disconnected;
    }

    // -----------------------------------------------------------------------------------
    // Devices and offers.

    /// Adds a device. If the guest has asked for offers, its primary channel is offered at
    /// once (hot-add); otherwise at the next REQUESTOFFERS.
    pub fn add_device(&mut self, spec: DeviceSpec) -> DeviceId {
        let id = DeviceId(self.next_device);
        self.next_device += 1;
        self.devices.insert(
            id,
            Device {
                class_id: guid(&spec.class_id),
                instance_id: guid(&spec.instance_id),
                offer_flags: spec.offer_flags,
                mmio_megabytes: spec.mmio_megabytes,
                user_def: spec.user_def,
                backend: spec.backend,
                faults: spec.faults,
                subchannels: 0,
                channels: BTreeMap::new(),
                ghosts: Vec::new(),
                removed: false,
                steps: 0,
            },
        );
        if self.offers_live() {
            self.offer_device(id);
        }
        self.flush_notify();
        id
    }

    /// Replaces a device's faults (takes effect from the next message).
    pub fn set_faults(&mut self, dev: DeviceId, faults: Faults) {
        if let Some(d) = self.devices.get_mut(&dev) {
            d.faults = faults;
        }
    }

    /// Offers sub-channels so that indices `1..=count` of `dev` exist (same instance id,
    /// new relids and connection ids); only the missing ones are offered. While offers
    /// are not live the request is remembered for the next REQUESTOFFERS.
    pub fn offer_subchannels(&mut self, dev: DeviceId, count: u16) {
        self.offer_subchannels_inner(dev, count);
        self.flush_notify();
    }

    fn offer_subchannels_inner(&mut self, dev: DeviceId, count: u16) {
        let live = self.offers_live();
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        if d.removed {
            return;
        }
        d.subchannels = d.subchannels.max(count);
        // Sub-channels follow their primary: offer them only once it is offered.
        if live && d.channels.contains_key(&0) {
            let missing: Vec<u16> = (1..=d.subchannels)
                .filter(|i| !d.channels.contains_key(i))
                .collect();
            for i in missing {
                self.offer_channel(dev, i, false);
            }
        }
    }

    /// Offers the primary (and a duplicate if configured) and any wanted sub-channels.
    fn offer_device(&mut self, dev: DeviceId) {
        let Some(d) = self.devices.get(&dev) else {
            return;
        };
        if d.removed || d.channels.contains_key(&0) {
            return;
        }
        let dup = d.faults.duplicate_primary_offer;
        let subs = d.subchannels;
        let Some(relid) = self.offer_channel(dev, 0, false) else {
            return;
        };
        match dup {
            Some(DuplicateOffer::SameRelid) => {
                let offer = self.build_offer(dev, relid, 0);
                self.send(&offer, OrderKey::Device(dev));
                self.counters.offers_sent += 1;
            }
            Some(DuplicateOffer::NewRelid) => {
                self.offer_channel(dev, 0, true);
            }
            None => {}
        }
        self.offer_subchannels_inner(dev, subs);
    }

    fn build_offer(&self, dev: DeviceId, relid: u32, sub_index: u16) -> OfferChannel {
        let mut offer = OfferChannel::zeroed();
        if let Some(d) = self.devices.get(&dev) {
            offer.offer = ChannelOffer {
                if_type: d.class_id,
                if_instance: d.instance_id,
                reserved1: 0.into(),
                reserved2: 0.into(),
                chn_flags: d.offer_flags.into(),
                mmio_megabytes: d.mmio_megabytes.into(),
                user_def: d.user_def,
                sub_channel_index: sub_index.into(),
                reserved3: 0.into(),
            };
        }
        offer.child_relid = relid.into();
        // No monitored notification: the guest signals with HvSignalEvent. OpenVMM uses
        // monitor id 0xff when none is allocated.
        offer.monitorid = 0xff;
        offer.monitor_allocated = 0;
        offer.is_dedicated_interrupt = 1.into();
        offer.connection_id = (relid | (u32::from(VMBUS_MESSAGE_SINT) << 12)).into();
        offer
    }

    /// Allocates a relid and queues an offer; returns the relid.
    fn offer_channel(&mut self, dev: DeviceId, sub_index: u16, duplicate: bool) -> Option<u32> {
        let Some(relid) = self.alloc_relid() else {
            log::warn!("hvemu: out of relids, device {dev:?} index {sub_index} not offered");
            return None;
        };
        let offer = self.build_offer(dev, relid, sub_index);
        let mut sum = ChannelSummary::new(relid, dev, sub_index, offer.connection_id.get());
        sum.duplicate = duplicate;
        self.channels.insert(
            relid,
            Channel {
                device: dev,
                sum,
                state: ChanState::Closed,
            },
        );
        if let Some(d) = self.devices.get_mut(&dev) {
            if duplicate {
                d.ghosts.push(relid);
            } else {
                d.channels.insert(sub_index, relid);
            }
        }
        self.send(&offer, OrderKey::Device(dev));
        self.counters.offers_sent += 1;
        Some(relid)
    }

    /// Hot-removes a device: RESCIND_CHANNELOFFER for each of its channels, sub-channels
    /// (highest index first) then the primary. The host closes the ring ends at once; the
    /// relids stay taken until the guest releases them.
    pub fn remove_device(&mut self, dev: DeviceId) {
        self.remove_device_inner(dev);
        self.flush_notify();
    }

    /// Rescinds one sub-channel (index > 0) of a device that stays present, as a host
    /// does when it takes a queue away. Returns whether such a channel existed.
    pub fn rescind_subchannel(&mut self, dev: DeviceId, sub_index: u16) -> bool {
        let relid = match self.devices.get(&dev) {
            Some(d) if sub_index > 0 && !d.removed => d.channels.get(&sub_index).copied(),
            _ => None,
        };
        let Some(relid) = relid else { return false };
        self.rescind_channel(relid);
        self.flush_notify();
        true
    }

    fn remove_device_inner(&mut self, dev: DeviceId) {
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        if d.removed {
            return;
        }
        d.removed = true;
        let relids: Vec<u32> = d.channels.values().rev().copied().collect();
        let ghosts = std::mem::take(&mut d.ghosts);
        for relid in ghosts {
            // Never rescinded (the guest should have dropped the duplicate); just gone.
            self.close_ring(relid);
            self.drop_channel_gpadls(relid);
            self.retire_channel(relid);
        }
        for relid in relids {
            self.rescind_channel(relid);
        }
    }

    fn rescind_channel(&mut self, relid: u32) {
        let Some(ch) = self.channels.get(&relid) else {
            return;
        };
        if matches!(ch.state, ChanState::Revoked) {
            return;
        }
        let dev = ch.device;
        self.close_ring(relid);
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.state = ChanState::Revoked;
            ch.sum.rescinded = true;
            ch.sum.state = ChannelState::Rescinded;
        }
        self.send(
            &RescindChannelOffer {
                child_relid: relid.into(),
            },
            OrderKey::Device(dev),
        );
        self.counters.rescinds_sent += 1;
    }

    /// Closes the host ring ends of `relid` if open (tells the back end), and cancels a
    /// pending open. Leaves the channel `Closed`.
    fn close_ring(&mut self, relid: u32) {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        let old = std::mem::replace(&mut ch.state, ChanState::Closed);
        match old {
            ChanState::Open { ring, .. } => {
                let rs = ring.stats();
                ch.sum.packets_in += rs.packets_in;
                ch.sum.packets_out += rs.packets_out;
                ch.sum.state = ChannelState::Offered;
                let ctx = ChannelCtx {
                    device: ch.device,
                    relid,
                    sub_index: ch.sum.sub_index,
                    target_vp: ch.sum.target_vp,
                    version: match self.conn {
                        Connection::Connected(i) => i.version,
                        Connection::Disconnected => VmbusVersion(0),
                    },
                };
                if let Some(d) = self.devices.get_mut(&ch.device) {
                    d.backend.on_close(ctx);
                }
            }
            ChanState::Revoked => ch.state = ChanState::Revoked,
            ChanState::Opening(_) | ChanState::Closed => {
                ch.sum.state = ChannelState::Offered;
            }
        }
    }

    /// Removes a channel record (released or dropped), keeping its summary.
    fn retire_channel(&mut self, relid: u32) {
        let Some(mut ch) = self.channels.remove(&relid) else {
            return;
        };
        ch.sum.state = ChannelState::Released;
        ch.sum.gpadls_live = 0;
        if let Some(d) = self.devices.get_mut(&ch.device) {
            if d.channels.get(&ch.sum.sub_index) == Some(&relid) {
                d.channels.remove(&ch.sum.sub_index);
            }
            d.ghosts.retain(|&r| r != relid);
        }
        self.history.push(ch.sum);
    }

    fn drop_gpadl(&mut self, id: u32) {
        let Some(g) = self.gpadls.remove(&id) else {
            return;
        };
        if let Some(ready) = g.ready {
            self.mem.unpin(&ready.pfns);
            self.counters.gpadls_dropped += 1;
            if let Some(ch) = self.channels.get_mut(&g.relid) {
                ch.sum.gpadls_dropped += 1;
                ch.sum.gpadls_live = ch.sum.gpadls_live.saturating_sub(1);
            }
        }
    }

    fn drop_channel_gpadls(&mut self, relid: u32) {
        let ids: Vec<u32> = self
            .gpadls
            .iter()
            .filter(|(_, g)| g.relid == relid)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.drop_gpadl(id);
        }
        self.ignored_gpadls.retain(|_, r| *r != relid);
    }

    // -----------------------------------------------------------------------------------
    // GPADLs.

    /// Looks up a channel for a message, recording a violation if it is unknown.
    fn channel_for(&mut self, relid: u32, what: &str) -> Option<(DeviceId, u16, bool)> {
        match self.channels.get(&relid) {
            Some(ch) => Some((
                ch.device,
                ch.sum.sub_index,
                matches!(ch.state, ChanState::Revoked),
            )),
            None => {
                let kind = ViolationKind::UnknownRelid;
                self.violation(kind, Some(relid), format!("{what} for unknown relid"));
                None
            }
        }
    }

    fn ignore_after_rescind(&mut self, relid: u32) {
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.ignored_after_rescind += 1;
        }
    }

    fn handle_gpadl_header(&mut self, m: &GpadlHeaderMsg<'_>) {
        let relid = m.header.child_relid.get();
        let id = m.header.gpadl.get();
        let Some((device, _, revoked)) = self.channel_for(relid, "GPADL_HEADER") else {
            return;
        };
        if revoked {
            self.ignored_gpadls.insert(id, relid);
            self.ignore_after_rescind(relid);
            return;
        }
        if id == 0 {
            self.violation(ViolationKind::GpadlBadHandle, Some(relid), "GPADL handle 0");
            return;
        }
        if self.gpadls.contains_key(&id) || self.ignored_gpadls.contains_key(&id) {
            self.violation(
                ViolationKind::GpadlDuplicate,
                Some(relid),
                format!("GPADL {id:#x} already exists"),
            );
            return;
        }
        self.gpadls.insert(
            id,
            Gpadl {
                relid,
                device,
                header: m.header,
                words: m.words.iter().map(|w| w.get()).collect(),
                bodies: 0,
                ready: None,
            },
        );
        self.maybe_complete_gpadl(id);
    }

    fn handle_gpadl_body(&mut self, m: &GpadlBodyMsg<'_>) {
        let id = m.body.gpadl.get();
        if let Some(&relid) = self.ignored_gpadls.get(&id) {
            self.ignore_after_rescind(relid);
            return;
        }
        let Some(g) = self.gpadls.get(&id) else {
            self.violation(
                ViolationKind::GpadlUnknown,
                None,
                format!("GPADL_BODY for unknown GPADL {id:#x}"),
            );
            return;
        };
        let relid = g.relid;
        if g.ready.is_some() {
            self.violation(
                ViolationKind::GpadlAlreadyComplete,
                Some(relid),
                format!("GPADL_BODY for complete GPADL {id:#x}"),
            );
            return;
        }
        if self
            .channels
            .get(&relid)
            .is_some_and(|c| matches!(c.state, ChanState::Revoked))
        {
            // Bodies of a GPADL begun before the rescind: no answer any more; the partial
            // GPADL goes away with the relid.
            self.ignore_after_rescind(relid);
            return;
        }
        let msgnumber = m.body.msgnumber.get();
        if msgnumber != 0 {
            self.violation(
                ViolationKind::GpadlBodyNumber,
                Some(relid),
                format!("GPADL {id:#x} body msgnumber {msgnumber}"),
            );
        }
        let total = self.gpadls.get(&id).map_or(0, |g| g.header.total_words());
        let Some(g) = self.gpadls.get_mut(&id) else {
            return;
        };
        if g.words.len() + m.words.len() > total {
            let have = g.words.len();
            self.gpadls.remove(&id);
            self.violation(
                ViolationKind::GpadlOverflow,
                Some(relid),
                format!(
                    "GPADL {id:#x}: {have} + {} words, header announced {total}",
                    m.words.len()
                ),
            );
            self.send_gpadl_created(relid, id, STATUS_UNSUCCESSFUL);
            return;
        }
        g.words.extend(m.words.iter().map(|w| w.get()));
        g.bodies += 1;
        self.maybe_complete_gpadl(id);
    }

    fn send_gpadl_created(&mut self, relid: u32, id: u32, status: u32) {
        let dev = self.channels.get(&relid).map(|c| c.device);
        let key = dev.map_or(OrderKey::Barrier, OrderKey::Device);
        self.send(
            &GpadlCreated {
                child_relid: relid.into(),
                gpadl: id.into(),
                creation_status: status.into(),
            },
            key,
        );
    }

    /// Once all range data is in: parse it, check every page, pin, answer.
    fn maybe_complete_gpadl(&mut self, id: u32) {
        let Some(g) = self.gpadls.get(&id) else {
            return;
        };
        if g.words.len() < g.header.total_words() {
            return;
        }
        let relid = g.relid;
        let words: Vec<U64> = g.words.iter().map(|&w| U64::new(w)).collect();
        let parsed = g.header.parse_ranges(&words).map(|ranges| {
            ranges
                .iter()
                .map(|r| OwnedGpaRange {
                    byte_count: r.byte_count,
                    byte_offset: r.byte_offset,
                    pfns: r.pfns.iter().map(|p| p.get()).collect(),
                })
                .collect::<Vec<_>>()
        });
        let ranges = match parsed {
            Ok(r) => r,
            Err(e) => {
                self.gpadls.remove(&id);
                self.violation(
                    ViolationKind::GpadlBadRanges,
                    Some(relid),
                    format!("GPADL {id:#x}: {e}"),
                );
                self.send_gpadl_created(relid, id, STATUS_UNSUCCESSFUL);
                return;
            }
        };
        let pfns: Vec<u64> = ranges.iter().flat_map(|r| r.pfns.iter().copied()).collect();
        let sub_index = self.channels.get(&relid).map_or(0, |c| c.sum.sub_index);
        let injected = self
            .devices
            .get(&g.device)
            .and_then(|d| d.faults.fail_gpadl)
            .filter(|(sel, _)| sel.matches(sub_index));
        if let Some((_, status)) = injected {
            self.gpadls.remove(&id);
            self.send_gpadl_created(relid, id, status);
            return;
        }
        if let Err(pfn) = self.mem.pin(&pfns) {
            self.gpadls.remove(&id);
            self.violation(
                ViolationKind::GpadlForeignPfn,
                Some(relid),
                format!("GPADL {id:#x} names page {pfn:#x}, not owned by the guest"),
            );
            self.send_gpadl_created(relid, id, STATUS_UNSUCCESSFUL);
            return;
        }
        if let Some(g) = self.gpadls.get_mut(&id) {
            g.ready = Some(ReadyGpadl { ranges, pfns });
            g.words = Vec::new();
        }
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.gpadls_live += 1;
            ch.sum.gpadls_created += 1;
        }
        self.counters.gpadls_created += 1;
        self.send_gpadl_created(relid, id, 0);
    }

    fn handle_gpadl_teardown(&mut self, m: &GpadlTeardown) {
        let relid = m.child_relid.get();
        let id = m.gpadl.get();
        let Some((dev, _, revoked)) = self.channel_for(relid, "GPADL_TEARDOWN") else {
            return;
        };
        if self.ignored_gpadls.get(&id) == Some(&relid) {
            self.ignore_after_rescind(relid);
            return;
        }
        let Some(g) = self.gpadls.get(&id) else {
            self.violation(
                ViolationKind::GpadlUnknown,
                Some(relid),
                format!("GPADL_TEARDOWN for unknown GPADL {id:#x}"),
            );
            return;
        };
        if g.relid != relid {
            let owner = g.relid;
            self.violation(
                ViolationKind::GpadlWrongChannel,
                Some(relid),
                format!("GPADL {id:#x} belongs to relid {owner}"),
            );
            return;
        }
        if g.ready.is_none() {
            if revoked {
                // Half-built when the rescind came: nothing to tear down, but let the guest
                // finish its cleanup.
                self.gpadls.remove(&id);
                self.send(&GpadlTorndown { gpadl: id.into() }, OrderKey::Device(dev));
            } else {
                self.violation(
                    ViolationKind::GpadlIncomplete,
                    Some(relid),
                    format!("GPADL_TEARDOWN for GPADL {id:#x} still being built"),
                );
            }
            return;
        }
        let in_use = self
            .channels
            .get(&relid)
            .is_some_and(|c| matches!(c.state, ChanState::Open { gpadl, .. } if gpadl == id));
        if in_use {
            self.violation(
                ViolationKind::GpadlInUse,
                Some(relid),
                format!("GPADL_TEARDOWN for ring GPADL {id:#x} of an open channel"),
            );
            return;
        }
        if let Some(g) = self.gpadls.remove(&id) {
            if let Some(ready) = g.ready {
                self.mem.unpin(&ready.pfns);
            }
        }
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.gpadls_live = ch.sum.gpadls_live.saturating_sub(1);
            ch.sum.gpadls_torn_down += 1;
        }
        self.counters.gpadls_torn_down += 1;
        self.send(&GpadlTorndown { gpadl: id.into() }, OrderKey::Device(dev));
    }

    // -----------------------------------------------------------------------------------
    // Open, close, modify, release.

    fn send_open_result(&mut self, dev: DeviceId, relid: u32, openid: u32, status: u32) {
        self.send(
            &OpenResult {
                child_relid: relid.into(),
                openid: openid.into(),
                status: status.into(),
            },
            OrderKey::Device(dev),
        );
        if let Some(ch) = self.channels.get_mut(&relid) {
            if status == 0 {
                ch.sum.opens += 1;
            } else {
                ch.sum.open_failures += 1;
            }
        }
    }

    fn handle_open_channel(&mut self, m: &OpenChannel) {
        let relid = m.child_relid.get();
        let Some((dev, sub_index, revoked)) = self.channel_for(relid, "OPENCHANNEL") else {
            return;
        };
        if revoked {
            self.ignore_after_rescind(relid);
            return;
        }
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        if !matches!(ch.state, ChanState::Closed) {
            self.violation(
                ViolationKind::OpenAlreadyOpen,
                Some(relid),
                "OPENCHANNEL while open or opening",
            );
            return;
        }
        ch.sum.open_requests += 1;
        ch.sum.target_vp = m.target_vp.get();
        let faults = self.devices.get(&dev).map(|d| d.faults).unwrap_or_default();
        if faults
            .never_answer_open
            .is_some_and(|sel| sel.matches(sub_index))
        {
            ch.state = ChanState::Opening(PendingOpen { request: *m });
            ch.sum.state = ChannelState::Opening;
            return;
        }
        self.open_now(dev, sub_index, m, faults);
    }

    /// Answers an OPENCHANNEL that [`Faults::never_answer_open`] swallowed: with
    /// `status` 0 the open is carried out now (validated as usual), otherwise it fails with
    /// `status`. Returns false if `relid` has no swallowed open.
    pub fn answer_pending_open(&mut self, relid: u32, status: u32) -> bool {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return false;
        };
        if !matches!(ch.state, ChanState::Opening(_)) {
            return false;
        }
        let ChanState::Opening(pending) = std::mem::replace(&mut ch.state, ChanState::Closed)
        else {
            return false;
        };
        ch.sum.state = ChannelState::Offered;
        let (dev, sub_index) = (ch.device, ch.sum.sub_index);
        let m = pending.request;
        if status != 0 {
            self.send_open_result(dev, relid, m.openid.get(), status);
        } else {
            let faults = self.devices.get(&dev).map(|d| d.faults).unwrap_or_default();
            self.open_now(dev, sub_index, &m, faults);
        }
        self.flush_notify();
        true
    }

    /// Validates an open request and, if it is good, opens the ring ends and asks the
    /// back end.
    fn open_now(&mut self, dev: DeviceId, sub_index: u16, m: &OpenChannel, faults: Faults) {
        let relid = m.child_relid.get();
        let openid = m.openid.get();
        let gpadl_id = m.ringbuffer_gpadlhandle.get();
        let pages = match self.gpadls.get(&gpadl_id) {
            Some(g) if g.relid == relid => g.ready.as_ref().map(|r| r.ranges.clone()),
            _ => None,
        };
        let Some(ranges) = pages else {
            self.violation(
                ViolationKind::OpenBadGpadl,
                Some(relid),
                format!("ring GPADL {gpadl_id:#x} missing, incomplete or not this channel's"),
            );
            self.send_open_result(dev, relid, openid, STATUS_UNSUCCESSFUL);
            return;
        };
        if ranges
            .iter()
            .any(|r| r.byte_offset != 0 || !(r.byte_count as usize).is_multiple_of(PAGE_SIZE))
        {
            self.violation(
                ViolationKind::OpenBadRingLayout,
                Some(relid),
                "ring GPADL is not whole pages",
            );
            self.send_open_result(dev, relid, openid, STATUS_UNSUCCESSFUL);
            return;
        }
        let pfns: Vec<u64> = ranges.iter().flat_map(|r| r.pfns.iter().copied()).collect();
        let offset = m.downstream_ringbuffer_pageoffset.get() as usize;
        if offset < 2 || pfns.len() < offset.saturating_add(2) {
            self.violation(
                ViolationKind::OpenBadRingLayout,
                Some(relid),
                format!(
                    "downstream offset {offset} in a {}-page ring GPADL",
                    pfns.len()
                ),
            );
            self.send_open_result(dev, relid, openid, STATUS_UNSUCCESSFUL);
            return;
        }
        let target_vp = m.target_vp.get();
        if target_vp >= self.config.vp_count {
            self.violation(
                ViolationKind::OpenBadTargetVp,
                Some(relid),
                format!("target VP {target_vp}"),
            );
            self.send_open_result(dev, relid, openid, STATUS_UNSUCCESSFUL);
            return;
        }
        if let Some((sel, status)) = faults.fail_open {
            if sel.matches(sub_index) {
                self.send_open_result(dev, relid, openid, status);
                return;
            }
        }
        let mut ring = match HostRing::new(self.mem.clone(), &pfns, offset) {
            Ok(r) => Box::new(r),
            Err(c) => {
                self.violation(
                    ViolationKind::OpenBadRingIndices,
                    Some(relid),
                    c.to_string(),
                );
                self.send_open_result(dev, relid, openid, STATUS_UNSUCCESSFUL);
                return;
            }
        };

        // Let the device accept the open.
        let ctx = ChannelCtx {
            device: dev,
            relid,
            sub_index,
            target_vp,
            version: self.version(),
        };
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        let mut actions = HostActions::new(dev, d.subchannels, &self.mem, &self.gpadls);
        let accepted = d.backend.on_open(ctx, &mut ring, &mut actions);
        let (offer_subs, rescind) = (actions.offer_subchannels, actions.rescind);
        match accepted {
            Ok(()) => {
                self.send_open_result(dev, relid, openid, 0);
                if let Some(ch) = self.channels.get_mut(&relid) {
                    ch.state = ChanState::Open {
                        ring,
                        gpadl: gpadl_id,
                    };
                    ch.sum.state = ChannelState::Open;
                }
                self.collect_ring(relid);
            }
            Err(status) => {
                let status = if status == 0 {
                    STATUS_UNSUCCESSFUL
                } else {
                    status
                };
                self.send_open_result(dev, relid, openid, status);
            }
        }
        self.apply_actions(dev, offer_subs, rescind);
    }

    fn handle_close_channel(&mut self, m: &CloseChannel) {
        let relid = m.child_relid.get();
        let Some((_, _, revoked)) = self.channel_for(relid, "CLOSECHANNEL") else {
            return;
        };
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        if revoked {
            // The host already closed its ends when it rescinded.
            ch.sum.closes += 1;
            return;
        }
        match ch.state {
            ChanState::Closed => {
                self.violation(
                    ViolationKind::CloseNotOpen,
                    Some(relid),
                    "CLOSECHANNEL on a closed channel",
                );
            }
            // An open that was never answered: the guest gave up on it. Cancel quietly.
            ChanState::Opening(_) | ChanState::Open { .. } => {
                ch.sum.closes += 1;
                self.close_ring(relid);
            }
            ChanState::Revoked => {}
        }
    }

    fn handle_modify_channel(&mut self, m: &ModifyChannel) {
        let relid = m.child_relid.get();
        let Some((dev, _, _)) = self.channel_for(relid, "MODIFYCHANNEL") else {
            return;
        };
        let version = self.version();
        let target_vp = m.target_vp.get();
        let open = self
            .channels
            .get(&relid)
            .is_some_and(|c| matches!(c.state, ChanState::Open { .. }));
        let status = if version < VmbusVersion::WIN10_V4_1 {
            self.violation(
                ViolationKind::ModifyInvalid,
                Some(relid),
                format!("MODIFYCHANNEL in {version}"),
            );
            return;
        } else if !open {
            self.violation(
                ViolationKind::ModifyInvalid,
                Some(relid),
                "MODIFYCHANNEL on a channel not open",
            );
            STATUS_UNSUCCESSFUL
        } else if target_vp >= self.config.vp_count {
            self.violation(
                ViolationKind::OpenBadTargetVp,
                Some(relid),
                format!("target VP {target_vp}"),
            );
            STATUS_UNSUCCESSFUL
        } else {
            if let Some(ch) = self.channels.get_mut(&relid) {
                ch.sum.target_vp = target_vp;
            }
            0
        };
        // Only 5.3 hosts acknowledge (hyperv-facts.md 5.7).
        if version >= VmbusVersion::WIN10_V5_3 {
            self.send(
                &ModifyChannelResponse {
                    child_relid: relid.into(),
                    status: status.into(),
                },
                OrderKey::Device(dev),
            );
        }
    }

    fn handle_relid_released(&mut self, m: &RelidReleased) {
        let relid = m.child_relid.get();
        let Some(ch) = self.channels.get(&relid) else {
            if self.released_relids.contains(&relid) {
                self.violation(
                    ViolationKind::ReleaseTwice,
                    Some(relid),
                    "RELID_RELEASED twice",
                );
            } else {
                self.violation(
                    ViolationKind::UnknownRelid,
                    Some(relid),
                    "RELID_RELEASED for unknown relid",
                );
            }
            return;
        };
        if !matches!(ch.state, ChanState::Revoked) {
            self.violation(
                ViolationKind::ReleaseNotRescinded,
                Some(relid),
                "RELID_RELEASED for a channel the host did not rescind",
            );
            return;
        }
        self.drop_channel_gpadls(relid);
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.relid_released += 1;
        }
        self.retire_channel(relid);
        self.released_relids.insert(relid);
        self.counters.relids_released += 1;
    }

    // -----------------------------------------------------------------------------------
    // Signals and back ends.

    /// HvSignalEvent from the guest: finds the open channel whose offer carried
    /// `connection_id` and lets its back end process the ring. Fails with
    /// INVALID_CONNECTION_ID if no open channel has that id (e.g. it was just rescinded).
    pub fn signal_event(&mut self, connection_id: u32) -> Result<(), u16> {
        let relid = self.channels.iter().find_map(|(&r, c)| {
            (c.sum.connection_id == connection_id && matches!(c.state, ChanState::Open { .. }))
                .then_some(r)
        });
        let Some(relid) = relid else {
            self.counters.stray_signals += 1;
            self.counters.posts_rejected += 1;
            return Err(status::INVALID_CONNECTION_ID);
        };
        self.counters.signals += 1;
        if let Some(ch) = self.channels.get_mut(&relid) {
            ch.sum.signals += 1;
            if let ChanState::Open { ring, .. } = &ch.state {
                if ring.incoming_interrupt_masked() {
                    ch.sum.signals_while_masked += 1;
                }
            }
        }
        self.run_backend(relid, false);
        self.flush_notify();
        Ok(())
    }

    /// Lets every open channel of `dev` make progress on its own
    /// ([`DeviceBackend::on_poll`]).
    pub fn poll_device(&mut self, dev: DeviceId) {
        let relids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| c.device == dev && matches!(c.state, ChanState::Open { .. }))
            .map(|(&r, _)| r)
            .collect();
        for relid in relids {
            self.run_backend(relid, true);
        }
        self.flush_notify();
    }

    fn run_backend(&mut self, relid: u32, poll: bool) {
        let version = self.version();
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        let ChanState::Open { ring, .. } = &mut ch.state else {
            return;
        };
        let dev = ch.device;
        let ctx = ChannelCtx {
            device: dev,
            relid,
            sub_index: ch.sum.sub_index,
            target_vp: ch.sum.target_vp,
            version,
        };
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        let mut actions = HostActions::new(dev, d.subchannels, &self.mem, &self.gpadls);
        if poll {
            d.backend.on_poll(ctx, ring, &mut actions);
        } else {
            d.backend.on_packets(ctx, ring, &mut actions);
        }
        let (offer_subs, rescind) = (actions.offer_subchannels, actions.rescind);
        self.collect_ring(relid);
        self.apply_actions(dev, offer_subs, rescind);
    }

    /// Turns a ring's signal request into the channel's event flag and its problems into
    /// violations.
    fn collect_ring(&mut self, relid: u32) {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        let ChanState::Open { ring, .. } = &mut ch.state else {
            return;
        };
        let signal = ring.take_guest_signal();
        let (corrupt, malformed) = ring.take_unreported();
        if signal {
            self.set_event(relid);
        }
        if let Some(c) = corrupt {
            self.violation(ViolationKind::RingCorrupt, Some(relid), c.to_string());
        }
        for e in malformed {
            self.violation(
                ViolationKind::RingMalformedPacket,
                Some(relid),
                e.to_string(),
            );
        }
    }

    fn apply_actions(&mut self, dev: DeviceId, offer_subs: Option<u16>, rescind: bool) {
        if let Some(n) = offer_subs {
            self.offer_subchannels_inner(dev, n);
        }
        if rescind {
            self.remove_device_inner(dev);
        }
    }

    /// Runs `f` on the open ring of `relid` (e.g. to write packets to the guest from a
    /// test), then raises the event flag if the ring rules call for it. `None` if the
    /// channel is not open.
    pub fn with_ring<R>(&mut self, relid: u32, f: impl FnOnce(&mut HostRing) -> R) -> Option<R> {
        let ch = self.channels.get_mut(&relid)?;
        let ChanState::Open { ring, .. } = &mut ch.state else {
            return None;
        };
        let r = f(ring);
        self.collect_ring(relid);
        self.flush_notify();
        Some(r)
    }

    /// The back end of `dev`, if it is a `T`.
    pub fn backend_mut<T: DeviceBackend>(&mut self, dev: DeviceId) -> Option<&mut T> {
        let d = self.devices.get_mut(&dev)?;
        let any: &mut dyn std::any::Any = d.backend.as_mut();
        any.downcast_mut::<T>()
    }

    // -----------------------------------------------------------------------------------
    // Observation.

    /// `(sub-channel index, relid)` of the device's offered, unreleased channels.
    pub fn device_channels(&self, dev: DeviceId) -> Vec<(u16, u32)> {
        self.devices
            .get(&dev)
            .map(|d| d.channels.iter().map(|(&i, &r)| (i, r)).collect())
            .unwrap_or_default()
    }

    /// The channel currently holding `relid`, or else the last one that held it.
    pub fn channel_summary(&self, relid: u32) -> Option<ChannelSummary> {
        if let Some(ch) = self.channels.get(&relid) {
            let mut s = ch.sum.clone();
            if let ChanState::Open { ring, .. } = &ch.state {
                s.packets_in += ring.stats().packets_in;
                s.packets_out += ring.stats().packets_out;
            }
            return Some(s);
        }
        self.history
            .iter()
            .rev()
            .find(|s| s.relid == relid)
            .cloned()
    }

    /// Summaries of all current channels, by relid.
    pub fn channels(&self) -> Vec<ChannelSummary> {
        self.channels
            .keys()
            .filter_map(|&r| self.channel_summary(r))
            .collect()
    }

    /// Summaries of channels released or dropped by UNLOAD, oldest first.
    pub fn released_channels(&self) -> &[ChannelSummary] {
        &self.history
    }

    /// Violations recorded so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Counters and violations.
    pub fn stats(&self) -> HostStats {
        let c = &self.counters;
        HostStats {
            messages_in: c.messages_in,
            messages_out: c.messages_out,
            pending_messages: self.out.len(),
            posts_rejected: c.posts_rejected,
            signals: c.signals,
            stray_signals: c.stray_signals,
            events_set: c.events_set,
            live_gpadls: self.gpadls.values().filter(|g| g.ready.is_some()).count(),
            partial_gpadls: self.gpadls.values().filter(|g| g.ready.is_none()).count(),
            gpadls_created: c.gpadls_created,
            gpadls_torn_down: c.gpadls_torn_down,
            gpadls_dropped: c.gpadls_dropped,
            offers_sent: c.offers_sent,
            rescinds_sent: c.rescinds_sent,
            relids_released: c.relids_released,
            unloads: c.unloads,
            implicit_resets: c.implicit_resets,
            violations: self.violations.clone(),
            memory_violations: self.mem.violations(),
        }
    }
}
