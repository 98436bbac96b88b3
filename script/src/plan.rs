//! The compiled plan `hotroll check` prints: what every node will do, phase by phase, where the
//! point of no return sits, how a failed node rolls back, and the waves for a fleet size.
//!
//! Step numbers are 1-based: step `n` is `up[n - 1]` (or `down[n - 1]` in the rollback).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::count::NodeCount;
use crate::duration::format_duration;
use crate::model::{
    ChangeMode, Instruction, Located, OnFailure, PonrPosition, Runtime, Script, Step,
};
use crate::waves::{NO_LABELS, WaveTarget, plan_waves};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub app: String,
    pub from: String,
    pub to: String,
    pub runtime: Runtime,
    pub description: Option<String>,
    pub artifacts: Vec<PlannedArtifact>,
    /// Steps before the point of no return: run on every target node at once.
    pub prepare: Vec<PlannedStep>,
    pub point_of_no_return: PlannedPonr,
    /// Steps after the point of no return: run wave by wave.
    pub commit: Vec<PlannedStep>,
    pub rollback: PlannedRollback,
    pub policy: PlannedPolicy,
    /// The fleet size the waves were computed for.
    pub nodes: usize,
    pub waves: Vec<PlannedWave>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedArtifact {
    pub name: String,
    pub source: String,
    pub sha256: Option<String>,
    pub unpack: bool,
    /// Octal, e.g. `"0755"`; `None` = the default mode.
    pub mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    /// 1-based position in its list.
    pub step: usize,
    pub op: &'static str,
    pub description: String,
    /// Deadline of the step; `None` where the step waits for the coordinator (the point of no
    /// return) or has no deadline of its own (the default rollback).
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PlannedPonr {
    /// `step` (1-based) is the `point_of_no_return` instruction.
    Explicit { step: usize },
    /// No explicit instruction: the node reports prepared after step `after_step` (0 = before
    /// the first step).
    Implicit { after_step: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackKind {
    /// The script's own `down` list.
    Explicit,
    /// Re-activate the permanent release and restart the app on it (docs/design.md §3).
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedRollback {
    pub kind: RollbackKind,
    pub steps: Vec<PlannedStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedPolicy {
    pub select: BTreeMap<String, String>,
    pub canary: NodeCount,
    pub max_in_flight: NodeCount,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves_by: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// When a new wave may start (empty = any time).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
    /// With windows: how far ahead the next one may open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_timeout_ms: Option<u64>,
    /// Fleet gates run by the coordinator after each wave, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<PlannedGate>,
    pub max_failures: u32,
    pub on_failure: OnFailure,
    pub barrier_timeout_ms: u64,
    pub step_timeout_ms: u64,
    pub pause_after_canary: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skip_unreachable: bool,
}

/// A fleet gate as the plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedGate {
    pub name: String,
    pub query: String,
    pub pass_if: String,
    pub hold_ms: u64,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedWave {
    /// 1-based.
    pub wave: usize,
    pub canary: bool,
    pub nodes: usize,
    /// The `waves_by` group the wave belongs to (`zone=a`, `zone unset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Its nodes, when the plan was made for named nodes (a nodes file, the live fleet).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Compile a (valid) script into the plan for a fleet of `nodes` target nodes, none of them
/// labelled.
pub fn compile(script: &Script, nodes: usize) -> Plan {
    let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    let targets: Vec<WaveTarget<'_>> = names
        .iter()
        .map(|name| WaveTarget {
            name,
            labels: &NO_LABELS,
        })
        .collect();
    compile_waves(script, &targets, false)
}

/// Compile a (valid) script into the plan for these target nodes (names and labels, from a
/// nodes file or the live fleet): the waves name their nodes.
pub fn compile_for(script: &Script, targets: &[WaveTarget<'_>]) -> Plan {
    compile_waves(script, targets, true)
}

fn compile_waves(script: &Script, targets: &[WaveTarget<'_>], named: bool) -> Plan {
    let ponr = script.ponr();
    let first_commit = ponr.first_commit_step();
    let planned = |index: usize, step: &Step, list: List| PlannedStep {
        step: index + 1,
        op: step.instruction.name(),
        description: describe(script, step, list, index < first_commit),
        timeout_ms: match step.instruction {
            Instruction::PointOfNoReturn => None,
            _ => Some(millis(script.step_deadline(step))),
        },
    };
    let mut prepare = Vec::new();
    let mut commit = Vec::new();
    for (index, step) in script.up.iter().enumerate() {
        match ponr {
            PonrPosition::Explicit(at) if index == at => {}
            _ if index < first_commit => prepare.push(planned(index, step, List::Up)),
            _ => commit.push(planned(index, step, List::Up)),
        }
    }
    let point_of_no_return = match ponr {
        PonrPosition::Explicit(at) => PlannedPonr::Explicit { step: at + 1 },
        PonrPosition::Implicit(at) => PlannedPonr::Implicit { after_step: at },
    };
    let rollback = match &script.down {
        Some(down) => PlannedRollback {
            kind: RollbackKind::Explicit,
            steps: down
                .iter()
                .enumerate()
                .map(|(index, step)| planned(index, step, List::Down))
                .collect(),
        },
        None => PlannedRollback {
            kind: RollbackKind::Default,
            steps: default_rollback(script),
        },
    };
    let policy = &script.rollout;
    let waves = plan_waves(targets, policy);
    Plan {
        app: script.app.value.clone(),
        from: script.from.value.clone(),
        to: script.to.value.clone(),
        runtime: script.runtime,
        description: script.description.clone(),
        artifacts: script
            .artifacts
            .iter()
            .map(|a| PlannedArtifact {
                name: a.name.value.clone(),
                source: a.source.value.clone(),
                sha256: a.sha256.as_ref().map(|d| d.value.clone()),
                unpack: a.unpack,
                mode: a.mode.map(|m| format!("{m:04o}")),
            })
            .collect(),
        prepare,
        point_of_no_return,
        commit,
        rollback,
        policy: PlannedPolicy {
            select: policy.select.clone(),
            canary: policy.canary,
            max_in_flight: policy.max_in_flight,
            waves_by: policy.waves_by.clone(),
            order: policy.order.clone(),
            windows: policy.windows.iter().map(|w| w.text.clone()).collect(),
            window_timeout_ms: (!policy.windows.is_empty()).then(|| millis(policy.window_timeout)),
            gates: policy
                .gates
                .iter()
                .map(|g| PlannedGate {
                    name: g.name.value.clone(),
                    query: g.gate.query.value.clone(),
                    pass_if: g.gate.pass_if.to_string(),
                    hold_ms: millis(g.gate.hold),
                    interval_ms: millis(g.gate.interval),
                    timeout_ms: millis(g.gate.timeout),
                })
                .collect(),
            max_failures: policy.max_failures,
            on_failure: policy.on_failure,
            barrier_timeout_ms: millis(policy.barrier_timeout),
            step_timeout_ms: millis(policy.step_timeout),
            pause_after_canary: policy.pause_after_canary,
            skip_unreachable: policy.skip_unreachable,
        },
        nodes: waves.iter().map(|w| w.nodes.len()).sum(),
        waves: waves
            .iter()
            .enumerate()
            .map(|(index, wave)| PlannedWave {
                wave: index + 1,
                canary: wave.canary,
                nodes: wave.nodes.len(),
                group: wave.group_label(policy),
                names: if named {
                    wave.nodes.clone()
                } else {
                    Vec::new()
                },
            })
            .collect(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum List {
    Up,
    Down,
}

fn default_rollback(script: &Script) -> Vec<PlannedStep> {
    let app = &script.app.value;
    let from = &script.from.value;
    let descriptions = match script.runtime {
        Runtime::Process => [
            format!("re-activate the permanent release {from} of {app} (swap `current` back)"),
            format!("restart the services of {app} on it"),
        ],
        Runtime::Beam => [
            format!("re-activate the permanent release {from} of {app}"),
            "restart the node on it, as OTP does from the old release".to_string(),
        ],
        Runtime::OtpRelease => [
            format!(
                "back to the permanent release {from}: the relup's downgrade \
                 (release_handler:install_release), keeping in-memory state"
            ),
            "where the relup has none or it fails: restart the node from its permanent \
             release, as OTP does (in-memory state is lost)"
                .to_string(),
        ],
    };
    let ops = ["reactivate_permanent", "restart_services"];
    ops.into_iter()
        .zip(descriptions)
        .enumerate()
        .map(|(index, (op, description))| PlannedStep {
            step: index + 1,
            op,
            description,
            timeout_ms: None,
        })
        .collect()
}

/// "`a`", "`a`, `b`".
fn quoted(names: &[Located<String>]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", n.value))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(word: &str, count: usize) -> String {
    match (word, count) {
        (_, 1) => word.to_string(),
        ("child", _) => "children".to_string(),
        _ => format!("{word}s"),
    }
}

/// `word` + its names, e.g. "services `a`, `b`".
fn named(word: &str, names: &[Located<String>]) -> String {
    format!("{} {}", plural(word, names.len()), quoted(names))
}

fn with_args(args: &[String]) -> String {
    if args.is_empty() {
        String::new()
    } else {
        let listed = args
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(" with arguments [{listed}]")
    }
}

fn with_extra(extra: &Option<String>) -> String {
    extra
        .as_ref()
        .map(|e| format!(", extra {e:?}"))
        .unwrap_or_default()
}

/// One line saying what the step does on a node.
fn describe(script: &Script, step: &Step, list: List, before_ponr: bool) -> String {
    let app = &script.app.value;
    let to = &script.to.value;
    let beam = script.runtime == Runtime::Beam;
    match &step.instruction {
        Instruction::LoadObjectCode { artifacts } if beam => {
            format!("fetch and keep ready {}", quoted(artifacts))
        }
        Instruction::LoadObjectCode { artifacts } => format!(
            "stage {} into release {to} (fetch, verify, not activated)",
            quoted(artifacts)
        ),
        Instruction::Check { modules, .. } if beam => format!(
            "check that old code of {} can be purged",
            named("module", modules)
        ),
        Instruction::Check { hook, args, .. } => match hook {
            Some(hook) => format!("run check hook `{}`{}", hook.value, with_args(args)),
            None => "run a check".to_string(),
        },
        Instruction::SyncNodes { id, nodes, .. } => {
            let who = if !nodes.is_empty() {
                let listed = nodes.join(", ");
                format!("{} {listed}", plural("node", nodes.len()))
            } else if before_ponr && list == List::Up {
                "every target node".to_string()
            } else {
                "every node of the wave".to_string()
            };
            format!("barrier `{}`: wait for {who}", id.value)
        }
        Instruction::PointOfNoReturn => {
            "point of no return: report prepared, wait for the coordinator's commit".to_string()
        }
        Instruction::Suspend { targets, .. } if beam => format!(
            "suspend the processes running {} (sys:suspend)",
            named("module", targets)
        ),
        Instruction::Suspend { targets, .. } => format!("suspend {}", named("service", targets)),
        Instruction::Load { targets } if beam => {
            format!("load {} (code:load_binary)", named("module", targets))
        }
        Instruction::Load { .. } if list == List::Down => format!(
            "activate the permanent release {} of {app} (swap `current`)",
            script.from.value
        ),
        Instruction::Load { .. } => format!("activate release {to} of {app} (swap `current`)"),
        Instruction::CodeChange {
            targets,
            extra,
            mode,
            ..
        } if beam => {
            let mode = match mode {
                ChangeMode::Up => "up",
                ChangeMode::Down => "down",
            };
            format!(
                "sys:change_code on {} ({mode}{})",
                named("module", targets),
                with_extra(extra)
            )
        }
        Instruction::CodeChange { targets, extra, .. } => {
            let extra = extra
                .as_ref()
                .map(|e| format!(" (extra {e:?})"))
                .unwrap_or_default();
            format!(
                "hand {} over to the new release keeping state{extra}",
                named("service", targets)
            )
        }
        Instruction::Resume { targets } if beam => format!(
            "resume the processes running {} (sys:resume)",
            named("module", targets)
        ),
        Instruction::Resume { targets } => format!("resume {}", named("service", targets)),
        Instruction::Stop { targets } if beam => format!(
            "stop supervisor {} (supervisor:terminate_child)",
            named("child", targets)
        ),
        Instruction::Stop { targets } => format!("stop {}", named("service", targets)),
        Instruction::Start { targets } if beam => format!(
            "start supervisor {} (supervisor:restart_child)",
            named("child", targets)
        ),
        Instruction::Start { targets } => format!("start {}", named("service", targets)),
        Instruction::Restart { targets } if beam => {
            format!("restart supervisor {}", named("child", targets))
        }
        Instruction::Restart { targets } => format!("restart {}", named("service", targets)),
        Instruction::Apply { hook, args, .. } if beam => {
            format!("call `{}`{}", hook.value, with_args(args))
        }
        Instruction::Apply { hook, args, .. } => {
            format!("run hook `{}`{}", hook.value, with_args(args))
        }
        Instruction::Health { service, .. } if beam => {
            format!("wait until `{}` is alive", service.value)
        }
        Instruction::Health { service, .. } => {
            format!("wait until service `{}` is healthy", service.value)
        }
        Instruction::Purge { targets, brutal } if beam => {
            let what = if targets.is_empty() {
                "every module this script loads".to_string()
            } else {
                named("module", targets)
            };
            if *brutal {
                format!("purge old code of {what} (brutal, deferred to make permanent)")
            } else {
                format!("soft-purge old code of {what}")
            }
        }
        Instruction::Purge { targets, .. } if targets.is_empty() => format!(
            "delete old releases of {app} (keeps {} and {to})",
            script.from.value
        ),
        Instruction::Purge { targets, .. } => {
            format!("delete {} of {app}", named("release", targets))
        }
        Instruction::UnpackRelease { artifact, .. } => format!(
            "put `{}` under the release's releases/, release_handler:unpack_release, \
             check_install_release with purge (the node's vote)",
            artifact.value
        ),
        Instruction::InstallRelease { .. } => {
            format!("release_handler:install_release {to}: the relup runs")
        }
        Instruction::Gate { gate } => format!(
            "metric gate on the node's Prometheus ($node = the node): {}",
            gate.describe()
        ),
        Instruction::RestartNewEmulator if beam => format!("restart the node on release {to}"),
        Instruction::RestartNewEmulator => {
            format!("restart every service of {app} on release {to}")
        }
    }
}

fn write_steps(f: &mut fmt::Formatter<'_>, steps: &[PlannedStep]) -> fmt::Result {
    if steps.is_empty() {
        return writeln!(f, "  (nothing)");
    }
    for step in steps {
        write!(f, "  {:>2}. {}", step.step, step.description)?;
        if let Some(ms) = step.timeout_ms {
            write!(
                f,
                " [timeout {}]",
                format_duration(Duration::from_millis(ms))
            )?;
        }
        writeln!(f)?;
    }
    Ok(())
}

fn count(n: usize, word: &str) -> String {
    format!("{n} {}", plural(word, n))
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {} -> {} ({} runtime)",
            self.app,
            self.from,
            self.to,
            self.runtime.as_str()
        )?;
        if let Some(description) = &self.description {
            writeln!(f, "{description}")?;
        }

        writeln!(f)?;
        writeln!(f, "artifacts:")?;
        if self.artifacts.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for artifact in &self.artifacts {
            write!(f, "  {} <- {}", artifact.name, artifact.source)?;
            if artifact.unpack {
                write!(f, ", unpacked")?;
            }
            if let Some(mode) = &artifact.mode {
                write!(f, ", mode {mode}")?;
            }
            if let Some(digest) = &artifact.sha256 {
                write!(f, ", sha256 {digest}")?;
            }
            writeln!(f)?;
        }

        writeln!(f)?;
        writeln!(
            f,
            "prepare (every target node at once; no running service is touched):"
        )?;
        write_steps(f, &self.prepare)?;
        match self.point_of_no_return {
            PlannedPonr::Explicit { step } => writeln!(
                f,
                "point of no return: step {step}; each node reports prepared and waits for the \
                 coordinator's commit"
            )?,
            PlannedPonr::Implicit { after_step: 0 } => writeln!(
                f,
                "point of no return: implicit, before step 1; each node reports prepared and \
                 waits for the coordinator's commit"
            )?,
            PlannedPonr::Implicit { after_step } => writeln!(
                f,
                "point of no return: implicit, after step {after_step}; each node reports \
                 prepared and waits for the coordinator's commit"
            )?,
        }
        writeln!(f, "commit (wave by wave):")?;
        write_steps(f, &self.commit)?;

        writeln!(f)?;
        let kind = match self.rollback.kind {
            RollbackKind::Explicit => "the script's `down` list",
            RollbackKind::Default => "default",
        };
        writeln!(
            f,
            "rollback ({kind}) of a node that fails after the point of no return:"
        )?;
        write_steps(f, &self.rollback.steps)?;

        writeln!(f)?;
        let policy = &self.policy;
        writeln!(f, "policy:")?;
        if policy.select.is_empty() {
            writeln!(f, "  select: every node")?;
        } else {
            let labels = policy
                .select
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(f, "  select: {labels}")?;
        }
        let budget = match policy.max_failures {
            0 => "no failure tolerated".to_string(),
            n => format!(
                "at most {} tolerated over the rollout",
                count(n as usize, "failure")
            ),
        };
        writeln!(f, "  on failure: {}, {budget}", policy.on_failure.as_str())?;
        writeln!(
            f,
            "  barrier timeout {}, step timeout {}",
            format_duration(Duration::from_millis(policy.barrier_timeout_ms)),
            format_duration(Duration::from_millis(policy.step_timeout_ms))
        )?;
        if let Some(key) = &policy.waves_by {
            let order = if policy.order.is_empty() {
                "sorted".to_string()
            } else {
                format!("{}, then the others sorted", policy.order.join(", "))
            };
            writeln!(f, "  waves by {key}: one value at a time ({order})")?;
        }
        if !policy.windows.is_empty() {
            writeln!(
                f,
                "  waves start only inside a window: {} (a wave waiting longer than {} ends the rollout)",
                policy.windows.join("; "),
                format_duration(Duration::from_millis(
                    policy.window_timeout_ms.unwrap_or_default()
                ))
            )?;
        }
        for gate in &policy.gates {
            writeln!(
                f,
                "  after each wave, gate `{}`: `{}` {} for {} (every {}, within {}); a failed gate rolls the wave back",
                gate.name,
                gate.query,
                gate.pass_if,
                format_duration(Duration::from_millis(gate.hold_ms)),
                format_duration(Duration::from_millis(gate.interval_ms)),
                format_duration(Duration::from_millis(gate.timeout_ms))
            )?;
        }
        if policy.pause_after_canary {
            writeln!(f, "  pause after the canary wave until promoted")?;
        }
        if policy.skip_unreachable {
            writeln!(
                f,
                "  nodes not connected at the start are left out (skip_unreachable)"
            )?;
        }

        writeln!(f)?;
        writeln!(f, "waves for {}:", count(self.nodes, "node"))?;
        if self.waves.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for wave in &self.waves {
            let canary = if wave.canary { " (canary)" } else { "" };
            let group = wave
                .group
                .as_ref()
                .map(|g| format!(" ({g})"))
                .unwrap_or_default();
            let names = if wave.names.is_empty() {
                String::new()
            } else {
                format!(": {}", wave.names.join(", "))
            };
            writeln!(
                f,
                "  wave {}{canary}{group}: {}{names}",
                wave.wave,
                count(wave.nodes, "node")
            )?;
        }
        Ok(())
    }
}
