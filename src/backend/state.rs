//! What imapgate knows of each backend besides its config: its health (from the checks), the
//! operator's mode (admin API), and its metric series. Kept by name across reloads, so a reload
//! that keeps a backend keeps all of it: a drained backend stays drained.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::metrics::{BackendMetrics, Metrics};

/// What the health checks last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// No check has finished yet (at start, or after the backend's address changed): logins
    /// may go there.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// What the operator decided (admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Active,
    /// No new logins; sessions stay.
    Draining,
    /// No new logins; sessions are kicked (after the grace given with the request).
    Maintenance,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Draining => "draining",
            Mode::Maintenance => "maintenance",
        }
    }

    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Draining,
            2 => Mode::Maintenance,
            _ => Mode::Active,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Mode::Active => 0,
            Mode::Draining => 1,
            Mode::Maintenance => 2,
        }
    }
}

/// One backend's live state, shared by every snapshot that has a backend of this name (and
/// address).
pub(crate) struct BackendState {
    pub(crate) name: Arc<str>,
    /// The address it was created for (`host:port`); a reload that changes it starts a new
    /// state (health unknown), keeping the mode.
    pub(crate) address: String,
    /// What `address` resolves to: itself for an IP literal, else what the background
    /// resolver found last (`resolve.rs`); empty until the first lookup.
    addresses: ArcSwap<Vec<SocketAddr>>,
    health: AtomicU8,
    mode: AtomicU8,
    /// `weight: 0` in the config in use (kept with the mode for `backend_in_service`).
    weightless: AtomicBool,
    pub(crate) metrics: Arc<BackendMetrics>,
}

impl BackendState {
    fn new(name: Arc<str>, address: String, mode: Mode, metrics: Arc<BackendMetrics>) -> Self {
        let literal: Vec<SocketAddr> = address.parse().into_iter().collect();
        BackendState {
            name,
            addresses: ArcSwap::from_pointee(literal),
            address,
            health: AtomicU8::new(0),
            mode: AtomicU8::new(mode.as_u8()),
            weightless: AtomicBool::new(false),
            metrics,
        }
    }

    /// A backend the directory named by address only (not configured): active, health
    /// unknown, its series shared with every such backend (`backend="dynamic"`).
    pub(crate) fn dynamic(address: &str, metrics: Arc<BackendMetrics>) -> Self {
        let state = BackendState::new(address.into(), address.into(), Mode::Active, metrics);
        state.show_in_service();
        state
    }

    #[cfg(test)]
    pub(crate) fn for_test(address: &str) -> Self {
        let config = crate::config::parse(
            &format!("backends:\n  - {{ name: t, address: \"{address}\" }}\n"),
            "test",
        )
        .unwrap();
        let metrics = Metrics::new(&config);
        BackendState::new(
            "t".into(),
            address.into(),
            Mode::Active,
            metrics.backend("t"),
        )
    }

    /// The addresses a connect tries, in order (empty: not resolved yet).
    pub(crate) fn addresses(&self) -> Arc<Vec<SocketAddr>> {
        self.addresses.load_full()
    }

    pub(crate) fn set_addresses(&self, addresses: Vec<SocketAddr>) {
        self.addresses.store(Arc::new(addresses));
    }

    pub(crate) fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    pub(crate) fn set_health(&self, health: Health) {
        let v = match health {
            Health::Unknown => 0,
            Health::Up => 1,
            Health::Down => 2,
        };
        self.health.store(v, Ordering::Relaxed);
        self.metrics.set_up(health == Health::Up);
    }

    pub(crate) fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// The previous mode.
    pub(crate) fn set_mode(&self, mode: Mode) -> Mode {
        let old = Mode::from_u8(self.mode.swap(mode.as_u8(), Ordering::Relaxed));
        self.show_in_service();
        old
    }

    fn set_weight(&self, weight: u32) {
        self.weightless.store(weight == 0, Ordering::Relaxed);
        self.show_in_service();
    }

