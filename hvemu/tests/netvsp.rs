//! netvsp end to end: a scripted guest (hand-built VMBus messages, NVSP and RNDIS from
//! `hvnet-wire`, its own ring reader) brings the emulated NIC up and exchanges frames,
//! then misbehaves; the host's state, counters and replies are checked at every step.

mod common;

use std::collections::BTreeMap;

use common::*;
use hvemu::netvsp::{Netvsp, NetvspConfig, NetvspFaults, NetvspHandle, RxVerdict};
use hvemu::switch::Switch;
use hvemu::{DeviceId, HostConfig, PAGE_SIZE};
use hvnet_wire::nvsp::{
    Init, NvspMessage, NvspMessageType, NvspStatus, RevokeBuffer, SendNdisConfig, SendNdisVersion,
    SendReceiveBuffer, SendRndisPacket, SendRndisPacketComplete, SendSendBuffer, Sender,
    SubchannelRequest, NDIS_CAP_IEEE8021Q, NETVSC_INVALID_INDEX, NVSP_GUEST_VERSIONS,
};
use hvnet_wire::ring::{
    encode_completion, encode_gpa_direct, encode_inband, Packet, PacketKind, VmPacketDescriptor,
    VmPacketType, PACKET_DESCRIPTOR_SIZE, PACKET_TRAILER_SIZE, RING_PENDING_SEND_SZ_OFFSET,
    RING_READ_INDEX_OFFSET, RING_WRITE_INDEX_OFFSET,
};
use hvnet_wire::rndis::{
    encode_packet, encode_rss_parameters, InitializeRequest, KeepaliveRequest, Ndis8021qInfo, Oid,
    Ppi, PpiType, QueryRequest, RndisMessage, SetRequest, NDIS_HASH_FUNC_TOEPLITZ, NDIS_HASH_IPV4,
    NDIS_HASH_TCP_IPV4, NETVSC_DEFAULT_HASH_KEY,
};
use hvnet_wire::vmbus::{ChannelMessage, GpaRange};
use hvnet_wire::U64;
use zerocopy::{FromBytes, IntoBytes};

const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x11, 0x22, 0x33];
const RECV_PAGES: usize = 64;
const SEND_PAGES: usize = 16;
const XFER: u16 = VmPacketType::DATA_USING_XFER_PAGES.0;
const COMP: u16 = VmPacketType::COMP.0;
const INBAND: u16 = VmPacketType::DATA_INBAND.0;

/// A packet the host wrote, as the guest reads it.
#[derive(Debug)]
struct HostPkt {
    ptype: u16,
    tid: u64,
    completion_requested: bool,
    pageset: u16,
    ranges: Vec<(u32, u32)>,
    payload: Vec<u8>,
}

impl HostPkt {
    fn nvsp_type(&self) -> u32 {
        u32::from_le_bytes(self.payload[..4].try_into().unwrap())
    }
}

/// One open channel of the guest.
struct Chan {
    relid: u32,
    conn: u32,
    ring: GuestRing,
    in_read: u32,
}

impl Chan {
    fn in_pages(&self) -> &[u64] {
        &self.ring.pfns[self.ring.out_pages..]
    }

    /// Reads one packet from the host-to-guest ring with the guest's own index; returns
    /// it and whether the host asked to be woken (pending-send-size crossed).
    fn read(&mut self) -> Option<(HostPkt, bool)> {
        let pages = self.in_pages().to_vec();
        let control = pages[0] * PAGE;
        let data = &pages[1..];
        let size = (data.len() * PAGE_SIZE) as u32;
        let mem = self.ring.mem.clone();
        let w = mem
            .load_u32(control + RING_WRITE_INDEX_OFFSET as u64)
            .unwrap();
        if w == self.in_read {
            return None;
        }
        let avail = (w + size - self.in_read) % size;
        let read_at = |off: u32, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                let pos = (off as usize + i) % size as usize;
                let gpa = data[pos / PAGE_SIZE] * PAGE + (pos % PAGE_SIZE) as u64;
                let mut one = [0u8];
                mem.read(gpa, &mut one).unwrap();
                *b = one[0];
            }
        };
        let mut d = [0u8; PACKET_DESCRIPTOR_SIZE];
        read_at(self.in_read, &mut d);
        let desc = VmPacketDescriptor::read_from_bytes(&d).unwrap();
        desc.check().unwrap();
        let mut bytes = vec![0u8; desc.packet_len()];
        read_at(self.in_read, &mut bytes);
        let total = (desc.packet_len() + PACKET_TRAILER_SIZE) as u32;
        assert!(total <= avail);
        let free_before = size - avail;
        self.in_read = (self.in_read + total) % size;
        mem.store_u32(control + RING_READ_INDEX_OFFSET as u64, self.in_read)
            .unwrap();
        let pending = mem
            .load_u32(control + RING_PENDING_SEND_SZ_OFFSET as u64)
            .unwrap();
        let wake = pending != 0 && free_before <= pending && free_before + total > pending;
        let p = Packet::parse(&bytes).unwrap();
        let (pageset, ranges) = match p.kind {
            PacketKind::TransferPages { header, ranges } => (
                header.xfer_pageset_id.get(),
                ranges
                    .iter()
                    .map(|r| (r.byte_count.get(), r.byte_offset.get()))
                    .collect(),
            ),
            _ => (0, Vec::new()),
        };
        Some((
            HostPkt {
                ptype: desc.packet_type.get(),
                tid: p.trans_id(),
                completion_requested: desc.completion_requested(),
                pageset,
                ranges,
                payload: p.payload.to_vec(),
            },
            wake,
        ))
    }
}

/// A guest buffer: pages and the GPADL describing them.
struct Buf {
    pfns: Vec<u64>,
    gpadl: u32,
}

fn buf_io(mem: &hvemu::GuestMemory, pfns: &[u64], off: usize, data: &mut [u8], write: bool) {
    for (i, b) in data.iter_mut().enumerate() {
        let pos = off + i;
        let gpa = pfns[pos / PAGE_SIZE] * PAGE + (pos % PAGE_SIZE) as u64;
        if write {
            mem.write(gpa, &[*b]).unwrap();
        } else {
            let mut one = [0u8];
            mem.read(gpa, &mut one).unwrap();
            *b = one[0];
        }
    }
}

/// One NIC as the guest drives it.
struct NicState {
    dev: DeviceId,
    h: NetvspHandle,
    instance: [u8; 16],
    primary_offer: Option<(u32, u32)>,
    chans: BTreeMap<u16, Chan>,
    recv: Option<Buf>,
    send: Option<Buf>,
    section_size: u32,
    send_section_size: u32,
    version: u32,
}

struct World {
    g: Guest,
    nics: Vec<NicState>,
    next_tid: u64,
    req_id: u32,
}

/// What the guest found in one receive indication.
#[derive(Debug)]
struct Indication {
    queue: u16,
    tid: u64,
    bytes: Vec<u8>,
    channel_type: u32,
}

impl Indication {
    fn frame(&self) -> (Vec<u8>, Option<u32>) {
        match RndisMessage::parse(&self.bytes).unwrap() {
            RndisMessage::Packet(p) => (p.data.to_vec(), p.hash_value()),
            other => panic!("expected a PACKET, got {other:?}"),
        }
    }

    /// The frame and its VLAN PPI.
    fn frame_vlan(&self) -> (Vec<u8>, Option<Ndis8021qInfo>) {
        match RndisMessage::parse(&self.bytes).unwrap() {
            RndisMessage::Packet(p) => (p.data.to_vec(), p.vlan()),
            other => panic!("expected a PACKET, got {other:?}"),
        }
    }
}

fn frame_to(dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&[0x88, 0xB5]);
    f.extend_from_slice(&[tag; 50]);
    f
}

fn tcp_frame(dst: [u8; 6], src_ip: [u8; 4], dst_ip: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&dst_ip);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0u8; 16]);
    f
}

