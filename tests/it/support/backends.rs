//! What the Cyrus and Courier instances share: the unpacked Debian packages
//! (`fetch-backends.sh`), free ports, a process group stopped as a whole, and a tiny blocking
//! IMAP client that checks a server from outside the proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Where `fetch-backends.sh` unpacked the servers: `IMAPGATE_TEST_BACKENDS`, or the default
/// that CI uses.
pub fn root() -> PathBuf {
    std::env::var_os("IMAPGATE_TEST_BACKENDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/imapgate-test-backends"))
}

/// Whether `root()/<marker>` exists (see `support::external` for what happens when not).
pub fn available(server: &str, marker: &str) -> bool {
    let root = root();
    let found = root.join("STAMP").is_file() && root.join(marker).exists();
    super::external(
        found,
        &format!(
            "{server} is not unpacked in {} (run tests/it/support/fetch-backends.sh {0}, or set \
             IMAPGATE_TEST_BACKENDS)",
            root.display()
        ),
    )
}

/// A port nobody listened on a moment ago (the server binds it; a start that loses the race is
/// retried).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Processes that each lead their own process group (started with `process_group(0)`; Courier's
/// couriertcpd makes itself a group leader anyway), stopped together: SIGTERM to every group,
/// SIGKILL after 10 s, then SIGKILL to every group again for any straggler (a process a leader
/// forked, such as an imapd serving a session).
#[derive(Default)]
pub struct Group {
    pub children: Vec<Child>,
}

impl Group {
    /// The first child that has exited, with its status.
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|c| match c.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        })
    }

    fn signal(&self, signal: i32) {
        for c in &self.children {
            unsafe {
                libc::kill(-(c.id() as i32), signal);
            }
        }
    }

    pub fn stop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && self
                .children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal(libc::SIGKILL);
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `port` answers with an IMAP greeting naming `server` and returns it (there is no
/// other event to wait for); fails early when one of `group`'s processes exits, or when another
/// server answers there (tests pick ports in parallel: the caller tries another). Gives up
/// after 20 s.
pub fn wait_greeting(
    port: u16,
    server: &str,
    group: &mut Group,
    log: &Path,
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = group.exited() {
            return Err(format!("exited with {status}: {}", read_log(log)));
        }
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("* OK") {
                if !line.contains(server) {
                    return Err(format!("port {port} answered by another server: {line}"));
                }
                return Ok(line.trim_end().to_string());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no greeting within 20 s: {}", read_log(log)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A blocking IMAP client for checks from outside the proxy (and for setting servers up).
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_tag: u32,
    /// The greeting line, without CRLF.
    pub greeting: String,
}

impl Client {
    pub fn connect(address: &str) -> Result<Client, String> {
        let stream = TcpStream::connect(address).map_err(|e| format!("connect {address}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            next_tag: 1,
            greeting: String::new(),
        };
        client.greeting = client.line()?.trim_end().to_string();
        if !client.greeting.starts_with("* OK") {
            return Err(format!("greeting: {}", client.greeting));
        }
        Ok(client)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("c{}", self.next_tag)
    }

    fn until_tagged(&mut self, tag: &str) -> Result<(Vec<String>, String), String> {
        let prefix = format!("{tag} ");
        let mut untagged = Vec::new();
        loop {
            let line = self.line()?;
            if line.starts_with(&prefix) {
                return Ok((untagged, line.trim_end().to_string()));
            }
            untagged.push(line.trim_end().to_string());
        }
    }

    /// Runs one command (text after the tag, no CRLF); returns the untagged lines and the
    /// tagged answer, whatever its status.
    pub fn command(&mut self, command: &str) -> Result<(Vec<String>, String), String> {
        let tag = self.tag();
        self.write(format!("{tag} {command}\r\n").as_bytes())?;
        self.until_tagged(&tag)
    }

    /// Like `command`, but an answer other than OK is an error.
    pub fn ok(&mut self, command: &str) -> Result<Vec<String>, String> {
        let (untagged, answer) = self.command(command)?;
        match answer.split(' ').nth(1) {
            Some("OK") => Ok(untagged),
            _ => Err(format!("{command}: {answer}")),
        }
    }

    /// LOGIN with the password as a synchronizing literal (any byte but CR/LF goes through);
    /// returns the tagged OK line.
    pub fn login(&mut self, user: &str, password: &str) -> Result<String, String> {
        let tag = self.tag();
        self.write(format!("{tag} LOGIN {user} {{{}}}\r\n", password.len()).as_bytes())?;
        let go_ahead = self.line()?;
        if !go_ahead.starts_with('+') {
            return Err(format!("LOGIN {user}: no continuation: {go_ahead}"));
        }
        self.write(password.as_bytes())?;
        self.write(b"\r\n")?;
        let (_, answer) = self.until_tagged(&tag)?;
        if answer.starts_with(&format!("{tag} OK")) {
            Ok(answer)
        } else {
            Err(format!("LOGIN {user}: {answer}"))
        }
    }

    /// APPENDs `message` to `mailbox` with a synchronizing literal (benches/pipelining.rs).
    #[allow(dead_code)]
    pub fn append(&mut self, mailbox: &str, message: &str) -> Result<(), String> {
        let tag = self.tag();
        self.write(format!("{tag} APPEND {mailbox} {{{}}}\r\n", message.len()).as_bytes())?;
        let go_ahead = self.line()?;
        if !go_ahead.starts_with('+') {
            return Err(format!("APPEND: no continuation: {go_ahead}"));
        }
        self.write(message.as_bytes())?;
        self.write(b"\r\n")?;
        let (_, answer) = self.until_tagged(&tag)?;
        if answer.starts_with(&format!("{tag} OK")) {
            Ok(())
        } else {
            Err(format!("APPEND: {answer}"))
        }
    }

    /// Every mailbox name `LIST "" "*"` returns.
    pub fn list_all(&mut self) -> Result<Vec<String>, String> {
        let untagged = self.ok("LIST \"\" \"*\"")?;
        Ok(untagged.iter().filter_map(|l| list_name(l)).collect())
    }

    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
    }
}

/// Logs `user` in directly and returns every mailbox it has (`LIST "" "*"`).
pub fn mailboxes(address: &str, user: &str, password: &str) -> Result<Vec<String>, String> {
    let mut client = Client::connect(address)?;
    client.login(user, password)?;
    let names = client.list_all()?;
    client.logout();
    Ok(names)
}

/// The mailbox name of an untagged `* LIST (flags) delimiter name` line.
fn list_name(line: &str) -> Option<String> {
    let rest = line.strip_prefix("* LIST (")?;
    let rest = &rest[rest.find(") ")? + 2..];
    // The delimiter: NIL, "x" or "\\".
    let rest = if let Some(r) = rest.strip_prefix("NIL ") {
        r
    } else {
        let r = rest.strip_prefix('"')?;
        let r = r.strip_prefix('\\').unwrap_or(r);
        r.get(1..)?.strip_prefix("\" ")?
    };
    match rest.strip_prefix('"') {
        Some(quoted) => {
            let mut name = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => name.extend(chars.next()),
                    c => name.push(c),
                }
            }
            Some(name)
        }
        None => Some(rest.to_string()),
    }
}

