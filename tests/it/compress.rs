//! COMPRESS=DEFLATE (RFC 4978) through imapgate against a real Dovecot with `imap_zlib`: the
//! compressed octets are relayed unchanged (byte-exact APPEND and FETCH), and with
//! `metrics.compress: observe` the commands inside the compressed session are counted exactly
//! as the same commands in a plain session; with `bytes_only` they are not.

use std::collections::BTreeMap;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::dovecot::{self, Dovecot, Options};
use crate::support::{DEADLINE, Proxy, config, metrics_when, sample};

fn compressing_backend() -> Option<Dovecot> {
    dovecot::available().then(|| {
        Dovecot::start_with(
            "b1",
            Options {
                compress: true,
                ..Options::default()
            },
        )
    })
}

/// A client that speaks plain IMAP, or raw DEFLATE both ways after `compress()`, flushing
/// (sync flush) after every write as RFC 4978 asks.
struct Client {
    stream: TcpStream,
    /// Plain (inflated) octets read and not yet returned.
    plain: Vec<u8>,
    deflate: Option<(Compress, Decompress)>,
}

impl Client {
    async fn connect(proxy: &Proxy) -> Client {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(proxy.addr))
            .await
            .expect("connect deadline")
            .expect("connect");
        Client {
            stream,
            plain: Vec::new(),
            deflate: None,
        }
    }

    async fn send(&mut self, plain: impl AsRef<[u8]>) {
        let plain = plain.as_ref();
        let wire = match &mut self.deflate {
            None => plain.to_vec(),
            Some((z, _)) => deflate(z, plain),
        };
        self.stream.write_all(&wire).await.expect("write");
    }

    /// Reads once more from the socket (inflating when compressed).
    async fn fill(&mut self) {
        let mut chunk = vec![0u8; 65536];
        let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
            .await
            .expect("read deadline: the peer said nothing")
            .expect("read");
        assert!(
            n > 0,
            "the connection closed; read so far: {:?}",
            String::from_utf8_lossy(&self.plain)
        );
        match &mut self.deflate {
            None => self.plain.extend_from_slice(&chunk[..n]),
            Some((_, z)) => inflate(z, &chunk[..n], &mut self.plain),
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.plain.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.plain.drain(..=i).collect();
                return String::from_utf8_lossy(&line).into_owned();
            }
            self.fill().await;
        }
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.plain.len() < n {
            self.fill().await;
        }
        self.plain.drain(..n).collect()
    }

    async fn until_tagged(&mut self, tag: &str) -> String {
        let prefix = format!("{tag} ");
        loop {
            let line = self.line().await;
            if line.starts_with(&prefix) {
                return line;
            }
        }
    }

    /// `COMPRESS DEFLATE`; both directions are compressed after the OK line.
    async fn compress(&mut self) {
        self.send("z COMPRESS DEFLATE\r\n").await;
        let answer = self.until_tagged("z").await;
        assert!(answer.starts_with("z OK"), "{answer}");
        let mut z = (
            Compress::new(Compression::default(), false),
            Decompress::new(false),
        );
        // Whatever came after the OK line is compressed already.
        let rest = std::mem::take(&mut self.plain);
        inflate(&mut z.1, &rest, &mut self.plain);
        self.deflate = Some(z);
    }
}

