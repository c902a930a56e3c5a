//! An nginx `auth_http` responder for the comparison: every login is OK and goes to one
//! backend. Speaks HTTP/1.0 with a close (what nginx sends) and HTTP/1.1 keep-alive (what
//! imapgate sends), so each proxy gets the service it would get in production.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request head taken.
const HEAD_MAX: usize = 64 * 1024;

pub async fn run(listener: TcpListener, backend: std::net::SocketAddr) -> std::io::Result<()> {
    let answer = format!(
        "Auth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\nContent-Length: 0\r\n",
        backend.ip(),
        backend.port()
    );
    loop {
        let (mut stream, _) = listener.accept().await?;
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 2048];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if buf.len() > HEAD_MAX {
                        return;
                    }
                };
                let keep_alive = buf[..end].starts_with(b"GET ")
                    && buf[..end].windows(8).take(512).any(|w| w == b"HTTP/1.1")
                    && !buf[..end]
                        .to_ascii_lowercase()
                        .windows(17)
                        .any(|w| w == b"connection: close");
                buf.drain(..end);
                let response = if keep_alive {
                    format!("HTTP/1.1 200 OK\r\n{answer}\r\n")
                } else {
                    format!("HTTP/1.0 200 OK\r\n{answer}Connection: close\r\n\r\n")
                };
                if stream.write_all(response.as_bytes()).await.is_err() || !keep_alive {
                    return;
                }
            }
        });
    }
}
