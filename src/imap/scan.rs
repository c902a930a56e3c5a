//! The relay's observer: reads the line parts of both directions as they pass, and reports each
//! command's name and how it completed. It never copies, changes or delays a byte, and it never
//! looks inside a literal: literal octets are skipped by count.
//!
//! ```text
//!            client → backend                           backend → client
//!  "t1 UID FETCH 1:* (BODY[])" CRLF   ─► in flight ─►  "* 1 FETCH (BODY[] {52841}" CRLF <52841 octets> ")" CRLF
//!                                        [t1, UID FETCH] "t1 OK done" CRLF ─► completed(UID FETCH, ok, latency)
//! ```
//!
//! Framing is the same in both directions: a *logical line* (a command, a response) is physical
//! lines joined by literals. A physical line that ends in `{n}`, `{n+}` or `~{n}` is followed by
//! n octets, then the logical line goes on. Only the head of a logical line (its first
//! `HEAD_MAX` octets) is kept, in a fixed array; the rest is passed over with memchr.
//!
//! What the two directions share (`Shared`, owned with both scanners by one `Observer`), with why:
//! - a client's synchronizing `{n}` is followed by octets only after the backend's `+`; if the
//!   backend answers the command with NO/BAD instead, no octets come. The client side counts the
//!   backend's continuations to tell which happened. (The client cannot send before it has the
//!   `+`, and the backend side sees the `+` before the client does, so the count is up to date.)
//! - lines the client sends inside AUTHENTICATE or after IDLE (`DONE`) are not commands;
//! - COMPRESS=DEFLATE: after the backend's OK both directions are DEFLATE streams (the backend's
//!   from the octet after its OK line, the client's from its next octet). With
//!   `metrics.compress: observe` (the default) each direction gets an `Inflater` and the same
//!   framing reads the inflated copy; with `bytes_only`, or once a stream cannot be inflated,
//!   the direction is `Wire::Blind` (bytes counted, nothing read). Inside a compressed stream
//!   literal sizes are of inflated octets, so nothing may pass unseen (`literal_left` is 0)
//!   and no wire offset is a known response boundary (`at_boundary` is `None`).
//! - the in-flight table: tag → command, bounded at `IN_FLIGHT_MAX` (a client that pipelines
//!   without reading cannot grow it; the oldest entries are dropped as `unfinished`).

use std::time::{Duration, Instant};

use crate::config::CompressMode;
use crate::tap::{Tap, Way};
use inflate::Inflater;

mod inflate;

/// Octets of a logical line's start that are kept: enough for a tracked tag (`TAG_MAX`) and
/// the longest two-word name (`UID EXPUNGE`).
pub(crate) const HEAD_MAX: usize = 48;
/// Octets kept from the end of an unfinished physical line, to find `{n}` across reads.
const TAIL_MAX: usize = 24;
/// Commands in flight per session before the oldest are given up.
pub const IN_FLIGHT_MAX: usize = 128;
/// Longest tag tracked; a longer one is still relayed, but its command is not timed.
pub(crate) const TAG_MAX: usize = 32;

/// Command names with a metric of their own: RFC 9051 and RFC 3501 plus common extensions.
/// Anything else is `other`. Index 0 is `other`.
pub const COMMAND_NAMES: &[&str] = &[
    "other",
    "APPEND",
    "AUTHENTICATE",
    "CAPABILITY",
    "CHECK",
    "CLOSE",
    "COMPRESS",
    "COPY",
    "CREATE",
    "DELETE",
    "DELETEACL",
    "ENABLE",
    "EXAMINE",
    "EXPUNGE",
    "FETCH",
    "GETACL",
    "GETMETADATA",
    "GETQUOTA",
    "GETQUOTAROOT",
    "ID",
    "IDLE",
    "LIST",
    "LISTRIGHTS",
    "LOGIN",
    "LOGOUT",
    "LSUB",
    "MOVE",
    "MYRIGHTS",
    "NAMESPACE",
    "NOOP",
    "NOTIFY",
    "RENAME",
    "SEARCH",
    "SELECT",
    "SETACL",
    "SETMETADATA",
    "SETQUOTA",
    "SORT",
    "STARTTLS",
    "STATUS",
    "STORE",
    "SUBSCRIBE",
    "THREAD",
    "UID COPY",
    "UID EXPUNGE",
    "UID FETCH",
    "UID MOVE",
    "UID SEARCH",
    "UID SORT",
    "UID STORE",
    "UID THREAD",
    "UNSELECT",
    "UNSUBSCRIBE",
    "XLIST",
];

