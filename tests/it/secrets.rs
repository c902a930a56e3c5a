//! Secrets stay secret: every way a client can log in (and fail to), through the real binary
//! at the most verbose log level, and not one password, SASL response or login literal appears
//! in its logs, `/metrics` or `/sessions`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::process::Command;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, LogLines, Raw, free_port, http, http_get};

#[tokio::test]
async fn no_secret_reaches_a_log_or_an_endpoint() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nadmin: {{ bind: \"127.0.0.1:{admin_port}\", trace: {{ max_active: 8 }} }}\ntimeouts: {{ shutdown_grace: 500ms }}\nlimits: {{ login_penalty: {{ base: 0s }} }}\nbackends:\n  - {{ name: b1, address: \"{}\", forward_id: true }}\n",
            b1.address()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--threads", "1", "--config"])
        .arg(&path)
        .env("IMAPGATE_LOG", "trace")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    // Every user is traced while logging in, so the traces are checked too.
    let mut traces = Vec::new();
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        let (status, body) = http(admin, "POST", &format!("/trace?user={user}"), None).await;
        assert_eq!(status, 201, "{body}");
        let started: serde_json::Value = serde_json::from_str(&body).unwrap();
        traces.push(started["id"].as_str().unwrap().to_string());
    }

    let plain =
        |authz: &str, user: &str, pass: &str| B64.encode(format!("{authz}\0{user}\0{pass}"));
    let (erin_ir, alice_plain, bob_login, wrong_ir) = (
        plain("", "erin", "erin-secret"),
        plain("alice", "alice", "alice-secret"),
        B64.encode("bob-secret"),
        plain("", "bob", "wrong-guess-2"),
    );
    // Each session's steps (a step that does not end the command waits for a `+`; the
    // non-synchronizing literals go in one), and whether the login succeeds.
    let sessions: Vec<(Vec<String>, bool)> = vec![
        (vec!["a LOGIN alice alice-secret\r\n".into()], true),
        (vec!["a LOGIN \"bob\" \"bob-secret\"\r\n".into()], true),
        (
            vec![
                "a LOGIN {5}\r\n".into(),
                "carol {12}\r\n".into(),
                "carol-secret\r\n".into(),
            ],
            true,
        ),
        (
            vec!["a LOGIN {4+}\r\ndave {11+}\r\ndave-secret\r\n".into()],
            true,
        ),
        (vec![format!("a AUTHENTICATE PLAIN {erin_ir}\r\n")], true),
        (
            vec![
                "a AUTHENTICATE PLAIN\r\n".into(),
                format!("{alice_plain}\r\n"),
            ],
            true,
        ),
        (
            vec![
                "a AUTHENTICATE LOGIN\r\n".into(),
                format!("{}\r\n", B64.encode("bob")),
                format!("{bob_login}\r\n"),
            ],
            true,
        ),
        (vec!["a LOGIN alice wrong-guess-1\r\n".into()], false),
        (vec![format!("a AUTHENTICATE PLAIN {wrong_ir}\r\n")], false),
    ];
    let secrets = [
        "alice-secret",
        "bob-secret",
        "carol-secret",
        "dave-secret",
        "erin-secret",
        "wrong-guess-1",
        "wrong-guess-2",
        &erin_ir,
        &alice_plain,
        &bob_login,
        &wrong_ir,
    ];
    let mut open = Vec::new();
    for (steps, ok) in &sessions {
        let mut c = Raw::connect(addr).await;
        c.line().await.unwrap();
        c.send("i ID (\"name\" \"secrets-test\")\r\n").await;
        c.until_tagged("i").await;
        for (n, step) in steps.iter().enumerate() {
            c.send(step).await;
            if n + 1 < steps.len() {
                let cont = c.line().await.unwrap();
                assert!(cont.starts_with('+'), "{steps:?}: {cont}");
            }
        }
        let (_, answer) = c.until_tagged("a").await;
        assert_eq!(answer.starts_with("a OK"), *ok, "{steps:?}: {answer}");
        if *ok {
            c.send("s SELECT INBOX\r\n").await;
            c.until_tagged("s").await;
        }
        open.push(c);
    }
    let (_, metrics) = http_get(admin, "/metrics").await;
    let (_, sessions_json) = http_get(admin, "/sessions").await;
    assert!(
        sessions_json.contains("alice"),
        "the sessions are there: {sessions_json}"
    );
    let mut trace_text = String::new();
    for id in &traces {
        trace_text += &http_get(admin, &format!("/trace/{id}")).await.1;
    }
    assert!(
        trace_text.contains("AUTHENTICATE PLAIN as erin") && trace_text.contains("SELECT INBOX"),
        "the traces recorded the sessions: {trace_text}"
    );
    drop(open);
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = logs.rest().await;
    assert!(log.lines().count() > 20, "trace logging was on: {log}");
    for secret in secrets {
        for (place, text) in [
            ("log", &log),
            ("/metrics", &metrics),
            ("/sessions", &sessions_json),
            ("a trace", &trace_text),
        ] {
            assert!(!text.contains(secret), "{secret:?} appears in {place}");
        }
    }
}

