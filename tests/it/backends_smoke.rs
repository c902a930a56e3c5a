//! The Cyrus and Courier test backends come up: LOGIN (and AUTHENTICATE PLAIN) work directly,
//! every test user can log in, and the `Backend-<name>` mailbox is there.

use std::time::Instant;

use crate::support::backends::Client;
use crate::support::courier::{self, Courier};
use crate::support::cyrus::{self, Cyrus};
use crate::support::dovecot::USERS;
use crate::support::{Raw, backends};

/// LOGIN and AUTHENTICATE PLAIN for alice, straight to the server; returns the tagged answers.
fn plain_logins(address: &str) -> (String, String) {
    let mut c = Client::connect(address).expect("connect");
    let login = c.command("LOGIN alice \"alice-secret\"").expect("LOGIN").1;
    c.logout();
    let mut c = Client::connect(address).expect("connect");
    // base64("\0alice\0alice-secret")
    let plain = c
        .command("AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==")
        .expect("AUTHENTICATE")
        .1;
    c.logout();
    (login, plain)
}

fn every_user_logs_in(address: &str) {
    let long = crate::support::dovecot::long_password();
    for (user, password) in USERS.iter().copied().chain([("longpw", long.as_str())]) {
        backends::mailboxes(address, user, password).unwrap_or_else(|e| panic!("{user}: {e}"));
    }
}

#[tokio::test]
async fn cyrus_serves_alice() {
    if !cyrus::available() {
        return;
    }
    let started = Instant::now();
    let server = Cyrus::start("smoke");
    eprintln!(
        "Cyrus started in {:?}: {}",
        started.elapsed(),
        server.greeting
    );

    let mut raw = Raw::connect(server.address().parse().unwrap()).await;
    raw.login("alice", "alice-secret").await;
    assert_eq!(raw.backend().await, "smoke");

    let (login, plain) = plain_logins(&server.address());
    assert!(login.contains(" OK "), "{login}");
    assert!(plain.contains(" OK "), "{plain}");
    every_user_logs_in(&server.address());
    let mut names = server.mailboxes("alice");
    names.sort();
    assert_eq!(names, ["Backend-smoke", "INBOX"]);
}

#[tokio::test]
async fn courier_serves_alice() {
    if !courier::available() {
        return;
    }
    let started = Instant::now();
    let server = Courier::start("smoke");
    eprintln!(
        "Courier started in {:?}: {}",
        started.elapsed(),
        server.greeting
    );
    assert!(!server.greeting.contains("LITERAL+"), "{}", server.greeting);

    let mut raw = Raw::connect(server.address().parse().unwrap()).await;
    raw.login("alice", "alice-secret").await;
    raw.send("s1 LIST \"\" \"*\"\r\n").await;
    let (untagged, answer) = raw.until_tagged("s1").await;
    assert!(answer.starts_with("s1 OK"), "{answer}");
    assert!(
        untagged
            .iter()
            .any(|l| l.contains("\"INBOX.Backend-smoke\"")),
        "{untagged:?}"
    );
    raw.send("s2 CAPABILITY\r\n").await;
    let (untagged, _) = raw.until_tagged("s2").await;
    assert!(!untagged.concat().contains("LITERAL+"), "{untagged:?}");

    let (login, plain) = plain_logins(&server.address());
    assert!(login.contains(" OK "), "{login}");
    assert!(plain.contains(" OK "), "{plain}");
    every_user_logs_in(&server.address());
    let mut names = server.mailboxes("alice");
    names.sort();
    assert_eq!(names, ["INBOX", "INBOX.Backend-smoke"]);
}
