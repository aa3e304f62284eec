//! The IC devices against a hand-written guest: a ring pair over `GuestMemory` driven
//! byte by byte here, answers built from `hvnet-wire` structures, the device called as
//! the VMBus host would call it.

use std::collections::BTreeMap;

use hvnet_wire::ic::{
    encode_message, kvp_enumerate_record, negotiate_response_body, put_str, IcMessage, IcMsgHdr,
    IcMsgType, IcStatus, IcVersion, IpInfoField, KvpIpInfoMut, KvpOperation, KvpPool, KvpRecordMut,
    KvpRequest, NegotiateMsg, Negotiated, ShutdownRequest, TimesyncMsg, ICMSG_HDR,
    KVP_ENUMERATE_RECORD_OFFSET, KVP_IP_INFO_SIZE,
};
use hvnet_wire::ring::{
    encode_inband, Packet, PacketKind, VmPacketDescriptor, PACKET_DESCRIPTOR_SIZE,
    PACKET_TRAILER_SIZE, RING_READ_INDEX_OFFSET, RING_WRITE_INDEX_OFFSET,
};
use hvnet_wire::vmbus::VmbusVersion;
use zerocopy::FromBytes;

use super::*;
use crate::device::DeviceId;
use crate::memory::{GuestMemory, PAGE_SIZE};

const PAGES: usize = 4;
const PAGE: u64 = PAGE_SIZE as u64;

/// The guest ends of a ring pair: guest-to-host in `pfns[..PAGES]`, host-to-guest after.
struct Guest {
    mem: GuestMemory,
    pfns: Vec<u64>,
    out_write: u32,
    in_read: u32,
}

impl Guest {
    fn size() -> u32 {
        ((PAGES - 1) * PAGE_SIZE) as u32
    }

    fn gpa(&self, out: bool, pos: u32) -> u64 {
        let base = if out { 0 } else { PAGES };
        let pos = pos as usize % Self::size() as usize;
        self.pfns[base + 1 + pos / PAGE_SIZE] * PAGE + (pos % PAGE_SIZE) as u64
    }

    fn control(&self, out: bool, offset: usize) -> u64 {
        self.pfns[if out { 0 } else { PAGES }] * PAGE + offset as u64
    }

    fn write(&mut self, trans_id: u64, payload: &[u8]) {
        let mut pkt = vec![0u8; payload.len() + 24];
        let n = encode_inband(&mut pkt, trans_id, false, payload).unwrap();
        pkt.truncate(n);
        pkt.extend_from_slice(&[0; PACKET_TRAILER_SIZE]);
        for (i, b) in pkt.iter().enumerate() {
            let gpa = self.gpa(true, self.out_write + i as u32);
            self.mem.write(gpa, &[*b]).unwrap();
        }
        self.out_write = (self.out_write + pkt.len() as u32) % Self::size();
        self.mem
            .store_u32(self.control(true, RING_WRITE_INDEX_OFFSET), self.out_write)
            .unwrap();
    }

    /// The next host packet: (type, trans id, payload with padding).
    fn read(&mut self) -> Option<(VmPacketDescriptor, Vec<u8>)> {
        let w = self
            .mem
            .load_u32(self.control(false, RING_WRITE_INDEX_OFFSET))
            .unwrap();
        if w == self.in_read {
            return None;
        }
        let mut d = [0u8; PACKET_DESCRIPTOR_SIZE];
        for (i, b) in d.iter_mut().enumerate() {
            let mut one = [0u8];
            self.mem
                .read(self.gpa(false, self.in_read + i as u32), &mut one)
                .unwrap();
            *b = one[0];
        }
        let desc = VmPacketDescriptor::read_from_bytes(&d).unwrap();
        let mut pkt = vec![0u8; desc.packet_len()];
        for (i, b) in pkt.iter_mut().enumerate() {
            let mut one = [0u8];
            self.mem
                .read(self.gpa(false, self.in_read + i as u32), &mut one)
                .unwrap();
            *b = one[0];
        }
        self.in_read = (self.in_read + (pkt.len() + PACKET_TRAILER_SIZE) as u32) % Self::size();
        self.mem
            .store_u32(self.control(false, RING_READ_INDEX_OFFSET), self.in_read)
            .unwrap();
        let p = Packet::parse(&pkt).unwrap();
        assert_eq!(p.kind, PacketKind::InBand);
        Some((desc, p.payload.to_vec()))
    }
}

