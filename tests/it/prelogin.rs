//! What imapgate answers by itself before login, and how it refuses bad input.

use crate::support::dovecot::{self, Dovecot};
use crate::support::{Proxy, config, nowhere};

#[tokio::test]
async fn capability_noop_id_logout() {
    let proxy = Proxy::start(&config(&[("b1", nowhere())], "greeting: Hello there.\n")).await;
    let mut c = proxy.connect().await;
    let greeting = c.line().await.unwrap();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 ")
            && greeting.ends_with("Hello there.\r\n"),
        "{greeting}"
    );
    assert!(
        greeting.contains("AUTH=PLAIN") && greeting.contains("SASL-IR"),
        "{greeting}"
    );
    c.send("1 capability\r\n2 NOOP\r\n3 ID (\"name\" \"test\")\r\n4 SELECT INBOX\r\n5 LOGOUT\r\n")
        .await;
    let (untagged, answer) = c.until_tagged("1").await;
    assert!(
        untagged[0].starts_with("* CAPABILITY IMAP4rev1"),
        "{untagged:?}"
    );
    assert!(answer.starts_with("1 OK"));
    assert!(c.until_tagged("2").await.1.starts_with("2 OK"));
    let (untagged, answer) = c.until_tagged("3").await;
    assert!(untagged[0].starts_with("* ID ("), "{untagged:?}");
    assert!(answer.starts_with("3 OK"));
    assert!(c.until_tagged("4").await.1.starts_with("4 BAD"));
    let (untagged, answer) = c.until_tagged("5").await;
    assert!(untagged[0].starts_with("* BYE"));
    assert!(answer.starts_with("5 OK"));
    assert_eq!(c.rest().await, "", "closed after LOGOUT");
    proxy.stop().await;
}

#[tokio::test]
async fn garbage_gets_bad_and_oversized_input_gets_bye_while_others_are_served() {
    let Some(b1) = dovecot::available().then(|| Dovecot::start("b1")) else {
        return;
    };
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "limits: { line_max: 1024, literal_max: 512 }\n",
    ))
    .await;

    let mut garbage = proxy.connect().await;
    garbage.line().await.unwrap();
    garbage
        .send(b"\x00\x01\x02\xff\xfe\r\nt1 FROBNICATE\r\n")
        .await;
    assert!(garbage.line().await.unwrap().starts_with("* BAD"));
    assert!(garbage.line().await.unwrap().starts_with("t1 BAD"));

    let mut literal = proxy.connect().await;
    literal.line().await.unwrap();
    literal.send("t2 LOGIN {100000}\r\n").await;
    let answer = literal.line().await.unwrap();
    assert!(
        answer.starts_with("t2 BAD [LIMIT]"),
        "a sync literal over the cap is refused: {answer}"
    );

    let mut long = proxy.connect().await;
    long.line().await.unwrap();
    long.send(vec![b'a'; 5000]).await;
    let rest = long.rest().await;
    assert!(rest.starts_with("* BYE [LIMIT]"), "{rest:?}");

    let mut nonsync = proxy.connect().await;
    nonsync.line().await.unwrap();
    nonsync.send("t3 LOGIN {100000+}\r\n").await;
    let rest = nonsync.rest().await;
    assert!(rest.starts_with("* BYE [LIMIT]"), "{rest:?}");

    // The garbage client can still log in, and so can a new one.
    garbage.send("t4 LOGIN alice alice-secret\r\n").await;
    assert!(garbage.until_tagged("t4").await.1.starts_with("t4 OK"));
    let mut fresh = proxy.connect().await;
    fresh.login("bob", "bob-secret").await;
    proxy.stop().await;
}

