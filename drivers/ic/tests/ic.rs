//! The IC drivers against hvemu's IC devices under the deterministic scheduler: version
//! negotiation (and a host with nothing in common), heartbeats, shutdown reaching the
//! appliance once and only after the answer, time sync setting the clock, KVP
//! enumeration, IP info and the stores, hostile host input, and devices rescinded in the
//! middle of a conversation without leaks.

#[path = "../../vmbus/tests/support/emu.rs"]
mod emu;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;

use emu::*;
use hvemu::ic::{
    Heartbeat, IcDevice, IcHandle, IcVersions, Kvp, KvpHostValue, Negotiation, Shutdown,
    ShutdownResult, TimeMessage, Timesync,
};
use hvemu::{DeviceId, HostConfig};
use hvnet_ic::kvp::AUTO_KEYS;
use hvnet_ic::{
    register_ic_drivers, AdapterId, AddressInfo, Clock, IcDrivers, IpInfo, KvpSource, PowerControl,
};
use hvnet_runtime::sim::{Config, Simulation};
use hvnet_runtime::testing::check_seeds;
use hvnet_runtime::{Duration, Handle};
use hvnet_vmbus::bus::{VmBus, VmBusConfig};
use hvnet_wire::ic::{
    encode_message, IcMsgHdr, IcMsgType, IcStatus, IcVersion, KvpPool, Negotiated,
    ICMSGHDRFLAG_REQUEST, ICMSGHDRFLAG_TRANSACTION, ICMSG_HDR,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x00, 0x00, 0x01];

fn sim(seed: u64) -> Simulation {
    Simulation::with_config(
        seed,
        Config {
            max_virtual_time: std::time::Duration::from_secs(600),
            ..Config::default()
        },
    )
}

// ---------------------------------------------------------------------------------------
// The appliance's side, recorded.

/// Records every power request with the number of shutdown answers the host had
/// received at that moment.
struct TestPower {
    host_view: RefCell<Option<IcHandle<Shutdown>>>,
    calls: RefCell<Vec<(bool, usize)>>,
}

impl PowerControl for TestPower {
    fn shutdown(&self, reboot: bool) {
        let answered = self
            .host_view
            .borrow()
            .as_ref()
            .map_or(0, |h| host_scope(|| h.results().len()));
        self.calls.borrow_mut().push((reboot, answered));
    }
}

#[derive(Default)]
struct TestClock {
    set: RefCell<Vec<u64>>,
    samples: RefCell<Vec<u64>>,
}

impl Clock for TestClock {
    fn set_time(&self, unix_100ns: u64) {
        self.set.borrow_mut().push(unix_100ns);
    }

    fn sample(&self, unix_100ns: u64) {
        self.samples.borrow_mut().push(unix_100ns);
    }
}

struct TestKvp {
    ipv4: Vec<Ipv4Addr>,
}

impl KvpSource for TestKvp {
    fn fully_qualified_domain_name(&self) -> String {
        String::from("appliance.example.internal")
    }

    fn ipv4_addresses(&self) -> Vec<Ipv4Addr> {
        self.ipv4.clone()
    }

