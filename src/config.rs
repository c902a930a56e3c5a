//! Configuration: read the file → parse the YAML (`file`) → validate → one immutable snapshot
//! (`runtime::Config`). Every error names the file, the line and column, and what was expected.

pub mod file;
pub mod runtime;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

pub use file::{
    AuthMechanism, BackendTlsMode, CompressMode, HealthMode, ListenerTlsMode, LookupFallback,
};
pub use runtime::{
    AdminConfig, AdminToken, Backend, BackendDefaults, BackendTls, Cidr, ClientTls, Config,
    ConnectionRate, DnsConfig, HealthChecks, HttpLookup, LdapLookup, Limits, ListenerConfig,
    ListenerTls, LoginPenalty, Lookup, LookupCache, LookupSource, MetricsConfig, ProxyProtocol,
    ReloadConfig, Routing, SendProxy, SqlLookup, Timeouts, TraceLimits,
};

use crate::imap::secret::Secret;
use crate::tls::{self, CertSource, ServerTls};

/// The configuration used when `imapgate run` gets no `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"# imapgate's embedded default: one plaintext listener, one local backend.
listeners:
  - { name: imap, bind: "127.0.0.1:1143" }
admin: { bind: "127.0.0.1:9143" }
backends:
  - { name: local, address: "127.0.0.1:143" }
"#;

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    /// 1-based; 0 when the problem has no single place (e.g. the file cannot be read).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.source_name, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.source_name, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source_name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: source_name.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read the file: {e}"),
    })?;
    let mut config = parse(&text, &source_name)?;
    config.path = Some(path.to_path_buf());
    Ok(config)
}

/// The embedded default, already validated by a unit test.
pub fn embedded_default() -> Result<Config, ConfigError> {
    parse(EMBEDDED_DEFAULT, "<embedded default>")
}

/// Parses and validates YAML text; `source_name` is used in error messages.
pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
    let raw: file::ConfigFile = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = first_line(&e.to_string());
        // Type errors name the type, not the key: add the key written at that place.
        let message = match key_at(text, line, column) {
            Some(key) if !message.contains(&key) => format!("{key}: {message}"),
            _ => message,
        };
        ConfigError {
            source_name: source_name.to_string(),
            line,
            column,
            message,
        }
    })?;
    let mut config = validate(raw, source_name)?;
    config.hash = content_hash(text);
    Ok(config)
}

/// The first 16 hex digits of the text's SHA-256: what `imapgate_config_info{hash}` shows, so
/// that `sha256sum imapgate.yaml` tells which replicas run which file.
pub(crate) fn content_hash(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// serde-saphyr's message can carry a rendered snippet and repeats the location; keep the
/// message itself (the location is printed by `ConfigError`).
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or("invalid configuration");
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((place, rest)) if place.contains(" column ") => rest.to_string(),
        _ => line.to_string(),
    }
}

/// The mapping key nearest before `line:column` in `text` (1-based), e.g. `weight` for the
/// value in `weight: heavy`.
fn key_at(text: &str, line: u64, column: u64) -> Option<String> {
    let row = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let upto: String = row
        .chars()
        .take(usize::try_from(column).ok()?.saturating_sub(1))
        .collect();
    let before_colon = upto.trim_end().strip_suffix(':')?;
    let key: String = before_colon
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!key.is_empty()).then(|| key.chars().rev().collect())
}

struct Validator<'a> {
    source_name: &'a str,
}

impl Validator<'_> {
    fn err(&self, at: &Location, message: String) -> ConfigError {
        ConfigError {
            source_name: self.source_name.to_string(),
            line: at.line(),
            column: at.column(),
            message,
        }
    }

    fn unplaced(&self, message: &str) -> ConfigError {
        ConfigError {
            source_name: self.source_name.to_string(),
            line: 0,
            column: 0,
            message: message.to_string(),
        }
    }
}

