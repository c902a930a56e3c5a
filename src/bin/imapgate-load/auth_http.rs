//! An nginx `auth_http` responder for the comparison: every login is OK and goes to one backend.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub async fn run(listener: TcpListener, backend: std::net::SocketAddr) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
                if request.len() > 64 * 1024 {
                    return;
                }
            }
            let answer = format!(
                "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\nContent-Length: 0\r\n\r\n",
                backend.ip(),
                backend.port()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        });
    }
}
