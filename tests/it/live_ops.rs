//! Operating imapgate live against real Dovecots: reloads (admin API, SIGHUP on the real
//! binary), health-aware routing with a frozen backend, drain / maintenance / kick through the
//! admin API with its token, and the shutdown BYE.

use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::support::dovecot::{self, Dovecot, USERS};
use crate::support::{DEADLINE, LogLines, Proxy, Raw, http, http_get, sample};

const TOKEN: &str = "test-admin-token-0123456789";

/// A config file in `dir` with `backends` (name, address, weight) and `extra` YAML; a token
/// file beside it.
fn write_config(
    dir: &std::path::Path,
    backends: &[(&str, String, u32)],
    extra: &str,
) -> std::path::PathBuf {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    // Sessions are still logged in when the test stops the proxy: a short grace.
    let mut yaml = format!(
        "timeouts: {{ shutdown_grace: 500ms }}\nadmin: {{ bind: \"127.0.0.1:9143\", token_file: \"{}\" }}\nbackends:\n",
        token.display()
    );
    for (name, address, weight) in backends {
        yaml.push_str(&format!(
            "  - {{ name: {name}, address: \"{address}\", weight: {weight} }}\n"
        ));
    }
    yaml.push_str(extra);
    let path = dir.join("imapgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

async fn admin(proxy: &Proxy, method: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(proxy.admin, method, path, Some(TOKEN)).await;
    let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, value)
}

/// A user whose first hashed choice is `backend` under `config`.
fn user_on(config: &imapgate::config::Config, backend: &str) -> (&'static str, &'static str) {
    *USERS[..5]
        .iter()
        .find(|(u, _)| &*config.backends[imapgate::backends_for(config, u)[0]].name == backend)
        .expect("some test user hashes to each backend")
}

async fn noop_ok(c: &mut Raw, tag: &str) -> bool {
    c.send(format!("{tag} NOOP\r\n")).await;
    c.until_tagged(tag)
        .await
        .1
        .starts_with(&format!("{tag} OK"))
}

#[tokio::test]
async fn reload_under_load_keeps_every_session_and_routes_new_logins_anew() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &[("b1", b1.address(), 100), ("b2", b2.address(), 100)],
        "limits: { per_ip: 2000 }\n",
    );
    let proxy = Proxy::start_file(&path).await;
    let old_hash = proxy.config.hash.clone();

    // 1,000 logged-in sessions, in waves of 50.
    let mut sessions = Vec::new();
    for wave in 0..20 {
        let logins = (0..50).map(|i| {
            let (user, password) = USERS[(wave * 50 + i) % 5];
            let addr = proxy.addr;
            async move {
                let mut c = Raw::connect(addr).await;
                c.login(user, password).await;
                c
            }
        });
        sessions.extend(futures_join_all(logins).await);
    }
    assert_eq!(sessions.len(), 1000);

    // b1 weighed out, b2 renamed to b3: every new hashed login goes to b3.
    write_config(
        dir.path(),
        &[("b1", b1.address(), 0), ("b3", b2.address(), 100)],
        "limits: { per_ip: 2000 }\n",
    );
    let (status, answer) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(status, 200, "{answer}");
    let new_hash = answer["hash"].as_str().unwrap().to_string();
    assert_ne!(new_hash, old_hash);

    // 0 sessions dropped: each of the 1,000 still answers.
    for (i, c) in sessions.iter_mut().enumerate() {
        assert!(
            noop_ok(c, &format!("n{i}")).await,
            "session {i} still works"
        );
    }
    for (user, password) in &USERS[..5] {
        let mut c = proxy.connect().await;
        c.login(user, password).await;
        // b3 is b2's Dovecot: its mailbox says b2.
        assert_eq!(c.backend().await, "b2", "{user} follows the new weights");
    }
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(&metrics, "imapgate_config_reloads_total", "result=\"ok\""),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "imapgate_config_info",
            &format!("hash=\"{new_hash}\"")
        ),
        Some(1.0)
    );
    let (_, backends) = admin(&proxy, "GET", "/backends").await;
    let names: Vec<&str> = backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1", "b3"]);
    drop(sessions);
    proxy.stop().await;
}

