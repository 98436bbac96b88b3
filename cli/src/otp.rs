//! `hotroll check` on an otp_release script: the tarball every `unpack_release` names is read
//! and checked with `hotroll-otp-release` before anything changes; errors point at the
//! artifact's `source`.

use std::path::Path;

use hotroll_otp_release::{check_tarball, read_tarball};
use hotroll_script::{Diagnostic, Instruction, Runtime, Script};

/// The tarball of every `unpack_release` of an otp_release script, checked; errors point at the
/// artifact's `source`.
pub fn check_release_tarballs(script: &Script, script_dir: &Path) -> Vec<Diagnostic> {
    if script.runtime != Runtime::OtpRelease {
        return Vec::new();
    }
    let mut out = Vec::new();
    for step in &script.up {
        let Instruction::UnpackRelease { artifact, .. } = &step.instruction else {
            continue;
        };
        let Some(declared) = script
            .artifacts
            .iter()
            .find(|a| a.name.value == artifact.value)
        else {
            continue; // Reported by the validator.
        };
        let path = script_dir.join(&declared.source.value);
        if !path.is_file() {
            continue; // Reported with the artifact files.
        }
        let problems = match read_tarball(&path) {
            Ok(tarball) => check_tarball(&tarball, &script.from.value, &script.to.value),
            Err(e) => vec![e.to_string()],
        };
        for problem in problems {
            out.push(Diagnostic::error(
                declared.source.span,
                format!("release package `{}`: {problem}", declared.source.value),
            ));
        }
    }
    out
}
