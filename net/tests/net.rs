//! The network side against hvemu's simulated peers, under the deterministic scheduler.
//!
//! Each test builds a LAN (a hub with a DHCP server and a peer host), plugs fake NICs into
//! it, registers them with the interface manager as a driver would (under the
//! configuration lock), and checks what the peers see. Every failing seed prints the
//! command that replays it.

mod support;

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Instant as WallClock;

use hvemu::peers::{FlowState, HttpResponse};
use hvnet_net::{Addressing, InterfaceManager, IpConfig, ManagerConfig, StatusConfig};
use hvnet_netvsc::nic::{Nic, NicRegistry};
use hvnet_runtime::testing::check_seeds;
use hvnet_runtime::{Duration, Handle};
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

type Outcome = Result<(), String>;

fn ensure(condition: bool, what: impl FnOnce() -> String) -> Outcome {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

/// Runs a peer action in host scope and wakes the wire so it happens now.
fn act<R>(w: &World, f: impl FnOnce(&mut hvemu::peers::PeerHost) -> R) -> R {
    let result = host_scope(|| f(&mut w.peer.borrow_mut()));
    w.wire.activity.set();
    result
}

/// Waits for the lease of `name` and returns its address.
async fn lease(w: &World, name: &str) -> Result<Ipv4Addr, String> {
    let manager = w.manager.clone();
    let name_owned = name.to_string();
    wait_until(&w.handle, Duration::from_secs(60), "a lease", || {
        address_of(&manager, &name_owned).is_some()
    })
    .await?;
    address_of(&w.manager, name).ok_or_else(|| format!("{name} lost its address"))
}

async fn ping(w: &World, target: Ipv4Addr, count: u16) -> Outcome {
    let id = act(w, |p| p.ping(target, count));
    let peer = w.peer.clone();
    wait_until(&w.handle, Duration::from_secs(30), "ping replies", || {
        peer.borrow().ping_status(id).is_some_and(|s| s.done)
    })
    .await?;
    let status = w
        .peer
        .borrow()
        .ping_status(id)
        .cloned()
        .ok_or("no ping status")?;
    ensure(status.received == count && status.bad_replies == 0, || {
        format!("ping of {target}: {status:?}")
    })
}

async fn http_get(w: &World, target: Ipv4Addr, path: &str) -> Result<HttpResponse, String> {
    let id = act(w, |p| p.http_get(target, 80, path));
    let peer = w.peer.clone();
    wait_until(
        &w.handle,
        Duration::from_secs(30),
        "an HTTP response",
        || {
            peer.borrow()
                .http_status(id)
                .is_some_and(|s| s.state.is_finished())
        },
    )
    .await?;
    let status = w
        .peer
        .borrow()
        .http_status(id)
        .cloned()
        .ok_or("no HTTP status")?;
    match (status.state, status.response) {
        (FlowState::Done, Some(response)) => Ok(response),
        (state, _) => Err(format!("GET {path:?}: {state:?}")),
    }
}

/// Runs a verified TCP echo of `bytes` against `target:7`.
async fn tcp_echo(w: &World, target: Ipv4Addr, bytes: u64, seed: u64) -> Outcome {
    let id = act(w, |p| p.tcp_echo(target, 7, bytes, seed));
    let peer = w.peer.clone();
    wait_until(&w.handle, Duration::from_secs(600), "the TCP echo", || {
        peer.borrow()
            .tcp_echo_status(id)
            .is_some_and(|s| s.state.is_finished())
    })
    .await?;
    let status = w
        .peer
        .borrow()
        .tcp_echo_status(id)
        .cloned()
        .ok_or("no echo status")?;
    ensure(
        status.state == FlowState::Done && status.bytes_verified == bytes,
        || format!("TCP echo: {status:?}"),
    )
}

// ---------------------------------------------------------------------------------------

/// A registered NIC gets a DHCP lease; address, prefix, default route and DNS land in the
/// interface table; a peer's ping to that address is answered (by smoltcp itself).
#[test]
fn dhcp_lease_is_applied_and_ping_is_answered() {
    check_seeds(8, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 2);
        let (w2, nic2) = (w.clone(), nic.clone());
        sim.run(async move {
            let w = w2;
            register(&w.manager, &nic2).await;
            let address = lease(&w, "eth0").await?;
            let given = host_scope(|| w.dhcp.borrow().lease_of(mac(1)))
                .ok_or("the server has no lease for the NIC")?;
            ensure(given.ip == address, || {
                format!("{address} is not the lease {given:?}")
            })?;
            let (ip, routes) = with_table(&w.manager, |t| {
                let i = t.get("eth0").expect("eth0");
                (i.ip_config().cloned(), t.routes())
            })
            .await;
            let ip = ip.ok_or("no configuration")?;
            ensure(ip.address == Ipv4Cidr::new(address, 24), || {
                format!("{ip:?}")
            })?;
            ensure(ip.gateway == Some(SERVER_IP), || format!("{ip:?}"))?;
            ensure(
                ip.dns == [SERVER_IP, Ipv4Address::new(10, 0, 0, 53)],
                || format!("{ip:?}"),
            )?;
            let text: Vec<String> = routes.iter().map(ToString::to_string).collect();
            ensure(
                text == ["10.0.0.0/24 dev eth0", "0.0.0.0/0 via 10.0.0.1 dev eth0"],
                || format!("routes {text:?}"),
            )?;
            ping(&w, address, 5).await
        })
        .map_err(|e| e.to_string())??;
        ensure(nic.reentered() == 0, || {
            "the NIC was re-entered from its receive callback".into()
        })?;
        let (batches, waited_open) = nic.batches();
        ensure(batches > 0 && waited_open == 0, || {
            format!("{batches} batches, {waited_open} waits inside one")
        })
    });
}

