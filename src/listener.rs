//! Accept loop: accept, check the connection caps, spawn. Nothing slow happens here; the
//! session task does the talking, even the refusal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::Services;
use crate::config::ProxyProtocol;
use crate::imap::response;
use crate::metrics::{AcceptError, Rejection};
use crate::session::{self, Session, SessionId};
use crate::shutdown::Shutdown;

/// How long to pause accepting after an accept error (usually: out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub async fn accept_loop(
    listener: TcpListener,
    index: usize,
    services: Arc<Services>,
    shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let config = &services.config.listeners[index];
    let name = &config.name;
    let caps = &services.caps;
    // Behind a PROXY balancer every connection comes from the balancer: the per-address cap
    // is applied in the session, to the address the header carries.
    let proxied = config.proxy_protocol == ProxyProtocol::Required;
    let mut failing = false;
    let counters = services.metrics.listener(name);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.drain.cancelled() => break,
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
                    Some(libc::EMFILE | libc::ENFILE) => AcceptError::fd_limit,
                    _ => AcceptError::other,
                };
                counters.accept_failed(reason);
                if !failing {
                    error!(listener = %name, error = %e, ?reason, "accept failed; backing off");
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        counters.accepted.inc();
        let admitted = if proxied {
            Ok(None)
        } else {
            caps.admit(peer.ip()).map(Some)
        };
        match admitted {
            Ok(permit) => {
                let session = Session {
                    id: SessionId::next(),
                    peer,
                    local: stream.local_addr().unwrap_or(peer),
                    listener: index,
                    services: services.clone(),
                    shutdown: shutdown.clone(),
                    open: OpenConnection::new(&counters.open),
                };
                // The session future itself, not wrapped: a wrapper would hold the arguments
                // next to it for the session's whole life.
                tracker.spawn(session::serve(stream, session, permit));
            }
            Err(which) => {
                warn!(listener = %name, client = %peer, limit = which, "connection refused by limit");
                services.metrics.rejected(Rejection::connection_limit);
                tracker.spawn(refuse(stream));
            }
        }
    }
}

/// One open client connection in `imapgate_connections_active`, until dropped.
pub struct OpenConnection(Gauge);

impl OpenConnection {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        OpenConnection(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn refuse(mut stream: TcpStream) {
    let bye = response::bye("LIMIT", "Too many connections, try again later.");
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&bye)).await;
}

/// Caps on open client connections: in total and per client address.
pub struct ConnectionCaps {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place; gives it back on drop.
pub struct Permit {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A permit, or the name of the cap that refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, &'static str> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("max_connections");
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("per_ip");
        }
        *count += 1;
        Ok(Permit {
            caps: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = self.caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_release() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = caps.admit(a).unwrap();
        let _p2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).err(), Some("per_ip"));
        let _p3 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).err(), Some("max_connections"));
        drop(p1);
        assert_eq!(caps.open(), 2);
        assert!(caps.admit(a).is_ok());
    }
}
