//! How the key service's own clients — the admin CLI and the gateway — reach it: `http://` in
//! plaintext (a key service on loopback), or `https://` with the CA bundle that signed the
//! service's certificate and, under mutual TLS, a client certificate that the access policy knows.
//! The PEM files are read once, when the client is set up.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::tls::{check_certificates, check_private_key};

/// The names a client's settings go by, for error messages (`--ca-cert` in the CLI,
/// `--kms-ca-cert` in the gateway).
#[derive(Debug, Clone, Copy)]
pub struct SettingNames {
    /// The CA bundle's setting.
    pub ca_cert: &'static str,
    /// The client certificate's setting.
    pub client_cert: &'static str,
    /// The client key's setting.
    pub client_key: &'static str,
}

/// The PEM files a client presents; all optional, checked against the URL's scheme.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA bundle that signed the key service's certificate.
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate chain, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// This client's private key, for mutual TLS.
    pub client_key: Option<PathBuf>,
}

/// Whether a failed call's status came from the connection (it broke, or never spoke gRPC)
/// rather than from the key service answering.
pub fn is_connection_failure(status: &tonic::Status) -> bool {
    let message = status.message();
    match status.code() {
        tonic::Code::Unavailable => message.contains("transport"),
        tonic::Code::Unknown => message.starts_with("transport error"),
        // hyper's word for a request whose connection went away under it.
        tonic::Code::Cancelled => message.contains("operation was canceled"),
        tonic::Code::Internal => {
            message.contains("h2 protocol error") || message.contains("invalid compression flag")
        }
        _ => false,
    }
}

/// What a connection failure most likely means, for the end of an error message ("" when the
/// status is the key service's own answer). `url` is the `--kms` URL.
pub fn connection_hint(status: &tonic::Status, url: &str, names: SettingNames) -> String {
    if !is_connection_failure(status) || status.code() == tonic::Code::Unavailable {
        return String::new();
    }
    if status.message().contains("invalid compression flag") {
        return " (what answered is not a gRPC server: check the port; the gateway's HTTP port is \
                 not the key service)"
            .into();
    }
    if url.starts_with("http://") {
        format!(
            " (the connection failed before any answer: if the key service serves TLS, use an \
             https:// URL and {})",
            names.ca_cert
        )
    } else {
        format!(
            " (the TLS connection failed: check that {} holds the CA that signed the key \
             service's certificate, and that {} and {} are a pair signed by a CA the key service \
             trusts)",
            names.ca_cert, names.client_cert, names.client_key
        )
    }
}

