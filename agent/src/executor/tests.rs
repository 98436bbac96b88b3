//! Executor tests on scripts built directly (no parser needed): the protocol's happy path,
//! barriers, the point of no return, abort, rollback, timeouts, and command filtering.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hotroll_script::{Instruction, Located, RolloutPolicy, Span, Step};

use super::*;
use crate::config::HookConfig;
use crate::journal::JournalRecord;
use crate::report::{NodeState, Phase, StepList, StepPhase, StepReport};

const WAIT: Duration = Duration::from_secs(10);

fn loc(s: &str) -> Located<String> {
    Located::new(s.to_string(), Span::new(0, 0))
}

fn step(instruction: Instruction) -> Step {
    Step {
        instruction,
        span: Span::new(0, 0),
    }
}

fn apply(hook: &str, args: &[&str]) -> Step {
    step(Instruction::Apply {
        hook: loc(hook),
        args: args.iter().map(|a| a.to_string()).collect(),
        timeout: None,
    })
}

fn check(hook: &str, args: &[&str]) -> Step {
    step(Instruction::Check {
        hook: Some(loc(hook)),
        args: args.iter().map(|a| a.to_string()).collect(),
        modules: Vec::new(),
        timeout: None,
    })
}

fn sync(id: &str) -> Step {
    step(Instruction::SyncNodes {
        id: loc(id),
        timeout: None,
        nodes: Vec::new(),
    })
}

fn ponr() -> Step {
    step(Instruction::PointOfNoReturn)
}

fn script(up: Vec<Step>, down: Option<Vec<Step>>) -> Script {
    Script {
        app: loc("primes"),
        runtime: hotroll_script::Runtime::Process,
        from: loc("1.0.0"),
        to: loc("1.1.0"),
        description: None,
        artifacts: Vec::new(),
        rollout: RolloutPolicy {
            step_timeout: Duration::from_secs(20),
            barrier_timeout: Duration::from_secs(20),
            ..RolloutPolicy::default()
        },
        up,
        down,
    }
}

/// Hooks every test can use. Arguments from the script arrive as `$1`, `$2`, ...
fn test_hooks() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ok", "true"),
        // Writes its step environment into the file named by $1 and says hello on both streams.
        (
            "marker",
            "echo \"$HOTROLL_ROLLOUT_ID $HOTROLL_APP $HOTROLL_FROM $HOTROLL_TO $HOTROLL_STEP $HOTROLL_PHASE $HOTROLL_NODE\" > \"$1\"; echo out-$HOTROLL_STEP; echo err-$HOTROLL_STEP >&2",
        ),
        ("fail", "echo broken >&2; exit 3"),
        // Records its pids in $1, then hangs with a child in its process group.
        (
            "hang",
            "echo $$ > \"$1\"; sleep 1000 & echo $! >> \"$1\"; sleep 1000",
        ),
    ]
}

