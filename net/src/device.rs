//! The smoltcp [`Device`] over one [`Nic`].
//!
//! # Receive: no copy
//! smoltcp asks for a frame with [`Device::receive`] before it knows whether there is one,
//! and [`Nic`] only hands frames out through a callback. [`NicDevice`] bridges the two
//! without copying: `receive` hands out a token optimistically, and the token's `consume`
//! runs smoltcp's closure *inside* [`Nic::receive`]'s callback, on the NIC's own buffer
//! (for netvsc, the receive-buffer section itself, returned to the host right after).
//! When the NIC turns out to have nothing, the closure gets an empty frame, which smoltcp
//! (0.12: `socket_ingress`) treats as processed and ignores, and the device reports
//! itself exhausted until the next [`NicDevice::begin_poll`], which ends smoltcp's
//! ingress loop. That costs one empty [`Nic::receive`] call per poll, the same call a
//! "does it have a frame?" query would be.
//!
//! # Replies to a received frame: one copy
//! smoltcp pairs every receive token with a transmit token for an immediate reply (an ARP
//! reply, an ICMP echo reply, a TCP ACK or RST). It fills that reply while it still reads
//! the received frame, that is inside [`Nic::receive`]'s callback. To keep the NIC from
//! being re-entered (a driver may hold its queue state while it delivers), such a reply
//! is written into a reusable buffer owned by the device and sent with
//! [`Nic::transmit`] once `receive` has returned. Frames smoltcp sends on its own (socket
//! data, DHCP, retransmissions) are written straight into the NIC's send buffer.
//!
//! # When the NIC cannot send
//! - Send room exhausted (`can_transmit()` false while the link is up):
//!   [`Device::transmit`] returns `None`. smoltcp keeps the data queued in its sockets and
//!   tries again at the next poll; nothing is lost. The device remembers it
//!   ([`NicDevice::tx_blocked`]) so the interface task waits for [`Nic::changed`] instead
//!   of spinning on smoltcp's "poll again now".
//! - A send refused after a token was handed out (`Busy` in a race, `LinkDown`,
//!   `TooLong`, `Removed`): smoltcp considers the frame sent, so it is dropped. TCP
//!   retransmits it after its timeout; UDP, ICMP and ARP frames are simply lost, as on
//!   any NIC whose queue is full. Each such drop is counted by reason in
//!   [`DeviceStats`].
//! - Link down: tokens are still handed out and frames are dropped as `LinkDown`, as a
//!   carrier-less NIC drops them, so TCP backs off instead of smoltcp polling in a loop.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use hvnet_netvsc::nic::{Nic, NicError};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant as NetInstant;

/// Length of an Ethernet header (destination, source, EtherType); no VLAN tag, no FCS.
pub const ETHERNET_HEADER_LEN: usize = 14;

/// Smallest IP MTU the device reports to smoltcp (the datagram size every IPv4 host
/// must accept, RFC 791); a NIC claiming less is not believed.
pub const MIN_IP_MTU: usize = 576;

/// Largest IP MTU the device reports (an IPv4 datagram's maximum length).
pub const MAX_IP_MTU: usize = 65535;

/// Frames one poll may take from the NIC before the interface task yields, so one busy
/// NIC cannot keep the executor from its other tasks.
pub const DEFAULT_RX_BUDGET: usize = 64;

/// Counters kept by the glue (the NIC keeps its own per queue, see
/// [`QueueStats`](hvnet_netvsc::nic::QueueStats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames handed to smoltcp.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames the NIC delivered beyond the budget it was given (a driver bug); dropped.
    pub rx_over_budget: u64,
    /// Frames the NIC accepted.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Replies to a received frame that went through the device's reply buffer.
    pub tx_replies: u64,
    /// Times smoltcp wanted to send while the NIC had no room (nothing lost).
    pub tx_blocked: u64,
    /// Frames dropped because the NIC was busy after all.
    pub tx_dropped_busy: u64,
    /// Frames dropped because the link was down.
    pub tx_dropped_link_down: u64,
    /// Frames dropped as longer than the NIC's maximum.
    pub tx_dropped_too_long: u64,
    /// Frames dropped because the NIC was removed.
    pub tx_dropped_removed: u64,
}

