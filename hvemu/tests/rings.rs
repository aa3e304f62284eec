//! Host ring ends: read/write, wrap-around, interrupt mask and pending-send-size rules,
//! corruption, and the test device's echo and sub-channel grant.

mod common;

use common::*;
use hvemu::{HostConfig, RingError, SubchannelTestDevice, ViolationKind, SUBCH_MAGIC};
use hvnet_wire::ring::{VmPacketType, RING_PENDING_SEND_SZ_OFFSET, RING_WRITE_INDEX_OFFSET};
use hvnet_wire::vmbus::ChannelMessage;

const INBAND: u16 = VmPacketType::DATA_INBAND.0;
const COMP: u16 = VmPacketType::COMP.0;

struct Chan {
    g: Guest,
    relid: u32,
    conn: u32,
    ring: GuestRing,
}

fn open_echo(out_pages: usize, in_pages: usize) -> Chan {
    let mut g = Guest::new(HostConfig::default());
    g.add_test_device(1, 4);
    let offer = g.boot()[0];
    let relid = offer.child_relid.get();
    let ring = g.open(relid, out_pages, in_pages);
    Chan {
        g,
        relid,
        conn: offer.connection_id.get(),
        ring,
    }
}

impl Chan {
    /// Writes one in-band packet and signals if the ring rules say so.
    fn send(&mut self, trans_id: u64, completion: bool, payload: &[u8]) -> bool {
        match self.ring.write_inband(trans_id, completion, payload) {
            Some(signal) => {
                if signal {
                    self.g.host.signal_event(self.conn).unwrap();
                }
                true
            }
            None => false,
        }
    }

    /// Reads a host packet; signals the host if the guest's read made room it waits for.
    fn recv(&mut self) -> Option<(u16, u64, Vec<u8>)> {
        let (p, signal) = self.ring.read_signal();
        if signal {
            self.g.host.signal_event(self.conn).unwrap();
        }
        p
    }
}

fn padded(p: &[u8]) -> Vec<u8> {
    let mut v = p.to_vec();
    v.resize(p.len().div_ceil(8) * 8, 0);
    v
}

#[test]
fn echo_as_completion_or_inband() {
    let mut c = open_echo(2, 2);
    assert!(c.send(7, true, b"hello"));
    assert_eq!(
        c.g.events(),
        [c.relid],
        "data into an empty ring signals the guest"
    );
    assert_eq!(c.recv(), Some((COMP, 7, padded(b"hello"))));
    assert!(c.send(8, false, b"world!!!"));
    assert_eq!(c.recv(), Some((INBAND, 8, b"world!!!".to_vec())));
    assert_eq!(c.recv(), None);
    let s = c.g.host.channel_summary(c.relid).unwrap();
    assert_eq!((s.packets_in, s.packets_out, s.signals), (2, 2, 2));
    assert_eq!(s.events, 2);
}

#[test]
fn wrap_around_both_directions() {
    // One data page per ring: 4096 bytes, so this wraps many times.
    let mut c = open_echo(2, 2);
    let mut expect = Vec::new();
    for i in 0..500u64 {
        let len = (i as usize * 37) % 700 + 1;
        let payload: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
        assert!(c.send(i, i % 3 == 0, &payload), "packet {i} did not fit");
        expect.push((i, payload));
        // Read replies now and then, so the guest-to-host ring also fills and drains.
        if i % 4 == 3 {
            while let Some((t, id, p)) = c.recv() {
                let (want_id, want) = expect.remove(0);
                assert_eq!(id, want_id);
                assert_eq!(t, if want_id % 3 == 0 { COMP } else { INBAND });
                assert_eq!(p, padded(&want));
            }
        }
    }
    while let Some((_, id, p)) = c.recv() {
        let (want_id, want) = expect.remove(0);
        assert_eq!((id, p), (want_id, padded(&want)));
    }
    assert!(expect.is_empty());
    assert!(c.ring.out_write_index() < 4096);
    assert!(
        c.g.host.violations().is_empty(),
        "{:?}",
        c.g.host.violations()
    );
}

#[test]
fn guest_interrupt_mask_suppresses_events() {
    let mut c = open_echo(2, 2);
    c.ring.set_interrupt_mask(true);
    c.send(1, false, b"a");
    assert!(c.g.events().is_empty(), "masked: no event");
    c.ring.set_interrupt_mask(false);
    // The ring is not empty: the guest is still draining, so no event either.
    c.send(2, false, b"b");
    assert!(c.g.events().is_empty());
    assert_eq!(c.recv().unwrap().1, 1);
    assert_eq!(c.recv().unwrap().1, 2);
    // Empty again: the next reply signals.
    c.send(3, false, b"c");
    assert_eq!(c.g.events(), [c.relid]);
    c.g.host
        .with_ring(c.relid, |r| assert_eq!(r.stats().masked_writes, 1));
}

