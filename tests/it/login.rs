//! Logins through imapgate against two real Dovecot backends: every form, routing, failures.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{Proxy, config};

fn two_backends() -> Option<(Dovecot, Dovecot)> {
    if !dovecot::available() {
        return None;
    }
    Some((Dovecot::start("b1"), Dovecot::start("b2")))
}

#[tokio::test]
async fn static_and_hashed_users_land_on_their_backend() {
    let Some((b1, b2)) = two_backends() else {
        return;
    };
    let backends = [("b1", b1.address()), ("b2", b2.address())];
    // alice is pinned to the backend the hash would NOT give her, so the map must win.
    let hashed = imapgate::config::parse(&config(&backends, ""), "t").unwrap();
    let alice_hashed = &hashed.backends[imapgate::backends_for(&hashed, "alice")[0]].name;
    let pinned = if &**alice_hashed == "b1" { "b2" } else { "b1" };
    let proxy = Proxy::start(&config(
        &backends,
        &format!("routing:\n  static: {{ ALICE: {pinned} }}\n"),
    ))
    .await;

    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, pinned, "static map");

    for (user, password) in &dovecot::USERS[1..5] {
        let expected = &proxy.config.backends[imapgate::backends_for(&proxy.config, user)[0]].name;
        let mut c = proxy.connect().await;
        c.login(user, password).await;
        let actual = c.backend().await;
        assert_eq!(actual, &**expected, "hashed user {user}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_then_retry_on_the_same_connection() {
    let Some((b1, b2)) = two_backends() else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address()), ("b2", b2.address())], "")).await;
    let mut c = proxy.connect().await;
    assert!(c.line().await.unwrap().starts_with("* OK [CAPABILITY "));
    c.send("a1 LOGIN bob wrong\r\n").await;
    let (_, answer) = c.until_tagged("a1").await;
    assert!(
        answer.starts_with("a1 NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );
    c.send("a2 LOGIN bob bob-secret\r\n").await;
    let (_, answer) = c.until_tagged("a2").await;
    assert!(
        answer.starts_with("a2 OK [CAPABILITY IMAP4rev1"),
        "backend capabilities pass through: {answer}"
    );
    c.send("a3 SELECT INBOX\r\n").await;
    let (_, answer) = c.until_tagged("a3").await;
    assert!(answer.starts_with("a3 OK"), "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn too_many_failed_logins_end_with_bye() {
    let Some((b1, _b2)) = two_backends() else {
        return;
    };
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "limits: { login_attempts: 2 }\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a1 LOGIN bob wrong\r\n").await;
    assert!(c.until_tagged("a1").await.1.starts_with("a1 NO"));
    c.send("a2 LOGIN bob wrong\r\n").await;
    assert!(c.until_tagged("a2").await.1.starts_with("a2 NO"));
    let rest = c.rest().await;
    assert!(rest.starts_with("* BYE"), "{rest:?}");
    proxy.stop().await;
}

/// Every way to present credentials, each checked by a command that needs a real login.
#[tokio::test]
async fn every_login_form_reaches_the_backend() {
    let Some((b1, _b2)) = two_backends() else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let long = dovecot::long_password();
    let quoter = dovecot::USERS[5].1;
    let unicode = dovecot::USERS[6].1;
    let plain =
        |authzid: &str, user: &str, pw: &str| B64.encode(format!("{authzid}\0{user}\0{pw}"));

    // (what the client sends, expecting "+" continuations before each later part)
    let forms: Vec<(&str, Vec<String>)> = vec![
        ("atom", vec!["t LOGIN carol carol-secret\r\n".into()]),
        (
            "quoted",
            vec!["t LOGIN \"carol\" \"carol-secret\"\r\n".into()],
        ),
        (
            "quoted with escapes",
            vec!["t LOGIN quoter \"sp ace \\\"quote\\\" back\\\\slash\"\r\n".into()],
        ),
        (
            "sync literals",
            vec![
                "t LOGIN {6}\r\n".into(),
                format!("quoter {{{}}}\r\n", quoter.len()),
                format!("{quoter}\r\n"),
            ],
        ),
        (
            "non-sync literal, UTF-8",
            vec![format!(
                "t LOGIN unicode {{{}+}}\r\n{unicode}\r\n",
                unicode.len()
            )],
        ),
        (
            "500-character password as a literal",
            vec!["t LOGIN longpw {500}\r\n".into(), format!("{long}\r\n")],
        ),
        (
            "AUTHENTICATE PLAIN with SASL-IR",
            vec![format!(
                "t AUTHENTICATE PLAIN {}\r\n",
                plain("", "quoter", quoter)
            )],
        ),
        (
            "AUTHENTICATE PLAIN with a + exchange",
            vec![
                "t AUTHENTICATE PLAIN\r\n".into(),
                format!("{}\r\n", plain("", "unicode", unicode)),
            ],
        ),
        (
            "AUTHENTICATE LOGIN",
            vec![
                "t AUTHENTICATE LOGIN\r\n".into(),
                format!("{}\r\n", B64.encode("longpw")),
                format!("{}\r\n", B64.encode(&long)),
            ],
        ),
        (
            "AUTHENTICATE PLAIN, authzid equal to the user",
            vec![format!(
                "t AUTHENTICATE PLAIN {}\r\n",
                plain("carol", "carol", "carol-secret")
            )],
        ),
    ];
    let logins = || b1.info_log().matches("Login: user=<").count();
    for (name, parts) in forms {
        let before = logins();
        log_in_as(&proxy, name, &parts).await;
        // Dovecot logged one more login (its log is written a moment after the answer).
        b1.wait_for_info_line(|_| logins() == before + 1).await;
        // The mechanism is replayed as it came (Dovecot counts LOGIN as PLAIN).
        let log = b1.info_log();
        let login = log.lines().rev().find(|l| l.contains("Login: user=<"));
        let method = if name == "AUTHENTICATE LOGIN" {
            "method=LOGIN"
        } else {
            "method=PLAIN"
        };
        assert!(
            login.is_some_and(|l| l.contains(method)),
            "{name}: {login:?}"
        );
    }
    proxy.stop().await;
}

/// Connects, sends `parts` (each after the `+` the one before asked for), checks that the
/// tagged OK reaches the client and that the session is logged in (SELECT works).
async fn log_in_as(proxy: &Proxy, name: &str, parts: &[String]) {
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    for (i, part) in parts.iter().enumerate() {
        c.send(part).await;
        if i + 1 < parts.len() {
            let cont = c.line().await.unwrap();
            assert!(
                cont.starts_with("+"),
                "{name}: expected a continuation, got {cont:?}"
            );
        }
    }
    let (_, answer) = c.until_tagged("t").await;
    assert!(answer.starts_with("t OK"), "{name}: {answer}");
    c.send("s SELECT INBOX\r\n").await;
    let (_, answer) = c.until_tagged("s").await;
    assert!(answer.starts_with("s OK"), "{name}: after login: {answer}");
}

/// A 1,000-octet password, which quoted (its `"` and `\` escaped) would overflow Dovecot's
/// pre-login buffer (`* BYE Input buffer full`), logs in however the client sends it. LOGIN is
/// replayed with a literal: `{1000+}` to a backend with LITERAL+, `{1000}` and the wait for `+`
/// to one without (Dovecot with LITERAL-); AUTHENTICATE PLAIN keeps SASL-IR, since Dovecot reads
/// an AUTHENTICATE line into a buffer of its own (8 KiB). A forwarder between imapgate and
/// Dovecot shows what was replayed.
#[tokio::test]
async fn a_1000_octet_password_logs_in_every_way() {
    if !dovecot::available() {
        return;
    }
    let password = dovecot::longer_password();
    assert_eq!(password.len(), 1000);
    let escaped = password.replace('\\', "\\\\").replace('"', "\\\"");
    let plain = B64.encode(format!("\0longerpw\0{password}"));
    let forms: Vec<(&str, Vec<String>)> = vec![
        (
            "quoted",
            vec![format!("t LOGIN longerpw \"{escaped}\"\r\n")],
        ),
        (
            "sync literal",
            vec![
                "t LOGIN longerpw {1000}\r\n".into(),
                format!("{password}\r\n"),
            ],
        ),
        (
            "non-sync literal",
            vec![format!("t LOGIN longerpw {{1000+}}\r\n{password}\r\n")],
        ),
        (
            "AUTHENTICATE PLAIN with SASL-IR",
            vec![format!("t AUTHENTICATE PLAIN {plain}\r\n")],
        ),
        (
            "AUTHENTICATE PLAIN with a + exchange",
            vec!["t AUTHENTICATE PLAIN\r\n".into(), format!("{plain}\r\n")],
        ),
    ];
    for (literal_minus, replayed) in [(false, "{1000+}\r\n"), (true, "{1000}\r\n")] {
        let b1 = Dovecot::start_with(
            "b1",
            dovecot::Options {
                literal_minus,
                ..Default::default()
            },
        );
        let seen = Forwarder::start(b1.address()).await;
        // Health checks by TCP connect only: a greeting check's bytes would mix into what
        // the forwarder records.
        let proxy = Proxy::start(&config(
            &[("b1", seen.address.clone())],
            "health: { mode: tcp }\n",
        ))
        .await;
        for (name, parts) in &forms {
            let name = format!("{name}, literal_minus: {literal_minus}");
            seen.take();
            log_in_as(&proxy, &name, parts).await;
            let sent = String::from_utf8_lossy(&seen.take()).into_owned();
            let expected = if name.starts_with("AUTHENTICATE") {
                format!("ig1 AUTHENTICATE PLAIN {plain}\r\n")
            } else {
                format!("ig1 LOGIN \"longerpw\" {replayed}{password}\r\n")
            };
            assert!(sent.contains(&expected), "{name}: replayed as {sent:?}");
        }
        proxy.stop().await;
    }
}

/// A TCP forwarder to a backend that keeps what imapgate sent it (health checks included).
struct Forwarder {
    address: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Forwarder {
    async fn start(backend: String) -> Forwarder {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&backend).await else {
                    continue;
                };
                let (mut client_in, mut client_out) = client.into_split();
                let (mut server_in, mut server_out) = server.into_split();
                let keep = keep.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n @ 1..) = client_in.read(&mut buf).await {
                        keep.lock().unwrap().extend_from_slice(&buf[..n]);
                        if server_out.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_out.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_in, &mut client_out).await;
                    let _ = client_out.shutdown().await;
                });
            }
        });
        Forwarder { address, sent }
    }

    /// What imapgate sent since the last call.
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

