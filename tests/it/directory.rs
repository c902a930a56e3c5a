//! Routing from a directory: an nginx `auth_http` service (a small one of the tests' own,
//! speaking nginx's protocol over keep-alive HTTP/1.1) in front of real Dovecots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{Proxy, http, sample};

/// How the service answers now.
#[derive(Clone)]
enum Behaviour {
    /// user → (server:port, rewritten user); users not listed: "Invalid login or password".
    Table(HashMap<String, (String, Option<String>)>),
    /// Every request: this HTTP status, no Auth headers.
    Status(u16),
    /// Never answers.
    Silent,
    /// Like the table, after a pause (so that lookups overlap).
    Slow(Duration, Box<Behaviour>),
}

struct AuthService {
    addr: std::net::SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Every request's head, as received.
    heads: Arc<Mutex<Vec<String>>>,
}

impl AuthService {
    async fn start(behaviour: Behaviour) -> AuthService {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service = AuthService {
            addr: listener.local_addr().unwrap(),
            behaviour: Arc::new(Mutex::new(behaviour)),
            connections: Arc::default(),
            requests: Arc::default(),
            heads: Arc::default(),
        };
        let (behaviour, connections, requests, heads) = (
            service.behaviour.clone(),
            service.connections.clone(),
            service.requests.clone(),
            service.heads.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (behaviour, requests, heads) =
                    (behaviour.clone(), requests.clone(), heads.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request head at a time (GET: no body).
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head: String = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        requests.fetch_add(1, Ordering::SeqCst);
                        heads.lock().unwrap().push(head.clone());
                        let header = |name: &str| {
                            head.lines().find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                            })
                        };
                        let user = header("Auth-User").unwrap_or_default().replace("%40", "@");
                        let mut now = behaviour.lock().unwrap().clone();
                        if let Behaviour::Slow(pause, inner) = now {
                            tokio::time::sleep(pause).await;
                            now = *inner;
                        }
                        let answer = match now {
                            Behaviour::Silent => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Behaviour::Slow(..) => unreachable!("unwrapped above"),
                            Behaviour::Status(code) => {
                                format!("HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\n\r\n")
                            }
                            Behaviour::Table(table) => match table.get(&user) {
                                Some((server, rewrite)) => {
                                    let (host, port) = server.rsplit_once(':').unwrap();
                                    let rewrite = rewrite
                                        .as_ref()
                                        .map_or(String::new(), |u| format!("Auth-User: {u}\r\n"));
                                    format!(
                                        "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {host}\r\nAuth-Port: {port}\r\n{rewrite}Content-Length: 0\r\n\r\n"
                                    )
                                }
                                None => "HTTP/1.1 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 1\r\nContent-Length: 0\r\n\r\n".to_string(),
                            },
                        };
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        service
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }
}

fn table(entries: &[(&str, &str, Option<&str>)]) -> Behaviour {
    Behaviour::Table(
        entries
            .iter()
            .map(|(u, s, r)| (u.to_string(), (s.to_string(), r.map(str::to_string))))
            .collect(),
    )
}

fn yaml(backends: &[(&str, String)], lookup: &str) -> String {
    let mut y = String::from("backends:\n");
    for (n, a) in backends {
        y.push_str(&format!("  - {{ name: {n}, address: \"{a}\" }}\n"));
    }
    y.push_str(&format!(
        "admin: {{ bind: \"127.0.0.1:9143\" }}\nhealth: {{ interval: 1h }}\nrouting:\n  lookup:\n{lookup}"
    ));
    y
}

