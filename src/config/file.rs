//! The YAML as the operator writes it. Every struct rejects unknown fields, so a typo is an error
//! with a line and column instead of a silently ignored setting. Values that are checked after
//! parsing (addresses, backend names) are `Spanned`, so that `validate` can point at them too.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

pub use crate::imap::sasl::AuthMechanism;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerFile>,
    pub backends: Vec<BackendFile>,
    #[serde(default)]
    pub routing: RoutingFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// Certificates for listeners with `tls: starttls | implicit`.
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default)]
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub health: HealthFile,
    /// Text after `* OK [CAPABILITY ...]` in the greeting.
    #[serde(default = "default_greeting")]
    pub greeting: String,
    #[serde(default)]
    pub reload: ReloadFile,
    #[serde(default)]
    pub dns: DnsFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    #[serde(default)]
    pub auth: AuthFile,
}

/// `auth`: the SASL mechanisms offered before login.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFile {
    /// Advertised as `AUTH=` and accepted by AUTHENTICATE (the LOGIN command is separate).
    pub mechanisms: Vec<AuthMechanism>,
}

impl Default for AuthFile {
    fn default() -> Self {
        AuthFile {
            mechanisms: AuthMechanism::DEFAULT.to_vec(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Per-command series for each backend (the full matrix), not for all backends together.
    #[serde(default)]
    pub command_by_backend: bool,
    /// What the observer does once a session is compressed (COMPRESS=DEFLATE).
    #[serde(default)]
    pub compress: CompressMode,
}

/// After `COMPRESS DEFLATE` (RFC 4978): inflate a copy of both directions so commands are
/// still counted (`observe`), or count bytes only (`bytes_only`, cheaper: no inflating, no
/// inflater memory).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressMode {
    #[default]
    Observe,
    BytesOnly,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsFile {
    pub interval: Spanned<ConfigDuration>,
}

impl Default for DnsFile {
    fn default() -> Self {
        DnsFile {
            interval: unspanned(ConfigDuration(Duration::from_secs(30))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadFile {
    pub watch: bool,
    pub interval: Spanned<ConfigDuration>,
}

impl Default for ReloadFile {
    fn default() -> Self {
        ReloadFile {
            watch: false,
            interval: unspanned(ConfigDuration(Duration::from_secs(5))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: Spanned<String>,
    pub bind: Spanned<String>,
    #[serde(default)]
    pub tls: ListenerTlsMode,
    /// `required`: every connection starts with a PROXY v1/v2 header from a trusted peer.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// CIDRs allowed to send PROXY headers.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// LOGIN/AUTHENTICATE without TLS. Unset: allowed for loopback clients only.
    #[serde(default)]
    pub allow_plaintext_auth: Option<bool>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTlsMode {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The default certificate chain and key (PEM), for clients without a matching SNI name.
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    /// More certificates, chosen by the name the client asks for (SNI).
    #[serde(default)]
    pub sni: Vec<SniFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniFile {
    pub names: Vec<String>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsMode {
    #[default]
    None,
    Implicit,
    Starttls,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    None,
    V1,
    V2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub bind: Spanned<String>,
    /// A file holding the bearer token the protected endpoints require.
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    #[serde(default)]
    pub trace: TraceFile,
}

/// `admin.trace`: the bounds of per-user traces (`POST /trace`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceFile {
    /// Traces running at once.
    pub max_active: Spanned<u32>,
    /// Octets of transcript one trace keeps.
    pub max_bytes: Spanned<u32>,
    /// Whether `bodies=true` may record message data.
    pub allow_bodies: bool,
}

impl Default for TraceFile {
    fn default() -> Self {
        TraceFile {
            max_active: unspanned(4),
            max_bytes: unspanned(1 << 20),
            allow_bodies: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    pub mode: HealthMode,
    pub interval: Spanned<ConfigDuration>,
    pub timeout: Spanned<ConfigDuration>,
    pub rise: Spanned<u32>,
    pub fall: Spanned<u32>,
}

impl Default for HealthFile {
    fn default() -> Self {
        HealthFile {
            mode: HealthMode::Greeting,
            interval: unspanned(ConfigDuration(Duration::from_secs(5))),
            timeout: unspanned(ConfigDuration(Duration::from_secs(2))),
            rise: unspanned(2),
            fall: unspanned(2),
        }
    }
}

/// What a health check does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthMode {
    /// TCP connect only.
    Tcp,
    /// Reach the backend as a login does (PROXY, TLS or STARTTLS, greeting), then LOGOUT.
    #[default]
    Greeting,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub name: Spanned<String>,
    /// `host:port`; the host may be a DNS name, resolved at each dial.
    pub address: Spanned<String>,
    /// Share of hashed users, relative to the other backends. 0 takes no hashed users (drained);
    /// users mapped to it statically still go there.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PEM file of CA certificates to verify the backend with; the system roots without it.
    #[serde(default)]
    pub ca: Option<Spanned<String>>,
    /// The name the backend's certificate must carry; the address's host without it.
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    /// Accept any certificate (logged as a warning at start). For tests and emergencies.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Send a PROXY header with the client's address first thing on each connection.
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// Send Dovecot's trusted ID fields (x-originating-ip, ...) before the login.
    #[serde(default)]
    pub forward_id: bool,
    /// Acknowledge the backend's data at once (TCP_QUICKACK) instead of Linux's delayed ACK.
    #[serde(default = "yes")]
    pub quickack: bool,
    /// Move long literal bodies socket → pipe → socket with splice(2) instead of copying them.
    #[serde(default)]
    pub splice: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    #[serde(default)]
    pub normalize: NormalizeFile,
    /// Normalised user name → backend name.
    #[serde(default, rename = "static")]
    pub static_map: BTreeMap<String, Spanned<String>>,
    /// When a user's first backend cannot be reached, try the next one in the user's order.
    /// Off by default: with mailboxes on local disks, another backend does not have the mail.
    #[serde(default)]
    pub failover: bool,
    /// Ask a directory where each user's mailbox is.
    #[serde(default)]
    pub lookup: Option<LookupFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupFile {
    #[serde(default)]
    pub http: Option<HttpLookupFile>,
    /// An LDAP directory (`mailHost` and the like).
    #[serde(default)]
    pub ldap: Option<Spanned<LdapLookupFile>>,
    /// A PostgreSQL table, by a parameterised query.
    #[serde(default)]
    pub sql: Option<Spanned<SqlLookupFile>>,
    #[serde(default)]
    pub cache: LookupCacheFile,
    #[serde(default)]
    pub fallback: LookupFallback,
    /// What a backend named only by `host:port` in an answer is reached with.
    #[serde(default)]
    pub backend_defaults: BackendDefaultsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLookupFile {
    pub url: Spanned<String>,
    /// Send `Auth-Pass` (the service then decides the login, nginx's model).
    #[serde(default)]
    pub send_password: bool,
    #[serde(default = "default_lookup_timeout")]
    pub timeout: Spanned<ConfigDuration>,
    /// Requests to the service at once; more wait.
    #[serde(default = "default_lookup_in_flight")]
    pub max_in_flight: Spanned<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapLookupFile {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: Spanned<String>,
    /// StartTLS on an `ldap://` connection.
    #[serde(default)]
    pub starttls: bool,
    /// PEM file of CA certificates for `ldaps://` or StartTLS; the system roots without it.
    #[serde(default)]
    pub ca: Option<Spanned<String>>,
    /// Simple bind as this DN (with `bind_password_file`); anonymous without it.
    #[serde(default)]
    pub bind_dn: Option<Spanned<String>>,
    /// A file holding the bind password (read at load; a trailing newline is not part of it).
    #[serde(default)]
    pub bind_password_file: Option<Spanned<String>>,
    /// The search base (subtree).
    pub base: Spanned<String>,
    /// The filter, with `%u` (the user), `%n` (its part before the last `@`), `%d` (after it),
    /// each escaped per RFC 4515, and `%%`.
    pub filter: Spanned<String>,
    /// The attribute holding the host (`mailHost`); `host` or `host:port`.
    pub host_attribute: Spanned<String>,
    /// The attribute holding the port, if any.
    #[serde(default)]
    pub port_attribute: Option<Spanned<String>>,
    /// The port when neither the host nor `port_attribute` names one.
    #[serde(default = "default_imap_port")]
    pub default_port: Spanned<u32>,
    #[serde(default = "default_lookup_timeout")]
    pub timeout: Spanned<ConfigDuration>,
    /// Bound connections kept (and the most lookups at once; more wait).
    #[serde(default = "default_pool_size")]
    pub pool_size: Spanned<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlLookupFile {
    /// `postgresql://user@host:port/db` (or libpq's `key=value` form).
    pub url: Spanned<String>,
    /// A file holding the password (read at load; a trailing newline is not part of it).
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// A query with one parameter, `$1` (the user), returning the host and optionally the port.
    pub query: Spanned<String>,
    /// The port when the query returns none (or NULL).
    #[serde(default = "default_imap_port")]
    pub default_port: Spanned<u32>,
    #[serde(default = "default_lookup_timeout")]
    pub timeout: Spanned<ConfigDuration>,
    /// Connections kept (and the most queries at once; more wait).
    #[serde(default = "default_pool_size")]
    pub pool_size: Spanned<u32>,
}

fn default_imap_port() -> Spanned<u32> {
    unspanned(143)
}

fn default_pool_size() -> Spanned<u32> {
    unspanned(4)
}

fn default_lookup_timeout() -> Spanned<ConfigDuration> {
    unspanned(ConfigDuration(Duration::from_secs(2)))
}

fn default_lookup_in_flight() -> Spanned<u32> {
    unspanned(64)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupCacheFile {
    pub ttl: Spanned<ConfigDuration>,
    pub negative_ttl: Spanned<ConfigDuration>,
    pub stale_max_age: Spanned<ConfigDuration>,
    pub max_entries: Spanned<u32>,
}

impl Default for LookupCacheFile {
    fn default() -> Self {
        let secs = |s| unspanned(ConfigDuration(Duration::from_secs(s)));
        LookupCacheFile {
            ttl: secs(300),
            negative_ttl: secs(30),
            stale_max_age: secs(3600),
            max_entries: unspanned(1_000_000),
        }
    }
}

/// What a user the directory does not know gets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LookupFallback {
    /// Today's routing: static map, then rendezvous hashing.
    #[default]
    Hash,
    /// `NO [AUTHENTICATIONFAILED]` (unknown user) or `NO [UNAVAILABLE]` (directory down).
    Refuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendDefaultsFile {
    #[serde(default)]
    pub tls: BackendTlsMode,
    #[serde(default)]
    pub ca: Option<Spanned<String>>,
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    #[serde(default)]
    pub send_proxy: SendProxy,
    #[serde(default)]
    pub forward_id: bool,
    #[serde(default = "yes")]
    pub quickack: bool,
    #[serde(default)]
    pub splice: bool,
}

impl Default for BackendDefaultsFile {
    fn default() -> Self {
        BackendDefaultsFile {
            tls: BackendTlsMode::None,
            ca: None,
            server_name: None,
            insecure_skip_verify: false,
            send_proxy: SendProxy::None,
            forward_id: false,
            quickack: true,
            splice: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeFile {
    #[serde(default = "yes")]
    pub lowercase: bool,
    #[serde(default)]
    pub default_domain: Option<String>,
}

impl Default for NormalizeFile {
    fn default() -> Self {
        NormalizeFile {
            lowercase: true,
            default_domain: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    pub max_connections: Spanned<u32>,
    pub per_ip: Spanned<u32>,
    pub line_max: Spanned<u32>,
    pub literal_max: Spanned<u32>,
    pub login_attempts: Spanned<u32>,
    pub bad_commands: Spanned<u32>,
    /// The delay before the NO to a failed login, by the client address's recent failures.
    pub login_penalty: LoginPenaltyFile,
    /// Logged-in sessions per (normalised) user; 0: unlimited.
    pub per_user: Spanned<u32>,
    /// New connections per client address: a token bucket.
    pub connection_rate: ConnectionRateFile,
    /// Entries in each shared table keyed by client address (login_penalty, connection_rate).
    pub table_max: Spanned<u32>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_connections: unspanned(200_000),
            per_ip: unspanned(100),
            // A maximum-size ID (RFC 2971: 30 pairs, values up to 1,024 octets) is ~32 KB.
            line_max: unspanned(65536),
            literal_max: unspanned(8192),
            login_attempts: unspanned(3),
            // Dovecot closes after 10 as well; no client makes that many mistakes in a row.
            bad_commands: unspanned(10),
            login_penalty: LoginPenaltyFile::default(),
            per_user: unspanned(0),
            connection_rate: ConnectionRateFile::default(),
            table_max: unspanned(100_000),
        }
    }
}

/// The first failed login from a client address is answered at once, the next after `base`,
/// each later one after twice the one before, at most `max`; the address's failures are
/// forgotten after `forget_after` without one. `base: 0s` turns it off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginPenaltyFile {
    pub base: Spanned<ConfigDuration>,
    pub max: Spanned<ConfigDuration>,
    pub forget_after: Spanned<ConfigDuration>,
}

impl Default for LoginPenaltyFile {
    fn default() -> Self {
        let secs = |s| unspanned(ConfigDuration(Duration::from_secs(s)));
        LoginPenaltyFile {
            base: secs(2),
            max: secs(15),
            forget_after: secs(600),
        }
    }
}

/// `per_second` new connections per client address on average (fractions allowed: 0.2 is one
/// per 5 s), `burst` at once; `per_second: 0` turns it off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionRateFile {
    pub per_second: Spanned<f64>,
    pub burst: Spanned<u32>,
}

impl Default for ConnectionRateFile {
    fn default() -> Self {
        ConnectionRateFile {
            per_second: unspanned(0.0),
            burst: unspanned(20),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
    pub prelogin: Spanned<ConfigDuration>,
    pub backend_connect: Spanned<ConfigDuration>,
    /// From accept to the client's PROXY header, on a PROXY listener.
    pub proxy_header: Spanned<ConfigDuration>,
    /// A client's TLS handshake (implicit TLS, or after STARTTLS).
    pub tls_handshake: Spanned<ConfigDuration>,
    /// After the TCP connect: PROXY header, TLS, greeting, capabilities, ID.
    pub backend_greeting: Spanned<ConfigDuration>,
    /// From the login sent to the backend's answer.
    pub backend_login: Spanned<ConfigDuration>,
    /// After the client closed its sending side: how long the backend may take to finish.
    pub half_close: Spanned<ConfigDuration>,
    /// How long an unreachable peer (no FIN, no RST: a partition, a vanished host) may hold a
    /// connection: TCP keepalive and TCP_USER_TIMEOUT on both sockets.
    pub keepalive: Spanned<ConfigDuration>,
    /// On SIGTERM: how long logged-in sessions may go on before they are cut.
    pub shutdown_grace: Spanned<ConfigDuration>,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        let secs = |s| unspanned(ConfigDuration(Duration::from_secs(s)));
        TimeoutsFile {
            prelogin: secs(60),
            backend_connect: secs(5),
            proxy_header: secs(5),
            tls_handshake: secs(10),
            backend_greeting: secs(5),
            backend_login: secs(30),
            half_close: secs(60),
            keepalive: secs(120),
            shutdown_grace: secs(30),
        }
    }
}

/// A duration as written in the config (see `duration::parse`).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ConfigDuration(#[serde(deserialize_with = "duration::deserialize")] pub Duration);

fn default_listeners() -> Vec<ListenerFile> {
    vec![ListenerFile {
        name: unspanned("imap".to_string()),
        bind: unspanned("127.0.0.1:1143".to_string()),
        tls: ListenerTlsMode::None,
        proxy_protocol: ProxyProtocol::Off,
        trusted_proxies: Vec::new(),
        allow_plaintext_auth: None,
    }]
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

fn default_weight() -> u32 {
    100
}

fn default_greeting() -> String {
    "imapgate ready.".to_string()
}

fn yes() -> bool {
    true
}

/// Durations as `500ms`, `60s`, `5m`, `1h`, or a bare number of seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => parse(&t).ok_or_else(|| {
                D::Error::custom(format!(
                    "invalid duration {t:?}: expected a number with ms, s, m or h (e.g. 30s)"
                ))
            }),
        }
    }

    pub fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().ok()?;
        match unit.trim() {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
            "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
            _ => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn units() {
            assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
            assert_eq!(parse("60s"), Some(Duration::from_secs(60)));
            assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
            assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
            assert_eq!(parse("5"), None);
            assert_eq!(parse("5 days"), None);
            assert_eq!(parse("s"), None);
        }
    }
}
