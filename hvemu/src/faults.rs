//! Deterministic fault injection.
//!
//! [`Faults`] are per device (set in [`crate::DeviceSpec`] or with
//! [`crate::VmbusHost::set_faults`]); [`HostFaults`] apply to the whole host (set in
//! [`crate::HostConfig`] or with [`crate::VmbusHost::set_host_faults`]). Nothing here
//! is random except delay and reordering, which draw from the host's seeded generator.
//! Raw malformed messages are queued with [`crate::VmbusHost::inject_raw`], malformed ring
//! packets with [`crate::HostRing::write_raw`] and corrupt ring indices with
//! [`crate::HostRing::poke_control`].

/// Which channels of a device a fault applies to, by sub-channel index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelSel {
    /// Every channel.
    All,
    /// The primary channel (index 0).
    Primary,
    /// Every sub-channel (index > 0).
    Subchannels,
    /// The channel with this sub-channel index.
    Index(u16),
}

impl ChannelSel {
    /// Whether the channel with sub-channel index `sub_index` is selected.
    pub fn matches(self, sub_index: u16) -> bool {
        match self {
            ChannelSel::All => true,
            ChannelSel::Primary => sub_index == 0,
            ChannelSel::Subchannels => sub_index != 0,
            ChannelSel::Index(i) => sub_index == i,
        }
    }
}

/// When a step-triggered rescind happens relative to the message that triggers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RescindTiming {
    /// Handle the message (queue its reply), then rescind.
    AfterReply,
    /// Rescind first; the message is then handled as one for a rescinded channel, which
    /// for GPADL creation and OPENCHANNEL means no reply at all.
    BeforeReply,
}

/// How a duplicate primary offer is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateOffer {
    /// The identical OFFERCHANNEL message twice (same relid).
    SameRelid,
    /// A second OFFERCHANNEL for the same instance, sub-channel index 0, with a new relid
    /// and connection id. The host keeps that "ghost" channel usable, so a guest that
    /// wrongly accepts it shows up in [`crate::ChannelSummary::duplicate`] channels with
    /// opens; it is never rescinded and disappears at UNLOAD or device removal.
    NewRelid,
}

/// Faults of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Rescind the whole device when the k-th (1-based) guest message concerning any of
    /// its channels is processed. Messages counted: GPADL_HEADER, GPADL_BODY,
    /// GPADL_TEARDOWN, OPENCHANNEL, CLOSECHANNEL, MODIFYCHANNEL, RELID_RELEASED.
    pub rescind_at_step: Option<(u32, RescindTiming)>,
    /// Swallow OPENCHANNEL on the selected channels: no result, ever (until a rescind or
    /// UNLOAD makes it moot).
    pub never_answer_open: Option<ChannelSel>,
    /// Answer OPENCHANNEL on the selected channels with this non-zero status.
    pub fail_open: Option<(ChannelSel, u32)>,
    /// Answer a completed GPADL on the selected channels with this non-zero
    /// `creation_status` (the GPADL is not created).
    pub fail_gpadl: Option<(ChannelSel, u32)>,
    /// Offer the primary channel twice.
    pub duplicate_primary_offer: Option<DuplicateOffer>,
}

impl Faults {
    /// No faults.
    pub const fn none() -> Self {
        Faults {
            rescind_at_step: None,
            never_answer_open: None,
            fail_open: None,
            fail_gpadl: None,
            duplicate_primary_offer: None,
        }
    }

    /// Rescind the device after handling the k-th guest message concerning it.
    pub const fn rescind_at_step(mut self, k: u32) -> Self {
        self.rescind_at_step = Some((k, RescindTiming::AfterReply));
        self
    }

    /// Rescind the device before handling (and so before replying to) the k-th guest
    /// message concerning it.
    pub const fn rescind_before_step(mut self, k: u32) -> Self {
        self.rescind_at_step = Some((k, RescindTiming::BeforeReply));
        self
    }

