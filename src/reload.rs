//! Reloading the configuration: SIGHUP, `POST /reload`, or (with `reload.watch`) a change of
//! the file's content. The whole file is read and validated again; only a valid one is put in
//! use (one new snapshot, swapped in at once), an invalid one leaves everything as it was.
//!
//! ```text
//! read file ─► parse + validate ─► new listener addresses bindable? ─► Services::install
//!     any failure: logged with file:line:col, imapgate_config_reloads_total{result="error"}
//! ```
//!
//! Workers see the new snapshot and start or stop their accept loops (server.rs); health
//! checks restart on the new backend list (health.rs); the admin server rebinds if its address
//! changed (admin.rs). Sessions already running keep the snapshot they started with.

use std::sync::Arc;

use tracing::{error, info, warn};

use crate::config::{self, Config};
use crate::metrics::ReloadResult;
use crate::services::Services;
use crate::shutdown::Shutdown;

/// Why a reload was refused (the old configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not loaded from a file (nothing to reload)")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] config::ConfigError),
    #[error("listener {name}: cannot bind {address}: {error}")]
    Bind {
        name: String,
        address: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// Reloads from the file the running configuration came from. Returns the new config's hash.
pub async fn reload(services: &Services) -> Result<String, ReloadError> {
    let _one_at_a_time = services.reloading.lock().await;
    let old = services.config();
    let result = load_checked(&old).await;
    match &result {
        Ok(new) => {
            let hash = new.hash.clone();
            let changed = hash != old.hash;
            services.install(new.clone());
            services.metrics.reloaded(ReloadResult::Ok);
            info!(config = %new.source, %hash, changed, "configuration reloaded");
        }
        Err(e) => {
            services.metrics.reloaded(ReloadResult::Error);
            error!(error = %e, "configuration not reloaded; the old one stays in use");
        }
    }
    result.map(|c| c.hash.clone())
}

async fn load_checked(old: &Config) -> Result<Arc<Config>, ReloadError> {
    let path = old.path.clone().ok_or(ReloadError::NoFile)?;
    // Reading certificates and the file is blocking work: off the runtime's thread.
    let loaded = tokio::task::spawn_blocking(move || config::load(&path))
        .await
        .map_err(|_| {
            ReloadError::Invalid(config::ConfigError {
                source_name: old.source.clone(),
                line: 0,
                column: 0,
                message: "the reload task failed".into(),
            })
        })??;
    // A listener on an address not bound before must be bindable now, or the reload is
    // refused as a whole (instead of running with a listener missing).
    for l in &loaded.listeners {
        let known = old
            .listeners
            .iter()
            .any(|o| o.name == l.name && o.bind == l.bind);
        if !known {
            crate::server::check_bindable(l.bind).map_err(|error| ReloadError::Bind {
                name: l.name.clone(),
                address: l.bind,
                error,
            })?;
        }
    }
    Ok(Arc::new(loaded))
}

/// With `reload.watch`: reads the file every `reload.interval` and reloads when its content
/// changed. Polling the path (not the inode) also sees a Kubernetes ConfigMap's symlink swap.
pub(crate) async fn watch(services: Arc<Services>, shutdown: Shutdown) {
    let mut last_seen = services.config().hash.clone();
    loop {
        let config = services.config();
        let (Some(path), true) = (config.path.clone(), config.reload.watch) else {
            // Not watching now; a reload (SIGHUP) may turn it on.
            let mut changes = services.changes();
            tokio::select! {
                _ = changes.changed() => continue,
                _ = shutdown.drain.cancelled() => return,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(config.reload.interval) => {}
            _ = shutdown.drain.cancelled() => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "reload.watch: cannot read the file");
                continue;
            }
        };
        let hash = config::content_hash(&text);
        let current = services.config().hash.clone();
        if hash == last_seen || hash == current {
            last_seen = hash;
            continue;
        }
        info!(path = %path.display(), "the configuration file changed; reloading");
        last_seen = hash;
        let _ = reload(&services).await;
    }
}
