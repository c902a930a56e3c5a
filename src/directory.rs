//! Routing from a directory (`routing.lookup`): ask where a user's mailbox is, instead of (or
//! before) the static map and the hash. The source answers with a backend (a configured one's
//! address, or any `host:port`), possibly a rewritten login name, or "no such user"; with
//! `send_password` an HTTP service may also refuse the login itself (nginx's model).
//!
//! ```text
//! login ─► cache: fresh? ─yes─► route
//!            │ no
//!            ▼
//!          source (one request per user at a time; others wait for it)
//!            ├─ found / not found ─► cache it ─► route / fallback
//!            ├─ refused (auth service said no) ─► NO to the client, nothing cached
//!            └─ error / timeout ─► a cached route not older than stale_max_age? ─► route (stale)
//!                                   else ─► fallback (hash, or NO [UNAVAILABLE])
//! ```
//!
//! The cache key is the normalised user name, never anything secret; an answer that carries a
//! password for the backend is not cached, and neither is a refusal.

pub(crate) mod cache;
pub(crate) mod http;
mod idle;
pub(crate) mod ldap;
pub(crate) mod sql;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::warn;

use crate::config::{Lookup, LookupSource};
use crate::imap::secret::Secret;
use crate::metrics::{CacheUse, DirectoryResult, Metrics};
use cache::{Cache, Cached};

/// What the source is asked.
pub(crate) struct Query<'a> {
    /// As the client sent it (the source may normalise in its own way).
    pub(crate) user: &'a str,
    /// Only when the source is to decide the login (`send_password`).
    pub(crate) password: Option<&'a Secret<Vec<u8>>>,
    /// `Auth-Method`, as nginx names it.
    pub(crate) method: &'static str,
    pub(crate) client: SocketAddr,
    /// Failed logins so far on this connection, plus one.
    pub(crate) attempt: u32,
    /// The client's connection is TLS.
    pub(crate) tls: bool,
}

/// Where a user goes, as the directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// `host:port`.
    pub(crate) server: String,
    /// The login name to send to the backend instead of the client's.
    pub(crate) user: Option<String>,
    /// The password to send instead of the client's (never cached).
    pub(crate) password: Option<Secret<Vec<u8>>>,
}

/// A source's answer.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Found(Route),
    NotFound,
    /// The service refused the login (only with `send_password`): its text, and how long to
    /// wait before saying so (`Auth-Wait`).
    Refused {
        message: String,
        wait: Duration,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("the directory did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the directory failed: {0}")]
    Failed(String),
}

/// What the login does with the user.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    Route {
        route: Route,
        from: Origin,
    },
    /// Not in the directory (or the directory failed and nothing is cached): the fallback.
    Fallback(Why),
    Refused {
        message: String,
        wait: Duration,
    },
}

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Directory,
    Cache,
    /// The directory failed; the last known route was used.
    Stale,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::Directory => "directory",
            Origin::Cache => "cache",
            Origin::Stale => "stale",
        }
    }
}

/// Why the fallback is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    NotFound,
    DirectoryDown,
}

/// One configured source with its cache (the cache outlives reloads: `Services` keeps it).
pub(crate) struct Directory {
    source: Source,
    kind: &'static str,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// Lookups under way, by key: later askers wait for the first one's answer.
    pending: Mutex<HashMap<String, Vec<Waiter>>>,
    coalesce: bool,
}

enum Source {
    Http(http::HttpSource),
    Ldap(ldap::LdapSource),
    Sql(sql::SqlSource),
}

/// A task waiting for another's lookup of the same user.
type Waiter = oneshot::Sender<Result<Answer, LookupError>>;

impl Directory {
    pub(crate) fn new(lookup: &Lookup, cache: Arc<Cache>, metrics: Arc<Metrics>) -> Self {
        cache.configure(&lookup.cache);
        let (source, coalesce) = match &lookup.source {
            // With the password sent, every login is its own question.
            LookupSource::Http(h) => (Source::Http(http::HttpSource::new(h)), !h.send_password),
            LookupSource::Ldap(l) => (Source::Ldap(ldap::LdapSource::new(l)), true),
            LookupSource::Sql(s) => (Source::Sql(sql::SqlSource::new(s)), true),
        };
        Directory {
            source,
            kind: lookup.source.kind(),
            cache,
            metrics,
            pending: Mutex::new(HashMap::new()),
            coalesce,
        }
    }

