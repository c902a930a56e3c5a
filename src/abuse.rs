//! The abuse tables every connection shares, on every worker: recent failed logins and
//! new-connection rates per client address, logged-in sessions per user. The limits on one
//! connection (`login_attempts`, `line_max`, ...) end with it; these outlive it, so reconnecting
//! does not start over.
//!
//! The client address is the session's: a trusted PROXY header's behind a balancer. IPv4
//! addresses count one by one, IPv6 addresses by /64: a subscriber usually gets a whole /64,
//! and could otherwise walk through 2^64 keys, each with a fresh start.
//!
//! The two address tables hold at most `limits.table_max` entries each. When one is full,
//! entries that no longer matter go first (failures older than `forget_after`, buckets full
//! again: both are what a missing entry means anyway), then the least recently used, down to
//! 7/8 of the cap, so the O(n) pass runs at most once per `table_max / 8` new addresses. The
//! per-user table has no cap of its own: an entry lives only while one of the user's sessions
//! does (so `max_connections` bounds it), and dropping one would let the user past the limit.
//!
//! Each table is one std `Mutex<HashMap>`, held for a few map operations on the accept and login
//! paths only, never on the relay. The settings come from the caller's config snapshot at each
//! call, so a new snapshot applies from the next connection or login on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::{ConnectionRate, Limits, LoginPenalty};
use crate::metrics::{AbuseTable, Metrics, TableMetrics};

/// The shared abuse tables (one per process, in `Services`).
pub(crate) struct Abuse {
    failures: Mutex<Table<Failures>>,
    rates: Mutex<Table<Bucket>>,
    users: Mutex<HashMap<Arc<str>, u32>>,
    user_entries: Gauge,
}

/// What `Abuse::connection` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateCheck {
    Within,
    /// Over `limits.connection_rate`; `first` for the first refusal since the address was last
    /// let in, so that an episode is logged once, not once per connection.
    Over {
        first: bool,
    },
}

impl Abuse {
    pub(crate) fn new(metrics: &Metrics) -> Arc<Abuse> {
        Arc::new(Abuse {
            failures: Mutex::new(Table::new(metrics.abuse_table(AbuseTable::LoginPenalty))),
            rates: Mutex::new(Table::new(metrics.abuse_table(AbuseTable::ConnectionRate))),
            users: Mutex::new(HashMap::new()),
            user_entries: metrics.abuse_table(AbuseTable::PerUser).entries,
        })
    }

    /// A login from `client` failed (the backend said NO): counts it, and returns how long to
    /// hold the answer (`limits.login_penalty`; zero when that is off).
    ///
    /// A successful login resets nothing: an attacker with one account of their own could
    /// otherwise log in between guesses and start over. Only quiet time forgets failures.
    pub(crate) fn login_failed(&self, client: IpAddr, limits: &Limits) -> Duration {
        match &limits.login_penalty {
            Some(settings) => self.login_failed_at(
                ClientKey::of(client),
                settings,
                limits.table_max,
                Instant::now(),
            ),
            None => Duration::ZERO,
        }
    }

    fn login_failed_at(
        &self,
        key: ClientKey,
        settings: &LoginPenalty,
        max: usize,
        now: Instant,
    ) -> Duration {
        let forgotten =
            |f: &Failures| now.saturating_duration_since(f.last) > settings.forget_after;
        let mut table = lock(&self.failures);
        let entry = table.entry(key, max, forgotten, || Failures {
            count: 0,
            last: now,
        });
        if forgotten(entry) {
            entry.count = 0;
        }
        let delay = penalty(entry.count, settings.base, settings.max);
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        table.publish();
        delay
    }

    /// Whether a new connection from `client` is within `limits.connection_rate` (always,
    /// when that is off); takes one token from the address's bucket if so.
    pub(crate) fn connection(&self, client: IpAddr, limits: &Limits) -> RateCheck {
        match &limits.connection_rate {
            Some(rate) => self.connection_at(
                ClientKey::of(client),
                rate,
                limits.table_max,
                Instant::now(),
            ),
            None => RateCheck::Within,
        }
    }

    fn connection_at(
        &self,
        key: ClientKey,
        rate: &ConnectionRate,
        max: usize,
        now: Instant,
    ) -> RateCheck {
        let mut table = lock(&self.rates);
        let bucket = table.entry(
            key,
            max,
            |b: &Bucket| b.is_full(now, rate),
            || Bucket::full(now, rate),
        );
        let check = if bucket.take(now, rate) {
            bucket.refusing = false;
            RateCheck::Within
        } else {
            let first = !bucket.refusing;
            bucket.refusing = true;
            RateCheck::Over { first }
        };
        table.publish();
        check
    }

    /// A place for one more logged-in session of `user` (the normalised routing key), or
    /// `None` when the user has `max` already.
    pub(crate) fn user_session(self: &Arc<Self>, user: &str, max: u32) -> Option<UserSession> {
        let mut users = lock(&self.users);
        let key = match users.get_key_value(user) {
            Some((_, &count)) if count >= max => return None,
            Some((key, _)) => key.clone(),
            None => Arc::from(user),
        };
        *users.entry(key.clone()).or_insert(0) += 1;
        self.user_entries.set(users.len() as i64);
        Some(UserSession {
            abuse: self.clone(),
            user: key,
        })
    }
}

