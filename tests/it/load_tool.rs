//! A short smoke run of `imapgate-load`: its fake backend serves, and every client scenario
//! runs through imapgate against it and reports sane numbers. No timing is asserted.

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::process::Command;

use crate::support::{DEADLINE, Proxy, config};

const LOAD: &str = env!("CARGO_BIN_EXE_imapgate-load");

/// The fake backend's process (killed on drop) and address.
struct FakeBackend {
    _process: tokio::process::Child,
    addr: SocketAddr,
}

async fn fake_backend() -> FakeBackend {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new(LOAD)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--body-size",
            "100000",
        ])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The fake backend binds at once; wait until it greets.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let mut greeting = [0u8; 4];
            use tokio::io::AsyncReadExt;
            if s.read_exact(&mut greeting).await.is_ok() && &greeting == b"* OK" {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fake backend never greeted"
        );
        tokio::task::yield_now().await;
    }
    FakeBackend {
        _process: child,
        addr,
    }
}

async fn scenario(args: &[&str]) -> serde_json::Value {
    let out = tokio::time::timeout(
        DEADLINE,
        Command::new(LOAD)
            .args(args)
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("the scenario ends within the deadline")
    .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_through_imapgate_against_the_fake_backend() {
    let backend = fake_backend().await;
    let proxy = Proxy::start(&config(&[("fake", backend.addr.to_string())], "")).await;
    let target = proxy.addr.to_string();
    let pid = std::process::id().to_string();
    let common = ["--target", &target, "--seconds", "0.3", "--pid", &pid];

    let login = scenario(&[&["login", "--workers", "2"][..], &common[..]].concat()).await;
    assert!(login["logins"].as_f64().unwrap() > 0.0, "{login}");
    assert_eq!(login["errors"], 0, "{login}");

    let noop = scenario(&[&["noop"][..], &common[..]].concat()).await;
    assert!(noop["ops"].as_f64().unwrap() > 0.0, "{noop}");
    assert!(noop["p50_us"].as_u64().unwrap() > 0, "{noop}");

    let fetch = scenario(&[&["fetch"][..], &common[..]].concat()).await;
    let octets = fetch["octets"].as_u64().unwrap();
    assert!(
        octets > 0 && octets % 100_000 == 0,
        "whole 100 kB messages: {fetch}"
    );
    assert_eq!(fetch["errors"], 0, "{fetch}");

    let idle = scenario(
        &[
            &[
                "idle",
                "--sessions",
                "20",
                "--hold",
                "0.1",
                "--workers",
                "5",
            ][..],
            &common[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(idle["held"], 20.0, "{idle}");
    assert_eq!(idle["dropped"], 0, "{idle}");
    assert!(idle["rss_after_kib"].as_u64().unwrap() > 0, "{idle}");

    // The metrics saw the traffic: the observer counted the FETCHes as the load tool did.
    let m = proxy.metrics().await;
    let fetches = crate::support::sample(
        &m,
        "imapgate_commands_total",
        "command=\"FETCH\",status=\"ok\"",
    )
    .unwrap();
    assert_eq!(fetches as u64, octets / 100_000, "{m}");
    proxy.stop().await;
}

#[tokio::test]
async fn auth_http_answers_like_nginx_expects() {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _child = Command::new(LOAD)
        .args([
            "auth-http",
            "--listen",
            &addr.to_string(),
            "--backend",
            "127.0.0.1:10143",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (status, _) = loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break crate::support::http_get(addr, "/auth").await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "auth-http never listened"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(status, 200);
    // The headers nginx reads: fetch them raw.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /auth HTTP/1.0\r\nAuth-User: u\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.contains("Auth-Status: OK") && answer.contains("Auth-Port: 10143"),
        "{answer}"
    );
}

/// The `tls` scenario against imapgate's implicit-TLS listener: every handshake verifies and
/// greets; with a session cache most of them resume, without none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_scenario_full_and_resumed_handshakes() {
    let pki = crate::support::pki::Pki::new();
    let proxy_pair = pki.pair("proxy");
    let proxy = Proxy::start(&format!(
        "listeners:\n  - {{ name: imaps, bind: \"127.0.0.1:1\", tls: implicit }}\ntls: {{ cert: \"{}\", key: \"{}\" }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\n",
        proxy_pair.cert.display(),
        proxy_pair.key.display(),
        crate::support::nowhere()
    ))
    .await;
    let target = proxy.addr.to_string();
    let ca = pki.ca().display().to_string();
    let common = [
        "tls",
        "--target",
        &target,
        "--ca",
        &ca,
        "--server-name",
        "imap.test",
        "--workers",
        "2",
        "--seconds",
        "0.3",
    ];

    let full = scenario(&common).await;
    assert!(full["handshakes"].as_f64().unwrap() > 0.0, "{full}");
    assert_eq!(full["errors"], 0, "{full}");
    assert_eq!(full["resumed"], 0, "{full}");

    let resumed = scenario(&[&common[..], &["--resume"][..]].concat()).await;
    let (n, r) = (
        resumed["handshakes"].as_f64().unwrap(),
        resumed["resumed"].as_f64().unwrap(),
    );
    assert_eq!(resumed["errors"], 0, "{resumed}");
    // Each worker's first handshake is a full one; after that the cache should work.
    assert!(r <= n - 2.0 && r >= n / 2.0, "{resumed}");
    proxy.stop().await;
}

/// The `prelogin` scenario through imapgate: commands of thousands of one-segment lines, every
/// one answered `BAD` (SEARCH needs a login) on one connection, the octets counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelogin_scenario_answered_on_one_connection() {
    let proxy = Proxy::start(&config(&[("b1", crate::support::nowhere())], "")).await;
    let target = proxy.addr.to_string();
    let pid = std::process::id().to_string();
    let out = scenario(&[
        "prelogin",
        "--target",
        &target,
        "--size",
        "16384",
        "--commands",
        "5",
        "--pid",
        &pid,
    ])
    .await;
    assert_eq!(out["commands"], 5, "{out}");
    assert_eq!(out["answers"]["BAD"], 5, "{out}");
    assert_eq!(out["reconnects"], 0, "{out}");
    assert_eq!(out["command_octets"], 16378, "{out}");
    assert_eq!(out["octets"], 5 * 16378, "{out}");
    assert_eq!(out["segments"], 5 * 1365, "{out}");
    assert!(out["sender_cpu_s"].as_f64().unwrap() >= 0.0, "{out}");
    proxy.stop().await;
}