    fn ip_info(&self, id: &AdapterId) -> Option<IpInfo> {
        (id.mac == Some(MAC)).then(|| IpInfo {
            addresses: self
                .ipv4
                .iter()
                .map(|a| AddressInfo {
                    address: IpAddr::V4(*a),
                    prefix_len: 24,
                })
                .collect(),
            gateways: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
            dns_servers: vec![IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16))],
            dhcp_enabled: true,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The world.

struct IcWorld {
    machine: EmuMachine,
    drivers: IcDrivers,
    power: Rc<TestPower>,
    clock: Rc<TestClock>,
    devices: Rc<RefCell<Vec<DeviceId>>>,
}

impl IcWorld {
    fn bus(&self) -> &VmBus {
        &self.machine.bus
    }

    fn add(&self, spec: hvemu::DeviceSpec) -> DeviceId {
        let id = host_scope(|| self.machine.host.borrow_mut().add_device(spec));
        self.devices.borrow_mut().push(id);
        id
    }

    fn remove(&self, id: DeviceId) {
        host_scope(|| self.machine.host.borrow_mut().remove_device(id));
        self.devices.borrow_mut().retain(|d| *d != id);
    }

    fn assert_clean(&self) {
        assert_host_clean(&self.machine.host, &self.machine.memory);
    }
}

fn instance(n: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = 0x1c;
    id[1] = n;
    id[15] = 0xa5;
    id
}

fn world(h: &Handle, seed: u64) -> Rc<IcWorld> {
    let machine = emu_machine(
        h,
        HostConfig {
            seed,
            ..HostConfig::default()
        },
        VmBusConfig::default(),
        1 << 12,
        seed,
    );
    let power = Rc::new(TestPower {
        host_view: RefCell::new(None),
        calls: RefCell::new(Vec::new()),
    });
    let clock = Rc::new(TestClock::default());
    let kvp = Rc::new(TestKvp {
        ipv4: vec![Ipv4Addr::new(10, 0, 0, 4), Ipv4Addr::new(192, 168, 1, 7)],
    });
    let drivers = register_ic_drivers(&machine.bus, power.clone(), clock.clone(), kvp);
    let w = Rc::new(IcWorld {
        machine,
        drivers,
        power,
        clock,
        devices: Rc::new(RefCell::new(Vec::new())),
    });
    // The host acts only inside host calls: poll every device every 500 us.
    let host = w.machine.host.clone();
    let devices = w.devices.clone();
    let h2 = h.clone();
    h.spawn("host pump", async move {
        loop {
            let list = devices.borrow().clone();
            for d in list {
                host_scope(|| host.borrow_mut().poll_device(d));
            }
            h2.sleep(Duration::from_micros(500)).await;
        }
    });
    w
}

/// Adds host device `n` running a fresh `S`, offering `versions` (or the usual ones).
fn add_ic<S: hvemu::ic::HostService + Default>(
    w: &IcWorld,
    n: u8,
    versions: Option<IcVersions>,
) -> (DeviceId, IcHandle<S>) {
    let (spec, handle) = host_scope(|| {
        let dev = match versions {
            Some(v) => IcDevice::with_versions(S::default(), v),
            None => IcDevice::new(S::default()),
        };
        let handle = dev.handle();
        (dev.into_device_spec(instance(n)), handle)
    });
    (w.add(spec), handle)
}

fn heartbeat(w: &IcWorld, n: u8, versions: Option<IcVersions>) -> (DeviceId, IcHandle<Heartbeat>) {
    add_ic(w, n, versions)
}

/// The shutdown device, also what the power control reports to.
fn shutdown(w: &IcWorld, n: u8) -> (DeviceId, IcHandle<Shutdown>) {
    let (id, handle) = add_ic(w, n, None);
    *w.power.host_view.borrow_mut() = Some(handle.clone());
    (id, handle)
}

fn timesync(w: &IcWorld, n: u8, versions: Option<IcVersions>) -> (DeviceId, IcHandle<Timesync>) {
    add_ic(w, n, versions)
}

fn kvp(w: &IcWorld, n: u8) -> (DeviceId, IcHandle<Kvp>) {
    add_ic(w, n, None)
}

/// Connects and offers all four services at once (devices 1 to 4); returns their host
/// handles once each has negotiated.
async fn all_four(
    w: &IcWorld,
    h: &Handle,
) -> Result<
    (
        IcHandle<Heartbeat>,
        IcHandle<Shutdown>,
        IcHandle<Timesync>,
        IcHandle<Kvp>,
    ),
    String,
> {
    w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
    let (_, hb) = heartbeat(w, 1, None);
    let (_, sd) = shutdown(w, 2);
    let (_, ts) = timesync(w, 3, None);
    let (_, kv) = kvp(w, 4);
    until(h, "four negotiations", SECOND, || {
        negotiated(&hb).is_some()
            && negotiated(&sd).is_some()
            && negotiated(&ts).is_some()
            && negotiated(&kv).is_some()
    })
    .await?;
    Ok((hb, sd, ts, kv))
}

/// Waits (virtual time) until `cond` holds, checking every 200 us, for at most `limit`.
async fn until(h: &Handle, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Res {
    let deadline = h.now().saturating_add(limit);
    loop {
        if cond() {
            return Ok(());
        }
        if h.now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        h.sleep(Duration::from_micros(200)).await;
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// Fails unless the device saw no violation.
fn host_ok<S: hvemu::ic::HostService>(name: &str, handle: &IcHandle<S>) -> Res {
    let s = host_scope(|| handle.stats());
    ensure(s.violations == 0, || {
        format!("{name}: host saw violations: {:?}", s.errors)
    })
}

fn negotiated<S: hvemu::ic::HostService>(handle: &IcHandle<S>) -> Option<Negotiated> {
    host_scope(|| handle.negotiated())
}

fn in_world<F, Fut>(seed: u64, body: F) -> Res
where
    F: FnOnce(Rc<IcWorld>, Handle) -> Fut,
    Fut: std::future::Future<Output = Res> + 'static,
{
    let sim = sim(seed);
    let h = sim.handle();
    let w = world(&h, seed);
    sim.run(body(w.clone(), h)).map_err(|e| e.to_string())??;
    w.assert_clean();
    Ok(())
}

fn v(major: u16, minor: u16) -> IcVersion {
    IcVersion::new(major, minor)
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// All four devices offered at once: each negotiates framework 3.0 and the newest
/// service version both sides know, as Linux would against OpenVMM's lists.
#[test]
fn negotiation_picks_the_expected_versions() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            let (hb, sd, ts, kv) = all_four(&w, &h).await?;
            let want = |m: IcVersion| {
                Some(Negotiated {
                    framework: v(3, 0),
                    message: m,
                })
            };
            ensure(negotiated(&hb) == want(v(3, 0)), || "heartbeat".into())?;
            ensure(negotiated(&sd) == want(v(3, 2)), || "shutdown".into())?;
            ensure(negotiated(&ts) == want(v(4, 0)), || "timesync".into())?;
            ensure(negotiated(&kv) == want(v(4, 0)), || "kvp".into())?;
            let s = w.drivers.stats();
            for (name, c, m) in [
                ("heartbeat", s.heartbeat.channel, v(3, 0)),
                ("shutdown", s.shutdown.channel, v(3, 2)),
                ("timesync", s.timesync.channel, v(4, 0)),
                ("kvp", s.kvp.channel, v(4, 0)),
            ] {
                ensure(
                    c.opens == 1
                        && c.negotiations == 1
                        && c.framework_version == Some(v(3, 0))
                        && c.message_version == Some(m)
                        && c.malformed == 0,
                    || format!("{name}: {c:?}"),
                )?;
            }
            ensure(w.drivers.open_channels() == 4, || {
                format!("{} channels open", w.drivers.open_channels())
            })?;
            host_ok("heartbeat", &hb)?;
            host_ok("shutdown", &sd)?;
            host_ok("timesync", &ts)?;
            host_ok("kvp", &kv)
        })
    });
}

/// Hosts offering only versions the guest does not know get counts 0/0; the device
/// then stays quiet and so does the guest.
#[test]
fn unknown_versions_get_zero_counts_and_silence() {
    check_seeds(10, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let unknown_service = IcVersions::with_message(&[v(9, 0), v(0, 1)]);
            let unknown_framework = IcVersions {
                framework: vec![v(2, 0)],
                message: vec![v(3, 0)],
            };
            let (_, a) = heartbeat(&w, 1, Some(unknown_service));
            let (_, b) = heartbeat(&w, 2, Some(unknown_framework));
            until(&h, "both answers", SECOND, || {
                host_scope(|| {
                    a.stats().negotiation == Negotiation::NoCommonVersion
                        && b.stats().negotiation == Negotiation::NoCommonVersion
                })
            })
            .await?;
            h.sleep(Duration::from_millis(20)).await;
            let s = w.drivers.stats().heartbeat;
            ensure(
                s.channel.no_common_version == 2
                    && s.channel.negotiations == 2
                    && s.channel.message_version.is_none()
                    && s.heartbeats == 0,
                || format!("{s:?}"),
            )?;
            for d in [&a, &b] {
                let st = host_scope(|| d.stats());
                ensure(st.requests_sent == 1 && !st.outstanding, || {
                    format!("device not quiet: {st:?}")
                })?;
                host_ok("heartbeat", d)?;
            }
            // A heartbeat the host sends anyway is dropped, not answered.
            host_scope(|| a.inject_raw(&heartbeat_message(7)));
            until(&h, "the drop", SECOND, || {
                w.drivers.stats().heartbeat.channel.malformed == 1
            })
            .await?;
            ensure(w.drivers.stats().heartbeat.heartbeats == 0, || {
                "answered after a failed negotiation".into()
            })?;
            host_ok("heartbeat", &a)
        })
    });
}

