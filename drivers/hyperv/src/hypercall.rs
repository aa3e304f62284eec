//! The two hypercalls VMBus needs: HvPostMessage and HvSignalEvent.
//!
//! - HvPostMessage (call code 0x005C) is a memory-based call: the 256-byte input block
//!   (`hv_input_post_message`: connection id u32, reserved u32, message type u32, payload
//!   size u32, 240 payload bytes) sits in a page of its own, 8-byte aligned, and its GPA
//!   goes in RDX; there is no output (R8 = 0), as in Linux `hv_post_message`.
//! - HvSignalEvent (0x005D) is issued as a fast call, as Linux `vmbus_set_event` does with
//!   `hv_do_fast_hypercall8`: control = 0x005D | bit 16 (fast), RDX = the 8-byte input
//!   `hv_input_signal_event` read as one little-endian u64 (connection id in bits 0..31,
//!   flag number in bits 32..47, reserved zero in 48..63). VMBus always signals flag 0,
//!   so RDX is just the connection id. R8 carries nothing.
//!
//! The result is RAX; its low 16 bits are the `HV_STATUS` (TLFS "Hypercall Outputs").
//! Sources: hyperv-facts.md section 3, TLFS "Hypercall Interface".

use hvnet_wire::synic::{
    HvMessageType, HvPostMessageInput, HvSignalEventInput, HypercallControl, HypercallResult,
    HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT, HV_MESSAGE_PAYLOAD_BYTE_COUNT,
};
use zerocopy::IntoBytes;

pub use hvnet_wire::synic::HvStatus;

use crate::hw::{HvCpu, HvPage, PAGE_SIZE};

/// Maps a hypercall result value (RAX) to `Ok` for `HV_STATUS_SUCCESS` and the status
/// otherwise. Bits above the status (reps completed, reserved) are ignored.
pub fn check_result(rax: u64) -> Result<(), HvStatus> {
    match HypercallResult(rax).status() {
        HvStatus::SUCCESS => Ok(()),
        status => Err(status),
    }
}

/// The control word of HvPostMessage: a simple (non-rep), memory-based call.
pub const POST_MESSAGE_CONTROL: u64 = HypercallControl::new(HVCALL_POST_MESSAGE).0;
/// The control word of HvSignalEvent as a fast call.
pub const SIGNAL_EVENT_CONTROL: u64 = HypercallControl::new(HVCALL_SIGNAL_EVENT).fast().0;

/// HvPostMessage: writes the input block to offset 0 of `input` (whose guest physical
/// address is `input_gpa`) and calls the hypervisor.
///
/// Refused without a hypercall: a payload over 240 bytes (`INVALID_PARAMETER`) and an
/// input GPA that is not page aligned (`INVALID_ALIGNMENT`; the TLFS needs 8-byte
/// alignment and no page crossing, and the block is a page of its own here).
pub fn post_message(
    cpu: &impl HvCpu,
    input: &impl HvPage,
    input_gpa: u64,
    connection_id: u32,
    message_type: u32,
    payload: &[u8],
) -> Result<(), HvStatus> {
    if payload.len() > HV_MESSAGE_PAYLOAD_BYTE_COUNT {
        return Err(HvStatus::INVALID_PARAMETER);
    }
    if !input_gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(HvStatus::INVALID_ALIGNMENT);
    }
    let block = HvPostMessageInput::new(connection_id, HvMessageType(message_type), payload)
        .map_err(|_| HvStatus::INVALID_PARAMETER)?;
    input.write(0, block.as_bytes());
    check_result(cpu.hypercall(POST_MESSAGE_CONTROL, input_gpa, 0))
}

