//! `hotroll check FILE [--nodes N | --nodes-file NODES.toml | --live] [--output text|json]`:
//! parse and validate an upgrade script, check its artifact files on disk, and print the
//! compiled plan, with the waves as they will form: for N unlabelled nodes, for the nodes of a
//! nodes file (names with labels, see [`crate::nodes_file`]), or for the fleet the coordinator
//! knows (`--live`). The script's `select` picks the targets among the listed nodes, as the
//! coordinator does.
//!
//! Exit codes: 0 valid (plan printed), 1 the file cannot be read, the coordinator cannot be
//! asked or the output cannot be written, 2 the script (or the nodes file) is invalid (every
//! diagnostic printed).

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};

use hotroll_script::diagnostic::{DiagnosticRecord, Diagnostics};
use hotroll_script::plan::{self, Plan};
use hotroll_script::{Diagnostic, Script, Span, WaveTarget};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::exit;
use crate::nodes_file::FileNode;

/// How `check` prints its result (the CLI-wide output format).
pub use super::Output as OutputFormat;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The upgrade script to check.
    pub file: PathBuf,
    /// Number of target nodes to compute the rollout waves for.
    #[arg(long, default_value_t = 3, conflicts_with_all = ["nodes_file", "live"])]
    pub nodes: usize,
    /// Form the waves for the nodes this file lists (`[[node]]` tables: `name`, `labels`).
    #[arg(long, value_name = "NODES.toml", conflicts_with = "live")]
    pub nodes_file: Option<PathBuf>,
    /// Form the waves for the fleet the coordinator knows (its node list).
    #[arg(long)]
    pub live: bool,
    #[command(flatten)]
    pub coordinator: crate::client::CoordinatorArgs,
    /// Print the plan (or the diagnostics) as text or as one JSON document on stdout.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Serialize)]
struct ValidReport<'a> {
    valid: bool,
    plan: &'a Plan,
    warnings: Vec<DiagnosticRecord>,
}

#[derive(Serialize)]
struct InvalidReport {
    valid: bool,
    diagnostics: Vec<DiagnosticRecord>,
}

#[derive(Serialize)]
struct UnreadableReport {
    valid: bool,
    error: String,
}

/// `hotroll check`: exit 0 valid, 2 invalid, 1 unreadable (its own messages; never `Err`).
pub async fn run(args: CheckArgs) -> anyhow::Result<u8> {
    let fleet = if let Some(path) = &args.nodes_file {
        let name = path.display().to_string();
        let source = match std::fs::read_to_string(path) {
            Ok(source) => source,
            Err(error) => return Ok(unreadable(&args, format!("cannot read {name}: {error}"))),
        };
        match crate::nodes_file::parse(&name, &source) {
            Ok(nodes) => Fleet::Nodes(nodes),
            Err(diagnostics) => return Ok(invalid(&args, &diagnostics)),
        }
    } else if args.live {
        match live_fleet(&args.coordinator).await {
            Ok(nodes) => Fleet::Nodes(nodes),
            Err(error) => {
                return Ok(unreadable(
                    &args,
                    format!("cannot list the coordinator's nodes: {error:#}"),
                ));
            }
        }
    } else {
        Fleet::Count(args.nodes)
    };
    Ok(check(&args, &fleet))
}

/// The nodes a plan's waves are formed for.
enum Fleet {
    Count(usize),
    Nodes(Vec<FileNode>),
}

