//! The relay between two plain TCP sockets, as one hand-written future.
//!
//! Async fns for the two copy loops plus a select would cost about 1.4 KB per session in
//! future state (each readiness wait and write is a future of its own); this state machine is a
//! few hundred bytes, which is most of the difference between an idle session at ~3 KiB and
//! under 2 KiB. Each direction is either waiting to read (no buffer), or holds the octets it
//! read until the other socket took them all (a pooled buffer, or the first bytes handed over
//! from the login). The readiness registrations are the sockets' own (tokio's `poll_*_ready`),
//! with this task's waker.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::{ByteCounts, EndedBy, Leg, PooledBuffer, Tap, shut};

/// Octets read and not yet all written.
enum Pending {
    None,
    Pooled {
        buf: PooledBuffer,
        at: usize,
        end: usize,
    },
    First {
        buf: Vec<u8>,
        at: usize,
    },
}

struct Direction<'a> {
    pending: Pending,
    tap: &'a mut dyn Tap,
    /// The source said end-of-stream and the half-close was passed on.
    done: bool,
}

impl<'a> Direction<'a> {
    fn new(leg: Leg<'a>) -> Self {
        let pending = if leg.first.is_empty() {
            Pending::None
        } else {
            leg.tap.observe(&leg.first);
            Pending::First {
                buf: leg.first,
                at: 0,
            }
        };
        Direction {
            pending,
            tap: leg.tap,
            done: false,
        }
    }

    /// Moves octets from `from` to `to` until one of them would block (Pending) or `from`
    /// ends (Ready(Ok)).
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Write out what is pending.
            let (data, at) = match &mut self.pending {
                Pending::None => (None, None),
                Pending::Pooled { buf, at, end } => (Some(&buf.0[*at..*end]), Some(at)),
                Pending::First { buf, at } => (Some(&buf[*at..]), Some(at)),
            };
            if let (Some(data), Some(at)) = (data, at) {
                ready!(to.poll_write_ready(cx))?;
                match to.try_write(data) {
                    Ok(n) => {
                        let all = n == data.len();
                        *at += n;
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if all {
                            // All out: give the buffer back.
                            self.pending = Pending::None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            // Nothing pending: read, borrowing a buffer only once there is something to read.
            ready!(from.poll_read_ready(cx))?;
            let mut buf = PooledBuffer::take();
            match from.try_read(&mut buf.0) {
                Ok(0) => {
                    shut(to, Shutdown::Write);
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.tap.observe(&buf.0[..n]);
                    self.pending = Pending::Pooled { buf, at: 0, end: n };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Both directions of one session; resolves when the session is over (see `super` for who
/// ends it).
pub struct TcpRelay<'c, 'u, 'd> {
    client: TcpStream,
    backend: TcpStream,
    counts: &'c ByteCounts,
    up: Direction<'u>,
    down: Direction<'d>,
    half_close: Duration,
    /// Set once the client half-closed: how long the backend still has.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<'c, 'u, 'd> TcpRelay<'c, 'u, 'd> {
    pub fn new(
        client: TcpStream,
        backend: TcpStream,
        half_close: Duration,
        counts: &'c ByteCounts,
        upstream: Leg<'u>,
        downstream: Leg<'d>,
    ) -> Self {
        TcpRelay {
            client,
            backend,
            counts,
            up: Direction::new(upstream),
            down: Direction::new(downstream),
            half_close,
            deadline: None,
        }
    }
}

impl Future for TcpRelay<'_, '_, '_> {
    type Output = (EndedBy, io::Result<()>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Backend → client first: the backend closing ends the session.
        if let Poll::Ready(result) = this.down.poll_copy(
            cx,
            &this.backend,
            &this.client,
            &this.counts.backend_to_client,
        ) {
            let by = if this.up.done {
                EndedBy::Client
            } else {
                EndedBy::Backend
            };
            return Poll::Ready((by, result));
        }
        if !this.up.done {
            match this.up.poll_copy(
                cx,
                &this.client,
                &this.backend,
                &this.counts.client_to_backend,
            ) {
                Poll::Ready(Err(e)) => return Poll::Ready((EndedBy::Client, Err(e))),
                Poll::Ready(Ok(())) => {
                    // Half-closed: the backend gets `half_close` to finish its answer.
                    this.deadline = Some(Box::pin(tokio::time::sleep(this.half_close)));
                    // The backend may already be done; poll it again with the new state.
                    if let Poll::Ready(result) = this.down.poll_copy(
                        cx,
                        &this.backend,
                        &this.client,
                        &this.counts.backend_to_client,
                    ) {
                        return Poll::Ready((EndedBy::Client, result));
                    }
                }
                Poll::Pending => {}
            }
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready((EndedBy::HalfCloseTimeout, Ok(())));
        }
        Poll::Pending
    }
}
