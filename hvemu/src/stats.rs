//! What the host observed: violations, counters, per-channel summaries.

use std::fmt;

use crate::device::DeviceId;
use crate::memory::MemoryViolation;

/// Which rule a guest message broke. Each malformed or out-of-state message is recorded
/// once, with a [`Violation::detail`] string, and otherwise ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// HvPostMessage payload longer than 240 bytes (the post fails).
    PayloadTooLong,
    /// HvPostMessage with a message type the guest may not use (high bit set; the post
    /// fails).
    ReservedMessageType,
    /// HvPostMessage with a message type other than 1 (VMBus); dropped.
    NotVmbusMessage,
    /// HvPostMessage to a connection id with no port behind it (the post fails).
    UnknownConnectionId,
    /// A message on a known port that is not the one this message must use (e.g. not the
    /// id VERSION_RESPONSE returned).
    WrongConnectionId,
    /// The channel message does not decode (short, bad lengths or counts, unknown type).
    Malformed,
    /// A fixed-size channel message longer than its structure (processed anyway, as Linux
    /// and OpenVMM tolerate extensions).
    Overlong,
    /// A message only the host sends (OFFERCHANNEL, GPADL_CREATED, ...).
    HostOnlyMessage,
    /// A message this host does not implement (hv_sock, OpenVMM-private messages).
    Unsupported,
    /// A message that needs a connection, before INITIATE_CONTACT succeeded.
    NotConnected,
    /// INITIATE_CONTACT with bad fields (SINT, VTL, target VP, monitor pages).
    BadInitiateContact,
    /// REQUESTOFFERS twice on one connection.
    OffersAlreadyRequested,
    /// A relid the host has not offered (or that was released).
    UnknownRelid,
    /// GPADL handle 0.
    GpadlBadHandle,
    /// GPADL handle already in use.
    GpadlDuplicate,
    /// GPADL_BODY or GPADL_TEARDOWN for a handle the host does not know.
    GpadlUnknown,
    /// GPADL_TEARDOWN naming another channel than the GPADL's.
    GpadlWrongChannel,
    /// GPADL_BODY for a GPADL that is already complete.
    GpadlAlreadyComplete,
    /// GPADL_BODY with a non-zero `msgnumber` (Linux and OpenVMM's client send 0).
    GpadlBodyNumber,
    /// More range data than the header's `range_buflen` announced.
    GpadlOverflow,
    /// Complete range data that does not parse (counts, offsets, lengths).
    GpadlBadRanges,
    /// A GPADL naming a page the guest does not own.
    GpadlForeignPfn,
    /// GPADL_TEARDOWN for the ring GPADL of an open channel.
    GpadlInUse,
    /// GPADL_TEARDOWN for a GPADL still being built.
    GpadlIncomplete,
    /// OPENCHANNEL for a channel already open or opening.
    OpenAlreadyOpen,
    /// OPENCHANNEL naming a GPADL that does not exist, is incomplete or belongs to another
    /// channel.
    OpenBadGpadl,
    /// OPENCHANNEL whose ring GPADL is not whole pages, or whose downstream offset leaves a
    /// ring without its control page and one data page.
    OpenBadRingLayout,
    /// OPENCHANNEL or MODIFYCHANNEL targeting a VP that does not exist.
    OpenBadTargetVp,
    /// The ring's initial indices are invalid at OPENCHANNEL.
    OpenBadRingIndices,
    /// CLOSECHANNEL for a channel that is not open.
    CloseNotOpen,
    /// MODIFYCHANNEL before VMBus 4.1 or on a channel that is not open.
    ModifyInvalid,
    /// RELID_RELEASED for a channel the host never rescinded.
    ReleaseNotRescinded,
    /// RELID_RELEASED for a relid already released.
    ReleaseTwice,
    /// The guest broke a ring's framing (indices, descriptors); the ring is dead.
    RingCorrupt,
    /// A well-framed ring packet with invalid contents; skipped.
    RingMalformedPacket,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One recorded guest violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The rule broken.
    pub kind: ViolationKind,
    /// The channel concerned, if known.
    pub relid: Option<u32>,
    /// Human-readable detail.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.relid {
            Some(r) => write!(f, "{} (relid {r}): {}", self.kind, self.detail),
            None => write!(f, "{}: {}", self.kind, self.detail),
        }
    }
}

/// Where a channel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Offered, not open.
    Offered,
    /// OPENCHANNEL received, no result sent (see [`crate::Faults::never_answer_open`]).
    Opening,
    /// Open: the host ring ends are live.
    Open,
    /// Rescinded; waiting for RELID_RELEASED.
    Rescinded,
    /// Released by the guest (or dropped by UNLOAD); the relid may be reused.
    Released,
}

