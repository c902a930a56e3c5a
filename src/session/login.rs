//! Login orchestration: route the user, dial its backends in order (failover), replay the
//! login (`dial`), and answer the client under its own tag. Pre-login hands over a login
//! request; this module decides where it goes and records how it went, in the shared abuse
//! tables too: a failed login's NO waits out the address's penalty, and a login the backend
//! accepted takes one of the user's places under `limits.per_user`.

use std::io;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::Session;
use super::dial::{self, LoginOutcome};
use crate::abuse::UserSession;
use crate::backend;
use crate::imap::response::{self, Status};
use crate::imap::sasl::Credentials;
use crate::metrics::{LoginResult, Rejection};
use crate::route;
use crate::stream::Stream;

/// What a login came to; the client has its answer in every case.
#[derive(Debug)]
pub enum LoginAttempt {
    LoggedIn(Box<Authenticated>),
    /// The backend said NO or BAD: a failed login, pre-login goes on.
    Rejected,
    /// No backend could be used (`NO [UNAVAILABLE]`): pre-login goes on, nothing counted.
    Unavailable,
    /// The backend accepted, but the user has `limits.per_user` sessions already: logged out
    /// of the backend again and answered `NO [LIMIT]`. Pre-login goes on; not a failed login
    /// (the password was right).
    OverLimit,
}

/// A login the backend accepted: what the relay needs.
#[derive(Debug)]
pub struct Authenticated {
    pub backend: dial::BackendSession,
    /// Index in `Config::backends`.
    pub backend_index: usize,
    pub backend_name: std::sync::Arc<str>,
    /// The user as routed (authzid or login name), for logs and `/sessions`.
    pub user: String,
    /// Bytes the client sent behind its login command; they go to the backend first.
    pub client_buffered: Vec<u8>,
    /// The session's place under `limits.per_user` (`None` when unlimited), held while it runs.
    pub user_session: Option<UserSession>,
}

/// Routes the user, tries its backends in order, and answers the client with its own tag.
pub async fn route_and_dial(
    client: &mut Stream,
    session: &Session,
    tag: &str,
    credentials: &Credentials,
    client_id: &[(String, String)],
) -> io::Result<LoginAttempt> {
    let config = &session.services.config;
    let identity = dial::Identity {
        client: session.peer,
        local: session.local,
        session_id: session.id,
        client_id: client_id.to_vec(),
    };
    let user = credentials.routing_user();
    let mechanism = credentials.mechanism.as_str();
    for index in route::backends_for(config, user) {
        let backend = &config.backends[index];
        let started = std::time::Instant::now();
        let outcome = match backend::connect(backend, config.timeouts.backend_connect).await {
            Ok(stream) => {
                session
                    .services
                    .metrics
                    .backend_connected(index, started.elapsed());
                dial::replay(
                    stream,
                    backend,
                    credentials,
                    &identity,
                    config.timeouts.backend_login,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        let elapsed_ms = took.as_millis() as u64;
        let result = match &outcome {
            Ok(LoginOutcome::LoggedIn(_)) => LoginResult::Ok,
            Ok(LoginOutcome::Rejected { .. }) => LoginResult::Rejected,
            Err(e) if e.is_protocol() => LoginResult::Error,
            Err(_) => LoginResult::Unavailable,
        };
        session
            .services
            .metrics
            .login(index, credentials.mechanism, result, took);
        match outcome {
            Ok(LoginOutcome::LoggedIn(mut logged_in)) => {
                // Counted once the backend accepted, not before: otherwise anyone who knows a
                // user name could fill its places with wrong passwords and lock the user out.
                let user_session = match config.limits.per_user {
                    None => None,
                    Some(max) => {
                        let key = config.routing.normalize(user);
                        match session.services.abuse.user_session(&key, max) {
                            Some(place) => Some(place),
                            None => {
                                info!(session = %session.id, user, backend = %backend.name, mechanism, result = "per_user", elapsed_ms, "login");
                                session.services.metrics.rejected(Rejection::PerUser);
                                // In its own task: the client's answer does not wait for it.
                                tokio::spawn(dial::log_out(logged_in));
                                client
                                    .write_all(&response::tagged(
                                        tag,
                                        Status::No,
                                        "LIMIT",
                                        "Too many sessions for this user.",
                                    ))
                                    .await?;
                                return Ok(LoginAttempt::OverLimit);
                            }
                        }
                    }
                };
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
                    backend_index: index,
                    backend_name: backend.name.clone(),
                    user: user.to_string(),
                    client_buffered: Vec::new(),
                    user_session,
                })));
            }
            Ok(LoginOutcome::Rejected { tagged_rest }) => {
                // The address's penalty, slept in this task only: this client waits, no
                // worker does. Successful logins never wait.
                let delay = session
                    .services
                    .abuse
                    .login_failed(session.peer.ip(), &config.limits);
                let delay_ms = delay.as_millis() as u64;
                info!(session = %session.id, user, backend = %backend.name, mechanism, result = "rejected", elapsed_ms, delay_ms, "login");
                if !delay.is_zero() {
                    session.services.metrics.rejected(Rejection::LoginPenalty);
                    tokio::time::sleep(delay).await;
                }
                let mut out = tag.as_bytes().to_vec();
                out.push(b' ');
                out.extend_from_slice(&tagged_rest);
                client.write_all(&out).await?;
                return Ok(LoginAttempt::Rejected);
            }
            Err(error) => {
                warn!(session = %session.id, user, backend = %backend.name, mechanism, result = result.as_str(), elapsed_ms, %error, "login");
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
