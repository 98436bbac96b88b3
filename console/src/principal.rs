//! Who a logged-in browser is. The console knows two roles, from the coordinator's tokens:
//! viewers see, operators also act. The coordinator decides which token is which
//! ([`TokenCheck`]); agent tokens never log in.

use std::net::IpAddr;

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    /// Pause, resume, promote, abort.
    pub fn may_act(self) -> bool {
        matches!(self, Role::Operator)
    }
}

/// A login the token allowed: the role and until when (unix ms; the session ends then at the
/// latest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResult {
    pub role: Role,
    pub expires_unix_ms: u64,
}

/// Why a login was refused; the message is shown to the person logging in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LoginRefused(pub String);

/// Checks a token someone logs in with (from `peer`, for the coordinator's throttle).
pub trait TokenCheck: Send + Sync {
    fn check(&self, peer: Option<IpAddr>, token: &str) -> Result<LoginResult, LoginRefused>;
}
