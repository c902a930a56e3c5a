//! The logged-in sessions, for the admin `/sessions` view. A session registers when its login
//! succeeds and is removed when its `Registration` drops. Never holds a secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::SessionId;

/// Octets relayed so far each way (as read from the sending side); the relay's observer adds
/// to them, `/sessions` reads them while the session runs.
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
}

#[derive(Debug)]
pub struct LiveSession {
    pub id: SessionId,
    pub client: SocketAddr,
    pub user: String,
    pub backend: Arc<str>,
    pub started: SystemTime,
    pub bytes: ByteCounts,
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

    /// `[{"id", "client", "user", "backend", "started", "client_to_backend", "backend_to_client"}]`,
    /// oldest first; `started` in seconds since the Unix epoch.
    pub fn to_json(&self) -> String {
        let mut sessions: Vec<Arc<LiveSession>> = self.lock().values().cloned().collect();
        sessions.sort_by_key(|s| s.started);
        let list: Vec<serde_json::Value> = sessions
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id.to_string(),
                    "client": s.client.to_string(),
                    "user": s.user,
                    "backend": &*s.backend,
                    "started": s.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    "client_to_backend": s.bytes.client_to_backend.load(Ordering::Relaxed),
                    "backend_to_client": s.bytes.backend_to_client.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::Value::Array(list).to_string()
    }
}
