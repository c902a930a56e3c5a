//! Private Courier-IMAP 5.0 instances (Debian's courier-imap and courier-authlib, unpacked by
//! `fetch-backends.sh`, never installed): authdaemond with the userdb module, and couriertcpd
//! running imaplogin/imapd, both with the instance's temp dir as working directory, on a
//! loopback port picked by the OS, stopped on drop (the whole process group).
//!
//! Courier's authlib has its socket (`/run/courier/authdaemon/socket`), `authdaemonrc` and
//! userdb paths compiled in; `fetch-backends.sh` patched the unpacked copies to relative paths,
//! so each instance's authdaemond reads `./authdaemonrc` and `./userdb.dat` and listens on
//! `./authdaemon/socket`, where its imaplogin connects. The userdb holds SHA-512 crypt hashes,
//! so every password of `dovecot::USERS` and `longpw` works (the userdb never sees a password
//! itself; only CR and LF could not go through authdaemond's line protocol). Mail is delivered
//! to no one: each user has an empty Maildir with one folder.
//!
//! imapd takes its settings from the environment (Debian puts them in /etc/courier/imapd); they
//! are set here, without LITERAL+ (Courier never offers it) and without TLS. LIST shows the
//! folder as `INBOX.Backend-<name>` (delimiter "."), so `LIST "" "Backend-*"` finds nothing.
//!
//! Greeting: `* OK [CAPABILITY IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT
//! THREAD=REFERENCES SORT QUOTA IDLE AUTH=PLAIN ACL ACL2=UNION ENABLE UTF8=ACCEPT] Courier-IMAP
//! ready. ...`; the tagged OK of LOGIN is a bare `OK LOGIN Ok.`, and CAPABILITY after login
//! lists the same. NAMESPACE: `(("INBOX." ".")) NIL (("#shared." ".")("shared." "."))`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::backends::{self, Group};
use super::cyrus::password_of;
use super::dovecot::{USERS, long_password};

/// The Debian user that owns mail; imapd runs as it after the login (the userdb's uid/gid).
const MAIL_UID: u32 = 8;

/// IMAP_CAPABILITY: Debian's default, plus AUTH=PLAIN (offered without TLS here).
pub const CAPABILITY: &str = "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT \
                              THREAD=REFERENCES SORT QUOTA IDLE AUTH=PLAIN";

pub struct Courier {
    pub port: u16,
    /// The greeting line (without CRLF).
    pub greeting: String,
    group: Group,
    dir: tempfile::TempDir,
}

/// Whether the unpacked Courier is there (see `support::external`).
pub fn available() -> bool {
    backends::available(
        "Courier-IMAP (courier-imap)",
        "courier/usr/sbin/couriertcpd",
    )
}

fn tree() -> PathBuf {
    backends::root().join("courier")
}

impl Courier {
    /// Starts an instance; panics with what went wrong if it does not come up.
    pub fn start(name: &str) -> Courier {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(name) {
                Ok(c) => return c,
                Err(e) => last_error = e,
            }
        }
        panic!("Courier {name} did not start: {last_error}");
    }

    fn try_start(name: &str) -> Result<Courier, String> {
        let e = |e: std::io::Error| e.to_string();
        // Short path: it holds the authdaemon socket (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("co.")
            .tempdir_in("/tmp")
            .map_err(e)?;
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).map_err(e)?;
        std::fs::create_dir(root.join("authdaemon")).map_err(e)?;
        std::fs::write(
            root.join("authdaemonrc"),
            "authmodulelist=\"authuserdb\"\ndaemons=2\nDEBUG_LOGIN=0\nDEFAULTOPTIONS=\"\"\n",
        )
        .map_err(e)?;

        let long = long_password();
        let users: Vec<(&str, &str)> = USERS
            .iter()
            .copied()
            .chain([("longpw", long.as_str())])
            .collect();
        let mut userdb = String::new();
        let mut shadow = String::new();
        for (user, password) in &users {
            let home = root.join("mail").join(user);
            make_maildir(&home, name).map_err(e)?;
            let h = home.display();
            userdb.push_str(&format!(
                "{user}\tuid={MAIL_UID}|gid={MAIL_UID}|home={h}|mail={h}/Maildir\n"
            ));
            let hash = backends::sha512_crypt(password, "imapgatetest");
            shadow.push_str(&format!("{user}\tsystempw={hash}\n"));
        }
        make_dat(root, "userdb", &userdb)?;
        make_dat(root, "userdbshadow", &shadow)?;
        chown_tree(&root.join("mail")).map_err(e)?;

        let log = root.join("courier.log");
        let log_file = std::fs::File::create(&log).map_err(e)?;
        let lib = tree().join("usr/lib");
        let authdaemond = Command::new(tree().join("usr/lib/courier/courier-authlib/authdaemond"))
            .env("LD_LIBRARY_PATH", &lib)
            .env("LTDL_LIBRARY_PATH", tree().join("usr/lib/courier-authlib"))
            .current_dir(root)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(e)?)
            .stderr(log_file.try_clone().map_err(e)?)
            .spawn()
            .map_err(|e| format!("cannot run authdaemond: {e}"))?;
        let mut group = Group {
            children: vec![authdaemond],
        };
        wait_for_socket(&root.join("authdaemon/socket"), &mut group, &log)?;

        let port = backends::free_port();
        let mut tcpd = Command::new(tree().join("usr/sbin/couriertcpd"));
        tcpd.env_clear()
            .current_dir(root)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(e)?)
            .stderr(log_file)
            .args([
                "-address=127.0.0.1",
                "-maxprocs=100",
                "-maxperip=100",
                "-nodnslookup",
                "-noidentlookup",
            ])
            .arg(port.to_string())
            .arg(tree().join("usr/lib/courier/courier/imaplogin"))
            .arg(tree().join("usr/bin/imapd"))
            .arg("Maildir");
        for (key, value) in imapd_env(root) {
            tcpd.env(key, value);
        }
        tcpd.env("LD_LIBRARY_PATH", &lib);
        let child = tcpd
            .spawn()
            .map_err(|e| format!("cannot run couriertcpd: {e}"))?;
        group.children.push(child);
        let greeting = backends::wait_greeting(port, "Courier-IMAP", &mut group, &log)?;
        Ok(Courier {
            port,
            greeting,
            group,
            dir,
        })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every mailbox `user` has, from a direct login (not through the proxy): `INBOX` and
    /// `INBOX.Backend-<name>`, plus whatever a test made.
    pub fn mailboxes(&self, user: &str) -> Vec<String> {
        let password = password_of(user);
        backends::mailboxes(&self.address(), user, &password)
            .unwrap_or_else(|e| panic!("Courier: {e}\n{}", self.log()))
    }

    /// What authdaemond, couriertcpd, imaplogin and imapd wrote to stderr.
    pub fn log(&self) -> String {
        backends::read_log(&self.dir.path().join("courier.log"))
    }

    /// Stops the instance and every process it started.
    pub fn stop(&mut self) {
        self.group.stop();
    }
}

