//! Synthetic interrupt controller (SynIC) and hypercall formats.
//!
//! Covers what a VMBus guest and an emulated hypervisor exchange below the channel
//! protocol: the 256-byte message slot of the SIMP page, the HvPostMessage and
//! HvSignalEvent inputs, the hypercall control and result words, and the bit layouts of
//! the SynIC, hypercall and reference-TSC MSRs.
//!
//! Sources: Linux `include/hyperv/hvgdk_mini.h` and `drivers/hv/hyperv_vmbus.h`, as
//! summarised in `shared/reference/hyperv-facts.md` sections 2-4 and
//! `shared/reference/wire-layouts.md` section 3.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{WireError, U16, U32, U64};

/// Bytes in one SynIC message slot (`HV_MESSAGE_SIZE`, hvgdk_mini.h).
pub const HV_MESSAGE_SIZE: usize = 256;
/// Payload bytes in one message slot (`HV_MESSAGE_PAYLOAD_BYTE_COUNT`, hvgdk_mini.h).
pub const HV_MESSAGE_PAYLOAD_BYTE_COUNT: usize = 240;
/// Payload size in u64 words (`HV_MESSAGE_PAYLOAD_QWORD_COUNT`, hvgdk_mini.h).
pub const HV_MESSAGE_PAYLOAD_QWORD_COUNT: usize = 30;
/// SINTs per virtual processor (`HV_SYNIC_SINT_COUNT`, hvgdk_mini.h).
pub const HV_SYNIC_SINT_COUNT: usize = 16;
/// Synthetic timers per virtual processor (`HV_SYNIC_STIMER_COUNT`, hvgdk_mini.h).
pub const HV_SYNIC_STIMER_COUNT: usize = 4;
/// Lowest vector a SINT may use (`HV_SYNIC_FIRST_VALID_VECTOR`, hvgdk_mini.h).
pub const HV_SYNIC_FIRST_VALID_VECTOR: u8 = 16;
/// SINT reserved for intercepts (`HV_SYNIC_INTERCEPTION_SINT_INDEX`, hvgdk_mini.h).
pub const HV_SYNIC_INTERCEPTION_SINT_INDEX: u8 = 0;
/// SINT reserved for IOMMU faults (`HV_SYNIC_IOMMU_FAULT_SINT_INDEX`, hvgdk_mini.h).
pub const HV_SYNIC_IOMMU_FAULT_SINT_INDEX: u8 = 1;
/// First SINT no one reserves (`HV_SYNIC_FIRST_UNUSED_SINT_INDEX`, hvgdk_mini.h).
pub const HV_SYNIC_FIRST_UNUSED_SINT_INDEX: u8 = 5;
/// Bytes of one SINT's entry in the event-flags (SIEF) page (hyperv_vmbus.h).
pub const HV_EVENT_FLAGS_BYTE_COUNT: usize = 256;
/// Flag bits in one SINT's entry of the event-flags page (`HV_EVENT_FLAGS_COUNT`).
pub const HV_EVENT_FLAGS_COUNT: usize = HV_EVENT_FLAGS_BYTE_COUNT * 8;
/// Size of the SIMP and SIEF pages.
pub const HV_SYNIC_PAGE_SIZE: usize = 4096;
/// Bits of a connection id that are significant (`union hv_connection_id`, 24 bits).
pub const HV_CONNECTION_ID_MASK: u32 = 0x00FF_FFFF;

/// Byte offset of SINT `sint`'s slot in the SIMP page (slot n belongs to SINTn).
pub const fn simp_slot_offset(sint: u8) -> usize {
    (sint as usize % HV_SYNIC_SINT_COUNT) * HV_MESSAGE_SIZE
}

/// Byte offset of SINT `sint`'s flag block in the SIEF page.
pub const fn sief_slot_offset(sint: u8) -> usize {
    (sint as usize % HV_SYNIC_SINT_COUNT) * HV_EVENT_FLAGS_BYTE_COUNT
}

// ---------------------------------------------------------------------------------------
// MSR numbers (hyperv-facts.md section 2, Linux hvgdk_mini.h).

