//! A seeded fuzz loop: random, half-valid and valid guest messages, signals, memory
//! scribbles and host-side hot-plug against the host. It must never panic, and UNLOAD must
//! always bring it back to a clean state. `HVEMU_FUZZ_SEEDS=n` runs more seeds.

mod common;

use common::*;
use hvemu::{Faults, HostConfig, HostFaults, SplitMix64, ViolationKind};
use hvnet_wire::vmbus::{
    gpa_range_head, ChannelMessage, CloseChannel, GpadlBody, GpadlBodyMsg, GpadlHeader,
    GpadlHeaderMsg, GpadlTeardown, InitiateContact, ModifyChannel, OpenChannel, RelidReleased,
    VmbusVersion, VMBUS_GUEST_VERSIONS,
};
use hvnet_wire::U64;

fn pick<T: Copy>(rng: &mut SplitMix64, xs: &[T]) -> T {
    xs[rng.below(xs.len() as u64) as usize]
}

fn random_faults(rng: &mut SplitMix64) -> Faults {
    let mut f = Faults::none();
    if rng.chance(1, 4) {
        f = f.rescind_at_step(rng.below(12) as u32 + 1);
    }
    if rng.chance(1, 6) {
        f = f.rescind_before_step(rng.below(12) as u32 + 1);
    }
    if rng.chance(1, 8) {
        f = f.never_answer_open();
    }
    if rng.chance(1, 8) {
        f = f.fail_open(0xC000_0001);
    }
    if rng.chance(1, 8) {
        f = f.duplicate_primary_offer();
    }
    f
}

struct Fuzzer {
    g: Guest,
    rng: SplitMix64,
    pages: Vec<u64>,
    gpadls: Vec<u32>,
    /// Rings the fuzzer opened properly, by relid, with their GPADL.
    rings: std::collections::BTreeMap<u32, GuestRing>,
}

impl Fuzzer {
    fn relid(&mut self) -> u32 {
        if self.rng.chance(1, 10) {
            self.rng.next_u64() as u32
        } else {
            self.rng.below(10) as u32
        }
    }

    fn gpadl_id(&mut self) -> u32 {
        if !self.gpadls.is_empty() && self.rng.chance(2, 3) {
            pick(&mut self.rng, &self.gpadls)
        } else {
            let id = self.rng.below(16) as u32;
            self.gpadls.push(id);
            id
        }
    }

    fn pfn(&mut self) -> u64 {
        match self.rng.below(60) {
            0 => self.rng.next_u64(),
            1 => self.pages.first().copied().unwrap_or(0) + 1,
            _ if !self.pages.is_empty() => pick(&mut self.rng, &self.pages),
            _ => 0,
        }
    }

    fn conn_id(&mut self) -> u32 {
        match self.rng.below(8) {
            0 => 4,
            1 => self.rng.next_u64() as u32,
            _ => self.g.conn_id,
        }
    }

    /// Posts on the connection id the guest believes is right.
    fn post_right(&mut self, msg: &ChannelMessage<'_>) {
        let c = self.g.conn_id;
        let b = msg.encode().unwrap();
        let _ = self.g.host.post_message(c, 1, b.as_bytes());
    }

    fn post(&mut self, msg: &ChannelMessage<'_>) {
        let c = self.conn_id();
        let b = msg.encode().unwrap();
        let _ = self.g.host.post_message(c, 1, b.as_bytes());
    }

