//! Pre-login: the only place where imapgate speaks IMAP as a server.
//!
//! ```text
//!           ┌──────────── CAPABILITY, NOOP, ID, BAD syntax, NO wrong state ───────┐
//!           ▼                                                                     │
//!  greet ─► reading a command ─► LOGIN / AUTHENTICATE ─► route ─► dial each ──────┤ backend NO:
//!           │                     (SASL "+" exchange)              │              │ attempts left
//!           │                                                      ▼              │
//!           │                                           backend OK: tagged OK ─► relay
//!           ├─► LOGOUT: BYE + OK, close      no backend: NO [UNAVAILABLE] ────────┘
//!           └─► too long / timeout / too many failures / shutdown: BYE, close
//! ```
//!
//! The whole phase runs under one deadline (`timeouts.prelogin`), so a client that drips bytes
//! cannot hold a connection longer than that. Raw input is never logged: it holds passwords.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::dial::{self, LoginOutcome};
use super::{EndReason, Session};
use crate::backend;
use crate::config::ListenerTls;
use crate::imap::command::{CommandReader, Parsed, PreloginCommand, Step};
use crate::imap::response::{self, Status};
use crate::imap::sasl::{self, Credentials, Mechanism, SaslLine};
use crate::imap::secret::Secret;
use crate::metrics::{LoginResult, Rejection};
use crate::route;
use crate::stream::Stream;

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
}

/// How pre-login ended.
#[derive(Debug)]
pub enum Outcome {
    LoggedIn(Authenticated),
    /// The client asked for STARTTLS and got OK: the caller does the handshake and runs
    /// pre-login again. Whatever the client sent after the STARTTLS line is dropped with the
    /// reader (command injection, CVE-2011-0411).
    StartTls,
    Closed(Closed),
}

/// How pre-login ended without a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client went away or said LOGOUT.
    ByClient,
    /// imapgate sent BYE: a limit, a timeout, or shutdown.
    Bye(EndReason),
}

/// What a login attempt came to, for the pre-login loop.
enum Attempt {
    LoggedIn(Box<Authenticated>),
    StartTls,
    /// The answer has been sent; the client may try again.
    Failed,
    /// The answer has been sent; nothing to count.
    Answered,
}

/// What this connection may do before login.
#[derive(Debug, Clone, Copy)]
struct Policy {
    /// STARTTLS is on offer (a STARTTLS listener, not yet TLS).
    starttls: bool,
    /// LOGIN and AUTHENTICATE are allowed (TLS, or plaintext allowed for this client).
    auth: bool,
}

/// Runs pre-login on `client` (greeting first when `greet`; not after STARTTLS).
pub async fn run(client: &mut Stream, session: &Session, greet: bool) -> io::Result<Outcome> {
    let config = &session.services.config;
    let listener = session.listener();
    let tls = client.is_tls();
    let policy = Policy {
        starttls: matches!(listener.tls, ListenerTls::Starttls(_)) && !tls,
        auth: tls || listener.plaintext_auth_allowed(session.peer.ip()),
    };
    if greet {
        let caps = response::capabilities(policy.starttls, policy.auth);
        client
            .write_all(&response::greeting(caps, &config.greeting))
            .await?;
    }
    let mut reader = CommandReader::new(config.limits.line_max, config.limits.literal_max);
    let mut client_id = Vec::new();
    let mut failures = 0u32;
    loop {
        let parsed = match reader.step() {
            Step::Command(parsed) => parsed,
            Step::NeedMore => {
                // Answers so far must be out before we wait (TLS buffers writes).
                client.flush().await?;
                if reader.read_from(client).await? == 0 {
                    return Ok(Outcome::Closed(Closed::ByClient));
                }
                continue;
            }
            Step::SendContinuation => {
                client
                    .write_all(&response::continuation("Ready for literal data"))
                    .await?;
                continue;
            }
            Step::Bad { tag } => {
                session.services.metrics.rejected(Rejection::syntax);
                let tag = tag.as_deref().unwrap_or("*");
                client
                    .write_all(&response::tagged(
                        tag,
                        Status::Bad,
                        "",
                        "Syntax error in command.",
                    ))
                    .await?;
                continue;
            }
            Step::LiteralRefused { tag } => {
                session
                    .services
                    .metrics
                    .rejected(Rejection::literal_too_large);
                client
                    .write_all(&response::tagged(
                        &tag,
                        Status::Bad,
                        "LIMIT",
                        "Literal too large.",
                    ))
                    .await?;
                continue;
            }
            Step::TooLong => {
                session.services.metrics.rejected(Rejection::line_too_long);
                return bye(
                    client,
                    "LIMIT",
                    "Command line too long.",
                    EndReason::LineTooLong,
                )
                .await;
            }
            Step::LiteralTooLarge => {
                session
                    .services
                    .metrics
                    .rejected(Rejection::literal_too_large);
                return bye(
                    client,
                    "LIMIT",
                    "Literal too large.",
                    EndReason::LiteralTooLarge,
                )
                .await;
            }
        };

        match handle(client, session, policy, &mut reader, &mut client_id, parsed).await? {
            Ok(Attempt::LoggedIn(authenticated)) => {
                client.flush().await?;
                let mut authenticated = *authenticated;
                authenticated.client_buffered = reader.into_buffered();
                return Ok(Outcome::LoggedIn(authenticated));
            }
            Ok(Attempt::StartTls) => return Ok(Outcome::StartTls),
            Ok(Attempt::Failed) => {
                failures += 1;
                if failures >= config.limits.login_attempts {
                    session.services.metrics.rejected(Rejection::login_attempts);
                    return bye(
                        client,
                        "",
                        "Too many failed logins.",
                        EndReason::LoginAttempts,
                    )
                    .await;
                }
            }
            Ok(Attempt::Answered) => {}
            Err(closed) => return Ok(Outcome::Closed(closed)),
        }
    }
}