impl World {
    /// A connected guest with one NIC per config (offers taken, nothing opened).
    fn new(configs: &[NetvspConfig]) -> Self {
        let mut g = Guest::with_pages(HostConfig::default(), 2048);
        let mut nics = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let nv = Netvsp::new(*c);
            let h = nv.handle();
            let inst = instance(i as u8 + 1);
            let dev = g.host.add_device(nv.into_device_spec(inst));
            nics.push(NicState {
                dev,
                h,
                instance: inst,
                primary_offer: None,
                chans: BTreeMap::new(),
                recv: None,
                send: None,
                section_size: 0,
                send_section_size: 0,
                version: 0,
            });
        }
        let offers = g.boot();
        for o in offers {
            let n = nics
                .iter_mut()
                .find(|n| o.offer.if_instance.as_bytes() == n.instance)
                .expect("offer for a known NIC");
            assert_eq!(o.sub_channel_index(), 0);
            n.primary_offer = Some((o.child_relid.get(), o.connection_id.get()));
        }
        World {
            g,
            nics,
            next_tid: 0x1000,
            req_id: 1,
        }
    }

    fn one(config: NetvspConfig) -> Self {
        Self::new(&[config])
    }

    fn h(&self, n: usize) -> NetvspHandle {
        self.nics[n].h.clone()
    }

    fn open_channel(&mut self, n: usize, q: u16, relid: u32, conn: u32) {
        let ring = self.g.open(relid, 5, 5);
        self.nics[n].chans.insert(
            q,
            Chan {
                relid,
                conn,
                ring,
                in_read: 0,
            },
        );
    }

    fn open_primary(&mut self, n: usize) {
        let (relid, conn) = self.nics[n].primary_offer.unwrap();
        self.open_channel(n, 0, relid, conn);
    }

    fn tid(&mut self) -> u64 {
        self.next_tid += 1;
        self.next_tid
    }

    /// Writes a raw packet on channel `q` and signals the host.
    fn write(&mut self, n: usize, q: u16, pkt: &[u8]) {
        let ch = self.nics[n].chans.get_mut(&q).unwrap();
        ch.ring.write_raw(pkt).expect("guest ring full");
        let conn = ch.conn;
        self.g.host.signal_event(conn).unwrap();
    }

    fn send_inband(&mut self, n: usize, q: u16, tid: u64, completion: bool, payload: &[u8]) {
        let mut buf = vec![0u8; payload.len() + 32];
        let len = encode_inband(&mut buf, tid, completion, payload).unwrap();
        self.write(n, q, &buf[..len]);
    }

    fn send_nvsp(&mut self, n: usize, q: u16, msg: &NvspMessage<'_>) -> u64 {
        let tid = self.tid();
        let b = msg.encode().unwrap();
        self.send_inband(n, q, tid, true, b.as_bytes());
        tid
    }

    /// Reads every packet the host has written on channel `q`, signalling the host when
    /// the pending-send-size rule asks for it.
    fn read_all(&mut self, n: usize, q: u16) -> Vec<HostPkt> {
        let mut v = Vec::new();
        loop {
            let ch = self.nics[n].chans.get_mut(&q).unwrap();
            let Some((p, wake)) = ch.read() else {
                return v;
            };
            if wake {
                let conn = ch.conn;
                self.g.host.signal_event(conn).unwrap();
            }
            v.push(p);
        }
    }

    fn poll(&mut self, n: usize) {
        let dev = self.nics[n].dev;
        self.g.host.poll_device(dev);
    }

    /// Sends an NVSP request on the primary and returns the completion's payload.
    fn request(&mut self, n: usize, msg: &NvspMessage<'_>) -> Vec<u8> {
        let tid = self.send_nvsp(n, 0, msg);
        let pkts = self.read_all(n, 0);
        let c = pkts
            .into_iter()
            .find(|p| p.ptype == COMP && p.tid == tid)
            .unwrap_or_else(|| panic!("no completion for {:?}", msg.message_type()));
        c.payload
    }

    fn init(&mut self, n: usize, version: u32) -> NvspStatus {
        let reply = self.request(
            n,
            &NvspMessage::Init(Init {
                min_protocol_ver: version.into(),
                max_protocol_ver: version.into(),
            }),
        );
        let NvspMessage::InitComplete(c) = NvspMessage::parse(&reply, Sender::Host).unwrap() else {
            panic!("not INIT_COMPLETE")
        };
        if c.status.get() == 1 {
            self.nics[n].version = version;
        }
        NvspStatus(c.status.get())
    }

    /// NDIS config/version and both buffers.
    fn buffers(&mut self, n: usize) {
        self.buffers_with_mtu(n, 1514);
    }

    /// NDIS config with frame MTU `frame_mtu`, NDIS version and both buffers.
    fn buffers_with_mtu(&mut self, n: usize, frame_mtu: u32) {
        let version = self.nics[n].version;
        if version >= 0x30002 {
            let m = NvspMessage::SendNdisConfig(SendNdisConfig {
                mtu: frame_mtu.into(),
                reserved: 0.into(),
                capability: NDIS_CAP_IEEE8021Q.into(),
            });
            self.send_nvsp(n, 0, &m);
        }
        let nv = NvspMessage::SendNdisVersion(SendNdisVersion {
            ndis_major_ver: 6.into(),
            ndis_minor_ver: 30.into(),
        });
        self.send_nvsp(n, 0, &nv);
        let relid = self.nics[n].chans[&0].relid;

        let pfns = self.g.mem.alloc_pages(RECV_PAGES).unwrap();
        let gpadl = self.g.create_gpadl(relid, &pfns);
        let reply = self.request(
            n,
            &NvspMessage::SendReceiveBuffer(SendReceiveBuffer {
                gpadl_handle: gpadl.into(),
                id: 0xCAFE.into(),
            }),
        );
        let NvspMessage::SendReceiveBufferComplete(c) =
            NvspMessage::parse(&reply, Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.fixed.status.get(), 1);
        assert_eq!(c.sections.len(), 1);
        let s = c.sections[0];
        assert_eq!(s.offset.get(), 0);
        assert_eq!(
            s.end_offset.get(),
            s.sub_alloc_size.get() * s.num_sub_allocs.get()
        );
        self.nics[n].section_size = s.sub_alloc_size.get();
        self.nics[n].recv = Some(Buf { pfns, gpadl });

        let pfns = self.g.mem.alloc_pages(SEND_PAGES).unwrap();
        let gpadl = self.g.create_gpadl(relid, &pfns);
        let reply = self.request(
            n,
            &NvspMessage::SendSendBuffer(SendSendBuffer {
                gpadl_handle: gpadl.into(),
                id: 0.into(),
            }),
        );
        let NvspMessage::SendSendBufferComplete(c) =
            NvspMessage::parse(&reply, Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.status.get(), 1);
        self.nics[n].send_section_size = c.section_size.get();
        self.nics[n].send = Some(Buf { pfns, gpadl });
    }

    /// Reads a receive indication's bytes out of the receive buffer.
    fn indication(&self, n: usize, q: u16, p: &HostPkt) -> Indication {
        assert_eq!(p.ptype, XFER);
        assert!(p.completion_requested);
        assert_eq!(p.pageset, 0xCAFE);
        assert_eq!(p.ranges.len(), 1);
        let (count, offset) = p.ranges[0];
        let nic = &self.nics[n];
        assert_eq!(offset % nic.section_size, 0, "ranges start at a section");
        assert!(count <= nic.section_size);
        let NvspMessage::SendRndisPacket(m) = NvspMessage::parse(&p.payload, Sender::Host).unwrap()
        else {
            panic!("xfer payload is not 107")
        };
        assert_eq!(m.send_buf_section_index.get(), NETVSC_INVALID_INDEX);
        let mut bytes = vec![0u8; count as usize];
        let recv = nic.recv.as_ref().unwrap();
        buf_io(&self.g.mem, &recv.pfns, offset as usize, &mut bytes, false);
        Indication {
            queue: q,
            tid: p.tid,
            bytes,
            channel_type: m.channel_type.get(),
        }
    }

    /// Completes a receive indication (108 success).
    fn complete_rx(&mut self, n: usize, q: u16, tid: u64) {
        let msg =
            NvspMessage::SendRndisPacketComplete(SendRndisPacketComplete { status: 1.into() });
        let mut b = [0u8; 16];
        let len = msg.encode_into(&mut b).unwrap();
        let mut buf = [0u8; 64];
        let plen = encode_completion(&mut buf, tid, &b[..len]).unwrap();
        self.write(n, q, &buf[..plen]);
    }

    /// Polls, reads every channel, returns the indications (and the other packets),
    /// completing indications when `complete` is set.
    fn receive(&mut self, n: usize, complete: bool) -> (Vec<Indication>, Vec<(u16, HostPkt)>) {
        self.poll(n);
        let mut ind = Vec::new();
        let mut other = Vec::new();
        let queues: Vec<u16> = self.nics[n].chans.keys().copied().collect();
        for q in queues {
            for p in self.read_all(n, q) {
                if p.ptype == XFER {
                    ind.push(self.indication(n, q, &p));
                } else {
                    other.push((q, p));
                }
            }
        }
        if complete {
            for i in &ind {
                self.complete_rx(n, i.queue, i.tid);
            }
        }
        (ind, other)
    }

    /// Sends an RNDIS control message in GPA ranges; returns the reply (if any) and the
    /// 108 status.
    fn rndis(&mut self, n: usize, msg: &[u8]) -> (Option<Vec<u8>>, u32) {
        let page = self.g.mem.alloc_pages(1).unwrap()[0];
        self.g.mem.write(page * PAGE, msg).unwrap();
        let pfns = [U64::new(page)];
        let range = GpaRange {
            byte_count: msg.len() as u32,
            byte_offset: 0,
            pfns: &pfns,
        };
        let nvsp = NvspMessage::SendRndisPacket(SendRndisPacket {
            channel_type: 1.into(),
            send_buf_section_index: NETVSC_INVALID_INDEX.into(),
            send_buf_section_size: 0.into(),
        })
        .encode()
        .unwrap();
        let tid = self.tid();
        let mut buf = [0u8; 256];
        let len = encode_gpa_direct(&mut buf, tid, true, &[range], nvsp.as_bytes()).unwrap();
        self.write(n, 0, &buf[..len]);
        let pkts = self.read_all(n, 0);
        let mut status = None;
        let mut reply = None;
        let mut to_complete = Vec::new();
        for p in &pkts {
            if p.ptype == COMP && p.tid == tid {
                let NvspMessage::SendRndisPacketComplete(c) =
                    NvspMessage::parse(&p.payload, Sender::Host).unwrap()
                else {
                    panic!()
                };
                status = Some(c.status.get());
            } else if p.ptype == XFER {
                let ind = self.indication(n, 0, p);
                assert_eq!(ind.channel_type, 1);
                to_complete.push(ind.tid);
                reply = Some(ind.bytes);
            }
        }
        for t in to_complete {
            self.complete_rx(n, 0, t);
        }
        self.g.mem.free_pages(&[page]);
        (reply, status.expect("a send completion"))
    }

    fn next_req(&mut self) -> u32 {
        self.req_id += 1;
        self.req_id
    }

    fn query(&mut self, n: usize, oid: Oid) -> (u32, Vec<u8>) {
        let req_id = self.next_req();
        let mut buf = [0u8; 64];
        let len = RndisMessage::QueryRequest {
            body: QueryRequest {
                req_id: req_id.into(),
                oid: oid.0.into(),
                info_buflen: 0.into(),
                info_buf_offset: 0.into(),
                dev_vc_handle: 0.into(),
            },
            info: &[],
        }
        .encode(&mut buf)
        .unwrap();
        let (reply, status) = self.rndis(n, &buf[..len]);
        assert_eq!(status, 1);
        match RndisMessage::parse(&reply.unwrap()).unwrap() {
            RndisMessage::QueryComplete { body, info } => {
                assert_eq!(body.req_id.get(), req_id);
                (body.status.get(), info.to_vec())
            }
            other => panic!("{other:?}"),
        }
    }

    fn set(&mut self, n: usize, oid: Oid, value: &[u8]) -> u32 {
        let req_id = self.next_req();
        let mut buf = vec![0u8; 64 + value.len()];
        let len = RndisMessage::SetRequest {
            body: SetRequest {
                req_id: req_id.into(),
                oid: oid.0.into(),
                info_buflen: 0.into(),
                info_buf_offset: 0.into(),
                dev_vc_handle: 0.into(),
            },
            info: value,
        }
        .encode(&mut buf)
        .unwrap();
        let (reply, status) = self.rndis(n, &buf[..len]);
        assert_eq!(status, 1);
        match RndisMessage::parse(&reply.unwrap()).unwrap() {
            RndisMessage::SetComplete(c) => {
                assert_eq!(c.req_id.get(), req_id);
                c.status.get()
            }
            other => panic!("{other:?}"),
        }
    }

    fn rndis_init(&mut self, n: usize) {
        let req_id = self.next_req();
        let mut buf = [0u8; 64];
        let len = RndisMessage::InitializeRequest(InitializeRequest {
            req_id: req_id.into(),
            major_ver: 1.into(),
            minor_ver: 0.into(),
            max_xfer_size: 0x4000.into(),
        })
        .encode(&mut buf)
        .unwrap();
        let (reply, status) = self.rndis(n, &buf[..len]);
        assert_eq!(status, 1);
        let RndisMessage::InitializeComplete(c) = RndisMessage::parse(&reply.unwrap()).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.req_id.get(), req_id);
        assert_eq!(c.status.get(), 0);
        assert_eq!(c.max_pkt_per_msg.get(), 8);
        assert_eq!(c.pkt_alignment_factor.get(), 3);
    }

    /// Open, INIT, buffers, RNDIS init, filter 0x0D.
    fn bring_up(&mut self, n: usize, version: u32) {
        self.open_primary(n);
        assert_eq!(self.init(n, version), NvspStatus::SUCCESS);
        self.buffers(n);
        self.rndis_init(n);
        assert_eq!(
            self.set(n, Oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes()),
            0
        );
    }

    /// Transmits RNDIS PACKETs for `frames`, batched into send section `section`, each
    /// padded to 8 bytes; returns the 108 status.
    fn transmit_section(&mut self, n: usize, section: u32, frames: &[Vec<u8>]) -> u32 {
        self.transmit_with_ppis(n, section, frames, &[])
    }

    /// Like `transmit_section`, with `ppis` on every frame.
    fn transmit_with_ppis(
        &mut self,
        n: usize,
        section: u32,
        frames: &[Vec<u8>],
        ppis: &[Ppi<'_>],
    ) -> u32 {
        let mut batch = Vec::new();
        for f in frames {
            let mut m = vec![0u8; 128 + f.len()];
            let len = encode_packet(&mut m, ppis, f).unwrap();
            m.truncate(len);
            let padded = len.div_ceil(8) * 8;
            m.resize(padded, 0);
            m[4..8].copy_from_slice(&(padded as u32).to_le_bytes());
            batch.extend_from_slice(&m);
        }
        self.transmit_raw_section(n, section, &batch)
    }

    /// Sends one raw RNDIS message from send section `section`; returns the 108 status.
    fn transmit_raw_section(&mut self, n: usize, section: u32, message: &[u8]) -> u32 {
        let nic = &self.nics[n];
        let off = section as usize * nic.send_section_size as usize;
        let send = nic.send.as_ref().unwrap();
        buf_io(&self.g.mem, &send.pfns, off, &mut message.to_vec(), true);
        let msg = NvspMessage::SendRndisPacket(SendRndisPacket {
            channel_type: 0.into(),
            send_buf_section_index: section.into(),
            send_buf_section_size: (message.len() as u32).into(),
        });
        let tid = self.send_nvsp(n, 0, &msg);
        let pkts = self.read_all(n, 0);
        let c = pkts
            .iter()
            .find(|p| p.ptype == COMP && p.tid == tid)
            .expect("send completion");
        let NvspMessage::SendRndisPacketComplete(c) =
            NvspMessage::parse(&c.payload, Sender::Host).unwrap()
        else {
            panic!()
        };
        c.status.get()
    }

    fn violations(&self) -> usize {
        self.g.host.violations().len()
    }
}

