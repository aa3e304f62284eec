//! The RNDIS control plane of the emulated NIC: INITIALIZE, QUERY, SET, KEEPALIVE, HALT
//! and RESET, answered the way a Hyper-V host does (hyperv-facts.md section 7).
//!
//! This module only turns one parsed request into state changes and the encoded reply;
//! the caller puts the reply into a receive-buffer section and indicates it with a
//! transfer-page packet, like a data frame. Requests come from the guest and are checked
//! here: a bad value gets an RNDIS error status in the reply, never a panic.

use hvnet_wire::rndis::{
    IndicateStatus, InitializeComplete, KeepaliveComplete, NdisObjectHeader, NdisRecvScaleCap, Oid,
    QueryComplete, ResetComplete, RndisMessage, RndisStatus, RssParameters, SetComplete, ITAB_NUM,
    ITAB_NUM_MAX, NDIS_HASH_FUNC_TOEPLITZ, NDIS_MEDIA_STATE_CONNECTED,
    NDIS_MEDIA_STATE_DISCONNECTED, NDIS_OBJECT_TYPE_DEFAULT, NDIS_OBJECT_TYPE_OFFLOAD,
    NDIS_OBJECT_TYPE_RSS_CAPABILITIES, NDIS_OBJECT_TYPE_RSS_PARAMETERS,
    NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2, NDIS_RSS_CAPS_CLASSIFICATION_AT_DPC,
    NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4, NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6,
    NDIS_RSS_CAPS_MESSAGE_SIGNALED_INTERRUPTS, NDIS_RSS_PARAM_FLAG_DISABLE_RSS,
    NDIS_RSS_PARAM_FLAG_HASH_INFO_UNCHANGED, NDIS_RSS_PARAM_FLAG_HASH_KEY_UNCHANGED,
    NDIS_RSS_PARAM_FLAG_ITABLE_UNCHANGED, NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2,
    NETVSC_HASH_KEYLEN, RNDIS_DF_CONNECTIONLESS, RNDIS_MAJOR_VERSION, RNDIS_MEDIUM_802_3,
    RNDIS_MINOR_VERSION,
};
use hvnet_wire::WireError;
use zerocopy::{FromBytes, IntoBytes};

/// RNDIS PACKET messages the host accepts per send section (`max_pkt_per_msg`,
/// OpenVMM's value).
pub const MAX_PACKETS_PER_MESSAGE: u32 = 8;
/// `max_xfer_size` in INITIALIZE_CMPLT (OpenVMM's value).
pub const MAX_TRANSFER_SIZE: u32 = 0xEFFF_FFFF;
/// `pkt_alignment_factor`: messages in one section are aligned to 1 << 3 = 8 bytes.
pub const PACKET_ALIGNMENT_FACTOR: u32 = 3;
/// Interrupt messages reported in the RSS capabilities (OpenVMM's value).
const RSS_INTERRUPT_MESSAGES: u32 = 1;
/// Hash function bits of `hashinfo` (`NDIS_HASH_FUNCTION_MASK`).
const NDIS_HASH_FUNCTION_MASK: u32 = 0x0000_00FF;
/// Hash type bits of `hashinfo` (`NDIS_HASH_TYPE_MASK`).
const NDIS_HASH_TYPE_MASK: u32 = 0x00FF_FF00;
/// `NDIS_OFFLOAD` sizes by revision 1, 2, 3 (wire-layouts.md section 5).
const NDIS_OFFLOAD_SIZES: [u16; 3] = [112, 144, 156];
/// Smallest offload-parameters value the host parses (OpenVMM: the revision-1 prefix).
const OFFLOAD_PARAMS_MIN: usize = 20;
/// Friendly name the host reports (Linux's default).
const FRIENDLY_NAME: &str = "Network Adapter";