fn validate(raw: file::ConfigFile, source_name: &str) -> Result<Config, ConfigError> {
    let v = Validator { source_name };

    if raw.listeners.is_empty() {
        return Err(v.unplaced("listeners: at least one listener is needed"));
    }
    let server_tls = match &raw.tls {
        None => None,
        Some(t) => {
            let source =
                |names: &[String], cert: &Spanned<String>, key: &Spanned<String>| CertSource {
                    names: names.to_vec(),
                    cert: cert.value.clone().into(),
                    key: key.value.clone().into(),
                };
            let sni = t
                .sni
                .iter()
                .map(|s| source(&s.names, &s.cert, &s.key))
                .collect();
            let loaded = ServerTls::load(source(&[], &t.cert, &t.key), sni)
                .map_err(|e| v.err(&t.cert.referenced, format!("tls: {e}")))?;
            Some(std::sync::Arc::new(loaded))
        }
    };

    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listeners.len());
    let mut listener_names = HashSet::new();
    for l in &raw.listeners {
        check_name(&v, "listeners[].name", &l.name)?;
        if !listener_names.insert(l.name.value.clone()) {
            return Err(v.err(
                &l.name.referenced,
                format!("listeners[].name: {:?} is used twice", l.name.value),
            ));
        }
        let bind: SocketAddr = l.bind.value.parse().map_err(|_| {
            v.err(
                &l.bind.referenced,
                format!(
                    "listeners[].bind: {:?} is not an IP address and port (e.g. \"0.0.0.0:143\")",
                    l.bind.value
                ),
            )
        })?;
        // Two sockets of ours on one address would split its clients between two listeners
        // (SO_REUSEPORT lets them). Port 0 is a new port for each.
        if let Some(other) = listeners
            .iter()
            .find(|o| o.bind == bind && bind.port() != 0)
        {
            return Err(v.err(
                &l.bind.referenced,
                format!(
                    "listeners[].bind: {:?} is already the bind of listener {:?}",
                    l.bind.value, other.name
                ),
            ));
        }
        let mut trusted_proxies = Vec::new();
        for cidr in &l.trusted_proxies {
            trusted_proxies.push(Cidr::parse(&cidr.value).ok_or_else(|| {
                v.err(
                    &cidr.referenced,
                    format!(
                        "listeners[].trusted_proxies: {:?} is not an address or CIDR (e.g. \"10.0.0.0/8\")",
                        cidr.value
                    ),
                )
            })?);
        }
        if l.proxy_protocol == ProxyProtocol::Required && trusted_proxies.is_empty() {
            return Err(v.err(
                &l.name.referenced,
                format!(
                    "listeners[].trusted_proxies: listener {:?} requires PROXY headers but trusts no peer to send them",
                    l.name.value
                ),
            ));
        }
        let certificates = || {
            server_tls.clone().ok_or_else(|| {
                v.err(
                    &l.name.referenced,
                    format!(
                        "listeners[].tls: listener {:?} uses TLS but there is no top-level tls: {{ cert, key }}",
                        l.name.value
                    ),
                )
            })
        };
        let tls = match l.tls {
            ListenerTlsMode::None => ListenerTls::Plain,
            ListenerTlsMode::Starttls => ListenerTls::Starttls(certificates()?),
            ListenerTlsMode::Implicit => ListenerTls::Implicit(certificates()?),
        };
        listeners.push(ListenerConfig {
            name: l.name.value.clone(),
            bind,
            tls,
            proxy_protocol: l.proxy_protocol,
            trusted_proxies,
            allow_plaintext_auth: l.allow_plaintext_auth,
        });
    }

    if raw.backends.is_empty() {
        return Err(v.unplaced("backends: at least one backend is needed"));
    }
    let mut backends = Vec::with_capacity(raw.backends.len());
    let mut backend_index = HashMap::new();
    for b in &raw.backends {
        check_name(&v, "backends[].name", &b.name)?;
        if backend_index
            .insert(b.name.value.clone(), backends.len())
            .is_some()
        {
            return Err(v.err(
                &b.name.referenced,
                format!("backends[].name: {:?} is used twice", b.name.value),
            ));
        }
        check_host_port(&v, &b.address)?;
        let client_tls = || {
            let verify = match (&b.ca, b.insecure_skip_verify) {
                (_, true) => tls::Verify::Nothing,
                (Some(ca), false) => tls::Verify::CaFile(ca.value.clone().into()),
                (None, false) => tls::Verify::SystemRoots,
            };
            let at =
                b.ca.as_ref()
                    .map_or(&b.name.referenced, |ca| &ca.referenced);
            let client =
                tls::client_config(verify).map_err(|e| v.err(at, format!("backends[].ca: {e}")))?;
            let name = match &b.server_name {
                Some(n) => tls::server_name(&n.value)
                    .map_err(|e| v.err(&n.referenced, format!("backends[].server_name: {e}")))?,
                None => tls::server_name(host_of(&b.address.value)).map_err(|e| {
                    v.err(&b.address.referenced, format!("backends[].address: {e}"))
                })?,
            };
            Ok(ClientTls {
                config: client,
                name,
            })
        };
        let tls = match b.tls {
            BackendTlsMode::None => BackendTls::Plain,
            BackendTlsMode::Implicit => BackendTls::Implicit(client_tls()?),
            BackendTlsMode::Starttls => BackendTls::Starttls(client_tls()?),
        };
        backends.push(Backend {
            name: b.name.value.as_str().into(),
            address: b.address.value.clone(),
            weight: b.weight,
            tls,
            insecure_skip_verify: b.insecure_skip_verify,
            send_proxy: b.send_proxy,
            forward_id: b.forward_id,
            quickack: b.quickack,
            splice: b.splice,
        });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(v.unplaced(
            "backends[].weight: every backend has weight 0, so no user could be hashed to one",
        ));
    }

    let normalize = &raw.routing.normalize;
    let mut routing = Routing {
        lowercase: normalize.lowercase,
        default_domain: normalize.default_domain.clone(),
        static_map: HashMap::new(),
        failover: raw.routing.failover,
        lookup: match &raw.routing.lookup {
            None => None,
            Some(l) => Some(lookup(&v, l)?),
        },
    };
    for (user, backend) in &raw.routing.static_map {
        let Some(&index) = backend_index.get(&backend.value) else {
            return Err(v.err(
                &backend.referenced,
                format!(
                    "routing.static: user {user:?} maps to backend {:?}, which is not in backends",
                    backend.value
                ),
            ));
        };
        // Keys are normalised like the users they will be compared with.
        let key = routing.normalize(user);
        routing.static_map.insert(key, index);
    }

    let l = &raw.limits;
    let limits = Limits {
        max_connections: at_least(&v, "limits.max_connections", &l.max_connections, 1)? as usize,
        per_ip: at_least(&v, "limits.per_ip", &l.per_ip, 1)? as usize,
        line_max: between(&v, "limits.line_max", &l.line_max, 1024, PRELOGIN_MAX)? as usize,
        literal_max: between(&v, "limits.literal_max", &l.literal_max, 256, PRELOGIN_MAX)? as usize,
        login_attempts: at_least(&v, "limits.login_attempts", &l.login_attempts, 1)?,
        bad_commands: at_least(&v, "limits.bad_commands", &l.bad_commands, 1)?,
        login_penalty: login_penalty(&v, &l.login_penalty)?,
        per_user: Some(l.per_user.value).filter(|&n| n > 0),
        connection_rate: connection_rate(&v, &l.connection_rate)?,
        table_max: between(&v, "limits.table_max", &l.table_max, 1000, TABLE_MAX)? as usize,
    };

    let t = &raw.timeouts;
    let timeouts = Timeouts {
        prelogin: nonzero(&v, "timeouts.prelogin", &t.prelogin)?,
        backend_connect: nonzero(&v, "timeouts.backend_connect", &t.backend_connect)?,
        backend_greeting: nonzero(&v, "timeouts.backend_greeting", &t.backend_greeting)?,
        proxy_header: nonzero(&v, "timeouts.proxy_header", &t.proxy_header)?,
        tls_handshake: nonzero(&v, "timeouts.tls_handshake", &t.tls_handshake)?,
        backend_login: nonzero(&v, "timeouts.backend_login", &t.backend_login)?,
        half_close: nonzero(&v, "timeouts.half_close", &t.half_close)?,
        keepalive: at_least_duration(
            &v,
            "timeouts.keepalive",
            &t.keepalive,
            Duration::from_secs(3),
        )?,
        // 0 is allowed: cut logged-in sessions at once.
        shutdown_grace: t.shutdown_grace.value.0,
    };

    let admin = match &raw.admin {
        None => None,
        Some(a) => {
            let bind = a.bind.value.parse::<SocketAddr>().map_err(|_| {
                v.err(
                    &a.bind.referenced,
                    format!(
                        "admin.bind: {:?} is not an IP address and port (e.g. \"127.0.0.1:9143\")",
                        a.bind.value
                    ),
                )
            })?;
            if let Some(l) = listeners
                .iter()
                .find(|l| l.bind == bind && bind.port() != 0)
            {
                return Err(v.err(
                    &a.bind.referenced,
                    format!(
                        "admin.bind: {:?} is already the bind of listener {:?}",
                        a.bind.value, l.name
                    ),
                ));
            }
            let token = match &a.token_file {
                None => None,
                Some(path) => Some(read_token(&v, path)?),
            };
            if token.is_none() && !bind.ip().is_loopback() {
                return Err(v.err(
                    &a.bind.referenced,
                    format!(
                        "admin.bind: {bind} is reachable from other hosts, so admin.token_file is required (the admin API can drain backends and kick sessions)"
                    ),
                ));
            }
            let t = &a.trace;
            let trace = TraceLimits {
                max_active: at_least(&v, "admin.trace.max_active", &t.max_active, 1)? as usize,
                max_bytes: at_least(&v, "admin.trace.max_bytes", &t.max_bytes, 4096)? as usize,
                allow_bodies: t.allow_bodies,
            };
            Some(AdminConfig { bind, token, trace })
        }
    };
    let h = &raw.health;
    let health = HealthChecks {
        mode: h.mode,
        interval: nonzero(&v, "health.interval", &h.interval)?,
        timeout: nonzero(&v, "health.timeout", &h.timeout)?,
        rise: at_least(&v, "health.rise", &h.rise, 1)?,
        fall: at_least(&v, "health.fall", &h.fall, 1)?,
    };

    if raw.greeting.contains(['\r', '\n']) {
        return Err(v.unplaced("greeting: must be one line"));
    }

    Ok(Config {
        source: source_name.to_string(),
        listeners,
        backends,
        routing,
        limits,
        timeouts,
        tls: server_tls,
        admin,
        health,
        greeting: raw.greeting,
        reload: ReloadConfig {
            watch: raw.reload.watch,
            interval: nonzero(&v, "reload.interval", &raw.reload.interval)?,
        },
        metrics: MetricsConfig {
            command_by_backend: raw.metrics.command_by_backend,
            compress: raw.metrics.compress,
        },
        dns: DnsConfig {
            interval: nonzero(&v, "dns.interval", &raw.dns.interval)?,
        },
        auth_mechanisms: {
            // In the order written; a repeat is harmless and advertised once.
            let mut m = raw.auth.mechanisms.clone();
            let mut seen = HashSet::new();
            m.retain(|x| seen.insert(*x));
            m
        },
        path: None,
        hash: String::new(),
    })
}