    fn show_in_service(&self) {
        self.metrics.set_in_service(
            self.mode() == Mode::Active && !self.weightless.load(Ordering::Relaxed),
        );
    }

    /// Whether a new login may go here: active, and not known to be down.
    pub(crate) fn takes_logins(&self) -> bool {
        self.mode() == Mode::Active && self.health() != Health::Down
    }

    /// Logged-in sessions relayed to it now.
    pub(crate) fn sessions(&self) -> i64 {
        self.metrics.sessions_active.get()
    }
}

/// Every backend's state, by name.
#[derive(Default)]
pub(crate) struct BackendStates {
    by_name: Mutex<HashMap<Arc<str>, Arc<BackendState>>>,
}

impl BackendStates {
    /// The states for `config.backends`, in its order: the existing one for a name kept at the
    /// same address, a new one otherwise. Names no longer configured are forgotten (their
    /// sessions keep their snapshot's state).
    pub(crate) fn for_config(&self, config: &Config, metrics: &Metrics) -> Vec<Arc<BackendState>> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        let states: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| match by_name.get(&b.name) {
                Some(s) if s.address == b.address => s.clone(),
                old => {
                    let mode = old.map_or(Mode::Active, |s| s.mode());
                    let state = BackendState::new(
                        b.name.clone(),
                        b.address.clone(),
                        mode,
                        metrics.backend(&b.name),
                    );
                    state.metrics.set_up(false);
                    Arc::new(state)
                }
            })
            .collect();
        for (state, backend) in states.iter().zip(&config.backends) {
            state.set_weight(backend.weight);
        }
        *by_name = states.iter().map(|s| (s.name.clone(), s.clone())).collect();
        states
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &str) -> Config {
        crate::config::parse(&format!("backends:\n{backends}"), "test").unwrap()
    }

    /// `imapgate_backend_in_service`: 1 only while active with a weight; follows the mode
    /// and a reload's weight.
    #[test]
    fn in_service_follows_mode_and_weight() {
        let metrics = Metrics::new(&config("  - { name: a, address: \"h:1\" }\n"));
        let states = BackendStates::default();
        let in_service = |metrics: &Metrics| {
            let text = metrics.encode_prometheus();
            text.lines()
                .find_map(|l| l.strip_prefix("imapgate_backend_in_service{backend=\"a\"} "))
                .map(str::to_string)
        };
        let a = states.for_config(&config("  - { name: a, address: \"h:1\" }\n"), &metrics);
        assert_eq!(in_service(&metrics).as_deref(), Some("1"));
        a[0].set_mode(Mode::Draining);
        assert_eq!(in_service(&metrics).as_deref(), Some("0"));
        a[0].set_mode(Mode::Active);
        assert_eq!(in_service(&metrics).as_deref(), Some("1"));
        states.for_config(
            &config(
                "  - { name: a, address: \"h:1\", weight: 0 }\n  - { name: b, address: \"h:2\" }\n",
            ),
            &metrics,
        );
        assert_eq!(in_service(&metrics).as_deref(), Some("0"));
    }

    #[test]
    fn state_survives_a_reload_by_name_and_address() {
        let metrics = Metrics::new(&config("  - { name: a, address: \"h:1\" }\n"));
        let states = BackendStates::default();
        let first = states.for_config(
            &config("  - { name: a, address: \"h:1\" }\n  - { name: b, address: \"h:2\" }\n"),
            &metrics,
        );
        first[0].set_mode(Mode::Draining);
        first[0].set_health(Health::Down);
        first[1].set_health(Health::Up);
        let second = states.for_config(
            &config("  - { name: b, address: \"h:3\" }\n  - { name: a, address: \"h:1\" }\n"),
            &metrics,
        );
        assert!(Arc::ptr_eq(&first[0], &second[1]), "a kept whole");
        assert_eq!(second[1].mode(), Mode::Draining);
        assert_eq!(second[0].health(), Health::Unknown, "b moved: checked anew");
        assert!(!second[1].takes_logins());
        assert!(second[0].takes_logins());
    }
}