fn heartbeat_message(seq: u64) -> Vec<u8> {
    ic_message(IcMsgType::HEARTBEAT, &seq.to_le_bytes())
}

fn ic_message(t: IcMsgType, body: &[u8]) -> Vec<u8> {
    let header = IcMsgHdr {
        icmsgtype: t.0.into(),
        icvermsg: v(3, 0),
        icverframe: v(3, 0),
        icflags: ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST,
        ..IcMsgHdr::default()
    };
    let mut out = vec![0u8; ICMSG_HDR + body.len()];
    encode_message(&mut out, &header, &[body]).unwrap();
    out
}

/// Heartbeats every poll: each is answered with its number plus one, N times.
#[test]
fn heartbeats_are_answered() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let (_, hb) = heartbeat(&w, 1, None);
            let n = 40 + seed % 20;
            until(&h, "heartbeats", 10 * SECOND, || {
                host_scope(|| hb.heartbeat().answered) >= n
            })
            .await?;
            let host = host_scope(|| hb.heartbeat());
            let guest = w.drivers.stats().heartbeat;
            ensure(
                guest.heartbeats >= host.answered && guest.heartbeats <= host.sent,
                || format!("guest {guest:?} host {host:?}"),
            )?;
            ensure(
                guest.channel.replies == guest.heartbeats + 1 && guest.channel.malformed == 0,
                || format!("{guest:?}"),
            )?;
            ensure(
                host.last_echo
                    .is_some_and(|e| e == guest.last_seq.unwrap_or(0) + 1),
                || format!("guest {guest:?} host {host:?}"),
            )?;
            host_ok("heartbeat", &hb)
        })
    });
}