/// A device, its ring and a guest.
struct Rig<S: HostService> {
    device: IcDevice<S>,
    handle: IcHandle<S>,
    ring: HostRing,
    guest: Guest,
}

fn ctx() -> ChannelCtx {
    ChannelCtx {
        device: DeviceId(0),
        relid: 5,
        sub_index: 0,
        target_vp: 0,
        version: VmbusVersion::WIN10_V5_3,
    }
}

impl<S: HostService> Rig<S> {
    fn new(service: S) -> Self {
        Self::with_device(IcDevice::new(service))
    }

    fn with_device(device: IcDevice<S>) -> Self {
        let mem = GuestMemory::new(64, 7);
        let pfns = mem.alloc_pages(2 * PAGES).unwrap();
        let ring = HostRing::new(mem.clone(), &pfns, PAGES).unwrap();
        let handle = device.handle();
        let mut rig = Rig {
            device,
            handle,
            ring,
            guest: Guest {
                mem,
                pfns,
                out_write: 0,
                in_read: 0,
            },
        };
        let gpadls = BTreeMap::new();
        let mem = rig.guest.mem.clone();
        let mut actions = HostActions::new(DeviceId(0), 0, &mem, &gpadls);
        rig.device
            .on_open(ctx(), &mut rig.ring, &mut actions)
            .unwrap();
        rig
    }

    fn signal(&mut self) {
        let gpadls = BTreeMap::new();
        let mem = self.guest.mem.clone();
        let mut actions = HostActions::new(DeviceId(0), 0, &mem, &gpadls);
        self.device.on_packets(ctx(), &mut self.ring, &mut actions);
    }

    fn poll(&mut self) {
        let gpadls = BTreeMap::new();
        let mem = self.guest.mem.clone();
        let mut actions = HostActions::new(DeviceId(0), 0, &mem, &gpadls);
        self.device.on_poll(ctx(), &mut self.ring, &mut actions);
    }

    /// Reads the host's next message and answers it as Linux does: the same bytes with
    /// `edit` applied to the body, flags `transaction | response`.
    fn answer(&mut self, edit: impl FnOnce(&IcMsgHdr, &mut Vec<u8>) -> IcStatus) -> IcMsgHdr {
        let (desc, payload) = self.guest.read().expect("a host message");
        let msg = IcMessage::parse(&payload).unwrap();
        let header = msg.header;
        let mut body = msg.body.to_vec();
        let status = edit(&header, &mut body);
        let mut reply = header;
        reply.icflags = 5;
        reply.status = status.0.into();
        let mut out = vec![0u8; ICMSG_HDR + body.len()];
        encode_message(&mut out, &reply, &[&body]).unwrap();
        self.guest.write(desc.trans_id.get(), &out);
        self.signal();
        header
    }

    /// Answers the negotiation with `chosen`.
    fn negotiate(&mut self, chosen: Option<Negotiated>) -> Vec<u8> {
        let mut request = Vec::new();
        self.answer(|h, body| {
            assert_eq!(h.msg_type(), IcMsgType::NEGOTIATE);
            assert_eq!(h.icflags, 3);
            assert_eq!(h.ictransaction_id, 0);
            request = body.clone();
            // Linux answers in the request's buffer, growing it only if needed.
            if body.len() < 16 {
                body.resize(16, 0);
            }
            body[..16].copy_from_slice(&negotiate_response_body(chosen));
            IcStatus::S_OK
        });
        request
    }

    fn assert_clean(&self) {
        let s = self.handle.stats();
        assert_eq!(s.violations, 0, "violations: {:?}", s.errors);
    }
}

fn n(fw: (u16, u16), msg: (u16, u16)) -> Option<Negotiated> {
    Some(Negotiated {
        framework: IcVersion::new(fw.0, fw.1),
        message: IcVersion::new(msg.0, msg.1),
    })
}

