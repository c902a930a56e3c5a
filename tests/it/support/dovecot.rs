//! Private Dovecot instances for tests: own config, base_dir, passwd file and maildirs in a temp
//! dir, on a loopback port picked by the OS, stopped on drop.
//!
//! Every instance has the same users (`USERS`), like backends behind one passdb, and every user
//! has one mailbox named `Backend-<instance name>`: a LIST through the proxy shows on which
//! backend a session really landed.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::io::Read;

pub const USERS: &[(&str, &str)] = &[
    ("alice", "alice-secret"),
    ("bob", "bob-secret"),
    ("carol", "carol-secret"),
    ("dave", "dave-secret"),
    ("erin", "erin-secret"),
    // Every awkward byte a password can hold in a quoted string or a literal.
    ("quoter", "sp ace \"quote\" back\\slash"),
    ("unicode", "pässwörd-日本"),
];

/// A password of 500 characters for the `longpw` user.
pub fn long_password() -> String {
    "x!y \"z\\".repeat(72)[..500].to_string()
}

/// A password of 1,000 octets for the `longerpw` user: quoted, with its `"` and `\` escaped,
/// it is more than Dovecot's pre-login buffer (1,026 octets) holds.
pub fn longer_password() -> String {
    "x!y \"z\\".repeat(143)[..1000].to_string()
}

const TEMPLATE: &str = include_str!("dovecot.conf");
/// The Debian user that owns mail (Dovecot refuses mail access as root).
const MAIL_UID: u32 = 8;

/// What an instance offers beyond plain IMAP on `port`.
#[derive(Default, Clone)]
pub struct Options {
    /// Certificate and key (PEM): TLS on, STARTTLS on `port`, implicit TLS on `imaps_port`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Trust 127.0.0.0/8 for ID fields (`login_trusted_networks`) and open `haproxy_port`,
    /// which takes a PROXY header from 127.0.0.0/8 (`haproxy_trusted_networks`).
    pub trust_proxy: bool,
    /// LITERAL- instead of LITERAL+ (`imap_literal_minus`): a backend a login must be replayed
    /// to with synchronizing literals.
    pub literal_minus: bool,
    /// Run inside this network namespace (`ip netns exec`), listening on this address of it
    /// instead of 127.0.0.1 (`support::netns`). Plain IMAP only.
    pub netns: Option<(String, Ipv4Addr)>,
    /// XOAUTH2 and OAUTHBEARER on, checked by an `oauth2` passdb that POSTs the token to this
    /// introspection URL (`introspection_mode = post`; the answer's `username` must be the user
    /// and its `active` must be `true`).
    pub oauth2: Option<String>,
    /// SCRAM-SHA-1 and SCRAM-SHA-256 on (Dovecot derives them from the passdb's plaintext
    /// passwords), and one more user, `SCRAM_USER`, whose name needs SCRAM's `=2C`/`=3D`.
    pub scram: bool,
    /// COMPRESS=DEFLATE after login (RFC 4978): the `zlib` and `imap_zlib` plugins.
    pub compress: bool,
}

/// A user whose name holds `,` and `=` (with `Options::scram`).
pub const SCRAM_USER: (&str, &str) = ("a,b=c", "abc-secret");

pub struct Dovecot {
    /// The address it listens on (127.0.0.1, or its namespace's address).
    pub host: Ipv4Addr,
    pub port: u16,
    /// Implicit TLS, with `Options::tls`.
    pub imaps_port: Option<u16>,
    /// PROXY-header listener, with `Options::trust_proxy`.
    pub haproxy_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Child,
}

/// Whether Dovecot is installed (see `support::external` for what happens when not).
pub fn available() -> bool {
    super::external(
        Path::new("/usr/sbin/dovecot").exists(),
        "Dovecot is not installed: install dovecot-imapd",
    )
}

impl Dovecot {
    /// Starts an instance; panics with Dovecot's log if it does not come up.
    pub fn start(name: &str) -> Dovecot {
        Self::start_with(name, Options::default())
    }

