//! Relay: after the login, bytes both ways, unchanged, until the session ends.
//!
//! Plain TCP on both sides: each direction waits for readiness, then borrows a buffer from a
//! per-thread pool, reads and writes until the socket has nothing more, and gives the buffer
//! back. The body of a literal of 64 KiB or more (a FETCH'd message, an APPEND) does not pass
//! through user space at all: it is spliced socket → pipe → socket (`relay/splice.rs`). So an idle session (IDLE, or a client that just sits there) holds no buffer at all, and
//! the busy path allocates nothing and takes no lock. With TLS on either side each direction
//! keeps a 16 KiB buffer (rustls streams offer no readiness to wait on without one). Every chunk
//! passes through the relay's `Tap` (`tap.rs`) on its way, which is where the command observer and
//! the byte counters sit; it sees the relay's own buffer, it never copies or delays.
//!
//! Ends:
//! - backend closes (or fails): the client's side is shut and the session is over;
//! - client closes its sending side: that half-close goes on to the backend, and the relay keeps
//!   the backend → client direction open until the backend closes (at most `half_close`), so a
//!   client that sends LOGOUT and shuts down at once still gets the whole answer;
//! - an error on the client side ends both.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::stream::Stream;
use crate::tap::{Tap, Way};
use tcp::TcpRelay;

mod splice;
mod tcp;

/// Sized for bulk FETCH bodies; only busy directions hold one.
const BUFFER_SIZE: usize = 32 * 1024;
/// A TLS record's worth of plaintext.
const TLS_BUFFER_SIZE: usize = 16 * 1024;
/// Buffers a worker thread keeps for reuse; more than this are freed.
const POOL_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Backend,
    Client,
    /// The backend did not finish within `half_close` after the client's half-close.
    HalfCloseTimeout,
    /// imapgate closed it (`Relay::close_at_boundary`): kicked, or shutting down.
    Closed,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Backend => "backend",
            EndedBy::Client => "client",
            EndedBy::HalfCloseTimeout => "half_close_timeout",
            EndedBy::Closed => "closed",
        }
    }
}

/// How a relay ended: who ended it, and the socket error that did, if one did (a reset,
/// usually).
pub type Ended = (EndedBy, io::Result<()>);

/// Relays until the session ends. `client_first` and `backend_first` are octets that arrived
/// before the relay started (pipelined commands, responses read past the login); they are
/// observed and sent first.
pub fn relay<O: Tap>(
    client: Stream,
    backend: Stream,
    half_close: Duration,
    tap: O,
    client_first: Vec<u8>,
    backend_first: Vec<u8>,
    backend_quickack: bool,
) -> Relay<O> {
    match (client, backend) {
        (Stream::Plain(client), Stream::Plain(backend)) => Relay::Tcp(TcpRelay::new(
            client,
            backend,
            half_close,
            tap,
            (client_first, backend_first),
            backend_quickack,
        )),
        // Boxed so that plain sessions do not carry the TLS path's state.
        (client, backend) => {
            let (close, closing) = watch::channel(None);
            let relay = Box::pin(async move {
                // The two directions run in this one task; the lock is never contended.
                let shared = Mutex::new(tap);
                let tap = || shared.lock().unwrap_or_else(|p| p.into_inner());
                let backend_fd = backend.tcp().as_raw_fd();
                let (client_read, client_write) = tokio::io::split(client);
                let (backend_read, backend_write) = tokio::io::split(backend);
                let up = pin!(copy_io(
                    client_read,
                    backend_write,
                    client_first,
                    |b| tap().observe(Way::ClientToBackend, b),
                    closing.clone(),
                    || Stop::Now,
                ));
                let down = pin!(copy_io(
                    backend_read,
                    client_write,
                    backend_first,
                    |b| {
                        tap().observe(Way::BackendToClient, b);
                        if backend_quickack && tap().awaits_backend() {
                            // SAFETY: the descriptor belongs to `backend`, which `backend_read`
                            // and `backend_write` own and keep open for as long as this copy
                            // runs.
                            ack_now(unsafe { BorrowedFd::borrow_raw(backend_fd) });
                        }
                    },
                    closing,
                    || Stop::at(tap().at_boundary(Way::BackendToClient)),
                ));
                finish(up, down, half_close).await
            });
            Relay::Tls { relay, close }
        }
    }
}

/// The running relay. Plain TCP inline (the common case: an idle session is mostly this);
/// TLS boxed.
#[allow(clippy::large_enum_variant)]
pub enum Relay<O> {
    Tcp(TcpRelay<O>),
    Tls {
        relay: Pin<Box<dyn Future<Output = Ended> + Send>>,
        /// The last word, once the session is to be closed.
        close: watch::Sender<Option<&'static [u8]>>,
    },
}

