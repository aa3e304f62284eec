//! The Hyper-V hypervisor interface in user space: CPUID leaves, synthetic MSRs,
//! hypercalls, and SynIC message and event-flag delivery into guest memory.
//!
//! Everything here is plain logic over [`GuestMemory`] and [`VmbusHost`]; the machine
//! feeds it the MSR and hypercall exits and injects the interrupt vectors it returns.
//! Facts from `shared/reference/hyperv-facts.md` sections 1-4 (TLFS, Linux
//! `hvgdk_mini.h`, OpenVMM hvdef/hv1) and KVM's `arch/x86/kvm/hyperv.c` where the TLFS
//! leaves a choice (e.g. the SIMP/SIEFP pages are cleared when enabled, a SINT may not be
//! unmasked with a vector below 16, HYPERCALL is ignored while the guest OS id is 0).
//!
//! Deviations from Hyper-V, all invisible to a guest that follows the TLFS: the SynIC
//! pages are guest RAM, not overlays (as in KVM); auto-EOI is not emulated (CPUID tells
//! guests it is deprecated); only SINT message delivery to VP 0; synthetic timers, the VP
//! assist page and crash MSRs are absent (#GP, not advertised).

use std::time::Instant;

use hvemu::{GuestMemory, VmbusHost};
use hvnet_wire::synic::{
    sief_slot_offset, simp_slot_offset, HvMessageHeader, HvPostMessageInput, HvStatus,
    HypercallControl, PageMsr, SintMsr, HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT,
    HV_MESSAGE_PAYLOAD_BYTE_COUNT, HV_MESSAGE_SIZE, HV_SYNIC_FIRST_VALID_VECTOR,
    HV_SYNIC_SINT_COUNT, HV_X64_MSR_EOM, HV_X64_MSR_GUEST_OS_ID, HV_X64_MSR_HYPERCALL,
    HV_X64_MSR_REFERENCE_TSC, HV_X64_MSR_SCONTROL, HV_X64_MSR_SIEFP, HV_X64_MSR_SIMP,
    HV_X64_MSR_SINT0, HV_X64_MSR_SINT15, HV_X64_MSR_SIRBP, HV_X64_MSR_SVERSION,
    HV_X64_MSR_TIME_REF_COUNT, HV_X64_MSR_VP_INDEX,
};
use zerocopy::FromBytes;

/// Highest hypervisor CPUID leaf reported (Linux needs at least 0x40000005).
pub const MAX_LEAF: u32 = 0x4000_0006;
/// The synthetic MSR range the VMM claims from KVM.
pub const MSR_RANGE: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00FF;
/// The SINT VMBus uses.
pub const VMBUS_SINT: u8 = 2;

/// Privileges (CPUID 0x40000003 EAX): partition reference counter (1), SynIC (2),
/// hypercall MSRs (5), VP index (6), reference TSC page (9).
pub const PRIVILEGES_EAX: u32 = 1 << 1 | 1 << 2 | 1 << 5 | 1 << 6 | 1 << 9;
/// Privileges 32..63 (CPUID 0x40000003 EBX): PostMessages (4), SignalEvents (5).
pub const PRIVILEGES_EBX: u32 = 1 << 4 | 1 << 5;
/// Recommendations (CPUID 0x40000004 EAX): relaxed timing (5: emulation is slow, don't
/// use watchdogs), auto-EOI deprecated (9: not emulated).
pub const RECOMMENDATIONS_EAX: u32 = 1 << 5 | 1 << 9;

/// One CPUID entry: leaf, then EAX, EBX, ECX, EDX.
pub type CpuidEntry = (u32, [u32; 4]);

