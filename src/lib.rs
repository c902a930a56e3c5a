//! imapgate: a transparent IMAP proxy and load balancer.
//!
//! `run` takes bound listeners, a validated config and a shutdown handle, so that the binary and
//! the tests (which bind port 0) start it the same way.

pub mod config;
pub mod imap;
pub mod listener;
pub mod route;
pub mod session;
pub mod shutdown;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;
use listener::ConnectionCaps;
use shutdown::Shutdown;

/// A bound listener and its name from the config.
pub struct BoundListener {
    pub name: String,
    pub listener: TcpListener,
}

/// Binds every listener in the config.
pub async fn bind(config: &Config) -> std::io::Result<Vec<BoundListener>> {
    let mut bound = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let listener = TcpListener::bind(l.bind).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind listener {} to {}: {e}", l.name, l.bind),
            )
        })?;
        bound.push(BoundListener {
            name: l.name.clone(),
            listener,
        });
    }
    Ok(bound)
}

/// Serves until `shutdown.drain` is cancelled, then lets logged-in sessions finish for
/// `timeouts.shutdown_grace` before cutting them.
pub async fn run(listeners: Vec<BoundListener>, config: Arc<Config>, shutdown: Shutdown) {
    let tracker = TaskTracker::new();
    let caps = ConnectionCaps::new(config.limits.max_connections, config.limits.per_ip);
    let mut loops = Vec::new();
    for BoundListener { name, listener } in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(listener = %name, address = %addr, "listening");
        }
        loops.push(tokio::spawn(listener::accept_loop(
            listener,
            name.into(),
            config.clone(),
            shutdown.clone(),
            tracker.clone(),
            caps.clone(),
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
    info!("stopped");
}
