//! Building upgrade scripts for tests, and gates: hooks that hold a node inside an instruction
//! until the test lets it go.

use anyhow::Context;

use crate::cluster::Cluster;
use crate::hooks::Hook;

/// An upgrade script of `app` 1.0.0 -> 2.0.0: `rollout` is the body of `[rollout]`, `up` and
/// `down` are instructions written inline (TOML).
pub fn script(app: &str, rollout: &str, up: &[&str], down: &[&str]) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("  {i},\n"))
            .collect::<String>()
    };
    let (up, down) = (list(up), list(down));
    format!(
        "app = \"{app}\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n\n\
         [rollout]\n{rollout}\n\n\
         [script]\nup = [\n{up}]\ndown = [\n{down}]\n"
    )
}

/// `{ apply = { hook = "mark", args = [LABEL] } }`: the node appends LABEL to its marker file.
pub fn mark(label: &str) -> String {
    format!(r#"{{ apply = {{ hook = "mark", args = ["{label}"] }} }}"#)
}

/// `{ apply = { hook = "gate", args = [NAME] } }`: see [`gate_hook`].
pub fn gate(name: &str) -> String {
    format!(r#"{{ apply = {{ hook = "gate", args = ["{name}"] }} }}"#)
}

/// The `gate` hook: marks `NAME` (its argument) in the node's marker file, then waits until the
/// file `go-NAME` exists in the node's directory ([`open_gate`]); fails after 60 s without it.
pub fn gate_hook() -> Hook {
    Hook::sh(
        r#"printf '%s %s\n' "$1" "$(date +%s%N)" >> "{marks}"; i=0; while [ ! -e "{node_dir}/go-$1" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; [ -e "{node_dir}/go-$1" ]"#,
    )
    .timeout("90s")
}

/// Let node `i` (1-based) through gate `name` (now, or when it gets there).
pub fn open_gate(cluster: &Cluster, i: usize, name: &str) -> anyhow::Result<()> {
    let path = cluster.agent_info(i).dir.join(format!("go-{name}"));
    std::fs::write(&path, "").with_context(|| format!("cannot write {}", path.display()))
}

/// [`open_gate`] on every node.
pub fn open_gate_everywhere(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    for i in 1..=cluster.len() {
        open_gate(cluster, i, name)?;
    }
    Ok(())
}