/// An index into `COMMAND_NAMES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandId(pub u8);

impl CommandId {
    pub const OTHER: CommandId = CommandId(0);
    /// The commands the observer treats specially; a misspelt name fails the build.
    pub const IDLE: CommandId = CommandId::named("IDLE");
    pub const AUTHENTICATE: CommandId = CommandId::named("AUTHENTICATE");
    pub const COMPRESS: CommandId = CommandId::named("COMPRESS");

    const fn named(name: &str) -> CommandId {
        let mut i = 0;
        while i < COMMAND_NAMES.len() {
            let (a, b) = (COMMAND_NAMES[i].as_bytes(), name.as_bytes());
            if a.len() == b.len() {
                let mut j = 0;
                while j < a.len() && a[j] == b[j] {
                    j += 1;
                }
                if j == a.len() {
                    return CommandId(i as u8);
                }
            }
            i += 1;
        }
        panic!("not in COMMAND_NAMES");
    }

    pub fn name(self) -> &'static str {
        COMMAND_NAMES[self.0 as usize]
    }

    /// Looks up a command name (`first` and, for UID, `second` word), case-insensitively.
    pub fn lookup(first: &[u8], second: &[u8]) -> CommandId {
        let mut name = [0u8; 24];
        let mut len = 0;
        let mut push = |word: &[u8]| {
            for &c in word {
                if len == name.len() {
                    return false;
                }
                name[len] = c.to_ascii_uppercase();
                len += 1;
            }
            true
        };
        let fits = if first.eq_ignore_ascii_case(b"UID") {
            push(first) && push(b" ") && push(second)
        } else {
            push(first)
        };
        if !fits {
            return CommandId::OTHER;
        }
        let wanted = &name[..len];
        COMMAND_NAMES
            .iter()
            .position(|n| n.as_bytes() == wanted)
            .map_or(CommandId::OTHER, |i| CommandId(i as u8))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Completion {
    Ok,
    No,
    Bad,
    /// The backend said BYE and closed before completing it.
    Bye,
    /// The session ended (or the in-flight table overflowed) before a completion came.
    Unfinished,
}

impl Completion {
    pub const ALL: [Completion; 5] = [
        Completion::Ok,
        Completion::No,
        Completion::Bad,
        Completion::Bye,
        Completion::Unfinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Ok => "ok",
            Completion::No => "no",
            Completion::Bad => "bad",
            Completion::Bye => "bye",
            Completion::Unfinished => "unfinished",
        }
    }
}

/// Where observations go: metrics in the proxy, a list in tests.
pub trait CommandSink: Send + Sync {
    /// A command completed. `latency` is from its last octet leaving the client side to its
    /// completion arriving; `None` for IDLE (its duration is the client's choice) and for
    /// commands that never completed.
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>);

    /// A compressed stream could not be inflated (corrupt, or not DEFLATE): the session is
    /// relayed on, but no longer observed.
    fn compress_error(&self) {}
}

impl<T: CommandSink + ?Sized> CommandSink for &T {
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>) {
        (**self).command(command, completion, latency);
    }

    fn compress_error(&self) {
        (**self).compress_error();
    }
}

impl<T: CommandSink + ?Sized> CommandSink for std::sync::Arc<T> {
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>) {
        (**self).command(command, completion, latency);
    }

    fn compress_error(&self) {
        (**self).compress_error();
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    tag: [u8; TAG_MAX],
    tag_len: u8,
    command: CommandId,
    /// When the command's last octet passed; `None` while it is still being sent.
    sent: Option<Instant>,
}

/// The observer of one session: both directions' scanners, what they share, and where the
/// observations go. One owner (the session's relay), so nothing in it is atomic or locked.
/// Dropping it reports what is still in flight (`unfinished`, or `bye` after a BYE).
pub struct Observer<K: CommandSink> {
    sink: K,
    shared: Shared,
    client: ClientScanner,
    backend: BackendScanner,
    /// From the backend's OK to COMPRESS on (boxed: a session that never compresses pays
    /// one pointer for it).
    compressed: Option<Box<Compressed>>,
}

