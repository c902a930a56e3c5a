//! Reaching a backend: the one place that opens connections to backends. A login and a health
//! check both come through here, so a health check is by construction what a login does.
//!
//! ```text
//! connect (timeouts.backend_connect) ─► [PROXY header, send_proxy] ─► [TLS handshake, tls: implicit]
//!   └─► greeting "* OK" ─► [STARTTLS, tls: starttls] ─► [CAPABILITY, when not known] ─► Conn
//!   "* BYE" / "* PREAUTH" / silence / close / a bad certificate: BackendError
//! ```
//!
//! After the backend's OK to STARTTLS anything it sent before the handshake is discarded, and
//! the capabilities are asked for again over TLS.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{AuthMechanism, Backend, BackendTls, ClientTls, SendProxy};
use crate::proxy_header;
use crate::stream::{Stream, TlsStream};

pub(crate) mod resolve;
pub(crate) mod state;

use state::BackendState;

/// The tag of what imapgate says before the login (STARTTLS, CAPABILITY, ID, LOGOUT).
const PREP_TAG: &str = "ig0";
/// Longest backend line read here; real greetings and answers are far shorter.
pub(crate) const LINE_MAX: usize = 64 * 1024;

/// Why a backend could not be used. Never carries credentials.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("not ready for the login (greeting, TLS, capabilities) within {0:?}")]
    GreetingTimeout(Duration),
    #[error("no answer to the login within {0:?}")]
    LoginTimeout(Duration),
    #[error("health check timed out after {0:?}")]
    CheckTimeout(Duration),
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

impl BackendError {
    /// Whether the backend answered, but not as an IMAP server should.
    pub fn is_protocol(&self) -> bool {
        matches!(self, BackendError::Protocol(_))
    }
}

/// What the PROXY header (where the backend wants one) says about the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ProxyOut {
    /// A client's session: its address and the address it connected to.
    Client {
        client: SocketAddr,
        local: SocketAddr,
    },
    /// imapgate's own connection (a health check): LOCAL / UNKNOWN, "no client".
    Local,
}