fn deflate(z: &mut Compress, mut input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 2 + 128);
    loop {
        let before = z.total_in();
        z.compress_vec(input, &mut out, FlushCompress::Sync)
            .expect("deflate");
        input = &input[(z.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(64 * 1024);
    }
}

fn inflate(z: &mut Decompress, mut input: &[u8], out: &mut Vec<u8>) {
    loop {
        out.reserve(64 * 1024);
        let before = z.total_in();
        z.decompress_vec(input, out, FlushDecompress::None)
            .expect("the proxy relays valid DEFLATE");
        input = &input[(z.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return;
        }
    }
}

/// A 200 KB message of printable lines, some of which look like IMAP to tempt a parser.
fn message() -> Vec<u8> {
    let mut message = b"From: a@example.net\r\nSubject: compressed\r\n\r\n".to_vec();
    let mut x: u32 = 7;
    while message.len() < 200 * 1024 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let line = format!(
            "{x:08x} a1 OK {{5}} * BYE {}\r\n",
            "q".repeat((x % 50) as usize)
        );
        message.extend_from_slice(line.as_bytes());
    }
    message
}

/// The session both tests run: SELECT, APPEND (synchronizing literal), FETCH of the message
/// back (compared byte for byte), NOOP, IDLE + DONE, LOGOUT; `COMPRESS DEFLATE` first when
/// `compress`.
async fn session(proxy: &Proxy, user: &str, password: &str, compress: bool) {
    let mut c = Client::connect(proxy).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.send(format!("l LOGIN {user} {password}\r\n")).await;
    let answer = c.until_tagged("l").await;
    assert!(answer.starts_with("l OK"), "{answer}");
    if compress {
        c.compress().await;
    }
    c.send("s SELECT INBOX\r\n").await;
    assert!(c.until_tagged("s").await.starts_with("s OK"));
    let message = message();
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    let go = c.line().await;
    assert!(go.starts_with('+'), "{go}");
    c.send(&message).await;
    c.send("\r\n").await;
    let appended = c.until_tagged("a").await;
    assert!(appended.starts_with("a OK"), "{appended}");
    c.send("f FETCH 1 BODY.PEEK[]\r\n").await;
    let header = c.line().await;
    let size = format!("{{{}}}\r\n", message.len());
    assert!(
        header.starts_with("* 1 FETCH") && header.ends_with(&size),
        "{header:?}"
    );
    let body = c.bytes(message.len()).await;
    assert!(
        body == message,
        "the fetched message differs from the appended one"
    );
    assert!(c.until_tagged("f").await.starts_with("f OK"));
    c.send("n NOOP\r\n").await;
    assert!(c.until_tagged("n").await.starts_with("n OK"));
    c.send("i IDLE\r\n").await;
    let idling = c.line().await;
    assert!(idling.starts_with('+'), "{idling}");
    c.send("DONE\r\n").await;
    assert!(c.until_tagged("i").await.starts_with("i OK"));
    c.send("o LOGOUT\r\n").await;
    assert!(c.until_tagged("o").await.starts_with("o OK"));
}

/// `imapgate_commands_total` and the duration counts, by their labels.
fn command_counts(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("imapgate_commands_total{")
                || l.starts_with("imapgate_command_duration_seconds_count{")
        })
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// What changed between two scrapes (zero changes left out).
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// Runs a session and returns the change in the command counters once it has ended.
async fn counted(
    proxy: &Proxy,
    user: &str,
    password: &str,
    compress: bool,
) -> BTreeMap<String, f64> {
    let before = command_counts(&proxy.metrics().await);
    session(proxy, user, password, compress).await;
    let after = metrics_when(proxy, |m| {
        sample(m, "imapgate_sessions_active", "backend=\"b1\"") == Some(0.0)
    })
    .await;
    delta(&before, &command_counts(&after))
}

fn compress_errors(metrics: &str) -> Option<f64> {
    sample(metrics, "imapgate_compress_observe_errors_total", "")
}

#[tokio::test]
async fn compressed_session_is_byte_exact_and_counted_like_a_plain_one() {
    let Some(b1) = compressing_backend() else {
        return;
    };
    let proxy = Proxy::start(&config(&[("b1", b1.address())], "")).await;
    let plain = counted(&proxy, "alice", "alice-secret", false).await;
    let compressed = counted(&proxy, "bob", "bob-secret", true).await;
    let mut expected = plain.clone();
    expected.insert(
        "imapgate_commands_total{command=\"COMPRESS\",status=\"ok\"}".into(),
        1.0,
    );
    expected.insert(
        "imapgate_command_duration_seconds_count{command=\"COMPRESS\"}".into(),
        1.0,
    );
    assert_eq!(compressed, expected, "plain session: {plain:#?}");
    // The plain session's deltas are what it did (so the comparison means something).
    for command in ["SELECT", "APPEND", "FETCH", "NOOP", "IDLE", "LOGOUT"] {
        let key = format!("imapgate_commands_total{{command=\"{command}\",status=\"ok\"}}");
        assert_eq!(plain.get(&key), Some(&1.0), "{key} in {plain:#?}");
    }
    let m = proxy.metrics().await;
    assert_eq!(compress_errors(&m), Some(0.0));
    proxy.stop().await;
}