/// Guest OS identity; must be non-zero before the hypercall page is enabled.
pub const HV_X64_MSR_GUEST_OS_ID: u32 = 0x4000_0000;
/// Hypercall page control ([`PageMsr`] layout).
pub const HV_X64_MSR_HYPERCALL: u32 = 0x4000_0001;
/// Read-only index of the current virtual processor.
pub const HV_X64_MSR_VP_INDEX: u32 = 0x4000_0002;
/// Partition reset.
pub const HV_X64_MSR_RESET: u32 = 0x4000_0003;
/// Virtual processor run time.
pub const HV_X64_MSR_VP_RUNTIME: u32 = 0x4000_0010;
/// Partition reference counter, 100 ns units.
pub const HV_X64_MSR_TIME_REF_COUNT: u32 = 0x4000_0020;
/// Reference TSC page control ([`PageMsr`] layout).
pub const HV_X64_MSR_REFERENCE_TSC: u32 = 0x4000_0021;
/// TSC frequency in Hz.
pub const HV_X64_MSR_TSC_FREQUENCY: u32 = 0x4000_0022;
/// Local APIC timer frequency in Hz.
pub const HV_X64_MSR_APIC_FREQUENCY: u32 = 0x4000_0023;
/// Synthetic APIC EOI register.
pub const HV_X64_MSR_EOI: u32 = 0x4000_0070;
/// Synthetic APIC ICR register.
pub const HV_X64_MSR_ICR: u32 = 0x4000_0071;
/// Synthetic APIC TPR register.
pub const HV_X64_MSR_TPR: u32 = 0x4000_0072;
/// VP assist page control ([`PageMsr`] layout).
pub const HV_X64_MSR_VP_ASSIST_PAGE: u32 = 0x4000_0073;
/// SynIC control ([`ScontrolMsr`]).
pub const HV_X64_MSR_SCONTROL: u32 = 0x4000_0080;
/// SynIC version (reads 1).
pub const HV_X64_MSR_SVERSION: u32 = 0x4000_0081;
/// Event-flags page control ([`PageMsr`] layout).
pub const HV_X64_MSR_SIEFP: u32 = 0x4000_0082;
/// Message page control ([`PageMsr`] layout).
pub const HV_X64_MSR_SIMP: u32 = 0x4000_0083;
/// End of message: write 0 to have the next queued message delivered.
pub const HV_X64_MSR_EOM: u32 = 0x4000_0084;
/// SynIC "SIRBP" register.
pub const HV_X64_MSR_SIRBP: u32 = 0x4000_0085;
/// SINT0 ([`SintMsr`]); SINTn is `HV_X64_MSR_SINT0 + n`.
pub const HV_X64_MSR_SINT0: u32 = 0x4000_0090;
/// SINT15, the last SINT register.
pub const HV_X64_MSR_SINT15: u32 = 0x4000_009F;
/// STIMER0 configuration ([`StimerConfig`]); timer n is at `+ 2 * n`.
pub const HV_X64_MSR_STIMER0_CONFIG: u32 = 0x4000_00B0;
/// STIMER0 count; timer n is at `+ 2 * n`.
pub const HV_X64_MSR_STIMER0_COUNT: u32 = 0x4000_00B1;
/// Guest idle.
pub const HV_X64_MSR_GUEST_IDLE: u32 = 0x4000_00F0;
/// First crash parameter register (P0..P4 follow).
pub const HV_X64_MSR_CRASH_P0: u32 = 0x4000_0100;
/// Crash control register.
pub const HV_X64_MSR_CRASH_CTL: u32 = 0x4000_0105;
/// TSC invariant control.
pub const HV_X64_MSR_TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;

/// The SINTn MSR number, or `None` if `n` is not a SINT index.
pub const fn hv_x64_msr_sint(n: u8) -> Option<u32> {
    if (n as usize) < HV_SYNIC_SINT_COUNT {
        Some(HV_X64_MSR_SINT0 + n as u32)
    } else {
        None
    }
}

/// The STIMERn_CONFIG MSR number, or `None` if `n` is not a timer index.
pub const fn hv_x64_msr_stimer_config(n: u8) -> Option<u32> {
    if (n as usize) < HV_SYNIC_STIMER_COUNT {
        Some(HV_X64_MSR_STIMER0_CONFIG + 2 * n as u32)
    } else {
        None
    }
}

/// The STIMERn_COUNT MSR number, or `None` if `n` is not a timer index.
pub const fn hv_x64_msr_stimer_count(n: u8) -> Option<u32> {
    if (n as usize) < HV_SYNIC_STIMER_COUNT {
        Some(HV_X64_MSR_STIMER0_COUNT + 2 * n as u32)
    } else {
        None
    }
}

/// Bit 63 of the guest OS id: an open-source guest (Linux mshyperv.h).
pub const HV_GUEST_OS_ID_OPEN_SOURCE: u64 = 1 << 63;
/// Open-source OS type "Linux" (bits 56..62 of the guest OS id).
pub const HV_GUEST_OS_TYPE_LINUX: u8 = 1;
/// Open-source OS type "FreeBSD".
pub const HV_GUEST_OS_TYPE_FREEBSD: u8 = 2;

/// Builds an open-source guest OS id: bits 0..15 build, 16..47 version, 48..55 OS id,
/// 56..62 OS type, bit 63 set (Linux `arch/x86/include/asm/mshyperv.h`).
pub const fn open_source_guest_os_id(os_type: u8, os_id: u8, version: u32, build: u16) -> u64 {
    HV_GUEST_OS_ID_OPEN_SOURCE
        | (((os_type & 0x7F) as u64) << 56)
        | ((os_id as u64) << 48)
        | ((version as u64) << 16)
        | build as u64
}

// ---------------------------------------------------------------------------------------
// MSR contents.

/// Contents of a page-enable MSR: SIMP, SIEFP, HYPERCALL, REFERENCE_TSC and VP_ASSIST all
/// put "enable" in bit 0 and the page frame number in bits 12..63 (`union hv_synic_simp`,
/// `hv_x64_msr_hypercall_contents`, `hv_reference_tsc_msr` in hvgdk_mini.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageMsr(pub u64);

impl PageMsr {
    /// Bit 0: the page is enabled.
    pub const ENABLE: u64 = 1;
    /// Bits 12..63: the page frame number.
    pub const PFN_MASK: u64 = !0xFFF;

