//! Faults on a real network (issue 15 item 4): a Dovecot (`far`) in its own network namespace
//! behind a veth pair (`support::netns`), a healthy Dovecot (`near`) on loopback, and the real
//! imapgate binary in between, so that its descriptors (`/proc/PID/fd`) and memory are its own.
//! Packets to `far` are dropped (all of them, or those carrying the credentials), delayed or
//! answered by a reset, and a client vanishes mid-APPEND. In every case a session on `near`
//! goes on untouched, the faulty session leaves nothing behind (`/sessions`,
//! `imapgate_sessions_active`, the descriptors), and a client never gets a partial response
//! followed by anything else.
//!
//! `alice` is routed to `far`, `bob` to `near` (`routing.static`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

use crate::support::dovecot::{self, Dovecot, Options};
use crate::support::netns::{self, Netns};
use crate::support::{DEADLINE, Raw, free_port, http, http_get, sample};

/// The timeouts every test's imapgate runs with: short, so that a fault costs little.
const CONNECT: Duration = Duration::from_secs(1);
const GREETING: Duration = Duration::from_secs(1);
const LOGIN: Duration = Duration::from_secs(2);
/// `timeouts.keepalive`: an unreachable backend is given up after this.
const KEEPALIVE: Duration = Duration::from_secs(6);
/// Health checks once at start only: a fault meets the logins, not the checks first.
const QUIET: &str = "{ interval: 60s }";
/// Room for a loaded CI machine on top of a configured timeout.
const SLACK: Duration = Duration::from_secs(3);

/// The two backends; `far` in `ns`. Field order is drop order: Dovecot leaves the namespace
/// before the namespace is deleted.
struct Backends {
    far: Dovecot,
    near: Dovecot,
    ns: Netns,
}

fn backends() -> Option<Backends> {
    if !dovecot::available() || !netns::available() {
        return None;
    }
    let ns = Netns::new();
    let far = Dovecot::start_with(
        "far",
        Options {
            netns: Some((ns.name.clone(), ns.addr)),
            ..Options::default()
        },
    );
    Some(Backends {
        far,
        near: Dovecot::start("near"),
        ns,
    })
}

/// The imapgate binary with its own config, log file and admin address; killed on drop.
struct Gate {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gate {
    /// `health` is the config's `health:` value. `far`, where the faults happen, splices long
    /// literals (`splice: true`), so the faults mid-FETCH meet the splice path; `near` copies.
    async fn start(b: &Backends, failover: bool, health: &str) -> Gate {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (port, admin_port) = (free_port(), free_port());
            let yaml = format!(
                "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\n\
                 admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\n\
                 backends:\n  - {{ name: far, address: \"{}\", splice: true }}\n  - {{ name: near, address: \"{}\" }}\n\
                 routing: {{ failover: {failover}, static: {{ alice: far, bob: near }} }}\n\
                 timeouts: {{ backend_connect: {}ms, backend_greeting: {}ms, backend_login: {}ms, keepalive: {}ms, shutdown_grace: 500ms }}\n\
                 health: {health}\n",
                b.far.address(),
                b.near.address(),
                CONNECT.as_millis(),
                GREETING.as_millis(),
                LOGIN.as_millis(),
                KEEPALIVE.as_millis(),
            );
            let config = dir.path().join("imapgate.yaml");
            std::fs::write(&config, yaml).unwrap();
            let log = std::fs::File::create(dir.path().join("log")).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
                .args(["run", "--threads", "1", "--config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut gate = Gate {
                pid: child.id().unwrap(),
                child,
                addr: format!("127.0.0.1:{port}").parse().unwrap(),
                admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
                dir,
            };
            if gate.ready().await {
                gate.checked().await;
                return gate;
            }
            // Lost a port to another test: again with others.
        }
        panic!("imapgate did not start in 5 tries");
    }

