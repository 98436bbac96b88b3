//! The typed upgrade script: what the parser produces and everything downstream (plan, engine,
//! agent executor) consumes. Every node of the tree keeps the byte span it came from so later
//! checks (the agent's re-validation against its own config) can point at the source.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::count::NodeCount;
use crate::gates::Comparison;
use crate::windows::Window;

/// Byte range `[start, end)` in the script source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Located<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Located<T> {
    pub fn new(value: T, span: Span) -> Self {
        Self { value, span }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// Ordinary services supervised by the agent; a script's runtime when it names none.
    #[default]
    Process,
    Beam,
    /// An OTP release (rebar3/relx tarball) upgraded by the node's own release handler.
    OtpRelease,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Beam => "beam",
            Runtime::OtpRelease => "otp_release",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Script {
    pub app: Located<String>,
    pub runtime: Runtime,
    pub from: Located<String>,
    pub to: Located<String>,
    pub description: Option<String>,
    pub artifacts: Vec<Artifact>,
    pub rollout: RolloutPolicy,
    pub up: Vec<Step>,
    /// Explicit rollback instructions; `None` means the default rollback (docs/design.md §3).
    pub down: Option<Vec<Step>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// Path inside the release directory (process) or module file name (beam).
    pub name: Located<String>,
    /// File to upload, relative to the script file.
    pub source: Located<String>,
    /// Expected digest as 64 lowercase hex characters, when the script gives one.
    pub sha256: Option<Located<String>>,
    pub unpack: bool,
    /// File mode for the materialised file; `None` = 0o644 (0o755 under `bin/`).
    pub mode: Option<u32>,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    RollbackNode,
    RollbackAll,
    Halt,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::RollbackNode => "rollback_node",
            OnFailure::RollbackAll => "rollback_all",
            OnFailure::Halt => "halt",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutPolicy {
    /// Node labels that must all match; empty = every node.
    pub select: BTreeMap<String, String>,
    /// Nodes in the first wave (none = no canary wave); a percentage is of every target.
    pub canary: NodeCount,
    /// Nodes per later wave (none = all remaining at once); a percentage is of the group
    /// (`waves_by`) or of every target (see [`crate::waves`]).
    pub max_in_flight: NodeCount,
    /// The node label whose values are taken one at a time after the canary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves_by: Option<String>,
    /// The order of the `waves_by` values (the others follow, sorted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// When a new wave may start (none = any time); see [`crate::windows`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// How far ahead the next window may open: a wave that would wait longer ends the rollout
    /// (aborted before the point of no return, halted after it).
    #[serde(with = "duration_ms")]
    pub window_timeout: Duration,
    /// Fleet gates (`[[rollout.gates]]`), run in order by the coordinator after each wave.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<FleetGate>,
    /// Failures tolerated over the whole rollout.
    pub max_failures: u32,
    pub on_failure: OnFailure,
    /// Default deadline of every `sync_nodes`.
    #[serde(with = "duration_ms")]
    pub barrier_timeout: Duration,
    /// Default deadline of every other instruction.
    #[serde(with = "duration_ms")]
    pub step_timeout: Duration,
    pub pause_after_canary: bool,
    /// Leave out known nodes that are not connected when the rollout starts (named in its
    /// status and history) instead of waiting for them; `--skip-unreachable` on the CLI.
    #[serde(default)]
    pub skip_unreachable: bool,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            select: BTreeMap::new(),
            canary: NodeCount::None,
            max_in_flight: NodeCount::None,
            waves_by: None,
            order: Vec::new(),
            windows: Vec::new(),
            window_timeout: Duration::from_secs(24 * 3600),
            gates: Vec::new(),
            max_failures: 0,
            on_failure: OnFailure::RollbackNode,
            barrier_timeout: Duration::from_secs(30),
            step_timeout: Duration::from_secs(60),
            pause_after_canary: false,
            skip_unreachable: false,
        }
    }
}

/// One instruction of `up` or `down`, with the span of the whole array element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub instruction: Instruction,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeMode {
    Up,
    Down,
}

