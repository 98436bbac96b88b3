//! Reading `hotroll rollout status --output json` documents:
//! `{id, state, app, from, to, failures, nodes: [{name, wave, state, step, error}]}`.

use anyhow::Context;
use serde_json::Value;

/// Rollout states after which nothing changes any more. Deliberately the harness's own list, not
/// the engine's: it reads the CLI's output as an operator's script would, so a renamed state fails here.
pub const FINAL_STATES: [&str; 6] = [
    "succeeded",
    "aborted",
    "rolled_back",
    "partially_rolled_back",
    "halted",
    "failed",
];

/// Whether a rollout state is final.
pub fn is_final(state: &str) -> bool {
    FINAL_STATES.contains(&state)
}

/// The rollout's `state`.
pub fn rollout_state(status: &Value) -> anyhow::Result<&str> {
    status["state"]
        .as_str()
        .with_context(|| format!("status has no `state`: {status}"))
}

/// The entry of `nodes` named `name`.
pub fn node<'a>(status: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    status["nodes"]
        .as_array()
        .with_context(|| format!("status has no `nodes` array: {status}"))?
        .iter()
        .find(|n| n["name"] == name)
        .with_context(|| format!("node {name} is not in the status: {status}"))
}

/// The `state` of node `name`.
pub fn node_state<'a>(status: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    let node = node(status, name)?;
    node["state"]
        .as_str()
        .with_context(|| format!("node {name} has no `state`: {node}"))
}

/// The `error` of node `name` (`None` for null).
pub fn node_error<'a>(status: &'a Value, name: &str) -> anyhow::Result<Option<&'a str>> {
    Ok(node(status, name)?["error"].as_str())
}

/// The `wave` of node `name`.
pub fn node_wave(status: &Value, name: &str) -> anyhow::Result<u64> {
    let node = node(status, name)?;
    node["wave"]
        .as_u64()
        .with_context(|| format!("node {name} has no `wave`: {node}"))
}

/// `(name, state)` of every node, in status order.
pub fn node_states(status: &Value) -> Vec<(String, String)> {
    status["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or_default().to_string(),
                        n["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
