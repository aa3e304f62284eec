//! GDT and TSS. Every exception runs on an IST stack of its own kind, so a kernel stack
//! overflow (which faults on the guard page) or a corrupt RSP still gets a report.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slots (1-based in the IDT, 0-based in the TSS array).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
pub const IST_EXCEPTION: u8 = 4;

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

/// IST stacks; only written by the CPU while delivering an exception.
static mut IST_STACKS: [Stack; 4] = [const { Stack([0; IST_STACK_SIZE]) }; 4];

struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static TABLES: Once<Tables> = Once::new();

fn stack_top(i: usize) -> VirtAddr {
    // SAFETY: only the address is taken; the memory is handed to the CPU via the TSS.
    let base = unsafe { core::ptr::addr_of!(IST_STACKS[i]) } as u64;
    VirtAddr::new(base + IST_STACK_SIZE as u64)
}

/// Loads the GDT, reloads the segment registers and loads the TSS (boot CPU).
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for i in 0..4 {
            tss.interrupt_stack_table[i] = stack_top(i);
        }
        tss
    });
    let t = TABLES.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables {
            gdt,
            code,
            data,
            tss,
        }
    });
    t.gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives in a
    // static for the rest of the kernel's life.
    unsafe {
        CS::set_reg(t.code);
        DS::set_reg(t.data);
        ES::set_reg(t.data);
        SS::set_reg(t.data);
        load_tss(t.tss);
    }
}

/// The kernel code selector (for IDT gates).
pub fn code_selector() -> u16 {
    TABLES.get().map_or(0x08, |t| t.code.0)
}