    /// Where `key` (the normalised user) goes.
    pub(crate) async fn decide(&self, key: &str, query: &Query<'_>) -> Decision {
        let now = Instant::now();
        let cached = if self.coalesce {
            self.cache.get(key, now)
        } else {
            None
        };
        if let Some(Cached::Fresh(entry)) = &cached {
            self.metrics.directory_cache(CacheUse::Hit);
            return match entry {
                Some(route) => Decision::Route {
                    route: route.clone(),
                    from: Origin::Cache,
                },
                None => Decision::Fallback(Why::NotFound),
            };
        }
        self.metrics.directory_cache(CacheUse::Miss);
        let started = Instant::now();
        let answer = self.ask(key, query).await;
        let result = match &answer {
            Ok(Answer::Found(_)) => DirectoryResult::Ok,
            Ok(Answer::NotFound) => DirectoryResult::NotFound,
            Ok(Answer::Refused { .. }) => DirectoryResult::Refused,
            Err(LookupError::Timeout(_)) => DirectoryResult::Timeout,
            Err(LookupError::Failed(_)) => DirectoryResult::Error,
        };
        self.metrics
            .directory_lookup(self.kind, result, started.elapsed());
        let decision = match answer {
            Ok(Answer::Found(route)) => {
                if route.password.is_none() {
                    self.cache.put(key, Some(route.clone()), Instant::now());
                }
                Decision::Route {
                    route,
                    from: Origin::Directory,
                }
            }
            Ok(Answer::NotFound) => {
                self.cache.put(key, None, Instant::now());
                Decision::Fallback(Why::NotFound)
            }
            Ok(Answer::Refused { message, wait }) => Decision::Refused { message, wait },
            Err(error) => {
                warn!(source = self.kind, %error, "directory lookup failed");
                match self.cache.get_stale(key, Instant::now()) {
                    Some(route) => {
                        self.metrics.directory_cache(CacheUse::Stale);
                        Decision::Route {
                            route,
                            from: Origin::Stale,
                        }
                    }
                    None => Decision::Fallback(Why::DirectoryDown),
                }
            }
        };
        self.metrics.directory_cache_entries(self.cache.len());
        decision
    }

    /// One question to the source; concurrent questions about the same user share it.
    async fn ask(&self, key: &str, query: &Query<'_>) -> Result<Answer, LookupError> {
        if !self.coalesce {
            return self.source_ask(key, query).await;
        }
        let waiter = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get_mut(key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    pending.insert(key.to_string(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            return rx
                .await
                .unwrap_or_else(|_| Err(LookupError::Failed("the lookup was abandoned".into())));
        }
        // This task asks; a guard hands the answer (or an error, if this task is dropped) to
        // the others.
        let mut guard = Pending {
            directory: self,
            key,
            answer: None,
        };
        let answer = self.source_ask(key, query).await;
        guard.answer = Some(answer.clone());
        answer
    }

    /// The HTTP service gets the user as the client sent it (as nginx sends it); LDAP and SQL
    /// get the routing key (normalised), since their answers are cached and shared by it.
    async fn source_ask(&self, key: &str, query: &Query<'_>) -> Result<Answer, LookupError> {
        // Every source's question is bounded here, by its own `timeout`.
        let (timeout, answer) = match &self.source {
            Source::Http(h) => (
                h.timeout(),
                tokio::time::timeout(h.timeout(), h.ask(query)).await,
            ),
            Source::Ldap(l) => (
                l.timeout(),
                tokio::time::timeout(l.timeout(), l.ask(key)).await,
            ),
            Source::Sql(s) => (
                s.timeout(),
                tokio::time::timeout(s.timeout(), s.ask(key)).await,
            ),
        };
        answer.map_err(|_| LookupError::Timeout(timeout))?
    }

    /// `/route`: what the cache holds for `key`, without asking.
    pub(crate) fn cached(&self, key: &str) -> Option<(Option<Route>, Duration)> {
        self.cache.peek(key, Instant::now())
    }
}

/// `host:port` from a directory's host and port, with brackets around an IPv6 address; an
/// error when the host is not a plain name or address (it ends up in a log line and a dial).
pub(crate) fn server_address(host: &str, port: u16) -> Result<String, LookupError> {
    if host.is_empty()
        || port == 0
        || !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:_[]".contains(&c))
    {
        return Err(LookupError::Failed(format!(
            "{:?} port {port} is not a host and port",
            host.chars().take(100).collect::<String>()
        )));
    }
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// A directory's host value that may carry a port: `host`, `host:port`, `[v6]:port`, `[v6]`
/// or a bare IPv6 address. The port, when there is one, is checked.
pub(crate) fn split_host_port(value: &str) -> Result<(&str, Option<u16>), LookupError> {
    let bad_port = || LookupError::Failed(format!("{value:?} has an invalid port"));
    let port = |p: &str| match p.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(bad_port()),
    };
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| LookupError::Failed(format!("{value:?} lacks a ']'")))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host, Some(port(p)?))),
                None => Err(bad_port()),
            },
        };
    }
    match value.matches(':').count() {
        0 => Ok((value, None)),
        1 => {
            let (host, p) = value.split_once(':').unwrap_or((value, ""));
            Ok((host, Some(port(p)?)))
        }
        // A bare IPv6 address.
        _ => Ok((value, None)),
    }
}