fn sig(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

/// The hypervisor leaves 0x40000000..=[`MAX_LEAF`] for a partition of `vcpus` VPs.
pub fn cpuid_leaves(vcpus: u32) -> Vec<CpuidEntry> {
    vec![
        (
            0x4000_0000,
            [MAX_LEAF, sig(b"Micr"), sig(b"osof"), sig(b"t Hv")],
        ),
        (0x4000_0001, [sig(b"Hv#1"), 0, 0, 0]),
        // Version: build 20348, 10.0 (the Windows Server 2022 numbers), no service pack.
        (0x4000_0002, [20348, 10 << 16, 0, 0]),
        (0x4000_0003, [PRIVILEGES_EAX, PRIVILEGES_EBX, 0, 0]),
        // Recommendations; EBX: spinlock retries before notifying, all ones = never.
        (0x4000_0004, [RECOMMENDATIONS_EAX, u32::MAX, 0, 0]),
        (0x4000_0005, [vcpus, vcpus, 0, 0]),
        (0x4000_0006, [0, 0, 0, 0]),
    ]
}

/// The hypercall page's code. The guest `call`s offset 0 with RCX = control, RDX = input
/// GPA (or fast input), R8 = output GPA:
///
/// ```text
/// 9c              pushfq              ; no interrupt between the two exits: a handler
/// fa              cli                 ;   making its own hypercall would take our result
/// 49 89 d3        mov r11, rdx        ; keep the input where the VMM can read it
/// ba 00 80 00 00  mov edx, 0x8000     ; HYPERCALL_PORT
/// ef              out dx, eax         ; exit: the VMM reads RCX/R11/R8, runs the call
/// ed              in eax, dx          ; exit: the VMM returns the result
/// 4c 89 da        mov rdx, r11        ; RDX as the caller left it
/// 9d              popfq               ; interrupts as they were
/// c3              ret
/// ```
pub const HYPERCALL_CODE: [u8; 18] = [
    0x9C, 0xFA, 0x49, 0x89, 0xD3, 0xBA, 0x00, 0x80, 0x00, 0x00, 0xEF, 0xED, 0x4C, 0x89, 0xDA, 0x9D,
    0xC3, 0xCC,
];

const PAGE: u64 = 4096;
/// HYPERCALL MSR bit 1: locked.
const HYPERCALL_LOCKED: u64 = 1 << 1;

/// What the machine must do after an MSR write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing more.
    None,
    /// SynIC state changed: try to deliver pending messages and events.
    Deliver,
    /// The reference TSC page was enabled: call [`HyperV::publish_tsc_page`] with a TSC
    /// sample.
    TscPageEnabled,
}

/// Counters for `status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HvStats {
    /// Hypercalls made.
    pub hypercalls: u64,
    /// HvPostMessage calls (accepted).
    pub posts: u64,
    /// HvSignalEvent calls (accepted).
    pub signals: u64,
    /// Hypercalls that failed (any status but success).
    pub failed_hypercalls: u64,
    /// Messages written to the SIMP slot.
    pub messages_delivered: u64,
    /// Times the slot was busy and message-pending was set.
    pub pending_set: u64,
    /// EOM writes.
    pub eoms: u64,
    /// Event flag bits set.
    pub events_delivered: u64,
    /// SINT interrupts requested.
    pub interrupts: u64,
    /// Synthetic MSR accesses that got #GP.
    pub msr_faults: u64,
}

/// The reference TSC page parameters last published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscPage {
    /// `tsc_scale`.
    pub scale: u64,
    /// `tsc_offset`.
    pub offset: i64,
}

/// One partition with one VP: the hypervisor state the guest can see.
#[derive(Debug)]
pub struct HyperV {
    start: Instant,
    vp_index: u32,
    guest_os_id: u64,
    hypercall: u64,
    /// The page the hypercall code overlays and its former contents.
    hypercall_overlay: Option<(u64, Vec<u8>)>,
    reference_tsc: u64,
    scontrol: u64,
    siefp: u64,
    simp: u64,
    sirbp: u64,
    sint: [u64; HV_SYNIC_SINT_COUNT],
    /// Result of the hypercall run at the `out`, returned by the following `in`.
    pending_result: Option<u64>,
    /// Counters.
    pub stats: HvStats,
}

impl HyperV {
    /// A freshly reset partition (SynIC off, every SINT masked); reference time starts
    /// now.
    pub fn new() -> Self {
        HyperV {
            start: Instant::now(),
            vp_index: 0,
            guest_os_id: 0,
            hypercall: 0,
            hypercall_overlay: None,
            reference_tsc: 0,
            scontrol: 0,
            siefp: 0,
            simp: 0,
            sirbp: 0,
            sint: [SintMsr::MASKED; HV_SYNIC_SINT_COUNT],
            pending_result: None,
            stats: HvStats::default(),
        }
    }

    /// Partition reference time: 100 ns units since the partition started.
    pub fn reference_time(&self) -> u64 {
        (self.start.elapsed().as_nanos() / 100) as u64
    }

    /// The guest OS id the guest reported (0 until it does).
    pub fn guest_os_id(&self) -> u64 {
        self.guest_os_id
    }

    /// Whether the hypercall page is enabled.
    pub fn hypercalls_enabled(&self) -> bool {
        PageMsr(self.hypercall).enabled()
    }

    /// Whether the SynIC is enabled with the VMBus SINT unmasked.
    pub fn synic_ready(&self) -> bool {
        self.scontrol & 1 != 0 && !SintMsr(self.sint[usize::from(VMBUS_SINT)]).masked()
    }