fn config() -> NetvspConfig {
    NetvspConfig {
        mac: MAC,
        ..NetvspConfig::default()
    }
}

#[test]
fn single_queue_bring_up_and_traffic() {
    let mut w = World::one(config());
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    let st = h.state();
    assert_eq!(st.nvsp_version, Some(0x60001));
    assert_eq!(st.ndis_version, Some((6, 30)));
    assert_eq!(st.ndis_config_mtu, Some(1514));
    let rb = st.recv_buffer.unwrap();
    assert_eq!(rb.id, 0xCAFE);
    assert_eq!(rb.gpadl, w.nics[0].recv.as_ref().unwrap().gpadl);
    assert_eq!(rb.size, (RECV_PAGES * PAGE_SIZE) as u64);
    assert_eq!(rb.section_size, 1806, "OpenVMM's 256 + 1514 + 36");
    assert_eq!(rb.section_count, (RECV_PAGES * PAGE_SIZE / 1806) as u32);
    let sb = st.send_buffer.unwrap();
    assert_eq!((sb.section_size, sb.section_count), (6144, 10));
    assert!(st.rndis_initialized);
    assert_eq!(st.packet_filter, 0x0D);
    assert_eq!(st.queues_open, [0]);

    // Queries.
    assert_eq!(
        w.query(0, Oid::OID_802_3_PERMANENT_ADDRESS),
        (0, MAC.to_vec())
    );
    assert_eq!(
        w.query(0, Oid::GEN_MAXIMUM_FRAME_SIZE),
        (0, 1500u32.to_le_bytes().to_vec())
    );
    assert_eq!(
        w.query(0, Oid::GEN_MEDIA_CONNECT_STATUS),
        (0, 0u32.to_le_bytes().to_vec())
    );
    assert_eq!(w.query(0, Oid(0x0DEA_D000)).0, 0xC000_00BB);

    // Receive: directed, broadcast; a frame for another MAC is filtered.
    let f1 = frame_to(MAC, 1);
    let f2 = frame_to([0xff; 6], 2);
    assert_eq!(h.send_to_guest(&f1), RxVerdict::Queued(0));
    assert_eq!(h.send_to_guest(&f2), RxVerdict::Queued(0));
    assert_eq!(
        h.send_to_guest(&frame_to([2, 0, 0, 0, 0, 1], 3)),
        RxVerdict::Filtered
    );
    assert_eq!(h.send_to_guest(&[0u8; 10]), RxVerdict::Runt);
    assert_eq!(h.send_to_guest(&vec![0u8; 1519]), RxVerdict::TooLong);
    let (ind, _) = w.receive(0, false);
    assert_eq!(ind.len(), 2);
    assert_eq!(ind[0].frame(), (f1, None), "no RSS yet: no hash PPI");
    assert_eq!(ind[1].frame(), (f2, None));
    assert_eq!(ind[0].channel_type, 0);
    assert_eq!(h.stats().outstanding_rx_sections, 2);
    for i in &ind {
        w.complete_rx(0, 0, i.tid);
    }
    let s = h.stats();
    assert_eq!(s.outstanding_rx_sections, 0);
    assert_eq!(s.queues[0].rx_frames, 2);
    assert_eq!(
        s.queues[0].rx_completions,
        s.queues[0].rx_frames + s.queues[0].control_replies,
        "every indication was completed"
    );
    assert_eq!(s.queues[0].control_replies, 6, "INIT, filter, 4 queries");
    assert_eq!(s.filtered_drops, 1);

    // Transmit: three frames batched in one send section.
    let frames = vec![frame_to([2, 0, 0, 0, 0, 7], 9), frame_to([0xff; 6], 8), {
        let mut f = frame_to([2, 0, 0, 0, 0, 7], 7);
        f.truncate(61); // odd length: the next message starts after padding
        f
    }];
    assert_eq!(w.transmit_section(0, 3, &frames), 1);
    let got: Vec<Vec<u8>> = std::iter::from_fn(|| h.take_from_guest()).collect();
    assert_eq!(got, frames);
    assert_eq!(h.stats().queues[0].tx_frames, 3);

    // Transmit in GPA ranges, the frame split over two ranges (RNDIS header + PPIs in
    // one page, the frame in another, itself crossing into a third page), as Linux's
    // page-buffer sends do.
    let mut frame = frame_to([0xff; 6], 0x44);
    frame.resize(200, 0x45);
    let mut msg = vec![0u8; 300];
    // With a checksum PPI, which the host must step over.
    let csum = [0u8; 4];
    let ppi = [Ppi::new(PpiType::TCPIP_CHKSUM_PKTINFO, &csum)];
    let len = encode_packet(&mut msg, &ppi, &frame).unwrap();
    msg.truncate(len);
    let hdr_len = len - frame.len();
    assert_eq!(hdr_len, 8 + 36 + 16);
    let pages = w.g.mem.alloc_pages(2).unwrap();
    w.g.mem
        .write(pages[0] * PAGE + 200, &msg[..hdr_len])
        .unwrap();
    // 96 bytes at the end of pages[1], the other 104 at the start of pages[0].
    w.g.mem.write(pages[1] * PAGE + 4000, &frame[..96]).unwrap();
    w.g.mem.write(pages[0] * PAGE, &frame[96..]).unwrap();
    let p0 = [U64::new(pages[0])];
    let p1 = [U64::new(pages[1]), U64::new(pages[0])];
    let ranges = [
        GpaRange {
            byte_count: hdr_len as u32,
            byte_offset: 200,
            pfns: &p0,
        },
        GpaRange {
            byte_count: frame.len() as u32,
            byte_offset: 4000,
            pfns: &p1,
        },
    ];
    let nvsp = NvspMessage::SendRndisPacket(SendRndisPacket {
        channel_type: 0.into(),
        send_buf_section_index: NETVSC_INVALID_INDEX.into(),
        send_buf_section_size: 0.into(),
    })
    .encode()
    .unwrap();
    let mut buf = [0u8; 256];
    let n = encode_gpa_direct(&mut buf, 0x77, true, &ranges, nvsp.as_bytes()).unwrap();
    w.write(0, 0, &buf[..n]);
    let pkts = w.read_all(0, 0);
    assert!(pkts.iter().any(|p| p.ptype == COMP && p.tid == 0x77));
    assert_eq!(h.take_from_guest(), Some(frame));

    // Host messages are 40 bytes at NVSP 6.1.
    assert_eq!(pkts[0].payload.len(), 40);

    // Revoking the buffers (Linux does before closing on old hosts) stops receives.
    w.send_nvsp(
        0,
        0,
        &NvspMessage::RevokeReceiveBuffer(RevokeBuffer { id: 0xCAFE.into() }),
    );
    w.send_nvsp(
        0,
        0,
        &NvspMessage::RevokeSendBuffer(RevokeBuffer { id: 0.into() }),
    );
    let st = h.state();
    assert!(st.recv_buffer.is_none() && st.send_buffer.is_none());
    assert_eq!(h.send_to_guest(&frame_to(MAC, 1)), RxVerdict::NotReady);
    assert_eq!(h.stats().malformed, 0, "{:?}", h.stats().errors);
    assert_eq!(w.violations(), 0, "{:?}", w.g.host.violations());
}

