//! Backend health: every `health.interval` each backend is reached as a login would reach it
//! (`backend::open`: PROXY header, TLS or STARTTLS, greeting) within `health.timeout`. `rise` successes in a row mark it up, `fall` failures down. The state
//! feeds `imapgate_backend_up` and `/readyz`; routing does not use it (a user's mailbox is on
//! its backend; `routing.failover` decides what happens when that backend fails a login).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::backend::{self, BackendError, ProxyOut};
use crate::config::{Backend, Config};
use crate::metrics::Metrics;
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
        let result = probe(backend, h.timeout).await;
        let ok = result.is_ok();
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
                    let error = result.err().map(|e| e.to_string()).unwrap_or_default();
                    warn!(backend = %backend.name, address = %backend.address, %error, "backend down");
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

/// Reaches the backend exactly as a login does (PROXY header, implicit TLS or STARTTLS with
/// certificate verification, greeting, capabilities), then says LOGOUT.
async fn probe(backend: &Backend, timeout: Duration) -> Result<(), BackendError> {
    let attempt = async {
        let tcp = backend::connect(backend, timeout).await?;
        let (conn, _) = backend::open(tcp, backend, ProxyOut::Local).await?;
        conn.logout().await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| BackendError::CheckTimeout(timeout))?
}