/// The guest's receive-side scaling settings, as last set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RssInfo {
    /// False after a SET with `NDIS_RSS_PARAM_FLAG_DISABLE_RSS` (everything goes to
    /// queue 0 and carries no hash).
    pub enabled: bool,
    /// Hash function and types (`hashinfo`).
    pub hash_info: u32,
    /// The Toeplitz key (40 bytes once set).
    pub key: Vec<u8>,
    /// The indirection table: queue (sub-channel index) per entry.
    pub table: Vec<u32>,
    /// `base_cpu_number`.
    pub base_cpu: u16,
    /// `flag` of the last SET.
    pub flags: u16,
}

/// What the host knows that the replies depend on.
#[derive(Clone, Copy, Debug)]
pub struct ControlEnv {
    /// The permanent MAC.
    pub mac: [u8; 6],
    /// IP MTU (OID_GEN_MAXIMUM_FRAME_SIZE).
    pub mtu: u32,
    /// Media state.
    pub link_up: bool,
    /// Link speed in 100 bit/s units.
    pub link_speed: u32,
    /// Receive queues offered in the RSS capabilities.
    pub max_queues: u16,
    /// Indirection table entries offered in the RSS capabilities.
    pub table_entries: u16,
    /// Queues the guest may name in an indirection table (primary + granted
    /// sub-channels).
    pub queues_available: u32,
}

/// RNDIS device state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RndisState {
    /// INITIALIZE answered and no HALT since.
    pub initialized: bool,
    /// OID_GEN_CURRENT_PACKET_FILTER.
    pub packet_filter: u32,
    /// RSS, once the guest set parameters.
    pub rss: Option<RssInfo>,
    /// The last OID_TCP_OFFLOAD_PARAMETERS value (accepted, not acted upon).
    pub offload_params: Option<Vec<u8>>,
}

/// The result of one control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlResult {
    /// The encoded completion to indicate to the guest, if the request has one.
    pub reply: Option<Vec<u8>>,
    /// Set when the request broke the protocol (counted as malformed by the caller).
    pub error: Option<String>,
}

impl ControlResult {
    fn reply(bytes: Vec<u8>) -> Self {
        ControlResult {
            reply: Some(bytes),
            error: None,
        }
    }
}

/// Encodes a message into a fresh vector.
pub fn encode(msg: &RndisMessage<'_>) -> Vec<u8> {
    let extra = match msg {
        RndisMessage::QueryComplete { info, .. } => info.len(),
        RndisMessage::IndicateStatus { status_buf, .. } => status_buf.len(),
        _ => 0,
    };
    let mut buf = vec![0u8; 64 + extra];
    match msg.encode(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        // Every message built here fits; an empty reply would show up as a guest error.
        Err(e) => {
            log::error!("netvsp: cannot encode {:?}: {e}", msg.message_type());
            Vec::new()
        }
    }
}

/// INDICATE_STATUS for a media state change.
pub fn link_indication(up: bool) -> Vec<u8> {
    let status = if up {
        RndisStatus::MEDIA_CONNECT
    } else {
        RndisStatus::MEDIA_DISCONNECT
    };
    encode(&RndisMessage::IndicateStatus {
        body: IndicateStatus {
            status: status.0.into(),
            status_buflen: 0.into(),
            status_buf_offset: 0.into(),
        },
        status_buf: &[],
    })
}

fn query_reply(req_id: u32, status: RndisStatus, info: &[u8]) -> Vec<u8> {
    encode(&RndisMessage::QueryComplete {
        body: QueryComplete {
            req_id: req_id.into(),
            status: status.0.into(),
            info_buflen: 0.into(),
            info_buf_offset: 0.into(),
        },
        info,
    })
}

fn set_reply(req_id: u32, status: RndisStatus) -> Vec<u8> {
    encode(&RndisMessage::SetComplete(SetComplete {
        req_id: req_id.into(),
        status: status.0.into(),
    }))
}

