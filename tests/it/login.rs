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
