//! Third-party clients through imapgate against Dovecot: async-imap (Rust), curl, Python imaplib.

use futures::TryStreamExt;
use tokio::process::Command;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, config};

async fn proxy_with_message(user: &str, password: &str, subject: &str) -> Option<(Dovecot, Proxy)> {
    if !dovecot::available() {
        return None;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let message = format!("From: t@example.net\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n");
    let mut c = proxy.connect().await;
    c.login(user, password).await;
    c.send(format!(
        "a APPEND INBOX {{{}+}}\r\n{message}\r\n",
        message.len()
    ))
    .await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"));
    Some((b1, proxy))
}

#[tokio::test]
async fn async_imap_client() {
    let Some((_b1, proxy)) = proxy_with_message("alice", "alice-secret", "from-async-imap").await
    else {
        return;
    };
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut client = async_imap::Client::new(stream);
    let greeting = client.read_response().await.unwrap();
    assert!(greeting.is_some());
    let mut session = client
        .login("alice", "alice-secret")
        .await
        .map_err(|(e, _)| e)
        .expect("login through imapgate");
    let mailbox = session.select("INBOX").await.unwrap();
    assert_eq!(mailbox.exists, 1);
    let fetched: Vec<_> = session
        .fetch("1", "BODY[]")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let body = fetched[0].body().expect("a body");
    assert!(String::from_utf8_lossy(body).contains("Subject: from-async-imap"));
    session.logout().await.unwrap();
    proxy.stop().await;
}

async fn run(command: &mut Command) -> std::process::Output {
    command.kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the client finishes within the deadline")
        .expect("the client runs")
}

#[tokio::test]
async fn curl_fetches_through_imapgate() {
    let Some((_b1, proxy)) = proxy_with_message("bob", "bob-secret", "from-curl").await else {
        return;
    };
    let port = proxy.addr.port();
    // The README's command: list the mailbox.
    let out = run(Command::new("curl").args([
        "-sS",
        "-v",
        &format!("imap://bob:bob-secret@127.0.0.1:{port}/INBOX"),
    ]))
    .await;
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And fetch the message itself.
    let out = run(Command::new("curl").args([
        "-sS",
        &format!("imap://bob:bob-secret@127.0.0.1:{port}/INBOX;UID=1"),
    ]))
    .await;
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Subject: from-curl"));
    proxy.stop().await;
}

#[tokio::test]
async fn python_imaplib_through_imapgate() {
    let Some((_b1, proxy)) = proxy_with_message("carol", "carol-secret", "from-python").await
    else {
        return;
    };
    let script = r#"
import imaplib, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login("carol", "carol-secret")
typ, _ = m.select("INBOX")
assert typ == "OK", typ
typ, data = m.fetch("1", "(BODY[])")
assert typ == "OK", typ
sys.stdout.write(data[0][1].decode())
m.logout()
"#;
    let out =
        run(Command::new("python3").args(["-c", script, &proxy.addr.port().to_string()])).await;
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Subject: from-python"));
    proxy.stop().await;
}
