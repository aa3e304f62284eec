//! Received frames held by the driver until the network side takes them.
//!
//! Two things put frames here: reading ahead (inside a batch, one ring pass fills the
//! backlog and the network side's one-frame `receive` calls are then served from it, so
//! a poll pays for one pass over the rings, not one per frame), and a sender digging
//! for send completions behind received frames. The frames live in one private arena:
//! each RNDIS message is copied out of the shared receive buffer straight into it and
//! parsed there, so reading ahead adds no copy and no allocation per frame.
//!
//! The arena is bounded in bytes and in frames: frames are only appended, taken front to
//! back, and the arena starts over once all are taken, so both bounds count what was
//! added since the last start, not what is held now.

use alloc::vec::Vec;
use core::ops::Range;

/// One frame in the arena.
#[derive(Clone, Copy, Debug)]
struct Held {
    start: u32,
    end: u32,
}

/// A bounded FIFO of received frames in one arena. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Backlog {
    arena: Vec<u8>,
    /// Arena bytes in use (from 0): frames are only ever appended at `used`.
    used: usize,
    /// Frames added since the arena started over, oldest first; those before `head`
    /// were taken.
    frames: Vec<Held>,
    head: usize,
    /// What may still be added before the arena starts over.
    free_bytes: usize,
    free_frames: usize,
    max_bytes: usize,
    max_frames: usize,
}

impl Backlog {
    /// An empty backlog of at most `max_frames` frames in `max_bytes` of arena (allocated
    /// on first use).
    pub(crate) fn new(max_bytes: usize, max_frames: usize) -> Self {
        Self {
            arena: Vec::new(),
            used: 0,
            frames: Vec::new(),
            head: 0,
            free_bytes: max_bytes,
            free_frames: max_frames,
            max_bytes,
            max_frames,
        }
    }

    /// Empty again: the arena starts over.
    fn start_over(&mut self) {
        self.frames.clear();
        self.head = 0;
        self.used = 0;
        self.free_bytes = self.max_bytes;
        self.free_frames = self.max_frames;
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.frames.len()
    }

    /// Whether a message of `len` bytes can be added now.
    #[inline]
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.free_frames != 0 && len <= self.free_bytes
    }

    /// Room for `len` bytes at the end of the arena, to copy a message into; `None` if
    /// the backlog is full. Nothing is held until [`commit`](Self::commit).
    #[inline]
    pub(crate) fn reserve(&mut self, len: usize) -> Option<&mut [u8]> {
        if !self.has_room(len) {
            return None;
        }
        let end = self.used + len;
        if self.arena.len() < end {
            // Grown geometrically from a first 16 KiB, up to the bound; out of memory,
            // the backlog is full (the caller drops or leaves the frame).
            let grown = end
                .max(self.arena.len() * 2)
                .max(16 * 1024)
                .min(self.max_bytes);
            if self
                .arena
                .try_reserve_exact(grown - self.arena.len())
                .is_err()
            {
                return None;
            }
            self.arena.resize(grown, 0);
        }
        Some(&mut self.arena[self.used..end])
    }

    /// Holds the frame at `frame` of the last [`reserve`](Self::reserve)d room (of
    /// `reserved` bytes). A frame outside the room is not held.
    #[inline]
    pub(crate) fn commit(&mut self, reserved: usize, frame: Range<usize>) -> bool {
        if frame.start > frame.end
            || frame.end > reserved
            || reserved > self.arena.len() - self.used
        {
            return false;
        }
        // `max_bytes` bounds every offset; a backlog is far below 4 GiB.
        let (Ok(start), Ok(end)) = (
            u32::try_from(self.used + frame.start),
            u32::try_from(self.used + frame.end),
        ) else {
            return false;
        };
        self.frames.push(Held { start, end });
        self.used += reserved;
        // `reserve` checked both; saturating for a commit without one.
        self.free_bytes = self.free_bytes.saturating_sub(reserved);
        self.free_frames = self.free_frames.saturating_sub(1);
        true
    }

    /// Takes the oldest frame: hands it to `f`, then drops it (once none is left the
    /// arena starts over). `false` if there was none.
    #[inline]
    pub(crate) fn take(&mut self, f: impl FnOnce(&[u8])) -> bool {
        let Some(held) = self.frames.get(self.head) else {
            return false;
        };
        if let Some(frame) = self.arena.get(held.start as usize..held.end as usize) {
            f(frame);
        }
        self.head += 1;
        if self.head == self.frames.len() {
            self.start_over();
        }
        true
    }

    /// Drops every frame and gives the arena's memory back.
    pub(crate) fn release(&mut self) {
        self.start_over();
        self.arena = Vec::new();
        self.frames = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Copies `frame` in, as a receive path copies a message.
    fn push(b: &mut Backlog, frame: &[u8]) -> bool {
        let Some(room) = b.reserve(frame.len()) else {
            return false;
        };
        room.copy_from_slice(frame);
        b.commit(frame.len(), 0..frame.len())
    }

    fn take(b: &mut Backlog) -> Option<Vec<u8>> {
        let mut out = None;
        b.take(|f| out = Some(f.to_vec()));
        out
    }

    #[test]
    fn frames_come_out_in_order_and_the_arena_starts_over() {
        let mut b = Backlog::new(64, 8);
        assert!(push(&mut b, b"first"));
        let room = b.reserve(10).expect("room");
        room.copy_from_slice(b"hdr-second");
        assert!(b.commit(10, 4..10));
        assert_eq!(b.frames.len() - b.head, 2);
        assert_eq!(take(&mut b), Some(b"first".to_vec()));
        assert_eq!(take(&mut b), Some(b"second".to_vec()));
        assert!(b.is_empty());
        // Empty: the whole arena is free again.
        assert!(b.has_room(64));
        assert_eq!(take(&mut b), None);
    }

    #[test]
    fn bounds_in_bytes_and_frames_are_kept() {
        let mut b = Backlog::new(16, 2);
        assert!(push(&mut b, &[1; 10]));
        assert!(!b.has_room(7));
        assert!(b.reserve(7).is_none());
        assert!(push(&mut b, &[2; 6]));
        // Bytes are used up and so are the frames.
        assert!(!push(&mut b, &[]));
        assert_eq!(take(&mut b), Some(vec![1; 10]));
        // Not empty yet: the arena does not start over.
        assert!(!b.has_room(1));
        assert_eq!(take(&mut b), Some(vec![2; 6]));
        assert!(push(&mut b, &[3; 16]));
    }

    #[test]
    fn taking_frames_does_not_make_room_until_the_arena_starts_over() {
        let mut b = Backlog::new(64, 2);
        assert!(push(&mut b, b"a"));
        assert!(push(&mut b, b"b"));
        assert_eq!(take(&mut b), Some(b"a".to_vec()));
        // One frame is held, but two were added since the start: the bound holds the
        // list of frames (and the arena) to what was promised.
        assert!(!push(&mut b, b"c"));
        assert_eq!(take(&mut b), Some(b"b".to_vec()));
        assert!(push(&mut b, b"c"));
    }

    #[test]
    fn a_frame_outside_its_room_is_not_held() {
        let mut b = Backlog::new(32, 4);
        let _ = b.reserve(8).expect("room");
        assert!(!b.commit(8, 4..9));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 6..5;
        assert!(!b.commit(8, backwards));
        assert!(!b.commit(40, 0..1));
        assert!(b.is_empty());
        b.release();
        assert!(push(&mut b, b"ok"));
    }
}
