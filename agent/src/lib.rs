//! hotroll's node agent (docs/design.md §5): keeps a session with the coordinator, runs the upgrade
//! scripts it receives through a [`Runtime`], journals every step, and never executes anything
//! its own config ([`Config`]) does not declare.
//!
//! [`Agent::builder`] is the one entry point; the binary, the tests and the simulations use it.

mod agent;
pub mod artifacts;
pub mod boot;
pub mod cancel;
pub mod config;
pub mod coordinators;
pub mod dialer;
pub mod executor;
pub use hotroll_fault as fault;
pub mod hooks;
pub mod identity;
pub mod journal;
pub mod outbox;
pub mod report;
pub mod runtime;
mod session;
mod wire;

pub use agent::{Agent, AgentBuilder, AgentError};
pub use config::{Config, ConfigError, HookConfig, ServiceConfig};
pub use dialer::{Dialer, tcp_dialer};
pub use runtime::{HooksOnlyRuntime, Runtime, RuntimeDispatch};
pub use session::INITIAL_BACKOFF;
