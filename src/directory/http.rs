//! The HTTP source, speaking nginx's `auth_http` protocol, so that the service an operator
//! runs for nginx's mail proxy works unchanged: a GET with `Auth-Method`, `Auth-User`,
//! `Auth-Pass` (only with `send_password`), `Auth-Protocol: imap`, `Auth-Login-Attempt`,
//! `Client-IP`, `Client-Host`, `Auth-SSL`; the answer in headers: `Auth-Status: OK` with
//! `Auth-Server` / `Auth-Port` (and optionally `Auth-User` / `Auth-Pass` to send instead), or
//! an error text with `Auth-Wait`.
//!
//! Unlike nginx, connections to the service are kept alive and reused (a pool of idle HTTP/1.1
//! connections), at most `max_in_flight` requests run at once, and each has `timeout`.
//!
//! The exchange is one fixed GET and an answer whose head is all we use, so it is spoken here
//! rather than through hyper: the session's own task writes the request with one write and
//! reads the answer, with `httparse` for the head. hyper's client drives each connection from
//! a task of its own and hands requests and answers across channels, which cost a wake-up and
//! a poll of that task per lookup, and it builds a `HeaderMap` both ways; with the cache off
//! that was most of what a lookup cost in user space (BENCHMARKS.md, "Routing from a
//! directory"). A connection is reused only by sessions on the worker thread that opened it
//! (its socket is registered with that thread's runtime).

use std::io::Write as _;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{Answer, LookupError, Query, Route};
use crate::config::HttpLookup;
use crate::imap::secret::Secret;

/// Idle connections kept for reuse.
const IDLE_MAX: usize = 64;
/// Largest answer head read (status line and headers).
const HEAD_MAX: usize = 16 * 1024;
/// Most header lines in an answer.
const HEADERS_MAX: usize = 64;
/// Largest answer body read to keep the connection (the answer is in the headers; a body is
/// drained and ignored; a longer one, or one without a length, costs the connection instead).
const BODY_MAX: usize = 64 * 1024;

pub(crate) struct HttpSource {
    config: HttpLookup,
    /// Idle connections, each with the thread whose runtime it is registered with.
    idle: Mutex<Vec<(ThreadId, TcpStream)>>,
    slots: Semaphore,
}

/// How one exchange on a connection failed.
pub(crate) enum Failure {
    /// No answer at all: on a kept connection, the service closed it (its keep-alive timeout)
    /// as the GET went out; the GET is asked again, once, on a new connection.
    Stale,
    Error(String),
}

/// The answer's head, as far as the lookup needs it, and whether the connection can be
/// reused for the next question.
struct Exchanged {
    answer: Result<Answer, LookupError>,
    reusable: bool,
}

impl HttpSource {
    pub(crate) fn new(config: &HttpLookup) -> Self {
        HttpSource {
            slots: Semaphore::new(config.max_in_flight),
            config: config.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// How long one question may take (`Directory` holds it to that).
    pub(crate) fn timeout(&self) -> std::time::Duration {
        self.config.timeout
    }

    pub(crate) async fn ask(&self, query: &Query<'_>) -> Result<Answer, LookupError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| LookupError::Failed("closed".into()))?;
        let request = self.request(query);
        let here = std::thread::current().id();
        let mut kept = self.idle_connection(here);
        loop {
            let reused = kept.is_some();
            let mut stream = match kept.take() {
                Some(stream) => stream,
                None => self.connect().await?,
            };
            match exchange(&mut stream, &request, self.config.send_password).await {
                Ok(Exchanged { answer, reusable }) => {
                    if reusable {
                        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                        if idle.len() < IDLE_MAX {
                            idle.push((here, stream));
                        }
                    }
                    return answer;
                }
                // Asked again once, on a new connection (`kept` is None now): a stale one
                // closed while idle is found when it is taken, this is the race with it.
                Err(Failure::Stale) if reused => {}
                Err(Failure::Stale) => {
                    return Err(LookupError::Failed(
                        "the service closed without an answer".into(),
                    ));
                }
                Err(Failure::Error(e)) => return Err(LookupError::Failed(e)),
            }
        }
    }

    /// The most recently used idle connection of this thread that is quiet: one the service
    /// closed, or that holds bytes nobody asked for, is dropped (reading its leftovers as the
    /// next answer would route the next user by someone else's answer).
    fn idle_connection(&self, here: ThreadId) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.iter().rposition(|(thread, _)| *thread == here) {
            let (_, stream) = idle.swap_remove(i);
            let mut probe = [0u8; 1];
            if matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(stream);
            }
        }
        None
    }

