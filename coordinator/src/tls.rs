//! The coordinator's certificates and the TLS on its listener (docs/security.md).
//!
//! * [`Pki`]: the CA. Made on first start in `<data_dir>/tls/` (or given with `--ca-cert`/
//!   `--ca-key`); it issues the server certificate, node certificates (Join, Renew) and client
//!   certificates (`hotroll cert issue`). `ca.key.pem` (0600) holds the CA key and certificate;
//!   `ca.pem` is the certificate alone, for clients.
//! * [`ServerTls`]: the rustls server config. The server certificate comes from a resolver that
//!   can be swapped while the server runs ([`ServerTls::refresh`]: reissued before it expires, or
//!   reloaded when the given files change), so certificates are renewed without a restart.
//!   Client certificates are verified against the CA but optional at the TLS layer: the CLI may
//!   use a bearer token, and `Join` is made without one. Authorization per RPC is in
//!   [`crate::auth`].
//! * [`ServerTls::incoming`]: accepted TCP connections, TLS handshakes run concurrently (bounded
//!   count, bounded time), failures logged and counted per peer address.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hotroll_tls::{CertInfo, Identity, Role, files};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::throttle::AuthThrottle;

/// Validity of the CA made on first start.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of the server certificate; reissued when a third of it is left.
pub const DEFAULT_SERVER_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default validity of node certificates; agents renew when a third is left.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest validity a node or client certificate may be given.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// A TLS handshake must complete within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 512;
/// Certificates are backdated by this much, for clocks a little behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Files(#[from] hotroll_tls::TlsError),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Invalid(String),
}

/// `<data_dir>/tls`.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// Where clients find the CA certificate of a coordinator's data dir.
pub fn ca_cert_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("ca.pem")
}

fn ca_bundle_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("ca.key.pem")
}

/// The certificate authority: issues every certificate hotroll uses.
pub struct Pki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca_pin", &hex_pin(&self.ca_pin()))
            .finish_non_exhaustive()
    }
}

fn hex_pin(pin: &[u8; 32]) -> String {
    pin.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, ttl: Duration) {
    let now = SystemTime::now();
    // At most a quarter of the lifetime, so that "renew when a third is left" falls after the
    // issue even for short lifetimes.
    let back = BACKDATE.min(ttl / 4);
    params.not_before = time::OffsetDateTime::from(now - back);
    params.not_after = time::OffsetDateTime::from(now + ttl);
}

