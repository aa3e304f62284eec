//! What this crate needs from the machine, as two small traits.
//!
//! The appliance implements them with `rdmsr`/`wrmsr`, a `call` into the hypercall page and
//! atomic accesses to identity-mapped frames; host tests implement them with a recording
//! fake. Everything above them (enable orders, message slots, event flags, the TSC page)
//! is plain safe Rust in this crate.

/// Size of every page the hypervisor shares with the guest here (SIMP, SIEFP, hypercall
/// input page, reference TSC page).
pub const PAGE_SIZE: usize = 4096;

/// Privileged operations of the current virtual processor.
pub trait HvCpu {
    /// Reads a model-specific register.
    fn rdmsr(&self, msr: u32) -> u64;
    /// Writes a model-specific register.
    fn wrmsr(&self, msr: u32, value: u64);
    /// A memory-based hypercall: `call` into the hypercall page with RCX = `control`,
    /// RDX = `input_gpa`, R8 = `output_gpa`. Returns RAX (the hypercall result value).
    fn hypercall(&self, control: u64, input_gpa: u64, output_gpa: u64) -> u64;
    /// A register-based ("fast") hypercall: RCX = `control` (fast bit set), RDX = `rdx`,
    /// R8 = `r8`. Returns RAX.
    fn fast_hypercall(&self, control: u64, rdx: u64, r8: u64) -> u64;
}

/// One 4 KiB page the guest shares with the hypervisor, which may write it at any time.
///
/// The caller owns the memory; this crate only reaches it through these accessors. The
/// offsets this crate passes are constants or derived from constants (never from host
/// data), always inside the page and naturally aligned for the access width, so an
/// implementation may treat anything else as a bug and panic.
pub trait HvPage {
    /// Copies `buf.len()` bytes at `offset` out of the page.
    fn read(&self, offset: usize, buf: &mut [u8]);
    /// Copies `data` into the page at `offset`.
    fn write(&self, offset: usize, data: &[u8]);
    /// Loads the aligned `u32` at `offset` with acquire ordering.
    fn load_u32(&self, offset: usize) -> u32;
    /// Loads the aligned `u64` at `offset` with acquire ordering.
    fn load_u64(&self, offset: usize) -> u64;
    /// Atomically replaces the aligned `u32` at `offset`, returning the old value; a full
    /// (sequentially consistent) barrier, like the Linux `cmpxchg`/`xchg` it stands for.
    fn swap_u32(&self, offset: usize, value: u32) -> u32;
    /// Atomically replaces the aligned `u64` at `offset`, returning the old value; a full
    /// barrier.
    fn swap_u64(&self, offset: usize, value: u64) -> u64;
}