/// Each direction's `Wire` once the session compresses.
struct Compressed {
    client: Wire,
    backend: Wire,
}

impl Compressed {
    fn new() -> Box<Self> {
        Box::new(Compressed {
            client: Wire::Plain,
            backend: Wire::Plain,
        })
    }

    fn wire(&self, way: Way) -> &Wire {
        match way {
            Way::ClientToBackend => &self.client,
            Way::BackendToClient => &self.backend,
        }
    }

    fn wire_mut(&mut self, way: Way) -> &mut Wire {
        match way {
            Way::ClientToBackend => &mut self.client,
            Way::BackendToClient => &mut self.backend,
        }
    }
}

/// What one direction's octets are to the observer.
enum Wire {
    /// IMAP as it is (until COMPRESS).
    Plain,
    /// COMPRESS=DEFLATE, read through an inflated copy.
    Deflated(Inflater),
    /// Not read: compressed with `bytes_only`, or a stream that could not be inflated.
    Blind,
}

impl<K: CommandSink> Observer<K> {
    /// An observer that inflates compressed sessions (the default, `metrics.compress: observe`).
    pub fn new(sink: K) -> Self {
        Self::with_compress(sink, CompressMode::Observe)
    }

    pub fn with_compress(sink: K, compress: CompressMode) -> Self {
        Observer {
            sink,
            shared: Shared::new(compress),
            client: ClientScanner::new(),
            backend: BackendScanner::new(),
            compressed: None,
        }
    }

    /// Octets on their way `way`.
    pub fn observe(&mut self, way: Way, bytes: &[u8]) {
        match self.compressed.as_deref().map(|c| c.wire(way)) {
            Some(Wire::Blind) => return,
            Some(Wire::Deflated(_)) => return self.observe_deflated(way, bytes),
            Some(Wire::Plain) | None => {}
        }
        let compressed_from = match way {
            Way::ClientToBackend => self.client.observe(&mut self.shared, &self.sink, bytes),
            Way::BackendToClient => self.backend.observe(&mut self.shared, &self.sink, bytes),
        };
        // COMPRESS took effect: the rest of this chunk and all that follows is DEFLATE.
        if let Some(at) = compressed_from {
            let wire = self
                .compressed
                .get_or_insert_with(Compressed::new)
                .wire_mut(way);
            match self.shared.compress {
                CompressMode::Observe => {
                    // The only allocation of a session's observer beyond its in-flight table.
                    *wire = Wire::Deflated(Inflater::new());
                    self.observe_deflated(way, bytes.get(at..).unwrap_or_default());
                }
                CompressMode::BytesOnly => *wire = Wire::Blind,
            }
        }
    }

    /// Compressed octets going `way`: inflated, and the inflated octets framed as usual.
    fn observe_deflated(&mut self, way: Way, bytes: &[u8]) {
        let Observer {
            sink,
            shared,
            client,
            backend,
            compressed,
            ..
        } = self;
        let Some(Wire::Deflated(inflater)) = compressed.as_deref_mut().map(|c| c.wire_mut(way))
        else {
            return;
        };
        // COMPRESS accepted again inside the compressed stream (a server must refuse it,
        // RFC 4978 section 3): nested DEFLATE is not followed.
        let mut nested = false;
        let inflated = inflater.feed(bytes, |plain| {
            if nested {
                return;
            }
            let again = match way {
                Way::ClientToBackend => client.observe(shared, &*sink, plain),
                Way::BackendToClient => backend.observe(shared, &*sink, plain),
            };
            nested = again.is_some();
        });
        if inflated.is_err() || nested {
            self.sink.compress_error();
            self.stop_observing();
        }
    }

    /// Both directions blind from here on (a session's observation is whole or nothing);
    /// what is in flight will never be seen to complete.
    fn stop_observing(&mut self) {
        let compressed = self.compressed.get_or_insert_with(Compressed::new);
        compressed.client = Wire::Blind;
        compressed.backend = Wire::Blind;
        for entry in self.shared.in_flight.drain(..) {
            self.sink
                .command(entry.command, Completion::Unfinished, None);
        }
    }

    /// Whether the octets going `way` are plain IMAP (not compressed).
    fn plain(&self, way: Way) -> bool {
        self.compressed
            .as_deref()
            .is_none_or(|c| matches!(c.wire(way), Wire::Plain))
    }