/// `routing.lookup`.
fn lookup(v: &Validator, l: &file::LookupFile) -> Result<Lookup, ConfigError> {
    // Exactly one source; a second one is pointed at.
    let second = match (&l.http, &l.ldap, &l.sql) {
        (Some(_), Some(ldap), _) => Some((&ldap.referenced, "ldap", "http")),
        (Some(_), None, Some(sql)) => Some((&sql.referenced, "sql", "http")),
        (None, Some(_), Some(sql)) => Some((&sql.referenced, "sql", "ldap")),
        _ => None,
    };
    if let Some((at, this, other)) = second {
        return Err(v.err(
            at,
            format!(
                "routing.lookup.{this}: only one source may be set, and routing.lookup.{other} is set too"
            ),
        ));
    }
    let source = match (&l.http, &l.ldap, &l.sql) {
        (None, Some(ldap), _) => LookupSource::Ldap(ldap_lookup(v, &ldap.value)?),
        (None, None, Some(sql)) => LookupSource::Sql(sql_lookup(v, &sql.value)?),
        (Some(h), _, _) => {
            let bad = || {
                v.err(
                    &h.url.referenced,
                    format!(
                        "routing.lookup.http.url: {:?} is not http://host:port/path (https is not supported; keep the auth service on a trusted network)",
                        h.url.value
                    ),
                )
            };
            let rest = h.url.value.strip_prefix("http://").ok_or_else(bad)?;
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            // Both go into the request as written: visible ASCII only, so no space or CR/LF
            // can break its line or add a header.
            let visible = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
            if authority.is_empty()
                || authority.contains('@')
                || !visible(authority)
                || !visible(path)
            {
                return Err(bad());
            }
            let address = if authority
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                authority.to_string()
            } else {
                format!("{authority}:80")
            };
            LookupSource::Http(HttpLookup {
                address,
                host: authority.to_string(),
                path: path.to_string(),
                send_password: h.send_password,
                timeout: nonzero(v, "routing.lookup.http.timeout", &h.timeout)?,
                max_in_flight: at_least(
                    v,
                    "routing.lookup.http.max_in_flight",
                    &h.max_in_flight,
                    1,
                )? as usize,
            })
        }
        (None, None, None) => {
            return Err(v.unplaced("routing.lookup: name a source (http, ldap or sql)"));
        }
    };
    let c = &l.cache;
    let d = &l.backend_defaults;
    let client = match d.tls {
        BackendTlsMode::None => None,
        _ => {
            let verify = match (&d.ca, d.insecure_skip_verify) {
                (_, true) => tls::Verify::Nothing,
                (Some(ca), false) => tls::Verify::CaFile(ca.value.clone().into()),
                (None, false) => tls::Verify::SystemRoots,
            };
            Some(
                tls::client_config(verify)
                    .map_err(|e| v.unplaced(&format!("routing.lookup.backend_defaults.ca: {e}")))?,
            )
        }
    };
    let server_name = match &d.server_name {
        Some(n) => Some(tls::server_name(&n.value).map_err(|e| {
            v.err(
                &n.referenced,
                format!("routing.lookup.backend_defaults.server_name: {e}"),
            )
        })?),
        None => None,
    };
    Ok(Lookup {
        source,
        cache: LookupCache {
            ttl: c.ttl.value.0,
            negative_ttl: c.negative_ttl.value.0,
            stale_max_age: c.stale_max_age.value.0,
            max_entries: at_least(v, "routing.lookup.cache.max_entries", &c.max_entries, 1)?
                as usize,
        },
        fallback: l.fallback,
        backend_defaults: BackendDefaults {
            tls: d.tls,
            client,
            server_name,
            insecure_skip_verify: d.insecure_skip_verify,
            send_proxy: d.send_proxy,
            forward_id: d.forward_id,
            quickack: d.quickack,
            splice: d.splice,
        },
    })
}

