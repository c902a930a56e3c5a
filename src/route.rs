//! User → ordered list of backends.
//!
//! 1. A user in `routing.static` goes to that backend.
//! 2. Everyone else is placed by weighted rendezvous (highest-random-weight) hashing: each
//!    backend scores `weight / -ln(u)` where `u` in (0, 1) comes from xxh3 of the backend's
//!    *name* and the user; the highest score wins. xxh3 is a specified hash, so every replica
//!    with the same backend list agrees, with no shared state. Adding or removing a backend moves
//!    only the users whose top score it gains or loses; renaming it moves its users, changing its
//!    address does not.
//!
//! The order after the first backend is what failover tries next, when it is enabled, and
//! where a hashed user goes while a backend is down or drained (`Route::candidates`).

use xxhash_rust::xxh3::Xxh3;

use crate::config::Config;

/// Where a user goes.
#[derive(Debug)]
pub(crate) struct Route {
    /// The normalised user name the route was computed for.
    pub(crate) key: String,
    /// The backend `routing.static` names for the key.
    pub(crate) pinned: Option<usize>,
    /// Indices into `config.backends`, best first: the pinned one, then every backend with a
    /// weight above 0 by rendezvous score.
    pub(crate) order: Vec<usize>,
}

impl Route {
    /// The backends a login tries, in order, given which of them take logins now (health and
    /// admin mode). A hashed user skips backends that do not, in rendezvous order, so that
    /// their next choice is stable and every replica agrees; a pinned user goes on to others
    /// only with `routing.failover`. Without failover, one backend at most.
    pub(crate) fn candidates(
        &self,
        failover: bool,
        takes_logins: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut candidates: Vec<usize> = match self.pinned {
            Some(pinned) if !failover => vec![pinned],
            _ => self.order.clone(),
        };
        candidates.retain(|&i| takes_logins(i));
        if !failover {
            candidates.truncate(1);
        }
        candidates
    }
}

pub(crate) fn route(config: &Config, user: &str) -> Route {
    let key = config.routing.normalize(user);
    let mut order = rendezvous_order(config, &key);
    let pinned = config.routing.static_map.get(&key).copied();
    if let Some(pinned) = pinned {
        order.retain(|&i| i != pinned);
        order.insert(0, pinned);
    }
    Route { key, pinned, order }
}

/// Indices into `config.backends`, best first, as configured (health and admin modes aside).
/// Without failover only the first is used.
pub fn backends_for(config: &Config, user: &str) -> Vec<usize> {
    let mut order = route(config, user).order;
    if !config.routing.failover {
        order.truncate(1);
    }
    order
}

/// Every backend with a weight above 0, by descending score for `key`.
fn rendezvous_order(config: &Config, key: &str) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = config
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(i, b)| (score(&b.name, b.weight, key), i))
        .collect();
    // Ties (practically impossible) fall back to config order, so the result stays deterministic.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// Weighted rendezvous score. Exposed for the golden test that pins the hash.
pub fn score(backend_name: &str, weight: u32, key: &str) -> f64 {
    // xxh3 of `name NUL key`, streamed: the same value as hashing the joined bytes, with no
    // allocation per backend per login.
    let mut hasher = Xxh3::new();
    hasher.update(backend_name.as_bytes());
    hasher.update(&[0]);
    hasher.update(key.as_bytes());
    let hash = hasher.digest();
    // 53 high bits → a uniform float strictly inside (0, 1).
    let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -unit.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn config(backends: &str, extra: &str) -> Config {
        parse(&format!("backends:\n{backends}{extra}"), "test").unwrap()
    }

    const THREE: &str = "  - { name: mail1, address: \"h:1\" }\n  - { name: mail2, address: \"h:2\" }\n  - { name: mail3, address: \"h:3\" }\n";

    #[test]
    fn candidates_skip_what_takes_no_logins() {
        let c = config(THREE, "routing: { static: { pinned@x: mail2 } }\n");
        let r = route(&c, "someone");
        let all = |_| true;
        let first = r.order[0];
        assert_eq!(r.candidates(false, all), vec![first]);
        // Its first choice down: a hashed user goes to the second, on every replica alike.
        assert_eq!(r.candidates(false, |i| i != first), vec![r.order[1]]);
        assert_eq!(r.candidates(true, |i| i != first), r.order[1..].to_vec());
        // A pinned user without failover waits for its backend.
        let p = route(&c, "pinned@x");
        assert_eq!(p.pinned, Some(1));
        assert_eq!(p.candidates(false, |i| i != 1), Vec::<usize>::new());
        assert_eq!(p.candidates(true, |i| i != 1).len(), 2);
    }

    /// Pins the hash: if this changes, every deployed replica would move users on upgrade.
    /// The orders were computed independently with Python's xxhash package and the same formula.
    #[test]
    fn golden_values() {
        let c = config(THREE, "routing: { failover: true }\n");
        let names = |user: &str| -> Vec<String> {
            backends_for(&c, user)
                .into_iter()
                .map(|i| c.backends[i].name.to_string())
                .collect()
        };
        // The value Python's `xxhash.xxh3_64_intdigest(b"mail1\0alice")` gives.
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(b"mail1\0alice"),
            0x73d1_1e83_0e26_042b_u64,
            "xxh3 changed"
        );
        let golden = [
            ("alice", ["mail3", "mail2", "mail1"]),
            ("bob", ["mail1", "mail3", "mail2"]),
            ("carol@example.net", ["mail3", "mail1", "mail2"]),
        ];
        for (user, expected) in golden {
            assert_eq!(names(user), expected, "order for {user}");
        }
    }

    #[test]
    fn static_first_and_no_failover_means_one() {
        let c = config(THREE, "routing:\n  static: { Alice: mail2 }\n");
        assert_eq!(backends_for(&c, "ALICE"), vec![1]);
        assert_eq!(backends_for(&c, "dave").len(), 1);
    }

    #[test]
    fn removing_a_backend_moves_only_its_users() {
        let before = config(THREE, "routing: { failover: true }\n");
        let two = "  - { name: mail1, address: \"h:1\" }\n  - { name: mail2, address: \"h:2\" }\n";
        let after = config(two, "routing: { failover: true }\n");
        for n in 0..2000 {
            let user = format!("user{n}");
            let b = &before.backends[backends_for(&before, &user)[0]].name;
            let a = &after.backends[backends_for(&after, &user)[0]].name;
            if &**b != "mail3" {
                assert_eq!(a, b, "{user} moved although its backend stayed");
            }
        }
    }

    #[test]
    fn weights_shape_the_share() {
        let c = config(
            "  - { name: big, address: \"h:1\", weight: 300 }\n  - { name: small, address: \"h:2\", weight: 100 }\n  - { name: off, address: \"h:3\", weight: 0 }\n",
            "",
        );
        let mut big = 0;
        for n in 0..10_000 {
            match &*c.backends[backends_for(&c, &format!("u{n}"))[0]].name {
                "big" => big += 1,
                "small" => {}
                other => panic!("weight 0 backend {other} got a user"),
            }
        }
        // Expected 7,500 of 10,000; the bound is ±5 standard deviations.
        assert!((7283..=7717).contains(&big), "big got {big}");
    }
}