#[test]
fn version_negotiation_falls_back() {
    for (host_max, expect) in [
        (2u32, 2u32),
        (0x40000, 0x40000),
        (0x50000, 0x50000),
        (0x60001, 0x60001),
    ] {
        let mut w = World::one(NetvspConfig {
            max_nvsp_version: host_max,
            ..config()
        });
        w.open_primary(0);
        let mut got = None;
        for v in NVSP_GUEST_VERSIONS {
            let s = w.init(0, v.0);
            if v.0 > host_max {
                assert_eq!(s, NvspStatus::PROTOCOL_TOO_NEW, "{v:?} on {host_max:#x}");
                assert_eq!(w.h(0).state().nvsp_version, None);
            } else {
                assert_eq!(s, NvspStatus::SUCCESS);
                got = Some(v.0);
                break;
            }
        }
        assert_eq!(got, Some(expect));
        assert_eq!(w.h(0).state().nvsp_version, Some(expect));
        // NVSP 1 has no NDIS config: it is refused (and counted) there.
        w.buffers(0);
        let st = w.h(0).state();
        assert_eq!(st.ndis_config_mtu.is_some(), expect >= 0x30002);
        assert!(st.recv_buffer.is_some() && st.send_buffer.is_some());
        // Message size: 28 below 6.1, 40 at 6.1.
        let tid = w.send_nvsp(
            0,
            0,
            &NvspMessage::SendSendBuffer(SendSendBuffer {
                gpadl_handle: 1.into(),
                id: 0.into(),
            }),
        );
        let p = w.read_all(0, 0).into_iter().find(|p| p.tid == tid).unwrap();
        assert_eq!(
            p.payload.len(),
            if expect >= 0x60001 { 40 } else { 32 },
            "28 padded to 8"
        );
        assert_eq!(w.h(0).stats().malformed, 1, "second send buffer refused");
    }
}

