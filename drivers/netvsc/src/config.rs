//! Driver tunables.

use hvnet_runtime::Duration;

/// How netvsc sizes a NIC and how long it waits for the host.
#[derive(Clone, Debug)]
pub struct NetvscConfig {
    /// Queues wanted per NIC (primary included); the host may grant fewer. 1 disables
    /// sub-channels. At most 64 (`VRSS_CHANNEL_MAX`).
    pub queues: u16,
    /// Receive buffer size in bytes (a whole number of pages). Linux's default is 16 MiB.
    pub recv_buffer_bytes: usize,
    /// Send buffer size in bytes (a whole number of pages). About 1 MiB by default.
    pub send_buffer_bytes: usize,
    /// Pages of each ring (guest-to-host and host-to-guest), control page included.
    pub ring_pages: usize,
    /// How long a control request (NVSP or RNDIS) may wait for its answer.
    pub reply_timeout: Duration,
    /// How long the probe waits for the sub-channel worker to open every granted
    /// sub-channel before it carries on with the queues it has.
    pub subchannel_timeout: Duration,
}

impl Default for NetvscConfig {
    fn default() -> Self {
        Self {
            queues: 8,
            recv_buffer_bytes: 16 * 1024 * 1024,
            send_buffer_bytes: 256 * 4096,
            ring_pages: 128,
            reply_timeout: Duration::from_secs(5),
            subchannel_timeout: Duration::from_secs(10),
        }
    }
}
