//! Login orchestration: route the user, dial its backends in order (failover), replay the
//! login (`dial`), and answer the client under its own tag. Pre-login hands over a login
//! request; this module decides where it goes and records how it went.

use std::io;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::Session;
use super::dial::{self, DialError, LoginOutcome};
use crate::backend;
use crate::imap::response::{self, Status};
use crate::imap::sasl::Credentials;
use crate::metrics::LoginResult;
use crate::route;
use crate::services::Snapshot;
use crate::stream::Stream;

/// What a login came to; the client has its answer in every case.
pub enum LoginAttempt {
    LoggedIn(Box<Authenticated>),
    /// The backend said NO or BAD: a failed login, pre-login goes on.
    Rejected,
    /// No backend could be used (`NO [UNAVAILABLE]`): pre-login goes on, nothing counted.
    Unavailable,
}

/// A login the backend accepted: what the relay needs.
pub struct Authenticated {
    pub backend: dial::BackendSession,
    /// The snapshot the login was routed with, and the backend's index in it.
    pub snapshot: Arc<Snapshot>,
    pub backend_index: usize,
    /// The user as routed (authzid or login name), for logs and `/sessions`.
    pub user: String,
    /// Bytes the client sent behind its login command; they go to the backend first.
    pub client_buffered: Vec<u8>,
}

/// Routes the user, tries its backends in order, and answers the client with its own tag.
pub async fn route_and_dial(
    client: &mut Stream,
    session: &Session,
    tag: &str,
    credentials: &Credentials,
    client_id: &[(String, String)],
) -> io::Result<LoginAttempt> {
    // The login follows the configuration in use now, not the one the connection found.
    let snapshot = session.services.snapshot();
    let config = &snapshot.config;
    let identity = dial::Identity {
        client: session.peer,
        local: session.local,
        session_id: session.id,
        client_id: client_id.to_vec(),
    };
    let user = credentials.routing_user();
    let mechanism = credentials.mechanism.as_str();
    let route = route::route(config, user);
    let candidates = route.candidates(config.routing.failover, |i| {
        snapshot.backends[i].takes_logins()
    });
    if candidates.is_empty() {
        // Known down or taken out: say so now instead of making the user wait for a timeout.
        info!(session = %session.id, user, mechanism, result = "unavailable", reason = "no backend takes logins", "login");
    }
    let timeouts = (
        config.timeouts.backend_greeting,
        config.timeouts.backend_login,
    );
    for index in candidates {
        let backend = &config.backends[index];
        let state = &snapshot.backends[index];
        let started = std::time::Instant::now();
        let outcome = match backend::connect(state, config.timeouts.backend_connect).await {
            Ok(stream) => {
                state.metrics.connected(started.elapsed());
                dial::replay(stream, backend, credentials, &identity, timeouts).await
            }
            Err(e) => Err(DialError::BeforeLogin(e)),
        };
        let took = started.elapsed();
        let elapsed_ms = took.as_millis() as u64;
        let result = match &outcome {
            Ok(LoginOutcome::LoggedIn(_)) => LoginResult::Ok,
            Ok(LoginOutcome::Rejected { .. }) => LoginResult::Rejected,
            // Reached, but it failed the login (BYE, close, silence): not "unavailable".
            Err(DialError::AfterLogin(_)) => LoginResult::Error,
            Err(e) if e.error().is_protocol() => LoginResult::Error,
            Err(DialError::BeforeLogin(_)) => LoginResult::Unavailable,
        };
        state.metrics.login(credentials.mechanism, result, took);
        match outcome {
            Ok(LoginOutcome::LoggedIn(mut logged_in)) => {
                info!(session = %session.id, user, backend = %backend.name, mechanism, result = "ok", elapsed_ms, "login");
                // Untagged responses first, then the tagged OK with the client's tag; the
                // backend's [CAPABILITY ...] code in it tells the client what it has now.
                let mut out = std::mem::take(&mut logged_in.untagged);
                out.extend_from_slice(tag.as_bytes());
                out.push(b' ');
                out.extend_from_slice(&logged_in.tagged_rest);
                client.write_all(&out).await?;
                return Ok(LoginAttempt::LoggedIn(Box::new(Authenticated {
                    backend: logged_in,
                    snapshot: snapshot.clone(),
                    backend_index: index,
                    user: user.to_string(),
                    client_buffered: Vec::new(),
                })));
            }
            Ok(LoginOutcome::Rejected { tagged_rest }) => {
                info!(session = %session.id, user, backend = %backend.name, mechanism, result = "rejected", elapsed_ms, "login");
                let mut out = tag.as_bytes().to_vec();
                out.push(b' ');
                out.extend_from_slice(&tagged_rest);
                client.write_all(&out).await?;
                return Ok(LoginAttempt::Rejected);
            }
            Err(DialError::BeforeLogin(error)) => {
                warn!(session = %session.id, user, backend = %backend.name, mechanism, result = result.as_str(), elapsed_ms, %error, "login");
            }
            Err(DialError::AfterLogin(error)) => {
                // The backend may have seen the credentials: they go nowhere else.
                warn!(session = %session.id, user, backend = %backend.name, mechanism, result = result.as_str(), elapsed_ms, %error, "login failed after the credentials were sent; no failover");
                break;
            }
        }
    }
    client
        .write_all(&response::tagged(
            tag,
            Status::No,
            "UNAVAILABLE",
            "Backend for this user is not available.",
        ))
        .await?;
    Ok(LoginAttempt::Unavailable)
}
