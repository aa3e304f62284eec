//! The Azure agent against hvemu's simulated fabric, under the deterministic scheduler.
//!
//! The LAN is as on Azure: a DHCP server hands out leases naming the fabric as router,
//! and the WireServer (168.63.129.16) and IMDS (169.254.169.254) are off the subnet,
//! behind that gateway. The appliance reports Ready and reads IMDS through its default
//! route. The fabric's fault hooks make it fail with 500s, black-hole connections, send
//! malformed responses and move the incarnation; the agent must get through all of it,
//! give up cleanly at its attempt limit, never disturb the rest of the appliance, and
//! follow its route to another NIC when the one it ran on is hot-removed.
//!
//! Most tests use fake NICs on a hub (fast, many seeds); the last two run the whole
//! guest stack (VMBus, netvsc) against hvemu's netvsp NICs on the virtual switch.

mod support;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;

use hvemu::lan::Lan;
use hvemu::netvsp::{Netvsp, NetvspConfig};
use hvemu::peers::{
    self, AzureFabric, AzureFabricConfig, DhcpServer, DhcpServerConfig, FlowState, HttpResponse,
    ImdsNic, Malformation, PeerHost,
};
use hvemu::{DeviceId, HostConfig};
use hvnet_net::azure::{AgentError, AzureConfig};
use hvnet_net::{AzureState, AzureStatus, ImdsState, InterfaceManager, ManagerConfig};
use hvnet_netvsc::nic::NicRegistry;
use hvnet_netvsc::{NetvscConfig, NetvscDriver};
use hvnet_runtime::testing::check_seeds;
use hvnet_runtime::{Duration, Handle};
use hvnet_vmbus::bus::VmBusConfig;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

type Outcome = Result<(), String>;

/// The fabric: the LAN's gateway.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The DHCP server (not the router here).
const DHCP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const FABRIC_MAC: [u8; 6] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc];
const INSTANCE: &str = "b61f93d0-e1ed-40b2-b067-22c243233448.hvnet_<&\"'>_IN_0";

fn lan_dhcp() -> DhcpServerConfig {
    DhcpServerConfig {
        mac: [0x02, 0, 0, 0, 0, 3],
        server_ip: DHCP_IP,
        prefix_len: 24,
        pool_start: POOL_START,
        pool_size: 50,
        router: Some(GATEWAY),
        dns: vec![DHCP_IP],
        lease_secs: LEASE_SECS,
    }
}

fn fabric_config(seed: u64) -> AzureFabricConfig {
    let mut config = AzureFabricConfig::new(FABRIC_MAC, GATEWAY, 24);
    config.incarnation = 1 + seed % 7;
    config.container_id = format!("c6d5526c-5ac2-4200-b6e2-{seed:012x}");
    config.instance_id = INSTANCE.to_string();
    config.vm_name = format!("hvnet-{seed}");
    config.vm_size = "Standard_D4s_v5".to_string();
    config.location = "northeurope".to_string();
    config.interfaces = vec![ImdsNic {
        mac: mac(1),
        private_ipv4: vec![POOL_START],
    }];
    config
}

/// The agent on, with the product's defaults otherwise.
fn azure_on() -> ManagerConfig {
    let mut config = test_config();
    config.azure = AzureConfig {
        enabled: true,
        ..AzureConfig::default()
    };
    config
}

struct AzWorld {
    handle: Handle,
    wire: Rc<Wire>,
    fabric: peers::Shared<AzureFabric>,
    peer: peers::Shared<PeerHost>,
    manager: InterfaceManager,
}

fn az_world(handle: &Handle, seed: u64, config: ManagerConfig) -> AzWorld {
    let wire = Wire::new();
    let fabric = host_scope(|| peers::shared(AzureFabric::new(fabric_config(seed))));
    let dhcp = host_scope(|| peers::shared(DhcpServer::new(lan_dhcp())));
    let peer = lan_peer();
    wire.attach(fabric.clone());
    wire.attach(dhcp);
    wire.attach(peer.clone());
    spawn_wire(handle, wire.clone());
    AzWorld {
        handle: handle.clone(),
        wire,
        fabric,
        peer,
        manager: InterfaceManager::new(handle.clone(), config),
    }
}