    async fn connect(&self) -> Result<TcpStream, LookupError> {
        let tcp = TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| LookupError::Failed(format!("connect to {}: {e}", self.config.address)))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// The GET, headers in title case as nginx writes them (services written for nginx may
    /// compare header names as written). Every value is either ours or URL-encoded, so none
    /// can break the request; the path and host were checked when the config was loaded.
    fn request(&self, query: &Query<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "GET {} HTTP/1.1\r\nHost: {}\r\nAuth-Method: {}\r\nAuth-User: ",
            self.config.path, self.config.host, query.method
        );
        url_encode_into(&mut out, query.user.as_bytes());
        let _ = write!(
            out,
            "\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: {}\r\nClient-IP: {}\r\n",
            query.attempt,
            query.client.ip()
        );
        // nginx sends the client's resolved name; imapgate does no reverse lookups.
        out.extend_from_slice(b"Client-Host: [UNAVAILABLE]\r\nAuth-SSL: ");
        out.extend_from_slice(if query.tls { b"on" } else { b"off" });
        if let Some(password) = query.password {
            out.extend_from_slice(b"\r\nAuth-Pass: ");
            url_encode_into(&mut out, password.expose());
        }
        out.extend_from_slice(b"\r\n\r\n");
        out
    }
}

/// Sends `request` and reads the answer: its head, then a body of known length (drained, so
/// the connection can take the next request).
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    send_password: bool,
) -> Result<Exchanged, Failure> {
    // A write to a connection the service has closed usually still succeeds (the reset comes
    // back later); a failing one is the same stale case.
    if stream.write_all(request).await.is_err() {
        return Err(Failure::Stale);
    }
    let mut buf = Vec::with_capacity(1024);
    // Where the search for the head's end resumes: the head is parsed once it is whole, not
    // again after every read (a service sending a byte at a time would make that quadratic).
    let mut searched = 0;
    let mut answered = false;
    let (answer, head_len, body) = 'read: loop {
        if buf.len() >= HEAD_MAX {
            return Err(Failure::Error(format!(
                "the answer's head is longer than {HEAD_MAX} bytes"
            )));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
        match stream.read_buf(&mut buf).await {
            // Nothing at all (not even an interim answer since dropped): the stale case.
            Ok(0) | Err(_) if !answered => return Err(Failure::Stale),
            Ok(0) => return Err(Failure::Error("the answer ended within its head".into())),
            Err(e) => return Err(Failure::Error(format!("read: {e}"))),
            Ok(_) => answered = true,
        }
        loop {
            if memchr::memmem::find(&buf[searched..], b"\r\n\r\n").is_none() {
                searched = buf.len().saturating_sub(3);
                continue 'read;
            }
            match parse_head(&buf, send_password)? {
                Head::Partial => {
                    searched = buf.len().saturating_sub(3);
                    continue 'read;
                }
                Head::Interim(head_len) => {
                    buf.drain(..head_len);
                    searched = 0;
                }
                Head::Final {
                    answer,
                    head_len,
                    body,
                } => break 'read (answer, head_len, body),
            }
        }
    };
    let reusable = match body {
        Body::Length(length) if length <= BODY_MAX => {
            // Whatever follows the head is body; more than the body would be an answer to a
            // question not asked.
            let mut have = buf.len() - head_len;
            let mut sink = [0u8; 1024];
            while have < length {
                let want = (length - have).min(sink.len());
                match stream.read(&mut sink[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => have += n,
                }
            }
            have == length
        }
        Body::Length(_) | Body::Unknown | Body::Close => false,
    };
    Ok(Exchanged { answer, reusable })
}

/// What the octets read so far hold.
pub(crate) enum Head {
    /// Not a whole head yet.
    Partial,
    /// An interim answer (100 Continue, 103 Early Hints) of this many octets: the real one
    /// follows, as hyper reads it too. (101 would switch protocols: not an answer we take.)
    Interim(usize),
    /// The answer, its head's length, and what follows the head.
    Final {
        answer: Result<Answer, LookupError>,
        head_len: usize,
        body: Body,
    },
}

/// The answer's head at the start of `buf`: a pure function of the octets, so the fuzzer
/// can drive it (`fuzzing::auth_http_answer`).
pub(crate) fn parse_head(buf: &[u8], send_password: bool) -> Result<Head, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Err(e) => return Err(Failure::Error(format!("the answer is not HTTP: {e}"))),
    };
    Ok(match response.code {
        Some(100 | 102..=199) => Head::Interim(head_len),
        code => Head::Final {
            answer: answer(code.unwrap_or(0), response.headers, send_password),
            head_len,
            body: Body::of(&response),
        },
    })
}