    /// Waits for the `listening` log line; false if the process exited first.
    async fn ready(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.log().contains("listening") {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "imapgate never listened:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the first health check of each backend is done (its connection closed), so
    /// that descriptors counted from now on are the sessions'.
    async fn checked(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (_, body) = http_get(self.admin, "/backends").await;
            let backends: serde_json::Value = serde_json::from_str(&body).unwrap();
            if backends
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["health"] == "up")
            {
                return;
            }
            assert!(Instant::now() < deadline, "backends never up: {backends}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The descriptors to come back to: the fewest of a few counts over a second (a health
    /// check may hold one for a moment).
    async fn baseline(&self) -> (usize, usize) {
        let mut least = self.fds();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.fds();
            least = (least.0.min(now.0), least.1.min(now.1));
        }
        least
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    async fn connect(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// A client whose receive buffer is small and fixed (no autotuning): when it stops
    /// reading, imapgate soon cannot write to it.
    async fn connect_small(&self) -> Raw {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let stream = tokio::time::timeout(DEADLINE, socket.connect(self.addr))
            .await
            .expect("connect deadline")
            .expect("connect");
        Raw::new(stream)
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn sessions(&self, user: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(self.admin, &format!("/sessions?user={user}")).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// The process's open descriptors: (everything but pipes, pipes). Idle pipes for spliced
    /// literals are pooled per worker (at most 64), so they are counted apart.
    fn fds(&self) -> (usize, usize) {
        let (mut other, mut pipes) = (0, 0);
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid)).unwrap() {
            match std::fs::read_link(entry.unwrap().path()) {
                Ok(target) if target.to_string_lossy().starts_with("pipe:") => pipes += 1,
                Ok(_) => other += 1,
                Err(_) => {} // closed meanwhile
            }
        }
        (other, pipes)
    }

    /// Resident memory, from /proc/PID/status.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Waits until `user` has no session left, `imapgate_sessions_active` adds up to `others`
    /// (the sessions that should still be there), the descriptors are back to `baseline`
    /// (pipes: at most two pairs more, which the pool may keep), and resident memory grew by
    /// less than 16 MiB over `rss_before`: the faulty session left nothing behind. Returns how
    /// long that took.
    async fn settled(
        &self,
        user: &str,
        others: usize,
        baseline: (usize, usize),
        rss_before: u64,
    ) -> Duration {
        let started = Instant::now();
        let deadline = started + DEADLINE;
        loop {
            let sessions = self.sessions(user).await;
            let metrics = self.metrics().await;
            let active: f64 = ["far", "near"]
                .iter()
                .map(|b| {
                    sample(
                        &metrics,
                        "imapgate_sessions_active",
                        &format!("backend=\"{b}\""),
                    )
                    .unwrap()
                })
                .sum();
            let fds = self.fds();
            if sessions.is_empty()
                && active == others as f64
                && fds.0 == baseline.0
                && fds.1 <= baseline.1 + 4
            {
                let rss = self.rss_kib();
                assert!(
                    rss < rss_before + 16 * 1024,
                    "resident memory grew from {rss_before} KiB to {rss} KiB"
                );
                return started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the session was not freed: sessions {sessions:?}, sessions_active {active} (want \
                 {others}), descriptors {fds:?} (baseline {baseline:?})\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("imapgate stops")
            .unwrap();
        assert!(status.success(), "{status}\n{}", self.log());
    }
}

/// Bob's session on `near`: logged in, then checked (NOOP and a LIST) whenever a test wants
/// to show that a fault elsewhere did not touch it.
async fn healthy(gate: &Gate) -> Raw {
    let mut c = gate.connect().await;
    c.login("bob", "bob-secret").await;
    check_healthy(&mut c, "h0").await;
    c
}

async fn check_healthy(c: &mut Raw, tag: &str) {
    c.send(format!("{tag} NOOP\r\n")).await;
    let (_, answer) = c.until_tagged(tag).await;
    assert!(answer.starts_with(&format!("{tag} OK")), "{answer}");
    assert_eq!(
        c.backend().await,
        "near",
        "the healthy session stays on near"
    );
}

/// A message of `size` octets: printable lines holding IMAP-looking text.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut x: u32 = 4242;
    while m.len() < size {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        m.extend_from_slice(
            format!(
                "{x:08x} a1 OK {{5}} * BYE {}\r\n",
                "y".repeat((x % 50) as usize)
            )
            .as_bytes(),
        );
    }
    m.truncate(size - 2);
    m.extend_from_slice(b"\r\n");
    m
}

/// Stores `message` in alice's INBOX on `far`, directly (not through imapgate).
async fn append_on_far(b: &Backends, message: &[u8]) {
    let mut c = Raw::connect(b.far.address().parse().unwrap()).await;
    c.login("alice", "alice-secret").await;
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send(message).await;
    c.send("\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a OK"), "{answer}");
    c.send("z LOGOUT\r\n").await;
}

/// How many messages alice's INBOX on `far` holds, asked directly.
async fn far_messages(b: &Backends) -> usize {
    let mut c = Raw::connect(b.far.address().parse().unwrap()).await;
    c.login("alice", "alice-secret").await;
    c.send("s STATUS INBOX (MESSAGES)\r\n").await;
    let (untagged, answer) = c.until_tagged("s").await;
    assert!(answer.starts_with("s OK"), "{answer}");
    let line = untagged.iter().find(|l| l.starts_with("* STATUS")).unwrap();
    line.trim_end()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads whatever comes until the stream ends (`true`) or nothing came for `quiet` (`false`).
async fn read_until_quiet(stream: &mut TcpStream, into: &mut Vec<u8>, quiet: Duration) -> bool {
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => into.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads `n` more octets into `into`.
async fn read_exactly(stream: &mut TcpStream, into: &mut Vec<u8>, n: usize) {
    let mut chunk = vec![0u8; 1 << 16];
    let want = into.len() + n;
    while into.len() < want {
        let room = (want - into.len()).min(chunk.len());
        let got = tokio::time::timeout(DEADLINE, stream.read(&mut chunk[..room]))
            .await
            .expect("read deadline")
            .expect("read");
        assert!(got > 0, "the stream ended after {} octets", into.len());
        into.extend_from_slice(&chunk[..got]);
    }
}

/// Alice logged in through `gate` (on `far`), INBOX selected, `FETCH 1 BODY.PEEK[]` sent and
/// its first `first` body octets read; returns the client and what it got so far (the FETCH
/// line's literal header stripped, checked against `message`).
async fn fetch_started(gate: &Gate, message: &[u8], first: usize) -> (Raw, Vec<u8>) {
    let mut c = gate.connect_small().await;
    c.login("alice", "alice-secret").await;
    c.send("s SELECT INBOX\r\n").await;
    assert!(c.until_tagged("s").await.1.starts_with("s OK"));
    c.send("f FETCH 1 BODY.PEEK[]\r\n").await;
    let header = c.line().await.unwrap();
    assert!(
        header.starts_with("* 1 FETCH") && header.ends_with(&format!("{{{}}}\r\n", message.len())),
        "{header:?}"
    );
    let mut body = c.take_buffered();
    if body.len() < first {
        let more = first - body.len();
        read_exactly(&mut c.stream, &mut body, more).await;
    }
    assert!(body[..] == message[..body.len()], "the body so far");
    (c, body)
}

/// What a cut-off client got must be the response's body so far and nothing else: a prefix
/// of the literal (never all of it, never anything after it).
fn assert_cut_mid_literal(got: &[u8], message: &[u8]) {
    assert!(
        got.len() < message.len(),
        "the whole literal arrived ({} octets): the fault came too late to test a cut",
        got.len()
    );
    let differs = got.iter().zip(message).position(|(a, b)| a != b);
    assert_eq!(
        differs,
        None,
        "the client got other octets than the response's after {:?} of {} octets",
        differs,
        got.len()
    );
}

/// 100 % packet loss to the user's backend while a login dials it: with failover the login
/// goes on to the next backend after `backend_connect`; without, it fails with
/// `NO [UNAVAILABLE]` after the same time. The session on `near` is untouched, and nothing is
/// left of the lost attempts.
#[tokio::test]
async fn blackholed_backend_at_login_fails_over_within_the_connect_timeout() {
    let Some(b) = backends() else { return };
    let gate = Gate::start(&b, true, QUIET).await;
    let no_failover = Gate::start(&b, false, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();

    b.ns.blackhole();
    let started = Instant::now();
    let mut c = gate.connect().await;
    c.login("alice", "alice-secret").await;
    let elapsed = started.elapsed();
    assert_eq!(
        c.backend().await,
        "near",
        "failed over to the healthy backend"
    );
    assert!(
        elapsed >= CONNECT && elapsed < CONNECT + SLACK,
        "the login waited one connect timeout ({CONNECT:?}): {elapsed:?}"
    );
    check_healthy(&mut bob, "h1").await;

    let started = Instant::now();
    let mut c2 = no_failover.connect().await;
    c2.line().await.unwrap();
    c2.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c2.until_tagged("a").await;
    let elapsed = started.elapsed();
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    assert!(
        elapsed >= CONNECT && elapsed < CONNECT + SLACK,
        "without failover the login fails after the connect timeout: {elapsed:?}"
    );

    let metrics = gate.metrics().await;
    assert_eq!(sample(&metrics, "imapgate_failovers_total", ""), Some(1.0));
    assert_eq!(
        sample(
            &metrics,
            "imapgate_backend_login_attempts_total",
            "backend=\"far\",result=\"unavailable\""
        ),
        Some(1.0)
    );
    // Alice's session is on near now; once it ends, all is as before.
    c.send("z LOGOUT\r\n").await;
    c.rest().await;
    gate.settled("alice", 1, baseline, rss).await;
    check_healthy(&mut bob, "h2").await;
    no_failover.stop().await;
    gate.stop().await;
}

/// The connection to the user's backend is made but its greeting never arrives (every
/// segment carrying it is lost): the login goes on to the next backend after
/// `backend_greeting`, and the half-open attempt is freed.
#[tokio::test]
async fn lost_greeting_fails_over_within_the_greeting_timeout() {
    let Some(b) = backends() else { return };
    let gate = Gate::start(&b, true, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();

    b.ns.drop_outgoing("* OK");
    let started = Instant::now();
    let mut c = gate.connect().await;
    c.login("alice", "alice-secret").await;
    let elapsed = started.elapsed();
    assert_eq!(
        c.backend().await,
        "near",
        "failed over to the healthy backend"
    );
    assert!(
        elapsed >= GREETING && elapsed < CONNECT + GREETING + SLACK,
        "the login waited one greeting timeout ({GREETING:?}): {elapsed:?}"
    );
    check_healthy(&mut bob, "h1").await;
    let metrics = gate.metrics().await;
    assert_eq!(sample(&metrics, "imapgate_failovers_total", ""), Some(1.0));
    c.send("z LOGOUT\r\n").await;
    c.rest().await;
    gate.settled("alice", 1, baseline, rss).await;
    check_healthy(&mut bob, "h2").await;
    gate.stop().await;
}

/// The link dies just as the credentials go out (the segment carrying the password and every
/// later one are lost): the login fails with `NO [UNAVAILABLE]` after `backend_login`, the
/// credentials are not replayed to `near` (failover is on), and the dead attempt is freed.
#[tokio::test]
async fn credentials_lost_on_the_way_fail_the_login_within_the_login_timeout() {
    let Some(b) = backends() else { return };
    let gate = Gate::start(&b, true, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();

    b.ns.drop_incoming("alice-secret");
    let started = Instant::now();
    let mut c = gate.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    let elapsed = started.elapsed();
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    assert!(
        elapsed >= LOGIN && elapsed < CONNECT + GREETING + LOGIN + SLACK,
        "the login fails after backend_login ({LOGIN:?}): {elapsed:?}"
    );
    check_healthy(&mut bob, "h1").await;
    let metrics = gate.metrics().await;
    assert_eq!(
        sample(&metrics, "imapgate_failovers_total", ""),
        Some(0.0),
        "credentials that left are never replayed elsewhere"
    );
    assert_eq!(
        sample(
            &metrics,
            "imapgate_logins_total",
            "mechanism=\"login\",result=\"unavailable\""
        )
        .unwrap_or(0.0)
            + sample(
                &metrics,
                "imapgate_logins_total",
                "mechanism=\"login\",result=\"error\""
            )
            .unwrap_or(0.0),
        1.0,
        "{metrics}"
    );

    // The link comes back: the same connection logs in on far.
    b.ns.heal();
    c.send("b LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("b").await;
    assert!(answer.starts_with("b OK"), "{answer}");
    assert_eq!(c.backend().await, "far");
    c.send("z LOGOUT\r\n").await;
    c.rest().await;
    gate.settled("alice", 1, baseline, rss).await;
    check_healthy(&mut bob, "h2").await;
    gate.stop().await;
}

/// All packets to `far` lost for two seconds in the middle of a 32 MiB FETCH: TCP carries the
/// response on once the link is back, and the client gets it whole and exact; bob's session
/// answers during the outage.
#[tokio::test]
async fn a_short_blackout_mid_fetch_is_survived() {
    let Some(b) = backends() else { return };
    let body = message(32 << 20);
    append_on_far(&b, &body).await;
    let gate = Gate::start(&b, false, QUIET).await;
    let mut bob = healthy(&gate).await;

    let (mut c, mut got) = fetch_started(&gate, &body, 1 << 20).await;
    b.ns.blackhole();
    let outage = Instant::now();
    // The client reads what was on its way, meanwhile bob's session works.
    let ended = read_until_quiet(&mut c.stream, &mut got, Duration::from_millis(500)).await;
    assert!(!ended, "the session survives a blackout");
    assert!(got.len() < body.len(), "the blackout came mid-literal");
    check_healthy(&mut bob, "h1").await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(outage.elapsed())).await;
    b.ns.heal();

    let rest = body.len() - got.len();
    read_exactly(&mut c.stream, &mut got, rest).await;
    assert!(got == body, "the body differs after the blackout");
    let (_, answer) = c.until_tagged("f").await;
    assert!(answer.starts_with("f OK"), "{answer}");
    check_healthy(&mut bob, "h2").await;
    gate.stop().await;
}

/// `far` goes silent for good in the middle of a 32 MiB FETCH. imapgate has nothing to send
/// and no timer after the login, so only an operator ends the session: the kick waits up to
/// 10 s for a response boundary that never comes, then closes the client, which holds a prefix
/// of the literal and nothing else. Then the session is freed. (That the session stays until
/// then is the defect `a_silent_backend_mid_fetch_is_noticed` shows.)
#[tokio::test]
async fn a_permanent_blackout_mid_fetch_ends_with_the_kick_and_frees_the_session() {
    let Some(b) = backends() else { return };
    let body = message(32 << 20);
    append_on_far(&b, &body).await;
    let gate = Gate::start(&b, false, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();

    let (mut c, mut got) = fetch_started(&gate, &body, 1 << 20).await;
    b.ns.blackhole();
    let ended = read_until_quiet(&mut c.stream, &mut got, Duration::from_secs(1)).await;
    assert!(!ended, "nothing ends the session by itself");
    assert_eq!(gate.sessions("alice").await.len(), 1);
    check_healthy(&mut bob, "h1").await;

    let kicked = Instant::now();
    let (status, answer) = http(gate.admin, "POST", "/sessions/kick?user=alice", None).await;
    assert_eq!(status, 200, "{answer}");
    let ended = read_until_quiet(&mut c.stream, &mut got, DEADLINE).await;
    let took = kicked.elapsed();
    assert!(ended, "the kick closes the client");
    assert!(
        took < Duration::from_secs(10) + SLACK,
        "the kick gives up waiting for a boundary after 10 s: {took:?}"
    );
    assert_cut_mid_literal(&got, &body);
    gate.settled("alice", 1, baseline, rss).await;
    check_healthy(&mut bob, "h2").await;
    gate.stop().await;
}

/// A backend that goes silent mid-response (a partition: no FIN, no RST) is given up after
/// `timeouts.keepalive` (keepalive probes and TCP_USER_TIMEOUT on the backend socket): the
/// client gets the octets so far and the close, the session and its descriptors are freed.
#[tokio::test]
async fn a_silent_backend_mid_fetch_is_noticed() {
    let Some(b) = backends() else { return };
    let body = message(32 << 20);
    append_on_far(&b, &body).await;
    let gate = Gate::start(&b, false, QUIET).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();
    let (mut c, mut got) = fetch_started(&gate, &body, 1 << 20).await;
    b.ns.blackhole();
    let silent = Instant::now();
    let ended = read_until_quiet(&mut c.stream, &mut got, KEEPALIVE + SLACK * 2).await;
    assert!(
        ended,
        "{:?} after the backend went silent the session is still open: {:?}",
        silent.elapsed(),
        gate.sessions("alice").await
    );
    assert_cut_mid_literal(&got, &body);
    gate.settled("alice", 0, baseline, rss).await;
    gate.stop().await;
}

/// A logged-in session sitting idle when its backend vanishes (a partition with nothing in
/// flight: only keepalive probes can notice) ends within `timeouts.keepalive`. The probes go
/// unanswered and TCP_USER_TIMEOUT ends the connection on the fourth probe's turn: no probe
/// count is set (stream.rs), so this is the test that the user timeout alone ends it. The
/// session and its descriptors are freed.
#[tokio::test]
async fn an_idle_session_on_a_vanished_backend_ends_within_the_keepalive() {
    let Some(b) = backends() else { return };
    let gate = Gate::start(&b, false, QUIET).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();
    let mut c = gate.connect().await;
    c.login("alice", "alice-secret").await;
    b.ns.blackhole();
    let silent = Instant::now();
    let mut got = Vec::new();
    let ended = read_until_quiet(&mut c.stream, &mut got, KEEPALIVE + SLACK * 2).await;
    let took = silent.elapsed();
    assert!(
        ended,
        "{took:?} after the backend vanished the idle session is still open: {:?}",
        gate.sessions("alice").await
    );
    // The first probe goes out after half the keepalive of silence: an earlier end would be
    // something else failing. The user timeout ends it at KEEPALIVE; by the probe count (the
    // kernel's default of 9, one every KEEPALIVE / 6) it would take twice as long.
    assert!(
        took >= KEEPALIVE / 2 && took < KEEPALIVE + SLACK,
        "ended after {took:?}"
    );
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    gate.settled("alice", 0, baseline, rss).await;
    gate.stop().await;
}

/// 200 ms more on every packet into `far`'s namespace (a round trip 200 ms longer): logins
/// and commands on `far` succeed, slower, within the configured timeouts; its health checks
/// still find it up; bob's session is as fast as before.
#[tokio::test]
async fn latency_of_200ms_slows_but_breaks_nothing() {
    let Some(b) = backends() else { return };
    let body = message(1 << 20);
    append_on_far(&b, &body).await;
    // Checks every 2 s, down at the first failure: they run under the delay too.
    let gate = Gate::start(&b, false, "{ interval: 2s, fall: 1 }").await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();
    let delay = Duration::from_millis(200);
    let _delay = b.ns.delay(delay);

    let started = Instant::now();
    let mut c = gate.connect().await;
    c.login("alice", "alice-secret").await;
    let login = started.elapsed();
    // Connect, greeting (+ CAPABILITY), LOGIN: at least three round trips to far.
    assert!(
        login >= delay * 3 && login < CONNECT + GREETING + LOGIN,
        "login through 200 ms: {login:?}"
    );
    let started = Instant::now();
    c.send("n NOOP\r\n").await;
    assert!(c.until_tagged("n").await.1.starts_with("n OK"));
    let noop = started.elapsed();
    assert!(
        noop >= delay && noop < delay * 5,
        "a NOOP takes one round trip: {noop:?}"
    );
    c.send("s SELECT INBOX\r\nf FETCH 1 BODY.PEEK[]\r\n").await;
    assert!(c.until_tagged("s").await.1.starts_with("s OK"));
    let header = c.line().await.unwrap();
    assert!(
        header.ends_with(&format!("{{{}}}\r\n", body.len())),
        "{header:?}"
    );
    assert!(c.bytes(body.len()).await == body, "the body differs");
    assert!(c.until_tagged("f").await.1.starts_with("f OK"));
    check_healthy(&mut bob, "h1").await;

    let (_, backends) = http_get(gate.admin, "/backends").await;
    let backends: serde_json::Value = serde_json::from_str(&backends).unwrap();
    assert_eq!(backends[0]["name"], "far");
    assert_eq!(backends[0]["health"], "up", "{backends}");
    c.send("z LOGOUT\r\n").await;
    c.rest().await;
    gate.settled("alice", 1, baseline, rss).await;
    gate.stop().await;
}

/// `far` resets the connection (RST) while a 32 MiB literal is half way through imapgate:
/// the client gets the octets so far, then the close, never anything else; the session is
/// freed at once; bob's session goes on.
#[tokio::test]
async fn reset_mid_literal_cuts_the_client_cleanly() {
    let Some(b) = backends() else { return };
    let body = message(32 << 20);
    append_on_far(&b, &body).await;
    let gate = Gate::start(&b, false, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();

    let (mut c, mut got) = fetch_started(&gate, &body, 1 << 20).await;
    // The client reads no more; wait until imapgate is stalled mid-literal too.
    let relayed = stalled(&gate, "alice").await;
    assert!(
        relayed < body.len() as u64,
        "imapgate holds the whole literal already ({relayed}): no cut to test"
    );
    b.ns.reset();
    let reset = Instant::now();
    let ended = read_until_quiet(&mut c.stream, &mut got, DEADLINE).await;
    assert!(ended, "the client is closed");
    assert!(
        reset.elapsed() < SLACK,
        "closed at once: {:?}",
        reset.elapsed()
    );
    assert_cut_mid_literal(&got, &body);
    gate.settled("alice", 1, baseline, rss).await;
    check_healthy(&mut bob, "h1").await;
    let metrics = gate.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_commands_total",
            "command=\"FETCH\",status=\"unfinished\""
        ),
        Some(1.0),
        "the cut FETCH counts as unfinished"
    );
    gate.stop().await;
}

/// Polls `/sessions` until the user's session has relayed no more for 300 ms; returns its
/// `backend_to_client` octets.
async fn stalled(gate: &Gate, user: &str) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        let sessions = gate.sessions(user).await;
        let now = sessions[0]["backend_to_client"].as_u64().unwrap();
        if last == Some(now) {
            return now;
        }
        assert!(Instant::now() < deadline, "the relay never stalled");
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A client vanishes half way through an 8 MiB APPEND, once with a RST (killed, SO_LINGER 0)
/// and once with a FIN (its socket closed): each time imapgate frees the session (no
/// `/sessions` entry, `sessions_active` 0, descriptors back to what they were), the half
/// message is not stored, and bob's session goes on.
#[tokio::test]
async fn a_client_vanishing_mid_append_frees_the_session() {
    let Some(b) = backends() else { return };
    let gate = Gate::start(&b, false, QUIET).await;
    let mut bob = healthy(&gate).await;
    let baseline = gate.baseline().await;
    let rss = gate.rss_kib();
    let before = far_messages(&b).await;
    let body = message(8 << 20);

    for reset in [true, false] {
        let mut c = gate.connect().await;
        c.login("alice", "alice-secret").await;
        c.send(format!("a APPEND INBOX {{{}}}\r\n", body.len()))
            .await;
        assert!(c.line().await.unwrap().starts_with('+'));
        c.send(&body[..body.len() / 2]).await;
        let mut stream = c.stream;
        if reset {
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        } else {
            stream.shutdown().await.unwrap();
        }
        drop(stream);
        let took = gate.settled("alice", 1, baseline, rss).await;
        assert!(took < SLACK, "freed at once: {took:?}");
        check_healthy(&mut bob, if reset { "h1" } else { "h2" }).await;
    }
    assert_eq!(far_messages(&b).await, before, "no half message was stored");
    gate.stop().await;
}
