//! The HTTP source, speaking nginx's `auth_http` protocol, so that the service an operator
//! runs for nginx's mail proxy works unchanged: a GET with `Auth-Method`, `Auth-User`,
//! `Auth-Pass` (only with `send_password`), `Auth-Protocol: imap`, `Auth-Login-Attempt`,
//! `Client-IP`, `Client-Host`, `Auth-SSL`; the answer in headers: `Auth-Status: OK` with
//! `Auth-Server` / `Auth-Port` (and optionally `Auth-User` / `Auth-Pass` to send instead), or
//! an error text with `Auth-Wait`.
//!
//! Unlike nginx, connections to the service are kept alive and reused (a pool of idle HTTP/1.1
//! connections), at most `max_in_flight` requests run at once, and each has `timeout`. A
//! connection is driven by a task on the worker thread that opened it, and is reused only by
//! sessions on that thread: handing it to another worker would cost two cross-thread wake-ups
//! per lookup.

use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{Answer, LookupError, Query, Route};
use crate::config::HttpLookup;
use crate::imap::secret::Secret;

/// Idle connections kept for reuse.
const IDLE_MAX: usize = 64;
/// Largest answer body read (the answer is in the headers; a body is drained and ignored).
const BODY_MAX: usize = 64 * 1024;

pub(crate) struct HttpSource {
    config: HttpLookup,
    /// Idle connections, each with the thread whose runtime drives it.
    idle: Mutex<Vec<(ThreadId, SendRequest<Empty<Bytes>>)>>,
    slots: Semaphore,
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
        let request = self.request(query)?;
        let mut sender = self.connection().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| LookupError::Failed(format!("request: {e}")))?;
        let (parts, body) = response.into_parts();
        // Read the (usually empty) body so the connection can be reused.
        let body_ok = Limited::new(body, BODY_MAX).collect().await.is_ok();
        if body_ok && !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_MAX {
                idle.push((std::thread::current().id(), sender));
            }
        }
        answer(parts.status, &parts.headers, self.config.send_password)
    }

    /// An idle connection of this thread that is still open, or a new one.
    async fn connection(&self) -> Result<SendRequest<Empty<Bytes>>, LookupError> {
        let here = std::thread::current().id();
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.iter()
                    .rposition(|(thread, _)| *thread == here)
                    .map(|i| idle.swap_remove(i).1)
            };
            match idle {
                Some(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => break,
            }
        }
        let tcp = TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| LookupError::Failed(format!("connect to {}: {e}", self.config.address)))?;
        let _ = tcp.set_nodelay(true);
        // Title case (`Auth-User`), as nginx writes them: services written for nginx may
        // compare header names as written.
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| LookupError::Failed(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn request(&self, query: &Query<'_>) -> Result<Request<Empty<Bytes>>, LookupError> {
        let mut builder = Request::get(&self.config.path)
            .header("Host", &self.config.host)
            .header("Auth-Method", query.method)
            .header("Auth-User", url_encode(query.user))
            .header("Auth-Protocol", "imap")
            .header("Auth-Login-Attempt", query.attempt.to_string())
            .header("Client-IP", query.client.ip().to_string())
            // nginx sends the client's resolved name; imapgate does no reverse lookups.
            .header("Client-Host", "[UNAVAILABLE]")
            .header("Auth-SSL", if query.tls { "on" } else { "off" });
        if let Some(password) = query.password {
            builder = builder.header("Auth-Pass", url_encode_bytes(password.expose()));
        }
        builder
            .body(Empty::new())
            .map_err(|e| LookupError::Failed(format!("request: {e}")))
    }
}

/// nginx URL-encodes `Auth-User` and `Auth-Pass` (so a header cannot be broken by CR/LF).
fn url_encode(text: &str) -> String {
    url_encode_bytes(text.as_bytes())
}

fn url_encode_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@' | b'+') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// The service's answer, from its status and headers.
fn answer(
    status: StatusCode,
    headers: &hyper::HeaderMap,
    send_password: bool,
) -> Result<Answer, LookupError> {
    if !status.is_success() {
        return Err(LookupError::Failed(format!("HTTP {status}")));
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
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

    fn headers(pairs: &[(&'static str, &str)]) -> hyper::HeaderMap {
        let mut map = hyper::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn nginx_answers() {
        let ok = answer(
            StatusCode::OK,
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
            StatusCode::OK,
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
        assert!(matches!(
            answer(StatusCode::OK, &no, false),
            Ok(Answer::NotFound)
        ));
        match answer(StatusCode::OK, &no, true) {
            Ok(Answer::Refused { message, wait }) => {
                assert_eq!(message, "Invalid login or password");
                assert_eq!(wait, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
        assert!(answer(StatusCode::INTERNAL_SERVER_ERROR, &no, false).is_err());
        let bad_port = headers(&[
            ("Auth-Status", "OK"),
            ("Auth-Server", "h"),
            ("Auth-Port", "x"),
        ]);
        assert!(answer(StatusCode::OK, &bad_port, false).is_err());
        let bad_host = headers(&[
            ("Auth-Status", "OK"),
            ("Auth-Server", "a b"),
            ("Auth-Port", "1"),
        ]);
        assert!(answer(StatusCode::OK, &bad_host, false).is_err());
    }

    #[test]
    fn encoding_round_trips() {
        let odd = "a b%c\r\nd@e";
        assert_eq!(url_encode(odd), "a%20b%25c%0D%0Ad@e");
        assert_eq!(url_decode(&url_encode(odd)), odd.as_bytes());
    }
}
