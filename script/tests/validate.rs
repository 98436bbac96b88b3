//! Table-driven tests of every parse and validation rule: each case asserts the message and the
//! 1-based line and column the diagnostic points at.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use hotroll_script::diagnostic::line_col;
use hotroll_script::{
    ChangeMode, Declared, Diagnostic, Instruction, OnFailure, Runtime, Severity, Span, parse,
    validate_against,
};
use std::time::Duration;

/// A process script whose `up` elements are `lines`; element `i` is on line `6 + i`, and every
/// line written as `"  …"` starts its element at column 3. `after` follows the `up` list
/// (down list, [[artifacts]], [rollout] …); `None` = the one artifact `bin/primes`.
fn process_with(lines: &[&str], after: Option<&str>) -> String {
    let after = after.unwrap_or(DEFAULT_ARTIFACT);
    format!(
        "app = \"primes\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n[script]\nup = [\n{}\n]\n{after}",
        lines.join("\n")
    )
}

fn process(lines: &[&str]) -> String {
    process_with(lines, None)
}

const DEFAULT_ARTIFACT: &str = "[[artifacts]]\nname = \"bin/primes\"\nsource = \"build/primes\"\n";

/// A beam script: element `i` of `up` is on line `7 + i`.
fn beam_with(lines: &[&str], after: Option<&str>) -> String {
    let after = after.unwrap_or(
        "[[artifacts]]\nname = \"ebin/counter_server.beam\"\nsource = \"build/counter_server.beam\"\n",
    );
    format!(
        "app = \"counter\"\nruntime = \"beam\"\nfrom = \"1.0.0\"\nto = \"1.1.0\"\n[script]\nup = [\n{}\n]\n{after}",
        lines.join("\n")
    )
}

fn beam(lines: &[&str]) -> String {
    beam_with(lines, None)
}

const STAGE: &str = r#"  { load_object_code = ["bin/primes"] },"#;
const SYNC: &str = r#"  { sync_nodes = "staged" },"#;
const PONR: &str = r#"  "point_of_no_return","#;
const SUSPEND: &str = r#"  { suspend = ["primes"] },"#;
const LOAD: &str = r#"  { load = "primes" },"#;
const CHANGE: &str = r#"  { code_change = "primes" },"#;
const RESUME: &str = r#"  { resume = ["primes"] },"#;

const BEAM_STAGE: &str = r#"  { load_object_code = ["ebin/counter_server.beam"] },"#;
const BEAM_SUSPEND: &str = r#"  { suspend = ["counter_server"] },"#;
const BEAM_LOAD: &str = r#"  { load = ["counter_server"] },"#;
const BEAM_CHANGE: &str = r#"  { code_change = { modules = ["counter_server"], extra = "x" } },"#;
const BEAM_RESUME: &str = r#"  { resume = ["counter_server"] },"#;

/// The hot upgrade every case starts from: valid, no warnings.
fn hot_upgrade() -> Vec<&'static str> {
    vec![STAGE, SYNC, PONR, SUSPEND, LOAD, CHANGE, RESUME]
}

struct Case {
    name: &'static str,
    source: String,
    /// `None`: the script is valid (and has no warnings unless `warning` says so).
    expect: Option<Expect>,
}

struct Expect {
    severity: Severity,
    message: &'static str,
    line: usize,
    column: usize,
}

fn ok(name: &'static str, source: String) -> Case {
    Case {
        name,
        source,
        expect: None,
    }
}

fn error(
    name: &'static str,
    source: String,
    message: &'static str,
    line: usize,
    column: usize,
) -> Case {
    Case {
        name,
        source,
        expect: Some(Expect {
            severity: Severity::Error,
            message,
            line,
            column,
        }),
    }
}

fn warning(
    name: &'static str,
    source: String,
    message: &'static str,
    line: usize,
    column: usize,
) -> Case {
    Case {
        name,
        source,
        expect: Some(Expect {
            severity: Severity::Warning,
            message,
            line,
            column,
        }),
    }
}