    fn step(&mut self) {
        let rng = &mut self.rng;
        match rng.below(28) {
            22 | 23 => self.valid_open(),
            24 | 25 => self.valid_traffic(),
            26 => self.valid_cleanup(),
            27 => {
                // The guest frees a page (maybe one a GPADL pins) and gets another.
                let i = self.rng.below(self.pages.len() as u64) as usize;
                self.g.mem.free_pages(&self.pages[i..=i]);
                if let Some(p) = self.g.mem.alloc_pages(1) {
                    self.pages[i] = p[0];
                }
            }
            0 => {
                // Raw garbage with a plausible type.
                let len = rng.below(260) as usize;
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                if len >= 4 {
                    b[..4].copy_from_slice(&(rng.below(32) as u32).to_le_bytes());
                }
                let c = self.conn_id();
                let t = if self.rng.chance(1, 10) {
                    self.rng.next_u64() as u32
                } else {
                    1
                };
                let _ = self.g.host.post_message(c, t, &b);
            }
            1 => {
                let v = if rng.chance(1, 5) {
                    VmbusVersion(rng.next_u64() as u32)
                } else {
                    pick(rng, &VMBUS_GUEST_VERSIONS)
                };
                let sint = if rng.chance(1, 8) { 3 } else { 2 };
                let ic = InitiateContact::new(
                    v,
                    rng.below(10) as u32,
                    sint,
                    0,
                    0,
                    rng.below(2),
                    rng.below(2),
                );
                let c = if rng.chance(1, 6) {
                    1
                } else {
                    v.initiate_contact_connection_id()
                };
                let b = ChannelMessage::InitiateContact(ic).encode().unwrap();
                let _ = self.g.host.post_message(c, 1, b.as_bytes());
                // What the guest would learn from VERSION_RESPONSE.
                self.g.conn_id = if v.uses_msg_sint() {
                    self.g.host.config().msg_conn_id
                } else {
                    1
                };
            }
            2 => self.post(&ChannelMessage::RequestOffers),
            3 => {
                if rng.chance(1, 4) {
                    self.post(&ChannelMessage::Unload)
                }
            }
            4 | 5 => {
                // GPADL header, often followed by its bodies.
                let relid = self.relid();
                let id = self.gpadl_id();
                let pages = self.rng.below(40) as usize + 1;
                let pfns: Vec<u64> = (0..pages).map(|_| self.pfn()).collect();
                let total = (pages * 4096) as u32;
                let mut words = vec![U64::new(gpa_range_head(0, total))];
                words.extend(pfns.iter().take(26).map(|&p| U64::new(p)));
                let mut buflen = (8 + 8 * pages) as u16;
                if self.rng.chance(1, 8) {
                    buflen = self.rng.next_u64() as u16 & !7;
                }
                let h = GpadlHeader {
                    child_relid: relid.into(),
                    gpadl: id.into(),
                    range_buflen: buflen.into(),
                    rangecount: (if self.rng.chance(1, 10) { 2 } else { 1 }).into(),
                };
                self.post(&ChannelMessage::GpadlHeader(GpadlHeaderMsg {
                    header: h,
                    words: &words,
                }));
                let mut rest = &pfns[pfns.len().min(26)..];
                while !rest.is_empty() && !self.rng.chance(1, 10) {
                    let n = rest.len().min(28);
                    let w: Vec<U64> = rest[..n].iter().map(|&p| U64::new(p)).collect();
                    let body = GpadlBody {
                        msgnumber: (if self.rng.chance(1, 10) { 3 } else { 0 }).into(),
                        gpadl: id.into(),
                    };
                    self.post(&ChannelMessage::GpadlBody(GpadlBodyMsg { body, words: &w }));
                    rest = &rest[n..];
                }
            }
            6 => {
                let id = self.gpadl_id();
                let w: Vec<U64> = (0..self.rng.below(29))
                    .map(|_| U64::new(self.pfn()))
                    .collect();
                let body = GpadlBody {
                    msgnumber: 0.into(),
                    gpadl: id.into(),
                };
                self.post(&ChannelMessage::GpadlBody(GpadlBodyMsg { body, words: &w }));
            }
            7 | 8 => {
                let relid = self.relid();
                let id = self.gpadl_id();
                let off = self.rng.below(8) as u32;
                let vp = self.rng.below(10) as u32;
                self.post(&ChannelMessage::OpenChannel(OpenChannel::new(
                    relid, relid, id, vp, off,
                )));
            }
            9 => {
                let relid = self.relid();
                self.post(&ChannelMessage::CloseChannel(CloseChannel {
                    child_relid: relid.into(),
                }));
            }
            10 => {
                let relid = self.relid();
                let id = self.gpadl_id();
                self.post(&ChannelMessage::GpadlTeardown(GpadlTeardown {
                    child_relid: relid.into(),
                    gpadl: id.into(),
                }));
            }
            11 => {
                let relid = self.relid();
                self.post(&ChannelMessage::RelidReleased(RelidReleased {
                    child_relid: relid.into(),
                }));
            }
            12 => {
                let relid = self.relid();
                let vp = self.rng.below(10) as u32;
                self.post(&ChannelMessage::ModifyChannel(ModifyChannel {
                    child_relid: relid.into(),
                    target_vp: vp.into(),
                }));
            }
            13 | 14 => {
                for _ in 0..self.rng.below(6) {
                    let _ = self.g.host.take_message();
                }
                self.g.host.drain_events(&mut |_| {});
            }
            15 => {
                let relid = self.relid();
                let _ = self.g.host.signal_event(relid | 0x2000);
            }
            16 => {
                // Scribble on guest memory (often ring control pages or data), then signal.
                if let Some(&p) = self
                    .pages
                    .get(self.rng.below(self.pages.len() as u64 + 1) as usize)
                {
                    let off = self.rng.below(4096 - 16);
                    let mut b = [0u8; 16];
                    self.rng.fill(&mut b);
                    let _ = self.g.mem.write(p * PAGE + off, &b);
                }
                let relid = self.rng.below(10) as u32;
                let _ = self.g.host.signal_event(relid | 0x2000);
            }
            17 => {
                if self.rng.chance(1, 3) {
                    let n = self.rng.below(8) as u8;
                    let max = self.rng.below(5) as u16;
                    let faults = random_faults(&mut self.rng);
                    self.g
                        .host
                        .add_device(test_device(n, max).with_faults(faults));
                }
            }
            18 => {
                let d = hvemu::DeviceId(self.rng.below(8) as u32);
                if self.rng.chance(1, 3) {
                    self.g.host.remove_device(d);
                } else {
                    let n = self.rng.below(5) as u16;
                    self.g.host.offer_subchannels(d, n);
                }
            }
            19 => {
                let d = hvemu::DeviceId(self.rng.below(8) as u32);
                self.g.host.poll_device(d);
                self.g.host.advance_time(self.rng.below(5));
            }
            20 => {
                let mut b = vec![0u8; self.rng.below(240) as usize];
                self.rng.fill(&mut b);
                let t = self.rng.below(3) as u32;
                self.g.host.inject_raw(t, &b);
            }
            _ => {
                // Valid-looking ring traffic on whatever is open.
                for s in self.g.host.channels() {
                    if s.state == hvemu::ChannelState::Open && self.rng.chance(1, 2) {
                        let _ = self.g.host.signal_event(s.connection_id);
                    }
                }
            }
        }
    }
}