/// With a 20 s lease the client renews every ~10 s: after two minutes the server has
/// seen renewals, and the table kept the same address the whole time.
#[test]
fn renewals_keep_the_address() {
    check_seeds(4, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), 20, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            let start = w.handle.now();
            while w.handle.now() < start + Duration::from_secs(120) {
                w.handle.sleep(Duration::from_millis(250)).await;
                let now = address_of(&w.manager, "eth0");
                ensure(now == Some(address), || {
                    format!("at {}: address {now:?}, was {address}", w.handle.now())
                })?;
            }
            let counters = host_scope(|| w.dhcp.borrow().counters());
            ensure(counters.renewals >= 8, || format!("{counters:?}"))?;
            ensure(counters.discovers == 1, || format!("{counters:?}"))?;
            // Still reachable on it.
            ping(&w, address, 2).await
        })
        .map_err(|e| e.to_string())?
    });
}

/// The status endpoint: `GET /status` from a peer parses as JSON and lists the interface
/// with its address, gateway and counters; `/` is the same page; other paths get 404, a
/// request line with garbage in it 400, and an oversized one 431.
#[test]
fn status_page_lists_the_interface() {
    check_seeds(4, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("{8d5b0b2e-\"nic\"}", mac(7), 3);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            ping(&w, address, 2).await?;
            let response = http_get(&w, address, "/status").await?;
            ensure(response.status == 200, || format!("{response:?}"))?;
            ensure(
                response.header("content-type") == Some("application/json"),
                || format!("{:?}", response.headers),
            )?;
            ensure(response.header("connection") == Some("close"), || {
                format!("{:?}", response.headers)
            })?;
            let json: serde_json::Value = serde_json::from_slice(&response.body)
                .map_err(|e| format!("not JSON ({e}): {}", response.body_text()))?;
            let eth0 = &json["interfaces"][0];
            let checks = [
                (eth0["name"] == "eth0", "name"),
                (eth0["id"] == "{8d5b0b2e-\"nic\"}", "id"),
                (eth0["mac"] == "00:15:5d:00:00:07", "mac"),
                (eth0["mtu"] == 1500, "mtu"),
                (eth0["link"] == "up", "link"),
                (
                    eth0["addresses"][0]["address"] == address.to_string(),
                    "address",
                ),
                (eth0["addresses"][0]["prefix"] == 24, "prefix"),
                (eth0["gateway"] == "10.0.0.1", "gateway"),
                (eth0["queues"].as_array().map(Vec::len) == Some(3), "queues"),
                (json["uptime_ms"].as_u64().is_some_and(|u| u > 0), "uptime"),
            ];
            for (ok, what) in checks {
                ensure(ok, || format!("{what} wrong in {json:#}"))?;
            }
            let sum = |key: &str| -> u64 {
                eth0["queues"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|q| q[key].as_u64())
                    .sum()
            };
            ensure(sum("rx_packets") >= 4 && sum("tx_packets") >= 4, || {
                format!("counters in {json:#}")
            })?;
            ensure(sum("rx_bytes") > sum("rx_packets") * 40, || {
                format!("byte counters in {json:#}")
            })?;

            let root = http_get(&w, address, "/").await?;
            ensure(root.status == 200, || format!("{root:?}"))?;
            let missing = http_get(&w, address, "/nope").await?;
            ensure(missing.status == 404, || format!("{missing:?}"))?;
            let garbage = http_get(&w, address, "/\u{1}\u{7f}x y\u{e9}").await?;
            ensure(garbage.status == 400, || format!("{garbage:?}"))?;
            let long = format!("/{}", "a".repeat(3000));
            let too_long = http_get(&w, address, &long).await?;
            ensure(too_long.status == 431, || format!("{too_long:?}"))?;
            // Still serving after the garbage.
            let again = http_get(&w, address, "/status").await?;
            ensure(again.status == 200, || format!("{again:?}"))
        })
        .map_err(|e| e.to_string())?
    });
}