/// One logged-in session's place under `limits.per_user`, owned by the session; given back
/// when dropped.
pub(crate) struct UserSession {
    abuse: Arc<Abuse>,
    user: Arc<str>,
}

impl Drop for UserSession {
    fn drop(&mut self) {
        let mut users = lock(&self.abuse.users);
        if let Some(count) = users.get_mut(&*self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                users.remove(&*self.user);
            }
        }
        self.abuse.user_entries.set(users.len() as i64);
    }
}

impl std::fmt::Debug for UserSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserSession")
    }
}

/// How long to hold the answer to a failed login when the address failed `prior` times
/// before (this failure not counted): 0, `base`, 2 × `base`, 4 × `base`, ..., at most `max`.
/// The first failure costs nothing: people mistype.
pub(crate) fn penalty(prior: u32, base: Duration, max: Duration) -> Duration {
    let Some(doublings) = prior.checked_sub(1) else {
        return Duration::ZERO;
    };
    let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// The client network abuse is counted for: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey(u128);

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            // As its v4-mapped form, whose low 64 bits are never 0: no /64 key collides.
            IpAddr::V4(v4) => ClientKey(u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => ClientKey(u128::from(v6) & !u128::from(u64::MAX)),
        }
    }
}

/// An address's recent failed logins.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// An address's new-connection token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// The last connection was refused.
    refusing: bool,
}

