//! Login orchestration: route the user (the directory first, when one is configured; then the
//! static map and the hash), dial its backends in order (failover), replay the login (`dial`),
//! and answer the client under its own tag. Pre-login hands over a login request; this module
//! decides where it goes and records how it went, in the shared abuse tables too: a failed
//! login's NO waits out the address's penalty, and a login the backend accepted takes one of
//! the user's places under `limits.per_user`.

use std::io;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::Session;
use super::dial::{self, DialError, LoginOutcome};
use crate::abuse::UserSession;
use crate::backend;
use crate::backend::state::BackendState;
use crate::config::{Backend, LookupFallback};
use crate::directory::{Decision, Query, Why};
use crate::imap::command::CommandReader;
use crate::imap::response::{self, Status};
use crate::imap::sasl::{Credentials, Mechanism};
use crate::metrics::{AttemptResult, LoginResult, Rejection};
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
    /// The backend accepted, but the user has `limits.per_user` sessions already: logged out
    /// of the backend again and answered `NO [LIMIT]`. Pre-login goes on; not a failed login
    /// (the password was right).
    OverLimit,
}

/// A login the backend accepted: what the relay needs.
pub struct Authenticated {
    pub backend: dial::BackendSession,
    /// The snapshot the login was routed with.
    pub snapshot: Arc<Snapshot>,
    /// The backend's live state (metrics, name).
    pub state: Arc<BackendState>,
    /// The backend's relay settings.
    pub tuning: super::relay::BackendTuning,
    /// The user as routed (authzid or login name), for logs and `/sessions`.
    pub user: String,
    /// Bytes the client sent behind its login command; they go to the backend first.
    pub client_buffered: Vec<u8>,
    /// The session's place under `limits.per_user` (`None` when unlimited), held while it runs.
    pub user_session: Option<UserSession>,
    /// How the client logged in, and its tag, for a trace's first line.
    pub mechanism: Mechanism,
    pub tag: String,
}

/// A login as a trace shows it: tag, command and user, never a credential.
pub fn login_line(tag: &str, mechanism: Mechanism, user: &str) -> String {
    let command = mechanism.command();
    format!("{tag} {command} as {user} [credentials not recorded]")
}

/// A backend a login may try: a configured one, or one the directory named by address.
struct Target {
    backend: Arc<Backend>,
    state: Arc<BackendState>,
}

