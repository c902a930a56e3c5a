//! Backend addresses given as DNS names (`mail1.internal:143`, a Kubernetes headless service)
//! are resolved in the background every `dns.interval`, not at each login: a login never waits
//! for a lookup, and a name whose records change (pods rescheduled) is followed. Every A/AAAA
//! record is kept; a connect tries them in order (`backend::connect`). A failed lookup keeps
//! the last good records. Addresses that are IP literals are never looked up.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use super::state::BackendState;
use crate::services::{self, Services};
use crate::shutdown::Shutdown;

/// Resolves the current snapshot's DNS-named backends until the drain; restarts on reloads.
pub(crate) async fn run(services: Arc<Services>, shutdown: Shutdown) {
    services::for_each_snapshot(services, shutdown, |snapshot, stop| {
        let interval = snapshot.config.dns.interval;
        for state in &snapshot.backends {
            if state.address.parse::<SocketAddr>().is_ok() {
                continue;
            }
            let (state, stop) = (state.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = resolve_loop(&state, interval) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    })
    .await;
}

async fn resolve_loop(state: &BackendState, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match lookup(&state.address).await {
            Ok(found) => {
                failing = false;
                if *state.addresses() != found {
                    info!(backend = %state.name, name = %state.address, addresses = ?found, "backend resolved");
                    state.set_addresses(found);
                }
            }
            Err(error) => {
                if !failing {
                    warn!(backend = %state.name, name = %state.address, %error, "cannot resolve the backend; keeping its last addresses");
                    failing = true;
                }
            }
        }
    }
}

/// Every address `host:port` resolves to, sorted (so an unchanged answer in another order is
/// not a change).
pub(crate) async fn lookup(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    let mut found: Vec<SocketAddr> = tokio::net::lookup_host(address).await?.collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no A or AAAA record",
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_connect_tries_every_address_in_order() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        // Bound and dropped: nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let state = BackendState::for_test("mail.invalid:143");
        assert!(state.addresses().is_empty(), "a name starts unresolved");
        state.set_addresses(vec![closed, open_addr]);
        let stream = crate::backend::connect(&state, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), open_addr);
    }

    #[tokio::test]
    async fn names_resolve_and_literals_need_not() {
        let found = lookup("localhost:143").await.unwrap();
        assert!(
            found.contains(&"127.0.0.1:143".parse().unwrap()),
            "{found:?}"
        );
        let literal = BackendState::for_test("127.0.0.1:143");
        assert_eq!(*literal.addresses(), vec!["127.0.0.1:143".parse().unwrap()]);
        let state = BackendState::for_test("localhost:1");
        // Not resolved yet: the connect looks it up itself (and finds nothing listening).
        let error = crate::backend::connect(&state, Duration::from_secs(5)).await;
        assert!(error.is_err());
        assert!(!state.addresses().is_empty(), "the lookup was kept");
    }
}
