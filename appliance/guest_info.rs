//! What the appliance tells Hyper-V about itself through KVP: its host name and, per
//! network adapter, the addresses DHCP gave it. Hyper-V Manager's Networking tab and
//! `Get-VMNetworkAdapter` show these, and the hotplug soak script waits on them.
//!
//! The source is the interface manager's status snapshot, taken at each host request, so
//! the answer always reflects the interfaces as they are (hot-added NICs appear once they
//! have a lease, removed ones disappear).

use alloc::string::String;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr};

use hvnet_ic::{AdapterId, AddressInfo, IpInfo, KvpSource};
use hvnet_net::StatusSnapshot;

/// Host name reported when nothing better is known.
pub const DEFAULT_HOST_NAME: &str = "hvnet";

/// A [`KvpSource`] over status snapshots.
pub struct NetworkKvp<S> {
    snapshot: S,
}

impl<S: Fn() -> StatusSnapshot> NetworkKvp<S> {
    /// Reports what `snapshot` returns at each request.
    pub fn new(snapshot: S) -> Self {
        NetworkKvp { snapshot }
    }
}

impl<S: Fn() -> StatusSnapshot> KvpSource for NetworkKvp<S> {
    fn fully_qualified_domain_name(&self) -> String {
        // The Azure VM name is the name the operator gave the machine; use it once IMDS
        // has told us.
        (self.snapshot)()
            .azure
            .and_then(|a| a.imds_info)
            .map(|i| i.name)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| String::from(DEFAULT_HOST_NAME))
    }

    fn ipv4_addresses(&self) -> Vec<Ipv4Addr> {
        let snapshot = (self.snapshot)();
        let mut out: Vec<Ipv4Addr> = Vec::new();
        for addr in snapshot.interfaces.iter().flat_map(|i| &i.addresses) {
            if !out.contains(&addr.address()) {
                out.push(addr.address());
            }
        }
        out
    }

    fn ip_info(&self, id: &AdapterId) -> Option<IpInfo> {
        let snapshot = (self.snapshot)();
        let iface = snapshot.interfaces.iter().find(|i| match id.mac {
            Some(mac) => i.mac == mac,
            // Not a MAC: the host may name the adapter by its VMBus instance id.
            None => i.id.eq_ignore_ascii_case(id.text.trim_matches(['{', '}'])),
        })?;
        Some(IpInfo {
            addresses: iface
                .addresses
                .iter()
                .map(|c| AddressInfo {
                    address: IpAddr::V4(c.address()),
                    prefix_len: c.prefix_len(),
                })
                .collect(),
            gateways: iface.gateway.into_iter().map(IpAddr::V4).collect(),
            dns_servers: iface.dns.iter().copied().map(IpAddr::V4).collect(),
            dhcp_enabled: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use hvnet_net::services::status::InterfaceStatus;
    use smoltcp::wire::Ipv4Cidr;

    fn iface(name: &str, id: &str, mac: [u8; 6], addrs: &[([u8; 4], u8)]) -> InterfaceStatus {
        InterfaceStatus {
            name: name.into(),
            id: id.into(),
            mac,
            addresses: addrs
                .iter()
                .map(|&(a, p)| Ipv4Cidr::new(Ipv4Addr::from(a), p))
                .collect(),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 2)],
            ..Default::default()
        }
    }

    fn world() -> StatusSnapshot {
        StatusSnapshot {
            interfaces: vec![
                iface(
                    "eth0",
                    "guid-a",
                    [0, 0x15, 0x5d, 0, 0, 1],
                    &[([10, 0, 0, 5], 24)],
                ),
                iface("eth1", "guid-b", [0, 0x15, 0x5d, 0, 0, 2], &[]),
                iface(
                    "eth2",
                    "GUID-C",
                    [0, 0x15, 0x5d, 0, 0, 3],
                    &[([10, 0, 1, 7], 16), ([10, 0, 0, 5], 24)],
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn addresses_of_every_interface_once_in_interface_order() {
        let kvp = NetworkKvp::new(world);
        assert_eq!(
            kvp.ipv4_addresses(),
            [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 1, 7)]
        );
        assert_eq!(kvp.fully_qualified_domain_name(), DEFAULT_HOST_NAME);
    }

    #[test]
    fn ip_info_by_mac_or_instance_id() {
        let kvp = NetworkKvp::new(world);
        let by_mac = AdapterId {
            text: "00:15:5D:00:00:03".into(),
            mac: Some([0, 0x15, 0x5d, 0, 0, 3]),
        };
        let info = kvp.ip_info(&by_mac).expect("eth2");
        assert_eq!(info.addresses.len(), 2);
        assert_eq!(
            info.addresses[0].address,
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7))
        );
        assert_eq!(info.addresses[0].prefix_len, 16);
        assert_eq!(info.gateways, [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))]);
        assert_eq!(info.dns_servers, [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))]);
        assert!(info.dhcp_enabled);

        let by_guid = AdapterId {
            text: "{guid-c}".into(),
            mac: None,
        };
        assert_eq!(kvp.ip_info(&by_guid), Some(info));
    }

    #[test]
    fn unknown_adapter_and_no_interfaces() {
        let kvp = NetworkKvp::new(world);
        let unknown = AdapterId {
            text: "00:15:5D:00:00:09".into(),
            mac: Some([0, 0x15, 0x5d, 0, 0, 9]),
        };
        assert_eq!(kvp.ip_info(&unknown), None);
        let empty = NetworkKvp::new(StatusSnapshot::default);
        assert!(empty.ipv4_addresses().is_empty());
    }
}
