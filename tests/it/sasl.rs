//! The relayed SASL mechanisms against real Dovecots: XOAUTH2 and OAUTHBEARER checked by an
//! `oauth2` passdb that asks an introspection server in this test, SCRAM-SHA-1/256 with a real
//! SCRAM client (Python's scramp); the failure dances compared with a direct connection.

use std::net::SocketAddr;
use std::process::Stdio;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::dovecot::{self, Dovecot, Options, SCRAM_USER};
use crate::support::{DEADLINE, Proxy, Raw, config};

pub(crate) const GOOD_TOKEN: &str = "ya29.good-token-for-alice";
const BOB_TOKEN: &str = "ya29.good-token-for-bob";
pub(crate) const BAD_TOKEN: &str = "ya29.expired-token";
pub(crate) const ALL: &str =
    "auth: { mechanisms: [PLAIN, LOGIN, XOAUTH2, OAUTHBEARER, SCRAM-SHA-1, SCRAM-SHA-256] }\n";

/// An OAuth 2.0 token introspection endpoint (RFC 7662) that knows two tokens: Dovecot POSTs
/// `token=...` and gets `{"active": true, "username": ...}` or `{"active": false}`.
pub(crate) async fn introspection() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/introspect", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length octets of body.
                let body = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break text[end + 4..].to_string();
                    }
                };
                let user = [(GOOD_TOKEN, "alice"), (BOB_TOKEN, "bob")]
                    .into_iter()
                    .find(|(t, _)| body.contains(&format!("token={t}")))
                    .map(|(_, u)| u);
                let json = match user {
                    Some(u) => format!("{{\"active\":true,\"username\":\"{u}\"}}"),
                    None => "{\"active\":false}".to_string(),
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

async fn oauth_dovecot(name: &str) -> Option<Dovecot> {
    if !dovecot::available() {
        return None;
    }
    let url = introspection().await;
    Some(Dovecot::start_with(
        name,
        Options {
            oauth2: Some(url),
            ..Options::default()
        },
    ))
}

pub(crate) fn xoauth2(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

pub(crate) fn oauthbearer(user: &str, token: &str) -> String {
    B64.encode(format!(
        "n,a={user},\x01host=localhost\x01port=143\x01auth=Bearer {token}\x01\x01"
    ))
}

/// Runs one AUTHENTICATE on a fresh connection, answering each `+` with the next of
/// `answers`; returns every line after the greeting up to the tagged answer.
pub(crate) async fn dance(addr: SocketAddr, command: &str, answers: &[&str]) -> Vec<String> {
    let mut c = Raw::connect(addr).await;
    let greeting = c.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.send(command).await;
    let mut lines = Vec::new();
    let mut answers = answers.iter();
    loop {
        let line = c.line().await.expect("an answer");
        lines.push(line.clone());
        if line.starts_with('+') {
            let answer = answers
                .next()
                .unwrap_or_else(|| panic!("unexpected continuation: {lines:?}"));
            c.send(format!("{answer}\r\n")).await;
        } else if line.starts_with("a ") {
            if line.starts_with("a OK") {
                c.send("s SELECT INBOX\r\n").await;
                let (_, selected) = c.until_tagged("s").await;
                assert!(selected.starts_with("s OK"), "{selected}");
            }
            return lines;
        }
    }
}

#[tokio::test]
async fn xoauth2_and_oauthbearer_log_in_with_and_without_sasl_ir() {
    let Some(b1) = oauth_dovecot("b1").await else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], ALL)).await;
    let mut c = proxy.connect().await;
    let greeting = c.line().await.unwrap();
    for m in ["AUTH=XOAUTH2", "AUTH=OAUTHBEARER", "AUTH=SCRAM-SHA-256"] {
        assert!(greeting.contains(m), "{greeting}");
    }
    assert!(!greeting.contains("-PLUS"), "{greeting}");
    for (mechanism, ir) in [
        ("XOAUTH2", xoauth2("alice", GOOD_TOKEN)),
        ("OAUTHBEARER", oauthbearer("alice", GOOD_TOKEN)),
        ("XOAUTH2", xoauth2("bob", BOB_TOKEN)),
    ] {
        let lines = dance(
            proxy.addr,
            &format!("a AUTHENTICATE {mechanism} {ir}\r\n"),
            &[],
        )
        .await;
        assert!(
            lines.last().unwrap().starts_with("a OK"),
            "{mechanism} SASL-IR: {lines:?}"
        );
        let lines = dance(
            proxy.addr,
            &format!("a AUTHENTICATE {mechanism}\r\n"),
            &[&ir],
        )
        .await;
        assert_eq!(lines[0], "+ \r\n", "{mechanism}: {lines:?}");
        assert!(
            lines.last().unwrap().starts_with("a OK"),
            "{mechanism} after +: {lines:?}"
        );
    }
    let log = b1
        .wait_for_info_line(|l| l.contains("method=OAUTHBEARER"))
        .await;
    assert!(log.contains("user=<alice>"), "{log}");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("imapgate_logins_total{mechanism=\"xoauth2\",result=\"ok\"} 4"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_token_gets_the_backends_error_dance_as_direct() {
    let Some(b1) = oauth_dovecot("b1").await else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], ALL)).await;
    let direct: SocketAddr = b1.address().parse().unwrap();
    for (mechanism, ir, answer) in [
        ("XOAUTH2", xoauth2("alice", BAD_TOKEN), ""),
        ("OAUTHBEARER", oauthbearer("alice", BAD_TOKEN), "AQ=="),
    ] {
        for sasl_ir in [true, false] {
            let (command, answers): (String, Vec<&str>) = if sasl_ir {
                (format!("a AUTHENTICATE {mechanism} {ir}\r\n"), vec![answer])
            } else {
                (format!("a AUTHENTICATE {mechanism}\r\n"), vec![&ir, answer])
            };
            let through = dance(proxy.addr, &command, &answers).await;
            let straight = dance(direct, &command, &answers).await;
            assert_eq!(through, straight, "{mechanism} sasl_ir={sasl_ir}");
            let error = through
                .iter()
                .rev()
                .find(|l| l.starts_with("+ ") && l.len() > 4)
                .unwrap_or_else(|| panic!("no error continuation: {through:?}"));
            let json = B64.decode(error[2..].trim_end()).unwrap();
            let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert!(json.get("status").is_some(), "{json}");
            assert!(through.last().unwrap().starts_with("a NO"), "{through:?}");
        }
    }
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("imapgate_logins_total{mechanism=\"oauthbearer\",result=\"rejected\"} 2"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn refused_before_any_backend() {
    // A backend that is never reached: every answer here is imapgate's own.
    let proxy = Proxy::start(&config(
        &[("b1", crate::support::nowhere())],
        "auth: { mechanisms: [PLAIN, SCRAM-SHA-256, OAUTHBEARER] }\nlimits: { login_attempts: 100 }\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    let greeting = c.line().await.unwrap();
    assert!(
        greeting.contains("AUTH=PLAIN AUTH=SCRAM-SHA-256 AUTH=OAUTHBEARER]"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH=LOGIN"), "{greeting}");
    let cases = [
        ("CRAM-MD5".to_string(), "a NO Unsupported"),
        ("DIGEST-MD5".to_string(), "a NO Unsupported"),
        ("SCRAM-SHA-256-PLUS".to_string(), "a NO Unsupported"),
        (
            "XOAUTH2 dXNlcj1hAWF1dGg9QgEB".to_string(),
            "a NO Unsupported",
        ),
        ("LOGIN".to_string(), "a NO Unsupported"),
        (
            format!(
                "SCRAM-SHA-256 {}",
                B64.encode("p=tls-unique,,n=alice,r=abc")
            ),
            "a NO Channel binding is not available",
        ),
        (
            format!("SCRAM-SHA-256 {}", B64.encode("n,,n=al=2Xice,r=abc")),
            "a BAD [CLIENTBUG]",
        ),
        (
            format!("SCRAM-SHA-256 {}", B64.encode("n,,r=abc")),
            "a BAD [CLIENTBUG]",
        ),
        (
            format!("OAUTHBEARER {}", B64.encode("n,,\x01auth=Bearer x\x01\x01")),
            "a NO OAUTHBEARER without a=user",
        ),
        (
            format!("OAUTHBEARER {}", B64.encode("n,a=alice,auth=Bearer x")),
            "a BAD [CLIENTBUG]",
        ),
    ];
    for (command, expected) in cases {
        c.send(format!("a AUTHENTICATE {command}\r\n")).await;
        let (_, answer) = c.until_tagged("a").await;
        assert!(answer.starts_with(expected), "{command}: {answer}");
    }
    proxy.stop().await;
}

pub(crate) fn scram_dovecot(name: &str) -> Option<Dovecot> {
    dovecot::available().then(|| {
        Dovecot::start_with(
            name,
            Options {
                scram: true,
                ..Options::default()
            },
        )
    })
}

/// One login with the scramp client; its printed lines.
pub(crate) async fn scram(
    addr: &str,
    mechanism: &str,
    user: &str,
    password: &str,
    mode: &str,
) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/scram_client.py"
    );
    let (ir, flag) = mode.split_once(' ').unwrap();
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("python3")
            .args([script, host, port, mechanism, user, password, ir, flag])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the SCRAM client finished in time")
    .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

pub(crate) fn result(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result: {out}"))
}

#[tokio::test]
async fn scram_logins_with_a_real_client() {
    if !crate::support::external(
        std::process::Command::new("python3")
            .args(["-c", "import scramp"])
            .status()
            .is_ok_and(|s| s.success()),
        "scramp is missing: python3 -m pip install scramp",
    ) {
        return;
    }
    let (Some(b1), Some(b2)) = (scram_dovecot("b1"), scram_dovecot("b2")) else {
        return;
    };
    let backends = [("b1", b1.address()), ("b2", b2.address())];
    // The user with `,` and `=` is pinned to the backend the hash would NOT give it: a login
    // that lands there was routed by its decoded name.
    let hashed = imapgate::config::parse(&config(&backends, ""), "t").unwrap();
    let hashed = &hashed.backends[imapgate::backends_for(&hashed, SCRAM_USER.0)[0]].name;
    let pinned = if &**hashed == "b1" { "b2" } else { "b1" };
    let proxy = Proxy::start(&config(
        &backends,
        &format!(
            "{ALL}routing:\n  static: {{ \"{}\": {pinned} }}\n",
            SCRAM_USER.0
        ),
    ))
    .await;
    let addr = proxy.addr.to_string();
    for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-256"] {
        for mode in ["ir n", "noir n"] {
            let out = scram(&addr, mechanism, "alice", "alice-secret", mode).await;
            assert!(
                result(&out).starts_with("a OK"),
                "{mechanism} {mode}: {out}"
            );
            assert!(out.contains("VERIFIED"), "server-final relayed: {out}");
        }
        let out = scram(&addr, mechanism, "bob", "wrong", "ir n").await;
        let direct = scram(&b1.address(), mechanism, "bob", "wrong", "ir n").await;
        assert!(result(&out).starts_with("a NO"), "{out}");
        assert_eq!(result(&out), result(&direct), "the backend's answer");
        let out = scram(&addr, mechanism, SCRAM_USER.0, SCRAM_USER.1, "ir n").await;
        assert!(result(&out).starts_with("a OK"), "{out}");
        assert!(
            out.contains(&format!("Backend-{pinned}")),
            "routed by the decoded name: {out}"
        );
    }
    // `y`: the client could bind but believes the server cannot; imapgate relays it, and the
    // backend (which offers no -PLUS here either) answers as it would directly.
    let through = scram(&addr, "SCRAM-SHA-256", "alice", "alice-secret", "ir y").await;
    let direct = scram(
        &b1.address(),
        "SCRAM-SHA-256",
        "alice",
        "alice-secret",
        "ir y",
    )
    .await;
    assert_eq!(
        result(&through).split_once(' ').map(|r| r.1.get(..2)),
        result(&direct).split_once(' ').map(|r| r.1.get(..2)),
        "y as direct: {through} / {direct}"
    );
    assert!(result(&through).starts_with("a OK"), "{through}");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("imapgate_logins_total{mechanism=\"scram_sha_256\",result=\"ok\"} 4"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn scram_cancel_mid_exchange_gets_the_backends_bad() {
    let Some(b1) = scram_dovecot("b1") else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], ALL)).await;
    let first = B64.encode("n,,n=alice,r=fyko+d2lbbFgONRv9qkxdawL");
    let command = format!("a AUTHENTICATE SCRAM-SHA-256 {first}\r\n");
    let through = dance(proxy.addr, &command, &["*"]).await;
    assert!(through[0].starts_with("+ "), "server-first: {through:?}");
    assert!(through.last().unwrap().starts_with("a BAD"), "{through:?}");
    // Garbage instead of base64 is not passed on: the backend is told `*` and its BAD comes.
    let through = dance(proxy.addr, &command, &["not base64!"]).await;
    assert!(through.last().unwrap().starts_with("a BAD"), "{through:?}");
    // The connection is still good for another login.
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    proxy.stop().await;
}

/// `check-config` looks at the backends' `AUTH=` lists when a relayed mechanism is enabled:
/// a mechanism a backend does not offer is a warning (the file is still valid).
#[tokio::test]
async fn check_config_warns_about_mechanisms_a_backend_lacks() {
    let (Some(plain), Some(scram)) = (
        dovecot::available().then(|| Dovecot::start("plain")),
        scram_dovecot("scram"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    std::fs::write(
        &path,
        config(
            &[("plain", plain.address()), ("scram", scram.address())],
            "auth: { mechanisms: [PLAIN, LOGIN, SCRAM-SHA-256] }\n",
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .arg("check-config")
            .arg(&path)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("SCRAM-SHA-256") && warnings[0].contains("backend plain"),
        "{stderr}"
    );
}

/// The relayed exchange is bounded: a client that stops answering gets `NO [UNAVAILABLE]` after
/// `timeouts.backend_login`, one whose line is over `line_max` gets `BYE [LIMIT]`.
#[tokio::test]
async fn a_relayed_exchange_is_bounded_in_time_and_line_length() {
    let Some(b1) = scram_dovecot("b1") else {
        return;
    };
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        &format!("{ALL}timeouts: {{ backend_login: 1s }}\nlimits: {{ line_max: 1024 }}\n"),
    ))
    .await;
    let first = B64.encode("n,,n=alice,r=fyko+d2lbbFgONRv9qkxdawL");
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send(format!("a AUTHENTICATE SCRAM-SHA-256 {first}\r\n"))
        .await;
    assert!(c.line().await.unwrap().starts_with("+ "), "server-first");
    // No answer: the login's deadline ends it.
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");

    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send(format!("a AUTHENTICATE SCRAM-SHA-256 {first}\r\n"))
        .await;
    assert!(c.line().await.unwrap().starts_with("+ "), "server-first");
    c.send(format!("{}\r\n", "A".repeat(2000))).await;
    let bye = c.line().await.unwrap();
    assert!(bye.starts_with("* BYE [LIMIT]"), "{bye}");
    proxy.stop().await;
}
