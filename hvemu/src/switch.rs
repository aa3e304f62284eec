//! A small learning Ethernet switch for connecting emulated NICs (and test peers).
//!
//! Each port has a bounded receive queue that its owner drains with [`Switch::take`].
//! [`Switch::send`] learns the source MAC of every good frame on the sending port, then
//! delivers:
//!
//! * broadcast and multicast destinations (group bit set) to every *other* port;
//! * a learned unicast destination to its port only (dropped, and counted, if that is the
//!   sending port itself: a switch never sends a frame back where it came from);
//! * an unknown unicast destination to every other port (flooding).
//!
//! Frames shorter than an Ethernet header (14 bytes) are runts and frames longer than
//! 1514 + 4 bytes (a tagged maximum frame without FCS) are oversized; both are dropped
//! and counted. A full port queue drops the new frame and counts it, per port and in
//! total. The MAC table is bounded too; when full, new addresses are not learned (their
//! frames are flooded) and counted.
//!
//! Everything is ordered (BTreeMap), so a run is deterministic. [`Switch::pump_nic`]
//! moves frames between a port and a [`NetvspHandle`] in both directions.

use std::collections::{BTreeMap, VecDeque};

use crate::netvsp::NetvspHandle;

/// Shortest frame accepted: the Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Longest frame accepted: 1514 bytes plus one 802.1Q tag (no FCS).
pub const MAX_FRAME: usize = 1514 + 4;

/// A port of a [`Switch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(pub u32);

/// Limits of a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Frames a port queue holds before new ones are dropped.
    pub queue_limit: usize,
    /// MAC addresses the table holds.
    pub max_macs: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            queue_limit: 256,
            max_macs: 1024,
        }
    }
}

/// Counters of one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames sent into the switch from this port (good ones).
    pub frames_in: u64,
    /// Frames queued to this port.
    pub frames_out: u64,
    /// Frames for this port dropped because its queue was full.
    pub queue_drops: u64,
    /// Frames waiting in the queue now.
    pub queued: usize,
}

/// Counters of the whole switch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Good frames received (not runts, not oversized, from a known port).
    pub frames_in: u64,
    /// Frames sent to exactly one learned port.
    pub unicast: u64,
    /// Frames flooded (broadcast, multicast or unknown unicast).
    pub flooded: u64,
    /// Copies queued to ports (a flooded frame counts once per port).
    pub delivered: u64,
    /// Frames shorter than 14 bytes.
    pub runts: u64,
    /// Frames longer than 1518 bytes.
    pub oversized: u64,
    /// Copies dropped because a port queue was full.
    pub queue_drops: u64,
    /// Frames whose learned destination is the port they came from.
    pub hairpin_drops: u64,
    /// Frames sent from a port that does not exist (removed or never added).
    pub unknown_port: u64,
    /// Times a MAC moved from one port to another.
    pub mac_moves: u64,
    /// Source MACs not learned because the table was full.
    pub table_full: u64,
    /// Addresses in the table now.
    pub learned: usize,
    /// Per port, by id.
    pub ports: BTreeMap<PortId, PortStats>,
}

#[derive(Debug, Default)]
struct Port {
    queue: VecDeque<Vec<u8>>,
    stats: PortStats,
}

/// The switch (see the module docs).
#[derive(Debug, Default)]
pub struct Switch {
    config: SwitchConfig,
    ports: BTreeMap<PortId, Port>,
    table: BTreeMap<[u8; 6], PortId>,
    next_port: u32,
    stats: SwitchStats,
}

fn is_group(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 != 0)
}

impl Switch {
    /// A switch with default limits and no ports.
    pub fn new() -> Self {
        Self::with_config(SwitchConfig::default())
    }

    /// A switch with `config` and no ports.
    pub fn with_config(config: SwitchConfig) -> Self {
        Switch {
            config,
            ..Default::default()
        }
    }

    /// Adds a port.
    pub fn add_port(&mut self) -> PortId {
        let id = PortId(self.next_port);
        self.next_port += 1;
        self.ports.insert(id, Port::default());
        id
    }

    /// Removes a port: its queue is discarded and the addresses learned on it are
    /// forgotten. Unknown ports are ignored.
    pub fn remove_port(&mut self, port: PortId) {
        if self.ports.remove(&port).is_some() {
            self.table.retain(|_, p| *p != port);
        }
    }

    /// The ports, in id order.
    pub fn ports(&self) -> Vec<PortId> {
        self.ports.keys().copied().collect()
    }

    /// The port a MAC was learned on.
    pub fn lookup(&self, mac: &[u8; 6]) -> Option<PortId> {
        self.table.get(mac).copied()
    }