struct Harness {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    node: Node,
    outbox: Arc<Outbox>,
    journal: Journal,
    epoch: u64,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let data_dir = dir.path().to_path_buf();
        let mut config = Config::new("node-1", "http://127.0.0.1:1", data_dir.clone());
        for (name, body) in test_hooks() {
            config.hooks.insert(
                name.to_string(),
                HookConfig {
                    command: vec!["sh".into(), "-c".into(), body.into(), name.into()],
                    timeout: None,
                },
            );
        }
        let journal = Journal::open(&data_dir).unwrap_or_else(|e| panic!("journal: {e}"));
        let outbox = Arc::new(Outbox::default());
        let env = Env {
            config: Arc::new(config),
            runtime: Arc::new(crate::runtime::HooksOnlyRuntime),
            journal: journal.clone(),
            outbox: Arc::clone(&outbox),
        };
        Self {
            _dir: dir,
            data_dir,
            node: Node::new(env),
            outbox,
            journal,
            epoch: 5,
        }
    }

    fn path(&self, name: &str) -> String {
        self.data_dir.join(name).display().to_string()
    }

    fn start(&mut self, script: Script) {
        self.start_with(script, None);
    }

    fn start_with(&mut self, script: Script, step_timeout: Option<Duration>) {
        let run = RunScript {
            script_name: "script.toml".into(),
            script_source: String::new(),
            artifacts: Vec::new(),
            step_timeout,
            barrier_timeout: None,
        };
        self.node
            .start_parsed("r1".into(), self.epoch, "script.toml", &run, script);
    }

    fn send(&mut self, kind: CommandKind) {
        self.send_as("r1", self.epoch, kind);
    }

    fn send_as(&mut self, rollout_id: &str, epoch: u64, kind: CommandKind) {
        self.node.handle(Command {
            rollout_id: rollout_id.into(),
            epoch,
            kind,
        });
    }

    async fn next(&self) -> Report {
        match tokio::time::timeout(WAIT, self.outbox.pop()).await {
            Ok(report) => report,
            Err(_) => panic!("no report within {WAIT:?}"),
        }
    }

    /// Nothing is reported for `d`.
    async fn quiet_for(&self, d: Duration) {
        if let Ok(report) = tokio::time::timeout(d, self.outbox.pop()).await {
            panic!("expected no report, got {report:?}");
        }
    }

    async fn expect_accepted(&self) {
        let report = self.next().await;
        assert!(
            matches!(report, Report::ScriptAccepted { .. }),
            "{report:?}"
        );
    }

    async fn expect_step(
        &self,
        list: StepList,
        index: u32,
        instruction: &str,
        phase: StepPhase,
    ) -> StepReport {
        match self.next().await {
            Report::Step(s)
                if s.list == list
                    && s.step == index
                    && s.instruction == instruction
                    && s.phase == phase =>
            {
                s
            }
            other => panic!("expected {list:?}[{index}] {instruction} {phase:?}, got {other:?}"),
        }
    }

    async fn expect_outcome(&self, state: NodeState) -> String {
        match self.next().await {
            Report::Outcome {
                state: s, error, ..
            } if s == state => error,
            other => panic!("expected outcome {state:?}, got {other:?}"),
        }
    }

    /// The next report that is not a step's start or end.
    async fn next_past_steps(&self) -> Report {
        loop {
            match self.next().await {
                Report::Step(s) if s.phase != StepPhase::Failed => {}
                other => return other,
            }
        }
    }

    /// Drive a started rollout that succeeds on this node to its end: accepted, prepared,
    /// Commit, committed, MakePermanent, permanent (step reports in between are passed over).
    async fn run_to_permanent(&mut self) {
        self.expect_accepted().await;
        let prepared = self.next_past_steps().await;
        assert!(matches!(prepared, Report::Prepared { .. }), "{prepared:?}");
        self.send(CommandKind::Commit);
        let committed = self.next_past_steps().await;
        assert!(
            matches!(
                committed,
                Report::Outcome {
                    state: NodeState::Committed,
                    ..
                }
            ),
            "{committed:?}"
        );
        self.send(CommandKind::MakePermanent);
        self.expect_outcome(NodeState::Permanent).await;
    }

    async fn expect_prepared(&self) {
        let report = self.next().await;
        assert!(matches!(report, Report::Prepared { .. }), "{report:?}");
    }

    async fn expect_arrive(&self, id: &str) {
        match self.next().await {
            Report::BarrierArrive { barrier_id, .. } if barrier_id == id => {}
            other => panic!("expected BarrierArrive {id}, got {other:?}"),
        }
    }

    /// Every record the journal's log holds, oldest first, as (step, phase, state).
    fn journal_log(&self) -> Vec<(u32, Phase, NodeState)> {
        let log = std::fs::read(self.journal.path()).unwrap_or_else(|e| panic!("journal: {e}"));
        log.split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| {
                let record = crate::journal::decode_line(line)
                    .unwrap_or_else(|e| panic!("journal line: {e}"));
                (record.step, record.phase, record.node_state)
            })
            .collect()
    }

    fn last_journal(&self) -> JournalRecord {
        match self.journal.entries() {
            Ok(mut entries) if !entries.is_empty() => entries.remove(0),
            other => panic!("journal: {other:?}"),
        }
    }
}

fn release(id: &str, ok: bool, reason: &str) -> CommandKind {
    CommandKind::BarrierRelease {
        barrier_id: id.into(),
        ok,
        reason: reason.into(),
    }
}

