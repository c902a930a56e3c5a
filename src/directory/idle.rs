//! Idle connections of a directory source, kept for reuse for at most `MAX_IDLE`. A reaper
//! task closes the ones unused that long, so a source that is no longer asked (the snapshot of
//! an older config, which logged-in sessions keep alive) holds no connection to the directory
//! for long, and neither does a quiet one (servers and firewalls drop idle connections too).

use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

/// How long a connection may sit unused.
const MAX_IDLE: Duration = Duration::from_secs(60);
/// How often the reaper looks.
const REAP_EVERY: Duration = Duration::from_secs(10);

type Slots<C> = Mutex<Vec<(C, Instant)>>;

pub(crate) struct Idle<C> {
    connections: Arc<Slots<C>>,
    reaper: Once,
}

impl<C: Send + 'static> Idle<C> {
    pub(crate) fn new() -> Self {
        Idle {
            connections: Arc::new(Mutex::new(Vec::new())),
            reaper: Once::new(),
        }
    }

    /// The most recently used connection that is not too old and that `usable` accepts.
    pub(crate) fn pop(&self, mut usable: impl FnMut(&mut C) -> bool) -> Option<C> {
        let mut connections = lock(&self.connections);
        while let Some((mut c, since)) = connections.pop() {
            if since.elapsed() < MAX_IDLE && usable(&mut c) {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `c` for the next lookup (at most `max` are kept).
    pub(crate) fn push(&self, c: C, max: usize) {
        self.start_reaper();
        let mut connections = lock(&self.connections);
        if connections.len() < max {
            connections.push((c, Instant::now()));
        }
    }

    fn start_reaper(&self) {
        self.reaper.call_once(|| {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let connections: Weak<Slots<C>> = Arc::downgrade(&self.connections);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(REAP_EVERY).await;
                    let Some(connections) = connections.upgrade() else {
                        return;
                    };
                    // Dropped outside the lock: closing may take a moment.
                    let expired = expire(&connections, Instant::now());
                    drop(expired);
                }
            });
        });
    }
}

/// Takes out the connections unused for `MAX_IDLE` at `now`.
fn expire<C>(connections: &Slots<C>, now: Instant) -> Vec<(C, Instant)> {
    let mut connections = lock(connections);
    let (old, fresh) = std::mem::take(&mut *connections)
        .into_iter()
        .partition(|(_, since)| now.duration_since(*since) >= MAX_IDLE);
    *connections = fresh;
    old
}

fn lock<C>(m: &Slots<C>) -> std::sync::MutexGuard<'_, Vec<(C, Instant)>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_then_reaped() {
        let idle = Idle::new();
        idle.push(1, 2);
        idle.push(2, 2);
        idle.push(3, 2);
        assert_eq!(idle.pop(|_| true), Some(2), "newest first, at most 2 kept");
        assert_eq!(idle.pop(|c| *c != 1), None, "unusable ones are dropped");
        idle.push(4, 2);
        let later = Instant::now() + MAX_IDLE;
        assert_eq!(expire(&idle.connections, later).len(), 1, "reaped");
        assert!(lock(&idle.connections).is_empty());
        // Too old when asked for: not handed out.
        if let Some(long_ago) = Instant::now().checked_sub(MAX_IDLE * 2) {
            lock(&idle.connections).push((5, long_ago));
            assert_eq!(idle.pop(|_| true), None);
        }
    }
}
