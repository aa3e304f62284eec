//! Send-buffer sections: which are free, and which queue each busy one was sent on.

use alloc::vec;
use alloc::vec::Vec;

const FREE: u16 = u16::MAX;

/// Tracks the send buffer's fixed-size sections. A section is taken for one outgoing
/// RNDIS message and comes back when the host completes it (or when its queue dies).
pub struct Sections {
    owner: Vec<u16>,
    free: usize,
    hint: usize,
}

impl Sections {
    /// `count` free sections.
    pub fn new(count: usize) -> Self {
        Self {
            owner: vec![FREE; count],
            free: count,
            hint: 0,
        }
    }

    /// Free sections now.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Sections in all.
    pub fn count(&self) -> usize {
        self.owner.len()
    }

    /// Takes a free section for `queue` (which must not be `u16::MAX`).
    #[inline(always)]
    pub fn take(&mut self, queue: u16) -> Option<u32> {
        if self.free == 0 || queue == FREE {
            return None;
        }
        let n = self.owner.len();
        // Sections come back roughly in order: the one after the last taken is usually
        // free.
        if let Some(owner) = self.owner.get_mut(self.hint) {
            if *owner == FREE {
                *owner = queue;
                self.free -= 1;
                let i = self.hint;
                self.hint = if i + 1 == n { 0 } else { i + 1 };
                return u32::try_from(i).ok();
            }
        }
        self.take_searching(queue)
    }

    /// [`take`](Self::take) when the hint is busy: the next free one after it.
    #[cold]
    fn take_searching(&mut self, queue: u16) -> Option<u32> {
        let n = self.owner.len();
        for step in 0..n {
            let i = (self.hint + step) % n;
            if self.owner[i] == FREE {
                self.owner[i] = queue;
                self.free -= 1;
                self.hint = (i + 1) % n;
                return u32::try_from(i).ok();
            }
        }
        None
    }

    /// Gives section `index` back if it is busy on `queue`; returns whether it was. An
    /// unknown index or a completion on the wrong queue (a confused or hostile host)
    /// changes nothing.
    #[inline]
    pub fn give_back(&mut self, index: u32, queue: u16) -> bool {
        match self.owner.get_mut(index as usize) {
            Some(owner) if *owner == queue && queue != FREE => {
                *owner = FREE;
                self.free += 1;
                true
            }
            _ => false,
        }
    }

    /// Frees every section busy on `queue` (its channel is gone and will never complete
    /// them); returns how many.
    pub fn reclaim_queue(&mut self, queue: u16) -> usize {
        let mut n = 0;
        for owner in self.owner.iter_mut().filter(|o| **o == queue) {
            *owner = FREE;
            n += 1;
        }
        self.free += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_until_empty_then_give_back() {
        let mut s = Sections::new(3);
        let a = s.take(0).unwrap();
        let b = s.take(1).unwrap();
        let c = s.take(0).unwrap();
        assert_eq!(s.take(0), None);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert!(!s.give_back(b, 0), "wrong queue");
        assert!(s.give_back(b, 1));
        assert!(!s.give_back(b, 1), "double completion");
        assert!(!s.give_back(99, 0), "out of range");
        assert_eq!(s.free(), 1);
        assert_eq!(s.reclaim_queue(0), 2);
        assert_eq!(s.free(), 3);
    }
}
