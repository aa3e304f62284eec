//! The VM's integration services, as Hyper-V offers them to every guest: heartbeat,
//! shutdown, time synchronization and KVP, each a VMBus device of [`crate::ic`].
//!
//! What the host does with them, like Hyper-V's VM worker process:
//! - heartbeat: one request a second once the guest has the channel open;
//! - time sync: a `SYNC` with the host's clock as soon as the guest has negotiated, then
//!   a `SAMPLE` every 5 s;
//! - KVP: enumerates the guest's auto pool (host name, addresses, OS) every 5 s and keeps
//!   the last complete answer, which `kvp` on the control socket shows (Hyper-V
//!   Manager's Networking tab reads the same keys);
//! - shutdown: sent when the control socket asks (`shutdown`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hvnet_wire::ic::KvpPool;

use hvemu::ic::{Heartbeat, IcDevice, IcHandle, Kvp, Negotiation, Shutdown, Timesync};
use hvemu::{DeviceId, VmbusHost};

const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);
const SAMPLE_PERIOD: Duration = Duration::from_secs(5);
const KVP_PERIOD: Duration = Duration::from_secs(5);

/// The instance id of integration service `n`: fixed, distinct from the NICs' ids.
fn instance_id(n: u8) -> [u8; 16] {
    let mut id = *b"hvemu-ic-device-";
    id[15] = b'0' + n;
    id
}

/// The four devices and what the host last learnt from them.
pub struct IntegrationServices {
    ids: [DeviceId; 4],
    heartbeat: IcHandle<Heartbeat>,
    shutdown: IcHandle<Shutdown>,
    timesync: IcHandle<Timesync>,
    kvp: IcHandle<Kvp>,
    last_beat: Option<Instant>,
    synced: bool,
    last_sample: Option<Instant>,
    last_kvp: Option<Instant>,
    kvp_pairs: Vec<(String, String)>,
    shutdowns_requested: u32,
}

/// 100 ns units since 1970-01-01 UTC, now.
fn unix_100ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_nanos() / 100) as u64)
        .unwrap_or(0)
}

fn due(last: Option<Instant>, period: Duration, now: Instant) -> bool {
    last.is_none_or(|t| now.duration_since(t) >= period)
}

impl IntegrationServices {
    /// Offers the four devices on `host`.
    pub fn add(host: &mut VmbusHost) -> Self {
        let heartbeat = IcDevice::new(Heartbeat::default());
        let shutdown = IcDevice::new(Shutdown::default());
        let timesync = IcDevice::new(Timesync::default());
        let kvp = IcDevice::new(Kvp::default());
        let (h, s, t, k) = (
            heartbeat.handle(),
            shutdown.handle(),
            timesync.handle(),
            kvp.handle(),
        );
        // The heartbeat is paced here, not by the host's (frequent) device polls.
        h.set_beat_on_poll(false);
        let ids = [
            host.add_device(heartbeat.into_device_spec(instance_id(0))),
            host.add_device(shutdown.into_device_spec(instance_id(1))),
            host.add_device(timesync.into_device_spec(instance_id(2))),
            host.add_device(kvp.into_device_spec(instance_id(3))),
        ];
        IntegrationServices {
            ids,
            heartbeat: h,
            shutdown: s,
            timesync: t,
            kvp: k,
            last_beat: None,
            synced: false,
            last_sample: None,
            last_kvp: None,
            kvp_pairs: Vec::new(),
            shutdowns_requested: 0,
        }
    }