impl<O: Tap> Relay<O> {
    /// Ends the session at the next response boundary: the client gets the response being
    /// sent (a large FETCH included) whole, then `last_word` (an untagged BYE), then the
    /// close. Nothing more goes to the backend. Poll the relay on to get there; it ends with
    /// `EndedBy::Closed`. On a compressed stream no boundary is known: it closes at once,
    /// without the last word.
    pub fn close_at_boundary(&mut self, last_word: &'static [u8]) {
        match self {
            Relay::Tcp(relay) => relay.close_at_boundary(last_word),
            Relay::Tls { close, .. } => {
                close.send_replace(Some(last_word));
            }
        }
    }
}

impl<O: Tap + Unpin> Future for Relay<O> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        match self.get_mut() {
            Relay::Tcp(relay) => Pin::new(relay).poll(cx),
            Relay::Tls { relay, .. } => relay.as_mut().poll(cx),
        }
    }
}

/// How a TLS copy direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyEnd {
    /// The source ended; the half-close was passed on.
    Eof,
    /// The session was closed (`Relay::close_at_boundary`).
    Closed,
}

/// What a direction does once the session is to be closed.
enum Stop {
    /// Stop reading at once (the client's side: nothing more goes to the backend).
    Now,
    /// Not at a boundary yet: go on.
    Wait,
    /// At a boundary: send the last word, close.
    LastWord,
}

impl Stop {
    /// From `Tap::at_boundary`.
    fn at(boundary: Option<bool>) -> Stop {
        match boundary {
            Some(true) => Stop::LastWord,
            Some(false) => Stop::Wait,
            None => Stop::Now,
        }
    }
}

/// Runs both directions until the session is over (see the module doc for who ends it).
async fn finish<U, D>(
    mut upstream: Pin<&mut U>,
    mut downstream: Pin<&mut D>,
    half_close: Duration,
) -> Ended
where
    U: Future<Output = io::Result<CopyEnd>>,
    D: Future<Output = io::Result<CopyEnd>>,
{
    let by = |end: &io::Result<CopyEnd>, otherwise| match end {
        Ok(CopyEnd::Closed) => EndedBy::Closed,
        _ => otherwise,
    };
    tokio::select! {
        result = &mut downstream => (by(&result, EndedBy::Backend), result.map(drop)),
        result = &mut upstream => match result {
            Err(e) => (EndedBy::Client, Err(e)),
            // Closing: the backend's side finishes its response first.
            Ok(CopyEnd::Closed) => (EndedBy::Closed, downstream.await.map(drop)),
            // The client half-closed and that was passed on; let the backend finish its answer.
            Ok(CopyEnd::Eof) => match tokio::time::timeout(half_close, &mut downstream).await {
                Ok(result) => (by(&result, EndedBy::Client), result.map(drop)),
                Err(_) => (EndedBy::HalfCloseTimeout, Ok(())),
            },
        },
    }
}