/// Brings a NIC up with `subs` sub-channels requested; returns the grant and opens what
/// was offered.
fn request_subchannels(w: &mut World, n: usize, subs: u32) -> (u32, u32, Vec<u16>) {
    let reply = w.request(
        n,
        &NvspMessage::SubchannelRequest(SubchannelRequest {
            op: 1.into(),
            num_subchannels: subs.into(),
        }),
    );
    let NvspMessage::SubchannelComplete(c) = NvspMessage::parse(&reply, Sender::Host).unwrap()
    else {
        panic!()
    };
    let mut offered = Vec::new();
    for m in w.g.take_all() {
        if let ChannelMessage::OfferChannel(o) = ChannelMessage::decode(&m).unwrap() {
            assert_eq!(o.offer.if_instance.as_bytes(), w.nics[n].instance);
            let idx = o.sub_channel_index();
            offered.push(idx);
            w.open_channel(n, idx, o.child_relid.get(), o.connection_id.get());
        }
    }
    (c.status.get(), c.num_subchannels.get(), offered)
}

#[test]
fn multi_queue_rss_spreads_flows() {
    let mut w = World::one(NetvspConfig {
        max_queues: 4,
        ..config()
    });
    w.bring_up(0, 0x50000);
    // RSS capabilities.
    let (s, caps) = w.query(0, Oid::GEN_RECEIVE_SCALE_CAPABILITIES);
    assert_eq!(s, 0);
    assert_eq!(caps.len(), 18);
    assert_eq!(u32::from_le_bytes(caps[12..16].try_into().unwrap()), 4);

    let (status, granted, offered) = request_subchannels(&mut w, 0, 7);
    assert_eq!((status, granted), (1, 3), "min(7, max_queues - 1)");
    assert_eq!(offered, [1, 2, 3]);
    let h = w.h(0);
    assert_eq!(h.state().queues_open, [0, 1, 2, 3]);
    assert_eq!(h.state().subchannels_granted, 3);
    assert_eq!(h.state().subchannels_requested, 7);
    assert!(h.state().indirection_table_sent);

    // The send table arrives on the primary at its next poll: 76 bytes, offset 12.
    let (_, other) = w.receive(0, true);
    let table: Vec<_> = other
        .iter()
        .filter(|(q, p)| *q == 0 && p.ptype == INBAND)
        .collect();
    assert_eq!(table.len(), 1);
    let p = &table[0].1;
    assert_eq!(p.tid, 0);
    assert!(!p.completion_requested);
    assert_eq!(p.nvsp_type(), NvspMessageType::SEND_INDIRECTION_TABLE.0);
    let NvspMessage::SendIndirectionTable(t) =
        NvspMessage::parse(&p.payload, Sender::Host).unwrap()
    else {
        panic!()
    };
    assert_eq!(t.fixed().offset.get(), 12);
    // Linux's reading for NVSP <= 6.0 agrees with the offset (the message is short).
    let entries: Vec<u32> = t
        .table(hvnet_wire::nvsp::NvspVersion(0x50000))
        .unwrap()
        .iter()
        .map(|e| e.get())
        .collect();
    assert_eq!(entries, (0..16).map(|i| i % 4).collect::<Vec<_>>());

    // RSS parameters: disable then enable, as Linux does.
    let itab: Vec<u32> = (0..128).map(|i| (i * 7 % 4) as u32).collect();
    let hash = NDIS_HASH_FUNC_TOEPLITZ | NDIS_HASH_IPV4 | NDIS_HASH_TCP_IPV4;
    for flag in [0x10u16, 0] {
        let mut b = vec![0u8; 40 + 512 + 40];
        let n = encode_rss_parameters(&mut b, flag, hash, &itab, &NETVSC_DEFAULT_HASH_KEY).unwrap();
        assert_eq!(w.set(0, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &b[..n]), 0);
    }
    let rss = h.state().rss.unwrap();
    assert!(rss.enabled);
    assert_eq!(rss.table, itab);

    // Frames land on table[toeplitz % 128] with the hash in a PPI.
    let mut per_queue = [0usize; 4];
    let mut expect = Vec::new();
    for i in 0..64u16 {
        let f = tcp_frame(MAC, [10, 0, 0, 1], [10, 0, 0, 2], 1000 + i * 17, 80);
        let hv = hvemu::rss::rss_hash(&NETVSC_DEFAULT_HASH_KEY, &f).unwrap();
        let q = itab[hv as usize % 128] as u16;
        assert_eq!(h.send_to_guest(&f), RxVerdict::Queued(q));
        per_queue[q as usize] += 1;
        expect.push((q, f, hv));
    }
    // A non-IP frame goes to queue 0 without a hash.
    assert_eq!(h.send_to_guest(&frame_to(MAC, 5)), RxVerdict::Queued(0));
    assert!(per_queue.iter().all(|&c| c > 0), "{per_queue:?}");
    let (ind, _) = w.receive(0, true);
    assert_eq!(ind.len(), 65);
    for (q, f, hv) in expect {
        let got = ind
            .iter()
            .find(|i| i.frame().0 == f)
            .expect("frame delivered");
        assert_eq!(got.queue, q);
        assert_eq!(got.frame().1, Some(hv));
    }
    let s = h.stats();
    for (q, &c) in per_queue.iter().enumerate() {
        assert_eq!(s.queues[q].rx_frames as usize, c + usize::from(q == 0));
    }
    assert_eq!(s.outstanding_rx_sections, 0);

    // Closing a sub-channel sends its queued frames to the primary.
    let victim = expect_queue_frame(&h, &itab, 3);
    assert_eq!(h.send_to_guest(&victim), RxVerdict::Queued(3));
    let relid = w.nics[0].chans[&3].relid;
    w.g.close(relid);
    w.nics[0].chans.remove(&3);
    assert_eq!(h.state().queues_open, [0, 1, 2]);
    let (ind, _) = w.receive(0, true);
    assert_eq!(ind.len(), 1);
    assert_eq!((ind[0].queue, ind[0].frame().0), (0, victim));
    // While queue 3 is closed, its flows go to queue 0.
    let f = expect_queue_frame(&h, &itab, 3);
    assert_eq!(h.send_to_guest(&f), RxVerdict::Queued(0));
    assert_eq!(h.stats().malformed, 0, "{:?}", h.stats().errors);
    assert_eq!(w.violations(), 0);
}

/// A TCP frame whose flow maps to queue `q` under `itab` and the default key.
fn expect_queue_frame(_h: &NetvspHandle, itab: &[u32], q: u32) -> Vec<u8> {
    (0..10_000u16)
        .map(|p| tcp_frame(MAC, [10, 0, 0, 9], [10, 0, 0, 2], p, 443))
        .find(|f| {
            let hv = hvemu::rss::rss_hash(&NETVSC_DEFAULT_HASH_KEY, f).unwrap();
            itab[hv as usize % itab.len()] == q
        })
        .unwrap()
}

