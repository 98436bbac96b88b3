//! Join and bearer tokens at rest, by the SHA-256 of their secret (the secret itself is never
//! stored): files in `<data_dir>/tokens/` for one coordinator ([`files`]), keys in etcd for a
//! group ([`etcd`]). `hotroll token create` writes them without the server (access to the data
//! dir, or to the group's etcd, is the admin credential); the server reads them per request. A
//! join token is single-use: of concurrent redeemers exactly one succeeds.

mod etcd;
mod files;

pub use etcd::TokenFence;

use std::path::Path;
use std::time::{Duration, SystemTime};

use hotroll_etcd::EtcdClient;
use hotroll_tls::Token;
use hotroll_tls::identity::unix_ms;
use serde::{Deserialize, Serialize};

use etcd::EtcdTokens;
use files::FileTokens;

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

/// Where tokens are kept: files in the data dir (one coordinator), or etcd (a group: a token
/// made with `hotroll token create --etcd-endpoints` works on every coordinator of it).
#[derive(Debug, Clone)]
pub struct TokenStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Files(FileTokens),
    Etcd(EtcdTokens),
}

impl TokenStore {
    /// Tokens in `<data_dir>/tokens/`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            backend: Backend::Files(FileTokens::new(data_dir)),
        }
    }

    /// Tokens in etcd under `<prefix>/tokens/`, written under `fence`.
    pub fn etcd(client: EtcdClient, prefix: &str, fence: TokenFence) -> Self {
        Self {
            backend: Backend::Etcd(EtcdTokens::new(client, prefix, fence)),
        }
    }

    /// The tokens of the group on the etcd cluster at `endpoints` under `prefix`, as an
    /// administrator's `hotroll token` writes them: under the epoch of the coordinator that
    /// leads at that moment.
    pub fn for_group(endpoints: Vec<String>, prefix: &str) -> Result<Self, TokenError> {
        let client = EtcdClient::new(&hotroll_etcd::EtcdOptions::new(endpoints))
            .map_err(|e| TokenError::Io(format!("etcd: {e}")))?;
        Ok(Self::etcd(client, prefix, TokenFence::CurrentLeader))
    }

    /// Issue a token for the CA `ca_pin`, valid for `ttl`.
    pub fn create(
        &self,
        ca_pin: [u8; 32],
        role: TokenRole,
        ttl: Duration,
        node: Option<String>,
    ) -> Result<(Token, TokenRecord), TokenError> {
        match &self.backend {
            Backend::Files(files) => files.create(ca_pin, role, ttl, node),
            Backend::Etcd(etcd) => etcd.create(ca_pin, role, ttl, node),
        }
    }

    /// The live record of `token` for a use by `role`, checked for expiry and role.
    pub fn check(&self, token: &Token, roles: &[TokenRole]) -> Result<TokenRecord, TokenError> {
        match &self.backend {
            Backend::Files(files) => files.check(token, roles),
            Backend::Etcd(etcd) => etcd.check(token, roles),
        }
    }

    /// Use up a join token for `node`: of concurrent callers exactly one succeeds.
    pub fn redeem(&self, token: &Token, node: &str) -> Result<(), TokenError> {
        match &self.backend {
            Backend::Files(files) => files.redeem(token, node),
            Backend::Etcd(etcd) => etcd.redeem(token, node),
        }
    }

    /// Every token, live and used.
    pub fn list(&self) -> Result<Vec<ListedToken>, TokenError> {
        match &self.backend {
            Backend::Files(files) => files.list(),
            Backend::Etcd(etcd) => etcd.list(),
        }
    }

    /// Revoke the live tokens whose id starts with `prefix` (at least 8 characters); returns
    /// how many.
    pub fn revoke(&self, prefix: &str) -> Result<usize, TokenError> {
        match &self.backend {
            Backend::Files(files) => files.revoke(prefix),
            Backend::Etcd(etcd) => etcd.revoke(prefix),
        }
    }
}

/// A new record of `role`, valid for `ttl` from now.
fn new_record(role: TokenRole, ttl: Duration, node: Option<String>) -> TokenRecord {
    let now = SystemTime::now();
    TokenRecord {
        role,
        node,
        created_unix_ms: unix_ms(now),
        expires_unix_ms: unix_ms(now + ttl),
        used_by: None,
        used_unix_ms: None,
    }
}

/// `record` (live, not used) for a use by one of `roles`: expiry and role.
fn check_record(record: TokenRecord, roles: &[TokenRole]) -> Result<TokenRecord, TokenError> {
    if unix_ms(SystemTime::now()) >= record.expires_unix_ms {
        return Err(TokenError::Expired(record.expires_unix_ms));
    }
    if !roles.contains(&record.role) {
        return Err(TokenError::WrongRole(record.role.as_str()));
    }
    Ok(record)
}

/// The id prefix of `hotroll token revoke`, lowercased: at least 8 hex characters.
fn check_revoke_prefix(prefix: &str) -> Result<String, TokenError> {
    if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Io(
            "give at least 8 hex characters of the token id (see `hotroll token list`)".into(),
        ));
    }
    Ok(prefix.to_ascii_lowercase())
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