/// TLS on either side: rustls streams have no readiness API, so each direction keeps one
/// TLS-record-sized buffer for the life of the session. Once `closing` holds a last word,
/// `stop` says what this direction does (see `Stop`).
async fn copy_io<R, W>(
    mut from: R,
    mut to: W,
    first: Vec<u8>,
    mut observe: impl FnMut(&[u8]),
    mut closing: watch::Receiver<Option<&'static [u8]>>,
    stop: impl Fn() -> Stop,
) -> io::Result<CopyEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty() {
        observe(&first);
        to.write_all(&first).await?;
        to.flush().await?;
    }
    drop(first);
    let mut buf = vec![0u8; TLS_BUFFER_SIZE];
    let mut watching = true;
    loop {
        let last_word = *closing.borrow();
        if let Some(word) = last_word {
            match stop() {
                Stop::Wait => {}
                Stop::Now => return Ok(CopyEnd::Closed),
                Stop::LastWord => {
                    to.write_all(word).await?;
                    to.flush().await?;
                    let _ = to.shutdown().await;
                    return Ok(CopyEnd::Closed);
                }
            }
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            changed = closing.changed(), if watching && last_word.is_none() => {
                // A dropped sender means the relay itself is going away.
                watching = changed.is_ok();
                continue;
            }
        };
        if n == 0 {
            // Pass the half-close on (close_notify and FIN on a TLS side).
            let _ = to.shutdown().await;
            return Ok(CopyEnd::Eof);
        }
        observe(&buf[..n]);
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Acknowledges what was read from `socket` at once instead of up to 40 ms later (Linux's
/// delayed ACK). A backend with Nagle on (Courier) writes an answer in two pieces and holds the
/// second until the first is acknowledged; with delayed ACKs every such answer waited ~40 ms,
/// and a pipelining client through any TCP hop ran far slower than it could. Quick-ACK mode is
/// not sticky on Linux, hence once per read. Best effort: a failure changes only timing.
fn ack_now(socket: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&socket).set_tcp_quickack(true);
}

fn shut(stream: &TcpStream, how: Shutdown) {
    // Errors here mean the peer is already gone, which is what we wanted.
    let _ = socket2::SockRef::from(stream).shutdown(how);
}

/// A buffer from this thread's pool, returned on drop (to the pool of whichever thread drops it).
struct PooledBuffer(Box<[u8]>);

impl PooledBuffer {
    fn take() -> Self {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        PooledBuffer(buf)
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::imap::scan::{CommandId, CommandSink, Completion, Observer};

    #[derive(Default)]
    struct Seen {
        commands: Mutex<Vec<(&'static str, Completion)>>,
    }

    impl CommandSink for Seen {
        fn command(&self, command: CommandId, completion: Completion, _: Option<Duration>) {
            self.commands
                .lock()
                .unwrap()
                .push((command.name(), completion));
        }
    }

    /// The command observer plus counts of what it was shown and what passed unseen.
    struct Counting {
        observer: Observer<Arc<Seen>>,
        shown: Arc<Mutex<[u64; 2]>>,
        unseen: Arc<Mutex<[u64; 2]>>,
    }

    fn index(way: Way) -> usize {
        match way {
            Way::ClientToBackend => 0,
            Way::BackendToClient => 1,
        }
    }

    impl Tap for Counting {
        fn observe(&mut self, way: Way, bytes: &[u8]) {
            self.shown.lock().unwrap()[index(way)] += bytes.len() as u64;
            self.observer.observe(way, bytes);
        }
        fn unseen_ahead(&self, way: Way) -> u64 {
            self.observer.literal_left(way)
        }
        fn passed_unseen(&mut self, way: Way, n: usize) {
            self.unseen.lock().unwrap()[index(way)] += n as u64;
            self.observer.literal_passed(way, n as u64);
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// Large literals both ways go through the splice path: byte for byte, every octet counted
    /// once (shown or unseen), and the commands around them observed as usual.
    #[tokio::test]
    async fn long_literals_are_spliced_and_counted() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let body: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let mut upload = b"a1 APPEND INBOX {700000+}\r\n".to_vec();
        upload.extend_from_slice(&body);
        upload.extend_from_slice(b"\r\na2 FETCH 1 BODY[]\r\n");
        let mut answer = b"a1 OK appended\r\n* 1 FETCH (BODY[] {700000}\r\n".to_vec();
        answer.extend_from_slice(&body);
        answer.extend_from_slice(b")\r\na2 OK done\r\n");

        let seen = Arc::new(Seen::default());
        let shown = Arc::new(Mutex::new([0; 2]));
        let unseen = Arc::new(Mutex::new([0; 2]));
        let observer = Counting {
            observer: Observer::new(seen.clone()),
            shown: shown.clone(),
            unseen: unseen.clone(),
        };
        let relay = tokio::spawn(relay(
            Stream::Plain(proxy_client),
            Stream::Plain(proxy_backend),
            Duration::from_secs(5),
            observer,
            Vec::new(),
            Vec::new(),
            true,
        ));
        let (up_len, down_len) = (upload.len(), answer.len());
        let expected = answer.clone();
        let backend_side = tokio::spawn(async move {
            let mut got = vec![0u8; up_len];
            backend.read_exact(&mut got).await.unwrap();
            backend.write_all(&answer).await.unwrap();
            backend.shutdown().await.unwrap();
            got
        });
        client.write_all(&upload).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let (ended_by, result) = relay.await.unwrap();
        assert_eq!(ended_by, EndedBy::Backend);
        result.unwrap();
        assert_eq!(backend_side.await.unwrap(), upload, "client → backend");
        assert!(got == expected, "backend → client differs");

        let (shown, unseen) = (*shown.lock().unwrap(), *unseen.lock().unwrap());
        assert_eq!(shown[0] + unseen[0], up_len as u64);
        assert_eq!(shown[1] + unseen[1], down_len as u64);
        assert!(
            unseen[0] > 500_000,
            "the APPEND body was spliced: {unseen:?}"
        );
        assert!(
            unseen[1] > 500_000,
            "the FETCH body was spliced: {unseen:?}"
        );
        assert_eq!(
            *seen.commands.lock().unwrap(),
            [("APPEND", Completion::Ok), ("FETCH", Completion::Ok)]
        );
    }
}
