//! Who a certificate speaks for.
//!
//! Every certificate the coordinator's CA issues names its holder with one URI in its subject
//! alternative names: `spiffe://hotroll/node/<name>` for an agent (the node name is also there
//! as a DNS name, for people reading the certificate), `spiffe://hotroll/operator/<name>` and
//! `spiffe://hotroll/viewer/<name>` for people using the CLI. The role is part of what the CA
//! signed, so a node certificate cannot be used to steer rollouts, nor an operator's to open an
//! agent session.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

pub const URI_PREFIX: &str = "spiffe://hotroll/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An agent: may open a session and fetch artifacts, under its own name only.
    Node,
    /// May do everything the CLI does.
    Operator,
    /// May list, show and watch; may not start, abort, pause, resume or promote.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "node" | "agent" => Some(Role::Node),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role and a name, as a certificate states them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
        }
    }

    /// `spiffe://hotroll/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    /// The identity a SAN URI states, if it is one of ours and well formed.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (role, name) = rest.split_once('/')?;
        let role = Role::parse(role).filter(|r| r.as_str() == role)?;
        valid_name(name).then(|| Identity::new(role, name))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.role, self.name)
    }
}

/// Node and client names: 1-253 characters of `[A-Za-z0-9._-]` (what a node name may be; the
/// coordinator refuses a Hello with any other).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What hotroll reads out of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The one hotroll identity in the SAN, if there is exactly one.
    pub identity: Option<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex of the serial number.
    pub serial: String,
    pub dns_names: Vec<String>,
    pub is_ca: bool,
}

impl CertInfo {
    /// Whether `now` lies inside the validity period.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// `not_after` in milliseconds since the Unix epoch.
    pub fn not_after_unix_ms(&self) -> u64 {
        unix_ms(self.not_after)
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Read a DER certificate. Several hotroll URIs, or one with a bad name, count as none.
pub fn inspect(der: &[u8]) -> Result<CertInfo, TlsError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::Certificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let validity = cert.validity();
    let time = |t: &x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH
        }
    };
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => uris.push(*uri),
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_string()),
                _ => {}
            }
        }
    }
    let identity = match uris.as_slice() {
        [one] => Identity::from_uri(one),
        _ => None,
    };
    Ok(CertInfo {
        identity,
        not_before: time(&validity.not_before),
        not_after: time(&validity.not_after),
        serial: hex::encode(cert.raw_serial()),
        dns_names,
        is_ca: cert.is_ca(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_refuse_strangers() {
        let id = Identity::new(Role::Node, "node-1.zone_a");
        assert_eq!(id.uri(), "spiffe://hotroll/node/node-1.zone_a");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        for bad in [
            "spiffe://hotroll/node/",
            "spiffe://hotroll/node/a/b",
            "spiffe://hotroll/admin/x",
            "spiffe://hotroll/agent/x",
            "spiffe://other/node/x",
            "spiffe://hotroll/node/../x",
            "spiffe://hotroll/node/a b",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn inspect_refuses_garbage() {
        assert!(inspect(b"").is_err());
        assert!(inspect(b"not a certificate").is_err());
    }
}
