//! Login replay on a reached backend: the only place where imapgate logs in as a client.
//!
//! ```text
//! backend::connect ─► backend::open (PROXY, TLS, greeting, STARTTLS, capabilities)
//!   ─► [ID with the client's address, forward_id] ─► replay the login ─► tagged answer
//!   ─► [OK without "[CAPABILITY ...]": CAPABILITY, its list put into the client's OK]
//!   before the login is sent (timeouts.backend_greeting): refused, silence, a bad certificate,
//!   "* BYE" greeting → another backend may be tried (DialError::BeforeLogin);
//!   after it (timeouts.backend_login): "* BYE", silence, close → unavailable, and the
//!   credentials go nowhere else (DialError::AfterLogin)
//! ```
//!
//! The login is replayed as it came: LOGIN as LOGIN (quoted when that is exact and short, else
//! a literal, `{n+}` when the backend offers LITERAL+), AUTHENTICATE PLAIN as PLAIN (with SASL-IR
//! when offered), so an authzid reaches the backend and the backend decides; AUTHENTICATE LOGIN
//! as AUTHENTICATE LOGIN where the backend offers AUTH=LOGIN, else as LOGIN. The backend's tagged
//! answer is returned without its tag, to be sent on with the client's.
//!
//! A relayed mechanism (XOAUTH2, OAUTHBEARER, SCRAM-SHA-*) goes as the client's first message
//! (SASL-IR where offered, else after the backend's `+`); then every `+` line the backend sends
//! goes to the client verbatim and the client's answer line back (`relay_exchange`), at most
//! `SASL_ROUND_TRIPS` times, each line under the pre-login line cap, the whole exchange under
//! `timeouts.backend_login`: SCRAM's server-first/client-final/server-final, OAuth's error JSON and
//! the client's `AQ==`. A `*` from the client goes on and the backend's BAD comes back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::{self, BackendError, Conn, LINE_MAX, ProxyOut, printable};
use crate::config::Backend;
use crate::imap::command::CommandReader;
use crate::imap::response;
use crate::imap::sasl::{self, AuthMechanism, Credentials, Mechanism};
use crate::stream::Stream;

/// How many `+` round trips a relayed SASL exchange may take after its first message: SCRAM
/// needs two (server-first, server-final), an OAuth failure one.
const SASL_ROUND_TRIPS: usize = 4;

/// The client's side of a login, for the lines of a relayed SASL exchange.
pub struct ClientSide<'a> {
    pub stream: &'a mut Stream,
    /// Pre-login's reader: what the client sent is read under its line cap.
    pub reader: &'a mut CommandReader,
}

/// How a relayed exchange ended on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEnd {
    /// The client closed (or its socket failed) mid-exchange.
    Gone,
    /// A SASL line over `limits.line_max`.
    TooLong,
}

/// The tag of the login command towards backends.
const TAG: &str = "ig1";
/// The tag of the CAPABILITY sent after the login, when the backend's OK had none.
const POST_TAG: &str = "ig2";
/// How long that CAPABILITY may take before the client is told the baseline instead.
const CAPABILITY_WAIT: Duration = Duration::from_secs(5);
/// The tag of the LOGOUT that ends a backend login no client gets (`log_out`).
const LOGOUT_TAG: &str = "ig3";
/// How long that LOGOUT may take.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

/// A backend connection that accepted the login, handed to the relay.
#[derive(Debug)]
pub struct BackendSession {
    pub stream: Stream,
    /// Untagged responses the backend sent during the login, to be passed to the client.
    pub untagged: Vec<u8>,
    /// The tagged answer without the tag: `OK [CAPABILITY ...] Logged in\r\n`.
    pub tagged_rest: Vec<u8>,
    /// Bytes the backend sent after its tagged OK; they belong to the client.
    pub buffered: Vec<u8>,
}

#[derive(Debug)]
pub enum LoginOutcome {
    LoggedIn(BackendSession),
    /// The backend said NO or BAD; `tagged_rest` is its answer without the tag.
    Rejected {
        tagged_rest: Vec<u8>,
    },
    /// The client left a relayed exchange (or broke its line cap) before the backend answered.
    Client(ClientEnd),
}

