//! The SynIC pages: taking a message out of a SINT's slot in the message page (SIMP), and
//! draining a SINT's block of the event-flags page (SIEFP).
//!
//! SIMP: 16 slots of 256 bytes, slot n for SINTn (`struct hv_message`: type u32 @0,
//! payload size u8 @4, flags u8 @5, reserved u16 @6, sender u64 @8, payload @16..256).
//! SIEFP: 16 blocks of 256 bytes (2048 flag bits), block n for SINTn; from VMBus 2.4
//! (WIN8) on, bit n of the VMBus block is set for channel relid n. Both pages are written
//! by the hypervisor at any time: everything read from them is untrusted.
//! Sources: hyperv-facts.md sections 4 and 5.10, Linux `vmbus_signal_eom`
//! (hyperv_vmbus.h) and `vmbus_chan_sched` (vmbus_drv.c), `hv_synic_event_pending` (hv.c).

use core::mem::offset_of;

use hvnet_wire::synic::{
    sief_slot_offset, simp_slot_offset, HvMessage, HvMessageHeader, HV_EVENT_FLAGS_BYTE_COUNT,
    HV_MESSAGE_PAYLOAD_BYTE_COUNT, HV_SYNIC_SINT_COUNT,
};

use crate::hw::{HvCpu, HvPage};
use crate::msr::HV_X64_MSR_EOM;

pub use hvnet_wire::vmbus::VMBUS_MESSAGE_SINT;

/// Offset of `message_type` in a slot.
pub const MESSAGE_TYPE_OFFSET: usize = offset_of!(HvMessageHeader, message_type);
/// Offset of the aligned u32 holding `payload_size` (byte 0) and `message_flags` (byte 1).
pub const SIZE_AND_FLAGS_OFFSET: usize = offset_of!(HvMessageHeader, payload_size);
/// Offset of `sender` in a slot.
pub const SENDER_OFFSET: usize = offset_of!(HvMessageHeader, sender);
/// Offset of the payload in a slot.
pub const PAYLOAD_OFFSET: usize = offset_of!(HvMessage, payload);
/// `message_flags` bit 0: another message is queued behind this one.
pub const MSG_PENDING: u8 = HvMessageHeader::MSG_PENDING;

/// A message copied out of its slot (the slot itself is already free again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenMessage {
    /// `message_type` as the host wrote it (non-zero).
    pub message_type: u32,
    /// `payload_size` as the host wrote it: not validated, may exceed 240.
    pub payload_size: u8,
    /// `sender` (port id in the low half).
    pub sender: u64,
    /// The first `min(payload_size, 240)` bytes of the payload; the rest zero.
    pub payload: [u8; HV_MESSAGE_PAYLOAD_BYTE_COUNT],
    /// The host had another message queued (`message_pending` after the slot was freed),
    /// so end-of-message was signalled.
    pub eom_signalled: bool,
}

/// Takes the message in SINT `sint`'s slot of the message page, if there is one.
///
/// The Linux order (`vmbus_signal_eom`): copy the message out, free the slot by writing
/// `message_type = 0` with a full barrier, and only then read `message_pending`; if it is
/// set, write the EOM MSR so the hypervisor delivers the next queued message. Reading the
/// flag after the slot is free matters: the hypervisor sets it when it finds the slot
/// full, which can happen until the very moment the slot is freed.
pub fn take_message(cpu: &impl HvCpu, simp: &impl HvPage, sint: u8) -> Option<TakenMessage> {
    if usize::from(sint) >= HV_SYNIC_SINT_COUNT {
        return None;
    }
    let slot = simp_slot_offset(sint);
    let message_type = simp.load_u32(slot + MESSAGE_TYPE_OFFSET);
    if message_type == 0 {
        return None;
    }
    let payload_size = simp.load_u32(slot + SIZE_AND_FLAGS_OFFSET) as u8;
    let sender = simp.load_u64(slot + SENDER_OFFSET);
    let mut payload = [0u8; HV_MESSAGE_PAYLOAD_BYTE_COUNT];
    let n = usize::from(payload_size).min(HV_MESSAGE_PAYLOAD_BYTE_COUNT);
    simp.read(slot + PAYLOAD_OFFSET, &mut payload[..n]);
    simp.swap_u32(slot + MESSAGE_TYPE_OFFSET, 0);
    let flags = (simp.load_u32(slot + SIZE_AND_FLAGS_OFFSET) >> 8) as u8;
    let eom_signalled = flags & MSG_PENDING != 0;
    if eom_signalled {
        cpu.wrmsr(HV_X64_MSR_EOM, 0);
    }
    Some(TakenMessage {
        message_type,
        payload_size,
        sender,
        payload,
        eom_signalled,
    })
}

