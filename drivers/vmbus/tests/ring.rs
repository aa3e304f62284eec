//! Ring buffer pair against a scripted host.
//!
//! The guest side is `hvnet_vmbus::ring::RingPair`. The host side here is written
//! independently: it pokes the control words and packet bytes straight into a flat
//! memory (the test double for `SharedBuffer`), building packets with the
//! `hvnet_wire::ring` encoders and parsing what the guest wrote with `Packet::parse`.

use std::cell::RefCell;
use std::rc::Rc;

use hvnet_vmbus::memory::{MemoryError, SharedBuffer, PAGE_SIZE};
use hvnet_vmbus::ring::{
    Incoming, OutgoingKind, OutgoingPacket, PreparedPacket, RingError, RingPair, RingStats,
    WriteResult,
};
use hvnet_wire::ring::{
    encode_completion, encode_gpa_direct, encode_inband, encode_xfer_pages, Packet, PacketKind,
    VmPacketType, VmTransferPageRange, RING_FEATURE_BITS_OFFSET, RING_INTERRUPT_MASK_OFFSET,
    RING_PENDING_SEND_SZ_OFFSET, RING_READ_INDEX_OFFSET, RING_WRITE_INDEX_OFFSET,
};
use hvnet_wire::vmbus::GpaRange;
use hvnet_wire::{WireError, U64};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Test double: host-visible memory as a flat byte vector.

type ReadHook = Box<dyn FnMut(usize, &mut [u8])>;

struct FlatMem {
    bytes: RefCell<Vec<u8>>,
    base_pfn: u64,
    /// Runs after every `read` with its offset and the whole memory: a host that changes
    /// bytes right after the guest looked at them.
    after_read: RefCell<Option<ReadHook>>,
}

impl FlatMem {
    fn new(pages: usize) -> Rc<Self> {
        Rc::new(Self {
            bytes: RefCell::new(vec![0; pages * PAGE_SIZE]),
            base_pfn: 0x4_0000,
            after_read: RefCell::new(None),
        })
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes.borrow().len() => Ok(()),
            _ => Err(MemoryError::OutOfBounds { offset, len }),
        }
    }
}