impl DeviceStats {
    /// Every frame dropped on the way out, whatever the reason.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped_busy
            + self.tx_dropped_link_down
            + self.tx_dropped_too_long
            + self.tx_dropped_removed
    }
}

/// A smoltcp device over one NIC. See the [module docs](self).
pub struct NicDevice {
    nic: Rc<dyn Nic>,
    max_burst: Option<usize>,
    rx_budget: usize,
    rx_left: Cell<usize>,
    rx_exhausted: Cell<bool>,
    tx_blocked: Cell<bool>,
    /// The reply to the frame being received, or scratch space when the NIC refused a
    /// frame without asking for its bytes (smoltcp still needs its closure run).
    buffer: RefCell<Vec<u8>>,
    /// Length of the reply waiting in `buffer`, if any.
    reply_len: Cell<Option<usize>>,
    stats: Rc<Cell<DeviceStats>>,
}

impl NicDevice {
    /// A device over `nic`. `max_burst` is smoltcp's
    /// [`max_burst_size`](DeviceCapabilities::max_burst_size): the frames the NIC can
    /// take in one burst, which caps the TCP window smoltcp advertises (`None`: no cap,
    /// right for netvsc whose receive buffer holds thousands of frames).
    pub fn new(nic: Rc<dyn Nic>, max_burst: Option<usize>) -> Self {
        NicDevice {
            nic,
            max_burst,
            rx_budget: DEFAULT_RX_BUDGET,
            rx_left: Cell::new(DEFAULT_RX_BUDGET),
            rx_exhausted: Cell::new(false),
            tx_blocked: Cell::new(false),
            buffer: RefCell::new(Vec::new()),
            reply_len: Cell::new(None),
            stats: Rc::new(Cell::new(DeviceStats::default())),
        }
    }

    /// Sets how many frames one poll may receive (at least 1).
    pub fn set_rx_budget(&mut self, budget: usize) {
        self.rx_budget = budget.max(1);
        self.rx_left.set(self.rx_budget);
    }

    /// The NIC.
    pub fn nic(&self) -> &Rc<dyn Nic> {
        &self.nic
    }

    /// Counters so far.
    pub fn stats(&self) -> DeviceStats {
        self.stats.get()
    }

    /// The counters' cell, for readers outside the interface's task (the status page).
    pub fn shared_stats(&self) -> Rc<Cell<DeviceStats>> {
        self.stats.clone()
    }

    /// Starts a poll: a fresh receive budget, forget that the NIC was empty or full, and
    /// open a NIC batch ([`Nic::begin_batch`]) so that the frames of this poll reach the
    /// host together. End it with [`end_poll`](Self::end_poll).
    pub fn begin_poll(&mut self) {
        self.rx_left.set(self.rx_budget);
        self.rx_exhausted.set(false);
        self.tx_blocked.set(false);
        self.nic.begin_batch();
    }

    /// Ends a poll: what the NIC held back during it reaches the host
    /// ([`Nic::end_batch`]). Call it before waiting.
    pub fn end_poll(&mut self) {
        self.nic.end_batch();
    }

    /// Whether the last poll stopped receiving because its budget ran out (not because
    /// the NIC was empty): the caller should poll again soon.
    pub fn rx_budget_spent(&self) -> bool {
        self.rx_left.get() == 0 && !self.rx_exhausted.get()
    }

