//! Waiting for the first of several futures.

use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use hvnet_vmbus::channel::BoxFuture;

/// Resolves when any of its futures does (an empty set never resolves); the others are
/// dropped with it.
pub struct FirstOf<'a> {
    futures: Vec<BoxFuture<'a, ()>>,
}

impl<'a> FirstOf<'a> {
    /// Waits for the first of `futures`.
    pub fn new(futures: Vec<BoxFuture<'a, ()>>) -> Self {
        Self { futures }
    }
}

impl Future for FirstOf<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        for f in self.futures.iter_mut() {
            if f.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}
