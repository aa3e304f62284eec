//! GPADL messages: describing a host-visible buffer to the host.
//!
//! A GPADL (guest physical address descriptor list) names a buffer by a handle the guest
//! picks. The guest sends one GPADL_HEADER with the range head and the first PFNs, then as
//! many GPADL_BODY messages as the rest of the PFNs need, all on the channel's relid; the
//! host answers GPADL_CREATED after the last body. Every message must fit one 240-byte
//! SynIC payload, which leaves room for [`GPADL_HEADER_MAX_PFNS`] (26) PFNs in the header
//! and [`GPADL_BODY_MAX_PFNS`] (28) in each body.
//!
//! Like Linux (`create_gpadl_header` / `vmbus_establish_gpadl`), the buffer is one range:
//! `rangecount = 1`, `byte_offset = 0`, `byte_count = pages * 4096`, and
//! `range_buflen = 8 + 8 * pages` counts all PFNs, also those in bodies. `range_buflen`
//! is a u16, which caps one GPADL at [`GPADL_MAX_PAGES`] pages (just under 32 MiB).
//! Bodies leave `msgnumber` 0 as Linux does (hosts match bodies by the GPADL handle).
//!
//! The byte layout comes from [`hvnet_wire::vmbus::gpadl_messages`]; this module checks
//! the guest's inputs and collects the encoded messages, ready for HvPostMessage in order.
//!
//! Sources: `shared/reference/hyperv-facts.md` 5.6, `shared/reference/wire-layouts.md` 1
//! (GPADL_HEADER, GPADL_BODY, gpa_range).

use alloc::vec::Vec;
use core::fmt;

use hvnet_wire::vmbus::{gpadl_messages, ChannelMessageBuf, HV_PAGE_SIZE};
pub use hvnet_wire::vmbus::{GPADL_BODY_MAX_PFNS, GPADL_HEADER_MAX_PFNS};
use hvnet_wire::WireError;

use crate::memory::SharedBuffer;

/// Most pages one GPADL can describe: `range_buflen = 8 + 8 * pages` must fit a u16.
pub const GPADL_MAX_PAGES: usize = (u16::MAX as usize - 8) / 8;

/// Why GPADL messages could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpadlError {
    /// A GPADL needs at least one page.
    NoPages,
    /// More pages than `range_buflen` (u16) can describe.
    TooManyPages {
        /// Pages asked for.
        pages: usize,
        /// [`GPADL_MAX_PAGES`].
        max: usize,
    },
    /// Handle 0 is not a valid GPADL handle.
    ZeroHandle,
    /// The wire encoder refused the range (not expected after the checks above).
    Wire(WireError),
}

impl fmt::Display for GpadlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPages => f.write_str("GPADL without pages"),
            Self::TooManyPages { pages, max } => {
                write!(f, "GPADL of {pages} pages exceeds the maximum {max}")
            }
            Self::ZeroHandle => f.write_str("GPADL handle 0"),
            Self::Wire(e) => write!(f, "GPADL encoding failed: {e}"),
        }
    }
}

impl core::error::Error for GpadlError {}

/// Number of messages (one header, then bodies) a GPADL of `pages` pages takes.
pub fn message_count(pages: usize) -> usize {
    1 + pages
        .saturating_sub(GPADL_HEADER_MAX_PFNS)
        .div_ceil(GPADL_BODY_MAX_PFNS)
}

/// Encodes the GPADL_HEADER and GPADL_BODY messages that describe the pages `pfns` (in
/// order, each 4 KiB) as GPADL `gpadl` of channel `child_relid`. Post them in order.
pub fn encode(
    gpadl: u32,
    child_relid: u32,
    pfns: &[u64],
) -> Result<Vec<ChannelMessageBuf>, GpadlError> {
    if gpadl == 0 {
        return Err(GpadlError::ZeroHandle);
    }
    if pfns.is_empty() {
        return Err(GpadlError::NoPages);
    }
    let too_many = GpadlError::TooManyPages {
        pages: pfns.len(),
        max: GPADL_MAX_PAGES,
    };
    if pfns.len() > GPADL_MAX_PAGES {
        return Err(too_many);
    }
    let byte_count = pfns
        .len()
        .checked_mul(HV_PAGE_SIZE)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(too_many)?;
    let mut messages = Vec::with_capacity(message_count(pfns.len()));
    messages
        .extend(gpadl_messages(child_relid, gpadl, 0, byte_count, pfns).map_err(GpadlError::Wire)?);
    if messages.len() != message_count(pfns.len()) {
        // The encoder stopped early: it could not fit a message (cannot happen for
        // the sizes checked above).
        return Err(GpadlError::Wire(WireError::TooLong));
    }
    Ok(messages)
}