#[test]
fn host_interrupt_mask_is_honoured_by_a_correct_guest() {
    let mut c = open_echo(2, 2);
    c.g.host
        .with_ring(c.relid, |r| r.set_incoming_interrupt_mask(true).unwrap());
    // The guest's writer sees the mask and does not signal.
    assert_eq!(c.ring.write_inband(1, false, b"x"), Some(false));
    // A guest that signals anyway is counted.
    c.g.host.signal_event(c.conn).unwrap();
    let s = c.g.host.channel_summary(c.relid).unwrap();
    assert_eq!((s.signals, s.signals_while_masked), (1, 1));
}

#[test]
fn host_backs_off_when_the_guest_ring_is_full() {
    // Small host-to-guest ring (4 KiB), roomy guest-to-host ring (16 KiB).
    let mut c = open_echo(5, 2);
    let payload = [0x5au8; 500];
    let mut sent = 0u64;
    while c.send(sent, false, &payload) {
        sent += 1;
        if sent == 30 {
            break;
        }
    }
    let dev = hvemu::DeviceId(1);
    let backlog =
        c.g.host
            .backend_mut::<SubchannelTestDevice>(dev)
            .unwrap()
            .backlog(c.relid);
    assert!(backlog > 0, "the device must have deferred replies");
    let pending = c.ring.load(false, RING_PENDING_SEND_SZ_OFFSET);
    assert!(
        pending > 500,
        "host asks to be woken when there is room: {pending}"
    );
    // The guest drains, signalling when it crosses the host's pending size; every reply
    // eventually arrives, in order.
    let mut got = 0u64;
    for _ in 0..1000 {
        match c.recv() {
            Some((_, id, _)) => {
                assert_eq!(id, got);
                got += 1;
            }
            None if got == sent => break,
            None => {}
        }
    }
    assert_eq!(got, sent);
    assert_eq!(
        c.ring.load(false, RING_PENDING_SEND_SZ_OFFSET),
        0,
        "cleared once written"
    );
    assert!(
        c.g.host
            .backend_mut::<SubchannelTestDevice>(dev)
            .unwrap()
            .counters()
            .deferred
            > 0
    );
}

#[test]
fn host_reader_wakes_a_blocked_guest_writer() {
    let mut c = open_echo(2, 5);
    // Completions from the guest are consumed without replies.
    let comp = |id: u64| {
        let mut b = vec![0u8; 64];
        let n = hvnet_wire::ring::encode_completion(&mut b, id, &[1u8; 40]).unwrap();
        b.truncate(n);
        b
    };
    let mut n = 0;
    while c.ring.write_raw(&comp(n)).is_some() {
        n += 1;
    }
    // Blocked: ask the host to signal once 200 bytes are free (the feature bit is set).
    c.ring.set_pending_send(200);
    c.g.host.signal_event(c.conn).unwrap();
    assert_eq!(c.g.events(), [c.relid], "room made for the blocked writer");
    let dev = hvemu::DeviceId(1);
    assert_eq!(
        c.g.host
            .backend_mut::<SubchannelTestDevice>(dev)
            .unwrap()
            .counters()
            .ignored,
        n
    );
    // No pending size: no signal.
    c.ring.set_pending_send(0);
    for i in 0..3 {
        c.ring.write_raw(&comp(100 + i)).unwrap();
    }
    c.g.host.signal_event(c.conn).unwrap();
    assert!(c.g.events().is_empty());
}

#[test]
fn corrupt_indices_break_the_ring_without_panics() {
    let mut c = open_echo(2, 2);
    c.ring.store(true, RING_WRITE_INDEX_OFFSET, 4093);
    c.g.host.signal_event(c.conn).unwrap();
    c.g.host.signal_event(c.conn).unwrap();
    assert_eq!(
        c.g.host.stats().count(ViolationKind::RingCorrupt),
        1,
        "reported once"
    );
    let broken =
        c.g.host
            .with_ring(c.relid, |r| r.write_inband(1, false, b"x"));
    assert!(matches!(broken, Some(Err(RingError::Broken(_)))));
    // The guest can still close and clean up.
    c.g.close(c.relid);
    c.g.teardown(c.relid, c.ring.gpadl);
    assert!(is_type(
        &c.g.take_one(),
        hvnet_wire::vmbus::MessageType::GPADL_TORNDOWN
    ));
}

#[test]
fn oversized_descriptor_breaks_the_ring() {
    let mut c = open_echo(2, 2);
    // A descriptor claiming 1 KiB when only 32 bytes were written.
    let mut pkt = [0u8; 24];
    pkt[0] = 6;
    pkt[2] = 2;
    pkt[4] = 128;
    c.ring.write_raw(&pkt).unwrap();
    c.g.host.signal_event(c.conn).unwrap();
    assert_eq!(c.g.host.stats().count(ViolationKind::RingCorrupt), 1);
}

