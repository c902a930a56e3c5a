//! Hard transcripts for the observer, each run whole, split at every position, and (in the
//! property test) cut into random reads: the observations must not change.

use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, Completion, bool)>>);

impl CommandSink for Recorder {
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>) {
        self.0
            .lock()
            .unwrap()
            .push((command.name(), completion, latency.is_some()));
    }

    fn compress_error(&self) {
        self.0
            .lock()
            .unwrap()
            .push((COMPRESS_ERROR, Completion::Unfinished, false));
    }
}

/// What `Recorder` writes for `CommandSink::compress_error`.
const COMPRESS_ERROR: &str = "<compress error>";

/// One step of a session: what the client sends, or what the backend sends.
#[derive(Clone, Debug)]
enum Step {
    C(&'static [u8]),
    S(&'static [u8]),
}
use Step::{C, S};

/// Runs `steps`, each cut into the reads given by `cuts(step index, length)`.
fn run_with(
    steps: &[Step],
    cuts: impl Fn(usize, usize) -> Vec<usize>,
) -> Vec<(&'static str, Completion, bool)> {
    run_compress(steps, cuts, CompressMode::Observe)
}

fn run_compress(
    steps: &[Step],
    cuts: impl Fn(usize, usize) -> Vec<usize>,
    compress: CompressMode,
) -> Vec<(&'static str, Completion, bool)> {
    let recorder = Recorder::default();
    {
        let mut observer = Observer::with_compress(&recorder, compress);
        for (i, step) in steps.iter().enumerate() {
            let bytes = match step {
                C(b) | S(b) => *b,
            };
            let mut at = 0;
            for cut in cuts(i, bytes.len()).into_iter().chain([bytes.len()]) {
                let piece = &bytes[at..cut.max(at)];
                at = cut.max(at);
                match step {
                    C(_) => observer.observe(Way::ClientToBackend, piece),
                    S(_) => observer.observe(Way::BackendToClient, piece),
                }
            }
        }
        // Dropping the observer reports what is still in flight.
    }
    recorder.0.into_inner().unwrap()
}

fn run(steps: &[Step]) -> Vec<(&'static str, Completion, bool)> {
    run_with(steps, |_, _| vec![])
}

/// Whole, then every single cut position in every step.
fn check(steps: &[Step], expected: &[(&'static str, Completion, bool)]) {
    assert_eq!(run(steps), expected, "whole");
    for (i, step) in steps.iter().enumerate() {
        let len = match step {
            C(b) | S(b) => b.len(),
        };
        for cut in 1..len {
            let got = run_with(steps, |j, _| if j == i { vec![cut] } else { vec![] });
            assert_eq!(got, expected, "step {i} cut at {cut}");
        }
        // And byte by byte.
        let got = run_with(steps, |j, n| if j == i { (1..n).collect() } else { vec![] });
        assert_eq!(got, expected, "step {i} byte by byte");
    }
}

const OK: Completion = Completion::Ok;

#[test]
fn simple_commands_and_names() {
    check(
        &[
            C(b"a1 select INBOX\r\n"),
            S(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 1] x\r\na1 OK [READ-WRITE] done\r\n"),
            C(b"a2 uid fetch 1:* FLAGS\r\n"),
            S(b"* 1 FETCH (FLAGS ())\r\na2 OK done\r\n"),
            C(b"a3 XYZZY\r\n"),
            S(b"a3 BAD unknown\r\n"),
        ],
        &[
            ("SELECT", OK, true),
            ("UID FETCH", OK, true),
            ("other", Completion::Bad, true),
        ],
    );
}

#[test]
fn literals_with_crlf_braces_and_fake_completions_inside() {
    // The APPEND literal holds CRLF, "{5}" at a line end and a line that looks like a completion.
    check(
        &[
            C(b"a1 APPEND INBOX {30}\r\n"),
            S(b"+ go ahead\r\n"),
            C(b"x\r\na1 OK fake\r\nb2 NOOP {5}\r\n)\r\n"),
            S(b"a1 OK APPEND done\r\n"),
            C(b"a2 NOOP\r\n"),
            S(b"a2 OK\r\n"),
        ],
        &[("APPEND", OK, true), ("NOOP", OK, true)],
    );
}

#[test]
fn empty_nonsync_and_binary_literals() {
    check(
        &[
            C(b"a1 APPEND INBOX {0+}\r\n\r\na2 APPEND INBOX ~{6+}\r\n\0\r\n\x01{2}\r\n"),
            S(b"a1 NO [TOOBIG] empty\r\na2 OK done\r\n"),
            C(b"a3 FETCH 1 BINARY[]\r\n"),
            S(b"* 1 FETCH (BINARY[] ~{7}\r\na3 OK x)\r\na3 OK done\r\n"),
        ],
        &[
            ("APPEND", Completion::No, true),
            ("APPEND", OK, true),
            ("FETCH", OK, true),
        ],
    );
}

#[test]
fn fetch_with_several_literals_and_pipelined_out_of_order() {
    check(
        &[
            C(b"f1 FETCH 1 (BODY[HEADER] BODY[TEXT])\r\nf2 NOOP\r\nf3 SEARCH ALL\r\n"),
            S(b"* 1 FETCH (BODY[HEADER] {12}\r\nf1 OK x\r\n\r\n BODY[TEXT] {8}\r\n{5}\r\nab\r\n)\r\n"),
            S(b"f3 OK search\r\nf2 OK noop\r\nf1 OK fetch\r\n"),
        ],
        &[("SEARCH", OK, true), ("NOOP", OK, true), ("FETCH", OK, true)],
    );
}

#[test]
fn idle_with_updates_and_done() {
    check(
        &[
            C(b"i1 IDLE\r\n"),
            S(b"+ idling\r\n* 4 EXISTS\r\n* 1 RECENT\r\n"),
            C(b"DONE\r\n"),
            S(b"i1 OK IDLE terminated\r\n"),
            C(b"i2 NOOP\r\n"),
            S(b"i2 OK\r\n"),
        ],
        // IDLE has no latency: its duration is the client's choice.
        &[("IDLE", OK, false), ("NOOP", OK, true)],
    );
}

#[test]
fn refused_idle_and_refused_literal_leave_no_phantom() {
    check(
        &[
            C(b"i1 IDLE\r\n"),
            S(b"i1 NO not now\r\n"),
            C(b"a1 LOGIN {5}\r\n"),
            S(b"a1 BAD no literal for you\r\n"),
            C(b"a2 NOOP\r\n"),
            S(b"a2 OK\r\n"),
        ],
        &[
            ("IDLE", Completion::No, false),
            ("LOGIN", Completion::Bad, true),
            ("NOOP", OK, true),
        ],
    );
}

#[test]
fn authenticate_lines_are_not_commands() {
    check(
        &[
            C(b"a1 AUTHENTICATE PLAIN\r\n"),
            S(b"+ \r\n"),
            C(b"AGEAYg==\r\n"),
            S(b"a1 OK done\r\n"),
            C(b"a2 NOOP\r\n"),
            S(b"a2 OK\r\n"),
        ],
        &[("AUTHENTICATE", OK, true), ("NOOP", OK, true)],
    );
}

#[test]
fn compress_bytes_only_stops_parsing_after_the_ok() {
    let steps = [
        C(b"z1 COMPRESS DEFLATE\r\n"),
        S(b"z1 OK DEFLATE active\r\n\x78\x9c z2 OK {5}\r\n"),
        C(b"\x78\x9cz3 NOOP\r\n"),
    ];
    assert_eq!(
        run_compress(&steps, |_, _| vec![], CompressMode::BytesOnly),
        [("COMPRESS", OK, true)]
    );
}

#[test]
fn compress_observed_not_deflate_is_an_error_not_a_command() {
    // The same octets observed: they are not DEFLATE, so observing stops (counted), and
    // nothing after COMPRESS is taken for a command.
    check(
        &[
            C(b"z1 COMPRESS DEFLATE\r\n"),
            S(b"z1 OK DEFLATE active\r\n\xff\xff z2 OK {5}\r\n"),
            C(b"\xff\xffz3 NOOP\r\n"),
        ],
        &[
            ("COMPRESS", OK, true),
            (COMPRESS_ERROR, Completion::Unfinished, false),
        ],
    );
}

#[test]
fn refused_compress_keeps_parsing() {
    check(
        &[
            C(b"z1 COMPRESS DEFLATE\r\n"),
            S(b"z1 NO not here\r\n"),
            C(b"z2 NOOP\r\n"),
            S(b"z2 OK\r\n"),
        ],
        &[("COMPRESS", Completion::No, true), ("NOOP", OK, true)],
    );
}

#[test]
fn unanswered_commands_are_unfinished_or_bye() {
    assert_eq!(
        run(&[C(b"a1 NOOP\r\na2 FETCH 1 FLAGS\r\n")]),
        [
            ("NOOP", Completion::Unfinished, false),
            ("FETCH", Completion::Unfinished, false)
        ]
    );
    assert_eq!(
        run(&[C(b"a1 LOGOUT\r\n"), S(b"* BYE bye\r\n")]),
        [("LOGOUT", Completion::Bye, false)]
    );
}

#[test]
fn in_flight_table_is_bounded() {
    let many: &'static [u8] = Box::leak(
        (0..IN_FLIGHT_MAX + 72)
            .map(|i| format!("t{i} NOOP\r\n"))
            .collect::<String>()
            .into_bytes()
            .into_boxed_slice(),
    );
    let recorder = Recorder::default();
    let mut observer = Observer::new(&recorder);
    observer.observe(Way::ClientToBackend, many);
    assert_eq!(observer.in_flight(), IN_FLIGHT_MAX);
    assert_eq!(
        recorder.0.lock().unwrap().len(),
        72,
        "the oldest were given up"
    );
}

#[test]
fn command_names() {
    assert_eq!(CommandId::lookup(b"uid", b"Expunge").name(), "UID EXPUNGE");
    assert_eq!(CommandId::lookup(b"UID", b"FOO").name(), "other");
    assert_eq!(
        CommandId::lookup(b"getquotaroot", b"").name(),
        "GETQUOTAROOT"
    );
    assert_eq!(CommandId::lookup(&[b'A'; 40], b"").name(), "other");
}

/// A recorded session with every hard case in it.
fn recorded() -> Vec<Step> {
    vec![
        C(b"a1 SELECT INBOX\r\na2 FETCH 1:2 (BODY[] FLAGS)\r\n"),
        S(b"* 2 EXISTS\r\na1 OK [READ-WRITE] ok\r\n"),
        S(b"* 1 FETCH (BODY[] {19}\r\nline\r\na2 OK fake\r\n FLAGS (\\Seen))\r\n* 2 FETCH (BODY[] {0}\r\n FLAGS ())\r\na2 OK done\r\n"),
        C(b"a3 APPEND INBOX (\\Seen) {12}\r\n"),
        S(b"+ Ready\r\n"),
        C(b"{3}\r\nab\r\n{}\r\n"),
        S(b"a3 OK [APPENDUID 1 3] ok\r\n"),
        C(b"a4 IDLE\r\n"),
        S(b"+ idling\r\n* 3 EXISTS\r\n"),
        C(b"done\r\n"),
        S(b"a4 OK idle done\r\n"),
        C(b"a5 UID STORE 3 +FLAGS (\\Deleted)\r\na6 UID EXPUNGE 3\r\na7 BOGUS\r\n"),
        S(b"* 3 FETCH (FLAGS (\\Deleted))\r\na5 OK\r\n* 3 EXPUNGE\r\na7 BAD what\r\na6 OK\r\n"),
        C(b"a8 LOGOUT\r\n"),
        S(b"* BYE see you\r\na8 OK bye\r\n"),
    ]
}

#[test]
fn recorded_session_every_cut() {
    check(
        &recorded(),
        &[
            ("SELECT", OK, true),
            ("FETCH", OK, true),
            ("APPEND", OK, true),
            ("IDLE", OK, false),
            ("UID STORE", OK, true),
            ("other", Completion::Bad, true),
            ("UID EXPUNGE", OK, true),
            ("LOGOUT", OK, true),
        ],
    );
}

proptest! {
    /// Cutting the recorded session into random reads gives the same observations as whole.
    #[test]
    fn random_reads_observe_the_same(seed in proptest::collection::vec(1usize..40, 1..200)) {
        let steps = recorded();
        let whole = run(&steps);
        let cut = run_with(&steps, |i, len| {
            let mut at = 0;
            let mut cuts = Vec::new();
            let mut k = i;
            while at < len {
                at += seed[k % seed.len()];
                k += 1;
                if at < len {
                    cuts.push(at);
                }
            }
            cuts
        });
        prop_assert_eq!(whole, cut);
    }
}

#[test]
fn literal_left_is_what_the_relay_may_splice() {
    let recorder = Recorder::default();
    let mut observer = Observer::new(&recorder);
    observer.observe(Way::ClientToBackend, b"a1 FETCH 1 BODY[]\r\n");
    observer.observe(Way::BackendToClient, b"* 1 FETCH (BODY[] {100000}\r\nabc");
    assert_eq!(observer.literal_left(Way::BackendToClient), 100_000 - 3);
    observer.literal_passed(Way::BackendToClient, 100_000 - 4);
    assert_eq!(observer.literal_left(Way::BackendToClient), 1);
    observer.observe(Way::BackendToClient, b"d)\r\na1 OK done\r\n");
    assert_eq!(observer.literal_left(Way::BackendToClient), 0);
    // A client's non-synchronizing literal: its octets may pass unseen at once.
    observer.observe(Way::ClientToBackend, b"a2 APPEND INBOX {70000+}\r\n");
    assert_eq!(observer.literal_left(Way::ClientToBackend), 70_000);
    observer.literal_passed(Way::ClientToBackend, 70_000);
    observer.observe(Way::ClientToBackend, b"\r\n");
    observer.observe(Way::BackendToClient, b"a2 OK appended\r\n");
    drop(observer);
    assert_eq!(
        recorder.0.into_inner().unwrap(),
        [("FETCH", OK, true), ("APPEND", OK, true)]
    );
}

/// Both peers of a compressed session: each direction one raw DEFLATE stream, sync-flushed
/// after each step (RFC 4978: a compressor flushes after each command and response).
struct Deflaters {
    client: flate2::Compress,
    backend: flate2::Compress,
}

impl Deflaters {
    fn new() -> Self {
        Deflaters {
            client: flate2::Compress::new(flate2::Compression::default(), false),
            backend: flate2::Compress::new(flate2::Compression::default(), false),
        }
    }

    fn deflate(z: &mut flate2::Compress, plain: &[u8]) -> &'static [u8] {
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain;
        loop {
            let before = z.total_in();
            z.compress_vec(input, &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            input = &input[(z.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(64 * 1024);
        }
        Box::leak(out.into_boxed_slice())
    }

    /// `steps` as they go on the wire after COMPRESS's OK.
    fn step(&mut self, step: &Step) -> Step {
        match step {
            C(b) => C(Self::deflate(&mut self.client, b)),
            S(b) => S(Self::deflate(&mut self.backend, b)),
        }
    }
}

/// COMPRESS accepted, then `after` compressed; the backend's first compressed octets come in
/// the same read as its OK.
fn compressed(after: &[Step]) -> Vec<Step> {
    let mut z = Deflaters::new();
    let mut steps = vec![C(b"z1 COMPRESS DEFLATE\r\n")];
    let mut ok = b"z1 OK DEFLATE active\r\n".to_vec();
    // An untagged line, compressed, right behind the OK (Dovecot sends nothing, others may).
    if let S(first) = z.step(&S(b"* 0 RECENT\r\n")) {
        ok.extend_from_slice(first);
    }
    steps.push(S(Box::leak(ok.into_boxed_slice())));
    steps.extend(after.iter().map(|s| z.step(s)));
    steps
}

#[test]
fn compressed_session_every_cut() {
    let mut expected = vec![("COMPRESS", OK, true)];
    expected.extend([
        ("SELECT", OK, true),
        ("FETCH", OK, true),
        ("APPEND", OK, true),
        ("IDLE", OK, false),
        ("UID STORE", OK, true),
        ("other", Completion::Bad, true),
        ("UID EXPUNGE", OK, true),
        ("LOGOUT", OK, true),
    ]);
    check(&compressed(&recorded()), &expected);
    // bytes_only: nothing after COMPRESS.
    assert_eq!(
        run_compress(
            &compressed(&recorded()),
            |_, _| vec![],
            CompressMode::BytesOnly
        ),
        [("COMPRESS", OK, true)]
    );
}

proptest! {
    /// A compressed session cut into random reads observes what it does whole.
    #[test]
    fn compressed_random_reads_observe_the_same(seed in proptest::collection::vec(1usize..40, 1..200)) {
        let steps = compressed(&recorded());
        let whole = run(&steps);
        let cut = run_with(&steps, |i, len| {
            let mut at = 0;
            let mut cuts = Vec::new();
            let mut k = i;
            while at < len {
                at += seed[k % seed.len()];
                k += 1;
                if at < len {
                    cuts.push(at);
                }
            }
            cuts
        });
        prop_assert_eq!(whole.len(), 9);
        prop_assert_eq!(whole, cut);
    }
}

#[test]
fn compressed_big_literals_are_read_not_spliced() {
    // A 300 KB FETCH body and APPEND literal, inflated through many scratch buffers, holding
    // lines that look like completions; the relay must never splice a compressed stream.
    let body: &'static [u8] = Box::leak(
        (0..20_000u32)
            .flat_map(|i| format!("{i:05} a1 OK {{5}}\r\n").into_bytes())
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    let head: &'static [u8] = Box::leak(
        format!("* 1 FETCH (BODY[] {{{}}}\r\n", body.len())
            .into_bytes()
            .into_boxed_slice(),
    );
    let append: &'static [u8] = Box::leak(
        format!("a2 APPEND INBOX {{{}+}}\r\n", body.len())
            .into_bytes()
            .into_boxed_slice(),
    );
    let steps = compressed(&[
        C(b"a1 FETCH 1 BODY[]\r\n"),
        S(head),
        S(body),
        S(b")\r\na1 OK done\r\n"),
        C(append),
        C(body),
        C(b"\r\n"),
        S(b"a2 OK appended\r\n"),
    ]);
    let recorder = Recorder::default();
    let mut observer = Observer::new(&recorder);
    for (i, step) in steps.iter().enumerate() {
        let (way, bytes) = match step {
            C(b) => (Way::ClientToBackend, *b),
            S(b) => (Way::BackendToClient, *b),
        };
        for piece in bytes.chunks(1500) {
            observer.observe(way, piece);
            assert_eq!(observer.literal_left(way), 0, "nothing may pass unseen");
            if i > 0 {
                // From the backend's OK on, no wire offset is a known boundary.
                assert_eq!(observer.at_boundary(way), None);
            }
        }
    }
    drop(observer);
    assert_eq!(
        recorder.0.into_inner().unwrap(),
        [
            ("COMPRESS", OK, true),
            ("FETCH", OK, true),
            ("APPEND", OK, true)
        ]
    );
}

#[test]
fn compress_refused_inside_compression_keeps_observing() {
    // A second COMPRESS inside a compressed session is refused (RFC 4978 COMPRESSIONACTIVE):
    // the stream stays as it is and the next commands are still seen.
    let steps = compressed(&[
        C(b"z2 COMPRESS DEFLATE\r\n"),
        S(b"z2 NO [COMPRESSIONACTIVE] already\r\n"),
        C(b"a1 NOOP\r\n"),
        S(b"a1 OK\r\n"),
    ]);
    check(
        &steps,
        &[
            ("COMPRESS", OK, true),
            ("COMPRESS", Completion::No, true),
            ("NOOP", OK, true),
        ],
    );
}

#[test]
fn corrupt_stream_stops_observing_only() {
    // The backend's stream turns to garbage in the middle of a FETCH: observing stops (one
    // error), the FETCH in flight is given up as unfinished at once (after the error), later octets are ignored
    // without a panic, and nothing is ever offered for splicing.
    let mut steps = compressed(&[
        C(b"a1 FETCH 1 BODY[]\r\n"),
        S(b"* 1 FETCH (BODY[] {10}\r\n"),
    ]);
    steps.push(S(&[0xff; 200]));
    steps.push(C(b"a2 NOOP\r\n"));
    steps.push(S(b"a2 OK\r\n"));
    let recorder = Recorder::default();
    let mut observer = Observer::new(&recorder);
    for step in &steps {
        match step {
            C(b) => observer.observe(Way::ClientToBackend, b),
            S(b) => observer.observe(Way::BackendToClient, b),
        }
    }
    for way in [Way::ClientToBackend, Way::BackendToClient] {
        assert_eq!(observer.literal_left(way), 0);
        assert_eq!(observer.at_boundary(way), None);
    }
    assert_eq!(observer.in_flight(), 0);
    drop(observer);
    assert_eq!(
        recorder.0.into_inner().unwrap(),
        [
            ("COMPRESS", OK, true),
            (COMPRESS_ERROR, Completion::Unfinished, false),
            ("FETCH", Completion::Unfinished, false),
        ]
    );
}
