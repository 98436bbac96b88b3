//! `hotroll rollout ...`: start, inspect and steer rollouts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use hotroll_proto::v1 as pb;
use serde::Serialize;

use super::client::{CoordinatorArgs, connect, status_error, upload_artifacts};
use super::states::{is_final, node_state_name, rollout_state_name, wait_exit_code};
use super::{Output, exit};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RolloutCommand {
    /// Upload a script's artifacts and start a rollout; prints the rollout id.
    Start(StartArgs),
    /// Show where a rollout and each of its nodes stand.
    Status(IdArgs),
    /// Follow a rollout live until it ends.
    ///
    /// On a terminal: a view redrawn in place (app and versions, state, elapsed time, wave,
    /// failures, the barrier being waited at, one row per node with its wave, state, current
    /// instruction, time in it and last error, and a progress bar). Elsewhere (a pipe, a file):
    /// one plain line per event, no escape codes. `--output json`: one JSON object per event.
    /// A watcher that started late or lost its stream still sees every event once.
    ///
    /// Exits like `start --wait`: 0 succeeded; 3 aborted, rolled back, partially rolled back
    /// or halted; 1 otherwise.
    Watch(super::watch::WatchArgs),
    /// A rollout's history so far: time, node, instruction, outcome, duration, error.
    Events(super::watch::EventsArgs),
    /// Recent rollouts, newest first: state, app, versions, node count, duration.
    List(ListArgs),
    /// Abort a rollout; prints its state once the nodes have confirmed (up to 60 s).
    ///
    /// Before the point of no return every node discards what it staged; after it every node
    /// that committed rolls back and the others abort.
    Abort(IdArgs),
    /// Hold the rollout before its next wave starts; prints its state.
    ///
    /// The pause takes effect at the next wave boundary, never inside a barrier or between
    /// suspend and resume; until then the state stays `preparing` or `committing`.
    Pause(IdArgs),
    /// Continue a paused rollout, or cancel a pause that has not taken effect yet.
    Resume(IdArgs),
    /// Continue after the canary wave of a rollout with `pause_after_canary`.
    Promote(IdArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    /// The upgrade script (TOML).
    pub file: PathBuf,
    /// Node selector that replaces the script's `rollout.select`, e.g. `role=web,zone=a`.
    #[arg(long, value_parser = parse_selector)]
    pub select: Option<HashMap<String, String>>,
    /// Leave out known nodes that match but are not connected right now (named in the answer,
    /// `status` and the history). Without it they are targets: the rollout waits for them
    /// within the session grace, and one that never comes back fails prepare.
    #[arg(long)]
    pub skip_unreachable: bool,
    /// Block until the rollout reaches a final state; exit 0 if it succeeded, 3 if it ended
    /// aborted, rolled back, partially rolled back or halted, 1 on any other error.
    #[arg(long)]
    pub wait: bool,
    /// Follow the rollout like `hotroll rollout watch` until it ends (exit codes of --wait).
    #[arg(long, conflicts_with = "wait")]
    pub watch: bool,
    /// Run the whole prepare phase on every target (artifacts fetched and verified, release
    /// staged, checks, barriers before the point of no return), then abort everywhere: nothing
    /// a service sees changes. Waits for the end and says per node whether it would have
    /// committed and why not; exit 0 when every node would have, 3 otherwise.
    #[arg(long, conflicts_with_all = ["wait", "watch"])]
    pub dry_run: bool,
    /// With --wait or --watch: give up (exit 1) after this long.
    #[arg(long, default_value = "1h", value_parser = super::serve::parse_duration)]
    pub wait_timeout: Duration,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct IdArgs {
    /// Rollout id (as printed by `hotroll rollout start`).
    pub id: String,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// How many rollouts to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

fn parse_selector(text: &str) -> Result<HashMap<String, String>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(format!("`{pair}` has an empty key"));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub id: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// While the next wave waits for a window: when it opens (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for_window_until: Option<String>,
    /// While a fleet gate runs after a wave: its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_holding: Option<String>,
    pub app: String,
    pub from: String,
    pub to: String,
    pub failures: u32,
    pub max_failures: u32,
    pub wave: u32,
    pub waves: u32,
    pub error: Option<String>,
    /// Present while the rollout holds because the coordinator's store cannot record its step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_on_store: Option<HeldJson>,
    pub nodes: Vec<NodeStatusJson>,
    /// Nodes that matched the selection but were left out (`--skip-unreachable`), and why.
    pub left_out: Vec<LeftOutJson>,
}

#[derive(Debug, Serialize)]
pub struct LeftOutJson {
    pub node: String,
    pub reason: String,
}

impl From<&pb::LeftOutNode> for LeftOutJson {
    fn from(left: &pb::LeftOutNode) -> Self {
        Self {
            node: left.node.clone(),
            reason: left.reason.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HeldJson {
    pub error: String,
    /// When the hold began (UTC, RFC 3339).
    pub since: String,
}

#[derive(Debug, Serialize)]
pub struct NodeStatusJson {
    pub name: String,
    pub wave: u32,
    pub state: &'static str,
    pub step: Option<i32>,
    pub instruction: Option<String>,
    pub error: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn status_json(status: &pb::RolloutStatus) -> StatusJson {
    StatusJson {
        id: status.id.clone(),
        state: rollout_state_name(status.state),
        dry_run: status.dry_run,
        waiting_for_window_until: (status.window_opens_unix_ms > 0)
            .then(|| hotroll_script::format_utc(status.window_opens_unix_ms)),
        gate_holding: (!status.gate_holding.is_empty()).then(|| status.gate_holding.clone()),
        app: status.app.clone(),
        from: status.from.clone(),
        to: status.to.clone(),
        failures: status.failures,
        max_failures: status.max_failures,
        wave: status.current_wave,
        waves: status.waves,
        error: non_empty(&status.error),
        held_on_store: non_empty(&status.held_on_store).map(|error| HeldJson {
            error,
            since: super::watch::text::format_unix_ms(status.held_since_unix_ms),
        }),
        nodes: status
            .nodes
            .iter()
            .map(|n| NodeStatusJson {
                name: n.name.clone(),
                wave: n.wave,
                state: node_state_name(n.state),
                step: (n.step >= 0).then_some(n.step),
                instruction: non_empty(&n.instruction),
                error: non_empty(&n.error),
            })
            .collect(),
        left_out: status.left_out.iter().map(LeftOutJson::from).collect(),
    }
}

pub fn print_status(status: &pb::RolloutStatus, output: Output) -> anyhow::Result<()> {
    let json = status_json(status);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Text => {
            println!(
                "rollout {}  {} {} -> {}  state: {}  wave {}/{}  failures {}/{}",
                json.id,
                json.app,
                json.from,
                json.to,
                json.state,
                json.wave,
                json.waves,
                json.failures,
                json.max_failures
            );
            if status.dry_run {
                println!("dry run: prepare everywhere, then abort; nothing commits");
            }
            if status.window_opens_unix_ms > 0 {
                println!(
                    "waiting for window: the next wave starts at {}",
                    hotroll_script::format_utc(status.window_opens_unix_ms)
                );
            }
            if !status.gate_holding.is_empty() {
                println!(
                    "gate {} holding: wave {} waits for its metric gate",
                    status.gate_holding, status.current_wave
                );
            }
            if let Some(b) = &status.barrier {
                println!(
                    "waiting at barrier `{}`: {}/{} arrived",
                    b.id, b.arrived, b.expected
                );
            }
            if let Some(e) = &json.error {
                println!("error: {e}");
            }
            if let Some(held) = &json.held_on_store {
                println!("held: {} (since {})", held.error, held.since);
            }
            for left in &json.left_out {
                println!("left out {}: {}", left.node, left.reason);
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["NODE", "WAVE", "STATE", "STEP", "ERROR"]);
            for node in &json.nodes {
                let step = match (node.step, &node.instruction) {
                    (Some(i), Some(name)) => format!(
                        "{}/{} {name}",
                        i + 1,
                        status.nodes.first().map_or(0, |n| n.steps_total)
                    ),
                    _ => "-".to_string(),
                };
                table.add_row([
                    node.name.clone(),
                    node.wave.to_string(),
                    node.state.to_string(),
                    step,
                    node.error.clone().unwrap_or_default(),
                ]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

pub async fn run(command: RolloutCommand) -> anyhow::Result<u8> {
    match command {
        RolloutCommand::Start(args) => start(args).await,
        RolloutCommand::Status(args) => {
            let mut client = connect(&args.coordinator).await?;
            let status = client
                .get_rollout(pb::GetRolloutRequest {
                    rollout_id: args.id,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_status(&status, args.output)?;
            Ok(exit::OK)
        }
        RolloutCommand::Watch(args) => super::watch::run_watch(args).await,
        RolloutCommand::Events(args) => super::watch::run_events(args).await,
        RolloutCommand::List(args) => list(args).await,
        RolloutCommand::Abort(args) => control(args, "abort").await,
        RolloutCommand::Pause(args) => control(args, "pause").await,
        RolloutCommand::Resume(args) => control(args, "resume").await,
        RolloutCommand::Promote(args) => control(args, "promote").await,
    }
}

/// How long `abort` waits for the nodes to confirm before it answers with the state so far.
const ABORT_WAIT: Duration = Duration::from_secs(60);

async fn control(args: IdArgs, action: &str) -> anyhow::Result<u8> {
    let mut client = connect(&args.coordinator).await?;
    let request = pb::RolloutControlRequest {
        rollout_id: args.id.clone(),
        reason: String::new(),
    };
    let result = match action {
        "abort" => client.abort_rollout(request).await,
        "pause" => client.pause_rollout(request).await,
        "resume" => client.resume_rollout(request).await,
        _ => client.promote_rollout(request).await,
    };
    // The coordinator's refusals say what and why ("cannot pause rollout in state paused: the
    // rollout is already paused").
    let mut status = result.map_err(status_error)?.into_inner();
    if action == "abort" && !is_final(status.state) {
        // An abort is done when the fleet says so: wait (bounded) for the nodes to confirm
        // that they discarded or rolled back, so the answer is the rollout's final state.
        if let Ok(done) = wait_final(&mut client, &args.id, ABORT_WAIT).await {
            status = done;
        }
    }
    match args.output {
        Output::Json => print_status(&status, Output::Json)?,
        Output::Text => {
            println!(
                "rollout {}: {}",
                status.id,
                rollout_state_name(status.state)
            );
            let state = rollout_state_name(status.state);
            if action == "pause" && state != "paused" {
                println!(
                    "pause requested: the rollout holds before its next wave starts \
                     (`hotroll rollout resume {}` cancels it)",
                    status.id
                );
            } else if action == "abort" && !is_final(status.state) {
                println!(
                    "every node that committed rolls back, the others abort; \
                     `hotroll rollout watch {}` follows it",
                    status.id
                );
            }
        }
    }
    Ok(exit::OK)
}

async fn list(args: ListArgs) -> anyhow::Result<u8> {
    let mut client = connect(&args.coordinator).await?;
    let rollouts = client
        .list_rollouts(pb::ListRolloutsRequest { limit: args.limit })
        .await
        .map_err(status_error)?
        .into_inner()
        .rollouts;
    #[derive(Serialize)]
    struct Row {
        id: String,
        state: &'static str,
        app: String,
        from: String,
        to: String,
        nodes: u32,
        created_unix_ms: u64,
        duration_ms: Option<u64>,
    }
    let rows: Vec<Row> = rollouts
        .iter()
        .map(|r| Row {
            id: r.id.clone(),
            state: rollout_state_name(r.state),
            app: r.app.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            nodes: r.nodes,
            created_unix_ms: r.created_unix_ms,
            duration_ms: (r.finished_unix_ms > 0)
                .then(|| r.finished_unix_ms.saturating_sub(r.created_unix_ms)),
        })
        .collect();
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            use super::watch::text::{format_duration_ms, format_unix_ms};
            let now = hotroll_coordinator::rollouts::now_ms();
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header([
                "ID", "CREATED", "STATE", "APP", "FROM", "TO", "NODES", "DURATION",
            ]);
            for r in rows {
                let duration = match r.duration_ms {
                    Some(ms) => format_duration_ms(ms),
                    None => format!(
                        "{} so far",
                        format_duration_ms(now.saturating_sub(r.created_unix_ms))
                    ),
                };
                table.add_row([
                    r.id,
                    format_unix_ms(r.created_unix_ms),
                    r.state.to_string(),
                    r.app,
                    r.from,
                    r.to,
                    r.nodes.to_string(),
                    duration,
                ]);
            }
            println!("{table}");
        }
    }
    Ok(exit::OK)
}

async fn start(args: StartArgs) -> anyhow::Result<u8> {
    let source = match std::fs::read_to_string(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return Ok(exit::ERROR);
        }
    };
    let name = args.file.display().to_string();
    let parsed = match hotroll_script::parse(&name, &source) {
        Ok(p) => p,
        Err(diagnostics) => {
            use std::io::IsTerminal;
            eprintln!("{}", diagnostics.render(std::io::stderr().is_terminal()));
            return Ok(exit::INVALID);
        }
    };
    let script_dir = args
        .file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let mut client = connect(&args.coordinator).await?;
    let artifacts = upload_artifacts(&mut client, &parsed.script, &script_dir).await?;
    let started = client
        .start_rollout(pb::StartRolloutRequest {
            script_name: args
                .file
                .file_name()
                .map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned()),
            script_source: source,
            select: args.select.clone().unwrap_or_default(),
            artifacts,
            skip_unreachable: args.skip_unreachable,
            dry_run: args.dry_run,
        })
        .await
        .map_err(status_error)
        .context("the coordinator refused the rollout")?
        .into_inner();
    if args.dry_run {
        if args.output == Output::Text {
            eprint!("dry {}", started_text(&started));
        }
        return dry_run_answer(&mut client, &args, &started.rollout_id).await;
    }
    if args.watch {
        if args.output == Output::Text {
            eprint!("{}", started_text(&started));
        }
        return super::watch::watch(
            &mut client,
            Some(&args.coordinator),
            &started.rollout_id,
            super::watch::Mode::detect(args.output),
            0,
            Some(args.wait_timeout),
        )
        .await;
    }
    if !args.wait {
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::json!({
                    "id": started.rollout_id,
                    "nodes": started.nodes,
                    "awaited": started.awaited,
                    "left_out": started
                        .left_out
                        .iter()
                        .map(LeftOutJson::from)
                        .collect::<Vec<_>>(),
                })
            ),
            Output::Text => {
                // The id alone on stdout (scripts capture it); what was left out on stderr.
                println!("{}", started.rollout_id);
                if !started.left_out.is_empty() || !started.awaited.is_empty() {
                    eprint!("{}", started_text(&started));
                }
            }
        }
        return Ok(exit::OK);
    }
    if args.output == Output::Text {
        eprint!("{}", started_text(&started));
    }
    let status = wait_final(&mut client, &started.rollout_id, args.wait_timeout).await?;
    match args.output {
        Output::Text => {
            println!("{}", started.rollout_id);
            print_status(&status, Output::Text)?;
        }
        Output::Json => print_status(&status, Output::Json)?,
    }
    Ok(wait_exit_code(status.state))
}

/// The end of a dry run: wait for it, then one verdict per node from its history. Exit 0 when
/// every node would have committed, 3 otherwise.
async fn dry_run_answer(
    client: &mut super::client::Client,
    args: &StartArgs,
    id: &str,
) -> anyhow::Result<u8> {
    let status = wait_final(client, id, args.wait_timeout).await?;
    let verdicts: Vec<(String, Option<String>)> =
        super::watch::history(client.clone(), Some(&args.coordinator), id)
            .await?
            .into_iter()
            .filter(|e| e.kind == "dry_run_verdict")
            .map(|e| {
                let why = (!e.error.is_empty()).then_some(e.error);
                (e.node, why)
            })
            .collect();
    if verdicts.len() != status.nodes.len() {
        anyhow::bail!(
            "dry run {id} ended {} without a verdict for every node ({} of {})",
            rollout_state_name(status.state),
            verdicts.len(),
            status.nodes.len()
        );
    }
    let all = verdicts.iter().all(|(_, why)| why.is_none());
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "id": id,
                "dry_run": true,
                "would_commit": all,
                "nodes": verdicts
                    .iter()
                    .map(|(node, why)| serde_json::json!({
                        "node": node,
                        "would_commit": why.is_none(),
                        "reason": why,
                    }))
                    .collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            println!("{id}");
            for (node, why) in &verdicts {
                match why {
                    None => println!("{node}: would commit"),
                    Some(why) => println!("{node}: would not commit: {why}"),
                }
            }
            println!(
                "dry run {}: nothing was committed",
                if all { "passed" } else { "failed" }
            );
        }
    }
    Ok(if all { exit::OK } else { exit::NOT_SUCCEEDED })
}

/// Wait until the rollout reaches a final state or `timeout` passes (follows its event
/// stream; polls if the stream breaks).
pub async fn wait_final(
    client: &mut super::client::Client,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<pb::RolloutStatus> {
    super::watch::wait_final(client, id, timeout).await
}

/// `rollout ID started on N node(s): …`, then a line per node waited for or left out.
fn started_text(started: &pb::StartRolloutResponse) -> String {
    let mut text = format!(
        "rollout {} started on {} node(s): {}\n",
        started.rollout_id,
        started.nodes.len(),
        started.nodes.join(", ")
    );
    for node in &started.awaited {
        text.push_str(&format!(
            "  waiting for {node}: known but not connected (it is a target; use --skip-unreachable to leave such nodes out)\n"
        ));
    }
    for left in &started.left_out {
        text.push_str(&format!("  left out {}: {}\n", left.node, left.reason));
    }
    text
}