/// Answers one command.
async fn handle(
    client: &mut Stream,
    session: &Session,
    policy: Policy,
    reader: &mut CommandReader,
    client_id: &mut Vec<(String, String)>,
    Parsed { tag, command }: Parsed,
) -> io::Result<Result<Attempt, Closed>> {
    let answer = |status, code, text| response::tagged(&tag, status, code, text);
    if matches!(
        command,
        PreloginCommand::Login { .. } | PreloginCommand::Authenticate { .. }
    ) && !policy.auth
    {
        session
            .services
            .metrics
            .rejected(Rejection::privacy_required);
        let text = "Plaintext authentication is disabled; use STARTTLS or port 993.";
        client
            .write_all(&answer(Status::No, "PRIVACYREQUIRED", text))
            .await?;
        return Ok(Ok(Attempt::Answered));
    }
    let credentials = match command {
        PreloginCommand::Capability => {
            let caps = response::capabilities(policy.starttls, policy.auth);
            client.write_all(&response::capability(caps, &tag)).await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::Noop => {
            client
                .write_all(&answer(Status::Ok, "", "NOOP completed."))
                .await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::Logout => {
            let mut out = response::bye("", "Logging out.");
            out.extend(answer(Status::Ok, "", "LOGOUT completed."));
            client.write_all(&out).await?;
            return Ok(Err(Closed::ByClient));
        }
        PreloginCommand::Id(fields) => {
            *client_id = forwardable_id(fields.unwrap_or_default());
            if let Some((_, name)) = client_id
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("name"))
            {
                debug!(session = %session.id, client_name = %name, "client ID");
            }
            let mut out = format!(
                "* ID ({} {})\r\n",
                response::quoted("name"),
                response::quoted("imapgate")
            )
            .into_bytes();
            out.extend(answer(Status::Ok, "", "ID completed."));
            client.write_all(&out).await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::StartTls if policy.starttls => {
            client
                .write_all(&answer(Status::Ok, "", "Begin TLS negotiation now."))
                .await?;
            client.flush().await?;
            return Ok(Ok(Attempt::StartTls));
        }
        PreloginCommand::StartTls => {
            let text = if client.is_tls() {
                "TLS is already active."
            } else {
                "STARTTLS is not offered on this listener."
            };
            client.write_all(&answer(Status::Bad, "", text)).await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::NeedsLogin { name } => {
            session.services.metrics.rejected(Rejection::needs_login);
            debug!(session = %session.id, command = name, "command before login");
            client
                .write_all(&answer(Status::Bad, "", "Log in first."))
                .await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::Login { user, password } => {
            Credentials::from_login(Mechanism::Login, user, password)
        }
        PreloginCommand::Authenticate {
            mechanism,
            initial_response,
        } => match sasl_exchange(client, reader, &mechanism, initial_response).await? {
            Sasl::Credentials(result) => result,
            Sasl::Cancelled => {
                client
                    .write_all(&answer(Status::Bad, "", "Authentication cancelled."))
                    .await?;
                return Ok(Ok(Attempt::Failed));
            }
            Sasl::Unsupported => {
                session
                    .services
                    .metrics
                    .rejected(Rejection::unsupported_mechanism);
                client
                    .write_all(&answer(
                        Status::No,
                        "",
                        "Unsupported authentication mechanism.",
                    ))
                    .await?;
                return Ok(Ok(Attempt::Answered));
            }
            Sasl::TooLong => {
                session.services.metrics.rejected(Rejection::line_too_long);
                return bye(
                    client,
                    "LIMIT",
                    "SASL response too long.",
                    EndReason::LineTooLong,
                )
                .await;
            }
            Sasl::ClientGone => return Ok(Err(Closed::ByClient)),
        },
    };
    let credentials = match credentials {
        Ok(c) => c,
        Err(why) => {
            session
                .services
                .metrics
                .rejected(Rejection::bad_credentials);
            client
                .write_all(&answer(Status::Bad, "CLIENTBUG", why))
                .await?;
            return Ok(Ok(Attempt::Failed));
        }
    };
    route_and_dial(client, session, &tag, &credentials, client_id)
        .await
        .map(Ok)
}

/// The client's ID fields that may go on to the backend: printable ASCII, no more than fit
/// beside imapgate's own in RFC 2971's 30 pairs, and never an `x-` field, which a backend may trust (x-originating-ip, ...):
/// those only imapgate sets.
fn forwardable_id(fields: Vec<(String, Option<String>)>) -> Vec<(String, String)> {
    let printable = |s: &str| s.len() <= 1024 && s.bytes().all(|c| (0x20..0x7f).contains(&c));
    fields
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .filter(|(k, v)| printable(k) && printable(v) && !k.to_ascii_lowercase().starts_with("x-"))
        .take(dial::CLIENT_ID_FIELDS)
        .collect()
}

/// Sends `* BYE` and ends pre-login.
async fn bye<T: From<Closed>>(
    client: &mut Stream,
    code: &str,
    text: &str,
    reason: EndReason,
) -> io::Result<T> {
    client.write_all(&response::bye(code, text)).await?;
    client.flush().await?;
    Ok(Closed::Bye(reason).into())
}

impl From<Closed> for Outcome {
    fn from(closed: Closed) -> Self {
        Outcome::Closed(closed)
    }
}

impl From<Closed> for Result<Attempt, Closed> {
    fn from(closed: Closed) -> Self {
        Err(closed)
    }
}

enum Sasl {
    Credentials(Result<Credentials, &'static str>),
    Cancelled,
    Unsupported,
    TooLong,
    ClientGone,
}

/// Runs the AUTHENTICATE exchange for PLAIN and LOGIN.
async fn sasl_exchange<S>(
    client: &mut S,
    reader: &mut CommandReader,
    mechanism: &str,
    initial_response: Option<Secret<Vec<u8>>>,
) -> io::Result<Sasl>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match mechanism {
        "PLAIN" => {
            let message = match initial_response {
                Some(ir) => ir,
                None => match sasl_step(client, reader, "").await? {
                    Ok(message) => message,
                    Err(end) => return Ok(end),
                },
            };
            Ok(Sasl::Credentials(Credentials::from_plain(&message)))
        }
        "LOGIN" => {
            // "Username:" and "Password:", base64 as the mechanism's draft has them.
            let user = match initial_response {
                Some(ir) => ir,
                None => match sasl_step(client, reader, "VXNlcm5hbWU6").await? {
                    Ok(user) => user,
                    Err(end) => return Ok(end),
                },
            };
            let password = match sasl_step(client, reader, "UGFzc3dvcmQ6").await? {
                Ok(password) => password,
                Err(end) => return Ok(end),
            };
            Ok(Sasl::Credentials(Credentials::from_login(
                Mechanism::SaslLogin,
                user.expose().clone(),
                password,
            )))
        }
        _ => Ok(Sasl::Unsupported),
    }
}

/// Sends `+ challenge` and reads one response line.
async fn sasl_step<S>(
    client: &mut S,
    reader: &mut CommandReader,
    challenge: &str,
) -> io::Result<Result<Secret<Vec<u8>>, Sasl>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client.write_all(&response::continuation(challenge)).await?;
    client.flush().await?;
    loop {
        match reader.take_line() {
            Ok(Some(line)) => {
                return Ok(match sasl::decode_line(&line) {
                    Ok(SaslLine::Response(bytes)) => Ok(bytes),
                    Ok(SaslLine::Cancel) => Err(Sasl::Cancelled),
                    Err(why) => Err(Sasl::Credentials(Err(why))),
                });
            }
            Ok(None) => {
                if reader.read_from(client).await? == 0 {
                    return Ok(Err(Sasl::ClientGone));
                }
            }
            Err(_too_long) => return Ok(Err(Sasl::TooLong)),
        }
    }
}

/// Routes the user, tries its backends in order, and answers the client with its own tag.
async fn route_and_dial(
    client: &mut Stream,
    session: &Session,
    tag: &str,
    credentials: &Credentials,
    client_id: &[(String, String)],
) -> io::Result<Attempt> {
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
            Ok(LoginOutcome::LoggedIn(_)) => LoginResult::ok,
            Ok(LoginOutcome::Rejected { .. }) => LoginResult::rejected,
            Err(e) if e.is_protocol() => LoginResult::error,
            Err(_) => LoginResult::unavailable,
        };
        session
            .services
            .metrics
            .login(index, credentials.mechanism, result, took);
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
                return Ok(Attempt::LoggedIn(Box::new(Authenticated {
                    backend: logged_in,
                    backend_index: index,
                    backend_name: backend.name.clone(),
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
                return Ok(Attempt::Failed);
            }
            Err(error) => {
                warn!(session = %session.id, user, backend = %backend.name, mechanism, result = result_name(result), elapsed_ms, %error, "login");
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
    Ok(Attempt::Answered)
}

fn result_name(result: LoginResult) -> &'static str {
    match result {
        LoginResult::ok => "ok",
        LoginResult::rejected => "rejected",
        LoginResult::unavailable => "unavailable",
        LoginResult::error => "error",
    }
}
