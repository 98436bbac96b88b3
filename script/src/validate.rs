//! Validation rules. Script-only rules run inside [`crate::parse`]; [`validate_against`] checks a
//! script against what a node's config declares.

use std::collections::BTreeSet;

use crate::diagnostic::Diagnostic;
use crate::model::Script;

/// What a node's own config declares: the only names a script may use on that node.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub hooks: BTreeSet<String>,
    pub services: BTreeSet<String>,
    /// Allowed `module:function/arity` for `apply` in the beam runtime.
    pub mfas: BTreeSet<String>,
    /// Instructions this agent's runtimes can execute.
    pub supported_instructions: BTreeSet<&'static str>,
}

/// Errors for every hook, service, MFA or instruction `script` uses that `declared` does not
/// allow. Empty = the node may run the script.
pub fn validate_against(_script: &Script, _declared: &Declared) -> Vec<Diagnostic> {
    Vec::new()
}
