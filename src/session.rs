//! One client connection: [PROXY header] → [TLS] → pre-login (`prelogin`) ⇄ route and dial
//! (`login`, `dial`) → relay → close. Each phase lives in its own module and owns its error
//! answers; this file runs them in order under the pre-login deadline and writes the session's
//! start and end log lines.

pub mod dial;
pub mod login;
pub mod prelogin;
pub mod relay;
pub mod table;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::abuse::UserSession;
use crate::config::{ListenerConfig, ListenerTls, ProxyProtocol};
use crate::imap::response;
use crate::imap::scan::Observer;
use crate::limits::Permit;
use crate::metrics::{BackendMetrics, Held, OverTls, Rejection, TlsOutcome, TlsVersion};
use crate::proxy_header;
use crate::services::{Services, Snapshot};
use crate::shutdown::Shutdown;
use crate::stream::{Stream, TlsStream};
use crate::tap::{Tap, Way};
use crate::tls::ServerTls;
use login::{Authenticated, LoginAttempt};
use prelogin::{Closed, LoginRequest, Outcome, Prelogin};
use prometheus_client::metrics::gauge::Gauge;
use relay::Relay;
use table::{Kick, LiveSession, Registration};

/// Everything a session knows about itself. The config snapshot is the one it started with.
pub struct Session {
    pub id: SessionId,
    /// The client's address: the TCP peer's, or the one a trusted PROXY header carried.
    pub peer: SocketAddr,
    /// The address the client connected to (this side of the TCP connection).
    pub local: SocketAddr,
    /// A PROXY header said UNKNOWN or LOCAL: `peer` is the balancer's address, not a client's.
    pub client_unknown: bool,
    /// Index in `snapshot.config.listeners`.
    pub listener: usize,
    /// The configuration as it was when the connection was accepted (pre-login works from
    /// it; the login takes the current one).
    pub snapshot: Arc<Snapshot>,
    /// Metrics, session table, the current snapshot.
    pub services: Arc<Services>,
    pub shutdown: Shutdown,
    /// Counted as open until the session ends.
    pub open: Held,
    /// The listener's logged-in sessions gauges, by `OverTls::index` (one is held from the
    /// login on).
    pub listener_sessions: [Gauge; OverTls::ALL.len()],
}

impl Session {
    pub fn listener(&self) -> &ListenerConfig {
        &self.snapshot.config.listeners[self.listener]
    }
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
/// After a BYE, how long and how much of the client's further input is read and dropped
/// before the close (`linger`).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_MAX: usize = 1 << 20;
/// How long a logged-in session being closed (kicked, shutdown) may take to reach a response
/// boundary: a FETCH in flight gets this long to finish before the BYE.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Handles one accepted connection, from the PROXY header to the end of the relay. `permit` holds its place under the connection caps; when
/// the listener takes PROXY headers it is `None` and the place is taken here, for the address
/// the header carries.
///
/// A plain function returning the session's future, so that the future holds only what a
/// logged-in session needs (an async fn would keep its arguments in every state):
/// everything before the login (PROXY header, TLS handshake, pre-login, the dial) is large and
/// short-lived, and runs boxed; what stays for the session's life is `LoggedInSession`.
pub fn handle(
    tcp: TcpStream,
    session: Session,
    permit: Permit,
) -> impl Future<Output = ()> + Send + 'static {
    let started = Instant::now();
    let login = Box::pin(until_login(tcp, session, permit, started));
    // An async block, not an async fn: an async fn's arguments are moved into locals, so
    // they take their room twice.
    async move {
        let Some(handover) = login.await else {
            return;
        };
        // After the login: relay until the session ends, is kicked, or is cut at shutdown.
        let mut session = LoggedInSession::start(handover);
        let ended_by = tokio::select! {
            (ended_by, result) = &mut session.relay => {
                if let Err(error) = &result {
                    debug!(session = %session.id, %error, "relay ended on an error");
                }
                ended_by.as_str()
            }
            // Kicked, or cut at the end of the shutdown grace (the kick token is the cut's
            // child): one wait for both.
            _ = session.live.kicked() => {
                let kick = session.live.kick_reason().unwrap_or(Kick::Shutdown);
                session.close(kick).await
            }
        };
        session.end(ended_by);
    }
}

