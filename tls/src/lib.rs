//! hotroll's transport security, the parts the coordinator, the agent and the CLI share:
//!
//! * [`identity`]: who a certificate speaks for (`spiffe://hotroll/<role>/<name>` in its SAN),
//!   read from a DER certificate;
//! * [`token`]: join and bearer tokens (`hr1.<secret>.<ca pin>`), and the hash kept at rest;
//! * [`client`]: the client side of TLS on a tonic channel (trust a CA file or the CA a token
//!   pins, optionally present a client certificate);
//! * [`files`]: PEM files, secret files written 0600 and atomically.
//!
//! Everything uses rustls with the `ring` provider, the stack tonic's `tls-ring` feature brings.

pub mod client;
mod error_chain;
pub mod files;
pub mod identity;
pub mod token;

use std::sync::Arc;

pub use client::{ClientTls, Trust};
pub use error_chain::error_chain;
pub use identity::{CertInfo, Identity, Role};
pub use token::Token;

/// The crypto provider every TLS config of hotroll uses (never the process-wide default, so that
/// nothing depends on which provider another crate installed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate: what a token pins.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("not a certificate hotroll can read: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Token(String),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Config(e.to_string())
    }
}