/// The instruction set of docs/design.md §3. Targets are service names (process runtime) or module names
/// (beam runtime); the runtime decides how to read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Instruction {
    /// Stage artifacts (by artifact name) without activating them.
    LoadObjectCode {
        artifacts: Vec<Located<String>>,
    },
    /// A check that must not change the running system: a declared hook (process) or an
    /// old-code check of modules (beam).
    Check {
        hook: Option<Located<String>>,
        args: Vec<String>,
        modules: Vec<Located<String>>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    /// Deadline barrier. `nodes` empty = every participant (the wave, after the point of no return).
    SyncNodes {
        id: Located<String>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
        nodes: Vec<String>,
    },
    PointOfNoReturn,
    Suspend {
        targets: Vec<Located<String>>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    /// Activate the new release of an app (process) or load modules (beam).
    Load {
        targets: Vec<Located<String>>,
    },
    CodeChange {
        targets: Vec<Located<String>>,
        extra: Option<String>,
        mode: ChangeMode,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    Resume {
        targets: Vec<Located<String>>,
    },
    Stop {
        targets: Vec<Located<String>>,
    },
    Start {
        targets: Vec<Located<String>>,
    },
    Restart {
        targets: Vec<Located<String>>,
    },
    /// Run a hook declared in the agent config (process) or an allow-listed MFA (beam).
    Apply {
        hook: Located<String>,
        args: Vec<String>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    Health {
        service: Located<String>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    /// Delete old releases (process) or purge old code of modules (beam).
    Purge {
        targets: Vec<Located<String>>,
        brutal: bool,
    },
    RestartNewEmulator,
    /// OTP release runtime: put the release tarball (an artifact) under the release's
    /// `releases/`, `release_handler:unpack_release`, then `check_install_release` with purge
    /// (the node's prepare vote).
    UnpackRelease {
        artifact: Located<String>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    /// OTP release runtime: `release_handler:install_release` (the relup runs).
    InstallRelease {
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
    },
    /// A metric gate run by the node's agent against the Prometheus its config declares
    /// (`$node` in the query is the node's name); the step fails when the gate does.
    Gate {
        gate: GateSpec,
    },
}

impl Instruction {
    /// The instruction's name as written in scripts.
    pub fn name(&self) -> &'static str {
        match self {
            Instruction::LoadObjectCode { .. } => "load_object_code",
            Instruction::Check { .. } => "check",
            Instruction::SyncNodes { .. } => "sync_nodes",
            Instruction::PointOfNoReturn => "point_of_no_return",
            Instruction::Suspend { .. } => "suspend",
            Instruction::Load { .. } => "load",
            Instruction::CodeChange { .. } => "code_change",
            Instruction::Resume { .. } => "resume",
            Instruction::Stop { .. } => "stop",
            Instruction::Start { .. } => "start",
            Instruction::Restart { .. } => "restart",
            Instruction::Apply { .. } => "apply",
            Instruction::Health { .. } => "health",
            Instruction::Purge { .. } => "purge",
            Instruction::RestartNewEmulator => "restart_new_emulator",
            Instruction::UnpackRelease { .. } => "unpack_release",
            Instruction::InstallRelease { .. } => "install_release",
            Instruction::Gate { .. } => "gate",
        }
    }

    /// Every instruction name the language knows.
    pub const NAMES: [&'static str; 18] = [
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
        "restart_new_emulator",
        "unpack_release",
        "install_release",
        "gate",
    ];

    /// May only appear before the point of no return (it must not change the running system).
    pub fn prepare_only(&self) -> bool {
        matches!(
            self,
            Instruction::LoadObjectCode { .. }
                | Instruction::Check { .. }
                | Instruction::UnpackRelease { .. }
        )
    }

    /// May only appear after the point of no return (it changes the running system).
    pub fn commit_only(&self) -> bool {
        matches!(
            self,
            Instruction::Suspend { .. }
                | Instruction::Load { .. }
                | Instruction::CodeChange { .. }
                | Instruction::Resume { .. }
                | Instruction::Stop { .. }
                | Instruction::Start { .. }
                | Instruction::Restart { .. }
                | Instruction::Health { .. }
                | Instruction::Purge { .. }
                | Instruction::InstallRelease { .. }
        )
    }
}

/// Where the point of no return sits in `up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum PonrPosition {
    /// `up[index]` is the `point_of_no_return` instruction.
    Explicit(usize),
    /// No explicit instruction: the node is prepared right before `up[index]` (index may equal
    /// `up.len()`, meaning after the last instruction). It sits after the last
    /// `load_object_code`/`check` and before the first instruction that changes the system.
    Implicit(usize),
}

impl PonrPosition {
    /// Index of the first instruction that runs only after Commit.
    pub fn first_commit_step(self) -> usize {
        match self {
            PonrPosition::Explicit(i) => i + 1,
            PonrPosition::Implicit(i) => i,
        }
    }
}

impl Script {
    /// Position of the point of no return in `up`, explicit or implicit.
    pub fn ponr(&self) -> PonrPosition {
        if let Some(i) = self
            .up
            .iter()
            .position(|s| matches!(s.instruction, Instruction::PointOfNoReturn))
        {
            return PonrPosition::Explicit(i);
        }
        let after_staging = self
            .up
            .iter()
            .rposition(|s| s.instruction.prepare_only())
            .map_or(0, |i| i + 1);
        // A commit-only instruction before the last staging one is a validation error, so right
        // after staging is also right before the first change.
        PonrPosition::Implicit(after_staging)
    }

    /// The barriers of `up`, in order, with whether they sit before the point of no return.
    pub fn barriers(&self) -> Vec<BarrierSpec> {
        let first_commit = self.ponr().first_commit_step();
        self.up
            .iter()
            .enumerate()
            .filter_map(|(index, step)| match &step.instruction {
                Instruction::SyncNodes { id, timeout, nodes } => Some(BarrierSpec {
                    id: id.value.clone(),
                    step: index,
                    before_ponr: index < first_commit,
                    timeout: timeout.unwrap_or(self.rollout.barrier_timeout),
                    members: nodes.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// The deadline of `up[index]` (barrier timeout for `sync_nodes`, the instruction's own
    /// timeout where it has one, else the rollout's step timeout).
    pub fn step_deadline(&self, step: &Step) -> Duration {
        let own = match &step.instruction {
            Instruction::SyncNodes { timeout, .. } => {
                return timeout.unwrap_or(self.rollout.barrier_timeout);
            }
            Instruction::Check { timeout, .. }
            | Instruction::Suspend { timeout, .. }
            | Instruction::CodeChange { timeout, .. }
            | Instruction::Apply { timeout, .. }
            | Instruction::Health { timeout, .. }
            | Instruction::UnpackRelease { timeout, .. }
            | Instruction::InstallRelease { timeout } => *timeout,
            // The gate's own timeout, plus one interval for the sample in flight.
            Instruction::Gate { gate } => Some(gate.timeout.saturating_add(gate.interval)),
            _ => None,
        };
        own.unwrap_or(self.rollout.step_timeout)
    }
}

/// What a gate checks, wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateSpec {
    /// PromQL; a node gate's `$node` is replaced by the node's name before it is sent.
    pub query: Located<String>,
    pub pass_if: Comparison,
    /// How long the condition must hold, sample after sample, for the gate to pass (0 = one
    /// good sample).
    #[serde(with = "duration_ms")]
    pub hold: Duration,
    /// Time between samples.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// The gate fails when it has not passed by then.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
}

impl GateSpec {
    /// `QUERY < 0.5 for 3s (every 1s, within 30s)`, how the plan and messages show a gate.
    pub fn describe(&self) -> String {
        use crate::duration::format_duration;
        format!(
            "`{}` {} for {} (every {}, within {})",
            self.query.value,
            self.pass_if,
            format_duration(self.hold),
            format_duration(self.interval),
            format_duration(self.timeout)
        )
    }

    /// The query with `$node` replaced by `node` (what a node gate sends).
    pub fn query_for_node(&self, node: &str) -> String {
        self.query.value.replace("$node", node)
    }
}

/// A fleet gate of `[[rollout.gates]]`: run by the coordinator after each wave committed,
/// before the next wave starts (and before the last wave is made permanent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetGate {
    pub name: Located<String>,
    #[serde(flatten)]
    pub gate: GateSpec,
    pub span: Span,
}

/// A `sync_nodes` barrier as the coordinator needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BarrierSpec {
    pub id: String,
    /// Index in `up`.
    pub step: usize,
    pub before_ponr: bool,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Named members; empty = all participants (every target before the point of no return,
    /// the wave after it).
    pub members: Vec<String>,
}

pub(crate) mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

pub(crate) mod opt_duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }
}
