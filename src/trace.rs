//! Per-user traces on demand, for support desks: `POST /trace?user=alice&seconds=120` records a
//! transcript of that user's sessions (the ones running and the ones that log in while the
//! trace runs): command and response lines with tags, names and arguments, literal contents
//! replaced by their size, credentials never (the login is recorded as its command name and
//! user only; a LOGIN or AUTHENTICATE line after login has its arguments cut). `GET
//! /trace/{id}` returns it.
//!
//! Bounded: at most `admin.trace.max_active` traces run at once, each holds at most
//! `max_bytes` of text (then stops, marked truncated), and a finished trace is kept for
//! `KEEP_FINISHED` and then dropped. What the relay pays with no trace on: one relaxed atomic
//! load per chunk (`TraceSlot::armed`); the transcript work happens only in an armed session.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::config::TraceLimits;
use crate::session::SessionId;
use crate::tap::Way;

/// How long a finished trace stays readable.
const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// The longest a trace may run.
pub(crate) const MAX_SECONDS: u64 = 3600;
/// Octets of one line kept in the transcript; the rest is counted, not kept.
const LINE_SHOWN: usize = 1000;
/// Octets of message data kept per literal with `bodies=true`.
const BODY_SHOWN: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves only text behind: still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every trace the admin API started and has not dropped yet.
#[derive(Default)]
pub(crate) struct Traces {
    /// Running and recently finished traces, oldest first.
    all: Mutex<VecDeque<Arc<Trace>>>,
    /// How many of them run; new sessions look for their user's trace only when this is not 0.
    running: AtomicUsize,
    next_id: AtomicU64,
}

/// Why a trace could not start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StartError {
    /// `max_active` traces run already.
    TooMany(usize),
    /// This user is traced already, by the trace with this id.
    AlreadyTraced(String),
    /// `bodies=true` asked without `admin.trace.allow_bodies`.
    BodiesNotAllowed,
}

impl Traces {
    /// Starts a trace of `user` for `duration`.
    pub(crate) fn start(
        &self,
        limits: &TraceLimits,
        user: &str,
        duration: Duration,
        bodies: bool,
    ) -> Result<Arc<Trace>, StartError> {
        if bodies && !limits.allow_bodies {
            return Err(StartError::BodiesNotAllowed);
        }
        let mut all = lock(&self.all);
        self.forget_old(&mut all);
        if let Some(t) = all
            .iter()
            .find(|t| t.is_running() && t.user.eq_ignore_ascii_case(user))
        {
            return Err(StartError::AlreadyTraced(t.id.clone()));
        }
        let running = all.iter().filter(|t| t.is_running()).count();
        if running >= limits.max_active {
            return Err(StartError::TooMany(limits.max_active));
        }
        let id = format!("{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let trace = Arc::new(Trace {
            id,
            user: user.to_string(),
            bodies,
            started: SystemTime::now(),
            started_at: Instant::now(),
            ends: Instant::now() + duration,
            max_bytes: limits.max_bytes,
            log: Mutex::new(Log::default()),
            running: AtomicBool::new(true),
        });
        all.push_back(trace.clone());
        self.running.store(running + 1, Ordering::Relaxed);
        Ok(trace)
    }

    /// The running trace of `user`, if any (one relaxed load when no trace runs).
    pub(crate) fn of_user(&self, user: &str) -> Option<Arc<Trace>> {
        if self.running.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut all = lock(&self.all);
        self.forget_old(&mut all);
        all.iter()
            .find(|t| t.is_running() && t.user.eq_ignore_ascii_case(user))
            .cloned()
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Trace>> {
        let mut all = lock(&self.all);
        self.forget_old(&mut all);
        all.iter().find(|t| t.id == id).cloned()
    }

    /// Every trace still kept, oldest first.
    pub(crate) fn list(&self) -> Vec<Arc<Trace>> {
        let mut all = lock(&self.all);
        self.forget_old(&mut all);
        all.iter().cloned().collect()
    }

    /// Ends the trace `id` now (it stays readable for `KEEP_FINISHED`); false if unknown.
    pub(crate) fn stop(&self, id: &str) -> bool {
        let mut all = lock(&self.all);
        let found = all.iter().find(|t| t.id == id).cloned();
        if let Some(t) = &found {
            t.finish();
        }
        self.forget_old(&mut all);
        found.is_some()
    }

    /// Marks traces past their time finished, drops the ones finished long ago (emptying
    /// them: an idle session may still hold one until its next octet), and recounts.
    fn forget_old(&self, all: &mut VecDeque<Arc<Trace>>) {
        let now = Instant::now();
        for t in all.iter() {
            if now >= t.ends {
                t.finish();
            }
        }
        all.retain(|t| {
            let keep = now < t.ends + KEEP_FINISHED;
            if !keep {
                *lock(&t.log) = Log::default();
            }
            keep
        });
        let running = all.iter().filter(|t| t.is_running()).count();
        self.running.store(running, Ordering::Relaxed);
    }
}