/// Runs `body` for `seed` in a fresh world (manager `config`, the fabric set up by
/// `fabric`) once NIC "nic-a" with `queues` queues is registered and eth0 has its lease;
/// `body` gets the world and that address.
fn on_leased_nic<Fut>(
    seed: u64,
    config: ManagerConfig,
    queues: usize,
    fabric: impl FnOnce(&mut AzureFabric),
    body: impl FnOnce(Rc<AzWorld>, Ipv4Addr) -> Fut + 'static,
) -> Outcome
where
    Fut: std::future::Future<Output = Outcome> + 'static,
{
    let sim = sim(seed);
    let w = Rc::new(az_world(&sim.handle(), seed, config));
    w.fabric(fabric);
    let nic = w.wire.nic("nic-a", mac(1), queues);
    sim.run(async move {
        register(&w.manager, &nic).await;
        let address = w.lease("eth0").await?;
        body(w, address).await
    })
    .map_err(|e| e.to_string())?
}

impl AzWorld {
    fn fabric<R>(&self, f: impl FnOnce(&mut AzureFabric) -> R) -> R {
        let r = host_scope(|| f(&mut self.fabric.borrow_mut()));
        self.wire.activity.set();
        r
    }

    fn status(&self) -> AzureStatus {
        self.manager.azure_status()
    }

    async fn until(&self, limit: Duration, what: &str, f: impl FnMut() -> bool) -> Outcome {
        wait_until(&self.handle, limit, what, f).await.map_err(|e| {
            format!(
                "{e}; agent {:?}; fabric {:?}",
                self.status(),
                self.fabric(|f| f.counters())
            )
        })
    }

    async fn settled(&self, limit: Duration) -> Result<AzureStatus, String> {
        self.until(limit, "the Ready report to settle", || {
            matches!(self.status().state, AzureState::Ready | AzureState::Failed)
        })
        .await?;
        Ok(self.status())
    }

    async fn lease(&self, name: &str) -> Result<Ipv4Addr, String> {
        let manager = self.manager.clone();
        let name_owned = name.to_string();
        self.until(Duration::from_secs(60), "a lease", || {
            address_of(&manager, &name_owned).is_some()
        })
        .await?;
        address_of(&self.manager, name).ok_or_else(|| format!("{name} lost its address"))
    }

    fn act<R>(&self, f: impl FnOnce(&mut PeerHost) -> R) -> R {
        let r = host_scope(|| f(&mut self.peer.borrow_mut()));
        self.wire.activity.set();
        r
    }

    async fn ping(&self, target: Ipv4Addr, count: u16) -> Outcome {
        let id = self.act(|p| p.ping(target, count));
        let peer = self.peer.clone();
        self.until(Duration::from_secs(30), "ping replies", || {
            host_scope(|| peer.borrow().ping_status(id).is_some_and(|s| s.done))
        })
        .await?;
        let status = host_scope(|| self.peer.borrow().ping_status(id).cloned()).ok_or("no ping")?;
        ensure(status.received == count, || {
            format!("ping of {target}: {status:?}")
        })
    }

    async fn http_get(&self, target: Ipv4Addr, path: &str) -> Result<HttpResponse, String> {
        let id = self.act(|p| p.http_get(target, 80, path));
        let peer = self.peer.clone();
        self.until(Duration::from_secs(30), "an HTTP response", || {
            host_scope(|| {
                peer.borrow()
                    .http_status(id)
                    .is_some_and(|s| s.state.is_finished())
            })
        })
        .await?;
        let status =
            host_scope(|| self.peer.borrow().http_status(id).cloned()).ok_or("no status")?;
        match (status.state, status.response) {
            (FlowState::Done, Some(response)) => Ok(response),
            (state, _) => Err(format!("GET {path}: {state:?}")),
        }
    }

    async fn status_json(&self, target: Ipv4Addr) -> Result<serde_json::Value, String> {
        let page = self.http_get(target, "/status").await?;
        ensure(page.status == 200, || format!("{page:?}"))?;
        serde_json::from_slice(&page.body).map_err(|e| format!("{e}: {}", page.body_text()))
    }
}