/// What the login phase hands to the relay phase.
struct Handover {
    session: Session,
    client: Stream,
    authenticated: Authenticated,
    permit: Permit,
    started: Instant,
}

/// Accept-side phases up to a successful login; `None` when the connection ended first (all
/// answers sent and logged).
async fn until_login(
    mut tcp: TcpStream,
    mut session: Session,
    mut permit: Permit,
    started: Instant,
) -> Option<Handover> {
    let services = session.services.clone();
    let accepted = tokio::time::Instant::now();
    let timeouts = session.snapshot.config.timeouts.clone();
    let deadline = accepted + timeouts.prelogin;
    // TCP_NODELAY comes from the listening socket (server.rs): accepted sockets inherit it.

    if session.listener().proxy_protocol == ProxyProtocol::Required {
        let header_deadline = deadline.min(accepted + timeouts.proxy_header);
        accept_proxy_header(&mut tcp, &mut session, header_deadline, &mut permit).await?;
    }
    let listener = session.listener();
    info!(session = %session.id, client = %session.peer, listener = %listener.name, "session start");

    let listener_tls = listener.tls.clone();
    let mut client = match &listener_tls {
        ListenerTls::Implicit(certificates) => {
            let handshake_deadline = deadline.min(accepted + timeouts.tls_handshake);
            match tls_handshake(tcp, certificates, &session, handshake_deadline).await {
                Some(tls) => tls,
                None => return end_before_login(&session, started, EndReason::TlsHandshake),
            }
        }
        ListenerTls::Plain | ListenerTls::Starttls(_) => Stream::Plain(tcp),
    };

    let mut greet = true;
    loop {
        let step = tokio::select! {
            result = tokio::time::timeout_at(deadline, authenticate(&mut client, &session, greet)) => result,
            _ = session.shutdown.drain.cancelled() => {
                services.metrics.rejected(Rejection::Shutdown);
                last_word(&mut client, &response::bye("UNAVAILABLE", "Server shutting down.")).await;
                return end_before_login(&session, started, EndReason::Shutdown);
            }
        };
        match step {
            Err(_elapsed) => {
                services.metrics.rejected(Rejection::PreloginTimeout);
                last_word(
                    &mut client,
                    &response::bye("", "Autologout; idle for too long."),
                )
                .await;
                return end_before_login(&session, started, EndReason::PreloginTimeout);
            }
            Ok(Err(error)) => {
                debug!(session = %session.id, %error, "client connection error before login");
                return end_before_login(&session, started, EndReason::ClientError);
            }
            Ok(Ok(Phase::StartTls)) => {
                // prelogin offers STARTTLS only on plain connections of STARTTLS listeners.
                let (Stream::Plain(tcp), ListenerTls::Starttls(certificates)) =
                    (client, &listener_tls)
                else {
                    return end_before_login(&session, started, EndReason::StartTlsTwice);
                };
                let handshake_deadline =
                    deadline.min(tokio::time::Instant::now() + timeouts.tls_handshake);
                client = match tls_handshake(tcp, certificates, &session, handshake_deadline).await
                {
                    Some(tls) => tls,
                    None => return end_before_login(&session, started, EndReason::TlsHandshake),
                };
                // No new greeting after STARTTLS; the client asks for capabilities again.
                greet = false;
            }
            Ok(Ok(Phase::Closed(Closed::ByClient))) => {
                return end_before_login(&session, started, EndReason::Client);
            }
            Ok(Ok(Phase::Closed(Closed::Bye(reason)))) => {
                linger(&mut client).await;
                return end_before_login(&session, started, reason);
            }
            Ok(Ok(Phase::LoggedIn(authenticated))) => {
                return Some(Handover {
                    session,
                    client,
                    authenticated: *authenticated,
                    permit,
                    started,
                });
            }
        }
    }
}

/// How the pre-login and login phases on one stream ended.
enum Phase {
    LoggedIn(Box<Authenticated>),
    /// STARTTLS was answered OK: the handshake comes next, then pre-login again.
    StartTls,
    Closed(Closed),
}

