//! Hyper-V integration services ("util" ICs): heartbeat, shutdown, time sync and KVP.
//!
//! Each service is a VMBus device with its own class GUID and one channel. The host
//! drives the conversation with requests; the guest answers. What all four share (open
//! the channel, answer the version negotiation, frame answers, drop bad input) is in
//! [`channel`]; each service is a module:
//!
//! - [`heartbeat`]: answers the host's sequence number plus one.
//! - [`shutdown`]: answers power-off and restart requests with S_OK, then calls the
//!   appliance's [`PowerControl`]; refuses hibernation.
//! - [`timesync`]: hands the host's time to the appliance's [`Clock`].
//! - [`kvp`]: serves the well-known guest keys from the appliance's [`KvpSource`]
//!   (host name, addresses, OS) and small stores the host may write.
//!
//! The appliance calls [`register_ic_drivers`] before connecting the bus; the returned
//! [`IcDrivers`] gives counters for the status page ([`IcDrivers::stats`]) and closes the
//! channels on an orderly shutdown ([`IcDrivers::close`]).
//!
//! # Host input
//!
//! The host is not trusted. Every message passes the checked parsers of
//! [`hvnet_wire::ic`]; anything malformed (short packet, sizes beyond the packet, bad
//! version counts, oversized KVP strings, a message type the channel does not carry) is
//! dropped without an answer and counted; nothing panics and the channel keeps working.
//! Linux answers some of these with `E_FAIL` instead: an answer to a request we could not
//! read would claim to echo a transaction we did not understand.
//!
//! Sources: `shared/reference/hyperv-facts.md` section 8 (Linux `drivers/hv/hv_util.c`,
//! `hv_kvp.c`, `tools/hv/hv_kvp_daemon.c`; OpenVMM `vm/devices/hyperv_ic`).

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod channel;
pub mod heartbeat;
pub mod kvp;
pub mod shutdown;
pub mod timesync;

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hvnet_vmbus::bus::VmBus;

use crate::channel::{IcDriver, Instances};
use crate::heartbeat::{Heartbeat, HeartbeatStats};
use crate::kvp::{Kvp, KvpStats};
use crate::shutdown::{Shutdown, ShutdownStats};
use crate::timesync::{Timesync, TimesyncStats};

pub use crate::channel::{ChannelCounters, DropReason};
pub use crate::kvp::parse_mac;

/// What the appliance does when the host asks it to go away. The shutdown driver calls
/// it once, after its S_OK answer is in the ring; the implementation closes channels,
/// sends VMBus UNLOAD and powers off (or resets). It must not wait on the IC channel.
pub trait PowerControl {
    /// Power off (`reboot == false`) or restart (`reboot == true`).
    fn shutdown(&self, reboot: bool);
}

/// The appliance's wall clock, as the time-sync driver sets it.
pub trait Clock {
    /// Sets the clock to `unix_100ns` (100 ns units since 1970-01-01 UTC). Called for
    /// the host's `SYNC` messages.
    fn set_time(&self, unix_100ns: u64);

    /// A periodic host sample (`SAMPLE` messages). The default sets the clock; an
    /// implementation may slew towards the sample instead.
    fn sample(&self, unix_100ns: u64) {
        self.set_time(unix_100ns);
    }

    /// The partition reference counter (Hyper-V TIME_REF_COUNT, 100 ns units), if the
    /// clock can read it: version 4 samples are then advanced by the time elapsed since
    /// the host took them.
    fn reference_counter(&self) -> Option<u64> {
        None
    }
}

/// Operating-system facts reported in KVP pool 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsInfo {
    /// `OSName`.
    pub os_name: String,
    /// `OSMajorVersion`.
    pub os_major_version: String,
    /// `OSMinorVersion`.
    pub os_minor_version: String,
    /// `OSVersion`.
    pub os_version: String,
    /// `OSBuildNumber`.
    pub os_build_number: String,
    /// `ProcessorArchitecture`.
    pub processor_architecture: String,
    /// `IntegrationServicesVersion` (Linux reports its driver version, "3.1").
    pub integration_services_version: String,
}

impl Default for OsInfo {
    /// hvnet's own values: name "hvnet", the crate version, x86_64.
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        let mut parts = version.split('.');
        let major = parts.next().unwrap_or("0");
        let minor = parts.next().unwrap_or("0");
        OsInfo {
            os_name: String::from("hvnet"),
            os_major_version: String::from(major),
            os_minor_version: String::from(minor),
            os_version: String::from(version),
            os_build_number: String::from(version),
            processor_architecture: String::from("x86_64"),
            integration_services_version: String::from("3.1"),
        }
    }
}