    /// A value mapping page frame `pfn`, enabled or not. Bits of `pfn` above 52 are lost.
    pub const fn new(pfn: u64, enabled: bool) -> Self {
        PageMsr(((pfn << 12) & Self::PFN_MASK) | enabled as u64)
    }
    /// Whether bit 0 is set.
    pub const fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }
    /// The page frame number (GPA >> 12).
    pub const fn pfn(self) -> u64 {
        self.0 >> 12
    }
    /// The guest physical address of the page.
    pub const fn gpa(self) -> u64 {
        self.0 & Self::PFN_MASK
    }
}

/// The SIMP MSR value.
pub type SimpMsr = PageMsr;
/// The SIEFP MSR value.
pub type SiefpMsr = PageMsr;
/// The HYPERCALL MSR value.
pub type HypercallMsr = PageMsr;
/// The REFERENCE_TSC MSR value.
pub type ReferenceTscMsr = PageMsr;

/// Contents of the SCONTROL MSR: bit 0 enables the SynIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScontrolMsr(pub u64);

impl ScontrolMsr {
    /// Bit 0: SynIC enabled.
    pub const ENABLE: u64 = 1;
    /// Whether the SynIC is enabled.
    pub const fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }
}

/// Contents of a SINTx MSR (`union hv_synic_sint`, hvgdk_mini.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SintMsr(pub u64);

impl SintMsr {
    /// Bits 0..7: interrupt vector.
    pub const VECTOR_MASK: u64 = 0xFF;
    /// Bit 16: masked.
    pub const MASKED: u64 = 1 << 16;
    /// Bit 17: the hypervisor performs the EOI.
    pub const AUTO_EOI: u64 = 1 << 17;
    /// Bit 18: polling mode.
    pub const POLLING: u64 = 1 << 18;
    /// Bit 19: used as intercept SINT.
    pub const AS_INTERCEPT: u64 = 1 << 19;
    /// Bit 20: proxy.
    pub const PROXY: u64 = 1 << 20;

    /// The reset value: masked, vector 0.
    pub const MASKED_DEFAULT: SintMsr = SintMsr(Self::MASKED);

    /// An unmasked SINT delivering `vector`, with or without auto-EOI.
    pub const fn new(vector: u8, auto_eoi: bool) -> Self {
        let mut v = vector as u64;
        if auto_eoi {
            v |= Self::AUTO_EOI;
        }
        SintMsr(v)
    }
    /// The interrupt vector.
    pub const fn vector(self) -> u8 {
        (self.0 & Self::VECTOR_MASK) as u8
    }
    /// Whether the SINT is masked.
    pub const fn masked(self) -> bool {
        self.0 & Self::MASKED != 0
    }
    /// Whether the hypervisor does the EOI.
    pub const fn auto_eoi(self) -> bool {
        self.0 & Self::AUTO_EOI != 0
    }
    /// Whether the SINT is in polling mode.
    pub const fn polling(self) -> bool {
        self.0 & Self::POLLING != 0
    }
    /// The same value with the mask bit set or cleared.
    pub const fn with_masked(self, masked: bool) -> Self {
        if masked {
            SintMsr(self.0 | Self::MASKED)
        } else {
            SintMsr(self.0 & !Self::MASKED)
        }
    }
}

/// Contents of a STIMERx_CONFIG MSR (`union hv_stimer_config`, hvgdk_mini.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StimerConfig(pub u64);

impl StimerConfig {
    /// Bit 0: timer enabled.
    pub const ENABLE: u64 = 1;
    /// Bit 1: periodic.
    pub const PERIODIC: u64 = 1 << 1;
    /// Bit 2: lazy.
    pub const LAZY: u64 = 1 << 2;
    /// Bit 3: enable on write of the count register.
    pub const AUTO_ENABLE: u64 = 1 << 3;
    /// Bits 4..11: APIC vector for direct mode.
    pub const APIC_VECTOR_SHIFT: u32 = 4;
    /// Bit 12: direct mode (interrupt instead of message).
    pub const DIRECT_MODE: u64 = 1 << 12;
    /// Bits 16..19: SINT that receives the expiry message.
    pub const SINTX_SHIFT: u32 = 16;

    /// Whether the timer is enabled.
    pub const fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }
    /// Whether the timer is periodic.
    pub const fn periodic(self) -> bool {
        self.0 & Self::PERIODIC != 0
    }
    /// Whether auto-enable is set.
    pub const fn auto_enable(self) -> bool {
        self.0 & Self::AUTO_ENABLE != 0
    }
    /// Whether the timer raises `apic_vector` directly.
    pub const fn direct_mode(self) -> bool {
        self.0 & Self::DIRECT_MODE != 0
    }
    /// The APIC vector used in direct mode.
    pub const fn apic_vector(self) -> u8 {
        (self.0 >> Self::APIC_VECTOR_SHIFT) as u8
    }
    /// The SINT that receives expiry messages in message mode.
    pub const fn sintx(self) -> u8 {
        ((self.0 >> Self::SINTX_SHIFT) & 0xF) as u8
    }
    /// A message-mode one-shot timer posting to `sint`, optionally auto-enabled.
    pub const fn message_mode(sint: u8, auto_enable: bool) -> Self {
        let mut v = Self::ENABLE | (((sint & 0xF) as u64) << Self::SINTX_SHIFT);
        if auto_enable {
            v |= Self::AUTO_ENABLE;
        }
        StimerConfig(v)
    }
}

// ---------------------------------------------------------------------------------------
// Hypercalls.

