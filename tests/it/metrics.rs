//! `/metrics` after a scripted session against real Dovecot shows exactly what happened.

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, config, http_get, metrics_when, sample};

#[tokio::test]
async fn scripted_session_gives_exact_counters() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("l0 LOGIN alice wrong\r\n").await;
    assert!(c.until_tagged("l0").await.1.starts_with("l0 NO"));
    c.send("l1 LOGIN alice alice-secret\r\n").await;
    assert!(c.until_tagged("l1").await.1.starts_with("l1 OK"));

    let message = "Subject: metrics\r\n\r\nhello\r\n";
    let steps: Vec<(&str, String, &str)> = vec![
        ("a", "a SELECT INBOX\r\n".into(), "a OK"),
        (
            "b",
            format!("b APPEND INBOX {{{}}}\r\n", message.len()),
            "+",
        ),
        ("b", format!("{message}\r\n"), "b OK"),
        ("c", "c NOOP\r\n".into(), "c OK"),
        ("d", "d FETCH 1 BODY[]\r\n".into(), "d OK"),
        ("e", "e SEARCH ALL\r\n".into(), "e OK"),
        ("f", "f UID STORE 1 +FLAGS (\\Seen)\r\n".into(), "f OK"),
        ("g", "g SELECT nosuchbox\r\n".into(), "g NO"),
        ("h", "h FROBNICATE\r\n".into(), "h BAD"),
    ];
    for (tag, send, expect) in steps {
        c.send(&send).await;
        if expect == "+" {
            assert!(c.line().await.unwrap().starts_with('+'));
        } else {
            let (_, answer) = c.until_tagged(tag).await;
            assert!(answer.starts_with(expect), "{answer}");
        }
    }
    c.send("i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send("DONE\r\n").await;
    assert!(c.until_tagged("i").await.1.starts_with("i OK"));

    // While logged in: one active session, visible in /sessions without secrets.
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "imapgate_sessions_active", "backend=\"b1\""),
        Some(1.0)
    );
    let (status, sessions) = http_get(proxy.admin, "/sessions").await;
    assert_eq!(status, 200);
    let sessions: serde_json::Value = serde_json::from_str(&sessions).unwrap();
    assert_eq!(sessions[0]["user"], "alice");
    assert_eq!(sessions[0]["backend"], "b1");
    assert!(!sessions.to_string().contains("secret"), "{sessions}");

    c.send("j LOGOUT\r\n").await;
    let rest = c.rest().await;
    assert!(rest.contains("j OK"), "{rest}");

    let m = metrics_when(&proxy, |m| {
        sample(m, "imapgate_sessions_active", "backend=\"b1\"") == Some(0.0)
    })
    .await;
    let commands = |command: &str, status: &str| {
        sample(
            &m,
            "imapgate_commands_total",
            &format!("command=\"{command}\",status=\"{status}\""),
        )
    };
    for (command, status, n) in [
        ("SELECT", "ok", 1.0),
        ("SELECT", "no", 1.0),
        ("APPEND", "ok", 1.0),
        ("NOOP", "ok", 1.0),
        ("FETCH", "ok", 1.0),
        ("SEARCH", "ok", 1.0),
        ("UID STORE", "ok", 1.0),
        ("other", "bad", 1.0),
        ("IDLE", "ok", 1.0),
        ("LOGOUT", "ok", 1.0),
        ("STORE", "ok", 0.0),
        ("LOGIN", "ok", 0.0),
    ] {
        assert_eq!(
            commands(command, status),
            Some(n),
            "{command} {status}\n{m}"
        );
    }
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("imapgate_commands_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 10.0, "ten commands after login, nothing else\n{m}");
    let durations = |command: &str| {
        sample(
            &m,
            "imapgate_command_duration_seconds_count",
            &format!("command=\"{command}\""),
        )
    };
    assert_eq!(durations("SELECT"), Some(2.0));
    assert_eq!(durations("IDLE"), Some(0.0), "IDLE is not timed");
    // The backend's own totals: the ten commands by status, nine of them timed (not IDLE).
    let by_status = |status: &str| {
        sample(
            &m,
            "imapgate_backend_commands_total",
            &format!("backend=\"b1\",status=\"{status}\""),
        )
    };
    assert_eq!(by_status("ok"), Some(8.0));
    assert_eq!(by_status("no"), Some(1.0));
    assert_eq!(by_status("bad"), Some(1.0));
    assert_eq!(
        sample(
            &m,
            "imapgate_backend_command_duration_seconds_count",
            "backend=\"b1\""
        ),
        Some(9.0)
    );
    let logins = |mechanism: &str, result: &str| {
        sample(
            &m,
            "imapgate_logins_total",
            &format!("mechanism=\"{mechanism}\",result=\"{result}\""),
        )
    };
    assert_eq!(logins("login", "ok"), Some(1.0));
    assert_eq!(logins("login", "rejected"), Some(1.0));
    assert_eq!(logins("plain", "ok"), Some(0.0));
    let attempts = |result: &str| {
        sample(
            &m,
            "imapgate_backend_login_attempts_total",
            &format!("backend=\"b1\",result=\"{result}\""),
        )
    };
    assert_eq!(attempts("ok"), Some(1.0));
    assert_eq!(attempts("rejected"), Some(1.0));
    assert_eq!(
        sample(&m, "imapgate_login_duration_seconds_count", ""),
        Some(1.0),
        "only the successful login is timed"
    );
    assert_eq!(
        sample(&m, "imapgate_connections_total", "listener=\"imap\""),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "imapgate_connections_active", "listener=\"imap\""),
        Some(0.0)
    );
    let up = sample(
        &m,
        "imapgate_bytes_total",
        "backend=\"b1\",direction=\"client_to_backend\"",
    )
    .unwrap();
    let down = sample(
        &m,
        "imapgate_bytes_total",
        "backend=\"b1\",direction=\"backend_to_client\"",
    )
    .unwrap();
    assert!(
        up > message.len() as f64 && down > message.len() as f64,
        "{up} {down}"
    );
    assert_eq!(
        sample(&m, "imapgate_backend_connect_duration_seconds_count", ""),
        Some(2.0)
    );
    assert!(sample(&m, "process_resident_memory_bytes", "").unwrap() > 0.0);
    assert!(sample(&m, "process_open_fds", "").unwrap() > 0.0);
    let revision = env!("IMAPGATE_REVISION");
    assert!(!revision.is_empty());
    assert_eq!(
        sample(
            &m,
            "imapgate_build_info",
            &format!(
                "version=\"{}\",revision=\"{revision}\"",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{m}"
    );
    assert!(!m.contains("alice"), "no user name in metrics");
    proxy.stop().await;
}

#[tokio::test]
async fn prelogin_rejections_are_counted_by_reason() {
    let nowhere = crate::support::nowhere();
    let proxy = Proxy::start(&config(
        &[("b1", nowhere.to_string())],
        "limits: { line_max: 1024 }\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("1 FROB\r\n2 SELECT INBOX\r\n3 AUTHENTICATE GSSAPI\r\n")
        .await;
    c.until_tagged("3").await;
    c.send(vec![b'x'; 2000]).await;
    c.rest().await;
    let m = metrics_when(&proxy, |m| {
        sample(m, "imapgate_connections_active", "listener=\"imap\"") == Some(0.0)
    })
    .await;
    for (reason, n) in [
        ("syntax", 1.0),
        ("needs_login", 1.0),
        ("unsupported_mechanism", 1.0),
        ("line_too_long", 1.0),
        ("login_attempts", 0.0),
    ] {
        assert_eq!(
            sample(
                &m,
                "imapgate_prelogin_rejections_total",
                &format!("reason=\"{reason}\"")
            ),
            Some(n),
            "{reason}\n{m}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let nowhere = crate::support::nowhere();
    let proxy = Proxy::start(&config(&[("b1", nowhere.clone())], "")).await;
    assert_eq!(http_get(proxy.admin, "/healthz").await.0, 200);
    assert_eq!(
        http_get(proxy.admin, "/readyz").await.0,
        503,
        "no backend reachable"
    );
    assert_eq!(
        http_get(proxy.admin, "/sessions").await,
        (200, "[]".to_string())
    );
    assert_eq!(http_get(proxy.admin, "/nope").await.0, 404);
    proxy.stop().await;
}

#[tokio::test]
async fn readyz_turns_ready_when_a_backend_greets() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "health: { interval: 100ms }\n",
    ))
    .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while http_get(proxy.admin, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::task::yield_now().await;
    }
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "imapgate_backend_up", "backend=\"b1\""),
        Some(1.0)
    );
    proxy.stop().await;
}

/// `promtool check metrics` (Debian package `prometheus`) accepts the live output.
#[tokio::test]
async fn promtool_accepts_the_metrics() {
    if !crate::support::tool_available("promtool", "prometheus") {
        return;
    }
    let nowhere = crate::support::nowhere();
    let proxy = Proxy::start(&config(&[("b1", nowhere.clone())], "")).await;
    let m = proxy.metrics().await;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(m.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    proxy.stop().await;
}
