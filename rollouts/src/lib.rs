//! The coordinator's domain side, behind a crate boundary that keeps wire types out: the
//! rollout drivers that own the engines ([`rollouts`]), the store that makes each decision
//! durable before its commands leave ([`store`]), the registry of known nodes and live sessions
//! ([`registry`]), the domain commands queued to a session ([`outbound`]) and the metrics they
//! update ([`metrics`]). The coordinator crate re-exports these modules under the same names and
//! converts at its edge (`convert`, `session`, `control`).

pub mod metrics;
pub mod outbound;
pub mod registry;
pub mod rollouts;
pub mod store;

pub use hotroll_engine as engine;