    /// Whether the last poll wanted to send while the NIC had no room.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked.get()
    }

    fn update(&self, f: impl FnOnce(&mut DeviceStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }

    fn count_result(&self, len: usize, result: Result<(), NicError>) {
        self.update(|s| match result {
            Ok(()) => {
                s.tx_frames += 1;
                s.tx_bytes += len as u64;
            }
            Err(NicError::Busy) => s.tx_dropped_busy += 1,
            Err(NicError::LinkDown) => s.tx_dropped_link_down += 1,
            Err(NicError::TooLong) => s.tx_dropped_too_long += 1,
            Err(NicError::Removed) => s.tx_dropped_removed += 1,
        });
        if let Err(error) = result {
            log::trace!("frame of {len} bytes dropped: {error:?}");
        }
    }

    /// Sends the reply that was built while a frame was being received, if any.
    fn flush_reply(&self) {
        let Some(len) = self.reply_len.take() else {
            return;
        };
        let buffer = self.buffer.borrow();
        let Some(frame) = buffer.get(..len) else {
            return;
        };
        let result = self.nic.transmit(len, &mut |out| {
            let n = out.len().min(frame.len());
            out[..n].copy_from_slice(&frame[..n]);
        });
        self.count_result(len, result);
        self.update(|s| s.tx_replies += 1);
    }

    /// Runs `f` on the device's scratch buffer of `len` bytes (for frames that go nowhere).
    fn with_scratch<R>(&self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buffer = self.buffer.borrow_mut();
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        f(&mut buffer[..len])
    }
}

impl Device for NicDevice {
    type RxToken<'a>
        = NicRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = NicTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: NetInstant) -> Option<(NicRxToken<'_>, NicTxToken<'_>)> {
        if self.rx_exhausted.get() || self.rx_left.get() == 0 {
            return None;
        }
        self.rx_left.set(self.rx_left.get() - 1);
        let device = &*self;
        Some((
            NicRxToken { device },
            NicTxToken {
                device,
                reply: true,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: NetInstant) -> Option<NicTxToken<'_>> {
        if self.nic.link_up() && !self.nic.is_removed() && !self.nic.can_transmit() {
            self.tx_blocked.set(true);
            self.update(|s| s.tx_blocked += 1);
            return None;
        }
        Some(NicTxToken {
            device: &*self,
            reply: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp's MTU for Ethernet counts the Ethernet header; the NIC's is the IP MTU.
        // Clamped: smoltcp subtracts header lengths from it without checks.
        let mtu = self.nic.mtu().clamp(MIN_IP_MTU, MAX_IP_MTU);
        caps.max_transmission_unit = mtu + ETHERNET_HEADER_LEN;
        caps.max_burst_size = self.max_burst;
        caps
    }
}

/// Receives one frame from the NIC when consumed. See the [module docs](self).
pub struct NicRxToken<'a> {
    device: &'a NicDevice,
}

impl phy::RxToken for NicRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let device = self.device;
        let mut f = Some(f);
        let mut output = None;
        let mut extra = 0u64;
        device.nic.receive(1, &mut |frame| match f.take() {
            Some(f) => {
                device.update(|s| {
                    s.rx_frames += 1;
                    s.rx_bytes += frame.len() as u64;
                });
                output = Some(f(frame));
            }
            None => extra += 1,
        });
        if extra > 0 {
            device.update(|s| s.rx_over_budget += extra);
        }
        device.flush_reply();
        match (output, f) {
            (Some(output), _) => output,
            (None, Some(f)) => {
                // Nothing was waiting: smoltcp ignores an empty frame, and the next
                // `receive` of this poll says there is nothing more.
                device.rx_exhausted.set(true);
                f(&[])
            }
            // `f` is only taken where `output` is set.
            (None, None) => unreachable!("receive closure taken without an output"),
        }
    }
}

/// Sends one frame when consumed. A token handed out with a receive token builds its
/// frame in the device's reply buffer (sent after the receive); others go straight to
/// the NIC. See the [module docs](self).
pub struct NicTxToken<'a> {
    device: &'a NicDevice,
    reply: bool,
}

