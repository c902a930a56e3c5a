//! A connection as the phases see it: plain TCP, or TLS on TCP (imapgate as server towards
//! clients, as client towards backends). One type so that pre-login, dial and relay need no
//! generics; the relay takes its allocation-free path when both sides are plain.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(crate) use tls::TlsStream;

mod tls;

pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS connection's state is about a kilobyte, which a plain one should not carry.
    Tls(Box<TlsStream>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Stream::Plain(_) => "Plain",
            Stream::Tls(_) => "Tls",
        };
        f.debug_tuple(kind)
            .field(&self.tcp().peer_addr().ok())
            .finish()
    }
}

/// Makes the kernel notice a peer that vanished without FIN or RST (a partition, a host
/// gone) within about `after`: keepalive probes from `after / 2` of silence, every `after / 6`;
/// TCP_USER_TIMEOUT ends the connection when nothing came back for `after` while probes (or
/// data it sent) stay unanswered, so the fourth probe's turn ends it. Either way the relay's
/// next read or write fails and the session ends. Best effort: a socket that refuses only
/// loses the bound.
///
/// No TCP_KEEPCNT: with a user timeout set, Linux's keepalive timer ends the connection by the
/// user timeout and never reads the probe count (tcp_keepalive_timer), so it would be one
/// setsockopt more per backend connection (and per listener) for nothing.
pub(crate) fn detect_dead_peer(socket: &impl std::os::fd::AsFd, after: Duration) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(after / 2)
        .with_interval((after / 6).max(Duration::from_secs(1)));
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(after));
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener's settings reach every socket it accepts (what `accept_loop` relies on).
    #[tokio::test]
    async fn accepted_sockets_inherit_the_dead_peer_settings() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        detect_dead_peer(&listener, Duration::from_secs(12));
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (accepted, _) = accepted.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(6));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(12))
        );
        drop(client);
    }
}
