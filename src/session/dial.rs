//! Dial: the only place where imapgate speaks IMAP as a client.
//!
//! ```text
//! connect (timeouts.backend_connect) ─► [PROXY header] ─► [TLS handshake, tls: implicit]
//!   └─► greeting "* OK" ─► [STARTTLS, tls: starttls] ─► [CAPABILITY, when not known]
//!        ─► [ID with the client's address, forward_id] ─► replay the login ─► tagged answer
//!        ─► [OK without "[CAPABILITY ...]": CAPABILITY, its list put into the client's OK]
//!   "* BYE" / "* PREAUTH" / silence / close / a bad certificate: unavailable (timeouts.backend_login)
//! ```
//!
//! After the backend's OK to STARTTLS anything it sent before the handshake is discarded, and
//! the capabilities are asked for again over TLS.
//!
//! The login is replayed as it came: LOGIN as LOGIN (quoted when that is exact, else a literal,
//! `{n+}` when the backend offers LITERAL+), AUTHENTICATE PLAIN as PLAIN (with SASL-IR when
//! offered), so an authzid reaches the backend and the backend decides; AUTHENTICATE LOGIN as
//! AUTHENTICATE LOGIN where the backend offers AUTH=LOGIN, else as LOGIN. The backend's tagged
//! answer is returned without its tag, to be sent on with the client's.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use crate::config::{Backend, BackendTls, SendProxy};
use crate::imap::response;
use crate::imap::sasl::{self, Credentials, Mechanism};
use crate::proxy_header;

/// The tag of the login command towards backends.
const TAG: &str = "ig1";
/// The tag of everything before it (STARTTLS, CAPABILITY, ID).
const PREP_TAG: &str = "ig0";
/// The tag of the CAPABILITY sent after the login, when the backend's OK had none.
const POST_TAG: &str = "ig2";
/// Longest backend line read during dial; real greetings and answers are far shorter.
const LINE_MAX: usize = 64 * 1024;

/// A backend session that accepted the login.
#[derive(Debug)]
pub struct LoggedIn {
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
    LoggedIn(LoggedIn),
    /// The backend said NO or BAD; `tagged_rest` is its answer without the tag.
    Rejected {
        tagged_rest: Vec<u8>,
    },
}

