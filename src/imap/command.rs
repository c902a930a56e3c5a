//! Pre-login command reader: bytes from the client in, whole commands out.
//!
//! imap-codec parses; this module frames and bounds. The reader keeps one buffer that holds at
//! most `line_max` octets of line parts plus `literal_max` octets of literals per command, and
//! tells the caller what to do next through `Step`:
//!
//! ```text
//!   feed(bytes) ──► step() ──► NeedMore          read more from the client
//!                          ├─► SendContinuation  write "+ ..." (synchronizing literal), read more
//!                          ├─► Command(parsed)   one command, removed from the buffer
//!                          ├─► Bad{tag}          syntax error: answer BAD, that line is dropped
//!                          ├─► LiteralRefused    a {n} over the cap: answer BAD, the client sends no octets
//!                          ├─► TooLong           a line over the cap: answer BYE and close
//!                          └─► LiteralTooLarge   a {n+} over the cap, its octets are coming: BYE
//! ```
//!
//! Bytes behind a complete command stay in the buffer: after a successful login they belong to
//! the backend (`take_buffered`). A command is framed first (lines and literals) and parsed
//! once, when whole, so every octet is scanned once: neither a client dripping one byte at a
//! time nor a command of thousands of short lines costs more than its length.

use std::io;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::{AString, IString, LiteralMode};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::secret::Secret;

const READ_CHUNK: usize = 4096;

/// A command imapgate handles before login, with its arguments owned.
#[derive(Debug, PartialEq, Eq)]
pub enum PreloginCommand {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// `ID NIL` is `None`; values of NIL are `None`.
    Id(Option<Vec<(String, Option<String>)>>),
    Login {
        user: Vec<u8>,
        password: Secret<Vec<u8>>,
    },
    Authenticate {
        /// Upper case, e.g. `PLAIN`.
        mechanism: String,
        /// Decoded SASL-IR octets (`=` is an empty response).
        initial_response: Option<Secret<Vec<u8>>>,
    },
    /// A valid IMAP command that needs a logged-in session.
    NeedsLogin {
        name: &'static str,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub tag: String,
    pub command: PreloginCommand,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    NeedMore,
    SendContinuation,
    Command(Parsed),
    Bad { tag: Option<String> },
    LiteralRefused { tag: String },
    TooLong,
    LiteralTooLarge,
}

/// A SASL response line over `line_max`.
#[derive(Debug, PartialEq, Eq)]
pub struct LineTooLong;

pub struct CommandReader {
    buf: Vec<u8>,
    line_max: usize,
    literal_max: usize,
    /// Literal octets announced in the command being read (they do not count against line_max).
    literal_octets: usize,
    /// `buf[..framed]` is the part of the command being read whose lines and literals have
    /// been found; the scan for the next line end starts here.
    framed: usize,
    /// Where the literal being received ends (`framed` when none is).
    literal_end: usize,
}

impl CommandReader {
    pub fn new(line_max: usize, literal_max: usize) -> Self {
        CommandReader {
            buf: Vec::new(),
            line_max,
            literal_max,
            literal_octets: 0,
            framed: 0,
            literal_end: 0,
        }
    }

    /// How many more octets the buffer may take before the command is over its caps.
    pub fn room(&self) -> usize {
        (self.line_max + self.literal_octets + 2).saturating_sub(self.buf.len())
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Reads what the client has sent, at most `room()` and 4 KiB, straight into the buffer.
    /// Returns 0 at end of stream.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, source: &mut R) -> io::Result<usize> {
        let want = self.room().clamp(1, READ_CHUNK);
        self.buf.reserve(want);
        source.take(want as u64).read_buf(&mut self.buf).await
    }

    /// Whether the client sent nothing yet that is not consumed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// How many octets the buffer holds (the fuzz target checks the bound).
    #[cfg(feature = "fuzzing")]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The bytes the client sent behind the last consumed command (the reader is done).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.reset_command();
        std::mem::take(&mut self.buf)
    }

