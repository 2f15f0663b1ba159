//! TLS on every link, all of it rustls with the ring provider: the certificate ingest serves
//! (re-read on SIGHUP), Postgres connections by the URL's `sslmode`, and the trust roots of
//! `amqps://` broker connections. Certificates and keys are PEM files; trust roots are
//! Mozilla's (compiled in through `webpki-roots`), plus the `ca_file` of a section.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

impl PemFileError {
    fn invalid(path: &Path, problem: impl fmt::Display) -> PemFileError {
        PemFileError::Invalid {
            path: path.to_path_buf(),
            problem: problem.to_string(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemFileError> {
    std::fs::read(path).map_err(|source| PemFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

/// pki-types prints the bytes of a bad line as a list of numbers.
fn pem_problem(error: pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { .. } => "not valid PEM: a section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line".into(),
        pem::Error::Base64Decode(_) => "not valid PEM: a section is not base64".into(),
        other => format!("not valid PEM: {other}"),
    }
}

/// Every certificate of a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    parse_certificates(path, &read(path)?)
}

fn parse_certificates(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemFileError::invalid(path, pem_problem(e)))?;
    if certs.is_empty() {
        return Err(PemFileError::invalid(
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemFileError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => PemFileError::invalid(
            path,
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1; an encrypted key is not supported)",
        ),
        other => PemFileError::invalid(path, pem_problem(other)),
    })
}

/// The trust roots of a `ca_file`: every certificate in it must be usable as one.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    parse_roots(path, &read(path)?)
}

fn parse_roots(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let certs = parse_certificates(path, pem)?;
    let mut store = RootCertStore::empty();
    for (index, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            PemFileError::invalid(
                path,
                format!(
                    "certificate {} is not usable as a trust root: {e}",
                    index + 1
                ),
            )
        })?;
    }
    Ok(certs)
}

/// A server certificate and key that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    #[error(transparent)]
    Certificate(PemFileError),
    #[error(transparent)]
    Key(PemFileError),
    /// Both parse, but do not belong together (or the key is of a kind ring cannot sign with).
    #[error("the key in {} does not fit the certificate in {}: {problem}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
}

impl ServerCertError {
    /// The `[ingest]` key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            ServerCertError::Certificate(_) => "tls_cert_file",
            ServerCertError::Key(_) => "tls_key_file",
            ServerCertError::Mismatch { .. } => "tls_cert_file, tls_key_file",
        }
    }
}

/// Reads a certificate chain (leaf first) and its key, and checks that they belong together.
pub fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, ServerCertError> {
    let chain = read_certificates(cert_file).map_err(ServerCertError::Certificate)?;
    let key = read_private_key(key_file).map_err(ServerCertError::Key)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| ServerCertError::Mismatch {
        cert: cert_file.to_path_buf(),
        key: key_file.to_path_buf(),
        problem: e.to_string(),
    })
}

/// What an HTTPS listener serves: a certificate that can be replaced while it runs. Every new
/// connection gets the certificate current at its handshake; open ones keep theirs.
#[derive(Clone)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Arc<CurrentCert>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("lock").clone())
    }
}

impl ServerTls {
    /// Offers HTTP/2 and HTTP/1.1 by ALPN, so that HTTP/2 clients work over TLS too.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls, ServerCertError> {
        let key = certified_key(cert_file, key_file)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the certificate and key files again. Connections from now on get the new
    /// certificate; when the files cannot be used (half written, a key of another certificate),
    /// the one served so far stays, and the error is logged and returned.
    pub fn reload(&self) -> Result<(), ServerCertError> {
        match certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.0.write().expect("lock") = Arc::new(key);
                info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "TLS certificate not reloaded; still serving the previous one");
                Err(e)
            }
        }
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

/// The `sslmode` of a Postgres URL, as libpq defines it (`allow` aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, the certificate unchecked; plain otherwise.
    Prefer,
    /// TLS or no connection; the certificate unchecked, unless a `ca_file` is given (then as
    /// `VerifyCa`, as libpq does with a root certificate file).
    Require,
    /// TLS, the certificate chain verified against the trust roots; any host name.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    const NAMES: &'static str = "disable, prefer, require, verify-ca or verify-full";

    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What tokio-postgres is told: it knows only the first three, and leaves checking the
    /// certificate to the TLS connector.
    fn negotiated(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// A Postgres URL split into what tokio-postgres parses and the `sslmode` it named, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    pub url: String,
    pub sslmode: Option<SslMode>,
}

impl PostgresUrl {
    /// The last `sslmode` parameter counts, as in libpq. A value it does not know is an error
    /// that lists the known ones.
    pub fn parse(url: &str) -> Result<PostgresUrl, String> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(PostgresUrl {
                url: url.to_string(),
                sslmode: None,
            });
        };
        let mut sslmode = None;
        let mut params = Vec::new();
        for param in query.split('&') {
            match param.split_once('=') {
                Some(("sslmode", value)) => {
                    let mode = SslMode::parse(value).ok_or_else(|| {
                        format!("sslmode={value} is not supported (use {})", SslMode::NAMES)
                    })?;
                    sslmode = Some(mode);
                    params.push(format!("sslmode={}", mode.negotiated()));
                }
                _ => params.push(param.to_string()),
            }
        }
        Ok(PostgresUrl {
            url: format!("{base}?{}", params.join("&")),
            sslmode,
        })
    }
}

