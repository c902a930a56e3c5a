//! Dial: the only place where imapgate speaks IMAP as a client.
//!
//! ```text
//! connect (timeouts.backend_connect)
//!   └─► greeting "* OK" ─► [CAPABILITY if the greeting had none] ─► replay the login ─► tagged answer
//!        "* BYE" / "* PREAUTH" / silence / close: the backend is unavailable   (timeouts.backend_login)
//! ```
//!
//! The login is replayed as it came: LOGIN as LOGIN (quoted when that is exact, else a literal,
//! `{n+}` when the backend offers LITERAL+), AUTHENTICATE PLAIN as PLAIN (with SASL-IR when
//! offered), so an authzid reaches the backend and the backend decides. The backend's tagged
//! answer is returned without its tag, to be sent on with the client's.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Backend;
use crate::imap::sasl::{self, Credentials, Mechanism};

/// The tag imapgate uses towards backends.
const TAG: &str = "ig1";
/// Longest backend line read during dial; real greetings and answers are far shorter.
const LINE_MAX: usize = 64 * 1024;

/// A backend session that accepted the login.
#[derive(Debug)]
pub struct LoggedIn {
    pub stream: TcpStream,
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

/// Greeting, capabilities and the login replay on a connected backend, under `timeout`.
pub async fn login(
    stream: TcpStream,
    credentials: &Credentials,
    timeout: Duration,
) -> Result<LoginOutcome, DialError> {
    tokio::time::timeout(timeout, greet_and_login(stream, credentials))
        .await
        .map_err(|_| DialError::LoginTimeout(timeout))?
}

impl DialError {
    /// Whether the backend answered, but not as an IMAP server should.
    pub fn is_protocol(&self) -> bool {
        matches!(self, DialError::Protocol(_))
    }
}

async fn greet_and_login(
    stream: TcpStream,
    credentials: &Credentials,
) -> Result<LoginOutcome, DialError> {
    let mut conn = BackendConn {
        stream,
        buf: Vec::with_capacity(1024),
    };
    let greeting = conn.read_line("before its greeting").await?;
    let caps = if greeting.starts_with(b"* OK") {
        match capabilities_in(&greeting) {
            Some(caps) => caps,
            None => conn.capability().await?,
        }
    } else if greeting.starts_with(b"* BYE") {
        return Err(DialError::Refused(printable(&greeting)));
    } else {
        return Err(DialError::Protocol(format!(
            "expected a \"* OK\" greeting, got {}",
            printable(&greeting)
        )));
    };
    let has = |cap: &str| caps.iter().any(|c| c.eq_ignore_ascii_case(cap));

    let mut untagged = Vec::new();
    let parts = match credentials.mechanism {
        Mechanism::Plain => plain_command(credentials, has("SASL-IR")),
        Mechanism::Login | Mechanism::SaslLogin => login_command(
            credentials.user.as_bytes(),
            credentials.password.expose(),
            has("LITERAL+"),
        ),
    };
    // Each part but the last ends where the backend must say "+" before we go on.
    let last = parts.len() - 1;
    for (i, part) in parts.iter().enumerate() {
        conn.stream.write_all(part).await?;
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
        Answer::Tagged(rest) if rest.starts_with(b"OK") => Ok(LoginOutcome::LoggedIn(LoggedIn {
            stream: conn.stream,
            untagged,
            tagged_rest: rest,
            buffered: conn.buf,
        })),
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
    stream: TcpStream,
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
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(DialError::Closed(when));
            }
            self.buf.extend_from_slice(&chunk[..n]);
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

    async fn capability(&mut self) -> Result<Vec<String>, DialError> {
        self.stream
            .write_all(format!("{TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        let mut caps = Vec::new();
        loop {
            let line = self.read_line("during CAPABILITY").await?;
            if let Some(list) = line.strip_prefix(b"* CAPABILITY ") {
                caps = words(list);
            } else if line.starts_with(TAG.as_bytes()) {
                return Ok(caps);
            }
        }
    }
}

/// The capability list from a `[CAPABILITY ...]` response code, if the line has one.
fn capabilities_in(line: &[u8]) -> Option<Vec<String>> {
    let start = memchr::memmem::find(line, b"[CAPABILITY ")? + b"[CAPABILITY ".len();
    let end = start + memchr::memchr(b']', &line[start..])?;
    Some(words(&line[start..end]))
}

fn words(list: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(list)
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect()
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
        let caps = capabilities_in(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+] ready\r\n");
        assert_eq!(
            caps,
            Some(vec![
                "IMAP4rev1".into(),
                "SASL-IR".into(),
                "LITERAL+".into()
            ])
        );
        assert_eq!(capabilities_in(b"* OK ready\r\n"), None);
    }
}
