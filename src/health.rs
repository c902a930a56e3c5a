//! Backend health: every `health.interval` each backend is dialled and must greet with `* OK`
//! within `health.timeout`. `rise` successes in a row mark it up, `fall` failures down. The state
//! feeds `imapgate_backend_up` and `/readyz`; routing does not use it (a user's mailbox is on
//! its backend; `routing.failover` decides what happens when that backend fails a login).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{Backend, BackendTls, Config, SendProxy};
use crate::metrics::Metrics;
use crate::proxy_header;
use crate::session::dial;
use crate::session::stream::Stream;
use crate::shutdown::Shutdown;

pub struct Health {
    up: Vec<AtomicBool>,
}

impl Health {
    pub fn new(backends: usize) -> Arc<Self> {
        Arc::new(Health {
            up: (0..backends).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    pub fn is_up(&self, backend: usize) -> bool {
        self.up
            .get(backend)
            .is_some_and(|u| u.load(Ordering::Relaxed))
    }

    pub fn any_up(&self) -> bool {
        self.up.iter().any(|u| u.load(Ordering::Relaxed))
    }
}

/// Runs the checks until shutdown; one task per backend.
pub fn spawn(config: Arc<Config>, metrics: Arc<Metrics>, health: Arc<Health>, shutdown: Shutdown) {
    for index in 0..config.backends.len() {
        let (config, metrics, health, shutdown) = (
            config.clone(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = check_loop(&config, index, &metrics, &health) => {}
                _ = shutdown.drain.cancelled() => {}
            }
        });
    }
}

async fn check_loop(config: &Config, index: usize, metrics: &Metrics, health: &Health) {
    let backend = &config.backends[index];
    let h = &config.health;
    let mut streak = 0u32;
    let mut up = false;
    let mut first = true;
    let mut ticker = tokio::time::interval(h.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ok = probe(backend, h.timeout).await;
        // The first probe decides at once; after that, `rise`/`fall` in a row change the state.
        if ok == up && !first {
            streak = 0;
        } else {
            streak += 1;
        }
        let needed = if ok { h.rise } else { h.fall };
        if first || streak >= needed {
            if ok != up || first {
                if ok {
                    info!(backend = %backend.name, "backend up");
                } else {
                    warn!(backend = %backend.name, address = %backend.address, "backend down");
                }
            }
            up = ok;
            streak = 0;
            first = false;
            health.up[index].store(up, Ordering::Relaxed);
            metrics.set_backend_up(&backend.name, up);
        }
    }
}

/// Connects the way a login would (PROXY header, TLS), reads the greeting, says LOGOUT.
async fn probe(backend: &Backend, timeout: Duration) -> bool {
    let attempt = async {
        let mut tcp = TcpStream::connect(&backend.address).await.ok()?;
        // A backend that takes PROXY headers wants one first; LOCAL/UNKNOWN says "no client".
        match backend.send_proxy {
            SendProxy::None => {}
            SendProxy::V1 => tcp.write_all(b"PROXY UNKNOWN\r\n").await.ok()?,
            SendProxy::V2 => tcp.write_all(&proxy_header::v2_local().ok()?).await.ok()?,
        }
        let mut stream = match (&backend.tls, &backend.tls_client) {
            (BackendTls::Implicit, Some(tls)) => dial::tls_connect(tcp, tls).await.ok()?,
            _ => Stream::Plain(tcp),
        };
        let mut greeting = [0u8; 4];
        stream.read_exact(&mut greeting).await.ok()?;
        let _ = stream.write_all(b"h LOGOUT\r\n").await;
        let _ = stream.flush().await;
        Some(&greeting == b"* OK")
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
