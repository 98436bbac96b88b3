//! Golden tests of the compiled plan (text and JSON) for the shipped examples and a few extra
//! shapes. `UPDATE_GOLDEN=1 cargo test -p hotroll-script --test plan_golden` rewrites the files.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::path::{Path, PathBuf};

use hotroll_script::plan;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn examples_dir() -> PathBuf {
    manifest_dir().join("../deploy/examples")
}

fn compare(name: &str, actual: &str) {
    let path = manifest_dir().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

fn golden(stem: &str, source: &str, nodes: usize) {
    let parsed = hotroll_script::parse(&format!("{stem}.toml"), source)
        .unwrap_or_else(|d| panic!("{stem} is invalid:\n{d}"));
    let compiled = plan::compile(&parsed.script, nodes);
    compare(&format!("{stem}.txt"), &compiled.to_string());
    let json = serde_json::to_string_pretty(&compiled).unwrap() + "\n";
    compare(&format!("{stem}.json"), &json);
}

fn example(stem: &str, nodes: usize) {
    let source = std::fs::read_to_string(examples_dir().join(format!("{stem}.toml"))).unwrap();
    golden(stem, &source, nodes);
}

#[test]
fn restart_upgrade() {
    example("restart-upgrade", 5);
}

#[test]
fn hot_upgrade() {
    example("hot-upgrade", 3);
}

#[test]
fn erlang_module_upgrade() {
    example("erlang-module-upgrade", 4);
}

/// Implicit point of no return, an explicit `down` list, no canary, no artifacts mode.
#[test]
fn implicit_ponr_and_explicit_rollback() {
    let source = r#"
app = "web"
from = "3.1.0"
to = "3.2.0"

[[artifacts]]
name = "site.tar"
source = "build/site.tar"
unpack = true

[rollout]
max_in_flight = 3
max_failures = 2

[script]
up = [
  { load_object_code = "site.tar" },
  { check = { hook = "config_test", args = ["--strict"] } },
  { stop = ["web", "worker"] },
  { load = "web" },
  { start = ["web", "worker"] },
  { health = "web" },
  { sync_nodes = { id = "done", nodes = ["web-1", "web-2"] } },
]
down = [
  { stop = ["web", "worker"] },
  { load = "web" },
  { apply = { hook = "restore_cache", args = ["3.1.0"] } },
  { start = ["web", "worker"] },
]
"#;
    golden("implicit-ponr-explicit-down", source, 8);
}

/// Fleet gates after each wave and a node gate in `up`.
#[test]
fn metric_gates() {
    let source = r#"
app = "web"
from = "3.1.0"
to = "3.2.0"

[[artifacts]]
name = "bin/web"
source = "build/web"

[rollout]
canary = 1
max_in_flight = 2

[[rollout.gates]]
name = "error-rate"
query = "sum(rate(errors_total[1m]))"
pass_if = "< 0.5"
hold = "30s"
interval = "5s"
timeout = "5m"

[[rollout.gates]]
name = "latency"
query = "histogram_quantile(0.99, rate(latency_seconds_bucket[1m]))"
pass_if = "<= 0.25"

[script]
up = [
  { load_object_code = "bin/web" },
  "point_of_no_return",
  { restart = "web" },
  { health = "web" },
  { gate = { query = "rate(errors_total{node=\"$node\"}[1m])", pass_if = "< 0.1", hold = "10s", interval = "1s", timeout = "1m" } },
]
"#;
    golden("metric-gates", source, 5);
}
