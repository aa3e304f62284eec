//! The whole guest stack on the host: VMBus, the netvsc driver and the network side
//! (interface manager, DHCP, ping, status page, echo), against hvemu's VMBus host with
//! netvsp NICs on a virtual switch shared with a DHCP server and a peer host. Everything
//! runs under the deterministic scheduler; a failing seed prints how to replay it.

mod support;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;

use hvemu::lan::Lan;
use hvemu::netvsp::{Netvsp, NetvspConfig, NetvspHandle};
use hvemu::peers::{self, DhcpServer, FlowState, PeerHost};
use hvemu::{DeviceId, GuestMemory, HostConfig, VmbusHost};
use hvnet_net::InterfaceManager;
use hvnet_netvsc::nic::NicRegistry;
use hvnet_netvsc::{NetvscConfig, NetvscDriver};
use hvnet_runtime::testing::check_seeds;
use hvnet_runtime::{Duration, Handle, Instant};
use hvnet_vmbus::bus::{VmBus, VmBusConfig};
use support::{
    dhcp_config, emu_machine, ensure, heap_live, host_scope, lan_peer, sim, spawn_lan_host,
    test_config, wait_until, CountingAlloc, EmuMachine, Res,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Host and guest of one test.
struct Stack {
    handle: Handle,
    host: Rc<RefCell<VmbusHost>>,
    memory: GuestMemory,
    bus: VmBus,
    manager: InterfaceManager,
    lan: Rc<RefCell<Lan>>,
    devices: Rc<RefCell<Vec<(DeviceId, hvemu::switch::PortId)>>>,
    peer: peers::Shared<PeerHost>,
}

fn nic_mac(n: u32) -> [u8; 6] {
    [0x00, 0x15, 0x5d, 0x20, (n >> 8) as u8, n as u8]
}

fn instance(n: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&(0xe2e0_0000 + n).to_le_bytes());
    id
}

/// A small receive buffer keeps the tests fast (the protocol is the same at any size);
/// the send buffer is the product's default.
fn netvsc_config() -> NetvscConfig {
    NetvscConfig {
        recv_buffer_bytes: 512 * 1024,
        ring_pages: 16,
        ..NetvscConfig::default()
    }
}

/// Runs `body` under `sim` on a fresh stack for `seed` whose VMBus is connected.
fn on_connected_stack<Fut>(
    sim: &hvnet_runtime::sim::Simulation,
    seed: u64,
    body: impl FnOnce(Rc<Stack>) -> Fut + 'static,
) -> Result<(), String>
where
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let s = stack(&sim.handle(), seed);
    sim.run(async move {
        s.bus
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        body(s).await
    })
    .map_err(|e| e.to_string())?
}

fn stack(handle: &Handle, seed: u64) -> Rc<Stack> {
    let host_config = HostConfig {
        seed,
        ..HostConfig::default()
    };
    let EmuMachine { host, memory, bus } =
        emu_machine(handle, host_config, VmBusConfig::default(), 1 << 17, seed);
    let manager = InterfaceManager::new(handle.clone(), test_config());
    bus.register_driver(Rc::new(NetvscDriver::new(
        Rc::new(manager.clone()),
        netvsc_config(),
    )));
    let lan = host_scope(|| Rc::new(RefCell::new(Lan::new())));
    let dhcp = host_scope(|| peers::shared(DhcpServer::new(dhcp_config(3600))));
    let peer = lan_peer();
    host_scope(|| {
        lan.borrow_mut().attach_peer(dhcp.clone());
        lan.borrow_mut().attach_peer(peer.clone());
    });
    let s = Rc::new(Stack {
        handle: handle.clone(),
        host,
        memory,
        bus,
        manager,
        lan,
        devices: Rc::new(RefCell::new(Vec::new())),
        peer,
    });
    spawn_host(&s);
    s
}

/// The host side's clock over this stack's LAN and NICs.
fn spawn_host(s: &Rc<Stack>) {
    let devices = s.devices.clone();
    spawn_lan_host(&s.handle, s.lan.clone(), s.host.clone(), move || {
        devices.borrow().iter().map(|(d, _)| *d).collect()
    });
}

fn add_nic(s: &Stack, n: u32, config: NetvspConfig) -> (DeviceId, NetvspHandle) {
    let (id, nv) = host_scope(|| {
        let dev = Netvsp::new(NetvspConfig {
            mac: nic_mac(n),
            ..config
        });
        let nv = dev.handle();
        let port = s.lan.borrow_mut().attach_nic(nv.clone());
        let id = s
            .host
            .borrow_mut()
            .add_device(dev.into_device_spec(instance(n)));
        s.devices.borrow_mut().push((id, port));
        (id, nv)
    });
    (id, nv)
}

