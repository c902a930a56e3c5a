//! Test support: Dovecot instances, imapgate in-process on port 0, a scripted raw client.

pub mod backends;
pub mod courier;
pub mod cyrus;
pub mod dns;
pub mod dovecot;
pub mod netns;
pub mod pki;
pub mod postgres;
pub mod slapd;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

use imapgate::shutdown::Shutdown;
use imapgate::{Bound, BoundListener, Services};

/// Every wait in a test has this deadline, so a hang fails instead of blocking CI.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// imapgate running in this test's runtime on 127.0.0.1:<port 0>.
pub struct Proxy {
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener's address, in config order.
    pub addrs: Vec<SocketAddr>,
    /// The admin server (/metrics, /sessions, ...).
    pub admin: SocketAddr,
    pub config: Arc<imapgate::config::Config>,
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// `yaml` is a whole config; its listeners are ignored (the test binds its own).
    pub async fn start(yaml: &str) -> Proxy {
        let config = test_config(yaml);
        Proxy::start_config(config).await
    }

    /// From a config file, which `POST /reload` (and SIGHUP) reads again. Its listeners are
    /// ignored like `start`'s; a reload that keeps their names and binds keeps them.
    pub async fn start_file(path: &std::path::Path) -> Proxy {
        init_logs();
        let config = imapgate::config::load(path).expect("valid test config file");
        Proxy::start_config(Arc::new(config)).await
    }

    async fn start_config(config: Arc<imapgate::config::Config>) -> Proxy {
        // The config's bind addresses are replaced by ports the OS picks.
        let mut listeners = Vec::new();
        for index in 0..config.listeners.len() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listeners.push(BoundListener { index, listener });
        }
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let bound = Bound {
            listeners,
            admin: Some(admin),
        };
        Proxy::serve(config, bound)
    }

    /// Like `start`, but on the config's own addresses, bound by `imapgate::bind` as `main`
    /// binds them (SO_REUSEPORT); its error when that fails. Without `admin:` in `yaml`,
    /// `admin` is 0.0.0.0:0.
    pub async fn start_bound(yaml: &str) -> std::io::Result<Proxy> {
        let config = test_config(yaml);
        let bound = imapgate::bind(&config).await?;
        Ok(Proxy::serve(config, bound))
    }

    fn serve(config: Arc<imapgate::config::Config>, bound: Bound) -> Proxy {
        let addrs: Vec<SocketAddr> = bound
            .listeners
            .iter()
            .map(|l| l.listener.local_addr().expect("addr"))
            .collect();
        let addr = addrs[0];
        let admin = bound
            .admin
            .as_ref()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |a| {
                a.local_addr().expect("admin addr")
            });
        let shutdown = Shutdown::new();
        let (config_for_server, shutdown_for_server) = (config.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            let server = imapgate::Server::new(
                bound,
                Services::new(config_for_server),
                shutdown_for_server,
                1,
            );
            server.run().await.expect("the server runs");
        });
        Proxy {
            addr,
            addrs,
            admin,
            config,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.begin();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("imapgate stops within the deadline")
                .expect("run() does not panic");
        }
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Starts the shutdown (what SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.begin();
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// A plain HTTP/1.0 GET (so the body comes whole, never chunked); returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).await
}

/// An HTTP/1.0 request with an optional bearer token; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .expect("connect deadline")
        .expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: test\r\n{auth}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut all))
        .await
        .expect("http deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&all).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` in a metrics text, where `labels` is the exact
/// label text as encoded (e.g. `backend="b1",command="FETCH",status="ok"`).
pub fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.begin();
        self.shutdown.cut.cancel();
    }
}

/// A loopback port nothing listens on now, for a config the real binary binds itself (a
/// small race with other tests, which bind port 0 and so never ask for this one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A parsed test config; tests stop the proxy while their clients are still logged in, so
/// the grace period is short unless the config sets its own.
fn test_config(yaml: &str) -> Arc<imapgate::config::Config> {
    init_logs();
    let mut config = imapgate::config::parse(yaml, "test config").expect("valid test config");
    if !yaml.contains("shutdown_grace") {
        config.timeouts.shutdown_grace = Duration::from_millis(200);
    }
    Arc::new(config)
}

/// A config with the given backends (name, address) and extra YAML.
pub fn config(backends: &[(&str, String)], extra: &str) -> String {
    let mut yaml = String::from("backends:\n");
    for (name, address) in backends {
        yaml.push_str(&format!("  - {{ name: {name}, address: \"{address}\" }}\n"));
    }
    yaml.push_str(extra);
    yaml
}

fn init_logs() {
    if std::env::var_os("IMAPGATE_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}

/// A scripted client: writes exact bytes, reads lines, every read under `DEADLINE`.
pub struct Raw<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect deadline")
            .expect("connect");
        Raw::new(stream)
    }

    /// Starts TLS on this connection (after a STARTTLS OK); nothing may be buffered unread.
    pub async fn start_tls(self, name: &str, ca: &std::path::Path) -> Raw<TlsStream<TcpStream>> {
        assert!(
            self.buf.is_empty(),
            "the server sent something after its STARTTLS OK"
        );
        Raw::new(tls_client(self.stream, name, ca).await)
    }
}