/// What follows an answer's head, for reusing the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// `Content-Length` (or none at all: a 204 or 304), on a connection kept open.
    Length(usize),
    /// Chunked or delimited by the close: the connection is not reused (the head is all we use).
    Unknown,
    /// `Connection: close`, or HTTP/1.0.
    Close,
}

impl Body {
    fn of(response: &httparse::Response<'_, '_>) -> Body {
        let values = |name: &'static str| {
            response
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| std::str::from_utf8(h.value).unwrap_or("").trim())
        };
        let closes = values("Connection").any(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        });
        if response.version != Some(1) || closes {
            return Body::Close;
        }
        // These never have a body, whatever the headers say (RFC 9112, 6.3).
        if matches!(response.code, Some(204 | 304)) {
            return Body::Length(0);
        }
        if values("Transfer-Encoding").next().is_some() {
            return Body::Unknown;
        }
        let mut lengths = values("Content-Length");
        match (lengths.next(), lengths.next()) {
            (Some(length), None) => length.parse().map_or(Body::Unknown, Body::Length),
            (Some(_), Some(_)) => Body::Unknown,
            (None, _) => Body::Unknown,
        }
    }
}

/// nginx URL-encodes `Auth-User` and `Auth-Pass` (so a header cannot be broken by CR/LF).
fn url_encode_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@' | b'+') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// `%XX` escapes decoded; a `%` without two hex digits after it stays as it is.
pub(crate) fn url_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The service's answer, from its status and headers (the first of a name counts).
fn answer(
    status: u16,
    headers: &[httparse::Header<'_>],
    send_password: bool,
) -> Result<Answer, LookupError> {
    if !(200..300).contains(&status) {
        return Err(LookupError::Failed(format!("HTTP {status}")));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let Some(auth_status) = header("Auth-Status") else {
        return Err(LookupError::Failed("no Auth-Status header".into()));
    };
    if auth_status != "OK" {
        // Without the password the service can only say it does not know the user; with it,
        // this is its decision on the login.
        if !send_password {
            return Ok(Answer::NotFound);
        }
        let wait = header("Auth-Wait")
            .and_then(|w| w.parse::<u64>().ok())
            .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(60)));
        return Ok(Answer::Refused {
            message: printable(auth_status),
            wait,
        });
    }
    let server = header("Auth-Server")
        .ok_or_else(|| LookupError::Failed("Auth-Status OK without Auth-Server".into()))?;
    let port = header("Auth-Port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| LookupError::Failed("Auth-Status OK without a valid Auth-Port".into()))?;
    let server = super::server_address(server, port)
        .map_err(|_| LookupError::Failed("Auth-Server is not a host".into()))?;
    let user = header("Auth-User")
        .map(|u| String::from_utf8_lossy(&url_decode(u)).into_owned())
        .filter(|u| !u.is_empty());
    let password = header("Auth-Pass").map(|p| Secret::new(url_decode(p)));
    Ok(Answer::Found(Route {
        server,
        user,
        password,
    }))
}

/// A service's status text, safe to put in an IMAP response line.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<httparse::Header<'a>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn nginx_answers() {
        let ok = answer(
            200,
            &headers(&[
                ("Auth-Status", "OK"),
                ("Auth-Server", "10.0.0.7"),
                ("Auth-Port", "143"),
                ("Auth-User", "alice%40example.net"),
            ]),
            false,
        )
        .unwrap();
        let Answer::Found(route) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(route.server, "10.0.0.7:143");
        assert_eq!(route.user.as_deref(), Some("alice@example.net"));
        assert!(route.password.is_none());

        let v6 = answer(
            200,
            &headers(&[
                ("Auth-Status", "OK"),
                ("Auth-Server", "fd00::7"),
                ("Auth-Port", "993"),
            ]),
            false,
        )
        .unwrap();
        assert!(matches!(v6, Answer::Found(r) if r.server == "[fd00::7]:993"));

        let no = headers(&[
            ("Auth-Status", "Invalid login or password"),
            ("Auth-Wait", "3"),
        ]);
        assert!(matches!(answer(200, &no, false), Ok(Answer::NotFound)));
        match answer(200, &no, true) {
            Ok(Answer::Refused { message, wait }) => {
                assert_eq!(message, "Invalid login or password");
                assert_eq!(wait, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
        assert!(answer(500, &no, false).is_err());
        let bad_port = headers(&[
            ("Auth-Status", "OK"),
            ("Auth-Server", "h"),
            ("Auth-Port", "x"),
        ]);
        assert!(answer(200, &bad_port, false).is_err());
        let bad_host = headers(&[
            ("Auth-Status", "OK"),
            ("Auth-Server", "a b"),
            ("Auth-Port", "1"),
        ]);
        assert!(answer(200, &bad_host, false).is_err());
    }

    #[test]
    fn encoding_round_trips() {
        let odd = "a b%c\r\nd@e";
        let mut encoded = Vec::new();
        url_encode_into(&mut encoded, odd.as_bytes());
        assert_eq!(encoded, b"a%20b%25c%0D%0Ad@e");
        assert_eq!(
            url_decode(std::str::from_utf8(&encoded).unwrap()),
            odd.as_bytes()
        );
    }

    /// What the scripted service does with a request.
    enum Reply {
        Send(Vec<u8>),
        SendAndClose(Vec<u8>),
        /// The answer, then, once `stray_go` is notified, bytes nobody asked for (and
        /// `stray_sent` is notified once they are out).
        SendThenStray(Vec<u8>, Vec<u8>),
        Close,
    }

    /// A scripted service on a loopback port: for each request (numbered from 0 over all
    /// connections) what `answer(n)` says. It records the request heads and counts connections.
    struct Service {
        source: HttpSource,
        requests: std::sync::Arc<Mutex<Vec<String>>>,
        connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        stray_go: std::sync::Arc<tokio::sync::Notify>,
        stray_sent: std::sync::Arc<tokio::sync::Notify>,
    }

    async fn service(
        send_password: bool,
        answer: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Service {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::sync::Notify;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (stray_go, stray_sent) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (seen, count) = (requests.clone(), connections.clone());
        let (go, sent) = (stray_go.clone(), stray_sent.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (seen, answer) = (seen.clone(), answer.clone());
                let (go, sent) = (go.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 1024];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head: Vec<u8> = buf.drain(..end).collect();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(String::from_utf8(head).unwrap());
                            seen.len() - 1
                        };
                        let reply = answer(n);
                        let stray = matches!(reply, Reply::SendThenStray(..));
                        let (bytes, close) = match reply {
                            Reply::Send(bytes) => (bytes, false),
                            Reply::SendAndClose(bytes) => (bytes, true),
                            Reply::SendThenStray(bytes, extra) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                                go.notified().await;
                                (extra, false)
                            }
                            Reply::Close => return,
                        };
                        if stream.write_all(&bytes).await.is_err() || close {
                            return;
                        }
                        if stray {
                            sent.notify_one();
                        }
                    }
                });
            }
        });
        let source = HttpSource::new(&HttpLookup {
            address: address.to_string(),
            host: address.to_string(),
            path: "/auth?x=1".into(),
            send_password,
            timeout: Duration::from_secs(5),
            max_in_flight: 4,
        });
        Service {
            source,
            requests,
            connections,
            stray_go,
            stray_sent,
        }
    }

    impl Service {
        async fn ask(&self, user: &str) -> Result<Answer, LookupError> {
            let password = Secret::new(b"p\r\nw%".to_vec());
            let query = Query {
                user,
                // The caller puts the password in only with send_password.
                password: self.source.config.send_password.then_some(&password),
                method: "plain",
                client: "192.0.2.7:50000".parse().unwrap(),
                attempt: 2,
                tls: true,
            };
            tokio::time::timeout(Duration::from_secs(5), self.source.ask(&query))
                .await
                .expect("an answer or an error, not a hang")
        }

        fn connections(&self) -> usize {
            self.connections.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.7\r\nAuth-Port: 143\r\nContent-Length: 0\r\n\r\n";

    fn routed(answer: Result<Answer, LookupError>) -> String {
        match answer {
            Ok(Answer::Found(route)) => route.server,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_request_is_nginxs_and_the_connection_is_kept() {
        let s = service(true, |_| Reply::Send(OK.to_vec())).await;
        assert_eq!(routed(s.ask("al ice@example.net").await), "10.0.0.7:143");
        assert_eq!(routed(s.ask("bob").await), "10.0.0.7:143");
        assert_eq!(
            s.connections(),
            1,
            "the second question reuses the connection"
        );
        let requests = s.requests.lock().unwrap().clone();
        assert_eq!(
            requests[0],
            format!(
                "GET /auth?x=1 HTTP/1.1\r\nHost: {host}\r\nAuth-Method: plain\r\nAuth-User: al%20ice@example.net\r\n\
                 Auth-Protocol: imap\r\nAuth-Login-Attempt: 2\r\nClient-IP: 192.0.2.7\r\n\
                 Client-Host: [UNAVAILABLE]\r\nAuth-SSL: on\r\nAuth-Pass: p%0D%0Aw%25\r\n\r\n",
                host = s.source.config.host
            )
        );
        // Without send_password, no Auth-Pass header.
        let s = service(false, |_| Reply::Send(OK.to_vec())).await;
        s.ask("bob").await.unwrap();
        assert!(!s.requests.lock().unwrap()[0].contains("Auth-Pass"));
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_drained_and_the_connection_kept() {
        let s = service(false, |_| {
            Reply::Send(
                b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nContent-Length: 5000\r\n\r\n"
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(b'x', 5000))
                    .collect(),
            )
        })
        .await;
        for _ in 0..3 {
            assert_eq!(routed(s.ask("u").await), "h:1");
        }
        assert_eq!(s.connections(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_is_replaced_and_the_question_asked_again() {
        // The service answers the first question, then closes that connection when the
        // second arrives (as a keep-alive timeout does); the second question is asked again
        // on a new connection and answered.
        let s = service(false, |n| {
            if n == 1 {
                Reply::Close
            } else {
                Reply::Send(OK.to_vec())
            }
        })
        .await;
        assert_eq!(routed(s.ask("u").await), "10.0.0.7:143");
        assert_eq!(routed(s.ask("u").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 2);
        assert_eq!(s.requests.lock().unwrap().len(), 3);
        // A new connection closed without an answer is an error, not a loop.
        let s = service(false, |_| Reply::Close).await;
        assert!(matches!(s.ask("u").await, Err(LookupError::Failed(_))));
        assert_eq!(s.connections(), 1);
    }

    #[tokio::test]
    async fn answers_that_end_the_connection_are_read_and_not_reused() {
        for answer in [
            // Chunked (whatever Content-Length says): the head is all we use.
            &b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nContent-Length: 0\r\n\r\n",
            // No length: the body runs to the close.
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\n\r\n",
            // Two lengths.
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
        ] {
            let s = service(false, move |_| Reply::Send(answer.to_vec())).await;
            assert_eq!(routed(s.ask("u").await), "h:1");
            assert_eq!(routed(s.ask("u").await), "h:1");
            assert_eq!(s.connections(), 2, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        // Both would route (they carry a whole answer) but for the limits.
        let huge = format!(
            "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\nX: {}\r\nContent-Length: 0\r\n\r\n",
            "y".repeat(HEAD_MAX + 10)
        );
        let many: String = std::iter::once(
            "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 1\r\n".to_string(),
        )
        .chain((0..=HEADERS_MAX).map(|i| format!("X-{i}: 1\r\n")))
        .chain(std::iter::once("\r\n".to_string()))
        .collect();
        for (answer, close) in [
            (b"SMTP ready\r\n\r\n".to_vec(), false),
            (huge.into_bytes(), false),
            (many.into_bytes(), false),
            // The head cut short by the close.
            (b"HTTP/1.1 200 OK\r\nAuth-Sta".to_vec(), true),
            (
                b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_vec(),
                false,
            ),
        ] {
            let shown = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
            let s = service(false, move |_| {
                if close {
                    Reply::SendAndClose(answer.clone())
                } else {
                    Reply::Send(answer.clone())
                }
            })
            .await;
            let outcome = s.ask("u").await;
            assert!(
                matches!(outcome, Err(LookupError::Failed(_))),
                "{shown}: {outcome:?}"
            );
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let s = service(false, |_| {
            Reply::Send(
                [
                    &b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"[..],
                    OK,
                ]
                .concat(),
            )
        })
        .await;
        assert_eq!(routed(s.ask("u").await), "10.0.0.7:143");
        assert_eq!(routed(s.ask("u").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 1);
        // An interim answer, then the close: the service saw the GET, so it is not sent again.
        let s = service(false, |n| match n {
            1 => Reply::SendAndClose(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
            _ => Reply::Send(OK.to_vec()),
        })
        .await;
        assert_eq!(routed(s.ask("u").await), "10.0.0.7:143");
        assert!(matches!(s.ask("u").await, Err(LookupError::Failed(_))));
        assert_eq!(s.requests.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn bytes_nobody_asked_for_cost_the_connection_and_never_route() {
        const EVIL: &[u8] =
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.6.6.6\r\nAuth-Port: 143\r\nContent-Length: 0\r\n\r\n";
        // In the same write as the answer.
        let s = service(false, |n| {
            if n == 0 {
                Reply::Send([OK, EVIL].concat())
            } else {
                Reply::Send(OK.to_vec())
            }
        })
        .await;
        assert_eq!(routed(s.ask("a").await), "10.0.0.7:143");
        assert_eq!(routed(s.ask("b").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 2);
        // After the answer, once the lookup is over: found when the connection is taken.
        let s = service(false, |n| {
            if n == 0 {
                Reply::SendThenStray(OK.to_vec(), EVIL.to_vec())
            } else {
                Reply::Send(OK.to_vec())
            }
        })
        .await;
        assert_eq!(routed(s.ask("a").await), "10.0.0.7:143");
        s.stray_go.notify_one();
        s.stray_sent.notified().await;
        assert_eq!(routed(s.ask("b").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 2);
    }

    #[tokio::test]
    async fn a_question_is_asked_again_once_on_a_new_connection() {
        // Two kept connections; the service drops the third question's connection without an
        // answer. The question goes to a new connection, not to the other kept one.
        let s = service(false, |n| {
            if n == 2 {
                Reply::Close
            } else {
                Reply::Send(OK.to_vec())
            }
        })
        .await;
        let (a, b) = tokio::join!(s.ask("a"), s.ask("b"));
        assert_eq!(
            (routed(a), routed(b)),
            ("10.0.0.7:143".into(), "10.0.0.7:143".into())
        );
        assert_eq!(s.connections(), 2);
        assert_eq!(routed(s.ask("c").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 3);
        assert_eq!(routed(s.ask("d").await), "10.0.0.7:143");
        assert_eq!(s.connections(), 3, "the new connection is kept");
    }
}
