//! Thin wrappers over the crate's internal parsers for the cargo-fuzz targets in `fuzz/`
//! (feature `fuzzing`, off by default; not a stable API). Each wrapper drives a parser the way
//! the proxy does and asserts the invariants a fuzzer should check (no panic, bounded
//! buffering, the same result whatever the read boundaries); a violated invariant panics.

use std::io;
use std::net::SocketAddr;

use crate::imap::command::{CommandReader, PreloginCommand, Step};
use crate::imap::sasl::{self, Credentials, Mechanism, SaslLine};
use crate::imap::secret::Secret;

/// A tiny deterministic generator for read sizes (xorshift32), so a target's input can be a
/// seed followed by the raw stream and corpus files stay readable transcripts.
pub struct Cuts(u32);

impl Cuts {
    pub fn new(seed: u32) -> Self {
        Cuts(seed | 1)
    }

    /// The next read size, 1..=max.
    pub fn read_size(&mut self, max: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        1 + (x as usize) % max.max(1)
    }
}

/// What the pre-login reader answered, in order (`NeedMore` left out); the tag and command
/// name only, so two runs can be compared.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Continuation,
    Command(String, String),
    SaslLine(Vec<u8>),
    Bad(Option<String>),
    LiteralRefused(String),
    TooLong,
    LiteralTooLarge,
    SaslLineTooLong,
}

/// Feeds `stream` to a pre-login reader the way the session reads (at most `room()` and
/// 4 KiB per read), with read sizes from `cuts` (`None`: as much as allowed), and steps it
/// until it needs more. After an `AUTHENTICATE` without an initial response, one SASL line is
/// taken. Stops at `TooLong`/`LiteralTooLarge` (the session closes). Panics if the buffer
/// ever holds more than `line_max + literal_max + 3` octets.
pub fn prelogin_reader(
    line_max: usize,
    literal_max: usize,
    stream: &[u8],
    mut cuts: Option<Cuts>,
) -> Vec<Seen> {
    let mut reader = CommandReader::new(line_max, literal_max);
    let bound = line_max + literal_max + 3;
    let mut seen = Vec::new();
    let mut sasl_line = false;
    let mut at = 0;
    loop {
        // Take everything the reader can give before reading more.
        loop {
            if sasl_line {
                match reader.take_line() {
                    Ok(Some(line)) => {
                        seen.push(Seen::SaslLine(line));
                        sasl_line = false;
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        seen.push(Seen::SaslLineTooLong);
                        return seen;
                    }
                }
            }
            match reader.step() {
                Step::NeedMore => break,
                Step::SendContinuation => seen.push(Seen::Continuation),
                Step::Command(parsed) => {
                    let name = match &parsed.command {
                        PreloginCommand::Authenticate {
                            mechanism,
                            initial_response,
                        } => {
                            sasl_line = initial_response.is_none();
                            format!("AUTHENTICATE {mechanism}")
                        }
                        other => format!("{:?}", std::mem::discriminant(other)),
                    };
                    seen.push(Seen::Command(parsed.tag, name));
                }
                Step::Bad { tag } => seen.push(Seen::Bad(tag)),
                Step::LiteralRefused { tag } => seen.push(Seen::LiteralRefused(tag)),
                Step::TooLong => {
                    seen.push(Seen::TooLong);
                    return seen;
                }
                Step::LiteralTooLarge => {
                    seen.push(Seen::LiteralTooLarge);
                    return seen;
                }
            }
        }
        if at == stream.len() {
            return seen;
        }
        let allowed = reader.room().clamp(1, 4096);
        let want = match &mut cuts {
            Some(c) => c.read_size(allowed),
            None => allowed,
        };
        let n = want.min(stream.len() - at);
        reader.feed(&stream[at..at + n]);
        at += n;
        assert!(
            reader.buffered() <= bound,
            "pre-login buffer {} over {bound} (line_max {line_max}, literal_max {literal_max})",
            reader.buffered()
        );
    }
}