    fn reset_command(&mut self) {
        self.literal_octets = 0;
        self.framed = 0;
        self.literal_end = 0;
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.reset_command();
    }

    /// Frames the command first (lines and literals, as imap-codec's fragmentizer does) and
    /// parses it once, when it is whole: every octet is scanned once, so a command of many
    /// short lines costs no more than one long line (re-parsing the buffer at every line end
    /// was quadratic).
    pub fn step(&mut self) -> Step {
        loop {
            let cap = self.line_max + self.literal_octets;
            if self.literal_end > self.framed {
                if self.buf.len() < self.literal_end {
                    return Step::NeedMore;
                }
                self.framed = self.literal_end;
            }
            let Some(i) = memchr::memchr(b'\n', &self.buf[self.framed..]) else {
                // Room for a CR whose LF is still on its way, as when both are here.
                return if self.buf.len() > cap + 1 {
                    Step::TooLong
                } else {
                    Step::NeedMore
                };
            };
            let line_end = self.framed + i + 1;
            if line_end > cap + 2 {
                // The command cannot end before this line end, and it is already over the cap.
                return Step::TooLong;
            }
            let Some((length, mode)) = literal_announced(&self.buf[self.framed..line_end]) else {
                return self.parse(line_end);
            };
            if self.literal_octets.saturating_add(length) > self.literal_max {
                return match mode {
                    // The client waits for our "+": refusing the command is enough.
                    LiteralMode::Sync => {
                        let tag = tag_of(&self.buf).unwrap_or_else(|| "*".to_string());
                        self.consume(line_end);
                        Step::LiteralRefused { tag }
                    }
                    // The octets are already on their way: we cannot find the next command.
                    LiteralMode::NonSync => Step::LiteralTooLarge,
                };
            }
            self.literal_octets += length;
            self.framed = line_end;
            self.literal_end = line_end + length;
            if mode == LiteralMode::Sync {
                return Step::SendContinuation;
            }
            // A non-synchronizing literal's octets follow at once: go on framing.
        }
    }

    /// Parses the whole command `buf[..end]` and removes it from the buffer. A command that
    /// needs a login is known by its tag and name alone: its arguments are not parsed, since
    /// the answer is the same whatever they are (a SEARCH of thousands of keys would cost
    /// more to parse than it cost the client to send).
    fn parse(&mut self, end: usize) -> Step {
        if let Some((tag, name)) = needs_login(&self.buf[..end]) {
            self.consume(end);
            return Step::Command(Parsed {
                tag,
                command: PreloginCommand::NeedsLogin { name },
            });
        }
        let step = match CommandCodec::default().decode(&self.buf[..end]) {
            // The parser must take the whole framed command; if it ever stopped short, the
            // framing and the parser would disagree about where the next command starts.
            Ok(([], command)) => Step::Command(Parsed {
                tag: command.tag.inner().to_string(),
                command: prelogin_command(command.body),
            }),
            // A framed command the parser finds incomplete or in need of more literals is
            // one it does not understand.
            Ok(_) | Err(_) => Step::Bad {
                tag: tag_of(&self.buf[..end]),
            },
        };
        self.consume(end);
        step
    }