/// As many HTTP clients at once as there are listening sockets are all served, and
/// more come after them.
#[test]
fn status_page_serves_concurrent_clients() {
    check_seeds(4, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            ping(&w, address, 1).await?;
            let sockets = StatusConfig::default().sockets;
            let ids: Vec<_> = (0..sockets)
                .map(|_| act(&w, |p| p.http_get(address, 80, "/status")))
                .collect();
            let peer = w.peer.clone();
            let ids2 = ids.clone();
            wait_until(&w.handle, Duration::from_secs(60), "the responses", || {
                let peer = peer.borrow();
                ids2.iter()
                    .all(|id| peer.http_status(*id).is_some_and(|s| s.state.is_finished()))
            })
            .await?;
            for id in ids {
                let status = w
                    .peer
                    .borrow()
                    .http_status(id)
                    .cloned()
                    .ok_or("no status")?;
                let code = status.response.as_ref().map(|r| r.status);
                ensure(code == Some(200), || format!("{status:?}"))?;
            }
            for _ in 0..sockets {
                let page = http_get(&w, address, "/").await?;
                ensure(page.status == 200, || format!("{page:?}"))?;
            }
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())?
    });
}

fn echo_run(seed: u64, bytes: u64) -> Result<(std::time::Duration, Duration), String> {
    let sim = sim(seed);
    let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
    let nic = w.wire.nic("nic-a", mac(1), 4);
    let wall = WallClock::now();
    let (nic2, w2) = (nic.clone(), w.clone());
    let virtual_time = sim
        .run(async move {
            let w = w2;
            register(&w.manager, &nic2).await;
            let address = lease(&w, "eth0").await?;
            let start = w.handle.now();
            tcp_echo(&w, address, bytes, seed).await?;
            let took = w.handle.now().saturating_duration_since(start);
            let drops = with_table(&w.manager, |t| t.get("eth0").map(|i| i.device_stats()))
                .await
                .ok_or("no eth0")?;
            ensure(drops.tx_dropped() == 0, || format!("{drops:?}"))?;
            Ok::<_, String>(took)
        })
        .map_err(|e| e.to_string())??;
    ensure(nic.reentered() == 0, || "NIC re-entered".into())?;
    // Every poll is one NIC batch, ended before the interface waits.
    let (batches, waited_open) = nic.batches();
    ensure(batches > 0 && waited_open == 0, || {
        format!("{batches} batches, {waited_open} waits inside one")
    })?;
    Ok((wall.elapsed(), virtual_time))
}