/// Shutdown: hibernate refused, invalid flags failed, then power off or restart (by
/// seed) reaches the appliance exactly once, after the host has the S_OK; a second
/// request is answered but not passed on.
#[test]
fn shutdown_reaches_power_control_once_after_the_answer() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            let reboot = seed % 2 == 1;
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let (_, sd) = shutdown(&w, 1);
            until(&h, "negotiation", SECOND, || negotiated(&sd).is_some()).await?;
            host_scope(|| {
                sd.request_hibernate();
                sd.request_flags(8);
            });
            until(&h, "two answers", SECOND, || {
                host_scope(|| sd.results().len()) == 2
            })
            .await?;
            ensure(w.power.calls.borrow().is_empty(), || {
                "power control called for refused requests".into()
            })?;
            host_scope(|| sd.request_shutdown(reboot));
            until(&h, "the power call", SECOND, || {
                !w.power.calls.borrow().is_empty()
            })
            .await?;
            host_scope(|| sd.request_shutdown(!reboot));
            until(&h, "four answers", SECOND, || {
                host_scope(|| sd.results().len()) == 4
            })
            .await?;
            h.sleep(Duration::from_millis(5)).await;
            let flags = 1 | if reboot { 2 } else { 0 };
            let other = 1 | if reboot { 0 } else { 2 };
            let results = host_scope(|| sd.results());
            ensure(
                results
                    == vec![
                        ShutdownResult {
                            flags: 4,
                            status: IcStatus::NOT_SUPPORTED,
                        },
                        ShutdownResult {
                            flags: 8,
                            status: IcStatus::E_FAIL,
                        },
                        ShutdownResult {
                            flags,
                            status: IcStatus::S_OK,
                        },
                        ShutdownResult {
                            flags: other,
                            status: IcStatus::S_OK,
                        },
                    ],
                || format!("{results:?}"),
            )?;
            // Called once, with the S_OK already with the host (3 answers by then).
            let calls = w.power.calls.borrow().clone();
            ensure(calls == vec![(reboot, 3)], || format!("{calls:?}"))?;
            let s = w.drivers.stats().shutdown;
            ensure(
                s.requests == 4
                    && s.hibernate_refused == 1
                    && s.invalid == 1
                    && s.duplicates == 1
                    && s.power_offs + s.reboots == 1
                    && (s.reboots == 1) == reboot,
                || format!("{s:?}"),
            )?;
            host_ok("shutdown", &sd)
        })
    });
}