/// Is `pid` a live process (not gone, not a zombie)?
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Wait until the pid file of the `hang` hook names two processes; return them.
async fn hang_pids(path: &Path) -> Vec<i32> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() == 2 {
                return pids;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the hang hook never wrote its pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "hook processes {pids:?} still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn full_lifecycle_with_implicit_point_of_no_return() {
    let mut h = Harness::new();
    let checked = h.path("checked");
    let applied = h.path("applied");
    h.start(script(
        vec![check("marker", &[&checked]), apply("marker", &[&applied])],
        None,
    ));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "check", StepPhase::Started)
        .await;
    let done = h
        .expect_step(StepList::Up, 0, "check", StepPhase::Succeeded)
        .await;
    assert!(
        done.output.contains("out-0") && done.output.contains("err-0"),
        "{done:?}"
    );
    // The point of no return sits right after the last check: nothing after it runs yet.
    h.expect_prepared().await;
    h.quiet_for(Duration::from_millis(200)).await;
    assert!(!Path::new(&applied).exists());
    assert_eq!(h.last_journal().phase, Phase::Prepared);

    h.send(CommandKind::Commit);
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Started)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Succeeded)
        .await;
    h.expect_outcome(NodeState::Committed).await;
    let env = std::fs::read_to_string(&applied).unwrap_or_default();
    assert_eq!(env.trim(), "r1 primes 1.0.0 1.1.0 1 up node-1");

    h.send(CommandKind::MakePermanent);
    h.expect_outcome(NodeState::Permanent).await;
    let record = h.last_journal();
    assert_eq!(
        (record.phase, record.node_state),
        (Phase::Done, NodeState::Permanent)
    );
    assert!(!h.node.is_busy());
}

#[tokio::test]
async fn undeclared_hook_and_unsupported_instruction_are_refused() {
    let mut h = Harness::new();
    let marker = h.path("marker");
    h.start(script(
        vec![
            apply("marker", &[&marker]),
            apply("nope", &[]),
            step(Instruction::Load {
                targets: vec![loc("primes")],
            }),
        ],
        None,
    ));
    match h.next().await {
        Report::ScriptRefused { errors, .. } => {
            assert_eq!(errors.len(), 2, "{errors:?}");
            assert!(
                errors[0].contains("hook `nope` is not declared"),
                "{errors:?}"
            );
            assert!(
                errors[0].starts_with("script.toml:1:1: error: "),
                "{errors:?}"
            );
            assert!(
                errors[1].contains("instruction `load` is not supported by this agent yet"),
                "{errors:?}"
            );
        }
        other => panic!("expected ScriptRefused, got {other:?}"),
    }
    h.quiet_for(Duration::from_millis(200)).await;
    assert!(!h.node.is_busy());
    assert!(!Path::new(&marker).exists());
}

#[tokio::test]
async fn barrier_blocks_until_released() {
    let mut h = Harness::new();
    h.start(script(vec![sync("staged"), check("ok", &[])], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Started)
        .await;
    h.expect_arrive("staged").await;
    h.quiet_for(Duration::from_millis(300)).await;

    // Stale epoch, another rollout, another barrier: none releases this one.
    h.send_as("r1", h.epoch - 1, release("staged", true, ""));
    h.send_as("other", h.epoch, release("staged", true, ""));
    h.send(release("elsewhere", true, ""));
    h.quiet_for(Duration::from_millis(200)).await;

    h.send(release("staged", true, ""));
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Succeeded)
        .await;
    h.expect_step(StepList::Up, 1, "check", StepPhase::Started)
        .await;
    h.expect_step(StepList::Up, 1, "check", StepPhase::Succeeded)
        .await;
    h.expect_prepared().await;
    h.send(CommandKind::Abort {
        reason: "operator".into(),
    });
    let error = h.expect_outcome(NodeState::Aborted).await;
    assert_eq!(error, "aborted by the coordinator: operator");
}

#[tokio::test]
async fn abort_at_a_barrier_aborts() {
    let mut h = Harness::new();
    // The explicit point of no return keeps the barrier before it.
    h.start(script(vec![sync("staged"), ponr()], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Started)
        .await;
    h.expect_arrive("staged").await;
    h.send(CommandKind::Abort {
        reason: "node-2 failed".into(),
    });
    let failed = h
        .expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Failed)
        .await;
    assert!(failed.error.contains("node-2 failed"), "{failed:?}");
    let error = h.expect_outcome(NodeState::Aborted).await;
    assert!(error.contains("aborted by the coordinator"), "{error}");
    assert_eq!(h.last_journal().node_state, NodeState::Aborted);
}

#[tokio::test]
async fn a_failed_barrier_aborts() {
    let mut h = Harness::new();
    // The explicit point of no return keeps the barrier before it.
    h.start(script(vec![sync("staged"), ponr()], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Started)
        .await;
    h.expect_arrive("staged").await;
    h.send(release("staged", false, "deadline passed"));
    let failed = h
        .expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Failed)
        .await;
    assert_eq!(failed.error, "barrier `staged` failed: deadline passed");
    let error = h.expect_outcome(NodeState::Aborted).await;
    assert!(error.contains("barrier `staged` failed"), "{error}");
}

