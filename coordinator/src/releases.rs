//! At rollout start, for an `otp_release` script: the release tarball each `unpack_release`
//! names is read from the content store (`hotroll-otp-release`) and the rollout is refused,
//! before anything changes anywhere, when its relup holds an instruction hotroll cannot honour
//! safely (OTP's own `sync_nodes`), or when a target's current release (from its Hello's
//! `which_releases`) has no UpFrom entry in the relup — naming those nodes. Other problems of
//! the package are the nodes' vote to find (the rollout then aborts before the point of no
//! return), as is a node whose releases were never reported.

use std::collections::BTreeMap;

use hotroll_otp_release::{read_tarball, relup, unsafe_instructions};
use hotroll_script::{Instruction, Runtime, Script};

use crate::artifacts::{ArtifactStore, parse_digest};
use crate::store::{AppVersions, ArtifactBinding};

/// The release a node runs as its Hello reported it: the release handler's `current`, else its
/// `permanent`, else the app's current version.
fn running(app: &AppVersions) -> Option<&str> {
    app.releases
        .iter()
        .find(|r| r.status == "current")
        .or_else(|| app.releases.iter().find(|r| r.status == "permanent"))
        .map(|r| r.version.as_str())
        .or((!app.current.is_empty()).then_some(app.current.as_str()))
}

/// `Err(why)` when the rollout must be refused. `targets` are the target nodes with what they
/// last reported of the script's app. Blocking: reads the tarballs.
pub fn check_start(
    script: &Script,
    artifacts: &[ArtifactBinding],
    store: &ArtifactStore,
    targets: &BTreeMap<String, Option<AppVersions>>,
) -> Result<(), String> {
    if script.runtime != Runtime::OtpRelease {
        return Ok(());
    }
    let to = script.to.value.as_str();
    for step in &script.up {
        let Instruction::UnpackRelease { artifact, .. } = &step.instruction else {
            continue;
        };
        let Some(binding) = artifacts.iter().find(|a| a.name == artifact.value) else {
            continue; // Every declared artifact is bound before this runs.
        };
        let digest = parse_digest(&binding.digest).map_err(|e| e.to_string())?;
        let tarball = read_tarball(&store.path_of(&digest))
            .map_err(|e| format!("release package `{}`: {e}", binding.name))?;
        // No relup, or one that does not parse: the nodes' vote says so, and the rollout
        // aborts before the point of no return.
        let Ok(relup) = relup(&tarball, to) else {
            continue;
        };
        let refused = unsafe_instructions(&relup);
        if !refused.is_empty() {
            return Err(format!(
                "release package `{}` cannot be installed safely; nothing was changed: {}",
                binding.name,
                refused.join("; ")
            ));
        }
        let froms = relup.froms();
        let stranded: Vec<String> = targets
            .iter()
            .filter_map(|(node, app)| {
                let vsn = running(app.as_ref()?)?;
                (!froms.iter().any(|f| f == vsn)).then(|| format!("{node} (runs {vsn})"))
            })
            .collect();
        if !stranded.is_empty() {
            return Err(format!(
                "the relup of {} {to} in `{}` has no UpFrom entry for the release {} run{}: {}; \
                 it upgrades from {}; nothing was changed",
                script.app.value,
                binding.name,
                if stranded.len() == 1 {
                    "this node"
                } else {
                    "these nodes"
                },
                if stranded.len() == 1 { "s" } else { "" },
                stranded.join(", "),
                if froms.is_empty() {
                    "nothing".to_string()
                } else {
                    froms.join(", ")
                }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OtpRelease;

    fn app(releases: &[(&str, &str)]) -> AppVersions {
        AppVersions {
            current: String::new(),
            permanent: String::new(),
            releases: releases
                .iter()
                .map(|(v, s)| OtpRelease {
                    name: "pm".into(),
                    version: (*v).into(),
                    status: (*s).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_running_release_is_the_current_one_else_the_permanent_one() {
        let both = app(&[("0.1.0", "permanent"), ("0.2.0", "current")]);
        assert_eq!(running(&both), Some("0.2.0"));
        assert_eq!(running(&app(&[("0.1.1", "permanent")])), Some("0.1.1"));
        assert_eq!(running(&app(&[])), None);
    }
}
