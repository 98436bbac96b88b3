//! The client side of TLS on a tonic channel, shared by the agent and the CLI.
//!
//! tonic's own `ClientTlsConfig` cannot pin a CA by hash, so hotroll dials through its own
//! connector: TCP (TCP_NODELAY), then rustls with ALPN `h2`. The server's certificate is checked
//! against either a CA certificate ([`Trust::Ca`]) or the CA a token pins ([`Trust::Pin`]: the
//! chain the server presents must contain a certificate with that SHA-256, and the server's
//! certificate must verify under it as usual, host name included). A client certificate is
//! presented when one is given.
//!
//! tonic refuses an `https://` URI without its own TLS, so the channel is built from
//! [`channel_uri`] (the same address, `http://`), and the connector does the TLS.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{TlsError, fingerprint, provider};

/// How long the TLS handshake may take once TCP is up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client trusts the server's certificate to be issued by.
#[derive(Debug, Clone)]
pub enum Trust {
    /// These CA certificates (a PEM file such as the coordinator's `tls/ca.pem`).
    Ca(Vec<CertificateDer<'static>>),
    /// The CA whose certificate has this SHA-256 (from a token), which the server must present
    /// in its chain.
    Pin([u8; 32]),
}

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A ready rustls client config plus where to dial from.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    local_address: Option<IpAddr>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_cert",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(trust: &Trust, cert: Option<ClientCert>) -> Result<Self, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match trust {
            Trust::Ca(certs) => {
                let mut roots = RootCertStore::empty();
                for cert in certs {
                    roots.add(cert.clone())?;
                }
                builder.with_root_certificates(roots)
            }
            Trust::Pin(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCa {
                    pin: *pin,
                    provider,
                })),
        };
        let mut config = match cert {
            Some(cert) => builder.with_client_auth_cert(cert.chain, cert.key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            local_address: None,
        })
    }

    /// Dial from this local address (tests: a second loopback address as another peer).
    pub fn with_local_address(mut self, addr: Option<IpAddr>) -> Self {
        self.local_address = addr;
        self
    }

    /// Connect `endpoint` (built from [`channel_uri`]) over TLS.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.connector()).await
    }

    /// A channel that connects on first use (and reconnects) over TLS.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Send
    + Clone
    + 'static {
        let connector = TlsConnector::from(self.config.clone());
        let local = self.local_address;
        tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            async move {
                let io_error = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
                let host = uri
                    .host()
                    .ok_or_else(|| io_error(format!("no host in {uri}")))?;
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri.port_u16().unwrap_or(443);
                let server_name = ServerName::try_from(host.clone())
                    .map_err(|e| io_error(format!("`{host}` is not a server name: {e}")))?;
                let addr = tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .find(|a| local.is_none_or(|l| l.is_ipv4() == a.is_ipv4()))
                    .ok_or_else(|| io_error(format!("`{host}` has no address")))?;
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(local) = local {
                    socket.bind(std::net::SocketAddr::new(local, 0))?;
                }
                let tcp = socket.connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("TLS handshake with {addr} timed out"),
                            )
                        })??;
                Ok(TokioIo::new(tls))
            }
        })
    }
}

/// The URI to build a tonic endpoint from: `https://` becomes `http://` (the connector does the
/// TLS); anything else is returned as it is.
pub fn channel_uri(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_string(),
    }
}

/// Whether `url` asks for TLS.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("https://")
}

/// Trust the CA with a given SHA-256 that the server presents in its chain.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's certificate chain does not contain the CA this token \
                     names (a token of another coordinator?); pass the coordinator's CA file \
                     instead"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_uris() {
        assert_eq!(channel_uri("https://h:1"), "http://h:1");
        assert_eq!(channel_uri("http://h:1"), "http://h:1");
        assert!(is_tls_url("https://x"));
        assert!(!is_tls_url("http://x"));
    }
}
