//! `hotroll check` as a user runs it: the real binary, its exit codes, its stdout and stderr.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> PathBuf {
    repo().join("deploy/examples").join(name)
}

fn hotroll(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotroll"))
        .args(args)
        .output()
        .expect("run hotroll")
}

fn check(file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["check", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    hotroll(&args)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(output)))
}

/// A script in a fresh directory, with the given artifact files next to it.
fn script_in_tempdir(source: &str, files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let script = dir.path().join("upgrade.toml");
    std::fs::write(&script, source).unwrap();
    (dir, script)
}

const VALID: &str = r#"app = "primes"
from = "1.0.0"
to = "2.0.0"

[[artifacts]]
name = "bin/primes"
source = "build/primes"

[script]
up = [
  { load_object_code = ["bin/primes"] },
  "point_of_no_return",
  { load = "primes" },
  { restart = "primes" },
]
"#;

#[test]
fn every_example_is_valid_and_prints_its_plan() {
    for (name, header) in [
        (
            "restart-upgrade.toml",
            "primes 1.0.0 -> 1.1.0 (process runtime)",
        ),
        (
            "hot-upgrade.toml",
            "primes 1.0.0 -> 2.0.0 (process runtime)",
        ),
        (
            "erlang-module-upgrade.toml",
            "counter 1.0.0 -> 1.1.0 (beam runtime)",
        ),
    ] {
        let output = check(&example(name), &[]);
        assert_eq!(output.status.code(), Some(0), "{name}: {}", stderr(&output));
        assert!(
            stdout(&output).starts_with(header),
            "{name}:\n{}",
            stdout(&output)
        );
        assert!(stderr(&output).is_empty(), "{name}: {}", stderr(&output));
    }
}

#[test]
fn text_output_is_the_compiled_plan() {
    // Same plan as the script crate's golden file for this example and fleet size.
    let golden = repo().join("script/tests/golden/hot-upgrade.txt");
    let expected = std::fs::read_to_string(golden).unwrap();
    let output = check(&example("hot-upgrade.toml"), &["--nodes", "3"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), expected);
}

#[test]
fn json_output_of_a_valid_script() {
    let output = check(
        &example("erlang-module-upgrade.toml"),
        &["--output", "json", "--nodes", "4"],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report = json(&output);
    assert_eq!(report["valid"], true);
    assert_eq!(report["warnings"], serde_json::json!([]));
    let plan = &report["plan"];
    assert_eq!(plan["app"], "counter");
    assert_eq!(plan["runtime"], "beam");
    assert_eq!(plan["nodes"], 4);
    assert_eq!(plan["point_of_no_return"]["kind"], "explicit");
    assert_eq!(plan["point_of_no_return"]["step"], 4);
    assert_eq!(plan["prepare"].as_array().unwrap().len(), 3);
    assert_eq!(plan["commit"][0]["op"], "suspend");
    assert_eq!(plan["rollback"]["kind"], "default");
    let waves: Vec<u64> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["nodes"].as_u64().unwrap())
        .collect();
    assert_eq!(waves, [1, 3]);
}

