//! TLS towards the target, for the scenarios that take `--tls implicit|starttls`: a rustls
//! client that trusts `--ca` and asks for `--server-name`, and the two halves a `Conn` reads
//! and writes, plain or TLS.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// TLS from the first octet (port 993).
    Implicit,
    /// Plain until `STARTTLS`, then TLS.
    Starttls,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
        }
    }
}

#[derive(Clone)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

impl ClientTls {
    pub fn new(
        mode: TlsMode,
        ca: &Path,
        server_name: &str,
        resume: bool,
    ) -> Result<ClientTls, Box<dyn std::error::Error>> {
        Ok(ClientTls {
            mode,
            connector: connector(ca, resume)?,
            name: ServerName::try_from(server_name.to_string())?,
        })
    }

    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }
}

/// A client config trusting the certificates in `ca`; without `resume`, every handshake is a
/// full one.
pub fn connector(ca: &Path, resume: bool) -> Result<TlsConnector, Box<dyn std::error::Error>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What a `Conn` reads from.
pub enum ReadSide {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// What a `Conn` writes to.
pub enum WriteSide {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl ReadSide {
    pub fn plain_split(stream: TcpStream) -> (ReadSide, WriteSide) {
        let (read, write) = stream.into_split();
        (ReadSide::Plain(read), WriteSide::Plain(write))
    }

    pub fn tls_split(stream: TlsStream<TcpStream>) -> (ReadSide, WriteSide) {
        let (read, write) = tokio::io::split(stream);
        (ReadSide::Tls(read), WriteSide::Tls(write))
    }

    /// The plain connection again, for STARTTLS.
    pub fn reunite(read: ReadSide, write: WriteSide) -> std::io::Result<TcpStream> {
        match (read, write) {
            (ReadSide::Plain(r), WriteSide::Plain(w)) => {
                r.reunite(w).map_err(std::io::Error::other)
            }
            _ => Err(std::io::Error::other("STARTTLS on a TLS connection")),
        }
    }
}

impl WriteSide {
    /// The TCP connection, when plain (for socket options).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            WriteSide::Plain(w) => Some(w.as_ref()),
            WriteSide::Tls(_) => None,
        }
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