/// HvFlushVirtualAddressSpace.
pub const HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE: u16 = 0x0002;
/// HvFlushVirtualAddressList.
pub const HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST: u16 = 0x0003;
/// HvNotifyLongSpinWait.
pub const HVCALL_NOTIFY_LONG_SPIN_WAIT: u16 = 0x0008;
/// HvSendSyntheticClusterIpi.
pub const HVCALL_SEND_IPI: u16 = 0x000B;
/// HvFlushVirtualAddressSpaceEx.
pub const HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX: u16 = 0x0013;
/// HvFlushVirtualAddressListEx.
pub const HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX: u16 = 0x0014;
/// HvSendSyntheticClusterIpiEx.
pub const HVCALL_SEND_IPI_EX: u16 = 0x0015;
/// HvPostMessage: slow call, 256-byte [`HvPostMessageInput`].
pub const HVCALL_POST_MESSAGE: u16 = 0x005C;
/// HvSignalEvent: Linux issues it as a fast call with [`HvSignalEventInput`] in RDX.
pub const HVCALL_SIGNAL_EVENT: u16 = 0x005D;
/// HvFlushGuestPhysicalAddressSpace.
pub const HVCALL_FLUSH_GUEST_PHYSICAL_ADDRESS_SPACE: u16 = 0x00AF;
/// HvFlushGuestPhysicalAddressList.
pub const HVCALL_FLUSH_GUEST_PHYSICAL_ADDRESS_LIST: u16 = 0x00B0;
/// HvSignalEventDirect.
pub const HVCALL_SIGNAL_EVENT_DIRECT: u16 = 0x00C0;
/// HvPostMessageDirect.
pub const HVCALL_POST_MESSAGE_DIRECT: u16 = 0x00C1;

/// Hypercall control word (RCX on x64): bits 0..15 call code, 16 fast, 17..26 variable
/// header size in 8-byte units, 31 nested, 32..43 rep count, 48..59 rep start index
/// (hvgdk_mini.h, hyperv-facts.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallControl(pub u64);

impl HypercallControl {
    /// Bits 0..15: call code.
    pub const CODE_MASK: u64 = 0xFFFF;
    /// Bit 16 (`HV_HYPERCALL_FAST_BIT`): register-based call.
    pub const FAST: u64 = 1 << 16;
    /// `HV_HYPERCALL_VARHEAD_OFFSET`.
    pub const VARHEAD_OFFSET: u32 = 17;
    /// `HV_HYPERCALL_VARHEAD_MASK`, bits 17..26.
    pub const VARHEAD_MASK: u64 = 0x3FF << 17;
    /// `HV_HYPERCALL_NESTED`, bit 31.
    pub const NESTED: u64 = 1 << 31;
    /// `HV_HYPERCALL_REP_COMP_OFFSET`.
    pub const REP_COMP_OFFSET: u32 = 32;
    /// `HV_HYPERCALL_REP_COMP_MASK`, bits 32..43.
    pub const REP_COMP_MASK: u64 = 0xFFF << 32;
    /// `HV_HYPERCALL_REP_START_OFFSET`.
    pub const REP_START_OFFSET: u32 = 48;
    /// `HV_HYPERCALL_REP_START_MASK`, bits 48..59.
    pub const REP_START_MASK: u64 = 0xFFF << 48;

    /// A slow (memory-based) call of `code`.
    pub const fn new(code: u16) -> Self {
        HypercallControl(code as u64)
    }
    /// The same control word with the fast bit set.
    pub const fn fast(self) -> Self {
        HypercallControl(self.0 | Self::FAST)
    }
    /// The same control word with a rep count (12 bits kept).
    pub const fn with_rep_count(self, count: u16) -> Self {
        HypercallControl(
            (self.0 & !Self::REP_COMP_MASK)
                | (((count as u64) << Self::REP_COMP_OFFSET) & Self::REP_COMP_MASK),
        )
    }
    /// The same control word with a rep start index (12 bits kept).
    pub const fn with_rep_start(self, start: u16) -> Self {
        HypercallControl(
            (self.0 & !Self::REP_START_MASK)
                | (((start as u64) << Self::REP_START_OFFSET) & Self::REP_START_MASK),
        )
    }
    /// The same control word with a variable header size in 8-byte units (10 bits kept).
    pub const fn with_variable_header_size(self, qwords: u16) -> Self {
        HypercallControl(
            (self.0 & !Self::VARHEAD_MASK)
                | (((qwords as u64) << Self::VARHEAD_OFFSET) & Self::VARHEAD_MASK),
        )
    }
    /// The call code.
    pub const fn code(self) -> u16 {
        (self.0 & Self::CODE_MASK) as u16
    }
    /// Whether the fast bit is set.
    pub const fn is_fast(self) -> bool {
        self.0 & Self::FAST != 0
    }
    /// Whether the nested bit is set.
    pub const fn is_nested(self) -> bool {
        self.0 & Self::NESTED != 0
    }
    /// The rep count.
    pub const fn rep_count(self) -> u16 {
        ((self.0 & Self::REP_COMP_MASK) >> Self::REP_COMP_OFFSET) as u16
    }
    /// The rep start index.
    pub const fn rep_start(self) -> u16 {
        ((self.0 & Self::REP_START_MASK) >> Self::REP_START_OFFSET) as u16
    }
    /// The variable header size in 8-byte units.
    pub const fn variable_header_size(self) -> u16 {
        ((self.0 & Self::VARHEAD_MASK) >> Self::VARHEAD_OFFSET) as u16
    }
}

