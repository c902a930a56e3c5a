//! One end of a relayed session: a plain TCP socket, or TLS on one (imapgate as server
//! towards the client, as client towards a backend).
//!
//! Both kinds are driven the same way: wait for the socket's readiness, then do what can be done
//! without blocking. A TLS end is the connection pre-login and the login used (`stream/tls.rs`,
//! rustls's unbuffered API): ciphertext is read from the socket into a pooled buffer held only
//! while records are coming in, and plaintext goes straight into the relay's pooled buffer. So
//! an idle TLS session, like a plain one, holds no buffer; what remains is rustls's connection
//! state (keys; figures in BENCHMARKS.md).

use std::io;
use std::net::Shutdown;
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;

use crate::stream::{Stream, TlsStream};

pub(crate) enum End {
    Plain(TcpStream),
    /// Boxed: a rustls connection is about a kilobyte, which a plain session should not carry.
    Tls(Box<TlsStream>),
}

impl From<Stream> for End {
    fn from(stream: Stream) -> End {
        match stream {
            Stream::Plain(tcp) => End::Plain(tcp),
            Stream::Tls(tls) => End::Tls(tls),
        }
    }
}

impl End {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            End::Plain(tcp) => tcp,
            End::Tls(tls) => tls.tcp(),
        }
    }

    pub(crate) fn is_plain(&self) -> bool {
        matches!(self, End::Plain(_))
    }

    /// Ready once `try_read` has something to say: octets, the end of the stream or an error.
    pub(crate) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            End::Plain(tcp) => tcp.poll_read_ready(cx),
            End::Tls(tls) => tls.poll_read_ready(cx),
        }
    }

    /// Reads what is there; `WouldBlock` when nothing is.
    pub(crate) fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            End::Plain(tcp) => tcp.try_read(buf),
            End::Tls(tls) => tls.try_read(buf),
        }
    }

    /// Writes some of `data`. A TLS end takes up to a read's worth once its earlier records
    /// are out (so at most that much ciphertext waits per end), encrypts it and sends what the
    /// socket takes; the rest goes out with `poll_flush`.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            End::Plain(tcp) => loop {
                ready!(tcp.poll_write_ready(cx))?;
                match tcp.try_write(data) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return Poll::Ready(result),
                }
            },
            End::Tls(tls) => tls.poll_write(cx, data),
        }
    }

    /// Ready once nothing written waits to go out (always, for a plain end).
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            End::Plain(_) => Poll::Ready(Ok(())),
            End::Tls(tls) => tls.poll_flush(cx),
        }
    }

    /// Passes a half-close on: close_notify (TLS), then FIN. Errors are ignored, as `shut`
    /// ignores them: a peer that is gone already is what a close wants, and the other direction
    /// may still have an answer to deliver.
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let End::Tls(tls) = self {
            return tls.poll_shutdown(cx);
        }
        super::shut(self.tcp(), Shutdown::Write);
        Poll::Ready(Ok(()))
    }

    /// Whether what was read took everything the socket had so far (for `ack_now`): a plain
    /// read that came back short says so itself; a TLS end, once its last socket read was short
    /// and every complete record was handed on.
    pub(crate) fn drained(&self) -> bool {
        match self {
            End::Plain(_) => true,
            End::Tls(tls) => tls.drained(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain end carries no TLS state inline (the relay of a plain session stays as small as
    /// it was); the TLS state is one box. Prints the sizes for BENCHMARKS.md.
    #[test]
    fn end_sizes() {
        let (end, tls) = (size_of::<End>(), size_of::<TlsStream>());
        println!(
            "End: {end} bytes; TlsStream (boxed): {tls} bytes, of which \
             rustls::server::UnbufferedServerConnection {} (client {})",
            size_of::<rustls::server::UnbufferedServerConnection>(),
            size_of::<rustls::client::UnbufferedClientConnection>(),
        );
        assert_eq!(end, size_of::<TcpStream>());
    }
}