impl Pki {
    /// The CA of `data_dir`: made on the first call (by `hotroll serve` or `hotroll token
    /// create`, whichever runs first; concurrent first calls agree on one), loaded after.
    pub fn ensure(data_dir: &Path) -> Result<Self, TlsSetupError> {
        let dir = tls_dir(data_dir);
        files::private_dir(&dir)?;
        let bundle = ca_bundle_path(data_dir);
        if !bundle.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            let mut name = DistinguishedName::new();
            name.push(DnType::CommonName, "hotroll CA");
            name.push(DnType::OrganizationName, "hotroll");
            params.distinguished_name = name;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.serial_number = Some(random_serial());
            validity(&mut params, CA_TTL);
            let cert = params.self_signed(&key)?;
            let text = format!("{}{}", key.serialize_pem(), cert.pem());
            // Written under a temp name, then hard-linked into place: a link never replaces an
            // existing file, so of two concurrent first starts exactly one CA wins.
            let tmp = dir.join(format!(".ca.{:016x}.tmp", rand::random::<u64>()));
            files::write_secret(&tmp, text.as_bytes())?;
            let linked = std::fs::hard_link(&tmp, &bundle);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => tracing::info!(dir = %dir.display(), "created the hotroll CA"),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(TlsSetupError::Invalid(format!(
                        "cannot create {}: {e}",
                        bundle.display()
                    )));
                }
            }
        }
        let text = std::fs::read_to_string(&bundle)
            .map_err(|e| TlsSetupError::Invalid(format!("{}: {e}", bundle.display())))?;
        let pki = Self::from_pem(&text, &text)?;
        let public = ca_cert_path(data_dir);
        if std::fs::read_to_string(&public).ok().as_deref() != Some(pki.ca_pem.as_str()) {
            files::write_public(&public, pki.ca_pem.as_bytes())?;
        }
        Ok(pki)
    }

    /// A CA given as files (`--ca-cert`, `--ca-key`).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsSetupError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| TlsSetupError::Invalid(format!("{}: {e}", p.display())))
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsSetupError> {
        let ca_der = files::parse_certs(cert_pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or_else(|| TlsSetupError::Invalid("no CA certificate".into()))?;
        let key = KeyPair::from_pem(key_pem)?;
        let info = hotroll_tls::identity::inspect(&ca_der)?;
        if !info.is_ca {
            return Err(TlsSetupError::Invalid(
                "the CA certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)?;
        let ca_pem = pem_of(&ca_der);
        Ok(Self {
            ca_der,
            ca_pem,
            issuer,
        })
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// SHA-256 of the CA certificate: what tokens pin.
    pub fn ca_pin(&self) -> [u8; 32] {
        hotroll_tls::fingerprint(&self.ca_der)
    }

    /// A certificate for `identity` and `public_key` (from a CSR or a key made here), for client
    /// authentication only. Node certificates also carry the node name as a DNS name.
    pub fn issue_client(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<(String, CertInfo), TlsSetupError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.name.clone());
        name.push(DnType::OrganizationalUnitName, identity.role.as_str());
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        if identity.role == Role::Node
            && let Ok(dns) = identity.name.clone().try_into()
        {
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, ttl.min(MAX_CERT_TTL));
        let cert = params.signed_by(public_key, &self.issuer)?;
        let info = hotroll_tls::identity::inspect(cert.der())?;
        Ok((cert.pem(), info))
    }

    /// A server certificate for `sans` (host names and IP addresses) with a fresh key.
    fn issue_server(
        &self,
        sans: &[String],
        ttl: Duration,
    ) -> Result<(String, String), TlsSetupError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "hotroll coordinator");
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, ttl);
        let cert = params.signed_by(&key, &self.issuer)?;
        // The chain ends with the CA, so that a client holding only a token's pin finds it.
        Ok((
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        ))
    }
}

fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Where the server certificate comes from.
#[derive(Debug, Clone)]
pub enum ServerCertSource {
    /// Issued by the CA for these names, kept in `<data_dir>/tls/server.{pem,key}`, reissued
    /// when a third of `ttl` is left or the names change.
    Managed { sans: Vec<String>, ttl: Duration },
    /// Given files (`--tls-cert`, `--tls-key`), reloaded when they change.
    Files { cert: PathBuf, key: PathBuf },
}

/// How `hotroll serve` sets up TLS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub data_dir: PathBuf,
    /// `--ca-cert`, `--ca-key`: a CA of the operator's instead of the one made here.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    pub server_cert: ServerCertSource,
    pub node_cert_ttl: Duration,
    /// How often the server certificate is checked for renewal or reload.
    pub refresh_interval: Duration,
}

impl TlsOptions {
    /// Managed certificates in `data_dir` for the default names plus `extra_sans`.
    pub fn new(data_dir: PathBuf, listen: Option<IpAddr>, extra_sans: &[String]) -> Self {
        Self {
            data_dir,
            ca_files: None,
            server_cert: ServerCertSource::Managed {
                sans: default_sans(listen, extra_sans),
                ttl: DEFAULT_SERVER_CERT_TTL,
            },
            node_cert_ttl: DEFAULT_NODE_CERT_TTL,
            refresh_interval: Duration::from_secs(60),
        }
    }
}