/// TCP connect to the first of the backend's addresses that takes it, all under `timeout`.
/// A DNS name not resolved yet by the background resolver (`resolve.rs`) is looked up now.
pub(crate) async fn connect(
    state: &BackendState,
    timeout: Duration,
) -> Result<TcpStream, BackendError> {
    let attempt = async {
        let mut addresses = state.addresses();
        if addresses.is_empty() {
            let found = resolve::lookup(&state.address)
                .await
                .map_err(BackendError::Connect)?;
            state.set_addresses(found);
            addresses = state.addresses();
        }
        let mut last = None;
        for address in addresses.iter() {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(BackendError::Connect(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no address")
        })))
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| BackendError::ConnectTimeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Everything between the TCP connect and the login: PROXY header, TLS (implicit or
/// STARTTLS), greeting, capabilities. The caller bounds it with its own deadline.
pub(crate) async fn open(
    mut tcp: TcpStream,
    backend: &Backend,
    proxy: ProxyOut,
) -> Result<(Conn, Capabilities), BackendError> {
    match (backend.send_proxy, proxy) {
        (SendProxy::None, _) => {}
        (SendProxy::V1, ProxyOut::Client { client, local }) => {
            tcp.write_all(&proxy_header::v1(client, local)).await?
        }
        (SendProxy::V2, ProxyOut::Client { client, local }) => {
            tcp.write_all(&proxy_header::v2(client, local)?).await?
        }
        (SendProxy::V1, ProxyOut::Local) => tcp.write_all(b"PROXY UNKNOWN\r\n").await?,
        (SendProxy::V2, ProxyOut::Local) => tcp.write_all(&proxy_header::v2_local()?).await?,
    }
    let stream = match &backend.tls {
        BackendTls::Implicit(tls) => tls_connect(tcp, tls).await?,
        BackendTls::Plain | BackendTls::Starttls(_) => Stream::Plain(tcp),
    };
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(1024),
    };
    let greeting = conn.read_line("before its greeting").await?;
    let mut caps = if strip_prefix_ignore_case(&greeting, b"* OK").is_some() {
        capabilities_in(&greeting)
    } else if strip_prefix_ignore_case(&greeting, b"* BYE").is_some() {
        return Err(BackendError::Refused(printable(&greeting)));
    } else {
        return Err(BackendError::Protocol(format!(
            "expected a \"* OK\" greeting, got {}",
            printable(&greeting)
        )));
    };
    if let BackendTls::Starttls(tls) = &backend.tls {
        let answer = conn.command(b"STARTTLS").await?;
        if !is_ok(&answer) {
            return Err(BackendError::Refused(format!(
                "STARTTLS: {}",
                printable(&answer)
            )));
        }
        // Whatever came after the OK was sent in plaintext and is not to be trusted.
        conn.buf.clear();
        let Stream::Plain(tcp) = conn.stream else {
            return Err(BackendError::Protocol(
                "STARTTLS on a TLS connection".into(),
            ));
        };
        conn.stream = tls_connect(tcp, tls).await?;
        // Capabilities from before TLS are void.
        caps = None;
    }
    let caps = match caps {
        Some(caps) => caps,
        None => conn.capability().await?,
    };
    Ok((conn, caps))
}

/// The client side of a TLS handshake with a backend.
async fn tls_connect(tcp: TcpStream, tls: &ClientTls) -> Result<Stream, BackendError> {
    // Boxed: inline, the handshake's state would make every login's future (plain backends
    // too) that much larger.
    let stream = Box::pin(TlsStream::connect(
        tcp,
        tls.config.clone(),
        tls.name.clone(),
    ))
    .await
    .map_err(BackendError::Tls)?;
    Ok(Stream::Tls(Box::new(stream)))
}

/// A backend connection before the relay: the stream and what was read and not yet used.
pub(crate) struct Conn {
    pub(crate) stream: Stream,
    pub(crate) buf: Vec<u8>,
}

impl Conn {
    /// One line, CRLF included.
    pub(crate) async fn read_line(&mut self, when: &'static str) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                return Ok(self.buf.drain(..=i).collect());
            }
            if self.buf.len() > LINE_MAX {
                return Err(BackendError::Protocol(format!(
                    "line longer than {LINE_MAX} octets"
                )));
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(BackendError::Closed(when));
            }
        }
    }

    /// Sends `ig0 <command>` and returns the tagged answer without the tag; untagged lines
    /// in between are dropped (they answer us, not the client).
    pub(crate) async fn command(&mut self, command: &[u8]) -> Result<Vec<u8>, BackendError> {
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
    ) -> Result<Vec<u8>, BackendError> {
        loop {
            let line = self.read_line("before the login").await?;
            if let Some(rest) = line
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                return Ok(rest.to_vec());
            }
            if line.starts_with(b"* BYE") {
                return Err(BackendError::Refused(printable(&line)));
            }
            untagged(&line);
        }
    }

    async fn capability(&mut self) -> Result<Capabilities, BackendError> {
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

    /// Says LOGOUT and goes, without waiting for the answer (a health check is done).
    pub(crate) async fn logout(mut self) {
        let _ = self
            .stream
            .write_all(format!("{PREP_TAG} LOGOUT\r\n").as_bytes())
            .await;
        let _ = self.stream.flush().await;
    }
}

/// The backend capabilities the login replay cares about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capabilities {
    pub(crate) sasl_ir: bool,
    pub(crate) literal_plus: bool,
    pub(crate) auth_login: bool,
    /// The `AUTH=` mechanisms of `auth.mechanisms`' set it offers (`offers`), one bit each.
    pub(crate) auth: u8,
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
            if let Some(name) = strip_prefix_ignore_case(word, b"AUTH=")
                && let Some(i) = AuthMechanism::ALL
                    .iter()
                    .position(|m| name.eq_ignore_ascii_case(m.name().as_bytes()))
            {
                caps.auth |= 1 << i;
            }
        }
        caps
    }
}