/// 1 MiB through the TCP echo service, every byte checked by the peer.
#[test]
fn tcp_echo_of_one_mebibyte() {
    check_seeds(2, |seed| {
        let (wall, virtual_time) = echo_run(seed, 1 << 20)?;
        eprintln!("seed {seed}: 1 MiB TCP echo: {virtual_time:?} simulated, {wall:?} real");
        Ok::<_, String>(())
    });
}

/// 16 MiB through the TCP echo service (about 3 s in a debug build).
#[test]
fn tcp_echo_of_sixteen_mebibytes() {
    check_seeds(1, |seed| {
        let (wall, virtual_time) = echo_run(seed, 16 << 20)?;
        eprintln!("seed {seed}: 16 MiB TCP echo: {virtual_time:?} simulated, {wall:?} real");
        Ok::<_, String>(())
    });
}

/// UDP echo: datagrams from several source ports all come back.
#[test]
fn udp_echo_answers_every_flow() {
    check_seeds(6, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 2);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            ping(&w, address, 1).await?;
            let id = act(&w, |p| p.udp_flows(address, 7, 4, 40));
            let peer = w.peer.clone();
            wait_until(&w.handle, Duration::from_secs(60), "UDP echoes", || {
                peer.borrow().udp_status(id).is_some_and(|s| s.done)
            })
            .await?;
            let status = w.peer.borrow().udp_status(id).cloned().ok_or("no status")?;
            ensure(status.all_echoed() && status.invalid == 0, || {
                format!("{status:?}")
            })
        })
        .map_err(|e| e.to_string())?
    });
}

/// Several TCP echo connections at once.
#[test]
fn concurrent_tcp_echoes() {
    check_seeds(3, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 4);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            let ids: Vec<_> = (0..3)
                .map(|n| act(&w, |p| p.tcp_echo(address, 7, 96 * 1024, seed * 10 + n)))
                .collect();
            let peer = w.peer.clone();
            let ids2 = ids.clone();
            wait_until(&w.handle, Duration::from_secs(120), "three echoes", || {
                let peer = peer.borrow();
                ids2.iter().all(|id| {
                    peer.tcp_echo_status(*id)
                        .is_some_and(|s| s.state.is_finished())
                })
            })
            .await?;
            for id in ids {
                let status = w.peer.borrow().tcp_echo_status(id).cloned().ok_or("none")?;
                ensure(status.state == FlowState::Done, || format!("{status:?}"))?;
            }
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())?
    });
}