    /// Never answer OPENCHANNEL on any channel of the device.
    pub const fn never_answer_open(self) -> Self {
        self.never_answer_open_on(ChannelSel::All)
    }

    /// Never answer OPENCHANNEL on the selected channels.
    pub const fn never_answer_open_on(mut self, sel: ChannelSel) -> Self {
        self.never_answer_open = Some(sel);
        self
    }

    /// Fail OPENCHANNEL on every channel with `status` (must be non-zero to be a failure).
    pub const fn fail_open(self, status: u32) -> Self {
        self.fail_open_on(ChannelSel::All, status)
    }

    /// Fail OPENCHANNEL on the selected channels with `status`.
    pub const fn fail_open_on(mut self, sel: ChannelSel, status: u32) -> Self {
        self.fail_open = Some((sel, status));
        self
    }

    /// Fail GPADL creation on every channel with `status`.
    pub const fn fail_gpadl(self, status: u32) -> Self {
        self.fail_gpadl_on(ChannelSel::All, status)
    }

    /// Fail GPADL creation on the selected channels with `status`.
    pub const fn fail_gpadl_on(mut self, sel: ChannelSel, status: u32) -> Self {
        self.fail_gpadl = Some((sel, status));
        self
    }

    /// Offer the primary channel twice with the same relid.
    pub const fn duplicate_primary_offer(self) -> Self {
        self.duplicate_primary_offer_with(DuplicateOffer::SameRelid)
    }

    /// Offer the primary channel twice, the second time as `how` says.
    pub const fn duplicate_primary_offer_with(mut self, how: DuplicateOffer) -> Self {
        self.duplicate_primary_offer = Some(how);
        self
    }
}

/// Faults of the whole host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFaults {
    /// Each host-to-guest message becomes deliverable after a seeded delay of
    /// `0..=max_delay` ticks of [`crate::VmbusHost::advance_time`]. Messages of one device
    /// still arrive in order, and connection-level messages (VERSION_RESPONSE,
    /// ALLOFFERS_DELIVERED, UNLOAD_RESPONSE, injected raw messages) are barriers nothing
    /// overtakes.
    pub max_delay: u64,
    /// When the guest takes a message, pick at random among the first
    /// `reorder_window + 1` deliverable messages, under the same ordering rules: messages
    /// of different devices may overtake each other, never two of one device, never a
    /// barrier.
    pub reorder_window: usize,
    /// The next `busy_posts` HvPostMessage calls fail with INSUFFICIENT_BUFFERS and are
    /// dropped (the guest must retry, as Linux does).
    pub busy_posts: u32,
}

impl HostFaults {
    /// No faults.
    pub const fn none() -> Self {
        HostFaults {
            max_delay: 0,
            reorder_window: 0,
            busy_posts: 0,
        }
    }

    /// Delay every host message by a seeded `0..=n` ticks.
    pub const fn delay(mut self, n: u64) -> Self {
        self.max_delay = n;
        self
    }

    /// Reorder host messages of different devices within a window of `window + 1`.
    pub const fn reorder(mut self, window: usize) -> Self {
        self.reorder_window = window;
        self
    }

    /// Fail the next `n` posts with INSUFFICIENT_BUFFERS.
    pub const fn busy_posts(mut self, n: u32) -> Self {
        self.busy_posts = n;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert!(ChannelSel::All.matches(0) && ChannelSel::All.matches(3));
        assert!(ChannelSel::Primary.matches(0) && !ChannelSel::Primary.matches(1));
        assert!(!ChannelSel::Subchannels.matches(0) && ChannelSel::Subchannels.matches(2));
        assert!(ChannelSel::Index(2).matches(2) && !ChannelSel::Index(2).matches(1));
        let f = Faults::none().rescind_before_step(3).fail_open(5);
        assert_eq!(f.rescind_at_step, Some((3, RescindTiming::BeforeReply)));
        assert_eq!(f.fail_open, Some((ChannelSel::All, 5)));
    }
}
