//! The fake backend: just enough IMAP to isolate a proxy's cost from a real server's.
//! Any user logs in; `FETCH 1 BODY[]` returns one message of `--body-size` octets; IDLE waits for
//! DONE. Each connection holds a 512-octet read buffer, so tens of thousands of idle sessions
//! cost little. With a certificate it speaks implicit TLS (a backend on port 993), for the
//! proxies' TLS-to-backend path.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub async fn run(
    listener: TcpListener,
    body_size: usize,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let message = Arc::new(message(body_size));
    loop {
        let (stream, _) = listener.accept().await?;
        let (message, tls) = (message.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let _ = match tls {
                None => {
                    let (read, write) = stream.into_split();
                    session(read, write, &message).await
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let (read, write) = tokio::io::split(tls);
                        session(read, write, &message).await
                    }
                    Err(e) => Err(e),
                },
            };
        });
    }
}

/// An implicit-TLS acceptor with the certificate chain and key in these PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Box<dyn std::error::Error>> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A message of exactly `size` octets: headers, then lines of text.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: load@example.net\r\nSubject: load test\r\n\r\n".to_vec();
    let mut n = 0u64;
    while m.len() < size {
        m.extend_from_slice(
            format!("line {n:08} of the load test message body ........\r\n").as_bytes(),
        );
        n += 1;
    }
    m.truncate(size);
    m
}

async fn session<R, W>(read: R, mut write: W, message: &[u8]) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut read = BufReader::with_capacity(512, read);
    write
        .write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN] fake backend ready\r\n")
        .await?;
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        skip_literals(&mut read, &mut write, &mut line).await?;
        let text = String::from_utf8_lossy(&line);
        let mut words = text.split_ascii_whitespace();
        let tag = words.next().unwrap_or("*").to_string();
        let command = words.next().unwrap_or("").to_ascii_uppercase();
        let reply: Vec<u8> = match command.as_str() {
            "LOGIN" => {
                format!("{tag} OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] Logged in\r\n").into()
            }
            "AUTHENTICATE" => {
                if words.nth(1).is_none() {
                    write.write_all(b"+ \r\n").await?;
                    let mut response = Vec::new();
                    read.read_until(b'\n', &mut response).await?;
                }
                format!("{tag} OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] Logged in\r\n").into()
            }
            "CAPABILITY" => format!(
                "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN\r\n{tag} OK done\r\n"
            )
            .into(),
            "ID" => format!("* ID NIL\r\n{tag} OK ID done\r\n").into(),
            "SELECT" | "EXAMINE" => format!(
                "* 1 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n{tag} OK [READ-WRITE] SELECT done\r\n"
            )
            .into(),
            "FETCH" | "UID" => {
                write
                    .write_all(format!("* 1 FETCH (BODY[] {{{}}}\r\n", message.len()).as_bytes())
                    .await?;
                write.write_all(message).await?;
                format!(")\r\n{tag} OK FETCH done\r\n").into()
            }
            "IDLE" => {
                write.write_all(b"+ idling\r\n").await?;
                line.clear();
                if read.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                format!("{tag} OK IDLE done\r\n").into()
            }
            "LOGOUT" => {
                write
                    .write_all(format!("* BYE bye\r\n{tag} OK LOGOUT done\r\n").as_bytes())
                    .await?;
                // close_notify on TLS, FIN on plain.
                return write.shutdown().await;
            }
            "NOOP" | "CHECK" => format!("{tag} OK NOOP done\r\n").into(),
            _ => format!("{tag} BAD unknown command\r\n").into(),
        };
        write.write_all(&reply).await?;
        write.flush().await?;
    }
}

/// Reads the octets of any literals the line announces (answering `+` for synchronizing ones)
/// and appends the rest of the command, so `line` ends up holding the whole command.
async fn skip_literals<R, W>(read: &mut R, write: &mut W, line: &mut Vec<u8>) -> std::io::Result<()>
where
    R: AsyncBufReadExt + AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    loop {
        let trimmed = line.strip_suffix(b"\r\n").unwrap_or(line);
        let Some(open) = trimmed.iter().rposition(|&c| c == b'{') else {
            return Ok(());
        };
        let inside = &trimmed[open + 1..];
        let Some(inside) = inside.strip_suffix(b"}") else {
            return Ok(());
        };
        let (digits, sync) = match inside.strip_suffix(b"+") {
            Some(d) => (d, false),
            None => (inside, true),
        };
        let Ok(n) = std::str::from_utf8(digits).unwrap_or("x").parse::<usize>() else {
            return Ok(());
        };
        if sync {
            write.write_all(b"+ go ahead\r\n").await?;
        }
        let mut octets = vec![0u8; n];
        read.read_exact(&mut octets).await?;
        line.truncate(open);
        line.extend_from_slice(b"LITERAL");
        read.read_until(b'\n', line).await?;
    }
}
