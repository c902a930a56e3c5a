//! Pre-login: the only place where imapgate speaks IMAP as a server.
//!
//! ```text
//!           ┌──────────── CAPABILITY, NOOP, ID, BAD syntax, NO wrong state ───────┐
//!           ▼                                                                     │
//!  greet ─► reading a command ─► LOGIN / AUTHENTICATE ─► Outcome::Login ──────────┤ login_failed:
//!           │                     (SASL "+" exchange)    (the session routes,     │ attempts left
//!           │                                            dials and answers)       │
//!           ├─► STARTTLS: OK, Outcome::StartTls (a new Prelogin after the handshake)
//!           ├─► LOGOUT: BYE + OK, close
//!           └─► too long / too many failures: BYE, close
//! ```
//!
//! The whole phase runs under one deadline (`timeouts.prelogin`), so a client that drips bytes
//! cannot hold a connection longer than that. Raw input is never logged: it holds passwords.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::dial;
use super::{EndReason, Session};
use crate::config::ListenerTls;
use crate::imap::command::{CommandReader, Parsed, PreloginCommand, Step};
use crate::imap::response::{self, Status};
use crate::imap::sasl::{self, AuthMechanism, Credentials, Mechanism, Refused, SaslLine};
use crate::imap::secret::Secret;
use crate::metrics::Rejection;
use crate::stream::Stream;

/// What pre-login came to.
#[derive(Debug)]
pub enum Outcome {
    /// LOGIN or AUTHENTICATE with well-formed credentials: the session routes, dials and
    /// answers; on failure it calls `login_failed` and pre-login goes on.
    Login(LoginRequest),
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

/// A login to route and replay. Credentials are secrets: never logged.
#[derive(Debug)]
pub struct LoginRequest {
    pub tag: String,
    pub credentials: Credentials,
}

/// What answering one command came to, for the pre-login loop.
enum Attempt {
    Login {
        tag: String,
        credentials: Credentials,
    },
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

/// The pre-login server on one connection (a new one after STARTTLS: nothing read before the
/// handshake survives it).
pub struct Prelogin {
    reader: CommandReader,
    client_id: Vec<(String, String)>,
    failures: u32,
    /// Syntax errors since the last command that parsed.
    bad_in_a_row: u32,
    policy: Policy,
}

impl Prelogin {
    /// Pre-login on `client`, greeting first when `greet` (not after STARTTLS).
    pub async fn start(client: &mut Stream, session: &Session, greet: bool) -> io::Result<Self> {
        let config = &session.snapshot.config;
        let listener = session.listener();
        let tls = client.is_tls();
        let policy = Policy {
            starttls: matches!(listener.tls, ListenerTls::Starttls(_)) && !tls,
            auth: tls || listener.plaintext_auth_allowed(session.peer.ip(), session.client_unknown),
        };
        if greet {
            let caps =
                response::capabilities(policy.starttls, policy.auth, &config.auth_mechanisms);
            client
                .write_all(&response::greeting(&caps, &config.greeting))
                .await?;
        }
        Ok(Prelogin {
            reader: CommandReader::new(config.limits.line_max, config.limits.literal_max),
            client_id: Vec::new(),
            failures: 0,
            bad_in_a_row: 0,
            policy,
        })
    }

    /// A login failed (the backend said NO, or the credentials were malformed): counted, and
    /// after `limits.login_attempts` of them, BYE.
    pub async fn login_failed(
        &mut self,
        client: &mut Stream,
        session: &Session,
    ) -> io::Result<Option<Closed>> {
        self.failures += 1;
        if self.failures < session.snapshot.config.limits.login_attempts {
            return Ok(None);
        }
        session.services.metrics.rejected(Rejection::LoginAttempts);
        let closed = bye(
            client,
            "",
            "Too many failed logins.",
            EndReason::LoginAttempts,
        )
        .await?;
        Ok(Some(closed))
    }

    /// The client's own ID fields, filtered, for the backend's ID.
    /// This connection's login attempts so far, the one being made included.
    pub fn attempt(&self) -> u32 {
        self.failures + 1
    }

    pub fn client_id(&self) -> &[(String, String)] {
        &self.client_id
    }

    /// The reader, for the SASL lines of a relayed exchange (`dial::relay_exchange`): they are
    /// read under the same line cap as every pre-login line.
    pub fn reader(&mut self) -> &mut CommandReader {
        &mut self.reader
    }

    /// What the client sent behind its login command: after a successful login it belongs to
    /// the backend.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.reader.take_buffered()
    }