#[test]
fn negotiate_request_is_openvmms() {
    let mut rig = Rig::new(Shutdown::default());
    assert!(rig.handle.is_open());
    assert_eq!(rig.handle.stats().negotiation, Negotiation::Pending);
    let request = rig.negotiate(n((3, 0), (3, 2)));
    let m = NegotiateMsg::parse_request(&request).unwrap();
    assert_eq!(
        m.framework,
        &[IcVersion::new(1, 0), IcVersion::new(3, 0)][..]
    );
    assert_eq!(m.message.len(), 4);
    assert_eq!(rig.handle.negotiated(), n((3, 0), (3, 2)));
    assert_eq!(rig.handle.stats().responses, 1);
    rig.assert_clean();
}

#[test]
fn heartbeats_on_poll_are_checked() {
    let mut rig = Rig::new(Heartbeat::default());
    rig.negotiate(n((3, 0), (3, 0)));
    // Nothing without a poll.
    assert!(rig.guest.read().is_none());
    for round in 0..3u64 {
        rig.poll();
        let h = rig.answer(|_, body| {
            let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
            assert_eq!(seq, round + 1);
            body[..8].copy_from_slice(&(seq + 1).to_le_bytes());
            IcStatus::S_OK
        });
        assert_eq!(h.msg_type(), IcMsgType::HEARTBEAT);
        assert_eq!(h.icvermsg, IcVersion::new(3, 0));
        assert_eq!(h.icflags, 3);
    }
    let hb = rig.handle.heartbeat();
    assert_eq!((hb.sent, hb.answered, hb.next_seq), (3, 3, 4));
    rig.assert_clean();

    // A wrong echo is a violation; the next heartbeat goes out anyway.
    rig.poll();
    rig.answer(|_, _| IcStatus::S_OK);
    assert_eq!(rig.handle.stats().violations, 1);
    rig.handle.set_beat_on_poll(false);
    rig.poll();
    assert!(rig.guest.read().is_none());
    rig.handle.beat();
    rig.poll();
    assert!(rig.guest.read().is_some());
}

#[test]
fn no_common_version_keeps_the_device_quiet() {
    let mut rig = Rig::new(Heartbeat::default());
    rig.negotiate(None);
    assert_eq!(rig.handle.stats().negotiation, Negotiation::NoCommonVersion);
    rig.handle.beat();
    rig.poll();
    assert!(rig.guest.read().is_none());
    rig.assert_clean();
}

#[test]
fn versions_not_offered_are_refused() {
    let mut rig = Rig::new(Heartbeat::default());
    rig.negotiate(n((3, 0), (9, 9)));
    let s = rig.handle.stats();
    assert_eq!(s.negotiation, Negotiation::Failed);
    assert_eq!(s.violations, 1);
    rig.poll();
    assert!(rig.guest.read().is_none());
}

#[test]
fn bad_answers_are_violations() {
    let mut rig = Rig::new(Heartbeat::default());
    rig.negotiate(n((3, 0), (3, 0)));
    // Unsolicited, then short, then wrong flags, then wrong transaction id.
    rig.guest.write(99, &[0u8; 40]);
    rig.guest.write(99, &[1, 2, 3]);
    rig.signal();
    assert_eq!(rig.handle.stats().violations, 2);
    rig.poll();
    let (desc, payload) = rig.guest.read().unwrap();
    let mut bad = payload.clone();
    bad[PIPE_HEADER_SIZE + 17] = 4;
    rig.guest.write(desc.trans_id.get(), &bad);
    let mut wrong_id = payload.clone();
    wrong_id[PIPE_HEADER_SIZE + 17] = 5;
    wrong_id[ICMSG_HDR..ICMSG_HDR + 8].copy_from_slice(&2u64.to_le_bytes());
    rig.guest.write(desc.trans_id.get() + 1, &wrong_id);
    // Then the right answer still counts.
    rig.guest.write(desc.trans_id.get(), &wrong_id);
    rig.signal();
    let s = rig.handle.stats();
    assert_eq!(s.violations, 4, "{:?}", s.errors);
    assert_eq!(rig.handle.heartbeat().answered, 1);
}

