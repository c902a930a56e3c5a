//! A pipelining client against Courier and Dovecot, direct and through imapgate with and without
//! `quickack`, side by side in one run: commands answered per second with 1 and 10 commands in
//! flight. Courier writes a FETCH answer in two pieces with Nagle on, so the second waits for
//! the first's ACK; a peer with delayed ACKs makes every answer wait ~40 ms.
//!
//! `cargo bench --bench pipelining` (needs Dovecot and the unpacked Courier: see the README's
//! test section; HAProxy for its column). imapgate runs as its own process (the release
//! binary, one worker thread), as HAProxy does. Prints a Markdown table for BENCHMARKS.md.

// The integration tests' helpers (Dovecot, Courier, imapgate in-process), as they are.
#[path = "../tests/it"]
mod it {
    #[allow(dead_code)]
    pub mod support;
}
use it::support;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::backends::Client;
use support::courier::Courier;
use support::dovecot::Dovecot;

const SECONDS: f64 = 3.0;
const ROUNDS: usize = 3;
const MESSAGE_SIZE: usize = 1544;

/// Logs in, selects INBOX and keeps `window` `FETCH 1 (BODY.PEEK[])` in flight for
/// `SECONDS`; returns the commands answered per second.
async fn pipeline(target: SocketAddr, window: usize) -> f64 {
    let tcp = TcpStream::connect(target).await.expect("connect");
    // Clients turn Nagle off; the stall is the server's Nagle meeting our delayed ACK.
    tcp.set_nodelay(true).expect("nodelay");
    let (read, mut write) = tcp.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    let next_line = async |read: &mut BufReader<_>, line: &mut Vec<u8>| {
        line.clear();
        let n = read.read_until(b'\n', line).await.expect("read");
        assert!(n > 0, "the server closed the connection");
    };
    next_line(&mut read, &mut line).await;
    // One at a time: Courier drops what a client pipelines behind LOGIN.
    for (tag, command) in [("l", "LOGIN alice alice-secret"), ("s", "SELECT INBOX")] {
        write
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await
            .unwrap();
        loop {
            next_line(&mut read, &mut line).await;
            if line.starts_with(format!("{tag} ").as_bytes()) {
                let ok = line.starts_with(format!("{tag} OK").as_bytes());
                assert!(ok, "{}", String::from_utf8_lossy(&line));
                break;
            }
        }
    }
    let fetch = b"f FETCH 1 (BODY.PEEK[])\r\n";
    for _ in 0..window {
        write.write_all(fetch).await.unwrap();
    }
    let started = Instant::now();
    let mut done = 0u64;
    let mut literal = vec![0u8; MESSAGE_SIZE * 2];
    while started.elapsed().as_secs_f64() < SECONDS {
        next_line(&mut read, &mut line).await;
        if let Some(n) = literal_at_end(&line) {
            read.read_exact(&mut literal[..n]).await.unwrap();
        } else if line.starts_with(b"f OK") {
            done += 1;
            write.write_all(fetch).await.unwrap();
        } else if line.starts_with(b"f ") {
            panic!("{}", String::from_utf8_lossy(&line));
        }
    }
    done as f64 / started.elapsed().as_secs_f64()
}

fn literal_at_end(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"\r\n")?.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&c| c == b'{')?;
    std::str::from_utf8(&inner[open + 1..]).ok()?.parse().ok()
}

fn put_message(address: &str) {
    let mut c = Client::connect(address).unwrap();
    c.login("alice", "alice-secret").unwrap();
    let mut body = String::from("From: a@example.net\r\nSubject: pipelining\r\n\r\n");
    while body.len() < MESSAGE_SIZE - 2 {
        body.push_str("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwx\r\n");
    }
    body.truncate(MESSAGE_SIZE - 2);
    body.push_str("\r\n");
    c.append("INBOX", &body).unwrap();
    c.logout();
}

/// A proxy process in front of a backend, killed on drop: HAProxy in TCP mode (the anchor every
/// proxy is measured against) or the imapgate binary, each in its own process as in production.
struct Process {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    fn haproxy(backend: &str) -> Option<Process> {
        if !std::path::Path::new("/usr/sbin/haproxy").exists() {
            eprintln!("haproxy is not installed: no HAProxy column");
            return None;
        }
        Process::start(
            |port| {
                format!(
                    "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
                     listen imap\n  bind 127.0.0.1:{port}\n  server b {backend}\n"
                )
            },
            "/usr/sbin/haproxy",
            &["-db", "-f"],
        )
    }

    fn imapgate(backend: &str, quickack: bool) -> Option<Process> {
        Process::start(
            |port| {
                format!(
                    "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\n\
                     backends:\n  - {{ name: b, address: \"{backend}\", quickack: {quickack} }}\n"
                )
            },
            env!("CARGO_BIN_EXE_imapgate"),
            &["run", "--threads", "1", "--config"],
        )
    }

    /// Writes the config for a free port, runs `program args.. config`, and waits until the
    /// backend's greeting comes through it.
    fn start(config: impl Fn(u16) -> String, program: &str, args: &[&str]) -> Option<Process> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("proxy.cfg");
        std::fs::write(&path, config(port)).ok()?;
        let child = std::process::Command::new(program)
            .args(args)
            .arg(&path)
            .env("IMAPGATE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
        // Ready when it accepts and a greeting comes through (no other event to wait on).
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(c) = Client::connect(&addr.to_string()) {
                c.logout();
                return Some(Process {
                    child,
                    addr,
                    _dir: dir,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !support::dovecot::available() || !support::courier::available() {
        return;
    }
    let courier = Courier::start("bench");
    let dovecot = Dovecot::start("bench");
    let mut rows = Vec::new();
    for (name, address) in [
        ("Courier 5.0", courier.address()),
        ("Dovecot 2.3", dovecot.address()),
    ] {
        put_message(&address);
        let direct: SocketAddr = address.parse().unwrap();
        let with = Process::imapgate(&address, true).expect("imapgate starts");
        let without = Process::imapgate(&address, false).expect("imapgate starts");
        let haproxy = Process::haproxy(&address);
        let mut targets = vec![direct, without.addr, with.addr];
        targets.extend(haproxy.as_ref().map(|h| h.addr));
        for window in [1, 10] {
            let mut sums = vec![0.0f64; targets.len()];
            for _ in 0..ROUNDS {
                // Alternating, so drift on a shared machine hits every target alike.
                for (i, target) in targets.iter().enumerate() {
                    sums[i] += pipeline(*target, window).await;
                }
            }
            let rates: Vec<f64> = sums.iter().map(|s| s / ROUNDS as f64).collect();
            let cell = |r: f64| format!("{r:.0} ({:.2}×)", r / rates[0]);
            let haproxy = rates.get(3).map_or("–".to_string(), |r| cell(*r));
            rows.push(format!(
                "| {name} | {window} | {:.0} | {haproxy} | {} | {} |",
                rates[0],
                cell(rates[1]),
                cell(rates[2]),
            ));
        }
    }
    println!(
        "| backend | in flight | direct cmd/s | HAProxy 2.6 (TCP mode) | imapgate, quickack: false | imapgate, quickack: true (default) |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