impl phy::TxToken for NicTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let device = self.device;
        if self.reply {
            // A paired token is consumed at most once, while its receive runs: the
            // buffer is free. Should a second reply appear anyway, the first is sent.
            device.flush_reply();
            let output = device.with_scratch(len, f);
            device.reply_len.set(Some(len));
            return output;
        }
        let mut f = Some(f);
        let mut output = None;
        let result = device.nic.transmit(len, &mut |buffer| {
            if let Some(f) = f.take() {
                output = Some(f(buffer));
            }
        });
        device.count_result(len, result);
        match (output, f) {
            (Some(output), _) => output,
            // The NIC refused before asking for the bytes: smoltcp still expects its
            // closure to run (it returns the emit result), so it writes into scratch.
            (None, Some(f)) => device.with_scratch(len, f),
            (None, None) => unreachable!("transmit closure taken without an output"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::collections::VecDeque;
    use alloc::string::String;
    use alloc::vec;
    use core::future::ready;
    use hvnet_netvsc::nic::{NicFuture, QueueStats};
    use smoltcp::phy::{RxToken as _, TxToken as _};

    /// A scripted NIC: frames to deliver, a verdict for sends, and a record of both.
    #[derive(Default)]
    struct Script {
        rx: RefCell<VecDeque<Vec<u8>>>,
        sent: RefCell<Vec<Vec<u8>>>,
        refuse: Cell<Option<NicError>>,
        full: Cell<bool>,
        link_down: Cell<bool>,
        delivering: Cell<bool>,
        reentered: Cell<u32>,
        /// Deliver this many frames per call whatever the budget (a buggy driver).
        greedy: Cell<usize>,
        /// Whether a batch is open, and batches ended so far.
        batch_open: Cell<bool>,
        batches: Cell<u32>,
        /// Frames sent inside a batch.
        sent_in_batch: Cell<u32>,
    }

    impl Nic for Script {
        fn id(&self) -> String {
            String::from("script")
        }
        fn mac(&self) -> [u8; 6] {
            [2, 0, 0, 0, 0, 1]
        }
        fn mtu(&self) -> usize {
            1500
        }
        fn link_up(&self) -> bool {
            !self.link_down.get()
        }
        fn is_removed(&self) -> bool {
            false
        }
        fn queue_count(&self) -> usize {
            1
        }
        fn receive(&self, budget: usize, deliver: &mut dyn FnMut(&[u8])) -> usize {
            let budget = budget.max(self.greedy.get());
            let mut n = 0;
            while n < budget {
                let Some(frame) = self.rx.borrow_mut().pop_front() else {
                    break;
                };
                self.delivering.set(true);
                deliver(&frame);
                self.delivering.set(false);
                n += 1;
            }
            n
        }
        fn transmit(&self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Result<(), NicError> {
            if self.delivering.get() {
                self.reentered.set(self.reentered.get() + 1);
            }
            if let Some(error) = self.refuse.get() {
                return Err(error);
            }
            let mut frame = vec![0; len];
            fill(&mut frame);
            self.sent.borrow_mut().push(frame);
            if self.batch_open.get() {
                self.sent_in_batch.set(self.sent_in_batch.get() + 1);
            }
            Ok(())
        }
        fn begin_batch(&self) {
            self.batch_open.set(true);
        }
        fn end_batch(&self) {
            if self.batch_open.replace(false) {
                self.batches.set(self.batches.get() + 1);
            }
        }
        fn can_transmit(&self) -> bool {
            !self.full.get()
        }
        fn changed(&self) -> NicFuture<'_> {
            Box::pin(ready(()))
        }
        fn queue_stats(&self, _queue: usize) -> QueueStats {
            QueueStats::default()
        }
    }

    fn device(frames: &[&[u8]]) -> (Rc<Script>, NicDevice) {
        let script = Rc::new(Script::default());
        script
            .rx
            .borrow_mut()
            .extend(frames.iter().map(|f| f.to_vec()));
        let nic: Rc<dyn Nic> = script.clone();
        (script, NicDevice::new(nic, None))
    }

    const T: NetInstant = NetInstant::ZERO;

    #[test]
    fn frames_are_handed_over_in_place_then_the_device_is_exhausted() {
        let (_, mut dev) = device(&[b"first", b"second"]);
        dev.begin_poll();
        let mut seen = Vec::new();
        while let Some((rx, _tx)) = dev.receive(T) {
            seen.push(rx.consume(|frame| frame.to_vec()));
        }
        assert_eq!(seen, [b"first".to_vec(), b"second".to_vec(), Vec::new()]);
        assert!(!dev.rx_budget_spent());
        assert_eq!(dev.stats().rx_frames, 2);
        assert_eq!(dev.stats().rx_bytes, 11);
        // A new poll asks the NIC again.
        dev.begin_poll();
        assert!(dev.receive(T).is_some());
    }

    #[test]
    fn a_poll_is_one_nic_batch() {
        let (script, mut dev) = device(&[b"request"]);
        dev.begin_poll();
        assert!(script.batch_open.get());
        let (rx, tx) = dev.receive(T).expect("token");
        rx.consume(|frame| tx.consume(frame.len(), |out| out.copy_from_slice(frame)));
        dev.transmit(T).expect("token").consume(60, |_| ());
        dev.end_poll();
        assert!(!script.batch_open.get());
        assert_eq!(script.batches.get(), 1);
        // The reply and the frame of its own both went out inside the batch.
        assert_eq!(script.sent_in_batch.get(), 2);
    }

    #[test]
    fn the_budget_bounds_a_poll() {
        let frames: Vec<&[u8]> = vec![b"x"; 5];
        let (_, mut dev) = device(&frames);
        dev.set_rx_budget(3);
        dev.begin_poll();
        let mut n = 0;
        while let Some((rx, _)) = dev.receive(T) {
            rx.consume(|_| ());
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(dev.rx_budget_spent());
    }

    #[test]
    fn a_reply_is_sent_after_the_receive_returns() {
        let (script, mut dev) = device(&[b"request"]);
        dev.begin_poll();
        let (rx, tx) = dev.receive(T).expect("token");
        let got = rx.consume(|frame| {
            tx.consume(frame.len(), |out| out.copy_from_slice(frame));
            frame.len()
        });
        assert_eq!(got, 7);
        assert_eq!(script.reentered.get(), 0);
        assert_eq!(*script.sent.borrow(), [b"request".to_vec()]);
        assert_eq!(dev.stats().tx_replies, 1);
        assert_eq!(dev.stats().tx_frames, 1);
    }

    #[test]
    fn a_full_nic_gives_no_token_but_a_link_down_one_drops() {
        let (script, mut dev) = device(&[]);
        dev.begin_poll();
        script.full.set(true);
        assert!(dev.transmit(T).is_none());
        assert!(dev.tx_blocked());
        assert_eq!(dev.stats().tx_blocked, 1);

        script.link_down.set(true);
        script.refuse.set(Some(NicError::LinkDown));
        let token = dev.transmit(T).expect("a token while the link is down");
        // The closure runs even though nothing is sent (smoltcp needs its result).
        assert_eq!(token.consume(60, |buf| buf.len()), 60);
        assert_eq!(dev.stats().tx_dropped_link_down, 1);
        assert!(script.sent.borrow().is_empty());
    }

    #[test]
    fn a_refused_send_is_counted_by_reason() {
        let (script, mut dev) = device(&[]);
        dev.begin_poll();
        for error in [NicError::Busy, NicError::TooLong, NicError::Removed] {
            script.refuse.set(Some(error));
            dev.transmit(T).expect("token").consume(64, |_| ());
        }
        let stats = dev.stats();
        assert_eq!(
            (
                stats.tx_dropped_busy,
                stats.tx_dropped_too_long,
                stats.tx_dropped_removed
            ),
            (1, 1, 1)
        );
        assert_eq!(stats.tx_dropped(), 3);
        assert_eq!(stats.tx_frames, 0);
    }

    #[test]
    fn frames_beyond_the_budget_are_counted_not_lost_silently() {
        let (script, mut dev) = device(&[b"a", b"b", b"c"]);
        script.greedy.set(3);
        dev.begin_poll();
        let (rx, _) = dev.receive(T).expect("token");
        assert_eq!(rx.consume(|f| f.to_vec()), b"a");
        assert_eq!(dev.stats().rx_over_budget, 2);
    }

    #[test]
    fn capabilities_count_the_ethernet_header() {
        let (_, dev) = device(&[]);
        let caps = dev.capabilities();
        assert_eq!(caps.medium, Medium::Ethernet);
        assert_eq!(caps.max_transmission_unit, 1514);
        assert_eq!(caps.max_burst_size, None);
    }
}
