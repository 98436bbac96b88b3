//! hotroll's upgrade-script language.
//!
//! * [`parse()`] turns TOML source into a typed [`Script`] and runs every validation rule of
//!   docs/design.md §3 that the script alone can decide. It reports **all** errors at once, each with
//!   the byte span it refers to.
//! * [`validate_against`] runs the rules that need a node's own config (declared hooks,
//!   services, MFAs); the agent calls it before running anything.
//! * [`plan::compile`] turns a valid script into the plan `hotroll check` prints.
//!
//! Nothing in this crate does I/O.
//!
//! # Instruction forms
//!
//! An instruction is an element of `up`/`down`: either a bare string (the instructions that take
//! no arguments) or an inline table with exactly one key, the instruction name. "targets" below
//! means service names in the process runtime and module names in the beam runtime.
//!
//! | instruction | process runtime | beam runtime |
//! |---|---|---|
//! | `load_object_code` | `"a"`, `["a", "b"]`, `{ artifacts = [..] }` | same |
//! | `check` | `"hook"`, `{ hook, args = [..], timeout }` | `"mod"`, `["mod"]`, `{ modules = [..], timeout }` |
//! | `sync_nodes` | `"id"`, `{ id, timeout, nodes = [..] }` | same |
//! | `point_of_no_return` | bare string only | same |
//! | `restart_new_emulator` | bare string only | same |
//! | `suspend` | `"svc"`, `["svc"]`, `{ services = [..], timeout }` | `"mod"`, `["mod"]`, `{ modules = [..], timeout }` |
//! | `load` | `"app"`, `{ app = "app" }` | `"mod"`, `["mod"]`, `{ modules = [..] }` |
//! | `code_change` | `"svc"`, `{ service, extra, timeout }` | `"mod"`, `["mod"]`, `{ modules = [..], extra, mode = "up"\|"down", timeout }` |
//! | `resume` | `"svc"`, `["svc"]`, `{ services = [..] }` | `"mod"`, `["mod"]`, `{ modules = [..] }` |
//! | `stop`, `start`, `restart` | `"svc"`, `["svc"]`, `{ services = [..] }` | same (supervisor child names) |
//! | `apply` | `"hook"`, `{ hook, args = [..], timeout }` | `"m:f/a"`, `{ mfa = "m:f/a", args = [..], timeout }` |
//! | `health` | `"svc"`, `{ service, timeout }` | same |
//! | `purge` | see below | see below |
//!
//! `purge` (stored as `Instruction::Purge { targets, brutal }`):
//! * bare `"purge"`: process — delete every old release directory of the app that is neither the
//!   new release nor the permanent one (rollback needs it until make_permanent); beam — soft-purge
//!   the old code of every module this script loads. `targets` is empty.
//! * process: `"0.9.0"`, `["0.9.0", "0.8.0"]`, `{ releases = [..] }` name the releases to delete;
//!   `{ releases = true }` is the same as the bare form. `brutal` is always false.
//! * beam: `"mod"`, `["mod"]`, `{ modules = [..], brutal = bool }` name the modules; `{ brutal =
//!   true }` alone means every module this script loads. A brutal purge (`code:purge`, kills
//!   processes still running old code) is deferred to make_permanent (docs/design.md §3).
//!
//! Other value rules: durations are strings (`"500ms"`, `"30s"`, `"5m"`, `"1h"`, see
//! [`duration`]); counts are non-negative integers that fit in a u32; an artifact `mode` is
//! a string of octal digits (`"0755"`) or a non-decimal integer (`0o755`) — a decimal integer such
//! as `755` is refused because it almost certainly means octal.
//!
//! # Validation
//!
//! Every rule of docs/design.md §3 is checked by [`parse()`] (see [`validate()`] for the list and the
//! choices made where the design is silent); [`validate_against`] adds the node's own config.

pub mod count;
pub mod diagnostic;
pub mod digest;
pub mod duration;
pub mod gates;
pub mod model;
mod parse;
pub mod plan;
mod suggest;
pub mod utc;
mod validate;
pub mod waves;
pub mod windows;

pub use count::NodeCount;
pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use digest::{DigestError, Sha256Digest};
pub use duration::{DurationError, DurationLimit, parse_duration, parse_duration_within};
pub use gates::{Comparison, Operator};
pub use model::*;
pub use utc::{format_utc, format_utc_millis};
pub use validate::{Declared, validate, validate_against};
pub use waves::{NO_LABELS, Wave, WaveTarget, plan_waves};
pub use windows::{Window, window_opens_at};

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

/// Like [`parse()`], but always returns the script as far as it could be built (with placeholders
/// where a required value was missing or invalid) together with every diagnostic. Meant for
/// tools that add their own checks to the same report (`hotroll check` looks at the artifact
/// files). The script is `None` only when the source is not TOML; it must not be run unless the
/// diagnostics hold no error.
pub fn parse_partial(name: &str, source: &str) -> (Option<Script>, Diagnostics) {
    parse::parse_partial(name, source)
}
