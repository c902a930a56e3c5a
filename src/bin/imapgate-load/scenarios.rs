//! Client scenarios: each runs against a target address and returns a `Report`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::client_tls::{ClientTls, ReadSide, TlsMode, WriteSide};

pub struct Report {
    pub json: serde_json::Value,
    pub summary: String,
}

/// One IMAP client connection, line oriented.
pub(crate) struct Conn {
    pub(crate) read: BufReader<ReadSide>,
    pub(crate) write: WriteSide,
    pub(crate) line: Vec<u8>,
}

impl Conn {
    /// Connects and reads the greeting; with `tls`, TLS is set up first (implicit) or after the
    /// greeting with STARTTLS.
    pub(crate) async fn open(
        target: SocketAddr,
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> std::io::Result<Conn> {
        let stream = match source {
            None => TcpStream::connect(target).await?,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(target).await?
            }
        };
        stream.set_nodelay(true)?;
        match tls {
            None => Conn::greeted(ReadSide::plain_split(stream)).await,
            Some(tls) if tls.mode == TlsMode::Implicit => {
                Conn::greeted(ReadSide::tls_split(tls.connect(stream).await?)).await
            }
            Some(tls) => {
                let mut plain = Conn::greeted(ReadSide::plain_split(stream)).await?;
                plain.send("t STARTTLS\r\n").await?;
                plain.until_ok("t").await?;
                if !plain.read.buffer().is_empty() {
                    return Err(std::io::Error::other("octets after the STARTTLS answer"));
                }
                let stream = ReadSide::reunite(plain.read.into_inner(), plain.write)?;
                let (read, write) = ReadSide::tls_split(tls.connect(stream).await?);
                Ok(Conn::new(read, write))
            }
        }
    }

    fn new(read: ReadSide, write: WriteSide) -> Conn {
        Conn {
            read: BufReader::with_capacity(512, read),
            write,
            line: Vec::with_capacity(256),
        }
    }

    async fn greeted((read, write): (ReadSide, WriteSide)) -> std::io::Result<Conn> {
        let mut conn = Conn::new(read, write);
        conn.next_line().await?;
        Ok(conn)
    }

    pub(crate) async fn next_line(&mut self) -> std::io::Result<()> {
        self.line.clear();
        if self.read.read_until(b'\n', &mut self.line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    pub(crate) async fn send(&mut self, command: &str) -> std::io::Result<()> {
        self.write.write_all(command.as_bytes()).await?;
        self.write.flush().await
    }

    /// Reads until the line tagged `tag`; fails unless it is OK. Literals in responses are
    /// read and dropped; returns the literal octets seen.
    pub(crate) async fn until_ok(&mut self, tag: &str) -> std::io::Result<u64> {
        let (ok, octets) = self.until_tagged(tag).await?;
        if ok {
            Ok(octets)
        } else {
            Err(std::io::Error::other(
                String::from_utf8_lossy(&self.line).into_owned(),
            ))
        }
    }

    /// Reads until the line tagged `tag` (left in `line`); returns whether it is OK and the
    /// literal octets seen on the way (read and dropped).
    pub(crate) async fn until_tagged(&mut self, tag: &str) -> std::io::Result<(bool, u64)> {
        let mut octets = 0u64;
        loop {
            self.next_line().await?;
            if self.line.starts_with(tag.as_bytes()) && self.line.get(tag.len()) == Some(&b' ') {
                return Ok((self.line[tag.len() + 1..].starts_with(b"OK"), octets));
            }
            if let Some(n) = literal_at_end(&self.line) {
                let mut left = n;
                let mut buf = [0u8; 64 * 1024];
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let got = self.read.read(&mut buf[..want]).await?;
                    if got == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= got as u64;
                }
                octets += n;
            }
        }
    }

    /// A connection that has logged in.
    async fn session(
        target: SocketAddr,
        tls: Option<&ClientTls>,
        user: &str,
        password: &str,
    ) -> std::io::Result<Conn> {
        let mut c = Conn::open(target, None, tls).await?;
        c.login(user, password).await?;
        Ok(c)
    }

    pub(crate) async fn login(&mut self, user: &str, password: &str) -> std::io::Result<()> {
        self.send(&format!("l LOGIN {user} {password}\r\n")).await?;
        self.until_ok("l").await.map(|_| ())
    }
}

fn literal_at_end(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&c| c == b'{')?;
    std::str::from_utf8(&inner[open + 1..]).ok()?.parse().ok()
}