#[test]
fn subchannel_faults() {
    // Refused.
    let mut w = World::one(NetvspConfig {
        faults: NetvspFaults {
            refuse_subchannels: true,
            ..NetvspFaults::default()
        },
        ..config()
    });
    w.bring_up(0, 0x60001);
    let (status, granted, offered) = request_subchannels(&mut w, 0, 3);
    assert_eq!((status, granted), (2, 0));
    assert!(offered.is_empty());

    // Fewer than asked.
    let mut w = World::one(NetvspConfig {
        faults: NetvspFaults {
            max_subchannels: Some(1),
            ..NetvspFaults::default()
        },
        ..config()
    });
    w.bring_up(0, 0x60001);
    let (status, granted, offered) = request_subchannels(&mut w, 0, 3);
    assert_eq!((status, granted, offered), (1, 1, vec![1]));

    // More than asked, and no send table.
    let mut w = World::one(NetvspConfig {
        faults: NetvspFaults {
            extra_subchannels: 2,
            no_indirection_table: true,
            ..NetvspFaults::default()
        },
        ..config()
    });
    w.bring_up(0, 0x60001);
    let (status, granted, offered) = request_subchannels(&mut w, 0, 1);
    assert_eq!((status, granted, offered), (1, 3, vec![1, 2, 3]));
    let (_, other) = w.receive(0, true);
    assert!(
        other.iter().all(|(_, p)| p.ptype != INBAND),
        "no send table"
    );
    assert!(!w.h(0).state().indirection_table_sent);

    // Below NVSP 5 the request is a protocol error.
    let mut w = World::one(config());
    w.bring_up(0, 0x40000);
    let (status, granted, _) = request_subchannels(&mut w, 0, 1);
    assert_eq!((status, granted), (2, 0));
    assert_eq!(w.h(0).stats().malformed, 1);
}

#[test]
fn hostile_guest_is_counted_not_fatal() {
    let mut w = World::one(config());
    w.open_primary(0);
    let h = w.h(0);
    let mal = |h: &NetvspHandle| h.stats().malformed;

    // Anything but INIT before INIT.
    w.send_nvsp(
        0,
        0,
        &NvspMessage::SendNdisVersion(SendNdisVersion {
            ndis_major_ver: 6.into(),
            ndis_minor_ver: 30.into(),
        }),
    );
    assert_eq!(mal(&h), 1);
    // Garbage: unknown type, truncated body, empty.
    let tid = w.tid();
    w.send_inband(0, 0, tid, true, &[0xEE, 0xEE, 0, 0]);
    w.send_inband(0, 0, tid, true, &[1, 0, 0, 0, 2]);
    w.send_inband(0, 0, tid, false, &[]);
    assert_eq!(mal(&h), 4);
    assert_eq!(w.init(0, 0x60001), NvspStatus::SUCCESS);

    // Receive buffer: unknown GPADL, wrong id, then a good one.
    let bad_gpadl = w.request(
        0,
        &NvspMessage::SendReceiveBuffer(SendReceiveBuffer {
            gpadl_handle: 0x4242.into(),
            id: 0xCAFE.into(),
        }),
    );
    assert_eq!(u32::from_le_bytes(bad_gpadl[4..8].try_into().unwrap()), 2);
    let relid = w.nics[0].chans[&0].relid;
    let pfns = w.g.mem.alloc_pages(2).unwrap();
    let gpadl = w.g.create_gpadl(relid, &pfns);
    let wrong_id = w.request(
        0,
        &NvspMessage::SendReceiveBuffer(SendReceiveBuffer {
            gpadl_handle: gpadl.into(),
            id: 0xBEEF.into(),
        }),
    );
    assert_eq!(u32::from_le_bytes(wrong_id[4..8].try_into().unwrap()), 2);
    assert_eq!(mal(&h), 6);
    w.g.teardown(relid, gpadl);
    w.g.take_all();
    w.buffers(0);
    w.rndis_init(0);

    // Sends naming bad sections: out of range, oversized, zero-sized; GPA-direct with a
    // section index. Every one is completed with a failure status.
    for (index, size) in [(10u32, 64u32), (0, 6145), (0, 0)] {
        let tid = w.send_nvsp(
            0,
            0,
            &NvspMessage::SendRndisPacket(SendRndisPacket {
                channel_type: 0.into(),
                send_buf_section_index: index.into(),
                send_buf_section_size: size.into(),
            }),
        );
        let p = w.read_all(0, 0).into_iter().find(|p| p.tid == tid).unwrap();
        assert_eq!(u32::from_le_bytes(p.payload[4..8].try_into().unwrap()), 2);
    }
    assert_eq!(mal(&h), 9);

    // RNDIS garbage in a valid section: msg_len past the data, a data offset past the
    // message, an unknown type. Completed with INVALID_RNDIS_PKT (5).
    let send_pfns = w.nics[0].send.as_ref().unwrap().pfns.clone();
    let bad_msgs: [Vec<u8>; 3] = [
        {
            let mut m = vec![0u8; 48];
            m[0] = 1;
            m[4..8].copy_from_slice(&4000u32.to_le_bytes());
            m
        },
        {
            let mut m = vec![0u8; 48];
            m[0] = 1;
            m[4..8].copy_from_slice(&48u32.to_le_bytes());
            m[8..12].copy_from_slice(&36u32.to_le_bytes()); // data offset
            m[12..16].copy_from_slice(&100u32.to_le_bytes()); // data len
            m
        },
        {
            let mut m = vec![0u8; 16];
            m[0] = 0x55;
            m[4..8].copy_from_slice(&16u32.to_le_bytes());
            m
        },
    ];
    for m in bad_msgs {
        let mut b = m.clone();
        buf_io(&w.g.mem, &send_pfns, 0, &mut b, true);
        let tid = w.send_nvsp(
            0,
            0,
            &NvspMessage::SendRndisPacket(SendRndisPacket {
                channel_type: 0.into(),
                send_buf_section_index: 0.into(),
                send_buf_section_size: (m.len() as u32).into(),
            }),
        );
        let p = w.read_all(0, 0).into_iter().find(|p| p.tid == tid).unwrap();
        assert_eq!(u32::from_le_bytes(p.payload[4..8].try_into().unwrap()), 5);
    }
    assert_eq!(mal(&h), 12);

    // GPA ranges pointing at a hole in guest memory.
    let hole = [U64::new(send_pfns[0] + 1)];
    let range = GpaRange {
        byte_count: 64,
        byte_offset: 0,
        pfns: &hole,
    };
    let nvsp = NvspMessage::SendRndisPacket(SendRndisPacket {
        channel_type: 1.into(),
        send_buf_section_index: NETVSC_INVALID_INDEX.into(),
        send_buf_section_size: 0.into(),
    })
    .encode()
    .unwrap();
    let mut buf = [0u8; 128];
    let n = encode_gpa_direct(&mut buf, 0x99, true, &[range], nvsp.as_bytes()).unwrap();
    w.write(0, 0, &buf[..n]);
    let p = w
        .read_all(0, 0)
        .into_iter()
        .find(|p| p.tid == 0x99)
        .unwrap();
    assert_eq!(u32::from_le_bytes(p.payload[4..8].try_into().unwrap()), 2);
    assert_eq!(mal(&h), 13);

    // Completions of nothing, and of a non-108 message.
    w.complete_rx(0, 0, 0xABCDEF);
    let mut b = [0u8; 64];
    let len = encode_completion(&mut b, 5, &[2, 0, 0, 0, 1, 0, 0, 0]).unwrap();
    w.write(0, 0, &b[..len]);
    assert_eq!(mal(&h), 15);

    // Revoking a buffer that is not ours; INIT after buffers (refused).
    w.send_nvsp(
        0,
        0,
        &NvspMessage::RevokeReceiveBuffer(RevokeBuffer { id: 0x1234.into() }),
    );
    assert_eq!(w.init(0, 0x60001), NvspStatus::FAIL);
    assert_eq!(mal(&h), 17);
    assert_eq!(h.stats().errors.len(), 17);

    // The device still works.
    w.set(0, Oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes());
    assert_eq!(h.send_to_guest(&frame_to(MAC, 1)), RxVerdict::Queued(0));
    let (ind, _) = w.receive(0, true);
    assert_eq!(ind.len(), 1);
    let ka = {
        let mut b = [0u8; 16];
        let n = RndisMessage::KeepaliveRequest(KeepaliveRequest { req_id: 5.into() })
            .encode(&mut b)
            .unwrap();
        b[..n].to_vec()
    };
    let (reply, status) = w.rndis(0, &ka);
    assert_eq!(status, 1);
    assert!(matches!(
        RndisMessage::parse(&reply.unwrap()).unwrap(),
        RndisMessage::KeepaliveComplete(_)
    ));
    assert_eq!(mal(&h), 17);
    // Nine packets in one section: over the advertised 8, counted, still sent.
    let frames: Vec<Vec<u8>> = (0..9).map(|i| frame_to([0xff; 6], i)).collect();
    assert_eq!(w.transmit_section(0, 2, &frames), 1);
    assert_eq!(std::iter::from_fn(|| h.take_from_guest()).count(), 9);
    assert_eq!(mal(&h), 18);
    // None of this was a VMBus-level violation.
    assert_eq!(w.violations(), 0, "{:?}", w.g.host.violations());
}

