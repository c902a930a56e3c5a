//! The same client sessions through imapgate in front of Dovecot, Cyrus and Courier: every
//! login form, the backend's capabilities after login, APPEND with LITERAL+ only where the
//! backend has it (a message body never runs as commands), pipelining, byte-exact APPEND and
//! FETCH. One test per scenario and backend, so a failure names both.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::support::backends::{self, Client};
use crate::support::courier::{self, Courier};
use crate::support::cyrus::{self, Cyrus};
use crate::support::dovecot::{self, Dovecot};
use crate::support::{Proxy, Raw, config};

enum Server {
    Dovecot(Dovecot),
    Cyrus(Cyrus),
    Courier(Courier),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dovecot,
    Cyrus,
    Courier,
}

impl Server {
    /// `None` (the test returns) when the server is missing outside CI.
    fn start(kind: Kind) -> Option<Server> {
        Some(match kind {
            Kind::Dovecot => Server::Dovecot(dovecot::available().then(|| Dovecot::start("b1"))?),
            Kind::Cyrus => Server::Cyrus(cyrus::available().then(|| Cyrus::start("b1"))?),
            Kind::Courier => Server::Courier(courier::available().then(|| Courier::start("b1"))?),
        })
    }

    fn address(&self) -> String {
        match self {
            Server::Dovecot(s) => s.address(),
            Server::Cyrus(s) => s.address(),
            Server::Courier(s) => s.address(),
        }
    }
}

/// imapgate in front of one freshly started `kind` server.
async fn through_imapgate(kind: Kind) -> Option<(Server, Proxy)> {
    let server = Server::start(kind)?;
    let proxy = Proxy::start(&config(&[("b1", server.address())], "")).await;
    Some((server, proxy))
}

/// The capability list a tagged OK or an untagged CAPABILITY line carries.
fn capability_list(lines: &[String], ok: &str) -> Option<String> {
    let from_code = ok
        .split_once("[CAPABILITY ")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list.to_string());
    from_code.or_else(|| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("* CAPABILITY "))
            .map(|l| l.trim_end().to_string())
    })
}

/// Every login form a client may use reaches the backend and logs in; SELECT works after.
async fn login_forms(kind: Kind) {
    let Some((_server, proxy)) = through_imapgate(kind).await else {
        return;
    };
    let plain = B64.encode("\0carol\0carol-secret");
    let forms: Vec<(&str, Vec<String>)> = vec![
        ("atom", vec!["t LOGIN carol carol-secret\r\n".into()]),
        (
            "quoted",
            vec!["t LOGIN \"carol\" \"carol-secret\"\r\n".into()],
        ),
        (
            "literals",
            vec![
                "t LOGIN {5}\r\n".into(),
                "carol {12}\r\n".into(),
                "carol-secret\r\n".into(),
            ],
        ),
        (
            "non-sync literal",
            vec!["t LOGIN carol {12+}\r\ncarol-secret\r\n".into()],
        ),
        (
            "AUTHENTICATE PLAIN, SASL-IR",
            vec![format!("t AUTHENTICATE PLAIN {plain}\r\n")],
        ),
        (
            "AUTHENTICATE PLAIN, +",
            vec!["t AUTHENTICATE PLAIN\r\n".into(), format!("{plain}\r\n")],
        ),
        (
            "AUTHENTICATE LOGIN",
            vec![
                "t AUTHENTICATE LOGIN\r\n".into(),
                format!("{}\r\n", B64.encode("carol")),
                format!("{}\r\n", B64.encode("carol-secret")),
            ],
        ),
    ];
    for (name, parts) in forms {
        let mut c = proxy.connect().await;
        c.line().await.unwrap();
        for (i, part) in parts.iter().enumerate() {
            c.send(part).await;
            if i + 1 < parts.len() {
                let cont = c.line().await.unwrap();
                assert!(cont.starts_with('+'), "{kind:?} {name}: {cont:?}");
            }
        }
        let (_, answer) = c.until_tagged("t").await;
        assert!(answer.starts_with("t OK"), "{kind:?} {name}: {answer}");
        c.send("s SELECT INBOX\r\n").await;
        let (_, answer) = c.until_tagged("s").await;
        assert!(answer.starts_with("s OK"), "{kind:?} {name}: {answer}");
    }
    proxy.stop().await;
}