/// Names are `ethN` with the lowest free N, never change while registered, and a NIC
/// that comes back gets its old name if it is free; every unregister ends its task.
#[test]
fn names_are_stable_across_registrations() {
    check_seeds(8, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, ManagerConfig::default()));
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|id| w.wire.nic(id, mac(id.as_bytes()[0]), 1));
        sim.run(async move {
            let handle = w.handle.clone();
            let baseline = handle.task_count();
            let names = |w: &World| {
                let table = w.manager.config_lock().try_lock().expect("lock free");
                table
                    .iter()
                    .map(|i| format!("{}={}", i.name(), i.id()))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let m = &w.manager;
            register(m, &a).await;
            register(m, &b).await;
            register(m, &c).await;
            ensure(names(&w) == "eth0=a eth1=b eth2=c", || names(&w))?;
            unregister(m, &b).await;
            ensure(names(&w) == "eth0=a eth2=c", || names(&w))?;
            // b comes back: its old name is free.
            register(m, &b).await;
            ensure(names(&w) == "eth0=a eth1=b eth2=c", || names(&w))?;
            unregister(m, &a).await;
            unregister(m, &b).await;
            // d is new: the lowest free name.
            register(m, &d).await;
            ensure(names(&w) == "eth0=d eth2=c", || names(&w))?;
            // a's old name is taken: the lowest free one.
            register(m, &a).await;
            ensure(names(&w) == "eth0=d eth1=a eth2=c", || names(&w))?;
            // b's old name is taken too.
            register(m, &b).await;
            ensure(names(&w) == "eth0=d eth1=a eth2=c eth3=b", || names(&w))?;
            // Double registration and unknown unregistration are ignored.
            register(m, &b).await;
            unregister(m, &Rc::clone(&w.wire.nic("stranger", mac(99), 1))).await;
            ensure(names(&w) == "eth0=d eth1=a eth2=c eth3=b", || names(&w))?;
            // Unregistered interfaces' tasks end at their next poll.
            wait_until(
                &handle,
                Duration::from_secs(1),
                "four interface tasks",
                || handle.task_count() == baseline + 4,
            )
            .await?;
            for nic in [&c, &a, &d, &b] {
                unregister(m, nic).await;
            }
            ensure(names(&w).is_empty(), || names(&w))?;
            wait_until(&handle, Duration::from_secs(1), "tasks to end", || {
                handle.task_count() == baseline
            })
            .await?;
            for nic in [&a, &b, &c, &d] {
                // The test and the wire port hold the only references left.
                ensure(Rc::strong_count(nic) == 2, || {
                    format!(
                        "NIC {} still referenced {} times",
                        nic.id(),
                        Rc::strong_count(nic)
                    )
                })?;
            }
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())?
    });
}

/// Two NICs on one LAN: each gets its own lease, both answer ping and serve the status
/// page, which lists both.
#[test]
fn two_interfaces_each_get_a_lease() {
    check_seeds(4, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let a = w.wire.nic("a", mac(1), 2);
        let b = w.wire.nic("b", mac(2), 2);
        sim.run(async move {
            register(&w.manager, &a).await;
            register(&w.manager, &b).await;
            let first = lease(&w, "eth0").await?;
            let second = lease(&w, "eth1").await?;
            ensure(first != second, || format!("both got {first}"))?;
            ping(&w, first, 2).await?;
            ping(&w, second, 2).await?;
            let page = http_get(&w, second, "/status").await?;
            let json: serde_json::Value =
                serde_json::from_slice(&page.body).map_err(|e| e.to_string())?;
            let names: Vec<_> = json["interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| i["name"].as_str().unwrap_or("?").to_string())
                .collect();
            ensure(names == ["eth0", "eth1"], || format!("{json:#}"))
        })
        .map_err(|e| e.to_string())?
    });
}

/// Unregistering an interface in the middle of a TCP transfer ends its task and frees
/// everything it had: over several register/transfer/unregister cycles the task count
/// returns to its baseline, the NIC is referenced only by its owner, and the appliance's
/// heap is the same after every cycle.
#[test]
fn unregister_mid_transfer_leaves_nothing_behind() {
    check_seeds(3, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 2);
        sim.run(async move {
            let handle = w.handle.clone();
            let baseline = handle.task_count();
            let references = Rc::strong_count(&nic);
            let mut heaps = Vec::new();
            for cycle in 0..5u64 {
                register(&w.manager, &nic).await;
                let address = lease(&w, "eth0").await?;
                let id = act(&w, |p| p.tcp_echo(address, 7, 8 << 20, seed + cycle));
                let peer = w.peer.clone();
                wait_until(&handle, Duration::from_secs(60), "data to flow", || {
                    peer.borrow()
                        .tcp_echo_status(id)
                        .is_some_and(|s| s.bytes_verified >= 128 * 1024)
                })
                .await?;
                unregister(&w.manager, &nic).await;
                wait_until(&handle, Duration::from_secs(1), "the task to end", || {
                    handle.task_count() == baseline
                })
                .await?;
                ensure(Rc::strong_count(&nic) == references, || {
                    format!(
                        "cycle {cycle}: NIC referenced {} times",
                        Rc::strong_count(&nic)
                    )
                })?;
                let empty = with_table(&w.manager, |t| t.is_empty() && t.routes().is_empty()).await;
                ensure(empty, || "table not empty".into())?;
                // Let the peer give up on the connection, then drain the wire.
                handle.sleep(Duration::from_secs(2)).await;
                heaps.push(heap_live());
            }
            ensure(heaps[1..].iter().all(|h| *h == heaps[1]), || {
                format!("appliance heap (bytes, blocks) after each cycle: {heaps:?}")
            })
        })
        .map_err(|e| e.to_string())?
    });
}