/// One trace: whom, until when, and the transcript so far.
pub(crate) struct Trace {
    pub(crate) id: String,
    pub(crate) user: String,
    pub(crate) bodies: bool,
    pub(crate) started: SystemTime,
    started_at: Instant,
    ends: Instant,
    max_bytes: usize,
    log: Mutex<Log>,
    running: AtomicBool,
}

#[derive(Default)]
struct Log {
    text: String,
    truncated: bool,
    sessions: usize,
}

impl Trace {
    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed) && Instant::now() < self.ends
    }

    fn finish(&self) {
        self.running.store(false, Ordering::Relaxed);
    }

    /// Seconds left to run (0 once finished).
    pub(crate) fn seconds_left(&self) -> u64 {
        if self.is_running() {
            self.ends
                .saturating_duration_since(Instant::now())
                .as_secs()
        } else {
            0
        }
    }

    /// The transcript so far, whether it was cut at `max_bytes`, and how many sessions joined.
    pub(crate) fn transcript(&self) -> (String, bool, usize) {
        let log = lock(&self.log);
        (log.text.clone(), log.truncated, log.sessions)
    }

    /// A line of imapgate's own about `session` (a failed login, say).
    pub(crate) fn note(&self, session: SessionId, text: &str) {
        self.line(session, "*", text.as_bytes());
    }

    /// Appends one line: time since the trace began, the session, who spoke, what.
    fn line(&self, session: SessionId, who: &str, text: &[u8]) {
        let mut log = lock(&self.log);
        if log.truncated {
            return;
        }
        let at = self.started_at.elapsed().as_secs_f64();
        let before = log.text.len();
        let _ = write!(log.text, "+{at:.3}s session {session} {who} ");
        push_printable(&mut log.text, text);
        log.text.push('\n');
        if log.text.len() > self.max_bytes {
            log.text.truncate(before);
            log.text
                .push_str("[trace truncated: admin.trace.max_bytes reached]\n");
            log.truncated = true;
        }
    }
}

/// `text` as it reads: printable ASCII kept, anything else as `\xNN`.
fn push_printable(out: &mut String, text: &[u8]) {
    for &b in text {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// A session's place for a trace, in its `LiveSession`. `armed` is what the relay checks.
#[derive(Default)]
pub(crate) struct TraceSlot {
    armed: AtomicBool,
    attached: Mutex<Option<Box<Attached>>>,
}

impl std::fmt::Debug for TraceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceSlot")
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .finish()
    }
}

struct Attached {
    trace: Arc<Trace>,
    session: SessionId,
    /// By `Way`: client to backend, backend to client.
    lines: [LineReader; 2],
}

impl TraceSlot {
    /// Whether a trace records this session (the relay's one branch).
    #[inline]
    pub(crate) fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Starts recording this session into `trace`, with `first` as its first line.
    pub(crate) fn attach(&self, trace: Arc<Trace>, session: SessionId, first: &str) {
        lock(&trace.log).sessions += 1;
        trace.line(session, "*", first.as_bytes());
        *lock(&self.attached) = Some(Box::new(Attached {
            lines: [
                LineReader::new(Way::ClientToBackend, trace.bodies),
                LineReader::new(Way::BackendToClient, trace.bodies),
            ],
            trace,
            session,
        }));
        self.armed.store(true, Ordering::Relaxed);
    }