/// Who the client is, for the PROXY header and the ID fields sent to backends.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    pub session_id: super::SessionId,
    /// The client's own ID fields (already filtered), merged into ours.
    pub client_id: Vec<(String, String)>,
}

/// Why a dial failed, split at the moment the credentials were sent: before it another
/// backend may be tried; after it the backend may have seen them, and they are never replayed
/// elsewhere.
#[derive(Debug)]
pub enum DialError {
    BeforeLogin(BackendError),
    AfterLogin(BackendError),
}

impl DialError {
    pub fn error(&self) -> &BackendError {
        match self {
            DialError::BeforeLogin(e) | DialError::AfterLogin(e) => e,
        }
    }
}

/// Everything after the TCP connect: reach the backend (PROXY, TLS, greeting, capabilities,
/// ID) within `greeting`, then replay the login and read its answer within `login`.
pub async fn replay(
    tcp: TcpStream,
    backend: &Backend,
    credentials: &Credentials,
    identity: &Identity,
    (greeting, login): (Duration, Duration),
    client: ClientSide<'_>,
) -> Result<LoginOutcome, DialError> {
    let (conn, caps) = tokio::time::timeout(greeting, reach(tcp, backend, identity))
        .await
        .map_err(|_| BackendError::GreetingTimeout(greeting))
        .and_then(|r| r)
        .map_err(DialError::BeforeLogin)?;
    tokio::time::timeout(login, log_in(conn, caps, credentials, client))
        .await
        .map_err(|_| BackendError::LoginTimeout(login))
        .and_then(|r| r)
        .map_err(DialError::AfterLogin)
}

/// The backend, ready for the login: opened (PROXY header, TLS, greeting, STARTTLS,
/// capabilities) and told who the client is (ID) where configured.
async fn reach(
    tcp: TcpStream,
    backend: &Backend,
    identity: &Identity,
) -> Result<(Conn, backend::Capabilities), BackendError> {
    let proxy = ProxyOut::Client {
        client: identity.client,
        local: identity.local,
    };
    let (mut conn, caps) = backend::open(tcp, backend, proxy).await?;
    if backend.forward_id {
        // The answer does not matter: a backend that ignores ID still takes the login.
        conn.command(&id_command(identity)).await?;
    }
    Ok((conn, caps))
}

async fn log_in(
    mut conn: Conn,
    caps: backend::Capabilities,
    credentials: &Credentials,
    mut client: ClientSide<'_>,
) -> Result<LoginOutcome, BackendError> {
    let mut untagged = Vec::new();
    let relayed = credentials.mechanism.relayed();
    let parts = match (credentials.mechanism, relayed) {
        (_, Some(mechanism)) => relayed_command(mechanism, credentials, caps.sasl_ir),
        (Mechanism::Plain, _) => plain_command(credentials, caps.sasl_ir),
        (Mechanism::SaslLogin, _) if caps.auth_login => {
            sasl_login_command(credentials, caps.sasl_ir)
        }
        // A backend without AUTH=LOGIN still takes the same user and password as LOGIN.
        _ => login_command(
            credentials.user.as_bytes(),
            credentials.password.expose(),
            caps.literal_plus,
        ),
    };
    // Each part but the last ends where the backend must say "+" before we go on.
    let last = parts.len() - 1;
    for (i, part) in parts.iter().enumerate() {
        conn.stream.write_all(part).await?;
        conn.stream.flush().await?;
        if i == last {
            break;
        }
        match tagged_or_continuation(&mut conn, &mut untagged).await? {
            Answer::Continuation(_) => {}
            Answer::Tagged(rest) => return Ok(LoginOutcome::Rejected { tagged_rest: rest }),
        }
    }
    let mut round_trips = 0;
    let answer = loop {
        match tagged_or_continuation(&mut conn, &mut untagged).await? {
            Answer::Continuation(line) if relayed.is_some() && round_trips < SASL_ROUND_TRIPS => {
                round_trips += 1;
                if let Err(end) = relay_exchange(&mut conn, &line, &mut client).await? {
                    return Ok(LoginOutcome::Client(end));
                }
            }
            answer => break answer,
        }
    };
    match answer {
        Answer::Tagged(mut rest) if backend::is_ok(&rest) => {
            let mut buffered = Vec::new();
            if backend::capabilities_in(&rest).is_none() {
                tell_capabilities(&mut conn, &mut untagged, &mut rest, &mut buffered).await?;
            }
            buffered.append(&mut conn.buf);
            Ok(LoginOutcome::LoggedIn(BackendSession {
                stream: conn.stream,
                untagged,
                tagged_rest: rest,
                buffered,
            }))
        }
        Answer::Tagged(rest) => Ok(LoginOutcome::Rejected { tagged_rest: rest }),
        Answer::Continuation(_) => Err(BackendError::Protocol(
            "unexpected continuation after the login was sent".into(),
        )),
    }
}

