//! One end of a relayed session: a plain TCP socket, or TLS on one (imapgate as server
//! towards the client, as client towards a backend).
//!
//! Both kinds are driven the same way: wait for the socket's readiness, then do what can be done
//! without blocking. For TLS that means the rustls connection taken out of tokio-rustls once the
//! handshake and login are over: ciphertext is read from the socket into a pooled buffer (the
//! end's `Inbox`, held only while records are coming in) and handed to rustls, and plaintext is
//! copied out only when a record is complete, into the relay's pooled buffer. So an idle TLS
//! session, like a plain one, holds no relay buffer; what remains is the connection's state
//! (keys, the 4 KiB record buffer rustls keeps; figures in BENCHMARKS.md).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;

use super::PooledBuffer;
use crate::stream::Stream;

pub(crate) enum End {
    Plain(TcpStream),
    /// Boxed: a rustls connection is about a kilobyte, which a plain session should not carry.
    Tls(Box<TlsEnd>),
}

pub(crate) struct TlsEnd {
    tcp: TcpStream,
    conn: rustls::Connection,
    /// Ciphertext read from the socket and not yet handed to rustls: one read of up to a pooled
    /// buffer's size, where rustls's own `read_tls` would make a read(2) per 4 KiB. Held only
    /// while records are coming in.
    inbox: Option<Inbox>,
}

struct Inbox {
    buf: PooledBuffer,
    at: usize,
    end: usize,
}

impl From<Stream> for End {
    fn from(stream: Stream) -> End {
        match stream {
            Stream::Plain(tcp) => End::Plain(tcp),
            Stream::ServerTls(tls) => {
                let (tcp, conn) = tls.into_inner();
                End::Tls(Box::new(TlsEnd {
                    tcp,
                    conn: conn.into(),
                    inbox: None,
                }))
            }
            Stream::ClientTls(tls) => {
                let (tcp, conn) = tls.into_inner();
                End::Tls(Box::new(TlsEnd {
                    tcp,
                    conn: conn.into(),
                    inbox: None,
                }))
            }
        }
    }
}

impl End {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            End::Plain(tcp) => tcp,
            End::Tls(tls) => &tls.tcp,
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
            End::Tls(tls) => tls.conn.reader().read(buf),
        }
    }

    /// Writes some of `data`. A TLS end takes it once its earlier records are out (so at most
    /// one buffer's worth of ciphertext waits per end), encrypts it and sends what the socket
    /// takes; the rest goes out with `poll_flush`.
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
            End::Tls(tls) => {
                ready!(tls.poll_flush(cx))?;
                let n = tls.conn.writer().write(data)?;
                if n == 0 && !data.is_empty() {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                // Whatever the socket does not take now waits for the next poll_flush (the
                // waker is registered if it would block).
                if let Poll::Ready(Err(e)) = tls.poll_flush(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
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
            // Idempotent: rustls sends the alert once.
            tls.conn.send_close_notify();
            if tls.poll_flush(cx).is_pending() {
                return Poll::Pending;
            }
        }
        super::shut(self.tcp(), Shutdown::Write);
        Poll::Ready(Ok(()))
    }

    /// Whether what was read took everything the socket had so far (for `ack_now`): a plain
    /// read that came back short says so itself; a TLS end, once no ciphertext waits in its
    /// inbox.
    pub(crate) fn drained(&self) -> bool {
        match self {
            End::Plain(_) => true,
            End::Tls(tls) => tls.inbox.is_none(),
        }
    }
}

impl TlsEnd {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let state = self
                .conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            // A record may have made rustls answer (an alert, a key update): send it along,
            // best effort (a write error is for the writing side to report; what was read
            // here is still delivered).
            if self.conn.wants_write() {
                let _ = self.poll_flush(cx);
            }
            let state = state?;
            if state.peer_has_closed() {
                // Nothing after close_notify counts: give the buffer back.
                self.inbox = None;
            }
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                return Poll::Ready(Ok(()));
            }
            // rustls takes what it can buffer (at most one record's worth) per read_tls;
            // records it completes are processed above before it is given more.
            if let Some(inbox) = &mut self.inbox {
                let n = self.conn.read_tls(&mut &inbox.buf.0[inbox.at..inbox.end])?;
                if n == 0 {
                    // rustls took nothing of a non-empty slice: never loop on it.
                    return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
                }
                inbox.at += n;
                if inbox.at == inbox.end {
                    self.inbox = None;
                }
                continue;
            }
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut buf = PooledBuffer::take();
            match self.tcp.try_read(&mut buf.0) {
                Ok(0) => {
                    // The end of the stream, for rustls too: `try_read` tells whether it was a
                    // clean one (close_notify first) or a truncation.
                    self.conn.read_tls(&mut io::empty())?;
                    return Poll::Ready(Ok(()));
                }
                Ok(end) => {
                    if end < buf.0.len() {
                        // Drained: forget the readiness now rather than learn it from a read
                        // that fails with EAGAIN (as the plain relay does; see pump.rs).
                        let _ = self.tcp.try_io(tokio::io::Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    self.inbox = Some(Inbox { buf, at: 0, end });
                }
                // Readiness cleared by try_read; the next poll_read_ready registers.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.conn.write_tls(&mut SyncTcp(&self.tcp)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The socket as rustls's `write_tls` wants it: non-blocking writes that clear tokio's
/// readiness when they would block.
struct SyncTcp<'a>(&'a TcpStream);

impl Write for SyncTcp<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain end carries no TLS state inline (the relay of a plain session stays as small as
    /// it was); the TLS state is one box. Prints the sizes for BENCHMARKS.md.
    #[test]
    fn end_sizes() {
        let (end, tls) = (size_of::<End>(), size_of::<TlsEnd>());
        println!(
            "End: {end} bytes; TlsEnd (boxed): {tls} bytes, of which rustls::Connection {} \
             (server {}, client {})",
            size_of::<rustls::Connection>(),
            size_of::<rustls::ServerConnection>(),
            size_of::<rustls::ClientConnection>(),
        );
        assert_eq!(end, size_of::<TcpStream>());
    }
}