/// Hands the first asker's answer to the tasks waiting on the same key, also when the asker's
/// future is dropped half-way (the client went away).
struct Pending<'a> {
    directory: &'a Directory,
    key: &'a str,
    answer: Option<Result<Answer, LookupError>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let waiters = self
            .directory
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.key)
            .unwrap_or_default();
        let answer = self
            .answer
            .take()
            .unwrap_or_else(|| Err(LookupError::Failed("the lookup was abandoned".into())));
        for waiter in waiters {
            let _ = waiter.send(answer.clone());
        }
    }
}

/// For `imapgate route`: asks the configured directory about `user` now (no cache) and says
/// what it answered, in one line; `None` without a directory.
pub async fn ask_once(config: &crate::config::Config, user: &str) -> Option<String> {
    let lookup = config.routing.lookup.as_ref()?;
    let metrics = Arc::new(Metrics::new(config));
    let directory = Directory::new(lookup, Arc::new(Cache::default()), metrics);
    let query = Query {
        user,
        password: None,
        method: "plain",
        client: SocketAddr::from(([127, 0, 0, 1], 0)),
        attempt: 1,
        tls: false,
    };
    let key = config.routing.normalize(user);
    Some(match directory.source_ask(&key, &query).await {
        Ok(Answer::Found(route)) => match route.user {
            Some(u) => format!("directory\t{}\tas {u}", route.server),
            None => format!("directory\t{}", route.server),
        },
        Ok(Answer::NotFound | Answer::Refused { .. }) => format!(
            "directory\tnot found: fallback {}",
            match lookup.fallback {
                crate::config::LookupFallback::Hash => "hash (below)",
                crate::config::LookupFallback::Refuse => "refuse",
            }
        ),
        Err(error) => format!("directory\t{error}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(split_host_port("mail1").unwrap(), ("mail1", None));
        assert_eq!(
            split_host_port("mail1:1143").unwrap(),
            ("mail1", Some(1143))
        );
        assert_eq!(
            split_host_port("[fd00::1]:993").unwrap(),
            ("fd00::1", Some(993))
        );
        assert_eq!(split_host_port("[fd00::1]").unwrap(), ("fd00::1", None));
        assert_eq!(split_host_port("fd00::1").unwrap(), ("fd00::1", None));
        for bad in [
            "mail1:",
            "mail1:0",
            "mail1:x",
            "mail1:70000",
            "[fd00::1",
            "[::1]x",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
        assert_eq!(server_address("10.0.0.7", 143).unwrap(), "10.0.0.7:143");
        assert_eq!(server_address("fd00::7", 993).unwrap(), "[fd00::7]:993");
        assert_eq!(server_address("[fd00::7]", 993).unwrap(), "[fd00::7]:993");
        for bad in ["", "a b", "a/b", "a\r\n", "a;b"] {
            assert!(server_address(bad, 143).is_err(), "{bad:?}");
        }
        assert!(server_address("a", 0).is_err());
    }
}
