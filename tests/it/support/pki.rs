//! Certificates made by the test: a CA, imapgate's certificates (a default and one for SNI),
//! a backend's, and a second CA that signs nothing the others trust.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = make_ca(dir.path(), "ca", "imapgate test CA");
        make_ca(dir.path(), "rogue-ca", "someone else's CA");
        let pki = Pki { dir, ca };
        pki.renew("proxy", &["imap.test", "127.0.0.1"]);
        pki.renew("sni", &["other.test"]);
        pki.renew("backend", &["backend.test", "127.0.0.1"]);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    pub fn rogue_ca(&self) -> PathBuf {
        self.path("rogue-ca.pem")
    }

    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        }
    }

    /// Signs a new certificate for `names` with the test CA into `name`.pem / `name`.key
    /// (over any old ones: the reload test uses this).
    pub fn renew(&self, name: &str, names: &[&str]) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn make_ca(dir: &Path, name: &str, common_name: &str) -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    Issuer::new(params, key)
}