#[tokio::test]
async fn bytes_only_counts_nothing_after_compress() {
    let Some(b1) = compressing_backend() else {
        return;
    };
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "metrics: { compress: bytes_only }\n",
    ))
    .await;
    let bytes = |m: &str| {
        sample(
            m,
            "imapgate_bytes_total",
            "backend=\"b1\",direction=\"backend_to_client\"",
        )
        .unwrap_or(0.0)
    };
    let before = bytes(&proxy.metrics().await);
    let compressed = counted(&proxy, "carol", "carol-secret", true).await;
    let expected: BTreeMap<String, f64> = [
        (
            "imapgate_commands_total{command=\"COMPRESS\",status=\"ok\"}".to_string(),
            1.0,
        ),
        (
            "imapgate_command_duration_seconds_count{command=\"COMPRESS\"}".to_string(),
            1.0,
        ),
    ]
    .into();
    assert_eq!(compressed, expected);
    // The bytes are still counted: the compressed 200 KB message came back through.
    let m = proxy.metrics().await;
    assert!(bytes(&m) - before > 10_000.0, "{m}");
    assert_eq!(compress_errors(&m), Some(0.0));
    proxy.stop().await;
}

/// A backend whose "compressed" stream is not DEFLATE (a scripted one: no real server sends
/// garbage): the observing stops and is counted once, and every octet still goes through
/// both ways, unchanged, in a session that stays open.
#[tokio::test]
async fn a_stream_that_cannot_be_inflated_stops_the_observing_only() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap().to_string();
    // 0xff opens a block of the reserved type 3: invalid from its first octet.
    let garbage: Vec<u8> = (0..5000u32).map(|i| 0xff ^ (i % 3) as u8).collect();
    let echo: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (garbage_out, echo_len) = (garbage.clone(), echo.len());
    let script = tokio::spawn(async move {
        // Health checks come and go (greeting, LOGOUT); the login is the one that stays.
        let (lines, mut write) = loop {
            let (tcp, _) = backend.accept().await.unwrap();
            let (read, mut write) = tcp.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] ready.\r\n")
                .await
                .unwrap();
            match lines.next_line().await {
                Ok(Some(login)) if login.starts_with("ig1 LOGIN ") => break (lines, write),
                _ => continue,
            }
        };
        write
            .write_all(b"ig1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] in\r\n")
            .await
            .unwrap();
        let mut lines = lines;
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            "z COMPRESS DEFLATE"
        );
        let mut answer = b"z OK DEFLATE active\r\n".to_vec();
        answer.extend_from_slice(&garbage_out);
        write.write_all(&answer).await.unwrap();
        // Then an echo of what the client sends.
        let mut read = lines.into_inner();
        let mut got = vec![0u8; echo_len];
        read.read_exact(&mut got).await.unwrap();
        write.write_all(&got).await.unwrap();
        // Open until the client has read it all.
        let _ = read.read(&mut [0u8; 1]).await;
    });
    let proxy = Proxy::start(&config(&[("b1", addr)], "")).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice secret\r\n").await;
    let (_, ok) = c.until_tagged("a").await;
    assert!(ok.starts_with("a OK"), "{ok}");
    c.send("z COMPRESS DEFLATE\r\n").await;
    assert_eq!(c.line().await.unwrap(), "z OK DEFLATE active\r\n");
    assert!(
        c.bytes(garbage.len()).await == garbage,
        "backend → client unchanged"
    );
    c.send(&echo).await;
    assert!(
        c.bytes(echo.len()).await == echo,
        "client → backend → client unchanged"
    );
    let m = metrics_when(&proxy, |m| compress_errors(m) == Some(1.0)).await;
    assert_eq!(
        sample(
            &m,
            "imapgate_commands_total",
            "command=\"COMPRESS\",status=\"ok\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "imapgate_sessions_active", "backend=\"b1\""),
        Some(1.0),
        "the session goes on"
    );
    let bytes = |direction: &str| {
        sample(
            &m,
            "imapgate_bytes_total",
            &format!("backend=\"b1\",direction=\"{direction}\""),
        )
        .unwrap_or(0.0)
    };
    assert!(
        bytes("backend_to_client") >= (garbage.len() + echo.len()) as f64,
        "{m}"
    );
    assert!(bytes("client_to_backend") >= echo.len() as f64, "{m}");
    drop(c);
    tokio::time::timeout(DEADLINE, script)
        .await
        .expect("script deadline")
        .expect("the backend saw what it expected");
    proxy.stop().await;
}
