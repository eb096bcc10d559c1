//! The client's TLS settings for `wss://` URLs: whom it trusts.
//!
//! rustls with the `ring` provider, chosen explicitly (as the broker does), so the build never
//! depends on which provider features other crates happen to enable. The files are read once,
//! when the client is built.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Why the client's TLS settings could not be made. Each names the file at fault.
#[derive(Debug, Error)]
pub(crate) enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{} holds no PEM certificate (\"BEGIN CERTIFICATE\")", path.display())]
    NoCertificate { path: PathBuf },
    /// A certificate the client was told to trust cannot be used as a root.
    #[error("cannot trust the certificate in {}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot set up the client's TLS: {0}")]
    Setup(rustls::Error),
}

/// The public certificate authorities (Mozilla's list, built in), plus every certificate in
/// the PEM files `ca_files` (a private CA, or a broker's self-signed certificate). Reads files.
pub(crate) fn client_config(ca_files: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in ca_files {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: path.clone(),
                source,
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What is wrong with the peer's certificate, in words, when `e` is a certificate rejection;
/// `None` for every other TLS error. The words name the usual fix (trusting the broker's
/// certificate or its CA, the host name in the URL), since rustls's own names them only by
/// variant (`UnknownIssuer`).
pub(crate) fn rejection_in_words(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return None;
    };
    Some(match cert {
        C::UnknownIssuer => "it is not signed by a trusted certificate authority (a self-signed \
             certificate or a private CA: trust it with --ca FILE, tls_ca_file in the library)"
            .into(),
        C::Expired => "it has expired".into(),
        C::NotValidYet => "it is not valid yet (check this machine's clock)".into(),
        C::NotValidForName => "it is not issued for the host name in the URL".into(),
        C::BadSignature => "its signature does not verify".into(),
        C::Revoked => "it has been revoked".into(),
        C::BadEncoding => "it cannot be parsed".into(),
        // webpki's errors come through `Other`, written as their variant names.
        C::Other(other) => match other.to_string().as_str() {
            "CaUsedAsEndEntity" => "it is a CA certificate (basicConstraints CA:TRUE) used as \
                the server's own certificate: the broker needs a leaf certificate (openssl \
                req -x509 makes a CA one unless given -addext basicConstraints=critical,CA:FALSE)"
                .into(),
            name => format!("the verifier says {name}"),
        },
        // The others (with context: name, times) read well as rustls writes them.
        other => other.to_string(),
    })
}

/// The certificates in the PEM file `path`: at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_roots_alone_and_a_ca_file_make_a_config() {
        assert!(client_config(&[]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(&ca, c.cert.pem()).unwrap();
        assert!(client_config(std::slice::from_ref(&ca)).is_ok());
    }

    #[test]
    fn certificate_rejections_are_said_in_words_and_other_errors_are_not_rejections() {
        use rustls::CertificateError as C;
        #[derive(Debug)]
        struct Webpki;
        impl std::fmt::Display for Webpki {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CaUsedAsEndEntity")
            }
        }
        impl std::error::Error for Webpki {}
        let words = |c: C| rejection_in_words(&rustls::Error::InvalidCertificate(c)).unwrap();
        assert!(words(C::UnknownIssuer).contains("not signed by a trusted"));
        assert!(words(C::Expired).contains("expired"));
        let ca = C::Other(rustls::OtherError(Arc::new(Webpki)));
        assert!(words(ca).contains("CA certificate"));
        assert_eq!(rejection_in_words(&rustls::Error::DecryptError), None);
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here").unwrap();
        let e = client_config(std::slice::from_ref(&empty)).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    }
}