/// `routing.lookup.ldap`. Nothing is connected here: a config loads without the directory.
fn ldap_lookup(v: &Validator, l: &file::LdapLookupFile) -> Result<LdapLookup, ConfigError> {
    let url = &l.url;
    let bad = |why: &str| {
        v.err(
            &url.referenced,
            format!(
                "routing.lookup.ldap.url: {:?} {why} (expected ldap://host:port or ldaps://host:port)",
                url.value
            ),
        )
    };
    let (tls, rest) = if let Some(rest) = url.value.strip_prefix("ldap://") {
        (false, rest)
    } else if let Some(rest) = url.value.strip_prefix("ldaps://") {
        (true, rest)
    } else {
        return Err(bad("is not an LDAP URL"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '@', ' ']) {
        return Err(bad("must name a host and nothing else"));
    }
    let url_port = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, "")) => None,
            Some((_, after)) => Some(after.strip_prefix(':').unwrap_or("x")),
            None => return Err(bad("lacks a ']'")),
        },
        None => match authority.matches(':').count() {
            0 => None,
            1 => authority.rsplit_once(':').map(|(_, p)| p),
            _ => return Err(bad("needs brackets around an IPv6 address")),
        },
    };
    if url_port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(bad("has an invalid port"));
    }
    if l.starttls && tls {
        return Err(v.err(
            &url.referenced,
            "routing.lookup.ldap.starttls: ldaps:// is TLS from the start; StartTLS is for ldap://"
                .to_string(),
        ));
    }
    let tls = if tls || l.starttls {
        let verify = match &l.ca {
            Some(ca) => tls::Verify::CaFile(ca.value.clone().into()),
            None => tls::Verify::SystemRoots,
        };
        let at = l.ca.as_ref().map_or(&url.referenced, |ca| &ca.referenced);
        Some(
            tls::client_config(verify)
                .map_err(|e| v.err(at, format!("routing.lookup.ldap.ca: {e}")))?,
        )
    } else {
        if let Some(ca) = &l.ca {
            return Err(v.err(
                &ca.referenced,
                "routing.lookup.ldap.ca: only used with ldaps:// or starttls: true".to_string(),
            ));
        }
        None
    };
    let bind = match (&l.bind_dn, &l.bind_password_file) {
        (None, None) => None,
        (Some(dn), Some(file)) => {
            if dn.value.trim().is_empty() {
                return Err(v.err(
                    &dn.referenced,
                    "routing.lookup.ldap.bind_dn: must not be empty".to_string(),
                ));
            }
            let password = read_secret(v, "routing.lookup.ldap.bind_password_file", file)?;
            Some((dn.value.clone(), password))
        }
        (Some(dn), None) => {
            return Err(v.err(
                &dn.referenced,
                "routing.lookup.ldap.bind_password_file: bind_dn needs a password file".to_string(),
            ));
        }
        (None, Some(file)) => {
            return Err(v.err(
                &file.referenced,
                "routing.lookup.ldap.bind_dn: a bind password needs a bind_dn".to_string(),
            ));
        }
    };
    crate::directory::ldap::check_filter(&l.filter.value).map_err(|e| {
        v.err(
            &l.filter.referenced,
            format!("routing.lookup.ldap.filter: {:?} {e}", l.filter.value),
        )
    })?;
    let attribute = |field: &str, a: &Spanned<String>| {
        let ok = !a.value.is_empty()
            && a.value.len() <= 128
            && a.value
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b';'));
        if ok {
            Ok(a.value.clone())
        } else {
            Err(v.err(
                &a.referenced,
                format!(
                    "routing.lookup.ldap.{field}: {:?} is not an attribute name",
                    a.value
                ),
            ))
        }
    };
    Ok(LdapLookup {
        url: url.value.clone(),
        starttls: l.starttls,
        tls,
        bind,
        base: l.base.value.clone(),
        filter: l.filter.value.clone(),
        host_attribute: attribute("host_attribute", &l.host_attribute)?,
        port_attribute: match &l.port_attribute {
            Some(a) => Some(attribute("port_attribute", a)?),
            None => None,
        },
        default_port: port(v, "routing.lookup.ldap.default_port", &l.default_port)?,
        timeout: nonzero(v, "routing.lookup.ldap.timeout", &l.timeout)?,
        pool_size: between(v, "routing.lookup.ldap.pool_size", &l.pool_size, 1, 1024)? as usize,
    })
}