/// The answer to a query of `oid` with input `input`: status and result bytes.
pub fn query(oid: Oid, input: &[u8], env: &ControlEnv) -> (RndisStatus, Vec<u8>) {
    let ok = |v: Vec<u8>| (RndisStatus::SUCCESS, v);
    match oid {
        Oid::OID_802_3_PERMANENT_ADDRESS | Oid::OID_802_3_CURRENT_ADDRESS => ok(env.mac.to_vec()),
        Oid::GEN_MAXIMUM_FRAME_SIZE => ok(env.mtu.to_le_bytes().to_vec()),
        Oid::GEN_LINK_SPEED => ok(env.link_speed.to_le_bytes().to_vec()),
        Oid::GEN_MEDIA_CONNECT_STATUS => {
            let s = if env.link_up {
                NDIS_MEDIA_STATE_CONNECTED
            } else {
                NDIS_MEDIA_STATE_DISCONNECTED
            };
            ok(s.to_le_bytes().to_vec())
        }
        Oid::GEN_FRIENDLY_NAME => ok(FRIENDLY_NAME
            .encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()),
        Oid::GEN_RECEIVE_SCALE_CAPABILITIES => {
            let caps = NdisRecvScaleCap {
                hdr: NdisObjectHeader::new(
                    NDIS_OBJECT_TYPE_RSS_CAPABILITIES,
                    NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2,
                    NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2,
                ),
                cap_flag: (NDIS_RSS_CAPS_MESSAGE_SIGNALED_INTERRUPTS
                    | NDIS_RSS_CAPS_CLASSIFICATION_AT_DPC
                    | NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4
                    | NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6)
                    .into(),
                num_int_msg: RSS_INTERRUPT_MESSAGES.into(),
                num_recv_que: u32::from(env.max_queues).into(),
                num_indirect_tabent: env.table_entries.into(),
            };
            ok(caps.as_bytes().to_vec())
        }
        Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
            // Answer with the revision the guest asked for (its input is an NDIS_OFFLOAD
            // header), and no offloads at all: the guest computes its own checksums and
            // never sends LSO packets.
            let revision = NdisObjectHeader::read_from_prefix(input)
                .ok()
                .map(|(h, _)| h.revision)
                .filter(|r| (1..=3).contains(r))
                .unwrap_or(3);
            let size = NDIS_OFFLOAD_SIZES[usize::from(revision - 1)];
            let mut v = vec![0u8; usize::from(size)];
            let hdr = NdisObjectHeader::new(NDIS_OBJECT_TYPE_OFFLOAD, revision, size);
            v[..4].copy_from_slice(hdr.as_bytes());
            ok(v)
        }
        _ => (RndisStatus::NOT_SUPPORTED, Vec::new()),
    }
}