/// HvSignalEvent on `connection_id`, event flag `flag_number` (VMBus: 0).
pub fn signal_event(
    cpu: &impl HvCpu,
    connection_id: u32,
    flag_number: u16,
) -> Result<(), HvStatus> {
    let rdx = HvSignalEventInput::new(connection_id, flag_number).as_u64();
    check_result(cpu.fast_hypercall(SIGNAL_EVENT_CONTROL, rdx, 0))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::fake::{FakeCpu, FakePage, Op};

    fn cpu_with_input() -> (FakeCpu, Rc<FakePage>) {
        let cpu = FakeCpu::new();
        let page = Rc::new(FakePage::new("input", &cpu.log));
        *cpu.input_page.borrow_mut() = Some(page.clone());
        (cpu, page)
    }

    #[test]
    fn control_words() {
        assert_eq!(POST_MESSAGE_CONTROL, 0x5C);
        assert_eq!(SIGNAL_EVENT_CONTROL, 0x1_005D);
    }

    /// Input block layout: hyperv_vmbus.h `struct hv_input_post_message`
    /// (wire-layouts.md section 3): connection id @0, reserved @4, message type @8,
    /// payload size @12, payload @16..256.
    #[test]
    fn post_message_input_layout_and_call() {
        let (cpu, page) = cpu_with_input();
        // Stale bytes from an earlier, longer message must not leak into this one.
        page.put(16, &[0xEE; 240]);
        post_message(
            &cpu,
            page.as_ref(),
            0x7_f000,
            4,
            1,
            &[14, 0, 0, 0, 0x05, 0x00],
        )
        .unwrap();
        let ops = cpu.ops();
        let [Op::Hypercall {
            control,
            input_gpa,
            output_gpa,
            input,
        }] = ops.as_slice()
        else {
            panic!("{ops:?}")
        };
        assert_eq!((*control, *input_gpa, *output_gpa), (0x5C, 0x7_f000, 0));
        let mut want = vec![0u8; 256];
        want[0] = 4; // connection id
        want[8] = 1; // message type
        want[12] = 6; // payload size
        want[16..22].copy_from_slice(&[14, 0, 0, 0, 5, 0]);
        assert_eq!(input, &want);
    }

    #[test]
    fn post_message_full_payload_and_refusals() {
        let (cpu, page) = cpu_with_input();
        let payload: Vec<u8> = (0..240).map(|i| i as u8).collect();
        post_message(&cpu, page.as_ref(), 0x1000, 0x00AB_CDEF, 1, &payload).unwrap();
        let Op::Hypercall { input, .. } = &cpu.ops()[0] else {
            panic!()
        };
        assert_eq!(&input[0..4], &[0xEF, 0xCD, 0xAB, 0]);
        assert_eq!(&input[12..16], &[240, 0, 0, 0]);
        assert_eq!(&input[16..256], payload.as_slice());

        cpu.clear_log();
        assert_eq!(
            post_message(&cpu, page.as_ref(), 0x1000, 1, 1, &[0; 241]),
            Err(HvStatus::INVALID_PARAMETER)
        );
        assert_eq!(
            post_message(&cpu, page.as_ref(), 0x1008, 1, 1, &[0; 8]),
            Err(HvStatus::INVALID_ALIGNMENT)
        );
        assert!(
            cpu.ops().is_empty(),
            "refused before calling the hypervisor"
        );
    }

    #[test]
    fn status_mapping() {
        assert_eq!(check_result(0), Ok(()));
        // Reps completed / reserved bits do not turn success into failure.
        assert_eq!(check_result(0x0000_0005_0000_0000), Ok(()));
        assert_eq!(check_result(0x13), Err(HvStatus::INSUFFICIENT_BUFFERS));
        assert_eq!(
            check_result(0xFFFF_0000_0000_0012),
            Err(HvStatus::INVALID_CONNECTION_ID)
        );
        assert_eq!(check_result(0x1_0000), Ok(()), "bit 16 is not status");

        let (cpu, page) = cpu_with_input();
        cpu.result.set(0x13);
        assert_eq!(
            post_message(&cpu, page.as_ref(), 0, 1, 1, &[]),
            Err(HvStatus::INSUFFICIENT_BUFFERS)
        );
        cpu.result.set(0x12);
        assert_eq!(
            signal_event(&cpu, 5, 0),
            Err(HvStatus::INVALID_CONNECTION_ID)
        );
    }

    /// hyperv_vmbus.h `struct hv_input_signal_event`: connection id u32 @0, flag number
    /// u16 @4, reserved u16 @6; passed whole in RDX by the fast call.
    #[test]
    fn signal_event_is_a_fast_call_with_the_input_in_rdx() {
        let cpu = FakeCpu::new();
        signal_event(&cpu, 0x2001, 0).unwrap();
        signal_event(&cpu, 0x2001, 3).unwrap();
        assert_eq!(
            cpu.ops(),
            vec![
                Op::FastHypercall {
                    control: 0x1_005D,
                    rdx: 0x2001,
                    r8: 0
                },
                Op::FastHypercall {
                    control: 0x1_005D,
                    rdx: 0x0003_0000_2001,
                    r8: 0
                },
            ]
        );
    }
}