/// After login the client holds the backend's own post-login list, exactly what a direct
/// client is told after the same login, not imapgate's pre-login one.
async fn capabilities_after_login(kind: Kind) {
    let Some((server, proxy)) = through_imapgate(kind).await else {
        return;
    };
    let mut direct = Client::connect(&server.address()).unwrap();
    direct.login("dave", "dave-secret").unwrap();
    let direct_caps = direct.ok("CAPABILITY").unwrap();
    let direct_caps = capability_list(&direct_caps, "").expect("a CAPABILITY line");
    direct.logout();

    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN dave dave-secret\r\n").await;
    let (untagged, ok) = c.until_tagged("a").await;
    assert!(ok.starts_with("a OK"), "{kind:?}: {ok}");
    let caps = capability_list(&untagged, &ok)
        .unwrap_or_else(|| panic!("{kind:?}: no capabilities after login: {untagged:?} {ok}"));
    let words = |list: &str| {
        let mut w: Vec<String> = list.split(' ').map(str::to_ascii_uppercase).collect();
        w.sort();
        w
    };
    assert_eq!(words(&caps), words(&direct_caps), "{kind:?}");
    if kind == Kind::Courier {
        assert!(!caps.contains("LITERAL+"), "{caps}");
    }
    proxy.stop().await;
}

const INJECTING_MESSAGE: &str = "From: a@example.net\r\nSubject: drafts hold anything\r\n\r\n\
    inj1 CREATE INBOX.injected-by-body\r\ninj2 CREATE injected-by-body\r\n";

/// A client that reads the login OK sends `{n+}` only where the backend takes it; the APPEND
/// succeeds, and the tagged commands inside the message never run (LIST on the backend,
/// directly).
async fn append_body_never_runs(kind: Kind) {
    let Some((server, proxy)) = through_imapgate(kind).await else {
        return;
    };
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN erin erin-secret\r\n").await;
    let (untagged, ok) = c.until_tagged("a").await;
    let caps = capability_list(&untagged, &ok).expect("capabilities after login");
    let literal_plus = caps.split(' ').any(|w| w.eq_ignore_ascii_case("LITERAL+"));
    let n = INJECTING_MESSAGE.len();
    if literal_plus {
        c.send(format!(
            "b APPEND INBOX {{{n}+}}\r\n{INJECTING_MESSAGE}\r\n"
        ))
        .await;
    } else {
        c.send(format!("b APPEND INBOX {{{n}}}\r\n")).await;
        let go_ahead = c.line().await.unwrap();
        assert!(go_ahead.starts_with('+'), "{kind:?}: {go_ahead}");
        c.send(format!("{INJECTING_MESSAGE}\r\n")).await;
    }
    let (_, answer) = c.until_tagged("b").await;
    assert!(answer.starts_with("b OK"), "{kind:?}: {answer}");
    c.send("z LOGOUT\r\n").await;
    c.rest().await;
    let names = backends::mailboxes(&server.address(), "erin", "erin-secret").unwrap();
    assert!(
        !names.iter().any(|n| n.contains("injected")),
        "{kind:?}: the message body ran as commands: {names:?}"
    );
    assert_eq!(kind == Kind::Courier, !literal_plus, "{kind:?}: {caps}");
    proxy.stop().await;
}

/// LOGIN, SELECT, FETCH and LOGOUT in one write: every command is answered, in order (imapgate
/// holds what the client sent behind LOGIN until the login succeeded).
async fn pipelined_commands(kind: Kind) {
    let Some((_server, proxy)) = through_imapgate(kind).await else {
        return;
    };
    let mut c = proxy.connect().await;
    c.login("bob", "bob-secret").await;
    let message = "From: a@example.net\r\nSubject: pipe\r\n\r\nhi\r\n";
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send(format!("{message}\r\n")).await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"), "{kind:?}");

    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("1 LOGIN bob bob-secret\r\n2 SELECT INBOX\r\n3 FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]\r\n4 LOGOUT\r\n")
        .await;
    assert!(c.until_tagged("1").await.1.starts_with("1 OK"), "{kind:?}");
    let (untagged, answer) = c.until_tagged("2").await;
    assert!(answer.starts_with("2 OK"), "{kind:?}: {answer}");
    assert!(
        untagged.iter().any(|l| l.contains("EXISTS")),
        "{kind:?}: {untagged:?}"
    );
    let (untagged, answer) = c.until_tagged("3").await;
    assert!(answer.starts_with("3 OK"), "{kind:?}: {answer}");
    assert!(
        untagged.iter().any(|l| l.contains("Subject: pipe")),
        "{kind:?}: {untagged:?}"
    );
    let rest = c.rest().await;
    assert!(rest.contains("4 OK"), "{kind:?}: {rest:?}");
    proxy.stop().await;
}