/// Checks the one accepted report against the fabric's identity.
fn check_single_ready(w: &AzWorld, seed: u64) -> Outcome {
    let reports = w.fabric(|f| f.reports().to_vec());
    let accepted: Vec<_> = reports.iter().filter(|r| r.is_ready()).collect();
    ensure(accepted.len() == 1, || format!("reports {reports:#?}"))?;
    let report = accepted[0];
    let expected = fabric_config(seed);
    let incarnation = w.fabric(|f| f.config().incarnation);
    ensure(report.incarnation == Some(incarnation), || {
        format!("{report:?}")
    })?;
    ensure(report.container_id == expected.container_id, || {
        format!("{report:?}")
    })?;
    ensure(report.instance_id == INSTANCE, || format!("{report:?}"))?;
    ensure(report.agent_name.as_deref() == Some("hvnet"), || {
        format!("{report:?}")
    })?;
    ensure(
        report.content_type.as_deref() == Some("text/xml;charset=utf-8"),
        || format!("{report:?}"),
    )?;
    let status = w.status();
    ensure(
        status.state == AzureState::Ready
            && status.incarnation == Some(incarnation)
            && status.container_id.as_deref() == Some(expected.container_id.as_str())
            && status.instance_id.as_deref() == Some(INSTANCE)
            && status.last_error.is_none(),
        || format!("{status:?}"),
    )
}

// ---------------------------------------------------------------------------------------

/// Ready is reported exactly once, with the fabric's incarnation, container and instance
/// (escaped on the way out: the instance id has XML's special characters); IMDS is read
/// once and shows in the status JSON; nothing more is sent afterwards.
#[test]
fn ready_is_reported_once_and_imds_is_on_the_status_page() {
    check_seeds(8, |seed| {
        on_leased_nic(
            seed,
            azure_on(),
            2,
            |_| {},
            move |w, address| async move {
                let status = w.settled(Duration::from_secs(60)).await?;
                ensure(status.attempts == 1, || format!("{status:?}"))?;
                ensure(status.interface.as_deref() == Some("eth0"), || {
                    format!("{status:?}")
                })?;
                check_single_ready(&w, seed)?;
                w.until(Duration::from_secs(30), "IMDS", || {
                    w.status().imds == ImdsState::Done
                })
                .await?;
                let status = w.status();
                let info = status.imds_info.clone().ok_or("no IMDS info")?;
                ensure(
                    info.name == format!("hvnet-{seed}")
                        && info.vm_size == "Standard_D4s_v5"
                        && info.location == "northeurope"
                        && status.imds_attempts == 1,
                    || format!("{status:?}"),
                )?;
                ensure(
                    info.interfaces.len() == 1
                        && info.interfaces[0].mac == Some(mac(1))
                        && info.interfaces[0].ipv4 == [POOL_START],
                    || format!("{info:?}"),
                )?;
                let json = w.status_json(address).await?;
                let azure = &json["azure"];
                let checks = [
                    (azure["enabled"] == true, "enabled"),
                    (azure["state"] == "ready", "state"),
                    (azure["interface"] == "eth0", "interface"),
                    (azure["attempts"] == 1, "attempts"),
                    (azure["instance_id"] == INSTANCE, "instance"),
                    (azure["imds"]["state"] == "done", "imds state"),
                    (
                        azure["imds"]["vm_name"] == format!("hvnet-{seed}"),
                        "vm name",
                    ),
                    (azure["imds"]["vm_size"] == "Standard_D4s_v5", "vm size"),
                    (azure["imds"]["location"] == "northeurope", "location"),
                    (
                        azure["imds"]["interfaces"][0]["mac"] == "00:15:5d:00:00:01",
                        "mac",
                    ),
                    (
                        azure["imds"]["interfaces"][0]["ipv4"][0] == POOL_START.to_string(),
                        "ipv4",
                    ),
                    (
                        json["interfaces"][0]["name"] == "eth0",
                        "interfaces untouched",
                    ),
                ];
                for (ok, what) in checks {
                    ensure(ok, || format!("{what} wrong in {json:#}"))?;
                }
                // Once per boot: a long wait sends nothing more.
                let before = w.fabric(|f| f.counters());
                w.handle.sleep(Duration::from_secs(300)).await;
                let after = w.fabric(|f| f.counters());
                ensure(
                    (after.goal_state, after.health, after.imds) == (1, 1, 1) && before == after,
                    || format!("{before:?} then {after:?}"),
                )?;
                check_single_ready(&w, seed)
            },
        )
    });
}

