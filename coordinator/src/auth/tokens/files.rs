//! Tokens as files in `<data_dir>/tokens/`, one per token, named by the SHA-256 of its secret,
//! 0600 in a 0700 directory; redeeming renames a join token's file into `used/`, which only one
//! caller can do.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hotroll_tls::identity::unix_ms;
use hotroll_tls::token::short_id;
use hotroll_tls::{Token, files};

use super::{
    ListedToken, TokenError, TokenRecord, TokenRole, check_record, check_revoke_prefix, new_record,
};

/// Tokens at rest, as files.
#[derive(Debug, Clone)]
pub struct FileTokens {
    dir: PathBuf,
}

impl FileTokens {
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
        let record = new_record(role, ttl, node);
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
        check_record(record, roles)
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
        let prefix = check_revoke_prefix(prefix)?;
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
