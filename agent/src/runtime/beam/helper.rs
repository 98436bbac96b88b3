//! The in-node helper module `hotroll_upgrade` (source: `agent/erlang/hotroll_upgrade.erl`).
//!
//! Its compiled `.beam` is committed next to the source and embedded here, so agents need no
//! `erlc`: the agent loads it into the node with `code:load_binary` when the node does not run
//! this exact version yet. A test checks the committed `.beam` is what `erlc +deterministic`
//! makes of the source (when `erlc` is installed).

use std::time::Duration;

use erl_dist::term::Term;

use super::dist::{DistClient, DistError};
use super::term::{as_i64, atom, bin};

pub const MODULE: &str = "hotroll_upgrade";
/// `-define(VERSION, ...)` in the Erlang source.
pub const HELPER_VERSION: i64 = 3;
pub const BEAM: &[u8] = include_bytes!("../../../erlang/hotroll_upgrade.beam");
/// Path recorded as the module's object file (informational: the code comes from memory).
const PSEUDO_FILE: &str = "hotroll_upgrade.beam";

/// Make sure the node runs this helper version; once per connection.
pub async fn ensure(client: &DistClient, timeout: Duration) -> Result<(), DistError> {
    if client.helper_ready().await {
        return Ok(());
    }
    let loaded = client
        .call(MODULE, "version", Vec::new(), timeout)
        .await
        .ok()
        .and_then(|v| as_i64(&v));
    if loaded != Some(HELPER_VERSION) {
        // Old code of a previous helper version is dropped first (nothing keeps running it:
        // every helper call is a short-lived process).
        let _ = client
            .call("code", "purge", vec![atom(MODULE)], timeout)
            .await?;
        let answer = client
            .call(
                "code",
                "load_binary",
                vec![atom(MODULE), Term::from(PSEUDO_FILE.to_string()), bin(BEAM)],
                timeout,
            )
            .await?;
        if super::term::tagged(&answer, "module").is_none() {
            return Err(DistError::Raised {
                node: client.node().to_string(),
                call: "code:load_binary/3".into(),
                class: "error".into(),
                reason: format!("cannot load the hotroll helper module: {answer}"),
            });
        }
    }
    client.set_helper_ready().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The committed .beam is what erlc makes of the committed source.
    #[test]
    fn committed_beam_matches_the_source() -> Result<(), Box<dyn std::error::Error>> {
        if Command::new("erlc").arg("-help").output().is_err() {
            return Err(
                "erlc not installed: run `tests/run` (the README's test command installs \
                 it) or `apt-get install -y --no-install-recommends erlang-base`"
                    .into(),
            );
        }
        let dir = tempfile::tempdir()?;
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/erlang/hotroll_upgrade.erl");
        let status = Command::new("erlc")
            .arg("+deterministic")
            .arg("-o")
            .arg(dir.path())
            .arg(source)
            .status()?;
        assert!(status.success(), "erlc failed on {source}");
        let fresh = std::fs::read(dir.path().join("hotroll_upgrade.beam"))?;
        assert!(
            fresh == BEAM,
            "agent/erlang/hotroll_upgrade.beam is stale: run \
             `erlc +deterministic -o agent/erlang agent/erlang/hotroll_upgrade.erl`"
        );
        let text = std::fs::read_to_string(source)?;
        assert!(
            text.contains(&format!("-define(VERSION, {HELPER_VERSION}).")),
            "HELPER_VERSION differs from the Erlang source's VERSION"
        );
        Ok(())
    }
}
