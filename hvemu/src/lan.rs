//! A virtual LAN: one learning [`Switch`] joining emulated NICs (netvsp) and simulated
//! peers ([`Endpoint`]s such as a DHCP server or a host running echo services).
//!
//! The LAN has no clock and no thread of its own: whoever runs it (a deterministic test,
//! the VMM's event loop) calls [`Lan::step`] with the current time, then polls the NICs'
//! VMBus devices so frames queued for guests are delivered.

use std::cell::RefCell;
use std::rc::Rc;

use crate::netvsp::NetvspHandle;
use crate::peers::Endpoint;
use crate::switch::{PortId, Switch};

/// What sits behind a switch port.
enum Attachment {
    Nic(NetvspHandle),
    Peer(Rc<RefCell<dyn Endpoint>>),
}

/// A switch with its NICs and peers.
pub struct Lan {
    switch: Switch,
    ports: Vec<(PortId, Attachment)>,
}

impl Default for Lan {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan")
            .field("ports", &self.ports.len())
            .finish_non_exhaustive()
    }
}

/// Rounds of forwarding in one [`Lan::step`]; a reply to a reply within the same step
/// is delivered too, but a storm cannot loop forever.
const MAX_ROUNDS: usize = 16;

impl Lan {
    /// An empty LAN.
    pub fn new() -> Self {
        Lan {
            switch: Switch::new(),
            ports: Vec::new(),
        }
    }

    /// Plugs an emulated NIC into a new port.
    pub fn attach_nic(&mut self, nic: NetvspHandle) -> PortId {
        let port = self.switch.add_port();
        self.ports.push((port, Attachment::Nic(nic)));
        port
    }

    /// Plugs a simulated peer into a new port.
    pub fn attach_peer(&mut self, peer: Rc<RefCell<dyn Endpoint>>) -> PortId {
        let port = self.switch.add_port();
        self.ports.push((port, Attachment::Peer(peer)));
        port
    }

    /// Unplugs whatever is on `port` (frames queued to it are dropped).
    pub fn detach(&mut self, port: PortId) {
        self.ports.retain(|(p, _)| *p != port);
        self.switch.remove_port(port);
    }

    /// The switch (for its counters).
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// Moves frames until the LAN is quiet (or a bound of rounds): what guests sent and
    /// what peers want to send now go into the switch, and what the switch queued goes
    /// to the NICs (for their guests) and peers. Returns the number of frames moved.
    pub fn step(&mut self, now_ms: u64) -> usize {
        let mut moved = 0;
        for _ in 0..MAX_ROUNDS {
            let mut round = 0;
            for (port, attachment) in &self.ports {
                match attachment {
                    Attachment::Nic(nic) => {
                        let (up, down) = self.switch.pump_nic(*port, nic);
                        round += up + down;
                    }
                    Attachment::Peer(peer) => {
                        let mut peer = peer.borrow_mut();
                        let switch = &mut self.switch;
                        while let Some(frame) = switch.take(*port) {
                            peer.receive(now_ms, &frame);
                            round += 1;
                        }
                        peer.transmit(now_ms, &mut |frame| {
                            switch.send(*port, frame);
                            round += 1;
                        });
                    }
                }
            }
            moved += round;
            if round == 0 {
                break;
            }
        }
        moved
    }

    /// The earliest time a peer wants to be stepped without new frames.
    pub fn next_wakeup(&self, now_ms: u64) -> Option<u64> {
        self.ports
            .iter()
            .filter_map(|(_, a)| match a {
                Attachment::Peer(p) => p.borrow().poll_at(now_ms),
                Attachment::Nic(_) => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{shared, PeerHost, PeerHostConfig};
    use std::net::Ipv4Addr as Ipv4Address;

    #[test]
    fn two_peers_ping_through_the_lan() {
        let a = shared(PeerHost::new(PeerHostConfig {
            mac: [2, 0, 0, 0, 0, 1],
            ip: Ipv4Address::new(10, 9, 0, 1),
            prefix_len: 24,
            gateway: None,
        }));
        let b = shared(PeerHost::new(PeerHostConfig {
            mac: [2, 0, 0, 0, 0, 2],
            ip: Ipv4Address::new(10, 9, 0, 2),
            prefix_len: 24,
            gateway: None,
        }));
        let mut lan = Lan::new();
        lan.attach_peer(a.clone());
        lan.attach_peer(b.clone());
        let id = a.borrow_mut().ping(Ipv4Address::new(10, 9, 0, 2), 3);
        let mut now = 0;
        while now < 10_000 {
            lan.step(now);
            if a.borrow().ping_status(id).is_some_and(|s| s.done) {
                break;
            }
            now = lan.next_wakeup(now).unwrap_or(now + 1).max(now + 1);
        }
        let s = a.borrow().ping_status(id).cloned().unwrap();
        assert_eq!(s.received, 3, "{s:?}");
        assert!(lan.switch().stats().delivered > 0);
    }
}
