//! The relay between two ends (plain or TLS, `end.rs`), as one hand-written future.
//!
//! Async fns for the two copy loops plus a select would cost several times more future state
//! per session (each readiness wait and write is a future of its own) than this state machine,
//! and an idle session is mostly its future (figures in BENCHMARKS.md). Each direction is
//! either waiting to read (no buffer), or holds the octets it read until the other end took
//! them all (a pooled buffer, or the first bytes handed over from the login; a TLS source may
//! also hold ciphertext not yet decrypted, see `end.rs`), or is splicing a
//! long literal's body between two plain sockets where the backend says `splice: true` (a
//! pooled pipe, see `splice`). The readiness
//! registrations are the sockets' own (tokio's `poll_*_ready`), with this task's waker.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::time::Sleep;

use super::end::End;
use super::splice::{PIPE_CHUNK, Pipe, SPLICE_MIN};
use super::{BUFFER_SIZE, Ended, EndedBy, PooledBuffer, ack_now};
use crate::tap::{Tap, Way};

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
    /// A literal's body, moved with splice(2): `left` octets still to take from the source,
    /// `in_pipe` taken and not yet given to the destination.
    Splice {
        pipe: Pipe,
        in_pipe: usize,
        left: u64,
    },
}

struct Direction {
    pending: Pending,
    /// The source said end-of-stream and the half-close was passed on.
    done: bool,
    /// Long literal bodies are spliced (`backends[].splice`); cleared when splice(2) fails as
    /// unsupported on these sockets, which are copied from then on.
    splice: bool,
    /// Acknowledge the source's data at once whenever it is drained (`ack_now`).
    quickack: bool,
}

impl Direction {
    /// `first` has been observed already.
    fn new(first: Vec<u8>, quickack: bool, splice: bool) -> Self {
        let pending = if first.is_empty() {
            Pending::None
        } else {
            Pending::First { buf: first, at: 0 }
        };
        Direction {
            pending,
            done: false,
            splice,
            quickack,
        }
    }

