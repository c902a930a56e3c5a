//! TLS on a TCP socket, driven through rustls's unbuffered API (`rustls::unbuffered`), for the
//! whole life of a connection: handshake, pre-login (or the backend's login), relay.
//!
//! With the unbuffered API imapgate owns every buffer: ciphertext read and not yet processed
//! (the inbox), ciphertext made and not yet sent (the outbox), plaintext decrypted and not yet
//! read (the stash). Each is taken when there is something to hold and given back as soon as it
//! is empty, the first two from the relay's per-thread pool; so an idle TLS connection holds
//! only rustls's connection state (keys, the handshake's outcome), where tokio-rustls over the
//! buffered API kept a record buffer of at least 4 KiB for good (figures in BENCHMARKS.md).
//!
//! The type is driven by the socket's readiness like a plain socket (`poll_read_ready`,
//! `try_read`, `poll_write`, `poll_flush`, `poll_shutdown`), which is what the relay uses;
//! `AsyncRead`/`AsyncWrite` on top serve pre-login and the backend's login.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::session::relay::PooledBuffer;

/// Plaintext taken per write: two full records, whose ciphertext fits a pooled buffer
/// (`TLS_SLACK`) and goes out with one write(2).
const WRITE_MAX: usize = 32 * 1024;
/// The most ciphertext held at once: a handshake message may span records (rustls accepts
/// them up to 64 KiB) and must be whole in the inbox to be processed.
const HELD_MAX: usize = 128 * 1024;

/// Public only as `Stream::Tls`'s content; nothing outside the crate can make or use one.
pub struct TlsStream {
    tcp: TcpStream,
    conn: Conn,
    io: Buffers,
}

enum Conn {
    /// imapgate as the server (towards a client).
    Server(UnbufferedServerConnection),
    /// imapgate as the client (towards a backend).
    Client(UnbufferedClientConnection),
}

#[derive(Default)]
struct Buffers {
    /// Ciphertext read from the socket and not yet processed by rustls.
    inbox: Option<Octets>,
    /// rustls has seen all of the inbox and needs more ciphertext to go on.
    starved: bool,
    /// The last socket read took everything the socket had.
    drained: bool,
    /// Ciphertext made and not yet sent.
    outbox: Option<Octets>,
    /// Plaintext decrypted and not yet read (what did not fit the reader's buffer, or came in
    /// while writing).
    stash: Vec<u8>,
    stash_at: usize,
    /// The socket said end-of-stream.
    eof: bool,
    /// The peer's close_notify came: nothing after it counts.
    peer_closed: bool,
    /// Our close_notify is queued.
    close_sent: bool,
    /// rustls failed (its alert, if any, sent): it is not called again.
    failed: bool,
}

/// Octets waiting in a buffer, `at..end`; a pooled buffer until a handshake message needs a
/// larger one.
struct Octets {
    buf: Buf,
    at: usize,
    end: usize,
}

enum Buf {
    Pooled(PooledBuffer),
    Grown(Box<[u8]>),
}

impl Octets {
    fn new() -> Octets {
        Octets {
            buf: Buf::Pooled(PooledBuffer::take()),
            at: 0,
            end: 0,
        }
    }

    fn all(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Buf::Pooled(b) => &mut b.0,
            Buf::Grown(b) => b,
        }
    }

    fn data(&mut self) -> &mut [u8] {
        let (at, end) = (self.at, self.end);
        &mut self.all()[at..end]
    }

    /// Room for at least `need` more octets after the data (moving the data to the front, or
    /// into a larger buffer, up to `HELD_MAX`).
    fn spare(&mut self, need: usize) -> io::Result<&mut [u8]> {
        if self.all().len() - self.end < need && self.at > 0 {
            let (at, end) = (self.at, self.end);
            self.all().copy_within(at..end, 0);
            self.end -= at;
            self.at = 0;
        }
        let len = self.end - self.at;
        if self.all().len() - self.end < need {
            if len + need > HELD_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS message too large",
                ));
            }
            let size = (len + need).max(2 * self.all().len()).min(HELD_MAX);
            let mut grown = vec![0u8; size].into_boxed_slice();
            grown[..len].copy_from_slice(self.data());
            self.buf = Buf::Grown(grown);
            (self.at, self.end) = (0, len);
        }
        let end = self.end;
        Ok(&mut self.all()[end..])
    }

    fn is_empty(&self) -> bool {
        self.at == self.end
    }
}