/// The PFNs of every page of `buffer`, in order.
pub fn buffer_pfns(buffer: &dyn SharedBuffer) -> Vec<u64> {
    (0..buffer.pages()).map(|i| buffer.pfn(i)).collect()
}

/// Encodes the messages describing all of `buffer` (see [`encode`]).
pub fn encode_buffer(
    gpadl: u32,
    child_relid: u32,
    buffer: &dyn SharedBuffer,
) -> Result<Vec<ChannelMessageBuf>, GpadlError> {
    encode(gpadl, child_relid, &buffer_pfns(buffer))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::memory::{MemoryError, PAGE_SIZE};
    use hvnet_wire::vmbus::{ChannelMessage, MAX_CHANNEL_MESSAGE_SIZE};
    use hvnet_wire::U64;
    use std::vec;

    /// Plays the host: decodes the messages in order, checks each against the layout
    /// rules and returns (relid, handle, byte_offset, byte_count, pfns).
    fn reassemble(messages: &[ChannelMessageBuf]) -> (u32, u32, u32, u32, Vec<u64>) {
        let (first, rest) = messages.split_first().expect("at least the header");
        assert!(first.len() <= MAX_CHANNEL_MESSAGE_SIZE);
        let ChannelMessage::GpadlHeader(h) = ChannelMessage::decode(first.as_bytes()).unwrap()
        else {
            panic!("first message is not GPADL_HEADER");
        };
        assert_eq!(h.header.rangecount.get(), 1);
        let handle = h.header.gpadl.get();
        let mut words: Vec<U64> = h.words.to_vec();
        for (i, m) in rest.iter().enumerate() {
            assert!(m.len() <= MAX_CHANNEL_MESSAGE_SIZE);
            let ChannelMessage::GpadlBody(b) = ChannelMessage::decode(m.as_bytes()).unwrap() else {
                panic!("message {} is not GPADL_BODY", i + 1);
            };
            assert_eq!(b.body.gpadl.get(), handle);
            assert_eq!(b.body.msgnumber.get(), 0, "Linux leaves msgnumber 0");
            // Every body but the last is full.
            if i + 1 < rest.len() {
                assert_eq!(b.words.len(), GPADL_BODY_MAX_PFNS);
            }
            words.extend_from_slice(b.words);
        }
        let ranges = h
            .header
            .parse_ranges(&words)
            .expect("range data fills range_buflen");
        let mut it = ranges.iter();
        let range = it.next().unwrap();
        assert!(it.next().is_none());
        let pfns = range.pfns.iter().map(|p| p.get()).collect();
        (
            h.header.child_relid.get(),
            handle,
            range.byte_offset,
            range.byte_count,
            pfns,
        )
    }

    #[test]
    fn capacities_match_the_layouts() {
        // wire-layouts.md 1: (240 - 8 - 12 - 8) / 8 and (240 - 8 - 8) / 8.
        assert_eq!(GPADL_HEADER_MAX_PFNS, 26);
        assert_eq!(GPADL_BODY_MAX_PFNS, 28);
        assert_eq!(GPADL_MAX_PAGES, 8190);
        assert_eq!(message_count(1), 1);
        assert_eq!(message_count(26), 1);
        assert_eq!(message_count(27), 2);
        assert_eq!(message_count(54), 2);
        assert_eq!(message_count(55), 3);
    }

    #[test]
    fn split_and_reassemble() {
        for pages in [
            1usize,
            2,
            25,
            26,
            27,
            53,
            54,
            55,
            100,
            4096,
            GPADL_MAX_PAGES,
        ] {
            let pfns: Vec<u64> = (0..pages as u64)
                .map(|i| 0x10_0000 + i * 7 + (i % 3) * 0x1_0000_0000)
                .collect();
            let msgs = encode(0xe1e10, 17, &pfns).unwrap();
            assert_eq!(msgs.len(), message_count(pages), "{pages} pages");
            // The header is full whenever bodies follow.
            let expect_header_len = 8 + 12 + 8 + 8 * pages.min(GPADL_HEADER_MAX_PFNS);
            assert_eq!(msgs[0].len(), expect_header_len);
            let (relid, handle, offset, count, got) = reassemble(&msgs);
            assert_eq!((relid, handle, offset), (17, 0xe1e10, 0));
            assert_eq!(count as usize, pages * PAGE_SIZE);
            assert_eq!(got, pfns, "{pages} pages");
        }
    }

    #[test]
    fn header_fixture() {
        // One page: header 8 + fixed 12 + range head 8 + 1 PFN.
        let msgs = encode(0x1234, 5, &[0xabcde]).unwrap();
        assert_eq!(msgs.len(), 1);
        let b = msgs[0].as_bytes();
        assert_eq!(&b[0..4], &8u32.to_le_bytes()); // CHANNELMSG_GPADL_HEADER
        assert_eq!(&b[8..12], &5u32.to_le_bytes()); // child_relid
        assert_eq!(&b[12..16], &0x1234u32.to_le_bytes()); // gpadl
        assert_eq!(&b[16..18], &16u16.to_le_bytes()); // range_buflen = 8 + 8
        assert_eq!(&b[18..20], &1u16.to_le_bytes()); // rangecount
        assert_eq!(&b[20..24], &4096u32.to_le_bytes()); // byte_count
        assert_eq!(&b[24..28], &0u32.to_le_bytes()); // byte_offset
        assert_eq!(&b[28..36], &0xabcdeu64.to_le_bytes());
        assert_eq!(b.len(), 36);

        // 27 pages: the 27th PFN travels alone in one body right after the handle.
        let pfns: Vec<u64> = (1..=27).collect();
        let msgs = encode(0x99, 5, &pfns).unwrap();
        let body = msgs[1].as_bytes();
        assert_eq!(&body[0..4], &9u32.to_le_bytes()); // CHANNELMSG_GPADL_BODY
        assert_eq!(&body[8..12], &0u32.to_le_bytes()); // msgnumber
        assert_eq!(&body[12..16], &0x99u32.to_le_bytes()); // gpadl
        assert_eq!(&body[16..24], &27u64.to_le_bytes());
        assert_eq!(body.len(), 24);
        let hdr = msgs[0].as_bytes();
        assert_eq!(&hdr[16..18], &(8u16 + 8 * 27).to_le_bytes());
        assert_eq!(hdr.len(), MAX_CHANNEL_MESSAGE_SIZE - 4); // 236: 26 PFNs, 4 spare bytes
    }

    #[test]
    fn rejects_bad_inputs() {
        assert_eq!(encode(1, 1, &[]), Err(GpadlError::NoPages));
        assert_eq!(encode(0, 1, &[1]), Err(GpadlError::ZeroHandle));
        let many = vec![0u64; GPADL_MAX_PAGES + 1];
        assert_eq!(
            encode(1, 1, &many),
            Err(GpadlError::TooManyPages {
                pages: GPADL_MAX_PAGES + 1,
                max: GPADL_MAX_PAGES
            })
        );
    }

    struct Pages {
        pages: usize,
        base: u64,
    }

    impl SharedBuffer for Pages {
        fn len(&self) -> usize {
            self.pages * PAGE_SIZE
        }
        fn pfn(&self, index: usize) -> u64 {
            // Not contiguous: GPADLs carry every page.
            self.base + 2 * index as u64
        }
        fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
            Err(MemoryError::OutOfBounds {
                offset,
                len: buf.len(),
            })
        }
        fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
            Err(MemoryError::OutOfBounds {
                offset,
                len: data.len(),
            })
        }
        fn load_u32(&self, offset: usize) -> Result<u32, MemoryError> {
            Err(MemoryError::OutOfBounds { offset, len: 4 })
        }
        fn store_u32(&self, offset: usize, _: u32) -> Result<(), MemoryError> {
            Err(MemoryError::OutOfBounds { offset, len: 4 })
        }
    }

    #[test]
    fn from_buffer() {
        let buf = Pages {
            pages: 40,
            base: 0x8000,
        };
        let msgs = encode_buffer(7, 3, &buf).unwrap();
        assert_eq!(msgs.len(), 2);
        let (_, _, _, count, pfns) = reassemble(&msgs);
        assert_eq!(count, 40 * 4096);
        assert_eq!(pfns, (0..40).map(|i| 0x8000 + 2 * i).collect::<Vec<_>>());
    }
}
