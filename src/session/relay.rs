//! Relay: after the login, bytes both ways, unchanged, until the session ends.
//!
//! Each direction waits for readiness, then borrows a buffer from a per-thread pool, reads and
//! writes until the socket has nothing more, and gives the buffer back. So an idle session
//! (IDLE, or a client that just sits there) holds no buffer at all, and the busy path allocates
//! nothing and takes no lock. Every chunk passes through `Tap::observe` on its way, which is
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// Sized for bulk FETCH bodies; only busy directions hold one.
const BUFFER_SIZE: usize = 32 * 1024;
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

/// Relays until the session ends.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    half_close: Duration,
    counts: &ByteCounts,
    upstream: Leg<'_>,
    downstream: Leg<'_>,
) -> RelayStats {
    // The counts outlive a direction's future when select! drops it mid-flight. Relaxed atomics
    // written by this task only: no contention, no lock.
    let up_bytes = &counts.client_to_backend;
    let down_bytes = &counts.backend_to_client;
    let upstream = copy(client, backend, upstream.first, upstream.tap, up_bytes);
    let downstream = copy(
        backend,
        client,
        downstream.first,
        downstream.tap,
        down_bytes,
    );
    tokio::pin!(upstream, downstream);
    let (ended_by, result) = tokio::select! {
        result = &mut downstream => {
            shut(client, Shutdown::Both);
            (EndedBy::Backend, result)
        }
        result = &mut upstream => match result {
            Err(e) => (EndedBy::Client, Err(e)),
            // The client half-closed; copy() passed that on to the backend. Finish the answer.
            Ok(()) => match tokio::time::timeout(half_close, &mut downstream).await {
                Ok(result) => {
                    shut(client, Shutdown::Both);
                    (EndedBy::Client, result)
                }
                Err(_) => (EndedBy::HalfCloseTimeout, Ok(())),
            },
        },
    };
    RelayStats {
        client_to_backend: up_bytes.load(Ordering::Relaxed),
        backend_to_client: down_bytes.load(Ordering::Relaxed),
        ended_by,
        error: result.err(),
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    first: Vec<u8>,
    tap: &mut dyn Tap,
    bytes: &AtomicU64,
) -> io::Result<()> {
    if !first.is_empty() {
        tap.observe(&first);
        write_all(to, &first).await?;
        bytes.fetch_add(first.len() as u64, Ordering::Relaxed);
    }
    drop(first);
    loop {
        from.readable().await?;
        let mut buf = PooledBuffer::take();
        loop {
            match from.try_read(&mut buf.0) {
                Ok(0) => {
                    // End of stream: pass the half-close on.
                    shut(to, Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    let chunk = &buf.0[..n];
                    tap.observe(chunk);
                    write_all(to, chunk).await?;
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