/// Random frames from the NIC (runts, random bytes, Ethernet/IPv4/ARP headers with
/// garbage after them) are dropped without a panic, and the interface still works.
#[test]
fn garbage_frames_are_dropped() {
    check_seeds(6, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            let handle = w.handle.clone();
            for round in 0..20 {
                for n in 0..100u64 {
                    let frame = garbage_frame(&handle, round * 100 + n, address);
                    nic.push_rx(&frame);
                }
                handle.sleep(Duration::from_millis(5)).await;
            }
            ping(&w, address, 3).await?;
            let page = http_get(&w, address, "/status").await?;
            ensure(page.status == 200, || format!("{page:?}"))
        })
        .map_err(|e| e.to_string())?
    });
}

fn garbage_frame(handle: &Handle, n: u64, address: Ipv4Addr) -> Vec<u8> {
    let len = handle.random_below(1600) as usize;
    let mut frame: Vec<u8> = (0..len).map(|_| handle.random_u64() as u8).collect();
    let kind = n % 5;
    if kind > 0 && frame.len() >= 14 {
        frame[..6].copy_from_slice(&mac(1));
        frame[6..12].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
        let ethertype: [u8; 2] = if kind == 4 {
            [0x08, 0x06]
        } else {
            [0x08, 0x00]
        };
        frame[12..14].copy_from_slice(&ethertype);
    }
    if (kind == 2 || kind == 3) && frame.len() >= 34 {
        // An IPv4 header that may pass the first checks: version 4, IHL 5, to us.
        frame[14] = 0x45;
        let total = (frame.len() - 14) as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame[23] = if kind == 2 { 6 } else { 1 };
        frame[30..34].copy_from_slice(&address.octets());
        // A right header checksum, so the payload parsers are reached too.
        frame[24..26].copy_from_slice(&[0, 0]);
        let sum = frame[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let folded = (sum & 0xffff) + (sum >> 16);
        let folded = (folded & 0xffff) + (folded >> 16);
        frame[24..26].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    }
    frame
}

/// Link down drops the lease (address and route leave the table); link up gets it back.
#[test]
fn link_down_loses_the_lease_and_link_up_restores_it() {
    check_seeds(4, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            nic.set_link(false);
            let m = w.manager.clone();
            wait_until(&w.handle, Duration::from_secs(5), "the lease to go", || {
                address_of(&m, "eth0").is_none()
            })
            .await?;
            let routes = with_table(&w.manager, |t| t.routes()).await;
            ensure(routes.is_empty(), || format!("{routes:?}"))?;
            nic.set_link(true);
            let again = lease(&w, "eth0").await?;
            ensure(again == address, || format!("{again} after {address}"))?;
            ping(&w, again, 2).await
        })
        .map_err(|e| e.to_string())?
    });
}

/// A NIC with almost no send room (two frames) still carries a TCP echo to the end:
/// smoltcp is told to wait instead of having frames dropped.
#[test]
fn a_full_send_ring_holds_data_back_instead_of_dropping_it() {
    check_seeds(3, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            nic.set_tx_capacity(2);
            tcp_echo(&w, address, 256 * 1024, seed).await?;
            let stats = with_table(&w.manager, |t| t.get("eth0").map(|i| i.device_stats()))
                .await
                .ok_or("no eth0")?;
            ensure(stats.tx_blocked > 0, || format!("{stats:?}"))
        })
        .map_err(|e| e.to_string())?
    });
}

