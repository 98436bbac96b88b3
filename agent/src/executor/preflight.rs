//! The agent's second look at a script before it runs: every hook, MFA and instruction it names
//! must be one this node declares and can carry out, whatever the shared validator said.

use hotroll_script::{Declared, Diagnostic, Instruction, Script};

use crate::runtime::Runtime;

/// The agent's own check of the names a script uses (see [`super::Node::check_script`]).
pub fn preflight(script: &Script, declared: &Declared, runtime: &dyn Runtime) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let declared_hooks = || {
        if declared.hooks.is_empty() {
            "it declares none".to_string()
        } else {
            let names: Vec<&str> = declared.hooks.iter().map(String::as_str).collect();
            format!("declared: {}", names.join(", "))
        }
    };
    let down = script.down.as_deref().unwrap_or_default();
    for step in script.up.iter().chain(down) {
        let name = step.instruction.name();
        if !declared.supported_instructions.contains(name) {
            errors.push(Diagnostic::error(
                step.span,
                format!("instruction `{name}` is not supported by this agent yet"),
            ));
            continue;
        }
        let beam = script.runtime == hotroll_script::Runtime::Beam;
        match &step.instruction {
            // In the beam runtime `apply` names an MFA from the agent's `mfa_allow`.
            Instruction::Apply { hook: mfa, .. } if beam && !declared.mfas.contains(&mfa.value) => {
                errors.push(Diagnostic::error(
                    mfa.span,
                    format!(
                        "MFA `{}` is not in this agent's allow-list (mfa_allow of its [[beam]] apps)",
                        mfa.value
                    ),
                ));
            }
            Instruction::Apply { .. } if beam => {}
            Instruction::Apply { hook, .. }
            | Instruction::Check {
                hook: Some(hook), ..
            } if !declared.hooks.contains(&hook.value) => {
                errors.push(Diagnostic::error(
                    hook.span,
                    format!(
                        "hook `{}` is not declared in this agent's config ({})",
                        hook.value,
                        declared_hooks()
                    ),
                ));
            }
            Instruction::Check {
                hook: None,
                modules,
                ..
            } if !modules.is_empty() && !runtime.supports_module_checks(script.runtime) => {
                errors.push(Diagnostic::error(
                    step.span,
                    "`check` of modules is not supported by this agent yet",
                ));
            }
            _ => {}
        }
    }
    errors
}