/// An authzid goes to the backend as it came: Dovecot (with no master users) must refuse
/// carol acting as bob, instead of imapgate logging carol in as herself.
#[tokio::test]
async fn plain_authzid_is_replayed_not_dropped() {
    let Some((b1, _b2)) = two_backends() else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    let ir = B64.encode("bob\0carol\0carol-secret");
    c.send(format!("t AUTHENTICATE PLAIN {ir}\r\n")).await;
    let (_, answer) = c.until_tagged("t").await;
    assert!(answer.starts_with("t NO"), "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn sasl_cancel_and_unknown_mechanism() {
    let Some((b1, _b2)) = two_backends() else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("t1 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+"));
    c.send("*\r\n").await;
    assert!(c.until_tagged("t1").await.1.starts_with("t1 BAD"));
    c.send("t2 AUTHENTICATE CRAM-MD5\r\n").await;
    assert!(c.until_tagged("t2").await.1.starts_with("t2 NO"));
    c.send(format!(
        "t3 AUTHENTICATE PLAIN {}\r\n",
        B64.encode("alice\0pw")
    ))
    .await;
    assert!(
        c.until_tagged("t3").await.1.starts_with("t3 BAD"),
        "PLAIN with two fields"
    );
    c.send("t4 LOGIN dave dave-secret\r\n").await;
    assert!(c.until_tagged("t4").await.1.starts_with("t4 OK"));
    proxy.stop().await;
}

#[tokio::test]
async fn stopped_backend_is_unavailable_and_others_unaffected() {
    let Some((b1, mut b2)) = two_backends() else {
        return;
    };
    let backends = [("b1", b1.address()), ("b2", b2.address())];
    let proxy = Proxy::start(&config(
        &backends,
        "routing:\n  static: { alice: b1, bob: b2 }\n",
    ))
    .await;
    let failover = Proxy::start(&config(
        &backends,
        "routing:\n  failover: true\n  static: { alice: b1, bob: b2 }\n",
    ))
    .await;
    b2.stop();

    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN bob bob-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    // The client may try again on the same connection; alice's backend is up.
    c.send("b LOGIN alice alice-secret\r\n").await;
    assert!(c.until_tagged("b").await.1.starts_with("b OK"));
    assert_eq!(c.backend().await, "b1");

    let mut c = failover.connect().await;
    c.login("bob", "bob-secret").await;
    assert_eq!(c.backend().await, "b1", "failover to the next backend");
    proxy.stop().await;
    failover.stop().await;
}