/// One round trip of a relayed SASL exchange: the backend's `+` line to the client as it came,
/// the client's answer line to the backend. An answer that is neither base64 nor `*` becomes
/// `*`, so the backend ends the exchange with its BAD (and nothing but SASL data ever reaches it
/// as such a line). The lines are secrets (SCRAM proofs, tokens): never logged.
async fn relay_exchange(
    conn: &mut Conn,
    continuation: &[u8],
    client: &mut ClientSide<'_>,
) -> Result<Result<(), ClientEnd>, BackendError> {
    let sent = async {
        client.stream.write_all(continuation).await?;
        client.stream.flush().await
    };
    if sent.await.is_err() {
        return Ok(Err(ClientEnd::Gone));
    }
    let line = loop {
        match client.reader.take_line() {
            Ok(Some(line)) => break line,
            Ok(None) => match client.reader.read_from(client.stream).await {
                Ok(0) | Err(_) => return Ok(Err(ClientEnd::Gone)),
                Ok(_) => {}
            },
            Err(_too_long) => return Ok(Err(ClientEnd::TooLong)),
        }
    };
    let mut out = if is_sasl_line(&line) {
        line
    } else {
        b"*".to_vec()
    };
    out.extend_from_slice(b"\r\n");
    conn.stream.write_all(&out).await?;
    conn.stream.flush().await?;
    Ok(Ok(()))
}

/// A client's line in a SASL exchange: base64 (empty included) or `*`.
fn is_sasl_line(line: &[u8]) -> bool {
    line == b"*"
        || line
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
}

/// `ig1 AUTHENTICATE <mechanism>` with the client's first message: SASL-IR when the backend
/// offers it, else after its `+`.
fn relayed_command(
    mechanism: AuthMechanism,
    credentials: &Credentials,
    sasl_ir: bool,
) -> Vec<Vec<u8>> {
    let name = mechanism.name();
    let encoded = sasl::encode(credentials.password.expose());
    if sasl_ir {
        vec![format!("{TAG} AUTHENTICATE {name} {encoded}\r\n").into_bytes()]
    } else {
        vec![
            format!("{TAG} AUTHENTICATE {name}\r\n").into_bytes(),
            format!("{encoded}\r\n").into_bytes(),
        ]
    }
}

