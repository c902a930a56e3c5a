//! After login the client learns the backend's capabilities, not imapgate's pre-login list: a
//! client that went on with a pre-login list would send what the backend may not take (a
//! `{n+}` to Courier, which then runs the literal's lines as commands).

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, config};

/// The pre-login list is imapgate's own: only what it handles itself before login.
#[tokio::test]
async fn prelogin_list_is_what_imapgate_handles() {
    let proxy = Proxy::start(&config(&[("b1", crate::support::nowhere())], "")).await;
    let mut c = proxy.connect().await;
    let greeting = c.line().await.unwrap();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN AUTH=LOGIN]"),
        "{greeting}"
    );
    proxy.stop().await;
}

/// Dovecot's OK carries its own `[CAPABILITY ...]`: it reaches the client as it is.
#[tokio::test]
async fn dovecot_list_reaches_the_client() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice alice-secret\r\n").await;
    let (_, ok) = c.until_tagged("a").await;
    assert!(ok.starts_with("a OK [CAPABILITY IMAP4rev1 "), "{ok}");
    // Post-login extensions imapgate never advertises itself.
    for cap in [" IDLE", " NAMESPACE", " ENABLE"] {
        assert!(ok.contains(cap), "{cap} missing in {ok}");
    }
    proxy.stop().await;
}

/// A backend that behaves like Courier: capabilities in its greeting, none in its login OK,
/// no LITERAL+. imapgate asks it for CAPABILITY after the login and puts the answer into the
/// client's OK; untagged lines sent meanwhile still reach the client, after the OK, in order.
/// Each case: what the backend answers to the login, what it answers to `ig2 CAPABILITY`, what
/// the client must see, and whether the session goes on (a NOOP through the relay).
#[tokio::test]
async fn ok_without_capabilities_gets_the_backends_list() {
    const CAPS: &str = "* CAPABILITY IMAP4rev1 IDLE NAMESPACE CHILDREN\r\n";
    let cases: &[(&str, String, &[&str], bool)] = &[
        (
            "ig1 OK LOGIN Ok.\r\n",
            format!("* 1 EXISTS\r\n{CAPS}ig2 OK CAPABILITY completed\r\n"),
            &[
                "a OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE CHILDREN] LOGIN Ok.\r\n",
                "* 1 EXISTS\r\n",
            ],
            true,
        ),
        // The OK has a code of its own: the list comes as an untagged CAPABILITY before it.
        (
            "ig1 OK [ALERT] Quota almost full.\r\n",
            format!("{CAPS}ig2 OK done\r\n"),
            &[
                "* CAPABILITY IMAP4rev1 IDLE NAMESPACE CHILDREN\r\n",
                "a OK [ALERT] Quota almost full.\r\n",
            ],
            true,
        ),
        // Untagged lines in the same write as the OK, a lower-case status, no text.
        (
            "ig1 ok\r\n* 2 RECENT\r\n",
            format!("{CAPS}ig2 OK done\r\n"),
            &[
                "a OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE CHILDREN] Logged in.\r\n",
                "* 2 RECENT\r\n",
            ],
            true,
        ),
        // A backend that cannot answer: the client is promised the baseline only.
        (
            "ig1 OK LOGIN Ok.\r\n",
            "* 1 EXISTS\r\nig2 BAD Unknown command\r\n".to_string(),
            &[
                "a OK [CAPABILITY IMAP4rev1] LOGIN Ok.\r\n",
                "* 1 EXISTS\r\n",
            ],
            true,
        ),
        // No answer at all: after a few seconds the baseline, and the session goes on.
        (
            "ig1 OK LOGIN Ok.\r\n",
            String::new(),
            &["a OK [CAPABILITY IMAP4rev1] LOGIN Ok.\r\n"],
            true,
        ),
        // BYE right after the login: the login stands, the BYE and the close reach the client.
        (
            "ig1 OK LOGIN Ok.\r\n",
            "* BYE Going away.\r\n".to_string(),
            &[
                "a OK [CAPABILITY IMAP4rev1] LOGIN Ok.\r\n",
                "* BYE Going away.\r\n",
            ],
            false,
        ),
    ];
    for (ok, capability_answer, expected, goes_on) in cases {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap().to_string();
        let (ok, capability_answer, goes_on) =
            (ok.to_string(), capability_answer.clone(), *goes_on);
        let script = tokio::spawn(async move {
            // Health checks come and go (greeting, LOGOUT); the login is the one that stays.
            let (mut lines, mut write) = loop {
                let (tcp, _) = backend.accept().await.unwrap();
                let (read, mut write) = tcp.into_split();
                let mut lines = BufReader::new(read).lines();
                write
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE STARTTLS] ready.\r\n")
                    .await
                    .unwrap();
                match lines.next_line().await {
                    Ok(Some(login)) if login.starts_with("ig1 LOGIN ") => break (lines, write),
                    _ => continue,
                }
            };
            write.write_all(ok.as_bytes()).await.unwrap();
            let capability = lines.next_line().await.unwrap().unwrap();
            assert_eq!(capability, "ig2 CAPABILITY");
            write.write_all(capability_answer.as_bytes()).await.unwrap();
            if goes_on {
                // The relay has begun: the client's next command arrives as sent.
                let next = lines.next_line().await.unwrap().unwrap();
                assert_eq!(next, "b NOOP");
                write.write_all(b"b OK NOOP done\r\n").await.unwrap();
            }
        });
        let proxy = Proxy::start(&config(&[("b1", addr)], "")).await;
        let mut c = proxy.connect().await;
        c.line().await.unwrap();
        c.send("a LOGIN alice secret\r\n").await;
        for line in *expected {
            assert_eq!(&c.line().await.unwrap(), line);
        }
        if goes_on {
            c.send("b NOOP\r\n").await;
            assert_eq!(c.line().await.unwrap(), "b OK NOOP done\r\n");
        } else {
            assert_eq!(c.rest().await, "", "the session ends with the backend");
        }
        tokio::time::timeout(DEADLINE, script)
            .await
            .expect("script deadline")
            .expect("the backend saw what it expected");
        proxy.stop().await;
    }
}
