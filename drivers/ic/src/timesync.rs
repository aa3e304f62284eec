//! Time synchronisation: the host sends its UTC time (100 ns units since 1601).
//!
//! * `SYNC` (after boot, restore or a host clock step) is a hard request: the driver
//!   calls [`Clock::set_time`].
//! * `SAMPLE` is a periodic hint: the driver calls [`Clock::sample`], whose default
//!   implementation sets the clock as well; an appliance that wants to slew instead
//!   overrides it. (Linux only records samples for its PTP clock; the first versions set
//!   the clock from the first 50 samples. A unikernel without another time source is
//!   better served by following them.)
//! * A probe (no flags) changes nothing.
//!
//! Version 4 messages also carry the guest's reference counter at the time the host took
//! the sample. If the clock can read that counter ([`Clock::reference_counter`]), the
//! time is advanced by what elapsed since, as Linux does, up to 600 s (a staler sample is
//! used as is). Times before 1970 cannot be Unix times: they are counted and ignored.
//! The clock is touched after the answer is written, so the host's round trip is short.

use alloc::rc::Rc;
use core::cell::Cell;

use hvnet_wire::ic::{
    IcMessage, IcMsgType, IcStatus, IcVersion, TimesyncMsg, GUEST_TIMESYNC_VERSIONS, HV_TS_GUID,
    ICTIMESYNCFLAG_SAMPLE, ICTIMESYNCFLAG_SYNC, WLTIMEDELTA,
};
use hvnet_wire::vmbus::Guid;
use log::debug;

use crate::channel::{ChannelCounters, DropReason, Reply, Service};
use crate::Clock;

/// Largest correction applied from the reference counter: 600 s in 100 ns units (Linux
/// `HOST_TIMESYNC_DELAY_THRESH`).
const MAX_REFERENCE_DELTA: u64 = 600 * 10_000_000;

/// Time-sync counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimesyncStats {
    /// The channel's counters.
    pub channel: ChannelCounters,
    /// `SYNC` messages (clock set).
    pub syncs: u64,
    /// `SAMPLE` messages.
    pub samples: u64,
    /// Messages with neither flag.
    pub probes: u64,
    /// Host times before 1970, ignored.
    pub bad_times: u64,
    /// The last host time, Unix time in 100 ns units (corrected as described above).
    pub last_host_time: Option<u64>,
    /// The flags of the last message.
    pub last_flags: Option<u8>,
}

/// What to tell the clock once the answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeUpdate {
    Set(u64),
    Sample(u64),
}

/// The time-sync service.
pub(crate) struct Timesync {
    clock: Rc<dyn Clock>,
    counters: Cell<ChannelCounters>,
    stats: Cell<TimesyncStats>,
}

impl Timesync {
    pub(crate) fn new(clock: Rc<dyn Clock>) -> Self {
        Timesync {
            clock,
            counters: Cell::new(ChannelCounters::default()),
            stats: Cell::new(TimesyncStats::default()),
        }
    }

    pub(crate) fn stats(&self) -> TimesyncStats {
        TimesyncStats {
            channel: self.counters.get(),
            ..self.stats.get()
        }
    }

    fn update(&self, f: impl FnOnce(&mut TimesyncStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// The host time as Unix 100 ns, corrected by the reference counter when possible.
    fn unix_time(&self, msg: &TimesyncMsg) -> Option<u64> {
        let mut t = msg.parent_time().checked_sub(WLTIMEDELTA)?;
        if let (Some(then), Some(now)) = (msg.reference_time(), self.clock.reference_counter()) {
            match now.checked_sub(then) {
                Some(delta) if delta <= MAX_REFERENCE_DELTA => t = t.saturating_add(delta),
                _ => debug!("ic timesync: reference time {then} unusable at {now}"),
            }
        }
        Some(t)
    }
}

impl Service for Timesync {
    const NAME: &'static str = "timesync";
    const CLASS: Guid = HV_TS_GUID;
    const MSG_TYPE: IcMsgType = IcMsgType::TIMESYNC;
    const VERSIONS: &'static [IcVersion] = &GUEST_TIMESYNC_VERSIONS;
    type After = TimeUpdate;

    fn counters(&self) -> &Cell<ChannelCounters> {
        &self.counters
    }

    fn handle(
        &self,
        msg: &IcMessage<'_>,
        version: IcVersion,
        reply: &mut Reply,
    ) -> Result<Option<TimeUpdate>, DropReason> {
        let sample = TimesyncMsg::parse(msg.body, version)?;
        let flags = sample.flags();
        reply.set_status(IcStatus::S_OK);
        self.update(|s| s.last_flags = Some(flags));
        let Some(time) = self.unix_time(&sample) else {
            self.update(|s| s.bad_times += 1);
            return Ok(None);
        };
        self.update(|s| s.last_host_time = Some(time));
        if flags & ICTIMESYNCFLAG_SYNC != 0 {
            self.update(|s| s.syncs += 1);
            Ok(Some(TimeUpdate::Set(time)))
        } else if flags & ICTIMESYNCFLAG_SAMPLE != 0 {
            self.update(|s| s.samples += 1);
            Ok(Some(TimeUpdate::Sample(time)))
        } else {
            self.update(|s| s.probes += 1);
            Ok(None)
        }
    }

    fn after_reply(&self, update: TimeUpdate) {
        match update {
            TimeUpdate::Set(t) => self.clock.set_time(t),
            TimeUpdate::Sample(t) => self.clock.sample(t),
        }
    }
}
