//! A mixed load for soak runs: many kinds of client at once, for a long time, at a steady pace.
//!
//! Workers of five kinds, each in a loop until the time is up, with a pause (`pace`, ±50%)
//! between rounds:
//!
//! - **login**: connect, LOGIN, CAPABILITY / NOOP / ID, LOGOUT, close;
//! - **idle**: log in, SELECT INBOX, IDLE for a while (seeing the mail workers' EXISTS), DONE,
//!   LOGOUT;
//! - **mail**: log in, SELECT INBOX, a few rounds of APPEND (synchronizing literal; every fifth
//!   message over 64 KiB, so the relay's splice path runs too where the backend has `splice: true`, as
//!   in benches/soak.sh), NOOP, FETCH of the newest
//!   message, then STORE \Deleted + EXPUNGE so the mailbox stays small, LOGOUT;
//! - **abrupt**: connections dropped mid-way, in turn: in the middle of a LOGIN line; during an
//!   APPEND literal (with a RST); with a FETCH answer in flight; in IDLE without DONE;
//! - **wrong**: LOGIN with a wrong password (expects NO, however late it comes), LOGOUT.
//!
//! Users are `USER0` … `USER{users-1}`, password `password` (wrong: `password` + `-wrong`);
//! mail worker `i` alone appends as `USERi`, idle worker `i` watches the same mailbox.
//! Anything not as expected (an error, a timeout, a NO to a right password, an OK to a wrong
//! one) is counted under `unexpected`, with the first few reasons.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::scenarios::{Conn, Report};

pub struct Options {
    pub target: SocketAddr,
    pub seconds: f64,
    pub user: String,
    pub users: usize,
    pub password: String,
    pub login_workers: usize,
    pub idle_workers: usize,
    pub mail_workers: usize,
    pub abrupt_workers: usize,
    pub wrong_workers: usize,
    /// Pause between a worker's rounds (±50%).
    pub pace: Duration,
    /// Longest an IDLE lasts (each one is 1 s to this, at random).
    pub idle_max: Duration,
    /// Longest one round may take before it counts as unexpected.
    pub timeout: Duration,
}

#[derive(Default)]
struct Counters {
    logins: AtomicU64,
    idles: AtomicU64,
    appends: AtomicU64,
    appended_octets: AtomicU64,
    fetches: AtomicU64,
    fetched_octets: AtomicU64,
    expunges: AtomicU64,
    abrupt: [AtomicU64; 4],
    wrong_rejected: AtomicU64,
    unexpected: AtomicU64,
    reasons: Mutex<Vec<String>>,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn unexpected(&self, kind: &str, why: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut reasons = self.reasons.lock().unwrap();
        if reasons.len() < 20 {
            reasons.push(format!("{kind}: {why}"));
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Login,
    Idle,
    Mail,
    Abrupt,
    Wrong,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::Idle => "idle",
            Kind::Mail => "mail",
            Kind::Abrupt => "abrupt",
            Kind::Wrong => "wrong",
        }
    }
}