/// 500s on every path: the report is retried (goal state fetched again each time) with
/// a backoff that doubles from 1 s, and IMDS is retried on its own.
#[test]
fn server_errors_are_retried_with_backoff() {
    check_seeds(6, |seed| {
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| {
                let faults = f.faults_mut();
                faults.fail_goal_state = 3;
                faults.fail_health = 2;
                faults.fail_imds = 2;
            },
            move |w, _| async move {
                let start = w.handle.now();
                let status = w.settled(Duration::from_secs(600)).await?;
                let took = w.handle.now().saturating_duration_since(start);
                // Attempts 1-3: goal state 500; 4-5: health 500; 6: through.
                ensure(status.attempts == 6, || format!("{status:?}"))?;
                // Waits after attempts 1..5: 1 + 2 + 4 + 8 + 15 s.
                ensure(
                    took >= Duration::from_secs(30) && took < Duration::from_secs(90),
                    || format!("took {took:?}"),
                )?;
                let c = w.fabric(|f| f.counters());
                ensure(
                    (c.goal_state, c.health, c.injected_failures) == (6, 3, 7),
                    || format!("{c:?}"),
                )?;
                check_single_ready(&w, seed)?;
                w.until(Duration::from_secs(60), "IMDS", || {
                    w.status().imds == ImdsState::Done
                })
                .await?;
                let status = w.status();
                ensure(
                    status.imds_attempts == 3 && status.imds_error.is_none(),
                    || format!("{status:?}"),
                )
            },
        )
    });
}

/// Connections the fabric ignores time out and are retried; every black-holed
/// connection costs exactly one failed attempt of the report or of IMDS.
#[test]
fn timeouts_are_retried() {
    check_seeds(6, |seed| {
        let ignored = 1 + (seed % 3) as u32;
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| f.faults_mut().ignore_connections = ignored,
            move |w, _| async move {
                w.settled(Duration::from_secs(600)).await?;
                check_single_ready(&w, seed)?;
                w.until(Duration::from_secs(120), "IMDS", || {
                    w.status().imds == ImdsState::Done
                })
                .await?;
                let status = w.status();
                let c = w.fabric(|f| f.counters());
                ensure(c.ignored_connections == u64::from(ignored), || {
                    format!("{c:?}")
                })?;
                ensure(
                    status.attempts + status.imds_attempts == 2 + ignored,
                    || format!("{status:?} with {ignored} connections ignored"),
                )
            },
        )
    });
}

/// Malformed responses (garbage XML, truncated, absurd Content-Length, broken chunking,
/// oversized bodies either way, not HTTP at all) each fail one attempt, and the next
/// attempt goes through; the same for IMDS.
#[test]
fn bad_responses_are_retried() {
    check_seeds(6, |seed| {
        let spoils = [
            Malformation::GarbageBody,
            Malformation::TruncatedBody,
            Malformation::HugeContentLength,
            Malformation::BadChunked,
            Malformation::OversizedBody,
            Malformation::OversizedChunked,
            Malformation::GarbageStatusLine,
        ];
        // A different order per seed.
        let mut order = spoils.to_vec();
        order.rotate_left((seed as usize) % spoils.len());
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| {
                let faults = f.faults_mut();
                faults.malformed_goal_state = order.iter().copied().collect();
                faults.malformed_imds =
                    [Malformation::GarbageBody, Malformation::TruncatedBody].into();
            },
            move |w, address| async move {
                let status = w.settled(Duration::from_secs(900)).await?;
                ensure(status.attempts == 8, || format!("{status:?}"))?;
                check_single_ready(&w, seed)?;
                w.until(Duration::from_secs(120), "IMDS", || {
                    w.status().imds == ImdsState::Done
                })
                .await?;
                ensure(w.status().imds_attempts == 3, || {
                    format!("{:?}", w.status())
                })?;
                ensure(w.fabric(|f| f.counters().malformed) == 9, || {
                    format!("{:?}", w.fabric(|f| f.counters()))
                })?;
                // The appliance is fine after all that.
                w.ping(address, 2).await
            },
        )
    });
}

/// The incarnation moves on right after a goal state was served, and the fabric refuses
/// reports of a stale incarnation: the retry fetches the goal state again and reports
/// the new one.
#[test]
fn a_new_incarnation_is_picked_up_on_retry() {
    check_seeds(4, |seed| {
        let mut config = fabric_config(seed);
        config.strict_incarnation = true;
        let old = config.incarnation;
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| {
                *f = AzureFabric::new(config.clone());
                f.faults_mut().incarnation_after_goal_state = Some(old + 40);
            },
            move |w, _| async move {
                let status = w.settled(Duration::from_secs(120)).await?;
                let reports = w.fabric(|f| f.reports().to_vec());
                let seen: Vec<_> = reports
                    .iter()
                    .map(|r| (r.incarnation, r.accepted))
                    .collect();
                ensure(seen == [(Some(old), false), (Some(old + 40), true)], || {
                    format!("{reports:#?}")
                })?;
                ensure(
                    status.state == AzureState::Ready
                        && status.attempts == 2
                        && status.incarnation == Some(old + 40),
                    || format!("{status:?}"),
                )
            },
        )
    });
}