impl Capabilities {
    /// Whether the backend advertises `AUTH=<mechanism>`.
    pub(crate) fn offers(&self, mechanism: AuthMechanism) -> bool {
        AuthMechanism::ALL
            .iter()
            .position(|m| *m == mechanism)
            .is_some_and(|i| self.auth & (1 << i) != 0)
    }
}

/// What `check-config` says about `auth.mechanisms` against the backends, when a relayed
/// mechanism is enabled (the backend must speak it; PLAIN and LOGIN imapgate replays itself, and
/// LOGIN falls back to the LOGIN command): each backend is reached as a health check does
/// (PROXY header, TLS, greeting, capabilities), within `timeout`, and every enabled mechanism
/// other than LOGIN that its list lacks is a warning. Best effort: a backend that cannot be
/// reached is a warning too, never an error.
pub async fn mechanism_warnings(config: &crate::config::Config, timeout: Duration) -> Vec<String> {
    let enabled = &config.auth_mechanisms;
    if !enabled
        .iter()
        .any(|m| !matches!(m, AuthMechanism::Plain | AuthMechanism::Login))
    {
        return Vec::new();
    }
    let mut warnings = Vec::new();
    for backend in &config.backends {
        let probe = async {
            let tcp = TcpStream::connect(backend.address.as_str())
                .await
                .map_err(BackendError::Connect)?;
            let (conn, caps) = open(tcp, backend, ProxyOut::Local).await?;
            conn.logout().await;
            Ok::<_, BackendError>(caps)
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(caps)) => {
                for m in enabled {
                    if *m != AuthMechanism::Login && !caps.offers(*m) {
                        warnings.push(format!(
                            "auth.mechanisms: {} is enabled, but backend {} ({}) does not offer AUTH={}: its logins with it will fail",
                            m.name(),
                            backend.name,
                            backend.address,
                            m.name()
                        ));
                    }
                }
            }
            Ok(Err(error)) => warnings.push(format!(
                "auth.mechanisms: cannot check backend {} ({}): {error}",
                backend.name, backend.address
            )),
            Err(_) => warnings.push(format!(
                "auth.mechanisms: cannot check backend {} ({}): no capabilities within {timeout:?}",
                backend.name, backend.address
            )),
        }
    }
    warnings
}

/// The capabilities from a `[CAPABILITY ...]` response code, if the line has one.
pub(crate) fn capabilities_in(line: &[u8]) -> Option<Capabilities> {
    let start = memchr::memmem::find(line, b"[CAPABILITY ")? + b"[CAPABILITY ".len();
    let end = start + memchr::memchr(b']', &line[start..])?;
    Some(Capabilities::from_list(&line[start..end]))
}

/// Whether a tagged answer (without its tag) is OK; status words are case-insensitive.
pub(crate) fn is_ok(answer: &[u8]) -> bool {
    answer
        .get(..2)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"OK"))
        && answer.get(2).is_none_or(|c| !c.is_ascii_alphanumeric())
}

pub(crate) fn strip_prefix_ignore_case<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &line[prefix.len()..])
}

/// A backend line for a log message: control characters escaped, cut at 200 characters.
pub(crate) fn printable(line: &[u8]) -> String {
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
                auth: 0b11,
            })
        );
        let caps = Capabilities::from_list(
            b"IMAP4rev1 AUTH=XOAUTH2 AUTH=SCRAM-SHA-256-PLUS auth=scram-sha-256\r\n",
        );
        assert!(caps.offers(AuthMechanism::XOAuth2) && caps.offers(AuthMechanism::ScramSha256));
        assert!(!caps.offers(AuthMechanism::ScramSha1) && !caps.offers(AuthMechanism::Plain));
        let caps = capabilities_in(b"* OK [CAPABILITY IMAP4rev1 LITERAL- SASL-IRX] ready\r\n");
        assert_eq!(caps, Some(Capabilities::default()));
        assert_eq!(capabilities_in(b"* OK ready\r\n"), None);
        assert_eq!(
            Capabilities::from_list(b"IMAP4rev1 LITERAL+\r\n"),
            Capabilities {
                sasl_ir: false,
                literal_plus: true,
                auth_login: false,
                auth: 0,
            }
        );
    }
}
