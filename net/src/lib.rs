//! hvnet-net: the appliance's network side on smoltcp.
//!
//! NIC drivers hand each NIC they bring up to the [`InterfaceManager`] through the
//! [`NicRegistry`](hvnet_netvsc::nic::NicRegistry) trait, holding the configuration lock
//! (the product's rtnl) as they do. The manager names it `ethN`, builds an [`Interface`]
//! on it and spawns a task that serves it: smoltcp, a DHCPv4 client, ICMP echo, the status
//! endpoint and (when enabled) the echo service. Unregistering takes all of it away.
//!
//! # Layers
//! - [`device`]: the smoltcp `Device` over a [`Nic`](hvnet_netvsc::nic::Nic): frames
//!   received without a copy, send-room exhaustion turned into back-pressure.
//! - [`iface`]: one interface: smoltcp `Interface` and sockets, DHCP lease handling,
//!   services; synchronous, polled with the time passed in.
//! - [`manager`]: the registry, the interface table under the configuration lock, stable
//!   names, the per-interface tasks.
//! - [`services`]: HTTP status (JSON) on port 80, echo on port 7.
//! - [`azure`]: the Azure guest agent (Ready report to the WireServer, IMDS read), run
//!   by the interface that holds the route to the WireServer.
//!
//! Time, spawning and randomness come from the runtime [`Handle`](hvnet_runtime::Handle),
//! so the same code runs on the kernel executor and, in tests, under the deterministic
//! simulation.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod azure;
pub mod device;
pub mod iface;
pub mod manager;
pub mod services;

pub use azure::{AzureConfig, AzureState, AzureStatus, ImdsState};
pub use device::{DeviceStats, NicDevice};
pub use iface::{Addressing, Interface, InterfaceConfig, InterfaceEvent, IpConfig};
pub use manager::{
    InterfaceManager, InterfaceRef, InterfaceTable, ManagerConfig, Route, SetMtuError,
};
pub use services::echo::EchoConfig;
pub use services::status::{status_json, StatusConfig, StatusSnapshot};
