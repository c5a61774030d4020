//! HTTPS and WSS on SERVER_PORT without an ingress (TLS_CERT_FILE, TLS_KEY_FILE): rustls
//! with TLS 1.2 and 1.3 (RFC 5246, RFC 8446) and ALPN `http/1.1` (RFC 7301). The
//! certificate is reloaded when its files change, so a renewed certificate needs no
//! restart: [`CertReloader`] polls their modification times and swaps the
//! `Arc<CertifiedKey>` that [`ReloadingCert`] hands to every new handshake. A new file that
//! does not load keeps the old certificate and logs one error per change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;

pub(crate) use crate::config::TlsFiles;

/// How often the certificate and key files are checked for changes.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file could not be read.
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS_CERT_FILE holds no PEM certificate.
    #[error("{0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate(PathBuf),
    /// TLS_KEY_FILE holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {problem}")]
    NoKey { path: PathBuf, problem: String },
    /// The key is of a type rustls cannot sign with, or does not match the certificate.
    #[error("the key in {path} cannot be used with the certificate: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Reads and checks both files.
pub(crate) fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: files.key.clone(),
        problem: e.to_string(),
    })?;
    let key_error = |source| TlsError::Key {
        path: files.key.clone(),
        source,
    };
    let provider = ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(key_error)?;
    Ok(certified)
}

/// The files' modification times and sizes, which a renewal changes.
type Fingerprint = [(SystemTime, u64); 2];

fn modified(files: &TlsFiles) -> Option<Fingerprint> {
    let m = |p: &Path| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([m(&files.cert)?, m(&files.key)?])
}

/// Hands the current certificate to every handshake.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Loads the files once (an error here stops the start) and builds the acceptor of
/// SERVER_PORT, with the reloader that keeps its certificate fresh.
pub(crate) fn acceptor(files: TlsFiles) -> Result<(TlsAcceptor, CertReloader), TlsError> {
    let certified = load(&files)?;
    let resolver = Arc::new(ReloadingCert {
        current: RwLock::new(Arc::new(certified)),
    });
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    // HTTP/1.1 only: the WebSocket upgrade (RFC 6455) needs it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let seen = modified(&files);
    Ok((
        TlsAcceptor::from(Arc::new(config)),
        CertReloader {
            files,
            resolver,
            seen,
        },
    ))
}

impl CertReloader {
    /// Polls the files every [`RELOAD_INTERVAL`] until `stop`.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // File reads block; a slow volume must not stall a runtime thread.
            self = match tokio::task::spawn_blocking(move || {
                self.poll();
                self
            })
            .await
            {
                Ok(reloader) => reloader,
                Err(_) => return,
            };
        }
    }

    /// One check: loads the files if they changed since the last check.
    fn poll(&mut self) -> Reload {
        let now = modified(&self.files);
        if now.is_none() || now == self.seen {
            return Reload::Unchanged;
        }
        // Remembered before loading, so a bad file is reported once, not every tick.
        self.seen = now;
        match load(&self.files) {
            Ok(key) => {
                self.resolver.set(key);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "the changed TLS certificate or key does not load; still serving the previous certificate"
                );
                Reload::Failed
            }
        }
    }
}

/// What a check of the files did.
#[derive(Debug, PartialEq, Eq)]
enum Reload {
    Unchanged,
    Reloaded,
    Failed,
}

/// Watches TLS_CERT_FILE and TLS_KEY_FILE.
pub(crate) struct CertReloader {
    files: TlsFiles,
    resolver: Arc<ReloadingCert>,
    seen: Option<Fingerprint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed certificate for `name` and its key.
    fn write_pair(files: &TlsFiles, name: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        cert.der().clone()
    }

    fn served(reloader: &CertReloader) -> CertificateDer<'static> {
        reloader.resolver.get().cert[0].clone()
    }

    #[test]
    fn a_changed_pair_is_served_and_a_bad_one_keeps_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let first = write_pair(&files, "first.example");
        let (_, mut reloader) = acceptor(files.clone()).unwrap();
        assert_eq!(reloader.poll(), Reload::Unchanged);
        assert_eq!(served(&reloader), first);

        std::fs::write(&files.cert, "not a certificate").unwrap();
        assert_eq!(reloader.poll(), Reload::Failed);
        assert_eq!(served(&reloader), first);
        // Reported once: the same bad file is not loaded again.
        assert_eq!(reloader.poll(), Reload::Unchanged);

        let second = write_pair(&files, "second.example");
        assert_eq!(reloader.poll(), Reload::Reloaded);
        assert_eq!(served(&reloader), second);
    }

    #[test]
    fn bad_files_at_start_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let err = acceptor(files.clone()).err().unwrap().to_string();
        assert!(err.contains("tls.crt"), "{err}");
        write_pair(&files, "a.example");
        std::fs::write(
            &files.key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = acceptor(files.clone()).err().unwrap().to_string();
        assert!(err.contains("tls.key"), "{err}");
        // A key that belongs to another certificate.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&files.key, other.serialize_pem()).unwrap();
        let err = acceptor(files).err().unwrap().to_string();
        assert!(err.contains("tls.key"), "{err}");
    }
}
