//! Mutual TLS between agents.
//!
//! Every agent holds one identity (certificate chain and private key) and trusts one cluster
//! CA; in Kubernetes all three arrive as PEM files mounted from a Secret. A [`TlsConfig`] is
//! built once from them and yields both the client side (for sending) and the server side (for
//! receiving). Both sides require a certificate that chains to the CA, so a peer without one,
//! or with one from another CA, fails the handshake before the first protocol byte is read.
//!
//! Only TLS 1.3 with the `ring` provider, and an ALPN value that names this protocol, so a
//! connection from some other TLS client is refused during the handshake too.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// ALPN protocol id of this protocol.
pub const ALPN: &[u8] = b"automigrate-transfer/1";

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what} `{path}`: {source}")]
    Pem {
        /// Which input (CA bundle, certificate, key).
        what: &'static str,
        /// The file, or `<memory>`.
        path: PathBuf,
        /// The parser's reason.
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file held no item of the expected kind.
    #[error("{what} `{path}` contains no {expected}")]
    Empty {
        /// Which input.
        what: &'static str,
        /// The file, or `<memory>`.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
    },
    /// rustls refused the material (a malformed certificate, a key that does not match).
    #[error("{context}: {source}")]
    Rustls {
        /// What was being built.
        context: &'static str,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The client verifier could not be built (for instance an empty CA bundle).
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The name to verify the receiver's certificate against is not a DNS name or IP.
    #[error("`{0}` is not a valid server name (DNS name or IP address)")]
    ServerName(String),
}

/// One agent's TLS identity and trust: builds client and server configurations.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material; the configs' own Debug is long and says little.
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads the CA bundle, this agent's certificate chain and its private key from PEM files.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let roots = read_certs("CA bundle", ca, CertificateDer::pem_file_iter(ca))?;
        let chain = read_certs("certificate", cert, CertificateDer::pem_file_iter(cert))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
            what: "private key",
            path: key.to_path_buf(),
            source,
        })?;
        Self::from_parts(roots, chain, key)
    }

    /// The same from PEM text in memory.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let memory = Path::new("<memory>");
        let roots = read_certs("CA bundle", memory, Ok(CertificateDer::pem_slice_iter(ca)))?;
        let chain = read_certs(
            "certificate",
            memory,
            Ok(CertificateDer::pem_slice_iter(cert)),
        )?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
            what: "private key",
            path: memory.to_path_buf(),
            source,
        })?;
        Self::from_parts(roots, chain, key)
    }

    fn from_parts(
        roots: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root).map_err(|source| TlsError::Rustls {
                context: "adding a CA certificate",
                source,
            })?;
        }
        let store = Arc::new(store);

        let verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone()).build()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                context: "choosing TLS 1.3",
                source,
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|source| TlsError::Rustls {
                context: "loading this agent's certificate and key (server side)",
                source,
            })?;
        server.alpn_protocols = vec![ALPN.to_vec()];

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                context: "choosing TLS 1.3",
                source,
            })?
            .with_root_certificates(store)
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                context: "loading this agent's certificate and key (client side)",
                source,
            })?;
        client.alpn_protocols = vec![ALPN.to_vec()];

        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The sending side.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    /// The receiving side.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// A client that presents no certificate but trusts `ca_pem`: only for tests that check
    /// such a peer is refused.
    #[doc(hidden)]
    pub fn anonymous_client(ca_pem: &[u8]) -> Result<tokio_rustls::TlsConnector, TlsError> {
        let memory = Path::new("<memory>");
        let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = RootCertStore::empty();
        for root in read_certs(
            "CA bundle",
            memory,
            Ok(CertificateDer::pem_slice_iter(ca_pem)),
        )? {
            store.add(root).map_err(|source| TlsError::Rustls {
                context: "adding a CA certificate",
                source,
            })?;
        }
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                context: "choosing TLS 1.3",
                source,
            })?
            .with_root_certificates(store)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
    }
}

/// The name the receiver's certificate must carry: `explicit` when given (a node name), else
/// the IP address dialled.
pub fn server_name(explicit: Option<&str>, ip: IpAddr) -> Result<ServerName<'static>, TlsError> {
    match explicit {
        Some(name) => {
            ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
        }
        None => Ok(ServerName::IpAddress(ip.into())),
    }
}

fn read_certs<I>(
    what: &'static str,
    path: &Path,
    items: Result<I, rustls_pki_types::pem::Error>,
) -> Result<Vec<CertificateDer<'static>>, TlsError>
where
    I: Iterator<Item = Result<CertificateDer<'static>, rustls_pki_types::pem::Error>>,
{
    let pem_error = |source| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = items
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}
