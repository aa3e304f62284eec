//! A two-way select for futures: the first to finish wins, the other is dropped.
//! Every wait on a channel races against the channel's rescind, so a host that withdraws
//! a channel never leaves a task waiting for a reply that will not come.

use alloc::boxed::Box;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

/// Which future finished first.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls `a` then `b` until one completes. Both are boxed so the combinator needs no
/// pin projection (this is control-path code, not the packet path).
pub fn race<A: Future, B: Future>(a: A, b: B) -> Race<A, B> {
    Race {
        a: Box::pin(a),
        b: Box::pin(b),
    }
}

/// Future returned by [`race`].
pub struct Race<A, B> {
    a: Pin<Box<A>>,
    b: Pin<Box<B>>,
}

impl<A: Future, B: Future> Future for Race<A, B> {
    type Output = Either<A::Output, B::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(v) = self.a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = self.b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    }
}
