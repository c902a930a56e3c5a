//! Accept loop: accept, check the connection rate and caps, spawn. Nothing slow happens here;
//! the session task does the talking, even the refusal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::Services;
use crate::abuse::RateCheck;
use crate::config::{Limits, ProxyProtocol};
use crate::imap::response;
use crate::metrics::{AcceptError, Held, Rejection};
use crate::session::{self, Session, SessionId};
use crate::shutdown::Shutdown;

/// How long to pause accepting after an accept error (usually: out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on the listener called `name` until `stop` or the drain. Each connection works
/// from the snapshot current when it was accepted (a reload may change the listener's TLS or
/// PROXY settings between two connections).
pub async fn accept_loop(
    listener: TcpListener,
    name: String,
    services: Arc<Services>,
    shutdown: Shutdown,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let caps = &services.caps;
    let mut failing = false;
    let counters = services.metrics.listener(&name);
    // Accepted sockets inherit the listener's keepalive settings (Linux copies them with the
    // socket): set once here, and again when a reload changes them, instead of per accept.
    let mut keepalive = services.config().timeouts.keepalive;
    crate::stream::detect_dead_peer(&listener, keepalive);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.drain.cancelled() => break,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                if failing {
                    info!(listener = %name, "accepting again");
                    failing = false;
                }
                accepted
            }
            Err(e) => {
                // EMFILE/ENFILE: the sessions we have keep running; the connection waits in
                // the kernel's backlog and we retry after a pause. Logged once per episode,
                // counted every time.
                let reason = match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => AcceptError::FdLimit,
                    _ => AcceptError::Other,
                };
                counters.accept_failed(reason);
                if !failing {
                    error!(listener = %name, error = %e, reason = reason.as_str(), "accept failed; backing off");
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        counters.accepted.inc();
        let snapshot = services.snapshot();
        if snapshot.config.timeouts.keepalive != keepalive {
            keepalive = snapshot.config.timeouts.keepalive;
            crate::stream::detect_dead_peer(&listener, keepalive);
            crate::stream::detect_dead_peer(&stream, keepalive);
        }
        let Some(index) = snapshot
            .config
            .listeners
            .iter()
            .position(|l| l.name == name)
        else {
            // Removed by a reload an instant ago; the loop is being stopped.
            drop(stream);
            continue;
        };
        // Behind a PROXY balancer every connection comes from the balancer: the per-address
        // cap is applied in the session, to the address the header carries.
        let proxied = snapshot.config.listeners[index].proxy_protocol == ProxyProtocol::Required;
        if !proxied && over_connection_rate(&services, &snapshot.config.limits, peer, &name) {
            tracker.spawn(refuse(stream, rate_bye()));
            continue;
        }
        // Behind a balancer the client is named by the PROXY header: until then the
        // connection counts under max_connections only.
        let admitted = if proxied {
            caps.admit_unnamed()
        } else {
            caps.admit(peer.ip())
        };
        match admitted {
            Ok(permit) => {
                let session = Session {
                    id: SessionId::next(),
                    peer,
                    local: stream.local_addr().unwrap_or(peer),
                    client_unknown: false,
                    listener: index,
                    snapshot,
                    services: services.clone(),
                    shutdown: shutdown.clone(),
                    open: Held::new(&counters.open),
                    listener_sessions: counters.sessions.clone(),
                };
                // The session future itself, not wrapped: a wrapper would hold the arguments
                // next to it for the session's whole life.
                tracker.spawn(session::handle(stream, session, permit));
            }
            Err(limit) => {
                warn!(listener = %name, client = %peer, limit = limit.as_str(), "connection refused by limit");
                services.metrics.rejected(Rejection::ConnectionLimit);
                let bye = response::bye("LIMIT", "Too many connections, try again later.");
                tracker.spawn(refuse(stream, bye));
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, bye: Vec<u8>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&bye)).await;
}

/// Whether a new connection from `client` is over `limits.connection_rate`: counted, and
/// logged once per episode (a flood must not flood the log too).
pub(crate) fn over_connection_rate(
    services: &Services,
    limits: &Limits,
    client: SocketAddr,
    listener: &str,
) -> bool {
    match services.abuse.connection(client.ip(), limits) {
        RateCheck::Within => false,
        RateCheck::Over { first } => {
            services.metrics.rejected(Rejection::ConnectionRate);
            if first {
                warn!(listener, %client, "connection rate exceeded; refusing new connections from this address until it slows down");
            }
            true
        }
    }
}

/// What a client over `limits.connection_rate` is told before the close: UNAVAILABLE, a
/// temporary state, so that it tries again later.
pub(crate) fn rate_bye() -> Vec<u8> {
    response::bye(
        "UNAVAILABLE",
        "Too many connections from your address, try again later.",
    )
}
