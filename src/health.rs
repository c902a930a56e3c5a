//! Backend health: every `health.interval` each backend is checked within `health.timeout`:
//! in `greeting` mode reached as a login would reach it (`backend::open`: PROXY header, TLS or
//! STARTTLS, greeting, capabilities, then LOGOUT), in `tcp` mode connected to only. `rise`
//! successes in a row mark a down backend up, `fall` failures an up one down; the first check
//! decides at once. The state (`backend::state`) feeds routing (a login skips a backend known
//! to be down), `imapgate_backend_up`, `/readyz` and `/backends`.
//!
//! The checks follow reloads: on a new snapshot they restart for its backend list; a backend
//! kept across the reload keeps its state.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::backend::state::{BackendState, Health};
use crate::backend::{self, BackendError, ProxyOut};
use crate::config::{Backend, HealthChecks, HealthMode};
use crate::services::{self, Services};
use crate::shutdown::Shutdown;

/// Runs the checks of the current snapshot's backends until the drain; one task per backend.
pub(crate) async fn run(services: Arc<Services>, shutdown: Shutdown) {
    services::for_each_snapshot(services, shutdown, |snapshot, stop| {
        for (index, state) in snapshot.backends.iter().enumerate() {
            let (config, state, stop) = (snapshot.config.clone(), state.clone(), stop.clone());
            tokio::spawn(async move {
                let backend = &config.backends[index];
                tokio::select! {
                    _ = check_loop(backend, &config.health, &state) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    })
    .await;
}

async fn check_loop(backend: &Backend, h: &HealthChecks, state: &BackendState) {
    let mut streak = Streak::default();
    let mut ticker = tokio::time::interval(h.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(backend, state, h.mode, h.timeout).await;
        let Some(health) = streak.record(state.health(), result.is_ok(), h.rise, h.fall) else {
            continue;
        };
        match &result {
            Ok(()) => info!(backend = %backend.name, "backend up"),
            Err(error) => {
                warn!(backend = %backend.name, address = %backend.address, %error, "backend down")
            }
        }
        state.set_health(health);
    }
}

/// Checks in a row that disagree with the current state: the rise/fall rule, apart from I/O.
#[derive(Debug, Default)]
struct Streak(u32);

impl Streak {
    /// The new health after a check, if it changes.
    fn record(&mut self, current: Health, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        let (agrees, needed, next) = match current {
            Health::Unknown => {
                self.0 = 0;
                return Some(if ok { Health::Up } else { Health::Down });
            }
            Health::Up => (ok, fall, Health::Down),
            Health::Down => (!ok, rise, Health::Up),
        };
        if agrees {
            self.0 = 0;
            return None;
        }
        self.0 += 1;
        if self.0 >= needed {
            self.0 = 0;
            Some(next)
        } else {
            None
        }
    }
}

/// Reaches the backend as configured: a TCP connect, or all a login does before the
/// credentials (PROXY header, implicit TLS or STARTTLS with certificate verification,
/// greeting, capabilities), then LOGOUT.
async fn probe(
    backend: &Backend,
    state: &BackendState,
    mode: HealthMode,
    timeout: Duration,
) -> Result<(), BackendError> {
    let attempt = async {
        let tcp = backend::connect(state, timeout).await?;
        if mode == HealthMode::Greeting {
            let (conn, _) = backend::open(tcp, backend, ProxyOut::Local).await?;
            conn.logout().await;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| BackendError::CheckTimeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds checks to the rule from `start`; returns the health after each.
    fn run(start: Health, checks: &[bool], rise: u32, fall: u32) -> Vec<Health> {
        let mut streak = Streak::default();
        let mut health = start;
        checks
            .iter()
            .map(|&ok| {
                if let Some(h) = streak.record(health, ok, rise, fall) {
                    health = h;
                }
                health
            })
            .collect()
    }

    #[test]
    fn rise_and_fall() {
        use Health::{Down, Up};
        assert_eq!(
            run(Health::Unknown, &[false], 2, 3),
            [Down],
            "first check decides"
        );
        assert_eq!(run(Health::Unknown, &[true], 2, 3), [Up]);
        assert_eq!(
            run(Up, &[false, false, true, false, false, false], 2, 3),
            [Up, Up, Up, Up, Up, Down],
            "fall counts failures in a row"
        );
        assert_eq!(
            run(Down, &[true, false, true, true, true], 2, 3),
            [Down, Down, Down, Up, Up],
            "rise counts successes in a row"
        );
        assert_eq!(run(Up, &[false], 1, 1), [Down]);
    }
}
