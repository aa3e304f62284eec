//! A scripted guest for hvemu's own tests: hand-built channel messages through the
//! `hvnet-wire` encoders, and a minimal guest-side ring pair over `GuestMemory`.
#![allow(dead_code)]

use hvemu::{
    DeviceId, DeviceSpec, GuestMemory, HostConfig, SubchannelTestDevice, VmbusHost, PAGE_SIZE,
};
use hvnet_wire::ring::{
    encode_inband, Packet, VmPacketDescriptor, PACKET_DESCRIPTOR_SIZE, PACKET_TRAILER_SIZE,
    RING_FEATURE_BITS_OFFSET, RING_INTERRUPT_MASK_OFFSET, RING_PENDING_SEND_SZ_OFFSET,
    RING_READ_INDEX_OFFSET, RING_WRITE_INDEX_OFFSET,
};
use hvnet_wire::vmbus::{
    gpadl_messages, ChannelMessage, CloseChannel, GpadlTeardown, InitiateContact, MessageType,
    OfferChannel, OpenChannel, RelidReleased, VmbusVersion, HV_NIC_GUID,
};
use zerocopy::{FromBytes, IntoBytes};

pub const PAGE: u64 = PAGE_SIZE as u64;

pub fn nic_class() -> [u8; 16] {
    HV_NIC_GUID.as_bytes().try_into().unwrap()
}

pub fn instance(n: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = n;
    b[15] = 0x5a;
    b
}

pub fn test_device(n: u8, max_sub: u16) -> DeviceSpec {
    DeviceSpec::new(
        nic_class(),
        instance(n),
        Box::new(SubchannelTestDevice::new(max_sub)),
    )
}

/// Message type number of a raw channel message.
pub fn msg_type(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().unwrap())
}

pub struct Guest {
    pub host: VmbusHost,
    pub mem: GuestMemory,
    pub conn_id: u32,
    pub next_gpadl: u32,
    pub notified: std::rc::Rc<std::cell::Cell<u32>>,
}

impl Guest {
    pub fn new(config: HostConfig) -> Self {
        Self::with_pages(config, 512)
    }

    pub fn with_pages(config: HostConfig, pages: usize) -> Self {
        let mem = GuestMemory::new(pages, config.seed);
        let mut host = VmbusHost::new(config, mem.clone());
        let notified = std::rc::Rc::new(std::cell::Cell::new(0));
        let n = notified.clone();
        host.set_notify(Box::new(move || n.set(n.get() + 1)));
        Guest {
            host,
            mem,
            conn_id: 1,
            next_gpadl: 0xE1E10,
            notified,
        }
    }

    pub fn post_on(&mut self, conn_id: u32, msg: &ChannelMessage<'_>) -> Result<(), u16> {
        let buf = msg.encode().unwrap();
        self.host.post_message(conn_id, 1, buf.as_bytes())
    }

    pub fn post(&mut self, msg: &ChannelMessage<'_>) {
        let id = self.conn_id;
        self.post_on(id, msg).unwrap();
    }

