//! Private Cyrus IMAP 3.6 instances (Debian's cyrus-imapd, unpacked by `fetch-backends.sh`, never
//! installed): own imapd.conf, cyrus.conf, sasldb and spool in a temp dir, on a loopback port
//! picked by the OS, stopped on drop (the whole process group).
//!
//! `master -D` runs in the foreground as the `mail` user (`cyrus_user`; Cyrus will not run as
//! root) and forks `imapd` per connection. Passwords are in a private sasldb (`saslpasswd2 -f`,
//! auxprop), so LOGIN and AUTHENTICATE PLAIN work without TLS (`allowplaintext: yes`). Every
//! user of `dovecot::USERS` and `longpw` exists. `altnamespace` and `unixhierarchysep` are on:
//! a user sees `INBOX` and `Backend-<name>` at the top level (`LIST "" "Backend-*"` finds it);
//! the admin `cyrus` creates `user/<name>` and `user/<name>/Backend-<instance>` at start.
//!
//! Greeting: `* OK [CAPABILITY IMAP4rev1 LITERAL+ ID ENABLE AUTH=PLAIN AUTH=LOGIN SASL-IR] ...`;
//! the tagged OK of LOGIN carries a `[CAPABILITY ...]` with the full post-login list.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::backends::{self, Client, Group};
use super::dovecot::{USERS, long_password};

/// The administrator (`admins:` in imapd.conf); not one of the test users.
pub const ADMIN: (&str, &str) = ("cyrus", "cyrus-admin-secret");
/// The Debian user that owns mail; Cyrus drops to it (`cyrus_user`).
const MAIL_USER: &str = "mail";
const MAIL_UID: u32 = 8;

pub struct Cyrus {
    pub port: u16,
    /// The greeting line (without CRLF).
    pub greeting: String,
    // Declared first: the processes stop before the temp dir goes.
    group: Group,
    dir: tempfile::TempDir,
}

/// Whether the unpacked Cyrus is there (see `support::external`).
pub fn available() -> bool {
    backends::available("Cyrus IMAP (cyrus-imapd)", "cyrus/usr/lib/cyrus/bin/master")
}

fn tree() -> PathBuf {
    backends::root().join("cyrus")
}