const PIPE_HEADER_SIZE: usize = hvnet_wire::ic::PIPE_HEADER_SIZE;

#[test]
fn shutdown_requests_and_statuses() {
    let mut rig = Rig::new(Shutdown::default());
    rig.negotiate(n((3, 0), (3, 2)));
    rig.handle.request_shutdown(true);
    rig.handle.request_hibernate();
    rig.poll();
    rig.answer(|h, body| {
        assert_eq!(h.msg_type(), IcMsgType::SHUTDOWN);
        assert_eq!(body.len(), 2060);
        let r = ShutdownRequest::parse(body).unwrap();
        assert_eq!((r.reason_code, r.flags), (0x8000_0000, 3));
        IcStatus::S_OK
    });
    // The second request went out once the first was answered.
    rig.answer(|_, body| {
        assert_eq!(ShutdownRequest::parse(body).unwrap().flags, 4);
        IcStatus::NOT_SUPPORTED
    });
    assert_eq!(
        rig.handle.results(),
        vec![
            ShutdownResult {
                flags: 3,
                status: IcStatus::S_OK
            },
            ShutdownResult {
                flags: 4,
                status: IcStatus::NOT_SUPPORTED
            }
        ]
    );
    rig.assert_clean();
}

#[test]
fn timesync_layouts_follow_the_version() {
    for (version, len) in [((4, 0), 22), ((3, 0), 25)] {
        let device = IcDevice::with_versions(
            Timesync::default(),
            IcVersions::with_message(&[IcVersion::new(version.0, version.1)]),
        );
        let mut rig = Rig::with_device(device);
        rig.negotiate(n((3, 0), version));
        rig.handle.send_sync(17_000_000_000_000_000);
        rig.handle.send_time(TimeMessage {
            expect_reply: false,
            ..TimeMessage::sample(17_000_000_100_000_000)
        });
        rig.handle.send_sample(17_000_000_200_000_000);
        rig.poll();
        rig.answer(|h, body| {
            assert!(body.len() >= len);
            let m = TimesyncMsg::parse(body, h.icvermsg).unwrap();
            assert_eq!(m.flags(), 1);
            assert_eq!(
                m.parent_time(),
                17_000_000_000_000_000 + hvnet_wire::ic::WLTIMEDELTA
            );
            IcStatus::S_OK
        });
        // The sample without a transaction follows at once, then the last one.
        let (_, payload) = rig.guest.read().unwrap();
        let m = IcMessage::parse(&payload).unwrap();
        assert_eq!(m.header.icflags, 0);
        rig.answer(|_, _| IcStatus::S_OK);
        let t = rig.handle.timesync();
        assert_eq!((t.sent, t.answered), (3, 2));
        rig.assert_clean();
    }
}