/// A WireServer that never works: the agent gives up after 30 attempts with a warning
/// and sends nothing more, while ping and the status page answer all along; IMDS is read
/// regardless.
#[test]
fn the_agent_gives_up_without_disturbing_the_appliance() {
    check_seeds(3, |seed| {
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| f.faults_mut().fail_goal_state = u32::MAX,
            move |w, address| async move {
                // While it retries, the appliance answers.
                let mut rounds = 0;
                while w.status().state != AzureState::Failed {
                    w.ping(address, 1).await?;
                    let json = w.status_json(address).await?;
                    ensure(json["interfaces"][0]["name"] == "eth0", || {
                        format!("{json:#}")
                    })?;
                    rounds += 1;
                    ensure(rounds < 400, || format!("still going: {:?}", w.status()))?;
                    w.handle.sleep(Duration::from_secs(2)).await;
                }
                ensure(rounds > 50, || {
                    format!("only {rounds} rounds of traffic during the retries")
                })?;
                let status = w.status();
                ensure(
                    status.attempts == 30 && status.last_error == Some(AgentError::Status(500)),
                    || format!("{status:?}"),
                )?;
                ensure(status.imds == ImdsState::Done, || format!("{status:?}"))?;
                let before = w.fabric(|f| f.counters());
                ensure(before.goal_state == 30 && before.health == 0, || {
                    format!("{before:?}")
                })?;
                w.handle.sleep(Duration::from_secs(600)).await;
                ensure(w.fabric(|f| f.counters()) == before, || {
                    "requests after giving up".into()
                })?;
                let json = w.status_json(address).await?;
                ensure(
                    json["azure"]["state"] == "failed"
                        && json["azure"]["last_error"] == "HTTP status 500",
                    || format!("{json:#}"),
                )
            },
        )
    });
}

/// IMDS that never answers properly is given up after its own few attempts, and the
/// report does not wait for it.
#[test]
fn imds_failure_does_not_hold_back_the_report() {
    check_seeds(3, |seed| {
        on_leased_nic(
            seed,
            azure_on(),
            1,
            |f| f.faults_mut().fail_imds = u32::MAX,
            move |w, _| async move {
                w.settled(Duration::from_secs(60)).await?;
                check_single_ready(&w, seed)?;
                w.until(Duration::from_secs(120), "IMDS to give up", || {
                    w.status().imds == ImdsState::Failed
                })
                .await?;
                let status = w.status();
                ensure(
                    status.imds_attempts == AzureConfig::default().imds_attempts
                        && status.imds_info.is_none()
                        && status.imds_error == Some(AgentError::Status(500)),
                    || format!("{status:?}"),
                )
            },
        )
    });
}

/// With the agent off (the default), nothing is sent to the fabric at all.
#[test]
fn a_disabled_agent_sends_nothing() {
    check_seeds(3, |seed| {
        on_leased_nic(
            seed,
            test_config(),
            1,
            |_| {},
            move |w, address| async move {
                // The fabric is the gateway: it answers ping to its own address, so the
                // route works; the agent just does not use it.
                w.handle.sleep(Duration::from_secs(120)).await;
                let c = w.fabric(|f| f.counters());
                ensure(c.connections == 0 && c.requests == 0, || format!("{c:?}"))?;
                let status = w.status();
                ensure(!status.enabled && status.state == AzureState::Idle, || {
                    format!("{status:?}")
                })?;
                let json = w.status_json(address).await?;
                ensure(
                    json["azure"]["enabled"] == false && json["azure"]["state"] == "idle",
                    || format!("{json:#}"),
                )
            },
        )
    });
}