    /// Reads a synthetic MSR; `None` means #GP.
    pub fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        let v = match msr {
            HV_X64_MSR_GUEST_OS_ID => self.guest_os_id,
            HV_X64_MSR_HYPERCALL => self.hypercall,
            HV_X64_MSR_VP_INDEX => u64::from(self.vp_index),
            HV_X64_MSR_TIME_REF_COUNT => self.reference_time(),
            HV_X64_MSR_REFERENCE_TSC => self.reference_tsc,
            HV_X64_MSR_SCONTROL => self.scontrol,
            HV_X64_MSR_SVERSION => 1,
            HV_X64_MSR_SIEFP => self.siefp,
            HV_X64_MSR_SIMP => self.simp,
            HV_X64_MSR_EOM => 0,
            HV_X64_MSR_SIRBP => self.sirbp,
            HV_X64_MSR_SINT0..=HV_X64_MSR_SINT15 => self.sint[(msr - HV_X64_MSR_SINT0) as usize],
            _ => {
                self.stats.msr_faults += 1;
                return None;
            }
        };
        Some(v)
    }

    /// Writes a synthetic MSR; `Err(())` means #GP.
    pub fn wrmsr(&mut self, msr: u32, value: u64, mem: &GuestMemory) -> Result<WriteEffect, ()> {
        let r = self.wrmsr_inner(msr, value, mem);
        if r.is_err() {
            self.stats.msr_faults += 1;
        }
        r
    }

    fn wrmsr_inner(&mut self, msr: u32, value: u64, mem: &GuestMemory) -> Result<WriteEffect, ()> {
        match msr {
            HV_X64_MSR_GUEST_OS_ID => {
                self.guest_os_id = value;
                if value == 0 {
                    // No guest OS id, no hypercalls (KVM does the same).
                    self.set_hypercall(self.hypercall & !PageMsr::ENABLE, mem);
                }
            }
            HV_X64_MSR_HYPERCALL => {
                if self.hypercall & HYPERCALL_LOCKED != 0 {
                    return Ok(WriteEffect::None);
                }
                let mut value = value & (PageMsr::PFN_MASK | PageMsr::ENABLE | HYPERCALL_LOCKED);
                if self.guest_os_id == 0 {
                    // TLFS: the enable bit does not stick until a guest OS id is set.
                    value &= !PageMsr::ENABLE;
                }
                if PageMsr(value).enabled() && !mem.is_live(PageMsr(value).pfn()) {
                    return Err(());
                }
                self.set_hypercall(value, mem);
            }
            HV_X64_MSR_REFERENCE_TSC => {
                let value = value & (PageMsr::PFN_MASK | PageMsr::ENABLE);
                let page = PageMsr(value);
                if page.enabled() && !mem.is_live(page.pfn()) {
                    return Err(());
                }
                self.reference_tsc = value;
                if page.enabled() {
                    // Invalid (sequence 0) until the machine publishes scale and offset.
                    let _ = mem.write(page.gpa(), &[0u8; PAGE as usize]);
                    return Ok(WriteEffect::TscPageEnabled);
                }
            }
            HV_X64_MSR_SCONTROL => {
                self.scontrol = value & 1;
                return Ok(WriteEffect::Deliver);
            }
            HV_X64_MSR_SIEFP | HV_X64_MSR_SIMP => {
                let value = value & (PageMsr::PFN_MASK | PageMsr::ENABLE);
                let page = PageMsr(value);
                if page.enabled() {
                    if !mem.is_live(page.pfn()) {
                        return Err(());
                    }
                    let old = if msr == HV_X64_MSR_SIMP {
                        self.simp
                    } else {
                        self.siefp
                    };
                    // A newly enabled page starts empty (KVM clears it too).
                    if old != value && mem.write(page.gpa(), &[0u8; PAGE as usize]).is_err() {
                        return Err(());
                    }
                }
                if msr == HV_X64_MSR_SIMP {
                    self.simp = value;
                } else {
                    self.siefp = value;
                }
                return Ok(WriteEffect::Deliver);
            }
            HV_X64_MSR_EOM => {
                self.stats.eoms += 1;
                return Ok(WriteEffect::Deliver);
            }
            HV_X64_MSR_SIRBP => self.sirbp = value,
            HV_X64_MSR_SINT0..=HV_X64_MSR_SINT15 => {
                let sint = SintMsr(value);
                if !sint.masked() && sint.vector() < HV_SYNIC_FIRST_VALID_VECTOR {
                    return Err(());
                }
                self.sint[(msr - HV_X64_MSR_SINT0) as usize] = value;
                return Ok(WriteEffect::Deliver);
            }
            // Read-only (VP_INDEX, TIME_REF_COUNT, SVERSION) or not implemented.
            _ => return Err(()),
        }
        Ok(WriteEffect::None)
    }

    /// Applies a new HYPERCALL value: installs the code in the page when enabled, and
    /// puts the page's former contents back when disabled or moved.
    fn set_hypercall(&mut self, value: u64, mem: &GuestMemory) {
        let new = PageMsr(value);
        let want = new.enabled().then(|| new.gpa());
        if self.hypercall_overlay.as_ref().map(|o| o.0) != want {
            if let Some((gpa, saved)) = self.hypercall_overlay.take() {
                let _ = mem.write(gpa, &saved);
            }
            if let Some(gpa) = want {
                let mut saved = vec![0u8; PAGE as usize];
                if mem.read(gpa, &mut saved).is_ok() {
                    let mut page = vec![0xCCu8; PAGE as usize]; // int3 after the code
                    page[..HYPERCALL_CODE.len()].copy_from_slice(&HYPERCALL_CODE);
                    if mem.write(gpa, &page).is_ok() {
                        self.hypercall_overlay = Some((gpa, saved));
                    }
                }
            }
        }
        self.hypercall = value;
    }

    /// Publishes the reference TSC page for a guest TSC running at `tsc_hz`, where
    /// `tsc_now` is the guest TSC read at this moment. Writes an invalid page (the guest
    /// falls back to TIME_REF_COUNT) if the frequency is unknown.
    pub fn publish_tsc_page(
        &mut self,
        mem: &GuestMemory,
        tsc_now: u64,
        tsc_hz: u64,
    ) -> Option<TscPage> {
        let page = PageMsr(self.reference_tsc);
        if !page.enabled() {
            return None;
        }
        let params = tsc_page_params(tsc_now, tsc_hz, self.reference_time());
        let mut bytes = [0u8; 24];
        if let Some(p) = params {
            bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
            bytes[8..16].copy_from_slice(&p.scale.to_le_bytes());
            bytes[16..24].copy_from_slice(&p.offset.to_le_bytes());
        }
        mem.write(page.gpa(), &bytes).ok()?;
        params
    }

    /// Runs the hypercall of the page's `out` exit: `control` (RCX), `input` (the
    /// caller's RDX: input GPA, or the first 8 bytes of a fast call's input) and `output`
    /// (R8). The result is kept for the `in` that follows ([`HyperV::take_result`]).
    pub fn hypercall(
        &mut self,
        control: u64,
        input: u64,
        output: u64,
        mem: &GuestMemory,
        host: &mut VmbusHost,
    ) {
        self.stats.hypercalls += 1;
        let status = match decode_call(control, input, output, mem) {
            Ok(Call::PostMessage {
                connection_id,
                message_type,
                payload,
            }) => match host.post_message(connection_id, message_type, &payload) {
                Ok(()) => {
                    self.stats.posts += 1;
                    HvStatus::SUCCESS
                }
                Err(s) => HvStatus(s),
            },
            Ok(Call::SignalEvent { connection_id }) => match host.signal_event(connection_id) {
                Ok(()) => {
                    self.stats.signals += 1;
                    HvStatus::SUCCESS
                }
                Err(s) => HvStatus(s),
            },
            Err(s) => s,
        };
        if status != HvStatus::SUCCESS {
            self.stats.failed_hypercalls += 1;
            log::debug!(
                "hypercall {:#x} failed with status {:#x}",
                HypercallControl(control).code(),
                status.0
            );
        }
        // RAX: status in bits 0..15, reps completed (none: no rep calls here) 32..43.
        self.pending_result = Some(u64::from(status.0));
    }

    /// The result for the hypercall page's `in`; `INVALID_HYPERCALL_CODE` if no call ran
    /// (the guest jumped into the middle of the page).
    pub fn take_result(&mut self) -> u64 {
        self.pending_result
            .take()
            .unwrap_or(u64::from(HvStatus::INVALID_HYPERCALL_CODE.0))
    }

    /// Delivers what the host has for the guest: the next message into SINT2's SIMP slot
    /// when it is free (else sets message-pending in the occupant), and the event flags
    /// of signalled channels into SINT2's SIEF block. Returns the vector to raise, if the
    /// guest must be interrupted (and the SINT is unmasked).
    pub fn deliver(&mut self, mem: &GuestMemory, host: &mut VmbusHost) -> Option<u8> {
        if self.scontrol & 1 == 0 {
            return None;
        }
        let sint = SintMsr(self.sint[usize::from(VMBUS_SINT)]);
        let mut raise = false;

        let simp = PageMsr(self.simp);
        if simp.enabled() && host.pending_messages() > 0 {
            let slot = simp.gpa() + simp_slot_offset(VMBUS_SINT) as u64;
            match mem.load_u32(slot) {
                Ok(0) => {
                    if let Some((message_type, payload)) = host.take_message() {
                        if write_message(
                            mem,
                            slot,
                            message_type,
                            &payload,
                            host.pending_messages() > 0,
                        ) {
                            self.stats.messages_delivered += 1;
                            raise = true;
                        }
                    }
                }
                Ok(_) => {
                    // Busy: flag the occupant so the guest writes EOM when it frees it.
                    let flags_at = slot + 5;
                    let mut f = [0u8; 1];
                    if mem.read(flags_at, &mut f).is_ok()
                        && f[0] & HvMessageHeader::MSG_PENDING == 0
                    {
                        f[0] |= HvMessageHeader::MSG_PENDING;
                        let _ = mem.write(flags_at, &f);
                        self.stats.pending_set += 1;
                    }
                }
                Err(_) => {}
            }
        }

        let siefp = PageMsr(self.siefp);
        if siefp.enabled() && host.events_pending() {
            let block = siefp.gpa() + sief_slot_offset(VMBUS_SINT) as u64;
            let mut set = 0u64;
            host.drain_events(&mut |relid| {
                if relid >= 2048 {
                    return;
                }
                let at = block + u64::from(relid / 8);
                let mut b = [0u8; 1];
                if mem.read(at, &mut b).is_ok() {
                    b[0] |= 1 << (relid % 8);
                    if mem.write(at, &b).is_ok() {
                        set += 1;
                    }
                }
            });
            if set > 0 {
                self.stats.events_delivered += set;
                raise = true;
            }
        }

        if raise && !sint.masked() {
            self.stats.interrupts += 1;
            Some(sint.vector())
        } else {
            None
        }
    }
}

