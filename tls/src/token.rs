//! Tokens: `hr1.<secret: 64 hex>.<CA pin: 64 hex>`.
//!
//! The secret is 32 random bytes; the coordinator keeps only its SHA-256 ([`Token::id`]) and
//! finds the token's record by it. The pin is the SHA-256 of the coordinator's CA certificate,
//! so a token is all a new agent (or a CLI) needs: it trusts the coordinator whose certificate
//! chain contains that CA, and proves itself with the secret.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::TlsError;

const PREFIX: &str = "hr1";

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    secret: [u8; 32],
    ca_pin: [u8; 32],
}

impl Token {
    /// A fresh token for the CA whose certificate hashes to `ca_pin`.
    pub fn generate(ca_pin: [u8; 32]) -> Self {
        Self {
            secret: rand::random(),
            ca_pin,
        }
    }

    /// Parse a token as printed by `hotroll token create` (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        let bad = || {
            TlsError::Token(
                "not a hotroll token (expected hr1.<64 hex>.<64 hex>, as printed by `hotroll \
                 token create`)"
                    .into(),
            )
        };
        let mut parts = text.trim().split('.');
        if parts.next() != Some(PREFIX) {
            return Err(bad());
        }
        let mut field = || -> Result<[u8; 32], TlsError> {
            let part = parts.next().ok_or_else(bad)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(part, &mut out).map_err(|_| bad())?;
            Ok(out)
        };
        let secret = field()?;
        let ca_pin = field()?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self { secret, ca_pin })
    }

    /// The hex SHA-256 of the secret: the key of the token's record at rest. Knowing it does not
    /// give the token.
    pub fn id(&self) -> String {
        hex::encode(Sha256::digest(self.secret))
    }

    /// SHA-256 of the CA certificate the token was issued under.
    pub fn ca_pin(&self) -> [u8; 32] {
        self.ca_pin
    }

    /// The token as text (the secret included: print it once, never log it).
    pub fn expose(&self) -> String {
        format!(
            "{PREFIX}.{}.{}",
            hex::encode(self.secret),
            hex::encode(self.ca_pin)
        )
    }
}

/// Never shows the secret.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}…)", &self.id()[..12])
    }
}

/// The short form of a token id people see in `hotroll token list` and logs.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_debug_hides_the_secret() {
        let t = Token::generate([7; 32]);
        let text = t.expose();
        assert_eq!(Token::parse(&format!("  {text}\n")).ok(), Some(t.clone()));
        assert!(!format!("{t:?}").contains(&text[4..20]));
        assert_eq!(t.ca_pin(), [7; 32]);
        assert_eq!(t.id().len(), 64);
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "hr1",
            "hr1..",
            "hr2.00.00",
            &format!("hr1.{}.{}", "0".repeat(64), "0".repeat(63)),
            &format!("hr1.{}.{}.x", "0".repeat(64), "0".repeat(64)),
            &format!("hr1.{}.{}", "g".repeat(64), "0".repeat(64)),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }
}