fn describe(source: &str, items: &[Diagnostic]) -> String {
    items
        .iter()
        .map(|d| {
            let (line, column) = line_col(source, d.span.start);
            format!("  {line}:{column} {:?} {}", d.severity, d.message)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let result = parse("test.toml", &case.source);
        let items = match &result {
            Ok(parsed) => parsed.warnings.clone(),
            Err(diagnostics) => diagnostics.items.clone(),
        };
        match &case.expect {
            None => {
                if !items.is_empty() {
                    failures.push(format!(
                        "{}: expected no diagnostic, got:\n{}",
                        case.name,
                        describe(&case.source, &items)
                    ));
                }
            }
            Some(expect) => {
                if expect.severity == Severity::Warning && result.is_err() {
                    failures.push(format!(
                        "{}: expected only warnings, got errors:\n{}",
                        case.name,
                        describe(&case.source, &items)
                    ));
                    continue;
                }
                if expect.severity == Severity::Error && result.is_ok() {
                    failures.push(format!(
                        "{}: expected an error, the script is valid",
                        case.name
                    ));
                    continue;
                }
                let found = items.iter().any(|d| {
                    d.severity == expect.severity
                        && d.message.contains(expect.message)
                        && line_col(&case.source, d.span.start) == (expect.line, expect.column)
                });
                if !found {
                    failures.push(format!(
                        "{}: expected {:?} containing {:?} at {}:{}, got:\n{}",
                        case.name,
                        expect.severity,
                        expect.message,
                        expect.line,
                        expect.column,
                        describe(&case.source, &items)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn with(base: Vec<&'static str>, index: usize, line: &'static str) -> Vec<&'static str> {
    let mut lines = base;
    lines.insert(index, line);
    lines
}

#[test]
fn toml_and_document_shape() {
    run(vec![
        ok("baseline hot upgrade", process(&hot_upgrade())),
        error(
            "TOML syntax error",
            "app = \"primes\nfrom = \"1.0.0\"\n".to_string(),
            "invalid TOML",
            1,
            14,
        ),
        error(
            "duplicate TOML key",
            "app = \"a\"\napp = \"b\"\n".to_string(),
            "invalid TOML: duplicate key",
            2,
            1,
        ),
        error(
            "unknown top-level key",
            process(&hot_upgrade()).replace("from = ", "form = \"x\"\nfrom = "),
            "unknown key `form` at the top level",
            2,
            1,
        ),
        error(
            "missing app",
            process(&hot_upgrade()).replace("app = \"primes\"\n", ""),
            "missing required key `app`",
            1,
            1,
        ),
        error(
            "missing from",
            process(&hot_upgrade()).replace("from = \"1.0.0\"\n", ""),
            "missing required key `from`",
            1,
            1,
        ),
        error(
            "missing to",
            process(&hot_upgrade()).replace("to = \"2.0.0\"\n", ""),
            "missing required key `to`",
            1,
            1,
        ),
        error(
            "missing [script]",
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n".to_string(),
            "missing the [script] table",
            1,
            1,
        ),
        error(
            "missing up",
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[script]\ndown = []\n".to_string(),
            "missing required key `up` in [script]",
            4,
            1,
        ),
        error(
            "empty up",
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = []\n".to_string(),
            "`up` has no instructions",
            5,
            6,
        ),
        error(
            "up is not an array",
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = \"x\"\n".to_string(),
            "`up` must be an array of instructions, found a string",
            5,
            6,
        ),
        error(
            "unknown key in [script]",
            process(&hot_upgrade()).replace("[script]\n", "[script]\nrollback = []\n"),
            "unknown key `rollback` in [script]",
            5,
            1,
        ),
        error(
            "app is not a string",
            process(&hot_upgrade()).replace("app = \"primes\"", "app = 5"),
            "`app` must be a string, found an integer",
            1,
            7,
        ),
        error(
            "empty app",
            process(&hot_upgrade()).replace("app = \"primes\"", "app = \"\""),
            "`app` cannot be empty",
            1,
            7,
        ),
        error(
            "app with a path separator",
            process(&hot_upgrade()).replace("app = \"primes\"", "app = \"a/b\""),
            "`app` becomes a directory name on every node and cannot contain a path separator",
            1,
            7,
        ),
        error(
            "version `..`",
            process(&hot_upgrade()).replace("to = \"2.0.0\"", "to = \"..\""),
            "`to` becomes a directory name on every node and cannot be `.` or `..`",
            3,
            6,
        ),
        error(
            "from equals to",
            process(&hot_upgrade()).replace("to = \"2.0.0\"", "to = \"1.0.0\""),
            "`to` is the same version as `from`",
            3,
            6,
        ),
        error(
            "unknown runtime",
            process(&hot_upgrade()).replace("from = ", "runtime = \"procss\"\nfrom = "),
            "unknown runtime `procss`",
            2,
            11,
        ),
        ok(
            "explicit process runtime",
            process(&hot_upgrade()).replace("from = ", "runtime = \"process\"\nfrom = "),
        ),
        error(
            "description is not a string",
            process(&hot_upgrade()).replace("from = ", "description = 1\nfrom = "),
            "`description` must be a string",
            2,
            15,
        ),
    ]);
}

#[test]
fn instruction_shapes() {
    run(vec![
        ok(
            "a node gate",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { gate = { query = "rate(errors_total{node=\"$node\"}[1m])", pass_if = "< 1", hold = "3s", interval = "1s", timeout = "30s" } },"#,
            )),
        ),
        error(
            "a node gate with a bad pass_if",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { gate = { query = "up", pass_if = "less than 1" } },"#,
            )),
            "`pass_if` of `gate`: `less than 1` is not a comparison",
            13,
            38,
        ),
        error(
            "a node gate without a query",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { gate = { pass_if = "< 1" } },"#,
            )),
            "missing required key `query` for `gate`",
            13,
            12,
        ),
        error(
            "a node gate as a string",
            process(&with(hot_upgrade(), 7, r#"  { gate = "up" },"#)),
            "`gate` takes a table, found a string",
            13,
            12,
        ),
        error(
            "unknown instruction",
            process(&with(hot_upgrade(), 1, r#"  { sync_node = "x" },"#)),
            "unknown instruction `sync_node`",
            7,
            5,
        ),
        error(
            "unknown bare instruction",
            process(&with(hot_upgrade(), 3, r#"  "point_of_noreturn","#)),
            "unknown instruction `point_of_noreturn`",
            9,
            3,
        ),
        error(
            "bare instruction that needs arguments",
            process(&with(hot_upgrade(), 7, r#"  "health","#)),
            "`health` needs arguments",
            13,
            3,
        ),
        error(
            "point_of_no_return as a table",
            process(&[STAGE, r#"  { point_of_no_return = {} },"#, LOAD]),
            "`point_of_no_return` takes no arguments",
            7,
            5,
        ),
        error(
            "restart_new_emulator as a table",
            process(&[r#"  { restart_new_emulator = true },"#, STAGE]),
            "`restart_new_emulator` takes no arguments",
            6,
            5,
        ),
        error(
            "two keys in one instruction",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { health = "primes", timeout = "5s" },"#,
            )),
            "exactly one key",
            13,
            3,
        ),
        error(
            "empty table instruction",
            process(&with(hot_upgrade(), 7, "  {},")),
            "an empty table is not an instruction",
            13,
            3,
        ),
        error(
            "integer instruction",
            process(&with(hot_upgrade(), 7, "  42,")),
            "an instruction must be a string or a table with one key, found an integer",
            13,
            3,
        ),
        error(
            "unknown option",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { sync_nodes = { id = "done", timout = "5s" } },"#,
            )),
            "unknown option `timout` for `sync_nodes`",
            13,
            33,
        ),
        error(
            "missing required option",
            process(&with(
                hot_upgrade(),
                7,
                r#"  { sync_nodes = { timeout = "5s" } },"#,
            )),
            "missing required key `id` for `sync_nodes`",
            13,
            18,
        ),
        error(
            "option of the other runtime",
            process(&with(
                hot_upgrade(),
                1,
                r#"  { check = { modules = ["m"] } },"#,
            )),
            "`modules` is an option of `check` in the beam runtime",
            7,
            15,
        ),
        error(
            "beam option in process code_change",
            process(&[
                STAGE,
                PONR,
                SUSPEND,
                LOAD,
                r#"  { code_change = { service = "primes", mode = "down" } },"#,
                RESUME,
            ]),
            "`mode` is an option of `code_change` in the beam runtime",
            10,
            41,
        ),
        error(
            "wrong argument type",
            process(&with(hot_upgrade(), 7, "  { health = 5 },")),
            "`health` takes a service name or a table, found an integer",
            13,
            14,
        ),
        error(
            "empty target list",
            process(&[STAGE, PONR, "  { restart = [] },", LOAD]),
            "`restart` must list at least one service",
            8,
            15,
        ),
        error(
            "non-string target",
            process(&[STAGE, PONR, "  { restart = [\"a\", 1] },", LOAD]),
            "every service of `restart` must be a string, found an integer",
            8,
            21,
        ),
        error(
            "empty name",
            process(&[STAGE, PONR, "  { restart = \"\" },", LOAD]),
            "`restart` cannot be empty",
            8,
            15,
        ),
        error(
            "process load takes one app",
            process(&[STAGE, PONR, r#"  { load = ["primes"] },"#]),
            "`load` takes the app name (process runtime)",
            8,
            12,
        ),
        error(
            "process code_change takes one service",
            process(&[
                STAGE,
                PONR,
                SUSPEND,
                LOAD,
                r#"  { code_change = ["primes"] },"#,
                RESUME,
            ]),
            "`code_change` takes one service",
            10,
            19,
        ),
        error(
            "code_change mode",
            beam(&[
                BEAM_STAGE,
                PONR,
                BEAM_SUSPEND,
                BEAM_LOAD,
                r#"  { code_change = { modules = ["counter_server"], mode = "sideways" } },"#,
                BEAM_RESUME,
            ]),
            "`mode` of `code_change` must be \"up\" or \"down\"",
            11,
            58,
        ),
        error(
            "args must be strings",
            process(&with(
                hot_upgrade(),
                1,
                r#"  { check = { hook = "disk", args = [1] } },"#,
            )),
            "every argument of `args` of `check` must be a string",
            7,
            38,
        ),
        error(
            "purge releases = false",
            process(&with(
                hot_upgrade(),
                7,
                "  { purge = { releases = false } },",
            )),
            "`releases = false` purges nothing",
            13,
            26,
        ),
        error(
            "process purge cannot be brutal",
            process(&with(hot_upgrade(), 7, "  { purge = { brutal = true } },")),
            "`brutal` is an option of `purge` in the beam runtime",
            13,
            15,
        ),
    ]);
}

#[test]
fn durations_and_numbers() {
    let timeout = |value: &'static str| {
        process(&with(
            hot_upgrade(),
            7,
            Box::leak(
                format!("  {{ health = {{ service = \"primes\", timeout = {value} }} }},")
                    .into_boxed_str(),
            ),
        ))
    };
    // The timeout value starts at column 46 of line 13.
    run(vec![
        ok("500ms", timeout("\"500ms\"")),
        ok("5m", timeout("\"5m\"")),
        ok("24h", timeout("\"24h\"")),
        error(
            "zero",
            timeout("\"0s\""),
            "must be greater than zero",
            13,
            46,
        ),
        error("negative", timeout("\"-5s\""), "is negative", 13, 46),
        error("no unit", timeout("\"30\""), "has no unit", 13, 46),
        error(
            "unknown unit",
            timeout("\"3d\""),
            "unknown unit `d`",
            13,
            46,
        ),
        error("fraction", timeout("\"1.5s\""), "is not a duration", 13, 46),
        error(
            "above 24h",
            timeout("\"25h\""),
            "longer than 24h; every duration is bounded",
            13,
            46,
        ),
        error(
            "integer",
            timeout("30"),
            "must be a duration string with a unit",
            13,
            46,
        ),
        error(
            "boolean",
            timeout("true"),
            "must be a duration string such as",
            13,
            46,
        ),
    ]);

    let rollout = |body: &str| {
        process_with(
            &hot_upgrade(),
            Some(&format!("{DEFAULT_ARTIFACT}[rollout]\n{body}\n")),
        )
    };
    // [rollout] is on line 17, its first key on line 18.
    run(vec![
        ok(
            "full rollout",
            rollout(
                "select = { role = \"miner\" }\ncanary = 1\nmax_in_flight = 2\nmax_failures = 0\non_failure = \"halt\"\nbarrier_timeout = \"30s\"\nstep_timeout = \"1m\"\npause_after_canary = true",
            ),
        ),
        error(
            "negative count",
            rollout("canary = -1"),
            "`canary` cannot be negative",
            18,
            10,
        ),
        error(
            "count above u32",
            rollout("max_failures = 4294967296"),
            "`max_failures` is too large",
            18,
            16,
        ),
        error(
            "float count",
            rollout("max_in_flight = 2.5"),
            "`max_in_flight` must be a whole number",
            18,
            17,
        ),
        error(
            "string count",
            rollout("canary = \"1\""),
            "`canary` `1` is neither a number of nodes nor a percentage",
            18,
            10,
        ),
        ok(
            "percentages",
            rollout("canary = \"10%\"\nmax_in_flight = \"50%\""),
        ),
        error(
            "percentage above 100",
            rollout("max_in_flight = \"150%\""),
            "`max_in_flight` 150% is not between 1% and 100%",
            18,
            17,
        ),
        error(
            "zero percent",
            rollout("canary = \"0%\""),
            "`canary` 0% is not between 1% and 100%",
            18,
            10,
        ),
        error(
            "boolean count",
            rollout("canary = true"),
            "`canary` must be a number of nodes or a percentage, found a boolean",
            18,
            10,
        ),
        ok(
            "windows",
            rollout(
                "windows = [\"Mon-Fri 02:00-05:00 UTC\", \"daily 22:00-02:00 UTC\"]\nwindow_timeout = \"2h\"",
            ),
        ),
        error(
            "a bad window",
            rollout("windows = [\"Mon-Fri 02:00-05:00 UTC\", \"Mon-Fri 02:00-05:00 CET\"]"),
            "only UTC windows are accepted, found `CET`",
            18,
            39,
        ),
        ok(
            "fleet gates",
            rollout(
                "[[rollout.gates]]\nname = \"errors\"\nquery = \"rate(errors_total[1m])\"\npass_if = \"< 0.5\"\nhold = \"30s\"\ninterval = \"5s\"\ntimeout = \"5m\"",
            ),
        ),
        error(
            "a gate with a bad pass_if",
            rollout("[[rollout.gates]]\nname = \"errors\"\nquery = \"up\"\npass_if = \"== 1\""),
            "`pass_if` of a gate: `== 1` is not a comparison",
            21,
            11,
        ),
        error(
            "a gate holding longer than its timeout",
            rollout(
                "[[rollout.gates]]\nname = \"errors\"\nquery = \"up\"\npass_if = \"> 0\"\nhold = \"10m\"\ntimeout = \"1m\"",
            ),
            "`hold` of a gate (10m) is longer than its `timeout` (1m): it could never pass",
            22,
            8,
        ),
        error(
            "a gate with a bad duration",
            rollout(
                "[[rollout.gates]]\nname = \"errors\"\nquery = \"up\"\npass_if = \"> 0\"\ninterval = \"0s\"",
            ),
            "invalid duration for `interval` of a gate",
            22,
            12,
        ),
        error(
            "a gate with an empty query",
            rollout("[[rollout.gates]]\nname = \"errors\"\nquery = \"\"\npass_if = \"> 0\""),
            "`query` of a gate cannot be empty",
            20,
            9,
        ),
        error(
            "two gates of one name",
            rollout(
                "[[rollout.gates]]\nname = \"g\"\nquery = \"up\"\npass_if = \"> 0\"\n[[rollout.gates]]\nname = \"g\"\nquery = \"up\"\npass_if = \"> 0\"",
            ),
            "gate `g` is named twice",
            23,
            8,
        ),
        error(
            "an unknown gate key",
            rollout(
                "[[rollout.gates]]\nname = \"g\"\nquery = \"up\"\npass_if = \"> 0\"\nholds = \"1s\"",
            ),
            "unknown key `holds` in [[rollout.gates]]",
            22,
            1,
        ),
        ok(
            "waves by a label in an order",
            rollout("waves_by = \"zone\"\norder = [\"a\", \"b\", \"c\"]"),
        ),
        error(
            "waves_by empty",
            rollout("waves_by = \"\""),
            "`waves_by` cannot be empty",
            18,
            12,
        ),
        error(
            "order without waves_by",
            rollout("order = [\"a\"]"),
            "`order` needs `waves_by`",
            18,
            9,
        ),
        error(
            "order names a value twice",
            rollout("waves_by = \"zone\"\norder = [\"a\", \"b\", \"a\"]"),
            "`order` names `a` twice",
            19,
            20,
        ),
        error(
            "order not an array",
            rollout("waves_by = \"zone\"\norder = \"a\""),
            "`order` must be",
            19,
            9,
        ),
        error(
            "on_failure",
            rollout("on_failure = \"rollback_nodes\""),
            "unknown `on_failure` policy `rollback_nodes`",
            18,
            14,
        ),
        error(
            "barrier_timeout",
            rollout("barrier_timeout = \"0ms\""),
            "invalid duration for `barrier_timeout`",
            18,
            19,
        ),
        error(
            "step_timeout",
            rollout("step_timeout = \"48h\""),
            "invalid duration for `step_timeout`",
            18,
            16,
        ),
        error(
            "select value not a string",
            rollout("select = { role = 1 }"),
            "the label `role` in `select` must be a string",
            18,
            19,
        ),
        error(
            "select not a table",
            rollout("select = \"role=miner\""),
            "`select` must be a table of node labels",
            18,
            10,
        ),
        error(
            "pause_after_canary type",
            rollout("pause_after_canary = \"yes\""),
            "`pause_after_canary` must be true or false",
            18,
            22,
        ),
        ok("skip_unreachable", rollout("skip_unreachable = true")),
        error(
            "skip_unreachable type",
            rollout("skip_unreachable = 1"),
            "`skip_unreachable` must be true or false",
            18,
            20,
        ),
        error(
            "unknown rollout key",
            rollout("canaries = 1"),
            "unknown key `canaries` in [rollout]",
            18,
            1,
        ),
        warning(
            "pause without canary",
            rollout("pause_after_canary = true"),
            "`pause_after_canary` has no effect without a canary wave",
            18,
            22,
        ),
    ]);
}

#[test]
fn artifacts() {
    let artifacts = |body: &str| process_with(&hot_upgrade(), Some(body));
    // The [[artifacts]] header is on line 14, its first key on line 15.
    run(vec![
        ok(
            "every artifact option",
            artifacts(&format!(
                "[[artifacts]]\nname = \"bin/primes\"\nsource = \"build/primes\"\nsha256 = \"{}\"\nunpack = false\nmode = \"0755\"\n",
                "AB".repeat(32)
            )),
        ),
        ok(
            "octal integer mode",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nmode = 0o755\n"),
        ),
        error(
            "decimal mode",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nmode = 755\n"),
            "`mode` 755 is a decimal integer",
            17,
            8,
        ),
        error(
            "non-octal mode",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nmode = \"0789\"\n"),
            "is not a string of octal digits",
            17,
            8,
        ),
        error(
            "mode out of range",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nmode = \"17777\"\n"),
            "`mode` is out of range",
            17,
            8,
        ),
        error(
            "unpack type",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nunpack = 1\n"),
            "`unpack` must be true or false",
            17,
            10,
        ),
        error(
            "missing name",
            artifacts("[[artifacts]]\nsource = \"s\"\n"),
            "missing required key `name` in [[artifacts]]",
            14,
            1,
        ),
        error(
            "missing source",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\n"),
            "missing required key `source` in [[artifacts]]",
            14,
            1,
        ),
        error(
            "empty source",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"\"\n"),
            "the artifact's `source` cannot be empty",
            16,
            10,
        ),
        error(
            "unknown artifact key",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nsha = \"x\"\n"),
            "unknown key `sha` in [[artifacts]]",
            17,
            1,
        ),
        error(
            "artifacts not an array",
            process_with(&hot_upgrade(), Some("[artifacts]\nname = \"bin/primes\"\n")),
            "`artifacts` must be an array of tables",
            14,
            1,
        ),
        error(
            "undeclared artifact",
            process_with(
                &[r#"  { load_object_code = ["bin/primez"] },"#, PONR, LOAD],
                None,
            ),
            "`load_object_code` stages `bin/primez`, which no [[artifacts]] entry declares",
            6,
            25,
        ),
        warning(
            "unreferenced artifact",
            artifacts(
                "[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\n[[artifacts]]\nname = \"etc/unused\"\nsource = \"s\"\n",
            ),
            "artifact `etc/unused` is declared but no `load_object_code` stages it",
            18,
            8,
        ),
        error(
            "duplicate artifact",
            artifacts(
                "[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\n[[artifacts]]\nname = \"bin/primes\"\nsource = \"t\"\n",
            ),
            "artifact `bin/primes` is declared twice",
            18,
            8,
        ),
        error(
            "absolute artifact name",
            artifacts("[[artifacts]]\nname = \"/etc/passwd\"\nsource = \"s\"\n"),
            "is an absolute path",
            15,
            8,
        ),
        error(
            "dot-dot artifact name",
            artifacts("[[artifacts]]\nname = \"bin/../../x\"\nsource = \"s\"\n"),
            "contains `..`",
            15,
            8,
        ),
        error(
            "empty artifact name",
            artifacts("[[artifacts]]\nname = \"\"\nsource = \"s\"\n"),
            "an artifact name cannot be empty",
            15,
            8,
        ),
        error(
            "short sha256",
            artifacts("[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nsha256 = \"abc\"\n"),
            "`sha256` must be 64 hexadecimal characters, found 3",
            17,
            10,
        ),
        error(
            "non-hex sha256",
            artifacts(&format!(
                "[[artifacts]]\nname = \"bin/primes\"\nsource = \"s\"\nsha256 = \"{}\"\n",
                "zz".repeat(32)
            )),
            "`sha256` must contain only hexadecimal characters",
            17,
            10,
        ),
    ]);
}

#[test]
fn ordering_rules() {
    let mut cases = vec![
        error(
            "duplicate barrier id",
            process(&[STAGE, SYNC, PONR, LOAD, SYNC]),
            "barrier id `staged` is used twice",
            10,
            18,
        ),
        error(
            "load_object_code after the point of no return",
            process(&[STAGE, PONR, LOAD, STAGE]),
            "`load_object_code` after the point of no return",
            9,
            3,
        ),
        error(
            "check after the point of no return",
            process(&[STAGE, PONR, LOAD, r#"  { check = "disk" },"#]),
            "`check` after the point of no return",
            9,
            3,
        ),
        error(
            "two points of no return",
            process(&[STAGE, PONR, LOAD, PONR]),
            "more than one `point_of_no_return`",
            9,
            3,
        ),
        error(
            "check after the first change (implicit point of no return)",
            process(&[
                STAGE,
                SUSPEND,
                r#"  { check = "disk" },"#,
                LOAD,
                CHANGE,
                RESUME,
            ]),
            "`check` after `suspend` (step 2), which changes the running system",
            8,
            3,
        ),
        ok(
            "implicit point of no return",
            process(&[
                STAGE,
                r#"  { check = "disk" },"#,
                SUSPEND,
                LOAD,
                CHANGE,
                RESUME,
            ]),
        ),
        ok(
            "apply and sync_nodes anywhere",
            process(&[
                r#"  { apply = "drain" },"#,
                STAGE,
                SYNC,
                PONR,
                LOAD,
                r#"  { apply = { hook = "warm", args = ["a"] } },"#,
                r#"  { sync_nodes = "done" },"#,
            ]),
        ),
        ok(
            "restart_new_emulator first",
            process(&[r#"  "restart_new_emulator","#, STAGE, PONR, LOAD]),
        ),
        error(
            "restart_new_emulator not first",
            process(&[STAGE, PONR, LOAD, r#"  "restart_new_emulator","#]),
            "`restart_new_emulator` must be the first instruction",
            9,
            3,
        ),
        error(
            "load without load_object_code",
            process(&[r#"  { check = "disk" },"#, PONR, LOAD]),
            "`load` has no earlier `load_object_code`",
            8,
            3,
        ),
        error(
            "load before its load_object_code",
            process(&[PONR, LOAD, STAGE]),
            "`load` has no earlier `load_object_code`",
            7,
            3,
        ),
        error(
            "load of another app",
            process(&[STAGE, PONR, r#"  { load = "other" },"#]),
            "`load` activates app `other`, but this script upgrades `primes`",
            8,
            12,
        ),
    ];
    // Every instruction that changes the running system, before an explicit point of no return.
    for (name, line) in [
        ("suspend", r#"  { suspend = ["primes"] },"#),
        ("load", LOAD),
        ("code_change", CHANGE),
        ("resume", RESUME),
        ("stop", r#"  { stop = "primes" },"#),
        ("start", r#"  { start = "primes" },"#),
        ("restart", r#"  { restart = "primes" },"#),
        ("health", r#"  { health = "primes" },"#),
        ("purge", r#"  "purge","#),
    ] {
        let message: &'static str = Box::leak(
            format!("`{name}` changes the running system before the point of no return")
                .into_boxed_str(),
        );
        cases.push(error(
            name,
            process(&[STAGE, line, PONR, LOAD]),
            message,
            7,
            3,
        ));
    }
    run(cases);
}

#[test]
fn balance_rules() {
    const STOP: &str = r#"  { stop = "primes" },"#;
    const START: &str = r#"  { start = "primes" },"#;
    run(vec![
        ok(
            "stop then start",
            process(&[STAGE, PONR, STOP, LOAD, START]),
        ),
        ok(
            "restart alone",
            process(&[STAGE, PONR, LOAD, r#"  { restart = ["primes"] },"#]),
        ),
        error(
            "suspended, never resumed",
            process(&[STAGE, PONR, SUSPEND, LOAD]),
            "`primes` is suspended but never resumed",
            8,
            16,
        ),
        error(
            "resume of a target not suspended",
            process(&[STAGE, PONR, LOAD, RESUME]),
            "`resume` of `primes`, which is not suspended",
            9,
            15,
        ),
        error(
            "suspended twice",
            process(&[STAGE, PONR, SUSPEND, SUSPEND, LOAD, RESUME]),
            "`primes` is already suspended",
            9,
            16,
        ),
        error(
            "stopped, never started",
            process(&[STAGE, PONR, STOP, LOAD]),
            "`primes` is stopped but never started",
            8,
            12,
        ),
        error(
            "start of a target not stopped",
            process(&[STAGE, PONR, LOAD, START]),
            "`start` of `primes`, which is not stopped",
            9,
            13,
        ),
        error(
            "stopped twice",
            process(&[STAGE, PONR, STOP, STOP, LOAD, START]),
            "`primes` is already stopped",
            9,
            12,
        ),
        error(
            "code_change on a target not suspended",
            process(&[STAGE, PONR, LOAD, CHANGE]),
            "`code_change` on `primes`, which is not suspended",
            9,
            19,
        ),
        error(
            "code_change after resume",
            process(&[STAGE, PONR, SUSPEND, LOAD, RESUME, CHANGE]),
            "`code_change` on `primes`, which is not suspended",
            11,
            19,
        ),
        error(
            "beam code_change on a module not suspended",
            beam(&[BEAM_STAGE, PONR, BEAM_LOAD, BEAM_CHANGE]),
            "`code_change` on `counter_server`, which is not suspended",
            10,
            32,
        ),
        error(
            "a typo elsewhere does not hide a balance error",
            process(&[STAGE, r#"  { sync_node = "x" },"#, PONR, SUSPEND, LOAD]),
            "`primes` is suspended but never resumed",
            9,
            16,
        ),
    ]);
}

#[test]
fn beam_rules() {
    run(vec![
        ok(
            "beam hot upgrade",
            beam(&[
                BEAM_STAGE,
                r#"  { check = { modules = ["counter_server"], timeout = "5s" } },"#,
                SYNC,
                PONR,
                BEAM_SUSPEND,
                BEAM_LOAD,
                BEAM_CHANGE,
                BEAM_RESUME,
                r#"  { apply = { mfa = "counter_server:migrate/1", args = ["v2"] } },"#,
                r#"  { purge = { modules = ["counter_server"], brutal = true } },"#,
            ]),
        ),
        error(
            "load of a module whose .beam is not staged",
            beam(&[BEAM_STAGE, PONR, r#"  { load = ["other_server"] },"#]),
            "`load` of module `other_server` has no earlier `load_object_code` staging `other_server.beam`",
            9,
            13,
        ),
        error(
            "malformed MFA",
            beam(&[
                BEAM_STAGE,
                PONR,
                BEAM_LOAD,
                r#"  { apply = "counter_server.migrate" },"#,
            ]),
            "is not an MFA of the form module:function/arity",
            10,
            13,
        ),
        error(
            "MFA arity does not match args",
            beam(&[
                BEAM_STAGE,
                PONR,
                BEAM_LOAD,
                r#"  { apply = { mfa = "m:f/2", args = ["a"] } },"#,
            ]),
            "`m:f/2` takes 2 arguments, but `args` gives 1",
            10,
            21,
        ),
        error(
            "hook option in the beam runtime",
            beam(&[
                BEAM_STAGE,
                r#"  { check = { hook = "disk" } },"#,
                PONR,
                BEAM_LOAD,
            ]),
            "`hook` is an option of `check` in the process runtime",
            8,
            15,
        ),
    ]);
}

#[test]
fn down_rules() {
    let down = |lines: &str| {
        process_with(
            &hot_upgrade(),
            Some(&format!("down = [\n{lines}\n]\n{DEFAULT_ARTIFACT}")),
        )
    };
    // `down = [` is on line 14; its first element on line 15.
    run(vec![
        ok(
            "explicit rollback",
            down(
                r#"  { stop = "primes" },
  { load = "primes" },
  { start = "primes" },"#,
            ),
        ),
        warning(
            "empty down",
            process_with(
                &hot_upgrade(),
                Some(&format!("down = []\n{DEFAULT_ARTIFACT}")),
            ),
            "an empty `down` list makes rollback do nothing",
            14,
            8,
        ),
        error(
            "sync_nodes in down",
            down(r#"  { sync_nodes = "back" },"#),
            "`sync_nodes` makes no sense in `down`",
            15,
            3,
        ),
        error(
            "point_of_no_return in down",
            down(r#"  "point_of_no_return","#),
            "`point_of_no_return` makes no sense in `down`",
            15,
            3,
        ),
        error(
            "load_object_code in down",
            down(r#"  { load_object_code = ["bin/primes"] },"#),
            "`load_object_code` makes no sense in `down`",
            15,
            3,
        ),
        error(
            "check in down",
            down(r#"  { check = "disk" },"#),
            "`check` makes no sense in `down`",
            15,
            3,
        ),
        error(
            "unbalanced suspend in down",
            down(r#"  { suspend = ["primes"] },"#),
            "`primes` is suspended but never resumed",
            15,
            16,
        ),
        error(
            "start without stop in down",
            down(r#"  { start = "primes" },"#),
            "`start` of `primes`, which is not stopped",
            15,
            13,
        ),
        error(
            "unknown instruction in down",
            down(r#"  { rolback = "x" },"#),
            "unknown instruction `rolback`",
            15,
            5,
        ),
        error(
            "restart_new_emulator not first in down",
            down(
                r#"  { restart = "primes" },
  "restart_new_emulator","#,
            ),
            "`restart_new_emulator` must be the first instruction",
            16,
            3,
        ),
        warning(
            "beam code_change up in down",
            beam_with(
                &[
                    BEAM_STAGE,
                    PONR,
                    BEAM_SUSPEND,
                    BEAM_LOAD,
                    BEAM_CHANGE,
                    BEAM_RESUME,
                ],
                Some(
                    "down = [\n  { suspend = [\"counter_server\"] },\n  { code_change = [\"counter_server\"] },\n  { resume = [\"counter_server\"] },\n]\n[[artifacts]]\nname = \"ebin/counter_server.beam\"\nsource = \"s\"\n",
                ),
            ),
            "`code_change` in `down` runs with mode \"up\"",
            16,
            3,
        ),
        error(
            "purge the permanent release",
            process(&with(hot_upgrade(), 7, r#"  { purge = ["1.0.0"] },"#)),
            "`purge` cannot delete release `1.0.0`",
            13,
            14,
        ),
    ]);
}

#[test]
fn every_error_is_reported_at_once_sorted_by_position() {
    let source = process_with(
        &[
            STAGE,
            r#"  { sync_nodes = { id = "a", timeout = "0s" } },"#,
            PONR,
            SUSPEND,
            LOAD,
            r#"  { frobnicate = 1 },"#,
        ],
        Some("[[artifacts]]\nname = \"/abs\"\nsource = \"s\"\n"),
    );
    let diagnostics = parse("x.toml", &source).unwrap_err();
    let positions: Vec<(usize, usize)> = diagnostics
        .items
        .iter()
        .map(|d| line_col(&source, d.span.start))
        .collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
    let messages: Vec<&str> = diagnostics
        .items
        .iter()
        .map(|d| d.message.as_str())
        .collect();
    for expected in [
        "which no [[artifacts]] entry declares",
        "must be greater than zero",
        "`primes` is suspended but never resumed",
        "unknown instruction `frobnicate`",
        "is an absolute path",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "missing {expected:?} in {messages:#?}"
        );
    }
}

#[test]
fn suggestions_name_the_closest_known_word() {
    let help = |source: String| -> Option<String> {
        parse("x.toml", &source)
            .unwrap_err()
            .items
            .into_iter()
            .find_map(|d| d.help)
    };
    assert_eq!(
        help(process(&with(
            hot_upgrade(),
            1,
            r#"  { sync_node = "x" },"#
        )))
        .as_deref(),
        Some("did you mean `sync_nodes`?")
    );
    assert_eq!(
        help(process(&with(
            hot_upgrade(),
            1,
            r#"  { load_module = "x" },"#
        )))
        .as_deref(),
        Some("did you mean `load`?")
    );
    assert_eq!(
        help(process(&hot_upgrade()).replace("app =", "ap =")).as_deref(),
        Some("did you mean `app`?")
    );
}

#[test]
fn instruction_forms_map_to_the_model() {
    let parsed = parse(
        "x.toml",
        &process(&[
            r#"  { load_object_code = "bin/primes" },"#,
            r#"  { load_object_code = { artifacts = ["bin/primes"] } },"#,
            r#"  { check = { hook = "disk", args = ["/var", "1G"], timeout = "10s" } },"#,
            r#"  { sync_nodes = { id = "staged", timeout = "20s", nodes = ["a", "b"] } },"#,
            PONR,
            r#"  { suspend = { services = ["primes"], timeout = "2s" } },"#,
            r#"  { load = { app = "primes" } },"#,
            r#"  { code_change = { service = "primes", extra = "v2", timeout = "15s" } },"#,
            r#"  { resume = { services = ["primes"] } },"#,
            r#"  { stop = { services = ["side"] } },"#,
            r#"  { start = "side" },"#,
            r#"  { restart = ["a", "b"] },"#,
            r#"  { apply = { hook = "warm", args = ["x"], timeout = "1m" } },"#,
            r#"  { health = { service = "primes", timeout = "10s" } },"#,
            r#"  { purge = { releases = true } },"#,
            r#"  { purge = ["0.9.0", "0.8.0"] },"#,
        ]),
    )
    .unwrap();
    let ops: Vec<&str> = parsed
        .script
        .up
        .iter()
        .map(|s| s.instruction.name())
        .collect();
    assert_eq!(
        ops,
        [
            "load_object_code",
            "load_object_code",
            "check",
            "sync_nodes",
            "point_of_no_return",
            "suspend",
            "load",
            "code_change",
            "resume",
            "stop",
            "start",
            "restart",
            "apply",
            "health",
            "purge",
            "purge"
        ]
    );
    let up = &parsed.script.up;
    match &up[2].instruction {
        Instruction::Check {
            hook,
            args,
            modules,
            timeout,
        } => {
            assert_eq!(hook.as_ref().unwrap().value, "disk");
            assert_eq!(args, &["/var", "1G"]);
            assert!(modules.is_empty());
            assert_eq!(*timeout, Some(Duration::from_secs(10)));
        }
        other => panic!("{other:?}"),
    }
    match &up[3].instruction {
        Instruction::SyncNodes { id, timeout, nodes } => {
            assert_eq!(id.value, "staged");
            assert_eq!(*timeout, Some(Duration::from_secs(20)));
            assert_eq!(nodes, &["a", "b"]);
        }
        other => panic!("{other:?}"),
    }
    match &up[7].instruction {
        Instruction::CodeChange {
            targets,
            extra,
            mode,
            timeout,
        } => {
            assert_eq!(targets[0].value, "primes");
            assert_eq!(extra.as_deref(), Some("v2"));
            assert_eq!(*mode, ChangeMode::Up);
            assert_eq!(*timeout, Some(Duration::from_secs(15)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        up[14].instruction,
        Instruction::Purge {
            targets: vec![],
            brutal: false
        }
    );
    match &up[15].instruction {
        Instruction::Purge { targets, brutal } => {
            assert_eq!(
                targets.iter().map(|t| t.value.as_str()).collect::<Vec<_>>(),
                ["0.9.0", "0.8.0"]
            );
            assert!(!brutal);
        }
        other => panic!("{other:?}"),
    }
    // Spans point at the source text.
    let source = process(&[STAGE, PONR, LOAD]);
    let parsed = parse("x.toml", &source).unwrap();
    let Instruction::Load { targets } = &parsed.script.up[2].instruction else {
        panic!()
    };
    assert_eq!(
        &source[targets[0].span.start..targets[0].span.end],
        "\"primes\""
    );
    assert_eq!(
        &source[parsed.script.up[1].span.start..parsed.script.up[1].span.end],
        "\"point_of_no_return\""
    );
    assert_eq!(parsed.script.runtime, Runtime::Process);
    assert_eq!(parsed.script.rollout.on_failure, OnFailure::RollbackNode);

    // `validate` runs the same rules on a script built in code.
    assert!(hotroll_script::validate(&parsed.script).is_empty());
    let mut broken = parsed.script.clone();
    broken.up.swap(0, 2);
    let problems = hotroll_script::validate(&broken);
    assert!(
        problems
            .iter()
            .any(|d| d.message.contains("`load` has no earlier")),
        "{problems:#?}"
    );
}

#[test]
fn beam_forms_map_to_the_model() {
    let parsed = parse(
        "x.toml",
        &beam(&[
            BEAM_STAGE,
            r#"  { check = "counter_server" },"#,
            PONR,
            r#"  { suspend = { modules = ["counter_server"], timeout = "1s" } },"#,
            r#"  { load = { modules = ["counter_server"] } },"#,
            r#"  { code_change = { modules = ["counter_server"], extra = "{x}", mode = "down" } },"#,
            r#"  { resume = { modules = ["counter_server"] } },"#,
            r#"  { apply = "counter_server:ping/0" },"#,
            r#"  "purge","#,
            r#"  { purge = { brutal = true } },"#,
        ]),
    )
    .unwrap();
    let up = &parsed.script.up;
    assert_eq!(parsed.script.runtime, Runtime::Beam);
    match &up[1].instruction {
        Instruction::Check { hook, modules, .. } => {
            assert!(hook.is_none());
            assert_eq!(modules[0].value, "counter_server");
        }
        other => panic!("{other:?}"),
    }
    match &up[5].instruction {
        Instruction::CodeChange { mode, extra, .. } => {
            assert_eq!(*mode, ChangeMode::Down);
            assert_eq!(extra.as_deref(), Some("{x}"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&up[7].instruction, Instruction::Apply { hook, args, .. } if hook.value == "counter_server:ping/0" && args.is_empty())
    );
    assert_eq!(
        up[8].instruction,
        Instruction::Purge {
            targets: vec![],
            brutal: false
        }
    );
    assert_eq!(
        up[9].instruction,
        Instruction::Purge {
            targets: vec![],
            brutal: true
        }
    );
}

#[test]
fn validate_against_a_node_config() {
    let source = process(&[
        STAGE,
        r#"  { check = "disk_space" },"#,
        PONR,
        SUSPEND,
        LOAD,
        CHANGE,
        RESUME,
        r#"  { apply = "warm_cache" },"#,
        r#"  { health = "primes" },"#,
    ]);
    let script = parse("x.toml", &source).unwrap().script;
    let declared = Declared {
        hooks: ["disk_space".to_string()].into(),
        services: ["primes".to_string()].into(),
        ..Declared::default()
    }
    .with_all_instructions();
    let at = |d: &Diagnostic| line_col(&source, d.span.start);

    let problems = validate_against(&script, &declared);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0]
            .message
            .contains("hook `warm_cache` is not declared in this agent's config")
    );
    assert_eq!(at(&problems[0]), (13, 13));

    let mut no_services = declared.clone();
    no_services.services.clear();
    no_services.hooks.insert("warm_cache".to_string());
    let problems = validate_against(&script, &no_services);
    let messages: Vec<_> = problems
        .iter()
        .map(|d| (at(d), d.message.clone()))
        .collect();
    assert_eq!(problems.len(), 4, "{messages:#?}");
    assert!(
        problems
            .iter()
            .all(|d| d.message.contains("service `primes` is not declared"))
    );
    assert_eq!(at(&problems[0]), (9, 16));

    let mut partial = declared.clone();
    partial.hooks.insert("warm_cache".to_string());
    partial.supported_instructions.remove("suspend");
    let problems = validate_against(&script, &partial);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        problems[0].message,
        "instruction `suspend` is not supported by this agent yet"
    );
    assert_eq!(at(&problems[0]), (9, 3));

    // Beam: MFAs come from the allow-list; services are not checked.
    let source = beam(&[
        BEAM_STAGE,
        PONR,
        BEAM_LOAD,
        r#"  { apply = "counter_server:migrate/0" },"#,
    ]);
    let script = parse("x.toml", &source).unwrap().script;
    let problems = validate_against(&script, &Declared::default().with_all_instructions());
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0]
            .message
            .contains("MFA `counter_server:migrate/0` is not in this agent's allow-list")
    );
    assert_eq!(line_col(&source, problems[0].span.start), (10, 13));
    let allowed = Declared {
        mfas: ["counter_server:migrate/0".to_string()].into(),
        ..Declared::default()
    }
    .with_all_instructions();
    assert!(validate_against(&script, &allowed).is_empty());
}

#[test]
fn spans_of_toml_errors_stay_inside_the_source() {
    for source in ["app = ", "[script", "a = \"\\q\"", "= 1", "x = [1,"] {
        let diagnostics = parse("x.toml", source).unwrap_err();
        assert_eq!(diagnostics.items.len(), 1, "{source:?}");
        let span: Span = diagnostics.items[0].span;
        assert!(
            span.start <= span.end && span.end <= source.len(),
            "{source:?}: {span:?}"
        );
        assert!(diagnostics.items[0].message.starts_with("invalid TOML"));
    }
}
