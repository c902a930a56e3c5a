//! TLS on both sides and the client's real address: real clients (openssl s_client, curl, a
//! rustls client) in front, real Dovecot with TLS and with trusted proxy settings behind.

use std::sync::{Arc, Mutex};

use tokio::process::Command;

use crate::support::dovecot::{self, Dovecot, Options};
use crate::support::pki::Pki;
use crate::support::{
    DEADLINE, LogLines, Proxy, Raw, tls_client, tls_client_result, tool_available,
};

/// The TLS part of a config: imapgate's default certificate and an SNI one.
fn tls_yaml(pki: &Pki) -> String {
    let (proxy, sni) = (pki.pair("proxy"), pki.pair("sni"));
    format!(
        "tls:\n  cert: \"{}\"\n  key: \"{}\"\n  sni:\n    - {{ names: [other.test], cert: \"{}\", key: \"{}\" }}\n",
        proxy.cert.display(),
        proxy.key.display(),
        sni.cert.display(),
        sni.key.display()
    )
}

const TWO_LISTENERS: &str = "listeners:\n  - { name: imap, bind: \"127.0.0.1:1\", tls: starttls }\n  - { name: imaps, bind: \"127.0.0.1:2\", tls: implicit }\n";

/// imapgate with a STARTTLS and an implicit-TLS listener, and no backend behind it.
async fn tls_proxy_without_backend(pki: &Pki) -> Proxy {
    let nowhere = crate::support::nowhere();
    Proxy::start(&format!(
        "{TWO_LISTENERS}{}backends:\n  - {{ name: b1, address: \"{nowhere}\" }}\n",
        tls_yaml(pki)
    ))
    .await
}

async fn run(command: &mut Command, stdin: &[u8]) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("the client runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the client finishes within the deadline")
        .unwrap();
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tools() -> bool {
    dovecot::available() && tool_available("openssl", "openssl") && tool_available("curl", "curl")
}

