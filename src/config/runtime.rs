//! The validated snapshot every session works from. It is immutable: a session keeps the
//! `Arc<Config>` it started with for its whole life.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use super::file::{CompressMode, ProxyProtocol, SendProxy};
use crate::imap::secret::Secret;
use crate::tls::ServerTls;

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
    /// The certificate set the TLS listeners share (each holds it too).
    pub tls: Option<Arc<ServerTls>>,
    /// The admin HTTP server, if it runs.
    pub admin: Option<AdminConfig>,
    pub health: HealthChecks,
    pub greeting: String,
    pub reload: ReloadConfig,
    pub dns: DnsConfig,
    pub metrics: MetricsConfig,
    /// `auth.mechanisms`: advertised as `AUTH=` before login and accepted by AUTHENTICATE.
    pub auth_mechanisms: Vec<super::file::AuthMechanism>,
    /// The file it was loaded from (what a reload reads again); `None` for text parsed directly.
    pub path: Option<std::path::PathBuf>,
    /// The start of the text's SHA-256, in hex (see `config::content_hash`).
    pub hash: String,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Required by the endpoints that change state or show users (`None`: open, loopback only).
    pub token: Option<AdminToken>,
    pub trace: TraceLimits,
}

/// `admin.trace`: how many per-user traces may run, how much each keeps, whether message
/// bodies may be recorded.
#[derive(Debug, Clone)]
pub struct TraceLimits {
    pub max_active: usize,
    pub max_bytes: usize,
    pub allow_bodies: bool,
}

impl Default for TraceLimits {
    /// As `admin.trace` defaults to.
    fn default() -> Self {
        TraceLimits {
            max_active: 4,
            max_bytes: 1 << 20,
            allow_bodies: false,
        }
    }
}

/// The admin bearer token. Never printed; compared in constant time.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        AdminToken(token.into())
    }

    /// Whether `offered` is the token, in time independent of where they differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let token = self.0.as_bytes();
        let mut diff = token.len() ^ offered.len();
        for (i, &b) in token.iter().enumerate() {
            diff |= usize::from(b ^ offered.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `imapgate_commands_total` and `imapgate_command_duration_seconds` by backend too.
    /// Read at start only: a reload cannot change a metric's label set.
    pub command_by_backend: bool,
    /// What the observer does in compressed sessions; a reload applies it to sessions that
    /// log in afterwards.
    pub compress: CompressMode,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// How often backend DNS names are resolved again.
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ReloadConfig {
    /// Reload when the file's content changes (polled every `interval`; a ConfigMap's symlink
    /// swap changes what the path reads, so it is seen too).
    pub watch: bool,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct HealthChecks {
    pub mode: super::file::HealthMode,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that mark a down backend up.
    pub rise: u32,
    /// Failures in a row that mark an up backend down.
    pub fall: u32,
}

/// TLS towards clients: a mode that uses TLS carries its certificates.
#[derive(Debug, Clone)]
pub enum ListenerTls {
    Plain,
    /// Plaintext first; STARTTLS offered before login.
    Starttls(Arc<ServerTls>),
    /// TLS from the first octet (993).
    Implicit(Arc<ServerTls>),
}

/// TLS towards a backend: a mode that uses TLS carries the client config and the name the
/// backend's certificate must carry.
#[derive(Debug, Clone)]
pub enum BackendTls {
    Plain,
    Implicit(ClientTls),
    Starttls(ClientTls),
}

#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientTls").field(&self.name).finish()
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: ListenerTls,
    pub proxy_protocol: ProxyProtocol,
    pub trusted_proxies: Vec<Cidr>,
    pub allow_plaintext_auth: Option<bool>,
}

impl ListenerConfig {
    /// Whether a client at `client` may send credentials without TLS.
    /// `unknown`: a PROXY header said UNKNOWN or LOCAL, so `client` is the balancer's address
    /// and says nothing of where the client is.
    pub fn plaintext_auth_allowed(&self, client: IpAddr, unknown: bool) -> bool {
        self.allow_plaintext_auth
            .unwrap_or_else(|| !unknown && client.to_canonical().is_loopback())
    }
}

#[derive(Clone)]
pub struct Backend {
    pub name: std::sync::Arc<str>,
    pub address: String,
    pub weight: u32,
    pub tls: BackendTls,
    pub insecure_skip_verify: bool,
    pub send_proxy: SendProxy,
    pub forward_id: bool,
    /// TCP_QUICKACK on the backend socket whenever the relay drained it (see relay/tcp.rs).
    pub quickack: bool,
    /// Long literal bodies spliced socket → pipe → socket on the plain relay (relay/splice.rs).
    pub splice: bool,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("weight", &self.weight)
            .field("tls", &self.tls)
            .field("send_proxy", &self.send_proxy)
            .field("forward_id", &self.forward_id)
            .field("quickack", &self.quickack)
            .field("splice", &self.splice)
            .finish()
    }
}

/// An address range, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr {
            network: addr,
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:10.1.0.9".parse().unwrap()),
            "v4-mapped v6"
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("203.0.113.7".parse().unwrap())
        );
        assert!(
            Cidr::parse("2001:db8::/32")
                .unwrap()
                .contains("2001:db8:1::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nonsense"), None);
    }
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub lowercase: bool,
    pub default_domain: Option<String>,
    /// Normalised user → index into `Config::backends`.
    pub static_map: HashMap<String, usize>,
    pub failover: bool,
    /// Route from a directory (`routing.lookup`).
    pub lookup: Option<Lookup>,
}

