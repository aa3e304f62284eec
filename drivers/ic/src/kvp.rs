//! Key-value pair exchange (KVP): what Hyper-V Manager and Azure show about the guest
//! (host name, addresses, OS), plus small stores the host can write and read.
//!
//! * Pool 2 ("auto"), ENUMERATE: indices 0..=9 are the well-known keys Linux's daemon
//!   serves ([`AUTO_KEYS`]), their values from the appliance's [`KvpSource`]; index 10
//!   and later answer `S_CONT` (no more items), which ends the host's enumeration.
//!   `NetworkAddressIPv4`/`IPv6` list the addresses separated by `;`, as Windows
//!   expects. GET on pool 2 finds the same keys by name.
//! * Pools 0 (external) and 1 (guest): GET, SET, DELETE and ENUMERATE on a bounded
//!   in-memory store ([`KVP_MAX_ENTRIES_PER_POOL`] entries each, keys and values within
//!   the wire limits). Numbers are stored as decimal strings and read back as strings,
//!   as Linux's daemon does. A missing key, a full pool or an index past the end is
//!   answered `S_CONT`, Linux's status for each of these.
//! * Pools 3 and 4 hold nothing here: every operation on them answers `S_CONT`.
//! * GET_IP_INFO names an adapter by MAC address (Linux's daemon) or another id; the
//!   source answers, an unknown adapter gets `E_FAIL` as in Linux. SET_IP_INFO (address
//!   injection) is answered `NOT_SUPPORTED`: the appliance configures itself.
//!
//! Requests may be shorter than the full structures (what a host sends depends on its
//! version): only the fields an operation reads must be present, and the answer is
//! extended to the full structure when it needs the room. Oversized strings, unknown
//! operations and pools above 4 are dropped without an answer (see the crate docs).
//! Linux serves one KVP transaction at a time; so does this service (each is answered
//! before the next packet is read).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::net::{IpAddr, Ipv4Addr};

use hvnet_wire::ic::{
    IcMessage, IcMsgType, IcStatus, IcVersion, IpInfoField, KvpIpInfoMut, KvpPool, KvpRecordMut,
    KvpRequest, KvpString, KvpValue, ADDR_FAMILY_IPV4, ADDR_FAMILY_IPV6, GUEST_KVP_VERSIONS,
    HV_KVP_EXCHANGE_MAX_VALUE_SIZE, HV_KVP_GUID, KVP_BODY_OFFSET, KVP_ENUMERATE_RECORD_OFFSET,
    KVP_ENUMERATE_SIZE, KVP_GET_SET_SIZE, KVP_IP_INFO_SIZE, MAX_GATEWAY_SIZE, MAX_IP_ADDR_SIZE,
};
use hvnet_wire::vmbus::Guid;

use crate::channel::{ChannelCounters, DropReason, Reply, Service};
use crate::{AdapterId, IpInfo, KvpSource};

/// Entries each of pools 0 and 1 holds at most.
pub const KVP_MAX_ENTRIES_PER_POOL: usize = 64;

/// The keys of pool 2, by enumeration index (Linux `tools/hv/hv_kvp_daemon.c`).
pub const AUTO_KEYS: [&str; 10] = [
    "FullyQualifiedDomainName",
    "IntegrationServicesVersion",
    "NetworkAddressIPv4",
    "NetworkAddressIPv6",
    "OSBuildNumber",
    "OSName",
    "OSMajorVersion",
    "OSMinorVersion",
    "OSVersion",
    "ProcessorArchitecture",
];

/// UTF-16 units a value holds besides its NUL.
const MAX_VALUE_UNITS: usize = HV_KVP_EXCHANGE_MAX_VALUE_SIZE / 2 - 1;

/// KVP counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvpStats {
    /// The channel's counters.
    pub channel: ChannelCounters,
    /// ENUMERATE requests.
    pub enumerates: u64,
    /// GET requests.
    pub gets: u64,
    /// SET requests.
    pub sets: u64,
    /// DELETE requests.
    pub deletes: u64,
    /// GET_IP_INFO requests.
    pub ip_info_requests: u64,
    /// SET_IP_INFO requests (refused).
    pub set_ip_info_requests: u64,
    /// Answers with `S_CONT` (no more items, not found, pool full).
    pub no_more_items: u64,
    /// Answers with `E_FAIL` or `NOT_SUPPORTED`.
    pub failures: u64,
    /// Entries in pools 0 and 1 now.
    pub entries: usize,
}