#[test]
fn sections_backlog_and_ring_back_pressure() {
    // A small receive buffer: 8 sections of 2048 bytes, 2 reserved for control.
    let mut w = World::one(NetvspConfig {
        recv_section_size: Some(RECV_PAGES as u32 * 4096 / 8),
        rx_backlog_limit: 20,
        ..config()
    });
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    assert_eq!(h.state().recv_buffer.unwrap().section_count, 8);
    let mut sent = Vec::new();
    for i in 0..25u8 {
        let f = frame_to(MAC, i);
        let v = h.send_to_guest(&f);
        if i < 20 {
            assert_eq!(v, RxVerdict::Queued(0));
            sent.push(f);
        } else {
            assert_eq!(v, RxVerdict::BacklogFull);
        }
    }
    assert_eq!(h.stats().backlog_drops, 5);
    // Only the 6 data sections fill; the rest waits.
    let (ind, _) = w.receive(0, false);
    assert_eq!(ind.len(), 6);
    let s = h.stats();
    assert_eq!(s.outstanding_rx_sections, 6);
    assert_eq!(s.frames_queued, 14);
    assert!(s.queues[0].no_section > 0);
    // Control replies still get through (reserved sections).
    assert_eq!(w.query(0, Oid::GEN_LINK_SPEED).0, 0);
    // Returning sections lets the rest through, in order.
    let mut got: Vec<Vec<u8>> = ind.iter().map(|i| i.frame().0).collect();
    for i in &ind {
        w.complete_rx(0, 0, i.tid);
    }
    for _ in 0..5 {
        let (ind, _) = w.receive(0, true);
        got.extend(ind.iter().map(|i| i.frame().0));
    }
    assert_eq!(got, sent);
    assert_eq!(h.stats().outstanding_rx_sections, 0);

    // Ring back-pressure: a guest that never reads its ring (4 data pages) stalls the
    // host, which resumes once the guest reads (pending-send-size wakes it).
    // Small sections (256 bytes), so the ring (16 KiB) fills before the sections do.
    let mut w2 = World::one(NetvspConfig {
        rx_backlog_limit: 1000,
        recv_section_size: Some(256),
        ..config()
    });
    w2.bring_up(0, 0x60001);
    let h2 = w2.h(0);
    for i in 0..400u16 {
        assert_eq!(
            h2.send_to_guest(&frame_to(MAC, i as u8)),
            RxVerdict::Queued(0)
        );
    }
    w2.poll(0);
    let s = h2.stats();
    assert!(s.queues[0].ring_full > 0);
    assert!(
        s.frames_queued > 0 && s.frames_queued < 400,
        "{}",
        s.frames_queued
    );
    let mut total = 0;
    for _ in 0..100 {
        let (ind, _) = w2.receive(0, true);
        total += ind.len();
        if total == 400 {
            break;
        }
    }
    assert_eq!(total, 400);
    assert_eq!(w2.violations(), 0);
}

#[test]
fn completion_faults_and_rescind() {
    let mut w = World::one(NetvspConfig {
        faults: NetvspFaults {
            hold_tx_completions: true,
            ..NetvspFaults::default()
        },
        ..config()
    });
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    // Control sends are still completed (bring-up worked); data sends are held.
    let frame = frame_to([0xff; 6], 1);
    let mut m = vec![0u8; 128];
    let len = encode_packet(&mut m, &[], &frame).unwrap();
    let send_pfns = w.nics[0].send.as_ref().unwrap().pfns.clone();
    buf_io(&w.g.mem, &send_pfns, 0, &mut m[..len], true);
    let msg = NvspMessage::SendRndisPacket(SendRndisPacket {
        channel_type: 0.into(),
        send_buf_section_index: 0.into(),
        send_buf_section_size: (len as u32).into(),
    });
    let tid = w.send_nvsp(0, 0, &msg);
    assert!(w.read_all(0, 0).is_empty(), "held");
    assert_eq!(h.stats().completions_held, 1);
    assert_eq!(
        h.take_from_guest(),
        Some(frame.clone()),
        "the frame went out anyway"
    );
    assert_eq!(h.release_held_completions(), 1);
    let (_, other) = w.receive(0, true);
    assert!(other.iter().any(|(_, p)| p.ptype == COMP && p.tid == tid));

    // Dropped completions.
    h.set_faults(NetvspFaults {
        drop_tx_completions: true,
        ..NetvspFaults::default()
    });
    w.send_nvsp(0, 0, &msg);
    assert!(w.read_all(0, 0).is_empty());
    assert_eq!(h.stats().completions_dropped, 1);

    // Rescind after 3 frames.
    h.set_faults(NetvspFaults {
        rescind_after_rx_frames: Some(h.stats().rx_frames_total + 3),
        ..NetvspFaults::default()
    });
    for i in 0..5 {
        h.send_to_guest(&frame_to(MAC, i));
    }
    let (ind, _) = w.receive(0, false);
    assert_eq!(ind.len(), 3);
    assert!(h.state().rescinded);
    let msgs = w.g.take_all();
    assert!(msgs
        .iter()
        .any(|m| matches!(decode(m), ChannelMessage::RescindChannelOffer(_))));
    assert_eq!(h.stats().rescinds_triggered, 1);
    // The host closed the ring: the NIC state is reset and later frames are refused.
    assert_eq!(h.send_to_guest(&frame_to(MAC, 9)), RxVerdict::NotReady);
}

#[test]
fn link_changes_are_indicated() {
    let mut w = World::one(config());
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    h.set_link(false);
    let (ind, _) = w.receive(0, true);
    assert_eq!(ind.len(), 1);
    assert_eq!(ind[0].channel_type, 1);
    match RndisMessage::parse(&ind[0].bytes).unwrap() {
        RndisMessage::IndicateStatus { body, .. } => assert_eq!(body.status.get(), 0x4001_000C),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.send_to_guest(&frame_to(MAC, 1)), RxVerdict::LinkDown);
    assert_eq!(
        w.query(0, Oid::GEN_MEDIA_CONNECT_STATUS).1,
        1u32.to_le_bytes()
    );
    h.set_link(false);
    let (ind, _) = w.receive(0, true);
    assert!(ind.is_empty(), "no indication without a change");
    h.set_link(true);
    let (ind, _) = w.receive(0, true);
    match RndisMessage::parse(&ind[0].bytes).unwrap() {
        RndisMessage::IndicateStatus { body, .. } => assert_eq!(body.status.get(), 0x4001_000B),
        other => panic!("{other:?}"),
    }
    assert!(h.state().link_up);
    assert_eq!(h.send_to_guest(&frame_to(MAC, 1)), RxVerdict::Queued(0));
}

#[test]
fn injected_malformed_host_messages() {
    let mut w = World::one(config());
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    let size = (RECV_PAGES * PAGE_SIZE) as u32;
    h.inject_bad_xfer(0, size - 10, 100);
    h.inject_raw_nvsp(0, &[0xAB; 12]);
    let rndis = [0x07u8, 0, 0, 0, 0xFF, 0xFF, 0, 0];
    h.inject_raw_rndis(0, &rndis);
    w.poll(0);
    let pkts = w.read_all(0, 0);
    assert_eq!(pkts.len(), 3);
    assert_eq!(pkts[0].ptype, XFER);
    assert_eq!(pkts[0].ranges, [(100, size - 10)]);
    assert_eq!((pkts[1].ptype, pkts[1].tid), (INBAND, 0));
    assert_eq!(&pkts[1].payload[..12], &[0xAB; 12]);
    let ind = w.indication(0, 0, &pkts[2]);
    assert_eq!(ind.bytes, rndis);
    // A careful guest completes both; neither counts as malformed.
    w.complete_rx(0, 0, pkts[0].tid);
    w.complete_rx(0, 0, pkts[2].tid);
    let s = h.stats();
    assert_eq!(s.malformed, 0, "{:?}", s.errors);
    assert_eq!(s.outstanding_rx_packets, 0);
}