    /// Takes every queued VMBus message.
    pub fn take_all(&mut self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.host.take_message())
            .map(|(t, b)| {
                assert_eq!(t, 1);
                b
            })
            .collect()
    }

    pub fn take_one(&mut self) -> Vec<u8> {
        let (t, b) = self.host.take_message().expect("a host message");
        assert_eq!(t, 1);
        b
    }

    pub fn initiate(&mut self, version: VmbusVersion) -> Result<(), u16> {
        let ic = InitiateContact::new(version, 0, 2, 0, 0, 0x1000, 0x2000);
        self.post_on(
            version.initiate_contact_connection_id(),
            &ChannelMessage::InitiateContact(ic),
        )
    }

    /// Connects with `version`; returns whether the host accepted it.
    pub fn connect(&mut self, version: VmbusVersion) -> bool {
        self.initiate(version).unwrap();
        let b = self.take_one();
        let ChannelMessage::VersionResponse(v) = ChannelMessage::decode(&b).unwrap() else {
            panic!("expected VERSION_RESPONSE, got {b:?}")
        };
        if v.supported() {
            self.conn_id = if version.uses_msg_sint() {
                v.msg_conn_id.get()
            } else {
                1
            };
        }
        v.supported()
    }

    /// REQUESTOFFERS; returns the offers up to ALLOFFERS_DELIVERED.
    pub fn request_offers(&mut self) -> Vec<OfferChannel> {
        self.post(&ChannelMessage::RequestOffers);
        let mut offers = Vec::new();
        loop {
            let b = self.take_one();
            match ChannelMessage::decode(&b).unwrap() {
                ChannelMessage::OfferChannel(o) => offers.push(o),
                ChannelMessage::AllOffersDelivered => return offers,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Connects at 5.3 and requests offers.
    pub fn boot(&mut self) -> Vec<OfferChannel> {
        assert!(self.connect(VmbusVersion::WIN10_V5_3));
        self.request_offers()
    }

    /// Sends GPADL_HEADER and bodies for `pfns`; returns the handle (does not wait).
    pub fn send_gpadl(&mut self, relid: u32, pfns: &[u64]) -> u32 {
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        let msgs: Vec<_> = gpadl_messages(relid, id, 0, (pfns.len() * PAGE_SIZE) as u32, pfns)
            .unwrap()
            .collect();
        for m in msgs {
            let c = self.conn_id;
            self.host.post_message(c, 1, m.as_bytes()).unwrap();
        }
        id
    }

    /// Creates a GPADL and expects GPADL_CREATED with status 0.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> u32 {
        let id = self.send_gpadl(relid, pfns);
        let b = self.take_one();
        match ChannelMessage::decode(&b).unwrap() {
            ChannelMessage::GpadlCreated(c) => {
                assert_eq!(c.gpadl.get(), id);
                assert_eq!(c.child_relid.get(), relid);
                assert_eq!(c.creation_status.get(), 0);
            }
            other => panic!("expected GPADL_CREATED, got {other:?}"),
        }
        id
    }

    pub fn teardown(&mut self, relid: u32, gpadl: u32) {
        self.post(&ChannelMessage::GpadlTeardown(GpadlTeardown {
            child_relid: relid.into(),
            gpadl: gpadl.into(),
        }));
    }

    pub fn close(&mut self, relid: u32) {
        self.post(&ChannelMessage::CloseChannel(CloseChannel {
            child_relid: relid.into(),
        }));
    }

    pub fn release(&mut self, relid: u32) {
        self.post(&ChannelMessage::RelidReleased(RelidReleased {
            child_relid: relid.into(),
        }));
    }

    /// Allocates rings of `out_pages` (guest to host) and `in_pages` (host to guest),
    /// both including their control page, describes them with a GPADL and sends
    /// OPENCHANNEL (does not wait for the result).
    pub fn send_open(&mut self, relid: u32, out_pages: usize, in_pages: usize) -> GuestRing {
        let pfns = self.mem.alloc_pages(out_pages + in_pages).unwrap();
        let ring = GuestRing::new(self.mem.clone(), &pfns, out_pages);
        let gpadl = self.create_gpadl(relid, &pfns);
        self.post(&ChannelMessage::OpenChannel(OpenChannel::new(
            relid,
            relid,
            gpadl,
            0,
            out_pages as u32,
        )));
        GuestRing { gpadl, ..ring }
    }

    /// Opens a channel and expects success.
    pub fn open(&mut self, relid: u32, out_pages: usize, in_pages: usize) -> GuestRing {
        let ring = self.send_open(relid, out_pages, in_pages);
        let b = self.take_one();
        match ChannelMessage::decode(&b).unwrap() {
            ChannelMessage::OpenResult(r) => {
                assert_eq!(r.child_relid.get(), relid);
                assert_eq!(r.openid.get(), relid);
                assert_eq!(r.status.get(), 0, "open failed");
            }
            other => panic!("expected OPENCHANNEL_RESULT, got {other:?}"),
        }
        ring
    }

    pub fn events(&mut self) -> Vec<u32> {
        let mut v = Vec::new();
        self.host.drain_events(&mut |r| v.push(r));
        v
    }

    pub fn add_test_device(&mut self, n: u8, max_sub: u16) -> DeviceId {
        self.host.add_device(test_device(n, max_sub))
    }
}

pub fn decode(b: &[u8]) -> ChannelMessage<'_> {
    ChannelMessage::decode(b).unwrap()
}

pub fn is_type(b: &[u8], t: MessageType) -> bool {
    msg_type(b) == t.0
}

/// The guest side of a ring pair, written independently of hvemu's `HostRing`.
pub struct GuestRing {
    pub mem: GuestMemory,
    pub pfns: Vec<u64>,
    pub out_pages: usize,
    pub gpadl: u32,
    /// Guest-owned indices.
    out_write: u32,
    in_read: u32,
}

impl GuestRing {
    pub fn new(mem: GuestMemory, pfns: &[u64], out_pages: usize) -> Self {
        let r = GuestRing {
            mem,
            pfns: pfns.to_vec(),
            out_pages,
            gpadl: 0,
            out_write: 0,
            in_read: 0,
        };
        // Linux sets the pending-send-size feature on both rings before opening.
        r.store(true, RING_FEATURE_BITS_OFFSET, 1);
        r.store(false, RING_FEATURE_BITS_OFFSET, 1);
        r
    }

    fn pages(&self, out: bool) -> &[u64] {
        if out {
            &self.pfns[..self.out_pages]
        } else {
            &self.pfns[self.out_pages..]
        }
    }

    fn size(&self, out: bool) -> u32 {
        ((self.pages(out).len() - 1) * PAGE_SIZE) as u32
    }

