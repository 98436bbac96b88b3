//! Join and bearer tokens at rest: files in `<data_dir>/tokens/`, one per token, named by the
//! SHA-256 of its secret (the secret itself is never stored), 0600 in a 0700 directory.
//! `hotroll token create` writes them without the server (file access to the data dir is the
//! admin credential); the server reads them per request. A join token is single-use: redeeming
//! renames its file into `used/`, which only one caller can do.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hotroll_tls::identity::unix_ms;
use hotroll_tls::token::short_id;
use hotroll_tls::{Token, files};
use serde::{Deserialize, Serialize};

/// Default lifetime of a token created without `--ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Join once as a node (`hotroll-agent --join`).
    Agent,
    /// Use the CLI for everything.
    Operator,
    /// Use the CLI to list, show and watch only.
    Viewer,
}

impl TokenRole {
    pub const ALL: [TokenRole; 3] = [TokenRole::Agent, TokenRole::Operator, TokenRole::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Agent => "agent",
            TokenRole::Operator => "operator",
            TokenRole::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not a role: agent, operator or viewer"))
    }
}

/// A token's record at rest (`<data_dir>/tokens/<sha256 of the secret>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub role: TokenRole,
    /// For an agent token: the only node name it may join as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_unix_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown token (never issued by this coordinator, or revoked)")]
    Unknown,
    #[error("the token expired at {} (unix ms)", .0)]
    Expired(u64),
    #[error("the join token was already used (by node `{by}`); join tokens are single-use")]
    Used { by: String },
    #[error("this is an {0} token; it cannot be used here")]
    WrongRole(&'static str),
    #[error("this join token is for node `{0}`")]
    WrongNode(String),
    #[error("token store: {0}")]
    Io(String),
}

/// A token listed by `hotroll token list`.
#[derive(Debug, Clone, Serialize)]
pub struct ListedToken {
    /// The first 12 hex characters of the token's id (the SHA-256 of its secret).
    pub id: String,
    #[serde(flatten)]
    pub record: TokenRecord,
    pub used: bool,
    pub expired: bool,
}