impl Default for HyperV {
    fn default() -> Self {
        Self::new()
    }
}

/// Scale and offset that map a guest TSC at `tsc_hz` onto reference time, so that
/// `tsc_now` maps to `ref_now` (100 ns units). `None` for an unknown frequency.
pub fn tsc_page_params(tsc_now: u64, tsc_hz: u64, ref_now: u64) -> Option<TscPage> {
    if tsc_hz < 1_000_000 {
        return None;
    }
    // scale = 10^7 * 2^64 / tsc_hz (fits: tsc_hz > 10^7 makes it < 2^64).
    let scale = ((10_000_000u128 << 64) / u128::from(tsc_hz)).min(u128::from(u64::MAX)) as u64;
    let mapped = ((u128::from(tsc_now) * u128::from(scale)) >> 64) as u64;
    Some(TscPage {
        scale,
        offset: ref_now.wrapping_sub(mapped) as i64,
    })
}

/// Writes a message into a free slot: payload, then the header with the type last, so a
/// guest polling the slot never sees a type with a half-written payload.
fn write_message(
    mem: &GuestMemory,
    slot: u64,
    message_type: u32,
    payload: &[u8],
    more: bool,
) -> bool {
    let n = payload.len().min(HV_MESSAGE_PAYLOAD_BYTE_COUNT);
    let mut body = [0u8; HV_MESSAGE_SIZE - 8];
    // Bytes 4..8: payload size, flags, reserved; 8..16: sender (0: the hypervisor).
    body[0] = n as u8;
    body[1] = if more {
        HvMessageHeader::MSG_PENDING
    } else {
        0
    };
    body[12..12 + n].copy_from_slice(&payload[..n]);
    mem.write(slot + 4, &body).is_ok() && mem.store_u32(slot, message_type).is_ok()
}

