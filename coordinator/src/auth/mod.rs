//! Who may call what (docs/security.md), and the limits on what one caller may ask for.
//!
//! * `tokens`: join and bearer tokens at rest ([`TokenStore`]).
//! * [`crate::throttle`] (its own module, shared with the TLS accept loop): failed
//!   authentications per peer address, and the wait they impose ([`AuthThrottle`]).
//! * `limits`: the bounds on one caller's requests (uploads in flight, Hello size, artifacts).
//! * `policy`: the callers ([`Principal`], [`NodeIdentity`]) and what each gRPC method needs
//!   ([`METHODS`], deny by default).
//! * `credentials`: [`Auth`], which tells who a caller is and whether it may.
//! * `guards`: [`Guarded`], the wrapper every gRPC service is mounted in: each call is
//!   authorized (and limited) there before the service sees it.
//! * `identity`: [`IdentityService`], Join and Renew (node certificates).

mod credentials;
mod guards;
mod identity;
mod limits;
mod policy;
mod tokens;

pub use crate::throttle::{AuthThrottle, BASE_BACKOFF, FREE_FAILURES, MAX_BACKOFF, backoff};
pub use credentials::Auth;
pub use guards::Guarded;
pub use identity::{IdentityService, IssuedCert};
pub use limits::{
    MAX_ARTIFACTS_PER_SCRIPT, MAX_CONCURRENT_UPLOADS, MAX_HELLO_APPS, MAX_HELLO_JOURNAL,
    MAX_HELLO_LABELS, MAX_HELLO_STRING,
};
pub use policy::{Access, METHODS, MethodRule, NodeIdentity, Principal, check_hello, rule_for};
pub use tokens::{
    DEFAULT_TOKEN_TTL, ListedToken, TokenError, TokenFence, TokenRecord, TokenRole, TokenStore,
};