/// A rustls client handshake that trusts only `ca`.
pub async fn tls_client(tcp: TcpStream, name: &str, ca: &std::path::Path) -> TlsStream<TcpStream> {
    tls_client_result(tcp, name, ca)
        .await
        .expect("TLS handshake")
}

pub async fn tls_client_result(
    tcp: TcpStream,
    name: &str,
    ca: &std::path::Path,
) -> std::io::Result<TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .expect("handshake deadline")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub fn new(stream: S) -> Raw<S> {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Next line with its CRLF, or `None` at end of stream.
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            // On the heap: an array would make every future that reads a line 64 KiB larger
            // (a test's future holds many; a debug build's test thread stack is 2 MiB).
            let mut chunk = vec![0u8; 65536];
            let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
                .await
                .expect("read deadline: the peer said nothing")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Exactly `n` bytes (a literal's octets).
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = vec![0u8; 1 << 20];
            let got = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
                .await
                .expect("read deadline")
                .expect("read");
            assert!(got > 0, "stream ended inside a literal");
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// Lines up to and including the one tagged `tag`; returns (untagged lines, tagged line).
    pub async fn until_tagged(&mut self, tag: &str) -> (Vec<String>, String) {
        let mut untagged = Vec::new();
        let prefix = format!("{tag} ");
        loop {
            let line = self
                .line()
                .await
                .unwrap_or_else(|| panic!("stream ended before {tag}'s answer; got {untagged:?}"));
            if line.starts_with(&prefix) {
                return (untagged, line);
            }
            untagged.push(line);
        }
    }

    /// Reads the greeting and logs in with LOGIN; panics unless the answer is OK.
    pub async fn login(&mut self, user: &str, password: &str) {
        let greeting = self.line().await.expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        self.send(format!("l1 LOGIN {user} \"{password}\"\r\n"))
            .await;
        let (_, answer) = self.until_tagged("l1").await;
        assert!(answer.starts_with("l1 OK"), "{answer}");
    }

    /// The `Backend-*` mailbox the session can see: the backend it is on.
    pub async fn backend(&mut self) -> String {
        self.send("lb LIST \"\" \"Backend-*\"\r\n").await;
        let (untagged, answer) = self.until_tagged("lb").await;
        assert!(answer.starts_with("lb OK"), "{answer}");
        let names: Vec<&str> = untagged
            .iter()
            .filter_map(|l| l.trim_end().rsplit(' ').next())
            .map(|n| n.trim_matches('"'))
            .filter_map(|n| n.strip_prefix("Backend-"))
            .collect();
        assert_eq!(
            names.len(),
            1,
            "exactly one Backend-* mailbox: {untagged:?}"
        );
        names[0].to_string()
    }

    /// What was read from the stream and not returned yet (to read on from `stream` itself).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Reads until the peer closes; returns what came.
    pub async fn rest(&mut self) -> String {
        let mut all = std::mem::take(&mut self.buf);
        let _ = tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut all))
            .await
            .expect("the peer closes within the deadline");
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// Whether `tool` is on PATH (see `external`).
pub fn tool_available(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
    external(
        found,
        &format!("{tool} is not installed: install {package}"),
    )
}

/// What a test does when a real server or tool it needs is `found` or not: runs, or fails
/// with `missing` (what to install). A developer who wants the rest of the suite anyway sets
/// `IMAPGATE_SKIP_EXTERNAL=1`: then the test returns early with a loud message, so a green
/// `cargo test` never hides tests that did not run unless someone asked for it. Under `CI` a
/// missing dependency always fails.
pub fn external(found: bool, missing: &str) -> bool {
    if found {
        return true;
    }
    let opted_out = std::env::var("IMAPGATE_SKIP_EXTERNAL").is_ok_and(|v| v == "1");
    if !opted_out || std::env::var_os("CI").is_some() {
        panic!("{missing} (or set IMAPGATE_SKIP_EXTERNAL=1 to skip such tests outside CI)");
    }
    eprintln!(
        "\n!!!!! SKIPPED (IMAPGATE_SKIP_EXTERNAL=1): {missing}; this test did not run !!!!!\n"
    );
    false
}

/// Polls `/metrics` until `done` holds for it (the session's end is recorded when its task
/// finishes, just after the client sees the close).
pub async fn metrics_when(proxy: &Proxy, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let m = proxy.metrics().await;
        if done(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never settled:\n{m}"
        );
        tokio::task::yield_now().await;
    }
}

/// An address nobody listens on, for tests that need no backend.
pub fn nowhere() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Reads a child's stderr line by line.
pub struct LogLines {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    seen: String,
}

impl LogLines {
    pub fn new(stderr: tokio::process::ChildStderr) -> Self {
        use tokio::io::AsyncBufReadExt;
        LogLines {
            lines: tokio::io::BufReader::new(stderr).lines(),
            seen: String::new(),
        }
    }

    pub async fn wait_for(&mut self, text: &str) {
        loop {
            let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {text:?} in the log:\n{}", self.seen))
                .unwrap()
                .unwrap_or_else(|| panic!("the log ended before {text:?}:\n{}", self.seen));
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.contains(text) {
                return;
            }
        }
    }

    /// Everything the child wrote to stderr, once it has exited (reads to the end).
    pub async fn rest(mut self) -> String {
        while let Ok(Some(line)) = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("stderr ends once the child exits")
        {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        self.seen
    }
}