/// `join_all` without the futures crate: spawn each, await in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_running_config() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[("b1", b1.address(), 100)], "");
    let proxy = Proxy::start_file(&path).await;
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}limits: {{ per_ip: lots }}\n")).unwrap();

    let (status, answer) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(status, 422, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("imapgate.yaml:"), "names the file: {error}");
    assert!(error.contains("per_ip"), "names the key: {error}");

    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_config_reloads_total",
            "result=\"error\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "imapgate_config_info",
            &format!("hash=\"{}\"", proxy.config.hash)
        ),
        Some(1.0),
        "the old config is still the one in use"
    );
    proxy.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary, with no `tls:` section: SIGHUP reloads, never kills.
#[tokio::test]
async fn sighup_without_tls_reloads_and_the_process_lives() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    let write = |backend: &Dovecot| {
        std::fs::write(
            &path,
            format!(
                "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nadmin: {{ bind: \"127.0.0.1:{admin_port}\" }}\ntimeouts: {{ shutdown_grace: 500ms }}\nbackends:\n  - {{ name: only, address: \"{}\" }}\n",
                backend.address()
            ),
        )
        .unwrap();
    };
    write(&b1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--threads", "2", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut before = Raw::connect(addr).await;
    before.login("alice", "alice-secret").await;
    assert_eq!(before.backend().await, "b1");

    write(&b2);
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    logs.wait_for("configuration reloaded").await;
    assert!(child.try_wait().unwrap().is_none(), "still running");

    let mut after = Raw::connect(addr).await;
    after.login("alice", "alice-secret").await;
    assert_eq!(
        after.backend().await,
        "b2",
        "the new backend address is used"
    );
    assert!(noop_ok(&mut before, "n1").await, "the old session goes on");
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "imapgate_config_reloads_total", "result=\"ok\""),
        Some(1.0)
    );

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Every process of a Dovecot instance (the master and its children), to freeze or thaw.
fn signal_tree(pid: u32, signal: i32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    unsafe { libc::kill(pid as i32, signal) };
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        signal_tree(child, signal);
    }
}

#[tokio::test]
async fn a_frozen_backend_costs_a_greeting_timeout_then_nothing() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let greeting = Duration::from_secs(2);
    // Checks every 300 ms, but only after the first login: the first one meets the freeze
    // before the checks do.
    let yaml = format!(
        "backends:\n  - {{ name: b1, address: \"{}\" }}\n  - {{ name: b2, address: \"{}\" }}\nrouting: {{ failover: true }}\ntimeouts: {{ backend_greeting: 2s, backend_login: 30s }}\nhealth: {{ interval: 300ms, timeout: 250ms, fall: 1, rise: 1 }}\nadmin: {{ bind: \"127.0.0.1:9143\" }}\n",
        b1.address(),
        b2.address()
    );
    let proxy = Proxy::start(&yaml).await;
    let (user, password) = user_on(&proxy.config, "b1");
    wait_for_health(&proxy, "b1", "up").await;

    signal_tree(b1.pid(), libc::SIGSTOP);
    let started = Instant::now();
    let mut c = proxy.connect().await;
    c.login(user, password).await;
    let first = started.elapsed();
    assert_eq!(c.backend().await, "b2", "failed over");
    assert!(
        first >= greeting && first < greeting * 3,
        "the first login waits one greeting timeout, not backend_login: {first:?}"
    );

    wait_for_health(&proxy, "b1", "down").await;
    let started = Instant::now();
    let mut c = proxy.connect().await;
    c.login(user, password).await;
    let second = started.elapsed();
    assert_eq!(c.backend().await, "b2");
    assert!(
        second < greeting,
        "a backend known to be down is skipped: {second:?}"
    );
    let (_, route) = admin(&proxy, "GET", &format!("/route?user={user}")).await;
    assert_eq!(route["tries"], serde_json::json!(["b2"]), "{route}");
    signal_tree(b1.pid(), libc::SIGCONT);
    proxy.stop().await;
}