    /// Literal octets still to come `way` that the observer would only skip. Always 0 in a
    /// compressed direction: its literal sizes count inflated octets, not wire octets.
    pub fn literal_left(&self, way: Way) -> u64 {
        if !self.plain(way) {
            return 0;
        }
        match way {
            Way::ClientToBackend => match self.client.mode {
                ClientMode::Commands => self.client.framer.literal_left,
                _ => 0,
            },
            Way::BackendToClient => self.backend.framer.literal_left,
        }
    }

    /// `n` literal octets went `way` without being shown (at most `literal_left(way)`).
    pub fn literal_passed(&mut self, way: Way, n: u64) {
        if !self.plain(way) {
            // Never allowed (`literal_left` is 0); an inflater that missed octets is lost.
            if n > 0 {
                self.stop_observing();
            }
            return;
        }
        let left = match way {
            Way::ClientToBackend => &mut self.client.framer.literal_left,
            Way::BackendToClient => &mut self.backend.framer.literal_left,
        };
        *left = left.saturating_sub(n);
    }

    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// Commands sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.len()
    }

    /// The oldest command sent and not yet completed.
    pub fn oldest_in_flight(&self) -> Option<CommandId> {
        self.shared.in_flight.first().map(|c| c.command)
    }

    /// Whether the stream `way` is between lines (see `Tap::at_boundary`); `None` once the
    /// session is compressed, observed or not: the inflated framing knows where a response
    /// ends in inflated octets, but a DEFLATE block does not end where a response does (the
    /// end of a response may still sit in the compressor), so no wire offset is a safe place
    /// to add a BYE, and the relay closes at once, as for any stream it cannot read.
    pub fn at_boundary(&self, way: Way) -> Option<bool> {
        if self.shared.compressions > 0 || !self.plain(way) {
            return None;
        }
        Some(match way {
            Way::ClientToBackend => self.client.framer.at_line_start(),
            Way::BackendToClient => self.backend.framer.at_line_start(),
        })
    }
}

/// The observer on the relay as it is (the session's tap adds byte counters around it).
impl<K: CommandSink + 'static> Tap for Observer<K> {
    fn observe(&mut self, way: Way, bytes: &[u8]) {
        Observer::observe(self, way, bytes);
    }

    fn unseen_ahead(&self, way: Way) -> u64 {
        self.literal_left(way)
    }

    fn passed_unseen(&mut self, way: Way, n: usize) {
        self.literal_passed(way, n as u64);
    }

    fn awaits_backend(&self) -> bool {
        self.in_flight() > 0
    }

    fn at_boundary(&self, way: Way) -> Option<bool> {
        Observer::at_boundary(self, way)
    }
}

impl<K: CommandSink> Drop for Observer<K> {
    fn drop(&mut self) {
        let completion = if self.shared.bye {
            Completion::Bye
        } else {
            Completion::Unfinished
        };
        for entry in self.shared.in_flight.drain(..) {
            self.sink.command(entry.command, completion, None);
        }
    }
}

/// State the two directions share.
struct Shared {
    /// Continuation requests (`+ ...`) the backend has sent.
    continuations: u64,
    /// A client AUTHENTICATE exchange is open: client lines are SASL data.
    sasl_open: bool,
    /// How many times the backend accepted COMPRESS (once in a sane session): both directions
    /// are compressed from the first.
    compressions: u32,
    /// The backend said `* BYE`.
    bye: bool,
    /// What to do once compressed (here, not in `Observer`: it fits in this struct's padding).
    compress: CompressMode,
    /// Commands sent and not yet completed, oldest first.
    in_flight: Vec<InFlight>,
}

impl Shared {
    fn new(compress: CompressMode) -> Self {
        Shared {
            continuations: 0,
            sasl_open: false,
            compressions: 0,
            bye: false,
            compress,
            // Allocated on the first command, with room for one: a session mostly has one
            // command in flight (an IDLE, for hours); the default first growth would reserve four.
            in_flight: Vec::new(),
        }
    }