/// Pre-login on `client` and the logins it asks for, until one succeeds, STARTTLS begins or
/// the connection ends: pre-login speaks IMAP, `login` routes and dials, this loop joins them.
async fn authenticate(client: &mut Stream, session: &Session, greet: bool) -> io::Result<Phase> {
    let mut prelogin = Prelogin::start(client, session, greet).await?;
    loop {
        let LoginRequest { tag, credentials } = match prelogin.next(client, session).await? {
            Outcome::Login(request) => request,
            Outcome::StartTls => return Ok(Phase::StartTls),
            Outcome::Closed(closed) => return Ok(Phase::Closed(closed)),
        };
        let client_id = prelogin.client_id().to_vec();
        let attempt = prelogin.attempt();
        let attempted = login::route_and_dial(
            client,
            prelogin.reader(),
            session,
            &tag,
            &credentials,
            &client_id,
            attempt,
        )
        .await?;
        if !matches!(attempted, LoginAttempt::LoggedIn(_)) {
            let user = credentials.routing_user();
            if let Some(trace) = session.services.traces.of_user(user) {
                let login = login::login_line(&tag, credentials.mechanism, user);
                let why = match attempted {
                    LoginAttempt::Rejected => "rejected",
                    LoginAttempt::OverLimit => "refused by limits.per_user",
                    _ => "unavailable",
                };
                trace.note(
                    session.id,
                    &format!("login from {} failed ({why}): {login}", session.peer),
                );
            }
        }
        match attempted {
            LoginAttempt::LoggedIn(mut authenticated) => {
                client.flush().await?;
                authenticated.client_buffered = prelogin.take_buffered();
                return Ok(Phase::LoggedIn(authenticated));
            }
            LoginAttempt::Rejected => {
                if let Some(closed) = prelogin.login_failed(client, session).await? {
                    return Ok(Phase::Closed(closed));
                }
            }
            LoginAttempt::Unavailable | LoginAttempt::OverLimit => {}
        }
    }
}

/// A logged-in session: the relay (which owns both sockets and the tap) and what the
/// session's end needs. This is what an idle session costs, so it holds nothing else.
struct LoggedInSession {
    relay: Relay<SessionTap>,
    id: SessionId,
    started: Instant,
    live: Arc<LiveSession>,
    metrics: Arc<BackendMetrics>,
    services: Arc<Services>,
    _registration: Registration,
    _permit: Permit,
    _user_session: Option<UserSession>,
    _open: Held,
    _listener_session: Held,
}

impl LoggedInSession {
    fn start(handover: Handover) -> Self {
        let Handover {
            session,
            client,
            authenticated,
            permit,
            started,
        } = handover;
        let services = &session.services;
        let snapshot = &authenticated.snapshot;
        let metrics = authenticated.state.metrics.clone();
        let live = Arc::new(LiveSession::new(
            session.id,
            session.peer,
            authenticated.user,
            authenticated.state.name.clone(),
            session.shutdown.cut.child_token(),
        ));
        let registration = services.sessions.register(live.clone());
        if let Some(trace) = services.traces.of_user(&live.user) {
            let login = login::login_line(&authenticated.tag, authenticated.mechanism, &live.user);
            live.trace.attach(
                trace,
                session.id,
                &format!(
                    "logged in from {} on backend {}: {login}",
                    session.peer, live.backend
                ),
            );
        }
        metrics.sessions_active.inc();
        let tls = if client.is_tls() {
            OverTls::Yes
        } else {
            OverTls::No
        };
        let listener_session = Held::new(&session.listener_sessions[tls.index()]);
        let tap = SessionTap {
            commands: Observer::with_compress(metrics.clone(), snapshot.config.metrics.compress),
            live: live.clone(),
        };
        let backend = authenticated.backend;
        let relay = relay::relay(
            client,
            backend.stream,
            snapshot.config.timeouts.half_close,
            tap,
            authenticated.client_buffered,
            backend.buffered,
            authenticated.tuning,
        );
        LoggedInSession {
            relay,
            id: session.id,
            started,
            live,
            metrics,
            services: session.services.clone(),
            _registration: registration,
            _permit: permit,
            _user_session: authenticated.user_session,
            _open: session.open,
            _listener_session: listener_session,
        }
    }