/// `routing.lookup.sql`. Nothing is connected here: a config loads without the database.
fn sql_lookup(v: &Validator, s: &file::SqlLookupFile) -> Result<SqlLookup, ConfigError> {
    // The URL may hold a password: it is never repeated in a message.
    let mut connect: tokio_postgres::Config = s.url.value.parse().map_err(|e| {
        v.err(
            &s.url.referenced,
            format!("routing.lookup.sql.url: not a PostgreSQL connection URL: {e}"),
        )
    })?;
    if connect.get_hosts().is_empty() {
        return Err(v.err(
            &s.url.referenced,
            "routing.lookup.sql.url: names no host (e.g. postgresql://imapgate@127.0.0.1:5432/mail)"
                .to_string(),
        ));
    }
    if let Some(file) = &s.password_file {
        if connect.get_password().is_some() {
            return Err(v.err(
                &file.referenced,
                "routing.lookup.sql.password_file: the url holds a password too; keep it in one place (the file)"
                    .to_string(),
            ));
        }
        let password = read_secret(v, "routing.lookup.sql.password_file", file)?;
        connect.password(password.expose().as_bytes());
    }
    if !s.query.value.contains("$1") {
        return Err(v.err(
            &s.query.referenced,
            "routing.lookup.sql.query: must use the user as $1 (e.g. SELECT host, port FROM mailbox WHERE username = $1)"
                .to_string(),
        ));
    }
    let timeout = nonzero(v, "routing.lookup.sql.timeout", &s.timeout)?;
    connect.connect_timeout(timeout);
    if connect.get_application_name().is_none() {
        connect.application_name("imapgate");
    }
    Ok(SqlLookup {
        connect,
        query: s.query.value.clone(),
        default_port: port(v, "routing.lookup.sql.default_port", &s.default_port)?,
        timeout,
        pool_size: between(v, "routing.lookup.sql.pool_size", &s.pool_size, 1, 1024)? as usize,
    })
}

/// A password from a file: its content without a trailing newline, not empty. Never shown.
fn read_secret(
    v: &Validator,
    field: &str,
    path: &Spanned<String>,
) -> Result<Secret<String>, ConfigError> {
    let text = std::fs::read_to_string(&path.value).map_err(|e| {
        v.err(
            &path.referenced,
            format!("{field}: cannot read {:?}: {e}", path.value),
        )
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        // An LDAP simple bind with an empty password is an anonymous bind that "succeeds".
        return Err(v.err(
            &path.referenced,
            format!("{field}: {:?} is empty", path.value),
        ));
    }
    Ok(Secret::new(password.to_string()))
}

fn port(v: &Validator, field: &str, value: &Spanned<u32>) -> Result<u16, ConfigError> {
    match u16::try_from(value.value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(v.err(
            &value.referenced,
            format!("{field}: {} is not a port (1 to 65535)", value.value),
        )),
    }
}

/// The admin token: the file's content without surrounding white space, at least 16 octets.
fn read_token(v: &Validator, path: &Spanned<String>) -> Result<AdminToken, ConfigError> {
    let text = std::fs::read_to_string(&path.value).map_err(|e| {
        v.err(
            &path.referenced,
            format!("admin.token_file: cannot read {:?}: {e}", path.value),
        )
    })?;
    let token = text.trim();
    if token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(v.err(
            &path.referenced,
            format!(
                "admin.token_file: {:?} must hold one token of at least 16 printable characters",
                path.value
            ),
        ));
    }
    Ok(AdminToken::new(token))
}

