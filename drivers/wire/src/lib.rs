//! Wire formats shared by the hvnet guest drivers and the host-side Hyper-V emulator.
//!
//! This crate only describes bytes: the SynIC message slot and hypercall inputs
//! ([`synic`]), VMBus channel messages ([`vmbus`]), ring-buffer packets ([`ring`]), the
//! netvsc protocol ([`nvsp`]) and RNDIS inside it ([`rndis`]). There are no state machines,
//! no allocation and no I/O here; the drivers (`drivers/hyperv`, the VMBus and netvsc
//! logic) and the emulator (`hvemu`) build on it, so both ends of every conversation agree
//! on one definition.
//!
//! # Layers of the API
//!
//! * Fixed-size structures are `#[repr(C)]` structs whose integer fields are the
//!   little-endian, alignment-1 types of [`zerocopy::byteorder`] ([`U16`], [`U32`],
//!   [`U64`]). Every struct therefore has alignment 1 and no padding, its layout is the
//!   packed layout of the C headers it mirrors, and it can be read from *any* byte slice
//!   with `read_from_prefix`/`ref_from_prefix` without an alignment failure. Each struct
//!   has a test that pins its size and field offsets against
//!   `shared/reference/wire-layouts.md`.
//! * Messages whose length varies (a channel message chosen by its type, a GPADL header
//!   with its page numbers, a ring packet with its ranges, an RNDIS packet with its
//!   per-packet information, ...) are decoded by a `parse`/`decode` function returning
//!   `Result<_, WireError>`. These functions are the only way untrusted bytes enter: once
//!   one returns `Ok`, every accessor of the value it returned is bounds-checked by
//!   construction and cannot panic, whatever the peer sent.
//! * Building a message is the mirror image: `encode` writes into a caller buffer (or a
//!   small fixed buffer type) and reports [`WireError::BufferTooSmall`] or
//!   [`WireError::TooLong`] instead of panicking.
//!
//! Sizes used for building never come from the peer, so encoders may trust their inputs'
//! lengths, but they still check them.
//!
//! # Sources
//!
//! Numbers and layouts are taken from `shared/reference/hyperv-facts.md` (constants and
//! orders of operations) and `shared/reference/wire-layouts.md` (sizes and offsets,
//! compiled from the Linux headers and cross-checked with OpenVMM). Constant names follow
//! the Linux headers, in Rust style; each doc comment names the header.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

#[macro_use]
mod macros;

pub mod ic;
pub mod nvsp;
pub mod ring;
pub mod rndis;
pub mod synic;
pub mod vmbus;

pub use zerocopy::byteorder::little_endian::{U16, U32, U64};

use core::fmt;

/// Why a byte buffer is not a valid message, or why a message does not fit a buffer.
///
/// Each variant names the invariant the peer (or the caller) broke. Decoders never panic:
/// they return one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer ends before a fixed-size part (a header or a body) that must be there.
    Truncated,
    /// A length field contradicts the buffer or the layout: longer than the bytes present,
    /// shorter than the header it includes, or not a multiple of the unit it counts in.
    BadLength,
    /// An offset field points outside the message, or back into its fixed header.
    BadOffset,
    /// An element count (ranges, sections, page numbers) does not fit in the space given
    /// for it, or is zero where at least one element is required.
    BadCount,
    /// A flags field has bits set that the protocol reserves.
    BadFlags,
    /// A type number that no reference defines.
    UnknownType(u32),
    /// A type number the protocol defines but this crate does not decode (obsolete,
    /// optional or host-private messages).
    Unsupported(u32),
    /// The message is longer than its transport allows (240 bytes for a channel message).
    TooLong,
    /// The output buffer handed to an encoder is smaller than the message.
    BufferTooSmall,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => f.write_str("message truncated"),
            WireError::BadLength => f.write_str("length field inconsistent with the message"),
            WireError::BadOffset => f.write_str("offset field out of bounds"),
            WireError::BadCount => f.write_str("element count does not fit the message"),
            WireError::BadFlags => f.write_str("reserved flag bits set"),
            WireError::UnknownType(t) => write!(f, "unknown message type {t:#x}"),
            WireError::Unsupported(t) => write!(f, "unsupported message type {t:#x}"),
            WireError::TooLong => f.write_str("message longer than its transport allows"),
            WireError::BufferTooSmall => f.write_str("output buffer too small"),
        }
    }
}

impl core::error::Error for WireError {}

/// Rounds `n` up to the next multiple of 8, or `None` if that overflows.
pub const fn align8(n: usize) -> Option<usize> {
    match n.checked_add(7) {
        Some(v) => Some(v & !7),
        None => None,
    }
}

/// A cursor that appends bytes to a caller buffer without ever panicking.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    /// Appends `bytes`, or fails without writing if they do not fit.
    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(WireError::BufferTooSmall)?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Appends `n` zero bytes.
    pub(crate) fn zeros(&mut self, n: usize) -> Result<(), WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::BufferTooSmall)?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?;
        dst.fill(0);
        self.pos = end;
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.pos
    }
}

/// Returns `bytes[offset..offset + len]`, or `err` if any part lies outside `bytes`.
pub(crate) fn sub_slice(
    bytes: &[u8],
    offset: usize,
    len: usize,
    err: WireError,
) -> Result<&[u8], WireError> {
    let end = offset.checked_add(len).ok_or(err)?;
    bytes.get(offset..end).ok_or(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align8_rounds_up_and_saturates() {
        assert_eq!(align8(0), Some(0));
        assert_eq!(align8(1), Some(8));
        assert_eq!(align8(8), Some(8));
        assert_eq!(align8(17), Some(24));
        assert_eq!(align8(usize::MAX), None);
        assert_eq!(align8(usize::MAX - 7), Some(usize::MAX - 7));
    }

    #[test]
    fn writer_never_overruns() {
        let mut buf = [0xAAu8; 6];
        let mut w = Writer::new(&mut buf);
        w.put(&[1, 2, 3]).unwrap();
        assert_eq!(w.put(&[4, 5, 6, 7]), Err(WireError::BufferTooSmall));
        w.zeros(2).unwrap();
        assert_eq!(w.zeros(2), Err(WireError::BufferTooSmall));
        assert_eq!(w.len(), 5);
        assert_eq!(buf, [1, 2, 3, 0, 0, 0xAA]);
    }

    #[test]
    fn sub_slice_checks_overflow() {
        let b = [0u8; 4];
        assert_eq!(sub_slice(&b, 1, 3, WireError::BadOffset), Ok(&b[1..]));
        assert_eq!(
            sub_slice(&b, 2, 3, WireError::BadOffset),
            Err(WireError::BadOffset)
        );
        assert_eq!(
            sub_slice(&b, usize::MAX, 2, WireError::BadOffset),
            Err(WireError::BadOffset)
        );
    }
}