/// Logs out of a backend session that will not be relayed (the backend accepted the login,
/// imapgate refused it after): LOGOUT, then read until the backend closes, under
/// `LOGOUT_WAIT`, so the backend sees a clean logout rather than a dropped connection.
pub async fn log_out(mut backend: BackendSession) {
    let _ = tokio::time::timeout(LOGOUT_WAIT, async {
        let logout = format!("{LOGOUT_TAG} LOGOUT\r\n");
        backend.stream.write_all(logout.as_bytes()).await?;
        backend.stream.flush().await?;
        let mut discard = [0u8; 512];
        while backend.stream.read(&mut discard).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn tagged_or_continuation(
    conn: &mut Conn,
    untagged: &mut Vec<u8>,
) -> Result<Answer, BackendError> {
    loop {
        let line = conn.read_line("during the login").await?;
        if line.starts_with(b"+") {
            return Ok(Answer::Continuation(line));
        }
        if let Some(rest) = line
            .strip_prefix(TAG.as_bytes())
            .and_then(|r| r.strip_prefix(b" "))
        {
            return Ok(Answer::Tagged(rest.to_vec()));
        }
        if line.starts_with(b"* BYE") {
            return Err(BackendError::Refused(printable(&line)));
        }
        if untagged.len() + line.len() > LINE_MAX {
            return Err(BackendError::Protocol(
                "too many untagged responses during login".into(),
            ));
        }
        untagged.extend_from_slice(&line);
    }
}

/// The backend's OK carried no `[CAPABILITY ...]` code (Courier's does not). The client
/// would keep imapgate's pre-login list (or what it assumed before login) and send what this backend
/// cannot take: Courier answers a `{n+}` it does not know with NO and then runs the
/// literal's lines as commands. So ask the backend, now logged in, and hand its list on:
/// as the OK's response code, or, when the OK has another code, as an untagged CAPABILITY
/// before it. Untagged lines the backend sends meanwhile go to the client after the OK.
async fn tell_capabilities(
    conn: &mut Conn,
    untagged: &mut Vec<u8>,
    ok: &mut Vec<u8>,
    after_ok: &mut Vec<u8>,
) -> Result<(), BackendError> {
    // A backend that cannot say what it has after login gets the baseline only: the client is
    // promised nothing the backend may lack.
    // A backend that accepted the login and then says nothing must not turn the login into a
    // timeout (with failover, the credentials would go to the next backend).
    let asked = tokio::time::timeout(CAPABILITY_WAIT, ask_capabilities(conn, after_ok)).await;
    let list = asked
        .unwrap_or(Ok(None))?
        .unwrap_or_else(|| b"IMAP4rev1".to_vec());
    let text = ok.get(2..).unwrap_or_default();
    let text = text.strip_prefix(b" ").unwrap_or(text);
    if text.starts_with(b"[") {
        untagged.extend_from_slice(b"* CAPABILITY ");
        untagged.extend_from_slice(&list);
        untagged.extend_from_slice(b"\r\n");
    } else {
        let text = if text.trim_ascii().is_empty() {
            &b"Logged in.\r\n"[..]
        } else {
            text
        };
        let mut with_code = Vec::with_capacity(list.len() + text.len() + 20);
        with_code.extend_from_slice(b"OK [CAPABILITY ");
        with_code.extend_from_slice(&list);
        with_code.extend_from_slice(b"] ");
        with_code.extend_from_slice(text);
        *ok = with_code;
    }
    Ok(())
}

/// `ig2 CAPABILITY` on a logged-in backend connection: its list, or `None` when it answers
/// anything but OK with a list, says BYE, or goes away. The login stands either way (the
/// backend accepted it; a BYE or a close reaches the client through the relay): only a backend
/// that floods untagged lines is an error.
async fn ask_capabilities(
    conn: &mut Conn,
    after_ok: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, BackendError> {
    let asked = async {
        conn.stream
            .write_all(format!("{POST_TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        conn.stream.flush().await
    };
    if asked.await.is_err() {
        return Ok(None);
    }
    let mut list = None;
    loop {
        let Ok(line) = conn.read_line("after the login").await else {
            return Ok(None);
        };
        if let Some(rest) = line
            .strip_prefix(POST_TAG.as_bytes())
            .and_then(|r| r.strip_prefix(b" "))
        {
            return Ok(list.filter(|_| backend::is_ok(rest)));
        }
        if let Some(caps) = backend::strip_prefix_ignore_case(&line, b"* CAPABILITY ") {
            list = Some(caps.trim_ascii_end().to_vec());
            continue;
        }
        if after_ok.len() + line.len() > LINE_MAX {
            return Err(BackendError::Protocol(
                "too many untagged responses after the login".into(),
            ));
        }
        after_ok.extend_from_slice(&line);
        if backend::strip_prefix_ignore_case(&line, b"* BYE").is_some() {
            return Ok(None);
        }
    }
}

/// imapgate's own ID fields (`id_command`).
const OWN_ID_FIELDS: usize = 6;
/// How many of the client's ID fields go on beside ours: RFC 2971 allows 30 pairs in all.
pub(crate) const CLIENT_ID_FIELDS: usize = 30 - OWN_ID_FIELDS;

enum Answer {
    /// The `+` line, CRLF included.
    Continuation(Vec<u8>),
    /// The tagged line without `TAG `, CRLF included.
    Tagged(Vec<u8>),
}

/// `ID (...)`: Dovecot's trusted fields (honoured from `login_trusted_networks`), then the
/// client's own fields.
fn id_command(identity: &Identity) -> Vec<u8> {
    let ours: [_; OWN_ID_FIELDS] = [
        (
            "x-originating-ip",
            identity.client.ip().to_canonical().to_string(),
        ),
        ("x-originating-port", identity.client.port().to_string()),
        (
            "x-connected-ip",
            identity.local.ip().to_canonical().to_string(),
        ),
        ("x-connected-port", identity.local.port().to_string()),
        ("x-session-id", identity.session_id.to_string()),
        ("x-proxy-ttl", "5".to_string()),
    ];
    let mut fields: Vec<String> = Vec::new();
    for (k, v) in ours.iter().map(|(k, v)| (*k, v.as_str())).chain(
        identity
            .client_id
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    ) {
        fields.push(response::quoted(k));
        fields.push(response::quoted(v));
    }
    format!("ID ({})", fields.join(" ")).into_bytes()
}

/// `ig1 AUTHENTICATE PLAIN ...`, in one part with SASL-IR or two without. A long initial
/// response stays on the command line: Dovecot reads an AUTHENTICATE line (the mechanism
/// aside) into its SASL buffer (8 KiB), the same one a response after `+` goes to, not into
/// the small buffer LOGIN's arguments share; waiting for `+` would only cost a round trip.
fn plain_command(credentials: &Credentials, sasl_ir: bool) -> Vec<Vec<u8>> {
    let encoded = sasl::encode(credentials.plain_message().expose());
    if sasl_ir {
        vec![format!("{TAG} AUTHENTICATE PLAIN {encoded}\r\n").into_bytes()]
    } else {
        vec![
            format!("{TAG} AUTHENTICATE PLAIN\r\n").into_bytes(),
            format!("{encoded}\r\n").into_bytes(),
        ]
    }
}

/// `ig1 AUTHENTICATE LOGIN`: the user, then the password, each after the backend's `+`
/// (the user on the command line with SASL-IR).
fn sasl_login_command(credentials: &Credentials, sasl_ir: bool) -> Vec<Vec<u8>> {
    let user = sasl::encode(credentials.user.as_bytes());
    let password = format!("{}\r\n", sasl::encode(credentials.password.expose())).into_bytes();
    if sasl_ir {
        vec![
            format!("{TAG} AUTHENTICATE LOGIN {user}\r\n").into_bytes(),
            password,
        ]
    } else {
        vec![
            format!("{TAG} AUTHENTICATE LOGIN\r\n").into_bytes(),
            format!("{user}\r\n").into_bytes(),
            password,
        ]
    }
}

/// `ig1 LOGIN user password`, split after every synchronizing literal.
pub(crate) fn login_command(user: &[u8], password: &[u8], literal_plus: bool) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut current = format!("{TAG} LOGIN ").into_bytes();
    for (i, value) in [user, password].into_iter().enumerate() {
        if i == 1 {
            current.push(b' ');
        }
        if quotable(value) {
            current.push(b'"');
            for &c in value {
                if c == b'"' || c == b'\\' {
                    current.push(b'\\');
                }
                current.push(c);
            }
            current.push(b'"');
        } else if literal_plus {
            current.extend_from_slice(format!("{{{}+}}\r\n", value.len()).as_bytes());
            current.extend_from_slice(value);
        } else {
            current.extend_from_slice(format!("{{{}}}\r\n", value.len()).as_bytes());
            parts.push(std::mem::take(&mut current));
            current.extend_from_slice(value);
        }
    }
    current.extend_from_slice(b"\r\n");
    parts.push(current);
    parts
}

/// The longest quoted string (quotes and backslashes included) a login is replayed with; a
/// longer value goes as a literal. Backends read pre-login arguments into small buffers: Dovecot
/// 2.3 holds 1,026 octets and answers more with `* BYE Input buffer full`, and in quotes every
/// `"` and `\` of a password doubles. A literal carries the octets as they are, its size
/// announced first. 200 is far above any real user name or password, far below those buffers.
const QUOTED_MAX: usize = 200;

/// Whether `value` goes as a quoted string: quoted strings carry 7-bit text without CR, LF or
/// NUL (printable ASCII only here, the same with every backend), and only up to `QUOTED_MAX`
/// octets as written; anything else goes as a literal.
fn quotable(value: &[u8]) -> bool {
    let escapes = value.iter().filter(|&&c| c == b'"' || c == b'\\').count();
    value.len() + escapes + 2 <= QUOTED_MAX && value.iter().all(|&c| (0x20..0x7f).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_messages_go_as_they_came() {
        let c = Credentials::relayed(
            Mechanism::OAuthBearer,
            crate::imap::secret::Secret::new(b"n,a=u,\x01auth=Bearer t\x01\x01".to_vec()),
        )
        .unwrap();
        let ir = sasl::encode(b"n,a=u,\x01auth=Bearer t\x01\x01");
        assert_eq!(
            relayed_command(AuthMechanism::OAuthBearer, &c, true),
            [format!("ig1 AUTHENTICATE OAUTHBEARER {ir}\r\n").into_bytes()]
        );
        assert_eq!(
            relayed_command(AuthMechanism::OAuthBearer, &c, false),
            [
                b"ig1 AUTHENTICATE OAUTHBEARER\r\n".to_vec(),
                format!("{ir}\r\n").into_bytes()
            ]
        );
        // What a client's line in the exchange may be; anything else goes on as `*`.
        for ok in [&b""[..], b"*", b"AQ==", b"Yz1iaXdzLHI9YWJj+/=="] {
            assert!(is_sasl_line(ok), "{ok:?}");
        }
        for bad in [&b"**"[..], b"a b", b"x\r", b"ig1 LOGOUT", b"\xff"] {
            assert!(!is_sasl_line(bad), "{bad:?}");
        }
    }

    fn joined(parts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        parts.to_vec()
    }

    #[test]
    fn login_encodings() {
        assert_eq!(
            joined(&login_command(b"alice", b"a \"b\" \\c", false)),
            vec![b"ig1 LOGIN \"alice\" \"a \\\"b\\\" \\\\c\"\r\n".to_vec()]
        );
        assert_eq!(
            joined(&login_command(b"alice", "pä".as_bytes(), true)),
            vec![b"ig1 LOGIN \"alice\" {3+}\r\np\xc3\xa4\r\n".to_vec()]
        );
        assert_eq!(
            joined(&login_command("ä".as_bytes(), b"x\r\ny", false)),
            vec![
                b"ig1 LOGIN {2}\r\n".to_vec(),
                b"\xc3\xa4 {4}\r\n".to_vec(),
                b"x\r\ny\r\n".to_vec()
            ]
        );
    }

    /// A long value goes as a literal even when it is printable ASCII: quoted, it could overflow
    /// a backend's pre-login buffer (Dovecot: `* BYE Input buffer full`).
    #[test]
    fn long_values_go_as_literals() {
        let long = "x\"\\".repeat(334)[..1000].to_string();
        assert_eq!(
            login_command(b"bob", long.as_bytes(), true),
            vec![format!("ig1 LOGIN \"bob\" {{1000+}}\r\n{long}\r\n").into_bytes()]
        );
        assert_eq!(
            login_command(b"bob", long.as_bytes(), false),
            vec![
                b"ig1 LOGIN \"bob\" {1000}\r\n".to_vec(),
                format!("{long}\r\n").into_bytes()
            ]
        );
        // A long user name too.
        let user = "u".repeat(300);
        assert_eq!(
            login_command(user.as_bytes(), b"pw", false),
            vec![
                b"ig1 LOGIN {300}\r\n".to_vec(),
                format!("{user} \"pw\"\r\n").into_bytes()
            ]
        );
        // The limit counts the quoted string as written: quotes and escapes included.
        let fits = "a".repeat(QUOTED_MAX - 2);
        assert_eq!(
            login_command(b"bob", fits.as_bytes(), false),
            vec![format!("ig1 LOGIN \"bob\" \"{fits}\"\r\n").into_bytes()]
        );
        // Without its escape this one would fit too.
        let escaped = format!("{}\\", "a".repeat(QUOTED_MAX - 3));
        assert_eq!(
            login_command(b"bob", escaped.as_bytes(), true),
            vec![
                format!("ig1 LOGIN \"bob\" {{{}+}}\r\n{escaped}\r\n", QUOTED_MAX - 2).into_bytes()
            ]
        );
    }
}