/// Takes `n` octets off the front of `slot`, giving the buffer back once it is empty.
fn consume(slot: &mut Option<Octets>, n: usize) {
    if let Some(octets) = slot {
        octets.at += n;
        if octets.is_empty() {
            *slot = None;
        }
    }
}

/// What a drive of rustls is to do once it may send application data.
#[derive(Clone, Copy)]
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where a drive of rustls stopped.
enum Stop {
    /// It needs more ciphertext (the handshake is blocked, or no complete record is left).
    Starved,
    /// The data to send (this many octets of it) or the close_notify is in the outbox.
    Sent(usize),
    /// Both sides sent close_notify.
    Closed,
}

/// The reader's buffer, filled by a drive.
struct Sink<'b> {
    buf: &'b mut [u8],
    filled: usize,
}

impl Sink<'_> {
    fn none() -> Sink<'static> {
        Sink {
            buf: &mut [],
            filled: 0,
        }
    }

    /// In order: into the reader's buffer while there is room and nothing is stashed, the
    /// rest into the stash.
    fn put(&mut self, mut data: &[u8], stash: &mut Vec<u8>) {
        if stash.is_empty() {
            let n = data.len().min(self.buf.len() - self.filled);
            self.buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
        }
        stash.extend_from_slice(data);
    }
}

/// The two sides' unbuffered connections, alike to drive.
trait Side {
    type Data;
    fn common(&mut self) -> &mut UnbufferedConnectionCommon<Self::Data>;
    fn process<'c, 'i>(
        common: &'c mut UnbufferedConnectionCommon<Self::Data>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn common(&mut self) -> &mut UnbufferedConnectionCommon<ServerConnectionData> {
        self
    }
    fn process<'c, 'i>(
        common: &'c mut UnbufferedConnectionCommon<ServerConnectionData>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        common.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn common(&mut self) -> &mut UnbufferedConnectionCommon<ClientConnectionData> {
        self
    }
    fn process<'c, 'i>(
        common: &'c mut UnbufferedConnectionCommon<ClientConnectionData>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        common.process_tls_records(incoming)
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs rustls over the inbox until it needs more ciphertext or has taken `send`: records
/// decrypted go to `sink`, handshake messages and alerts to the outbox. Every complete record
/// in the inbox is processed before it returns (so the inbox then holds at most a partial one).
fn drive<S: Side>(
    side: &mut S,
    io: &mut Buffers,
    sink: &mut Sink<'_>,
    send: Send<'_>,
) -> io::Result<Stop> {
    let common = side.common();
    loop {
        let Buffers {
            inbox,
            outbox,
            stash,
            peer_closed,
            ..
        } = &mut *io;
        let incoming: &mut [u8] = match inbox {
            Some(octets) => octets.data(),
            None => &mut [],
        };
        let UnbufferedStatus { mut discard, state } = S::process(common, incoming);
        let stop = match state {
            Err(e) => Err(tls_error(e)),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut result = Ok(None);
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            sink.put(record.payload, stash);
                        }
                        Err(e) => {
                            result = Err(tls_error(e));
                            break;
                        }
                    }
                }
                result
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let outbox = outbox.get_or_insert_with(Octets::new);
                let mut need = 0;
                loop {
                    match outbox.spare(need).map(|spare| encode.encode(spare)) {
                        Ok(Ok(n)) => {
                            outbox.end += n;
                            break Ok(None);
                        }
                        Ok(Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        }))) => need = required_size,
                        Ok(Err(EncodeError::AlreadyEncoded)) => break Ok(None),
                        Err(e) => break Err(e),
                    }
                }
            }
            // What was encoded is the outbox's to send (`poll_flush`); rustls is done with it.
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                Ok(None)
            }
            Ok(ConnectionState::PeerClosed) => {
                *peer_closed = true;
                Ok(None)
            }
            Ok(ConnectionState::Closed) => {
                *peer_closed = true;
                Ok(Some(Stop::Closed))
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::Starved)),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match send {
                Send::Nothing => Ok(Some(Stop::Starved)),
                Send::Data(data) => {
                    let outbox = outbox.get_or_insert_with(Octets::new);
                    let mut need = data.len();
                    loop {
                        match outbox.spare(need).map(|spare| traffic.encrypt(data, spare)) {
                            Ok(Ok(n)) => {
                                outbox.end += n;
                                break Ok(Some(Stop::Sent(data.len())));
                            }
                            Ok(Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            }))) if required_size > need => need = required_size,
                            Ok(Err(e)) => break Err(io::Error::other(e)),
                            Err(e) => break Err(e),
                        }
                    }
                }
                Send::CloseNotify => {
                    let outbox = outbox.get_or_insert_with(Octets::new);
                    let mut need = 0;
                    loop {
                        match outbox
                            .spare(need)
                            .map(|spare| traffic.queue_close_notify(spare))
                        {
                            Ok(Ok(n)) => {
                                outbox.end += n;
                                break Ok(Some(Stop::Sent(0)));
                            }
                            Ok(Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            }))) if required_size > need => need = required_size,
                            Ok(Err(e)) => break Err(io::Error::other(e)),
                            Err(e) => break Err(e),
                        }
                    }
                }
            },
            // Early data is never enabled (`max_early_data_size` stays 0).
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected TLS state",
            )),
        };
        consume(&mut io.inbox, discard);
        if let Some(octets) = &io.outbox
            && octets.is_empty()
        {
            io.outbox = None;
        }
        match stop {
            Ok(None) => {}
            Ok(Some(stop)) => return Ok(stop),
            Err(e) => return Err(e),
        }
    }
}