/// While a "probe" holds the configuration lock, a new lease is already in force on the
/// wire (the interface answers ping) and reaches the table as soon as the lock is free.
#[test]
fn a_lease_during_a_long_probe_is_served_and_recorded_later() {
    check_seeds(6, |seed| {
        let sim = sim(seed);
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, test_config()));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            let mut table = w.manager.config_lock().lock().await;
            let dyn_nic: Rc<dyn Nic> = nic.clone();
            w.manager.register(&mut table, dyn_nic);
            // Keep holding the lock, as a probe waiting for sub-channels does.
            let dhcp = w.dhcp.clone();
            wait_until(
                &w.handle,
                Duration::from_secs(60),
                "the server's ACK",
                || host_scope(|| dhcp.borrow().lease_of(mac(1)).is_some()),
            )
            .await?;
            let address = host_scope(|| w.dhcp.borrow().lease_of(mac(1)))
                .map(|l| l.ip)
                .ok_or("no lease")?;
            ping(&w, address, 3).await?;
            ensure(
                table.get("eth0").and_then(|i| i.address()).is_none(),
                || "recorded while the lock was held".into(),
            )?;
            drop(table);
            let m = w.manager.clone();
            wait_until(&w.handle, Duration::from_secs(1), "the table", || {
                address_of(&m, "eth0") == Some(address)
            })
            .await
        })
        .map_err(|e| e.to_string())?
    });
}

/// A static configuration is applied without DHCP and recorded in the table.
#[test]
fn static_addressing() {
    check_seeds(2, |seed| {
        let sim = sim(seed);
        let mut config = test_config();
        config.interface.addressing = Addressing::Static(IpConfig {
            address: Ipv4Cidr::new(Ipv4Address::new(10, 0, 0, 9), 24),
            gateway: None,
            dns: Vec::new(),
        });
        let w = Rc::new(world(&sim.handle(), LEASE_SECS, config));
        let nic = w.wire.nic("nic-a", mac(1), 1);
        sim.run(async move {
            register(&w.manager, &nic).await;
            let address = lease(&w, "eth0").await?;
            ensure(address == Ipv4Addr::new(10, 0, 0, 9), || {
                address.to_string()
            })?;
            let discovers = host_scope(|| w.dhcp.borrow().counters().discovers);
            ensure(discovers == 0, || format!("{discovers} DHCP discovers"))?;
            ping(&w, address, 2).await
        })
        .map_err(|e| e.to_string())?
    });
}

/// Dropping the manager ends every interface task.
#[test]
fn dropping_the_manager_ends_its_tasks() {
    check_seeds(3, |seed| {
        let sim = sim(seed);
        let handle = sim.handle();
        let w = world(&handle, LEASE_SECS, test_config());
        let nic = w.wire.nic("nic-a", mac(1), 1);
        let World { manager, wire, .. } = w;
        sim.run(async move {
            let baseline = handle.task_count();
            register(&manager, &nic).await;
            handle.sleep(Duration::from_secs(5)).await;
            ensure(handle.task_count() == baseline + 1, || "no task".into())?;
            drop(manager);
            wait_until(&handle, Duration::from_secs(1), "the task to end", || {
                handle.task_count() == baseline
            })
            .await?;
            drop(wire);
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())?
    });
}

/// A new manager has an empty table and an empty status page.
#[test]
fn a_new_manager_is_empty() {
    let sim = sim(0);
    let manager = InterfaceManager::new(sim.handle(), ManagerConfig::default());
    assert!(manager.snapshot().interfaces.is_empty());
    assert_eq!(manager.config_lock().name(), "rtnl");
    assert!(manager.config_lock().try_lock().expect("free").is_empty());
}