/// The coordinator's fleet, sorted by name.
async fn live_fleet(coordinator: &crate::client::CoordinatorArgs) -> anyhow::Result<Vec<FileNode>> {
    let mut client = crate::client::connect(coordinator).await?;
    let response = client
        .list_nodes(hotroll_proto::v1::ListNodesRequest {})
        .await
        .map_err(crate::client::status_error)?
        .into_inner();
    let mut nodes: Vec<FileNode> = response
        .nodes
        .into_iter()
        .map(|n| FileNode {
            name: n.name,
            labels: n.labels.into_iter().collect(),
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// The plan for `fleet`: the targets are the nodes whose labels match the script's `select`.
fn compile(script: &Script, fleet: &Fleet) -> Plan {
    match fleet {
        Fleet::Count(n) => plan::compile(script, *n),
        Fleet::Nodes(nodes) => {
            let select = &script.rollout.select;
            let targets: Vec<WaveTarget<'_>> = nodes
                .iter()
                .filter(|n| select.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
                .map(|n| WaveTarget {
                    name: &n.name,
                    labels: &n.labels,
                })
                .collect();
            plan::compile_for(script, &targets)
        }
    }
}

fn check(args: &CheckArgs, fleet: &Fleet) -> u8 {
    let name = args.file.display().to_string();
    let bytes = match std::fs::read(&args.file) {
        Ok(bytes) => bytes,
        Err(error) => {
            return unreadable(args, format!("cannot read {name}: {error}"));
        }
    };
    let source = match String::from_utf8(bytes) {
        Ok(source) => source,
        Err(error) => return invalid(args, &not_utf8(name, &error)),
    };
    let (script, mut diagnostics) = hotroll_script::parse_partial(&name, &source);
    let Some(script) = script else {
        return invalid(args, &diagnostics);
    };
    // The pure validator cannot look at files; the artifacts' sources are checked here, in the
    // same report as the script's own problems.
    let script_dir = match args.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    diagnostics
        .items
        .extend(check_artifact_files(&script, script_dir));
    diagnostics
        .items
        .extend(crate::otp::check_release_tarballs(&script, script_dir));
    diagnostics
        .items
        .sort_by_key(|d| (d.span.start, d.span.end));
    if diagnostics.has_errors() {
        return invalid(args, &diagnostics);
    }

    let plan = compile(&script, fleet);
    match args.output {
        OutputFormat::Text => {
            if !diagnostics.items.is_empty() {
                write_stderr(&format!("{}\n", diagnostics.render(stderr_color())));
            }
            write_stdout(&plan.to_string())
        }
        OutputFormat::Json => write_json(&ValidReport {
            valid: true,
            plan: &plan,
            warnings: diagnostics.to_records(),
        }),
    }
}

/// A script that is not UTF-8: one diagnostic at the first bad byte.
fn not_utf8(name: String, error: &std::string::FromUtf8Error) -> Diagnostics {
    let offset = error.utf8_error().valid_up_to();
    // The lossy text is identical up to `offset`, where U+FFFD replaces the bad byte.
    let source = String::from_utf8_lossy(error.as_bytes()).into_owned();
    let end = (offset + char::REPLACEMENT_CHARACTER.len_utf8()).min(source.len());
    Diagnostics {
        name,
        source,
        items: vec![Diagnostic::error(
            Span::new(offset, end),
            "the script is not valid UTF-8",
        )],
    }
}

/// Every artifact's `source` exists (relative to the script's directory), is a file, and matches
/// its `sha256` when the script gives one.
pub fn check_artifact_files(script: &Script, script_dir: &Path) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for artifact in &script.artifacts {
        let source = &artifact.source;
        if source.value.is_empty() {
            continue; // Reported by the validator.
        }
        let path = script_dir.join(&source.value);
        match std::fs::metadata(&path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                out.push(Diagnostic::error(
                    source.span,
                    format!(
                        "artifact source `{}` does not exist (looked for {})",
                        source.value,
                        path.display()
                    ),
                ));
                continue;
            }
            Err(error) => {
                out.push(Diagnostic::error(
                    source.span,
                    format!("cannot read artifact source `{}`: {error}", source.value),
                ));
                continue;
            }
            Ok(metadata) if !metadata.is_file() => {
                out.push(Diagnostic::error(
                    source.span,
                    format!(
                        "artifact source `{}` is not a regular file ({})",
                        source.value,
                        path.display()
                    ),
                ));
                continue;
            }
            Ok(_) => {}
        }
        // A malformed digest is already reported by the validator.
        let Some(expected) = artifact
            .sha256
            .as_ref()
            .filter(|d| d.value.len() == 64 && d.value.chars().all(|c| c.is_ascii_hexdigit()))
        else {
            continue;
        };
        match sha256_of(&path) {
            Ok(actual) if actual == expected.value => {}
            Ok(actual) => out.push(
                Diagnostic::error(
                    expected.span,
                    format!(
                        "`sha256` does not match `{}`: the file's digest is {actual}",
                        source.value
                    ),
                )
                .with_help("rebuild the artifact or update `sha256`"),
            ),
            Err(error) => out.push(Diagnostic::error(
                source.span,
                format!("cannot read artifact source `{}`: {error}", source.value),
            )),
        }
    }
    out
}

/// Lowercase hex SHA-256 of a file, read in chunks (artifacts can be large).
fn sha256_of(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn stderr_color() -> bool {
    io::stderr().is_terminal()
}

fn invalid(args: &CheckArgs, diagnostics: &Diagnostics) -> u8 {
    let written = match args.output {
        OutputFormat::Text => {
            let errors = diagnostics.errors().count();
            let warnings = diagnostics.items.len() - errors;
            let mut summary = format!(
                "error: {} is not a valid upgrade script ({errors} error{}",
                diagnostics.name,
                if errors == 1 { "" } else { "s" }
            );
            if warnings > 0 {
                summary.push_str(&format!(
                    ", {warnings} warning{}",
                    if warnings == 1 { "" } else { "s" }
                ));
            }
            summary.push(')');
            write_stderr(&format!(
                "{}\n{summary}\n",
                diagnostics.render(stderr_color())
            ))
        }
        OutputFormat::Json => write_json(&InvalidReport {
            valid: false,
            diagnostics: diagnostics.to_records(),
        }),
    };
    if written == exit::OK {
        exit::INVALID
    } else {
        written
    }
}

fn unreadable(args: &CheckArgs, message: String) -> u8 {
    write_stderr(&format!("error: {message}\n"));
    if args.output == OutputFormat::Json {
        write_json(&UnreadableReport {
            valid: false,
            error: message,
        });
    }
    exit::ERROR
}

fn write_json(report: &impl Serialize) -> u8 {
    match serde_json::to_string_pretty(report) {
        Ok(json) => write_stdout(&format!("{json}\n")),
        Err(error) => {
            write_stderr(&format!(
                "error: cannot encode the report as JSON: {error}\n"
            ));
            exit::ERROR
        }
    }
}

/// Writes to stdout; a closed pipe (`hotroll check … | head`) is not a panic.
fn write_stdout(text: &str) -> u8 {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => exit::OK,
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => exit::OK,
        Err(_) => exit::ERROR,
    }
}

fn write_stderr(text: &str) -> u8 {
    let mut stderr = io::stderr().lock();
    match stderr.write_all(text.as_bytes()) {
        Ok(()) => exit::OK,
        Err(_) => exit::ERROR,
    }
}