impl Fuzzer {
    /// A correct GPADL + OPENCHANNEL for a random offered channel.
    fn valid_open(&mut self) {
        let offered: Vec<u32> = self
            .g
            .host
            .channels()
            .iter()
            .filter(|s| s.state == hvemu::ChannelState::Offered)
            .map(|s| s.relid)
            .collect();
        if offered.is_empty() || self.pages.len() < 4 {
            return;
        }
        let relid = pick(&mut self.rng, &offered);
        let mut pfns = Vec::new();
        while pfns.len() < 4 {
            let p = pick(&mut self.rng, &self.pages);
            if !pfns.contains(&p) {
                pfns.push(p);
            }
        }
        for &p in &pfns {
            let _ = self.g.mem.write(p * PAGE, &[0u8; 16]);
        }
        let mut ring = GuestRing::new(self.g.mem.clone(), &pfns, 2);
        let id = 0x1000 + self.rng.below(0x1000) as u32;
        let msgs = hvnet_wire::vmbus::gpadl_messages(relid, id, 0, 4 * 4096, &pfns).unwrap();
        for m in msgs {
            let c = self.g.conn_id;
            let _ = self.g.host.post_message(c, 1, m.as_bytes());
        }
        ring.gpadl = id;
        self.gpadls.push(id);
        self.post_right(&ChannelMessage::OpenChannel(OpenChannel::new(
            relid, relid, id, 0, 2,
        )));
        self.rings.insert(relid, ring);
    }

    /// Well-formed packets (echo or sub-channel requests) on a ring the fuzzer opened.
    fn valid_traffic(&mut self) {
        let relids: Vec<u32> = self.rings.keys().copied().collect();
        if relids.is_empty() {
            return;
        }
        let relid = pick(&mut self.rng, &relids);
        let len = self.rng.below(200) as usize;
        let mut payload = vec![0u8; len];
        self.rng.fill(&mut payload);
        if self.rng.chance(1, 4) {
            payload = b"SUBCH".to_vec();
            payload.extend_from_slice(&(self.rng.below(6) as u16).to_le_bytes());
        }
        let completion = self.rng.chance(1, 2);
        let id = self.rng.next_u64();
        let Some(ring) = self.rings.get_mut(&relid) else {
            return;
        };
        if ring.write_inband(id, completion, &payload).is_some() {
            let _ = self.g.host.signal_event(relid | 0x2000);
        }
    }

    /// The rescind path done right for a random rescinded channel.
    fn valid_cleanup(&mut self) {
        let rescinded: Vec<u32> = self
            .g
            .host
            .channels()
            .iter()
            .filter(|s| s.state == hvemu::ChannelState::Rescinded)
            .map(|s| s.relid)
            .collect();
        if rescinded.is_empty() {
            return;
        }
        let relid = pick(&mut self.rng, &rescinded);
        self.post_right(&ChannelMessage::CloseChannel(CloseChannel {
            child_relid: relid.into(),
        }));
        if let Some(ring) = self.rings.remove(&relid) {
            self.post_right(&ChannelMessage::GpadlTeardown(GpadlTeardown {
                child_relid: relid.into(),
                gpadl: ring.gpadl.into(),
            }));
        }
        self.post_right(&ChannelMessage::RelidReleased(RelidReleased {
            child_relid: relid.into(),
        }));
    }
}

