//! How the gRPC listener is secured ([`Transport`]), and loading its TLS material: the server's
//! certificate chain and key, and the CA bundle whose client certificates it accepts.
//!
//! Everything is read and checked at start-up ([`load_mutual_tls`]), so a missing file, a PEM
//! without a certificate or a key that does not match its certificate stops the service with a
//! message naming the flag, before the store is opened.
//!
//! Client certificates are verified by rustls against the CA bundle whenever one is presented. The
//! handshake itself also admits a client without a certificate, so that such a client gets a gRPC
//! `UNAUTHENTICATED` naming what is missing instead of an opaque TLS alert; the access layer
//! ([`super::access`]) refuses every call such a client makes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer as _, X509Certificate};
use zeroize::Zeroizing;

use super::access::AccessPolicy;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the gRPC listener is secured.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plaintext HTTP/2: for loopback (or, with `--insecure-plaintext`, anywhere). Every call is
    /// allowed and recorded as an unauthenticated peer.
    Plaintext,
    /// TLS with client certificates verified against the client CA; every call is checked
    /// against the policy.
    MutualTls {
        /// The server's TLS configuration.
        config: ServerTlsConfig,
        /// Who may call what.
        policy: Arc<AccessPolicy>,
    },
}

/// The TLS files, by the flag that names each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The server's certificate chain, leaf first (`--tls-cert`).
    Cert,
    /// The server's private key (`--tls-key`).
    Key,
    /// The CA bundle client certificates must chain to (`--tls-client-ca`).
    ClientCa,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Cert => "--tls-cert",
            TlsFile::Key => "--tls-key",
            TlsFile::ClientCa => "--tls-client-ca",
        })
    }
}

/// The TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{file} {}: {source}", path.display())]
    Read {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{file} {}: {what}", path.display())]
    Invalid {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the combination (for example, the key is not the certificate's).
    #[error("--tls-cert/--tls-key/--tls-client-ca: {0}")]
    Rejected(String),
}

/// The paths of the TLS files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key: PathBuf,
    /// PEM CA bundle for client certificates.
    pub client_ca: PathBuf,
}

/// The PEM blocks of `bytes`, refusing text that is not PEM.
fn pem_blocks(bytes: &[u8]) -> Result<Vec<Pem>, String> {
    let blocks = Pem::iter_from_buffer(bytes)
        .collect::<Result<Vec<Pem>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if blocks.is_empty() {
        return Err("no PEM block found".into());
    }
    Ok(blocks)
}

/// Checks that `bytes` is PEM holding one or more parseable certificates (and nothing else);
/// the error says what is wrong. Shared with the clients' CA bundles ([`super::client`]).
pub(crate) fn check_certificates(bytes: &[u8]) -> Result<(), String> {
    for block in pem_blocks(bytes)? {
        if block.label != "CERTIFICATE" {
            return Err(format!(
                "holds a \"{}\" block; only CERTIFICATE blocks belong here",
                block.label
            ));
        }
        X509Certificate::from_der(&block.contents)
            .map_err(|e| format!("a certificate does not parse: {e}"))?;
    }
    Ok(())
}

/// Checks that `bytes` is PEM holding exactly one unencrypted private key.
pub(crate) fn check_private_key(bytes: &[u8]) -> Result<(), String> {
    let blocks = pem_blocks(bytes)?;
    let labels: Vec<String> = blocks.iter().map(|b| b.label.clone()).collect();
    // Pem holds the decoded key bytes; wipe them as soon as the labels are known.
    for mut block in blocks {
        zeroize::Zeroize::zeroize(&mut block.contents);
    }
    if labels.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") {
        return Err(
            "the key is encrypted; give an unencrypted key (and protect the file instead)".into(),
        );
    }
    match labels.iter().filter(|l| l.ends_with("PRIVATE KEY")).count() {
        0 => Err("no PRIVATE KEY block found".into()),
        1 => Ok(()),
        _ => Err("holds more than one private key".into()),
    }
}

fn invalid(file: TlsFile, path: &Path) -> impl FnOnce(String) -> TlsError + '_ {
    move |what| TlsError::Invalid {
        file,
        path: path.to_path_buf(),
        what,
    }
}

fn read(file: TlsFile, path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::Read {
            file,
            path: path.to_path_buf(),
            source,
        })
}

/// Reads and checks the TLS files, and builds the server configuration that requires (verifies)
/// client certificates from `files.client_ca`.
pub fn load_mutual_tls(files: &TlsFiles) -> Result<ServerTlsConfig, TlsError> {
    let cert = read(TlsFile::Cert, &files.cert)?;
    check_certificates(&cert).map_err(invalid(TlsFile::Cert, &files.cert))?;
    let key = read(TlsFile::Key, &files.key)?;
    check_private_key(&key).map_err(invalid(TlsFile::Key, &files.key))?;
    let ca = read(TlsFile::ClientCa, &files.client_ca)?;
    check_certificates(&ca).map_err(invalid(TlsFile::ClientCa, &files.client_ca))?;
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(&*cert, &*key))
        .client_ca_root(Certificate::from_pem(&*ca))
        // Admit certificate-less handshakes so those clients get UNAUTHENTICATED from the access
        // layer; a certificate that is presented must still chain to the client CA.
        .client_auth_optional(true)
        .timeout(HANDSHAKE_TIMEOUT);
    // tonic builds the rustls configuration here, the same way `serve` will: this is where a key
    // that does not match the certificate is found.
    Server::builder()
        .tls_config(config.clone())
        .map_err(|e| TlsError::Rejected(error_chain(&e)))?;
    Ok(config)
}

/// `error: cause: cause…`, since tonic's transport error shows its cause only as a source.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    struct Material {
        dir: tempfile::TempDir,
        files: TlsFiles,
    }

    fn material() -> Material {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["kms.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.client_ca, ca.pem()).unwrap();
        Material { dir, files }
    }

    fn refusal(files: &TlsFiles) -> String {
        load_mutual_tls(files).unwrap_err().to_string()
    }

    #[test]
    fn loads_good_material() {
        let m = material();
        load_mutual_tls(&m.files).unwrap();
    }

    #[test]
    fn each_bad_file_is_named_by_its_flag() {
        let m = material();
        let mut files = m.files.clone();
        files.cert = m.dir.path().join("missing.pem");
        assert!(
            refusal(&files).starts_with("--tls-cert "),
            "{}",
            refusal(&files)
        );

        let mut files = m.files.clone();
        files.client_ca = files.key.clone();
        let msg = refusal(&files);
        assert!(
            msg.starts_with("--tls-client-ca ") && msg.contains("PRIVATE KEY"),
            "{msg}"
        );

        let mut files = m.files.clone();
        files.key = files.cert.clone();
        let msg = refusal(&files);
        assert!(
            msg.starts_with("--tls-key ") && msg.contains("no PRIVATE KEY"),
            "{msg}"
        );

        let garbage = m.dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let mut files = m.files.clone();
        files.cert = garbage;
        let msg = refusal(&files);
        assert!(
            msg.starts_with("--tls-cert ") && msg.contains("no PEM"),
            "{msg}"
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let m = material();
        let other = m.dir.path().join("other-key.pem");
        std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let mut files = m.files.clone();
        files.key = other;
        let msg = refusal(&files);
        assert!(msg.starts_with("--tls-cert/--tls-key"), "{msg}");
    }
}