/// Hypercall result (RAX on x64): bits 0..15 status, 32..43 reps completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallResult(pub u64);

impl HypercallResult {
    /// `HV_HYPERCALL_RESULT_MASK`, bits 0..15.
    pub const STATUS_MASK: u64 = 0xFFFF;

    /// A result word with `status` and `reps_completed`.
    pub const fn new(status: HvStatus, reps_completed: u16) -> Self {
        HypercallResult(
            status.0 as u64
                | (((reps_completed as u64) << HypercallControl::REP_COMP_OFFSET)
                    & HypercallControl::REP_COMP_MASK),
        )
    }
    /// The status code.
    pub const fn status(self) -> HvStatus {
        HvStatus((self.0 & Self::STATUS_MASK) as u16)
    }
    /// Number of reps the hypervisor completed.
    pub const fn reps_completed(self) -> u16 {
        ((self.0 & HypercallControl::REP_COMP_MASK) >> HypercallControl::REP_COMP_OFFSET) as u16
    }
}

wire_enum! {
    /// Hypercall status codes (`HV_STATUS_*`, hvgdk_mini.h; hyperv-facts.md section 3).
    pub struct HvStatus(u16) {
        /// The call succeeded.
        SUCCESS = 0x0,
        /// Unknown call code.
        INVALID_HYPERCALL_CODE = 0x2,
        /// Malformed control word or input.
        INVALID_HYPERCALL_INPUT = 0x3,
        /// Input or output block not 8-byte aligned.
        INVALID_ALIGNMENT = 0x4,
        /// A parameter is invalid.
        INVALID_PARAMETER = 0x5,
        /// Access denied.
        ACCESS_DENIED = 0x6,
        /// The partition is not in a valid state.
        INVALID_PARTITION_STATE = 0x7,
        /// Operation denied.
        OPERATION_DENIED = 0x8,
        /// Unknown property.
        UNKNOWN_PROPERTY = 0x9,
        /// Property value out of range.
        PROPERTY_VALUE_OUT_OF_RANGE = 0xA,
        /// Out of memory; Linux retries HvPostMessage on this.
        INSUFFICIENT_MEMORY = 0xB,
        /// Invalid partition id.
        INVALID_PARTITION_ID = 0xD,
        /// Invalid VP index.
        INVALID_VP_INDEX = 0xE,
        /// Not found.
        NOT_FOUND = 0x10,
        /// Invalid port id.
        INVALID_PORT_ID = 0x11,
        /// Invalid connection id: a pre-5.0 host answers INITIATE_CONTACT on id 4 with this.
        INVALID_CONNECTION_ID = 0x12,
        /// The receiver's message buffers are full; Linux retries.
        INSUFFICIENT_BUFFERS = 0x13,
        /// Not acknowledged.
        NOT_ACKNOWLEDGED = 0x14,
        /// Invalid VP state.
        INVALID_VP_STATE = 0x15,
        /// No resources.
        NO_RESOURCES = 0x1D,
        /// Processor feature not supported.
        PROCESSOR_FEATURE_NOT_SUPPORTED = 0x20,
        /// Invalid logical processor index.
        INVALID_LP_INDEX = 0x41,
        /// Invalid register value.
        INVALID_REGISTER_VALUE = 0x50,
        /// Operation failed.
        OPERATION_FAILED = 0x71,
        /// Timed out.
        TIME_OUT = 0x78,
        /// Call pending.
        CALL_PENDING = 0x79,
        /// VTL already enabled.
        VTL_ALREADY_ENABLED = 0x86,
    }
}

// ---------------------------------------------------------------------------------------
// Messages.

wire_enum! {
    /// SynIC message types (`enum hv_message_type`, hvgdk_mini.h).
    pub struct HvMessageType(u32) {
        /// `HVMSG_NONE`: the slot is free.
        NONE = 0,
        /// A VMBus channel message. Linux posts with the literal 1 and only tests the slot
        /// for non-zero; OpenVMM's server delivers with 1 (hyperv-facts.md section 4).
        VMBUS = 1,
        /// `HVMSG_UNMAPPED_GPA`.
        UNMAPPED_GPA = 0x8000_0000,
        /// `HVMSG_GPA_INTERCEPT`.
        GPA_INTERCEPT = 0x8000_0001,
        /// `HVMSG_TIMER_EXPIRED`: payload is [`HvTimerMessagePayload`].
        TIMER_EXPIRED = 0x8000_0010,
        /// `HVMSG_INVALID_VP_REGISTER_VALUE`.
        INVALID_VP_REGISTER_VALUE = 0x8000_0020,
        /// `HVMSG_UNRECOVERABLE_EXCEPTION`.
        UNRECOVERABLE_EXCEPTION = 0x8000_0021,
        /// `HVMSG_UNSUPPORTED_FEATURE`.
        UNSUPPORTED_FEATURE = 0x8000_0022,
        /// `HVMSG_EVENTLOG_BUFFERCOMPLETE`.
        EVENTLOG_BUFFERCOMPLETE = 0x8000_0040,
        /// `HVMSG_X64_IOPORT_INTERCEPT`, first of the x64 intercept messages.
        X64_IOPORT_INTERCEPT = 0x8001_0000,
    }
}