async fn append_message(proxy: &Proxy, user: &str, password: &str, subject: &str) {
    let mut c = proxy.connect().await;
    c.login(user, password).await;
    let message = format!("Subject: {subject}\r\n\r\nbody\r\n");
    c.send(format!(
        "a APPEND INBOX {{{}+}}\r\n{message}\r\n",
        message.len()
    ))
    .await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_curl_over_implicit_tls_and_starttls() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&format!(
        "{TWO_LISTENERS}{}backends:\n  - {{ name: b1, address: \"{}\" }}\n",
        tls_yaml(&pki),
        b1.address()
    ))
    .await;
    append_message(&proxy, "bob", "bob-secret", "over-tls").await;
    let (starttls, implicit) = (proxy.addrs[0], proxy.addrs[1]);
    let ca = pki.ca().display().to_string();
    let script = b"a LOGIN bob bob-secret\nb SELECT INBOX\nc LOGOUT\n";

    for (what, mut args) in [
        (
            "s_client implicit",
            vec!["s_client", "-connect", &implicit.to_string()],
        ),
        (
            "s_client -starttls imap",
            vec![
                "s_client",
                "-connect",
                &starttls.to_string(),
                "-starttls",
                "imap",
            ],
        ),
    ]
    .map(|(w, a)| (w, a.into_iter().map(String::from).collect::<Vec<_>>()))
    {
        args.extend(
            [
                "-servername",
                "imap.test",
                "-CAfile",
                &ca,
                "-verify_return_error",
                "-quiet",
                "-crlf",
            ]
            .map(String::from),
        );
        let (ok, out) = run(Command::new("openssl").args(&args), script).await;
        assert!(ok, "{what}: {out}");
        for answer in ["a OK", "b OK", "c OK"] {
            assert!(out.contains(answer), "{what}: no {answer:?} in {out}");
        }
    }

    for (what, url, extra) in [
        (
            "curl imaps://",
            format!("imaps://imap.test:{}/INBOX;UID=1", implicit.port()),
            None,
        ),
        (
            "curl --ssl-reqd imap://",
            format!("imap://imap.test:{}/INBOX;UID=1", starttls.port()),
            Some("--ssl-reqd"),
        ),
    ] {
        let port = url
            .split(':')
            .nth(2)
            .and_then(|p| p.split('/').next())
            .unwrap()
            .to_string();
        let mut command = Command::new("curl");
        command.args([
            "-sS",
            "--cacert",
            &ca,
            "--resolve",
            &format!("imap.test:{port}:127.0.0.1"),
            "-u",
            "bob:bob-secret",
            &url,
        ]);
        if let Some(flag) = extra {
            command.arg(flag);
        }
        let (ok, out) = run(&mut command, b"").await;
        assert!(ok && out.contains("Subject: over-tls"), "{what}: {out}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn sni_picks_the_certificate() {
    let pki = Pki::new();
    let proxy = tls_proxy_without_backend(&pki).await;
    let implicit = proxy.addrs[1];
    for name in ["imap.test", "other.test"] {
        // Verification against each name passes only if that name's certificate was served.
        let tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
        let mut c = Raw::new(tls_client(tcp, name, &pki.ca()).await);
        assert!(c.line().await.unwrap().starts_with("* OK"), "{name}");
    }
    let tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
    assert!(
        tls_client_result(tcp, "third.test", &pki.ca())
            .await
            .is_err(),
        "no certificate for third.test: the default one does not match it"
    );
    proxy.stop().await;
}

/// `a STARTTLS` and `b CAPABILITY` in one write: b was sent in plaintext before the
/// handshake and must never be answered.
#[tokio::test]
async fn starttls_discards_injected_commands() {
    let pki = Pki::new();
    let proxy = tls_proxy_without_backend(&pki).await;
    let mut c = Raw::connect(proxy.addrs[0]).await;
    let greeting = c.line().await.unwrap();
    assert!(greeting.contains(" STARTTLS"), "{greeting}");
    c.send("a STARTTLS\r\nb CAPABILITY\r\n").await;
    assert!(c.line().await.unwrap().starts_with("a OK"));
    let mut c = c.start_tls("imap.test", &pki.ca()).await;
    c.send("c CAPABILITY\r\nd STARTTLS\r\n").await;
    let (untagged, answer) = c.until_tagged("c").await;
    assert!(answer.starts_with("c OK"));
    assert!(
        untagged.iter().all(|l| !l.starts_with("b ")),
        "the injected command was answered: {untagged:?}"
    );
    assert!(
        untagged[0].contains("AUTH=PLAIN") && !untagged[0].contains("STARTTLS"),
        "{untagged:?}"
    );
    assert!(
        c.until_tagged("d").await.1.starts_with("d BAD"),
        "STARTTLS twice"
    );
    proxy.stop().await;
}

/// The client's address reaches Dovecot, for the ID route and the PROXY route, and a client
/// that looks remote gets LOGINDISABLED and PRIVACYREQUIRED until it has TLS.
#[tokio::test]
async fn client_address_reaches_dovecot_and_plaintext_policy() {
    if !dovecot::available() {
        return;
    }
    let pki = Pki::new();
    let dv = Dovecot::start_with(
        "b1",
        Options {
            trust_proxy: true,
            ..Options::default()
        },
    );
    let proxy = Proxy::start(&format!(
        "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:1\", tls: starttls, proxy_protocol: required, trusted_proxies: [\"127.0.0.0/8\"] }}\n\
         {}backends:\n  - {{ name: by_id, address: \"{}\", forward_id: true }}\n  - {{ name: by_proxy, address: \"{}\", send_proxy: v2 }}\n\
         routing:\n  static: {{ alice: by_id, bob: by_proxy }}\nhealth: {{ interval: 100ms }}\n",
        tls_yaml(&pki),
        dv.address(),
        dv.haproxy_address(),
    ))
    .await;

    // The health check sends a PROXY LOCAL header where the backend expects PROXY headers.
    crate::support::metrics_when(&proxy, |m| {
        crate::support::sample(m, "imapgate_backend_up", "backend=\"by_proxy\"") == Some(1.0)
    })
    .await;
    for (user, password) in [("alice", "alice-secret"), ("bob", "bob-secret")] {
        let mut c = proxy.connect().await;
        c.send("PROXY TCP4 203.0.113.7 127.0.0.1 40001 143\r\n")
            .await;
        let greeting = c.line().await.unwrap();
        assert!(
            greeting.contains("LOGINDISABLED")
                && greeting.contains("STARTTLS")
                && !greeting.contains("AUTH="),
            "{greeting}"
        );
        c.send(format!("p LOGIN {user} {password}\r\n")).await;
        let (_, answer) = c.until_tagged("p").await;
        assert!(answer.starts_with("p NO [PRIVACYREQUIRED]"), "{answer}");
        c.send("s STARTTLS\r\n").await;
        assert!(c.line().await.unwrap().starts_with("s OK"));
        let mut c = c.start_tls("imap.test", &pki.ca()).await;
        c.send(format!("l LOGIN {user} {password}\r\n")).await;
        let (_, answer) = c.until_tagged("l").await;
        assert!(answer.starts_with("l OK"), "{user}: {answer}");
        let login = format!("Login: user=<{user}>");
        let line = dv.wait_for_info_line(|l| l.contains(&login)).await;
        assert!(
            line.contains("rip=203.0.113.7"),
            "{user}: Dovecot saw {line}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_listener_refuses_untrusted_peers_and_missing_headers() {
    let nowhere = crate::support::nowhere();
    let proxy = Proxy::start(&format!(
        "listeners:\n  - {{ name: strict, bind: \"127.0.0.1:1\", proxy_protocol: required, trusted_proxies: [\"10.0.0.0/8\"] }}\n  - {{ name: trusting, bind: \"127.0.0.1:2\", proxy_protocol: required, trusted_proxies: [\"127.0.0.1\"] }}\n\
         backends:\n  - {{ name: b1, address: \"{nowhere}\" }}\n"
    ))
    .await;
    let mut untrusted = Raw::connect(proxy.addrs[0]).await;
    untrusted
        .send("PROXY TCP4 203.0.113.7 127.0.0.1 40001 143\r\n")
        .await;
    assert_eq!(untrusted.rest().await, "", "closed without a greeting");
    let mut no_header = Raw::connect(proxy.addrs[1]).await;
    no_header.send("a1 LOGIN alice secret\r\n").await;
    assert_eq!(no_header.rest().await, "", "closed without a greeting");
    proxy.stop().await;
}

/// A tracing writer that keeps what the proxy logs, for tests that check a log line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Backends with TLS (implicit and STARTTLS, verified against the test CA) work; one whose
/// certificate the configured CA did not sign gets NO [UNAVAILABLE], and the log says why.
#[tokio::test]
async fn tls_to_backends_and_a_wrong_certificate() {
    if !dovecot::available() {
        return;
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // This test's runtime is current-thread: every task runs under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let pki = Pki::new();
    let backend = pki.pair("backend");
    let dv = Dovecot::start_with(
        "b1",
        Options {
            tls: Some((backend.cert, backend.key)),
            ..Options::default()
        },
    );
    let ca = pki.ca().display().to_string();
    let rogue = pki.rogue_ca().display().to_string();
    let proxy = Proxy::start(&format!(
        "backends:\n  - {{ name: implicit, address: \"{}\", tls: implicit, ca: \"{ca}\", server_name: backend.test }}\n  - {{ name: starttls, address: \"{}\", tls: starttls, ca: \"{ca}\" }}\n  - {{ name: wrong_ca, address: \"{}\", tls: implicit, ca: \"{rogue}\" }}\n  - {{ name: starttls_wrong_ca, address: \"{}\", tls: starttls, ca: \"{rogue}\", weight: 0 }}\n\
         routing:\n  static: {{ alice: implicit, bob: starttls, carol: wrong_ca }}\nhealth: {{ interval: 100ms }}\n",
        dv.imaps_address(),
        dv.address(),
        dv.imaps_address(),
        dv.address(),
    ))
    .await;
    for (user, password) in [("alice", "alice-secret"), ("bob", "bob-secret")] {
        let mut c = proxy.connect().await;
        c.login(user, password).await;
        c.send("s SELECT INBOX\r\n").await;
        assert!(c.until_tagged("s").await.1.starts_with("s OK"), "{user}");
    }
    for user in ["alice", "bob"] {
        let login = format!("Login: user=<{user}>");
        let line = dv.wait_for_info_line(|l| l.contains(&login)).await;
        assert!(
            line.contains("TLS"),
            "{user}'s login was over TLS, as Dovecot saw it: {line}"
        );
    }

    // Health checks speak TLS where the backend does: up for the two good ones, down for
    // the one whose certificate does not verify.
    let m = crate::support::metrics_when(&proxy, |m| {
        ["implicit", "starttls"].iter().all(|b| {
            crate::support::sample(m, "imapgate_backend_up", &format!("backend=\"{b}\""))
                == Some(1.0)
        })
    })
    .await;
    for b in ["wrong_ca", "starttls_wrong_ca"] {
        assert_eq!(
            crate::support::sample(&m, "imapgate_backend_up", &format!("backend=\"{b}\"")),
            Some(0.0),
            "{b}"
        );
    }

    // The checks did run for both (0 is also where a backend starts): each was found down,
    // the STARTTLS one because its certificate failed verification after STARTTLS.
    let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
    for b in ["backend=wrong_ca ", "backend=starttls_wrong_ca "] {
        loop {
            let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
            if logged
                .lines()
                .any(|l| l.contains(b) && l.contains("backend down") && l.contains("UnknownIssuer"))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no health check found {b}down:\n{logged}"
            );
            // The log is a buffer with no event to wait on: look again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("w LOGIN carol carol-secret\r\n").await;
    let (_, answer) = c.until_tagged("w").await;
    assert!(answer.starts_with("w NO [UNAVAILABLE]"), "{answer}");
    proxy.stop().await;
    // Known down (its certificate fails), so the login does not even try it.
    let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let line = logged
        .lines()
        .find(|l| l.contains("carol") && l.contains("no backend takes logins"))
        .unwrap_or_else(|| panic!("no login line for carol in:\n{logged}"));
    assert!(line.contains("result=\"unavailable\""), "{line}");
    assert!(
        !logged.contains("carol-secret"),
        "a password reached the log"
    );
}

/// SIGHUP reloads the certificate for new clients; a TLS session already open keeps working;
/// a broken file leaves the last good certificate in place. Runs the real binary.
#[tokio::test]
async fn sighup_reloads_certificates() {
    let pki = Pki::new();
    let nowhere = crate::support::nowhere();
    let port = crate::support::free_port();
    let config_path = pki.path("imapgate.yaml");
    let (proxy_cert, proxy_key) = (pki.pair("proxy").cert, pki.pair("proxy").key);
    std::fs::write(
        &config_path,
        format!(
            "listeners:\n  - {{ name: imaps, bind: \"127.0.0.1:{port}\", tls: implicit }}\ntls: {{ cert: \"{}\", key: \"{}\" }}\nbackends:\n  - {{ name: b1, address: \"{nowhere}\" }}\n",
            proxy_cert.display(),
            proxy_key.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--config"])
        .arg(&config_path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;

    let certificate = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    };
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tls_client(tcp, "imap.test", &pki.ca()).await
    };
    let old_tls = connect().await;
    let first = certificate(&old_tls);
    let mut old = Raw::new(old_tls);
    assert!(old.line().await.unwrap().starts_with("* OK"));

    pki.renew("proxy", &["imap.test", "127.0.0.1"]);
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    logs.wait_for("configuration reloaded").await;
    let second = certificate(&connect().await);
    assert_ne!(first, second, "a new client gets the new certificate");
    old.send("n NOOP\r\n").await;
    assert!(
        old.until_tagged("n").await.1.starts_with("n OK"),
        "the old session goes on"
    );

    std::fs::write(&proxy_key, "not a key").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    logs.wait_for("not reloaded").await;
    assert_eq!(
        certificate(&connect().await),
        second,
        "a bad file leaves the old certificate"
    );

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The TLS relay moves what a plain one does, byte for byte: a large APPEND up and the same
/// message FETCHed back down, and IDLE waking on a message another session appends; with TLS
/// on the client's side (implicit and STARTTLS), on the backend's, and on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_relay_large_literals_and_idle() {
    if !dovecot::available() {
        return;
    }
    let pki = Pki::new();
    let backend = pki.pair("backend");
    let dv = Dovecot::start_with(
        "b1",
        Options {
            tls: Some((backend.cert, backend.key)),
            ..Options::default()
        },
    );
    let ca = pki.ca();
    let proxy = Proxy::start(&format!(
        "{TWO_LISTENERS}{}backends:\n  - {{ name: tls, address: \"{}\", tls: implicit, ca: \"{}\", server_name: backend.test }}\n  - {{ name: plain, address: \"{}\" }}\nrouting:\n  static: {{ alice: tls, dave: tls, bob: plain }}\n",
        tls_yaml(&pki),
        dv.imaps_address(),
        ca.display(),
        dv.address(),
    ))
    .await;
    // A 3 MB message of every printable octet, in lines (APPEND takes no NUL or bare CR/LF).
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u32;
    while message.len() < 3_000_000 {
        let line: Vec<u8> = (0..998).map(|k| b' ' + ((i + k) % 95) as u8).collect();
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
        i += 7;
    }
    let (starttls, implicit) = (proxy.addrs[0], proxy.addrs[1]);
    // Implicit TLS to a TLS backend; STARTTLS to a plain one; STARTTLS to a TLS one. (A plain
    // client in front of a TLS backend: `tls_to_backends_and_a_wrong_certificate`.)
    for (user, password, mode) in [
        ("alice", "alice-secret", "implicit"),
        ("bob", "bob-secret", "starttls"),
        ("dave", "dave-secret", "starttls"),
    ] {
        let connect = || async {
            if mode == "implicit" {
                let tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
                Raw::new(tls_client(tcp, "imap.test", &ca).await)
            } else {
                let mut c = Raw::connect(starttls).await;
                assert!(c.line().await.unwrap().starts_with("* OK"));
                c.send("t STARTTLS\r\n").await;
                assert!(c.until_tagged("t").await.1.starts_with("t OK"));
                let mut c = c.start_tls("imap.test", &ca).await;
                // The greeting is not repeated after STARTTLS: a NOOP to have a line to read.
                c.send("n NOOP\r\n").await;
                assert!(c.until_tagged("n").await.1.starts_with("n OK"));
                c
            }
        };
        let login = |mut c: Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>| async move {
            if mode == "implicit" {
                c.login(user, password).await;
            } else {
                c.send(format!("l1 LOGIN {user} {password}\r\n")).await;
                let (_, answer) = c.until_tagged("l1").await;
                assert!(answer.starts_with("l1 OK"), "{answer}");
            }
            c
        };
        let mut watcher = login(connect().await).await;
        watcher.send("s SELECT INBOX\r\n").await;
        let (untagged, answer) = watcher.until_tagged("s").await;
        assert!(answer.starts_with("s OK"), "{answer}");
        let before = untagged
            .iter()
            .find_map(|l| {
                l.strip_prefix("* ")?
                    .strip_suffix(" EXISTS\r\n")?
                    .parse::<u32>()
                    .ok()
            })
            .expect("EXISTS in the SELECT answer");
        watcher.send("i IDLE\r\n").await;
        assert!(watcher.line().await.unwrap().starts_with("+ "));

        let mut c = login(connect().await).await;
        c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
            .await;
        assert!(c.line().await.unwrap().starts_with("+ "));
        c.send(&message).await;
        c.send("\r\n").await;
        let (_, answer) = c.until_tagged("a").await;
        assert!(answer.starts_with("a OK"), "{user} over {mode}: {answer}");

        // IDLE wakes with the new message.
        let exists = watcher.line().await.unwrap();
        assert_eq!(
            exists,
            format!("* {} EXISTS\r\n", before + 1),
            "{user} {mode}"
        );
        watcher.send("DONE\r\n").await;
        assert!(watcher.until_tagged("i").await.1.starts_with("i OK"));

        c.send(format!(
            "s SELECT INBOX\r\nf FETCH {} BODY.PEEK[]\r\n",
            before + 1
        ))
        .await;
        assert!(c.until_tagged("s").await.1.starts_with("s OK"));
        let head = c.line().await.unwrap();
        assert!(
            head.ends_with(&format!("{{{}}}\r\n", message.len())),
            "{user} {mode}: {head}"
        );
        let body = c.bytes(message.len()).await;
        assert!(
            body == message,
            "{user} over {mode}: the message came back changed"
        );
        assert!(c.until_tagged("f").await.1.starts_with("f OK"));
        c.send("z LOGOUT\r\n").await;
        assert!(c.until_tagged("z").await.1.starts_with("z OK"));
        // The backend closes after LOGOUT; the client sees the close, cleanly.
        assert_eq!(c.rest().await, "");
    }
    proxy.stop().await;
}

/// Ending TLS sessions: a client that sends LOGOUT and at once close_notify + FIN still gets the
/// whole answer (the half-close passed on, the backend's answer relayed); a kicked session in
/// IDLE gets the BYE and then a clean close (close_notify, not a truncated stream). The backend
/// is plain: Dovecot, told of the end (close_notify) on a TLS connection right after LOGOUT, may
/// close without answering, which is Dovecot's choice, not the relay's.
#[tokio::test]
async fn tls_sessions_end_cleanly() {
    if !dovecot::available() {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let dv = Dovecot::start("b1");
    let ca = pki.ca();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tls-test-token-0123456789\n").unwrap();
    let proxy = Proxy::start(&format!(
        "{TWO_LISTENERS}{}admin: {{ bind: \"127.0.0.1:9143\", token_file: \"{}\" }}\nbackends:\n  - {{ name: plain, address: \"{}\" }}\n",
        tls_yaml(&pki),
        token.display(),
        dv.address(),
    ))
    .await;
    let implicit = proxy.addrs[1];
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
        let mut c = Raw::new(tls_client(tcp, "imap.test", &ca).await);
        c.login("erin", "erin-secret").await;
        c
    };

    // LOGOUT, then close_notify and FIN at once: the answer still comes, then a clean end.
    let mut c = connect().await;
    c.send("z LOGOUT\r\n").await;
    c.stream.shutdown().await.unwrap();
    let mut rest = c.take_buffered();
    tokio::time::timeout(DEADLINE, c.stream.read_to_end(&mut rest))
        .await
        .expect("imapgate closes within the deadline")
        .expect("a clean TLS close (close_notify), not a truncated stream");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("* BYE"), "{rest}");
    assert!(rest.contains("z OK"), "the tagged answer arrives: {rest}");

    // Kicked in IDLE: the BYE, then close_notify and FIN.
    let mut c = connect().await;
    c.send("i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+ "));
    let (status, body) = crate::support::http(
        proxy.admin,
        "POST",
        "/sessions/kick?user=erin",
        Some("tls-test-token-0123456789"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut rest = c.take_buffered();
    tokio::time::timeout(DEADLINE, c.stream.read_to_end(&mut rest))
        .await
        .expect("the kick closes the session within the deadline")
        .expect("a clean TLS close after the BYE");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.trim_end()
            .ends_with("Session closed by the administrator."),
        "the BYE is the last word: {rest}"
    );
    assert!(rest.contains("* BYE [UNAVAILABLE]"), "{rest}");
    proxy.stop().await;
}
