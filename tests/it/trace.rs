//! Per-user traces (`POST /trace`, `GET /trace/{id}`) through the real binary in front of a
//! real Dovecot: a session that was logged in before the trace began and one that logs in
//! while it runs are both recorded, with their commands and responses, and without a password,
//! a SASL response or a message body.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, Raw, http};

const TOKEN: &str = "trace-test-token-0123456789";
const BODY_MARKER: &str = "body-marker-never-in-a-trace";

fn yaml(backend: &str, token_file: &std::path::Path, extra: &str) -> String {
    format!(
        "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:0\" }}\nadmin: {{ bind: \"127.0.0.1:0\", token_file: \"{}\"{extra} }}\nbackends:\n  - {{ name: b1, address: \"{backend}\" }}\n",
        token_file.display()
    )
}

async fn admin(proxy: &Proxy, method: &str, path: &str) -> (u16, String) {
    http(proxy.admin, method, path, Some(TOKEN)).await
}

#[tokio::test]
async fn a_trace_records_commands_and_never_a_secret() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let proxy = Proxy::start(&yaml(&b1.address(), &token_file, "")).await;

    // A session logged in before the trace starts; it puts a message in INBOX.
    let mut early = proxy.connect().await;
    early.login("alice", "alice-secret").await;
    let message = format!("Subject: traced\r\n\r\n{BODY_MARKER}\r\n");
    early
        .send(format!(
            "p APPEND INBOX {{{}+}}\r\n{message}\r\n",
            message.len()
        ))
        .await;
    let (_, done) = early.until_tagged("p").await;
    assert!(done.starts_with("p OK"), "{done}");

    // Without the token: refused. With it: started, and the early session joins.
    let (status, _) = http(proxy.admin, "POST", "/trace?user=alice", None).await;
    assert_eq!(status, 401);
    let (status, started) = admin(&proxy, "POST", "/trace?user=Alice&seconds=120").await;
    assert_eq!(status, 201, "{started}");
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    assert_eq!(started["sessions"], 1, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let (status, _) = admin(&proxy, "POST", "/trace?user=alice&seconds=120").await;
    assert_eq!(status, 409, "one trace per user");
    let (status, _) = admin(&proxy, "POST", "/trace?user=bob&bodies=true").await;
    assert_eq!(status, 403, "bodies need admin.trace.allow_bodies");
    let (status, _) = admin(&proxy, "POST", "/trace?user=bob&seconds=99999").await;
    assert_eq!(status, 400);

    early.send("e1 SELECT INBOX\r\n").await;
    early.until_tagged("e1").await;
    early.send("e2 FETCH 1 (BODY[])\r\n").await;
    let (lines, done) = early.until_tagged("e2").await;
    assert!(done.starts_with("e2 OK") && lines.concat().contains(BODY_MARKER));

    // A session that logs in while the trace runs, with AUTHENTICATE PLAIN (SASL-IR).
    let sasl = B64.encode("\0alice\0alice-secret");
    let mut late = proxy.connect().await;
    late.line().await.unwrap();
    late.send(format!("l1 AUTHENTICATE PLAIN {sasl}\r\n")).await;
    let (_, done) = late.until_tagged("l1").await;
    assert!(done.starts_with("l1 OK"), "{done}");
    late.send("l2 EXAMINE INBOX\r\nl3 FETCH 1 (BODY.PEEK[TEXT])\r\n")
        .await;
    late.until_tagged("l2").await;
    let (lines, _) = late.until_tagged("l3").await;
    assert!(lines.concat().contains(BODY_MARKER));
    // A wrong password is recorded as a failed login, without the password.
    let mut wrong = proxy.connect().await;
    wrong.line().await.unwrap();
    wrong.send("w1 LOGIN alice wrong-guess\r\n").await;
    let (_, done) = wrong.until_tagged("w1").await;
    assert!(done.starts_with("w1 NO"), "{done}");
    // And one of bob's, not traced.
    let mut bob = proxy.connect().await;
    bob.login("bob", "bob-secret").await;
    bob.send("b1 SELECT INBOX\r\n").await;
    bob.until_tagged("b1").await;
    late.send("l4 LOGOUT\r\n").await;
    late.rest().await;

    // The session end is recorded by the session's task after the client saw BYE: wait for it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let trace = loop {
        let (status, trace) = admin(&proxy, "GET", &format!("/trace/{id}")).await;
        assert_eq!(status, 200);
        if trace.contains("session end") || tokio::time::Instant::now() > deadline {
            break trace;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for wanted in [
        "joined: logged in earlier as alice",
        "C: e1 SELECT INBOX",
        "C: e2 FETCH 1 (BODY[])",
        "S: e2 OK",
        "l1 AUTHENTICATE PLAIN as alice [credentials not recorded]",
        "C: l2 EXAMINE INBOX",
        "C: l3 FETCH 1 (BODY.PEEK[TEXT])",
        "octets]",
        "S: * BYE",
        "session end",
        "failed (rejected): w1 LOGIN as alice",
    ] {
        assert!(trace.contains(wanted), "{wanted:?} missing from:\n{trace}");
    }
    for secret in [
        "alice-secret",
        "wrong-guess",
        &sasl,
        BODY_MARKER,
        "bob",
        "p APPEND",
    ] {
        assert!(
            !trace.contains(secret),
            "{secret:?} is in the trace:\n{trace}"
        );
    }

    let (_, list) = admin(&proxy, "GET", "/trace").await;
    assert!(
        list.contains("\"running\":true") && list.contains("\"sessions\":2"),
        "{list}"
    );
    let (status, _) = admin(&proxy, "DELETE", &format!("/trace/{id}")).await;
    assert_eq!(status, 200);
    let (_, list) = admin(&proxy, "GET", "/trace").await;
    assert!(list.contains("\"running\":false"), "{list}");
    // A stopped trace records nothing more.
    early.send("e3 NOOP\r\n").await;
    early.until_tagged("e3").await;
    let (_, after) = admin(&proxy, "GET", &format!("/trace/{id}")).await;
    assert!(!after.contains("e3 NOOP"), "{after}");
    let (status, _) = admin(&proxy, "GET", "/trace/999").await;
    assert_eq!(status, 404);
    drop((early, bob));
    proxy.stop().await;
}

#[tokio::test]
async fn traces_are_bounded() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let proxy = Proxy::start(&yaml(
        &b1.address(),
        &token_file,
        ", trace: { max_active: 1, max_bytes: 4096, allow_bodies: true }",
    ))
    .await;
    let (status, started) = admin(&proxy, "POST", "/trace?user=carol&bodies=true").await;
    assert_eq!(status, 201, "{started}");
    let (status, _) = admin(&proxy, "POST", "/trace?user=dave").await;
    assert_eq!(status, 429, "max_active");
    let id = serde_json::from_str::<serde_json::Value>(&started).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut c: Raw = proxy.connect().await;
    c.login("carol", "carol-secret").await;
    c.send("s SELECT INBOX\r\n").await;
    c.until_tagged("s").await;
    for n in 0..200 {
        c.send(format!("n{n} NOOP\r\n")).await;
        c.until_tagged(&format!("n{n}")).await;
    }
    let (_, trace) = admin(&proxy, "GET", &format!("/trace/{id}")).await;
    assert!(trace.len() < 4096 + 200, "{}", trace.len());
    assert!(trace.contains("[trace truncated"), "{trace}");
    assert!(!trace.contains("carol-secret"));
    proxy.stop().await;
}