    /// Ends the session at the next response boundary with an untagged BYE (see
    /// `Relay::close_at_boundary`); a response still in flight gets `CLOSE_WAIT` to finish.
    async fn close(&mut self, kick: Kick) -> &'static str {
        self.services.metrics.session_closed(kick);
        self.relay.close_at_boundary(kick.last_word());
        // Boxed: only a closing session pays for the timer.
        let wait = Box::pin(tokio::time::sleep(CLOSE_WAIT));
        tokio::select! {
            _ = &mut self.relay => {}
            _ = wait => debug!(session = %self.id, "no response boundary in time; closing anyway"),
        }
        kick.ended_by()
    }

    /// Closes both sockets, reports the commands still in flight, logs the end.
    fn end(self, ended_by: &str) {
        drop(self.relay);
        if self.live.trace.armed() {
            self.live.trace.end(ended_by);
        }
        self.metrics.sessions_active.dec();
        let bytes = &self.live.bytes;
        info!(
            session = %self.id,
            backend = %self.live.backend,
            ended_by,
            client_to_backend = bytes.client_to_backend.load(Ordering::Relaxed),
            backend_to_client = bytes.backend_to_client.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "session end"
        );
    }
}

/// The relay's tap for one session: the command observer, the backend's byte counters
/// and the session's own (for `/sessions`).
struct SessionTap {
    commands: Observer<Arc<BackendMetrics>>,
    live: Arc<LiveSession>,
}

impl SessionTap {
    /// `n` octets relayed `way`: the backend's counter and the session's own.
    fn count(&self, way: Way, n: usize) {
        let (metric, session) = match way {
            Way::ClientToBackend => (
                &self.commands.sink().bytes_to_backend,
                &self.live.bytes.client_to_backend,
            ),
            Way::BackendToClient => (
                &self.commands.sink().bytes_to_client,
                &self.live.bytes.backend_to_client,
            ),
        };
        metric.inc_by(n as u64);
        session.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Tap for SessionTap {
    fn observe(&mut self, way: Way, bytes: &[u8]) {
        self.count(way, bytes.len());
        self.commands.observe(way, bytes);
        if self.live.trace.armed() {
            self.live.trace.observe(way, bytes);
        }
        self.live.touch(
            std::time::SystemTime::now(),
            self.commands.oldest_in_flight(),
        );
    }

    fn awaits_backend(&self) -> bool {
        self.commands.awaits_backend()
    }

    fn unseen_ahead(&self, way: Way) -> u64 {
        self.commands.unseen_ahead(way)
    }

    fn passed_unseen(&mut self, way: Way, n: usize) {
        self.count(way, n);
        self.commands.passed_unseen(way, n);
        if self.live.trace.armed() {
            self.live.trace.passed_unseen(way, n);
        }
        self.live.touch(
            std::time::SystemTime::now(),
            self.commands.oldest_in_flight(),
        );
    }

    fn at_boundary(&self, way: Way) -> Option<bool> {
        self.commands.at_boundary(way)
    }
}

/// Why a session ended before a login: a closed set, logged as `ended_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed or said LOGOUT.
    Client,
    /// A socket error on the client's side.
    ClientError,
    TlsHandshake,
    /// STARTTLS where it cannot be (already TLS, or not a STARTTLS listener).
    StartTlsTwice,
    Shutdown,
    PreloginTimeout,
    LineTooLong,
    LiteralTooLarge,
    LoginAttempts,
    BadCommands,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Client => "client",
            EndReason::ClientError => "client_error",
            EndReason::TlsHandshake => "tls_handshake",
            EndReason::StartTlsTwice => "starttls_twice",
            EndReason::Shutdown => "shutdown",
            EndReason::PreloginTimeout => "prelogin_timeout",
            EndReason::LineTooLong => "line_too_long",
            EndReason::LiteralTooLarge => "literal_too_large",
            EndReason::LoginAttempts => "login_attempts",
            EndReason::BadCommands => "bad_commands",
        }
    }
}

fn end_before_login<T>(session: &Session, started: Instant, reason: EndReason) -> Option<T> {
    info!(
        session = %session.id,
        ended_by = reason.as_str(),
        duration_ms = started.elapsed().as_millis() as u64,
        "session end before login"
    );
    None
}