/// Latencies in microseconds, and their percentiles.
pub(crate) struct Latencies(pub(crate) Vec<u32>);

impl Latencies {
    pub(crate) fn percentile(&mut self, p: f64) -> u32 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }
}

pub(crate) fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

pub struct Common {
    pub target: SocketAddr,
    pub workers: usize,
    pub seconds: f64,
    pub user: String,
    /// With `Some(n)`, logins cycle through `user0` … `user{n-1}`.
    pub users: Option<u64>,
    pub password: String,
    /// The target's processes (nginx has several), for their CPU time and RSS; empty when
    /// unknown.
    pub pids: Vec<u32>,
    pub label: String,
    /// TLS towards the target, implicit or by STARTTLS.
    pub tls: Option<ClientTls>,
}

impl Common {
    /// `plain`, `implicit` or `starttls`, for the report.
    pub fn tls_name(&self) -> &'static str {
        self.tls.as_ref().map_or("plain", |t| t.mode.as_str())
    }
}

/// CPU seconds (user + system) of the processes so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds_of(p)).sum()
}

/// Resident memory of the processes, KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| rss_kib_of(p)).sum()
}

/// CPU seconds (user + system) of a process so far, from /proc/PID/stat.
pub(crate) fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Resident memory of a process in KiB, from /proc/PID/status.
pub(crate) fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `workers` copies of `work` until `seconds` pass; gathers their latencies and errors.
pub(crate) async fn run_workers<F, Fut>(common: &Common, work: F) -> (Latencies, u64, u64, f64)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = (Vec<u32>, u64, u64)> + Send + 'static,
{
    let until = Instant::now() + Duration::from_secs_f64(common.seconds);
    let cpu_before = cpu_seconds(&common.pids);
    let handles: Vec<_> = (0..common.workers)
        .map(|w| tokio::spawn(work(w, until)))
        .collect();
    let mut all = Vec::new();
    let (mut errors, mut units) = (0, 0);
    for h in handles {
        if let Ok((lat, e, u)) = h.await {
            all.extend(lat);
            errors += e;
            units += u;
        }
    }
    let cpu = cpu_seconds(&common.pids) - cpu_before;
    (Latencies(all), errors, units, cpu)
}

