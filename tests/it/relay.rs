//! After login: bytes both ways, unchanged.

use crate::support::dovecot::{self, Dovecot};
use crate::support::{Proxy, config};

fn one_backend() -> Option<Dovecot> {
    dovecot::available().then(|| Dovecot::start("b1"))
}

/// A 10 MiB message in and out, compared byte for byte.
#[tokio::test]
async fn ten_mib_append_and_fetch_are_byte_exact() {
    let Some(b1) = one_backend() else { return };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut message = b"From: a@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut x: u32 = 12345;
    while message.len() < 10 * 1024 * 1024 {
        // Printable pseudo-random lines, with IMAP-looking text inside, to tempt any parser.
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let line = format!(
            "{x:08x} a1 OK {{5}} * BYE {}\r\n",
            "z".repeat((x % 60) as usize)
        );
        message.extend_from_slice(line.as_bytes());
    }
    let mut c = proxy.connect().await;
    c.login("dave", "dave-secret").await;
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with("+"));
    c.send(&message).await;
    c.send("\r\n").await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"));
    c.send("s SELECT INBOX\r\nf FETCH 1 BODY.PEEK[]\r\n").await;
    assert!(c.until_tagged("s").await.1.starts_with("s OK"));
    let header = c.line().await.unwrap();
    let size = format!("{{{}}}\r\n", message.len());
    assert!(
        header.starts_with("* 1 FETCH") && header.ends_with(&size),
        "{header:?}"
    );
    let body = c.bytes(message.len()).await;
    assert!(
        body == message,
        "the fetched body differs from the appended one"
    );
    assert!(c.until_tagged("f").await.1.starts_with("f OK"));
    proxy.stop().await;
}

/// The client shuts down its sending side right after LOGOUT and still gets the whole answer.
#[tokio::test]
async fn half_close_after_logout_gets_the_answer() {
    let Some(b1) = one_backend() else { return };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut c = proxy.connect().await;
    c.login("carol", "carol-secret").await;
    c.send("x LOGOUT\r\n").await;
    c.stream.shutdown().await.expect("shutdown write");
    let rest = c.rest().await;
    assert!(rest.contains("* BYE") && rest.contains("x OK"), "{rest:?}");
    proxy.stop().await;
}

use tokio::io::AsyncWriteExt as _;