/// xorshift64*: enough randomness for pauses and choices, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `d` × a factor in [0.5, 1.5).
    fn around(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + (self.next() % 1000) as f64 / 1000.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A message of about `size` octets.
fn message(size: usize, n: u64) -> String {
    let mut m = format!(
        "From: soak@example.net\r\nTo: soak@example.net\r\nSubject: soak {n}\r\nMessage-ID: <soak-{n}@example.net>\r\n\r\n"
    );
    while m.len() + 2 < size {
        m.push_str("a line of the soak test message body, seventy-two octets with CRLF ..\r\n");
    }
    m
}

struct Worker {
    opts: Arc<Options>,
    counters: Arc<Counters>,
    kind: Kind,
    /// Index among the workers of its kind.
    index: usize,
    rng: Rng,
    round: u64,
}

impl Worker {
    fn user(&self) -> String {
        let users = self.opts.users.max(1);
        let n = match self.kind {
            // Mail worker i appends as user i; idle and abrupt workers look at those mailboxes.
            Kind::Mail | Kind::Idle | Kind::Abrupt => self.index % self.opts.mail_workers.max(1),
            _ => self.index,
        };
        format!("{}{}", self.opts.user, n % users)
    }

    async fn run(mut self, until: Instant) {
        while Instant::now() < until {
            let result = tokio::time::timeout(self.opts.timeout, self.round(until)).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.counters.unexpected(self.kind.name(), e.to_string()),
                Err(_) => self
                    .counters
                    .unexpected(self.kind.name(), "round timed out".to_string()),
            }
            self.round += 1;
            let pause = self.rng.around(self.opts.pace);
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
    }

    async fn login(&self) -> std::io::Result<Conn> {
        let mut c = Conn::open(self.opts.target, None, None).await?;
        c.login(&self.user(), &self.opts.password).await?;
        Counters::add(&self.counters.logins, 1);
        Ok(c)
    }

    async fn round(&mut self, until: Instant) -> std::io::Result<()> {
        match self.kind {
            Kind::Login => self.login_round().await,
            Kind::Idle => self.idle_round(until).await,
            Kind::Mail => self.mail_round().await,
            Kind::Abrupt => self.abrupt_round().await,
            Kind::Wrong => self.wrong_round().await,
        }
    }

    async fn login_round(&mut self) -> std::io::Result<()> {
        let mut c = self.login().await?;
        let command = match self.rng.below(3) {
            0 => "c CAPABILITY\r\n",
            1 => "c NOOP\r\n",
            _ => "c ID (\"name\" \"imapgate-load soak\")\r\n",
        };
        c.send(command).await?;
        c.until_ok("c").await?;
        logout(c).await
    }

    /// IDLE ends at `until` at the latest, so the load stops when it should.
    async fn idle_round(&mut self, until: Instant) -> std::io::Result<()> {
        let mut c = self.login().await?;
        c.send("s SELECT INBOX\r\n").await?;
        c.until_ok("s").await?;
        c.send("i IDLE\r\n").await?;
        c.next_line().await?;
        if !c.line.starts_with(b"+") {
            return Err(std::io::Error::other(format!(
                "IDLE: {}",
                String::from_utf8_lossy(&c.line).trim_end()
            )));
        }
        let max = self.opts.idle_max.as_millis().max(1000) as u64;
        let hold = Duration::from_millis(1000 + self.rng.below(max - 999))
            .min(until.saturating_duration_since(Instant::now()));
        // Untagged EXISTS / EXPUNGE lines may come meanwhile; they are read at DONE.
        tokio::time::sleep(hold).await;
        c.send("DONE\r\n").await?;
        c.until_ok("i").await?;
        Counters::add(&self.counters.idles, 1);
        logout(c).await
    }

    async fn mail_round(&mut self) -> std::io::Result<()> {
        let mut c = self.login().await?;
        c.send("s SELECT INBOX\r\n").await?;
        c.until_ok("s").await?;
        for k in 0..4u64 {
            let n = self.round * 4 + k;
            let size = if n % 5 == 4 { 100_000 } else { 2_000 };
            let m = message(size, n);
            c.send(&format!("a APPEND INBOX {{{}}}\r\n", m.len()))
                .await?;
            c.next_line().await?;
            if !c.line.starts_with(b"+") {
                return Err(std::io::Error::other(format!(
                    "APPEND: {}",
                    String::from_utf8_lossy(&c.line).trim_end()
                )));
            }
            c.send(&m).await?;
            c.send("\r\n").await?;
            c.until_ok("a").await?;
            Counters::add(&self.counters.appends, 1);
            Counters::add(&self.counters.appended_octets, m.len() as u64);
            c.send("n NOOP\r\n").await?;
            c.until_ok("n").await?;
            c.send("f FETCH * (FLAGS BODY.PEEK[])\r\n").await?;
            let octets = c.until_ok("f").await?;
            Counters::add(&self.counters.fetches, 1);
            Counters::add(&self.counters.fetched_octets, octets);
        }
        c.send("d STORE 1:* +FLAGS.SILENT (\\Deleted)\r\n").await?;
        c.until_ok("d").await?;
        c.send("e EXPUNGE\r\n").await?;
        c.until_ok("e").await?;
        Counters::add(&self.counters.expunges, 1);
        logout(c).await
    }

    async fn abrupt_round(&mut self) -> std::io::Result<()> {
        let way = (self.round % 4) as usize;
        match way {
            // In the middle of a LOGIN line: pre-login, no line end yet.
            0 => {
                let mut c = Conn::open(self.opts.target, None, None).await?;
                c.send(&format!("l LOGIN {} ", self.user())).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // During an APPEND literal, with a RST.
            1 => {
                let mut c = self.login().await?;
                c.send("s SELECT INBOX\r\n").await?;
                c.until_ok("s").await?;
                c.send("a APPEND INBOX {200000}\r\n").await?;
                c.next_line().await?;
                let part = message(50_000, self.round);
                c.send(&part).await?;
                if let Some(tcp) = c.write.tcp() {
                    socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO))?;
                }
            }
            // With a FETCH answer in flight.
            2 => {
                let mut c = self.login().await?;
                c.send("s SELECT INBOX\r\n").await?;
                c.until_ok("s").await?;
                c.send("f FETCH 1:* (FLAGS BODY.PEEK[])\r\nn NOOP\r\n")
                    .await?;
                c.write.flush().await?;
            }
            // In IDLE, without DONE.
            _ => {
                let mut c = self.login().await?;
                c.send("s SELECT INBOX\r\n").await?;
                c.until_ok("s").await?;
                c.send("i IDLE\r\n").await?;
                c.next_line().await?;
            }
        }
        // The connection is dropped here, without LOGOUT.
        Counters::add(&self.counters.abrupt[way], 1);
        Ok(())
    }

    async fn wrong_round(&mut self) -> std::io::Result<()> {
        let mut c = Conn::open(self.opts.target, None, None).await?;
        c.send(&format!(
            "l LOGIN {} {}-wrong\r\n",
            self.user(),
            self.opts.password
        ))
        .await?;
        let (ok, _) = c.until_tagged("l").await?;
        if ok || !c.line.starts_with(b"l NO") {
            return Err(std::io::Error::other(format!(
                "wrong password answered {}",
                String::from_utf8_lossy(&c.line).trim_end()
            )));
        }
        Counters::add(&self.counters.wrong_rejected, 1);
        logout(c).await
    }
}