/// The relayed mechanisms: a bearer token (accepted and refused, XOAUTH2 and OAUTHBEARER) and
/// a SCRAM proof pass through the real binary at the most verbose log level and appear in no
/// log, `/metrics`, `/sessions` or trace.
#[tokio::test]
async fn no_token_or_scram_proof_reaches_a_log_or_an_endpoint() {
    use crate::sasl::{
        ALL, BAD_TOKEN, GOOD_TOKEN, dance, introspection, oauthbearer, result, scram, xoauth2,
    };
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start_with(
        "b1",
        dovecot::Options {
            oauth2: Some(introspection().await),
            scram: true,
            ..dovecot::Options::default()
        },
    );
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nadmin: {{ bind: \"127.0.0.1:{admin_port}\" }}\ntimeouts: {{ shutdown_grace: 500ms }}\nlimits: {{ login_penalty: {{ base: 0s }} }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\n{ALL}",
            b1.address()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--threads", "1", "--config"])
        .arg(&path)
        .env("IMAPGATE_LOG", "trace")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (status, body) = http(admin, "POST", "/trace?user=alice", None).await;
    assert_eq!(status, 201, "{body}");
    let trace_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let good = xoauth2("alice", GOOD_TOKEN);
    let bad = oauthbearer("alice", BAD_TOKEN);
    let ok = dance(addr, &format!("a AUTHENTICATE XOAUTH2 {good}\r\n"), &[]).await;
    assert!(ok.last().unwrap().starts_with("a OK"), "{ok:?}");
    let no = dance(addr, "a AUTHENTICATE OAUTHBEARER\r\n", &[&bad, "AQ=="]).await;
    assert!(no.last().unwrap().starts_with("a NO"), "{no:?}");
    let out = scram(
        &addr.to_string(),
        "SCRAM-SHA-256",
        "alice",
        "alice-secret",
        "ir n",
    )
    .await;
    assert!(result(&out).starts_with("a OK"), "{out}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name}: {out}"))
            .to_string()
    };
    let (proof, client_final) = (field("PROOF "), field("CLIENT-FINAL "));

    let (_, metrics) = http_get(admin, "/metrics").await;
    let (_, sessions_json) = http_get(admin, "/sessions").await;
    let (_, trace_text) = http_get(admin, &format!("/trace/{trace_id}")).await;
    assert!(
        trace_text.contains("AUTHENTICATE SCRAM-SHA-256 as alice"),
        "the trace recorded the logins: {trace_text}"
    );
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = logs.rest().await;
    assert!(log.contains("xoauth2"), "the logins were logged: {log}");
    for secret in [
        GOOD_TOKEN,
        BAD_TOKEN,
        "alice-secret",
        &good,
        &bad,
        &proof,
        &client_final,
    ] {
        for (place, text) in [
            ("log", &log),
            ("/metrics", &metrics),
            ("/sessions", &sessions_json),
            ("a trace", &trace_text),
        ] {
            assert!(!text.contains(secret), "{secret:?} appears in {place}");
        }
    }
}