/// The TLS connector for Postgres connections, or `None` for plain ones: a URL without
/// `sslmode` stays plain (libpq would try TLS first), as do `sslmode=disable` URLs.
pub fn postgres_connector(
    sslmode: Option<SslMode>,
    ca_file: Option<&Path>,
) -> Result<Option<MakeRustlsConnect>, PemFileError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (sslmode, ca_file) {
        (None | Some(SslMode::Disable), _) => return Ok(None),
        (Some(SslMode::Prefer), _) | (Some(SslMode::Require), None) => {
            Arc::new(EncryptionOnly(provider.clone()))
        }
        (Some(SslMode::Require | SslMode::VerifyCa), _) => {
            Arc::new(ChainOnly(webpki_verifier(ca_file, &provider)?))
        }
        (Some(SslMode::VerifyFull), _) => webpki_verifier(ca_file, &provider)?,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// Mozilla's roots and the certificates of `ca_file`.
fn webpki_verifier(
    ca_file: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, PemFileError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        roots.add_parsable_certificates(read_roots(path)?);
    }
    Ok(
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("Mozilla's roots are never empty"),
    )
}

/// `sslmode=prefer` and `require`: encrypted, but any certificate is taken (the handshake's
/// signatures are still checked, so the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct EncryptionOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// `sslmode=verify-ca`: the chain must lead to a trusted root, whatever host it names. The
/// WebPKI verifier checks the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The extra trust roots of an `amqps://` connection, as lapin takes them (PEM text); Mozilla's
/// roots are always trusted.
pub fn amqp_tls_config(ca_file: Option<&Path>) -> Result<lapin::tcp::OwnedTLSConfig, PemFileError> {
    let cert_chain = match ca_file {
        Some(path) => {
            let pem = read(path)?;
            parse_roots(path, &pem)?;
            Some(String::from_utf8_lossy(&pem).into_owned())
        }
        None => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_mapped_for_tokio_postgres() {
        let plain = PostgresUrl::parse("postgres://u@h:5432/db").unwrap();
        assert_eq!(plain.sslmode, None);
        assert_eq!(plain.url, "postgres://u@h:5432/db");
        for (given, mode, told) in [
            ("disable", SslMode::Disable, "disable"),
            ("prefer", SslMode::Prefer, "prefer"),
            ("require", SslMode::Require, "require"),
            ("verify-ca", SslMode::VerifyCa, "require"),
            ("verify-full", SslMode::VerifyFull, "require"),
        ] {
            let url = PostgresUrl::parse(&format!(
                "postgres://u@h/db?connect_timeout=3&sslmode={given}"
            ))
            .unwrap();
            assert_eq!(url.sslmode, Some(mode), "{given}");
            assert_eq!(
                url.url,
                format!("postgres://u@h/db?connect_timeout=3&sslmode={told}")
            );
            let parsed: tokio_postgres::Config = url.url.parse().expect("tokio-postgres parses it");
            let expected = if told == "disable" {
                tokio_postgres::config::SslMode::Disable
            } else if told == "prefer" {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            };
            assert_eq!(parsed.get_ssl_mode(), expected);
        }
        let e = PostgresUrl::parse("postgres://u@h/db?sslmode=allow").unwrap_err();
        assert_eq!(
            e,
            "sslmode=allow is not supported (use disable, prefer, require, verify-ca or verify-full)"
        );
    }

    #[test]
    fn only_tls_modes_get_a_connector() {
        assert!(postgres_connector(None, None).unwrap().is_none());
        assert!(postgres_connector(Some(SslMode::Disable), None)
            .unwrap()
            .is_none());
        for mode in [
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert!(postgres_connector(Some(mode), None).unwrap().is_some());
        }
        let missing = Path::new("/nonexistent/ca.pem");
        let e = postgres_connector(Some(SslMode::VerifyFull), Some(missing))
            .err()
            .expect("an unreadable ca_file");
        assert!(matches!(e, PemFileError::Unreadable { .. }), "{e}");
    }

    #[test]
    fn pem_problems_read_as_one_line() {
        let dir = std::env::temp_dir().join(format!("pushfleet-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let e = read_certificates(&not_pem).unwrap_err().to_string();
        assert!(
            e.ends_with("holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
            "{e}"
        );
        let e = read_certificates(&broken).unwrap_err().to_string();
        assert!(
            e.ends_with("not valid PEM: a section has no END line"),
            "{e}"
        );
        let e = read_private_key(&not_pem).unwrap_err().to_string();
        assert!(e.contains("holds no PEM private key"), "{e}");
        let e = certified_key(&dir.join("missing.pem"), &not_pem)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