fn remove_nic(s: &Stack, id: DeviceId) {
    host_scope(|| {
        s.host.borrow_mut().remove_device(id);
        let mut devices = s.devices.borrow_mut();
        if let Some(i) = devices.iter().position(|(d, _)| *d == id) {
            let (_, port) = devices.remove(i);
            s.lan.borrow_mut().detach(port);
        }
    });
}

/// The interface name and leased address of the NIC with `mac`, once it has one.
fn leased(s: &Stack, mac: [u8; 6]) -> Option<(String, Ipv4Addr)> {
    let table = s.manager.config_lock().try_lock()?;
    let found = table
        .iter()
        .find(|i| i.nic().mac() == mac)
        .and_then(|i| Some((i.name().to_string(), i.address()?.address())));
    found
}

async fn wait_lease(s: &Stack, mac: [u8; 6]) -> Result<(String, Ipv4Addr), String> {
    wait_until(&s.handle, Duration::from_secs(30), "a DHCP lease", || {
        leased(s, mac).is_some()
    })
    .await?;
    leased(s, mac).ok_or_else(|| "lease vanished".to_string())
}

async fn ping(s: &Stack, target: Ipv4Addr, count: u16) -> Res {
    let id = host_scope(|| s.peer.borrow_mut().ping(target, count));
    let peer = s.peer.clone();
    wait_until(&s.handle, Duration::from_secs(30), "ping replies", || {
        host_scope(|| peer.borrow().ping_status(id).is_some_and(|p| p.done))
    })
    .await?;
    let received = host_scope(|| s.peer.borrow().ping_status(id).map_or(0, |p| p.received));
    ensure(received == count, || {
        format!("{received} of {count} pings to {target} answered")
    })
}

fn tcp_state(s: &Stack, id: peers::FlowId) -> (FlowState, u64) {
    host_scope(|| {
        let p = s.peer.borrow();
        let st = p.tcp_echo_status(id).expect("flow");
        (st.state.clone(), st.bytes_verified)
    })
}

async fn tcp_echo(s: &Stack, target: Ipv4Addr, bytes: u64, seed: u64) -> Res {
    let id = host_scope(|| s.peer.borrow_mut().tcp_echo(target, 7, bytes, seed));
    wait_until(&s.handle, Duration::from_secs(600), "TCP echo", || {
        !matches!(
            tcp_state(s, id).0,
            FlowState::Connecting | FlowState::Running
        )
    })
    .await?;
    let (state, verified) = tcp_state(s, id);
    ensure(
        matches!(state, FlowState::Done) && verified == bytes,
        || format!("TCP echo to {target}: {state:?}, {verified} of {bytes} bytes verified"),
    )
}