#[test]
fn kvp_enumeration_and_ip_info() {
    let mut rig = Rig::new(Kvp::default());
    rig.negotiate(n((3, 0), (4, 0)));
    rig.handle.enumerate_all(KvpPool::AUTO);
    rig.handle.get_ip_info("00:15:5D:00:00:01");
    rig.poll();
    for (index, key, value) in [
        (0, "OSName", "hvnet"),
        (1, "NetworkAddressIPv4", "10.0.0.4"),
    ] {
        rig.answer(|_, body| {
            assert_eq!(body.len(), 2580);
            assert_eq!(
                KvpRequest::parse(body).unwrap(),
                KvpRequest::Enumerate {
                    pool: KvpPool::AUTO,
                    index
                }
            );
            let mut r = KvpRecordMut::new(&mut body[KVP_ENUMERATE_RECORD_OFFSET..]).unwrap();
            r.set_key(key.encode_utf16()).unwrap();
            r.set_value_string(value.encode_utf16()).unwrap();
            assert!(kvp_enumerate_record(body).is_ok());
            IcStatus::S_OK
        });
    }
    rig.answer(|_, _| IcStatus::S_CONT);
    rig.answer(|_, body| {
        assert_eq!(body.len(), KVP_IP_INFO_SIZE);
        assert_eq!(body[0], KvpOperation::GET_IP_INFO.0);
        let mut info = KvpIpInfoMut::new(body).unwrap();
        info.set_field(IpInfoField::IpAddr, "10.0.0.4").unwrap();
        info.set_field(IpInfoField::SubNet, "255.255.255.0")
            .unwrap();
        info.set_addr_family(1);
        IcStatus::S_OK
    });
    assert_eq!(
        rig.handle.enumerated(KvpPool::AUTO),
        vec![
            ("OSName".to_string(), "hvnet".to_string()),
            ("NetworkAddressIPv4".to_string(), "10.0.0.4".to_string())
        ]
    );
    let responses = rig.handle.responses();
    assert_eq!(responses.len(), 4);
    assert_eq!(responses[2].status, IcStatus::S_CONT);
    let ip = responses[3].ip_info.clone().unwrap();
    assert_eq!(ip.adapter_id, "00:15:5D:00:00:01");
    assert_eq!((ip.ip_addr.as_str(), ip.addr_family), ("10.0.0.4", 1));
    rig.assert_clean();

    // An S_OK enumerate answer whose key size is odd is a violation.
    rig.handle.enumerate(KvpPool::AUTO, 5);
    rig.poll();
    rig.answer(|_, body| {
        let at = KVP_ENUMERATE_RECORD_OFFSET + 4;
        body[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
        IcStatus::S_OK
    });
    assert_eq!(rig.handle.stats().violations, 1);
}

#[test]
fn kvp_set_get_delete_requests() {
    let mut rig = Rig::new(Kvp::default());
    rig.negotiate(n((3, 0), (4, 0)));
    rig.handle
        .set(KvpPool::EXTERNAL, "Colour", KvpHostValue::U32(7));
    rig.handle.get(KvpPool::EXTERNAL, "Colour");
    rig.handle.delete(KvpPool::EXTERNAL, "Colour");
    rig.poll();
    rig.answer(|_, body| {
        // 2576 bytes, padded to the ring's 8-byte units.
        assert_eq!(body.len(), 2580);
        assert!(matches!(
            KvpRequest::parse(body),
            Ok(KvpRequest::Set {
                value: hvnet_wire::ic::KvpValue::U32(7),
                ..
            })
        ));
        IcStatus::S_OK
    });
    rig.answer(|_, body| {
        let mut r = KvpRecordMut::new(&mut body[4..]).unwrap();
        r.set_value_string("7".encode_utf16()).unwrap();
        IcStatus::S_OK
    });
    rig.answer(|_, body| {
        assert_eq!(body.len(), 524);
        let KvpRequest::Delete { key, .. } = KvpRequest::parse(body).unwrap() else {
            panic!()
        };
        assert!(key.eq_str("Colour"));
        IcStatus::S_CONT
    });
    let r = rig.handle.responses();
    assert_eq!(r[1].value.as_deref(), Some("7"));
    assert_eq!(r[2].status, IcStatus::S_CONT);
    rig.assert_clean();
}

#[test]
fn injected_messages_expect_no_answer() {
    let mut rig = Rig::new(Heartbeat::default());
    rig.negotiate(n((3, 0), (3, 0)));
    rig.handle.set_beat_on_poll(false);
    let mut key = [0u8; 8];
    put_str(&mut key, "abc").unwrap();
    rig.handle.inject_raw(&key);
    rig.poll();
    let (_, payload) = rig.guest.read().unwrap();
    assert_eq!(&payload[..8], &key);
    assert_eq!(rig.handle.stats().injected, 1);
    // Answering it is a violation.
    let header = IcMsgHdr {
        icflags: 5,
        ..IcMsgHdr::default()
    };
    let mut out = [0u8; 40];
    let len = encode_message(&mut out, &header, &[&[0; 12]]).unwrap();
    rig.guest.write(1234, &out[..len]);
    rig.signal();
    assert_eq!(rig.handle.stats().violations, 1);
    // Closing forgets the conversation.
    rig.device.on_close(ctx());
    assert!(!rig.handle.is_open());
    assert_eq!(rig.handle.stats().negotiation, Negotiation::Closed);
    assert_eq!(rig.handle.stats().closes, 1);
}
