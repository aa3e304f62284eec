//! A broadcast wire and an event-driven loop that runs endpoints on it.

use std::cell::RefCell;
use std::rc::Rc;

use super::Endpoint;
use crate::SplitMix64;

/// After this many busy rounds at one instant, [`Hub::run_until`] moves time on by 1 ms, so
/// long transfers also advance the clock (and a chatty endpoint cannot stall it).
const ROUNDS_PER_MS: u32 = 64;

/// What went over a [`Hub`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Rounds run ([`Hub::step`] calls).
    pub rounds: u64,
    /// Frames sent by endpoints.
    pub frames: u64,
    /// Bytes in those frames.
    pub bytes: u64,
    /// Frames dropped by the loss setting.
    pub dropped: u64,
}

/// A shared Ethernet segment (think of an old coax cable): every frame one endpoint sends
/// reaches every other endpoint, with no delay. Endpoints filter by MAC themselves.
///
/// The hub keeps the simulated clock, which moves only in [`step`](Hub::step) and the
/// `run_*` methods; one step is a round in which every endpoint transmits once (in attach
/// order) and the frames are delivered.
pub struct Hub {
    ports: Vec<Rc<RefCell<dyn Endpoint>>>,
    stats: HubStats,
    loss: Option<(SplitMix64, u64)>,
    capture: Option<Vec<(u64, usize, Vec<u8>)>>,
    now_ms: u64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty wire.
    pub fn new() -> Self {
        Hub {
            ports: Vec::new(),
            stats: HubStats::default(),
            loss: None,
            capture: None,
            now_ms: 0,
        }
    }

    /// Plugs `endpoint` in; returns its port number (attach order).
    pub fn attach(&mut self, endpoint: Rc<RefCell<dyn Endpoint>>) -> usize {
        self.ports.push(endpoint);
        self.ports.len() - 1
    }

    /// Drops each frame with probability `per_million / 1_000_000`, drawn from a generator
    /// seeded with `seed` (so the same seed drops the same frames). 0 turns loss off.
    pub fn set_loss(&mut self, seed: u64, per_million: u64) {
        self.loss = (per_million > 0).then(|| (SplitMix64::new(seed), per_million));
    }

    /// Starts recording every frame sent from now on (time, sending port, bytes).
    pub fn start_capture(&mut self) {
        self.capture = Some(Vec::new());
    }

    /// Takes the frames recorded so far (empty if capture is off).
    pub fn take_capture(&mut self) -> Vec<(u64, usize, Vec<u8>)> {
        self.capture
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Counters so far.
    pub fn stats(&self) -> HubStats {
        self.stats
    }

    /// One round at `now_ms` (the clock moves there; it never goes back): every endpoint
    /// transmits, then every frame is delivered to every other endpoint. Returns how many
    /// frames were sent.
    pub fn step(&mut self, now_ms: u64) -> usize {
        self.now_ms = self.now_ms.max(now_ms);
        let now_ms = self.now_ms;
        self.stats.rounds += 1;
        let mut frames: Vec<(usize, Vec<u8>)> = Vec::new();
        for (port, endpoint) in self.ports.iter().enumerate() {
            endpoint
                .borrow_mut()
                .transmit(now_ms, &mut |frame| frames.push((port, frame.to_vec())));
        }
        let sent = frames.len();
        for (from, frame) in frames {
            self.stats.frames += 1;
            self.stats.bytes += frame.len() as u64;
            if let Some(capture) = self.capture.as_mut() {
                capture.push((now_ms, from, frame.clone()));
            }
            if let Some((rng, per_million)) = self.loss.as_mut() {
                if rng.chance(*per_million, 1_000_000) {
                    self.stats.dropped += 1;
                    continue;
                }
            }
            for (port, endpoint) in self.ports.iter().enumerate() {
                if port != from {
                    endpoint.borrow_mut().receive(now_ms, &frame);
                }
            }
        }
        sent
    }

    /// The earliest time any endpoint wants to transmit (None: all idle).
    pub fn next_wakeup(&self, now_ms: u64) -> Option<u64> {
        self.ports
            .iter()
            .filter_map(|endpoint| endpoint.borrow().poll_at(now_ms))
            .min()
    }

    /// The wire's clock: the time of the last round (simulated milliseconds).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Runs the wire until `condition()` holds (returns true) or the clock would pass
    /// `deadline_ms` (returns false, with the clock at the deadline). Rounds run back to back
    /// while frames flow; when the wire goes quiet, the clock jumps to the next endpoint
    /// wakeup. The clock stays where it got to, so a test continues from there.
    pub fn run_until(&mut self, deadline_ms: u64, mut condition: impl FnMut() -> bool) -> bool {
        let mut busy_rounds = 0;
        loop {
            if condition() {
                return true;
            }
            if self.now_ms > deadline_ms {
                return false;
            }
            let now = self.now_ms;
            let sent = self.step(now);
            if condition() {
                return true;
            }
            if sent > 0 {
                busy_rounds += 1;
                if busy_rounds < ROUNDS_PER_MS {
                    continue;
                }
            }
            busy_rounds = 0;
            let next = match self.next_wakeup(now) {
                Some(t) if t > now => t,
                // Due now but a round produced nothing (or the round budget ran out).
                Some(_) => now + 1,
                None if sent > 0 => now + 1,
                // Everyone idle: nothing can change before the deadline.
                None => u64::MAX,
            };
            if next > deadline_ms {
                self.now_ms = self.now_ms.max(deadline_ms);
                return condition();
            }
            self.now_ms = next;
        }
    }

    /// [`run_until`](Hub::run_until) with a deadline `timeout_ms` from now.
    pub fn run_within(&mut self, timeout_ms: u64, condition: impl FnMut() -> bool) -> bool {
        let deadline = self.now_ms.saturating_add(timeout_ms);
        self.run_until(deadline, condition)
    }

    /// Runs the wire for `duration_ms` of simulated time.
    pub fn run_for(&mut self, duration_ms: u64) {
        self.run_within(duration_ms, || false);
    }
}

/// Free-function form of [`Hub::run_until`].
pub fn run_until(hub: &mut Hub, deadline_ms: u64, condition: impl FnMut() -> bool) -> bool {
    hub.run_until(deadline_ms, condition)
}