/// Checks an OID_GEN_RECEIVE_SCALE_PARAMETERS value against the previous settings.
///
/// Rules (OpenVMM's and NDIS's): the object header must be type 0x89, revision >= 2,
/// size >= 40 and within the buffer; table and key must lie inside the buffer
/// ([`RssParameters::parse`]); unless "unchanged" flags say otherwise the hash function
/// must be Toeplitz with at least one hash type, the key exactly 40 bytes and the table
/// 1..=256 whole u32 entries, each naming one of `queues` queues. A disabling SET only
/// needs a valid header; whatever else it carries is kept if valid.
pub fn parse_rss_parameters(
    info: &[u8],
    queues: u32,
    prev: Option<&RssInfo>,
) -> Result<RssInfo, RndisStatus> {
    let p = RssParameters::parse(info).map_err(|e| match e {
        WireError::Truncated => RndisStatus::INVALID_LENGTH,
        _ => RndisStatus::INVALID_DATA,
    })?;
    let hdr = p.params.hdr;
    if hdr.obj_type != NDIS_OBJECT_TYPE_RSS_PARAMETERS
        || hdr.revision < 2
        || usize::from(hdr.size.get()) < size_of::<hvnet_wire::rndis::NdisRecvScaleParam>()
        || usize::from(hdr.size.get()) > info.len()
    {
        return Err(RndisStatus::INVALID_DATA);
    }
    let flags = p.params.flag.get();
    let hash_info = p.params.hashinfo.get();
    let table: Vec<u32> = p.table.iter().map(|e| e.get()).collect();
    let table_ok = !table.is_empty()
        && table.len() <= ITAB_NUM_MAX
        && table.iter().all(|&q| q < queues.max(1));
    let key_ok = p.key.len() == NETVSC_HASH_KEYLEN;
    let hash_ok = hash_info & NDIS_HASH_FUNCTION_MASK == NDIS_HASH_FUNC_TOEPLITZ
        && hash_info & NDIS_HASH_TYPE_MASK != 0;

    if flags & NDIS_RSS_PARAM_FLAG_DISABLE_RSS != 0 {
        let mut r = prev.cloned().unwrap_or(RssInfo {
            enabled: false,
            hash_info: 0,
            key: Vec::new(),
            table: Vec::new(),
            base_cpu: 0,
            flags,
        });
        r.enabled = false;
        r.flags = flags;
        if key_ok {
            r.key = p.key.to_vec();
        }
        if table_ok {
            r.table = table;
        }
        if hash_ok {
            r.hash_info = hash_info;
        }
        return Ok(r);
    }

    let hash_info = if flags & NDIS_RSS_PARAM_FLAG_HASH_INFO_UNCHANGED != 0 {
        prev.map(|r| r.hash_info)
            .filter(|h| *h != 0)
            .ok_or(RndisStatus::INVALID_DATA)?
    } else if hash_ok {
        hash_info
    } else {
        return Err(RndisStatus::INVALID_DATA);
    };
    let key = if flags & NDIS_RSS_PARAM_FLAG_HASH_KEY_UNCHANGED != 0 {
        prev.map(|r| r.key.clone())
            .filter(|k| k.len() == NETVSC_HASH_KEYLEN)
            .ok_or(RndisStatus::INVALID_DATA)?
    } else if key_ok {
        p.key.to_vec()
    } else {
        return Err(RndisStatus::INVALID_DATA);
    };
    let table = if flags & NDIS_RSS_PARAM_FLAG_ITABLE_UNCHANGED != 0 {
        prev.map(|r| r.table.clone())
            .filter(|t| !t.is_empty())
            .ok_or(RndisStatus::INVALID_DATA)?
    } else if table_ok {
        table
    } else {
        return Err(RndisStatus::INVALID_DATA);
    };
    Ok(RssInfo {
        enabled: true,
        hash_info,
        key,
        table,
        base_cpu: p.params.base_cpu_number.get(),
        flags,
    })
}

impl RndisState {
    /// Handles one control request (anything but PACKET).
    pub fn handle(&mut self, msg: &RndisMessage<'_>, env: &ControlEnv) -> ControlResult {
        match msg {
            RndisMessage::InitializeRequest(r) => {
                // The guest's version and transfer size are informational; a host
                // answers 1.0 whatever it asked (Linux asks for 1.0).
                self.initialized = true;
                ControlResult::reply(encode(&RndisMessage::InitializeComplete(
                    InitializeComplete {
                        req_id: r.req_id,
                        status: RndisStatus::SUCCESS.0.into(),
                        major_ver: RNDIS_MAJOR_VERSION.into(),
                        minor_ver: RNDIS_MINOR_VERSION.into(),
                        dev_flags: RNDIS_DF_CONNECTIONLESS.into(),
                        medium: RNDIS_MEDIUM_802_3.into(),
                        max_pkt_per_msg: MAX_PACKETS_PER_MESSAGE.into(),
                        max_xfer_size: MAX_TRANSFER_SIZE.into(),
                        pkt_alignment_factor: PACKET_ALIGNMENT_FACTOR.into(),
                        af_list_offset: 0.into(),
                        af_list_size: 0.into(),
                    },
                )))
            }
            RndisMessage::QueryRequest { body, info } => {
                let (status, data) = query(Oid(body.oid.get()), info, env);
                ControlResult::reply(query_reply(body.req_id.get(), status, &data))
            }
            RndisMessage::SetRequest { body, info } => {
                let status = self.set(Oid(body.oid.get()), info, env);
                ControlResult::reply(set_reply(body.req_id.get(), status))
            }
            RndisMessage::KeepaliveRequest(r) => ControlResult::reply(encode(
                &RndisMessage::KeepaliveComplete(KeepaliveComplete {
                    req_id: r.req_id,
                    status: RndisStatus::SUCCESS.0.into(),
                }),
            )),
            RndisMessage::HaltRequest(_) => {
                // No reply (Linux expects none); the device stops indicating frames.
                self.initialized = false;
                ControlResult {
                    reply: None,
                    error: None,
                }
            }
            RndisMessage::ResetRequest(_) => {
                ControlResult::reply(encode(&RndisMessage::ResetComplete(ResetComplete {
                    status: RndisStatus::SUCCESS.0.into(),
                    addressing_reset: 0.into(),
                })))
            }
            other => ControlResult {
                reply: None,
                error: Some(format!(
                    "RNDIS {:?} is not a request a guest sends",
                    other.message_type()
                )),
            },
        }
    }

