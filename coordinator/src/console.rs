//! The web console beside the gRPC server (`--ui-listen`, crate `hotroll-console`): logins
//! with the coordinator's own tokens, throttled like a bad bearer token is.
//!
//! Without TLS (`--insecure`) the console still asks for a token — the data dir's, made with
//! `hotroll token create` — so a viewer stays a viewer; only the cookie lacks `Secure`
//! (browsers keep Secure cookies of `http://` origins other than localhost otherwise).

use std::net::IpAddr;
use std::sync::Arc;

use hotroll_console::{LoginRefused, LoginResult, Role, TokenCheck};
use hotroll_tls::Token;

use crate::auth::{AuthThrottle, TokenRole, TokenStore};

/// Checks console logins against `tokens`.
#[derive(Debug)]
pub struct ConsoleLogin {
    pub tokens: TokenStore,
    pub throttle: Arc<AuthThrottle>,
}

impl TokenCheck for ConsoleLogin {
    fn check(&self, peer: Option<IpAddr>, text: &str) -> Result<LoginResult, LoginRefused> {
        if let Some(ip) = peer
            && let Err(wait) = self.throttle.check(ip)
        {
            return Err(LoginRefused(format!(
                "too many failed logins from {ip}; retry in {:.1}s",
                wait.as_secs_f64()
            )));
        }
        let checked = Token::parse(text)
            .map_err(|e| e.to_string())
            .and_then(|token| {
                self.tokens
                    .check(&token, &[TokenRole::Operator, TokenRole::Viewer])
                    .map_err(|e| e.to_string())
            });
        match checked {
            Ok(record) => Ok(LoginResult {
                role: match record.role {
                    TokenRole::Operator => Role::Operator,
                    // Agent tokens were refused by the check above.
                    TokenRole::Viewer | TokenRole::Agent => Role::Viewer,
                },
                expires_unix_ms: record.expires_unix_ms,
            }),
            Err(message) => {
                if let Some(ip) = peer {
                    self.throttle.failed(ip);
                }
                Err(LoginRefused(message))
            }
        }
    }
}