#[test]
fn malformed_packet_is_skipped_and_reading_goes_on() {
    let mut c = open_echo(2, 2);
    // Well framed (offset8 2, len8 3) but of an undefined type.
    let mut bad = [0u8; 24];
    bad[0] = 0x99;
    bad[2] = 2;
    bad[4] = 3;
    c.ring.write_raw(&bad).unwrap();
    c.ring.write_inband(5, false, b"after").unwrap();
    c.g.host.signal_event(c.conn).unwrap();
    assert_eq!(
        c.g.host.stats().count(ViolationKind::RingMalformedPacket),
        1
    );
    assert_eq!(c.recv(), Some((INBAND, 5, padded(b"after"))));
}

#[test]
fn host_can_write_raw_and_xfer_packets_for_the_guest() {
    let mut c = open_echo(2, 2);
    c.g.host
        .with_ring(c.relid, |r| {
            r.write_xfer_pages(9, true, 0xCAFE, &[(100, 0), (60, 4096)], b"rndis")?;
            r.write_raw(&[11, 0, 2, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
        })
        .unwrap()
        .unwrap();
    assert_eq!(c.g.events(), [c.relid]);
    let (t, id, p) = c.recv().unwrap();
    assert_eq!((t, id), (VmPacketType::DATA_USING_XFER_PAGES.0, 9));
    assert_eq!(p, padded(b"rndis"));
    assert_eq!(c.recv(), Some((COMP, 1, vec![])));
}

fn subch_request(n: u16) -> Vec<u8> {
    let mut p = SUBCH_MAGIC.to_vec();
    p.extend_from_slice(&n.to_le_bytes());
    p
}

#[test]
fn test_device_grants_capped_subchannels() {
    let mut c = open_echo(2, 2);
    c.send(42, true, &subch_request(8));
    let (t, id, p) = c.recv().unwrap();
    assert_eq!((t, id), (COMP, 42));
    assert_eq!(&p[..5], SUBCH_MAGIC);
    assert_eq!(
        u16::from_le_bytes([p[5], p[6]]),
        4,
        "capped at the device's maximum"
    );
    let offers: Vec<_> =
        c.g.take_all()
            .iter()
            .map(|b| match decode(b) {
                ChannelMessage::OfferChannel(o) => o.sub_channel_index(),
                other => panic!("{other:?}"),
            })
            .collect();
    assert_eq!(offers, [1, 2, 3, 4]);

    // Open a sub-channel: it echoes, and a SUBCH request there is just echoed too.
    let sub = c.g.host.device_channels(hvemu::DeviceId(1))[1];
    assert_eq!(sub.0, 1);
    let mut ring = c.g.open(sub.1, 2, 2);
    let conn = c.g.host.channel_summary(sub.1).unwrap().connection_id;
    assert_eq!(ring.write_inband(3, false, &subch_request(2)), Some(true));
    c.g.host.signal_event(conn).unwrap();
    assert_eq!(ring.read(), Some((INBAND, 3, padded(&subch_request(2)))));
    assert_eq!(c.g.host.pending_messages(), 0);
}

#[test]
fn test_device_can_over_grant() {
    let mut g = Guest::new(HostConfig::default());
    g.host.add_device(hvemu::DeviceSpec::new(
        nic_class(),
        instance(1),
        Box::new(SubchannelTestDevice::new(2).over_grant(3)),
    ));
    let offer = g.boot()[0];
    let relid = offer.child_relid.get();
    let mut ring = g.open(relid, 2, 2);
    ring.write_inband(1, true, &subch_request(2)).unwrap();
    g.host.signal_event(offer.connection_id.get()).unwrap();
    let (_, _, p) = ring.read().unwrap();
    assert_eq!(u16::from_le_bytes([p[5], p[6]]), 5);
    assert_eq!(g.take_all().len(), 5);
}

#[test]
fn standalone_ring_checks_its_layout() {
    let mem = hvemu::GuestMemory::new(8, 0);
    let pfns = mem.alloc_pages(3).unwrap();
    for split in [0, 1, 2, 3] {
        let r = hvemu::HostRing::new(mem.clone(), &pfns, split);
        assert_eq!(
            r.err(),
            Some(hvemu::RingCorruption::BadLayout),
            "split {split}"
        );
    }
    let pfns = mem.alloc_pages(4).unwrap();
    let mut r = hvemu::HostRing::new(mem.clone(), &pfns, 2).unwrap();
    assert_eq!(r.read_packet(), Ok(None));
    r.write_inband(1, false, b"x").unwrap();
    assert!(
        r.take_guest_signal(),
        "first packet into an empty ring signals"
    );
    r.write_inband(2, false, b"y").unwrap();
    assert!(
        !r.take_guest_signal(),
        "the guest has not read the first one yet"
    );
    assert_eq!(r.outgoing_free(), 4096 - 2 * 32);
}
