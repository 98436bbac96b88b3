//! hotroll's upgrade-script language.
//!
//! * [`parse`] turns TOML source into a typed [`Script`] and runs every validation rule of
//!   DESIGN §3 that the script alone can decide. It reports **all** errors at once, each with
//!   the byte span it refers to.
//! * [`validate_against`] runs the rules that need a node's own config (declared hooks,
//!   services, MFAs); the agent calls it before running anything.
//! * [`plan::compile`] turns a valid script into the plan `hotroll check` prints.
//!
//! Nothing in this crate does I/O.

pub mod diagnostic;
pub mod duration;
pub mod model;
mod parse;
pub mod plan;
mod validate;

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use model::*;
pub use validate::{Declared, validate_against};

/// A script that parsed and passed validation, with the warnings it produced.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub script: Script,
    pub warnings: Vec<Diagnostic>,
}

/// Parse and validate a script. `name` is the file name used in diagnostics.
///
/// On failure every error (and warning) found is returned, sorted by position.
pub fn parse(name: &str, source: &str) -> Result<Parsed, Diagnostics> {
    parse::parse_and_validate(name, source)
}