/// Two NICs; the one running the agent is hot-removed while its first goal state
/// request hangs (the fabric ignores it): the agent moves to the other NIC and reports
/// Ready from there.
#[test]
fn a_hot_removed_nic_hands_the_agent_to_another() {
    check_seeds(8, |seed| {
        let sim = sim(seed);
        let w = Rc::new(az_world(&sim.handle(), seed, azure_on()));
        w.fabric(|f| f.faults_mut().ignore_connections = 1);
        let a = w.wire.nic("nic-a", mac(1), 1);
        let b = w.wire.nic("nic-b", mac(2), 1);
        sim.run(async move {
            register(&w.manager, &a).await;
            register(&w.manager, &b).await;
            w.lease("eth0").await?;
            w.lease("eth1").await?;
            w.until(Duration::from_secs(30), "the first request to hang", || {
                w.fabric(|f| f.counters().ignored_connections) == 1
            })
            .await?;
            let owner = w.status().interface.ok_or("no owner")?;
            let (gone, stays, other) = if owner == "eth0" {
                (&a, &b, "eth1")
            } else {
                (&b, &a, "eth0")
            };
            let tasks = w.handle.task_count();
            gone.remove();
            unregister(&w.manager, gone).await;
            let status = w.settled(Duration::from_secs(120)).await?;
            ensure(status.interface.as_deref() == Some(other), || {
                format!("{status:?}")
            })?;
            ensure(status.attempts == 2, || format!("{status:?}"))?;
            check_single_ready(&w, seed)?;
            w.until(
                Duration::from_secs(5),
                "the removed interface's task to end",
                || w.handle.task_count() == tasks - 1,
            )
            .await?;
            let address = address_of(&w.manager, other).ok_or("no address")?;
            w.ping(address, 1).await?;
            ensure(stays.reentered() == 0, || "NIC re-entered".into())
        })
        .map_err(|e| e.to_string())?
    });
}

// ---------------------------------------------------------------------------------------
// The whole guest stack: VMBus + netvsc over hvemu's netvsp NICs on the virtual switch.

/// A netvsp NIC on the host: its device, its switch port, its MAC.
type Plugged = (DeviceId, hvemu::switch::PortId, [u8; 6]);

struct Stack {
    handle: Handle,
    host: Rc<RefCell<hvemu::VmbusHost>>,
    bus: hvnet_vmbus::bus::VmBus,
    manager: InterfaceManager,
    lan: Rc<RefCell<Lan>>,
    devices: Rc<RefCell<Vec<Plugged>>>,
    fabric: peers::Shared<AzureFabric>,
}

fn nic_mac(n: u32) -> [u8; 6] {
    [0x00, 0x15, 0x5d, 0x30, 0, n as u8]
}

fn stack(handle: &Handle, seed: u64) -> Rc<Stack> {
    let host_config = HostConfig {
        seed,
        ..HostConfig::default()
    };
    let EmuMachine { host, bus, .. } =
        emu_machine(handle, host_config, VmBusConfig::default(), 1 << 17, seed);
    let manager = InterfaceManager::new(handle.clone(), azure_on());
    bus.register_driver(Rc::new(NetvscDriver::new(
        Rc::new(manager.clone()),
        NetvscConfig {
            recv_buffer_bytes: 512 * 1024,
            ring_pages: 16,
            ..NetvscConfig::default()
        },
    )));
    let lan = host_scope(|| Rc::new(RefCell::new(Lan::new())));
    let mut config = fabric_config(seed);
    config.interfaces = vec![ImdsNic {
        mac: nic_mac(0),
        private_ipv4: vec![POOL_START],
    }];
    let fabric = host_scope(|| peers::shared(AzureFabric::new(config)));
    let dhcp = host_scope(|| peers::shared(DhcpServer::new(lan_dhcp())));
    host_scope(|| {
        lan.borrow_mut().attach_peer(fabric.clone());
        lan.borrow_mut().attach_peer(dhcp);
    });
    let s = Rc::new(Stack {
        handle: handle.clone(),
        host,
        bus,
        manager,
        lan,
        devices: Rc::new(RefCell::new(Vec::new())),
        fabric,
    });
    let devices = s.devices.clone();
    spawn_lan_host(&s.handle, s.lan.clone(), s.host.clone(), move || {
        devices.borrow().iter().map(|(d, _, _)| *d).collect()
    });
    s
}