/// Routes the user, tries its backends in order, and answers the client with its own tag.
/// `attempt` counts this connection's login attempts (for the directory).
pub async fn route_and_dial(
    client: &mut Stream,
    reader: &mut CommandReader,
    session: &Session,
    tag: &str,
    credentials: &Credentials,
    client_id: &[(String, String)],
    attempt: u32,
) -> io::Result<LoginAttempt> {
    // The login follows the configuration in use now, not the one the connection found.
    let snapshot = session.services.snapshot();
    let config = &snapshot.config;
    let metrics = &session.services.metrics;
    let user = credentials.routing_user();
    let mechanism = credentials.mechanism.as_str();
    let key = config.routing.normalize(user);
    let mut rewritten = None;
    let targets = match (&snapshot.directory, &config.routing.lookup) {
        (Some(directory), Some(lookup)) => {
            let query = Query {
                user,
                // A relayed mechanism's message is no password: it never goes to the directory.
                password: (lookup.send_password() && credentials.mechanism.relayed().is_none())
                    .then_some(&credentials.password),
                // nginx says `plain` for every cleartext login (LOGIN, PLAIN, AUTH LOGIN).
                method: "plain",
                client: session.peer,
                attempt,
                tls: client.is_tls(),
            };
            match directory.decide(&key, &query).await {
                Decision::Route { route, from } => {
                    info!(session = %session.id, user, server = %route.server, from = from.as_str(), "directory route");
                    // A relayed exchange is the client's own (a SCRAM proof binds the user): the
                    // directory cannot replace its user or password.
                    if (route.user.is_some() || route.password.is_some())
                        && credentials.mechanism.relayed().is_none()
                    {
                        let mut c = credentials.clone();
                        if let Some(u) = &route.user {
                            c.user = u.clone();
                        }
                        if let Some(p) = &route.password {
                            c.password = p.clone();
                        }
                        rewritten = Some(c);
                    }
                    directed(&snapshot, &route.server)
                }
                Decision::Refused { message, wait } => {
                    // A failed login like a backend's NO: the address's penalty applies too,
                    // and the longer of it and the service's Auth-Wait holds this connection.
                    let penalty = session
                        .services
                        .abuse
                        .login_failed(session.peer.ip(), &config.limits);
                    let delay = wait.max(penalty);
                    info!(session = %session.id, user, mechanism, result = "rejected", reason = "directory", delay_ms = delay.as_millis() as u64, "login");
                    tokio::time::sleep(delay).await;
                    metrics.login(credentials.mechanism, LoginResult::Rejected);
                    client
                        .write_all(&response::tagged(
                            tag,
                            Status::No,
                            "AUTHENTICATIONFAILED",
                            &message,
                        ))
                        .await?;
                    return Ok(LoginAttempt::Rejected);
                }
                Decision::Fallback(why) => match lookup.fallback {
                    LookupFallback::Hash => configured(&snapshot, user),
                    LookupFallback::Refuse => {
                        info!(session = %session.id, user, mechanism, result = "rejected", reason = ?why, "login");
                        let (code, text, attempt, result) = match why {
                            Why::NotFound => (
                                "AUTHENTICATIONFAILED",
                                "Authentication failed.",
                                LoginAttempt::Rejected,
                                LoginResult::Rejected,
                            ),
                            Why::DirectoryDown => (
                                "UNAVAILABLE",
                                "Backend for this user is not available.",
                                LoginAttempt::Unavailable,
                                LoginResult::Unavailable,
                            ),
                        };
                        metrics.login(credentials.mechanism, result);
                        client
                            .write_all(&response::tagged(tag, Status::No, code, text))
                            .await?;
                        return Ok(attempt);
                    }
                },
            }
        }
        _ => configured(&snapshot, user),
    };
    let credentials = rewritten.as_ref().unwrap_or(credentials);
    dial_targets(
        client,
        reader,
        session,
        tag,
        credentials,
        client_id,
        &snapshot,
        targets,
    )
    .await
}

/// The configured backends that take logins, in the user's order (static map, hash).
fn configured(snapshot: &Snapshot, user: &str) -> Vec<Target> {
    let config = &snapshot.config;
    let route = route::route(config, user);
    route
        .candidates(config.routing.failover, |i| {
            snapshot.backends[i].takes_logins()
        })
        .into_iter()
        .map(|i| Target {
            backend: Arc::new(config.backends[i].clone()),
            state: snapshot.backends[i].clone(),
        })
        .collect()
}

