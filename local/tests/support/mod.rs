//! What several in-process fleet tests share: agents with one `mark` hook that appends its
//! argument to `<data_dir>/marks`, and reading those marks back.

use std::path::Path;

use hotroll_local::NodeSlot;

/// An insecure agent whose only hook, `mark`, appends its first argument to `<data_dir>/marks`.
pub fn marking_agent_toml(slot: &NodeSlot) -> String {
    format!(
        r#"node = "{name}"
coordinator = "{url}"
insecure = true
data_dir = "{data_dir}"

[hooks]
mark = {{ command = ["sh", "-c", "printf '%s\n' \"$1\" >> '{marks}'", "mark"], timeout = "10s" }}
"#,
        name = slot.name,
        url = slot.coordinator_url,
        data_dir = slot.data_dir.display(),
        marks = slot.data_dir.join("marks").display(),
    )
}

/// How many times the agent with `data_dir` ran `mark` with `label`.
pub fn marks(data_dir: &Path, label: &str) -> usize {
    std::fs::read_to_string(data_dir.join("marks"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == label)
        .count()
}
