//! The pre-login parsing cost: commands of thousands of short lines, sent before login.
//!
//! Each command is `a SEARCH` followed by ` TEXT {0+}` line ends (an empty non-synchronizing
//! literal each), as many as fit in `size` octets, then a final CRLF; every line goes out in a
//! segment of its own (TCP_NODELAY, one write each), as the attack in issue 15 did. Re-parsing
//! the buffer at every line end made such a command cost its length squared; framing once
//! costs its length. The target answers each command (`BAD Log in first.`: SEARCH needs a
//! login), and the next one follows. A connection the target closes (a limit, a timeout) is
//! opened again and the run goes on.
//!
//! Reports the octets sent, the sender's own CPU time (getrusage RUSAGE_SELF: this whole
//! process, whose only busy thread is the sender), the target's (utime + stime from
//! /proc/PID/stat, before and after) and both per KiB sent.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::scenarios::{Report, cpu_seconds_of};

pub struct Options {
    pub target: SocketAddr,
    /// Octets per command, at most (the command is the largest of the shape that fits).
    pub size: usize,
    pub commands: u64,
    /// A pause after each line, so that lines arrive one at a time (a slow or remote
    /// client): the target then wakes and reads once per line.
    pub pause: Option<Duration>,
    pub pids: Vec<u32>,
    pub label: String,
}

const HEAD: &[u8] = b"a SEARCH";
const LINE: &[u8] = b" TEXT {0+}\r\n";

/// The lines of one command: `a SEARCH TEXT {0+}\r\n`, ` TEXT {0+}\r\n` …, `\r\n`.
fn command_lines(size: usize) -> Vec<Vec<u8>> {
    let n = (size.saturating_sub(HEAD.len() + 2) / LINE.len()).max(1);
    let mut lines = Vec::with_capacity(n + 1);
    lines.push([HEAD, LINE].concat());
    lines.extend((1..n).map(|_| LINE.to_vec()));
    lines.push(b"\r\n".to_vec());
    lines
}

/// CPU seconds (user + system) of this process so far.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

struct Conn {
    write: TcpStream,
    read: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Conn {
    fn open(target: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(target)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut conn = Conn {
            read: BufReader::new(stream.try_clone()?),
            write: stream,
            line: Vec::with_capacity(256),
        };
        conn.next_line()?;
        if !conn.line.starts_with(b"* OK") {
            return Err(std::io::Error::other(format!(
                "greeting: {}",
                String::from_utf8_lossy(&conn.line).trim_end()
            )));
        }
        Ok(conn)
    }

    fn next_line(&mut self) -> std::io::Result<()> {
        self.line.clear();
        if self.read.read_until(b'\n', &mut self.line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Sends one command, a write per line; returns the status word of the tagged answer.
    fn command(&mut self, lines: &[Vec<u8>], pause: Option<Duration>) -> std::io::Result<String> {
        for line in lines {
            self.write.write_all(line)?;
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        }
        loop {
            self.next_line()?;
            if let Some(rest) = self.line.strip_prefix(b"a ") {
                let status = rest.split(|&c| c == b' ').next().unwrap_or_default();
                return Ok(String::from_utf8_lossy(status).trim_end().to_string());
            }
        }
    }
}

pub fn run(opts: &Options) -> Report {
    let lines = command_lines(opts.size);
    let command_octets: usize = lines.iter().map(Vec::len).sum();
    let mut answers = std::collections::BTreeMap::<String, u64>::new();
    let (mut octets, mut segments, mut reconnects, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut conn: Option<Conn> = None;
    let started = Instant::now();
    let target_before: f64 = opts.pids.iter().map(|&p| cpu_seconds_of(p)).sum();
    let own_before = own_cpu_seconds();
    let mut done = 0u64;
    while done < opts.commands {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(opts.target) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    errors += 1;
                    if errors > 100 {
                        eprintln!("prelogin: giving up: {e}");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        match c.command(&lines, opts.pause) {
            Ok(status) => {
                *answers.entry(status).or_default() += 1;
                octets += command_octets as u64;
                segments += lines.len() as u64;
            }
            Err(_) => {
                // Closed by the target (a limit, a timeout): the next command on a new
                // connection. What this one sent still cost both sides; it is not counted.
                conn = None;
                reconnects += 1;
            }
        }
        done += 1;
    }
    let own_cpu = own_cpu_seconds() - own_before;
    let target_cpu = opts.pids.iter().map(|&p| cpu_seconds_of(p)).sum::<f64>() - target_before;
    let elapsed = started.elapsed().as_secs_f64();
    let kib = octets as f64 / 1024.0;
    let per_kib = |cpu: f64| if kib > 0.0 { cpu * 1e6 / kib } else { 0.0 };
    let (sender_us, target_us) = (per_kib(own_cpu), per_kib(target_cpu));
    let ratio = if own_cpu > 0.0 {
        target_cpu / own_cpu
    } else {
        0.0
    };
    Report {
        json: json!({"scenario": "prelogin", "target": opts.label, "size": opts.size,
            "pause_us": opts.pause.map_or(0, |p| p.as_micros() as u64),
            "command_octets": command_octets, "lines_per_command": lines.len(),
            "commands": done, "answered": answers.values().sum::<u64>(), "answers": answers,
            "reconnects": reconnects, "connect_errors": errors, "octets": octets,
            "segments": segments, "seconds": elapsed, "sender_cpu_s": own_cpu,
            "target_cpu_s": target_cpu, "sender_us_per_kib": sender_us,
            "target_us_per_kib": target_us, "target_to_sender": ratio}),
        summary: format!(
            "prelogin {:>8}: {} commands of {command_octets} octets ({} lines), {octets} octets in {elapsed:.1} s; CPU per KiB: target {target_us:.1} µs, sender {sender_us:.1} µs ({ratio:.2}×); answers {answers:?}, reconnects {reconnects}",
            opts.label,
            done,
            lines.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_fill_their_size() {
        for size in [8192, 16384, 32768, 65536] {
            let lines = command_lines(size);
            let octets: usize = lines.iter().map(Vec::len).sum();
            assert!(
                octets <= size && octets + LINE.len() > size,
                "{size}: {octets}"
            );
            assert!(lines[0].starts_with(b"a SEARCH TEXT {0+}\r\n"));
            assert!(lines[1..lines.len() - 1].iter().all(|l| l == LINE));
            assert_eq!(lines.last().unwrap(), b"\r\n");
        }
    }
}
