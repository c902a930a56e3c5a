//! A private PostgreSQL cluster for tests: `initdb` in a temp dir, `postgres` on a loopback
//! port picked by the OS with its UNIX socket in the same dir, stopped on drop.
//!
//! PostgreSQL refuses to run as root, so as root the server (and initdb) run as `nobody`, who
//! owns the temp dir. The superuser `postgres` connects over the UNIX socket without a password
//! (the test's own setup, through `psql`); over TCP every user needs its password
//! (scram-sha-256): `USER` / `PASSWORD` is the role imapgate connects as.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "imapgate";
pub const PASSWORD: &str = "pg-secret";
pub const DATABASE: &str = "mail";

/// `nobody` on Debian.
const NOBODY: u32 = 65534;

pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where initdb, postgres and psql are: Debian's versioned directory (the newest), else
/// /usr/local/bin.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("psql").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().or_else(|| {
        let local = PathBuf::from("/usr/local/bin");
        (local.join("initdb").exists() && local.join("postgres").exists()).then_some(local)
    })
}

/// Whether PostgreSQL is installed (see `support::external` for what happens when not).
pub fn available() -> bool {
    super::external(
        bin_dir().is_some(),
        "PostgreSQL is not installed: install postgresql",
    )
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// As root, the command runs as `nobody` (PostgreSQL refuses root); otherwise as the caller.
fn as_server_user(command: &mut Command) -> &mut Command {
    if as_root() {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

impl Postgres {
    /// initdb, start, create the `USER` role and the `DATABASE` it owns; panics with the
    /// server's log if it does not come up.
    pub fn start() -> Postgres {
        let bin = bin_dir().expect("PostgreSQL binaries");
        // Short path: the socket's path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("pg.")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if as_root() {
            std::os::unix::fs::chown(root, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
        }
        let out = as_server_user(&mut Command::new(bin.join("initdb")))
            .arg("-D")
            .arg(root.join("data"))
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .current_dir(root)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: 0,
            bin,
            dir,
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            pg.port = super::free_port();
            match pg.run() {
                Ok(()) => {
                    pg.psql(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"));
                    // Not in a transaction: one statement per call.
                    pg.psql(&format!("CREATE DATABASE {DATABASE} OWNER {USER}"));
                    return pg;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// The URL imapgate connects with (the password comes from `password_file`).
    pub fn url(&self) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// `PASSWORD` in a file, as `password_file` wants it.
    pub fn password_file(&self) -> PathBuf {
        let path = self.dir.path().join("password");
        std::fs::write(&path, format!("{PASSWORD}\n")).expect("write the password");
        path
    }

    /// Runs SQL in `DATABASE` as `USER` (over the socket, no password); panics on an error.
    pub fn execute(&self, sql: &str) {
        self.psql_in(DATABASE, USER, sql);
    }

    fn psql(&self, sql: &str) {
        self.psql_in("postgres", "postgres", sql);
    }

    fn psql_in(&self, database: &str, user: &str, sql: &str) {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", user, "-d", database])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server again after `stop`, on the same port with the same data.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.run() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("PostgreSQL did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `postgres` in the foreground as `nobody` and waits until it answers a query.
    fn run(&mut self) -> Result<(), String> {
        let root = self.dir.path();
        let log = std::fs::File::create(root.join("postgres.log")).map_err(|e| e.to_string())?;
        if as_root() {
            std::os::unix::fs::chown(root.join("postgres.log"), Some(NOBODY), Some(NOBODY))
                .map_err(|e| e.to_string())?;
        }
        let mut child = as_server_user(&mut Command::new(self.bin.join("postgres")))
            .arg("-D")
            .arg(root.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(root)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=50"])
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            let ready = Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-h"])
                .arg(root)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-c", "SELECT 1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("not ready within 30 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("postgres.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Stops the server (fast shutdown: sessions are ended; the port then refuses
    /// connections); `restart` brings it back.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
