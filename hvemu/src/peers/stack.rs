//! Moving a simulated peer's smoltcp stack until it is idle.

use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::time::Instant;

use super::device::QueueDevice;

/// Upper bound on poll rounds in one [`run_until_idle`] (each egress poll sends at most
/// one segment per socket).
const MAX_POLLS: usize = 512;

/// A peer built on one smoltcp interface over a [`QueueDevice`], with services of its
/// own run between polls.
pub(crate) trait StackPeer {
    /// The interface, its device and its sockets.
    fn stack(&mut self) -> (&mut Interface, &mut QueueDevice, &mut SocketSet<'static>);

    /// Runs the peer's services on its sockets; whether any made progress.
    fn serve(&mut self) -> bool;
}

/// Polls `peer`'s stack and services at `now` until nothing moves (at most
/// [`MAX_POLLS`] rounds). Received frames are taken one at a time with the services
/// run in between, so that a burst cannot overflow a socket's receive queue before
/// anyone reads it.
pub(crate) fn run_until_idle(peer: &mut impl StackPeer, now: Instant) {
    for _ in 0..MAX_POLLS {
        let mut moved = false;
        loop {
            let (iface, device, sockets) = peer.stack();
            if device.rx_pending() == 0 {
                break;
            }
            moved |=
                iface.poll_ingress_single(now, device, sockets) != PollIngressSingleResult::None;
            moved |= peer.serve();
            let (iface, device, sockets) = peer.stack();
            moved |= iface.poll_egress(now, device, sockets) != PollResult::None;
        }
        let (iface, device, sockets) = peer.stack();
        moved |= iface.poll(now, device, sockets) != PollResult::None;
        moved |= peer.serve();
        if !moved {
            break;
        }
    }
}
