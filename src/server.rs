//! One `Server`: the client listeners on one or more worker threads, the health checks and
//! the admin server, and the drain at shutdown. `main` and the integration tests start it the
//! same way; only the number of workers differs.
//!
//! Each worker is a single-threaded runtime with its own listening sockets on the configured
//! addresses (SO_REUSEPORT): the kernel spreads connections over them, a session lives on one
//! thread and its wakeups never cross threads; the config snapshot, metrics, caps and session
//! table are shared. The first worker is the caller's runtime.
//!
//! ```text
//! run ─► health checks, admin server ─► workers accept ─► shutdown.drain: stop accepting,
//!        BYE to pre-login sessions ─► logged-in sessions get shutdown_grace ─► cut ─► stopped
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::services::Services;
use crate::shutdown::Shutdown;
use crate::{admin, backend, health, listener, reload};

pub struct Server {
    bound: Bound,
    services: Arc<Services>,
    shutdown: Shutdown,
    workers: usize,
}

impl Server {
    /// A server on `bound` (see `bind`) with `workers` worker threads in all (at least one:
    /// the caller's runtime).
    pub fn new(bound: Bound, services: Arc<Services>, shutdown: Shutdown, workers: usize) -> Self {
        Server {
            bound,
            services,
            shutdown,
            workers: workers.max(1),
        }
    }

    /// Serves until `shutdown.drain` is cancelled, lets logged-in sessions finish for
    /// `timeouts.shutdown_grace` on every worker, then cuts what is left and returns. Further
    /// workers bind their own sockets; an error there is returned before anything is served.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            bound,
            services,
            shutdown,
            workers,
        } = self;
        let mut others = Vec::with_capacity(workers - 1);
        for n in 1..workers {
            let listeners = bind_more(&services.config())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (services, shutdown) = (services.clone(), shutdown.clone());
            let handle = std::thread::Builder::new()
                .name(format!("imapgate-{n}"))
                .spawn(move || {
                    runtime.block_on(async {
                        match into_bound(listeners) {
                            Ok(bound) => run_worker(bound, services, shutdown, false).await,
                            Err(e) => error!(error = %e, "worker cannot use its listeners"),
                        }
                    });
                })?;
            others.push(handle);
        }
        info!(workers, "workers started");
        start_services(bound.admin, &services, &shutdown);
        run_worker(bound.listeners, services, shutdown.clone(), true).await;
        // Every worker drains within the same grace period; only then is the rest cut.
        let _ = tokio::task::spawn_blocking(move || {
            for handle in others {
                let _ = handle.join();
            }
        })
        .await;
        // Stops the admin server and anything else still waiting on `cut`.
        shutdown.cut.cancel();
        info!("stopped");
        Ok(())
    }
}

/// A bound client listener and its index in `config.listeners`.
pub struct BoundListener {
    pub index: usize,
    pub listener: TcpListener,
}

/// Everything a `Server` serves on.
pub struct Bound {
    pub listeners: Vec<BoundListener>,
    pub admin: Option<TcpListener>,
}