/// `crypt(3)` from libxcrypt (`libcrypt.so.1`), loaded at run time so that linking the tests
/// needs no libcrypt-dev. SHA-512 crypt takes passwords of any length (`openssl passwd` cuts
/// them at 256 bytes).
pub fn sha512_crypt(password: &str, salt: &str) -> String {
    use std::ffi::{CStr, CString};
    type CryptFn =
        unsafe extern "C" fn(*const libc::c_char, *const libc::c_char) -> *mut libc::c_char;
    let key = CString::new(password).expect("no NUL in a password");
    let setting = CString::new(format!("$6${salt}$")).expect("salt");
    unsafe {
        let lib = libc::dlopen(c"libcrypt.so.1".as_ptr(), libc::RTLD_NOW);
        assert!(!lib.is_null(), "cannot load libcrypt.so.1 (libcrypt1)");
        let sym = libc::dlsym(lib, c"crypt".as_ptr());
        assert!(!sym.is_null(), "libcrypt.so.1 has no crypt()");
        let crypt: CryptFn = std::mem::transmute(sym);
        let out = crypt(key.as_ptr(), setting.as_ptr());
        assert!(!out.is_null(), "crypt() failed");
        let hash = CStr::from_ptr(out).to_string_lossy().into_owned();
        assert!(hash.starts_with("$6$"), "crypt() failed: {hash}");
        hash
    }
}

#[test]
fn list_names_are_parsed() {
    assert_eq!(
        list_name(r#"* LIST (\HasNoChildren) "." "INBOX.Backend-x""#).as_deref(),
        Some("INBOX.Backend-x")
    );
    assert_eq!(
        list_name(r#"* LIST (\HasNoChildren) "/" Backend-x"#).as_deref(),
        Some("Backend-x")
    );
    assert_eq!(
        list_name(r#"* LIST () "\\" "a \"b\"""#).as_deref(),
        Some("a \"b\"")
    );
    assert_eq!(list_name("* LIST () NIL INBOX").as_deref(), Some("INBOX"));
}
