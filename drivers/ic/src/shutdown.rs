//! Shutdown: the host asks the guest to power off, restart or hibernate.
//!
//! The flags follow OpenVMM (bit 0 force, bit 1 restart, bit 2 hibernate); as in Linux
//! the force bit changes nothing. Power off (0/1) and restart (2/3) are answered S_OK and
//! then handed to the appliance's [`PowerControl`], after the answer is in the ring, so
//! the host learns the request was accepted before the guest starts going away (Linux
//! answers first and schedules the work). Hibernation (4/5) is not supported and answered
//! `NOT_SUPPORTED`; any other value is answered `E_FAIL` (Linux's "invalid request").
//!
//! Only the first accepted request reaches [`PowerControl`]: once a shutdown is under
//! way, later requests are answered S_OK and counted as duplicates. The driver never
//! powers anything off itself.

use alloc::rc::Rc;
use core::cell::Cell;

use hvnet_wire::ic::{
    IcMessage, IcMsgType, IcStatus, IcVersion, ShutdownRequest, GUEST_SHUTDOWN_VERSIONS,
    HV_SHUTDOWN_GUID, SHUTDOWN_FLAG_FORCE, SHUTDOWN_FLAG_HIBERNATE, SHUTDOWN_FLAG_RESTART,
};
use hvnet_wire::vmbus::Guid;
use log::{info, warn};

use crate::channel::{ChannelCounters, DropReason, Reply, Service};
use crate::PowerControl;

/// Shutdown counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownStats {
    /// The channel's counters.
    pub channel: ChannelCounters,
    /// Shutdown requests received.
    pub requests: u64,
    /// Power-off requests handed to [`PowerControl`].
    pub power_offs: u64,
    /// Restart requests handed to [`PowerControl`].
    pub reboots: u64,
    /// Hibernation requests refused.
    pub hibernate_refused: u64,
    /// Requests with flags no reference defines (answered `E_FAIL`).
    pub invalid: u64,
    /// Requests accepted while a shutdown was already under way.
    pub duplicates: u64,
    /// The flags of the last request.
    pub last_flags: Option<u32>,
}

/// The shutdown service.
pub(crate) struct Shutdown {
    power: Rc<dyn PowerControl>,
    counters: Cell<ChannelCounters>,
    stats: Cell<ShutdownStats>,
    under_way: Cell<bool>,
}

impl Shutdown {
    pub(crate) fn new(power: Rc<dyn PowerControl>) -> Self {
        Shutdown {
            power,
            counters: Cell::new(ChannelCounters::default()),
            stats: Cell::new(ShutdownStats::default()),
            under_way: Cell::new(false),
        }
    }

    pub(crate) fn stats(&self) -> ShutdownStats {
        ShutdownStats {
            channel: self.counters.get(),
            ..self.stats.get()
        }
    }

    fn update(&self, f: impl FnOnce(&mut ShutdownStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }
}

/// What the host asked for, from its flags.
fn decode(flags: u32) -> Result<bool, IcStatus> {
    match flags & !SHUTDOWN_FLAG_FORCE {
        0 => Ok(false),
        SHUTDOWN_FLAG_RESTART => Ok(true),
        SHUTDOWN_FLAG_HIBERNATE => Err(IcStatus::NOT_SUPPORTED),
        _ => Err(IcStatus::E_FAIL),
    }
}

impl Service for Shutdown {
    const NAME: &'static str = "shutdown";
    const CLASS: Guid = HV_SHUTDOWN_GUID;
    const MSG_TYPE: IcMsgType = IcMsgType::SHUTDOWN;
    const VERSIONS: &'static [IcVersion] = &GUEST_SHUTDOWN_VERSIONS;
    /// `reboot`.
    type After = bool;

    fn counters(&self) -> &Cell<ChannelCounters> {
        &self.counters
    }

    fn handle(
        &self,
        msg: &IcMessage<'_>,
        _version: IcVersion,
        reply: &mut Reply,
    ) -> Result<Option<bool>, DropReason> {
        let request = ShutdownRequest::parse(msg.body)?;
        self.update(|s| {
            s.requests += 1;
            s.last_flags = Some(request.flags);
        });
        match decode(request.flags) {
            Ok(reboot) => {
                reply.set_status(IcStatus::S_OK);
                if self.under_way.replace(true) {
                    self.update(|s| s.duplicates += 1);
                    return Ok(None);
                }
                info!(
                    "ic shutdown: host requests {} (reason {:#x})",
                    if reboot { "restart" } else { "power off" },
                    request.reason_code
                );
                Ok(Some(reboot))
            }
            Err(status) => {
                if status == IcStatus::NOT_SUPPORTED {
                    self.update(|s| s.hibernate_refused += 1);
                    warn!("ic shutdown: hibernation requested; not supported");
                } else {
                    self.update(|s| s.invalid += 1);
                    warn!("ic shutdown: invalid flags {:#x}", request.flags);
                }
                reply.set_status(status);
                Ok(None)
            }
        }
    }

    fn after_reply(&self, reboot: bool) {
        self.update(|s| {
            if reboot {
                s.reboots += 1;
            } else {
                s.power_offs += 1;
            }
        });
        self.power.shutdown(reboot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert_eq!(decode(0), Ok(false));
        assert_eq!(decode(1), Ok(false));
        assert_eq!(decode(2), Ok(true));
        assert_eq!(decode(3), Ok(true));
        assert_eq!(decode(4), Err(IcStatus::NOT_SUPPORTED));
        assert_eq!(decode(5), Err(IcStatus::NOT_SUPPORTED));
        for bad in [6, 7, 8, 0x8000_0000] {
            assert_eq!(decode(bad), Err(IcStatus::E_FAIL));
        }
    }
}
