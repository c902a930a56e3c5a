//! Relay: after the login, bytes both ways, unchanged, until the session ends.
//!
//! Each direction waits for its source's readiness, then borrows a buffer from a per-thread
//! pool, reads and writes until the source has nothing more, and gives the buffer back; so an
//! idle session (IDLE, or a client that just sits there) holds no buffer at all, and the busy
//! path takes no lock. Plain or TLS, the two ends are driven alike (`relay/end.rs`): a TLS end
//! is the connection's `TlsStream` (`stream/tls.rs`, rustls's unbuffered API), whose ciphertext
//! is read a pooled buffer at a time and decrypted record by record into the relay's buffer.
//! For a backend with `splice: true`, between two plain sockets the body of a literal of 64 KiB
//! or more (a FETCH'd message, an APPEND) does not pass through user space at all: it is
//! spliced socket → pipe → socket (`relay/splice.rs`). Every chunk passes through the relay's `Tap` (`tap.rs`) on its way,
//! which is where the command observer and the byte counters sit; it sees the relay's own
//! buffer, it never copies or delays. The state machine is `relay/pump.rs`.
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
use std::os::fd::BorrowedFd;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::stream::Stream;
use crate::tap::Tap;
use end::End;
pub use pump::Relay;

mod end;
mod pump;
mod splice;

/// What the relay reads at once: sized for bulk FETCH bodies; only busy directions hold a
/// buffer.
const BUFFER_SIZE: usize = 32 * 1024;
/// A pooled buffer's extra room beyond `BUFFER_SIZE`: a TLS end encrypts a whole read (two
/// full records) into one buffer, headers and tags included, and sends it with one write.
/// (Reading 256 octets less instead, to keep the buffer in jemalloc's 32 KiB size class, split
/// every second 16 KiB record a TLS end decrypts: 8-25% more CPU per GB on TLS FETCH.)
const TLS_SLACK: usize = 256;
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
    tuning: BackendTuning,
) -> Relay<O> {
    Relay::new(
        End::from(client),
        End::from(backend),
        half_close,
        tap,
        (client_first, backend_first),
        tuning,
    )
}

/// What the relay does with a backend's connection beyond moving octets: that backend's
/// `quickack` and `splice` settings.
#[derive(Clone, Copy, Debug)]
pub struct BackendTuning {
    /// TCP_QUICKACK on the backend socket when a read drained it while answers are owed.
    pub quickack: bool,
    /// Long literal bodies moved socket → pipe → socket with splice(2) between plain ends, both
    /// ways, instead of copied (`relay/splice.rs`).
    pub splice: bool,
}

impl BackendTuning {
    pub(crate) fn of(backend: &crate::config::Backend) -> Self {
        BackendTuning {
            quickack: backend.quickack,
            splice: backend.splice,
        }
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
pub(crate) struct PooledBuffer(pub(crate) Box<[u8]>);

impl PooledBuffer {
    pub(crate) fn take() -> Self {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE + TLS_SLACK].into_boxed_slice());
        PooledBuffer(buf)
    }

    /// Where the relay reads into.
    fn read_room(&mut self) -> &mut [u8] {
        &mut self.0[..BUFFER_SIZE]
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
    use crate::tap::Way;

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
        let (shown, unseen) = relay_long_literals(true).await;
        assert!(
            unseen[0] > 500_000,
            "the APPEND body was spliced: {shown:?} {unseen:?}"
        );
        assert!(
            unseen[1] > 500_000,
            "the FETCH body was spliced: {shown:?} {unseen:?}"
        );
    }

    /// Without `splice` (the default) the same literals are copied through the relay's buffer:
    /// all of them shown, none passed unseen, byte for byte the same.
    #[tokio::test]
    async fn long_literals_are_copied_without_splice() {
        let (_, unseen) = relay_long_literals(false).await;
        assert_eq!(unseen, [0, 0], "nothing spliced");
    }

    /// A 700,000-octet APPEND up and FETCH down through a relay with `splice` as given; checks
    /// the octets both ways, that each is counted once (shown or unseen) and the commands
    /// observed; returns the octets shown and passed unseen, up and down.
    async fn relay_long_literals(splice: bool) -> ([u64; 2], [u64; 2]) {
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
            BackendTuning {
                quickack: true,
                splice,
            },
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
        assert_eq!(
            *seen.commands.lock().unwrap(),
            [("APPEND", Completion::Ok), ("FETCH", Completion::Ok)]
        );
        (shown, unseen)
    }
}
