//! TLS (rustls): a certificate and key read from PEM files, offered with
//! ALPN `h2` and `http/1.1`, and reloadable while the server runs (the
//! binary calls [`Tls::reload`] on SIGHUP). A reload swaps the certificate
//! for handshakes from then on; connections already open keep theirs, so
//! nothing is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The two files `--tls-cert` and `--tls-key` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The key does not fit rustls (an unsupported type, or not the certificate's key).
    #[error("the certificate and key do not work together: {0}")]
    Key(#[source] rustls::Error),
}

/// A TLS configuration whose certificate can be swapped at run time; a cheap handle.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads `files` and builds the server configuration (ALPN `h2`, `http/1.1`).
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = certified_key(&files, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Key)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            files,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the files again; on success new handshakes use the new
    /// certificate. On failure the one in use stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let provider = rustls::crypto::ring::default_provider();
        let key = certified_key(&self.files, &provider)?;
        // A poisoned lock still holds a whole Arc: replace it anyway.
        let mut current = self
            .resolver
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(key);
        Ok(())
    }

    /// The files this configuration reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The acceptor for the accept loop.
    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Hands every handshake the certificate in use at that moment.
#[derive(Debug)]
struct Resolver {
    /// std RwLock: read once per handshake, written on a reload; never held across an await.
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(current.clone())
    }
}

fn certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let key = CertifiedKey::from_der(certs, key, provider).map_err(TlsError::Key)?;
    Ok(key)
}

fn file_error(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no CERTIFICATE"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| file_error(path, format!("holds no usable PEM private key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, c.cert.pem()).unwrap();
        std::fs::write(&files.key, c.key_pair.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn loads_reloads_and_keeps_the_old_certificate_on_a_bad_reload() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "a");
        let tls = Tls::load(files.clone()).unwrap();
        let first = tls.resolver.current.read().unwrap().clone();
        // A new pair in the same files: swapped.
        write_pair(dir.path(), "a");
        tls.reload().unwrap();
        let second = tls.resolver.current.read().unwrap().clone();
        assert_ne!(first.cert, second.cert);
        // A broken key file: an error, and the certificate in use stays.
        std::fs::write(&files.key, "not a key").unwrap();
        let err = tls.reload().unwrap_err();
        assert!(err.to_string().contains("a.key"), "{err}");
        assert_eq!(tls.resolver.current.read().unwrap().cert, second.cert);
    }

    #[test]
    fn mismatched_or_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        let mixed = TlsFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        assert!(matches!(Tls::load(mixed), Err(TlsError::Key(_))));
        let missing = TlsFiles {
            cert: dir.path().join("nope.crt"),
            key: a.key,
        };
        let err = Tls::load(missing).unwrap_err();
        assert!(err.to_string().contains("nope.crt"), "{err}");
        std::fs::write(&a.cert, "garbage").unwrap();
        let err = Tls::load(TlsFiles {
            cert: a.cert,
            key: b.key,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }
}