/// One call into rustls after an error: the alert it queued, if any, into the outbox.
fn encode_alert<S: Side>(side: &mut S, io: &mut Buffers) -> io::Result<()> {
    let Buffers { inbox, outbox, .. } = io;
    let incoming: &mut [u8] = match inbox {
        Some(octets) => octets.data(),
        None => &mut [],
    };
    let UnbufferedStatus { discard, state } = S::process(side.common(), incoming);
    let result = match state {
        Ok(ConnectionState::EncodeTlsData(mut encode)) => {
            let outbox = outbox.get_or_insert_with(Octets::new);
            let written = encode.encode(outbox.spare(0)?);
            outbox.end += written.map_err(io::Error::other)?;
            Ok(())
        }
        _ => Ok(()),
    };
    consume(&mut io.inbox, discard);
    result
}

impl TlsStream {
    /// The server side of a handshake on `tcp` (no deadline of its own: the caller's).
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        TlsStream::handshake(tcp, Conn::Server(conn)).await
    }

    /// The client side of a handshake on `tcp`, with `name` as SNI and for verification.
    pub(crate) async fn connect(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<TlsStream> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        TlsStream::handshake(tcp, Conn::Client(conn)).await
    }

    async fn handshake(tcp: TcpStream, conn: Conn) -> io::Result<TlsStream> {
        let mut stream = TlsStream {
            tcp,
            conn,
            io: Buffers::default(),
        };
        match std::future::poll_fn(|cx| stream.poll_handshake(cx)).await {
            Ok(()) => Ok(stream),
            Err(e) => {
                stream.send_alert();
                Err(e)
            }
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Application data right behind the peer's Finished is stashed for the first read.
            self.drive(&mut Sink::none(), Send::Nothing)?;
            ready!(self.poll_flush(cx))?;
            if !self.common().is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// After an error: the alert rustls made, if any, sent as far as the socket takes it now
    /// (the peer learns why; nothing waits for it), then the buffers given back. One call into
    /// rustls, which hands a queued alert out before it looks at the inbox again: a second one
    /// would process the bytes that failed once more (and the inbox must stay as rustls saw it,
    /// since a handshake message it is joining across records is kept there by offset).
    fn send_alert(&mut self) {
        if std::mem::replace(&mut self.io.failed, true) {
            return;
        }
        let _ = match &mut self.conn {
            Conn::Server(conn) => encode_alert(conn, &mut self.io),
            Conn::Client(conn) => encode_alert(conn, &mut self.io),
        };
        if let Some(outbox) = &mut self.io.outbox {
            let _ = self.tcp.try_write(outbox.data());
        }
        self.io.outbox = None;
        self.io.inbox = None;
    }

    /// A drive to send: records rustls decrypts on the way go to the stash, and the reading
    /// side, which may be waiting for the socket (which will not tell it), is woken for them.
    /// (Not expected: reads leave no complete record in the inbox. Cheap insurance.)
    fn drive_writing(&mut self, cx: &mut Context<'_>, send: Send<'_>) -> io::Result<Stop> {
        let before = (self.io.stash.len(), self.io.peer_closed);
        let stop = self.drive(&mut Sink::none(), send);
        if (self.io.stash.len(), self.io.peer_closed) != before {
            cx.waker().wake_by_ref();
        }
        stop
    }

    fn drive(&mut self, sink: &mut Sink<'_>, send: Send<'_>) -> io::Result<Stop> {
        if self.io.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection failed",
            ));
        }
        let stop = match &mut self.conn {
            Conn::Server(conn) => drive(conn, &mut self.io, sink, send),
            Conn::Client(conn) => drive(conn, &mut self.io, sink, send),
        };
        match stop {
            Ok(Stop::Starved) => self.io.starved = true,
            Ok(_) => {}
            Err(_) => self.send_alert(),
        }
        stop
    }

    /// The negotiated version, the handshake's kind and the like.
    pub(crate) fn common(&self) -> &CommonState {
        match &self.conn {
            Conn::Server(conn) => conn,
            Conn::Client(conn) => conn,
        }
    }

    /// The TCP connection underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Reads from the socket into the inbox: the number of octets, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let inbox = self.io.inbox.get_or_insert_with(Octets::new);
            // Room for a good part of a record: a partial one moves to the front first (or,
            // a handshake message spanning records, into a larger buffer).
            let spare = inbox.spare(4096)?;
            let room = spare.len();
            match self.tcp.try_read(spare) {
                Ok(n) => {
                    inbox.end += n;
                    if inbox.is_empty() {
                        self.io.inbox = None;
                    }
                    self.io.drained = n < room;
                    if n > 0 {
                        self.io.starved = false;
                        if n < room {
                            // Drained: forget the readiness now rather than learn it from a
                            // read that fails with EAGAIN (as the plain relay does, pump.rs).
                            let _ = self.tcp.try_io(Interest::READABLE, || {
                                Err::<(), _>(io::ErrorKind::WouldBlock.into())
                            });
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => {
                    if inbox.is_empty() {
                        self.io.inbox = None;
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Poll::Ready(Err(e));
                    }
                    // Readiness cleared by try_read; the next poll_read_ready registers.
                }
            }
        }
    }

    /// Ready once `try_read` has something to say: plaintext, the end of the stream or an
    /// error.
    pub(crate) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let io = &self.io;
            if !io.stash.is_empty()
                || io.eof
                || io.failed
                || io.peer_closed
                || (io.inbox.is_some() && !io.starved)
            {
                return Poll::Ready(Ok(()));
            }
            // A record may have made rustls answer (an alert, a key update): send it along,
            // best effort (a write error is for the writing side to report).
            if self.io.outbox.is_some()
                && let Poll::Ready(Err(_)) = self.poll_flush(cx)
            {
                // Nobody to send it to: give the buffer back rather than retry at every wake.
                self.io.outbox = None;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                self.io.eof = true;
            }
        }
    }

    /// Reads what plaintext there is; `WouldBlock` when there is none (yet).
    pub(crate) fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let io = &mut self.io;
        if !io.stash.is_empty() {
            let n = buf.len().min(io.stash.len() - io.stash_at);
            buf[..n].copy_from_slice(&io.stash[io.stash_at..io.stash_at + n]);
            io.stash_at += n;
            if io.stash_at == io.stash.len() {
                io.stash = Vec::new();
                io.stash_at = 0;
            }
            return Ok(n);
        }
        if io.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection failed",
            ));
        }
        if io.peer_closed {
            // Nothing after close_notify counts: give the buffer back.
            io.inbox = None;
            return Ok(0);
        }
        if io.inbox.is_some() && !io.starved {
            let mut sink = Sink { buf, filled: 0 };
            self.drive(&mut sink, Send::Nothing)?;
            if sink.filled > 0 {
                return Ok(sink.filled);
            }
            if self.io.peer_closed {
                self.io.inbox = None;
                return Ok(0);
            }
        }
        if self.io.eof {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection without a TLS close_notify",
            ));
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Writes some of `data`: once earlier records are out (so at most one write's worth of
    /// ciphertext waits), it takes up to `WRITE_MAX`, encrypts it and sends what the socket
    /// takes; the rest goes out with `poll_flush`.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_flush(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.io.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(WRITE_MAX)];
        let n = match self.drive_writing(cx, Send::Data(data))? {
            Stop::Sent(n) => n,
            Stop::Starved => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Stop::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        // What the socket does not take now waits for the next poll_flush (the waker is
        // registered if it would block).
        if let Poll::Ready(Err(e)) = self.poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    /// Ready once nothing made waits to go out.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(outbox) = &mut self.io.outbox {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(outbox.data()) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => consume(&mut self.io.outbox, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// close_notify (once), then FIN. Errors are ignored: a peer that is gone already is what
    /// a close wants, and the other direction may still have an answer to deliver.
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.io.close_sent {
            self.io.close_sent = true;
            let _ = self.drive_writing(cx, Send::CloseNotify);
        }
        if self.poll_flush(cx).is_pending() {
            return Poll::Pending;
        }
        self.io.outbox = None;
        let _ = socket2::SockRef::from(&self.tcp).shutdown(Shutdown::Write);
        Poll::Ready(Ok(()))
    }

    /// Whether what was read took everything the socket had so far, all of it handed on.
    pub(crate) fn drained(&self) -> bool {
        let io = &self.io;
        io.drained && io.stash.is_empty() && (io.inbox.is_none() || io.starved)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_read_ready(cx))?;
            match this.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        TlsStream::poll_write(self.get_mut(), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_flush(self.get_mut(), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_shutdown(self.get_mut(), cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A self-signed certificate for `localhost` with `extra` more names (a large Certificate
    /// message when there are many), the server config and a client config trusting it.
    fn configs(extra: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let mut names = vec!["localhost".to_string()];
        names.extend((0..extra).map(|i| format!("name-{i:05}.imap.example.net")));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Ours as the server after a handshake with tokio-rustls (the buffered API) as the client.
    async fn handshaken() -> (tokio_rustls::client::TlsStream<TcpStream>, TlsStream) {
        let (server_config, client_config) = configs(0);
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            TlsStream::accept(server_tcp, server_config)
        );
        (client.unwrap(), server.unwrap())
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Holds no buffer: what an idle connection should look like.
    fn holds_nothing(stream: &TlsStream) -> bool {
        stream.io.inbox.is_none() && stream.io.outbox.is_none() && stream.io.stash.capacity() == 0
    }

    /// Ours as the server, tokio-rustls (the buffered API) as the client: 300 KB each way, read
    /// through a 7-byte buffer on our side (the stash), byte-exact; then nothing is held.
    #[tokio::test]
    async fn both_ways_byte_exact_and_nothing_held_after() {
        let (mut client, mut server) = handshaken().await;
        assert!(holds_nothing(&server));
        let data = pattern(300_000);
        let up = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in up.chunks(9_999) {
                client.write_all(chunk).await.unwrap();
            }
            client.flush().await.unwrap();
            let mut back = vec![0u8; 300_000];
            client.read_exact(&mut back).await.unwrap();
            (client, back)
        });
        let mut got = Vec::new();
        let mut small = [0u8; 7];
        while got.len() < data.len() {
            let n = server.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == data, "the bytes read differ from those written");
        server.write_all(&data).await.unwrap();
        server.flush().await.unwrap();
        let (mut client, back) = writer.await.unwrap();
        assert!(back == data, "the bytes read back differ");
        assert!(holds_nothing(&server));
        // A clean close: close_notify, then the end of the stream.
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut small).await.unwrap(), 0);
        assert!(holds_nothing(&server));
    }

    /// A client that sends part of a ClientHello split across records and then FIN (or part
    /// of one, then garbage): the handshake fails with an error, and the alert on the way out
    /// does not trip over the handshake message rustls was joining. Each case also leaves a
    /// server that still accepts a good client.
    #[tokio::test]
    async fn a_broken_handshake_fails_cleanly() {
        let (server_config, _) = configs(0);
        let cases: [&[u8]; 4] = [
            // A handshake record holding only the start of a ClientHello, then FIN.
            &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x01, 0x00],
            // The same, then a record of another type in the middle of the message.
            &[
                0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x01, 0x00, 0x15, 0x03, 0x03, 0x00, 0x02,
                0x02, 0x28,
            ],
            // Not TLS at all.
            b"a LOGIN user pass\r\n",
            // A record header promising more than is ever sent.
            &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01],
        ];
        for bytes in cases {
            let (mut client, server_tcp) = pair().await;
            client.write_all(bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let accepted = TlsStream::accept(server_tcp, server_config.clone()).await;
            assert!(accepted.is_err(), "{bytes:?}");
        }
    }

    /// A record that does not decrypt after the handshake: the read fails, and so does every
    /// later one at once (no waiting, no spinning), and the close still works.
    #[tokio::test]
    async fn a_bad_record_after_the_handshake_fails_the_connection() {
        let (client, mut server) = handshaken().await;
        let (mut tcp, _) = client.into_inner();
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend_from_slice(&[0x55; 0x40]);
        tcp.write_all(&record).await.unwrap();
        let mut buf = [0u8; 64];
        let first = server.read(&mut buf).await.unwrap_err();
        assert_eq!(first.kind(), io::ErrorKind::InvalidData, "{first}");
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("a failed connection answers at once");
        assert!(again.is_err());
        server.shutdown().await.unwrap();
        assert!(holds_nothing(&server));
    }

    /// A TLS 1.3 KeyUpdate from the peer, asking for ours in return, between two writes: both
    /// writes arrive, and what we write next decrypts at the peer. rustls switches our keys as
    /// it queues our KeyUpdate, so this fails if that message is lost or sent after the data.
    #[tokio::test]
    async fn a_key_update_from_the_peer_is_answered() {
        let (mut client, mut server) = handshaken().await;
        assert_eq!(
            server.common().protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        client.write_all(b"a NOOP\r\n").await.unwrap();
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"b NOOP\r\n").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 16];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a NOOP\r\nb NOOP\r\n");
        server
            .write_all(b"* OK after the update\r\n")
            .await
            .unwrap();
        server.flush().await.unwrap();
        let mut back = [0u8; 23];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"* OK after the update\r\n");
    }

    /// The end of the stream without close_notify is a truncation, not a clean end.
    #[tokio::test]
    async fn a_missing_close_notify_is_an_error() {
        let (client, mut server) = handshaken().await;
        // FIN without close_notify (a drop would reset: the server's ticket is unread).
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let error = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Ours as the client, against a certificate larger than a pooled buffer (its handshake
    /// message spans records and must be whole in the inbox): the inbox grows for it, and gives
    /// the large buffer back once the handshake is through.
    #[tokio::test]
    async fn a_handshake_message_larger_than_a_buffer() {
        let (server_config, client_config) = configs(1_500);
        let (client_tcp, server_tcp) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let (client, server) = tokio::join!(
            TlsStream::connect(client_tcp, client_config, name()),
            acceptor.accept(server_tcp)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        assert!(holds_nothing(&client));
        server.write_all(b"* OK ready\r\n").await.unwrap();
        server.flush().await.unwrap();
        let mut line = [0u8; 12];
        client.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"* OK ready\r\n");
    }

    /// A relay read's worth (two full records) fits one pooled buffer, overhead included, so
    /// it goes out with one write and no larger allocation.
    #[tokio::test]
    async fn a_full_write_fits_a_pooled_buffer() {
        let (_client, mut server) = handshaken().await;
        let data = pattern(WRITE_MAX);
        let stop = server.drive(&mut Sink::none(), Send::Data(&data)).unwrap();
        assert!(matches!(stop, Stop::Sent(n) if n == WRITE_MAX));
        let outbox = server.io.outbox.as_ref().unwrap();
        assert!(matches!(outbox.buf, Buf::Pooled(_)));
        assert!(outbox.end - outbox.at > WRITE_MAX);
    }
}