/// Time sync: SYNC sets the clock to the host time, SAMPLE goes to the clock's sample
/// hook, a sample without the transaction flag is used but not answered; both the v4
/// and the v3 layouts (by seed).
#[test]
fn timesync_sets_the_clock() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let versions = if seed % 2 == 0 {
                None
            } else {
                Some(IcVersions::with_message(&[v(1, 0), v(3, 0)]))
            };
            let (_, ts) = timesync(&w, 1, versions);
            until(&h, "negotiation", SECOND, || negotiated(&ts).is_some()).await?;
            // 2025-11-01 plus a seed-dependent offset, in 100 ns units.
            let t0 = 17_619_552_000_000_000 + seed * 12_345;
            host_scope(|| {
                ts.send_sync(t0);
                ts.send_sample(t0 + 50_000_000);
                ts.send_time(TimeMessage {
                    expect_reply: false,
                    ..TimeMessage::sample(t0 + 100_000_000)
                });
            });
            until(&h, "three samples", SECOND, || {
                w.clock.samples.borrow().len() == 2
            })
            .await?;
            ensure(*w.clock.set.borrow() == vec![t0], || {
                format!("clock set to {:?}, want {t0}", w.clock.set.borrow())
            })?;
            ensure(
                *w.clock.samples.borrow() == vec![t0 + 50_000_000, t0 + 100_000_000],
                || format!("{:?}", w.clock.samples.borrow()),
            )?;
            let s = w.drivers.stats().timesync;
            ensure(
                s.syncs == 1
                    && s.samples == 2
                    && s.channel.unanswered == 1
                    && s.last_host_time == Some(t0 + 100_000_000)
                    && s.channel.message_version
                        == Some(if seed % 2 == 0 { v(4, 0) } else { v(3, 0) }),
                || format!("{s:?}"),
            )?;
            let host = host_scope(|| ts.timesync());
            ensure(host.sent == 3 && host.answered == 2, || format!("{host:?}"))?;
            host_ok("timesync", &ts)
        })
    });
}

/// KVP: pool 2 enumerates the ten well-known keys with the source's IPv4 addresses
/// `;`-separated, then no more items; IP info by MAC; SET/GET/DELETE on pool 0.
#[test]
fn kvp_enumeration_ip_info_and_store() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let (_, kv) = kvp(&w, 1);
            until(&h, "negotiation", SECOND, || negotiated(&kv).is_some()).await?;
            host_scope(|| kv.enumerate_all(KvpPool::AUTO));
            until(&h, "enumeration", SECOND, || {
                host_scope(|| {
                    kv.responses()
                        .last()
                        .is_some_and(|r| r.status == IcStatus::S_CONT)
                })
            })
            .await?;
            let pairs = host_scope(|| kv.enumerated(KvpPool::AUTO));
            let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
            ensure(keys == AUTO_KEYS, || format!("keys {keys:?}"))?;
            let value = |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            ensure(
                value("NetworkAddressIPv4") == "10.0.0.4;192.168.1.7",
                || format!("{pairs:?}"),
            )?;
            ensure(
                value("FullyQualifiedDomainName") == "appliance.example.internal"
                    && value("OSName") == "hvnet"
                    && value("ProcessorArchitecture") == "x86_64"
                    && value("NetworkAddressIPv6").is_empty(),
                || format!("{pairs:?}"),
            )?;
            let responses = host_scope(|| kv.responses());
            ensure(
                responses.len() == 11 && responses[10].index == Some(10),
                || format!("{responses:?}"),
            )?;

            // IP info by MAC; an unknown adapter fails.
            host_scope(|| {
                kv.get_ip_info("00:15:5D:00:00:01");
                kv.get_ip_info("00:15:5D:99:99:99");
            });
            until(&h, "IP info", SECOND, || {
                host_scope(|| kv.responses().len()) == 13
            })
            .await?;
            let responses = host_scope(|| kv.responses());
            let info = responses[11].ip_info.clone().ok_or("no IP info")?;
            ensure(
                info.ip_addr == "10.0.0.4;192.168.1.7"
                    && info.sub_net == "255.255.255.0;255.255.255.0"
                    && info.gate_way == "10.0.0.1"
                    && info.dns_addr == "168.63.129.16"
                    && info.addr_family == 1
                    && info.dhcp_enabled
                    && info.adapter_id == "00:15:5D:00:00:01",
                || format!("{info:?}"),
            )?;
            ensure(responses[12].status == IcStatus::E_FAIL, || {
                format!("{:?}", responses[12])
            })?;

            // The external pool.
            host_scope(|| {
                kv.set(
                    KvpPool::EXTERNAL,
                    "Role",
                    KvpHostValue::String("edge".into()),
                );
                kv.set(KvpPool::EXTERNAL, "Count", KvpHostValue::U32(7));
                kv.get(KvpPool::EXTERNAL, "Role");
                kv.get(KvpPool::EXTERNAL, "Count");
                kv.enumerate_all(KvpPool::EXTERNAL);
                kv.delete(KvpPool::EXTERNAL, "Role");
                kv.get(KvpPool::EXTERNAL, "Role");
                kv.delete(KvpPool::EXTERNAL, "Role");
                kv.get(KvpPool::GUEST, "Count");
            });
            until(&h, "store operations", SECOND, || {
                host_scope(|| kv.queued()) == 0 && host_scope(|| kv.responses().len()) == 13 + 11
            })
            .await?;
            let r = host_scope(|| kv.responses());
            let tail: Vec<(IcStatus, Option<String>)> = r[13..]
                .iter()
                .map(|r| (r.status, r.value.clone()))
                .collect();
            let want = vec![
                (IcStatus::S_OK, None),
                (IcStatus::S_OK, None),
                (IcStatus::S_OK, Some("edge".to_string())),
                (IcStatus::S_OK, Some("7".to_string())),
                (IcStatus::S_OK, Some("edge".to_string())),
                (IcStatus::S_OK, Some("7".to_string())),
                (IcStatus::S_CONT, None),
                (IcStatus::S_OK, None),
                (IcStatus::S_CONT, None),
                (IcStatus::S_CONT, None),
                (IcStatus::S_CONT, None),
            ];
            ensure(tail == want, || format!("{tail:?}"))?;
            let s = w.drivers.stats().kvp;
            ensure(
                s.entries == 1 && s.sets == 2 && s.deletes == 2 && s.channel.malformed == 0,
                || format!("{s:?}"),
            )?;
            host_ok("kvp", &kv)
        })
    });
}

