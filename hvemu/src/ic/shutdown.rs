//! Shutdown device: sends power-off, restart or hibernate requests as OpenVMM does
//! (reason `SHTDN_REASON_FLAG_PLANNED`, timeout 0, the full 2060-byte body) and records
//! the status each gets.

use std::collections::VecDeque;

use hvnet_wire::ic::{
    IcMsgHdr, IcMsgType, IcStatus, IcVersion, Negotiated, ShutdownMsgData, ShutdownRequest,
    HOST_SHUTDOWN_VERSIONS, HV_SHUTDOWN_GUID, SHUTDOWN_FLAG_FORCE, SHUTDOWN_FLAG_HIBERNATE,
    SHUTDOWN_FLAG_RESTART,
};
use hvnet_wire::vmbus::Guid;
use zerocopy::IntoBytes;

use super::{HostService, IcHandle, ServiceRequest};

/// Reason code OpenVMM sends (`SHTDN_REASON_FLAG_PLANNED`).
pub const SHTDN_REASON_FLAG_PLANNED: u32 = 0x8000_0000;

/// A request and the guest's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownResult {
    /// The flags sent.
    pub flags: u32,
    /// The status the guest answered with.
    pub status: IcStatus,
}

/// The shutdown service of an [`super::IcDevice`].
#[derive(Debug, Default)]
pub struct Shutdown {
    queue: VecDeque<u32>,
    results: Vec<ShutdownResult>,
    sent: u64,
}

impl HostService for Shutdown {
    /// The flags sent.
    type Pending = u32;
    const MSG_TYPE: IcMsgType = IcMsgType::SHUTDOWN;
    const CLASS: Guid = HV_SHUTDOWN_GUID;

    fn default_versions() -> Vec<IcVersion> {
        HOST_SHUTDOWN_VERSIONS.to_vec()
    }

    fn next_request(&mut self, _versions: &Negotiated, _poll: bool) -> Option<ServiceRequest<u32>> {
        let flags = self.queue.pop_front()?;
        self.sent += 1;
        let body = ShutdownMsgData {
            reason_code: SHTDN_REASON_FLAG_PLANNED.into(),
            timeout_seconds: 0.into(),
            flags: flags.into(),
            display_message: [0; 2048],
        };
        Some(ServiceRequest {
            body: body.as_bytes().to_vec(),
            expect_reply: true,
            pending: flags,
        })
    }

    fn on_response(&mut self, flags: u32, header: &IcMsgHdr, body: &[u8]) -> Result<(), String> {
        // The guest echoes the request; it must still read as one.
        let echoed = ShutdownRequest::parse(body).map_err(|e| format!("shutdown answer: {e}"))?;
        let status = header.status();
        self.results.push(ShutdownResult { flags, status });
        if echoed.flags != flags {
            return Err(format!(
                "shutdown answer flags {:#x}, sent {flags:#x}",
                echoed.flags
            ));
        }
        Ok(())
    }
}

impl IcHandle<Shutdown> {
    /// Asks the guest to power off (`reboot == false`) or restart, with the force bit.
    pub fn request_shutdown(&self, reboot: bool) {
        let flags = SHUTDOWN_FLAG_FORCE | if reboot { SHUTDOWN_FLAG_RESTART } else { 0 };
        self.request_flags(flags);
    }

    /// Asks the guest to hibernate.
    pub fn request_hibernate(&self) {
        self.request_flags(SHUTDOWN_FLAG_HIBERNATE);
    }

    /// Sends a request with any flags (including invalid ones).
    pub fn request_flags(&self, flags: u32) {
        self.with_service(|s| s.queue.push_back(flags));
    }

    /// Answered requests, oldest first.
    pub fn results(&self) -> Vec<ShutdownResult> {
        self.with_service(|s| s.results.clone())
    }

    /// Requests sent.
    pub fn sent(&self) -> u64 {
        self.with_service(|s| s.sent)
    }
}
