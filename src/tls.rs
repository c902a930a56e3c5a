//! rustls configs. Server side: certificates from PEM files, chosen by SNI with a default; a
//! reload builds a new `ServerTls` with the rest of the config (reload.rs), so a file that does
//! not load leaves the old configuration, certificates included, in place.
//! Client side, per backend: verify against a CA bundle or the system roots, or not at all when
//! `insecure_skip_verify` says so. TLS 1.2 and 1.3 only, ring as the provider.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Where a certificate comes from: chain and key PEM files, and the SNI names it serves
/// (none for the default).
#[derive(Debug, Clone)]
pub struct CertSource {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The listeners' TLS: one rustls config with its certificates.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    resolver: Arc<CertResolver>,
    /// Each certificate's name (`default`, or the first SNI name it serves) and when it
    /// expires (Unix seconds), for `imapgate_tls_certificate_not_after_timestamp_seconds`.
    pub expiry: Vec<(String, i64)>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("sources", &self.resolver.sources)
            .finish()
    }
}

impl ServerTls {
    /// `default` serves clients without SNI or with a name no other certificate has.
    pub fn load(default: CertSource, sni: Vec<CertSource>) -> Result<ServerTls, String> {
        let mut sources = vec![default];
        sources.extend(sni);
        let set = CertSet::load(&sources)?;
        let expiry = sources
            .iter()
            .zip(set.leaves())
            .map(|(source, leaf)| {
                let name = source.names.first().map_or("default", String::as_str);
                Ok((
                    name.to_string(),
                    not_after(leaf).map_err(|e| format!("{}: {e}", source.cert.display()))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let resolver = Arc::new(CertResolver {
            sources,
            current: set,
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // Resumption: session tickets (stateless) and the default in-memory session cache.
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
            expiry,
        })
    }
}

#[derive(Debug)]
struct CertResolver {
    sources: Vec<CertSource>,
    current: CertSet,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = &self.current;
        let by_name = hello
            .server_name()
            .and_then(|name| set.by_name.get(&name.to_ascii_lowercase()));
        Some(by_name.unwrap_or(&set.default).clone())
    }
}

#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// Every source's key, in the order of the sources.
    all: Vec<Arc<CertifiedKey>>,
}

impl CertSet {
    fn load(sources: &[CertSource]) -> Result<CertSet, String> {
        let provider = provider();
        let mut loaded = sources
            .iter()
            .map(|s| Ok::<_, String>((s, Arc::new(certified_key(&provider, s)?))));
        let (_, default) = loaded.next().ok_or("no certificate")??;
        let mut by_name = HashMap::new();
        let mut all = vec![default.clone()];
        for entry in loaded {
            let (source, key) = entry?;
            for name in &source.names {
                by_name.insert(name.to_ascii_lowercase(), key.clone());
            }
            all.push(key);
        }
        Ok(CertSet {
            default,
            by_name,
            all,
        })
    }

    /// Each source's leaf certificate (the first of its chain), in the order of the sources.
    fn leaves(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        // certified_key() refuses an empty chain.
        self.all.iter().filter_map(|key| key.cert.first())
    }
}

/// A certificate's `notAfter`, in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

fn certified_key(provider: &CryptoProvider, source: &CertSource) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&source.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{}: {e}", source.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            source.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&source.key)
        .map_err(|e| format!("{}: {e}", source.key.display()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", source.key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {}: {e}",
            source.cert.display(),
            source.key.display()
        )
    })?;
    Ok(certified)
}

/// How imapgate checks a backend's certificate.
pub enum Verify {
    /// Against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Against the system's roots (/etc/ssl/certs and the like).
    SystemRoots,
    /// Not at all.
    Nothing,
}

pub fn client_config(verify: Verify) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?;
    let config = match verify {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
        Verify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no CA certificate in the file", path.display()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no system root certificates found".into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The name to verify: the configured one, or the address's host.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?}: {e}"))
}

/// `insecure_skip_verify`: any certificate is accepted, but signatures are still checked so
/// the handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
