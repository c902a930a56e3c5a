//! One client connection: greet → pre-login → route → dial → relay → close.
//! Each phase is an `async fn` in its own module and owns its deadline and its error answers;
//! this file runs them in order and writes the session's start and end log lines.

pub mod dial;
pub mod prelogin;
pub mod relay;
pub mod table;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::Services;
use crate::imap::response;
use crate::imap::scan::{BackendScanner, ClientScanner, Shared};
use crate::metrics::Rejection;
use crate::shutdown::Shutdown;
use prelogin::Closed;
use relay::{Leg, Tap};
use table::LiveSession;

/// Everything a session knows about itself. The config snapshot is the one it started with.
pub struct Session {
    pub id: SessionId,
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    /// Config snapshot, metrics, session table.
    pub services: Arc<Services>,
    pub shutdown: Shutdown,
}

/// Unique within a process run: start time in seconds and a counter, printed as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

impl SessionId {
    pub fn next() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let epoch = *EPOCH.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        SessionId((epoch << 24) ^ COUNTER.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0)
    }
}

/// How long a last word (BYE) to a client that may not be reading may take.
const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(mut client: TcpStream, session: Session) {
    let started = Instant::now();
    info!(session = %session.id, client = %session.peer, listener = %session.listener, "session start");
    let _ = client.set_nodelay(true);
    let timeouts = &session.services.config.timeouts;

    let prelogin = tokio::select! {
        result = tokio::time::timeout(timeouts.prelogin, prelogin::run(&mut client, &session)) => result,
        _ = session.shutdown.drain.cancelled() => {
            session.services.metrics.rejected(Rejection::shutdown);
            last_word(&mut client, &response::bye("UNAVAILABLE", "Server shutting down.")).await;
            return end_before_login(&session, started, "shutdown");
        }
    };
    let authenticated = match prelogin {
        Err(_elapsed) => {
            session
                .services
                .metrics
                .rejected(Rejection::prelogin_timeout);
            last_word(
                &mut client,
                &response::bye("", "Autologout; idle for too long."),
            )
            .await;
            return end_before_login(&session, started, "prelogin_timeout");
        }
        Ok(Err(error)) => {
            debug!(session = %session.id, %error, "client connection error before login");
            return end_before_login(&session, started, "client_error");
        }
        Ok(Ok(Err(Closed::ByClient))) => return end_before_login(&session, started, "client"),
        Ok(Ok(Err(Closed::Bye(reason)))) => return end_before_login(&session, started, reason),
        Ok(Ok(Ok(authenticated))) => authenticated,
    };

    let backend_metrics = session
        .services
        .metrics
        .backend(authenticated.backend_index);
    let live = Arc::new(LiveSession {
        id: session.id,
        client: session.peer,
        user: authenticated.user,
        backend: authenticated.backend_name,
        started: std::time::SystemTime::now(),
        bytes: Default::default(),
    });
    let _registration = session.services.sessions.register(live.clone());
    backend_metrics.sessions_active.inc();
    let observed = Shared::new(backend_metrics);
    let mut up_tap = Metered {
        scanner: ClientScanner::new(&observed),
        bytes: &backend_metrics.bytes_to_backend,
    };
    let mut down_tap = Metered {
        scanner: BackendScanner::new(&observed),
        bytes: &backend_metrics.bytes_to_client,
    };
    let backend = authenticated.backend;
    let relay = relay::relay(
        &client,
        &backend.stream,
        timeouts.half_close,
        &live.bytes,
        Leg {
            first: authenticated.client_buffered,
            tap: &mut up_tap,
        },
        Leg {
            first: backend.buffered,
            tap: &mut down_tap,
        },
    );
    let ended_by = tokio::select! {
        stats = relay => {
            if let Some(error) = &stats.error {
                debug!(session = %session.id, %error, "relay ended on an error");
            }
            stats.ended_by.as_str()
        }
        _ = session.shutdown.cut.cancelled() => "shutdown",
    };
    observed.finish();
    backend_metrics.sessions_active.dec();
    info!(
        session = %session.id,
        backend = %live.backend,
        ended_by,
        client_to_backend = live.bytes.client_to_backend.load(std::sync::atomic::Ordering::Relaxed),
        backend_to_client = live.bytes.backend_to_client.load(std::sync::atomic::Ordering::Relaxed),
        duration_ms = started.elapsed().as_millis() as u64,
        "session end"
    );
}

/// A direction's observer plus its backend's byte counter.
struct Metered<'m, S> {
    scanner: S,
    bytes: &'m prometheus_client::metrics::counter::Counter,
}

impl<S: Tap> Tap for Metered<'_, S> {
    fn observe(&mut self, bytes: &[u8]) {
        self.bytes.inc_by(bytes.len() as u64);
        self.scanner.observe(bytes);
    }
}

fn end_before_login(session: &Session, started: Instant, reason: &str) {
    info!(
        session = %session.id,
        ended_by = reason,
        duration_ms = started.elapsed().as_millis() as u64,
        "session end before login"
    );
}

/// Best effort: a client that does not read gets no more than `LAST_WORD_TIMEOUT`.
async fn last_word(client: &mut TcpStream, bytes: &[u8]) {
    let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, client.write_all(bytes)).await;
}