#[test]
fn two_nics_talk_through_the_switch() {
    let mac_b = [0x00, 0x15, 0x5d, 0x44, 0x55, 0x66];
    let mut w = World::new(&[
        config(),
        NetvspConfig {
            mac: mac_b,
            ..config()
        },
    ]);
    w.bring_up(0, 0x60001);
    w.bring_up(1, 0x50000);
    let (a, b) = (w.h(0), w.h(1));
    let mut sw = Switch::new();
    let (pa, pb) = (sw.add_port(), sw.add_port());

    // A sends to B's MAC (unknown to the switch: flooded, so B gets it).
    w.transmit_section(0, 0, &[frame_to(mac_b, 1)]);
    assert_eq!(sw.pump_nic(pa, &a), (1, 0));
    assert_eq!(sw.pump_nic(pb, &b), (0, 1));
    let (ind, _) = w.receive(1, true);
    assert_eq!(ind.len(), 1);
    let (f, _) = ind[0].frame();
    assert_eq!(&f[..6], &mac_b);
    // The switch learned A's source MAC: B's reply is unicast to A's port.
    let mut reply = frame_to([0x02, 0, 0, 0, 0, 0x99], 2);
    reply[6..12].copy_from_slice(&mac_b);
    w.transmit_section(1, 0, &[reply.clone()]);
    sw.pump_nic(pb, &b);
    assert_eq!(sw.stats().unicast, 1);
    // A's filter drops it: it is addressed to 02:..:99, not to A.
    sw.pump_nic(pa, &a);
    assert_eq!(a.stats().filtered_drops, 1);
    assert_eq!(w.violations(), 0);
}

/// An Ethernet frame of `len` bytes to `dst` (ethertype 0x88B5).
fn sized_frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = frame_to(dst, 7);
    f.resize(len, 7);
    f
}

/// `frame` with an 802.1Q tag carrying `tci` after the MACs.
fn tagged(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// The MTU from SEND_NDIS_CONFIG is the one enforced (frames one byte over are dropped
/// both ways) and reported in the state; OID_GEN_MAXIMUM_FRAME_SIZE keeps reporting the
/// port's maximum; a new session (primary closed and opened) takes a new value.
#[test]
fn ndis_config_mtu_is_enforced_and_renegotiated() {
    let mut w = World::one(NetvspConfig {
        mtu: 9000,
        ..config()
    });
    let h = w.h(0);
    for (round, mtu) in [4000u32, 1000].into_iter().enumerate() {
        if round > 0 {
            // A new session: close the primary, give the buffers back, open again.
            let relid = w.nics[0].chans[&0].relid;
            w.g.close(relid);
            for b in [w.nics[0].recv.take(), w.nics[0].send.take()]
                .into_iter()
                .flatten()
            {
                w.g.teardown(relid, b.gpadl);
                w.g.mem.free_pages(&b.pfns);
            }
            w.g.take_all();
            w.nics[0].chans.clear();
        }
        w.open_primary(0);
        assert_eq!(w.init(0, 0x60001), NvspStatus::SUCCESS);
        w.buffers_with_mtu(0, mtu + 14);
        w.rndis_init(0);
        assert_eq!(
            w.set(0, Oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes()),
            0
        );
        let st = h.state();
        assert_eq!((st.mtu, st.ndis_config_mtu), (mtu, Some(mtu + 14)));
        let (status, info) = w.query(0, Oid::GEN_MAXIMUM_FRAME_SIZE);
        assert_eq!((status, info), (0, 9000u32.to_le_bytes().to_vec()));
        let limit = mtu as usize + 14;
        // To the guest: the limit passes, one more byte does not; a tag adds 4.
        assert_eq!(
            h.send_to_guest(&sized_frame(MAC, limit)),
            RxVerdict::Queued(0)
        );
        assert_eq!(
            h.send_to_guest(&sized_frame(MAC, limit + 1)),
            RxVerdict::TooLong
        );
        let big_tagged = tagged(&sized_frame(MAC, limit), 5);
        assert_eq!(h.send_to_guest(&big_tagged), RxVerdict::Queued(0));
        let (ind, _) = w.receive(0, true);
        let got: Vec<usize> = ind.iter().map(|i| i.frame().0.len()).collect();
        assert_eq!(got, [limit, limit]);
        // From the guest: the limit is handed on, one more byte is refused.
        let before = h.stats().malformed;
        assert_eq!(w.transmit_section(0, 0, &[sized_frame(MAC, limit)]), 1);
        assert_eq!(h.take_from_guest().map(|f| f.len()), Some(limit));
        w.transmit_section(0, 1, &[sized_frame(MAC, limit + 1)]);
        assert_eq!(h.take_from_guest(), None);
        assert_eq!(h.stats().malformed, before + 1);
    }
    assert!(h.stats().oversize_drops >= 2);
    assert_eq!(w.violations(), 0);
}

/// 802.1Q: tags of frames for the guest travel as VLAN PPIs (the frame untagged), a
/// port VLAN tags untagged frames, and a guest frame's VLAN PPI is put back into the
/// frame the host hands on; a frame for another VLAN than the port's is dropped.
#[test]
fn vlan_ppis_both_ways() {
    let mut w = World::one(NetvspConfig {
        port_vlan: Some(42),
        ..config()
    });
    w.bring_up(0, 0x60001);
    let h = w.h(0);
    let plain = frame_to(MAC, 1);
    // VLAN 100, priority 5, DEI set.
    let tci = 0xb000 | 100;
    assert_eq!(h.send_to_guest(&tagged(&plain, tci)), RxVerdict::Queued(0));
    assert_eq!(h.send_to_guest(&plain), RxVerdict::Queued(0));
    let (ind, _) = w.receive(0, true);
    let frames: Vec<_> = ind.iter().map(|i| i.frame_vlan()).collect();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].0, plain, "the tag left the frame");
    let v = frames[0].1.unwrap();
    assert_eq!(
        (v.vlan_id(), v.priority(), v.cfi(), v.tci()),
        (100, 5, true, tci)
    );
    assert_eq!(frames[1].0, plain);
    assert_eq!(
        frames[1].1.map(|v| (v.vlan_id(), v.priority())),
        Some((42, 0))
    );
    assert_eq!(h.stats().vlan_rx, 2);

    // Guest to host: the PPI's tag goes back into the frame.
    let ppi = Ndis8021qInfo::from_tci(42 | 0x2000).0.to_le_bytes();
    let ppis = [Ppi::new(PpiType::IEEE_8021Q_INFO, &ppi)];
    assert_eq!(
        w.transmit_with_ppis(0, 0, std::slice::from_ref(&plain), &ppis),
        1
    );
    assert_eq!(h.take_from_guest(), Some(tagged(&plain, 42 | 0x2000)));
    // Without a PPI the frame goes on as it is.
    assert_eq!(w.transmit_section(0, 1, std::slice::from_ref(&plain)), 1);
    assert_eq!(h.take_from_guest(), Some(plain.clone()));
    // Another VLAN than the port's: dropped and counted.
    let other = Ndis8021qInfo::new(7, 0).0.to_le_bytes();
    let ppis = [Ppi::new(PpiType::IEEE_8021Q_INFO, &other)];
    assert_eq!(
        w.transmit_with_ppis(0, 2, std::slice::from_ref(&plain), &ppis),
        1
    );
    assert_eq!(h.take_from_guest(), None);
    let s = h.stats();
    assert_eq!((s.vlan_tx, s.vlan_drops), (1, 1));
    // A VLAN PPI too short for its value is a malformed send.
    let mut m = Vec::new();
    let total = 8 + 36 + 14 + plain.len() as u32;
    for word in [
        1,
        total,
        36 + 14,
        plain.len() as u32,
        0,
        0,
        0,
        36,
        14,
        0,
        0,
        14,
        6,
        12,
    ] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(&[42, 0]);
    m.extend_from_slice(&plain);
    let RndisMessage::Packet(p) = RndisMessage::parse(&m).unwrap() else {
        panic!()
    };
    assert_eq!(p.data, &plain[..]);
    let before = h.stats().malformed;
    w.transmit_raw_section(0, 3, &m);
    assert_eq!(h.take_from_guest(), None);
    assert_eq!(h.stats().malformed, before + 1);
    assert_eq!(w.violations(), 0);
}