/// Tokens at rest, as files.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tokens"),
        }
    }

    fn live_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn used_path(&self, id: &str) -> PathBuf {
        self.dir.join("used").join(format!("{id}.json"))
    }

    fn read(path: &Path) -> Result<Option<TokenRecord>, TokenError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| TokenError::Io(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TokenError::Io(format!("{}: {e}", path.display()))),
        }
    }

    /// Issue a token for the CA `ca_pin`, valid for `ttl`.
    pub fn create(
        &self,
        ca_pin: [u8; 32],
        role: TokenRole,
        ttl: Duration,
        node: Option<String>,
    ) -> Result<(Token, TokenRecord), TokenError> {
        files::private_dir(&self.dir).map_err(|e| TokenError::Io(e.to_string()))?;
        let token = Token::generate(ca_pin);
        let now = SystemTime::now();
        let record = TokenRecord {
            role,
            node,
            created_unix_ms: unix_ms(now),
            expires_unix_ms: unix_ms(now + ttl),
            used_by: None,
            used_unix_ms: None,
        };
        let bytes =
            serde_json::to_vec_pretty(&record).map_err(|e| TokenError::Io(e.to_string()))?;
        files::write_secret(&self.live_path(&token.id()), &bytes)
            .map_err(|e| TokenError::Io(e.to_string()))?;
        Ok((token, record))
    }

    /// The live record of `token` for a use by `role`, checked for expiry and role.
    pub fn check(&self, token: &Token, roles: &[TokenRole]) -> Result<TokenRecord, TokenError> {
        let id = token.id();
        let Some(record) = Self::read(&self.live_path(&id))? else {
            return Err(match Self::read(&self.used_path(&id))? {
                Some(used) => TokenError::Used {
                    by: used.used_by.unwrap_or_default(),
                },
                None => TokenError::Unknown,
            });
        };
        if unix_ms(SystemTime::now()) >= record.expires_unix_ms {
            return Err(TokenError::Expired(record.expires_unix_ms));
        }
        if !roles.contains(&record.role) {
            return Err(TokenError::WrongRole(record.role.as_str()));
        }
        Ok(record)
    }

    /// Use up a join token for `node`: of concurrent callers exactly one succeeds.
    pub fn redeem(&self, token: &Token, node: &str) -> Result<(), TokenError> {
        let id = token.id();
        let used = self.used_path(&id);
        files::private_dir(&self.dir.join("used")).map_err(|e| TokenError::Io(e.to_string()))?;
        match std::fs::rename(self.live_path(&id), &used) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenError::Used {
                    by: Self::read(&used)?
                        .and_then(|r| r.used_by)
                        .unwrap_or_default(),
                });
            }
            Err(e) => return Err(TokenError::Io(e.to_string())),
        }
        // Who used it, for `hotroll token list` and the error of a second attempt.
        if let Ok(Some(mut record)) = Self::read(&used) {
            record.used_by = Some(node.to_string());
            record.used_unix_ms = Some(unix_ms(SystemTime::now()));
            if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
                let _ = files::write_secret(&used, &bytes);
            }
        }
        Ok(())
    }

    /// Every token, live and used.
    pub fn list(&self) -> Result<Vec<ListedToken>, TokenError> {
        let now = unix_ms(SystemTime::now());
        let mut out = Vec::new();
        for (dir, used) in [(self.dir.clone(), false), (self.dir.join("used"), true)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(TokenError::Io(format!("{}: {e}", dir.display()))),
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                if id.starts_with('.') {
                    continue;
                }
                if let Some(record) = Self::read(&entry.path())? {
                    out.push(ListedToken {
                        id: short_id(id).to_string(),
                        expired: now >= record.expires_unix_ms,
                        record,
                        used,
                    });
                }
            }
        }
        out.sort_by_key(|t| t.record.created_unix_ms);
        Ok(out)
    }

    /// Revoke the live tokens whose id starts with `prefix` (at least 8 characters); returns
    /// how many.
    pub fn revoke(&self, prefix: &str) -> Result<usize, TokenError> {
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Io(
                "give at least 8 hex characters of the token id (see `hotroll token list`)".into(),
            ));
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
                    std::fs::remove_file(entry.path())
                        .map_err(|e| TokenError::Io(e.to_string()))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_are_single_use_and_keep_no_secret() -> Result<(), TokenError> {
        let dir = tempfile::tempdir().map_err(|e| TokenError::Io(e.to_string()))?;
        let store = TokenStore::new(dir.path());
        let (token, _) = store.create([1; 32], TokenRole::Agent, DEFAULT_TOKEN_TTL, None)?;
        let secret = token.expose();
        for entry in std::fs::read_dir(dir.path().join("tokens"))
            .map_err(|e| TokenError::Io(e.to_string()))?
        {
            let entry = entry.map_err(|e| TokenError::Io(e.to_string()))?;
            if entry.path().is_file() {
                let text = std::fs::read_to_string(entry.path())
                    .map_err(|e| TokenError::Io(e.to_string()))?;
                assert!(!text.contains(&secret[4..68]));
                use std::os::unix::fs::PermissionsExt;
                let mode = entry
                    .metadata()
                    .map_err(|e| TokenError::Io(e.to_string()))?
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        assert!(store.check(&token, &[TokenRole::Operator]).is_err());
        store.check(&token, &[TokenRole::Agent])?;
        store.redeem(&token, "node-1")?;
        assert!(
            matches!(store.redeem(&token, "node-2"), Err(TokenError::Used { by }) if by == "node-1")
        );
        assert!(matches!(
            store.check(&token, &[TokenRole::Agent]),
            Err(TokenError::Used { .. })
        ));

        let (expired, _) = store.create([1; 32], TokenRole::Operator, Duration::ZERO, None)?;
        assert!(matches!(
            store.check(&expired, &[TokenRole::Operator]),
            Err(TokenError::Expired(_))
        ));
        let other = Token::generate([1; 32]);
        assert!(matches!(
            store.check(&other, &[TokenRole::Operator]),
            Err(TokenError::Unknown)
        ));

        let listed = store.list()?;
        assert_eq!(listed.len(), 2);
        assert_eq!(store.revoke(&expired.id()[..12])?, 1);
        Ok(())
    }
}