/// A decoded hypercall the VMM implements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// HvPostMessage.
    PostMessage {
        /// Connection id (low 24 bits).
        connection_id: u32,
        /// SynIC message type.
        message_type: u32,
        /// The payload (at most 240 bytes).
        payload: Vec<u8>,
    },
    /// HvSignalEvent (flag 0).
    SignalEvent {
        /// Connection id (low 24 bits).
        connection_id: u32,
    },
}

/// Control-word bits that must be zero: 27..30 and 44..47, 60..63. Bit 31 (nested) is
/// refused too: there is no nested hypervisor here.
const CONTROL_RESERVED: u64 = 0xF << 27 | 1 << 31 | 0xF << 44 | 0xF << 60;

/// Decodes a hypercall and reads its input from guest memory.
pub fn decode_call(
    control: u64,
    input: u64,
    _output: u64,
    mem: &GuestMemory,
) -> Result<Call, HvStatus> {
    let c = HypercallControl(control);
    if control & CONTROL_RESERVED != 0 {
        return Err(HvStatus::INVALID_HYPERCALL_INPUT);
    }
    match c.code() {
        HVCALL_POST_MESSAGE => {
            if c.is_fast() {
                // The fast (XMM) form is not offered (CPUID 0x40000003 EDX bit 4 clear).
                return Err(HvStatus::INVALID_PARAMETER);
            }
            if c.rep_count() != 0 || c.variable_header_size() != 0 {
                return Err(HvStatus::INVALID_HYPERCALL_INPUT);
            }
            if !input.is_multiple_of(8) || input % PAGE + HV_MESSAGE_SIZE as u64 > PAGE {
                return Err(HvStatus::INVALID_ALIGNMENT);
            }
            let mut raw = [0u8; HV_MESSAGE_SIZE];
            mem.read(input, &mut raw)
                .map_err(|_| HvStatus::INVALID_PARAMETER)?;
            let msg = HvPostMessageInput::read_from_bytes(&raw[..])
                .map_err(|_| HvStatus::INVALID_PARAMETER)?;
            let message_type = msg.message_type.get();
            // Types 0 and those with bit 31 (hypervisor messages) may not be posted.
            if message_type == 0 || message_type & 0x8000_0000 != 0 {
                return Err(HvStatus::INVALID_PARAMETER);
            }
            let payload = msg.payload().map_err(|_| HvStatus::INVALID_PARAMETER)?;
            Ok(Call::PostMessage {
                connection_id: msg.connection_id(),
                message_type,
                payload: payload.to_vec(),
            })
        }
        HVCALL_SIGNAL_EVENT => {
            if c.rep_count() != 0 || c.variable_header_size() != 0 {
                return Err(HvStatus::INVALID_HYPERCALL_INPUT);
            }
            let raw = if c.is_fast() {
                input
            } else {
                if !input.is_multiple_of(8) {
                    return Err(HvStatus::INVALID_ALIGNMENT);
                }
                mem.load_u64(input)
                    .map_err(|_| HvStatus::INVALID_PARAMETER)?
            };
            // Bits 0..31 connection id (24 used), 32..47 flag number, 48..63 reserved.
            if raw >> 48 != 0 || raw as u32 & 0xFF00_0000 != 0 {
                return Err(HvStatus::INVALID_HYPERCALL_INPUT);
            }
            if (raw >> 32) as u16 != 0 {
                // VMBus ports have one flag; KVM answers the same way.
                return Err(HvStatus::INVALID_PORT_ID);
            }
            Ok(Call::SignalEvent {
                connection_id: raw as u32,
            })
        }
        _ => Err(HvStatus::INVALID_HYPERCALL_CODE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvemu::HostConfig;
    use hvnet_wire::synic::HvMessageType;
    use hvnet_wire::vmbus::{
        encode_body, InitiateContact, VmbusVersion, VMBUS_MESSAGE_CONNECTION_ID_4,
    };
    use zerocopy::IntoBytes;

    /// Guest memory with `n` pages and their GPAs (the model scatters them).
    fn memory(n: usize) -> (GuestMemory, Vec<u64>) {
        let mem = GuestMemory::new(64, 1);
        let pfns = mem.alloc_pages(n).unwrap();
        (mem, pfns.into_iter().map(|p| p * PAGE).collect())
    }

    #[test]
    fn cpuid_identifies_hyper_v() {
        let leaves = cpuid_leaves(1);
        let get = |l: u32| leaves.iter().find(|e| e.0 == l).unwrap().1;
        let top = get(0x4000_0000);
        assert!(top[0] >= 0x4000_0005);
        let vendor: Vec<u8> = top[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(vendor, b"Microsoft Hv");
        assert_eq!(get(0x4000_0001)[0], 0x3123_7648);
        // Hypercall (5), VP index (6), SynIC (2) are what VMBus needs.
        assert_eq!(get(0x4000_0003)[0] & 0x64, 0x64);
        assert_eq!(get(0x4000_0005)[0], 1);
        assert_eq!(leaves.last().unwrap().0, MAX_LEAF);
    }

    #[test]
    fn hypercall_page_needs_guest_os_id_and_restores_the_page() {
        let (mem, pages) = memory(1);
        let page = pages[0];
        mem.write(page, &[0xAB; 4096]).unwrap();
        let mut hv = HyperV::new();
        // Without a guest OS id the enable bit does not stick and nothing is written.
        hv.wrmsr(HV_X64_MSR_HYPERCALL, page | 1, &mem).unwrap();
        assert_eq!(hv.rdmsr(HV_X64_MSR_HYPERCALL), Some(page));
        assert_eq!(mem.load_u32(page), Ok(0xABAB_ABAB));
        hv.wrmsr(HV_X64_MSR_GUEST_OS_ID, 0x8100_0000_0000_0000, &mem)
            .unwrap();
        hv.wrmsr(HV_X64_MSR_HYPERCALL, page | 1, &mem).unwrap();
        assert_eq!(hv.rdmsr(HV_X64_MSR_HYPERCALL), Some(page | 1));
        assert!(hv.hypercalls_enabled());
        let mut code = [0u8; HYPERCALL_CODE.len()];
        mem.read(page, &mut code).unwrap();
        assert_eq!(code, HYPERCALL_CODE);
        // Disabling brings the old contents back.
        hv.wrmsr(HV_X64_MSR_HYPERCALL, page, &mem).unwrap();
        assert_eq!(mem.load_u32(page), Ok(0xABAB_ABAB));
        // A page outside RAM is refused with #GP.
        assert_eq!(hv.wrmsr(HV_X64_MSR_HYPERCALL, 0x1000 | 1, &mem), Err(()));
    }

    #[test]
    fn msr_rules() {
        let (mem, pages) = memory(2);
        let mut hv = HyperV::new();
        assert_eq!(hv.rdmsr(HV_X64_MSR_SVERSION), Some(1));
        assert_eq!(hv.rdmsr(HV_X64_MSR_VP_INDEX), Some(0));
        assert_eq!(hv.rdmsr(HV_X64_MSR_SINT0 + 2), Some(SintMsr::MASKED));
        assert_eq!(hv.wrmsr(HV_X64_MSR_VP_INDEX, 1, &mem), Err(()));
        assert_eq!(hv.wrmsr(HV_X64_MSR_TIME_REF_COUNT, 1, &mem), Err(()));
        assert_eq!(hv.rdmsr(0x4000_00B0), None, "no synthetic timers");
        // Unmasked SINT with a vector below 16: #GP.
        assert_eq!(hv.wrmsr(HV_X64_MSR_SINT0 + 2, 0x0F, &mem), Err(()));
        assert_eq!(
            hv.wrmsr(HV_X64_MSR_SINT0 + 2, 0x41, &mem),
            Ok(WriteEffect::Deliver)
        );
        // SIMP enable clears the page.
        mem.write(pages[0], &[0xFF; 16]).unwrap();
        hv.wrmsr(HV_X64_MSR_SIMP, pages[0] | 1, &mem).unwrap();
        assert_eq!(mem.load_u32(pages[0]), Ok(0));
        assert_eq!(hv.rdmsr(HV_X64_MSR_SIMP), Some(pages[0] | 1));
        assert_eq!(hv.stats.msr_faults, 4);
        let t0 = hv.rdmsr(HV_X64_MSR_TIME_REF_COUNT).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(hv.rdmsr(HV_X64_MSR_TIME_REF_COUNT).unwrap() >= t0 + 20_000);
    }

    fn post_input(mem: &GuestMemory, gpa: u64, conn: u32, ty: u32, payload: &[u8]) {
        let mut input = HvPostMessageInput::new(conn, HvMessageType(1), payload).unwrap();
        input.message_type = ty.into();
        mem.write(gpa, input.as_bytes()).unwrap();
    }

    #[test]
    fn hypercall_decoding() {
        let (mem, pages) = memory(1);
        let gpa = pages[0];
        post_input(&mem, gpa, 4, 1, &[1, 2, 3]);
        let post = u64::from(HVCALL_POST_MESSAGE);
        assert_eq!(
            decode_call(post, gpa, 0, &mem),
            Ok(Call::PostMessage {
                connection_id: 4,
                message_type: 1,
                payload: vec![1, 2, 3]
            })
        );
        assert_eq!(
            decode_call(post, gpa + 4, 0, &mem),
            Err(HvStatus::INVALID_ALIGNMENT)
        );
        assert_eq!(
            decode_call(post, gpa + 3968, 0, &mem),
            Err(HvStatus::INVALID_ALIGNMENT)
        );
        assert_eq!(
            decode_call(post | 1 << 16, gpa, 0, &mem),
            Err(HvStatus::INVALID_PARAMETER)
        );
        assert_eq!(
            decode_call(post | 1 << 32, gpa, 0, &mem),
            Err(HvStatus::INVALID_HYPERCALL_INPUT)
        );
        assert_eq!(
            decode_call(post | 1 << 31, gpa, 0, &mem),
            Err(HvStatus::INVALID_HYPERCALL_INPUT)
        );
        assert_eq!(
            decode_call(post, 0x1000, 0, &mem),
            Err(HvStatus::INVALID_PARAMETER)
        );
        // Payload size over 240.
        mem.store_u32(gpa + 12, 241).unwrap();
        assert_eq!(
            decode_call(post, gpa, 0, &mem),
            Err(HvStatus::INVALID_PARAMETER)
        );
        // Hypervisor message types may not be posted.
        post_input(&mem, gpa, 4, 0x8000_0010, &[]);
        assert_eq!(
            decode_call(post, gpa, 0, &mem),
            Err(HvStatus::INVALID_PARAMETER)
        );

        let signal = u64::from(HVCALL_SIGNAL_EVENT) | 1 << 16;
        assert_eq!(
            decode_call(signal, 0x2005, 0, &mem),
            Ok(Call::SignalEvent {
                connection_id: 0x2005
            })
        );
        assert_eq!(
            decode_call(signal, 1 << 32 | 5, 0, &mem),
            Err(HvStatus::INVALID_PORT_ID)
        );
        assert_eq!(
            decode_call(signal, 1 << 50, 0, &mem),
            Err(HvStatus::INVALID_HYPERCALL_INPUT)
        );
        mem.write(gpa, &0x2007u64.to_le_bytes()).unwrap();
        assert_eq!(
            decode_call(u64::from(HVCALL_SIGNAL_EVENT), gpa, 0, &mem),
            Ok(Call::SignalEvent {
                connection_id: 0x2007
            })
        );
        assert_eq!(
            decode_call(0x99, 0, 0, &mem),
            Err(HvStatus::INVALID_HYPERCALL_CODE)
        );
    }

    /// A guest connecting through the emulated hypercalls and SynIC against the real
    /// VMBus host: INITIATE_CONTACT posted, VERSION_RESPONSE delivered into the SIMP slot
    /// with the SINT2 vector; a second message waits for EOM.
    #[test]
    fn post_message_and_synic_delivery() {
        let (mem, pages) = memory(4);
        let (hc, simp, siefp, input) = (pages[0], pages[1], pages[2], pages[3]);
        let mut host = VmbusHost::new(HostConfig::default(), mem.clone());
        let mut hv = HyperV::new();
        hv.wrmsr(HV_X64_MSR_GUEST_OS_ID, 1 << 63, &mem).unwrap();
        hv.wrmsr(HV_X64_MSR_HYPERCALL, hc | 1, &mem).unwrap();
        hv.wrmsr(HV_X64_MSR_SIMP, simp | 1, &mem).unwrap();
        hv.wrmsr(HV_X64_MSR_SIEFP, siefp | 1, &mem).unwrap();
        hv.wrmsr(HV_X64_MSR_SINT0 + 2, 0x41, &mem).unwrap();
        // Nothing is delivered before SCONTROL is enabled.
        assert_eq!(hv.deliver(&mem, &mut host), None);
        hv.wrmsr(HV_X64_MSR_SCONTROL, 1, &mem).unwrap();
        assert!(hv.synic_ready());

        let contact = InitiateContact::new(VmbusVersion::WIN10_V5_3, 0, 2, 0, 0, 0, 0);
        let payload = encode_body(&contact);
        post_input(
            &mem,
            input,
            VMBUS_MESSAGE_CONNECTION_ID_4,
            1,
            payload.as_bytes(),
        );
        hv.hypercall(u64::from(HVCALL_POST_MESSAGE), input, 0, &mem, &mut host);
        assert_eq!(hv.take_result(), 0);
        assert_eq!(hv.take_result(), 2, "no result without a call");
        assert_eq!(hv.stats.posts, 1);
        assert_eq!(hv.deliver(&mem, &mut host), Some(0x41));
        let slot = simp + 2 * 256;
        assert_eq!(mem.load_u32(slot), Ok(1), "VMBus message type");
        let mut hdr = [0u8; 16];
        mem.read(slot, &mut hdr).unwrap();
        assert!(hdr[4] > 0 && hdr[4] as usize <= 240);
        // VERSION_RESPONSE is message type 15 at payload offset 0.
        assert_eq!(mem.load_u32(slot + 16), Ok(15));
        assert_eq!(hv.stats.messages_delivered, 1);

        // Another message while the slot is busy: it waits, message-pending is set.
        host.inject_raw(1, &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hv.deliver(&mem, &mut host), None);
        mem.read(slot, &mut hdr).unwrap();
        assert_eq!(hdr[5] & 1, 1, "message pending");
        // The guest frees the slot and writes EOM: the next message arrives.
        mem.store_u32(slot, 0).unwrap();
        assert_eq!(hv.wrmsr(HV_X64_MSR_EOM, 0, &mem), Ok(WriteEffect::Deliver));
        assert_eq!(hv.deliver(&mem, &mut host), Some(0x41));
        assert_eq!(mem.load_u32(slot + 16), Ok(3));
        mem.read(slot, &mut hdr).unwrap();
        assert_eq!(hdr[5] & 1, 0);

        // Masked SINT: delivered into the page but no interrupt.
        mem.store_u32(slot, 0).unwrap();
        hv.wrmsr(HV_X64_MSR_SINT0 + 2, 0x41 | SintMsr::MASKED, &mem)
            .unwrap();
        host.inject_raw(1, &[4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hv.deliver(&mem, &mut host), None);
        assert_eq!(mem.load_u32(slot + 16), Ok(4));
    }

    #[test]
    fn tsc_page_maps_tsc_to_reference_time() {
        let p = tsc_page_params(3_000_000_000, 3_000_000_000, 5_000).unwrap();
        let at = |tsc: u64| {
            (((u128::from(tsc) * u128::from(p.scale)) >> 64) as u64).wrapping_add(p.offset as u64)
        };
        assert!(at(3_000_000_000).abs_diff(5_000) <= 1);
        // One second of TSC later: 10^7 reference ticks later.
        assert!(at(6_000_000_000).abs_diff(10_005_000) <= 1);
        assert_eq!(tsc_page_params(1, 0, 0), None);

        let (mem, pages) = memory(1);
        let mut hv = HyperV::new();
        assert_eq!(
            hv.wrmsr(HV_X64_MSR_REFERENCE_TSC, pages[0] | 1, &mem),
            Ok(WriteEffect::TscPageEnabled)
        );
        assert_eq!(mem.load_u32(pages[0]), Ok(0), "invalid until published");
        let p = hv.publish_tsc_page(&mem, 1000, 2_000_000_000).unwrap();
        assert_eq!(mem.load_u32(pages[0]), Ok(1));
        assert_eq!(mem.load_u64(pages[0] + 8), Ok(p.scale));
    }
}
