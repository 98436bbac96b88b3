//! Content digests: `sha256:<64 lowercase hex>`, the one form hotroll names artifacts by.
//!
//! A [`Sha256Digest`] exists only after its text was checked, and the content stores turn
//! digests into file names only through this type: no string from a script, a message or a
//! user becomes a path unless it is exactly 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

/// The text a digest starts with.
const PREFIX: &str = "sha256:";

/// A checked SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest {
    /// Exactly 64 lowercase hex characters.
    hex: String,
}

/// Text that is not `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a digest of the form sha256:<64 lowercase hex>")]
pub struct DigestError(pub String);

impl Sha256Digest {
    /// Parse `sha256:<64 lowercase hex>`, refusing anything else.
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let hex = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| DigestError(text.to_string()))?;
        Self::from_hex(hex).map_err(|_| DigestError(text.to_string()))
    }

    /// Parse the 64 lowercase hex characters alone (as scripts' `sha256 = "…"` give them).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        let lowercase_hex = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex.len() == 64 && lowercase_hex {
            Ok(Self {
                hex: hex.to_string(),
            })
        } else {
            Err(DigestError(hex.to_string()))
        }
    }

    /// The digest of a finished hash (the 32 bytes a SHA-256 hasher returns).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        use fmt::Write as _;
        let mut hex = String::with_capacity(64);
        for byte in bytes {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        Self { hex }
    }

    /// The 64 hex characters: the file name in a content store.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex)
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_form_parses() {
        let good = format!("sha256:{}", "a".repeat(64));
        let digest = Sha256Digest::parse(&good).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(digest.to_string(), good);
        assert_eq!(digest.hex(), "a".repeat(64));
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}/", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("md5:{}", "a".repeat(64)),
            "a".repeat(64),
            String::new(),
        ] {
            let error = Sha256Digest::parse(&bad).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("`{bad}` is not a digest of the form sha256:<64 lowercase hex>")
            );
        }
    }

    #[test]
    fn bytes_render_as_lowercase_hex() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let digest = Sha256Digest::from_bytes(bytes);
        assert_eq!(digest.hex().len(), 64);
        assert!(digest.hex().starts_with("ab00"));
        assert!(digest.hex().ends_with("000f"));
        assert_eq!(Sha256Digest::parse(&digest.to_string()), Ok(digest));
    }
}