impl Bucket {
    fn full(now: Instant, rate: &ConnectionRate) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
            refusing: false,
        }
    }

    fn refilled(&self, now: Instant, rate: &ConnectionRate) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst))
    }

    fn is_full(&self, now: Instant, rate: &ConnectionRate) -> bool {
        self.refilled(now, rate) >= f64::from(rate.burst)
    }

    /// Refills for the time passed, then takes a token if there is a whole one.
    fn take(&mut self, now: Instant, rate: &ConnectionRate) -> bool {
        self.tokens = self.refilled(now, rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When an entry was last used, for evicting the least recently used.
trait LastUsed {
    fn last_used(&self) -> Instant;
}

impl LastUsed for Failures {
    fn last_used(&self) -> Instant {
        self.last
    }
}

impl LastUsed for Bucket {
    fn last_used(&self) -> Instant {
        self.at
    }
}

/// A map from client keys with at most `max` entries (see the module doc), and its metrics.
struct Table<V> {
    map: HashMap<ClientKey, V>,
    metrics: TableMetrics,
}

impl<V: LastUsed> Table<V> {
    fn new(metrics: TableMetrics) -> Self {
        Table {
            map: HashMap::new(),
            metrics,
        }
    }

    /// The entry for `key`, made by `new` when there is none, after making room for it.
    fn entry(
        &mut self,
        key: ClientKey,
        max: usize,
        stale: impl Fn(&V) -> bool,
        new: impl FnOnce() -> V,
    ) -> &mut V {
        if self.map.len() >= max && !self.map.contains_key(&key) {
            self.make_room(max, stale);
        }
        self.map.entry(key).or_insert_with(new)
    }

    /// Drops stale entries, then the least recently used down to 7/8 of `max` (so the next
    /// pass is `max / 8` new keys away, and there is room for at least one).
    fn make_room(&mut self, max: usize, stale: impl Fn(&V) -> bool) {
        self.map.retain(|_, v| !stale(v));
        let target = max.saturating_sub((max / 8).max(1));
        if self.map.len() <= target {
            return;
        }
        let excess = self.map.len() - target;
        let mut ages: Vec<Instant> = self.map.values().map(V::last_used).collect();
        let (_, &mut cutoff, _) = ages.select_nth_unstable(excess - 1);
        let before = self.map.len();
        // Everything as old as the cutoff goes: at least `excess` entries.
        self.map.retain(|_, v| v.last_used() > cutoff);
        self.metrics
            .evicted
            .inc_by((before - self.map.len()) as u64);
    }

    fn publish(&self) {
        self.metrics.entries.set(self.map.len() as i64);
    }
}

/// The tables stay usable after a panic elsewhere: their state is always consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn abuse() -> Arc<Abuse> {
        let config = crate::config::embedded_default().unwrap();
        Abuse::new(&Metrics::new(&config))
    }

    fn key(n: u32) -> ClientKey {
        ClientKey::of(IpAddr::from(std::net::Ipv4Addr::from(n)))
    }

    #[test]
    fn penalty_schedule() {
        let delays: Vec<u64> = (0..8)
            .map(|prior| penalty(prior, S(2), S(15)).as_secs())
            .collect();
        assert_eq!(delays, [0, 2, 4, 8, 15, 15, 15, 15]);
        let ms = Duration::from_millis;
        assert_eq!(penalty(2, ms(300), ms(1000)), ms(600));
        assert_eq!(penalty(u32::MAX, S(2), S(15)), S(15), "no overflow");
        assert_eq!(penalty(40, S(2), S(15)), S(15), "no overflow");
        assert_eq!(penalty(5, Duration::ZERO, S(15)), Duration::ZERO);
    }

    #[test]
    fn failures_grow_per_address_and_are_forgotten_when_quiet() {
        let abuse = abuse();
        let settings = LoginPenalty {
            base: S(2),
            max: S(15),
            forget_after: S(600),
        };
        let t0 = Instant::now();
        let fail = |k, at| abuse.login_failed_at(k, &settings, 1000, at);
        let delays: Vec<u64> = (0..5).map(|i| fail(key(1), t0 + S(i)).as_secs()).collect();
        assert_eq!(delays, [0, 2, 4, 8, 15]);
        assert_eq!(fail(key(2), t0 + S(5)), Duration::ZERO, "another address");
        // 600 s after the last failure it still counts; after that it is forgotten.
        assert_eq!(fail(key(1), t0 + S(4 + 600)), S(15));
        assert_eq!(fail(key(1), t0 + S(4 + 600 + 601)), Duration::ZERO);
        assert_eq!(fail(key(1), t0 + S(4 + 600 + 602)), S(2));
    }

    #[test]
    fn ipv6_counts_by_64() {
        let ip = |s: &str| ClientKey::of(s.parse().unwrap());
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"), "v4-mapped is v4");
        assert_ne!(ip("192.0.2.1"), ip("192.0.2.2"));
        assert_ne!(ip("::"), ip("0.0.0.0"));
    }

    #[test]
    fn token_bucket() {
        let abuse = abuse();
        let rate = ConnectionRate {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let connect = |at| abuse.connection_at(key(1), &rate, 1000, at);
        for _ in 0..3 {
            assert_eq!(connect(t0), RateCheck::Within);
        }
        assert_eq!(connect(t0), RateCheck::Over { first: true });
        assert_eq!(connect(t0), RateCheck::Over { first: false });
        assert_eq!(
            abuse.connection_at(key(2), &rate, 1000, t0),
            RateCheck::Within,
            "another address has its own bucket"
        );
        // Half a second brings one token back (2 per second).
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(connect(t1), RateCheck::Within);
        assert_eq!(connect(t1), RateCheck::Over { first: true });
        // Never more than the burst, however long the quiet.
        let t2 = t1 + S(3600);
        for _ in 0..3 {
            assert_eq!(connect(t2), RateCheck::Within);
        }
        assert_eq!(connect(t2), RateCheck::Over { first: true });
    }

    #[test]
    fn tables_stay_under_the_cap_and_evict_the_oldest() {
        let abuse = abuse();
        let settings = LoginPenalty {
            base: S(2),
            max: S(15),
            forget_after: S(600),
        };
        let t0 = Instant::now();
        let cap = 1000;
        // Address 0 fails again and again: it stays among the most recently used.
        for n in 1..=5 * cap as u32 {
            let at = t0 + Duration::from_millis(u64::from(n));
            abuse.login_failed_at(key(n), &settings, cap, at);
            abuse.login_failed_at(key(0), &settings, cap, at);
            let len = lock(&abuse.failures).map.len();
            assert!(len <= cap, "{len} entries after {n} addresses");
        }
        let table = lock(&abuse.failures);
        assert!(table.map.contains_key(&key(0)), "the busiest address stays");
        assert!(
            table.map.contains_key(&key(5 * cap as u32)),
            "the newest stays"
        );
        assert!(!table.map.contains_key(&key(1)), "the oldest went");
        assert_eq!(table.metrics.entries.get(), table.map.len() as i64);
        assert!(table.metrics.evicted.get() >= 4 * cap as u64 - 1);
        drop(table);

        // Stale entries go before anyone is evicted: a bucket that is full again is dropped.
        let rate = ConnectionRate {
            per_second: 1.0,
            burst: 1,
        };
        for n in 0..cap as u32 {
            abuse.connection_at(key(n), &rate, cap, t0);
        }
        abuse.connection_at(key(cap as u32), &rate, cap, t0 + S(2));
        let table = lock(&abuse.rates);
        assert_eq!(table.map.len(), 1, "only the new bucket is not full");
        assert_eq!(table.metrics.evicted.get(), 0);
    }

    #[test]
    fn user_sessions_up_to_the_limit_given_back_on_drop() {
        let abuse = abuse();
        let a = abuse.user_session("alice@example.net", 2).unwrap();
        let b = abuse.user_session("alice@example.net", 2).unwrap();
        assert!(abuse.user_session("alice@example.net", 2).is_none());
        let bob = abuse.user_session("bob@example.net", 2).unwrap();
        assert_eq!(abuse.user_entries.get(), 2);
        drop(a);
        let c = abuse.user_session("alice@example.net", 2).unwrap();
        drop((b, c, bob));
        assert!(
            lock(&abuse.users).is_empty(),
            "no entry outlives its sessions"
        );
        assert_eq!(abuse.user_entries.get(), 0);
    }
}