/// A 300 KB message with IMAP-looking lines goes in by APPEND and comes back by FETCH byte for
/// byte (its body copied past the observer, which skips it by count; the faults tests cover the
/// splice path).
async fn append_and_fetch_byte_exact(kind: Kind) {
    let Some((_server, proxy)) = through_imapgate(kind).await else {
        return;
    };
    let mut message = b"From: a@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut x: u32 = 7;
    while message.len() < 300_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let line = format!(
            "{x:08x} a1 OK {{5}} * BYE {}\r\n",
            "z".repeat((x % 60) as usize)
        );
        message.extend_from_slice(line.as_bytes());
    }
    let mut c: Raw = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send(&message).await;
    c.send("\r\n").await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"), "{kind:?}");
    c.send("s SELECT INBOX\r\n").await;
    let (untagged, answer) = c.until_tagged("s").await;
    assert!(answer.starts_with("s OK"), "{kind:?}: {answer}");
    let exists = untagged
        .iter()
        .find_map(|l| l.strip_prefix("* ")?.strip_suffix(" EXISTS\r\n"))
        .expect("EXISTS")
        .to_string();
    c.send(format!("f FETCH {exists} BODY.PEEK[]\r\n")).await;
    let head = c.line().await.unwrap();
    let size: usize = head
        .trim_end()
        .rsplit_once('{')
        .and_then(|(_, n)| n.strip_suffix('}'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{kind:?}: {head}"));
    assert_eq!(size, message.len(), "{kind:?}");
    let body = c.bytes(size).await;
    assert!(body == message, "{kind:?}: the message came back changed");
    assert!(c.until_tagged("f").await.1.starts_with("f OK"), "{kind:?}");
    proxy.stop().await;
}

macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Kind;
            #[tokio::test]
            async fn dovecot() {
                super::$scenario(Kind::Dovecot).await
            }
            #[tokio::test]
            async fn cyrus() {
                super::$scenario(Kind::Cyrus).await
            }
            #[tokio::test]
            async fn courier() {
                super::$scenario(Kind::Courier).await
            }
        }
    )*};
}

on_every_backend!(
    login_forms,
    capabilities_after_login,
    append_body_never_runs,
    pipelined_commands,
    append_and_fetch_byte_exact,
);

/// Why it matters: straight to Courier, a client that sends `{n+}` anyway (Courier has no
/// LITERAL+) gets its APPEND refused and the message's lines run as commands. imapgate cannot
/// stop a client that ignores the capabilities; it makes sure a client that reads them is told
/// the truth (the tests above).
#[tokio::test]
async fn courier_direct_runs_a_literal_plus_body() {
    let Some(Server::Courier(server)) = Server::start(Kind::Courier) else {
        return;
    };
    let mut c = Raw::connect(server.address().parse().unwrap()).await;
    c.login("erin", "erin-secret").await;
    let n = INJECTING_MESSAGE.len();
    c.send(format!(
        "b APPEND INBOX {{{n}+}}\r\n{INJECTING_MESSAGE}\r\n"
    ))
    .await;
    let (_, answer) = c.until_tagged("b").await;
    assert!(
        answer.starts_with("b NO") || answer.starts_with("b BAD"),
        "{answer}"
    );
    let (_, answer) = c.until_tagged("inj1").await;
    assert!(answer.starts_with("inj1 OK"), "{answer}");
    let names = backends::mailboxes(&server.address(), "erin", "erin-secret").unwrap();
    assert!(
        names.iter().any(|n| n.contains("injected-by-body")),
        "{names:?}"
    );
}