/// The backend the directory named: a configured one with that address, else one made from
/// `routing.lookup.backend_defaults`. The directory's answer is the user's only place: no
/// failover.
fn directed(snapshot: &Snapshot, server: &str) -> Vec<Target> {
    let config = &snapshot.config;
    if let Some(i) = config.backends.iter().position(|b| b.address == server) {
        let state = &snapshot.backends[i];
        return if state.takes_logins() {
            vec![Target {
                backend: Arc::new(config.backends[i].clone()),
                state: state.clone(),
            }]
        } else {
            Vec::new()
        };
    }
    let Some(lookup) = &config.routing.lookup else {
        return Vec::new();
    };
    match lookup.backend_defaults.backend(server.into(), server) {
        Ok(backend) => vec![Target {
            state: Arc::new(BackendState::dynamic(
                server,
                snapshot.dynamic_metrics.clone(),
            )),
            backend: Arc::new(backend),
        }],
        Err(error) => {
            warn!(server, %error, "cannot reach the backend the directory named");
            Vec::new()
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn dial_targets(
    client: &mut Stream,
    reader: &mut CommandReader,
    session: &Session,
    tag: &str,
    credentials: &Credentials,
    client_id: &[(String, String)],
    snapshot: &Arc<Snapshot>,
    targets: Vec<Target>,
) -> io::Result<LoginAttempt> {
    let config = &snapshot.config;
    let metrics = &session.services.metrics;
    let identity = dial::Identity {
        client: session.peer,
        local: session.local,
        session_id: session.id,
        client_id: client_id.to_vec(),
    };
    let user = credentials.routing_user();
    let mechanism = credentials.mechanism.as_str();
    if targets.is_empty() {
        // Known down or taken out: say so now instead of making the user wait for a timeout.
        info!(session = %session.id, user, mechanism, result = "unavailable", reason = "no backend takes logins", "login");
    }
    let timeouts = (
        config.timeouts.backend_greeting,
        config.timeouts.backend_login,
    );
    // What the client's login comes to if no backend takes it.
    let mut final_result = LoginResult::Unavailable;
    for (n, Target { backend, state }) in targets.into_iter().enumerate() {
        if n > 0 {
            metrics.failover();
        }
        let started = std::time::Instant::now();
        let outcome = match backend::connect(&state, config.timeouts.backend_connect).await {
            Ok(stream) => {
                state.metrics.connected(started.elapsed());
                crate::stream::detect_dead_peer(&stream, config.timeouts.keepalive);
                let side = dial::ClientSide {
                    stream: &mut *client,
                    reader: &mut *reader,
                };
                dial::replay(stream, &backend, credentials, &identity, timeouts, side).await
            }
            Err(e) => Err(DialError::BeforeLogin(e)),
        };
        let took = started.elapsed();
        let elapsed_ms = took.as_millis() as u64;
        let result = match &outcome {
            Ok(LoginOutcome::LoggedIn(_)) => AttemptResult::Ok,
            Ok(LoginOutcome::Rejected { .. } | LoginOutcome::Client(_)) => AttemptResult::Rejected,
            // Reached, but it failed the login (BYE, close, silence): not "unavailable".
            Err(DialError::AfterLogin(_)) => AttemptResult::Error,
            Err(e) if e.error().is_protocol() => AttemptResult::Error,
            Err(DialError::BeforeLogin(_)) => AttemptResult::Unavailable,
        };
        state.metrics.attempt(result, took);
        final_result = match result {
            AttemptResult::Error => LoginResult::Error,
            _ => LoginResult::Unavailable,
        };
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
                                metrics.rejected(Rejection::PerUser);
                                metrics.login(credentials.mechanism, LoginResult::RefusedByLimit);
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
                metrics.login(credentials.mechanism, LoginResult::Ok);
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
                    tuning: super::relay::BackendTuning::of(&backend),
                    state,
                    user: user.to_string(),
                    client_buffered: Vec::new(),
                    user_session,
                    mechanism: credentials.mechanism,
                    tag: tag.to_string(),
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
                metrics.login(credentials.mechanism, LoginResult::Rejected);
                let mut out = tag.as_bytes().to_vec();
                out.push(b' ');
                out.extend_from_slice(&tagged_rest);
                client.write_all(&out).await?;
                return Ok(LoginAttempt::Rejected);
            }
            Ok(LoginOutcome::Client(end)) => {
                // The client left (or broke the line cap) in the middle of a relayed exchange.
                info!(session = %session.id, user, backend = %backend.name, mechanism, result = "abandoned", elapsed_ms, "login");
                metrics.login(credentials.mechanism, LoginResult::Rejected);
                return match end {
                    dial::ClientEnd::Gone => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed during the SASL exchange",
                    )),
                    dial::ClientEnd::TooLong => {
                        metrics.rejected(Rejection::LineTooLong);
                        client
                            .write_all(&response::bye("LIMIT", "SASL response too long."))
                            .await?;
                        client.flush().await?;
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "SASL response too long",
                        ))
                    }
                };
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
    metrics.login(credentials.mechanism, final_result);
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