/// A client cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key service's URL does not parse.
    #[error("--kms {url:?}: not a usable URL: {source}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A URL that is neither `http://` nor `https://`.
    #[error("--kms {url:?}: use http://HOST:PORT (plaintext, loopback) or https://HOST:PORT")]
    BadScheme {
        /// The URL given.
        url: String,
    },
    /// An `https://` URL without the CA bundle to check the service's certificate with.
    #[error("{setting} is required with an https:// --kms URL")]
    CaRequired {
        /// The CA bundle's setting.
        setting: &'static str,
    },
    /// TLS files with a plaintext URL: they would be silently ignored.
    #[error("{setting} is given but --kms {url} is not https://; use an https:// URL for TLS")]
    TlsWithoutHttps {
        /// The setting that was given.
        setting: &'static str,
        /// The URL.
        url: String,
    },
    /// A client certificate without its key, or the other way round.
    #[error("{given} needs {missing} as well")]
    HalfAnIdentity {
        /// The one given.
        given: &'static str,
        /// The one missing.
        missing: &'static str,
    },
    /// A PEM file cannot be read.
    #[error("{setting} {}: {source}", path.display())]
    Read {
        /// Its setting.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{setting} {}: {what}", path.display())]
    Invalid {
        /// Its setting.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The TLS configuration was refused (a client key that is not the certificate's, say).
    #[error("{settings}: {}", with_sources(.source))]
    Tls {
        /// The settings involved.
        settings: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// An endpoint for the key service at `url`, over TLS when it is `https://`.
pub fn endpoint(url: &str, files: &TlsFiles, names: SettingNames) -> Result<Endpoint, ClientError> {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(ClientError::BadScheme {
            url: url.to_owned(),
        });
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| ClientError::BadUrl {
        url: url.to_owned(),
        source,
    })?;
    match tls_config(url, files, names)? {
        Some(tls) => endpoint.tls_config(tls).map_err(|source| ClientError::Tls {
            settings: [names.ca_cert, names.client_cert, names.client_key]
                .into_iter()
                .zip([&files.ca_cert, &files.client_cert, &files.client_key])
                .filter(|(_, given)| given.is_some())
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
                .join("/"),
            source,
        }),
        None => Ok(endpoint),
    }
}

/// An error and its causes, `a: b: c` (tonic's own text is only "transport error").
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn tls_config(
    url: &str,
    files: &TlsFiles,
    names: SettingNames,
) -> Result<Option<ClientTlsConfig>, ClientError> {
    let given = [
        (names.ca_cert, &files.ca_cert),
        (names.client_cert, &files.client_cert),
        (names.client_key, &files.client_key),
    ];
    if !url.starts_with("https://") {
        return match given.into_iter().find(|(_, f)| f.is_some()) {
            Some((setting, _)) => Err(ClientError::TlsWithoutHttps {
                setting,
                url: url.to_owned(),
            }),
            None => Ok(None),
        };
    }
    let identity = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(_), None) => {
            return Err(ClientError::HalfAnIdentity {
                given: names.client_cert,
                missing: names.client_key,
            });
        }
        (None, Some(_)) => {
            return Err(ClientError::HalfAnIdentity {
                given: names.client_key,
                missing: names.client_cert,
            });
        }
        (None, None) => None,
    };
    let ca = files.ca_cert.as_deref().ok_or(ClientError::CaRequired {
        setting: names.ca_cert,
    })?;
    let ca = read(names.ca_cert, ca, check_certificates)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        let cert = read(names.client_cert, cert, check_certificates)?;
        let key = read(names.client_key, key, check_private_key)?;
        tls = tls.identity(Identity::from_pem(cert, &*key));
    }
    Ok(Some(tls))
}

/// Reads a PEM file and checks it holds what `check` wants.
fn read(
    setting: &'static str,
    path: &Path,
    check: fn(&[u8]) -> Result<(), String>,
) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    let bytes = std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| ClientError::Read {
            setting,
            path: path.to_path_buf(),
            source,
        })?;
    check(&bytes).map_err(|what| ClientError::Invalid {
        setting,
        path: path.to_path_buf(),
        what,
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: SettingNames = SettingNames {
        ca_cert: "--ca-cert",
        client_cert: "--client-cert",
        client_key: "--client-key",
    };

    #[test]
    fn settings_must_fit_the_url() {
        assert!(endpoint("http://127.0.0.1:50051", &TlsFiles::default(), NAMES).is_ok());
        let err = endpoint("https://kms.example:50051", &TlsFiles::default(), NAMES).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--ca-cert is required with an https:// --kms URL"
        );
        let ca_only = TlsFiles {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = endpoint("http://127.0.0.1:50051", &ca_only, NAMES).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::TlsWithoutHttps {
                    setting: "--ca-cert",
                    ..
                }
            ),
            "{err}"
        );
        let err = endpoint("https://kms.example:50051", &ca_only, NAMES).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--ca-cert /nonexistent/ca.pem: "),
            "{err}"
        );
        let half = TlsFiles {
            client_cert: Some("c.pem".into()),
            ..ca_only
        };
        let err = endpoint("https://kms.example:50051", &half, NAMES).unwrap_err();
        assert_eq!(err.to_string(), "--client-cert needs --client-key as well");
        assert!(endpoint("not a url", &TlsFiles::default(), NAMES).is_err());
        let err = endpoint("ftp://kms.example", &TlsFiles::default(), NAMES).unwrap_err();
        assert!(matches!(err, ClientError::BadScheme { .. }), "{err}");
        // A CA bundle with no certificate in it is refused up front, not at the first call.
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let no_certs = TlsFiles {
            ca_cert: Some(empty),
            ..TlsFiles::default()
        };
        let err = endpoint("https://kms.example:50051", &no_certs, NAMES).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Invalid {
                    setting: "--ca-cert",
                    ..
                }
            ),
            "{err}"
        );
    }
}