/// Names become log fields and (later) metric labels: keep them short and plain.
fn check_name(v: &Validator, field: &str, name: &Spanned<String>) -> Result<(), ConfigError> {
    let ok = !name.value.is_empty()
        && name.value.len() <= 64
        && name
            .value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(v.err(
            &name.referenced,
            format!(
                "{field}: {:?} must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
                name.value
            ),
        ))
    }
}

/// `host` of `host:port`, without the brackets of an IPv6 address.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn check_host_port(v: &Validator, address: &Spanned<String>) -> Result<(), ConfigError> {
    let bad = || {
        v.err(
            &address.referenced,
            format!(
                "backends[].address: {:?} is not host:port (e.g. \"10.0.0.11:143\" or \"mail1.internal:143\")",
                address.value
            ),
        )
    };
    if address.value.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = address.value.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'));
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn at_least_duration(
    v: &Validator,
    field: &str,
    value: &Spanned<file::ConfigDuration>,
    min: Duration,
) -> Result<Duration, ConfigError> {
    if value.value.0 >= min {
        Ok(value.value.0)
    } else {
        Err(v.err(
            &value.referenced,
            format!(
                "{field}: {:?} is too short, the least is {min:?}",
                value.value.0
            ),
        ))
    }
}

fn at_least(
    v: &Validator,
    field: &str,
    value: &Spanned<u32>,
    min: u32,
) -> Result<u32, ConfigError> {
    if value.value >= min {
        Ok(value.value)
    } else {
        Err(v.err(
            &value.referenced,
            format!("{field}: {} is too small, the least is {min}", value.value),
        ))
    }
}

/// The most entries an abuse table may hold (some 60 octets each).
const TABLE_MAX: u32 = 10_000_000;

/// `limits.login_penalty`; `base: 0s` is off.
fn login_penalty(
    v: &Validator,
    p: &file::LoginPenaltyFile,
) -> Result<Option<LoginPenalty>, ConfigError> {
    let (base, max) = (p.base.value.0, p.max.value.0);
    if base.is_zero() {
        return Ok(None);
    }
    if max < base {
        return Err(v.err(
            &p.max.referenced,
            format!("limits.login_penalty.max: {max:?} is shorter than base ({base:?})"),
        ));
    }
    Ok(Some(LoginPenalty {
        base,
        max,
        forget_after: nonzero(v, "limits.login_penalty.forget_after", &p.forget_after)?,
    }))
}

/// `limits.connection_rate`; `per_second: 0` is off.
fn connection_rate(
    v: &Validator,
    r: &file::ConnectionRateFile,
) -> Result<Option<ConnectionRate>, ConfigError> {
    let per_second = r.per_second.value;
    if per_second == 0.0 {
        return Ok(None);
    }
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(v.err(
            &r.per_second.referenced,
            format!(
                "limits.connection_rate.per_second: {per_second} is not a rate (0 turns it off)"
            ),
        ));
    }
    Ok(Some(ConnectionRate {
        per_second,
        burst: at_least(v, "limits.connection_rate.burst", &r.burst, 1)?,
    }))
}

/// The most any pre-login command may buffer, line or literals: what is held before anyone
/// logged in must stay small.
const PRELOGIN_MAX: u32 = 16 * 1024 * 1024;

fn between(
    v: &Validator,
    field: &str,
    value: &Spanned<u32>,
    min: u32,
    max: u32,
) -> Result<u32, ConfigError> {
    let n = at_least(v, field, value, min)?;
    if n <= max {
        Ok(n)
    } else {
        Err(v.err(
            &value.referenced,
            format!("{field}: {n} is too large, the most is {max}"),
        ))
    }
}

