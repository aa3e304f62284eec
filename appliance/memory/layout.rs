//! Addresses the linker script defines (see `appliance/linker.ld`).

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __stack_guard: u8;
    static __stack_guard_end: u8;
}

macro_rules! addr {
    ($sym:ident) => {
        // Linker-defined symbol: only its address is taken, never its contents.
        core::ptr::addr_of!($sym) as u64
    };
}

/// `[start, end)` of the whole loaded image, including bss and the boot stack.
pub fn kernel_image() -> (u64, u64) {
    (addr!(__kernel_start), addr!(__kernel_end))
}

/// The boot code and headers before `.text` (executable, read-only once paging is ours).
pub fn boot_section() -> (u64, u64) {
    (addr!(__kernel_start), addr!(__text_start))
}

pub fn text() -> (u64, u64) {
    (addr!(__text_start), addr!(__text_end))
}

pub fn rodata() -> (u64, u64) {
    (addr!(__rodata_start), addr!(__rodata_end))
}

/// Writable data up to the stack guard page.
pub fn data_below_guard() -> (u64, u64) {
    (addr!(__data_start), addr!(__stack_guard))
}

/// The unmapped guard page below the boot stack.
pub fn stack_guard() -> (u64, u64) {
    (addr!(__stack_guard), addr!(__stack_guard_end))
}

/// Boot stack and the rest of bss.
pub fn data_above_guard() -> (u64, u64) {
    (addr!(__stack_guard_end), addr!(__kernel_end))
}