    /// `bytes` were relayed `way`.
    pub(crate) fn observe(&self, way: Way, bytes: &[u8]) {
        let mut attached = lock(&self.attached);
        let Some(a) = attached.as_mut() else {
            return;
        };
        if !a.trace.is_running() {
            *attached = None;
            self.armed.store(false, Ordering::Relaxed);
            return;
        }
        let (trace, session) = (&a.trace, a.session);
        let stop =
            a.lines[way_index(way)].feed(bytes, |line| trace.line(session, way_tag(way), line));
        if stop {
            trace.line(
                session,
                "*",
                b"COMPRESS: the rest of this session is compressed and not traced",
            );
            *attached = None;
            self.armed.store(false, Ordering::Relaxed);
        }
    }

    /// `n` octets were relayed `way` without being seen (literal data spliced through).
    pub(crate) fn passed_unseen(&self, way: Way, n: usize) {
        if let Some(a) = lock(&self.attached).as_mut() {
            a.lines[way_index(way)].skip(n);
        }
    }

    /// The session ended: a last line, and the trace lets go of it.
    pub(crate) fn end(&self, how: &str) {
        if let Some(a) = lock(&self.attached).take()
            && a.trace.is_running()
        {
            a.trace
                .line(a.session, "*", format!("session end ({how})").as_bytes());
        }
        self.armed.store(false, Ordering::Relaxed);
    }
}

fn way_index(way: Way) -> usize {
    match way {
        Way::ClientToBackend => 0,
        Way::BackendToClient => 1,
    }
}

fn way_tag(way: Way) -> &'static str {
    match way {
        Way::ClientToBackend => "C:",
        Way::BackendToClient => "S:",
    }
}

/// Cuts one direction's octets into lines for the transcript, whatever the read boundaries:
/// a literal's data is left out (its size is noted) unless bodies are asked for, an over-long
/// line is cut at `LINE_SHOWN`, and a client's LOGIN / AUTHENTICATE loses its arguments.
struct LineReader {
    way: Way,
    bodies: bool,
    /// The line so far (at most `LINE_SHOWN` octets of it, plus literal notes).
    line: Vec<u8>,
    /// Octets of the line not kept.
    cut: u64,
    /// The line's last octets, kept even when the line is cut: a literal's `{n}` is there.
    tail: Vec<u8>,
    /// Octets of literal data still to come.
    literal_left: u64,
    /// Set once the client sent COMPRESS: what follows is not IMAP text.
    compressed: bool,
}

const TAIL: usize = 32;

impl LineReader {
    fn new(way: Way, bodies: bool) -> Self {
        LineReader {
            way,
            bodies,
            line: Vec::new(),
            cut: 0,
            tail: Vec::new(),
            literal_left: 0,
            compressed: false,
        }
    }

    fn skip(&mut self, n: usize) {
        let in_literal = (n as u64).min(self.literal_left);
        self.literal_left -= in_literal;
        if self.bodies && in_literal > 0 {
            self.push_note(&format!("[{in_literal} octets not seen]"));
        }
    }