    fn set(&mut self, oid: Oid, info: &[u8], env: &ControlEnv) -> RndisStatus {
        match oid {
            Oid::GEN_CURRENT_PACKET_FILTER => match <[u8; 4]>::try_from(info) {
                Ok(b) => {
                    self.packet_filter = u32::from_le_bytes(b);
                    RndisStatus::SUCCESS
                }
                Err(_) => RndisStatus::INVALID_LENGTH,
            },
            Oid::GEN_RECEIVE_SCALE_PARAMETERS => {
                match parse_rss_parameters(info, env.queues_available, self.rss.as_ref()) {
                    Ok(r) => {
                        self.rss = Some(r);
                        RndisStatus::SUCCESS
                    }
                    Err(s) => s,
                }
            }
            Oid::TCP_OFFLOAD_PARAMETERS => {
                let hdr = NdisObjectHeader::read_from_prefix(info)
                    .ok()
                    .map(|(h, _)| h);
                match hdr {
                    _ if info.len() < OFFLOAD_PARAMS_MIN => RndisStatus::INVALID_LENGTH,
                    Some(h) if h.obj_type == NDIS_OBJECT_TYPE_DEFAULT => {
                        self.offload_params = Some(info.to_vec());
                        RndisStatus::SUCCESS
                    }
                    _ => RndisStatus::INVALID_DATA,
                }
            }
            _ => RndisStatus::NOT_SUPPORTED,
        }
    }
}

/// Default indirection table size offered in the RSS capabilities (`ITAB_NUM`).
pub const DEFAULT_TABLE_ENTRIES: u16 = ITAB_NUM as u16;

#[cfg(test)]
mod tests {
    use super::*;
    use hvnet_wire::rndis::{
        encode_rss_parameters, HaltRequest, InitializeRequest, KeepaliveRequest, QueryRequest,
        SetRequest, NDIS_HASH_IPV4, NDIS_HASH_TCP_IPV4, NETVSC_DEFAULT_HASH_KEY,
    };

    fn env() -> ControlEnv {
        ControlEnv {
            mac: [0x00, 0x15, 0x5d, 1, 2, 3],
            mtu: 1500,
            link_up: true,
            link_speed: 100_000_000,
            max_queues: 8,
            table_entries: 128,
            queues_available: 4,
        }
    }

    fn query_msg(oid: Oid, input: &[u8]) -> Vec<u8> {
        encode(&RndisMessage::QueryRequest {
            body: QueryRequest {
                req_id: 7.into(),
                oid: oid.0.into(),
                info_buflen: 0.into(),
                info_buf_offset: 0.into(),
                dev_vc_handle: 0.into(),
            },
            info: input,
        })
    }

