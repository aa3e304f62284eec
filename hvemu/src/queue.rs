//! Host-to-guest message queue: the SynIC message slot with optional seeded delay and
//! reordering.
//!
//! Hyper-V delivers channel messages one at a time through the SINT2 slot; the guest takes
//! one and signals EOM for the next. Messages about different channels may reach the guest
//! in any order relative to each other (they are produced by different host components),
//! but messages about one device never overtake each other, and connection-level messages
//! are ordered with everything. [`OrderKey`] encodes exactly that, and every delay or
//! reordering this queue applies respects it.

use std::collections::{BTreeSet, VecDeque};

use crate::device::DeviceId;
use crate::rng::SplitMix64;

/// What a queued message must stay ordered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OrderKey {
    /// Ordered with every other message (VERSION_RESPONSE, ALLOFFERS_DELIVERED,
    /// UNLOAD_RESPONSE, injected raw messages).
    Barrier,
    /// Ordered with the other messages of this device (offers of its primary and
    /// sub-channels, GPADL and open results, rescinds).
    Device(DeviceId),
}

#[derive(Clone, Debug)]
struct OutMsg {
    message_type: u32,
    bytes: Vec<u8>,
    key: OrderKey,
    due: u64,
}

/// The queue.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    entries: VecDeque<OutMsg>,
}

impl OutQueue {
    /// Queues a message, deliverable at `due`.
    pub(crate) fn push(&mut self, message_type: u32, bytes: Vec<u8>, key: OrderKey, due: u64) {
        self.entries.push_back(OutMsg {
            message_type,
            bytes,
            key,
            due,
        });
    }

    /// Messages queued.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Indices of the messages that may be delivered at `now`, in queue order, at most
    /// `limit` of them.
    fn eligible(&self, now: u64, limit: usize) -> Vec<usize> {
        let mut blocked = BTreeSet::new();
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            match e.key {
                OrderKey::Barrier => {
                    if i == 0 && e.due <= now {
                        out.push(0);
                    }
                    // Nothing overtakes a barrier.
                    break;
                }
                OrderKey::Device(d) => {
                    // Only the first queued message of a device may go.
                    if blocked.insert(d) && e.due <= now {
                        out.push(i);
                    }
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        out
    }

    /// Takes the next message at `now`: the first deliverable one, or with a non-zero
    /// `window` a seeded pick among the first `window + 1` deliverable ones.
    pub(crate) fn pop(
        &mut self,
        now: u64,
        window: usize,
        rng: &mut SplitMix64,
    ) -> Option<(u32, Vec<u8>)> {
        let eligible = self.eligible(now, window.saturating_add(1));
        let pick = match eligible.len() {
            0 => return None,
            1 => eligible[0],
            n => eligible[rng.below(n as u64) as usize],
        };
        let m = self.entries.remove(pick)?;
        Some((m.message_type, m.bytes))
    }

    /// Whether some message is deliverable at `now`.
    pub(crate) fn ready(&self, now: u64) -> bool {
        !self.eligible(now, 1).is_empty()
    }

    /// The earliest time after `now` at which a queued message becomes due.
    pub(crate) fn next_due(&self, now: u64) -> Option<u64> {
        self.entries
            .iter()
            .map(|e| e.due)
            .filter(|&d| d > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u32) -> OrderKey {
        OrderKey::Device(DeviceId(n))
    }

    #[test]
    fn fifo_without_faults() {
        let mut q = OutQueue::default();
        let mut rng = SplitMix64::new(0);
        for i in 0..5u8 {
            q.push(1, vec![i], dev(u32::from(i % 2)), 0);
        }
        let got: Vec<u8> = std::iter::from_fn(|| q.pop(0, 0, &mut rng))
            .map(|m| m.1[0])
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn reordering_keeps_device_order_and_barriers() {
        for seed in 0..200 {
            let mut q = OutQueue::default();
            let mut rng = SplitMix64::new(seed);
            // (device, sequence) pairs, with a barrier in the middle.
            let plan: Vec<(Option<u32>, u8)> = vec![
                (Some(0), 0),
                (Some(1), 0),
                (Some(0), 1),
                (Some(2), 0),
                (None, 0),
                (Some(1), 1),
                (Some(2), 1),
                (Some(1), 2),
            ];
            for &(d, s) in &plan {
                let key = d.map_or(OrderKey::Barrier, dev);
                q.push(1, vec![d.map_or(9, |d| d as u8), s], key, 0);
            }
            let got: Vec<Vec<u8>> = std::iter::from_fn(|| q.pop(0, 3, &mut rng))
                .map(|m| m.1)
                .collect();
            assert_eq!(got.len(), plan.len());
            let barrier_at = got.iter().position(|m| m[0] == 9).unwrap();
            assert_eq!(barrier_at, 4, "seed {seed}: {got:?}");
            for d in 0..3u8 {
                let seq: Vec<u8> = got.iter().filter(|m| m[0] == d).map(|m| m[1]).collect();
                let mut sorted = seq.clone();
                sorted.sort_unstable();
                assert_eq!(seq, sorted, "seed {seed}: {got:?}");
            }
        }
    }

    #[test]
    fn delayed_messages_wait_and_block_their_device() {
        let mut q = OutQueue::default();
        let mut rng = SplitMix64::new(0);
        q.push(1, vec![0], dev(0), 5);
        q.push(1, vec![1], dev(0), 0);
        q.push(1, vec![2], dev(1), 0);
        assert_eq!(q.pop(0, 0, &mut rng).map(|m| m.1), Some(vec![2]));
        assert_eq!(q.pop(0, 0, &mut rng), None);
        assert_eq!(q.next_due(0), Some(5));
        assert!(!q.ready(4));
        assert_eq!(q.pop(5, 0, &mut rng).map(|m| m.1), Some(vec![0]));
        assert_eq!(q.pop(5, 0, &mut rng).map(|m| m.1), Some(vec![1]));
    }
}