#[tokio::test]
async fn failure_after_the_point_of_no_return_runs_down() {
    let mut h = Harness::new();
    let rolled = h.path("rolled-back");
    h.start(script(
        vec![ponr(), apply("fail", &[])],
        Some(vec![apply("marker", &[&rolled])]),
    ));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Started)
        .await;
    h.expect_prepared().await;
    h.send(CommandKind::Commit);
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Succeeded)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Started)
        .await;
    let failed = h
        .expect_step(StepList::Up, 1, "apply", StepPhase::Failed)
        .await;
    assert!(
        failed.error.starts_with("hook `fail` exited with status 3"),
        "{failed:?}"
    );
    assert!(failed.output.contains("broken"), "{failed:?}");
    let error = h.expect_outcome(NodeState::RollingBack).await;
    assert!(error.contains("exited with status 3"), "{error}");
    h.expect_step(StepList::Down, 0, "apply", StepPhase::Started)
        .await;
    h.expect_step(StepList::Down, 0, "apply", StepPhase::Succeeded)
        .await;
    h.expect_outcome(NodeState::RolledBack).await;
    let env = std::fs::read_to_string(&rolled).unwrap_or_default();
    assert!(env.trim().ends_with("0 down node-1"), "{env}");
    assert_eq!(h.last_journal().node_state, NodeState::RolledBack);
}

#[tokio::test]
async fn a_failing_down_list_ends_failed() {
    let mut h = Harness::new();
    h.start(script(
        vec![ponr(), apply("fail", &[])],
        Some(vec![apply("fail", &[])]),
    ));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Started)
        .await;
    h.expect_prepared().await;
    h.send(CommandKind::Commit);
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Succeeded)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Started)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Failed)
        .await;
    h.expect_outcome(NodeState::RollingBack).await;
    h.expect_step(StepList::Down, 0, "apply", StepPhase::Started)
        .await;
    h.expect_step(StepList::Down, 0, "apply", StepPhase::Failed)
        .await;
    let error = h.expect_outcome(NodeState::Failed).await;
    assert!(
        error.starts_with("rollback failed at down[0] `apply`"),
        "{error}"
    );
}

/// The point of no return writes no record of its own beyond what it must say: `prepared` is
/// the record before it, and the Committing record after Commit is also the record before the
/// next instruction. Every instruction still has its record before it runs.
#[tokio::test]
async fn the_point_of_no_return_shares_its_journal_records_with_the_steps_around_it() {
    let mut h = Harness::new();
    h.start(script(
        vec![apply("ok", &[]), ponr(), apply("ok", &[]), apply("ok", &[])],
        None,
    ));
    h.run_to_permanent().await;
    assert_eq!(
        h.journal_log(),
        vec![
            (0, Phase::Preparing, NodeState::Preparing),
            (1, Phase::Prepared, NodeState::Prepared),
            (2, Phase::Committing, NodeState::Committing),
            (3, Phase::Committing, NodeState::Committing),
            (3, Phase::Committing, NodeState::Committed),
            (3, Phase::Done, NodeState::Permanent),
        ]
    );
}

/// The same with the point of no return implicit (after the last check): its records name the
/// steps next to it.
#[tokio::test]
async fn an_implicit_point_of_no_return_journals_before_the_first_step_past_it() {
    let mut h = Harness::new();
    h.start(script(
        vec![check("ok", &[]), apply("ok", &[]), apply("ok", &[])],
        None,
    ));
    h.run_to_permanent().await;
    assert_eq!(
        h.journal_log(),
        vec![
            (0, Phase::Preparing, NodeState::Preparing),
            (0, Phase::Prepared, NodeState::Prepared),
            (1, Phase::Committing, NodeState::Committing),
            (2, Phase::Committing, NodeState::Committing),
            (2, Phase::Committing, NodeState::Committed),
            (2, Phase::Done, NodeState::Permanent),
        ]
    );
}