/// Polls `/backends` (no event to wait on) until `backend`'s health is `health`.
async fn wait_for_health(proxy: &Proxy, backend: &str, health: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, backends) = admin(proxy, "GET", "/backends").await;
        let now = backends
            .as_array()
            .and_then(|l| l.iter().find(|b| b["name"] == backend))
            .map(|b| b["health"].clone());
        if now == Some(serde_json::json!(health)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{backend} never {health}: {backends}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn drain_then_maintenance_then_enable() {
    if !dovecot::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &[("b1", b1.address(), 100), ("b2", b2.address(), 100)],
        "",
    );
    let proxy = Proxy::start_file(&path).await;
    let (user, password) = user_on(&proxy.config, "b1");
    let mut stays = proxy.connect().await;
    stays.login(user, password).await;
    assert_eq!(stays.backend().await, "b1");

    // Without the token: refused.
    let (status, _) = http(proxy.admin, "POST", "/backends/b1/drain", None).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        proxy.admin,
        "GET",
        "/sessions",
        Some("wrong-token-0123456789"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(proxy.admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "metrics stay open");

    let (status, answer) = admin(&proxy, "POST", "/backends/b1/drain").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["mode"], "draining");
    let mut new = proxy.connect().await;
    new.login(user, password).await;
    assert_eq!(
        new.backend().await,
        "b2",
        "no new logins on a draining backend"
    );
    assert!(noop_ok(&mut stays, "d1").await, "its sessions stay");

    let (_, sessions) = admin(&proxy, "GET", "/sessions?backend=b1").await;
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    assert_eq!(sessions[0]["user"], user);

    // A reload keeps the mode.
    let (status, _) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(status, 200);
    let (_, backends) = admin(&proxy, "GET", "/backends").await;
    assert_eq!(backends[0]["mode"], "draining", "{backends}");

    let (status, answer) = admin(&proxy, "POST", "/backends/b1/maintenance?grace=0s").await;
    assert_eq!(status, 200, "{answer}");
    let rest = stays.rest().await;
    assert!(
        rest.starts_with("* BYE [UNAVAILABLE]"),
        "maintenance closes its sessions with a BYE: {rest:?}"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_sessions_closed_total",
            "reason=\"maintenance\""
        ),
        Some(1.0)
    );

    let (status, _) = admin(&proxy, "POST", "/backends/b1/enable").await;
    assert_eq!(status, 200);
    let mut back = proxy.connect().await;
    back.login(user, password).await;
    assert_eq!(back.backend().await, "b1", "enabled again");
    let (status, _) = admin(&proxy, "POST", "/backends/nosuch/drain").await;
    assert_eq!(status, 404);
    proxy.stop().await;
}

