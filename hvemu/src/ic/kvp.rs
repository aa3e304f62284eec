//! KVP device: enumerates pools, gets, sets and deletes keys and asks for an adapter's IP
//! info, with the full-size structures Linux and OpenVMM use (ENUMERATE 2580 bytes of
//! body, GET/SET 2576, DELETE 520, GET_IP_INFO 7428), and records what the guest returns.

use std::collections::{BTreeMap, VecDeque};

use hvnet_wire::ic::{
    kvp_enumerate_record, kvp_get_record, put_str, IcMsgHdr, IcMsgType, IcStatus, IcVersion,
    IpInfoField, KvpExchgMsgValue, KvpHdr, KvpIpInfo, KvpIpMsg, KvpMsgDelete, KvpMsgEnumerate,
    KvpOperation, KvpPool, KvpRecord, KvpValue, KvpValueType, Negotiated, HOST_KVP_VERSIONS,
    HV_KVP_GUID,
};
use hvnet_wire::vmbus::Guid;
use zerocopy::{FromZeros, IntoBytes};

use super::{HostService, IcHandle, ServiceRequest};

/// Most indices one [`IcHandle::enumerate_all`] walks.
const MAX_ENUMERATION: u32 = 1024;

/// A value to SET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvpHostValue {
    /// `REG_SZ`.
    String(String),
    /// `REG_U32`.
    U32(u32),
    /// `REG_U64`.
    U64(u64),
}

/// The IP info of a GET_IP_INFO answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpInfoRecord {
    /// Adapter id.
    pub adapter_id: String,
    /// `ADDR_FAMILY_*` bits.
    pub addr_family: u8,
    /// DHCP on.
    pub dhcp_enabled: bool,
    /// Addresses, `;`-separated.
    pub ip_addr: String,
    /// Subnets.
    pub sub_net: String,
    /// Gateways.
    pub gate_way: String,
    /// DNS servers.
    pub dns_addr: String,
}

/// One answered KVP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvpResponse {
    /// The operation.
    pub operation: KvpOperation,
    /// The pool.
    pub pool: KvpPool,
    /// The ENUMERATE index.
    pub index: Option<u32>,
    /// The status.
    pub status: IcStatus,
    /// The key sent (GET, SET, DELETE) or returned (ENUMERATE).
    pub key: Option<String>,
    /// The value returned (GET, ENUMERATE), numbers in decimal.
    pub value: Option<String>,
    /// The IP info returned.
    pub ip_info: Option<IpInfoRecord>,
}

/// A KVP request the device sends (queued through the [`IcHandle`] methods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvpOp {
    /// ENUMERATE `index` of `pool`; with `all`, go on with the next index after S_OK.
    Enumerate {
        /// Pool.
        pool: KvpPool,
        /// Index.
        index: u32,
        /// Walk the whole pool.
        all: bool,
    },
    /// GET.
    Get {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: String,
    },
    /// SET.
    Set {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: String,
        /// Value.
        value: KvpHostValue,
    },
    /// DELETE.
    Delete {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: String,
    },
    /// GET_IP_INFO.
    GetIpInfo {
        /// Adapter id.
        adapter_id: String,
    },
}

/// The KVP service of an [`super::IcDevice`].
#[derive(Debug, Default)]
pub struct Kvp {
    queue: VecDeque<KvpOp>,
    responses: Vec<KvpResponse>,
    /// Pairs returned by ENUMERATE, by pool, in index order.
    enumerated: BTreeMap<u8, Vec<(String, String)>>,
}

fn string_of(s: &hvnet_wire::ic::KvpString<'_>) -> String {
    s.chars().collect()
}

fn value_of(value: KvpValue<'_>) -> String {
    match value {
        KvpValue::String(s) => string_of(&s),
        KvpValue::U32(n) => n.to_string(),
        KvpValue::U64(n) => n.to_string(),
    }
}

fn record(
    value_type: KvpValueType,
    key: &str,
    value: Option<&KvpHostValue>,
) -> Result<KvpExchgMsgValue, String> {
    let mut r = KvpExchgMsgValue::new_zeroed();
    r.value_type = value_type.0.into();
    r.key_size = put_str(&mut r.key, key)
        .map_err(|e| format!("host: key {key:?}: {e}"))?
        .into();
    match value {
        Some(KvpHostValue::String(s)) => {
            r.value_size = put_str(&mut r.value, s)
                .map_err(|e| format!("host: value: {e}"))?
                .into();
        }
        Some(KvpHostValue::U32(n)) => {
            r.value[..4].copy_from_slice(&n.to_le_bytes());
            r.value_size = 4.into();
        }
        Some(KvpHostValue::U64(n)) => {
            r.value[..8].copy_from_slice(&n.to_le_bytes());
            r.value_size = 8.into();
        }
        None => {}
    }
    Ok(r)
}

