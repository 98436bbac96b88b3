//! An in-process hotroll fleet: the real coordinator (`hotroll_coordinator::server`) and N real
//! agents (`hotroll_agent`) on 127.0.0.1, with TLS and credentials made for you, behind one
//! builder: options → [`FleetBuilder::build`] → a running [`Fleet`] → [`Fleet::shutdown`].
//! `hotroll demo` and the in-process tests start their fleets this way.
//!
//! * [`fleet`]: the builder and the handle of a running fleet.
//! * [`coordinator`], [`agent`]: the pieces the builder starts ([`CoordinatorSpec`],
//!   [`AgentSpec`]); a network simulation runs them on its own hosts, with its own connection
//!   stream and dialer ([`FleetBuilder::plan`]).
//! * [`credentials`]: the fleet's CA, server certificate and tokens.
//! * [`access`]: how an operator's client reaches the fleet's coordinator.

pub mod access;
pub mod agent;
pub mod coordinator;
pub mod credentials;
pub mod error;
pub mod fleet;
mod running;

pub use access::{Bearer, OperatorClient};
pub use agent::{AgentSpec, RuntimeFactory};
pub use coordinator::CoordinatorSpec;
pub use credentials::LocalFleetTls;
pub use error::FleetError;
pub use fleet::{Fleet, FleetBuilder, FleetPlan, NodeSlot};