/// Test 1: one NIC with eight queues gets a lease, answers ping, serves its status page
/// and echoes 16 MiB of TCP intact; received traffic is spread over all eight queues.
#[test]
fn one_eight_queue_nic_end_to_end() {
    check_seeds(2, |seed| {
        let sim = sim(seed);
        let started = std::time::Instant::now();
        on_connected_stack(&sim, seed, move |s| async move {
            let (_, nv) = add_nic(&s, 0, NetvspConfig::default());
            let (name, addr) = wait_lease(&s, nic_mac(0)).await?;
            ensure(name == "eth0", || format!("named {name}"))?;
            ping(&s, addr, 5).await?;
            // The status page.
            let id = host_scope(|| s.peer.borrow_mut().http_get(addr, 80, "/status"));
            let peer = s.peer.clone();
            wait_until(&s.handle, Duration::from_secs(30), "HTTP status", || {
                host_scope(|| {
                    peer.borrow().http_status(id).is_some_and(|h| {
                        !matches!(h.state, FlowState::Connecting | FlowState::Running)
                    })
                })
            })
            .await?;
            let body = host_scope(|| {
                s.peer
                    .borrow()
                    .http_status(id)
                    .and_then(|h| h.response.clone())
                    .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
            })
            .ok_or("no HTTP response")?;
            ensure(body.0 == 200, || format!("status {}", body.0))?;
            let json: serde_json::Value =
                serde_json::from_str(&body.1).map_err(|e| format!("JSON: {e}: {}", body.1))?;
            let iface = &json["interfaces"][0];
            ensure(iface["name"] == "eth0", || format!("{json}"))?;
            ensure(iface["queues"].as_array().map(Vec::len) == Some(8), || {
                format!("{json}")
            })?;
            ensure(
                iface["addresses"].to_string().contains(&addr.to_string()),
                || format!("{json}"),
            )?;
            // Many UDP flows: RSS on the host must use every queue.
            let id = host_scope(|| s.peer.borrow_mut().udp_flows(addr, 7, 64, 4));
            let peer = s.peer.clone();
            wait_until(&s.handle, Duration::from_secs(60), "UDP echoes", || {
                host_scope(|| peer.borrow().udp_status(id).is_some_and(|u| u.done))
            })
            .await?;
            let udp =
                host_scope(|| s.peer.borrow().udp_status(id).cloned()).ok_or("no UDP flows")?;
            ensure(udp.all_echoed(), || {
                format!(
                    "not every UDP datagram was echoed: sent {:?} received {:?}; host {:?}; guest {:?}",
                    udp.sent,
                    udp.received,
                    host_scope(|| nv.stats()),
                    s.manager.snapshot()
                )
            })?;
            let stats = host_scope(|| nv.stats());
            for (q, qs) in stats.queues.iter().enumerate() {
                ensure(qs.rx_frames > 0, || {
                    format!("queue {q} got no frames: {stats:?}")
                })?;
            }
            tcp_echo(&s, addr, 16 << 20, seed).await?;
            let snapshot = s.manager.snapshot();
            ensure(format!("{snapshot:?}").contains("eth0"), || {
                format!("{snapshot:?}")
            })
        })?;
        eprintln!(
            "seed {seed}: {:?} real, {:?} virtual",
            started.elapsed(),
            sim.now().saturating_duration_since(Instant::ZERO)
        );
        Ok::<_, String>(())
    });
}

/// An MTU change on a live interface through the manager: the NIC re-attaches with the
/// new MTU under the config lock, keeps its name and lease, and traffic flows before and
/// after; values the stack or the NIC cannot take are refused with a clear error.
#[test]
fn mtu_change_on_a_live_interface() {
    check_seeds(2, |seed| {
        let sim = sim(seed);
        on_connected_stack(&sim, seed, move |s| async move {
            // A port that allows jumbo frames (up to 9000 bytes).
            let jumbo = NetvspConfig {
                mtu: 9000,
                ..NetvspConfig::default()
            };
            let (_, nv) = add_nic(&s, 0, jumbo);
            let (name, addr) = wait_lease(&s, nic_mac(0)).await?;
            tcp_echo(&s, addr, 256 << 10, seed).await?;
            s.manager
                .set_mtu(&name, 4000)
                .await
                .map_err(|e| format!("set_mtu 4000: {e}"))?;
            let mtu = |s: &Stack| s.manager.snapshot().interfaces.first().map(|i| i.mtu);
            ensure(mtu(&s) == Some(4000), || format!("MTU {:?}", mtu(&s)))?;
            let host_mtu = host_scope(|| nv.state().mtu);
            ensure(host_mtu == 4000, || format!("host sees MTU {host_mtu}"))?;
            ensure(leased(&s, nic_mac(0)) == Some((name.clone(), addr)), || {
                format!("lease after the change: {:?}", leased(&s, nic_mac(0)))
            })?;
            ping(&s, addr, 3).await?;
            tcp_echo(&s, addr, 256 << 10, seed + 1).await?;
            for (mtu, want) in [
                (100, "below the network stack's minimum"),
                (1 << 20, "outside the allowed range"),
            ] {
                let err = s
                    .manager
                    .set_mtu(&name, mtu)
                    .await
                    .err()
                    .map(|e| e.to_string());
                ensure(err.as_deref().is_some_and(|e| e.contains(want)), || {
                    format!("MTU {mtu}: {err:?}")
                })?;
            }
            let err = s
                .manager
                .set_mtu("eth9", 1500)
                .await
                .err()
                .map(|e| e.to_string());
            ensure(err.as_deref() == Some("no interface eth9"), || {
                format!("{err:?}")
            })?;
            ensure(mtu(&s) == Some(4000), || {
                format!("refusals changed the MTU: {:?}", mtu(&s))
            })?;
            s.manager
                .set_mtu(&name, 1500)
                .await
                .map_err(|e| format!("set_mtu 1500: {e}"))?;
            ensure(mtu(&s) == Some(1500), || format!("MTU {:?}", mtu(&s)))?;
            tcp_echo(&s, addr, 256 << 10, seed + 2).await
        })?;
        Ok::<_, String>(())
    });
}

