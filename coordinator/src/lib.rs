//! hotroll coordinator.

pub mod cli;
pub mod engine;
