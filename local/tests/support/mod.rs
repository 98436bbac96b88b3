//! What several in-process fleet tests share: agents with one `mark` hook that appends its
//! argument to `<data_dir>/marks`, reading those marks back, and the script that marks on both
//! sides of a barrier and the point of no return.
// Each test binary that declares `mod support;` uses only a part of it.
#![allow(dead_code)]

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

/// `mark pre`, barrier `b`, the point of no return, `mark post` (the instruction at index 3):
/// what ran before and after the decision shows in each node's marks.
pub fn mark_around_the_point_of_no_return(barrier_timeout: &str) -> String {
    format!(
        r#"
app = "x"
from = "1.0.0"
to = "2.0.0"
[rollout]
barrier_timeout = "{barrier_timeout}"
step_timeout = "60s"
[script]
up = [
  {{ apply = {{ hook = "mark", args = ["pre"] }} }},
  {{ sync_nodes = "b" }},
  "point_of_no_return",
  {{ apply = {{ hook = "mark", args = ["post"] }} }},
]
down = []
"#
    )
}