/// Decodes a SASL response line, and feeds what decodes to the PLAIN and LOGIN checks; the
/// PLAIN message rebuilt from checked fields must check again to the same credentials.
pub fn sasl(line: &[u8]) {
    let decoded = match sasl::decode_line(line) {
        Ok(SaslLine::Response(bytes)) => bytes,
        Ok(SaslLine::Cancel) | Err(_) => Secret::new(line.to_vec()),
    };
    let _ = sasl::encode(decoded.expose());
    if let Ok(credentials) = Credentials::from_plain(&decoded) {
        let again = Credentials::from_plain(&credentials.plain_message())
            .expect("a rebuilt PLAIN message checks");
        assert_eq!(again.user, credentials.user);
        assert_eq!(again.authzid, credentials.authzid);
        assert_eq!(again.password.expose(), credentials.password.expose());
        let _ = credentials.routing_user();
    }
    let half = decoded.expose().len() / 2;
    let (user, password) = decoded.expose().split_at(half);
    let _ = Credentials::from_login(
        Mechanism::Login,
        user.to_vec(),
        Secret::new(password.to_vec()),
    );
}

/// The relayed mechanisms' first messages (XOAUTH2, OAUTHBEARER, SCRAM client-first): never a
/// panic; a user that decodes has no NUL or line end, and encoded again as a SASL name
/// (`,` → `=2C`, `=` → `=3D`) in a minimal message it decodes to the same user.
pub fn sasl_relayed(message: &[u8]) {
    for mechanism in [
        Mechanism::XOAuth2,
        Mechanism::OAuthBearer,
        Mechanism::ScramSha1,
        Mechanism::ScramSha256,
    ] {
        let Ok(credentials) = Credentials::relayed(mechanism, Secret::new(message.to_vec())) else {
            continue;
        };
        let user = credentials.routing_user();
        assert!(!user.is_empty() && !user.contains(['\0', '\r', '\n']));
        assert_eq!(credentials.password.expose(), message);
        let encoded = user.replace('=', "=3D").replace(',', "=2C");
        let again = match mechanism {
            Mechanism::XOAuth2 => continue,
            Mechanism::OAuthBearer => format!("n,a={encoded},\x01auth=Bearer x\x01\x01"),
            _ => format!("n,,n={encoded},r=nonce"),
        };
        let again = Credentials::relayed(mechanism, Secret::new(again.into_bytes()))
            .expect("a rebuilt first message decodes");
        assert_eq!(again.routing_user(), user);
    }
}

/// Reads a PROXY header from `bytes` (as a stream that ends there) on a current-thread
/// runtime. Panics if the reader took octets past the header it accepted on an input that had
/// more, or if an accepted header names an unspecified address or port 0.
pub fn proxy_header(bytes: &[u8]) -> io::Result<Option<SocketAddr>> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
    }
    let mut rest = bytes;
    let result = RUNTIME.with(|r| r.block_on(crate::proxy_header::read(&mut rest)));
    if let Ok(Some(client)) = &result {
        assert!(!client.ip().is_unspecified() && client.port() != 0);
    }
    if result.is_ok() {
        let taken = &bytes[..bytes.len() - rest.len()];
        // Exactly the header: a v1 line ends at its first CRLF, a v2 header at its length.
        if taken.starts_with(b"PROXY ") {
            assert!(taken.ends_with(b"\r\n"));
            assert_eq!(memchr::memmem::find(taken, b"\r\n"), Some(taken.len() - 2));
        } else {
            let length = u16::from_be_bytes([taken[14], taken[15]]) as usize;
            assert_eq!(taken.len(), 16 + length);
        }
    }
    result
}

/// The backend line checks: capabilities in a greeting/response code, a tagged OK, the
/// case-insensitive prefix strip and the log rendering.
pub fn backend_line(line: &[u8]) {
    let _ = crate::backend::capabilities_in(line);
    let ok = crate::backend::is_ok(line);
    if ok {
        assert!(line[..2].eq_ignore_ascii_case(b"OK"));
    }
    if let Some(rest) = crate::backend::strip_prefix_ignore_case(line, b"* OK") {
        assert!(rest.len() + 4 == line.len());
    }
    let printed = crate::backend::printable(line);
    assert!(!printed.contains('\n') && !printed.contains('\r'));
}

/// One observation: command name, completion, whether a latency came with it.
pub type Observation = (&'static str, crate::Completion, bool);

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Observation>>);

