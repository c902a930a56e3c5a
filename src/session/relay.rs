//! Relay: after the login, bytes both ways, unchanged, until the session ends.
//!
//! Plain TCP on both sides: each direction waits for readiness, then borrows a buffer from a
//! per-thread pool, reads and writes until the socket has nothing more, and gives the buffer
//! back. So an idle session (IDLE, or a client that just sits there) holds no buffer at all, and
//! the busy path allocates nothing and takes no lock. With TLS on either side each direction
//! keeps a 16 KiB buffer (rustls streams offer no readiness to wait on without one). Every chunk passes through `Tap::observe` on its way, which is
//! where the command observer sits; it sees the relay's own buffer, it never copies or delays.
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
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use tcp::TcpRelay;

mod tcp;

/// Sized for bulk FETCH bodies; only busy directions hold one.
const BUFFER_SIZE: usize = 32 * 1024;
/// A TLS record's worth of plaintext.
const TLS_BUFFER_SIZE: usize = 16 * 1024;
/// Buffers a worker thread keeps for reuse; more than this are freed.
const POOL_MAX: usize = 256;

/// Sees every chunk of one direction, in order. The metrics observer implements it (one per
/// direction; what the two directions share they share through atomics, since the directions
/// run concurrently). It must be quick and cannot change the bytes.
pub trait Tap: Send {
    fn observe(&mut self, bytes: &[u8]);
}

/// No observation.
pub struct NoTap;

impl Tap for NoTap {
    fn observe(&mut self, _: &[u8]) {}
}

#[derive(Debug)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Who ended the session.
    pub ended_by: EndedBy,
    /// The socket error that ended it, if one did (a reset, usually).
    pub error: Option<io::Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Backend,
    Client,
    /// The backend did not finish within `half_close` after the client's half-close.
    HalfCloseTimeout,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Backend => "backend",
            EndedBy::Client => "client",
            EndedBy::HalfCloseTimeout => "half_close_timeout",
        }
    }
}

/// Octets relayed so far each way; readable while the relay runs (the admin `/sessions` view).
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
}

/// One direction of the relay: what goes first, and who watches.
pub struct Leg<'t> {
    /// Bytes that arrived before the relay started (pipelined commands, responses read past
    /// the login); they are sent first.
    pub first: Vec<u8>,
    pub tap: &'t mut dyn Tap,
}

/// Relays until the session ends. A plain function returning a plain future (not an async fn),
/// so a session's state holds the relay once, not once as arguments and again as the running
/// relay.
pub fn relay<'c, 'u, 'd>(
    client: Stream,
    backend: Stream,
    half_close: Duration,
    counts: &'c ByteCounts,
    upstream: Leg<'u>,
    downstream: Leg<'d>,
) -> Relay<'c, 'u, 'd>
where
    'u: 'c,
    'd: 'c,
{
    let inner = match (client, backend) {
        (Stream::Plain(client), Stream::Plain(backend)) => Inner::Tcp(TcpRelay::new(
            client, backend, half_close, counts, upstream, downstream,
        )),
        // Boxed so that plain sessions do not carry the TLS path's state.
        (client, backend) => {
            let (up_bytes, down_bytes) = (&counts.client_to_backend, &counts.backend_to_client);
            Inner::Tls(Box::pin(async move {
                let (client_read, client_write) = tokio::io::split(client);
                let (backend_read, backend_write) = tokio::io::split(backend);
                let up = pin!(copy_io(
                    client_read,
                    backend_write,
                    upstream.first,
                    upstream.tap,
                    up_bytes
                ));
                let down = pin!(copy_io(
                    backend_read,
                    client_write,
                    downstream.first,
                    downstream.tap,
                    down_bytes
                ));
                finish(up, down, half_close).await
            }))
        }
    };
    Relay { inner, counts }
}

/// The running relay; resolves to the session's byte counts and who ended it.
pub struct Relay<'c, 'u, 'd> {
    inner: Inner<'c, 'u, 'd>,
    counts: &'c ByteCounts,
}

type Ended = (EndedBy, io::Result<()>);

// The plain relay is the common case and lives inline; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Inner<'c, 'u, 'd> {
    Tcp(TcpRelay<'c, 'u, 'd>),
    Tls(Pin<Box<dyn Future<Output = Ended> + Send + 'c>>),
}

impl Future for Relay<'_, '_, '_> {
    type Output = RelayStats;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<RelayStats> {
        let this = self.get_mut();
        let (ended_by, result) = std::task::ready!(match &mut this.inner {
            Inner::Tcp(relay) => Pin::new(relay).poll(cx),
            Inner::Tls(relay) => relay.as_mut().poll(cx),
        });
        std::task::Poll::Ready(RelayStats {
            client_to_backend: this.counts.client_to_backend.load(Ordering::Relaxed),
            backend_to_client: this.counts.backend_to_client.load(Ordering::Relaxed),
            ended_by,
            error: result.err(),
        })
    }
}

/// Runs both directions until the session is over (see the module doc for who ends it).
async fn finish<U, D>(
    mut upstream: Pin<&mut U>,
    mut downstream: Pin<&mut D>,
    half_close: Duration,
) -> (EndedBy, io::Result<()>)
where
    U: Future<Output = io::Result<()>>,
    D: Future<Output = io::Result<()>>,
{
    tokio::select! {
        result = &mut downstream => (EndedBy::Backend, result),
        result = &mut upstream => match result {
            Err(e) => (EndedBy::Client, Err(e)),
            // The client half-closed and that was passed on; let the backend finish its answer.
            Ok(()) => match tokio::time::timeout(half_close, &mut downstream).await {
                Ok(result) => (EndedBy::Client, result),
                Err(_) => (EndedBy::HalfCloseTimeout, Ok(())),
            },
        },
    }
}

/// The counts outlive a direction's future when select! drops it mid-flight: they are relaxed
/// atomics written by this task only (no contention, no lock).
fn count(bytes: &AtomicU64, n: usize) {
    bytes.fetch_add(n as u64, Ordering::Relaxed);
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// TLS on either side: rustls streams have no readiness API, so each direction keeps one
/// TLS-record-sized buffer for the life of the session.
async fn copy_io<R, W>(
    mut from: R,
    mut to: W,
    first: Vec<u8>,
    tap: &mut dyn Tap,
    bytes: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty() {
        tap.observe(&first);
        to.write_all(&first).await?;
        to.flush().await?;
        count(bytes, first.len());
    }
    drop(first);
    let mut buf = vec![0u8; TLS_BUFFER_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on (close_notify and FIN on a TLS side).
            let _ = to.shutdown().await;
            return Ok(());
        }
        tap.observe(&buf[..n]);
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        count(bytes, n);
    }
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