/// Hostile input on every channel is dropped and counted, and each service still
/// answers afterwards.
#[test]
fn malformed_messages_are_dropped_and_counted() {
    check_seeds(8, |seed| {
        in_world(seed, |w, h| async move {
            let (hb, sd, ts, kv) = all_four(&w, &h).await?;
            host_scope(|| hb.set_beat_on_poll(false));
            h.sleep(Duration::from_millis(2)).await;
            let beats = host_scope(|| hb.heartbeat().answered);

            // Common garbage for every channel.
            let mut garbage: Vec<Vec<u8>> = vec![vec![], vec![1, 2, 3], vec![0; 27]];
            // icmsgsize beyond the packet.
            let mut m = heartbeat_message(1);
            m[18..20].copy_from_slice(&200u16.to_le_bytes());
            garbage.push(m);
            // Pipe size beyond the packet.
            let mut m = heartbeat_message(1);
            m[4..8].copy_from_slice(&9999u32.to_le_bytes());
            garbage.push(m);
            // Negotiate with counts beyond the body, and with zero framework versions.
            let mut nego = vec![5, 0, 5, 0, 0, 0, 0, 0];
            nego.extend_from_slice(&[3, 0, 0, 0]);
            garbage.push(ic_message(IcMsgType::NEGOTIATE, &nego));
            garbage.push(ic_message(
                IcMsgType::NEGOTIATE,
                &[0, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0],
            ));
            // Wrong types: VSS and an unknown one.
            garbage.push(ic_message(IcMsgType::VSS, &[0; 16]));
            garbage.push(ic_message(IcMsgType(77), &[0; 16]));
            let common = garbage.len() as u64;

            host_scope(|| {
                for g in &garbage {
                    hb.inject_raw(g);
                    sd.inject_raw(g);
                    ts.inject_raw(g);
                    kv.inject_raw(g);
                }
                // Service-specific: short bodies, oversized KVP strings, unknown ops.
                hb.inject_raw(&ic_message(IcMsgType::HEARTBEAT, &[1, 2, 3]));
                // Ring packets pad payloads to 8 bytes and the padding counts as body
                // (as in Linux): these stay short even with it.
                sd.inject_raw(&ic_message(IcMsgType::SHUTDOWN, &[0; 4]));
                ts.inject_raw(&ic_message(IcMsgType::TIMESYNC, &[0; 13]));
                let mut set = vec![1u8, 0, 0, 0, 1, 0, 0, 0];
                set.extend_from_slice(&1000u32.to_le_bytes());
                set.extend_from_slice(&4u32.to_le_bytes());
                set.resize(4 + 2572, 0x41);
                kv.inject_raw(&ic_message(IcMsgType::KVPEXCHANGE, &set));
                let mut get = vec![0u8, 1, 0, 0, 1, 0, 0, 0];
                get.extend_from_slice(&7u32.to_le_bytes());
                get.extend_from_slice(&0u32.to_le_bytes());
                get.resize(4 + 2572, 0x41);
                kv.inject_raw(&ic_message(IcMsgType::KVPEXCHANGE, &get));
                kv.inject_raw(&ic_message(
                    IcMsgType::KVPEXCHANGE,
                    &[9, 0, 0, 0, 0, 0, 0, 0],
                ));
                kv.inject_raw(&ic_message(
                    IcMsgType::KVPEXCHANGE,
                    &[3, 9, 0, 0, 0, 0, 0, 0],
                ));
            });
            let want = [common + 1, common + 1, common + 1, common + 4];
            until(&h, "the drops", SECOND, || {
                let s = w.drivers.stats();
                [
                    s.heartbeat.channel.malformed,
                    s.shutdown.channel.malformed,
                    s.timesync.channel.malformed,
                    s.kvp.channel.malformed,
                ] == want
            })
            .await?;

            // Everything still works.
            host_scope(|| {
                hb.beat();
                sd.request_hibernate();
                ts.send_sync(17_000_000_000_000_000);
                kv.enumerate(KvpPool::AUTO, 2);
            });
            until(&h, "answers after the garbage", SECOND, || {
                host_scope(|| {
                    hb.heartbeat().answered == beats + 1
                        && sd.results().len() == 1
                        && ts.timesync().answered == 1
                        && kv.responses().len() == 1
                })
            })
            .await?;
            let r = host_scope(|| kv.responses());
            ensure(r[0].key.as_deref() == Some("NetworkAddressIPv4"), || {
                format!("{r:?}")
            })?;
            let s = w.drivers.stats();
            ensure(
                s.heartbeat.channel.ring_failures == 0 && s.kvp.channel.last_drop.is_some(),
                || format!("{s:?}"),
            )?;
            for (name, ok) in [
                ("heartbeat", host_ok("heartbeat", &hb)),
                ("shutdown", host_ok("shutdown", &sd)),
                ("timesync", host_ok("timesync", &ts)),
                ("kvp", host_ok("kvp", &kv)),
            ] {
                ok.map_err(|e| format!("{name}: {e}"))?;
            }
            Ok(())
        })
    });
}