#[tokio::test]
async fn prelogin_timeout_says_bye() {
    let proxy = Proxy::start(&config(
        &[("b1", nowhere())],
        "timeouts: { prelogin: 300ms }\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    let rest = c.rest().await;
    assert!(rest.starts_with("* BYE"), "{rest:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn per_ip_cap_refuses_with_bye_limit() {
    let proxy = Proxy::start(&config(&[("b1", nowhere())], "limits: { per_ip: 2 }\n")).await;
    let mut a = proxy.connect().await;
    let mut b = proxy.connect().await;
    a.line().await.unwrap();
    b.line().await.unwrap();
    let mut c = proxy.connect().await;
    let rest = c.rest().await;
    assert!(rest.starts_with("* BYE [LIMIT]"), "{rest:?}");
    drop(a);
    // The place is given back when a session ends: wait for that by retrying until admitted.
    let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
    loop {
        let mut d = proxy.connect().await;
        if d.line().await.unwrap_or_default().starts_with("* OK") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never given back"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_says_bye_to_prelogin_sessions() {
    let proxy = Proxy::start(&config(&[("b1", nowhere())], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    proxy.stop().await;
    let rest = c.rest().await;
    assert!(rest.starts_with("* BYE [UNAVAILABLE]"), "{rest:?}");
}

/// RFC 2971's largest ID (30 pairs, values of 1,024 octets: ~32 KB on one line) is answered
/// with the default limits, and the login after it reaches a backend that takes ID fields
/// (imapgate's own fields first, the client's after them, 30 pairs in all).
#[tokio::test]
async fn maximum_size_id_then_login() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start_with(
        "b1",
        dovecot::Options {
            trust_proxy: true,
            ..Default::default()
        },
    );
    let proxy = Proxy::start(&format!(
        "backends:\n  - {{ name: b1, address: \"{}\", forward_id: true }}\n",
        b1.address()
    ))
    .await;
    let pairs: Vec<String> = (0..30)
        .map(|i| {
            format!(
                "\"{}\" \"{}\"",
                format!("f{i:02}").repeat(10),
                "v".repeat(1024)
            )
        })
        .collect();
    let id = format!("i ID ({})\r\n", pairs.join(" "));
    assert!(id.len() > 31_000);
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send(&id).await;
    let (untagged, answer) = c.until_tagged("i").await;
    assert!(answer.starts_with("i OK"), "{untagged:?} {answer}");
    c.send("l LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("l").await;
    assert!(answer.starts_with("l OK"), "{answer}");
    b1.wait_for_info_line(|l| l.contains("Login: user=<alice>"))
        .await;
    proxy.stop().await;
}

/// A BYE for input over a limit reaches the client even while it is still sending: imapgate
/// half-closes and reads on briefly instead of closing with unread input (which would make
/// the kernel send a reset and the client lose the BYE).
#[tokio::test]
async fn the_bye_arrives_while_the_client_is_still_sending() {
    let proxy = Proxy::start(&config(
        &[("b1", nowhere())],
        "limits: { line_max: 1024, literal_max: 512 }\n",
    ))
    .await;
    for opening in [b"a1 LOGIN ".to_vec(), b"t3 LOGIN {100000+}\r\n".to_vec()] {
        let mut c = proxy.connect().await;
        c.line().await.unwrap();
        let mut flood = opening;
        flood.extend(std::iter::repeat_n(b'x', 300_000));
        // Written in the background: the client goes on sending while imapgate refuses.
        let (mut read, mut write) = tokio::io::split(c.stream);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = write.write_all(&flood).await;
            write
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            use tokio::io::AsyncReadExt;
            match tokio::time::timeout(crate::support::DEADLINE, read.read(&mut buf))
                .await
                .expect("imapgate closes within the deadline")
            {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("{e} after {:?}", String::from_utf8_lossy(&got)),
            }
        }
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("* BYE [LIMIT]"), "{got:?}");
        let _ = writer.await;
    }
    proxy.stop().await;
}

/// Garbage is not answered forever: after `limits.bad_commands` syntax errors in a row, BYE.
#[tokio::test]
async fn garbage_ends_with_bye_after_bad_commands() {
    let proxy = Proxy::start(&config(
        &[("b1", nowhere())],
        "limits: { bad_commands: 5 }\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    // Lines of random bytes: each a syntax error.
    let mut x: u32 = 12345;
    let mut garbage = Vec::new();
    for _ in 0..200 {
        for _ in 0..60 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let b = (x >> 16) as u8;
            garbage.push(if b == b'\n' || b == b'\r' { b'?' } else { b });
        }
        garbage.extend_from_slice(b"\r\n");
    }
    c.send(&garbage).await;
    let rest = c.rest().await;
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines.len(), 6, "5 BADs then the BYE: {rest:?}");
    assert!(lines[..5].iter().all(|l| l.contains(" BAD ")), "{rest:?}");
    assert_eq!(lines[5], "* BYE Too many invalid commands.");
    // A mistake now and then is fine: the count is of mistakes in a row.
    let mut d = proxy.connect().await;
    d.line().await.unwrap();
    for i in 0..8 {
        d.send(format!("bad{i} FROBNICATE\r\nn{i} NOOP\r\n")).await;
        d.until_tagged(&format!("n{i}")).await;
    }
    d.send("z LOGOUT\r\n").await;
    assert!(d.until_tagged("z").await.1.starts_with("z OK"));
    proxy.stop().await;
}

/// Limits that hold before anything is read: connections waiting for their PROXY header count
/// under `max_connections`, and the header and a TLS handshake each have a deadline of their
/// own, far shorter than the pre-login one.
#[tokio::test]
async fn waiting_for_a_header_or_a_handshake_is_bounded() {
    use std::time::{Duration, Instant};
    let pki = crate::support::pki::Pki::new();
    let leaf = pki.pair("proxy");
    let proxy = Proxy::start(&format!(
        "listeners:\n  - {{ name: balanced, bind: \"127.0.0.1:1\", proxy_protocol: required, trusted_proxies: [\"127.0.0.1\"] }}\n  - {{ name: imaps, bind: \"127.0.0.1:2\", tls: implicit }}\n\
         tls: {{ cert: \"{}\", key: \"{}\" }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\n\
         limits: {{ max_connections: 3 }}\ntimeouts: {{ prelogin: 60s, proxy_header: 500ms, tls_handshake: 500ms }}\n",
        leaf.cert.display(),
        leaf.key.display(),
        nowhere()
    ))
    .await;
    // Three connections that never send their header fill max_connections ...
    let waiting: Vec<_> =
        futures_collect((0..3).map(|_| tokio::net::TcpStream::connect(proxy.addrs[0]))).await;
    crate::support::metrics_when(&proxy, |m| {
        crate::support::sample(m, "imapgate_connections_active", "listener=\"balanced\"")
            == Some(3.0)
    })
    .await;
    // ... so the fourth is refused at once with a BYE, on either listener.
    let mut fourth = crate::support::Raw::connect(proxy.addrs[1]).await;
    let refused = fourth.rest().await;
    assert!(refused.starts_with("* BYE [LIMIT]"), "{refused:?}");
    // The header deadline closes the silent ones long before the pre-login timeout.
    let started = Instant::now();
    for stream in waiting {
        let mut raw = crate::support::Raw::new(stream);
        assert_eq!(raw.rest().await, "", "closed without a greeting");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A TLS client that never says hello is closed by the handshake deadline.
    let started = Instant::now();
    let mut silent = crate::support::Raw::connect(proxy.addrs[1]).await;
    assert_eq!(silent.rest().await, "");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        crate::support::sample(
            &metrics,
            "imapgate_prelogin_rejections_total",
            "reason=\"proxy_header\""
        ),
        Some(3.0)
    );
    proxy.stop().await;
}

async fn futures_collect<
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
>(
    connects: impl Iterator<Item = F>,
) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for c in connects {
        out.push(c.await.unwrap());
    }
    out
}

/// A balancer's own connection (`PROXY UNKNOWN`, v2 `LOCAL`) does not pass for a local client:
/// plaintext login stays off for it, as for any client the header does not name as local.
#[tokio::test]
async fn an_unknown_proxy_client_is_not_a_local_one() {
    let proxy = Proxy::start(&format!(
        "listeners:\n  - {{ name: balanced, bind: \"127.0.0.1:1\", proxy_protocol: required, trusted_proxies: [\"127.0.0.1\"] }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\n",
        nowhere()
    ))
    .await;
    for (header, plaintext) in [
        ("PROXY TCP4 127.0.0.1 127.0.0.1 40000 143\r\n", true),
        ("PROXY UNKNOWN\r\n", false),
        ("PROXY TCP4 203.0.113.7 127.0.0.1 40000 143\r\n", false),
    ] {
        let mut c = proxy.connect().await;
        c.send(header).await;
        let greeting = c.line().await.unwrap();
        assert_eq!(
            greeting.contains("AUTH=PLAIN"),
            plaintext,
            "{header:?}: {greeting}"
        );
        assert_eq!(greeting.contains("LOGINDISABLED"), !plaintext, "{greeting}");
    }
    proxy.stop().await;
}
