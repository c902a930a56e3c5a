//! A private OpenLDAP `slapd` for tests: its own slapd.conf, schema includes and mdb database in
//! a temp dir, loaded with `slapadd` before it starts, on a loopback port picked by the OS,
//! stopped on drop.
//!
//! The tree: `BASE` with `ou=people` for the test's entries and a bind account (`BIND_DN`,
//! `BIND_PASSWORD`); only that account may read (anonymous clients may only bind), so a
//! lookup that finds anything has bound. Entries can carry `mailHost` (misc.schema) and a
//! `mailPort` of this file's own schema (objectClass `imapgateRoute`).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BASE: &str = "dc=example,dc=net";
pub const PEOPLE: &str = "ou=people,dc=example,dc=net";
pub const BIND_DN: &str = "cn=imapgate,dc=example,dc=net";
pub const BIND_PASSWORD: &str = "bind-secret";

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";

pub struct Slapd {
    pub port: u16,
    /// `ldaps://` (and StartTLS on `port`), with `start_tls`.
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Whether slapd is installed (see `support::external` for what happens when not).
pub fn available() -> bool {
    super::external(
        Path::new(SLAPD).exists() && Path::new(SLAPADD).exists(),
        "OpenLDAP's slapd is not installed: install slapd and ldap-utils",
    )
}

/// One person under `PEOPLE`, in LDIF: `uid`, and `mailHost` / `mailPort` when given.
pub fn person(uid: &str, mail_host: Option<&str>, mail_port: Option<u16>) -> String {
    let mut ldif = format!(
        "dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nobjectClass: imapgateRoute\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
    );
    if let Some(host) = mail_host {
        ldif.push_str(&format!("mailHost: {host}\n"));
    }
    if let Some(port) = mail_port {
        ldif.push_str(&format!("mailPort: {port}\n"));
    }
    ldif.push('\n');
    ldif
}

impl Slapd {
    /// Starts an instance holding the base tree and `entries` (LDIF, e.g. from `person`);
    /// panics with slapd's output if it does not come up.
    pub fn start(entries: &str) -> Slapd {
        Self::start_with(entries, None)
    }

    /// Like `start`, with this certificate and key (PEM): StartTLS on `port` and implicit TLS
    /// on `tls_port`; every operation (the bind too) requires TLS.
    pub fn start_tls(entries: &str, cert: &Path, key: &Path) -> Slapd {
        Self::start_with(entries, Some((cert, key)))
    }

    fn start_with(entries: &str, tls: Option<(&Path, &Path)>) -> Slapd {
        let dir = tempfile::Builder::new()
            .prefix("sl.")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path();
        std::fs::create_dir(root.join("data")).expect("data dir");
        let tls_conf = tls.map_or(String::new(), |(cert, key)| {
            format!(
                // Every operation needs TLS: a client that skipped StartTLS gets nowhere.
                "TLSCertificateFile {}\nTLSCertificateKeyFile {}\nsecurity tls=1\n",
                cert.display(),
                key.display()
            )
        });
        let conf = format!(
            r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/misc.schema
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'mailPort' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'imapgateRoute' SUP top AUXILIARY MAY mailPort )
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
{tls_conf}modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{BASE}"
rootdn "cn=admin,{BASE}"
rootpw admin-secret
directory {root}/data
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{BIND_DN}" read by anonymous auth by * none
"#,
            root = root.display()
        );
        std::fs::write(root.join("slapd.conf"), conf).expect("slapd.conf");
        let ldif = format!(
            "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
             dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: {BIND_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: imapgate\nuserPassword: {BIND_PASSWORD}\n\n\
             {entries}"
        );
        std::fs::write(root.join("data.ldif"), ldif).expect("data.ldif");
        let out = Command::new(SLAPADD)
            .arg("-f")
            .arg(root.join("slapd.conf"))
            .arg("-l")
            .arg(root.join("data.ldif"))
            .stdin(Stdio::null())
            .output()
            .expect("run slapadd");
        assert!(
            out.status.success(),
            "slapadd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut slapd = Slapd {
            port: 0,
            tls_port: None,
            dir,
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            slapd.port = super::free_port();
            slapd.tls_port = tls.map(|_| super::free_port());
            match slapd.run() {
                Ok(()) => return slapd,
                Err(e) => last_error = e,
            }
        }
        panic!("slapd did not start: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    pub fn ldaps_url(&self) -> String {
        format!(
            "ldaps://127.0.0.1:{}",
            self.tls_port.expect("started with TLS")
        )
    }

    /// The bind password in a file, as `bind_password_file` wants it.
    pub fn bind_password_file(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("bind-password");
        std::fs::write(&path, format!("{BIND_PASSWORD}\n")).expect("write bind password");
        path
    }

    /// Starts slapd again after `stop`, on the same port with the same data.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.run() {
                Ok(()) => return,
                // The port may still be in TIME_WAIT's hands for a moment.
                Err(e) if Instant::now() > deadline => panic!("slapd did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs slapd in the foreground (`-d 0`: no detaching, no debug output) and waits until
    /// it takes connections.
    fn run(&mut self) -> Result<(), String> {
        let root = self.dir.path();
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.tls_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
        }
        let mut child = Command::new(SLAPD)
            .arg("-d")
            .arg("0")
            .arg("-f")
            .arg(root.join("slapd.conf"))
            .arg("-h")
            .arg(urls)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run slapd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("exited with {status}: {err}"));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("not listening within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops slapd (the port then refuses connections); `restart` brings it back.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
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

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