fn run_seed(seed: u64, steps: usize) {
    let mut rng = SplitMix64::new(seed);
    let config = HostConfig {
        seed,
        msg_conn_id: pick(&mut rng, &[1, 1, 0x20]),
        pre_win10_v5_connection_ids: rng.chance(1, 5),
        ..HostConfig::default()
    };
    let faults = HostFaults {
        max_delay: rng.below(3),
        reorder_window: rng.below(3) as usize,
        busy_posts: rng.below(2) as u32,
    };
    let mut g = Guest::with_pages(config, 256);
    let pages = g.mem.alloc_pages(128).unwrap();
    for i in 0..3 {
        let faults = random_faults(&mut rng);
        g.host.add_device(test_device(i, 3).with_faults(faults));
    }
    let mut f = Fuzzer {
        g,
        rng,
        pages,
        gpadls: Vec::new(),
        rings: Default::default(),
    };
    // Half the seeds start from a good connection, so deeper states are reached.
    if f.rng.chance(1, 2) {
        let _ = f.g.host.take_message();
        if f.g.connect(VmbusVersion::WIN10_V4_1) {
            f.g.post(&ChannelMessage::RequestOffers);
        }
    }
    f.g.host.set_host_faults(faults);
    for _ in 0..steps {
        f.step();
    }

    // UNLOAD on the right connection id always brings the host back to a clean state.
    let mut g = f.g;
    g.host.set_host_faults(HostFaults::none());
    if let Some(info) = g.host.connection() {
        g.host
            .post_message(
                info.message_connection_id,
                1,
                ChannelMessage::Unload.encode().unwrap().as_bytes(),
            )
            .unwrap();
    }
    g.host.advance_time(1000);
    while g.host.take_message().is_some() {}
    let s = g.host.stats();
    assert!(g.host.connection().is_none(), "seed {seed}");
    assert_eq!(s.live_gpadls + s.partial_gpadls, 0, "seed {seed}");
    assert_eq!(g.mem.pinned_pages(), 0, "seed {seed}");
    assert!(g.host.channels().is_empty(), "seed {seed}");
    // And the host still works.
    g.conn_id = 1;
    assert!(g.connect(VmbusVersion::WIN8), "seed {seed}");
    let offers = g.request_offers();
    for o in &offers {
        assert!(o.child_relid.get() >= 1);
    }
    // Every violation has a reason.
    for v in &s.violations {
        assert!(!v.detail.is_empty(), "seed {seed}: {v:?}");
    }
}

#[test]
fn fuzz_random_guest_messages() {
    let seeds: u64 = std::env::var("HVEMU_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    for seed in 0..seeds {
        run_seed(seed, 1500);
    }
}

#[test]
fn fuzz_reaches_interesting_states() {
    // A sanity check that the fuzzer is not just bouncing off the front door.
    let mut kinds = std::collections::BTreeSet::new();
    let (mut opens, mut packets, mut releases) = (0, 0, 0);
    for seed in 0..32 {
        let mut rng = SplitMix64::new(seed);
        let mut g = Guest::with_pages(
            HostConfig {
                seed,
                ..HostConfig::default()
            },
            256,
        );
        let pages = g.mem.alloc_pages(128).unwrap();
        for i in 0..3 {
            g.host.add_device(test_device(i, 3));
        }
        g.boot();
        let _ = rng.next_u64();
        let mut f = Fuzzer {
            g,
            rng,
            pages,
            gpadls: Vec::new(),
            rings: Default::default(),
        };
        for _ in 0..1500 {
            f.step();
        }
        for v in f.g.host.violations() {
            kinds.insert(v.kind);
        }
        let all: Vec<_> =
            f.g.host
                .channels()
                .into_iter()
                .chain(f.g.host.released_channels().iter().cloned())
                .collect();
        opens += all.iter().map(|s| s.opens).sum::<u32>();
        packets += all.iter().map(|s| s.packets_in).sum::<u64>();
        releases += all.iter().map(|s| s.relid_released).sum::<u32>();
    }
    for k in [
        ViolationKind::Malformed,
        ViolationKind::UnknownRelid,
        ViolationKind::GpadlForeignPfn,
        ViolationKind::OpenBadGpadl,
        ViolationKind::ReleaseNotRescinded,
        ViolationKind::RingCorrupt,
    ] {
        assert!(kinds.contains(&k), "never hit {k}: {kinds:?}");
    }
    assert!(opens > 50, "the fuzzer should open channels: {opens}");
    assert!(packets > 50, "and move packets: {packets}");
    assert!(releases > 10, "and release rescinded channels: {releases}");
}