/// Each device rescinded in the middle of a conversation, over and over: the tasks end,
/// the host is clean, GPADLs, relids, pages and heap return to the baseline.
#[test]
fn rescind_mid_conversation_leaks_nothing() {
    check_seeds(8, |seed| {
        let sim = sim(seed);
        let h = sim.handle();
        let w = world(&h, seed);
        let w2 = w.clone();
        let h2 = h.clone();
        let result = sim.run(async move {
            let (w, h) = (w2, h2);
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let mut baseline = None;
            for cycle in 0..12u32 {
                let (d1, hb) = heartbeat(&w, 1, None);
                let (d2, sd) = shutdown(&w, 2);
                let (d3, ts) = timesync(&w, 3, None);
                let (d4, kv) = kvp(&w, 4);
                until(&h, "four channels", SECOND, || {
                    w.drivers.open_channels() == 4
                })
                .await?;
                // Keep every conversation busy, then pull the devices one by one at
                // seed-dependent moments.
                host_scope(|| {
                    kv.enumerate_all(KvpPool::AUTO);
                    for i in 0..20 {
                        ts.send_sample(17_000_000_000_000_000 + i);
                    }
                    sd.request_hibernate();
                });
                let mut order = [d1, d2, d3, d4];
                let k = (seed as usize + cycle as usize) % 4;
                order.rotate_left(k);
                for d in order {
                    h.sleep(Duration::from_micros(h.random_below(3000))).await;
                    w.remove(d);
                }
                until(&h, "all channels gone", SECOND, || {
                    w.drivers.open_channels() == 0
                })
                .await?;
                w.bus().settle().await;
                h.sleep(Duration::from_millis(5)).await;
                for (name, r) in [
                    ("heartbeat", host_ok("heartbeat", &hb)),
                    ("shutdown", host_ok("shutdown", &sd)),
                    ("timesync", host_ok("timesync", &ts)),
                    ("kvp", host_ok("kvp", &kv)),
                ] {
                    r.map_err(|e| format!("cycle {cycle} {name}: {e}"))?;
                }
                host_scope(|| drop((hb, sd, ts, kv)));
                *w.power.host_view.borrow_mut() = None;
                ensure(w.bus().live_gpadls() == 0, || {
                    format!("cycle {cycle}: {} GPADLs live", w.bus().live_gpadls())
                })?;
                ensure(w.bus().live_relids().is_empty(), || {
                    format!("cycle {cycle}: relids {:?}", w.bus().live_relids())
                })?;
                let s = w.drivers.stats();
                let c = [
                    s.heartbeat.channel,
                    s.shutdown.channel,
                    s.timesync.channel,
                    s.kvp.channel,
                ];
                ensure(
                    c.iter()
                        .all(|c| c.opens == u64::from(cycle) + 1 && c.stopped == c.opens),
                    || format!("cycle {cycle}: {c:?}"),
                )?;
                // The test clock keeps what it was told; that is not the driver's heap.
                *w.clock.samples.borrow_mut() = Vec::new();
                *w.clock.set.borrow_mut() = Vec::new();
                let now = (heap_live(), w.machine.memory.live_pages(), h.task_count());
                match baseline {
                    None if cycle >= 1 => baseline = Some(now),
                    Some(b) if b != now => {
                        return Err(format!(
                            "cycle {cycle}: (heap, pages, tasks) {now:?} vs baseline {b:?}"
                        ))
                    }
                    _ => {}
                }
            }
            let calls = w.power.calls.borrow().len();
            ensure(calls == 0, || "power called".into())
        });
        result.map_err(|e| e.to_string())??;
        w.assert_clean();
        Ok::<_, String>(())
    });
}