impl crate::CommandSink for Recorder {
    fn command(
        &self,
        command: crate::CommandId,
        completion: crate::Completion,
        latency: Option<std::time::Duration>,
    ) {
        self.0
            .lock()
            .unwrap()
            .push((command.name(), completion, latency.is_some()));
    }

    fn compress_error(&self) {
        self.0
            .lock()
            .unwrap()
            .push((COMPRESS_ERROR, crate::Completion::Unfinished, false));
    }
}

/// What `observe` reports for `CommandSink::compress_error`.
pub const COMPRESS_ERROR: &str = "<compress error>";

/// `steps` as a client and a backend would send them after `COMPRESS DEFLATE`: the exchange
/// in plain (`z0 COMPRESS DEFLATE`, `z0 OK`), then each direction one raw DEFLATE stream,
/// sync-flushed after every step (RFC 4978). Observing it must report `COMPRESS` and then
/// exactly what the plain steps give (unless they hold a COMPRESS of their own).
pub fn compressed(steps: &[(crate::Way, &[u8])]) -> Vec<(crate::Way, Vec<u8>)> {
    use miniz_oxide::deflate::core::{CompressorOxide, create_comp_flags_from_zip_params};
    use miniz_oxide::{MZFlush, MZStatus};

    let flags = create_comp_flags_from_zip_params(6, -15, 0);
    let mut client = CompressorOxide::new(flags);
    let mut backend = CompressorOxide::new(flags);
    let mut out = vec![
        (
            crate::Way::ClientToBackend,
            b"z0 COMPRESS DEFLATE\r\n".to_vec(),
        ),
        (
            crate::Way::BackendToClient,
            b"z0 OK DEFLATE active\r\n".to_vec(),
        ),
    ];
    for &(way, bytes) in steps {
        let z = match way {
            crate::Way::ClientToBackend => &mut client,
            crate::Way::BackendToClient => &mut backend,
        };
        let mut wire = Vec::new();
        let mut input = bytes;
        let mut buf = [0u8; 4096];
        loop {
            let step = miniz_oxide::deflate::stream::deflate(z, input, &mut buf, MZFlush::Sync);
            input = &input[step.bytes_consumed..];
            wire.extend_from_slice(&buf[..step.bytes_written]);
            assert!(
                matches!(step.status, Ok(MZStatus::Ok)),
                "deflate: {:?}",
                step.status
            );
            if input.is_empty() && step.bytes_written < buf.len() {
                break;
            }
        }
        out.push((way, wire));
    }
    out
}

/// How the relay shows a session's octets to the observer.
#[derive(Clone, Copy)]
pub enum Reads {
    /// Each step in one read.
    Whole,
    /// Each step cut into reads of random sizes.
    Cut(u32),
    /// Cut, and literal octets the observer would only skip passed unseen (`literal_passed`),
    /// as the relay's splice does.
    Spliced(u32),
}

/// Runs a session (steps of client or backend octets) through an observer and returns what it
/// reported, the commands still in flight at the end included. Panics if the in-flight table
/// grows past its bound or `literal_left` is inconsistent.
pub fn observe(steps: &[(crate::Way, &[u8])], reads: Reads) -> Vec<Observation> {
    let recorder = Recorder::default();
    {
        let mut observer = crate::Observer::new(&recorder);
        let mut cuts = match reads {
            Reads::Whole => None,
            Reads::Cut(seed) | Reads::Spliced(seed) => Some(Cuts::new(seed)),
        };
        let splice = matches!(reads, Reads::Spliced(_));
        for &(way, bytes) in steps {
            let mut rest = bytes;
            while !rest.is_empty() {
                let n = match &mut cuts {
                    Some(c) => c.read_size(64).min(rest.len()),
                    None => rest.len(),
                };
                let (mut piece, after) = rest.split_at(n);
                rest = after;
                if splice {
                    let left = observer.literal_left(way);
                    let k = (left.min(piece.len() as u64)) as usize;
                    if k > 0 {
                        observer.literal_passed(way, k as u64);
                        assert_eq!(observer.literal_left(way), left - k as u64);
                        piece = &piece[k..];
                    }
                }
                observer.observe(way, piece);
                assert!(observer.in_flight() <= crate::imap::scan::IN_FLIGHT_MAX);
            }
        }
    }
    recorder.0.into_inner().unwrap()
}