/// What Debian's /etc/courier/imapd sets, minus TLS and the paths into /etc and /run.
fn imapd_env(root: &Path) -> Vec<(&'static str, String)> {
    [
        ("PATH", "/usr/bin:/bin"),
        ("IMAP_CAPABILITY", CAPABILITY),
        ("IMAP_TLS_REQUIRED", "0"),
        ("IMAP_KEYWORDS", "1"),
        ("IMAP_ACL", "1"),
        ("IMAP_PROXY", "0"),
        ("IMAP_IDLE_TIMEOUT", "60"),
        ("IMAP_MAILBOX_SANITY_CHECK", "1"),
        ("IMAP_DISABLETHREADSORT", "0"),
        ("IMAP_CHECK_ALL_FOLDERS", "0"),
        ("IMAP_OBSOLETE_CLIENT", "0"),
        ("IMAP_UMASK", "022"),
        ("IMAP_ULIMITD", "131072"),
        ("IMAP_USELOCKS", "1"),
        ("IMAP_ENHANCEDIDLE", "0"),
        ("IMAP_TRASHFOLDERNAME", "Trash"),
        ("IMAP_EMPTYTRASH", "Trash:7"),
        ("IMAP_MOVE_EXPUNGE_TO_TRASH", "0"),
        ("MAILDIRPATH", "Maildir"),
        ("HEADERFROM", "X-IMAP-Sender"),
        ("DEBUG_LOGIN", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .chain([(
        "IMAP_SHAREDINDEXFILE",
        root.join("shared/index").display().to_string(),
    )])
    .collect()
}

/// `<name>.dat` from `text` (lines `user<TAB>field=value|...`), as makeuserdb would.
fn make_dat(root: &Path, name: &str, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(tree().join("usr/lib/courier/courier-authlib/makedatprog"))
        .arg("-")
        .arg(root.join(format!("{name}.tmp")))
        .arg(root.join(format!("{name}.dat")))
        .env("LD_LIBRARY_PATH", tree().join("usr/lib"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run makedatprog: {e}"))?;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{text}.\n").as_bytes())
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "makedatprog {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn wait_for_socket(socket: &Path, group: &mut Group, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = group.exited() {
            return Err(format!(
                "authdaemond exited with {status}: {}",
                backends::read_log(log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no authdaemond socket within 20 s: {}",
                backends::read_log(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn make_maildir(home: &Path, backend: &str) -> std::io::Result<()> {
    let maildir = home.join("Maildir");
    let folder = maildir.join(format!(".Backend-{backend}"));
    for d in [&maildir, &folder] {
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
    }
    std::fs::write(folder.join("maildirfolder"), "")?;
    Ok(())
}

fn chown_tree(path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(MAIL_UID), Some(MAIL_UID))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path())?;
        }
    }
    Ok(())
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.stop();
    }
}
