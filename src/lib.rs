//! imapgate: a transparent IMAP proxy and load balancer.
//!
//! A `Server` takes bound sockets, the shared services (config snapshot, metrics, ...) and a
//! shutdown handle, so that the binary and the tests (which bind port 0) start it the same way.

pub(crate) mod admin;
pub(crate) mod backend;
pub mod config;
pub(crate) mod health;
pub(crate) mod imap;
pub(crate) mod limits;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod proxy_header;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod services;
pub(crate) mod session;
pub mod shutdown;
pub(crate) mod stream;
pub(crate) mod tls;

// The public façade, for the binaries, the integration tests and the benches; everything else
// is the crate's own (so the compiler reports what nothing uses).
pub use imap::scan::{CommandId, Completion, Observer, Sink};
pub use route::backends_for;
pub use session::relay::{Observe, relay};
pub use stream::Stream;
pub use tls::ServerTls;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;
pub use server::Server;
pub use services::Services;
use shutdown::Shutdown;

/// A bound client listener and its index in `config.listeners`.
pub struct BoundListener {
    pub index: usize,
    pub listener: TcpListener,
}

/// Everything `run` serves on.
pub struct Bound {
    pub listeners: Vec<BoundListener>,
    pub admin: Option<TcpListener>,
}

/// Binds every listener in the config, and the admin server if configured.
pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    let named = |what: String, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot bind {what}: {e}"))
    };
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for (index, l) in config.listeners.iter().enumerate() {
        let listener = bind_shared(l.bind)
            .and_then(TcpListener::from_std)
            .map_err(|e| named(format!("listener {} to {}", l.name, l.bind), e))?;
        listeners.push(BoundListener { index, listener });
    }
    let admin = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| named(format!("the admin server to {addr}"), e))?,
        ),
        None => None,
    };
    Ok(Bound { listeners, admin })
}

/// Binds the client listeners again, for another worker thread: every worker has its own
/// sockets on the same addresses (SO_REUSEPORT), and the kernel spreads connections over them.
/// Plain std sockets: each worker registers them with its own runtime (`into_bound`).
fn bind_more(config: &Config) -> std::io::Result<Vec<(usize, std::net::TcpListener)>> {
    config
        .listeners
        .iter()
        .enumerate()
        .map(|(index, l)| Ok((index, bind_shared(l.bind)?)))
        .collect()
}

/// Registers listeners from `bind_more` with the current runtime.
fn into_bound(
    listeners: Vec<(usize, std::net::TcpListener)>,
) -> std::io::Result<Vec<BoundListener>> {
    listeners
        .into_iter()
        .map(|(index, l)| {
            Ok(BoundListener {
                index,
                listener: TcpListener::from_std(l)?,
            })
        })
        .collect()
}

/// A non-blocking listening socket with SO_REUSEPORT (and SO_REUSEADDR, for restarts).
fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Raises the soft open-file limit to the hard one; false if that failed.
pub fn raise_fd_limit() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return false;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
    }
}

/// The once-per-process tasks: health checks and the admin server, on the current runtime.
fn start_services(admin: Option<TcpListener>, services: &Arc<Services>, shutdown: &Shutdown) {
    let config = &services.config;
    for b in &config.backends {
        if b.insecure_skip_verify {
            warn!(backend = %b.name, "insecure_skip_verify: the backend's certificate is not checked");
        }
    }
    health::spawn(
        config.clone(),
        services.metrics.clone(),
        services.health.clone(),
        shutdown.clone(),
    );
    if let Some(listener) = admin {
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, "admin server listening");
        }
        let admin = Arc::new(admin::Admin {
            metrics: services.metrics.clone(),
            health: services.health.clone(),
            sessions: services.sessions.clone(),
        });
        tokio::spawn(admin::serve(listener, admin, shutdown.clone()));
    }
}

/// Accepts on `listeners` until `shutdown.drain`, then drains this thread's sessions: what
/// each worker of a `Server` runs.
async fn serve_listeners(
    listeners: Vec<BoundListener>,
    services: Arc<Services>,
    shutdown: Shutdown,
) {
    let config = &services.config;
    let caps = &services.caps;
    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for BoundListener { index, listener } in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(listener = %config.listeners[index].name, address = %addr, "listening");
        }
        loops.push(tokio::spawn(listener::accept_loop(
            listener,
            index,
            services.clone(),
            shutdown.clone(),
            tracker.clone(),
        )));
    }
    shutdown.drain.cancelled().await;
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    info!(open = caps.open(), grace = ?config.timeouts.shutdown_grace, "draining");
    if tokio::time::timeout(config.timeouts.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = caps.open(),
            "grace period over; closing the remaining sessions"
        );
        shutdown.cut.cancel();
        tracker.wait().await;
    }
}