#[tokio::test]
async fn users_land_where_the_directory_says_over_kept_alive_connections() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2, b3) = (
        Dovecot::start("b1"),
        Dovecot::start("b2"),
        Dovecot::start("b3"),
    );
    // alice and bob where the hash would not necessarily put them; erin on b3, which is not
    // configured at all (a dynamic backend); carol-alias is rewritten to carol.
    let service = AuthService::start(table(&[
        ("alice", &b2.address(), None),
        ("bob", &b1.address(), None),
        ("erin", &b3.address(), None),
        ("carol-alias", &b1.address(), Some("carol")),
    ]))
    .await;
    let proxy = Proxy::start(&yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &format!(
            "    http: {{ url: \"http://{}/auth\" }}\n    cache: {{ ttl: 0s, negative_ttl: 0s }}\n    fallback: refuse\n",
            service.addr
        ),
    ))
    .await;
    for (user, password, expected) in [
        ("alice", "alice-secret", "b2"),
        ("bob", "bob-secret", "b1"),
        ("erin", "erin-secret", "b3"),
        ("carol-alias", "carol-secret", "b1"),
        ("alice", "alice-secret", "b2"),
    ] {
        let mut c = proxy.connect().await;
        c.login(user, password).await;
        assert_eq!(c.backend().await, expected, "{user}");
    }
    // Unknown user, fallback refuse: the client's NO, with no backend asked.
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN dave dave-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(
        answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );

    assert_eq!(
        service.requests.load(Ordering::SeqCst),
        6,
        "no cache: one request per login"
    );
    assert!(
        service.connections.load(Ordering::SeqCst) <= 2,
        "connections to the service are kept alive: {} for 6 requests",
        service.connections.load(Ordering::SeqCst)
    );
    let heads = service.heads.lock().unwrap().clone();
    // Header names compare case-insensitively (HTTP); hyper title-cases them (`Client-Ip`).
    let first = heads[0].to_ascii_lowercase();
    for h in [
        "Auth-Method: plain",
        "Auth-User: alice",
        "Auth-Protocol: imap",
        "Auth-Login-Attempt: 1",
        "Client-IP: 127.0.0.1",
        "Auth-SSL: off",
    ] {
        let h = h.to_ascii_lowercase();
        assert!(first.contains(&h), "{h} missing in {first}");
    }
    assert!(
        heads
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("auth-pass")),
        "the password is not sent unless send_password"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_directory_lookups_total",
            "source=\"http\",result=\"ok\""
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "imapgate_directory_lookups_total",
            "source=\"http\",result=\"not_found\""
        ),
        Some(1.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_directory_outage_is_served_from_the_cache_then_the_fallback() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let service = AuthService::start(table(&[("alice", &b2.address(), None)])).await;
    let proxy = Proxy::start(&yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &format!(
            "    http: {{ url: \"http://{}/auth\", timeout: 500ms }}\n    cache: {{ ttl: 0s, stale_max_age: 1h }}\n    fallback: hash\n",
            service.addr
        ),
    ))
    .await;
    // Warm: alice's route is kept.
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, "b2");

    // The directory fails: alice still goes to b2 (stale); bob, never seen, gets the hash.
    service.set(Behaviour::Status(500));
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(
        c.backend().await,
        "b2",
        "served from the cache while the directory fails"
    );
    let hashed = &proxy.config.backends[imapgate::backends_for(&proxy.config, "bob")[0]].name;
    let mut c = proxy.connect().await;
    c.login("bob", "bob-secret").await;
    assert_eq!(c.backend().await, **hashed, "cold: the fallback");

    // A directory that does not answer at all: the timeout, then the same.
    service.set(Behaviour::Silent);
    let started = Instant::now();
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, "b2");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the lookup timeout"
    );

    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_directory_cache_total",
            "result=\"stale\""
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "imapgate_directory_lookups_total",
            "source=\"http\",result=\"timeout\""
        ),
        Some(1.0)
    );

    // Back: the directory is asked again, and a flush forgets alice.
    service.set(table(&[("alice", &b1.address(), None)]));
    let (status, body) = http(proxy.admin, "POST", "/cache/flush?user=alice", None).await;
    assert_eq!(status, 200, "{body}");
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, "b1", "the directory's new answer");
    proxy.stop().await;
}

#[tokio::test]
async fn with_the_password_sent_the_service_may_refuse() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let service = AuthService::start(table(&[("alice", &b1.address(), None)])).await;
    let proxy = Proxy::start(&yaml(
        &[("b1", b1.address())],
        &format!(
            "    http: {{ url: \"http://{}/auth\", send_password: true }}\n",
            service.addr
        ),
    ))
    .await;
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    let heads = service.heads.lock().unwrap().clone();
    assert!(heads[0].contains("Auth-Pass: alice-secret"), "{}", heads[0]);

    let started = Instant::now();
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN mallory guess\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert_eq!(
        answer,
        "a NO [AUTHENTICATIONFAILED] Invalid login or password\r\n"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Auth-Wait: 1 was honoured"
    );
    proxy.stop().await;
}

/// `imapgate route` asks the directory too, and stops quietly when its reader goes away.
#[tokio::test]
async fn the_route_command_shows_the_directory_answer() {
    let service = AuthService::start(table(&[(
        "alice",
        "10.0.0.9:143",
        Some("alice@example.net"),
    )]))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    std::fs::write(
        &path,
        format!(
            "backends:\n  - {{ name: b1, address: \"10.0.0.1:143\" }}\nrouting:\n  lookup:\n    http: {{ url: \"http://{}/auth\" }}\n",
            service.addr
        ),
    )
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["route", "alice", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout.lines().next(),
        Some("directory\t10.0.0.9:143\tas alice@example.net"),
        "{stdout}"
    );
    assert!(stdout.contains("1\tb1\t10.0.0.1:143"), "{stdout}");

    // A reader that closes at once (as `| head -1` does after one line): no panic.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["route", "alice", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert!(
        !String::from_utf8_lossy(&status.stderr).contains("panicked"),
        "{status:?}"
    );
}

/// Logins of one user at the same moment wait for one lookup.
#[tokio::test]
async fn concurrent_lookups_of_one_user_are_one_question() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let service = AuthService::start(Behaviour::Slow(
        Duration::from_millis(300),
        Box::new(table(&[("alice", &b1.address(), None)])),
    ))
    .await;
    let proxy = Proxy::start(&yaml(
        &[("b1", b1.address())],
        &format!("    http: {{ url: \"http://{}/auth\" }}\n", service.addr),
    ))
    .await;
    let logins: Vec<_> = (0..10)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut c = crate::support::Raw::connect(addr).await;
                c.login("alice", "alice-secret").await;
                c
            })
        })
        .collect();
    for login in logins {
        login.await.unwrap();
    }
    assert_eq!(
        service.requests.load(Ordering::SeqCst),
        1,
        "one question for ten logins"
    );
    proxy.stop().await;
}
