//! Kicking the vCPU thread out of `KVM_RUN`, and shutdown on SIGINT/SIGTERM.
//!
//! A kick is the first real-time signal sent to the vCPU thread with `pthread_kill`. Its
//! handler sets `kvm_run.immediate_exit`: if the thread is inside `KVM_RUN` the signal
//! makes it return `EINTR`; if it is about to enter, `immediate_exit` makes the next
//! `KVM_RUN` return `EINTR` at once. Either way the loop sees the kick. The loop clears
//! `immediate_exit` after each `EINTR`.
//!
//! SIGINT and SIGTERM set a shutdown flag and kick the vCPU thread the same way.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

/// `kvm_run.immediate_exit` of the vCPU, or null when no vCPU is armed.
static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// The vCPU thread (`pthread_t`), 0 when none.
static VCPU_THREAD: AtomicU64 = AtomicU64::new(0);
/// Set by SIGINT/SIGTERM.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_sig: libc::c_int) {
    let p = IMMEDIATE_EXIT.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: `arm` stored a pointer to the byte `immediate_exit` inside the vCPU's
        // live `kvm_run` mapping, and `disarm` clears it before the mapping goes away. A
        // volatile byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

extern "C" fn on_terminate(_sig: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
    send_kick(VCPU_THREAD.load(Ordering::Acquire));
}

fn send_kick(thread: u64) {
    if thread != 0 {
        // SAFETY: `pthread_kill` is async-signal-safe; the id is the vCPU thread's, which
        // lives as long as the process runs the VM (it is the main thread).
        unsafe {
            libc::pthread_kill(thread as libc::pthread_t, kick_signal());
        }
    }
}

fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value; the handler is
    // an `extern "C"` function that only touches atomics (and `pthread_kill`). No
    // SA_RESTART: a kick must interrupt `KVM_RUN`.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A handle that kicks the vCPU thread; cheap to clone and send to other threads.
#[derive(Clone, Copy, Debug)]
pub struct Kicker {
    thread: u64,
}

impl Kicker {
    /// Kicks the vCPU thread out of (or past) its next `KVM_RUN`.
    pub fn kick(&self) {
        send_kick(self.thread);
    }

    /// A kicker that kicks nobody (for tests of the code that kicks).
    #[cfg(test)]
    pub fn for_tests() -> Kicker {
        Kicker { thread: 0 }
    }
}

/// Installs the handlers and makes the calling thread the vCPU thread, whose
/// `kvm_run.immediate_exit` byte is `immediate_exit`.
pub fn arm(immediate_exit: *mut u8) -> std::io::Result<Kicker> {
    set_handler(kick_signal(), on_kick)?;
    set_handler(libc::SIGINT, on_terminate)?;
    set_handler(libc::SIGTERM, on_terminate)?;
    // SAFETY: `pthread_self` has no preconditions.
    let thread = unsafe { libc::pthread_self() } as u64;
    IMMEDIATE_EXIT.store(immediate_exit, Ordering::Release);
    VCPU_THREAD.store(thread, Ordering::Release);
    Ok(Kicker { thread })
}

/// Forgets the `kvm_run` byte (call before the vCPU is dropped). Later kicks do nothing.
pub fn disarm() {
    IMMEDIATE_EXIT.store(std::ptr::null_mut(), Ordering::Release);
}

/// Whether SIGINT or SIGTERM arrived.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::SeqCst)
}