/// An adapter named by a GET_IP_INFO request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterId {
    /// The id as the host wrote it.
    pub text: String,
    /// The MAC address, if the id is one (Linux's daemon expects `00:15:5D:...`).
    pub mac: Option<[u8; 6]>,
}

/// An address of an adapter with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressInfo {
    /// The address.
    pub address: IpAddr,
    /// Prefix length (the subnet).
    pub prefix_len: u8,
}

/// An adapter's IP configuration, for GET_IP_INFO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpInfo {
    /// Addresses (IPv4 and IPv6).
    pub addresses: Vec<AddressInfo>,
    /// Default gateways.
    pub gateways: Vec<IpAddr>,
    /// DNS servers.
    pub dns_servers: Vec<IpAddr>,
    /// Whether the addresses came from DHCP.
    pub dhcp_enabled: bool,
}

/// What the KVP driver reports about the guest; implemented by the appliance over its
/// interface table.
pub trait KvpSource {
    /// `FullyQualifiedDomainName`: the host name (with domain, if known).
    fn fully_qualified_domain_name(&self) -> String;

    /// `NetworkAddressIPv4`: every IPv4 address of every interface.
    fn ipv4_addresses(&self) -> Vec<Ipv4Addr>;

    /// `NetworkAddressIPv6`: every IPv6 address (none by default).
    fn ipv6_addresses(&self) -> Vec<Ipv6Addr> {
        Vec::new()
    }

    /// The OS keys ([`OsInfo::default`] unless overridden).
    fn os_info(&self) -> OsInfo {
        OsInfo::default()
    }

    /// The configuration of the adapter `id` names, or `None` if there is no such
    /// adapter (the host then gets `E_FAIL`).
    fn ip_info(&self, id: &AdapterId) -> Option<IpInfo> {
        let _ = id;
        None
    }
}

/// Counters of all four services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcStats {
    /// Heartbeat.
    pub heartbeat: HeartbeatStats,
    /// Shutdown.
    pub shutdown: ShutdownStats,
    /// Time sync.
    pub timesync: TimesyncStats,
    /// KVP.
    pub kvp: KvpStats,
}

/// The registered IC drivers. Cheap to clone.
#[derive(Clone)]
pub struct IcDrivers {
    heartbeat: Rc<Heartbeat>,
    shutdown: Rc<Shutdown>,
    timesync: Rc<Timesync>,
    kvp: Rc<Kvp>,
    instances: Instances,
}

impl IcDrivers {
    /// Counters of every service (over all channels each has had).
    pub fn stats(&self) -> IcStats {
        IcStats {
            heartbeat: self.heartbeat.stats(),
            shutdown: self.shutdown.stats(),
            timesync: self.timesync.stats(),
            kvp: self.kvp.stats(),
        }
    }

    /// Channels open now.
    pub fn open_channels(&self) -> usize {
        let mut list = self.instances.borrow_mut();
        list.retain(|w| w.strong_count() > 0);
        list.iter()
            .filter(|w| w.upgrade().is_some_and(|i| i.is_open()))
            .count()
    }

    /// Stops every IC task and closes its channel (before VMBus UNLOAD on an orderly
    /// shutdown). A channel rescinded meanwhile is left to the bus.
    pub async fn close(&self) {
        let live: Vec<_> = self
            .instances
            .borrow()
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for instance in live {
            instance.close().await;
        }
    }
}

/// Registers the four IC drivers with `bus` (before [`VmBus::connect`], so the offers
/// that arrive find them). `power`, `clock` and `kvp` are the appliance's side of
/// shutdown, time sync and KVP.
pub fn register_ic_drivers(
    bus: &VmBus,
    power: Rc<dyn PowerControl>,
    clock: Rc<dyn Clock>,
    kvp: Rc<dyn KvpSource>,
) -> IcDrivers {
    let instances: Instances = Rc::new(RefCell::new(Vec::new()));
    let drivers = IcDrivers {
        heartbeat: Rc::new(Heartbeat::default()),
        shutdown: Rc::new(Shutdown::new(power)),
        timesync: Rc::new(Timesync::new(clock)),
        kvp: Rc::new(Kvp::new(kvp)),
        instances: instances.clone(),
    };
    bus.register_driver(Rc::new(IcDriver::new(
        drivers.heartbeat.clone(),
        instances.clone(),
    )));
    bus.register_driver(Rc::new(IcDriver::new(
        drivers.shutdown.clone(),
        instances.clone(),
    )));
    bus.register_driver(Rc::new(IcDriver::new(
        drivers.timesync.clone(),
        instances.clone(),
    )));
    bus.register_driver(Rc::new(IcDriver::new(drivers.kvp.clone(), instances)));
    drivers
}