    /// Feeds `bytes`; calls `emit` with each complete line. True when the stream turned
    /// compressed (the caller stops tracing).
    fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) -> bool {
        while !bytes.is_empty() {
            if self.compressed {
                return true;
            }
            if self.literal_left > 0 {
                let n = (self.literal_left.min(bytes.len() as u64)) as usize;
                if self.bodies {
                    let room = BODY_SHOWN.saturating_sub(self.line.len());
                    let kept = n.min(room);
                    self.line.extend_from_slice(&bytes[..kept]);
                    self.cut += (n - kept) as u64;
                }
                self.literal_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let (part, rest, ended) = match memchr::memchr(b'\n', bytes) {
                Some(i) => (&bytes[..=i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            self.push(part);
            bytes = rest;
            if ended {
                self.end_of_line(&mut emit);
            }
        }
        self.compressed
    }

    fn push(&mut self, part: &[u8]) {
        let room = LINE_SHOWN.saturating_sub(self.line.len());
        let kept = part.len().min(room);
        self.line.extend_from_slice(&part[..kept]);
        self.cut += (part.len() - kept) as u64;
        self.tail.extend_from_slice(part);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }

    /// A note about the line (a literal's size); dropped once the line is at its cap, so a
    /// line of endless literals cannot grow the reader.
    fn push_note(&mut self, note: &str) {
        if self.line.len() < LINE_SHOWN.max(BODY_SHOWN) {
            self.line.extend_from_slice(note.as_bytes());
        }
    }

    /// A line ended (its `\n` was pushed): a literal follows, or the line is complete.
    fn end_of_line(&mut self, emit: &mut impl FnMut(&[u8])) {
        if let Some(size) = literal_at_end(&self.tail) {
            self.tail.clear();
            trim_eol(&mut self.line);
            self.literal_left = size;
            if !self.bodies {
                self.push_note(&format!("[{size} octets]"));
            }
            return;
        }
        trim_eol(&mut self.line);
        if self.cut > 0 {
            let note = format!("[... {} more octets]", self.cut);
            self.push_note(&note);
        }
        if self.way == Way::ClientToBackend {
            self.compressed = redact_client_line(&mut self.line);
        }
        emit(&self.line);
        self.line.clear();
        self.tail.clear();
        self.cut = 0;
    }
}

fn trim_eol(line: &mut Vec<u8>) {
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
}

/// The size of the literal announced at the end of `tail` (`{n}`, `{n+}`, `~{n}`, CRLF or LF
/// after), if one is.
fn literal_at_end(tail: &[u8]) -> Option<u64> {
    let mut end = tail.len();
    while end > 0 && matches!(tail[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let body = tail[..end].strip_suffix(b"}")?;
    let body = body.strip_suffix(b"+").unwrap_or(body);
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Cuts the arguments of a client's LOGIN or AUTHENTICATE line (credentials); true when the
/// line is COMPRESS (what follows it is compressed).
fn redact_client_line(line: &mut Vec<u8>) -> bool {
    let mut words = line.splitn(3, |&b| b == b' ');
    let (Some(tag), Some(command)) = (words.next(), words.next()) else {
        return false;
    };
    let (tag_len, command) = (tag.len(), command.to_ascii_uppercase());
    match command.as_slice() {
        b"LOGIN" | b"AUTHENTICATE" => {
            line.truncate(tag_len + 1 + command.len());
            line.extend_from_slice(b" [redacted]");
            false
        }
        b"COMPRESS" => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(way: Way, bodies: bool, chunks: &[&[u8]]) -> Vec<String> {
        let mut r = LineReader::new(way, bodies);
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        out
    }

    #[test]
    fn literals_become_their_size_whatever_the_boundaries() {
        let stream: &[u8] = b"* 1 FETCH (BODY[] {11}\r\nhello world)\r\na1 OK done\r\n";
        let want = vec!["* 1 FETCH (BODY[] {11}[11 octets])", "a1 OK done"];
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(
                lines(Way::BackendToClient, false, &[a, b]),
                want,
                "cut at {cut}"
            );
        }
        let one_by_one: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(lines(Way::BackendToClient, false, &one_by_one), want);
    }

    #[test]
    fn bodies_are_kept_only_when_asked() {
        let stream: &[u8] = b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n";
        assert_eq!(
            lines(Way::BackendToClient, true, &[stream]),
            ["* 1 FETCH (BODY[] {5}hello)"]
        );
    }

    #[test]
    fn credentials_never_reach_the_transcript() {
        let out = lines(
            Way::ClientToBackend,
            false,
            &[b"a1 login alice secret\r\na2 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\na3 LOGIN {5}\r\nalice {6}\r\nsecret\r\n"],
        );
        assert_eq!(
            out,
            [
                "a1 login [redacted]",
                "a2 AUTHENTICATE [redacted]",
                "a3 LOGIN [redacted]"
            ]
        );
        assert!(!out.concat().contains("secret") && !out.concat().contains("AGFsaWNl"));
    }

    #[test]
    fn long_lines_are_cut_and_counted() {
        let mut long = b"a1 SEARCH ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 5000));
        long.extend_from_slice(b" {3}\r\nabc\r\n");
        let out = lines(Way::ClientToBackend, false, &[&long]);
        assert_eq!(out.len(), 1);
        assert!(out[0].len() < LINE_SHOWN + 100, "{}", out[0].len());
        assert!(out[0].contains("[3 octets]") && out[0].contains("more octets]"));
    }

    /// A command line of endless empty literals: the reader's line stays bounded.
    #[test]
    fn endless_literals_keep_the_line_bounded() {
        let mut r = LineReader::new(Way::ClientToBackend, false);
        r.feed(b"a SEARCH", |_| {});
        for _ in 0..100_000 {
            r.feed(b" TEXT {0+}\r\n", |_| {});
        }
        assert!(
            r.line.len() <= LINE_SHOWN.max(BODY_SHOWN) + 32,
            "{}",
            r.line.len()
        );
    }

    #[test]
    fn compress_stops_the_reader() {
        let mut r = LineReader::new(Way::ClientToBackend, false);
        let mut out = Vec::new();
        let stop = r.feed(b"a1 COMPRESS DEFLATE\r\n\x78\x9c\x01", |l| {
            out.push(l.to_vec())
        });
        assert!(stop);
        assert_eq!(out, [b"a1 COMPRESS DEFLATE".to_vec()]);
    }

    fn limits(max_active: usize, max_bytes: usize) -> TraceLimits {
        TraceLimits {
            max_active,
            max_bytes,
            allow_bodies: false,
        }
    }

    #[test]
    fn traces_are_bounded_in_number_and_size() {
        let traces = Traces::default();
        let l = limits(1, 200);
        let t = traces
            .start(&l, "alice", Duration::from_secs(60), false)
            .unwrap();
        assert_eq!(
            traces
                .start(&l, "ALICE", Duration::from_secs(60), false)
                .err(),
            Some(StartError::AlreadyTraced(t.id.clone()))
        );
        assert_eq!(
            traces
                .start(&l, "bob", Duration::from_secs(60), false)
                .err(),
            Some(StartError::TooMany(1))
        );
        assert_eq!(
            traces.start(&l, "bob", Duration::from_secs(60), true).err(),
            Some(StartError::BodiesNotAllowed)
        );
        assert!(traces.of_user("Alice").is_some());
        for _ in 0..100 {
            t.line(SessionId::next(), "C:", b"a1 NOOP");
        }
        let (text, truncated, _) = t.transcript();
        assert!(truncated && text.len() <= 200 + 60, "{}", text.len());
        assert!(traces.stop(&t.id));
        assert!(traces.of_user("alice").is_none());
        assert!(
            traces
                .start(&l, "bob", Duration::from_secs(60), false)
                .is_ok()
        );
    }

    #[test]
    fn a_slot_disarms_when_its_trace_ends() {
        let traces = Traces::default();
        let t = traces
            .start(&limits(2, 10_000), "alice", Duration::from_secs(60), false)
            .unwrap();
        let slot = TraceSlot::default();
        assert!(!slot.armed());
        slot.attach(t.clone(), SessionId::next(), "joined");
        assert!(slot.armed());
        slot.observe(Way::ClientToBackend, b"a1 SELECT INBOX\r\n");
        traces.stop(&t.id);
        slot.observe(Way::ClientToBackend, b"a2 NOOP\r\n");
        assert!(!slot.armed());
        let (text, _, sessions) = t.transcript();
        assert_eq!(sessions, 1);
        assert!(
            text.contains("C: a1 SELECT INBOX") && !text.contains("NOOP"),
            "{text}"
        );
    }
}