    pub fn store(&self, out: bool, off: usize, v: u32) {
        let gpa = self.pages(out)[0] * PAGE + off as u64;
        self.mem.store_u32(gpa, v).unwrap();
    }

    pub fn load(&self, out: bool, off: usize) -> u32 {
        self.mem
            .load_u32(self.pages(out)[0] * PAGE + off as u64)
            .unwrap()
    }

    fn copy(&self, out: bool, offset: u32, buf: &mut [u8], write: Option<&[u8]>) {
        let size = self.size(out) as usize;
        let pages = self.pages(out)[1..].to_vec();
        let len = write.map_or(buf.len(), |w| w.len());
        let mut pos = offset as usize;
        for i in 0..len {
            let gpa = pages[pos / PAGE_SIZE] * PAGE + (pos % PAGE_SIZE) as u64;
            match write {
                Some(w) => self.mem.write(gpa, &w[i..i + 1]).unwrap(),
                None => self.mem.read(gpa, &mut buf[i..i + 1]).unwrap(),
            }
            pos = (pos + 1) % size;
        }
    }

    /// Writes a raw packet (descriptor onwards) plus trailer; returns Some(signal needed)
    /// or None if full.
    pub fn write_raw(&mut self, pkt: &[u8]) -> Option<bool> {
        let size = self.size(true);
        let r = self.load(true, RING_READ_INDEX_OFFSET);
        if r >= size || !r.is_multiple_of(8) {
            // The host's read index is garbage (scribbled): a careful guest stops writing.
            return None;
        }
        let w = self.out_write;
        let used = (w + size - r) % size;
        let total = pkt.len() as u32 + 8;
        if size - used <= total {
            return None;
        }
        self.copy(true, w, &mut [], Some(pkt));
        let mut trailer = [0u8; 8];
        trailer[4..].copy_from_slice(&w.to_le_bytes());
        self.copy(true, (w + pkt.len() as u32) % size, &mut [], Some(&trailer));
        self.out_write = (w + total) % size;
        self.store(true, RING_WRITE_INDEX_OFFSET, self.out_write);
        let masked = self.load(true, RING_INTERRUPT_MASK_OFFSET) != 0;
        Some(!masked && self.load(true, RING_READ_INDEX_OFFSET) == w)
    }

    pub fn write_inband(
        &mut self,
        trans_id: u64,
        completion: bool,
        payload: &[u8],
    ) -> Option<bool> {
        let mut buf = vec![0u8; payload.len() + 32];
        let n = encode_inband(&mut buf, trans_id, completion, payload).unwrap();
        self.write_raw(&buf[..n])
    }

    /// Reads the next host packet: (type, trans_id, payload with padding). Also reports
    /// whether the host should be signalled for freed space (pending-send-size).
    pub fn read(&mut self) -> Option<(u16, u64, Vec<u8>)> {
        self.read_signal().0
    }

    pub fn read_signal(&mut self) -> (Option<(u16, u64, Vec<u8>)>, bool) {
        let size = self.size(false);
        let w = self.load(false, RING_WRITE_INDEX_OFFSET);
        let r = self.in_read;
        if w == r {
            return (None, false);
        }
        let avail = (w + size - r) % size;
        let mut d = [0u8; PACKET_DESCRIPTOR_SIZE];
        self.copy(false, r, &mut d, None);
        let desc = VmPacketDescriptor::read_from_bytes(&d).unwrap();
        desc.check().unwrap();
        let mut pkt = vec![0u8; desc.packet_len()];
        self.copy(false, r, &mut pkt, None);
        let total = (desc.packet_len() + PACKET_TRAILER_SIZE) as u32;
        assert!(total <= avail);
        let free_before = size - avail;
        self.in_read = (r + total) % size;
        self.store(false, RING_READ_INDEX_OFFSET, self.in_read);
        let pending = self.load(false, RING_PENDING_SEND_SZ_OFFSET);
        let signal = pending != 0 && free_before <= pending && free_before + total > pending;
        let p = Packet::parse(&pkt).unwrap();
        (
            Some((desc.packet_type.get(), p.trans_id(), p.payload.to_vec())),
            signal,
        )
    }

    pub fn set_interrupt_mask(&self, masked: bool) {
        self.store(false, RING_INTERRUPT_MASK_OFFSET, u32::from(masked));
    }

    pub fn set_pending_send(&self, bytes: u32) {
        self.store(true, RING_PENDING_SEND_SZ_OFFSET, bytes);
    }

    pub fn out_write_index(&self) -> u32 {
        self.out_write
    }

    pub fn descriptor_len(payload: usize) -> usize {
        (PACKET_DESCRIPTOR_SIZE + payload).div_ceil(8) * 8
    }

    pub fn as_bytes_of<T: IntoBytes + zerocopy::Immutable>(v: &T) -> Vec<u8> {
        v.as_bytes().to_vec()
    }
}