#[tokio::test]
async fn a_kick_mid_fetch_lets_the_fetch_finish_then_says_bye() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[("b1", b1.address(), 100)], "");
    let proxy = Proxy::start_file(&path).await;
    let mut c = proxy.connect().await;
    c.login("dave", "dave-secret").await;
    let size = 10 * 1024 * 1024;
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    while message.len() < size {
        message.extend_from_slice(b"0123456789 the quick brown fox jumps over the lazy dog.\r\n");
    }
    message.truncate(size);
    c.send(format!("a APPEND INBOX {{{size}+}}\r\n")).await;
    c.send(&message).await;
    c.send("\r\n").await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"));
    c.send("s SELECT INBOX\r\n").await;
    assert!(c.until_tagged("s").await.1.starts_with("s OK"));

    c.send("f FETCH 1 BODY[]\r\n").await;
    let head = c.line().await.unwrap();
    assert!(head.contains(&format!("{{{size}}}")), "{head}");
    // The client has read only the head: the rest is in flight when the kick comes.
    let (status, answer) = admin(&proxy, "POST", "/sessions/kick?user=dave").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["kicked"], 1);
    let body = c.bytes(size).await;
    assert_eq!(body, message, "the literal arrives whole");
    let mut lines = Vec::new();
    while let Some(line) = c.line().await {
        lines.push(line);
    }
    assert_eq!(
        lines.first().map(String::as_str),
        Some(")\r\n"),
        "{lines:?}"
    );
    let bye = lines.last().unwrap();
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE]"),
        "then the BYE, then the close: {lines:?}"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_sessions_closed_total",
            "reason=\"admin\""
        ),
        Some(1.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_says_bye_and_readyz_goes_503_at_once() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let yaml = format!(
        "backends:\n  - {{ name: b1, address: \"{}\" }}\ntimeouts: {{ shutdown_grace: 1s }}\nhealth: {{ interval: 100ms }}\nadmin: {{ bind: \"127.0.0.1:9143\" }}\n",
        b1.address()
    );
    let proxy = Proxy::start(&yaml).await;
    wait_for_health(&proxy, "b1", "up").await;
    assert_eq!(http_get(proxy.admin, "/readyz").await.0, 200);
    let mut c = proxy.connect().await;
    c.login("erin", "erin-secret").await;

    proxy.begin_shutdown();
    let (status, body) = http_get(proxy.admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    // The listeners close as the workers see the drain: new connections are refused.
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting while shutting down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rest = c.rest().await;
    assert_eq!(rest, "* BYE [UNAVAILABLE] Server shutting down.\r\n");
    proxy.stop().await;
}

/// A reload adds a listener and removes it again; the backend is named by DNS (`localhost`).
#[tokio::test]
async fn reload_adds_and_removes_listeners_and_backends_may_be_dns_names() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let by_name = b1.address().replace("127.0.0.1", "localhost");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[("b1", by_name.clone(), 100)], "");
    let proxy = Proxy::start_file(&path).await;
    let mut c = proxy.connect().await;
    c.login("carol", "carol-secret").await;
    assert_eq!(c.backend().await, "b1", "reached through its DNS name");

    let port = free_port();
    let extra = format!(
        "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:1143\" }}\n  - {{ name: extra, bind: \"127.0.0.1:{port}\" }}\n"
    );
    write_config(dir.path(), &[("b1", by_name.clone(), 100)], &extra);
    let (status, answer) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(status, 200, "{answer}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut added = Raw::connect(addr).await;
    added.login("carol", "carol-secret").await;
    assert!(noop_ok(&mut added, "x").await);

    write_config(dir.path(), &[("b1", by_name, 100)], "");
    let (status, answer) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(status, 200, "{answer}");
    // The accept loop stops as the workers see the new snapshot: wait for the refusal.
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the removed listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(noop_ok(&mut added, "y").await, "its session stays");
    assert!(noop_ok(&mut c, "z").await);
    proxy.stop().await;
}

/// A backend that takes the connection and greets, then answers the login with `* BYE` (as
/// Dovecot does to a line over its buffer): the client gets `NO [UNAVAILABLE]`, and with
/// failover on the credentials still go to no other backend.
#[tokio::test]
async fn a_bye_after_the_credentials_is_not_failed_over() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    if !dovecot::available() {
        return;
    }
    let b2 = Dovecot::start("b2");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bye_addr = listener.local_addr().unwrap().to_string();
    let logins_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = logins_seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
                    .await;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("ig1 ") {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = write.write_all(b"* BYE Input buffer full\r\n").await;
                        return;
                    }
                    if let Some(tag) = line.split(' ').next() {
                        let _ = write
                            .write_all(format!("{tag} OK done\r\n").as_bytes())
                            .await;
                    }
                }
            });
        }
    });
    let yaml = format!(
        "backends:\n  - {{ name: bye, address: \"{bye_addr}\" }}\n  - {{ name: b2, address: \"{}\" }}\nrouting: {{ static: {{ alice: bye }}, failover: true }}\nhealth: {{ interval: 1h }}\n",
        b2.address()
    );
    let proxy = Proxy::start(&yaml).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    assert_eq!(logins_seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    let metrics = proxy.metrics().await;
    let b2_logins: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("imapgate_logins_total{backend=\"b2\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(b2_logins, 0.0, "the credentials went nowhere else");
    assert_eq!(
        sample(
            &metrics,
            "imapgate_logins_total",
            "backend=\"bye\",mechanism=\"login\",result=\"error\""
        ),
        Some(1.0)
    );
    proxy.stop().await;
}