/// Best effort: a client that does not read gets no more than `LAST_WORD_TIMEOUT`.
async fn last_word<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, bytes: &[u8]) {
    let sent = tokio::time::timeout(LAST_WORD_TIMEOUT, async {
        client.write_all(bytes).await?;
        client.flush().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        linger(client).await;
    }
}

/// After a BYE: half-close, and read and drop what the client still sends (up to
/// `LINGER_MAX` octets, for `LINGER_TIME`) before the socket is closed. Closing with unread
/// input makes the kernel send a reset, and a client that is still sending (a line over the
/// limit, a literal it announced) then loses the BYE before it reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        client.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_MAX {
            match client.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

/// On a PROXY listener: only trusted peers, and the header must come before the deadline
/// (`timeouts.proxy_header`). Then the connection's place under `per_ip` is taken for the
/// client the header names.
async fn accept_proxy_header(
    tcp: &mut TcpStream,
    session: &mut Session,
    deadline: tokio::time::Instant,
    permit: &mut Permit,
) -> Option<()> {
    let services = session.services.clone();
    let snapshot = session.snapshot.clone();
    let listener = &snapshot.config.listeners[session.listener];
    if !listener
        .trusted_proxies
        .iter()
        .any(|c| c.contains(session.peer.ip()))
    {
        warn!(session = %session.id, peer = %session.peer, listener = %listener.name, "connection from a peer not in trusted_proxies refused");
        services.metrics.rejected(Rejection::ProxyHeader);
        return None;
    }
    match tokio::time::timeout_at(deadline, proxy_header::read(tcp)).await {
        Ok(Ok(Some(client))) => session.peer = client,
        // UNKNOWN / LOCAL: the balancer's own connection (its health check); the peer is the
        // balancer, not a client, and must not pass for a local one (plaintext policy).
        Ok(Ok(None)) => session.client_unknown = true,
        Ok(Err(error)) => {
            warn!(session = %session.id, peer = %session.peer, %error, "bad or missing PROXY header");
            services.metrics.rejected(Rejection::ProxyHeader);
            return None;
        }
        Err(_) => {
            warn!(session = %session.id, peer = %session.peer, "no PROXY header in time");
            services.metrics.rejected(Rejection::ProxyHeader);
            return None;
        }
    }
    if crate::listener::over_connection_rate(
        &services,
        &snapshot.config.limits,
        session.peer,
        &listener.name,
    ) {
        last_word(tcp, &crate::listener::rate_bye()).await;
        return None;
    }
    match permit.name_client(session.peer.ip()) {
        Ok(()) => Some(()),
        Err(limit) => {
            warn!(session = %session.id, client = %session.peer, limit = limit.as_str(), "connection refused by limit");
            services.metrics.rejected(Rejection::ConnectionLimit);
            last_word(
                tcp,
                &response::bye("LIMIT", "Too many connections, try again later."),
            )
            .await;
            None
        }
    }
}

/// The server side of a TLS handshake, under the pre-login deadline.
async fn tls_handshake(
    tcp: TcpStream,
    tls: &ServerTls,
    session: &Session,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    // Boxed, like the backend side's: plain sessions do not carry the handshake's state.
    let handshake = Box::pin(TlsStream::accept(tcp, tls.config.clone()));
    let metrics = &session.services.metrics;
    let listener = &session.listener().name;
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => {
            let connection = stream.common();
            let version = match connection.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
                Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
                _ => TlsVersion::None,
            };
            let resumed = connection.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            metrics.tls_handshake(listener, TlsOutcome::Ok { version, resumed });
            Some(Stream::Tls(Box::new(stream)))
        }
        Ok(Err(error)) => {
            debug!(session = %session.id, %error, "TLS handshake failed");
            metrics.tls_handshake(listener, TlsOutcome::Error);
            metrics.rejected(Rejection::TlsHandshake);
            None
        }
        Err(_) => {
            debug!(session = %session.id, "TLS handshake timed out");
            metrics.tls_handshake(listener, TlsOutcome::Timeout);
            metrics.rejected(Rejection::TlsHandshake);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of one session's task, reported for the memory budget (an idle session is this
    /// plus two sockets' registrations and the observer's small state).
    #[tokio::test]
    async fn session_future_size() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let config = Arc::new(crate::config::embedded_default().unwrap());
        let services = Services::new(config);
        let permit = services.caps.admit(addr.ip()).unwrap();
        let session = Session {
            id: SessionId::next(),
            peer: addr,
            local: addr,
            client_unknown: false,
            listener: 0,
            snapshot: services.snapshot(),
            services,
            shutdown: Shutdown::new(),
            open: Held::new(&Default::default()),
            listener_sessions: Default::default(),
        };
        let future = handle(tcp, session, permit);
        let size = std::mem::size_of_val(&future);
        eprintln!("session future: {size} bytes");
        assert!(size < 1024, "the session future grew to {size} bytes");
    }
}
