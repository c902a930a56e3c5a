//! The validated snapshot every session works from. It is immutable: a session keeps the
//! `Arc<Config>` it started with for its whole life.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from: a path, or `<embedded default>`.
    pub source: String,
    pub listeners: Vec<ListenerConfig>,
    /// A backend's index here is its id in `Routing::static_map`.
    pub backends: Vec<Backend>,
    pub routing: Routing,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// The admin HTTP server's address, if it runs.
    pub admin: Option<SocketAddr>,
    pub health: HealthChecks,
    pub greeting: String,
}

#[derive(Debug, Clone)]
pub struct HealthChecks {
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that mark a down backend up.
    pub rise: u32,
    /// Failures in a row that mark an up backend down.
    pub fall: u32,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub address: String,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub lowercase: bool,
    pub default_domain: Option<String>,
    /// Normalised user → index into `Config::backends`.
    pub static_map: HashMap<String, usize>,
    pub failover: bool,
}

impl Routing {
    /// The routing key for a login name: lowercased (if configured) and completed with the
    /// default domain when it has none. The name sent to the backend is never changed.
    pub fn normalize(&self, user: &str) -> String {
        let mut key = if self.lowercase {
            user.to_lowercase()
        } else {
            user.to_string()
        };
        if let Some(domain) = &self.default_domain
            && !key.contains('@')
        {
            key.push('@');
            key.push_str(domain);
        }
        key
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub per_ip: usize,
    /// Longest pre-login command line, literals not counted.
    pub line_max: usize,
    /// Longest literal in a pre-login command (user names and passwords).
    pub literal_max: usize,
    /// Failed logins on one connection before it is closed.
    pub login_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub prelogin: Duration,
    pub backend_connect: Duration,
    pub backend_login: Duration,
    pub half_close: Duration,
    pub shutdown_grace: Duration,
}