    fn set_msg(oid: Oid, value: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 64 + value.len()];
        let n = RndisMessage::SetRequest {
            body: SetRequest {
                req_id: 9.into(),
                oid: oid.0.into(),
                info_buflen: 0.into(),
                info_buf_offset: 0.into(),
                dev_vc_handle: 0.into(),
            },
            info: value,
        }
        .encode(&mut buf)
        .unwrap();
        buf.truncate(n);
        buf
    }

    fn run(st: &mut RndisState, bytes: &[u8]) -> Vec<u8> {
        let msg = RndisMessage::parse(bytes).unwrap();
        st.handle(&msg, &env()).reply.expect("a reply")
    }

    #[test]
    fn initialize_reply_encoding() {
        let mut st = RndisState::default();
        let req = encode(&RndisMessage::InitializeRequest(InitializeRequest {
            req_id: 0x1234.into(),
            major_ver: 1.into(),
            minor_ver: 0.into(),
            max_xfer_size: 0x4000.into(),
        }));
        let reply = run(&mut st, &req);
        assert!(st.initialized);
        // Header: INIT_C, 8 + 44 bytes.
        assert_eq!(&reply[..8], &[0x02, 0, 0, 0x80, 52, 0, 0, 0]);
        let RndisMessage::InitializeComplete(c) = RndisMessage::parse(&reply).unwrap() else {
            panic!()
        };
        assert_eq!(c.req_id.get(), 0x1234);
        assert_eq!(c.status.get(), 0);
        assert_eq!((c.major_ver.get(), c.minor_ver.get()), (1, 0));
        assert_eq!(c.dev_flags.get(), 1);
        assert_eq!(c.medium.get(), 0);
        assert_eq!(c.max_pkt_per_msg.get(), 8);
        assert_eq!(c.pkt_alignment_factor.get(), 3);
    }

    #[test]
    fn query_reply_encoding() {
        let mut st = RndisState::default();
        let reply = run(&mut st, &query_msg(Oid::OID_802_3_PERMANENT_ADDRESS, &[]));
        // QUERY_C, msg_len 8 + 16 + 6, req id, status 0, len 6, offset 16, MAC.
        assert_eq!(
            reply,
            [
                0x04, 0, 0, 0x80, 30, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 16, 0, 0, 0,
                0x00, 0x15, 0x5d, 1, 2, 3
            ]
        );
        let check = |oid: Oid, want: &[u8]| {
            let mut st = RndisState::default();
            let r = run(&mut st, &query_msg(oid, &[]));
            let RndisMessage::QueryComplete { body, info } = RndisMessage::parse(&r).unwrap()
            else {
                panic!()
            };
            assert_eq!(body.status.get(), 0, "{oid:?}");
            assert_eq!(info, want, "{oid:?}");
        };
        check(Oid::GEN_MAXIMUM_FRAME_SIZE, &1500u32.to_le_bytes());
        check(Oid::GEN_MEDIA_CONNECT_STATUS, &0u32.to_le_bytes());
        check(Oid::GEN_LINK_SPEED, &100_000_000u32.to_le_bytes());

        let r = run(
            &mut st,
            &query_msg(Oid::GEN_RECEIVE_SCALE_CAPABILITIES, &[]),
        );
        let RndisMessage::QueryComplete { info, .. } = RndisMessage::parse(&r).unwrap() else {
            panic!()
        };
        assert_eq!(info.len(), 18);
        let (caps, _) = NdisRecvScaleCap::read_from_prefix(info).unwrap();
        assert_eq!(caps.hdr.obj_type, 0x88);
        assert_eq!(caps.num_recv_que.get(), 8);
        assert_eq!(caps.num_indirect_tabent.get(), 128);

        // Offload capabilities follow the requested revision.
        let req = NdisObjectHeader::new(NDIS_OBJECT_TYPE_OFFLOAD, 2, 144);
        let r = run(
            &mut st,
            &query_msg(Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, req.as_bytes()),
        );
        let RndisMessage::QueryComplete { info, .. } = RndisMessage::parse(&r).unwrap() else {
            panic!()
        };
        assert_eq!(info.len(), 144);
        assert_eq!(&info[..4], &[0xA7, 2, 144, 0]);

        // Unknown OID: NOT_SUPPORTED, no data.
        let r = run(&mut st, &query_msg(Oid(0xDEAD_BEEF), &[]));
        let RndisMessage::QueryComplete { body, info } = RndisMessage::parse(&r).unwrap() else {
            panic!()
        };
        assert_eq!(body.status.get(), RndisStatus::NOT_SUPPORTED.0);
        assert!(info.is_empty());
    }

    #[test]
    fn set_filter_keepalive_halt() {
        let mut st = RndisState::default();
        let r = run(
            &mut st,
            &set_msg(Oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes()),
        );
        assert_eq!(st.packet_filter, 0x0D);
        assert_eq!(r, [0x05, 0, 0, 0x80, 16, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        // Wrong length: refused, filter unchanged.
        let r = run(&mut st, &set_msg(Oid::GEN_CURRENT_PACKET_FILTER, &[1, 2]));
        let RndisMessage::SetComplete(c) = RndisMessage::parse(&r).unwrap() else {
            panic!()
        };
        assert_eq!(c.status.get(), RndisStatus::INVALID_LENGTH.0);
        assert_eq!(st.packet_filter, 0x0D);

        let ka = encode(&RndisMessage::KeepaliveRequest(KeepaliveRequest {
            req_id: 3.into(),
        }));
        let r = run(&mut st, &ka);
        assert_eq!(r, [0x08, 0, 0, 0x80, 16, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);

        st.initialized = true;
        let halt = encode(&RndisMessage::HaltRequest(HaltRequest { req_id: 1.into() }));
        let res = st.handle(&RndisMessage::parse(&halt).unwrap(), &env());
        assert_eq!(res.reply, None);
        assert!(!st.initialized);
    }

    fn rss_buf(flag: u16, hashinfo: u32, table: &[u32], key: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 40 + 4 * table.len() + key.len()];
        let n = encode_rss_parameters(&mut buf, flag, hashinfo, table, key).unwrap();
        buf.truncate(n);
        buf
    }

    const HASH: u32 = NDIS_HASH_FUNC_TOEPLITZ | NDIS_HASH_IPV4 | NDIS_HASH_TCP_IPV4;

    #[test]
    fn rss_parameters_good_and_disable() {
        let table: Vec<u32> = (0..128).map(|i| i % 4).collect();
        let b = rss_buf(0, HASH, &table, &NETVSC_DEFAULT_HASH_KEY);
        let r = parse_rss_parameters(&b, 4, None).unwrap();
        assert!(r.enabled);
        assert_eq!(r.table, table);
        assert_eq!(r.key, NETVSC_DEFAULT_HASH_KEY);
        // Linux disables first, then enables.
        let d = rss_buf(
            NDIS_RSS_PARAM_FLAG_DISABLE_RSS,
            HASH,
            &table,
            &NETVSC_DEFAULT_HASH_KEY,
        );
        let r2 = parse_rss_parameters(&d, 4, Some(&r)).unwrap();
        assert!(!r2.enabled);
        // "Unchanged" flags reuse the previous values.
        let u = rss_buf(
            NDIS_RSS_PARAM_FLAG_ITABLE_UNCHANGED | NDIS_RSS_PARAM_FLAG_HASH_KEY_UNCHANGED,
            HASH,
            &[],
            &[],
        );
        let r3 = parse_rss_parameters(&u, 4, Some(&r)).unwrap();
        assert!(r3.enabled);
        assert_eq!((r3.table.len(), r3.key.len()), (128, 40));
        // ... but need previous values.
        assert_eq!(
            parse_rss_parameters(&u, 4, None),
            Err(RndisStatus::INVALID_DATA)
        );
        // Through the SET path.
        let mut st = RndisState::default();
        let reply = run(&mut st, &set_msg(Oid::GEN_RECEIVE_SCALE_PARAMETERS, &b));
        let RndisMessage::SetComplete(c) = RndisMessage::parse(&reply).unwrap() else {
            panic!()
        };
        assert_eq!(c.status.get(), 0);
        assert!(st.rss.as_ref().unwrap().enabled);
    }

    #[test]
    fn rss_parameters_hostile_inputs() {
        let key = NETVSC_DEFAULT_HASH_KEY;
        let good = rss_buf(0, HASH, &[0, 1], &key);
        let bad = |b: &[u8]| parse_rss_parameters(b, 4, None).unwrap_err();
        // Truncated anywhere: never a panic, always an error.
        for len in 0..good.len() {
            assert!(
                parse_rss_parameters(&good[..len], 4, None).is_err(),
                "{len}"
            );
        }
        // Table entry naming a queue that does not exist.
        assert_eq!(
            bad(&rss_buf(0, HASH, &[0, 4], &key)),
            RndisStatus::INVALID_DATA
        );
        // Empty table, too big a table.
        assert_eq!(bad(&rss_buf(0, HASH, &[], &key)), RndisStatus::INVALID_DATA);
        assert_eq!(
            bad(&rss_buf(0, HASH, &[0; 257], &key)),
            RndisStatus::INVALID_DATA
        );
        // Key of the wrong size.
        assert_eq!(
            bad(&rss_buf(0, HASH, &[0], &key[..39])),
            RndisStatus::INVALID_DATA
        );
        // Not Toeplitz, or no hash type.
        assert_eq!(
            bad(&rss_buf(0, 0x102, &[0], &key)),
            RndisStatus::INVALID_DATA
        );
        assert_eq!(
            bad(&rss_buf(0, NDIS_HASH_FUNC_TOEPLITZ, &[0], &key)),
            RndisStatus::INVALID_DATA
        );
        // Wrong object type / revision / size.
        let mut b = good.clone();
        b[0] = 0x88;
        assert_eq!(bad(&b), RndisStatus::INVALID_DATA);
        let mut b = good.clone();
        b[1] = 1;
        assert_eq!(bad(&b), RndisStatus::INVALID_DATA);
        let mut b = good.clone();
        b[2..4].copy_from_slice(&0xFFFFu16.to_le_bytes());
        assert_eq!(bad(&b), RndisStatus::INVALID_DATA);
        // Table offset past the end, into the header, huge; table size not a multiple
        // of 4.
        for (at, v) in [
            (16usize, 10_000u32),
            (16, 8),
            (16, u32::MAX),
            (24, u32::MAX - 3),
        ] {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert_eq!(bad(&b), RndisStatus::INVALID_DATA, "offset {at} = {v:#x}");
        }
        let mut b = good.clone();
        b[12..14].copy_from_slice(&6u16.to_le_bytes());
        assert_eq!(bad(&b), RndisStatus::INVALID_DATA);
        // Key size field larger than the buffer.
        let mut b = good.clone();
        b[20..22].copy_from_slice(&0xFFFFu16.to_le_bytes());
        assert_eq!(bad(&b), RndisStatus::INVALID_DATA);
    }

    #[test]
    fn offload_parameters_and_unknown_sets() {
        let mut st = RndisState::default();
        let status = |r: Vec<u8>| match RndisMessage::parse(&r).unwrap() {
            RndisMessage::SetComplete(c) => c.status.get(),
            _ => panic!(),
        };
        let mut v = vec![0u8; 28];
        v[..4].copy_from_slice(NdisObjectHeader::new(0x80, 3, 28).as_bytes());
        let r = run(&mut st, &set_msg(Oid::TCP_OFFLOAD_PARAMETERS, &v));
        assert_eq!(status(r), 0);
        assert_eq!(st.offload_params.as_deref(), Some(&v[..]));
        let r = run(&mut st, &set_msg(Oid::TCP_OFFLOAD_PARAMETERS, &v[..10]));
        assert_eq!(status(r), RndisStatus::INVALID_LENGTH.0);
        v[0] = 0x12;
        let r = run(&mut st, &set_msg(Oid::TCP_OFFLOAD_PARAMETERS, &v));
        assert_eq!(status(r), RndisStatus::INVALID_DATA.0);
        let r = run(&mut st, &set_msg(Oid(0x1234), &[1, 2, 3, 4]));
        assert_eq!(status(r), RndisStatus::NOT_SUPPORTED.0);
    }

    #[test]
    fn link_indications() {
        for (up, status) in [
            (true, RndisStatus::MEDIA_CONNECT),
            (false, RndisStatus::MEDIA_DISCONNECT),
        ] {
            let b = link_indication(up);
            let RndisMessage::IndicateStatus { body, status_buf } =
                RndisMessage::parse(&b).unwrap()
            else {
                panic!()
            };
            assert_eq!(body.status.get(), status.0);
            assert!(status_buf.is_empty());
            assert_eq!(b.len(), 20);
        }
    }
}