    pub fn start_with(name: &str, options: Options) -> Dovecot {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(name, &options) {
                Ok(d) => return d,
                Err(e) => last_error = e,
            }
        }
        panic!("Dovecot {name} did not start: {last_error}");
    }

    fn try_start(name: &str, options: &Options) -> Result<Dovecot, String> {
        // Short path: base_dir holds UNIX sockets (108-byte path limit).
        let dir = tempfile::Builder::new()
            .prefix("dv.")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let port = free_port();
        let host = options
            .netns
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST, |(_, a)| *a);
        let mut conf = TEMPLATE
            .replace("@DIR@", &root.display().to_string())
            .replace("@PORT@", &port.to_string())
            .replace("127.0.0.1", &host.to_string());
        let mut imaps_port = None;
        if let Some((cert, key)) = &options.tls {
            let p = free_port();
            imaps_port = Some(p);
            conf = conf
                .replace(
                    "ssl = no",
                    &format!("ssl = yes\nssl_cert = <{}\nssl_key = <{}", cert.display(), key.display()),
                )
                .replace(
                    "inet_listener imaps {\n    port = 0\n  }",
                    &format!("inet_listener imaps {{\n    address = 127.0.0.1\n    port = {p}\n    ssl = yes\n  }}"),
                );
        }
        let mut haproxy_port = None;
        if options.trust_proxy {
            let p = free_port();
            haproxy_port = Some(p);
            conf.push_str(
                "login_trusted_networks = 127.0.0.0/8\nhaproxy_trusted_networks = 127.0.0.0/8\n",
            );
            conf = conf.replace(
                "service imap-login {\n",
                &format!("service imap-login {{\n  inet_listener imap_haproxy {{\n    address = 127.0.0.1\n    port = {p}\n    haproxy = yes\n  }}\n"),
            );
        }
        if options.literal_minus {
            conf.push_str("imap_literal_minus = yes\n");
        }
        let mut mechanisms = String::from("plain login");
        if options.scram {
            mechanisms.push_str(" scram-sha-1 scram-sha-256");
            // SCRAM_USER's `,` and `=` are not in the default auth_username_chars.
            conf.push_str("auth_username_chars =\n");
        }
        if let Some(url) = &options.oauth2 {
            mechanisms.push_str(" xoauth2 oauthbearer");
            // Dovecot 2.3's oauth2 passdb reads its settings from a file of its own.
            let ext = root.join("oauth2.conf.ext");
            std::fs::write(
                &ext,
                format!(
                    "introspection_mode = post\nintrospection_url = {url}\nusername_attribute = username\nactive_attribute = active\nactive_value = true\nforce_introspection = yes\ntimeout_msecs = 10000\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            conf.push_str(&format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
                ext.display()
            ));
        }
        conf = conf.replace(
            "auth_mechanisms = plain login",
            &format!("auth_mechanisms = {mechanisms}"),
        );
        if options.compress {
            conf.push_str(
                "mail_plugins = $mail_plugins zlib\nprotocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n",
            );
        }
        std::fs::write(root.join("dovecot.conf"), conf).map_err(|e| e.to_string())?;
        let mut passwd = String::new();
        let (long, longer) = (long_password(), longer_password());
        let users = USERS
            .iter()
            .copied()
            .chain([("longpw", long.as_str()), ("longerpw", longer.as_str())])
            .chain(options.scram.then_some(SCRAM_USER));
        for (user, password) in users {
            passwd.push_str(&format!("{user}:{{PLAIN}}{password}::::::\n"));
            make_maildir(&root.join("mail").join(user), name).map_err(|e| e.to_string())?;
        }
        std::fs::write(root.join("passwd"), passwd).map_err(|e| e.to_string())?;
        chown_tree(&root.join("mail")).map_err(|e| e.to_string())?;

        // In a namespace: `ip netns exec` enters it and execs Dovecot (the same process).
        let mut command = match &options.netns {
            Some((netns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "/usr/sbin/dovecot"]);
                c
            }
            None => Command::new("/usr/sbin/dovecot"),
        };
        let child = command
            .arg("-F")
            .arg("-c")
            .arg(root.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run dovecot: {e}"))?;
        let mut d = Dovecot {
            host,
            port,
            imaps_port,
            haproxy_port,
            dir,
            child,
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// The master process (its children are the listeners and sessions).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn imaps_address(&self) -> String {
        format!("127.0.0.1:{}", self.imaps_port.expect("started with TLS"))
    }

    pub fn haproxy_address(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.haproxy_port.expect("started with trust_proxy")
        )
    }

    /// Dovecot's info log: logins appear there with the address it believes (`rip=`).
    pub fn info_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot-info.log")).unwrap_or_default()
    }

    /// Waits until Dovecot's info log holds a line for which `wanted` is true, and returns
    /// it. Dovecot's log process writes a moment after the login is answered, so a test polls
    /// the file (there is no event to wait on), up to 20 s.
    pub async fn wait_for_info_line(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.info_log();
            if let Some(line) = log.lines().rev().find(|l| wanted(l)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no such line in Dovecot's log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Waits until the port answers with a greeting: the master forks its listeners after it
    /// has started, so there is no other event to wait for. Gives up after 20 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("exited with {status}: {err} {}", self.log()));
            }
            if let Ok(mut s) = std::net::TcpStream::connect((self.host, self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"* OK" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no greeting within 20 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the instance (the port then refuses connections).
    pub fn stop(&mut self) {
        // SIGTERM lets the master stop its children; SIGKILL if it does not within 10 s.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn make_maildir(home: &Path, backend: &str) -> std::io::Result<()> {
    let maildir = home.join("Maildir");
    for d in [maildir.clone(), maildir.join(format!(".Backend-{backend}"))] {
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
    }
    Ok(())
}

fn chown_tree(path: &PathBuf) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(MAIL_UID), Some(MAIL_UID))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path())?;
        }
    }
    Ok(())
}
