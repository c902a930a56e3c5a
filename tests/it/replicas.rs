//! Replicas behave as one. Two configuration files that differ only in the order of their
//! backends route every user alike (rendezvous hashing scores backend names, never positions):
//! each replica's own `route --stdin` answers for the same 100,000 users; and two running
//! imapgate processes send the same user to the same real Dovecot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::dovecot::{self, Dovecot, USERS};
use crate::support::{DEADLINE, LogLines, Raw};

const USER_COUNT: usize = 100_000;

/// One configuration, its backends (name, address, weight) in the given order.
fn write_config(path: &Path, backends: &[(&str, String, u32)], listen: u16, admin: u16) -> PathBuf {
    let mut yaml = format!(
        "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{listen}\" }}\n\
         admin: {{ bind: \"127.0.0.1:{admin}\" }}\n\
         routing:\n  normalize: {{ lowercase: true, default_domain: example.net }}\n  failover: true\n\
         timeouts: {{ shutdown_grace: 500ms }}\n\
         backends:\n"
    );
    for (name, address, weight) in backends {
        yaml.push_str(&format!(
            "  - {{ name: {name}, address: \"{address}\", weight: {weight} }}\n"
        ));
    }
    std::fs::write(path, yaml).unwrap();
    path.to_path_buf()
}

/// The same backends, listed in another order (reversed).
fn reordered<'a>(backends: &[(&'a str, String, u32)]) -> Vec<(&'a str, String, u32)> {
    let mut other = backends.to_vec();
    other.reverse();
    assert_ne!(
        other.iter().map(|b| b.0).collect::<Vec<_>>(),
        backends.iter().map(|b| b.0).collect::<Vec<_>>()
    );
    other
}

/// Login names as clients send them: plain, with a domain, in other cases (normalised alike).
fn users() -> String {
    let mut out = String::with_capacity(USER_COUNT * 24);
    for i in 0..USER_COUNT {
        let line = match i % 4 {
            0 => format!("user{i}"),
            1 => format!("user{i}@example.net"),
            2 => format!("User{i}@Example.NET"),
            _ => format!("mailbox.{i}@other.example"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `imapgate route --stdin` on `config` for `input`: its output, one line per user.
fn route_all(config: &Path, input: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["route", "--stdin", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn two_replicas_route_100000_users_alike() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        ("mail1", "mail1.internal:143".to_string(), 100),
        ("mail2", "mail2.internal:143".to_string(), 100),
        ("mail3", "mail3.internal:143".to_string(), 50),
    ];
    let a = write_config(&dir.path().join("a.yaml"), &backends, 1143, 9143);
    let b = write_config(
        &dir.path().join("b.yaml"),
        &reordered(&backends),
        1143,
        9143,
    );
    let input = users();

    let (from_a, from_b) = std::thread::scope(|s| {
        let a = s.spawn(|| route_all(&a, &input));
        let b = s.spawn(|| route_all(&b, &input));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(from_a.lines().count(), USER_COUNT);
    if from_a != from_b {
        let (n, (x, y)) = from_a
            .lines()
            .zip(from_b.lines())
            .enumerate()
            .find(|(_, (x, y))| x != y)
            .unwrap();
        panic!("the replicas disagree on line {n}: {x:?} and {y:?}");
    }

    // Not agreement by accident: the users spread over every backend by weight
    // (100:100:50 is 40%, 40%, 20%), and the line is what the library says.
    let config = imapgate::config::load(&a).unwrap();
    let mut first = std::collections::BTreeMap::new();
    for (n, line) in from_a.lines().enumerate() {
        let (user, order) = line.split_once('\t').unwrap();
        let order: Vec<&str> = order.split(',').collect();
        assert_eq!(order.len(), 3, "failover: the whole order: {line}");
        *first.entry(order[0]).or_insert(0usize) += 1;
        if n % 97 == 0 {
            let expected: Vec<&str> = imapgate::backends_for(&config, user)
                .into_iter()
                .map(|i| &*config.backends[i].name)
                .collect();
            assert_eq!(order, expected, "{user}");
        }
    }
    for (name, share) in [("mail1", 0.4), ("mail2", 0.4), ("mail3", 0.2)] {
        let got = first[name] as f64 / USER_COUNT as f64;
        assert!((got - share).abs() < 0.01, "{name}: {got} of the users");
    }
    // Normalisation: the same mailbox in another case goes to the same place.
    let lines: Vec<&str> = from_a.lines().collect();
    let order_of = |line: &str| line.trim_end().split_once('\t').unwrap().1.to_string();
    assert_eq!(
        order_of(lines[1]),
        order_of(&route_all(&a, "USER1@EXAMPLE.NET\n"))
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn logins_through_two_replicas_land_on_the_same_dovecot() {
    if !dovecot::available() {
        return;
    }
    let dovecots = [
        Dovecot::start("b1"),
        Dovecot::start("b2"),
        Dovecot::start("b3"),
    ];
    let backends: Vec<(&str, String, u32)> = ["b1", "b2", "b3"]
        .into_iter()
        .zip(&dovecots)
        .map(|(name, d)| (name, d.address(), 100))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for (file, list) in [
        ("a.yaml", backends.clone()),
        ("b.yaml", reordered(&backends)),
    ] {
        let port = free_port();
        let config = write_config(&dir.path().join(file), &list, port, free_port());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(["run", "--threads", "1", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut logs = LogLines::new(child.stderr.take().unwrap());
        logs.wait_for("listening").await;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        replicas.push((child, logs, addr, config));
    }

    let mut landed = std::collections::BTreeSet::new();
    for (user, password) in &USERS[..5] {
        let mut on = Vec::new();
        for (_, _, addr, _) in &replicas {
            let mut c = Raw::connect(*addr).await;
            c.login(user, password).await;
            on.push(c.backend().await);
        }
        assert_eq!(on[0], on[1], "{user} through either replica");
        // And where `route` says.
        let routed = route_all(&replicas[0].3, &format!("{user}\n"));
        let first = routed.trim_end().split('\t').nth(1).unwrap();
        assert_eq!(first.split(',').next().unwrap(), on[0], "{user}");
        landed.insert(on[0].clone());
    }
    assert!(landed.len() >= 2, "the users spread: {landed:?}");

    for (mut child, logs, _, _) in replicas {
        let pid = child.id().unwrap() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}: {}", logs.rest().await);
    }
}