    fn start_command(&mut self, sink: &dyn CommandSink, tag: &[u8], command: CommandId) {
        if tag.len() > TAG_MAX {
            sink.command(command, Completion::Unfinished, None);
            return;
        }
        let mut entry = InFlight {
            tag: [0; TAG_MAX],
            tag_len: tag.len() as u8,
            command,
            sent: None,
        };
        entry.tag[..tag.len()].copy_from_slice(tag);
        let table = &mut self.in_flight;
        if table.len() >= IN_FLIGHT_MAX {
            let oldest = table.remove(0);
            sink.command(oldest.command, Completion::Unfinished, None);
        }
        if table.capacity() == 0 {
            table.reserve_exact(1);
        }
        table.push(entry);
    }

    /// The last command started has been sent up to a point where the client waits: its end,
    /// or a synchronizing literal's announcement (if the backend refuses the literal, that is
    /// the command's last octet).
    fn command_sent(&mut self, at: Instant) {
        if let Some(last) = self.in_flight.last_mut() {
            last.sent = Some(at);
        }
    }

    fn complete(
        &mut self,
        sink: &dyn CommandSink,
        tag: &[u8],
        completion: Completion,
        at: Instant,
    ) -> Option<CommandId> {
        let i = self
            .in_flight
            .iter()
            .position(|e| &e.tag[..e.tag_len as usize] == tag)?;
        let entry = self.in_flight.remove(i);
        let latency = match entry.sent {
            Some(sent) if entry.command != CommandId::IDLE => {
                Some(at.saturating_duration_since(sent))
            }
            _ => None,
        };
        sink.command(entry.command, completion, latency);
        Some(entry.command)
    }
}

/// Line and literal framing, the same for both directions.
struct Framer {
    /// Octets of literal still to pass over; 0 in line mode.
    literal_left: u64,
    /// In line mode: the current physical line is the first of its logical line.
    first_physical: bool,
    /// The current logical line's head is complete (reported).
    head_done: bool,
    head: [u8; HEAD_MAX],
    head_len: usize,
    tail: [u8; TAIL_MAX],
    tail_len: usize,
}

/// What the framer found in a chunk, in order.
enum Event<'h> {
    /// The start of a logical line, up to `HEAD_MAX` octets (or its first physical line).
    Head(&'h [u8]),
    /// A physical line ended with a literal announcement: `(octets, synchronizing)`.
    Literal(u64, bool),
    /// The logical line ended.
    End,
}

impl Framer {
    fn new() -> Self {
        Framer {
            literal_left: 0,
            first_physical: true,
            head_done: false,
            head: [0; HEAD_MAX],
            head_len: 0,
            tail: [0; TAIL_MAX],
            tail_len: 0,
        }
    }