impl SharedBuffer for FlatMem {
    fn len(&self) -> usize {
        self.bytes.borrow().len()
    }
    fn pfn(&self, index: usize) -> u64 {
        self.base_pfn + index as u64
    }
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[offset..offset + buf.len()]);
        if let Some(hook) = self.after_read.borrow_mut().as_mut() {
            hook(offset, &mut self.bytes.borrow_mut());
        }
        Ok(())
    }
    fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.check(offset, data.len())?;
        self.bytes.borrow_mut()[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn load_u32(&self, offset: usize) -> Result<u32, MemoryError> {
        if !offset.is_multiple_of(4) {
            return Err(MemoryError::OutOfBounds { offset, len: 4 });
        }
        let mut b = [0; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemoryError> {
        if !offset.is_multiple_of(4) {
            return Err(MemoryError::OutOfBounds { offset, len: 4 });
        }
        self.write(offset, &value.to_le_bytes())
    }
}

// ---------------------------------------------------------------------------------------
// The scripted host.

/// One ring as the host sees it.
#[derive(Clone, Copy)]
struct HostRing {
    control: usize,
    data: usize,
    size: usize,
}

struct Host {
    mem: Rc<FlatMem>,
    /// The guest's outgoing ring (the host reads it).
    rx: HostRing,
    /// The guest's incoming ring (the host writes it).
    tx: HostRing,
}

impl Host {
    fn new(mem: &Rc<FlatMem>, outgoing_pages: usize) -> Self {
        let total = mem.len() / PAGE_SIZE;
        let ring = |first: usize, pages: usize| HostRing {
            control: first * PAGE_SIZE,
            data: (first + 1) * PAGE_SIZE,
            size: (pages - 1) * PAGE_SIZE,
        };
        Self {
            mem: mem.clone(),
            rx: ring(0, outgoing_pages),
            tx: ring(outgoing_pages, total - outgoing_pages),
        }
    }

    fn get(&self, ring: HostRing, field: usize) -> u32 {
        self.mem.load_u32(ring.control + field).unwrap()
    }
    fn set(&self, ring: HostRing, field: usize, value: u32) {
        self.mem.store_u32(ring.control + field, value).unwrap()
    }

    fn copy_out(&self, ring: HostRing, pos: usize, len: usize) -> Vec<u8> {
        let mem = self.mem.bytes.borrow();
        (0..len)
            .map(|i| mem[ring.data + (pos + i) % ring.size])
            .collect()
    }
    fn copy_in(&self, ring: HostRing, pos: usize, bytes: &[u8]) {
        let mut mem = self.mem.bytes.borrow_mut();
        for (i, b) in bytes.iter().enumerate() {
            mem[ring.data + (pos + i) % ring.size] = *b;
        }
    }

    /// Writes one encoded packet (without trailer) into the guest's incoming ring the
    /// way a well-behaved host does. Returns false (writing nothing) if it does not fit.
    fn send(&self, packet: &[u8]) -> bool {
        assert_eq!(packet.len() % 8, 0);
        let ring = self.tx;
        let write = self.get(ring, RING_WRITE_INDEX_OFFSET) as usize;
        let read = self.get(ring, RING_READ_INDEX_OFFSET) as usize;
        let used = (write + ring.size - read) % ring.size;
        let total = packet.len() + 8;
        if ring.size - used <= total {
            return false;
        }
        self.copy_in(ring, write, packet);
        self.copy_in(
            ring,
            write + packet.len(),
            &((write as u64) << 32).to_le_bytes(),
        );
        self.set(
            ring,
            RING_WRITE_INDEX_OFFSET,
            ((write + total) % ring.size) as u32,
        );
        true
    }

    fn send_inband(&self, trans_id: u64, completion: bool, payload: &[u8]) -> bool {
        let mut buf = vec![0; payload.len() + 24];
        let len = encode_inband(&mut buf, trans_id, completion, payload).unwrap();
        self.send(&buf[..len])
    }

    /// Takes the next packet the guest wrote (descriptor to `len8 * 8`), checks its
    /// trailer, and moves the read index past it.
    fn receive(&self) -> Option<Vec<u8>> {
        let ring = self.rx;
        let write = self.get(ring, RING_WRITE_INDEX_OFFSET) as usize;
        let read = self.get(ring, RING_READ_INDEX_OFFSET) as usize;
        if write == read {
            return None;
        }
        let head = self.copy_out(ring, read, 8);
        let len8 = u16::from_le_bytes([head[4], head[5]]) as usize;
        let packet = self.copy_out(ring, read, len8 * 8);
        let trailer = self.copy_out(ring, read + len8 * 8, 8);
        assert_eq!(
            u64::from_le_bytes(trailer.try_into().unwrap()),
            (read as u64) << 32,
            "trailer = previous write index << 32"
        );
        let next = (read + len8 * 8 + 8) % ring.size;
        let used = (write + ring.size - read) % ring.size;
        assert!(
            len8 * 8 + 8 <= used,
            "guest packet runs past its write index"
        );
        self.set(ring, RING_READ_INDEX_OFFSET, next as u32);
        Some(packet)
    }
}

/// A ring pair with `out_pages` / `in_pages` pages, plus the host that drives it.
fn setup(out_pages: usize, in_pages: usize) -> (RingPair, Host, Rc<FlatMem>) {
    let mem = FlatMem::new(out_pages + in_pages);
    let buffer: Rc<dyn SharedBuffer> = mem.clone();
    let ring = RingPair::new(buffer, out_pages).unwrap();
    let host = Host::new(&mem, out_pages);
    (ring, host, mem)
}

fn write_inband(ring: &RingPair, trans_id: u64, payload: &[u8]) -> Result<bool, RingError> {
    ring.try_write(&OutgoingPacket::inband(trans_id, false, &[payload]))
        .map(|r| r.signal)
}

// ---------------------------------------------------------------------------------------
// Layout.

#[test]
fn layout_is_validated() {
    let mem = FlatMem::new(8);
    let make = |out: usize| RingPair::new(mem.clone() as Rc<dyn SharedBuffer>, out);
    for out in [0, 1, 7, 8, 9] {
        assert_eq!(
            make(out).unwrap_err(),
            RingError::BadLayout {
                total_pages: 8,
                outgoing_pages: out
            }
        );
    }
    let ring = make(3).unwrap();
    assert_eq!(ring.outgoing_pages(), 3);
    assert_eq!(ring.incoming_pages(), 5);
    assert_eq!(ring.downstream_page_offset(), 3);
    assert_eq!(ring.outgoing_data_size(), 2 * PAGE_SIZE);
    assert_eq!(ring.incoming_data_size(), 4 * PAGE_SIZE);
    assert_eq!(ring.max_outgoing_packet(), 2 * PAGE_SIZE - 8);

    // A Box from the allocator works too.
    let boxed: Box<dyn SharedBuffer> = Box::new(FlatMem {
        bytes: RefCell::new(vec![0; 4 * PAGE_SIZE]),
        base_pfn: 0,
        after_read: RefCell::new(None),
    });
    assert!(RingPair::new(boxed, 2).is_ok());

    // Not a whole number of pages.
    let odd: Rc<dyn SharedBuffer> = Rc::new(FlatMem {
        bytes: RefCell::new(vec![0; 4 * PAGE_SIZE + 8]),
        base_pfn: 0,
        after_read: RefCell::new(None),
    });
    assert!(matches!(
        RingPair::new(odd, 2),
        Err(RingError::BadLayout { .. })
    ));
}

#[test]
fn control_pages_are_initialised() {
    let mem = FlatMem::new(6);
    // Garbage from a previous user of the pages.
    mem.bytes.borrow_mut().fill(0xa5);
    let _ring = RingPair::new(mem.clone() as Rc<dyn SharedBuffer>, 2).unwrap();
    let host = Host::new(&mem, 2);
    for r in [host.rx, host.tx] {
        assert_eq!(host.get(r, RING_WRITE_INDEX_OFFSET), 0);
        assert_eq!(host.get(r, RING_READ_INDEX_OFFSET), 0);
        assert_eq!(host.get(r, RING_INTERRUPT_MASK_OFFSET), 0);
        assert_eq!(host.get(r, RING_PENDING_SEND_SZ_OFFSET), 0);
        assert_eq!(host.get(r, RING_FEATURE_BITS_OFFSET), 1);
    }
}

// ---------------------------------------------------------------------------------------
// Guest to host.

#[test]
fn inband_round_trip_with_gather_list() {
    let (ring, host, _) = setup(2, 2);
    let head = [1u8, 2, 3];
    let body = [4u8; 10];
    let gather: [&[u8]; 3] = [&head, &[], &body];
    let pkt = OutgoingPacket::inband(0x1234, true, &gather);
    assert_eq!(pkt.ring_len(), Ok(16 + 16 + 8));
    assert_eq!(
        ring.try_write(&pkt),
        Ok(hvnet_vmbus::ring::WriteResult { signal: true })
    );

    let bytes = host.receive().unwrap();
    let p = Packet::parse(&bytes).unwrap();
    assert_eq!(p.kind, PacketKind::InBand);
    assert_eq!(p.trans_id(), 0x1234);
    assert!(p.descriptor.completion_requested());
    assert_eq!(&p.payload[..13], &[1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]);
    assert_eq!(&p.payload[13..], &[0, 0, 0], "padding is zero");
    assert!(host.receive().is_none());
    assert_eq!(
        ring.outgoing_stats(),
        RingStats {
            packets: 1,
            bytes: 40,
            full: 0,
            signals: 1
        }
    );
}

#[test]
fn completion_round_trip() {
    let (ring, host, _) = setup(2, 2);
    let payload = [108u8, 0, 0, 0, 1, 0, 0, 0];
    let _ = ring
        .try_write(&OutgoingPacket::completion(77, &[&payload]))
        .unwrap();
    let bytes = host.receive().unwrap();
    let p = Packet::parse(&bytes).unwrap();
    assert_eq!(p.descriptor.packet_type(), VmPacketType::COMP);
    assert_eq!(p.kind, PacketKind::Completion);
    assert!(!p.descriptor.completion_requested());
    assert_eq!(p.trans_id(), 77);
    assert_eq!(p.payload, &payload);
    // Byte-identical to the wire encoder's packet.
    let mut expect = [0u8; 24];
    encode_completion(&mut expect, 77, &payload).unwrap();
    assert_eq!(bytes, expect);
}

#[test]
fn gpa_direct_round_trip() {
    let (ring, host, _) = setup(2, 2);
    let pfns_a = [U64::new(0x5000), U64::new(0x5001)];
    let pfns_b = [U64::new(0x9000)];
    let ranges = [
        GpaRange {
            byte_count: 4200,
            byte_offset: 0xf00,
            pfns: &pfns_a,
        },
        GpaRange {
            byte_count: 60,
            byte_offset: 0,
            pfns: &pfns_b,
        },
    ];
    let nvsp = [
        107u8, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
    ];
    let gather = [&nvsp[..4], &nvsp[4..]];
    let pkt = OutgoingPacket::gpa_direct(9, true, &ranges, &gather);
    let _ = ring.try_write(&pkt).unwrap();
    let bytes = host.receive().unwrap();
    let p = Packet::parse(&bytes).unwrap();
    let PacketKind::GpaDirect { ranges: got, .. } = p.kind else {
        panic!("not GPA direct: {:?}", p.kind);
    };
    assert_eq!(got.iter().collect::<Vec<_>>(), ranges);
    assert_eq!(p.payload, &nvsp);
    assert!(p.descriptor.completion_requested());
    // Byte-identical to the wire encoder's packet.
    let mut expect = [0u8; 128];
    let len = encode_gpa_direct(&mut expect, 9, true, &ranges, &nvsp).unwrap();
    assert_eq!(bytes, &expect[..len]);
}

#[test]
fn malformed_outgoing_packets_are_refused() {
    let (ring, host, _) = setup(2, 2);
    let pfns = [U64::new(1)];
    let short = [GpaRange {
        byte_count: 4097,
        byte_offset: 0,
        pfns: &pfns,
    }];
    assert_eq!(
        ring.try_write(&OutgoingPacket::gpa_direct(1, true, &short, &[])),
        Err(RingError::BadOutgoingPacket(WireError::BadCount))
    );
    assert_eq!(
        ring.try_write(&OutgoingPacket::gpa_direct(1, true, &[], &[])),
        Err(RingError::BadOutgoingPacket(WireError::BadCount))
    );
    // Larger than the whole ring can ever hold.
    let big = vec![0u8; 4096];
    assert_eq!(
        ring.try_write(&OutgoingPacket::inband(1, false, &[&big])),
        Err(RingError::OutgoingTooLarge {
            len: 4096 + 24,
            max: 4088
        })
    );
    // Nothing was written and the ring still works.
    assert!(host.receive().is_none());
    assert_eq!(ring.outgoing_failure(), None);
    write_inband(&ring, 1, &[1]).unwrap();
    assert!(host.receive().is_some());
}

#[test]
fn outgoing_wraps_around() {
    let (ring, host, _) = setup(2, 2);
    // 56-byte payloads take 80 ring bytes; 4096 is no multiple of 80, so packets land
    // across the end of the data area at ever different split points.
    let payload_of = |id: u64| -> Vec<u8> {
        (0..56)
            .map(|i| (id as u8).wrapping_mul(31).wrapping_add(i))
            .collect()
    };
    let mut received = 0u64;
    let mut host_take = |host: &Host| {
        let bytes = host.receive().unwrap();
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.trans_id(), received);
        assert_eq!(p.payload, &payload_of(received)[..]);
        received += 1;
    };
    let mut fulls = 0;
    for id in 0..300u64 {
        loop {
            match write_inband(&ring, id, &payload_of(id)) {
                Ok(_) => break,
                Err(RingError::Full { needed: 80 }) => {
                    fulls += 1;
                    host_take(&host);
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        // The host lags behind, so the ring runs full now and then.
        if id % 3 == 0 {
            host_take(&host);
        }
    }
    while host.get(host.rx, RING_READ_INDEX_OFFSET) != host.get(host.rx, RING_WRITE_INDEX_OFFSET) {
        host_take(&host);
    }
    assert_eq!(received, 300);
    assert!(fulls > 0);
    assert_eq!(ring.outgoing_stats().packets, 300);
    assert_eq!(ring.outgoing_stats().full, fulls);
}

#[test]
fn full_ring_refuses_and_writes_nothing() {
    let (ring, host, mem) = setup(2, 2);
    // Data area 4096; each packet 16 + 1000 + 8 = 1024 ring bytes... 1000 is aligned.
    let payload = vec![7u8; 1000];
    for i in 0..3 {
        write_inband(&ring, i, &payload).unwrap();
    }
    // 3072 used; 1024 free but one 8-byte gap must stay: 1016 usable.
    assert_eq!(ring.outgoing_free(), Ok(1016));
    let before = mem.bytes.borrow().clone();
    assert_eq!(
        write_inband(&ring, 3, &payload),
        Err(RingError::Full { needed: 1024 })
    );
    assert_eq!(
        *mem.bytes.borrow(),
        before,
        "a refused write touches nothing"
    );
    assert_eq!(ring.outgoing_stats().full, 1);
    // A packet that takes exactly the usable space fits: 16 + 992 + 8 = 1016.
    write_inband(&ring, 3, &payload[..992]).unwrap();
    assert_eq!(ring.outgoing_free(), Ok(0));
    assert_eq!(host.get(host.rx, RING_WRITE_INDEX_OFFSET), 4088);
    // Now even the smallest packet is refused.
    assert_eq!(
        write_inband(&ring, 4, &[]),
        Err(RingError::Full { needed: 24 })
    );
    // The host drains one packet: space comes back.
    host.receive().unwrap();
    assert_eq!(ring.outgoing_free(), Ok(1024));
    write_inband(&ring, 5, &payload).unwrap();
    assert_eq!(ring.outgoing_failure(), None);
}

#[test]
fn writer_signals_only_on_empty_to_non_empty() {
    let (ring, host, _) = setup(2, 2);
    assert_eq!(write_inband(&ring, 1, &[1]), Ok(true), "empty -> non-empty");
    assert_eq!(
        write_inband(&ring, 2, &[2]),
        Ok(false),
        "host has not caught up"
    );
    host.receive().unwrap();
    assert_eq!(
        write_inband(&ring, 3, &[3]),
        Ok(false),
        "still one unread packet"
    );
    host.receive().unwrap();
    host.receive().unwrap();
    assert_eq!(
        write_inband(&ring, 4, &[4]),
        Ok(true),
        "ring was empty again"
    );
    host.receive().unwrap();

    // The host masks interrupts while it drains: no signal even on empty -> non-empty.
    host.set(host.rx, RING_INTERRUPT_MASK_OFFSET, 1);
    assert_eq!(write_inband(&ring, 5, &[5]), Ok(false));
    host.receive().unwrap();
    host.set(host.rx, RING_INTERRUPT_MASK_OFFSET, 0);
    assert_eq!(write_inband(&ring, 6, &[6]), Ok(true));
    assert_eq!(ring.outgoing_stats().signals, 3);
}

#[test]
fn guest_pending_send_size_is_published() {
    let (ring, host, _) = setup(2, 2);
    ring.set_pending_send_size(1001).unwrap();
    assert_eq!(host.get(host.rx, RING_PENDING_SEND_SZ_OFFSET), 1008);
    ring.set_pending_send_size(0).unwrap();
    assert_eq!(host.get(host.rx, RING_PENDING_SEND_SZ_OFFSET), 0);
    assert!(matches!(
        ring.set_pending_send_size(4096),
        Err(RingError::OutgoingTooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// Host to guest.

#[test]
fn incoming_packet_types_round_trip() {
    let (ring, host, _) = setup(2, 3);
    // In-band with completion requested.
    assert!(host.send_inband(5, true, &[1, 2, 3, 4, 5]));
    // Completion.
    let mut buf = [0u8; 64];
    let n = encode_completion(&mut buf, 6, &[9; 8]).unwrap();
    assert!(host.send(&buf[..n]));
    // Transfer pages (netvsc receive).
    let ranges = [
        VmTransferPageRange {
            byte_count: 100.into(),
            byte_offset: 0.into(),
        },
        VmTransferPageRange {
            byte_count: 60.into(),
            byte_offset: 1806.into(),
        },
    ];
    let mut buf = [0u8; 128];
    let n = encode_xfer_pages(&mut buf, 7, true, 0xcafe, &ranges, &[107, 0, 0, 0]).unwrap();
    assert!(host.send(&buf[..n]));
    // GPA direct.
    let pfns = [U64::new(0x77)];
    let gpa = [GpaRange {
        byte_count: 10,
        byte_offset: 5,
        pfns: &pfns,
    }];
    let n = encode_gpa_direct(&mut buf, 8, false, &gpa, &[1; 8]).unwrap();
    assert!(host.send(&buf[..n]));

    let mut scratch = [0u8; 256];
    let p = ring.read_packet(&mut scratch).unwrap().unwrap();
    assert_eq!((p.kind, p.trans_id()), (PacketKind::InBand, 5));
    assert!(p.descriptor.completion_requested());
    assert_eq!(&p.payload[..5], &[1, 2, 3, 4, 5]);

    let p = ring.read_packet(&mut scratch).unwrap().unwrap();
    assert_eq!(
        (p.kind, p.trans_id(), p.payload),
        (PacketKind::Completion, 6, &[9u8; 8][..])
    );

    let p = ring.read_packet(&mut scratch).unwrap().unwrap();
    let PacketKind::TransferPages {
        header,
        ranges: got,
    } = p.kind
    else {
        panic!("{:?}", p.kind)
    };
    assert_eq!(header.xfer_pageset_id.get(), 0xcafe);
    assert_eq!(got, &ranges);
    assert_eq!(&p.payload[..4], &[107, 0, 0, 0]);

    let p = ring.read_packet(&mut scratch).unwrap().unwrap();
    let PacketKind::GpaDirect { ranges: got, .. } = p.kind else {
        panic!("{:?}", p.kind)
    };
    assert_eq!(got.iter().collect::<Vec<_>>(), gpa);

    assert_eq!(ring.read_packet(&mut scratch).unwrap(), None);
    assert_eq!(ring.incoming_stats().packets, 4);
    // Nothing published until read_done.
    assert_eq!(host.get(host.tx, RING_READ_INDEX_OFFSET), 0);
    assert_eq!(ring.read_done(), Ok(false));
    assert_eq!(
        host.get(host.tx, RING_READ_INDEX_OFFSET),
        host.get(host.tx, RING_WRITE_INDEX_OFFSET)
    );
}

#[test]
fn peek_advance_and_small_buffers() {
    let (ring, host, _) = setup(2, 2);
    assert!(host.send_inband(1, false, &[0xaa; 20]));
    assert!(host.send_inband(2, false, &[0xbb; 4]));

    let mut small = [0u8; 16];
    assert_eq!(
        ring.read(&mut small),
        Err(RingError::BufferTooSmall { needed: 40 })
    );
    assert_eq!(
        ring.peek(&mut small),
        Err(RingError::BufferTooSmall { needed: 40 })
    );
    assert_eq!(
        ring.incoming_failure(),
        None,
        "a small buffer is not corruption"
    );

    let mut buf = [0u8; 64];
    assert_eq!(ring.peek(&mut buf), Ok(Some(40)));
    assert_eq!(ring.peek(&mut buf), Ok(Some(40)), "peek does not consume");
    assert_eq!(Packet::parse(&buf[..40]).unwrap().trans_id(), 1);
    assert_eq!(ring.advance(), Ok(Some(40)));
    assert_eq!(ring.read(&mut buf), Ok(Some(24)));
    assert_eq!(Packet::parse(&buf[..24]).unwrap().trans_id(), 2);
    assert_eq!(ring.advance(), Ok(None));
    assert_eq!(ring.read(&mut buf), Ok(None));
    assert_eq!(ring.peek(&mut buf), Ok(None));
    assert_eq!(ring.incoming_stats().bytes, 48 + 32);
}

#[test]
fn incoming_wraps_around() {
    let (ring, host, _) = setup(2, 2);
    let mut buf = [0u8; 512];
    // Varying sizes put packet boundaries everywhere, many straddling the end.
    let mut next_id = 0u64;
    let mut expect_id = 0u64;
    for round in 0..400usize {
        let len = (round * 37) % 200;
        let payload: Vec<u8> = (0..len).map(|i| (i + round) as u8).collect();
        if host.send_inband(next_id, false, &payload) {
            next_id += 1;
        }
        if round % 2 == 1 {
            while let Some(n) = ring.read(&mut buf).unwrap() {
                let p = Packet::parse(&buf[..n]).unwrap();
                assert_eq!(p.trans_id(), expect_id);
                expect_id += 1;
            }
            ring.read_done().unwrap();
        }
    }
    assert!(expect_id > 300, "{expect_id}");
    assert_eq!(ring.incoming_failure(), None);
}

#[test]
fn incoming_descriptor_split_by_the_end() {
    let (ring, host, _) = setup(2, 2);
    let mut buf = [0u8; 4096];
    // One maximal packet (4088 ring bytes) moves both indices to size - 8.
    assert!(host.send_inband(1, false, &[0x11; 4064]));
    assert_eq!(ring.read(&mut buf), Ok(Some(4080)));
    ring.read_done().unwrap();
    assert_eq!(host.get(host.tx, RING_WRITE_INDEX_OFFSET), 4088);
    // The next descriptor has 8 bytes before the end and 8 after it.
    assert!(host.send_inband(0xd00d, true, &[1, 2, 3, 4, 5, 6, 7, 8, 9]));
    let n = ring.read(&mut buf).unwrap().unwrap();
    let p = Packet::parse(&buf[..n]).unwrap();
    assert_eq!(p.trans_id(), 0xd00d);
    assert!(p.descriptor.completion_requested());
    assert_eq!(&p.payload[..9], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    ring.read_done().unwrap();
    assert_eq!(
        host.get(host.tx, RING_READ_INDEX_OFFSET),
        (4088 + 32 + 8) % 4096
    );
}

#[test]
fn outgoing_descriptor_split_by_the_end() {
    let (ring, host, _) = setup(2, 2);
    // One maximal packet: 4064 payload + 16 + 8 = 4088.
    write_inband(&ring, 1, &[0x22; 4064]).unwrap();
    assert_eq!(host.receive().unwrap().len(), 4080);
    let pfns = [U64::new(0x1234)];
    let ranges = [GpaRange {
        byte_count: 4096,
        byte_offset: 0,
        pfns: &pfns,
    }];
    let _ = ring
        .try_write(&OutgoingPacket::gpa_direct(2, true, &ranges, &[&[5; 3]]))
        .unwrap();
    let bytes = host.receive().unwrap();
    let p = Packet::parse(&bytes).unwrap();
    assert_eq!(p.trans_id(), 2);
    let PacketKind::GpaDirect { ranges: got, .. } = p.kind else {
        panic!()
    };
    assert_eq!(got.iter().collect::<Vec<_>>(), ranges);
    assert_eq!(&p.payload[..3], &[5, 5, 5]);
}

#[test]
fn reader_signals_on_pending_send_size_crossing() {
    let (ring, host, _) = setup(2, 2);
    // Fill: three 1024-byte packets (1000-byte payload).
    for i in 0..3 {
        assert!(host.send_inband(i, false, &[0; 1000]));
    }
    // Host is blocked on a packet needing 2048 bytes.
    host.set(host.tx, RING_PENDING_SEND_SZ_OFFSET, 2048);
    let mut buf = [0u8; 1100];
    // Free now: 4096 - 3072 - 8 = 1016. After one read: 2040 < 2048 -> no signal.
    ring.read(&mut buf).unwrap().unwrap();
    assert_eq!(ring.read_done(), Ok(false));
    // After the second: 3064 >= 2048, crossing -> signal.
    ring.read(&mut buf).unwrap().unwrap();
    assert_eq!(ring.read_done(), Ok(true));
    // Third: already above, no crossing -> no signal.
    ring.read(&mut buf).unwrap().unwrap();
    assert_eq!(ring.read_done(), Ok(false));
    // Nothing consumed: nothing to publish, no signal.
    assert_eq!(ring.read_done(), Ok(false));
    assert_eq!(ring.incoming_stats().signals, 1);
}

#[test]
fn reader_pending_send_size_needs_feature_and_value() {
    for (feature, pending, expect) in [
        (1, 2048, true),
        (0, 2048, false),
        (1, 0, false),
        (1, 4095, false),
    ] {
        let (ring, host, _) = setup(2, 2);
        for i in 0..3 {
            assert!(host.send_inband(i, false, &[0; 1000]));
        }
        host.set(host.tx, RING_FEATURE_BITS_OFFSET, feature);
        host.set(host.tx, RING_PENDING_SEND_SZ_OFFSET, pending);
        let mut buf = [0u8; 1100];
        ring.read(&mut buf).unwrap().unwrap();
        ring.read(&mut buf).unwrap().unwrap();
        assert_eq!(
            ring.read_done(),
            Ok(expect),
            "feature {feature} pending {pending}"
        );
    }
    // OpenVMM quirk: "size - 1" means "tell me when empty" (low 3 bits ignored).
    let (ring, host, _) = setup(2, 2);
    for i in 0..3 {
        assert!(host.send_inband(i, false, &[0; 1000]));
    }
    host.set(host.tx, RING_PENDING_SEND_SZ_OFFSET, 4095);
    let mut buf = [0u8; 1100];
    for _ in 0..2 {
        ring.read(&mut buf).unwrap().unwrap();
        assert_eq!(ring.read_done(), Ok(false));
    }
    ring.read(&mut buf).unwrap().unwrap();
    assert_eq!(
        ring.read_done(),
        Ok(true),
        "ring empty: free = 4088 >= 4088"
    );
}

#[test]
fn interrupt_mask_and_race_free_unmask() {
    let (ring, host, _) = setup(2, 2);
    ring.set_interrupt_mask(true).unwrap();
    assert_eq!(host.get(host.tx, RING_INTERRUPT_MASK_OFFSET), 1);
    assert_eq!(
        ring.unmask_and_check(),
        Ok(false),
        "nothing waiting: safe to sleep"
    );
    assert_eq!(host.get(host.tx, RING_INTERRUPT_MASK_OFFSET), 0);

    // A packet arrives while masked (the host does not signal): unmask must report it.
    ring.set_interrupt_mask(true).unwrap();
    assert!(host.send_inband(1, false, &[1]));
    assert_eq!(ring.has_incoming(), Ok(true));
    assert_eq!(ring.unmask_and_check(), Ok(true));
    assert_eq!(host.get(host.tx, RING_INTERRUPT_MASK_OFFSET), 0);
    let mut buf = [0u8; 64];
    ring.read(&mut buf).unwrap().unwrap();
    assert_eq!(ring.unmask_and_check(), Ok(false));
}

// ---------------------------------------------------------------------------------------
// A corrupting host.

/// Checks that the incoming ring reports `expect` now and forever after.
fn assert_incoming_failed(ring: &RingPair, expect: RingError) {
    let mut buf = [0u8; 8192];
    assert_eq!(ring.read(&mut buf), Err(expect));
    assert_eq!(ring.peek(&mut buf), Err(expect));
    assert_eq!(ring.advance(), Err(expect));
    assert_eq!(ring.has_incoming(), Err(expect));
    assert_eq!(ring.unmask_and_check(), Err(expect));
    assert_eq!(ring.incoming_failure(), Some(expect));
    assert!(expect.is_corruption());
}

#[test]
fn bad_incoming_write_index() {
    // Out of range, far out, unaligned.
    for index in [4096u32, 0xffff_fff8, 12] {
        let (ring, host, _) = setup(2, 2);
        host.set(host.tx, RING_WRITE_INDEX_OFFSET, index);
        assert_incoming_failed(&ring, RingError::BadWriteIndex { index });
    }
    // Moving backwards over announced data.
    let (ring, host, _) = setup(2, 2);
    assert!(host.send_inband(1, false, &[0; 40]));
    assert_eq!(ring.has_incoming(), Ok(true));
    host.set(host.tx, RING_WRITE_INDEX_OFFSET, 16);
    assert_incoming_failed(&ring, RingError::BadWriteIndex { index: 16 });
}

#[test]
fn bad_incoming_descriptors() {
    // offset8 < 2.
    let (ring, host, _) = setup(2, 2);
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 1, false, &[0; 16]).unwrap();
    pkt[2] = 1;
    assert!(host.send(&pkt));
    assert_incoming_failed(
        &ring,
        RingError::BadDescriptor {
            offset8: 1,
            len8: 4,
        },
    );

    // len8 < offset8.
    let (ring, host, _) = setup(2, 2);
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 1, false, &[0; 16]).unwrap();
    pkt[2] = 3;
    pkt[4] = 2;
    assert!(host.send(&pkt));
    assert_incoming_failed(
        &ring,
        RingError::BadDescriptor {
            offset8: 3,
            len8: 2,
        },
    );

    // Length past the bytes the host announced.
    let (ring, host, _) = setup(2, 2);
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 1, false, &[0; 16]).unwrap();
    pkt[4] = 10; // claims 80 bytes, 40 announced
    assert!(host.send(&pkt));
    assert_incoming_failed(
        &ring,
        RingError::PacketPastWriteIndex {
            needed: 88,
            available: 40,
        },
    );

    // Giant packet: len8 = 0xffff on a 4 KiB ring.
    let (ring, host, _) = setup(2, 2);
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 1, false, &[0; 16]).unwrap();
    pkt[4] = 0xff;
    pkt[5] = 0xff;
    assert!(host.send(&pkt));
    assert_incoming_failed(
        &ring,
        RingError::PacketTooLarge {
            len: 0xffff * 8 + 8,
            max: 4088,
        },
    );

    // Fewer bytes announced than a descriptor and trailer.
    let (ring, host, _) = setup(2, 2);
    host.set(host.tx, RING_WRITE_INDEX_OFFSET, 16);
    assert_incoming_failed(
        &ring,
        RingError::PacketPastWriteIndex {
            needed: 24,
            available: 16,
        },
    );
}

#[test]
fn descriptor_is_fetched_once() {
    let (ring, host, mem) = setup(2, 2);
    assert!(host.send_inband(1, false, &[0x5a; 16]));
    assert!(host.send_inband(2, false, &[0x6b; 8]));
    // As soon as the guest has read the first descriptor, the host rewrites its len8
    // and type, hoping the guest uses the new values for the copy or the parse.
    let data = host.tx.data;
    *mem.after_read.borrow_mut() = Some(Box::new(move |offset, bytes: &mut [u8]| {
        if offset == data {
            bytes[data] = 7; // transfer pages
            bytes[data + 4] = 0xff; // len8
        }
    }));
    let mut buf = [0u8; 64];
    let p = ring.read_packet(&mut buf).unwrap().unwrap();
    assert_eq!(p.kind, PacketKind::InBand);
    assert_eq!(p.descriptor.len8.get(), 4);
    assert_eq!(p.payload, &[0x5a; 16]);
    // The next packet is found where the validated length says.
    *mem.after_read.borrow_mut() = None;
    let p = ring.read_packet(&mut buf).unwrap().unwrap();
    assert_eq!(p.trans_id(), 2);
}

#[test]
fn bad_packet_contents_are_consumed_not_fatal() {
    let (ring, host, _) = setup(2, 2);
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 1, false, &[0; 16]).unwrap();
    pkt[0] = 8; // VM_PKT_DATA_USING_GPADL: framing fine, type unsupported
    assert!(host.send(&pkt));
    let mut pkt2 = [0u8; 32];
    encode_inband(&mut pkt2, 2, false, &[0; 16]).unwrap();
    pkt2[6] = 0x80; // reserved flag
    assert!(host.send(&pkt2));
    assert!(host.send_inband(3, false, &[3]));

    let mut buf = [0u8; 64];
    assert_eq!(
        ring.read_packet(&mut buf),
        Err(RingError::BadPacket(WireError::Unsupported(8)))
    );
    assert_eq!(
        ring.read_packet(&mut buf),
        Err(RingError::BadPacket(WireError::BadFlags))
    );
    assert_eq!(ring.read_packet(&mut buf).unwrap().unwrap().trans_id(), 3);
    assert_eq!(ring.incoming_failure(), None);
    assert_eq!(ring.incoming_stats().packets, 3);
}

#[test]
fn bad_outgoing_read_index() {
    for index in [4096u32, 4, 0x8000_0000] {
        let (ring, host, _) = setup(2, 2);
        host.set(host.rx, RING_READ_INDEX_OFFSET, index);
        let err = RingError::BadReadIndex { index };
        assert_eq!(write_inband(&ring, 1, &[1]), Err(err));
        assert_eq!(ring.outgoing_failure(), Some(err));
        // Stays failed even once the host puts a sane value back.
        host.set(host.rx, RING_READ_INDEX_OFFSET, 0);
        assert_eq!(write_inband(&ring, 1, &[1]), Err(err));
        assert_eq!(ring.outgoing_free(), Err(err));
        // The incoming direction is independent.
        assert_eq!(ring.has_incoming(), Ok(false));
    }
    // The host claims to have consumed more than was written.
    let (ring, host, _) = setup(2, 2);
    write_inband(&ring, 1, &[1]).unwrap(); // 32 bytes written
    host.set(host.rx, RING_READ_INDEX_OFFSET, 64);
    assert_eq!(
        write_inband(&ring, 2, &[2]),
        Err(RingError::BadReadIndex { index: 64 })
    );
}

// ---------------------------------------------------------------------------------------
// Batches: staged writes, prepared packets, read snapshots and windows.

#[test]
fn staged_packets_publish_once_and_signal_once() {
    let (ring, host, _) = setup(2, 2);
    for i in 0..5 {
        ring.stage(&OutgoingPacket::completion(i, &[&[i as u8; 8]]))
            .unwrap();
    }
    assert!(ring.has_unpublished());
    assert_eq!(
        host.get(host.rx, RING_WRITE_INDEX_OFFSET),
        0,
        "nothing published yet"
    );
    assert_eq!(host.receive(), None);
    assert_eq!(ring.publish(), Ok(WriteResult { signal: true }));
    assert!(!ring.has_unpublished());
    assert_eq!(
        ring.publish(),
        Ok(WriteResult { signal: false }),
        "nothing new"
    );
    for i in 0..5 {
        let p = host.receive().unwrap();
        let p = Packet::parse(&p).unwrap();
        assert_eq!((p.kind, p.trans_id()), (PacketKind::Completion, i));
    }
    // The host still has an unread packet: the next batch needs no signal.
    ring.stage(&OutgoingPacket::completion(9, &[])).unwrap();
    assert!(ring.publish().unwrap().signal, "host had read everything");
    ring.stage(&OutgoingPacket::completion(10, &[])).unwrap();
    assert!(!ring.publish().unwrap().signal, "host has not caught up");
    // A masked host is not signalled.
    host.receive().unwrap();
    host.receive().unwrap();
    host.set(host.rx, RING_INTERRUPT_MASK_OFFSET, 1);
    ring.stage(&OutgoingPacket::completion(11, &[])).unwrap();
    assert!(!ring.publish().unwrap().signal);
    assert_eq!(ring.outgoing_stats().signals, 2);
    assert_eq!(ring.outgoing_stats().packets, 8);
}

#[test]
fn prepared_packets_and_batches() {
    let (ring, host, _) = setup(2, 2);
    let mut p = PreparedPacket::new(&OutgoingPacket::inband(0, true, &[&[1, 2, 3]])).unwrap();
    assert_eq!(p.ring_len(), 32);
    for i in 0..3u8 {
        p.set_trans_id(100 + u64::from(i));
        p.payload_mut()[0] = i;
        assert!(ring.try_write_prepared(&mut p).is_ok());
        let bytes = host.receive().unwrap();
        let got = Packet::parse(&bytes).unwrap();
        assert_eq!(got.trans_id(), 100 + u64::from(i));
        assert!(got.descriptor.completion_requested());
        assert_eq!(&got.payload[..3], &[i, 2, 3]);
    }
    // A packet larger than PREPARED_MAX is refused.
    assert!(matches!(
        PreparedPacket::new(&OutgoingPacket::inband(0, false, &[&[0; 64]])),
        Err(RingError::OutgoingTooLarge { .. })
    ));
    // Batches: as many as fit, in one go, each with its id; the ring wraps inside.
    let template = PreparedPacket::new(&OutgoingPacket::completion(0, &[&[7; 8]])).unwrap();
    let ids: Vec<u64> = (0..200).collect();
    let mut sent = 0usize;
    while sent < ids.len() {
        let n = match ring.stage_prepared_batch(&template, &ids[sent..]) {
            Ok(n) => n,
            Err(RingError::Full { needed: 32 }) => 0,
            Err(e) => panic!("{e:?}"),
        };
        let _ = ring.publish().unwrap();
        let mut got = 0;
        while let Some(bytes) = host.receive() {
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.trans_id(), ids[sent + got]);
            assert_eq!(p.payload, &[7; 8]);
            got += 1;
        }
        assert_eq!(got, n);
        sent += n;
        assert!(n <= 4088 / 32);
    }
    assert_eq!(ring.outgoing_failure(), None);
}

#[test]
fn a_batch_reads_up_to_its_snapshot() {
    let (ring, host, _) = setup(2, 2);
    for i in 0..3 {
        assert!(host.send_inband(i, false, &[i as u8; 12]));
    }
    let mut batch = ring.begin_read().unwrap();
    // Written after the snapshot: left for the next batch.
    assert!(host.send_inband(3, false, &[3; 12]));
    let mut buf = [0u8; 64];
    for i in 0..3 {
        assert_eq!(batch.read_packet(&mut buf).unwrap().unwrap().trans_id(), i);
    }
    assert_eq!(batch.read_packet(&mut buf), Ok(None));
    assert!(batch.is_empty());
    assert_eq!(ring.read_done(), Ok(false));
    let mut batch = ring.begin_read().unwrap();
    assert_eq!(batch.read_packet(&mut buf).unwrap().unwrap().trans_id(), 3);
    assert_eq!(batch.read_packet(&mut buf), Ok(None));
    // A too-small buffer consumes nothing.
    assert!(host.send_inband(4, false, &[4; 100]));
    let mut batch = ring.begin_read().unwrap();
    let mut small = [0u8; 40];
    assert_eq!(
        batch.read_packet(&mut small),
        Err(RingError::BufferTooSmall { needed: 120 })
    );
    assert_eq!(batch.skip(), Ok(Some(120)));
    assert_eq!(ring.incoming_failure(), None);
}

#[test]
fn windowed_batches_read_everything_in_order() {
    let (ring, host, _) = setup(2, 2);
    let mut buf = Vec::new();
    let (mut sent, mut got) = (0u64, 0u64);
    for round in 0..300usize {
        let len = (round * 53) % 300;
        if host.send_inband(sent, false, &vec![(sent % 255 + 1) as u8; len]) {
            sent += 1;
        }
        if round % 3 == 2 {
            // Windows from tiny to larger than the ring, packets across the end.
            let window = [24, 100, 500, 1 << 20][round % 4];
            let mut batch = ring.begin_read_windowed(&mut buf, window).unwrap();
            while let Some(incoming) = batch.next(usize::MAX).unwrap() {
                let Incoming::Packet(p) = incoming else {
                    panic!("{incoming:?}")
                };
                assert_eq!(p.trans_id(), got);
                // The payload, then zero padding.
                let fill = (got % 255 + 1) as u8;
                assert!(p.payload.iter().all(|&b| b == fill || b == 0));
                got += 1;
            }
            ring.read_done().unwrap();
        }
    }
    assert!(got > 150 && got + 3 >= sent, "{got} of {sent}");
    // Packets above the caller's limit are consumed unread; malformed ones reported.
    assert!(host.send_inband(1, false, &[0; 200]));
    let mut pkt = [0u8; 32];
    encode_inband(&mut pkt, 2, false, &[0; 16]).unwrap();
    pkt[0] = 8; // unsupported type
    assert!(host.send(&pkt));
    assert!(host.send_inband(3, false, &[1; 8]));
    let mut batch = ring.begin_read_windowed(&mut buf, 64).unwrap();
    assert_eq!(batch.next(100), Ok(Some(Incoming::TooLong(216))));
    assert_eq!(
        batch.next(100),
        Ok(Some(Incoming::Malformed(WireError::Unsupported(8))))
    );
    assert!(matches!(batch.next(100), Ok(Some(Incoming::Packet(p))) if p.trans_id() == 3));
    assert_eq!(batch.next(100), Ok(None));
    assert_eq!(ring.incoming_failure(), None);
}

#[test]
fn windowed_batch_uses_only_its_copy() {
    // The host grows a descriptor's len8 right after the guest copied a window that
    // held only part of the packet: the refreshed copy says more than was announced.
    let (ring, host, mem) = setup(2, 2);
    assert!(host.send_inband(1, false, &[0x11; 64]));
    let data = host.tx.data;
    *mem.after_read.borrow_mut() = Some(Box::new(move |offset, bytes: &mut [u8]| {
        if offset == data {
            bytes[data + 4] = 0x40; // len8: 512 bytes, 88 announced
        }
    }));
    let mut buf = Vec::new();
    let mut batch = ring.begin_read_windowed(&mut buf, 24).unwrap();
    let e = batch.next(usize::MAX).unwrap_err();
    assert!(e.is_corruption(), "{e:?}");
    assert_eq!(ring.incoming_failure(), Some(e));
}

// ---------------------------------------------------------------------------------------
// Random hosts.

/// Every host-writable word of both control pages and the incoming data area get random
/// values; the guest must return errors, never panic or spin.
fn hostile_round(seed_words: &[(u8, u32)], data: &[(u16, u8)], ops: &[u8]) {
    let (ring, host, mem) = setup(2, 2);
    let fields = [
        RING_WRITE_INDEX_OFFSET,
        RING_READ_INDEX_OFFSET,
        RING_INTERRUPT_MASK_OFFSET,
        RING_PENDING_SEND_SZ_OFFSET,
        RING_FEATURE_BITS_OFFSET,
    ];
    let mut buf = vec![0u8; 8192];
    let mut words = seed_words.iter();
    let mut bytes = data.iter();
    for op in ops {
        // Interleave host scribbles with guest operations.
        if let Some(&(sel, value)) = words.next() {
            let r = if sel & 1 == 0 { host.rx } else { host.tx };
            let field = fields[(sel as usize >> 1) % fields.len()];
            // Bias towards plausible values so the checks past the first are reached.
            let value = match sel >> 5 {
                0 => value,
                1 => value % 4096,
                _ => (value % 512) * 8,
            };
            host.set(r, field, value);
        }
        for _ in 0..4 {
            if let Some(&(pos, b)) = bytes.next() {
                let pos = host.tx.data + (pos as usize % host.tx.size);
                mem.bytes.borrow_mut()[pos] = b;
            }
        }
        let _ = match op % 12 {
            0 => ring.read(&mut buf).map(|_| ()),
            1 => ring.peek(&mut buf[..64]).map(|_| ()),
            2 => ring.advance().map(|_| ()),
            3 => ring.read_packet(&mut buf).map(|_| ()),
            4 => ring.read_done().map(|_| ()),
            5 => ring.unmask_and_check().map(|_| ()),
            6 => write_inband(&ring, 1, &buf[..(*op as usize * 13) % 3000]).map(|_| ()),
            7 => ring.outgoing_free().map(|_| ()),
            8 => ring.begin_read().and_then(|mut b| {
                while b.read_packet(&mut buf)?.is_some() {}
                Ok(())
            }),
            9 => {
                let mut window = Vec::new();
                ring.begin_read_windowed(&mut window, *op as usize * 7)
                    .and_then(|mut b| {
                        while b.next(2048)?.is_some() {}
                        Ok(())
                    })
            }
            10 => ring
                .stage(&OutgoingPacket::completion(1, &[&buf[..*op as usize % 64]]))
                .and_then(|_| ring.publish().map(|_| ())),
            _ => PreparedPacket::new(&OutgoingPacket::completion(0, &[&[1; 8]]))
                .and_then(|t| ring.stage_prepared_batch(&t, &[1, 2, 3]))
                .and_then(|_| ring.publish().map(|_| ())),
        };
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_host_never_panics(
        words in proptest::collection::vec((any::<u8>(), any::<u32>()), 0..40),
        data in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..200),
        ops in proptest::collection::vec(any::<u8>(), 1..60),
    ) {
        hostile_round(&words, &data, &ops);
    }

    /// A well-behaved host and the guest exchange random packets in both directions;
    /// everything arrives intact and in order, whatever the wrap positions.
    #[test]
    fn honest_host_round_trips(
        sizes in proptest::collection::vec((0usize..700, any::<bool>(), any::<u8>()), 1..120),
        out_pages in 2usize..4,
    ) {
        let (ring, host, _) = setup(out_pages, 2);
        let mut buf = vec![0u8; 1024];
        let (mut g_sent, mut g_got) = (0u64, 0u64);
        let (mut h_sent, mut h_got) = (0u64, 0u64);
        for (len, host_turn, fill) in sizes {
            let payload = vec![fill; len];
            // Guest -> host.
            match write_inband(&ring, g_sent, &payload) {
                Ok(_) => g_sent += 1,
                Err(RingError::Full { .. }) => {}
                Err(e) => prop_assert!(false, "write failed: {e:?}"),
            }
            // Host -> guest.
            if host.send_inband(h_sent, false, &payload) {
                h_sent += 1;
            }
            if host_turn {
                while let Some(bytes) = host.receive() {
                    let p = Packet::parse(&bytes).unwrap();
                    prop_assert_eq!(p.trans_id(), g_got);
                    g_got += 1;
                }
            } else {
                while let Some(n) = ring.read(&mut buf).unwrap() {
                    let p = Packet::parse(&buf[..n]).unwrap();
                    prop_assert_eq!(p.trans_id(), h_got);
                    h_got += 1;
                }
                let _ = ring.read_done().unwrap();
            }
        }
        while let Some(bytes) = host.receive() {
            prop_assert_eq!(Packet::parse(&bytes).unwrap().trans_id(), g_got);
            g_got += 1;
        }
        while let Some(n) = ring.read(&mut buf).unwrap() {
            prop_assert_eq!(Packet::parse(&buf[..n]).unwrap().trans_id(), h_got);
            h_got += 1;
        }
        prop_assert_eq!(g_sent, g_got);
        prop_assert_eq!(h_sent, h_got);
        prop_assert_eq!(ring.outgoing_stats().packets, g_sent);
        prop_assert_eq!(ring.incoming_stats().packets, h_sent);
    }
}

#[test]
fn outgoing_kind_is_public_data() {
    // The channel layer matches on the kind (e.g. to count completions).
    let pkt = OutgoingPacket::completion(1, &[]);
    assert_eq!(pkt.kind, OutgoingKind::Completion);
    assert_eq!(pkt.ring_len(), Ok(24));
}