    /// Periodic host work; returns whether any device was polled (messages may be
    /// pending for the guest).
    pub fn pump(&mut self, host: &mut VmbusHost, now: Instant) -> bool {
        let mut polled = false;
        if self.heartbeat.negotiated().is_some() && due(self.last_beat, HEARTBEAT_PERIOD, now) {
            self.last_beat = Some(now);
            self.heartbeat.beat();
            host.poll_device(self.ids[0]);
            polled = true;
        }
        if self.timesync.negotiated().is_some() {
            if !self.synced {
                self.synced = true;
                self.last_sample = Some(now);
                self.timesync.send_sync(unix_100ns());
                host.poll_device(self.ids[2]);
                polled = true;
            } else if due(self.last_sample, SAMPLE_PERIOD, now) {
                self.last_sample = Some(now);
                self.timesync.send_sample(unix_100ns());
                host.poll_device(self.ids[2]);
                polled = true;
            }
        } else if !self.timesync.is_open() {
            // A new open (after a guest restart of the channel) gets a new SYNC.
            self.synced = false;
        }
        let kvp_idle = self.kvp.queued() == 0 && !self.kvp.stats().outstanding;
        if self.kvp.negotiated().is_some() && kvp_idle && due(self.last_kvp, KVP_PERIOD, now) {
            if self.last_kvp.is_some() {
                self.kvp_pairs = self.kvp.enumerated(KvpPool::AUTO);
            }
            self.last_kvp = Some(now);
            self.kvp.enumerate_all(KvpPool::AUTO);
            host.poll_device(self.ids[3]);
            polled = true;
        }
        polled
    }

    /// Asks the guest to shut down (Hyper-V Manager's "Shut Down").
    pub fn request_shutdown(&mut self, host: &mut VmbusHost) -> Result<String, String> {
        if self.shutdown.negotiated().is_none() {
            return Err("the guest has not opened the shutdown integration service (yet)".into());
        }
        self.shutdowns_requested += 1;
        self.shutdown.request_shutdown(false);
        host.poll_device(self.ids[1]);
        Ok("shutdown requested; the VM stops when the guest powers off".into())
    }

    /// The guest's auto-pool KVP pairs (last complete enumeration; falls back to what the
    /// current one has collected so far).
    pub fn kvp_pairs(&self) -> Vec<(String, String)> {
        if self.kvp_pairs.is_empty() {
            self.kvp.enumerated(KvpPool::AUTO)
        } else {
            self.kvp_pairs.clone()
        }
    }

    /// One line for the `status` reply.
    pub fn summary(&self) -> String {
        fn state(n: &Negotiation, open: bool) -> &'static str {
            match (open, n) {
                (false, _) => "closed",
                (true, Negotiation::Done(_)) => "up",
                (true, Negotiation::NoCommonVersion) => "no common version",
                (true, _) => "negotiating",
            }
        }
        let hb = self.heartbeat.heartbeat();
        let sd = self.shutdown.stats();
        let ts = self.timesync.timesync();
        let kv = self.kvp.stats();
        let violations = [
            self.heartbeat.stats().violations,
            sd.violations,
            self.timesync.stats().violations,
            kv.violations,
        ]
        .iter()
        .sum::<u64>();
        format!(
            "integration services: heartbeat {} ({}/{} answered), shutdown {} ({} requested, answers {:?}), time sync {} ({} sent), KVP {} ({} pairs), violations {violations}",
            state(&self.heartbeat.stats().negotiation, self.heartbeat.is_open()),
            hb.answered,
            hb.sent,
            state(&sd.negotiation, self.shutdown.is_open()),
            self.shutdowns_requested,
            self.shutdown
                .results()
                .iter()
                .map(|r| r.status.0)
                .collect::<Vec<_>>(),
            state(&self.timesync.stats().negotiation, self.timesync.is_open()),
            ts.sent,
            state(&kv.negotiation, self.kvp.is_open()),
            self.kvp_pairs().len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_distinct_and_not_nic_ids() {
        let ids: Vec<_> = (0..4).map(instance_id).collect();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
            assert!((1..64).all(|n| *a != super::super::nic::instance_id(n)));
        }
    }

    #[test]
    fn due_periods() {
        let t0 = Instant::now();
        assert!(due(None, HEARTBEAT_PERIOD, t0));
        assert!(!due(Some(t0), HEARTBEAT_PERIOD, t0));
        assert!(due(Some(t0), HEARTBEAT_PERIOD, t0 + HEARTBEAT_PERIOD));
    }
}