impl Cyrus {
    /// Starts an instance; panics with what went wrong if it does not come up.
    pub fn start(name: &str) -> Cyrus {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(name) {
                Ok(c) => return c,
                Err(e) => last_error = e,
            }
        }
        panic!("Cyrus {name} did not start: {last_error}");
    }

    fn try_start(name: &str) -> Result<Cyrus, String> {
        let e = |e: std::io::Error| e.to_string();
        let dir = tempfile::Builder::new()
            .prefix("cy.")
            .tempdir_in("/tmp")
            .map_err(e)?;
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).map_err(e)?;
        for sub in ["conf", "spool", "run"] {
            std::fs::create_dir(root.join(sub)).map_err(e)?;
        }
        let bin = tree().join("usr/lib/cyrus/bin");
        let port = backends::free_port();
        let d = root.display();
        std::fs::write(
            root.join("imapd.conf"),
            format!(
                "configdirectory: {d}/conf\n\
                 partition-default: {d}/spool\n\
                 cyrus_user: {MAIL_USER}\n\
                 cyrus_group: {MAIL_USER}\n\
                 servername: localhost\n\
                 admins: {admin}\n\
                 allowplaintext: yes\n\
                 sasl_pwcheck_method: auxprop\n\
                 sasl_auxprop_plugin: sasldb\n\
                 sasl_sasldb_path: {d}/sasldb2\n\
                 sasl_mech_list: PLAIN LOGIN\n\
                 altnamespace: yes\n\
                 unixhierarchysep: yes\n\
                 virtdomains: no\n\
                 lmtpsocket: {d}/run/lmtp\n\
                 idlesocket: {d}/run/idle\n\
                 notifysocket: {d}/run/notify\n",
                admin = ADMIN.0,
            ),
        )
        .map_err(e)?;
        let conf = root.join("imapd.conf");
        let c = conf.display();
        let b = bin.display();
        // master does not hand -C to what it runs: every command gets it.
        std::fs::write(
            root.join("cyrus.conf"),
            format!(
                "START {{\n  recover cmd=\"{b}/ctl_cyrusdb -C {c} -r\"\n}}\n\
                 SERVICES {{\n  imap cmd=\"{b}/imapd -C {c}\" listen=\"127.0.0.1:{port}\" prefork=0\n}}\n\
                 EVENTS {{\n}}\n"
            ),
        )
        .map_err(e)?;
        let long = long_password();
        let users = USERS
            .iter()
            .copied()
            .chain([("longpw", long.as_str()), ADMIN]);
        for (user, password) in users {
            set_password(root, user, password)?;
        }
        chown_tree(root)?;

        let log = root.join("master.log");
        let log_file = std::fs::File::create(&log).map_err(e)?;
        let child = Command::new(bin.join("master"))
            .arg("-C")
            .arg(&conf)
            .arg("-M")
            .arg(root.join("cyrus.conf"))
            .arg("-p")
            .arg(root.join("run/master.pid"))
            .arg("-D")
            .env("LD_LIBRARY_PATH", lib_path())
            .current_dir(root)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(e)?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot run master: {e}"))?;
        let mut group = Group {
            children: vec![child],
        };
        let greeting = backends::wait_greeting(port, "Cyrus IMAP", &mut group, &log)?;
        let cyrus = Cyrus {
            port,
            greeting,
            group,
            dir,
        };
        cyrus.create_mailboxes(name)?;
        Ok(cyrus)
    }

    /// As the admin: `user/<u>` (the INBOX) and `user/<u>/Backend-<name>` for every user.
    fn create_mailboxes(&self, name: &str) -> Result<(), String> {
        let mut admin = Client::connect(&self.address())?;
        admin.login(ADMIN.0, ADMIN.1)?;
        let users = USERS.iter().map(|(u, _)| *u).chain(["longpw"]);
        for user in users {
            admin.ok(&format!("CREATE \"user/{user}\""))?;
            admin.ok(&format!("CREATE \"user/{user}/Backend-{name}\""))?;
        }
        admin.logout();
        Ok(())
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every mailbox `user` has, from a direct login (not through the proxy).
    pub fn mailboxes(&self, user: &str) -> Vec<String> {
        let password = password_of(user);
        backends::mailboxes(&self.address(), user, &password)
            .unwrap_or_else(|e| panic!("Cyrus: {e}\n{}", self.log()))
    }

    /// Whatever master wrote to stdout/stderr (Cyrus logs to syslog).
    pub fn log(&self) -> String {
        backends::read_log(&self.dir.path().join("master.log"))
    }

    /// Stops the instance and every process it started.
    pub fn stop(&mut self) {
        self.group.stop();
    }
}

/// A test user's password (`USERS`, `longpw`).
pub(super) fn password_of(user: &str) -> String {
    if user == "longpw" {
        return long_password();
    }
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| panic!("{user} is not a test user"))
}

fn lib_path() -> PathBuf {
    tree().join("usr/lib/x86_64-linux-gnu")
}

/// `saslpasswd2 -p` reads the password from stdin, up to the end.
fn set_password(root: &Path, user: &str, password: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(tree().join("usr/sbin/saslpasswd2"))
        .args(["-p", "-c", "-u", "localhost", "-f"])
        .arg(root.join("sasldb2"))
        .arg(user)
        .env("LD_LIBRARY_PATH", lib_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run saslpasswd2: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "saslpasswd2 {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn chown_tree(path: &Path) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(MAIL_UID), Some(MAIL_UID)).map_err(|e| e.to_string())?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| e.to_string())? {
            chown_tree(&entry.map_err(|e| e.to_string())?.path())?;
        }
    }
    Ok(())
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.stop();
    }
}