#[tokio::test]
async fn rollback_after_commit_uses_the_default_rollback() {
    let mut h = Harness::new();
    h.start(script(vec![ponr(), apply("ok", &[])], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Started)
        .await;
    h.expect_prepared().await;
    // A reconnect while waiting re-sends Prepared (a copy in flight may have been lost).
    h.node.on_connected();
    h.expect_prepared().await;
    h.send(CommandKind::Commit);
    h.expect_step(StepList::Up, 0, "point_of_no_return", StepPhase::Succeeded)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Started)
        .await;
    h.expect_step(StepList::Up, 1, "apply", StepPhase::Succeeded)
        .await;
    h.expect_outcome(NodeState::Committed).await;
    h.send(CommandKind::Rollback {
        reason: "rollback_all".into(),
    });
    let error = h.expect_outcome(NodeState::RollingBack).await;
    assert_eq!(error, "rollback requested by the coordinator: rollback_all");
    h.expect_step(StepList::Down, 0, DEFAULT_ROLLBACK, StepPhase::Started)
        .await;
    h.expect_step(StepList::Down, 0, DEFAULT_ROLLBACK, StepPhase::Succeeded)
        .await;
    h.expect_outcome(NodeState::RolledBack).await;

    // The coordinator missed the outcome and asks again: the final state is reported again.
    h.send(CommandKind::MakePermanent);
    h.expect_outcome(NodeState::RolledBack).await;
}

#[tokio::test]
async fn abort_kills_the_running_hook_group() {
    let mut h = Harness::new();
    let pids_file = h.path("pids");
    h.start(script(vec![check("hang", &[&pids_file])], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "check", StepPhase::Started)
        .await;
    let pids = hang_pids(Path::new(&pids_file)).await;
    assert!(pids.iter().all(|&p| alive(p)));
    h.send(CommandKind::Abort {
        reason: "operator".into(),
    });
    let failed = h
        .expect_step(StepList::Up, 0, "check", StepPhase::Failed)
        .await;
    assert!(failed.error.contains("was stopped"), "{failed:?}");
    h.expect_outcome(NodeState::Aborted).await;
    assert_gone(&pids).await;
}

#[tokio::test]
async fn the_step_timeout_kills_the_hook_group() {
    let mut h = Harness::new();
    let pids_file = h.path("pids");
    h.start_with(
        script(vec![check("hang", &[&pids_file])], None),
        Some(Duration::from_millis(500)),
    );
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "check", StepPhase::Started)
        .await;
    let pids = hang_pids(Path::new(&pids_file)).await;
    let failed = h
        .expect_step(StepList::Up, 0, "check", StepPhase::Failed)
        .await;
    assert!(failed.error.contains("timed out after 500ms"), "{failed:?}");
    h.expect_outcome(NodeState::Aborted).await;
    assert_gone(&pids).await;
}

#[tokio::test]
async fn one_rollout_at_a_time() {
    let mut h = Harness::new();
    // The explicit point of no return keeps the barrier before it.
    h.start(script(vec![sync("staged"), ponr()], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Started)
        .await;
    h.expect_arrive("staged").await;

    let run = |source: &str| {
        CommandKind::RunScript(RunScript {
            script_name: "s.toml".into(),
            script_source: source.into(),
            artifacts: Vec::new(),
            step_timeout: None,
            barrier_timeout: None,
        })
    };
    h.send_as("r2", 1, run(""));
    match h.next().await {
        Report::ScriptRefused {
            rollout_id, errors, ..
        } => {
            assert_eq!(rollout_id, "r2");
            assert_eq!(
                errors,
                vec!["node is busy with rollout r1 (epoch 5)".to_string()]
            );
        }
        other => panic!("expected ScriptRefused, got {other:?}"),
    }
    // The same RunScript again (after a reconnect) is acknowledged, not refused.
    h.send(run(""));
    h.expect_accepted().await;
    h.send(CommandKind::Abort {
        reason: String::new(),
    });
    h.expect_step(StepList::Up, 0, "sync_nodes", StepPhase::Failed)
        .await;
    h.expect_outcome(NodeState::Aborted).await;
}

#[tokio::test]
async fn shutdown_kills_the_hook_and_reports_nothing() {
    let mut h = Harness::new();
    let pids_file = h.path("pids");
    h.start(script(vec![check("hang", &[&pids_file])], None));
    h.expect_accepted().await;
    h.expect_step(StepList::Up, 0, "check", StepPhase::Started)
        .await;
    let pids = hang_pids(Path::new(&pids_file)).await;
    h.node.shutdown().await;
    assert_gone(&pids).await;
    assert!(h.outbox.is_empty());
    let record = h.last_journal();
    assert_eq!((record.phase, record.step), (Phase::Preparing, 0));
}