    /// Answers commands until a login is to be made, STARTTLS begins, or the connection ends.
    pub async fn next(&mut self, client: &mut Stream, session: &Session) -> io::Result<Outcome> {
        loop {
            let parsed = match self.reader.step() {
                Step::Command(parsed) => parsed,
                Step::NeedMore => {
                    // Answers so far must be out before we wait (TLS buffers writes).
                    client.flush().await?;
                    if self.reader.read_from(client).await? == 0 {
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
                    session.services.metrics.rejected(Rejection::Syntax);
                    let tag = tag.as_deref().unwrap_or("*");
                    client
                        .write_all(&response::tagged(
                            tag,
                            Status::Bad,
                            "",
                            "Syntax error in command.",
                        ))
                        .await?;
                    // Garbage (a port scanner, another protocol) is not answered forever.
                    self.bad_in_a_row += 1;
                    if self.bad_in_a_row >= session.snapshot.config.limits.bad_commands {
                        session.services.metrics.rejected(Rejection::BadCommands);
                        return bye(
                            client,
                            "",
                            "Too many invalid commands.",
                            EndReason::BadCommands,
                        )
                        .await;
                    }
                    continue;
                }
                Step::LiteralRefused { tag } => {
                    session
                        .services
                        .metrics
                        .rejected(Rejection::LiteralTooLarge);
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
                    session.services.metrics.rejected(Rejection::LineTooLong);
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
                        .rejected(Rejection::LiteralTooLarge);
                    return bye(
                        client,
                        "LIMIT",
                        "Literal too large.",
                        EndReason::LiteralTooLarge,
                    )
                    .await;
                }
            };

            self.bad_in_a_row = 0;
            match handle(
                client,
                session,
                self.policy,
                &mut self.reader,
                &mut self.client_id,
                parsed,
            )
            .await?
            {
                Ok(Attempt::Login { tag, credentials }) => {
                    client.flush().await?;
                    return Ok(Outcome::Login(LoginRequest { tag, credentials }));
                }
                Ok(Attempt::StartTls) => return Ok(Outcome::StartTls),
                Ok(Attempt::Failed) => {
                    if let Some(closed) = self.login_failed(client, session).await? {
                        return Ok(Outcome::Closed(closed));
                    }
                }
                Ok(Attempt::Answered) => {}
                Err(closed) => return Ok(Outcome::Closed(closed)),
            }
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
            .rejected(Rejection::PrivacyRequired);
        let text = "Plaintext authentication is disabled; use STARTTLS or port 993.";
        client
            .write_all(&answer(Status::No, "PRIVACYREQUIRED", text))
            .await?;
        return Ok(Ok(Attempt::Answered));
    }
    let credentials = match command {
        PreloginCommand::Capability => {
            let caps = response::capabilities(
                policy.starttls,
                policy.auth,
                &session.snapshot.config.auth_mechanisms,
            );
            client.write_all(&response::capability(&caps, &tag)).await?;
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
            session.services.metrics.rejected(Rejection::NeedsLogin);
            debug!(session = %session.id, command = name, "command before login");
            client
                .write_all(&answer(Status::Bad, "", "Log in first."))
                .await?;
            return Ok(Ok(Attempt::Answered));
        }
        PreloginCommand::Login { user, password } => {
            Credentials::from_login(Mechanism::Login, user, password).map_err(Refused::from)
        }
        PreloginCommand::Authenticate {
            mechanism,
            initial_response,
        } => match sasl_exchange(
            client,
            reader,
            &session.snapshot.config.auth_mechanisms,
            &mechanism,
            initial_response,
        )
        .await?
        {
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
                    .rejected(Rejection::UnsupportedMechanism);
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
                session.services.metrics.rejected(Rejection::LineTooLong);
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
        Err(Refused { status, code, text }) => {
            session.services.metrics.rejected(Rejection::BadCredentials);
            client.write_all(&answer(status, code, text)).await?;
            return Ok(Ok(Attempt::Failed));
        }
    };
    Ok(Ok(Attempt::Login { tag, credentials }))
}

/// Longest client ID field (name or value) passed on. RFC 2971 allows 1,024 octets, but
/// Dovecot's pre-login parser takes arguments of ~1 KB at most (quotes and escapes counted),
/// and a backend that drops the connection over an ID makes the login fail; real clients'
/// fields ("Thunderbird", "115.3.1") are short.
const ID_FIELD_FORWARD_MAX: usize = 256;

/// The client's ID fields that may go on to the backend: printable ASCII of at most
/// `ID_FIELD_FORWARD_MAX` octets, no more than fit beside imapgate's own in RFC 2971's 30
/// pairs, and never an `x-` field, which a backend may trust (x-originating-ip, ...): those
/// only imapgate sets.
fn forwardable_id(fields: Vec<(String, Option<String>)>) -> Vec<(String, String)> {
    let printable =
        |s: &str| s.len() <= ID_FIELD_FORWARD_MAX && s.bytes().all(|c| (0x20..0x7f).contains(&c));
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
    Credentials(Result<Credentials, Refused>),
    Cancelled,
    Unsupported,
    TooLong,
    ClientGone,
}

/// Runs the AUTHENTICATE exchange for PLAIN and LOGIN; for a relayed mechanism, reads only
/// its first message (the rest of the exchange is relayed between client and backend by the
/// dial, `dial::relay_exchange`). A mechanism not in `auth.mechanisms` (CRAM-MD5, DIGEST-MD5,
/// `-PLUS`, anything else) is unsupported.
async fn sasl_exchange<S>(
    client: &mut S,
    reader: &mut CommandReader,
    enabled: &[AuthMechanism],
    mechanism: &str,
    initial_response: Option<Secret<Vec<u8>>>,
) -> io::Result<Sasl>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mechanism) = AuthMechanism::from_name(mechanism).filter(|m| enabled.contains(m))
    else {
        return Ok(Sasl::Unsupported);
    };
    let relayed = match mechanism {
        AuthMechanism::XOAuth2 => Some(Mechanism::XOAuth2),
        AuthMechanism::OAuthBearer => Some(Mechanism::OAuthBearer),
        AuthMechanism::ScramSha1 => Some(Mechanism::ScramSha1),
        AuthMechanism::ScramSha256 => Some(Mechanism::ScramSha256),
        AuthMechanism::Plain | AuthMechanism::Login => None,
    };
    if let Some(relayed) = relayed {
        // The client speaks first in all of them: an empty challenge asks for that message.
        let message = match initial_response {
            Some(ir) => ir,
            None => match sasl_step(client, reader, "").await? {
                Ok(message) => message,
                Err(end) => return Ok(end),
            },
        };
        return Ok(Sasl::Credentials(Credentials::relayed(relayed, message)));
    }
    match mechanism {
        AuthMechanism::Plain => {
            let message = match initial_response {
                Some(ir) => ir,
                None => match sasl_step(client, reader, "").await? {
                    Ok(message) => message,
                    Err(end) => return Ok(end),
                },
            };
            Ok(Sasl::Credentials(
                Credentials::from_plain(&message).map_err(Refused::from),
            ))
        }
        // LOGIN: the relayed ones have returned above.
        _ => {
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
            Ok(Sasl::Credentials(
                Credentials::from_login(Mechanism::SaslLogin, user.expose().clone(), password)
                    .map_err(Refused::from),
            ))
        }
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
                    Err(why) => Err(Sasl::Credentials(Err(why.into()))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A relayed mechanism: an empty `+` asks for the first message, which is checked for its
    /// user only and kept whole; mechanisms not enabled, CRAM-MD5 and -PLUS are unsupported.
    #[tokio::test]
    async fn relayed_mechanisms_read_the_first_message_only() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut reader = CommandReader::new(1024, 1024);
        let enabled = [AuthMechanism::Plain, AuthMechanism::ScramSha256];
        client
            .write_all(b"biwsbj1hPTJDYixyPWFiYw==\r\n")
            .await
            .unwrap();
        let sasl = sasl_exchange(&mut server, &mut reader, &enabled, "SCRAM-SHA-256", None)
            .await
            .unwrap();
        let Sasl::Credentials(Ok(c)) = sasl else {
            panic!("SCRAM's first message did not decode");
        };
        assert_eq!(
            (c.mechanism, c.user.as_str()),
            (Mechanism::ScramSha256, "a,b")
        );
        assert_eq!(c.password.expose(), b"n,,n=a=2Cb,r=abc");
        let mut challenge = [0u8; 4];
        client.read_exact(&mut challenge).await.unwrap();
        assert_eq!(&challenge, b"+ \r\n");

        let ir = || Some(Secret::new(b"user=a\x01auth=Bearer t\x01\x01".to_vec()));
        for name in [
            "XOAUTH2",
            "CRAM-MD5",
            "DIGEST-MD5",
            "SCRAM-SHA-256-PLUS",
            "LOGIN",
        ] {
            let sasl = sasl_exchange(&mut server, &mut reader, &enabled, name, ir())
                .await
                .unwrap();
            assert!(matches!(sasl, Sasl::Unsupported), "{name}");
        }
        let sasl = sasl_exchange(
            &mut server,
            &mut reader,
            &enabled,
            "SCRAM-SHA-256",
            Some(Secret::new(b"p=tls-unique,,n=a,r=b".to_vec())),
        )
        .await
        .unwrap();
        let Sasl::Credentials(Err(refused)) = sasl else {
            panic!("p= must be refused");
        };
        assert_eq!(refused.status, Status::No);
    }

    #[test]
    fn only_short_plain_fields_are_forwarded() {
        let long = "v".repeat(ID_FIELD_FORWARD_MAX + 1);
        let fields = vec![
            ("name".to_string(), Some("Thunderbird".to_string())),
            (
                "x-originating-ip".to_string(),
                Some("203.0.113.9".to_string()),
            ),
            ("os".to_string(), Some(long)),
            ("vendor".to_string(), None),
            ("support-url".to_string(), Some("tab\there".to_string())),
        ];
        assert_eq!(
            forwardable_id(fields),
            vec![("name".to_string(), "Thunderbird".to_string())]
        );
    }
}