/// `routing.lookup`: where to ask, how long answers are kept, what an unknown user gets, and how
/// a backend named only by its address is reached.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub source: LookupSource,
    pub cache: LookupCache,
    pub fallback: super::file::LookupFallback,
    pub backend_defaults: BackendDefaults,
}

impl Lookup {
    /// Whether the source is told the password (and so decides the login).
    pub fn send_password(&self) -> bool {
        match &self.source {
            LookupSource::Http(h) => h.send_password,
            LookupSource::Ldap(_) | LookupSource::Sql(_) => false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum LookupSource {
    Http(HttpLookup),
    Ldap(LdapLookup),
    Sql(SqlLookup),
}

impl LookupSource {
    /// For metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            LookupSource::Http(_) => "http",
            LookupSource::Ldap(_) => "ldap",
            LookupSource::Sql(_) => "sql",
        }
    }
}

/// An nginx `auth_http` compatible service.
#[derive(Debug, Clone)]
pub struct HttpLookup {
    /// `host:port` to connect to.
    pub address: String,
    /// The `Host` header.
    pub host: String,
    /// Path and query of the request.
    pub path: String,
    pub send_password: bool,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

/// An LDAP directory: one entry per user, its host (and port) in attributes.
#[derive(Debug, Clone)]
pub struct LdapLookup {
    /// `ldap://host:port` or `ldaps://host:port`, as ldap3 takes it.
    pub url: String,
    /// StartTLS after connecting to an `ldap://` URL.
    pub starttls: bool,
    /// For `ldaps://` and StartTLS: how the server's certificate is checked (the name is the
    /// URL's host).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Simple bind DN and password; anonymous when `None`.
    pub bind: Option<(String, Secret<String>)>,
    pub base: String,
    /// With `%u`, `%n`, `%d` (checked at load: see `directory::ldap::check_filter`).
    pub filter: String,
    pub host_attribute: String,
    pub port_attribute: Option<String>,
    pub default_port: u16,
    pub timeout: Duration,
    pub pool_size: usize,
}

/// A PostgreSQL query: `$1` is the user; the first column the host, the second (if any) the
/// port.
#[derive(Debug, Clone)]
pub struct SqlLookup {
    /// Where and as whom to connect (its `Debug` hides the password).
    pub connect: tokio_postgres::Config,
    pub query: String,
    pub default_port: u16,
    pub timeout: Duration,
    pub pool_size: usize,
}

#[derive(Debug, Clone)]
pub struct LookupCache {
    /// How long a found route is used without asking again; 0: no cache.
    pub ttl: Duration,
    /// How long "no such user" is kept.
    pub negative_ttl: Duration,
    /// How old a route may be and still be used while the directory fails.
    pub stale_max_age: Duration,
    pub max_entries: usize,
}

/// A backend the directory names by `host:port` only: these settings, that address.
#[derive(Debug, Clone)]
pub struct BackendDefaults {
    /// The TLS mode, with the client config; the name to verify is the template's
    /// `server_name` or else the address's host.
    pub tls: super::file::BackendTlsMode,
    pub client: Option<Arc<rustls::ClientConfig>>,
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    pub insecure_skip_verify: bool,
    pub send_proxy: SendProxy,
    pub forward_id: bool,
    pub quickack: bool,
    pub splice: bool,
}

impl BackendDefaults {
    /// The backend at `address` (`host:port`) with these settings. `name` is what logs and
    /// `/sessions` call it.
    pub fn backend(&self, name: Arc<str>, address: &str) -> Result<Backend, String> {
        let client_tls = || -> Result<ClientTls, String> {
            let config = self
                .client
                .clone()
                .ok_or_else(|| "no TLS client config".to_string())?;
            let name = match &self.server_name {
                Some(n) => n.clone(),
                None => {
                    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
                    crate::tls::server_name(host.trim_start_matches('[').trim_end_matches(']'))?
                }
            };
            Ok(ClientTls { config, name })
        };
        let tls = match self.tls {
            super::file::BackendTlsMode::None => BackendTls::Plain,
            super::file::BackendTlsMode::Implicit => BackendTls::Implicit(client_tls()?),
            super::file::BackendTlsMode::Starttls => BackendTls::Starttls(client_tls()?),
        };
        Ok(Backend {
            name,
            address: address.to_string(),
            weight: 0,
            tls,
            insecure_skip_verify: self.insecure_skip_verify,
            send_proxy: self.send_proxy,
            forward_id: self.forward_id,
            quickack: self.quickack,
            splice: self.splice,
        })
    }
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
    /// Syntax errors in a row before login before the connection is closed.
    pub bad_commands: u32,
    /// The delay before the NO to a failed login, per client address; `None`: off.
    pub login_penalty: Option<LoginPenalty>,
    /// Logged-in sessions per normalised user; `None`: unlimited.
    pub per_user: Option<u32>,
    /// New connections per client address; `None`: unlimited.
    pub connection_rate: Option<ConnectionRate>,
    /// Entries in each abuse table keyed by client address.
    pub table_max: usize,
}

/// `limits.login_penalty`: 0, `base`, 2 × `base`, 4 × `base`, ... up to `max`, by the client
/// address's failures within `forget_after` of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginPenalty {
    pub base: Duration,
    pub max: Duration,
    pub forget_after: Duration,
}

/// `limits.connection_rate`: a token bucket per client address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionRate {
    /// Tokens added per second; finite and above 0.
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub prelogin: Duration,
    pub backend_connect: Duration,
    /// From accept to the PROXY header (within `prelogin`).
    pub proxy_header: Duration,
    /// A client's TLS handshake (within `prelogin`).
    pub tls_handshake: Duration,
    /// From the connect to a backend ready for the login: PROXY header, TLS or STARTTLS,
    /// greeting, capabilities, ID.
    pub backend_greeting: Duration,
    /// From the login sent to the backend's answer.
    pub backend_login: Duration,
    pub half_close: Duration,
    /// An unreachable peer is given up after this (see `stream::detect_dead_peer`).
    pub keepalive: Duration,
    pub shutdown_grace: Duration,
}