/// Why a backend could not be used. Never carries credentials.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("greeting and login timed out after {0:?}")]
    LoginTimeout(Duration),
    #[error("backend closed the connection {0}")]
    Closed(&'static str),
    #[error("i/o error with the backend: {0}")]
    Io(#[from] io::Error),
    #[error("backend refused the session: {0}")]
    Refused(String),
    #[error("backend spoke out of protocol: {0}")]
    Protocol(String),
    #[error("TLS with the backend failed: {0}")]
    Tls(io::Error),
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

/// TCP connect, under `timeout`.
pub async fn connect(backend: &Backend, timeout: Duration) -> Result<TcpStream, DialError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(&backend.address))
        .await
        .map_err(|_| DialError::ConnectTimeout(timeout))?
        .map_err(DialError::Connect)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Everything after the TCP connect, under `timeout`.
pub async fn login(
    tcp: TcpStream,
    backend: &Backend,
    credentials: &Credentials,
    identity: &Identity,
    timeout: Duration,
) -> Result<LoginOutcome, DialError> {
    tokio::time::timeout(
        timeout,
        prepare_and_login(tcp, backend, credentials, identity),
    )
    .await
    .map_err(|_| DialError::LoginTimeout(timeout))?
}

async fn prepare_and_login(
    mut tcp: TcpStream,
    backend: &Backend,
    credentials: &Credentials,
    identity: &Identity,
) -> Result<LoginOutcome, DialError> {
    match backend.send_proxy {
        SendProxy::None => {}
        SendProxy::V1 => {
            tcp.write_all(&proxy_header::v1(identity.client, identity.local))
                .await?
        }
        SendProxy::V2 => {
            tcp.write_all(&proxy_header::v2(identity.client, identity.local)?)
                .await?
        }
    }
    let stream = match (&backend.tls, &backend.tls_client) {
        (BackendTls::Implicit, Some(tls)) => tls_connect(tcp, tls).await?,
        _ => Stream::Plain(tcp),
    };
    greet_and_login(stream, backend, credentials, identity).await
}

/// The client side of a TLS handshake with a backend.
pub(crate) async fn tls_connect(
    tcp: TcpStream,
    (config, name): &(Arc<rustls::ClientConfig>, ServerName<'static>),
) -> Result<Stream, DialError> {
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    // Boxed: the handshake's state is large, and inline it would make every login's future
    // (plain backends too) that much larger.
    let tls = Box::pin(connector.connect(name.clone(), tcp))
        .await
        .map_err(DialError::Tls)?;
    Ok(Stream::ClientTls(Box::new(tls)))
}

impl DialError {
    /// Whether the backend answered, but not as an IMAP server should.
    pub fn is_protocol(&self) -> bool {
        matches!(self, DialError::Protocol(_))
    }
}

async fn greet_and_login(
    stream: Stream,
    backend: &Backend,
    credentials: &Credentials,
    identity: &Identity,
) -> Result<LoginOutcome, DialError> {
    let mut conn = BackendConn {
        stream,
        buf: Vec::with_capacity(1024),
    };
    let greeting = conn.read_line("before its greeting").await?;
    let mut caps = if greeting.starts_with(b"* OK") {
        capabilities_in(&greeting)
    } else if greeting.starts_with(b"* BYE") {
        return Err(DialError::Refused(printable(&greeting)));
    } else {
        return Err(DialError::Protocol(format!(
            "expected a \"* OK\" greeting, got {}",
            printable(&greeting)
        )));
    };
    if let (BackendTls::Starttls, Some(tls)) = (&backend.tls, &backend.tls_client) {
        let answer = conn.command(b"STARTTLS").await?;
        if !answer.starts_with(b"OK") {
            return Err(DialError::Refused(format!(
                "STARTTLS: {}",
                printable(&answer)
            )));
        }
        // Whatever came after the OK was sent in plaintext and is not to be trusted.
        conn.buf.clear();
        let Stream::Plain(tcp) = conn.stream else {
            return Err(DialError::Protocol("STARTTLS on a TLS connection".into()));
        };
        conn.stream = tls_connect(tcp, tls).await?;
        // Capabilities from before TLS are void.
        caps = None;
    }
    let caps = match caps {
        Some(caps) => caps,
        None => conn.capability().await?,
    };
    if backend.forward_id {
        // The answer does not matter: a backend that ignores ID still takes the login.
        conn.command(&id_command(identity)).await?;
    }

    let mut untagged = Vec::new();
    let parts = match credentials.mechanism {
        Mechanism::Plain => plain_command(credentials, caps.sasl_ir),
        Mechanism::SaslLogin if caps.auth_login => sasl_login_command(credentials, caps.sasl_ir),
        // A backend without AUTH=LOGIN still takes the same user and password as LOGIN.
        Mechanism::Login | Mechanism::SaslLogin => login_command(
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
        match conn
            .read_until_tagged_or_continuation(&mut untagged)
            .await?
        {
            Answer::Continuation => {}
            Answer::Tagged(rest) => return Ok(LoginOutcome::Rejected { tagged_rest: rest }),
        }
    }
    match conn
        .read_until_tagged_or_continuation(&mut untagged)
        .await?
    {
        Answer::Tagged(mut rest) if rest.starts_with(b"OK") => {
            let mut buffered = Vec::new();
            if capabilities_in(&rest).is_none() {
                conn.tell_capabilities(&mut untagged, &mut rest, &mut buffered)
                    .await?;
            }
            buffered.append(&mut conn.buf);
            Ok(LoginOutcome::LoggedIn(LoggedIn {
                stream: conn.stream,
                untagged,
                tagged_rest: rest,
                buffered,
            }))
        }
        Answer::Tagged(rest) => Ok(LoginOutcome::Rejected { tagged_rest: rest }),
        Answer::Continuation => Err(DialError::Protocol(
            "unexpected continuation after the login was sent".into(),
        )),
    }
}

enum Answer {
    Continuation,
    /// The tagged line without `TAG `, CRLF included.
    Tagged(Vec<u8>),
}

struct BackendConn {
    stream: Stream,
    buf: Vec<u8>,
}

impl BackendConn {
    /// One line, CRLF included.
    async fn read_line(&mut self, when: &'static str) -> Result<Vec<u8>, DialError> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                return Ok(self.buf.drain(..=i).collect());
            }
            if self.buf.len() > LINE_MAX {
                return Err(DialError::Protocol(format!(
                    "line longer than {LINE_MAX} octets"
                )));
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(DialError::Closed(when));
            }
        }
    }

    async fn read_until_tagged_or_continuation(
        &mut self,
        untagged: &mut Vec<u8>,
    ) -> Result<Answer, DialError> {
        loop {
            let line = self.read_line("during the login").await?;
            if line.starts_with(b"+") {
                return Ok(Answer::Continuation);
            }
            if let Some(rest) = line
                .strip_prefix(TAG.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                return Ok(Answer::Tagged(rest.to_vec()));
            }
            if line.starts_with(b"* BYE") {
                return Err(DialError::Refused(printable(&line)));
            }
            if untagged.len() + line.len() > LINE_MAX {
                return Err(DialError::Protocol(
                    "too many untagged responses during login".into(),
                ));
            }
            untagged.extend_from_slice(&line);
        }
    }

    /// Sends `ig0 <command>` and returns the tagged answer without the tag; untagged lines
    /// in between are dropped (they answer us, not the client).
    async fn command(&mut self, command: &[u8]) -> Result<Vec<u8>, DialError> {
        let mut line = format!("{PREP_TAG} ").into_bytes();
        line.extend_from_slice(command);
        line.extend_from_slice(b"\r\n");
        self.stream.write_all(&line).await?;
        self.stream.flush().await?;
        self.untagged_until(PREP_TAG, |_| {}).await
    }

    /// Reads lines until the one tagged `tag`, handing each untagged line to `untagged`.
    async fn untagged_until(
        &mut self,
        tag: &str,
        mut untagged: impl FnMut(&[u8]),
    ) -> Result<Vec<u8>, DialError> {
        loop {
            let line = self.read_line("before the login").await?;
            if let Some(rest) = line
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                return Ok(rest.to_vec());
            }
            if line.starts_with(b"* BYE") {
                return Err(DialError::Refused(printable(&line)));
            }
            untagged(&line);
        }
    }

    /// The backend's OK carried no `[CAPABILITY ...]` code (Courier's does not). The client
    /// would keep imapgate's pre-login list, LITERAL+ among it, and send what this backend
    /// cannot take: Courier answers a `{n+}` it does not know with NO and then runs the
    /// literal's lines as commands. So ask the backend, now logged in, and hand its list on:
    /// as the OK's response code, or, when the OK has another code, as an untagged CAPABILITY
    /// before it. Untagged lines the backend sends meanwhile go to the client after the OK.
    async fn tell_capabilities(
        &mut self,
        untagged: &mut Vec<u8>,
        ok: &mut Vec<u8>,
        after_ok: &mut Vec<u8>,
    ) -> Result<(), DialError> {
        self.stream
            .write_all(format!("{POST_TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        self.stream.flush().await?;
        let mut list: Option<Vec<u8>> = None;
        let answer = loop {
            let line = self.read_line("after the login").await?;
            if let Some(rest) = line
                .strip_prefix(POST_TAG.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                break rest.to_vec();
            }
            if let Some(caps) = strip_prefix_ignore_case(&line, b"* CAPABILITY ") {
                list = Some(caps.trim_ascii_end().to_vec());
                continue;
            }
            if after_ok.len() + line.len() > LINE_MAX {
                return Err(DialError::Protocol(
                    "too many untagged responses after the login".into(),
                ));
            }
            after_ok.extend_from_slice(&line);
        };
        // A backend that cannot say what it has after login gets the baseline only: the
        // client is promised nothing the backend may lack.
        let list = match list {
            Some(list) if answer.starts_with(b"OK") => list,
            _ => b"IMAP4rev1".to_vec(),
        };
        let text = ok.strip_prefix(b"OK").unwrap_or(ok);
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

    async fn capability(&mut self) -> Result<Capabilities, DialError> {
        self.stream
            .write_all(format!("{PREP_TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        self.stream.flush().await?;
        let mut caps = Capabilities::default();
        self.untagged_until(PREP_TAG, |line| {
            if let Some(list) = line.strip_prefix(b"* CAPABILITY ") {
                caps = Capabilities::from_list(list);
            }
        })
        .await?;
        Ok(caps)
    }
}

/// The backend capabilities the login replay cares about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Capabilities {
    sasl_ir: bool,
    literal_plus: bool,
    auth_login: bool,
}

impl Capabilities {
    /// From a space-separated capability list (read in place, nothing allocated).
    fn from_list(list: &[u8]) -> Self {
        let mut caps = Capabilities::default();
        for word in list.split(|&c| c == b' ' || c == b'\r' || c == b'\n') {
            if word.eq_ignore_ascii_case(b"SASL-IR") {
                caps.sasl_ir = true;
            } else if word.eq_ignore_ascii_case(b"LITERAL+") {
                caps.literal_plus = true;
            } else if word.eq_ignore_ascii_case(b"AUTH=LOGIN") {
                caps.auth_login = true;
            }
        }
        caps
    }
}

fn strip_prefix_ignore_case<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &line[prefix.len()..])
}

/// The capabilities from a `[CAPABILITY ...]` response code, if the line has one.
fn capabilities_in(line: &[u8]) -> Option<Capabilities> {
    let start = memchr::memmem::find(line, b"[CAPABILITY ")? + b"[CAPABILITY ".len();
    let end = start + memchr::memchr(b']', &line[start..])?;
    Some(Capabilities::from_list(&line[start..end]))
}

/// imapgate's own ID fields (`id_command`).
const OWN_ID_FIELDS: usize = 6;
/// How many of the client's ID fields go on beside ours: RFC 2971 allows 30 pairs in all.
pub(crate) const CLIENT_ID_FIELDS: usize = 30 - OWN_ID_FIELDS;

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

/// `ig1 AUTHENTICATE PLAIN ...`, in one part with SASL-IR or two without.
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
pub fn login_command(user: &[u8], password: &[u8], literal_plus: bool) -> Vec<Vec<u8>> {
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

/// Quoted strings carry 7-bit text without CR, LF or NUL; anything else goes as a literal.
fn quotable(value: &[u8]) -> bool {
    value.iter().all(|&c| (0x20..0x7f).contains(&c))
}

/// A backend line for a log message: control characters escaped, cut at 200 characters.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    text.trim_end()
        .chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn capabilities_from_greeting() {
        let caps = capabilities_in(
            b"* OK [CAPABILITY IMAP4rev1 sasl-ir LITERAL+ AUTH=PLAIN auth=login] ready\r\n",
        );
        assert_eq!(
            caps,
            Some(Capabilities {
                sasl_ir: true,
                literal_plus: true,
                auth_login: true,
            })
        );
        let caps = capabilities_in(b"* OK [CAPABILITY IMAP4rev1 LITERAL- SASL-IRX] ready\r\n");
        assert_eq!(caps, Some(Capabilities::default()));
        assert_eq!(capabilities_in(b"* OK ready\r\n"), None);
        assert_eq!(
            Capabilities::from_list(b"IMAP4rev1 LITERAL+\r\n"),
            Capabilities {
                sasl_ir: false,
                literal_plus: true,
                auth_login: false,
            }
        );
    }
}