    /// One line for an AUTHENTICATE exchange, without its line end; too long when that is
    /// over `line_max`, however the line arrived (whole, or in pieces: a piece ending in the
    /// CR of its CRLF is not over the cap yet).
    pub fn take_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        match memchr::memchr(b'\n', &self.buf) {
            Some(i) => {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.reset_command();
                if line.len() > self.line_max {
                    return Err(LineTooLong);
                }
                Ok(Some(line))
            }
            None => {
                let so_far = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
                if so_far.len() > self.line_max {
                    Err(LineTooLong)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// Commands valid only after login (RFC 9051 and the extensions imap-codec knows), as
/// imap-codec names them.
const NEEDS_LOGIN: &[&str] = &[
    "APPEND",
    "CHECK",
    "CLOSE",
    "COMPRESS",
    "COPY",
    "CREATE",
    "DELETE",
    "ENABLE",
    "EXAMINE",
    "EXPUNGE",
    "FETCH",
    "GETMETADATA",
    "GETQUOTA",
    "GETQUOTAROOT",
    "IDLE",
    "LIST",
    "LSUB",
    "MOVE",
    "NAMESPACE",
    "RENAME",
    "SEARCH",
    "SELECT",
    "SETMETADATA",
    "SETQUOTA",
    "SORT",
    "STATUS",
    "STORE",
    "SUBSCRIBE",
    "THREAD",
    "UNSELECT",
    "UNSUBSCRIBE",
];

/// The tag and name of a command that needs a login (`UID` and the command it carries count
/// as that command), read from its first line only.
fn needs_login(command: &[u8]) -> Option<(String, &'static str)> {
    let tag = tag_of(command)?;
    let mut words = command[tag.len() + 1..]
        .split(|&c| c == b' ' || c == b'\r' || c == b'\n')
        .take(2);
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case(b"UID") {
        name = words.next()?;
    }
    let name = NEEDS_LOGIN
        .iter()
        .find(|known| name.eq_ignore_ascii_case(known.as_bytes()))?;
    Some((tag, name))
}

/// The tag of a line we could not parse, if it starts with something tag-shaped, so the BAD
/// goes to the right command.
fn tag_of(buf: &[u8]) -> Option<String> {
    let end = buf
        .iter()
        .position(|&c| c == b' ' || c == b'\r' || c == b'\n')?;
    let tag = &buf[..end];
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag.iter().all(|&c| {
            c.is_ascii_graphic()
                && !matches!(c, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
        });
    ok.then(|| String::from_utf8_lossy(tag).into_owned())
}

/// The literal a line announces at its end (`{n}`, `{n+}`, or literal8's `~{n}`), before its
/// CRLF or bare LF. A quoted string cannot hold a line end, so `{n}` there is always one.
fn literal_announced(line: &[u8]) -> Option<(usize, LiteralMode)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inside = line.strip_suffix(b"}")?;
    let open = memchr::memrchr(b'{', inside)?;
    let (digits, mode) = match inside[open + 1..].strip_suffix(b"+") {
        Some(digits) => (digits, LiteralMode::NonSync),
        None => (&inside[open + 1..], LiteralMode::Sync),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Longer than any cap: saturate rather than overflow.
    let length = digits.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    });
    Some((length.unwrap_or(usize::MAX), mode))
}

fn astring_bytes(value: &AString<'_>) -> Vec<u8> {
    match value {
        AString::Atom(atom) => atom.inner().as_bytes().to_vec(),
        AString::String(string) => istring_bytes(string).to_vec(),
    }
}

fn istring_bytes<'a>(value: &'a IString<'_>) -> &'a [u8] {
    value.as_ref()
}

fn prelogin_command(body: CommandBody<'_>) -> PreloginCommand {
    match body {
        CommandBody::Capability => PreloginCommand::Capability,
        CommandBody::Noop => PreloginCommand::Noop,
        CommandBody::Logout => PreloginCommand::Logout,
        CommandBody::StartTLS => PreloginCommand::StartTls,
        CommandBody::Id { parameters } => PreloginCommand::Id(parameters.map(|params| {
            params
                .iter()
                .map(|(key, value)| {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    (
                        text(istring_bytes(key)),
                        value.0.as_ref().map(|v| text(istring_bytes(v))),
                    )
                })
                .collect()
        })),
        CommandBody::Login { username, password } => PreloginCommand::Login {
            user: astring_bytes(&username),
            password: Secret::new(astring_bytes(password.declassify())),
        },
        CommandBody::Authenticate {
            mechanism,
            initial_response,
        } => PreloginCommand::Authenticate {
            mechanism: mechanism.as_ref().to_ascii_uppercase(),
            initial_response: initial_response.map(|ir| Secret::new(ir.declassify().to_vec())),
        },
        other => PreloginCommand::NeedsLogin { name: other.name() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> CommandReader {
        CommandReader::new(1024, 600)
    }

    /// Feeds `input` in pieces of `chunk` bytes, as a client would: it stops after each
    /// synchronizing `{n}` line end until it gets the continuation. Returns every step that is
    /// not NeedMore, and checks that continuations come exactly where the client waits.
    fn run(input: &[u8], chunk: usize) -> Vec<Step> {
        let mut segments: Vec<&[u8]> = Vec::new();
        let mut rest = input;
        while let Some(i) = memchr::memmem::find(rest, b"}\r\n") {
            let sync = i > 0 && rest[i - 1] != b'+';
            segments.push(&rest[..i + 3]);
            rest = &rest[i + 3..];
            if sync {
                segments.push(b"<wait>");
            }
        }
        segments.push(rest);
        let mut r = reader();
        let mut steps = Vec::new();
        for segment in segments {
            if segment == b"<wait>" {
                assert_eq!(
                    steps.last(),
                    Some(&Step::SendContinuation),
                    "{input:?} chunk {chunk}"
                );
                continue;
            }
            for piece in segment.chunks(chunk.max(1)) {
                r.feed(piece);
                loop {
                    match r.step() {
                        Step::NeedMore => break,
                        s @ (Step::TooLong | Step::LiteralTooLarge) => {
                            steps.push(s);
                            return steps;
                        }
                        s => steps.push(s),
                    }
                }
            }
        }
        steps
    }

    fn login(tag: &str, user: &[u8], password: &[u8]) -> Step {
        Step::Command(Parsed {
            tag: tag.to_string(),
            command: PreloginCommand::Login {
                user: user.to_vec(),
                password: Secret::new(password.to_vec()),
            },
        })
    }

    #[test]
    fn every_login_form() {
        // (input, user, password, continuations the client waits for)
        type Case = (&'static [u8], &'static [u8], &'static [u8], usize);
        let cases: &[Case] = &[
            (b"a1 LOGIN alice secret\r\n", b"alice", b"secret", 0),
            (
                b"a1 login \"alice\" \"s p\\\"q\\\\\"\r\n",
                b"alice",
                b"s p\"q\\",
                0,
            ),
            (
                b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n",
                b"alice",
                b"secret",
                2,
            ),
            (
                b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n",
                b"alice",
                b"secret",
                0,
            ),
            (b"a1 LOGIN alice {0}\r\n\r\n", b"alice", b"", 1),
            (b"a1 LOGIN alice {4}\r\na\r\nb\r\n", b"alice", b"a\r\nb", 1),
            (
                b"a1 LOGIN alice \"p\xc3\xa4ss\"\r\n",
                b"alice",
                "päss".as_bytes(),
                0,
            ),
            (b"a1 LOGIN alice secret\n", b"alice", b"secret", 0),
        ];
        for &(input, user, password, continuations) in cases {
            // Every split position: whole, byte by byte, and everything in between.
            for chunk in 1..=input.len() {
                let steps = run(input, chunk);
                let sent = steps
                    .iter()
                    .filter(|s| **s == Step::SendContinuation)
                    .count();
                assert_eq!(sent, continuations, "{input:?} chunk {chunk}");
                assert_eq!(
                    steps.last(),
                    Some(&login("a1", user, password)),
                    "{input:?} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn pipelined_bytes_stay_buffered() {
        let mut r = reader();
        r.feed(b"a LOGIN u p\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n");
        assert_eq!(r.step(), login("a", b"u", b"p"));
        assert_eq!(r.take_buffered(), b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n");
    }

    #[test]
    fn authenticate_with_and_without_ir() {
        let mut r = reader();
        r.feed(
            b"x AUTHENTICATE plain AGEAYg==\r\ny AUTHENTICATE PLAIN\r\nz AUTHENTICATE PLAIN =\r\n",
        );
        let auth = |tag: &str, ir: Option<&[u8]>| {
            Step::Command(Parsed {
                tag: tag.into(),
                command: PreloginCommand::Authenticate {
                    mechanism: "PLAIN".into(),
                    initial_response: ir.map(|b| Secret::new(b.to_vec())),
                },
            })
        };
        assert_eq!(r.step(), auth("x", Some(b"\0a\0b")));
        assert_eq!(r.step(), auth("y", None));
        assert_eq!(r.step(), auth("z", Some(b"")));
    }

    #[test]
    fn simple_commands_and_login_required() {
        let mut r = reader();
        r.feed(b"1 CAPABILITY\r\n2 noop\r\n3 ID (\"name\" \"mutt\" \"version\" NIL)\r\n4 SELECT INBOX\r\n5 LOGOUT\r\n");
        let cmd = |tag: &str, command| {
            Step::Command(Parsed {
                tag: tag.into(),
                command,
            })
        };
        assert_eq!(r.step(), cmd("1", PreloginCommand::Capability));
        assert_eq!(r.step(), cmd("2", PreloginCommand::Noop));
        assert_eq!(
            r.step(),
            cmd(
                "3",
                PreloginCommand::Id(Some(vec![
                    ("name".into(), Some("mutt".into())),
                    ("version".into(), None)
                ]))
            )
        );
        assert_eq!(
            r.step(),
            cmd("4", PreloginCommand::NeedsLogin { name: "SELECT" })
        );
        assert_eq!(r.step(), cmd("5", PreloginCommand::Logout));
        assert_eq!(r.step(), Step::NeedMore);
    }

    #[test]
    fn login_required_by_name_whatever_the_arguments() {
        let mut r = CommandReader::new(65536, 600);
        let mut search = b"s SEARCH".to_vec();
        for _ in 0..2000 {
            search.extend_from_slice(b" TEXT {0+}\r\n");
        }
        search.extend_from_slice(b"\r\n");
        r.feed(&search);
        r.feed(b"u uid fetch 1:* (FLAGS\r\nb SELECT\r\nc UID\r\nd SELECTED x\r\n");
        let needs = |tag: &str, name| {
            Step::Command(Parsed {
                tag: tag.into(),
                command: PreloginCommand::NeedsLogin { name },
            })
        };
        assert_eq!(r.step(), needs("s", "SEARCH"));
        // Not parsed, so not a syntax error: the answer is "log in first" either way.
        assert_eq!(r.step(), needs("u", "FETCH"));
        assert_eq!(r.step(), needs("b", "SELECT"));
        assert_eq!(
            r.step(),
            Step::Bad {
                tag: Some("c".into())
            }
        );
        assert_eq!(
            r.step(),
            Step::Bad {
                tag: Some("d".into())
            }
        );
        assert_eq!(r.step(), Step::NeedMore);
    }

    #[test]
    fn garbage_gets_bad_with_its_tag_and_reading_goes_on() {
        let mut r = reader();
        r.feed(b"t1 FROB\r\n\x01\x02garbage\r\nt2 NOOP\r\n");
        assert_eq!(
            r.step(),
            Step::Bad {
                tag: Some("t1".into())
            }
        );
        assert_eq!(r.step(), Step::Bad { tag: None });
        assert!(matches!(r.step(), Step::Command(Parsed { tag, .. }) if tag == "t2"));
    }

    #[test]
    fn nul_in_a_literal_is_refused() {
        let steps = run(b"a LOGIN {3}\r\na\0b pass\r\n", 64);
        assert!(matches!(steps.last(), Some(Step::Bad { .. })), "{steps:?}");
    }

    #[test]
    fn oversized_line_is_too_long_even_without_a_line_end() {
        let mut r = reader();
        r.feed(&vec![b'a'; 1100]);
        assert_eq!(r.step(), Step::TooLong);
        let mut r = reader();
        let mut line = b"a LOGIN ".to_vec();
        line.extend(vec![b'x'; 1100]);
        line.extend(b" p\r\n");
        r.feed(&line);
        assert_eq!(r.step(), Step::TooLong);
    }

    #[test]
    fn oversized_literals() {
        let mut r = reader();
        r.feed(b"a LOGIN {601}\r\n");
        assert_eq!(r.step(), Step::LiteralRefused { tag: "a".into() });
        assert!(r.is_empty());
        let mut r = reader();
        r.feed(b"a LOGIN {601+}\r\n");
        assert_eq!(r.step(), Step::LiteralTooLarge);
        // Two literals that fit alone but not together.
        let mut r = reader();
        r.feed(b"a LOGIN {400}\r\n");
        assert_eq!(r.step(), Step::SendContinuation);
        r.feed(&[b'u'; 400]);
        r.feed(b" {400}\r\n");
        assert_eq!(r.step(), Step::LiteralRefused { tag: "a".into() });
    }

    /// A line of exactly `line_max` octets fits wherever the reads split it, CR and LF too.
    #[test]
    fn a_line_of_exactly_line_max_fits_however_it_is_split() {
        let mut line = b"a LOGIN u ".to_vec();
        line.resize(1024, b'x');
        line.extend_from_slice(b"\r\n");
        for split in [line.len() - 2, line.len() - 1, line.len()] {
            let mut r = reader();
            r.feed(&line[..split]);
            if split < line.len() {
                assert_eq!(r.step(), Step::NeedMore, "split at {split}");
                r.feed(&line[split..]);
            }
            assert!(
                matches!(r.step(), Step::Command(Parsed { ref tag, .. }) if tag == "a"),
                "split at {split}"
            );
        }
    }

    /// A refused synchronizing literal drops its own line only; the next command stands.
    #[test]
    fn refused_literal_leaves_the_next_command() {
        let mut r = reader();
        r.feed(b"a LOGIN {601}\r\nb NOOP\r\n");
        assert_eq!(r.step(), Step::LiteralRefused { tag: "a".into() });
        assert!(
            matches!(r.step(), Step::Command(Parsed { tag, command: PreloginCommand::Noop }) if tag == "b")
        );
    }

    #[test]
    fn room_shrinks_and_grows_with_literals() {
        let mut r = reader();
        assert_eq!(r.room(), 1026);
        r.feed(b"a LOGIN {500}\r\n");
        assert_eq!(r.step(), Step::SendContinuation);
        assert_eq!(r.room(), 1026 + 500 - 15);
    }

    /// RFC 2971's largest ID: 30 pairs, 30-octet fields, 1,024-octet values (~32 KB), with
    /// the default limits.
    #[test]
    fn maximum_size_id() {
        let pairs: Vec<String> = (0..30)
            .map(|i| {
                format!(
                    "\"{}\" \"{}\"",
                    format!("f{i:02}").repeat(10),
                    "v".repeat(1024)
                )
            })
            .collect();
        let line = format!("i ID ({})\r\n", pairs.join(" "));
        assert!(line.len() > 31_000, "{}", line.len());
        let mut r = CommandReader::new(65536, 8192);
        for piece in line.as_bytes().chunks(4096) {
            assert_eq!(r.step(), Step::NeedMore);
            r.feed(piece);
        }
        let Step::Command(Parsed {
            command: PreloginCommand::Id(Some(fields)),
            ..
        }) = r.step()
        else {
            panic!("not an ID");
        };
        assert_eq!(fields.len(), 30);
        assert_eq!(fields[29].1.as_deref(), Some("v".repeat(1024).as_str()));
    }

    /// A command of thousands of short lines (each ending in a `{0+}`) is framed line by line
    /// and parsed once, whole; the same with synchronizing literals, one "+" per literal.
    #[test]
    fn many_literal_lines_in_one_command() {
        for (announce, continuations) in [("{0+}", 0), ("{0}", 2000)] {
            let mut input = b"s LOGIN".to_vec();
            for _ in 0..2000 {
                input.extend_from_slice(format!(" {announce}\r\n").as_bytes());
            }
            input.extend_from_slice(b"\r\n");
            let mut r = CommandReader::new(65536, 600);
            let mut sent = 0;
            let mut last = Step::NeedMore;
            for piece in input.chunks(7) {
                r.feed(piece);
                loop {
                    match r.step() {
                        Step::NeedMore => break,
                        Step::SendContinuation => sent += 1,
                        other => last = other,
                    }
                }
            }
            assert_eq!(sent, continuations);
            // LOGIN takes two arguments, not 2,000: one BAD for the whole command.
            assert_eq!(
                last,
                Step::Bad {
                    tag: Some("s".into())
                }
            );
            assert!(r.is_empty());
        }
    }

    #[test]
    fn sasl_lines() {
        let mut r = reader();
        r.feed(b"dXNlcg==\r\n*\n");
        assert_eq!(r.take_line(), Ok(Some(b"dXNlcg==".to_vec())));
        assert_eq!(r.take_line(), Ok(Some(b"*".to_vec())));
        assert_eq!(r.take_line(), Ok(None));
        r.feed(&vec![b'A'; 1100]);
        assert_eq!(r.take_line(), Err(LineTooLong));
    }

    /// Found by the prelogin_reader fuzz target (30-minute campaign): a SASL line of exactly
    /// `line_max` octets was refused when a read ended between its CR and LF, and a longer one
    /// accepted when it came in one read. Now the same answer either way.
    #[test]
    fn sasl_line_cap_does_not_depend_on_reads() {
        let line = vec![b'A'; 1024];
        for cut in [1024, 1025] {
            let mut r = CommandReader::new(1024, 100);
            let mut stream = line.clone();
            stream.extend_from_slice(b"\r\n");
            r.feed(&stream[..cut]);
            assert_eq!(r.take_line(), Ok(None), "cut at {cut}");
            r.feed(&stream[cut..]);
            assert_eq!(r.take_line(), Ok(Some(line.clone())), "cut at {cut}");
        }
        let mut r = CommandReader::new(1024, 100);
        let mut longer = vec![b'A'; 1025];
        longer.extend_from_slice(b"\r\n");
        r.feed(&longer);
        assert_eq!(
            r.take_line(),
            Err(LineTooLong),
            "one octet over, in one read"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn imapish() -> impl Strategy<Value = Vec<u8>> {
        // Random bytes, salted with the pieces that steer the parser.
        let piece = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20),
            Just(b"a LOGIN ".to_vec()),
            Just(b"{5}\r\n".to_vec()),
            Just(b"{3+}\r\n".to_vec()),
            Just(b"{99999}\r\n".to_vec()),
            Just(b"\"q\\\"\" ".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"b AUTHENTICATE PLAIN ".to_vec()),
            Just(b"c ID (\"k\" NIL)\r\n".to_vec()),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        /// Whatever a client sends, in whatever pieces: no panic, and the buffer never holds
        /// more than the caps allow.
        #[test]
        fn any_input_is_bounded_and_never_panics(input in imapish(), chunk in 1usize..64) {
            let mut r = CommandReader::new(1024, 600);
            for piece in input.chunks(chunk) {
                r.feed(piece);
                loop {
                    prop_assert!(r.buf.len() <= 1024 + 600 + 2 + chunk);
                    match r.step() {
                        Step::NeedMore | Step::SendContinuation => break,
                        Step::TooLong | Step::LiteralTooLarge => return Ok(()),
                        _ => {}
                    }
                }
            }
        }
    }
}