/// Message header (`struct hv_message_header`, hvgdk_mini.h): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvMessageHeader {
    /// [`HvMessageType`]; 0 means the slot is free.
    pub message_type: U32,
    /// Payload bytes in use (at most 240).
    pub payload_size: u8,
    /// Bit 0 ([`HvMessageHeader::MSG_PENDING`]): another message is queued.
    pub message_flags: u8,
    /// Zero.
    pub reserved: U16,
    /// Sender id or port id (u32 in the low half).
    pub sender: U64,
}

impl HvMessageHeader {
    /// `message_flags` bit 0: more messages are queued behind this one; after freeing
    /// the slot the guest must write the EOM MSR.
    pub const MSG_PENDING: u8 = 1;

    /// The message type.
    pub fn message_type(&self) -> HvMessageType {
        HvMessageType(self.message_type.get())
    }
    /// Whether another message is pending.
    pub fn msg_pending(&self) -> bool {
        self.message_flags & Self::MSG_PENDING != 0
    }
}

/// One SIMP slot (`struct hv_message`, hvgdk_mini.h): header plus 240 payload bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvMessage {
    /// The header.
    pub header: HvMessageHeader,
    /// The payload; only the first `header.payload_size` bytes are meaningful.
    pub payload: [u8; HV_MESSAGE_PAYLOAD_BYTE_COUNT],
}

impl HvMessage {
    /// A slot carrying `payload` as message type `message_type`.
    pub fn new(message_type: HvMessageType, payload: &[u8]) -> Result<Self, WireError> {
        if payload.len() > HV_MESSAGE_PAYLOAD_BYTE_COUNT {
            return Err(WireError::TooLong);
        }
        let mut msg = HvMessage {
            header: HvMessageHeader {
                message_type: U32::new(message_type.0),
                payload_size: payload.len() as u8,
                ..HvMessageHeader::default()
            },
            payload: [0; HV_MESSAGE_PAYLOAD_BYTE_COUNT],
        };
        msg.payload[..payload.len()].copy_from_slice(payload);
        Ok(msg)
    }

    /// The used part of the payload; fails if `payload_size` exceeds 240.
    pub fn payload(&self) -> Result<&[u8], WireError> {
        self.payload
            .get(..self.header.payload_size as usize)
            .ok_or(WireError::BadLength)
    }
}

/// Checks a message slot read from `bytes` and returns its header and used payload.
///
/// Fails with [`WireError::Truncated`] if `bytes` is shorter than a 256-byte slot and
/// [`WireError::BadLength`] if `payload_size` is above 240.
pub fn parse_message(bytes: &[u8]) -> Result<(&HvMessageHeader, &[u8]), WireError> {
    let (msg, _) = HvMessage::ref_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
    Ok((&msg.header, msg.payload()?))
}

/// HvPostMessage input block (`struct hv_input_post_message`, hyperv_vmbus.h): 256 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvPostMessageInput {
    /// Target connection id (low 24 bits significant).
    pub connectionid: U32,
    /// Zero.
    pub reserved: U32,
    /// [`HvMessageType`] delivered to the receiver (1 for VMBus).
    pub message_type: U32,
    /// Payload bytes used (at most 240).
    pub payload_size: U32,
    /// The message.
    pub payload: [u8; HV_MESSAGE_PAYLOAD_BYTE_COUNT],
}

impl HvPostMessageInput {
    /// An input block posting `payload` to `connection_id`.
    pub fn new(
        connection_id: u32,
        message_type: HvMessageType,
        payload: &[u8],
    ) -> Result<Self, WireError> {
        if payload.len() > HV_MESSAGE_PAYLOAD_BYTE_COUNT {
            return Err(WireError::TooLong);
        }
        let mut input = HvPostMessageInput {
            connectionid: U32::new(connection_id),
            reserved: U32::ZERO,
            message_type: U32::new(message_type.0),
            payload_size: U32::new(payload.len() as u32),
            payload: [0; HV_MESSAGE_PAYLOAD_BYTE_COUNT],
        };
        input.payload[..payload.len()].copy_from_slice(payload);
        Ok(input)
    }

    /// The connection id with the reserved top byte cleared.
    pub fn connection_id(&self) -> u32 {
        self.connectionid.get() & HV_CONNECTION_ID_MASK
    }

    /// The used part of the payload; fails if `payload_size` exceeds 240.
    pub fn payload(&self) -> Result<&[u8], WireError> {
        usize::try_from(self.payload_size.get())
            .ok()
            .and_then(|n| self.payload.get(..n))
            .ok_or(WireError::BadLength)
    }
}

/// HvSignalEvent input (hyperv_vmbus.h, OpenVMM hvdef): 8 bytes, passed as one u64 in
/// RDX by the fast call.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvSignalEventInput {
    /// Event connection id (the offer's `connection_id`).
    pub connection_id: U32,
    /// Event flag to set; Linux always 0.
    pub flag_number: U16,
    /// Zero.
    pub rsvdz: U16,
}

impl HvSignalEventInput {
    /// Input signalling `connection_id` with flag `flag_number`.
    pub const fn new(connection_id: u32, flag_number: u16) -> Self {
        HvSignalEventInput {
            connection_id: U32::new(connection_id),
            flag_number: U16::new(flag_number),
            rsvdz: U16::ZERO,
        }
    }
    /// The 8 bytes as the u64 a fast call passes in RDX.
    pub fn as_u64(&self) -> u64 {
        u64::from_le_bytes(zerocopy::transmute!(*self))
    }
    /// The input a fast call carried in RDX.
    pub fn from_u64(v: u64) -> Self {
        zerocopy::transmute!(v.to_le_bytes())
    }
}

