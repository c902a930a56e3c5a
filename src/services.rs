//! The process-wide parts every session shares: the config snapshot, metrics, the session
//! table, backend health, the connection caps and the abuse tables.

use std::sync::Arc;

use crate::abuse::Abuse;
use crate::config::Config;
use crate::health::Health;
use crate::limits::ConnectionCaps;
use crate::metrics::Metrics;
use crate::session::table::SessionTable;

/// The process-wide parts every session shares.
pub struct Services {
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Arc<SessionTable>,
    pub(crate) health: Arc<Health>,
    pub(crate) caps: Arc<ConnectionCaps>,
    pub(crate) abuse: Arc<Abuse>,
}

impl Services {
    pub fn new(config: Arc<Config>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(&config));
        Arc::new(Services {
            abuse: Abuse::new(&metrics),
            metrics,
            sessions: Arc::new(SessionTable::default()),
            health: Health::new(config.backends.len()),
            caps: ConnectionCaps::new(config.limits.max_connections, config.limits.per_ip),
            config,
        })
    }
}