    /// Moves octets from `from` to `to` until one of them would block (Pending) or `from`
    /// ends (Ready(Ok)). The tap sees each chunk as it is read, except literal bodies it
    /// said it does not need to see, which are spliced (plain ends only).
    fn poll_copy<O: Tap>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut End,
        to: &mut End,
        tap: &mut O,
        way: Way,
        last_word: &mut LastWord,
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
                Pending::Splice {
                    pipe,
                    in_pipe,
                    left,
                } => {
                    // Only ever set up between two plain sockets.
                    let (End::Plain(from), End::Plain(to)) = (&*from, &*to) else {
                        unreachable!("splicing needs two plain sockets");
                    };
                    if *in_pipe > 0 {
                        ready!(to.poll_write_ready(cx))?;
                        match to.try_io(Interest::WRITABLE, || pipe.drain_to(to, *in_pipe)) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => *in_pipe -= n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    } else if *left == 0 {
                        // The literal is through: back to reading and showing.
                        if let Pending::Splice { pipe, .. } =
                            std::mem::replace(&mut self.pending, Pending::None)
                        {
                            pipe.give_back();
                        }
                    } else {
                        ready!(from.poll_read_ready(cx))?;
                        let want = (*left).min(PIPE_CHUNK as u64) as usize;
                        match from.try_io(Interest::READABLE, || pipe.fill_from(from, want)) {
                            Ok(0) => {
                                // The source ended inside the literal.
                                super::shut(to, std::net::Shutdown::Write);
                                self.done = true;
                                return Poll::Ready(Ok(()));
                            }
                            Ok(n) => {
                                *in_pipe = n;
                                *left -= n as u64;
                                tap.passed_unseen(way, n);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) if splice_unsupported(&e) => {
                                // Nothing moved yet in this chunk: copy from here on.
                                self.splice = false;
                                self.pending = Pending::None;
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    continue;
                }
            };
            if let (Some(data), Some(at)) = (data, at) {
                let n = ready!(to.poll_write(cx, data))?;
                *at += n;
                if n == data.len() {
                    // All out: give the buffer back.
                    self.pending = Pending::None;
                }
                continue;
            }
            // A TLS end may still hold records of what was written: out first.
            ready!(to.poll_flush(cx))?;
            // Everything read is written: if the session is closing, is this the place?
            match *last_word {
                LastWord::Open => {}
                LastWord::Due(word) => match tap.at_boundary(way) {
                    Some(false) => {}
                    Some(true) => {
                        self.pending = Pending::First {
                            buf: word.to_vec(),
                            at: 0,
                        };
                        *last_word = LastWord::Sent;
                        continue;
                    }
                    // No boundary can be known (a compressed stream): close now.
                    None => {
                        *last_word = LastWord::Sent;
                        continue;
                    }
                },
                LastWord::Sent => {
                    ready!(to.poll_shutdown(cx))?;
                    return Poll::Ready(Ok(()));
                }
            }
            // A long literal body coming, which the tap need not see: splice it.
            let unseen = if !self.splice || !from.is_plain() || !to.is_plain() {
                0
            } else {
                tap.unseen_ahead(way)
            };
            if unseen >= SPLICE_MIN
                && let Some(pipe) = Pipe::take()
            {
                self.pending = Pending::Splice {
                    pipe,
                    in_pipe: 0,
                    left: unseen,
                };
                continue;
            }
            // Nothing pending: read, borrowing a buffer only once there is something to read.
            ready!(from.poll_read_ready(cx))?;
            let mut buf = PooledBuffer::take();
            match from.try_read(buf.read_room()) {
                Ok(0) => {
                    drop(buf);
                    ready!(to.poll_shutdown(cx))?;
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    if let End::Plain(from) = from
                        && n < BUFFER_SIZE
                    {
                        // A short read drained the socket: forget its readiness now rather
                        // than learn it from one more read that fails with EAGAIN (a syscall
                        // per message saved). Safe with edge-triggered epoll: octets arriving
                        // after this read raise a new event, and a FIN already seen stays
                        // (tokio never clears the closed bits).
                        let _ = from.try_io(Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    tap.observe(way, &buf.0[..n]);
                    // Drained while the backend still owes answers: ACK now (see ack_now).
                    if n < BUFFER_SIZE && from.drained() && self.quickack && tap.awaits_backend() {
                        ack_now(from.tcp().as_fd());
                    }
                    self.pending = Pending::Pooled { buf, at: 0, end: n };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Closing a session at a response boundary (`Relay::close_at_boundary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LastWord {
    /// Not closing.
    Open,
    /// Closing: to be sent to the client at the next boundary.
    Due(&'static [u8]),
    /// Sent (or none can be: a compressed stream); the client's side is shut once it is out.
    Sent,
}

/// Both directions of one session; resolves when the session is over (see `super` for who
/// ends it).
pub struct Relay<O> {
    client: End,
    backend: End,
    tap: O,
    last_word: LastWord,
    up: Direction,
    down: Direction,
    half_close: Duration,
    /// Set once the client half-closed: how long the backend still has.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<O: Tap> Relay<O> {
    pub(super) fn new(
        client: End,
        backend: End,
        half_close: Duration,
        mut tap: O,
        (client_first, backend_first): (Vec<u8>, Vec<u8>),
        tuning: super::BackendTuning,
    ) -> Self {
        if !client_first.is_empty() {
            tap.observe(Way::ClientToBackend, &client_first);
        }
        if !backend_first.is_empty() {
            tap.observe(Way::BackendToClient, &backend_first);
        }
        Relay {
            client,
            backend,
            tap,
            last_word: LastWord::Open,
            up: Direction::new(client_first, false, tuning.splice),
            down: Direction::new(backend_first, tuning.quickack, tuning.splice),
            half_close,
            deadline: None,
        }
    }

    /// Ends the session at the next response boundary: the client gets the response being
    /// sent (a large FETCH included) whole, then `last_word` (an untagged BYE), then the
    /// close. Nothing more goes to the backend. Poll the relay on to get there; it ends with
    /// `EndedBy::Closed`. On a compressed stream no boundary is known: it closes at once,
    /// without the last word.
    pub fn close_at_boundary(&mut self, last_word: &'static [u8]) {
        if self.last_word == LastWord::Open {
            self.last_word = LastWord::Due(last_word);
        }
    }

    /// Backend → client.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let way = Way::BackendToClient;
        self.down.poll_copy(
            cx,
            &mut self.backend,
            &mut self.client,
            &mut self.tap,
            way,
            &mut self.last_word,
        )
    }

    /// Client → backend.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let way = Way::ClientToBackend;
        self.up.poll_copy(
            cx,
            &mut self.client,
            &mut self.backend,
            &mut self.tap,
            way,
            &mut LastWord::Open,
        )
    }
}

impl<O: Tap + Unpin> Future for Relay<O> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        // Backend → client first: the backend closing ends the session.
        if let Poll::Ready(result) = this.poll_down(cx) {
            let by = if this.last_word != LastWord::Open {
                EndedBy::Closed
            } else if this.up.done {
                EndedBy::Client
            } else {
                EndedBy::Backend
            };
            return Poll::Ready((by, result));
        }
        // Closing: nothing more from the client goes to the backend.
        if !this.up.done && this.last_word == LastWord::Open {
            match this.poll_up(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready((EndedBy::Client, Err(e))),
                Poll::Ready(Ok(())) => {
                    // Half-closed: the backend gets `half_close` to finish its answer.
                    this.deadline = Some(Box::pin(tokio::time::sleep(this.half_close)));
                    // The backend may already be done; poll it again with the new state.
                    if let Poll::Ready(result) = this.poll_down(cx) {
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

/// splice(2) refusing these descriptors (not the connection failing).
fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}