/// The oracle for the observer: the commands imap-codec finds in a client stream `client`,
/// re-encoded with every literal non-synchronizing (the observer counts a synchronizing
/// literal as sent only after the backend's `+`, which a client-only stream does not have),
/// and their names as the observer's table spells them. `None` unless `client` is whole
/// commands only and the observer would see each as one: none whose next octets are not
/// commands to a codec (AUTHENTICATE, IDLE, COMPRESS, STARTTLS), every tag at most
/// `TAG_MAX` octets and the name within the first `HEAD_MAX` octets of its line.
pub fn codec_commands(client: &[u8]) -> Option<(Vec<u8>, Vec<&'static str>)> {
    use crate::imap::scan::{CommandId, HEAD_MAX, TAG_MAX};
    use imap_codec::CommandCodec;
    use imap_codec::decode::Decoder;
    use imap_codec::encode::{Encoder, Fragment};
    use imap_codec::imap_types::command::CommandBody;
    use imap_codec::imap_types::core::LiteralMode;

    let codec = CommandCodec::default();
    let (mut rest, mut stream, mut names) = (client, Vec::new(), Vec::new());
    while !rest.is_empty() {
        let (after, command) = codec.decode(rest).ok()?;
        if matches!(
            command.body,
            CommandBody::Authenticate { .. }
                | CommandBody::Idle
                | CommandBody::Compress { .. }
                | CommandBody::StartTLS
        ) {
            return None;
        }
        let start = stream.len();
        for fragment in codec.encode(&command) {
            match fragment {
                Fragment::Line { data } => stream.extend_from_slice(&data),
                Fragment::Literal { data, mode } => {
                    if mode == LiteralMode::Sync {
                        // `{n}\r\n` becomes `{n+}\r\n`.
                        if !stream.ends_with(b"}\r\n") {
                            return None;
                        }
                        let at = stream.len() - 3;
                        stream.insert(at, b'+');
                    }
                    stream.extend_from_slice(&data);
                }
            }
        }
        let line = &stream[start..];
        let head = &line[..line.len().min(HEAD_MAX)];
        let mut words = head.split(|&b| b == b' ' || b == b'\r');
        let (tag, first, second) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        );
        // The head must hold the whole name: the second word too, for UID commands.
        let name_end = tag.len() + 1 + first.len() + 1 + second.len();
        if tag.len() > TAG_MAX || name_end >= head.len() {
            return None;
        }
        names.push(CommandId::lookup(first, second).name());
        rest = after;
    }
    Some((stream, names))
}

/// A self-signed ECDSA P-256 certificate for `localhost` (valid for a century) and its key:
/// test material for the TLS target only.
const FUZZ_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBljCCATugAwIBAgIUOzBZeD8amec/mX/W7FyyvftRwDUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMjE0NTY1NloYDzIxMjYxMTA4
MTQ1NjU2WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASkeNHDKC3F2e1SJQQfPgJXFGYawwLAhSHPIfXhJ+Jcgj8WJv3kMLc5
t2nF3pY+AQRZ6Dx8mWpeWbibe7pTV148o2kwZzAdBgNVHQ4EFgQUxsBjaNfhc2tc
zKDvXBX0xWvGZSIwHwYDVR0jBBgwFoAUxsBjaNfhc2tczKDvXBX0xWvGZSIwDwYD
VR0TAQH/BAUwAwEB/zAUBgNVHREEDTALgglsb2NhbGhvc3QwCgYIKoZIzj0EAwID
SQAwRgIhAM3F3bM980cxASovw8AaD/bR7EL8SFXNaOwZkGDOxU4OAiEAohuhgwXJ
wIMimw1ATPTpYm7y0ghHEfCZ0NK8rQTrY8g=
-----END CERTIFICATE-----
";
const FUZZ_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6FTuGiCtGp4hulk6
5+fRnjtOK7nnffHJ7033oQxRa0mhRANCAASkeNHDKC3F2e1SJQQfPgJXFGYawwLA
hSHPIfXhJ+Jcgj8WJv3kMLc5t2nF3pY+AQRZ6Dx8mWpeWbibe7pTV148
-----END PRIVATE KEY-----
";