/// Test 2: four eight-queue NICs hot-added at the same moment while a TCP echo runs on
/// a NIC that is already up: all four get leases and answer ping, and the running
/// transfer completes intact.
#[test]
fn four_nics_hot_added_while_traffic_flows() {
    check_seeds(10, |seed| {
        let sim = sim(seed);
        on_connected_stack(&sim, seed, move |s| async move {
            add_nic(&s, 0, NetvspConfig::default());
            let (_, addr0) = wait_lease(&s, nic_mac(0)).await?;
            let flow = host_scope(|| s.peer.borrow_mut().tcp_echo(addr0, 7, 4 << 20, seed));
            wait_until(
                &s.handle,
                Duration::from_secs(30),
                "the transfer to start",
                || tcp_state(&s, flow).1 > 64 * 1024,
            )
            .await?;
            let before = tcp_state(&s, flow).1;
            for n in 1..=4 {
                add_nic(&s, n, NetvspConfig::default());
            }
            let mut addrs = Vec::new();
            for n in 1..=4 {
                addrs.push(wait_lease(&s, nic_mac(n)).await?.1);
            }
            // Traffic kept flowing through the hot-add.
            let during = tcp_state(&s, flow).1;
            ensure(during > before, || {
                format!("transfer stalled at {before} bytes")
            })?;
            for a in addrs {
                ping(&s, a, 2).await?;
            }
            wait_until(&s.handle, Duration::from_secs(600), "TCP echo", || {
                !matches!(
                    tcp_state(&s, flow).0,
                    FlowState::Connecting | FlowState::Running
                )
            })
            .await?;
            let (state, verified) = tcp_state(&s, flow);
            ensure(
                matches!(state, FlowState::Done) && verified == 4 << 20,
                || format!("{state:?} after {verified} bytes"),
            )?;
            let names = s.manager.config_lock().lock().await.names();
            ensure(names.len() == 5, || format!("{names:?}"))
        })?;
        Ok::<_, String>(())
    });
}

/// Tests 3 and 4: a NIC removed while a TCP transfer runs through it disappears from the
/// interface table and its tasks end; 200 add/remove cycles (with traffic in the first
/// ones) bring heap, guest pages, GPADLs, channels and tasks back to the baseline.
#[test]
fn hot_remove_under_traffic_and_200_cycles_leak_nothing() {
    let sim = sim(3);
    on_connected_stack(&sim, 3, move |s| async move {
        let mut baseline = None;
        for cycle in 0..200u32 {
            let (id, _) = add_nic(&s, 7, NetvspConfig::default());
            let with_traffic = cycle < 20;
            if with_traffic {
                let (_, addr) = wait_lease(&s, nic_mac(7)).await?;
                let flow = host_scope(|| s.peer.borrow_mut().tcp_echo(addr, 7, 8 << 20, 7));
                wait_until(&s.handle, Duration::from_secs(30), "traffic", || {
                    tcp_state(&s, flow).1 > 32 * 1024
                })
                .await?;
            } else {
                wait_until(&s.handle, Duration::from_secs(30), "registration", || {
                    s.manager
                        .config_lock()
                        .try_lock()
                        .is_some_and(|t| t.len() == 1)
                })
                .await?;
            }
            remove_nic(&s, id);
            wait_until(&s.handle, Duration::from_secs(30), "removal", || {
                s.manager
                    .config_lock()
                    .try_lock()
                    .is_some_and(|t| t.is_empty())
            })
            .await?;
            s.bus.settle().await;
            // Let the interface task and the peer's aborted flow wind down.
            s.handle.sleep(Duration::from_millis(50)).await;
            ensure(s.bus.live_gpadls() == 0, || {
                format!("cycle {cycle}: {} GPADLs", s.bus.live_gpadls())
            })?;
            ensure(s.bus.live_relids().is_empty(), || {
                format!("cycle {cycle}: relids {:?}", s.bus.live_relids())
            })?;
            let now = (heap_live(), s.memory.live_pages(), s.handle.task_count());
            // Cycles with traffic and without differ in what the peer left queued; each
            // kind is compared with its own first steady cycle.
            match (cycle, baseline) {
                (21, _) => baseline = Some(now),
                (c, Some(b)) if c > 21 && b != now => {
                    return Err(format!(
                        "cycle {cycle}: (heap, pages, tasks) {now:?} vs {b:?}"
                    ))
                }
                _ => {}
            }
        }
        Ok::<_, String>(())
    })
    .unwrap();
}