/// Flag bits in one SINT's block of the event-flags page.
pub const EVENT_FLAGS_PER_SINT: u32 = (HV_EVENT_FLAGS_BYTE_COUNT * 8) as u32;

/// Atomically takes every set flag in SINT `sint`'s block of the event-flags page and
/// calls `f` with each flag's number (for VMBus >= 2.4: the channel relid), in
/// increasing order. Returns how many were reported.
///
/// Each 64-bit word is swapped with zero, which test-and-clears all its bits at once: a
/// bit the host sets after the swap stays set for the next drain, none is lost or seen
/// twice. Flag 0 is cleared but never reported: relid 0 is not a channel (Linux
/// `vmbus_chan_sched` skips it as "the channel protocol message" bit, a leftover of the
/// pre-WIN8 scheme, and `hv_synic_event_pending` ignores it too).
pub fn drain_events(siefp: &impl HvPage, sint: u8, f: &mut dyn FnMut(u32)) -> usize {
    if usize::from(sint) >= HV_SYNIC_SINT_COUNT {
        return 0;
    }
    let block = sief_slot_offset(sint);
    let mut reported = 0;
    for word in 0..HV_EVENT_FLAGS_BYTE_COUNT / 8 {
        let offset = block + word * 8;
        // Most words are zero: look before taking (a locked write per word is wasted).
        if siefp.load_u64(offset) == 0 {
            continue;
        }
        let bits = siefp.swap_u64(offset, 0);
        // A plain shift loop: no bit-scan instructions (the emulated CPU of the test
        // VMM may not have them), at most 64 steps per non-zero word.
        for bit in 0..64u32 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let flag = word as u32 * 64 + bit;
            if flag == 0 {
                continue;
            }
            f(flag);
            reported += 1;
        }
    }
    reported
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::fake::{FakeCpu, FakePage, Op};

    const SLOT2: usize = 512;

    /// Offsets: hvgdk_mini.h `struct hv_message_header` / `struct hv_message`
    /// (wire-layouts.md section 3; hyperv-facts.md section 4: slot n at n * 256).
    #[test]
    fn message_slot_layout() {
        assert_eq!(MESSAGE_TYPE_OFFSET, 0);
        assert_eq!(SIZE_AND_FLAGS_OFFSET, 4);
        assert_eq!(offset_of!(HvMessageHeader, message_flags), 5);
        assert_eq!(SENDER_OFFSET, 8);
        assert_eq!(PAYLOAD_OFFSET, 16);
        assert_eq!(simp_slot_offset(VMBUS_MESSAGE_SINT), SLOT2);
        assert_eq!(VMBUS_MESSAGE_SINT, 2);
        // Event flags: 16 blocks of 256 bytes, block n for SINTn (hyperv_vmbus.h).
        assert_eq!(sief_slot_offset(VMBUS_MESSAGE_SINT), 512);
        assert_eq!(EVENT_FLAGS_PER_SINT, 2048);
    }

    fn host_posts(simp: &FakePage, ty: u32, size: u8, flags: u8, payload: &[u8]) {
        simp.put(SLOT2 + 16, payload);
        simp.put(SLOT2 + 4, &[size, flags, 0, 0]);
        simp.put_u64(SLOT2 + 8, 0x77);
        simp.put_u32(SLOT2, ty);
    }

    #[test]
    fn empty_slot_gives_nothing_and_touches_nothing() {
        let cpu = FakeCpu::new();
        let simp = FakePage::new("simp", &cpu.log);
        // A message in another SINT's slot is not ours.
        simp.put_u32(0, 1);
        assert_eq!(take_message(&cpu, &simp, 2), None);
        assert_eq!(take_message(&cpu, &simp, 16), None);
        assert!(cpu.ops().is_empty());
    }

    #[test]
    fn take_frees_the_slot_without_eom_when_nothing_is_pending() {
        let cpu = FakeCpu::new();
        let simp = FakePage::new("simp", &cpu.log);
        host_posts(&simp, 1, 4, 0, &[4, 0, 0, 0]);
        let m = take_message(&cpu, &simp, 2).unwrap();
        assert_eq!(m.message_type, 1);
        assert_eq!(m.payload_size, 4);
        assert_eq!(m.sender, 0x77);
        assert_eq!(&m.payload[..4], &[4, 0, 0, 0]);
        assert!(m.payload[4..].iter().all(|&b| b == 0));
        assert!(!m.eom_signalled);
        assert_eq!(simp.get_u32(SLOT2), 0, "slot freed");
        assert_eq!(
            cpu.ops(),
            vec![Op::Swap {
                page: "simp",
                offset: SLOT2,
                old: 1,
                new: 0
            }]
        );
        assert_eq!(take_message(&cpu, &simp, 2), None);
    }

    #[test]
    fn pending_message_gets_eom_after_the_slot_is_freed() {
        let cpu = FakeCpu::new();
        let simp = FakePage::new("simp", &cpu.log);
        host_posts(&simp, 1, 8, MSG_PENDING, &[1; 8]);
        let m = take_message(&cpu, &simp, 2).unwrap();
        assert!(m.eom_signalled);
        assert_eq!(
            cpu.ops(),
            vec![
                Op::Swap {
                    page: "simp",
                    offset: SLOT2,
                    old: 1,
                    new: 0
                },
                Op::Wrmsr(HV_X64_MSR_EOM, 0),
            ]
        );
    }

    /// The pending flag is read after the slot is freed, so a flag the host set while the
    /// guest was copying still produces the EOM.
    #[test]
    fn pending_set_during_the_copy_is_not_missed() {
        struct RacingPage<'a>(&'a FakePage);
        impl HvPage for RacingPage<'_> {
            fn read(&self, offset: usize, buf: &mut [u8]) {
                self.0.read(offset, buf);
                // The host finds the slot full and marks a message pending.
                self.0.put(SLOT2 + 5, &[MSG_PENDING]);
            }
            fn write(&self, offset: usize, data: &[u8]) {
                self.0.write(offset, data)
            }
            fn load_u32(&self, offset: usize) -> u32 {
                self.0.load_u32(offset)
            }
            fn load_u64(&self, offset: usize) -> u64 {
                self.0.load_u64(offset)
            }
            fn swap_u32(&self, offset: usize, value: u32) -> u32 {
                self.0.swap_u32(offset, value)
            }
            fn swap_u64(&self, offset: usize, value: u64) -> u64 {
                self.0.swap_u64(offset, value)
            }
        }
        let cpu = FakeCpu::new();
        let simp = FakePage::new("simp", &cpu.log);
        host_posts(&simp, 1, 8, 0, &[1; 8]);
        let m = take_message(&cpu, &RacingPage(&simp), 2).unwrap();
        assert!(m.eom_signalled);
        assert_eq!(cpu.ops().last(), Some(&Op::Wrmsr(HV_X64_MSR_EOM, 0)));
    }

    #[test]
    fn oversized_payload_size_is_clamped_and_reported_as_written() {
        let cpu = FakeCpu::new();
        let simp = FakePage::new("simp", &cpu.log);
        // The next slot (SINT3) holds other data that must not be copied.
        simp.put(768, &[0xAB; 256]);
        host_posts(&simp, 1, 255, 0, &[0x5A; 240]);
        let m = take_message(&cpu, &simp, 2).unwrap();
        assert_eq!(
            m.payload_size, 255,
            "as the host wrote it, for the caller to reject"
        );
        assert_eq!(m.payload, [0x5A; 240]);
        assert_eq!(simp.get_u32(SLOT2), 0);
    }

    #[test]
    fn drain_reports_and_clears_each_flag_once() {
        let cpu = FakeCpu::new();
        let siefp = FakePage::new("siefp", &cpu.log);
        // Flags for relids 1, 5, 63, 64, 2047 in SINT2's block, and flag 0.
        siefp.put_u64(512, 1 | (1 << 1) | (1 << 5) | (1 << 63));
        siefp.put_u64(512 + 8, 1);
        siefp.put_u64(512 + 248, 1 << 63);
        // A flag in SINT1's and SINT3's blocks: not ours.
        siefp.put_u64(256, 1 << 7);
        siefp.put_u64(768, 1 << 9);
        let mut seen = Vec::new();
        let n = drain_events(&siefp, 2, &mut |r| seen.push(r));
        assert_eq!(seen, vec![1, 5, 63, 64, 2047]);
        assert_eq!(n, 5);
        for w in 0..32 {
            assert_eq!(siefp.get_u64(512 + 8 * w), 0, "word {w} cleared");
        }
        assert_eq!(siefp.get_u64(256), 1 << 7);
        assert_eq!(siefp.get_u64(768), 1 << 9);
        // Only non-zero words were swapped.
        let swaps = cpu
            .ops()
            .iter()
            .filter(|o| matches!(o, Op::Swap { .. }))
            .count();
        assert_eq!(swaps, 3);
        // Nothing left: a second drain reports nothing.
        let mut again = Vec::new();
        assert_eq!(drain_events(&siefp, 2, &mut |r| again.push(r)), 0);
        assert!(again.is_empty());
    }

    #[test]
    fn flag_zero_alone_is_cleared_not_reported() {
        let cpu = FakeCpu::new();
        let siefp = FakePage::new("siefp", &cpu.log);
        siefp.put_u64(512, 1);
        let mut seen = Vec::new();
        assert_eq!(drain_events(&siefp, 2, &mut |r| seen.push(r)), 0);
        assert!(seen.is_empty());
        assert_eq!(siefp.get_u64(512), 0);
        assert_eq!(drain_events(&siefp, 16, &mut |_| panic!()), 0);
    }
}