#[test]
fn nodes_flag_changes_the_waves() {
    let output = check(&example("restart-upgrade.toml"), &["--nodes", "6"]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    assert!(text.contains("waves for 6 nodes:"), "{text}");
    assert!(text.contains("wave 1 (canary): 1 node\n"), "{text}");
    assert!(text.contains("wave 4: 1 node\n"), "{text}");
}

const ZONED_NODES: &str = r#"
[[node]]
name = "node-1"
labels = { zone = "a" }
[[node]]
name = "node-2"
labels = { zone = "b" }
[[node]]
name = "node-3"
labels = { zone = "c" }
[[node]]
name = "node-4"
labels = { zone = "a" }
[[node]]
name = "node-5"
labels = { zone = "b" }
[[node]]
name = "node-6"
labels = { zone = "c" }
[[node]]
name = "other"
labels = { zone = "a", role = "spare" }
"#;

#[test]
fn a_nodes_file_shows_the_waves_zone_by_zone_with_their_nodes() {
    let source = VALID.replace(
        "[script]",
        "[rollout]\ncanary = 1\nmax_in_flight = \"50%\"\nwaves_by = \"zone\"\norder = [\"b\", \"a\", \"c\"]\n\n[script]",
    );
    let (dir, script) = script_in_tempdir(&source, &[("build/primes", b"#!/bin/sh\n")]);
    let nodes = dir.path().join("nodes.toml");
    std::fs::write(&nodes, ZONED_NODES).unwrap();
    let output = check(&script, &["--nodes-file", nodes.to_str().unwrap()]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(
        text.contains("waves by zone: one value at a time (b, a, c"),
        "{text}"
    );
    assert!(text.contains("waves for 7 nodes:"), "{text}");
    for wave in [
        "wave 1 (canary): 1 node: node-2\n",
        "wave 2 (zone=b): 1 node: node-5\n",
        "wave 3 (zone=a): 2 nodes: node-1, node-4\n",
        "wave 4 (zone=a): 1 node: other\n",
        "wave 5 (zone=c): 1 node: node-3\n",
        "wave 6 (zone=c): 1 node: node-6\n",
    ] {
        assert!(text.contains(wave), "{wave:?} in\n{text}");
    }
}

#[test]
fn windows_show_in_the_plan_and_a_bad_one_is_an_error_at_its_place() {
    let source = VALID.replace(
        "[script]",
        "[rollout]\nwindows = [\"Mon-Fri 02:00-05:00 UTC\"]\nwindow_timeout = \"2h\"\n\n[script]",
    );
    let (_dir, script) = script_in_tempdir(&source, &[("build/primes", b"#!/bin/sh\n")]);
    let output = check(&script, &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(
        text.contains(
            "waves start only inside a window: Mon-Fri 02:00-05:00 UTC (a wave waiting longer than 2h ends the rollout)"
        ),
        "{text}"
    );
    let bad = VALID.replace(
        "[script]",
        "[rollout]\nwindows = [\"Mon-Fri 2am-5am UTC\"]\n\n[script]",
    );
    let (_dir, script) = script_in_tempdir(&bad, &[("build/primes", b"#!/bin/sh\n")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(
            "upgrade.toml:10:12: error: window `Mon-Fri 2am-5am UTC`: `2am` is not a time"
        ),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_bad_nodes_file_exits_2_with_file_line_col() {
    let (dir, script) = script_in_tempdir(VALID, &[("build/primes", b"#!/bin/sh\n")]);
    let nodes = dir.path().join("nodes.toml");
    std::fs::write(&nodes, "[[node]]\nname = \"a\"\n[[node]]\nname = \"a\"\n").unwrap();
    let output = check(&script, &["--nodes-file", nodes.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains("nodes.toml:4:8: error: node `a` is listed twice"),
        "{text}"
    );
}

#[test]
fn an_invalid_script_exits_2_with_file_line_col() {
    let source = VALID.replace(
        "\"point_of_no_return\",",
        "\"point_of_no_return\",\n  { sync_node = \"x\" },",
    );
    let (_dir, script) = script_in_tempdir(&source, &[("build/primes", b"bin")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    let text = stderr(&output);
    let location = format!(
        "{}:13:5: error: unknown instruction `sync_node`",
        script.display()
    );
    assert!(text.contains(&location), "{text}");
    assert!(text.contains("did you mean `sync_nodes`?"), "{text}");
    // The snippet shows the offending line; no color when stderr is not a terminal.
    assert!(text.contains("{ sync_node = \"x\" }"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(
        text.contains("is not a valid upgrade script (1 error)"),
        "{text}"
    );
}

#[test]
fn json_output_of_an_invalid_script() {
    let source = VALID
        .replace("to = \"2.0.0\"", "to = \"1.0.0\"")
        .replace("{ restart = \"primes\" }", "{ restart = 5 }");
    let (_dir, script) = script_in_tempdir(&source, &[("build/primes", b"bin")]);
    let output = check(&script, &["--output", "json"]);
    assert_eq!(output.status.code(), Some(2));
    let report = json(&output);
    assert_eq!(report["valid"], false);
    let diagnostics = report["diagnostics"].as_array().unwrap();
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    let first = &diagnostics[0];
    assert_eq!(first["file"], script.display().to_string());
    assert_eq!(first["line"], 3);
    assert_eq!(first["column"], 6);
    assert_eq!(first["severity"], "error");
    assert!(first["message"].as_str().unwrap().contains("same version"));
    assert_eq!(diagnostics[1]["line"], 14);
    assert_eq!(diagnostics[1]["column"], 15);
}

#[test]
fn an_unreadable_file_exits_1_naming_the_path() {
    let missing = repo().join("deploy/examples/no-such-script.toml");
    let output = check(&missing, &[]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("cannot read"), "{text}");
    assert!(text.contains("no-such-script.toml"), "{text}");

    let output = check(&missing, &["--output", "json"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(json(&output)["valid"], false);
}

#[test]
fn a_missing_artifact_source_is_an_error_at_its_line() {
    let (_dir, script) = script_in_tempdir(VALID, &[]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    let location = format!(
        "{}:7:10: error: artifact source `build/primes` does not exist",
        script.display()
    );
    assert!(text.contains(&location), "{text}");
}

#[test]
fn artifact_sources_resolve_relative_to_the_script_not_the_cwd() {
    let (dir, _script) = script_in_tempdir(VALID, &[("build/primes", b"bin")]);
    let output = Command::new(env!("CARGO_BIN_EXE_hotroll"))
        .args(["check", "upgrade.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = Command::new(env!("CARGO_BIN_EXE_hotroll"))
        .args(["check", dir.path().join("upgrade.toml").to_str().unwrap()])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn sha256_must_match_the_file() {
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"bin"))
    };
    let with_digest = |d: &str| {
        VALID.replace(
            "source = \"build/primes\"",
            &format!("source = \"build/primes\"\nsha256 = \"{d}\""),
        )
    };

    let (_dir, script) = script_in_tempdir(&with_digest(&digest), &[("build/primes", b"bin")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let (_dir, script) = script_in_tempdir(
        &with_digest(&digest.to_uppercase()),
        &[("build/primes", b"bin")],
    );
    assert_eq!(
        check(&script, &[]).status.code(),
        Some(0),
        "uppercase hex is the same digest"
    );

    let (_dir, script) =
        script_in_tempdir(&with_digest(&"0".repeat(64)), &[("build/primes", b"bin")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    let location = format!(
        "{}:8:10: error: `sha256` does not match `build/primes`",
        script.display()
    );
    assert!(text.contains(&location), "{text}");
    assert!(
        text.contains(&digest),
        "the message gives the actual digest: {text}"
    );
}

#[test]
fn warnings_go_to_stderr_and_do_not_fail() {
    let source =
        format!("{VALID}\n[[artifacts]]\nname = \"etc/unused\"\nsource = \"build/primes\"\n");
    let (_dir, script) = script_in_tempdir(&source, &[("build/primes", b"bin")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).starts_with("primes 1.0.0 -> 2.0.0"));
    let text = stderr(&output);
    let location = format!(
        "{}:18:8: warning: artifact `etc/unused` is declared",
        script.display()
    );
    assert!(text.contains(&location), "{text}");

    let output = check(&script, &["--output", "json"]);
    assert_eq!(output.status.code(), Some(0));
    let report = json(&output);
    assert_eq!(report["valid"], true);
    assert_eq!(report["warnings"][0]["severity"], "warning");
    assert_eq!(report["warnings"][0]["line"], 18);
}

#[test]
fn a_toml_syntax_error_is_one_diagnostic() {
    let (_dir, script) = script_in_tempdir("app = \"primes\nfrom = 1\n", &[]);
    let output = check(&script, &["--output", "json"]);
    assert_eq!(output.status.code(), Some(2));
    let report = json(&output);
    let diagnostics = report["diagnostics"].as_array().unwrap();
    assert_eq!(diagnostics.len(), 1);
    assert!(
        diagnostics[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid TOML")
    );
    assert_eq!(diagnostics[0]["line"], 1);
}

#[test]
fn a_script_that_is_not_utf8_is_invalid_not_unreadable() {
    let (_dir, script) = script_in_tempdir("", &[]);
    std::fs::write(&script, b"app = \"pr\xffimes\"\n").unwrap();
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains(":1:10: error: the script is not valid UTF-8"),
        "{text}"
    );
}

#[test]
fn gates_show_in_the_plan_text_and_json_and_a_bad_one_is_an_error_at_its_place() {
    let gates = "[rollout]\n\n[[rollout.gates]]\nname = \"errors\"\nquery = \"rate(errors_total[1m])\"\npass_if = \"< 0.5\"\nhold = \"30s\"\n\n[script]";
    let source = VALID.replace("[script]", gates);
    let (_dir, script) = script_in_tempdir(&source, &[("build/primes", b"#!/bin/sh\n")]);
    let output = check(&script, &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(
        text.contains(
            "after each wave, gate `errors`: `rate(errors_total[1m])` < 0.5 for 30s (every 5s, within 5m); a failed gate rolls the wave back"
        ),
        "{text}"
    );
    let output = check(&script, &["--output", "json"]);
    let report = json(&output);
    let gate = &report["plan"]["policy"]["gates"][0];
    assert_eq!(gate["name"], "errors", "{report:#}");
    assert_eq!(gate["pass_if"], "< 0.5");
    assert_eq!(gate["hold_ms"], 30_000);

    let bad = VALID.replace("[script]", &gates.replace("< 0.5", "below 0.5"));
    let (_dir, script) = script_in_tempdir(&bad, &[("build/primes", b"#!/bin/sh\n")]);
    let output = check(&script, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("error: `pass_if` of a gate: `below 0.5` is not a comparison"),
        "{}",
        stderr(&output)
    );
}