struct Entry {
    key: Vec<u16>,
    value: Vec<u16>,
}

/// The KVP service.
pub(crate) struct Kvp {
    source: Rc<dyn KvpSource>,
    counters: Cell<ChannelCounters>,
    stats: Cell<KvpStats>,
    /// Pools 0 and 1, in insertion order (enumeration order).
    pools: RefCell<[Vec<Entry>; 2]>,
}

impl Kvp {
    pub(crate) fn new(source: Rc<dyn KvpSource>) -> Self {
        Kvp {
            source,
            counters: Cell::new(ChannelCounters::default()),
            stats: Cell::new(KvpStats::default()),
            pools: RefCell::new([Vec::new(), Vec::new()]),
        }
    }

    pub(crate) fn stats(&self) -> KvpStats {
        let pools = self.pools.borrow();
        KvpStats {
            channel: self.counters.get(),
            entries: pools[0].len() + pools[1].len(),
            ..self.stats.get()
        }
    }

    fn update(&self, f: impl FnOnce(&mut KvpStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// The value of auto key `index`, fitted to the wire limit.
    fn auto_value(&self, index: usize) -> Option<String> {
        let os = || self.source.os_info();
        let value = match index {
            0 => self.source.fully_qualified_domain_name(),
            1 => os().integration_services_version,
            2 => join_fitting(
                self.source.ipv4_addresses().iter().map(|a| format!("{a}")),
                MAX_VALUE_UNITS,
            ),
            3 => join_fitting(
                self.source.ipv6_addresses().iter().map(|a| format!("{a}")),
                MAX_VALUE_UNITS,
            ),
            4 => os().os_build_number,
            5 => os().os_name,
            6 => os().os_major_version,
            7 => os().os_minor_version,
            8 => os().os_version,
            9 => os().processor_architecture,
            _ => return None,
        };
        Some(truncate_units(value, MAX_VALUE_UNITS))
    }

    fn enumerate(
        &self,
        pool: KvpPool,
        index: u32,
        reply: &mut Reply,
    ) -> Result<IcStatus, DropReason> {
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        let (key, value): (Vec<u16>, Vec<u16>) = match pool {
            KvpPool::AUTO => match (AUTO_KEYS.get(index), self.auto_value(index)) {
                (Some(key), Some(value)) => {
                    (key.encode_utf16().collect(), value.encode_utf16().collect())
                }
                _ => return Ok(IcStatus::S_CONT),
            },
            KvpPool::EXTERNAL | KvpPool::GUEST => {
                let pools = self.pools.borrow();
                match pools[usize::from(pool.0)].get(index) {
                    Some(e) => (e.key.clone(), e.value.clone()),
                    None => return Ok(IcStatus::S_CONT),
                }
            }
            _ => return Ok(IcStatus::S_CONT),
        };
        let body = reply.body(KVP_ENUMERATE_SIZE);
        let mut record = KvpRecordMut::new(
            body.get_mut(KVP_ENUMERATE_RECORD_OFFSET..)
                .unwrap_or(&mut []),
        )?;
        record.set_key(key.iter().copied())?;
        record.set_value_string(value.iter().copied())?;
        Ok(IcStatus::S_OK)
    }

    fn get(
        &self,
        pool: KvpPool,
        key: KvpString<'_>,
        reply: &mut Reply,
    ) -> Result<IcStatus, DropReason> {
        let value: Vec<u16> = match pool {
            KvpPool::AUTO => {
                let Some(index) = AUTO_KEYS.iter().position(|k| key.eq_str(k)) else {
                    return Ok(IcStatus::S_CONT);
                };
                match self.auto_value(index) {
                    Some(v) => v.encode_utf16().collect(),
                    None => return Ok(IcStatus::S_CONT),
                }
            }
            KvpPool::EXTERNAL | KvpPool::GUEST => {
                let pools = self.pools.borrow();
                match pools[usize::from(pool.0)]
                    .iter()
                    .find(|e| key.units().eq(e.key.iter().copied()))
                {
                    Some(e) => e.value.clone(),
                    None => return Ok(IcStatus::S_CONT),
                }
            }
            _ => return Ok(IcStatus::S_CONT),
        };
        let body = reply.body(KVP_GET_SET_SIZE);
        let mut record = KvpRecordMut::new(body.get_mut(KVP_BODY_OFFSET..).unwrap_or(&mut []))?;
        record.set_value_string(value.iter().copied())?;
        Ok(IcStatus::S_OK)
    }

    fn set(&self, pool: KvpPool, key: KvpString<'_>, value: KvpValue<'_>) -> IcStatus {
        if !matches!(pool, KvpPool::EXTERNAL | KvpPool::GUEST) {
            return IcStatus::S_CONT;
        }
        let value: Vec<u16> = match value {
            KvpValue::String(s) => s.units().collect(),
            KvpValue::U32(n) => format!("{n}").encode_utf16().collect(),
            KvpValue::U64(n) => format!("{n}").encode_utf16().collect(),
        };
        let mut pools = self.pools.borrow_mut();
        let entries = &mut pools[usize::from(pool.0)];
        if let Some(e) = entries
            .iter_mut()
            .find(|e| key.units().eq(e.key.iter().copied()))
        {
            e.value = value;
            return IcStatus::S_OK;
        }
        if entries.len() >= KVP_MAX_ENTRIES_PER_POOL {
            return IcStatus::S_CONT;
        }
        entries.push(Entry {
            key: key.units().collect(),
            value,
        });
        IcStatus::S_OK
    }

    fn delete(&self, pool: KvpPool, key: KvpString<'_>) -> IcStatus {
        if !matches!(pool, KvpPool::EXTERNAL | KvpPool::GUEST) {
            return IcStatus::S_CONT;
        }
        let mut pools = self.pools.borrow_mut();
        let entries = &mut pools[usize::from(pool.0)];
        match entries
            .iter()
            .position(|e| key.units().eq(e.key.iter().copied()))
        {
            Some(at) => {
                entries.remove(at);
                IcStatus::S_OK
            }
            None => IcStatus::S_CONT,
        }
    }

    fn ip_info(
        &self,
        adapter_id: KvpString<'_>,
        reply: &mut Reply,
    ) -> Result<IcStatus, DropReason> {
        let text: String = adapter_id.chars().collect();
        let id = AdapterId {
            mac: parse_mac(&text),
            text,
        };
        let Some(info) = self.source.ip_info(&id) else {
            return Ok(IcStatus::E_FAIL);
        };
        let body = reply.body(KVP_IP_INFO_SIZE);
        let mut out = KvpIpInfoMut::new(body)?;
        out.set_field(IpInfoField::AdapterId, &truncate_units(id.text, 127))?;
        out.set_addr_family(address_family(&info));
        out.set_dhcp_enabled(info.dhcp_enabled);
        let ip = MAX_IP_ADDR_SIZE - 1;
        out.set_field(
            IpInfoField::IpAddr,
            &join_fitting(info.addresses.iter().map(|a| format!("{}", a.address)), ip),
        )?;
        out.set_field(
            IpInfoField::SubNet,
            &join_fitting(
                info.addresses
                    .iter()
                    .map(|a| subnet(a.address, a.prefix_len)),
                ip,
            ),
        )?;
        out.set_field(
            IpInfoField::GateWay,
            &join_fitting(
                info.gateways.iter().map(|a| format!("{a}")),
                MAX_GATEWAY_SIZE - 1,
            ),
        )?;
        out.set_field(
            IpInfoField::DnsAddr,
            &join_fitting(info.dns_servers.iter().map(|a| format!("{a}")), ip),
        )?;
        Ok(IcStatus::S_OK)
    }
}

impl Service for Kvp {
    const NAME: &'static str = "kvp";
    const CLASS: Guid = HV_KVP_GUID;
    const MSG_TYPE: IcMsgType = IcMsgType::KVPEXCHANGE;
    const VERSIONS: &'static [IcVersion] = &GUEST_KVP_VERSIONS;
    type After = ();

    fn counters(&self) -> &Cell<ChannelCounters> {
        &self.counters
    }

    fn handle(
        &self,
        msg: &IcMessage<'_>,
        _version: IcVersion,
        reply: &mut Reply,
    ) -> Result<Option<()>, DropReason> {
        let request = KvpRequest::parse(msg.body)?;
        let pool = request.pool();
        if pool.0 > KvpPool::AUTO_INTERNAL.0 {
            return Err(DropReason::BadPool(pool.0));
        }
        let status = match request {
            KvpRequest::Enumerate { pool, index } => {
                self.update(|s| s.enumerates += 1);
                self.enumerate(pool, index, reply)?
            }
            KvpRequest::Get { pool, key } => {
                self.update(|s| s.gets += 1);
                self.get(pool, key, reply)?
            }
            KvpRequest::Set { pool, key, value } => {
                self.update(|s| s.sets += 1);
                self.set(pool, key, value)
            }
            KvpRequest::Delete { pool, key } => {
                self.update(|s| s.deletes += 1);
                self.delete(pool, key)
            }
            KvpRequest::GetIpInfo { adapter_id, .. } => {
                self.update(|s| s.ip_info_requests += 1);
                self.ip_info(adapter_id, reply)?
            }
            KvpRequest::SetIpInfo { .. } => {
                self.update(|s| s.set_ip_info_requests += 1);
                IcStatus::NOT_SUPPORTED
            }
        };
        match status {
            IcStatus::S_OK => {}
            IcStatus::S_CONT => self.update(|s| s.no_more_items += 1),
            _ => self.update(|s| s.failures += 1),
        }
        reply.set_status(status);
        Ok(None)
    }

    fn after_reply(&self, _after: ()) {}
}

/// `s` cut (at a character boundary) to at most `max` UTF-16 units.
fn truncate_units(mut s: String, max: usize) -> String {
    let mut units = 0;
    let mut end = s.len();
    for (at, c) in s.char_indices() {
        if units + c.len_utf16() > max {
            end = at;
            break;
        }
        units += c.len_utf16();
    }
    s.truncate(end);
    s
}

/// `items` joined by `;`, as many whole items as fit in `max` UTF-16 units.
fn join_fitting(items: impl Iterator<Item = String>, max: usize) -> String {
    let mut out = String::new();
    let mut units = 0;
    for item in items {
        let extra = item.encode_utf16().count() + usize::from(!out.is_empty());
        if units + extra > max {
            break;
        }
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(&item);
        units += extra;
    }
    out
}

/// A subnet as Linux's daemon writes it: a dotted mask for IPv4, `/prefix` for IPv6.
fn subnet(address: IpAddr, prefix_len: u8) -> String {
    match address {
        IpAddr::V4(_) => {
            let bits = u32::from(prefix_len.min(32));
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            format!("{}", Ipv4Addr::from(mask))
        }
        IpAddr::V6(_) => format!("/{}", prefix_len.min(128)),
    }
}

fn address_family(info: &IpInfo) -> u8 {
    info.addresses.iter().fold(0, |f, a| {
        f | match a.address {
            IpAddr::V4(_) => ADDR_FAMILY_IPV4,
            IpAddr::V6(_) => ADDR_FAMILY_IPV6,
        }
    })
}

/// A MAC address written as twelve hex digits, optionally separated by `:` or `-`
/// (Linux's daemon compares against `00:15:5D:...` in upper case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut digits = 0usize;
    for c in text.trim().chars() {
        if c == ':' || c == '-' {
            continue;
        }
        let d = c.to_digit(16)? as u8;
        let byte = mac.get_mut(digits / 2)?;
        *byte = (*byte << 4) | d;
        digits += 1;
    }
    (digits == 12).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn macs() {
        let m = [0x00, 0x15, 0x5d, 0x0a, 0xbc, 0xde];
        assert_eq!(parse_mac("00:15:5D:0A:BC:DE"), Some(m));
        assert_eq!(parse_mac("00-15-5d-0a-bc-de"), Some(m));
        assert_eq!(parse_mac("00155D0ABCDE"), Some(m));
        assert_eq!(parse_mac("00:15:5D:0A:BC"), None);
        assert_eq!(parse_mac("00:15:5D:0A:BC:DE:01"), None);
        assert_eq!(parse_mac("{3e4f...}"), None);
    }

    #[test]
    fn fitting() {
        let items = vec![String::from("10.0.0.1"), String::from("10.0.0.22")];
        assert_eq!(
            join_fitting(items.clone().into_iter(), 100),
            "10.0.0.1;10.0.0.22"
        );
        assert_eq!(join_fitting(items.clone().into_iter(), 17), "10.0.0.1");
        assert_eq!(join_fitting(items.into_iter(), 18), "10.0.0.1;10.0.0.22");
        assert_eq!(truncate_units(String::from("héllo"), 3), "hél");
        assert_eq!(truncate_units(String::from("a\u{1f600}b"), 2), "a");
        assert_eq!(
            subnet(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 24),
            "255.255.255.0"
        );
        assert_eq!(subnet(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), "0.0.0.0");
        assert_eq!(
            subnet(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 40),
            "255.255.255.255"
        );
        assert_eq!(
            subnet(IpAddr::V6(core::net::Ipv6Addr::UNSPECIFIED), 64),
            "/64"
        );
    }
}