/// Counters and state of one channel (one offer of one relid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSummary {
    /// Relid.
    pub relid: u32,
    /// Device.
    pub device: DeviceId,
    /// Sub-channel index (0 = primary).
    pub sub_index: u16,
    /// Event connection id given in the offer.
    pub connection_id: u32,
    /// Current state.
    pub state: ChannelState,
    /// A duplicate primary offer made by [`crate::DuplicateOffer::NewRelid`].
    pub duplicate: bool,
    /// GPADLs of this channel that exist now (complete).
    pub gpadls_live: usize,
    /// GPADL_CREATED sent with status 0.
    pub gpadls_created: u32,
    /// GPADL_TORNDOWN sent.
    pub gpadls_torn_down: u32,
    /// Complete GPADLs the host dropped at RELID_RELEASED or UNLOAD without a teardown.
    pub gpadls_dropped: u32,
    /// OPENCHANNEL messages accepted for processing.
    pub open_requests: u32,
    /// Successful opens (OPENCHANNEL_RESULT status 0).
    pub opens: u32,
    /// OPENCHANNEL_RESULT with a failure status.
    pub open_failures: u32,
    /// CLOSECHANNEL messages accepted.
    pub closes: u32,
    /// RESCIND_CHANNELOFFER sent.
    pub rescinded: bool,
    /// RELID_RELEASED accepted (0 or 1).
    pub relid_released: u32,
    /// Guest messages for this channel ignored because it was rescinded (GPADL creation,
    /// OPENCHANNEL: the host does not answer them).
    pub ignored_after_rescind: u32,
    /// HvSignalEvent calls on this channel while open.
    pub signals: u64,
    /// Of those, calls while the host had masked the guest-to-host ring's interrupts.
    pub signals_while_masked: u64,
    /// Event flags set for the guest.
    pub events: u64,
    /// Packets read from the guest (all opens).
    pub packets_in: u64,
    /// Packets written to the guest (all opens).
    pub packets_out: u64,
    /// Target VP of the current or last open.
    pub target_vp: u32,
}

impl ChannelSummary {
    pub(crate) fn new(relid: u32, device: DeviceId, sub_index: u16, connection_id: u32) -> Self {
        ChannelSummary {
            relid,
            device,
            sub_index,
            connection_id,
            state: ChannelState::Offered,
            duplicate: false,
            gpadls_live: 0,
            gpadls_created: 0,
            gpadls_torn_down: 0,
            gpadls_dropped: 0,
            open_requests: 0,
            opens: 0,
            open_failures: 0,
            closes: 0,
            rescinded: false,
            relid_released: 0,
            ignored_after_rescind: 0,
            signals: 0,
            signals_while_masked: 0,
            events: 0,
            packets_in: 0,
            packets_out: 0,
            target_vp: 0,
        }
    }
}

/// Host-wide counters and the violation list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostStats {
    /// VMBus messages the guest posted (type 1, accepted by the hypervisor).
    pub messages_in: u64,
    /// Messages the guest took from the SynIC slot.
    pub messages_out: u64,
    /// Messages queued for the guest and not yet taken.
    pub pending_messages: usize,
    /// Posts that failed with a hypervisor status (bad connection id, too long, busy).
    pub posts_rejected: u64,
    /// HvSignalEvent calls that reached an open channel.
    pub signals: u64,
    /// HvSignalEvent calls with no open channel behind the connection id (failed; races
    /// with a rescind make these legitimate, so they are not violations).
    pub stray_signals: u64,
    /// Event flags set for the guest.
    pub events_set: u64,
    /// GPADLs that exist now (complete).
    pub live_gpadls: usize,
    /// GPADLs being assembled (header seen, bodies missing).
    pub partial_gpadls: usize,
    /// GPADL_CREATED sent with status 0.
    pub gpadls_created: u64,
    /// GPADL_TORNDOWN sent.
    pub gpadls_torn_down: u64,
    /// Complete GPADLs dropped without a teardown (release after rescind, UNLOAD).
    pub gpadls_dropped: u64,
    /// OFFERCHANNEL messages queued (duplicates included).
    pub offers_sent: u64,
    /// RESCIND_CHANNELOFFER messages queued.
    pub rescinds_sent: u64,
    /// RELID_RELEASED accepted.
    pub relids_released: u64,
    /// UNLOADs handled.
    pub unloads: u64,
    /// INITIATE_CONTACT while connected: handled as an implicit unload, then a new contact.
    pub implicit_resets: u64,
    /// Violations, in order.
    pub violations: Vec<Violation>,
    /// Guest memory misuse (double free, freeing pinned pages, ...).
    pub memory_violations: Vec<MemoryViolation>,
}

impl HostStats {
    /// Number of violations of `kind`.
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}