    /// Walks `bytes`, calling `on` for each event. `on` returns false to stop framing (the
    /// rest of the stream is not IMAP any more: COMPRESS); the framer then reports how many
    /// octets it consumed.
    fn scan(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event<'_>) -> Flow) -> Option<usize> {
        let total = bytes.len();
        while !bytes.is_empty() {
            if self.literal_left > 0 {
                let skip = self.literal_left.min(bytes.len() as u64) as usize;
                self.literal_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let newline = memchr::memchr(b'\n', bytes);
            let line = &bytes[..newline.unwrap_or(bytes.len())];
            if !self.head_done && self.first_physical {
                if self.head_len == 0 && (newline.is_some() || line.len() >= HEAD_MAX) {
                    // The whole head is in this chunk: no copy.
                    self.head_done = true;
                    on(Event::Head(trim_cr(&line[..line.len().min(HEAD_MAX)])));
                } else {
                    // The head spans reads: collect it.
                    let take = (HEAD_MAX - self.head_len).min(line.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&line[..take]);
                    self.head_len += take;
                    if newline.is_some() || self.head_len == HEAD_MAX {
                        self.head_done = true;
                        on(Event::Head(trim_cr(&self.head[..self.head_len])));
                    }
                }
            }
            let Some(i) = newline else {
                self.keep_tail(bytes);
                return None;
            };
            let literal = self.literal_at_end(line);
            bytes = &bytes[i + 1..];
            self.tail_len = 0;
            match literal {
                Some((n, sync)) => {
                    self.first_physical = false;
                    self.literal_left = n;
                    if on(Event::Literal(n, sync)) == Flow::Stop {
                        return Some(total - bytes.len());
                    }
                }
                None => {
                    self.first_physical = true;
                    self.head_done = false;
                    self.head_len = 0;
                    if on(Event::End) == Flow::Stop {
                        return Some(total - bytes.len());
                    }
                }
            }
        }
        None
    }

    /// Between logical lines: nothing of a line or literal seen yet.
    fn at_line_start(&self) -> bool {
        self.literal_left == 0
            && self.first_physical
            && !self.head_done
            && self.head_len == 0
            && self.tail_len == 0
    }

    fn keep_tail(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_MAX {
            self.tail.copy_from_slice(&bytes[bytes.len() - TAIL_MAX..]);
            self.tail_len = TAIL_MAX;
        } else {
            let keep = (TAIL_MAX - bytes.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + bytes.len()].copy_from_slice(bytes);
            self.tail_len = keep + bytes.len();
        }
    }

    /// `{n}`, `{n+}` or `~{n}` right before the line end (`line` excludes the LF), looking
    /// into the kept tail when the line began in an earlier chunk.
    fn literal_at_end(&self, line: &[u8]) -> Option<(u64, bool)> {
        // Fast path: most lines do not end in '}'.
        if let Some(&last) = trim_cr(line).last()
            && last != b'}'
        {
            return None;
        }
        let mut joined = [0u8; TAIL_MAX * 2];
        let end: &[u8] = if line.len() >= TAIL_MAX || self.tail_len == 0 {
            line
        } else {
            joined[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joined[self.tail_len..self.tail_len + line.len()].copy_from_slice(line);
            &joined[..self.tail_len + line.len()]
        };
        let end = trim_cr(end);
        let body = end.strip_suffix(b"}")?;
        let (body, sync) = match body.strip_suffix(b"+") {
            Some(b) => (b, false),
            None => (body, true),
        };
        let open = body.iter().rposition(|&c| c == b'{')?;
        let digits = &body[open + 1..];
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        Some((n, sync))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `tag SP word1 [SP word2]` from a head.
fn words(head: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let mut parts = head.splitn(4, |&c| c == b' ');
    let tag = parts.next().unwrap_or(b"");
    let first = parts.next().unwrap_or(b"");
    let second = parts.next().unwrap_or(b"");
    (tag, first, second)
}

/// What the client side is in, beyond framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientMode {
    Commands,
    /// A synchronizing literal was announced; octets come only if the backend said `+`
    /// (the continuation count at the announcement is kept).
    AwaitingGoAhead {
        octets: u64,
        continuations: u64,
    },
    /// The next line is IDLE's `DONE` if the backend said `+` (the count at IDLE is kept);
    /// if it refused IDLE instead, the next line is a command.
    Idle {
        continuations: u64,
    },
    /// COMPRESS was sent (the count of accepted COMPRESS commands then is kept); if the
    /// backend accepted it, the client's next octet is compressed.
    CompressPending {
        compressions: u32,
    },
}

/// Observes client → backend.
struct ClientScanner {
    framer: Framer,
    mode: ClientMode,
    /// The logical line being read is a command (not SASL data or DONE).
    in_command: bool,
    current: CommandId,
}

impl ClientScanner {
    fn new() -> Self {
        ClientScanner {
            framer: Framer::new(),
            mode: ClientMode::Commands,
            in_command: false,
            current: CommandId::OTHER,
        }
    }

    /// Returns where in `bytes` the stream turned compressed, if it did.
    fn observe(
        &mut self,
        shared: &mut Shared,
        sink: &dyn CommandSink,
        bytes: &[u8],
    ) -> Option<usize> {
        match self.mode {
            ClientMode::CompressPending { compressions } if !bytes.is_empty() => {
                self.mode = ClientMode::Commands;
                if shared.compressions > compressions {
                    // Accepted: this octet is the first compressed one.
                    return Some(0);
                }
            }
            ClientMode::AwaitingGoAhead {
                octets,
                continuations,
            } if !bytes.is_empty() => {
                if shared.continuations > continuations {
                    self.framer.literal_left = octets;
                } else {
                    // Refused: the backend completed the command instead; a new one starts.
                    self.framer = Framer::new();
                    self.in_command = false;
                }
                self.mode = ClientMode::Commands;
            }
            _ => {}
        }
        let mut mode = self.mode;
        let mut in_command = self.in_command;
        let mut current = self.current;
        let consumed = self.framer.scan(bytes, |event| match event {
            Event::Head(head) => {
                in_command = false;
                let continuations_now = shared.continuations;
                let idle_done = match mode {
                    ClientMode::Idle { continuations } => {
                        mode = ClientMode::Commands;
                        continuations_now > continuations
                    }
                    _ => false,
                };
                if !idle_done && !shared.sasl_open {
                    let (tag, first, second) = words(head);
                    if !tag.is_empty() && !first.is_empty() {
                        current = CommandId::lookup(first, second);
                        in_command = true;
                        shared.start_command(sink, tag, current);
                    }
                }
                Flow::Go
            }
            Event::Literal(octets, sync) => {
                if sync {
                    if in_command {
                        shared.command_sent(Instant::now());
                    }
                    mode = ClientMode::AwaitingGoAhead {
                        octets,
                        continuations: shared.continuations,
                    };
                    return Flow::Stop;
                }
                Flow::Go
            }
            Event::End => {
                if in_command {
                    in_command = false;
                    shared.command_sent(Instant::now());
                    if current == CommandId::IDLE {
                        mode = ClientMode::Idle {
                            continuations: shared.continuations,
                        };
                    } else if current == CommandId::AUTHENTICATE {
                        shared.sasl_open = true;
                    } else if current == CommandId::COMPRESS {
                        mode = ClientMode::CompressPending {
                            compressions: shared.compressions,
                        };
                        return Flow::Stop;
                    }
                }
                Flow::Go
            }
        });
        self.mode = mode;
        self.in_command = in_command;
        self.current = current;
        if let Some(used) = consumed {
            // Framing stopped mid-chunk: the literal's go-ahead or COMPRESS decide the rest.
            let rest = bytes.get(used..).unwrap_or_default();
            if !rest.is_empty() {
                return self
                    .observe(shared, sink, rest)
                    .map(|at| used.saturating_add(at));
            }
        }
        None
    }
}

/// Observes backend → client.
struct BackendScanner {
    framer: Framer,
    /// The tagged response being read completed COMPRESS with OK.
    compress_accepted: bool,
}

impl BackendScanner {
    fn new() -> Self {
        BackendScanner {
            framer: Framer::new(),
            compress_accepted: false,
        }
    }

    /// Returns where in `bytes` the stream turned compressed (right after COMPRESS's OK
    /// line), if it did.
    fn observe(
        &mut self,
        shared: &mut Shared,
        sink: &dyn CommandSink,
        bytes: &[u8],
    ) -> Option<usize> {
        let mut compress_accepted = self.compress_accepted;
        let compressed_from = self.framer.scan(bytes, |event| match event {
            Event::Head(head) => {
                if head.first() == Some(&b'+') {
                    shared.continuations += 1;
                } else if head.first() == Some(&b'*') {
                    // Untagged: only BYE matters here. The common case costs three compares.
                    if head.len() >= 5
                        && head[2..5].eq_ignore_ascii_case(b"BYE")
                        && head.get(5).is_none_or(|&c| c == b' ')
                    {
                        shared.bye = true;
                    }
                } else {
                    let now = Instant::now();
                    let (tag, word, _) = words(head);
                    let completion = if word.eq_ignore_ascii_case(b"OK") {
                        Some(Completion::Ok)
                    } else if word.eq_ignore_ascii_case(b"NO") {
                        Some(Completion::No)
                    } else if word.eq_ignore_ascii_case(b"BAD") {
                        Some(Completion::Bad)
                    } else {
                        None
                    };
                    if let Some(completion) = completion {
                        match shared.complete(sink, tag, completion, now) {
                            Some(c) if c == CommandId::AUTHENTICATE => shared.sasl_open = false,
                            Some(c) if c == CommandId::COMPRESS && completion == Completion::Ok => {
                                compress_accepted = true;
                            }
                            _ => {}
                        }
                    }
                }
                Flow::Go
            }
            Event::Literal(..) => Flow::Go,
            Event::End => {
                if compress_accepted {
                    // The OK line is the last plaintext; the client side learns it here.
                    compress_accepted = false;
                    shared.compressions = shared.compressions.saturating_add(1);
                    return Flow::Stop;
                }
                Flow::Go
            }
        });
        self.compress_accepted = compress_accepted;
        compressed_from
    }
}

#[cfg(test)]
mod tests;
