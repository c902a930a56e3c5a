//! The logged-in sessions, for the admin API (`/sessions`, kicks, maintenance). A session
//! registers when its login succeeds and is removed when its `Registration` drops. Never holds
//! a secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::SessionId;
use crate::imap::response;
use crate::imap::scan::{COMMAND_NAMES, CommandId};
use crate::trace::TraceSlot;

/// Octets relayed so far each way (as read from the sending side); the relay's tap adds to
/// them, `/sessions` reads them while the session runs.
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
}

pub use crate::metrics::Kick;

impl Kick {
    /// `ended_by` in the session's end log.
    pub fn ended_by(self) -> &'static str {
        match self {
            Kick::Admin => "kicked",
            Kick::Maintenance => "maintenance",
            Kick::Shutdown => "shutdown",
        }
    }

    /// The untagged BYE the client gets at the next response boundary.
    pub fn last_word(self) -> &'static [u8] {
        static ADMIN: OnceLock<Vec<u8>> = OnceLock::new();
        static MAINTENANCE: OnceLock<Vec<u8>> = OnceLock::new();
        static SHUTDOWN: OnceLock<Vec<u8>> = OnceLock::new();
        let (cell, text) = match self {
            Kick::Admin => (&ADMIN, "Session closed by the administrator."),
            Kick::Maintenance => (&MAINTENANCE, "Backend going down for maintenance."),
            Kick::Shutdown => (&SHUTDOWN, "Server shutting down."),
        };
        cell.get_or_init(|| response::bye("UNAVAILABLE", text))
    }
}

#[derive(Debug)]
pub struct LiveSession {
    pub id: SessionId,
    pub client: SocketAddr,
    pub user: String,
    pub backend: Arc<str>,
    pub started: SystemTime,
    pub bytes: ByteCounts,
    /// Milliseconds since the Unix epoch of the last octet relayed either way.
    pub last_active_ms: AtomicU64,
    /// The oldest command in flight: its `CommandId` + 1, or 0 for none.
    pub command: AtomicU8,
    kick: CancellationToken,
    kick_reason: OnceLock<Kick>,
    /// Where a per-user trace records this session (`POST /trace`).
    pub trace: TraceSlot,
}

impl LiveSession {
    /// `kick` is cancelled to close the session: by `kick` here, or by its parent (the
    /// shutdown's cut, which then counts as `Kick::Shutdown`).
    pub fn new(
        id: SessionId,
        client: SocketAddr,
        user: String,
        backend: Arc<str>,
        kick: CancellationToken,
    ) -> Self {
        let started = SystemTime::now();
        LiveSession {
            id,
            client,
            user,
            backend,
            started,
            bytes: ByteCounts::default(),
            last_active_ms: AtomicU64::new(unix_ms(started)),
            command: AtomicU8::new(0),
            kick,
            kick_reason: OnceLock::new(),
            trace: TraceSlot::default(),
        }
    }

    /// Asks the session to close at its next response boundary; the first reason given wins.
    pub fn kick(&self, reason: Kick) {
        let _ = self.kick_reason.set(reason);
        self.kick.cancel();
    }

    /// Resolves when the session was kicked.
    pub fn kicked(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.kick.cancelled()
    }

    pub fn kick_reason(&self) -> Option<Kick> {
        self.kick_reason.get().copied()
    }

    /// The relay's tap saw traffic; `command` is the oldest command in flight.
    pub fn touch(&self, now: SystemTime, command: Option<CommandId>) {
        self.last_active_ms.store(unix_ms(now), Ordering::Relaxed);
        self.command.store(
            command.map_or(0, |c| c.0.saturating_add(1)),
            Ordering::Relaxed,
        );
    }

    fn command_name(&self) -> Option<&'static str> {
        match self.command.load(Ordering::Relaxed) {
            0 => None,
            n => COMMAND_NAMES.get(usize::from(n - 1)).copied(),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which sessions an admin request means. Every given field must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Compared case-insensitively.
    pub user: Option<String>,
    pub backend: Option<String>,
    pub id: Option<String>,
}

impl Filter {
    fn matches(&self, s: &LiveSession) -> bool {
        self.user
            .as_ref()
            .is_none_or(|u| u.eq_ignore_ascii_case(&s.user))
            && self.backend.as_ref().is_none_or(|b| **b == *s.backend)
            && self.id.as_ref().is_none_or(|id| *id == s.id.to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.backend.is_none() && self.id.is_none()
    }
}

#[derive(Default)]
pub struct SessionTable {
    sessions: Mutex<HashMap<SessionId, Arc<LiveSession>>>,
}

/// Removes its session from the table on drop.
pub struct Registration {
    table: Arc<SessionTable>,
    id: SessionId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl SessionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<LiveSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, session: Arc<LiveSession>) -> Registration {
        let id = session.id;
        self.lock().insert(id, session);
        Registration {
            table: self.clone(),
            id,
        }
    }

    /// The sessions `filter` means, oldest first.
    pub fn find(&self, filter: &Filter) -> Vec<Arc<LiveSession>> {
        let mut found: Vec<Arc<LiveSession>> = self
            .lock()
            .values()
            .filter(|s| filter.matches(s))
            .cloned()
            .collect();
        found.sort_by_key(|s| s.started);
        found
    }

    /// Kicks the sessions `filter` means; how many.
    pub fn kick(&self, filter: &Filter, reason: Kick) -> usize {
        let found = self.find(filter);
        for s in &found {
            s.kick(reason);
        }
        found.len()
    }

    /// `[{"id", "client", "user", "backend", "started", "last_active", "command",
    /// "client_to_backend", "backend_to_client"}]` of the sessions `filter` means, oldest
    /// first, at most `limit`; times in seconds since the Unix epoch, `command` the oldest in
    /// flight (or null).
    pub fn to_json(&self, filter: &Filter, limit: usize) -> String {
        let list: Vec<serde_json::Value> = self
            .find(filter)
            .iter()
            .take(limit)
            .map(|s| {
                serde_json::json!({
                    "id": s.id.to_string(),
                    "client": s.client.to_string(),
                    "user": s.user,
                    "backend": &*s.backend,
                    "started": s.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    "last_active": s.last_active_ms.load(Ordering::Relaxed) as f64 / 1000.0,
                    "command": s.command_name(),
                    "client_to_backend": s.bytes.client_to_backend.load(Ordering::Relaxed),
                    "backend_to_client": s.bytes.backend_to_client.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::Value::Array(list).to_string()
    }
}
