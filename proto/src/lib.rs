//! hotroll's wire contract.
//!
//! This is the only crate that exposes prost-generated types. The coordinator and the agent
//! convert to their own domain types at the edge of their gRPC code.

/// The protocol version this build speaks. Hello carries a range; the coordinator picks the
/// highest version both sides speak. Version 2: the coordinator paces heartbeats and agents
/// answer them (docs/protocol.md, "Heartbeats").
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first protocol version in which the coordinator paces heartbeats (see
/// [`PROTOCOL_VERSION`]).
pub const PACED_HEARTBEATS: u32 = 2;

/// Metadata key of a standby coordinator's "not the leader" answer (`UNAVAILABLE`): the
/// advertised URL of the group's leader, which agents and the CLI then talk to.
pub const LEADER_METADATA: &str = "hotroll-leader";

/// Chunk size for artifact transfer: well under tonic's default 4 MiB message limit.
pub const ARTIFACT_CHUNK_SIZE: usize = 256 * 1024;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("hotroll.v1");
}

pub use v1::*;