fn nonzero(
    v: &Validator,
    field: &str,
    value: &Spanned<file::ConfigDuration>,
) -> Result<std::time::Duration, ConfigError> {
    if value.value.0.is_zero() {
        Err(v.err(&value.referenced, format!("{field}: must be longer than 0")))
    } else {
        Ok(value.value.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = embedded_default().expect("embedded default must validate");
        assert_eq!(c.listeners[0].bind, "127.0.0.1:1143".parse().unwrap());
        assert_eq!(c.backends[0].address, "127.0.0.1:143");
    }

    /// Splicing is a backend's choice, off unless set, for configured backends and for those
    /// the directory names alike.
    #[test]
    fn splice_is_off_unless_a_backend_asks() {
        let c = parse(
            "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\n  - { name: b, address: \"127.0.0.1:2\", splice: true }\n\
             routing: { lookup: { http: { url: \"http://127.0.0.1:9/auth\" }, backend_defaults: { splice: true } } }\n",
            "t.yaml",
        )
        .unwrap();
        assert!(!c.backends[0].splice);
        assert!(c.backends[1].splice);
        let lookup = c.routing.lookup.as_ref().expect("a lookup");
        assert!(lookup.backend_defaults.splice);
        let named = lookup
            .backend_defaults
            .backend("x".into(), "127.0.0.1:3")
            .unwrap();
        assert!(named.splice);
        let plain = parse(
            "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\n\
             routing: { lookup: { http: { url: \"http://127.0.0.1:9/auth\" } } }\n",
            "t.yaml",
        )
        .unwrap();
        assert!(
            !plain
                .routing
                .lookup
                .as_ref()
                .unwrap()
                .backend_defaults
                .splice
        );
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e = parse(
            "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\nlimits:\n  line_maxx: 5\n",
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("line_maxx"), "{e}");
    }

    #[test]
    fn auth_mechanisms_are_a_closed_set() {
        let backends = "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\n";
        let c = parse(backends, "t.yaml").unwrap();
        assert_eq!(c.auth_mechanisms, AuthMechanism::DEFAULT);
        let c = parse(
            &format!("{backends}auth:\n  mechanisms: [SCRAM-SHA-256, XOAUTH2, SCRAM-SHA-256]\n"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            c.auth_mechanisms,
            [AuthMechanism::ScramSha256, AuthMechanism::XOAuth2]
        );
        for unknown in ["CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256-PLUS", "plain"] {
            let e = parse(
                &format!("{backends}auth:\n  mechanisms: [PLAIN, {unknown}]\n"),
                "t.yaml",
            )
            .unwrap_err();
            assert_eq!(e.line, 4, "{e}");
            assert!(e.column > 0, "{e}");
        }
    }

    #[test]
    fn static_to_unknown_backend_is_placed() {
        let e = parse(
            "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\nrouting:\n  static:\n    bob: b\n",
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("routing.static"), "{e}");
    }

    const TWO_BACKENDS: &str = "backends:\n  - { name: a, address: \"127.0.0.1:1\" }\n";

    fn lookup_error(lookup: &str) -> ConfigError {
        parse(
            &format!("{TWO_BACKENDS}routing:\n  lookup:\n{lookup}"),
            "t.yaml",
        )
        .unwrap_err()
    }

    #[test]
    fn one_lookup_source_only() {
        let e = lookup_error(
            "    http: { url: \"http://127.0.0.1:9000/auth\" }\n    sql: { url: \"postgresql://u@127.0.0.1/db\", query: \"SELECT host FROM m WHERE u = $1\" }\n",
        );
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("routing.lookup.sql"), "{e}");
        assert!(e.message.contains("routing.lookup.http is set too"), "{e}");
        let e = lookup_error("    cache: { ttl: 1s }\n");
        assert!(e.message.contains("http, ldap or sql"), "{e}");
    }

    #[test]
    fn an_http_lookup_url_cannot_break_the_request() {
        for url in [
            "http://127.0.0.1:9000/auth\\r\\nX-Injected: 1",
            "http://127.0.0.1:9000/a b",
            "http://127.0.0.1:9000 /auth",
            "https://127.0.0.1/auth",
            "http://u@127.0.0.1/auth",
        ] {
            let e = lookup_error(&format!("    http: {{ url: \"{url}\" }}\n"));
            assert!(
                e.message.contains("is not http://host:port/path"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn ldap_and_sql_load_without_a_server() {
        let c = parse(
            &format!(
                "{TWO_BACKENDS}routing:\n  lookup:\n    ldap: {{ url: \"ldap://127.0.0.1:1\", base: \"dc=example,dc=net\", filter: \"(uid=%u)\", host_attribute: mailHost }}\n"
            ),
            "t.yaml",
        )
        .unwrap();
        let lookup = c.routing.lookup.unwrap();
        assert_eq!(lookup.source.kind(), "ldap");
        assert!(!lookup.send_password());
        let c = parse(
            &format!(
                "{TWO_BACKENDS}routing:\n  lookup:\n    sql: {{ url: \"postgresql://u:pw@127.0.0.1:1/db\", query: \"SELECT host, port FROM m WHERE u = $1\" }}\n"
            ),
            "t.yaml",
        )
        .unwrap();
        let lookup = c.routing.lookup.unwrap();
        assert_eq!(lookup.source.kind(), "sql");
        assert!(
            !format!("{lookup:?}").contains("pw"),
            "the password is not in Debug output"
        );
    }

    #[test]
    fn ldap_mistakes_are_placed() {
        let ldap = |fields: &str| {
            lookup_error(&format!(
                "    ldap:\n      base: \"dc=x\"\n      host_attribute: mailHost\n{fields}"
            ))
        };
        let cases = [
            (
                "      url: \"http://x\"\n      filter: \"(uid=%u)\"\n",
                8,
                "ldap.url",
            ),
            (
                "      url: \"ldap://x:0\"\n      filter: \"(uid=%u)\"\n",
                8,
                "invalid port",
            ),
            (
                "      url: \"ldap://x\"\n      filter: \"(uid=alice)\"\n",
                9,
                "ldap.filter",
            ),
            (
                "      url: \"ldap://x\"\n      filter: \"(uid=%u\"\n",
                9,
                "ldap.filter",
            ),
            (
                "      url: \"ldap://x\"\n      filter: \"(uid=%u)\"\n      bind_dn: \"cn=a\"\n",
                10,
                "bind_password_file",
            ),
            (
                "      url: \"ldap://x\"\n      filter: \"(uid=%u)\"\n      bind_dn: \"cn=a\"\n      bind_password_file: /nonexistent/pw\n",
                11,
                "cannot read",
            ),
            (
                "      url: \"ldaps://x\"\n      filter: \"(uid=%u)\"\n      starttls: true\n",
                8,
                "starttls",
            ),
            (
                "      url: \"ldap://x\"\n      filter: \"(uid=%u)\"\n      default_port: 70000\n",
                10,
                "default_port",
            ),
        ];
        for (fields, line, text) in cases {
            let e = ldap(fields);
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn secrets_come_from_files_and_stay_there() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = parse(
            &format!(
                "{TWO_BACKENDS}routing:\n  lookup:\n    ldap: {{ url: \"ldap://127.0.0.1:1\", bind_dn: \"cn=imapgate\", bind_password_file: {file:?}, base: \"dc=x\", filter: \"(uid=%u)\", host_attribute: mailHost }}\n"
            ),
            "t.yaml",
        )
        .unwrap();
        let lookup = c.routing.lookup.unwrap();
        let LookupSource::Ldap(ldap) = &lookup.source else {
            panic!("{lookup:?}")
        };
        let (dn, password) = ldap.bind.as_ref().unwrap();
        assert_eq!(
            (dn.as_str(), password.expose().as_str()),
            ("cn=imapgate", "s3cret")
        );
        assert!(!format!("{lookup:?}").contains("s3cret"));

        std::fs::write(&file, "\n").unwrap();
        let e = lookup_error(&format!(
            "    sql: {{ url: \"postgresql://u@127.0.0.1/db\", password_file: {file:?}, query: \"SELECT h FROM m WHERE u = $1\" }}\n"
        ));
        assert!(e.message.contains("is empty"), "{e}");
        std::fs::write(&file, "pw").unwrap();
        let e = lookup_error(&format!(
            "    sql: {{ url: \"postgresql://u:other@127.0.0.1/db\", password_file: {file:?}, query: \"SELECT h FROM m WHERE u = $1\" }}\n"
        ));
        assert!(e.message.contains("one place"), "{e}");
        assert!(!e.to_string().contains("other"), "{e}");
        let e = lookup_error(
            "    sql: { url: \"postgresql://u@127.0.0.1/db\", query: \"SELECT h FROM m WHERE u = 'x'\" }\n",
        );
        assert!(e.message.contains("$1"), "{e}");
        let e = lookup_error(
            "    sql: { url: \"postgresql://u:pw@127.0.0.1:notaport/db\", query: \"SELECT h FROM m WHERE u = $1\" }\n",
        );
        assert!(e.message.contains("routing.lookup.sql.url"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn one_address_one_socket_but_port_0_is_new_each_time() {
        let backends = "backends:\n  - { name: a, address: \"h:1\" }\n";
        let e = parse(
            &format!("listeners:\n  - {{ name: a, bind: \"127.0.0.1:1143\" }}\nadmin: {{ bind: \"127.0.0.1:1143\" }}\n{backends}"),
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.yaml:3:16: admin.bind: \"127.0.0.1:1143\" is already the bind of listener \"a\""
        );
        let c = parse(
            &format!(
                "listeners:\n  - {{ name: a, bind: \"127.0.0.1:0\" }}\n  - {{ name: b, bind: \"127.0.0.1:0\" }}\nadmin: {{ bind: \"127.0.0.1:0\" }}\n{backends}"
            ),
            "t.yaml",
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn abuse_limits_defaults_and_off() {
        let c = embedded_default().unwrap();
        assert_eq!(
            c.limits.login_penalty,
            Some(LoginPenalty {
                base: std::time::Duration::from_secs(2),
                max: std::time::Duration::from_secs(15),
                forget_after: std::time::Duration::from_secs(600),
            })
        );
        assert_eq!(c.limits.per_user, None);
        assert_eq!(c.limits.connection_rate, None);
        assert_eq!(c.limits.table_max, 100_000);
        let c = parse(
            "backends:\n  - { name: a, address: \"h:1\" }\nlimits:\n  login_penalty: { base: 0s }\n  per_user: 5\n  connection_rate: { per_second: 0.5 }\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.limits.login_penalty, None);
        assert_eq!(c.limits.per_user, Some(5));
        assert_eq!(
            c.limits.connection_rate,
            Some(ConnectionRate {
                per_second: 0.5,
                burst: 20
            })
        );
    }

    #[test]
    fn abuse_limits_are_checked_where_written() {
        let limits = |yaml: &str| {
            parse(
                &format!("backends:\n  - {{ name: a, address: \"h:1\" }}\nlimits:\n{yaml}"),
                "t.yaml",
            )
            .unwrap_err()
        };
        let e = limits("  login_penalty: { base: 5s, max: 2s }\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("limits.login_penalty.max"), "{e}");
        let e = limits("  connection_rate: { per_second: 1, burst: 0 }\n");
        assert!(e.message.contains("limits.connection_rate.burst"), "{e}");
        let e = limits("  connection_rate: { per_second: -1 }\n");
        assert!(
            e.message.contains("limits.connection_rate.per_second"),
            "{e}"
        );
        let e = limits("  table_max: 10\n");
        assert!(e.message.contains("limits.table_max"), "{e}");
        let e = limits("  login_penalty: { forget_after: 0s }\n");
        assert!(e.message.contains("forget_after"), "{e}");
    }

    #[test]
    fn static_keys_are_normalised() {
        let c = parse(
            "backends:\n  - { name: a, address: \"h:1\" }\nrouting:\n  normalize: { default_domain: example.net }\n  static:\n    Bob: a\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.routing.static_map.get("bob@example.net"), Some(&0));
    }
}