pub async fn login(common: &Common) -> Report {
    let (target, user, password) = (common.target, common.user.clone(), common.password.clone());
    let (users, workers) = (common.users, common.workers as u64);
    let started = Instant::now();
    let (mut lat, errors, _, cpu) = run_workers(common, |worker, until| {
        let (user, password, tls) = (user.clone(), password.clone(), common.tls.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            // Workers take turns through the user numbers: worker w uses w, w + workers, ...
            let mut next = worker as u64;
            while Instant::now() < until {
                let t = Instant::now();
                let name = match users {
                    Some(n) => format!("{user}{}", next % n.max(1)),
                    None => user.clone(),
                };
                next += workers;
                let result = async {
                    let mut c = Conn::open(target, None, tls.as_ref()).await?;
                    c.login(&name, &password).await?;
                    c.send("o LOGOUT\r\n").await?;
                    c.until_ok("o").await
                }
                .await;
                match result {
                    Ok(_) => lat.push(micros(t.elapsed())),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors, 0)
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let n = lat.0.len() as f64;
    let rate = n / elapsed;
    let (p50, p99, p999) = (
        lat.percentile(0.5),
        lat.percentile(0.99),
        lat.percentile(0.999),
    );
    let cpu_per_1k = if n > 0.0 { cpu / n * 1000.0 } else { 0.0 };
    Report {
        json: json!({"scenario": "login", "target": common.label, "tls": common.tls_name(), "workers": common.workers,
            "seconds": elapsed, "logins": n, "errors": errors, "logins_per_s": rate,
            "p50_us": p50, "p99_us": p99, "p999_us": p999, "target_cpu_s": cpu, "cpu_s_per_1k_logins": cpu_per_1k}),
        summary: format!(
            "login  {:>10}: {rate:>9.0} logins/s  p50 {p50} µs  p99 {p99} µs  p999 {p999} µs  errors {errors}  CPU {cpu_per_1k:.3} s/1k",
            common.label
        ),
    }
}

pub async fn noop(common: &Common) -> Report {
    let (target, user, password) = (common.target, common.user.clone(), common.password.clone());
    let started = Instant::now();
    let (mut lat, errors, _, cpu) = run_workers(common, |_, until| {
        let (user, password, tls) = (user.clone(), password.clone(), common.tls.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut c) = Conn::session(target, tls.as_ref(), &user, &password).await else {
                return (lat, 1, 0);
            };
            while Instant::now() < until {
                let t = Instant::now();
                let ok = c.send("n NOOP\r\n").await.is_ok() && c.until_ok("n").await.is_ok();
                if ok {
                    lat.push(micros(t.elapsed()));
                } else {
                    errors += 1;
                    break;
                }
            }
            (lat, errors, 0)
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let n = lat.0.len() as f64;
    let (p50, p99, p999) = (
        lat.percentile(0.5),
        lat.percentile(0.99),
        lat.percentile(0.999),
    );
    Report {
        json: json!({"scenario": "noop", "target": common.label, "tls": common.tls_name(), "workers": common.workers,
            "seconds": elapsed, "ops": n, "errors": errors, "ops_per_s": n / elapsed,
            "p50_us": p50, "p99_us": p99, "p999_us": p999, "target_cpu_s": cpu}),
        summary: format!(
            "noop   {:>10}: {:>9.0} ops/s  c={}  p50 {p50} µs  p99 {p99} µs  p999 {p999} µs  errors {errors}",
            common.label,
            n / elapsed,
            common.workers
        ),
    }
}

pub async fn fetch(common: &Common) -> Report {
    let (target, user, password) = (common.target, common.user.clone(), common.password.clone());
    let started = Instant::now();
    let (_, errors, octets, cpu) = run_workers(common, |_, until| {
        let (user, password, tls) = (user.clone(), password.clone(), common.tls.clone());
        async move {
            let mut octets = 0;
            let Ok(mut c) = Conn::session(target, tls.as_ref(), &user, &password).await else {
                return (vec![], 1, 0);
            };
            let selected = async {
                c.send("s SELECT INBOX\r\n").await?;
                c.until_ok("s").await
            };
            if selected.await.is_err() {
                return (vec![], 1, 0);
            }
            while Instant::now() < until {
                let got = async {
                    c.send("f FETCH 1 BODY[]\r\n").await?;
                    c.until_ok("f").await
                };
                match got.await {
                    Ok(n) => octets += n,
                    Err(_) => return (vec![], 1, octets),
                }
            }
            (vec![], 0, octets)
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mb_s = octets as f64 / elapsed / 1e6;
    let gb = octets as f64 / 1e9;
    let cpu_per_gb = if gb > 0.0 { cpu / gb } else { 0.0 };
    Report {
        json: json!({"scenario": "fetch", "target": common.label, "tls": common.tls_name(), "workers": common.workers,
            "seconds": elapsed, "octets": octets, "errors": errors, "mb_per_s": mb_s,
            "target_cpu_s": cpu, "cpu_s_per_gb": cpu_per_gb}),
        summary: format!(
            "fetch  {:>10}: {mb_s:>9.0} MB/s  CPU {cpu_per_gb:.3} s/GB  errors {errors}",
            common.label
        ),
    }
}

/// Opens `sessions` logged-in sessions in IDLE, holds them, and reports the target's RSS
/// growth per session. Connections come from 127.0.0.2, .3, ... (`sources` addresses) to get
/// past one address's ephemeral ports.
///
/// First a warm-up: one wave of `workers` sessions opened and closed. What a proxy allocates
/// once (pools, the high-water mark of `workers` logins in flight at a time) then lands in the
/// baseline, and the figure is what each further session costs. The RSS growth from the cold
/// process is reported too (`kib_per_session_cold`).
pub async fn idle(common: &Common, sessions: usize, hold: Duration, sources: u8) -> Report {
    let rss_cold = rss_kib(&common.pids);
    let (warm, _) = open_idle(common, 0..common.workers.min(sessions), sources).await;
    for mut c in warm {
        // Until the target closes: then it has let the session go.
        let _ = c.send("DONE\r\nz LOGOUT\r\n").await;
        while c.next_line().await.is_ok() {}
    }
    let rss_before = rss_kib(&common.pids);
    let opening = Instant::now();
    let (mut conns, failed) = open_idle(common, 0..sessions, sources).await;
    let open_s = opening.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    let rss_after = rss_kib(&common.pids);
    // Every session must still answer: DONE → OK.
    let mut dropped = 0u64;
    for c in &mut conns {
        let ok = c.send("DONE\r\n").await.is_ok() && c.until_ok("i").await.is_ok();
        if !ok {
            dropped += 1;
        }
    }
    let held = conns.len() as f64;
    let growth = |from: u64| {
        if held > 0.0 {
            (rss_after as f64 - from as f64) / held
        } else {
            0.0
        }
    };
    let (per_session, per_session_cold) = (growth(rss_before), growth(rss_cold));
    Report {
        json: json!({"scenario": "idle", "target": common.label, "tls": common.tls_name(), "sessions": sessions,
            "held": held, "failed_to_open": failed, "dropped": dropped, "open_seconds": open_s,
            "rss_cold_kib": rss_cold, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
            "kib_per_session": per_session, "kib_per_session_cold": per_session_cold}),
        summary: format!(
            "idle   {:>10}: {held} sessions held, {failed} failed, {dropped} dropped, RSS {rss_cold} (cold) → {rss_before} (warm) → {rss_after} KiB = {per_session:.2} KiB/session ({per_session_cold:.2} from cold)",
            common.label
        ),
    }
}

/// Logged-in sessions in IDLE, numbered `range` (for their source address), opened in waves
/// of `workers` at a time; returns them and how many failed to open.
async fn open_idle(
    common: &Common,
    range: std::ops::Range<usize>,
    sources: u8,
) -> (Vec<Conn>, u64) {
    let mut conns = Vec::with_capacity(range.len());
    let mut failed = 0u64;
    let mut next = range.start;
    while next < range.end {
        let wave = common.workers.min(range.end - next);
        let mut tasks = Vec::with_capacity(wave);
        for i in next..next + wave {
            let (target, user, password, tls) = (
                common.target,
                common.user.clone(),
                common.password.clone(),
                common.tls.clone(),
            );
            let source = IpAddr::from([127, 0, 0, 2 + (i % sources.max(1) as usize) as u8]);
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(target, Some(source), tls.as_ref()).await?;
                c.login(&user, &password).await?;
                c.send("i IDLE\r\n").await?;
                c.next_line().await?;
                if c.line.starts_with(b"+") {
                    Ok(c)
                } else {
                    Err(std::io::Error::other("IDLE refused"))
                }
            }));
        }
        for t in tasks {
            match t.await {
                Ok(Ok(c)) => conns.push(c),
                _ => failed += 1,
            }
        }
        next += wave;
    }
    (conns, failed)
}