fn with_header(op: KvpOperation, pool: KvpPool, body: &[u8]) -> Vec<u8> {
    let header = KvpHdr {
        operation: op.0,
        pool: pool.0,
        pad: 0.into(),
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

impl KvpOp {
    fn encode(&self) -> Result<Vec<u8>, String> {
        Ok(match self {
            KvpOp::Enumerate { pool, index, .. } => {
                let mut m = KvpMsgEnumerate::new_zeroed();
                m.index = (*index).into();
                with_header(KvpOperation::ENUMERATE, *pool, m.as_bytes())
            }
            KvpOp::Get { pool, key } => with_header(
                KvpOperation::GET,
                *pool,
                record(KvpValueType(0), key, None)?.as_bytes(),
            ),
            KvpOp::Set { pool, key, value } => {
                let t = match value {
                    KvpHostValue::String(_) => KvpValueType::REG_SZ,
                    KvpHostValue::U32(_) => KvpValueType::REG_U32,
                    KvpHostValue::U64(_) => KvpValueType::REG_U64,
                };
                with_header(
                    KvpOperation::SET,
                    *pool,
                    record(t, key, Some(value))?.as_bytes(),
                )
            }
            KvpOp::Delete { pool, key } => {
                let mut m = KvpMsgDelete::new_zeroed();
                m.key_size = put_str(&mut m.key, key)
                    .map_err(|e| format!("host: key {key:?}: {e}"))?
                    .into();
                with_header(KvpOperation::DELETE, *pool, m.as_bytes())
            }
            KvpOp::GetIpInfo { adapter_id } => {
                let mut m = KvpIpMsg::new_zeroed();
                m.operation = KvpOperation::GET_IP_INFO.0;
                m.pool = KvpPool::GUEST.0;
                put_str(&mut m.kvp_ip_val.adapter_id, adapter_id)
                    .map_err(|e| format!("host: adapter id: {e}"))?;
                m.as_bytes().to_vec()
            }
        })
    }

    fn operation(&self) -> KvpOperation {
        match self {
            KvpOp::Enumerate { .. } => KvpOperation::ENUMERATE,
            KvpOp::Get { .. } => KvpOperation::GET,
            KvpOp::Set { .. } => KvpOperation::SET,
            KvpOp::Delete { .. } => KvpOperation::DELETE,
            KvpOp::GetIpInfo { .. } => KvpOperation::GET_IP_INFO,
        }
    }

    fn pool(&self) -> KvpPool {
        match self {
            KvpOp::Enumerate { pool, .. }
            | KvpOp::Get { pool, .. }
            | KvpOp::Set { pool, .. }
            | KvpOp::Delete { pool, .. } => *pool,
            KvpOp::GetIpInfo { .. } => KvpPool::GUEST,
        }
    }
}

fn read_record(record: KvpRecord<'_>) -> Result<(String, String), String> {
    let key = record.key().map_err(|e| format!("key: {e}"))?;
    let value = record.value().map_err(|e| format!("value: {e}"))?;
    Ok((string_of(&key), value_of(value)))
}

impl HostService for Kvp {
    type Pending = KvpOp;
    const MSG_TYPE: IcMsgType = IcMsgType::KVPEXCHANGE;
    const CLASS: Guid = HV_KVP_GUID;

    fn default_versions() -> Vec<IcVersion> {
        HOST_KVP_VERSIONS.to_vec()
    }

    fn next_request(
        &mut self,
        _versions: &Negotiated,
        _poll: bool,
    ) -> Option<ServiceRequest<KvpOp>> {
        loop {
            let op = self.queue.pop_front()?;
            match op.encode() {
                Ok(body) => {
                    return Some(ServiceRequest {
                        body,
                        expect_reply: true,
                        pending: op,
                    })
                }
                Err(e) => log::warn!("hvemu kvp: {e}; request not sent"),
            }
        }
    }

    fn on_response(&mut self, op: KvpOp, header: &IcMsgHdr, body: &[u8]) -> Result<(), String> {
        let status = header.status();
        let (operation, pool) = (op.operation(), op.pool());
        if body.len() < 2 || body[0] != operation.0 || body[1] != pool.0 {
            return Err(format!(
                "KVP answer header {:?} does not echo {operation:?}/{pool:?}",
                body.get(..2)
            ));
        }
        let mut response = KvpResponse {
            operation,
            pool,
            index: None,
            status,
            key: None,
            value: None,
            ip_info: None,
        };
        let result = match &op {
            KvpOp::Enumerate { pool, index, all } => {
                response.index = Some(*index);
                if status == IcStatus::S_OK {
                    let (key, value) = kvp_enumerate_record(body)
                        .map_err(|e| e.to_string())
                        .and_then(read_record)
                        .map_err(|e| format!("ENUMERATE {pool:?}[{index}] answer: {e}"))?;
                    self.enumerated
                        .entry(pool.0)
                        .or_default()
                        .push((key.clone(), value.clone()));
                    response.key = Some(key);
                    response.value = Some(value);
                    if *all && *index + 1 < MAX_ENUMERATION {
                        self.queue.push_front(KvpOp::Enumerate {
                            pool: *pool,
                            index: index + 1,
                            all: true,
                        });
                    }
                }
                Ok(())
            }
            KvpOp::Get { key, .. } => {
                response.key = Some(key.clone());
                if status == IcStatus::S_OK {
                    let record = kvp_get_record(body).map_err(|e| format!("GET answer: {e}"))?;
                    let value = record.value().map_err(|e| format!("GET answer: {e}"))?;
                    response.value = Some(value_of(value));
                }
                Ok(())
            }
            KvpOp::Set { key, .. } | KvpOp::Delete { key, .. } => {
                response.key = Some(key.clone());
                Ok(())
            }
            KvpOp::GetIpInfo { .. } => {
                if status == IcStatus::S_OK {
                    let info =
                        KvpIpInfo::parse(body).map_err(|e| format!("GET_IP_INFO answer: {e}"))?;
                    let field = |f| string_of(&info.field(f));
                    response.ip_info = Some(IpInfoRecord {
                        adapter_id: field(IpInfoField::AdapterId),
                        addr_family: info.addr_family(),
                        dhcp_enabled: info.dhcp_enabled(),
                        ip_addr: field(IpInfoField::IpAddr),
                        sub_net: field(IpInfoField::SubNet),
                        gate_way: field(IpInfoField::GateWay),
                        dns_addr: field(IpInfoField::DnsAddr),
                    });
                }
                Ok(())
            }
        };
        self.responses.push(response);
        result
    }
}

impl IcHandle<Kvp> {
    /// Asks for pair `index` of `pool`.
    pub fn enumerate(&self, pool: KvpPool, index: u32) {
        self.push(KvpOp::Enumerate {
            pool,
            index,
            all: false,
        });
    }

    /// Enumerates `pool` from index 0 until the guest answers anything but S_OK (the
    /// pairs collect in [`enumerated`](Self::enumerated)).
    pub fn enumerate_all(&self, pool: KvpPool) {
        self.with_service(|s| {
            s.enumerated.remove(&pool.0);
        });
        self.push(KvpOp::Enumerate {
            pool,
            index: 0,
            all: true,
        });
    }

    /// GET `key` from `pool`.
    pub fn get(&self, pool: KvpPool, key: &str) {
        self.push(KvpOp::Get {
            pool,
            key: key.to_string(),
        });
    }

    /// SET `key` to `value` in `pool`.
    pub fn set(&self, pool: KvpPool, key: &str, value: KvpHostValue) {
        self.push(KvpOp::Set {
            pool,
            key: key.to_string(),
            value,
        });
    }

    /// DELETE `key` from `pool`.
    pub fn delete(&self, pool: KvpPool, key: &str) {
        self.push(KvpOp::Delete {
            pool,
            key: key.to_string(),
        });
    }

    /// GET_IP_INFO for the adapter `adapter_id` (Linux: its MAC, `00:15:5D:..`).
    pub fn get_ip_info(&self, adapter_id: &str) {
        self.push(KvpOp::GetIpInfo {
            adapter_id: adapter_id.to_string(),
        });
    }

    fn push(&self, op: KvpOp) {
        self.with_service(|s| s.queue.push_back(op));
    }

    /// Every answered request, oldest first.
    pub fn responses(&self) -> Vec<KvpResponse> {
        self.with_service(|s| s.responses.clone())
    }

    /// The pairs ENUMERATE returned for `pool`, in index order.
    pub fn enumerated(&self, pool: KvpPool) -> Vec<(String, String)> {
        self.with_service(|s| s.enumerated.get(&pool.0).cloned().unwrap_or_default())
    }

    /// Requests not yet sent.
    pub fn queued(&self) -> usize {
        self.with_service(|s| s.queue.len())
    }
}