thread_local! {
    static TLS_FUZZ: (tokio::runtime::Runtime, std::sync::Arc<rustls::ServerConfig>, std::sync::Arc<rustls::ClientConfig>) = {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imapgate-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, FUZZ_CERT).expect("the certificate written");
        std::fs::write(&key, FUZZ_KEY).expect("the key written");
        let source = crate::tls::CertSource { names: Vec::new(), cert, key };
        let server = crate::tls::ServerTls::load(source, Vec::new()).expect("the certificate loads");
        let client = crate::tls::client_config(crate::tls::Verify::Nothing).expect("a client config");
        (runtime, server.config, client)
    };
}

/// What a TLS peer sends, then the end of the stream, against imapgate's server side (the first
/// byte even: a client's octets) or its client side (odd: a server's octets); the next four
/// bytes seed the cuts, written a piece at a time. The handshake must fail or finish, and
/// then reading must end, within 10 s and without a panic (the bug a review found: a partial
/// ClientHello then FIN made the alert on the way out panic).
pub fn tls_peer(data: &[u8]) {
    use crate::stream::TlsStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some((&side, rest)) = data.split_first() else {
        return;
    };
    let Some((seed, mut stream)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let mut cuts = Cuts::new(u32::from_le_bytes(*seed));
    TLS_FUZZ.with(|(runtime, server, client)| {
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a port");
            let address = listener.local_addr().expect("its address");
            let (peer, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
            let (peer, ours) = (peer.expect("connected"), accepted.expect("accepted").0);
            let (mut peer_read, mut peer_write) = peer.into_split();
            let feed = async move {
                while !stream.is_empty() {
                    let (piece, left) = stream.split_at(cuts.read_size(512).min(stream.len()));
                    if peer_write.write_all(piece).await.is_err() {
                        return;
                    }
                    stream = left;
                    tokio::task::yield_now().await;
                }
                let _ = peer_write.shutdown().await;
            };
            // What imapgate sends is read and dropped, so that it never blocks on a full socket.
            let sink = async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = peer_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let ours = async move {
                let tls = if side % 2 == 0 {
                    TlsStream::accept(ours, server.clone()).await
                } else {
                    let name =
                        rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                    TlsStream::connect(ours, client.clone(), name).await
                };
                if let Ok(mut tls) = tls {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                }
            };
            let all = async { tokio::join!(feed, ours, sink) };
            tokio::time::timeout(std::time::Duration::from_secs(10), all)
                .await
                .expect("the TLS side ends once its peer has");
        })
    });
}

/// An auth_http service's answer as the lookup reads it: heads from the start of `data`, the
/// interim ones (1xx) dropped as `exchange` drops them, then the final one, with and without
/// `send_password`. Panics if an interim head makes no progress, a head claims more octets
/// than it was given, a route's `host:port` could break a log line or a dial (a space or a
/// control character), or a refusal's text could break the IMAP line it is sent in.
pub fn auth_http_answer(data: &[u8]) {
    use crate::directory::Answer;
    use crate::directory::http::{Head, parse_head};
    for send_password in [false, true] {
        let mut rest = data;
        loop {
            match parse_head(rest, send_password) {
                Ok(Head::Interim(length)) => {
                    assert!(
                        length > 0 && length <= rest.len(),
                        "interim head of {length}"
                    );
                    rest = &rest[length..];
                }
                Ok(Head::Final {
                    answer, head_len, ..
                }) => {
                    assert!(head_len <= rest.len());
                    match answer {
                        Ok(Answer::Found(route)) => assert!(
                            !route.server.is_empty()
                                && route.server.bytes().all(|b| b.is_ascii_graphic()),
                            "route to {:?}",
                            route.server
                        ),
                        Ok(Answer::Refused { message, .. }) => assert!(
                            !message.chars().any(char::is_control),
                            "refusal {message:?}"
                        ),
                        Ok(Answer::NotFound) | Err(_) => {}
                    }
                    break;
                }
                Ok(Head::Partial) | Err(_) => break,
            }
        }
    }
}
