//! A smoltcp `Device` over two in-memory frame queues.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// Largest Ethernet frame the simulated peers send or accept (1500-byte MTU, no FCS).
pub const MAX_FRAME: usize = 1514;

/// A smoltcp Ethernet device whose "wire" is two queues: frames pushed with
/// [`push_rx`](QueueDevice::push_rx) are what the interface receives, and what the
/// interface sends piles up until [`pop_tx`](QueueDevice::pop_tx) takes it.
#[derive(Debug, Default)]
pub struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

impl QueueDevice {
    /// An empty device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a received frame for the interface.
    pub fn push_rx(&mut self, frame: &[u8]) {
        self.rx.push_back(frame.to_vec());
    }

    /// Takes the oldest frame the interface sent.
    pub fn pop_tx(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Frames waiting for the interface.
    pub fn rx_pending(&self) -> usize {
        self.rx.len()
    }

    /// Frames the interface sent that nobody has taken yet.
    pub fn tx_pending(&self) -> usize {
        self.tx.len()
    }
}

/// One received frame, handed to smoltcp.
#[derive(Debug)]
pub struct QueueRxToken(Vec<u8>);

/// Room for one frame in the transmit queue.
#[derive(Debug)]
pub struct QueueTxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for QueueRxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl TxToken for QueueTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a>
        = QueueRxToken
    where
        Self: 'a;
    type TxToken<'a>
        = QueueTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((QueueRxToken(frame), QueueTxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(QueueTxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