async fn logout(mut c: Conn) -> std::io::Result<()> {
    c.send("o LOGOUT\r\n").await?;
    c.until_ok("o").await?;
    Ok(())
}

pub async fn soak(opts: Options) -> Report {
    let opts = Arc::new(opts);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(opts.seconds);
    let kinds = [
        (Kind::Login, opts.login_workers),
        (Kind::Idle, opts.idle_workers),
        (Kind::Mail, opts.mail_workers),
        (Kind::Abrupt, opts.abrupt_workers),
        (Kind::Wrong, opts.wrong_workers),
    ];
    let mut handles = Vec::new();
    let mut seed = 1u64;
    for (kind, n) in kinds {
        for index in 0..n {
            seed += 1;
            let worker = Worker {
                opts: opts.clone(),
                counters: counters.clone(),
                kind,
                index,
                rng: Rng::new(seed),
                round: 0,
            };
            handles.push(tokio::spawn(worker.run(until)));
        }
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = &counters;
    let abrupt: Vec<u64> = c.abrupt.iter().map(get).collect();
    let expected = get(&c.logins)
        + get(&c.idles)
        + get(&c.appends)
        + get(&c.fetches)
        + abrupt.iter().sum::<u64>()
        + get(&c.wrong_rejected);
    let unexpected = get(&c.unexpected);
    let reasons = c.reasons.lock().unwrap().clone();
    let workers = kinds.iter().map(|(_, n)| n).sum::<usize>();
    Report {
        json: json!({"scenario": "soak", "seconds": elapsed, "workers": workers,
            "logins": get(&c.logins), "idles": get(&c.idles), "appends": get(&c.appends),
            "appended_octets": get(&c.appended_octets), "fetches": get(&c.fetches),
            "fetched_octets": get(&c.fetched_octets), "expunges": get(&c.expunges),
            "abrupt": {"mid_login": abrupt[0], "mid_append": abrupt[1],
                "fetch_in_flight": abrupt[2], "in_idle": abrupt[3]},
            "wrong_rejected": get(&c.wrong_rejected), "operations": expected,
            "unexpected": unexpected, "reasons": reasons}),
        summary: format!(
            "soak: {elapsed:.0} s, {workers} workers: {} logins, {} IDLEs, {} APPENDs, {} FETCHes, {} EXPUNGE rounds, {} abrupt disconnects, {} wrong passwords refused; {unexpected} unexpected {reasons:?}",
            get(&c.logins),
            get(&c.idles),
            get(&c.appends),
            get(&c.fetches),
            get(&c.expunges),
            abrupt.iter().sum::<u64>(),
            get(&c.wrong_rejected),
        ),
    }
}