/// localhost, 127.0.0.1, ::1, this host's name, the listen address when it is a specific one,
/// and `extra`.
pub fn default_sans(listen: Option<IpAddr>, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname")
        && let host = host.trim()
        && !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        sans.push(host.to_string());
    }
    if let Some(ip) = listen
        && !ip.is_unspecified()
    {
        sans.push(ip.to_string());
    }
    sans.extend(extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

/// The server certificate currently served; swapped by [`ServerTls::refresh`].
#[derive(Debug)]
struct CurrentCert {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.key.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// The coordinator's TLS: the CA, the live server certificate, the rustls config.
pub struct ServerTls {
    pki: Arc<Pki>,
    options: TlsOptions,
    current: Arc<CurrentCert>,
    /// What the served certificate was made from: its info, and for given files their text.
    loaded: std::sync::Mutex<(CertInfo, Option<FileBytes>)>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("pki", &self.pki)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn new(options: TlsOptions) -> Result<Self, TlsSetupError> {
        let pki = Arc::new(match &options.ca_files {
            Some((cert, key)) => Pki::from_files(cert, key)?,
            None => Pki::ensure(&options.data_dir)?,
        });
        let (key, info, files) = load_server_cert(&pki, &options, true)?;
        let current = Arc::new(CurrentCert {
            key: RwLock::new(key),
        });
        let provider = hotroll_tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der().clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsSetupError::Invalid(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        tracing::info!(
            serial = %info.serial,
            names = ?info.dns_names,
            valid_until_unix_ms = info.not_after_unix_ms(),
            "TLS on: server certificate loaded"
        );
        Ok(Self {
            pki,
            options,
            current,
            loaded: std::sync::Mutex::new((info, files)),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// A rustls config for the web console (`--ui-listen`): the same live server certificate
    /// (renewed with the gRPC listener's), no client certificate asked, HTTP/1.1.
    pub fn https_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
        let mut config = rustls::ServerConfig::builder_with_provider(hotroll_tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    pub fn node_cert_ttl(&self) -> Duration {
        self.options.node_cert_ttl
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// The served certificate's info.
    pub fn server_cert(&self) -> CertInfo {
        match self.loaded.lock() {
            Ok(l) => l.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// Reissue a managed server certificate that has a third of its life left (or whose names
    /// changed), or reload given files that changed. New handshakes use the new one; open
    /// connections keep theirs. Returns whether it changed.
    pub fn refresh(&self) -> Result<bool, TlsSetupError> {
        let (info, files) = {
            let loaded = match self.loaded.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            (loaded.0.clone(), loaded.1.clone())
        };
        let due = match &self.options.server_cert {
            ServerCertSource::Managed { .. } => needs_renewal(&info, SystemTime::now()),
            ServerCertSource::Files { cert, key } => {
                let now = (std::fs::read(cert).ok(), std::fs::read(key).ok());
                match (now, files) {
                    ((Some(c), Some(k)), Some((c0, k0))) => c != c0 || k != k0,
                    _ => false,
                }
            }
        };
        if !due {
            return Ok(false);
        }
        let (key, info, files) = load_server_cert(&self.pki, &self.options, false)?;
        match self.current.key.write() {
            Ok(mut k) => *k = key,
            Err(p) => *p.into_inner() = key,
        }
        tracing::info!(serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "server certificate renewed");
        match self.loaded.lock() {
            Ok(mut l) => *l = (info, files),
            Err(p) => *p.into_inner() = (info, files),
        }
        Ok(true)
    }

    /// Run [`ServerTls::refresh`] every `refresh_interval` until `stop` resolves.
    pub async fn refresh_loop(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(self.options.refresh_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {
                    if let Err(e) = self.refresh() {
                        tracing::error!(error = %e, "cannot renew or reload the server certificate; still serving the current one");
                    }
                }
            }
        }
    }

    /// TLS connections accepted on `listener`. Each handshake runs in its own task within
    /// [`HANDSHAKE_TIMEOUT`]; at most [`MAX_PENDING_HANDSHAKES`] at once. Failed handshakes are
    /// logged and counted against the peer's address in `throttle`. The accept loop ends when
    /// the returned stream is dropped (the server stopped).
    pub fn incoming(
        &self,
        listener: TcpListener,
        throttle: Arc<AuthThrottle>,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                crate::accepted::tune(&tcp);
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let throttle = throttle.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => throttle.handshake_failed(peer.ip(), &e),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Whether a certificate has a third of its life (or less) left at `now`.
pub fn needs_renewal(info: &CertInfo, now: SystemTime) -> bool {
    info.remaining(now) < info.lifetime() / 3
}

/// The bytes of given certificate and key files, to see when they change.
type FileBytes = (Vec<u8>, Vec<u8>);

type LoadedCert = (Arc<CertifiedKey>, CertInfo, Option<FileBytes>);

/// The server certificate per `options`: given files as they are; a managed one from
/// `<data_dir>/tls/server.{pem,key}` when it is valid for long enough and for the wanted names,
/// else a new one written there.
fn load_server_cert(
    pki: &Pki,
    options: &TlsOptions,
    at_start: bool,
) -> Result<LoadedCert, TlsSetupError> {
    let provider = hotroll_tls::provider();
    let certified = |chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>| {
        CertifiedKey::from_der(chain, key, &provider)
            .map(Arc::new)
            .map_err(TlsSetupError::from)
    };
    match &options.server_cert {
        ServerCertSource::Files { cert, key } => {
            let cert_bytes = std::fs::read(cert)
                .map_err(|e| TlsSetupError::Invalid(format!("{}: {e}", cert.display())))?;
            let key_bytes = std::fs::read(key)
                .map_err(|e| TlsSetupError::Invalid(format!("{}: {e}", key.display())))?;
            let chain = files::parse_certs(&cert_bytes)?;
            let info = hotroll_tls::identity::inspect(&chain[0])?;
            let parsed = files::read_key(key)?;
            Ok((
                certified(chain, parsed)?,
                info,
                Some((cert_bytes, key_bytes)),
            ))
        }
        ServerCertSource::Managed { sans, ttl } => {
            let dir = tls_dir(&options.data_dir);
            let cert_path = dir.join("server.pem");
            let key_path = dir.join("server.key");
            if at_start
                && let Ok(chain) = files::read_certs(&cert_path)
                && let Ok(key) = files::read_key(&key_path)
                && let Ok(info) = hotroll_tls::identity::inspect(&chain[0])
                && !needs_renewal(&info, SystemTime::now())
                && chain.last().map(|c| c.as_ref()) == Some(pki.ca_der().as_ref())
                && sans_cover(&chain[0], sans)
                && let Ok(key) = certified(chain, key)
            {
                return Ok((key, info, None));
            }
            let (chain_pem, key_pem) = pki.issue_server(sans, *ttl)?;
            files::write_secret(&key_path, key_pem.as_bytes())?;
            files::write_public(&cert_path, chain_pem.as_bytes())?;
            let chain = files::parse_certs(chain_pem.as_bytes())?;
            let info = hotroll_tls::identity::inspect(&chain[0])?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                KeyPair::from_pem(&key_pem)?.serialize_der(),
            ));
            Ok((certified(chain, key)?, info, None))
        }
    }
}

/// Whether the certificate names every one of `sans` (DNS names and IP addresses).
fn sans_cover(der: &CertificateDer<'_>, sans: &[String]) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let mut have = std::collections::BTreeSet::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(d) => {
                have.insert((*d).to_string());
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                    _ => None,
                };
                if let Some(ip) = ip {
                    have.insert(ip.to_string());
                }
            }
            _ => {}
        }
    }
    sans.iter().all(|s| {
        let normal = s
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|_| s.clone());
        have.contains(&normal)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_issues_node_certificates() -> Result<(), TlsSetupError> {
        let dir = tempfile::tempdir().map_err(|e| TlsSetupError::Invalid(e.to_string()))?;
        let a = Pki::ensure(dir.path())?;
        let b = Pki::ensure(dir.path())?;
        assert_eq!(a.ca_pin(), b.ca_pin());
        let key = KeyPair::generate()?;
        let id = Identity::new(Role::Node, "node-1");
        let (pem, info) = a.issue_client(&id, &key, Duration::from_secs(3600))?;
        assert!(pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(info.identity, Some(id));
        assert_eq!(info.dns_names, vec!["node-1".to_string()]);
        assert!(!info.is_ca);
        // The PEM of the CA parses back to the same DER.
        let der = files::parse_certs(a.ca_pem().as_bytes())?;
        assert_eq!(der[0].as_ref(), a.ca_der().as_ref());
        Ok(())
    }

    #[test]
    fn managed_server_certificates_are_kept_then_renewed() -> Result<(), TlsSetupError> {
        let dir = tempfile::tempdir().map_err(|e| TlsSetupError::Invalid(e.to_string()))?;
        let options = TlsOptions::new(dir.path().to_path_buf(), None, &["hotroll.test".into()]);
        let first = ServerTls::new(options.clone())?;
        let second = ServerTls::new(options)?;
        assert_eq!(first.server_cert().serial, second.server_cert().serial);
        assert!(!second.refresh()?);
        // New names: a new certificate.
        let options = TlsOptions::new(dir.path().to_path_buf(), None, &["other.test".into()]);
        let third = ServerTls::new(options)?;
        assert_ne!(third.server_cert().serial, second.server_cert().serial);
        Ok(())
    }
}