/// Payload of a timer-expired message (`struct hv_timer_message_payload`): 24 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvTimerMessagePayload {
    /// Which of the 4 timers expired.
    pub timer_index: U32,
    /// Zero.
    pub reserved: U32,
    /// Programmed expiry, reference time.
    pub expiration_time: U64,
    /// Actual delivery, reference time.
    pub delivery_time: U64,
}

/// The first 24 bytes of the reference TSC page (`struct ms_hyperv_tsc_page`).
///
/// Time = ((TSC * scale) >> 64) + offset; sequence 0 means the page is invalid.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvReferenceTscPage {
    /// Changes whenever scale/offset change; 0 = invalid.
    pub tsc_sequence: U32,
    /// Zero.
    pub reserved1: U32,
    /// 64.64 fixed-point multiplier.
    pub tsc_scale: U64,
    /// Signed offset in 100 ns units (stored as u64).
    pub tsc_offset: U64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use proptest::prelude::*;

    // Sizes and offsets: Linux include/hyperv/hvgdk_mini.h and drivers/hv/hyperv_vmbus.h,
    // see shared/reference/wire-layouts.md section 3.
    #[test]
    fn hv_message_header_layout() {
        assert_eq!(size_of::<HvMessageHeader>(), 16);
        assert_eq!(offset_of!(HvMessageHeader, message_type), 0);
        assert_eq!(offset_of!(HvMessageHeader, payload_size), 4);
        assert_eq!(offset_of!(HvMessageHeader, message_flags), 5);
        assert_eq!(offset_of!(HvMessageHeader, reserved), 6);
        assert_eq!(offset_of!(HvMessageHeader, sender), 8);
    }

    #[test]
    fn hv_message_layout() {
        assert_eq!(size_of::<HvMessage>(), HV_MESSAGE_SIZE);
        assert_eq!(offset_of!(HvMessage, header), 0);
        assert_eq!(offset_of!(HvMessage, payload), 16);
        assert_eq!(
            HV_MESSAGE_PAYLOAD_QWORD_COUNT * 8,
            HV_MESSAGE_PAYLOAD_BYTE_COUNT
        );
        assert_eq!(HV_SYNIC_SINT_COUNT * HV_MESSAGE_SIZE, HV_SYNIC_PAGE_SIZE);
        assert_eq!(simp_slot_offset(2), 512);
        assert_eq!(sief_slot_offset(2), 512);
    }

    #[test]
    fn post_message_input_layout() {
        assert_eq!(size_of::<HvPostMessageInput>(), 256);
        assert_eq!(offset_of!(HvPostMessageInput, connectionid), 0);
        assert_eq!(offset_of!(HvPostMessageInput, reserved), 4);
        assert_eq!(offset_of!(HvPostMessageInput, message_type), 8);
        assert_eq!(offset_of!(HvPostMessageInput, payload_size), 12);
        assert_eq!(offset_of!(HvPostMessageInput, payload), 16);
    }

    #[test]
    fn signal_event_input_layout() {
        assert_eq!(size_of::<HvSignalEventInput>(), 8);
        assert_eq!(offset_of!(HvSignalEventInput, connection_id), 0);
        assert_eq!(offset_of!(HvSignalEventInput, flag_number), 4);
        assert_eq!(offset_of!(HvSignalEventInput, rsvdz), 6);
    }

    #[test]
    fn timer_payload_and_tsc_page_layout() {
        assert_eq!(size_of::<HvTimerMessagePayload>(), 24);
        assert_eq!(offset_of!(HvTimerMessagePayload, timer_index), 0);
        assert_eq!(offset_of!(HvTimerMessagePayload, reserved), 4);
        assert_eq!(offset_of!(HvTimerMessagePayload, expiration_time), 8);
        assert_eq!(offset_of!(HvTimerMessagePayload, delivery_time), 16);
        assert_eq!(size_of::<HvReferenceTscPage>(), 24);
        assert_eq!(offset_of!(HvReferenceTscPage, tsc_sequence), 0);
        assert_eq!(offset_of!(HvReferenceTscPage, reserved1), 4);
        assert_eq!(offset_of!(HvReferenceTscPage, tsc_scale), 8);
        assert_eq!(offset_of!(HvReferenceTscPage, tsc_offset), 16);
    }

    // Bit layouts: hvgdk_mini.h unions, masks measured in wire-layouts.md section 3.
    #[test]
    fn msr_bit_layouts() {
        let sint = SintMsr::new(0x93, true);
        assert_eq!(sint.0, 0x2_0093);
        assert_eq!(sint.vector(), 0x93);
        assert!(sint.auto_eoi() && !sint.masked() && !sint.polling());
        assert_eq!(sint.with_masked(true).0, 0x3_0093);
        assert_eq!(SintMsr::MASKED, 0x10000);
        assert_eq!(SintMsr::AS_INTERCEPT, 0x80000);
        assert_eq!(SintMsr::PROXY, 0x100000);

        let simp = PageMsr::new(0x12345, true);
        assert_eq!(simp.0, 0x1234_5001);
        assert!(simp.enabled());
        assert_eq!(simp.pfn(), 0x12345);
        assert_eq!(simp.gpa(), 0x1234_5000);
        assert_eq!(PageMsr::PFN_MASK, 0xffff_ffff_ffff_f000);

        let st = StimerConfig::message_mode(2, true);
        assert_eq!(st.0, 0x2_0009);
        assert_eq!(st.sintx(), 2);
        assert!(st.enabled() && st.auto_enable() && !st.periodic() && !st.direct_mode());
        assert_eq!(StimerConfig(0xff0).apic_vector(), 0xff);
        assert_eq!(StimerConfig::DIRECT_MODE, 0x1000);

        assert_eq!(hv_x64_msr_sint(2), Some(0x4000_0092));
        assert_eq!(hv_x64_msr_sint(15), Some(HV_X64_MSR_SINT15));
        assert_eq!(hv_x64_msr_sint(16), None);
        assert_eq!(hv_x64_msr_stimer_config(3), Some(0x4000_00B6));
        assert_eq!(hv_x64_msr_stimer_count(3), Some(0x4000_00B7));
        assert_eq!(hv_x64_msr_stimer_count(4), None);
    }

    #[test]
    fn guest_os_id_layout() {
        // Linux: top 16 bits 0x8100 = open source + type Linux (hyperv-facts.md section 3).
        let id = open_source_guest_os_id(HV_GUEST_OS_TYPE_LINUX, 0, 0x0006_0100, 7);
        assert_eq!(id >> 48, 0x8100);
        assert_eq!((id >> 16) & 0xFFFF_FFFF, 0x0006_0100);
        assert_eq!(id & 0xFFFF, 7);
    }

    #[test]
    fn hypercall_control_and_result() {
        assert_eq!(HypercallControl::new(HVCALL_POST_MESSAGE).0, 0x5C);
        let signal = HypercallControl::new(HVCALL_SIGNAL_EVENT).fast();
        assert_eq!(signal.0, 0x1_005D);
        assert!(signal.is_fast());
        let rep = HypercallControl::new(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST)
            .with_rep_count(0x123)
            .with_rep_start(0xabc)
            .with_variable_header_size(5);
        assert_eq!(rep.code(), 3);
        assert_eq!(rep.rep_count(), 0x123);
        assert_eq!(rep.rep_start(), 0xabc);
        assert_eq!(rep.variable_header_size(), 5);
        assert_eq!(rep.0, 0x0abc_0123_000a_0003);
        assert!(!rep.is_nested());
        let r = HypercallResult(0x0000_0005_0000_0013);
        assert_eq!(r.status(), HvStatus::INSUFFICIENT_BUFFERS);
        assert_eq!(r.reps_completed(), 5);
        assert_eq!(
            HypercallResult::new(HvStatus::SUCCESS, 5),
            HypercallResult(5 << 32)
        );
        assert_eq!(
            std::format!("{:?}", HvStatus(0x12)),
            "INVALID_CONNECTION_ID"
        );
        assert_eq!(std::format!("{:?}", HvStatus(0x77)), "HvStatus(0x77)");
    }

    #[test]
    fn signal_event_fast_word() {
        let input = HvSignalEventInput::new(0x2001, 3);
        assert_eq!(input.as_u64(), 0x0003_0000_2001);
        assert_eq!(HvSignalEventInput::from_u64(0x0003_0000_2001), input);
    }

    #[test]
    fn message_slot_round_trip() {
        let msg = HvMessage::new(HvMessageType::VMBUS, &[4, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut bytes = [0u8; 256];
        bytes.copy_from_slice(msg.as_bytes());
        assert_eq!(&bytes[..8], &[1, 0, 0, 0, 8, 0, 0, 0]);
        let (hdr, payload) = parse_message(&bytes).unwrap();
        assert_eq!(hdr.message_type(), HvMessageType::VMBUS);
        assert!(!hdr.msg_pending());
        assert_eq!(payload, &[4, 0, 0, 0, 0, 0, 0, 0]);

        bytes[5] = 1;
        assert!(parse_message(&bytes).unwrap().0.msg_pending());
        bytes[4] = 241;
        assert_eq!(parse_message(&bytes), Err(WireError::BadLength));
        assert_eq!(parse_message(&bytes[..255]), Err(WireError::Truncated));
        assert_eq!(
            HvMessage::new(HvMessageType::VMBUS, &[0; 241]),
            Err(WireError::TooLong)
        );
    }

    #[test]
    fn post_message_input_round_trip() {
        let input = HvPostMessageInput::new(4, HvMessageType::VMBUS, &[14, 0, 0, 0]).unwrap();
        let bytes = input.as_bytes();
        assert_eq!(
            &bytes[..20],
            &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 14, 0, 0, 0]
        );
        let back = HvPostMessageInput::read_from_bytes(bytes).unwrap();
        assert_eq!(back.payload().unwrap(), &[14, 0, 0, 0]);
        let mut bad = back;
        bad.payload_size = U32::new(241);
        assert_eq!(bad.payload(), Err(WireError::BadLength));
        bad.connectionid = U32::new(0xFF00_0004);
        assert_eq!(bad.connection_id(), 4);
        assert_eq!(
            HvPostMessageInput::new(1, HvMessageType::VMBUS, &[0; 241]),
            Err(WireError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn parse_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_message(&bytes);
            if let Ok(input) = HvPostMessageInput::read_from_prefix(&bytes) {
                let _ = input.0.payload();
            }
        }
    }
}
