//! The directory's answers, by normalised user: found routes for `ttl`, "no such user" for
//! `negative_ttl`, and found routes kept on (up to `stale_max_age`) for when the directory
//! fails. At most `max_entries`, least recently used out first.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::Route;
use crate::config::LookupCache;

/// A fresh entry: the route, or `None` for "no such user".
pub(crate) enum Cached {
    Fresh(Option<Route>),
}

struct Entry {
    route: Option<Route>,
    stored: Instant,
}

pub(crate) struct Cache {
    inner: Mutex<Inner>,
}

struct Inner {
    entries: LruCache<String, Entry>,
    limits: LookupCache,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            inner: Mutex::new(Inner {
                entries: LruCache::new(NonZeroUsize::MIN),
                limits: LookupCache {
                    ttl: Duration::ZERO,
                    negative_ttl: Duration::ZERO,
                    stale_max_age: Duration::ZERO,
                    max_entries: 1,
                },
            }),
        }
    }
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New limits (at start and on reload); entries over the new size go, oldest first.
    pub(crate) fn configure(&self, limits: &LookupCache) {
        let mut inner = self.lock();
        let size = NonZeroUsize::new(limits.max_entries).unwrap_or(NonZeroUsize::MIN);
        inner.entries.resize(size);
        inner.limits = limits.clone();
    }

    /// A fresh entry for `key`, if there is one.
    pub(crate) fn get(&self, key: &str, now: Instant) -> Option<Cached> {
        let mut inner = self.lock();
        let limits = inner.limits.clone();
        let entry = inner.entries.get(key)?;
        let ttl = if entry.route.is_some() {
            limits.ttl
        } else {
            limits.negative_ttl
        };
        (now.duration_since(entry.stored) < ttl).then(|| Cached::Fresh(entry.route.clone()))
    }

    /// A found route not older than `stale_max_age`, for when the directory fails.
    pub(crate) fn get_stale(&self, key: &str, now: Instant) -> Option<Route> {
        let mut inner = self.lock();
        let max_age = inner.limits.stale_max_age;
        let entry = inner.entries.get(key)?;
        if now.duration_since(entry.stored) <= max_age {
            entry.route.clone()
        } else {
            None
        }
    }

    /// What is held for `key` and how old it is, without touching its recency.
    pub(crate) fn peek(&self, key: &str, now: Instant) -> Option<(Option<Route>, Duration)> {
        let inner = self.lock();
        inner
            .entries
            .peek(key)
            .map(|e| (e.route.clone(), now.duration_since(e.stored)))
    }

    pub(crate) fn put(&self, key: &str, route: Option<Route>, now: Instant) {
        let mut inner = self.lock();
        let keep = if route.is_some() {
            inner.limits.ttl.max(inner.limits.stale_max_age)
        } else {
            inner.limits.negative_ttl
        };
        if keep.is_zero() {
            return;
        }
        inner
            .entries
            .put(key.to_string(), Entry { route, stored: now });
    }

    /// Forgets `key`, or everything; how many entries went.
    pub(crate) fn flush(&self, key: Option<&str>) -> usize {
        let mut inner = self.lock();
        match key {
            Some(key) => usize::from(inner.entries.pop(key).is_some()),
            None => {
                let n = inner.entries.len();
                inner.entries.clear();
                n
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_entries: usize) -> LookupCache {
        LookupCache {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            stale_max_age: Duration::from_secs(600),
            max_entries,
        }
    }

    fn route(server: &str) -> Route {
        Route {
            server: server.into(),
            user: None,
            password: None,
        }
    }

    #[test]
    fn fresh_then_stale_then_gone() {
        let cache = Cache::default();
        cache.configure(&limits(10));
        let t0 = Instant::now();
        cache.put("alice", Some(route("10.0.0.1:143")), t0);
        cache.put("nobody", None, t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert!(matches!(
            cache.get("alice", at(59)),
            Some(Cached::Fresh(Some(_)))
        ));
        assert!(matches!(
            cache.get("nobody", at(9)),
            Some(Cached::Fresh(None))
        ));
        assert!(cache.get("nobody", at(11)).is_none(), "negative TTL");
        assert!(cache.get("alice", at(61)).is_none(), "TTL");
        assert_eq!(
            cache.get_stale("alice", at(300)),
            Some(route("10.0.0.1:143")),
            "kept for when the directory fails"
        );
        assert_eq!(cache.get_stale("alice", at(601)), None);
        assert_eq!(cache.get_stale("nobody", t0), None);
    }

    #[test]
    fn bounded_least_recently_used_out() {
        let cache = Cache::default();
        cache.configure(&limits(3));
        let t0 = Instant::now();
        for user in ["a", "b", "c"] {
            cache.put(user, Some(route(user)), t0);
        }
        assert!(cache.get("a", t0).is_some(), "a used: b is now the oldest");
        cache.put("d", Some(route("d")), t0);
        assert_eq!(cache.len(), 3);
        assert!(cache.peek("b", t0).is_none());
        assert!(cache.peek("a", t0).is_some());
        cache.configure(&limits(1));
        assert_eq!(cache.len(), 1, "a smaller cap on reload");
        assert_eq!(cache.flush(None), 1);
    }
}