/// The appliance's orderly shutdown: `close` stops every task and closes every channel;
/// the host sees the closes and no violation.
#[test]
fn close_stops_tasks_and_closes_channels() {
    check_seeds(5, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let (_, hb) = heartbeat(&w, 1, None);
            let (_, kv) = kvp(&w, 2);
            until(&h, "negotiations", SECOND, || {
                negotiated(&hb).is_some() && negotiated(&kv).is_some()
            })
            .await?;
            host_scope(|| kv.enumerate_all(KvpPool::AUTO));
            h.sleep(Duration::from_micros(h.random_below(2000))).await;
            w.drivers.close().await;
            ensure(w.drivers.open_channels() == 0, || "channels left".into())?;
            until(&h, "the closes", SECOND, || {
                host_scope(|| !hb.is_open() && !kv.is_open())
            })
            .await?;
            let s = w.drivers.stats();
            ensure(
                s.heartbeat.channel.stopped == 1 && s.kvp.channel.stopped == 1,
                || format!("{s:?}"),
            )?;
            ensure(w.bus().live_gpadls() == 0, || "GPADLs left".into())?;
            host_ok("heartbeat", &hb)?;
            host_ok("kvp", &kv)
        })
    });
}

/// A host flooding a channel with garbage (more than the ring holds at once, more than
/// one drain's budget): every message is dropped and counted, other channels keep
/// working meanwhile, and the flooded one still answers afterwards.
#[test]
fn a_flooding_host_is_survived() {
    check_seeds(8, |seed| {
        in_world(seed, |w, h| async move {
            w.bus().connect().await.map_err(|e| format!("{e:?}"))?;
            let (_, hb) = heartbeat(&w, 1, None);
            let (_, kv) = kvp(&w, 2);
            until(&h, "negotiations", SECOND, || {
                negotiated(&hb).is_some() && negotiated(&kv).is_some()
            })
            .await?;
            host_scope(|| hb.set_beat_on_poll(false));
            h.sleep(Duration::from_millis(2)).await;
            let before = w.drivers.stats().heartbeat.channel.malformed;
            let flood = 600u64;
            host_scope(|| {
                for i in 0..flood {
                    hb.inject_raw(&ic_message(IcMsgType::KVPEXCHANGE, &i.to_le_bytes()));
                }
                kv.enumerate_all(KvpPool::AUTO);
            });
            until(&h, "the flood to drain", 10 * SECOND, || {
                w.drivers.stats().heartbeat.channel.malformed == before + flood
            })
            .await?;
            until(&h, "the enumeration", SECOND, || {
                host_scope(|| kv.enumerated(KvpPool::AUTO).len()) == AUTO_KEYS.len()
            })
            .await?;
            let answered = host_scope(|| hb.heartbeat().answered);
            host_scope(|| hb.beat());
            until(&h, "a heartbeat after the flood", SECOND, || {
                host_scope(|| hb.heartbeat().answered) == answered + 1
            })
            .await?;
            ensure(host_scope(|| hb.stats().injected) == flood, || {
                "not everything was injected".into()
            })?;
            host_ok("heartbeat", &hb)?;
            host_ok("kvp", &kv)
        })
    });
}