fn add_nic(s: &Stack, n: u32) -> DeviceId {
    host_scope(|| {
        let mut instance = [0u8; 16];
        instance[..4].copy_from_slice(&(0xa2a0_0000 + n).to_le_bytes());
        let dev = Netvsp::new(NetvspConfig {
            mac: nic_mac(n),
            ..NetvspConfig::default()
        });
        let port = s.lan.borrow_mut().attach_nic(dev.handle());
        let id = s
            .host
            .borrow_mut()
            .add_device(dev.into_device_spec(instance));
        s.devices.borrow_mut().push((id, port, nic_mac(n)));
        id
    })
}

fn remove_nic(s: &Stack, id: DeviceId) {
    host_scope(|| {
        s.host.borrow_mut().remove_device(id);
        let mut devices = s.devices.borrow_mut();
        if let Some(i) = devices.iter().position(|(d, _, _)| *d == id) {
            let (_, port, _) = devices.remove(i);
            s.lan.borrow_mut().detach(port);
        }
    });
}

fn azure(s: &Stack) -> AzureStatus {
    s.manager.azure_status()
}

/// The real guest stack on the virtual switch: a netvsp NIC gets its lease from the
/// LAN's DHCP server, the agent reports Ready through the fabric and reads IMDS.
#[test]
fn ready_over_vmbus_on_the_virtual_switch() {
    check_seeds(2, |seed| {
        let sim = sim(seed);
        let s = stack(&sim.handle(), seed);
        let s2 = s.clone();
        sim.run(async move {
            let s = s2;
            s.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            add_nic(&s, 0);
            wait_until(&s.handle, Duration::from_secs(120), "Ready", || {
                azure(&s).state == AzureState::Ready && azure(&s).imds == ImdsState::Done
            })
            .await
            .map_err(|e| format!("{e}: {:?}", azure(&s)))?;
            let reports = host_scope(|| s.fabric.borrow().reports().to_vec());
            ensure(
                reports.len() == 1 && reports[0].is_ready() && reports[0].instance_id == INSTANCE,
                || format!("{reports:#?}"),
            )?;
            let info = azure(&s).imds_info.ok_or("no IMDS")?;
            ensure(info.interfaces[0].mac == Some(nic_mac(0)), || {
                format!("{info:?}")
            })
        })
        .map_err(|e| e.to_string())?
    });
}

/// Two netvsp NICs; the host rescinds the one running the agent while its first
/// request hangs: the agent finishes on the other.
#[test]
fn vmbus_hot_remove_mid_report_moves_the_agent() {
    check_seeds(2, |seed| {
        let sim = sim(seed);
        let s = stack(&sim.handle(), seed);
        host_scope(|| s.fabric.borrow_mut().faults_mut().ignore_connections = 1);
        let s2 = s.clone();
        sim.run(async move {
            let s = s2;
            s.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let ids = [add_nic(&s, 0), add_nic(&s, 1)];
            wait_until(&s.handle, Duration::from_secs(60), "both leases", || {
                s.manager
                    .config_lock()
                    .try_lock()
                    .is_some_and(|t| t.len() == 2 && t.iter().all(|i| i.address().is_some()))
            })
            .await?;
            let fabric = s.fabric.clone();
            wait_until(
                &s.handle,
                Duration::from_secs(30),
                "the request to hang",
                || host_scope(|| fabric.borrow().counters().ignored_connections == 1),
            )
            .await?;
            let owner = azure(&s).interface.ok_or("no owner")?;
            let owner_mac = s
                .manager
                .config_lock()
                .try_lock()
                .and_then(|t| t.get(&owner).map(|i| i.nic().mac()))
                .ok_or("owner not in the table")?;
            let id = s
                .devices
                .borrow()
                .iter()
                .find(|(_, _, m)| *m == owner_mac)
                .map(|(d, _, _)| *d)
                .ok_or("owner's device")?;
            ensure(ids.contains(&id), || "unknown device".into())?;
            remove_nic(&s, id);
            wait_until(&s.handle, Duration::from_secs(120), "Ready", || {
                azure(&s).state == AzureState::Ready
            })
            .await
            .map_err(|e| format!("{e}: {:?}", azure(&s)))?;
            let status = azure(&s);
            ensure(
                status.interface.as_deref().is_some_and(|i| i != owner) && status.attempts == 2,
                || format!("{status:?} (was on {owner})"),
            )?;
            let ready = host_scope(|| s.fabric.borrow().ready_reports());
            ensure(ready == 1, || format!("{ready} Ready reports"))
        })
        .map_err(|e| e.to_string())?
    });
}