    /// Switches one frame sent from `from`; returns how many ports it was queued to.
    pub fn send(&mut self, from: PortId, frame: &[u8]) -> usize {
        if !self.ports.contains_key(&from) {
            self.stats.unknown_port += 1;
            return 0;
        }
        if frame.len() < MIN_FRAME {
            self.stats.runts += 1;
            return 0;
        }
        if frame.len() > MAX_FRAME {
            self.stats.oversized += 1;
            return 0;
        }
        self.stats.frames_in += 1;
        if let Some(p) = self.ports.get_mut(&from) {
            p.stats.frames_in += 1;
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        src.copy_from_slice(&frame[6..12]);
        self.learn(src, from);

        if !is_group(&dst) {
            if let Some(&to) = self.table.get(&dst) {
                if to == from {
                    self.stats.hairpin_drops += 1;
                    return 0;
                }
                self.stats.unicast += 1;
                return usize::from(self.deliver(to, frame));
            }
        }
        self.stats.flooded += 1;
        let targets: Vec<PortId> = self.ports.keys().copied().filter(|&p| p != from).collect();
        targets
            .into_iter()
            .filter(|&to| self.deliver(to, frame))
            .count()
    }

    fn learn(&mut self, src: [u8; 6], port: PortId) {
        // A group address is never a source; all-zero is not an address either.
        if is_group(&src) || src == [0; 6] {
            return;
        }
        match self.table.get(&src) {
            Some(&p) if p == port => {}
            Some(_) => {
                self.stats.mac_moves += 1;
                self.table.insert(src, port);
            }
            None if self.table.len() >= self.config.max_macs => self.stats.table_full += 1,
            None => {
                self.table.insert(src, port);
            }
        }
    }

    fn deliver(&mut self, to: PortId, frame: &[u8]) -> bool {
        let limit = self.config.queue_limit;
        let Some(p) = self.ports.get_mut(&to) else {
            return false;
        };
        if p.queue.len() >= limit {
            p.stats.queue_drops += 1;
            self.stats.queue_drops += 1;
            return false;
        }
        p.queue.push_back(frame.to_vec());
        p.stats.frames_out += 1;
        self.stats.delivered += 1;
        true
    }

    /// Takes the oldest frame queued to `port`.
    pub fn take(&mut self, port: PortId) -> Option<Vec<u8>> {
        self.ports.get_mut(&port)?.queue.pop_front()
    }

    /// Frames queued to `port`.
    pub fn queued(&self, port: PortId) -> usize {
        self.ports.get(&port).map_or(0, |p| p.queue.len())
    }

    /// Counters.
    pub fn stats(&self) -> SwitchStats {
        let mut s = self.stats.clone();
        s.learned = self.table.len();
        s.ports = self
            .ports
            .iter()
            .map(|(&id, p)| {
                let mut ps = p.stats;
                ps.queued = p.queue.len();
                (id, ps)
            })
            .collect();
        s
    }

    /// Connects an emulated NIC to `port`: every frame the guest transmitted goes into
    /// the switch, then every frame queued to the port goes to the guest
    /// ([`NetvspHandle::send_to_guest`], which may drop it, e.g. by packet filter).
    /// Returns `(frames from the guest, frames offered to the guest)`. The guest only
    /// sees the offered frames once the host polls the device.
    pub fn pump_nic(&mut self, port: PortId, nic: &NetvspHandle) -> (usize, usize) {
        let mut up = 0;
        while let Some(frame) = nic.take_from_guest() {
            self.send(port, &frame);
            up += 1;
        }
        let mut down = 0;
        while let Some(frame) = self.take(port) {
            nic.send_to_guest(&frame);
            down += 1;
        }
        (up, down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCAST: [u8; 6] = [0xff; 6];

    fn mac(n: u8) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, n]
    }

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[tag; 46]);
        f
    }

    fn drain(s: &mut Switch, p: PortId) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| s.take(p)).collect()
    }

    #[test]
    fn floods_then_learns() {
        let mut s = Switch::new();
        let (a, b, c) = (s.add_port(), s.add_port(), s.add_port());
        // Unknown destination: flooded to b and c, not back to a.
        assert_eq!(s.send(a, &frame(mac(2), mac(1), 1)), 2);
        assert_eq!(drain(&mut s, a).len(), 0);
        assert_eq!(drain(&mut s, b).len(), 1);
        assert_eq!(drain(&mut s, c).len(), 1);
        assert_eq!(s.lookup(&mac(1)), Some(a));
        // b answers: a is known, so only a gets it; b is learned.
        assert_eq!(s.send(b, &frame(mac(1), mac(2), 2)), 1);
        assert_eq!(drain(&mut s, a), vec![frame(mac(1), mac(2), 2)]);
        assert!(drain(&mut s, c).is_empty());
        // Now a -> b is unicast.
        assert_eq!(s.send(a, &frame(mac(2), mac(1), 3)), 1);
        assert_eq!(drain(&mut s, b).len(), 1);
        assert!(drain(&mut s, c).is_empty());
        let st = s.stats();
        assert_eq!((st.flooded, st.unicast, st.delivered), (1, 2, 4));
        assert_eq!(st.learned, 2);
        assert_eq!(st.ports[&a].frames_in, 2);
        assert_eq!(st.ports[&a].frames_out, 1);
    }

    #[test]
    fn broadcast_and_multicast_always_flood() {
        let mut s = Switch::new();
        let (a, b, c) = (s.add_port(), s.add_port(), s.add_port());
        s.send(b, &frame(mac(1), mac(2), 0));
        drain(&mut s, a);
        drain(&mut s, c);
        assert_eq!(s.send(a, &frame(BCAST, mac(1), 1)), 2);
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert_eq!(s.send(a, &frame(mcast, mac(1), 2)), 2);
        assert_eq!(drain(&mut s, b).len(), 2);
        assert_eq!(drain(&mut s, c).len(), 2);
        // A group source address is never learned.
        s.send(c, &frame(BCAST, mcast, 3));
        assert_eq!(s.lookup(&mcast), None);
    }

    #[test]
    fn mac_moves_and_hairpin() {
        let mut s = Switch::new();
        let (a, b) = (s.add_port(), s.add_port());
        s.send(a, &frame(BCAST, mac(1), 0));
        assert_eq!(s.lookup(&mac(1)), Some(a));
        s.send(b, &frame(BCAST, mac(1), 0));
        assert_eq!(s.lookup(&mac(1)), Some(b));
        assert_eq!(s.stats().mac_moves, 1);
        // mac(3) behind b sends to mac(1), also behind b: not sent back.
        assert_eq!(s.send(b, &frame(mac(1), mac(3), 0)), 0);
        assert_eq!(s.stats().hairpin_drops, 1);
    }

    #[test]
    fn runts_oversized_and_unknown_ports() {
        let mut s = Switch::new();
        let (a, b) = (s.add_port(), s.add_port());
        assert_eq!(s.send(a, &[0u8; 13]), 0);
        assert_eq!(s.send(a, &vec![0u8; MAX_FRAME + 1]), 0);
        // Boundary sizes pass.
        let mut min = frame(BCAST, mac(1), 0);
        min.truncate(MIN_FRAME);
        assert_eq!(s.send(a, &min), 1);
        let mut max = frame(BCAST, mac(1), 0);
        max.resize(MAX_FRAME, 0);
        assert_eq!(s.send(a, &max), 1);
        assert_eq!(s.send(PortId(99), &frame(BCAST, mac(1), 0)), 0);
        let st = s.stats();
        assert_eq!((st.runts, st.oversized, st.unknown_port), (1, 1, 1));
        assert_eq!(st.frames_in, 2);
        assert_eq!(s.queued(b), 2);
    }

    #[test]
    fn queues_are_bounded() {
        let mut s = Switch::with_config(SwitchConfig {
            queue_limit: 3,
            max_macs: 1024,
        });
        let (a, b) = (s.add_port(), s.add_port());
        for i in 0..5 {
            s.send(a, &frame(BCAST, mac(1), i));
        }
        let st = s.stats();
        assert_eq!(st.queue_drops, 2);
        assert_eq!(st.ports[&b].queue_drops, 2);
        assert_eq!(st.ports[&b].queued, 3);
        // The oldest frames were kept, in order.
        let got: Vec<u8> = drain(&mut s, b).iter().map(|f| f[20]).collect();
        assert_eq!(got, [0, 1, 2]);
    }

    #[test]
    fn mac_table_is_bounded() {
        let mut s = Switch::with_config(SwitchConfig {
            queue_limit: 16,
            max_macs: 2,
        });
        let (a, b) = (s.add_port(), s.add_port());
        for n in 1..=4 {
            s.send(a, &frame(BCAST, mac(n), 0));
        }
        assert_eq!(s.stats().learned, 2);
        assert_eq!(s.stats().table_full, 2);
        // An unlearned destination is flooded (to b only, the other port).
        drain(&mut s, b);
        assert_eq!(s.send(b, &frame(mac(4), mac(9), 0)), 1);
        assert_eq!(s.take(a).map(|f| f[..6].to_vec()), Some(mac(4).to_vec()));
    }

    #[test]
    fn removing_a_port_forgets_its_macs() {
        let mut s = Switch::new();
        let (a, b, c) = (s.add_port(), s.add_port(), s.add_port());
        s.send(b, &frame(BCAST, mac(2), 0));
        s.remove_port(b);
        assert_eq!(s.lookup(&mac(2)), None);
        assert_eq!(s.ports(), vec![a, c]);
        // Frames to mac(2) now flood to the remaining ports; sends from b are refused.
        assert_eq!(s.send(a, &frame(mac(2), mac(1), 0)), 1);
        assert_eq!(s.send(b, &frame(mac(1), mac(2), 0)), 0);
        assert_eq!(s.take(b), None);
        // Ids are never reused.
        assert_eq!(s.add_port(), PortId(3));
    }
}
