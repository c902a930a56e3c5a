//! The process-wide parts every session shares: the current snapshot (config and backend
//! states), metrics, the session table, the connection caps and the abuse tables.
//!
//! A reload builds a new `Snapshot` and swaps it in (arc-swap: readers never wait). A session
//! keeps the snapshot it started with; new connections and new logins take the current one.
//! The abuse tables are process-wide and never part of a snapshot: a reload must not give
//! every address a fresh start.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::abuse::Abuse;
use crate::backend::state::{BackendState, BackendStates};
use crate::config::Config;
use crate::directory::Directory;
use crate::directory::cache::Cache;
use crate::limits::ConnectionCaps;
use crate::metrics::{BackendMetrics, Metrics};
use crate::session::table::SessionTable;
use crate::shutdown::Shutdown;
use crate::trace::Traces;

/// One configuration and the live state of its backends, indexed like `config.backends`.
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    pub(crate) backends: Vec<Arc<BackendState>>,
    /// `routing.lookup`'s source, with the cache every snapshot shares.
    pub(crate) directory: Option<Arc<Directory>>,
    /// The series of backends the directory names by address only.
    pub(crate) dynamic_metrics: Arc<BackendMetrics>,
}

impl Snapshot {
    /// The state of the backend called `name`, with its index.
    pub(crate) fn backend(&self, name: &str) -> Option<(usize, &Arc<BackendState>)> {
        self.backends
            .iter()
            .enumerate()
            .find(|(_, b)| &*b.name == name)
    }
}

/// The process-wide parts every session shares.
pub struct Services {
    current: ArcSwap<Snapshot>,
    /// Bumped after each swap; workers, health checks and the admin server wait on it.
    generation: watch::Sender<u64>,
    states: BackendStates,
    /// The directory's answers; kept across reloads so a reload does not send every login
    /// to the directory at once.
    pub(crate) directory_cache: Arc<Cache>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Arc<SessionTable>,
    pub(crate) caps: Arc<ConnectionCaps>,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    pub(crate) abuse: Arc<Abuse>,
    pub(crate) traces: Traces,
}

impl Services {
    pub fn new(config: Arc<Config>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(&config));
        let states = BackendStates::default();
        let directory_cache = Arc::new(Cache::default());
        let snapshot = snapshot(config.clone(), &states, &directory_cache, &metrics);
        metrics.config_in_use(&config);
        Arc::new(Services {
            generation: watch::Sender::new(0),
            abuse: Abuse::new(&metrics),
            sessions: Arc::new(SessionTable::default()),
            caps: ConnectionCaps::new(config.limits.max_connections, config.limits.per_ip),
            current: ArcSwap::from_pointee(snapshot),
            states,
            directory_cache,
            metrics,
            reloading: tokio::sync::Mutex::new(()),
            traces: Traces::default(),
        })
    }

    /// The snapshot in use now.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The configuration in use now.
    pub fn config(&self) -> Arc<Config> {
        self.current.load().config.clone()
    }

    /// Puts `config` in use for everything that starts from now on.
    pub(crate) fn install(&self, config: Arc<Config>) {
        self.caps
            .set(config.limits.max_connections, config.limits.per_ip);
        self.metrics.config_in_use(&config);
        let snapshot = snapshot(config, &self.states, &self.directory_cache, &self.metrics);
        self.current.store(Arc::new(snapshot));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Wakes when a new snapshot is installed.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

fn snapshot(
    config: Arc<Config>,
    states: &BackendStates,
    cache: &Arc<Cache>,
    metrics: &Arc<Metrics>,
) -> Snapshot {
    let backends = states.for_config(&config, metrics);
    let directory = config
        .routing
        .lookup
        .as_ref()
        .map(|lookup| Arc::new(Directory::new(lookup, cache.clone(), metrics.clone())));
    Snapshot {
        backends,
        directory,
        dynamic_metrics: metrics.backend("dynamic"),
        config,
    }
}

/// Calls `start` with each snapshot in turn, from the current one on, until the drain. `start`
/// spawns what works from that snapshot (health checks, DNS lookups); those tasks stop when
/// the token they were given is cancelled, which is when the next snapshot is installed.
pub(crate) async fn for_each_snapshot(
    services: Arc<Services>,
    shutdown: Shutdown,
    mut start: impl FnMut(&Snapshot, &CancellationToken),
) {
    let mut changes = services.changes();
    loop {
        let stop = CancellationToken::new();
        start(&services.snapshot(), &stop);
        let go_on = tokio::select! {
            changed = changes.changed() => changed.is_ok(),
            _ = shutdown.drain.cancelled() => false,
        };
        stop.cancel();
        if !go_on {
            return;
        }
    }
}