/// Binds every listener in the config, and the admin server if configured. Fails when another
/// process (another imapgate, too) already holds a listener's address: SO_REUSEPORT is for our
/// own workers only, not for sharing clients with whoever else started on the address.
pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    let named = |what: String, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot bind {what}: {e}"))
    };
    // Every address is probed before any is bound: two listeners of one config on overlapping
    // addresses (0.0.0.0:143 and 127.0.0.1:143), which our SO_REUSEPORT sockets may share,
    // would otherwise take each other for another process.
    for l in &config.listeners {
        probe(l.bind).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "listener {}: {} is already in use by another process",
                        l.name, l.bind
                    ),
                )
            } else {
                named(format!("listener {} to {}", l.name, l.bind), e)
            }
        })?;
    }
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for (index, l) in config.listeners.iter().enumerate() {
        let listener = bind_shared(l.bind)
            .and_then(TcpListener::from_std)
            .map_err(|e| named(format!("listener {} to {}", l.name, l.bind), e))?;
        listeners.push(BoundListener { index, listener });
    }
    let admin = match &config.admin {
        Some(admin) => Some(
            TcpListener::bind(admin.bind)
                .await
                .map_err(|e| named(format!("the admin server to {}", admin.bind), e))?,
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

/// Fails with `AddrInUse` when someone else holds `addr`. The kernel lets a socket with
/// SO_REUSEPORT join any listener of the same user that has it too (a second imapgate, say), so
/// the test is a bind without it: SO_REUSEADDR alone still lets us start over our own
/// connections in TIME_WAIT, but not beside a listening socket. The probe is closed again before
/// the real sockets are bound, so a small race stays: a process binding with SO_REUSEPORT in
/// that moment (two imapgates started at once) still gets in. Binding the first real socket
/// without SO_REUSEPORT and setting it afterwards would close the gap, but socket(7) asks for it
/// before bind. Port 0 is not probed: every bind gets a port of its own.
fn probe(addr: std::net::SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// A non-blocking listening socket with SO_REUSEPORT (and SO_REUSEADDR, for restarts), and
/// TCP_NODELAY for the connections it accepts: Linux copies it to each, which saves a
/// setsockopt per login (IMAP is request and answer; Nagle would only delay the answers).
fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Whether `addr` can be bound now, and by no other process (a reload adding a listener checks
/// before it is put in use).
pub(crate) fn check_bindable(addr: std::net::SocketAddr) -> std::io::Result<()> {
    probe(addr)?;
    bind_shared(addr).map(drop)
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

/// The once-per-process tasks: health checks, the config file watch and the admin server, on
/// the current runtime.
fn start_services(admin: Option<TcpListener>, services: &Arc<Services>, shutdown: &Shutdown) {
    for b in &services.config().backends {
        if b.insecure_skip_verify {
            warn!(backend = %b.name, "insecure_skip_verify: the backend's certificate is not checked");
        }
    }
    tokio::spawn(health::run(services.clone(), shutdown.clone()));
    tokio::spawn(backend::resolve::run(services.clone(), shutdown.clone()));
    tokio::spawn(reload::watch(services.clone(), shutdown.clone()));
    if let Some(listener) = admin {
        tokio::spawn(admin::serve(listener, services.clone(), shutdown.clone()));
    }
}

/// One running accept loop of a worker.
struct Accepting {
    bind: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Accepts on `listeners` until `shutdown.drain`, starting and stopping accept loops as
/// reloads add and remove listeners, then drains this thread's sessions: what each worker of a
/// `Server` runs. Only the primary worker logs what every worker does alike.
async fn run_worker(
    listeners: Vec<BoundListener>,
    services: Arc<Services>,
    shutdown: Shutdown,
    primary: bool,
) {
    let tracker = TaskTracker::new();
    let mut running: HashMap<String, Accepting> = HashMap::new();
    let start = |name: &str, bind: SocketAddr, listener: TcpListener| {
        if primary && let Ok(addr) = listener.local_addr() {
            info!(listener = %name, address = %addr, "listening");
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(listener::accept_loop(
            listener,
            name.to_string(),
            services.clone(),
            shutdown.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        Accepting { bind, stop, task }
    };
    let config = services.config();
    for BoundListener { index, listener } in listeners {
        let l = &config.listeners[index];
        running.insert(l.name.clone(), start(&l.name, l.bind, listener));
    }
    let mut changes = services.changes();
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let config = services.config();
                // Stop what is gone or moved; start what is new (a moved listener is both).
                running.retain(|name, a| {
                    let kept = config.listeners.iter().any(|l| &l.name == name && l.bind == a.bind);
                    if !kept {
                        a.stop.cancel();
                        if primary {
                            info!(listener = %name, address = %a.bind, "listener stopped");
                        }
                    }
                    kept
                });
                for l in &config.listeners {
                    if running.contains_key(&l.name) {
                        continue;
                    }
                    match bind_shared(l.bind).and_then(TcpListener::from_std) {
                        Ok(listener) => {
                            running.insert(l.name.clone(), start(&l.name, l.bind, listener));
                        }
                        Err(e) => error!(listener = %l.name, address = %l.bind, error = %e, "cannot bind a listener added by a reload"),
                    }
                }
            }
            _ = shutdown.drain.cancelled() => break,
        }
    }
    for (_, a) in running.drain() {
        a.stop.cancel();
        let _ = a.task.await;
    }
    tracker.close();
    let config = services.config();
    let caps = &services.caps;
    if primary {
        info!(open = caps.open(), grace = ?config.timeouts.shutdown_grace, "draining");
    }
    if tokio::time::timeout(config.timeouts.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        if primary {
            warn!(
                open = caps.open(),
                "grace period over; closing the remaining sessions"
            );
        }
        shutdown.cut.cancel();
        tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
