//! Engine tests: one scenario per transition, driven through the public API, asserting on the
//! commands and the states; then a property test over random event sequences.
//!
//! The script every test uses (indexes of `up`):
//! 0 load_object_code · 1 sync_nodes "pre" · 2 point_of_no_return ·
//! 3 load · 4 sync_nodes "post" · 5 health.
//! Nodes that a test does not need at a barrier simply skip reporting it.

use std::time::Duration;

use hotroll_script::{BarrierSpec, OnFailure, RolloutPolicy};

use super::machine::Mode;
use super::*;

const EPOCH: u64 = 7;
const SEC: Millis = 1_000;
/// Deadline of the ordinary steps and the policy's step timeout.
const STEP: Millis = 10 * SEC;
const SLACK: Millis = 2 * SEC;
const GRACE: Millis = 10 * SEC;
const BARRIER: Millis = 30 * SEC;
/// Between reports a node has the slack plus the step timeout.
const IDLE: Millis = SLACK + STEP;
/// Make-permanent / abort confirmations: slack + the largest step deadline (a barrier's).
const CONFIRM: Millis = SLACK + BARRIER;
/// Rollback confirmations: slack + the sum of the step deadlines.
const ROLLBACK: Millis = SLACK + 4 * STEP + 2 * BARRIER;

fn pre() -> BarrierSpec {
    BarrierSpec {
        id: "pre".into(),
        step: 1,
        before_ponr: true,
        timeout: Duration::from_millis(BARRIER),
        members: vec![],
    }
}

fn post() -> BarrierSpec {
    BarrierSpec {
        id: "post".into(),
        step: 4,
        before_ponr: false,
        timeout: Duration::from_millis(BARRIER),
        members: vec![],
    }
}

fn policy(
    on_failure: OnFailure,
    canary: u32,
    max_in_flight: u32,
    max_failures: u32,
) -> RolloutPolicy {
    RolloutPolicy {
        canary,
        max_in_flight,
        max_failures,
        on_failure,
        barrier_timeout: Duration::from_millis(BARRIER),
        step_timeout: Duration::from_millis(STEP),
        ..RolloutPolicy::default()
    }
}

/// Everything at once, no canary, `rollback_node` with no budget.
fn one_wave() -> RolloutPolicy {
    policy(OnFailure::RollbackNode, 0, 0, 0)
}

fn spec(nodes: &[&str], policy: RolloutPolicy, barriers: Vec<BarrierSpec>) -> RolloutSpec {
    let d = Duration::from_millis;
    RolloutSpec {
        id: "r1".into(),
        app: "primes".into(),
        from: "1.0".into(),
        to: "1.1".into(),
        targets: nodes.iter().map(|n| n.to_string()).collect(),
        policy,
        barriers,
        steps_total: 6,
        first_commit_step: 3,
        step_deadlines: vec![d(STEP), d(BARRIER), d(STEP), d(STEP), d(BARRIER), d(STEP)],
        session_grace: d(GRACE),
        step_slack: d(SLACK),
    }
}

/// Drives one rollout: every helper feeds an event at the current time and returns the
/// commands; `log` keeps all of them.
struct H {
    r: Rollout,
    now: Millis,
    log: Vec<Command>,
}

impl H {
    fn new(spec: RolloutSpec) -> Self {
        Self {
            r: Rollout::new(spec, EPOCH, 0),
            now: 0,
            log: Vec::new(),
        }
    }

    /// Started, with every node past Start.
    fn started(spec: RolloutSpec) -> Self {
        let mut h = Self::new(spec);
        h.ev(Event::Start);
        h
    }

    fn at(&mut self, now: Millis) -> &mut Self {
        assert!(now >= self.now, "time goes forward");
        self.now = now;
        self
    }

    fn ev(&mut self, event: Event) -> Vec<Command> {
        let out = self
            .r
            .handle(self.now, event.clone())
            .unwrap_or_else(|e| panic!("{event:?} should apply: {e}"));
        self.log.extend(out.clone());
        out
    }

    fn op(&mut self, event: Event) -> Result<Vec<Command>, NotApplicable> {
        let out = self.r.handle(self.now, event)?;
        self.log.extend(out.clone());
        Ok(out)
    }

    fn tick(&mut self, now: Millis) -> Vec<Command> {
        self.at(now);
        self.ev(Event::Tick)
    }

    fn started_step(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepStarted {
            node: node.into(),
            epoch: EPOCH,
            step,
        })
    }

    fn step_ok(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepSucceeded {
            node: node.into(),
            epoch: EPOCH,
            step,
            duration_ms: Some(7),
        })
    }

    fn step_failed(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepFailed {
            node: node.into(),
            epoch: EPOCH,
            step,
            error: "boom".into(),
            duration_ms: Some(9),
        })
    }

    fn arrive(&mut self, node: &str, barrier: &str) -> Vec<Command> {
        self.ev(Event::BarrierArrived {
            node: node.into(),
            epoch: EPOCH,
            barrier: barrier.into(),
        })
    }

    fn prepared(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::Prepared {
            node: node.into(),
            epoch: EPOCH,
        })
    }

    fn outcome(&mut self, node: &str, outcome: Outcome) -> Vec<Command> {
        self.ev(Event::Outcome {
            node: node.into(),
            epoch: EPOCH,
            outcome,
            error: None,
        })
    }

    /// The nodes told to abort confirm it.
    fn confirm_aborted(&mut self, nodes: &[&str]) {
        for node in nodes {
            self.outcome(node, Outcome::Aborted);
        }
    }

    fn lost(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::SessionLost { node: node.into() })
    }

    fn restored(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::SessionRestored { node: node.into() })
    }

    /// Run the prepare part (step 0, then the point of no return).
    fn prepare(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::ScriptAccepted {
            node: node.into(),
            epoch: EPOCH,
        });
        self.started_step(node, 0);
        self.step_ok(node, 0);
        self.prepared(node)
    }

    /// Prepare every node; returns the commands of the last one (where wave 1 starts).
    fn prepare_all(&mut self) -> Vec<Command> {
        let names: Vec<String> = self.r.nodes().iter().map(|n| n.name.clone()).collect();
        let mut last = Vec::new();
        for n in names {
            last = self.prepare(&n);
        }
        last
    }

    /// Run the commit part (step 3) and report Committed.
    fn commit(&mut self, node: &str) -> Vec<Command> {
        self.started_step(node, 3);
        self.step_ok(node, 3);
        self.outcome(node, Outcome::Committed)
    }

    fn node(&self, node: &str) -> &NodeView {
        self.r
            .nodes()
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    fn state_of(&self, node: &str) -> NodeState {
        self.node(node).state
    }

    fn states(&self) -> Vec<NodeState> {
        self.r.nodes().iter().map(|n| n.state).collect()
    }
}

fn to(cmds: &[Command], pick: impl Fn(&Command) -> Option<&String>) -> Vec<String> {
    cmds.iter().filter_map(pick).cloned().collect()
}

fn run_scripts(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::RunScript { node } => Some(node),
        _ => None,
    })
}

fn commits(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Commit { node } => Some(node),
        _ => None,
    })
}

fn aborts(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Abort { node, .. } => Some(node),
        _ => None,
    })
}

fn rollbacks(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Rollback { node, .. } => Some(node),
        _ => None,
    })
}

fn permanents(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::MakePermanent { node } => Some(node),
        _ => None,
    })
}

fn releases(cmds: &[Command]) -> Vec<(String, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ReleaseBarrier { node, ok, .. } => Some((node.clone(), *ok)),
            _ => None,
        })
        .collect()
}

fn records(cmds: &[Command]) -> Vec<&Record> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn rollout_states(cmds: &[Command]) -> Vec<RolloutState> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::RolloutState { state, .. } => Some(*state),
            _ => None,
        })
        .collect()
}

fn rollout_reasons(cmds: &[Command]) -> Vec<String> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::RolloutState {
                reason: Some(reason),
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn waves_started(cmds: &[Command]) -> Vec<(u32, Vec<String>)> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::WaveStarted { wave, nodes } => Some((*wave, nodes.clone())),
            _ => None,
        })
        .collect()
}

fn no_node_commands(cmds: &[Command]) -> bool {
    cmds.iter().all(|c| matches!(c, Command::Record(_)))
}

fn s(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

use NodeState as N;
use RolloutState as R;

// ------------------------------------------------------------------------------------------
// Start and prepare.

#[test]
fn start_sends_the_script_to_every_target() {
    let mut h = H::new(spec(&["a", "b", "c"], one_wave(), vec![]));
    assert_eq!(h.r.state(), R::Pending);
    let out = h.ev(Event::Start);
    assert_eq!(run_scripts(&out), s(&["a", "b", "c"]));
    assert_eq!(h.r.state(), R::Preparing);
    assert_eq!(h.states(), vec![N::Preparing; 3]);
    assert_eq!(rollout_states(&out), vec![R::Preparing]);
    assert_eq!(h.r.current_wave(), 0);
    assert_eq!(h.r.waves(), 1);
    // A second Start changes nothing.
    assert!(h.ev(Event::Start).is_empty());
}

#[test]
fn all_prepared_starts_wave_one_then_make_permanent_then_succeeded() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    let out = h.prepare("a");
    assert!(commits(&out).is_empty(), "b is not prepared yet");
    let out = h.prepare("b");
    assert_eq!(commits(&out), s(&["a", "b"]));
    assert_eq!(waves_started(&out), vec![(1, s(&["a", "b"]))]);
    assert_eq!(h.r.state(), R::Committing);
    assert_eq!(h.r.current_wave(), 1);
    assert_eq!(h.states(), vec![N::Committing; 2]);

    assert!(permanents(&h.commit("a")).is_empty());
    let out = h.commit("b");
    assert_eq!(permanents(&out), s(&["a", "b"]));
    assert_eq!(h.r.state(), R::Committing, "waits for the confirmations");
    h.outcome("a", Outcome::Permanent);
    let out = h.outcome("b", Outcome::Permanent);
    assert_eq!(rollout_states(&out), vec![R::Succeeded]);
    assert_eq!(h.r.state(), R::Succeeded);
    assert_eq!(h.r.error(), None);
    assert_eq!(h.r.next_deadline(), None);
    assert_eq!(h.r.failures(), 0);
}

#[test]
fn steps_are_recorded_on_the_node_view() {
    let mut h = H::started(spec(&["a"], one_wave(), vec![]));
    h.at(500);
    let out = h.started_step("a", 0);
    assert_eq!(
        records(&out),
        vec![&Record::Step {
            node: "a".into(),
            step: 0,
            phase: StepPhase::Started,
            error: None,
            duration_ms: None,
        }]
    );
    assert_eq!(h.node("a").step, Some(0));
    assert_eq!(h.node("a").step_started, Some(500));
    h.at(700);
    h.step_ok("a", 0);
    assert_eq!(h.node("a").step_started, Some(500));
    // A commit step before Commit is inconsistent with the node's state: ignored.
    assert!(h.started_step("a", 3).is_empty());
    assert_eq!(h.node("a").step, Some(0));
}

#[test]
fn zero_targets_succeed_at_once() {
    let mut h = H::new(spec(&[], one_wave(), vec![]));
    h.ev(Event::Start);
    assert_eq!(h.r.state(), R::Succeeded);
    assert_eq!(h.r.waves(), 0);
}

// ------------------------------------------------------------------------------------------
// Barriers.

#[test]
fn barrier_before_ponr_releases_when_everyone_arrived() {
    let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![pre()]));
    h.at(1_000);
    let out = h.arrive("a", "pre");
    assert_eq!(
        records(&out),
        vec![&Record::BarrierArrived {
            node: "a".into(),
            barrier: "pre".into(),
            arrived: 1,
            expected: 3
        }]
    );
    assert!(releases(&out).is_empty());
    let view = h.r.barrier().expect("waiting at pre");
    assert_eq!(
        (view.id.as_str(), view.wave, view.arrived, view.expected),
        ("pre", None, 1, 3)
    );
    assert_eq!(
        view.deadline,
        1_000 + BARRIER,
        "deadline counts from the first arrival"
    );
    h.at(5_000);
    h.arrive("b", "pre");
    assert_eq!(
        h.r.barrier().map(|b| (b.arrived, b.deadline)),
        Some((2, 1_000 + BARRIER))
    );
    let out = h.arrive("c", "pre");
    assert_eq!(
        releases(&out),
        vec![("a".into(), true), ("b".into(), true), ("c".into(), true)]
    );
    assert!(records(&out).contains(&&Record::BarrierReleased {
        barrier: "pre".into(),
        wave: None
    }));
    assert_eq!(h.r.barrier(), None);
}

#[test]
fn barrier_times_out_before_ponr_and_aborts_the_rollout() {
    let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![pre()]));
    h.at(1_000);
    h.arrive("a", "pre");
    h.arrive("b", "pre");
    // c is alive, still in a step that will end after the barrier deadline.
    h.at(25_000);
    h.started_step("c", 0);
    assert!(h.tick(1_000 + BARRIER - 1).is_empty(), "not yet");
    let out = h.tick(1_000 + BARRIER);
    let failed = |r: &&Record| {
        matches!(r, Record::BarrierFailed { barrier, wave: None, reason }
            if barrier == "pre" && reason.contains("missing c"))
    };
    assert!(records(&out).iter().any(failed));
    assert_eq!(aborts(&out), s(&["a", "b", "c"]));
    assert!(commits(&h.log).is_empty());
    assert_eq!(h.r.barrier(), None);
    // a and b confirm; c never does: its confirmation deadline ends the wait.
    h.confirm_aborted(&["a", "b"]);
    assert_eq!(h.r.state(), R::Preparing);
    let deadline = h.r.next_deadline().expect("c's confirmation is bounded");
    h.tick(deadline);
    assert_eq!(h.state_of("c"), N::Failed);
    assert_eq!(h.r.state(), R::Aborted);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("barrier `pre` timed out"))
    );
    assert_eq!(h.r.next_deadline(), None);
}

#[test]
fn barrier_after_ponr_is_scoped_to_the_wave() {
    // Two waves of two: wave 2's instance of "post" is its own.
    let mut h = H::started(spec(
        &["a", "b", "c", "d"],
        policy(OnFailure::RollbackNode, 0, 2, 0),
        vec![post()],
    ));
    h.prepare_all();
    assert_eq!(commits(&h.log), s(&["a", "b"]));
    h.arrive("a", "post");
    assert_eq!(
        h.r.barrier().map(|b| (b.wave, b.arrived, b.expected)),
        Some((Some(1), 1, 2))
    );
    let out = h.arrive("b", "post");
    assert_eq!(releases(&out), vec![("a".into(), true), ("b".into(), true)]);
    assert!(records(&out).contains(&&Record::BarrierReleased {
        barrier: "post".into(),
        wave: Some(1)
    }));
    h.commit("a");
    let out = h.commit("b");
    assert_eq!(commits(&out), s(&["c", "d"]));
    let out = h.arrive("c", "post");
    assert!(
        releases(&out).is_empty(),
        "wave 1's release does not count for wave 2"
    );
    assert_eq!(
        h.r.barrier().map(|b| (b.wave, b.arrived, b.expected)),
        Some((Some(2), 1, 2))
    );
    let out = h.arrive("d", "post");
    assert_eq!(releases(&out), vec![("c".into(), true), ("d".into(), true)]);
}

/// A post-PONR barrier that times out before the steps around it do, so a node that misses it is
/// alive (still in a step), not silent.
fn short_post() -> BarrierSpec {
    BarrierSpec {
        timeout: Duration::from_millis(5 * SEC),
        ..post()
    }
}

#[test]
fn barrier_times_out_after_ponr_fails_the_missing_and_releases_the_arrived() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![short_post()],
    ));
    h.prepare_all();
    h.at(SEC);
    h.arrive("a", "post");
    h.arrive("b", "post");
    h.started_step("c", 3);
    assert!(h.tick(6 * SEC - 1).is_empty());
    let out = h.tick(6 * SEC);
    assert_eq!(rollbacks(&out), s(&["c"]));
    assert_eq!(releases(&out), vec![("a".into(), true), ("b".into(), true)]);
    assert_eq!(h.state_of("c"), N::RollingBack);
    assert_eq!(h.r.failures(), 1);
    assert_eq!(h.r.state(), R::Committing);
    // The rest carries on; c confirms its rollback; a and b are made permanent.
    h.commit("a");
    h.commit("b");
    let out = h.outcome("c", Outcome::RolledBack);
    assert_eq!(permanents(&out), s(&["a", "b"]));
    assert_eq!(h.r.failures(), 1, "counted once");
    h.outcome("a", Outcome::Permanent);
    h.outcome("b", Outcome::Permanent);
    assert_eq!(h.r.state(), R::PartiallyRolledBack);
}

#[test]
fn barrier_timeout_past_the_budget_rolls_the_arrived_back_instead() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 0, 0),
        vec![short_post()],
    ));
    h.prepare_all();
    h.arrive("a", "post");
    h.arrive("b", "post");
    h.started_step("c", 3);
    let out = h.tick(h.now + 5 * SEC);
    assert_eq!(
        h.state_of("c"),
        N::RollingBack,
        "alive: told to roll back, not given up on"
    );
    assert!(releases(&out).is_empty());
    assert_eq!(rollbacks(&out), s(&["c", "a", "b"]));
    assert_eq!(h.r.state(), R::Committing);
    assert!(
        rollout_reasons(&out)
            .iter()
            .any(|r| r.contains("failure budget exceeded: 1 failures, max_failures 0"))
    );
    for n in ["a", "b", "c"] {
        h.outcome(n, Outcome::RolledBack);
    }
    assert_eq!(h.r.state(), R::RolledBack);
    assert!(permanents(&h.log).is_empty());
}

#[test]
fn stale_arrivals_never_satisfy_a_barrier() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![pre()]));
    // An arrival from an older epoch is ignored.
    let out = h.ev(Event::BarrierArrived {
        node: "a".into(),
        epoch: EPOCH - 1,
        barrier: "pre".into(),
    });
    assert!(out.is_empty());
    assert_eq!(h.r.barrier(), None);
    h.arrive("a", "pre");
    // A repeat does not count twice.
    assert!(h.arrive("a", "pre").is_empty());
    assert_eq!(h.r.barrier().map(|b| b.arrived), Some(1));
    let out = h.ev(Event::BarrierArrived {
        node: "b".into(),
        epoch: EPOCH + 1,
        barrier: "pre".into(),
    });
    assert!(out.is_empty(), "a newer epoch is not this rollout either");
    h.arrive("b", "pre");
    assert_eq!(h.r.barrier(), None);
    // Arrivals for the instance already released are ignored.
    assert!(h.arrive("a", "pre").is_empty());
    assert!(h.arrive("b", "pre").is_empty());
    // Unknown barrier ids and unknown nodes too.
    assert!(h.arrive("a", "nope").is_empty());
    assert!(h.arrive("zed", "pre").is_empty());
    assert_eq!(h.r.barrier(), None);
}

#[test]
fn stale_arrival_from_an_earlier_wave_does_not_count_for_the_next() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 1, 2, 0),
        vec![post()],
    ));
    h.prepare_all();
    let out = h.arrive("a", "post");
    assert_eq!(releases(&out), vec![("a".into(), true)], "wave 1 is just a");
    h.commit("a");
    assert_eq!(commits(&h.log), s(&["a", "b", "c"]));
    h.arrive("b", "post");
    // a's arrival belongs to the wave-1 instance: a is committed, it cannot take part.
    assert!(h.arrive("a", "post").is_empty());
    assert_eq!(
        h.r.barrier().map(|b| (b.wave, b.arrived, b.expected)),
        Some((Some(2), 1, 2))
    );
}

#[test]
fn named_members_barrier_after_ponr() {
    let named = BarrierSpec {
        members: s(&["a", "b"]),
        ..post()
    };
    let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![named]));
    h.prepare_all();
    // c is not a member: it waits with the members and is released with them.
    h.arrive("c", "post");
    assert_eq!(
        h.r.barrier().map(|b| (b.wave, b.arrived, b.expected)),
        Some((None, 0, 2))
    );
    h.arrive("a", "post");
    let out = h.arrive("b", "post");
    let mut released = releases(&out);
    released.sort();
    assert_eq!(
        released,
        vec![("a".into(), true), ("b".into(), true), ("c".into(), true)]
    );
}

#[test]
fn named_members_in_a_later_wave_make_the_barrier_time_out() {
    let named = BarrierSpec {
        members: s(&["a", "b"]),
        ..post()
    };
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 1, 1, 1),
        vec![named],
    ));
    h.prepare_all();
    assert_eq!(commits(&h.log), s(&["a"]));
    h.arrive("a", "post");
    let out = h.tick(h.now + BARRIER);
    // b never committed: it is aborted, a carries on.
    assert_eq!(aborts(&out), s(&["b"]));
    assert_eq!(releases(&out), vec![("a".into(), true)]);
    assert_eq!(h.state_of("b"), N::Failed);
    h.commit("a");
    assert_eq!(commits(&h.log), s(&["a"]), "b is never committed");
    h.outcome("a", Outcome::Permanent);
    assert_eq!(h.r.state(), R::PartiallyRolledBack);
}

// ------------------------------------------------------------------------------------------
// Losing nodes.

#[test]
fn participant_lost_and_back_within_grace_changes_nothing() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![pre()]));
    h.arrive("a", "pre");
    h.at(1_000);
    assert!(h.lost("b").is_empty());
    assert!(!h.node("b").connected);
    assert_eq!(h.r.next_deadline(), Some(1_000 + GRACE));
    h.at(1_000 + GRACE - 1);
    assert!(h.restored("b").is_empty());
    assert!(h.node("b").connected);
    assert!(h.tick(1_000 + GRACE).is_empty());
    assert_eq!(h.r.state(), R::Preparing);
    let out = h.arrive("b", "pre");
    assert_eq!(releases(&out).len(), 2);
}

#[test]
fn participant_lost_for_good_before_ponr_aborts_without_waiting() {
    let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![pre()]));
    h.arrive("a", "pre");
    h.prepare("c");
    h.at(1_000);
    h.lost("b");
    let out = h.tick(1_000 + GRACE);
    // Nothing waits for b: once a and c confirm, the rollout is aborted.
    assert_eq!(h.r.state(), R::Preparing);
    h.confirm_aborted(&["a", "c"]);
    assert_eq!(h.r.state(), R::Aborted);
    // a and c are told at once; b (now failed) is told too, for when it comes back.
    let mut told = aborts(&out);
    told.sort();
    assert_eq!(told, s(&["a", "b", "c"]));
    assert_eq!(h.state_of("b"), N::Failed);
    assert_eq!(h.r.failures(), 1);
    assert!(h.r.error().is_some_and(|e| e.contains("node b lost")));
}

#[test]
fn sigstopped_node_that_resumes_reports_aborted_after_the_rollout_ended() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.at(1_000);
    h.lost("b");
    h.tick(1_000 + GRACE);
    h.outcome("a", Outcome::Aborted);
    assert_eq!(h.state_of("a"), N::Aborted);
    assert_eq!(h.r.state(), R::Aborted, "b is away: nothing waits for it");
    // b comes back: told to abort again; it does.
    let out = h.restored("b");
    assert_eq!(aborts(&out), s(&["b"]));
    let out = h.outcome("b", Outcome::Aborted);
    assert_eq!(h.state_of("b"), N::Aborted);
    assert_eq!(rollout_states(&out), vec![], "the rollout stays aborted");
    assert_eq!(h.r.state(), R::Aborted);
    // Once it confirmed, a reconnect tells it nothing.
    h.lost("b");
    assert!(h.restored("b").is_empty());
}

#[test]
fn participant_lost_for_good_after_ponr_leaves_the_barrier() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![post()],
    ));
    h.prepare_all();
    h.at(10 * SEC);
    h.arrive("a", "post");
    h.arrive("b", "post");
    h.lost("c");
    let out = h.tick(10 * SEC + GRACE);
    assert_eq!(rollbacks(&out), s(&["c"]));
    assert_eq!(h.state_of("c"), N::Failed, "a dead node is not waited for");
    assert_eq!(releases(&out), vec![("a".into(), true), ("b".into(), true)]);
    assert_eq!(h.r.failures(), 1);
    h.commit("a");
    let out = h.commit("b");
    assert_eq!(permanents(&out), s(&["a", "b"]));
    // c comes back: it is told to roll back, never resumed.
    let out = h.restored("c");
    assert_eq!(rollbacks(&out), s(&["c"]));
    h.outcome("c", Outcome::RolledBack);
    assert_eq!(h.state_of("c"), N::RolledBack);
    h.outcome("a", Outcome::Permanent);
    h.outcome("b", Outcome::Permanent);
    assert_eq!(h.r.state(), R::PartiallyRolledBack);
}

#[test]
fn failed_node_coming_back_is_told_to_roll_back_and_its_late_reports_are_ignored() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    h.started_step("b", 3);
    h.at(SEC);
    h.lost("b");
    h.tick(SEC + GRACE);
    assert_eq!(h.state_of("b"), N::Failed);
    // Reports of the old run do not resume it.
    assert!(h.step_ok("b", 3).is_empty());
    assert!(h.outcome("b", Outcome::Committed).is_empty());
    assert_eq!(h.state_of("b"), N::Failed);
    let out = h.restored("b");
    assert_eq!(rollbacks(&out), s(&["b"]));
    assert!(commits(&out).is_empty());
}

// ------------------------------------------------------------------------------------------
// Failures before the point of no return.

#[test]
fn any_failure_before_ponr_aborts_every_other_target() {
    type Fail = fn(&mut H) -> Vec<Command>;
    let cases: Vec<(&str, Fail, NodeState)> = vec![
        ("step failed", |h| h.step_failed("b", 0), N::Preparing),
        (
            "outcome aborted",
            |h| h.outcome("b", Outcome::Aborted),
            N::Aborted,
        ),
        (
            "outcome failed",
            |h| h.outcome("b", Outcome::Failed),
            N::Failed,
        ),
        (
            "script refused",
            |h| {
                h.ev(Event::ScriptRefused {
                    node: "b".into(),
                    epoch: EPOCH,
                    errors: s(&["no hook x"]),
                })
            },
            N::Failed,
        ),
    ];
    for (name, fail, b_state) in cases {
        let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![pre()]));
        h.prepare("a");
        h.arrive("c", "pre");
        let out = fail(&mut h);
        assert_eq!(
            h.r.state(),
            R::Preparing,
            "{name}: aborting until confirmed"
        );
        assert_eq!(aborts(&out), s(&["a", "c"]), "{name}: every other target");
        assert_eq!(rollout_states(&out), vec![R::Preparing], "{name}");
        assert_eq!(h.state_of("b"), b_state, "{name}");
        assert_eq!(h.r.failures(), 1, "{name}");
        assert!(
            h.r.error().is_some_and(|e| e.contains("node b")),
            "{name}: {:?}",
            h.r.error()
        );
        assert!(commits(&h.log).is_empty(), "{name}");
        assert!(
            h.r.next_deadline().is_some(),
            "{name}: confirmations are bounded"
        );
        // The others confirm; b too where it had not said yet. Then the rollout is aborted.
        h.confirm_aborted(&["a", "c"]);
        if b_state == N::Preparing {
            assert_eq!(
                h.r.state(),
                R::Preparing,
                "{name}: b still owes its outcome"
            );
            h.confirm_aborted(&["b"]);
        }
        assert_eq!(
            (h.state_of("a"), h.state_of("c")),
            (N::Aborted, N::Aborted),
            "{name}"
        );
        assert_eq!(h.r.state(), R::Aborted, "{name}");
        assert_eq!(h.r.next_deadline(), None, "{name}");
    }
}

#[test]
fn a_node_whose_step_failed_becomes_aborted_when_it_says_so() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.step_failed("b", 0);
    assert_eq!(h.node("b").error.as_deref(), Some("boom"));
    h.outcome("b", Outcome::Aborted);
    assert_eq!(h.state_of("b"), N::Aborted);
    assert_eq!(h.r.failures(), 1);
}

#[test]
fn a_refused_script_node_stays_failed() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.ev(Event::ScriptRefused {
        node: "b".into(),
        epoch: EPOCH,
        errors: s(&["bad"]),
    });
    assert!(h.outcome("b", Outcome::Aborted).is_empty());
    assert_eq!(h.state_of("b"), N::Failed);
    assert_eq!(h.node("b").error.as_deref(), Some("script refused: bad"));
}

// ------------------------------------------------------------------------------------------
// Failures after the point of no return.

#[test]
fn rollback_node_within_budget_ends_partially_rolled_back() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    h.started_step("b", 3);
    let out = h.step_failed("b", 3);
    assert!(rollbacks(&out).is_empty(), "b rolls back on its own");
    assert_eq!(h.state_of("b"), N::RollingBack);
    assert_eq!(h.r.failures(), 1);
    assert!(
        h.outcome("b", Outcome::RollingBack)
            .iter()
            .all(|c| !matches!(c, Command::Rollback { .. }))
    );
    assert_eq!(h.r.failures(), 1, "each node counts once");
    h.commit("a");
    let out = h.commit("c");
    assert!(permanents(&out).is_empty(), "b has not rolled back yet");
    let out = h.outcome("b", Outcome::RolledBack);
    assert_eq!(permanents(&out), s(&["a", "c"]));
    h.outcome("a", Outcome::Permanent);
    let out = h.outcome("c", Outcome::Permanent);
    assert_eq!(rollout_states(&out), vec![R::PartiallyRolledBack]);
    assert_eq!(h.states(), vec![N::Committed, N::RolledBack, N::Committed]);
    assert!(h.r.error().is_some_and(|e| e.contains('b')));
}

#[test]
fn rollback_node_with_every_node_rolled_back_ends_rolled_back() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 0, 2),
        vec![],
    ));
    h.prepare_all();
    for n in ["a", "b"] {
        h.step_failed(n, 3);
        h.outcome(n, Outcome::RollingBack);
        h.outcome(n, Outcome::RolledBack);
    }
    assert_eq!(h.r.state(), R::RolledBack);
    assert!(permanents(&h.log).is_empty());
    assert_eq!(h.r.failures(), 2);
}

#[test]
fn a_failed_rollback_makes_the_rollout_failed() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    h.step_failed("b", 3);
    h.outcome("b", Outcome::Failed);
    h.commit("a");
    h.outcome("a", Outcome::Permanent);
    assert_eq!(h.r.state(), R::Failed);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("rollback failed on b"))
    );
}

#[test]
fn rollback_all_rolls_back_committed_and_aborts_prepared() {
    let mut h = H::started(spec(
        &["a", "b", "c", "d"],
        policy(OnFailure::RollbackAll, 0, 2, 5),
        vec![],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.step_failed("b", 3);
    assert_eq!(rollbacks(&out), s(&["a"]), "b rolls back on its own");
    assert_eq!(aborts(&out), s(&["c", "d"]), "never committed");
    assert_eq!(
        h.states(),
        vec![N::RollingBack, N::RollingBack, N::Prepared, N::Prepared]
    );
    assert_eq!(h.r.state(), R::Committing);
    h.outcome("a", Outcome::RolledBack);
    h.outcome("b", Outcome::RolledBack);
    h.outcome("c", Outcome::Aborted);
    assert_eq!(h.r.state(), R::Committing, "d has not confirmed");
    let out = h.outcome("d", Outcome::Aborted);
    assert_eq!(rollout_states(&out), vec![R::RolledBack]);
    assert_eq!(h.r.failures(), 1);
    assert!(permanents(&h.log).is_empty());
    assert_eq!(commits(&h.log), s(&["a", "b"]));
}

#[test]
fn rollback_all_where_a_rollback_fails_ends_failed() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackAll, 0, 0, 0),
        vec![],
    ));
    h.prepare_all();
    h.outcome("a", Outcome::RollingBack);
    h.outcome("a", Outcome::RolledBack);
    assert_eq!(h.r.state(), R::Committing);
    h.outcome("b", Outcome::Failed);
    assert_eq!(h.r.state(), R::Failed);
}

#[test]
fn rollback_deadline_marks_the_silent_node_failed_and_finishes() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackAll, 0, 0, 0),
        vec![],
    ));
    h.prepare_all();
    h.at(5 * SEC);
    h.step_failed("a", 3);
    assert_eq!(h.r.next_deadline(), Some(5 * SEC + ROLLBACK));
    h.outcome("a", Outcome::RolledBack);
    let out = h.tick(5 * SEC + ROLLBACK);
    assert_eq!(h.state_of("b"), N::Failed);
    assert!(
        h.node("b")
            .error
            .as_deref()
            .is_some_and(|e| e.contains("rollback not confirmed"))
    );
    assert_eq!(rollout_states(&out), vec![R::RolledBack]);
}

#[test]
fn halt_lets_the_wave_in_flight_finish_and_aborts_the_rest() {
    let mut h = H::started(spec(
        &["a", "b", "c", "d"],
        policy(OnFailure::Halt, 0, 2, 5),
        vec![],
    ));
    h.prepare_all();
    let out = h.step_failed("a", 3);
    assert_eq!(aborts(&out), s(&["c", "d"]));
    assert!(rollbacks(&out).is_empty());
    assert_eq!(h.r.state(), R::Committing);
    // b, in the wave in flight, carries on.
    h.commit("b");
    assert_eq!(h.r.state(), R::Committing, "a is still rolling back");
    let out = h.outcome("a", Outcome::RolledBack);
    assert_eq!(rollout_states(&out), vec![R::Halted]);
    assert_eq!(h.state_of("b"), N::Committed, "left as it is");
    assert!(commits(&h.log).iter().all(|n| n == "a" || n == "b"));
    assert!(permanents(&h.log).is_empty());
    // Late aborts still show.
    h.outcome("c", Outcome::Aborted);
    assert_eq!(h.state_of("c"), N::Aborted);
}

#[test]
fn exceeding_the_budget_turns_into_rollback_all() {
    let mut h = H::started(spec(
        &["a", "b", "c", "d"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.step_failed("b", 3);
    assert!(rollbacks(&out).is_empty(), "within budget");
    let out = h.step_failed("c", 3);
    assert_eq!(rollbacks(&out), s(&["a", "d"]));
    assert!(
        rollout_reasons(&out)
            .iter()
            .any(|r| r.contains("failure budget exceeded: 2 failures, max_failures 1"))
    );
    assert!(
        h.r.error()
            .is_some_and(|e| e.starts_with("failure budget exceeded: 2 failures, max_failures 1"))
    );
    for n in ["a", "b", "c", "d"] {
        h.outcome(n, Outcome::RolledBack);
    }
    assert_eq!(h.r.state(), R::RolledBack);
    assert!(permanents(&h.log).is_empty());
    assert_eq!(h.r.failures(), 2);
}

#[test]
fn a_committed_node_that_rolls_back_later_holds_the_next_wave() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 1, 1),
        vec![],
    ));
    h.prepare_all();
    h.started_step("a", 3);
    h.step_ok("a", 3);
    // Its agent restarted after Committed: it rolls back on its own.
    let out = h.outcome("a", Outcome::Committed);
    assert_eq!(commits(&out), s(&["b"]));
    h.outcome("a", Outcome::RollingBack);
    let out = h.commit("b");
    assert!(commits(&out).is_empty(), "a (wave 1) is not settled");
    let out = h.outcome("a", Outcome::RolledBack);
    assert_eq!(commits(&out), s(&["c"]));
}

// ------------------------------------------------------------------------------------------
// Waves, canary, pause.

#[test]
fn canary_then_waves_commit_in_order_and_one_wave_at_a_time() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 1, 1, 0),
        vec![],
    ));
    assert_eq!(h.r.waves(), 3);
    assert_eq!(
        h.r.nodes().iter().map(|n| n.wave).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    h.prepare("a");
    h.prepare("b");
    assert!(commits(&h.log).is_empty(), "c is not prepared");
    let out = h.prepare("c");
    assert_eq!(commits(&out), s(&["a"]));
    assert_eq!(h.r.current_wave(), 1);
    // Reports from nodes of later waves change nothing.
    assert!(h.started_step("b", 3).is_empty());
    assert!(h.outcome("b", Outcome::Committed).is_empty());
    h.started_step("a", 3);
    assert!(commits(&h.step_ok("a", 3)).is_empty());
    let out = h.outcome("a", Outcome::Committed);
    assert_eq!(commits(&out), s(&["b"]));
    assert_eq!(waves_started(&out), vec![(2, s(&["b"]))]);
    assert_eq!(h.r.current_wave(), 2);
    let out = h.commit("b");
    assert_eq!(commits(&out), s(&["c"]));
    let out = h.commit("c");
    assert_eq!(permanents(&out), s(&["a", "b", "c"]));
    assert_eq!(commits(&h.log), s(&["a", "b", "c"]));
}

#[test]
fn pause_after_canary_waits_for_promote() {
    let mut p = policy(OnFailure::RollbackNode, 1, 0, 0);
    p.pause_after_canary = true;
    let mut h = H::started(spec(&["a", "b", "c"], p, vec![]));
    h.prepare_all();
    let out = h.commit("a");
    assert!(commits(&out).is_empty());
    assert_eq!(rollout_states(&out), vec![R::Paused]);
    assert_eq!(h.r.state(), R::Paused);
    assert!(h.op(Event::OperatorResume).is_err(), "promote, not resume");
    let out = h.op(Event::OperatorPromote).expect("promote applies");
    assert_eq!(commits(&out), s(&["b", "c"]));
    assert_eq!(h.r.state(), R::Committing);
    assert_eq!(h.r.current_wave(), 2);
    assert!(h.op(Event::OperatorPromote).is_err(), "only once");
    h.commit("b");
    let out = h.commit("c");
    assert_eq!(permanents(&out), s(&["a", "b", "c"]));
}

#[test]
fn pause_after_canary_applies_when_the_canary_is_the_only_wave() {
    let mut p = policy(OnFailure::RollbackNode, 2, 0, 0);
    p.pause_after_canary = true;
    let mut h = H::started(spec(&["a", "b"], p, vec![]));
    h.prepare_all();
    h.commit("a");
    h.commit("b");
    assert_eq!(h.r.state(), R::Paused);
    let out = h.op(Event::OperatorPromote).expect("promote applies");
    assert_eq!(permanents(&out), s(&["a", "b"]));
}

#[test]
fn operator_pause_takes_effect_between_waves() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 1, 0),
        vec![],
    ));
    h.prepare_all();
    let out = h.op(Event::OperatorPause).expect("pause applies");
    assert!(records(&out).contains(&&Record::Operator {
        action: "pause".into(),
        reason: Some("takes effect before the next wave starts".into())
    }));
    assert_eq!(h.r.state(), R::Committing, "wave 1 is in flight");
    assert!(h.op(Event::OperatorPause).is_err(), "already pending");
    let out = h.commit("a");
    assert!(commits(&out).is_empty());
    assert_eq!(h.r.state(), R::Paused);
    assert!(h.op(Event::OperatorPromote).is_err(), "not a canary pause");
    let out = h.op(Event::OperatorResume).expect("resume applies");
    assert_eq!(commits(&out), s(&["b"]));
    assert_eq!(h.r.state(), R::Committing);
}

#[test]
fn operator_pause_during_prepare_holds_before_wave_one() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.op(Event::OperatorPause).expect("pause applies");
    h.prepare("a");
    let out = h.prepare("b");
    assert!(commits(&out).is_empty());
    assert_eq!(h.r.state(), R::Paused);
    assert_eq!(h.r.current_wave(), 0);
    let out = h.op(Event::OperatorResume).expect("resume applies");
    assert_eq!(commits(&out), s(&["a", "b"]));
}

#[test]
fn resume_cancels_a_pending_pause() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 1, 0),
        vec![],
    ));
    h.prepare_all();
    h.op(Event::OperatorPause).expect("pause applies");
    h.op(Event::OperatorResume).expect("resume cancels");
    let out = h.commit("a");
    assert_eq!(commits(&out), s(&["b"]));
}

#[test]
fn a_failure_while_paused_before_wave_one_still_aborts() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.op(Event::OperatorPause).expect("pause applies");
    h.prepare_all();
    h.lost("a");
    h.tick(h.now + GRACE);
    assert_eq!(aborts(&h.log), s(&["a", "b"]));
    assert_eq!(
        h.r.state(),
        R::Preparing,
        "aborting: b has not confirmed yet"
    );
    h.confirm_aborted(&["b"]);
    assert_eq!(h.r.state(), R::Aborted);
}

// ------------------------------------------------------------------------------------------
// Operator abort.

#[test]
fn operator_abort_before_ponr_aborts_everyone() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare("a");
    let out = h
        .op(Event::OperatorAbort {
            reason: "bad build".into(),
        })
        .expect("abort applies");
    assert_eq!(aborts(&out), s(&["a", "b"]));
    assert_eq!(h.r.state(), R::Preparing);
    h.confirm_aborted(&["a", "b"]);
    assert_eq!(h.r.state(), R::Aborted);
    assert!(records(&out).contains(&&Record::Operator {
        action: "abort".into(),
        reason: Some("bad build".into())
    }));
    assert_eq!(h.r.error(), Some("aborted by operator: bad build"));
}

#[test]
fn operator_abort_of_a_pending_rollout() {
    let mut h = H::new(spec(&["a"], one_wave(), vec![]));
    let out = h
        .op(Event::OperatorAbort {
            reason: "no".into(),
        })
        .expect("abort applies");
    assert!(no_node_commands(&out), "nothing was sent yet");
    assert_eq!(h.r.state(), R::Aborted);
    assert!(h.ev(Event::Start).is_empty());
}

#[test]
fn operator_abort_after_ponr_rolls_back() {
    let mut h = H::started(spec(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 0, 2, 3),
        vec![],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h
        .op(Event::OperatorAbort {
            reason: "latency".into(),
        })
        .expect("abort applies");
    assert_eq!(rollbacks(&out), s(&["a", "b"]));
    assert_eq!(aborts(&out), s(&["c"]));
    assert!(
        h.op(Event::OperatorAbort {
            reason: "again".into()
        })
        .is_err()
    );
    h.outcome("a", Outcome::RolledBack);
    h.outcome("b", Outcome::RolledBack);
    let out = h.outcome("c", Outcome::Aborted);
    assert_eq!(rollout_states(&out), vec![R::RolledBack]);
    assert_eq!(h.r.failures(), 0, "an operator abort is not a node failure");
}

#[test]
fn operator_abort_while_halting_rolls_everything_back() {
    let mut h = H::started(spec(&["a", "b"], policy(OnFailure::Halt, 0, 0, 0), vec![]));
    h.prepare_all();
    h.commit("a");
    h.step_failed("b", 3);
    let out = h
        .op(Event::OperatorAbort {
            reason: "all of it".into(),
        })
        .expect("abort applies");
    assert_eq!(rollbacks(&out), s(&["a"]));
    h.outcome("a", Outcome::RolledBack);
    h.outcome("b", Outcome::RolledBack);
    assert_eq!(h.r.state(), R::RolledBack);
}

#[test]
fn operator_commands_that_do_not_apply_change_nothing() {
    type Setup = fn() -> H;
    fn pending() -> H {
        H::new(spec(&["a", "b"], one_wave(), vec![]))
    }
    fn preparing() -> H {
        H::started(spec(&["a", "b"], one_wave(), vec![]))
    }
    fn committing() -> H {
        let mut h = preparing();
        h.prepare_all();
        h
    }
    fn canary_paused() -> H {
        let mut p = policy(OnFailure::RollbackNode, 1, 0, 0);
        p.pause_after_canary = true;
        let mut h = H::started(spec(&["a", "b"], p, vec![]));
        h.prepare_all();
        h.commit("a");
        h
    }
    fn rolling_back() -> H {
        let mut h = committing();
        h.step_failed("a", 3);
        h
    }
    fn making_permanent() -> H {
        let mut h = committing();
        h.commit("a");
        h.commit("b");
        h
    }
    fn finished() -> H {
        let mut h = preparing();
        h.step_failed("a", 0);
        h.confirm_aborted(&["a", "b"]);
        h
    }
    let cases: Vec<(&str, Setup, Event, &str)> = vec![
        (
            "pending",
            pending,
            Event::OperatorPause,
            "the rollout has not started",
        ),
        (
            "pending",
            pending,
            Event::OperatorResume,
            "the rollout is not paused",
        ),
        (
            "pending",
            pending,
            Event::OperatorPromote,
            "only a rollout paused after its canary wave can be promoted",
        ),
        (
            "preparing",
            preparing,
            Event::OperatorResume,
            "the rollout is not paused",
        ),
        (
            "preparing",
            preparing,
            Event::OperatorPromote,
            "only a rollout paused after its canary wave can be promoted",
        ),
        (
            "committing",
            committing,
            Event::OperatorResume,
            "the rollout is not paused",
        ),
        (
            "canary",
            canary_paused,
            Event::OperatorPause,
            "the rollout is already paused",
        ),
        (
            "canary",
            canary_paused,
            Event::OperatorResume,
            "paused after the canary wave: promote to continue",
        ),
        (
            "rolling back",
            rolling_back,
            Event::OperatorPause,
            "no further wave will start",
        ),
        (
            "rolling back",
            rolling_back,
            Event::OperatorAbort { reason: "x".into() },
            "every node is already rolling back",
        ),
        (
            "permanent",
            making_permanent,
            Event::OperatorAbort { reason: "x".into() },
            "the new release is already being made permanent",
        ),
        (
            "permanent",
            making_permanent,
            Event::OperatorPause,
            "no further wave will start",
        ),
        (
            "finished",
            finished,
            Event::OperatorAbort { reason: "x".into() },
            "the rollout has already finished",
        ),
        (
            "finished",
            finished,
            Event::OperatorPause,
            "the rollout has already finished",
        ),
        (
            "finished",
            finished,
            Event::OperatorResume,
            "the rollout is not paused",
        ),
        (
            "finished",
            finished,
            Event::OperatorPromote,
            "only a rollout paused after its canary wave can be promoted",
        ),
    ];
    for (name, setup, event, why) in cases {
        let mut h = setup();
        let before = format!("{:?}", h.r);
        let err = h.r.handle(h.now + 1, event.clone()).expect_err(name);
        assert_eq!(err.why, why, "{name} {event:?}");
        assert_eq!(err.state, h.r.state().as_str(), "{name} {event:?}");
        assert_eq!(
            format!("{:?}", h.r),
            before,
            "{name} {event:?} changed the rollout"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Deadlines.

#[test]
fn silent_node_past_its_step_deadline_before_ponr_aborts() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare("a");
    h.at(1_000);
    h.started_step("b", 0);
    assert_eq!(h.r.next_deadline(), Some(1_000 + STEP + SLACK));
    assert!(h.tick(1_000 + STEP + SLACK - 1).is_empty());
    let out = h.tick(1_000 + STEP + SLACK);
    assert_eq!(h.state_of("b"), N::Failed);
    assert!(aborts(&out).contains(&"a".to_string()));
    h.confirm_aborted(&["a"]);
    assert_eq!(h.r.state(), R::Aborted);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("no progress on step 0"))
    );
}

#[test]
fn silent_node_past_its_step_deadline_after_ponr_is_rolled_back() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    h.at(SEC);
    h.started_step("b", 3);
    h.commit("a");
    let out = h.tick(SEC + STEP + SLACK);
    assert_eq!(rollbacks(&out), s(&["b"]));
    assert_eq!(h.state_of("b"), N::Failed);
    assert_eq!(permanents(&out), s(&["a"]), "a dead node is not waited for");
}

#[test]
fn node_waiting_at_a_barrier_or_prepared_has_no_step_deadline() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![pre()]));
    h.at(SEC);
    h.started_step("a", 1);
    h.started_step("b", 1);
    h.at(2 * SEC);
    h.arrive("a", "pre");
    // b's barrier step still guards it (it may never arrive); a's is the barrier's.
    assert_eq!(
        h.r.next_deadline(),
        Some(SEC + BARRIER + SLACK).min(Some(2 * SEC + BARRIER))
    );
    h.arrive("b", "pre");
    // Released: both owe their next report.
    assert_eq!(h.r.next_deadline(), Some(2 * SEC + IDLE));
    h.step_ok("a", 1);
    h.prepared("a");
    h.step_ok("b", 1);
    h.prepared("b");
    // Committing after the last Prepared: each owes a report after Commit.
    assert_eq!(h.r.next_deadline(), Some(2 * SEC + IDLE));
    h.commit("a");
    h.commit("b");
    // Waiting for make-permanent only.
    assert_eq!(h.r.next_deadline(), Some(2 * SEC + CONFIRM));
}

#[test]
fn next_deadline_is_the_earliest_armed() {
    let mut h = H::new(spec(&["a", "b"], one_wave(), vec![pre()]));
    assert_eq!(h.r.next_deadline(), None, "nothing armed before Start");
    h.at(1_000);
    h.ev(Event::Start);
    assert_eq!(
        h.r.next_deadline(),
        Some(1_000 + IDLE),
        "owes ScriptAccepted"
    );
    h.at(2_000);
    h.started_step("a", 0);
    h.started_step("b", 0);
    assert_eq!(h.r.next_deadline(), Some(2_000 + STEP + SLACK));
    h.at(3_000);
    h.lost("a");
    assert_eq!(
        h.r.next_deadline(),
        Some(3_000 + GRACE),
        "grace ends before the step deadline"
    );
    h.at(4_000);
    h.step_ok("a", 0);
    h.step_ok("b", 0);
    assert_eq!(h.r.next_deadline(), Some(3_000 + GRACE));
    h.restored("a");
    assert_eq!(h.r.next_deadline(), Some(4_000 + IDLE));
    h.started_step("a", 1);
    h.arrive("a", "pre");
    h.started_step("b", 1);
    h.arrive("b", "pre");
    h.step_ok("a", 1);
    h.step_ok("b", 1);
    h.prepared("a");
    h.prepared("b");
    // Committing: both owe a report after Commit (armed at 4_000).
    assert_eq!(h.r.next_deadline(), Some(4_000 + IDLE));
    // A late tick handles everything due, earliest first: a (first in order) is silent, which
    // exceeds the budget; b is told to roll back then, and gets its whole allowance from the
    // time the command is actually sent.
    let late = 10_000_000;
    let out = h.tick(late);
    assert_eq!(rollbacks(&out), s(&["a", "b"]));
    assert_eq!(
        (h.state_of("a"), h.state_of("b")),
        (N::Failed, N::RollingBack)
    );
    assert_eq!(h.r.next_deadline(), Some(late + ROLLBACK));
    h.tick(late + ROLLBACK);
    assert_eq!(h.r.state(), R::RolledBack);
    assert_eq!(h.r.next_deadline(), None);
}

#[test]
fn make_permanent_deadline_finishes_with_an_error() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare_all();
    h.commit("a");
    h.at(SEC);
    h.commit("b");
    assert_eq!(h.r.next_deadline(), Some(SEC + CONFIRM));
    h.outcome("a", Outcome::Permanent);
    let out = h.tick(SEC + CONFIRM);
    assert_eq!(rollout_states(&out), vec![R::Succeeded]);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("make_permanent not confirmed") && e.contains('b'))
    );
    assert_eq!(h.r.next_deadline(), None);
}

#[test]
fn a_node_lost_during_make_permanent_is_not_rolled_back() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare_all();
    // b drops before make-permanent is sent, a right after.
    h.lost("b");
    h.commit("a");
    h.at(SEC);
    h.outcome("b", Outcome::Committed);
    assert_eq!(permanents(&h.log), s(&["a", "b"]));
    h.lost("a");
    assert_eq!(
        h.r.next_deadline(),
        Some(SEC + CONFIRM),
        "no grace once told"
    );
    h.outcome("b", Outcome::Permanent);
    let out = h.tick(SEC + CONFIRM);
    assert!(rollbacks(&out).is_empty());
    assert_eq!(h.state_of("a"), N::Committed);
    assert_eq!(h.r.state(), R::Succeeded);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("not confirmed") && e.contains('a'))
    );
}

#[test]
fn tick_before_any_deadline_does_nothing() {
    let mut h = H::started(spec(&["a"], one_wave(), vec![]));
    let before = format!("{:?}", h.r);
    assert!(h.tick(IDLE - 1).is_empty());
    assert_eq!(format!("{:?}", h.r), before);
}

// ------------------------------------------------------------------------------------------
// Stale and unknown input.

#[test]
fn events_from_another_epoch_or_unknown_nodes_are_ignored() {
    let old = EPOCH - 1;
    let events = |node: &str, epoch: u64| {
        let node = node.to_string();
        vec![
            Event::ScriptAccepted {
                node: node.clone(),
                epoch,
            },
            Event::ScriptRefused {
                node: node.clone(),
                epoch,
                errors: vec![],
            },
            Event::StepStarted {
                node: node.clone(),
                epoch,
                step: 0,
            },
            Event::StepSucceeded {
                node: node.clone(),
                epoch,
                step: 0,
                duration_ms: None,
            },
            Event::StepFailed {
                node: node.clone(),
                epoch,
                step: 0,
                error: "x".into(),
                duration_ms: None,
            },
            Event::BarrierArrived {
                node: node.clone(),
                epoch,
                barrier: "pre".into(),
            },
            Event::Prepared {
                node: node.clone(),
                epoch,
            },
            Event::Outcome {
                node: node.clone(),
                epoch,
                outcome: Outcome::Failed,
                error: None,
            },
            Event::Outcome {
                node: node.clone(),
                epoch,
                outcome: Outcome::Aborted,
                error: None,
            },
        ]
    };
    let mut all = events("a", old);
    all.extend(events("zed", EPOCH));
    all.push(Event::SessionLost { node: "zed".into() });
    for event in all {
        let mut h = H::started(spec(&["a", "b"], one_wave(), vec![pre()]));
        let before = format!("{:?}", h.r);
        assert!(h.ev(event.clone()).is_empty(), "{event:?}");
        assert_eq!(format!("{:?}", h.r), before, "{event:?}");
    }
}

#[test]
fn node_events_before_start_are_ignored() {
    let mut h = H::new(spec(&["a"], one_wave(), vec![]));
    assert!(h.prepared("a").is_empty());
    assert!(h.outcome("a", Outcome::Failed).is_empty());
    assert_eq!(h.r.state(), R::Pending);
}

#[test]
fn duplicate_targets_take_part_once() {
    let mut h = H::new(spec(&["a", "b", "a"], one_wave(), vec![]));
    let out = h.ev(Event::Start);
    assert_eq!(run_scripts(&out), s(&["a", "b"]));
}

// ------------------------------------------------------------------------------------------
// Replay.

#[test]
fn replaying_the_same_events_gives_the_same_commands() {
    let script: Vec<(Millis, Event)> = vec![
        (0, Event::Start),
        (
            10,
            Event::Prepared {
                node: "a".into(),
                epoch: EPOCH,
            },
        ),
        (
            20,
            Event::BarrierArrived {
                node: "b".into(),
                epoch: EPOCH,
                barrier: "pre".into(),
            },
        ),
        (30, Event::SessionLost { node: "c".into() }),
        (40_000, Event::Tick),
        (
            50_000,
            Event::Outcome {
                node: "b".into(),
                epoch: EPOCH,
                outcome: Outcome::Aborted,
                error: None,
            },
        ),
    ];
    let run = || {
        let mut r = Rollout::new(spec(&["a", "b", "c"], one_wave(), vec![pre()]), EPOCH, 0);
        let out: Vec<Command> = script
            .iter()
            .flat_map(|(t, e)| r.handle(*t, e.clone()).unwrap_or_default())
            .collect();
        (out, format!("{r:?}"))
    };
    assert_eq!(run(), run());
}

// ------------------------------------------------------------------------------------------
// Property test: random event sequences.

mod random {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const NODES: [&str; 4] = ["a", "b", "c", "d"];

    #[derive(Debug, Clone)]
    enum Op {
        /// The next plausible report of a node, given what the engine shows.
        Progress(usize),
        Step(usize, u32, StepPhase),
        Arrive(usize, &'static str, bool),
        Prepared(usize),
        Outcome(usize, Outcome),
        Refused(usize),
        Lost(usize),
        Restored(usize),
        /// Advance time by this much and tick.
        Tick(Millis),
        /// Tick exactly at the next deadline.
        TickNext,
        Abort,
        Pause,
        Resume,
        Promote,
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Committed),
            Just(Outcome::Aborted),
            Just(Outcome::RollingBack),
            Just(Outcome::RolledBack),
            Just(Outcome::Failed),
            Just(Outcome::Permanent),
        ]
    }

    fn phase() -> impl Strategy<Value = StepPhase> {
        prop_oneof![
            3 => Just(StepPhase::Started),
            3 => Just(StepPhase::Succeeded),
            1 => Just(StepPhase::Failed),
        ]
    }

    fn op(nodes: usize) -> impl Strategy<Value = Op> {
        let n = 0..nodes + 1; // one index past the targets: an unknown node
        // Weighted toward plausible progress so that most runs get past the point of no return
        // (any failure before it aborts), while every kind of input still shows up.
        prop_oneof![
            30 => n.clone().prop_map(Op::Progress),
            2 => (n.clone(), 0u32..7, phase()).prop_map(|(i, s, p)| Op::Step(i, s, p)),
            3 => (n.clone(), prop_oneof![Just("pre"), Just("post"), Just("nope")], any::<bool>())
                .prop_map(|(i, b, stale)| Op::Arrive(i, b, stale)),
            1 => n.clone().prop_map(Op::Prepared),
            1 => (n.clone(), outcome()).prop_map(|(i, o)| Op::Outcome(i, o)),
            1 => n.clone().prop_map(Op::Refused),
            1 => n.clone().prop_map(Op::Lost),
            2 => n.clone().prop_map(Op::Restored),
            3 => (0..6_000u64).prop_map(Op::Tick),
            1 => Just(Op::TickNext),
            1 => Just(Op::Abort),
            1 => Just(Op::Pause),
            1 => Just(Op::Resume),
            2 => Just(Op::Promote),
        ]
    }

    fn scenario() -> impl Strategy<Value = (RolloutSpec, Vec<Op>)> {
        (
            1usize..=4,
            prop_oneof![
                Just(OnFailure::RollbackNode),
                Just(OnFailure::RollbackAll),
                Just(OnFailure::Halt)
            ],
            0u32..3,
            0u32..3,
            0u32..3,
            any::<bool>(),
            prop::sample::subsequence(vec![0usize, 1, 2], 0..=3),
        )
            .prop_flat_map(
                |(n, on_failure, canary, max_in_flight, max_failures, pause, barriers)| {
                    let mut p = policy(on_failure, canary, max_in_flight, max_failures);
                    p.pause_after_canary = pause;
                    let all = [
                        pre(),
                        post(),
                        BarrierSpec {
                            members: s(&["a", "c"]),
                            ..post()
                        },
                    ];
                    let chosen: Vec<BarrierSpec> = barriers
                        .iter()
                        .filter_map(|&b| all.get(b).cloned())
                        // Barrier ids are unique within a script.
                        .fold(Vec::new(), |mut acc: Vec<BarrierSpec>, b| {
                            if !acc.iter().any(|x| x.id == b.id) {
                                acc.push(b);
                            }
                            acc
                        });
                    let spec = spec(&NODES[..n], p, chosen);
                    (Just(spec), prop::collection::vec(op(n), 0..150))
                },
            )
    }

    /// The plausible next report of node `i` given its view.
    fn progress(r: &Rollout, i: usize, sent_permanent: bool) -> Option<Event> {
        let view = r.nodes().get(i)?;
        let node = view.name.clone();
        let epoch = r.epoch();
        Some(match view.state {
            NodeState::Preparing => Event::Prepared { node, epoch },
            NodeState::Committing => match r.barrier() {
                Some(b) if b.id == "post" => Event::BarrierArrived {
                    node,
                    epoch,
                    barrier: b.id,
                },
                _ => Event::Outcome {
                    node,
                    epoch,
                    outcome: Outcome::Committed,
                    error: None,
                },
            },
            NodeState::Committed if sent_permanent => Event::Outcome {
                node,
                epoch,
                outcome: Outcome::Permanent,
                error: None,
            },
            NodeState::RollingBack => Event::Outcome {
                node,
                epoch,
                outcome: Outcome::RolledBack,
                error: None,
            },
            NodeState::Prepared if r.state().is_final() || r.mode != Mode::Normal => {
                Event::Outcome {
                    node,
                    epoch,
                    outcome: Outcome::Aborted,
                    error: None,
                }
            }
            _ => return None,
        })
    }

    fn name(spec: &RolloutSpec, i: usize) -> String {
        spec.targets.get(i).cloned().unwrap_or_else(|| "zed".into())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn invariants_hold_for_random_event_sequences((spec, ops) in scenario()) {
            check(spec, ops)?;
        }
    }

    /// Drive one random sequence and check the invariants after every event.
    fn check(spec: RolloutSpec, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let targets = spec.targets.clone();
        let wave_of: BTreeMap<String, u32> = {
            let r = Rollout::new(spec.clone(), EPOCH, 0);
            r.nodes().iter().map(|n| (n.name.clone(), n.wave)).collect()
        };
        let mut r = Rollout::new(spec.clone(), EPOCH, 0);
        let mut now: Millis = 0;
        let mut inputs: Vec<(Millis, Event)> = vec![(0, Event::Start)];
        let mut outputs: Vec<Result<Vec<Command>, NotApplicable>> = vec![];
        // Node states as told by the records, in order: the history must be complete.
        let mut shadow: BTreeMap<String, NodeState> = targets
            .iter()
            .map(|t| (t.clone(), NodeState::Pending))
            .collect();
        let mut ever_prepared: BTreeMap<String, bool> = BTreeMap::new();
        let mut final_state: Option<RolloutState> = None;
        let mut rolled_back_all = false;
        let mut sent_permanent = false;

        let first = r.handle(now, Event::Start);
        outputs.push(first.clone());
        let mut pending = vec![first];

        for op in ops {
            let event = match op {
                Op::Progress(i) => match progress(&r, i, sent_permanent) {
                    Some(e) => e,
                    None => continue,
                },
                Op::Step(i, step, phase) => {
                    let node = name(&spec, i);
                    match phase {
                        StepPhase::Started => Event::StepStarted {
                            node,
                            epoch: EPOCH,
                            step,
                        },
                        StepPhase::Succeeded => Event::StepSucceeded {
                            node,
                            epoch: EPOCH,
                            step,
                            duration_ms: Some(1),
                        },
                        StepPhase::Failed => Event::StepFailed {
                            node,
                            epoch: EPOCH,
                            step,
                            error: "x".into(),
                            duration_ms: Some(1),
                        },
                    }
                }
                Op::Arrive(i, b, stale) => Event::BarrierArrived {
                    node: name(&spec, i),
                    epoch: if stale { EPOCH - 1 } else { EPOCH },
                    barrier: b.into(),
                },
                Op::Prepared(i) => Event::Prepared {
                    node: name(&spec, i),
                    epoch: EPOCH,
                },
                Op::Outcome(i, outcome) => Event::Outcome {
                    node: name(&spec, i),
                    epoch: EPOCH,
                    outcome,
                    error: None,
                },
                Op::Refused(i) => Event::ScriptRefused {
                    node: name(&spec, i),
                    epoch: EPOCH,
                    errors: vec!["no".into()],
                },
                Op::Lost(i) => Event::SessionLost {
                    node: name(&spec, i),
                },
                Op::Restored(i) => Event::SessionRestored {
                    node: name(&spec, i),
                },
                Op::Tick(dt) => {
                    now += dt;
                    Event::Tick
                }
                Op::TickNext => {
                    // A tick just before the deadline changes nothing.
                    if let Some(at) = r.next_deadline() {
                        prop_assert!(at >= now, "deadline in the past: {at} < {now}");
                        if at > now {
                            let before = format!("{r:?}");
                            let out = r.handle(at - 1, Event::Tick);
                            prop_assert_eq!(out, Ok(vec![]));
                            prop_assert_eq!(format!("{r:?}"), before);
                            inputs.push((at - 1, Event::Tick));
                            outputs.push(Ok(vec![]));
                        }
                        now = now.max(at);
                    }
                    Event::Tick
                }
                Op::Abort => Event::OperatorAbort {
                    reason: "op".into(),
                },
                Op::Pause => Event::OperatorPause,
                Op::Resume => Event::OperatorResume,
                Op::Promote => Event::OperatorPromote,
            };
            let event_kind = match &event {
                Event::Outcome { outcome, .. } => Some(*outcome),
                _ => None,
            };
            let before = format!("{r:?}");
            let result = r.handle(now, event.clone());
            if result.is_err() {
                prop_assert_eq!(format!("{r:?}"), before, "an Err changed the rollout");
            }
            inputs.push((now, event));
            outputs.push(result.clone());
            pending.push(result);

            for result in pending.drain(..) {
                let Ok(cmds) = result else { continue };
                for c in &cmds {
                    match c {
                        Command::Record(Record::NodeState { node, state, .. }) => {
                            shadow.insert(node.clone(), *state);
                            if *state == NodeState::Prepared {
                                ever_prepared.insert(node.clone(), true);
                            }
                        }
                        Command::Commit { node } => {
                            prop_assert!(
                                targets.iter().all(|t| ever_prepared.contains_key(t)),
                                "Commit to {} before every target was prepared",
                                node
                            );
                            let w = wave_of.get(node).copied().unwrap_or(0);
                            for (other, state) in &shadow {
                                let ow = wave_of.get(other).copied().unwrap_or(0);
                                prop_assert!(
                                    ow >= w || state.is_settled(),
                                    "Commit to {} (wave {}) while {} (wave {}) is {:?}",
                                    node,
                                    w,
                                    other,
                                    ow,
                                    state
                                );
                            }
                            prop_assert!(!rolled_back_all, "Commit after rolling everything back");
                        }
                        Command::MakePermanent { .. } => {
                            prop_assert!(!rolled_back_all, "MakePermanent after a rollback_all");
                            sent_permanent = true;
                        }
                        _ => {}
                    }
                }
            }
            if r.mode == Mode::RollingBackAll {
                rolled_back_all = true;
            }
            for n in r.nodes() {
                prop_assert_eq!(
                    shadow.get(&n.name),
                    Some(&n.state),
                    "history misses a state change of {}",
                    n.name
                );
            }
            if let Some(f) = final_state
                && r.state() != f
            {
                // The one correction allowed: a node that had not confirmed make-permanent
                // reports it rolled back or failed after the rollout ended.
                let late = matches!(event_kind, Some(Outcome::RolledBack | Outcome::Failed));
                prop_assert!(
                    late && matches!(
                        f,
                        RolloutState::Succeeded | RolloutState::PartiallyRolledBack
                    ) && matches!(
                        r.state(),
                        RolloutState::PartiallyRolledBack
                            | RolloutState::RolledBack
                            | RolloutState::Failed
                    ),
                    "a final state changed: {:?} -> {:?}",
                    f,
                    r.state()
                );
            }
            if r.state().is_final() {
                final_state = Some(r.state());
                prop_assert_eq!(r.next_deadline(), None);
                prop_assert_eq!(r.barrier(), None);
            }
            prop_assert!(r.failures() as usize <= targets.len());
            prop_assert!(r.current_wave() <= r.waves());
        }

        // Replay: the same inputs give the same outputs.
        let mut again = Rollout::new(spec.clone(), EPOCH, 0);
        let replayed: Vec<_> = inputs
            .into_iter()
            .map(|(t, e)| again.handle(t, e))
            .collect();
        prop_assert_eq!(replayed, outputs);
        prop_assert_eq!(format!("{again:?}"), format!("{r:?}"));
        Ok(())
    }
}

#[test]
fn a_node_away_when_the_rollout_aborts_is_shown_failed_until_it_reports() {
    let mut h = H::started(spec(&["a", "b", "c"], one_wave(), vec![pre()]));
    h.at(1_000);
    h.arrive("a", "pre");
    h.arrive("b", "pre");
    h.started_step("c", 0);
    h.at(10_000);
    h.step_ok("c", 0);
    h.started_step("c", 1);
    // c drops off just before the barrier deadline, which comes before its grace ends.
    h.at(1_000 + BARRIER - 100);
    h.lost("c");
    h.tick(1_000 + BARRIER);
    h.confirm_aborted(&["a", "b"]);
    assert_eq!(
        h.r.state(),
        R::Aborted,
        "nothing waits for the unreachable c"
    );
    assert_eq!(
        h.state_of("c"),
        NodeState::Failed,
        "not forever `preparing`"
    );
    let error = h.node("c").error.clone().unwrap_or_default();
    assert!(error.contains("unreachable"), "{error}");
    // Back, it hears the abort again and its confirmation replaces the guess.
    assert_eq!(aborts(&h.restored("c")), s(&["c"]));
    h.outcome("c", Outcome::Aborted);
    assert_eq!(h.state_of("c"), NodeState::Aborted);
    assert_eq!(h.r.state(), R::Aborted);
}

#[test]
fn a_node_told_to_roll_back_before_its_commit_arrived_may_answer_aborted() {
    let mut h = H::started(spec(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 0, 0, 1),
        vec![],
    ));
    h.prepare_all();
    // Commit went out to both; b's connection died with it and b stays away past the grace.
    h.at(1_000);
    h.lost("b");
    h.commit("a");
    let out = h.tick(1_000 + GRACE);
    assert_eq!(rollbacks(&out), s(&["b"]));
    assert_eq!(h.state_of("b"), NodeState::Failed);
    // b comes back still prepared: it never crossed the point of no return, so it aborts.
    h.restored("b");
    h.outcome("b", Outcome::Aborted);
    assert_eq!(h.state_of("b"), NodeState::Aborted);
    assert_eq!(h.r.failures(), 1, "counted once");
}

// ------------------------------------------------------------------------------------------
// Crash safety: late outcomes after make-permanent, rebuilding an engine from its inputs.

/// Every node prepared and committed; make-permanent sent to all.
fn making_permanent(nodes: &[&str]) -> H {
    let mut h = H::started(spec(nodes, one_wave(), vec![]));
    h.prepare_all();
    for n in nodes {
        h.commit(n);
    }
    assert_eq!(permanents(&h.log), s(nodes));
    h
}

#[test]
fn a_node_that_rolls_back_instead_of_making_permanent_is_not_upgraded() {
    let mut h = making_permanent(&["a", "b"]);
    h.outcome("a", Outcome::Permanent);
    // b's agent restarted before MakePermanent and recovered to the permanent release.
    h.lost("b");
    h.restored("b");
    let out = h.outcome("b", Outcome::RolledBack);
    assert_eq!(h.state_of("b"), N::RolledBack);
    assert_eq!(rollout_states(&out), vec![R::PartiallyRolledBack]);
    assert_eq!(h.r.failures(), 1);
}

#[test]
fn a_late_rollback_after_make_permanent_timed_out_corrects_succeeded() {
    let mut h = making_permanent(&["a", "b"]);
    h.outcome("a", Outcome::Permanent);
    h.lost("b");
    let out = h.tick(CONFIRM);
    assert_eq!(rollout_states(&out), vec![R::Succeeded]);
    assert_eq!(h.r.failures(), 0);
    // b comes back rolled back: the rollout did not upgrade every node after all.
    h.at(CONFIRM + SEC);
    h.restored("b");
    let out = h.outcome("b", Outcome::RolledBack);
    assert_eq!(h.state_of("b"), N::RolledBack);
    assert_eq!(rollout_states(&out), vec![R::PartiallyRolledBack]);
    assert_eq!(h.r.state(), R::PartiallyRolledBack);
    assert_eq!(h.r.failures(), 1);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("node b rolled back after the rollout ended")),
        "{:?}",
        h.r.error()
    );
    assert!(no_node_commands(&out));
    assert_eq!(h.r.next_deadline(), None);
    // A repeat changes nothing.
    assert!(h.outcome("b", Outcome::RolledBack).is_empty());
}

#[test]
fn a_late_rollback_of_the_only_node_makes_the_rollout_rolled_back() {
    let mut h = making_permanent(&["a"]);
    h.tick(CONFIRM);
    assert_eq!(h.r.state(), R::Succeeded);
    let out = h.outcome("a", Outcome::RolledBack);
    assert_eq!(rollout_states(&out), vec![R::RolledBack]);
}

#[test]
fn a_late_failure_after_make_permanent_timed_out_makes_the_rollout_failed() {
    let mut h = making_permanent(&["a", "b"]);
    h.outcome("a", Outcome::Permanent);
    h.tick(CONFIRM);
    let out = h.outcome("b", Outcome::Failed);
    assert_eq!(rollout_states(&out), vec![R::Failed]);
    assert_eq!(h.state_of("b"), N::Failed);
}

#[test]
fn a_node_that_made_the_release_permanent_never_rolls_back_later() {
    let mut h = making_permanent(&["a", "b"]);
    h.outcome("a", Outcome::Permanent);
    h.outcome("b", Outcome::Permanent);
    assert_eq!(h.r.state(), R::Succeeded);
    assert!(h.outcome("b", Outcome::RolledBack).is_empty());
    assert!(h.outcome("a", Outcome::Failed).is_empty());
    assert_eq!(h.r.state(), R::Succeeded);
    assert_eq!(h.state_of("b"), N::Committed);
}

#[test]
fn other_final_states_are_never_corrected() {
    // Aborted before the point of no return: a late outcome changes the node view only.
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare("a");
    h.step_failed("b", 0);
    h.outcome("b", Outcome::Aborted);
    h.outcome("a", Outcome::Aborted);
    assert_eq!(h.r.state(), R::Aborted);
    assert!(rollout_states(&h.outcome("a", Outcome::RolledBack)).is_empty());
    assert_eq!(h.r.state(), R::Aborted);
}

/// A rollout's inputs through a JSON round trip, as the store keeps them.
fn through_json(inputs: &[(Millis, Event)]) -> Vec<(Millis, Event)> {
    inputs
        .iter()
        .map(|(t, e)| {
            let text = serde_json::to_string(e).unwrap_or_else(|err| panic!("{e:?}: {err}"));
            let back: Event =
                serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(&back, e, "{text}");
            (*t, back)
        })
        .collect()
}

#[test]
fn every_event_survives_the_store_round_trip() {
    let node = || "a".to_string();
    let events = vec![
        Event::Start,
        Event::ScriptAccepted {
            node: node(),
            epoch: EPOCH,
        },
        Event::ScriptRefused {
            node: node(),
            epoch: EPOCH,
            errors: vec!["x".into()],
        },
        Event::StepStarted {
            node: node(),
            epoch: EPOCH,
            step: 1,
        },
        Event::StepSucceeded {
            node: node(),
            epoch: EPOCH,
            step: 1,
            duration_ms: Some(3),
        },
        Event::StepSucceeded {
            node: node(),
            epoch: EPOCH,
            step: 1,
            duration_ms: None,
        },
        Event::StepFailed {
            node: node(),
            epoch: EPOCH,
            step: 2,
            error: "e".into(),
            duration_ms: Some(1),
        },
        Event::BarrierArrived {
            node: node(),
            epoch: EPOCH,
            barrier: "pre".into(),
        },
        Event::Prepared {
            node: node(),
            epoch: EPOCH,
        },
        Event::Outcome {
            node: node(),
            epoch: EPOCH,
            outcome: Outcome::RollingBack,
            error: Some("why".into()),
        },
        Event::SessionLost { node: node() },
        Event::SessionRestored { node: node() },
        Event::Tick,
        Event::OperatorAbort { reason: "r".into() },
        Event::OperatorPause,
        Event::OperatorResume,
        Event::OperatorPromote,
    ];
    let inputs: Vec<(Millis, Event)> = events.into_iter().map(|e| (1, e)).collect();
    through_json(&inputs);
}

/// What the coordinator does after a restart: replay the stored inputs into a new engine, then
/// mark every session lost. Barrier state, deadlines and what each node was told come back.
#[test]
fn an_engine_rebuilt_from_its_inputs_continues_where_it_was() {
    let nodes = ["a", "b", "c"];
    let mut h = H::started(spec(&nodes, one_wave(), vec![pre(), post()]));
    let mut inputs: Vec<(Millis, Event)> = vec![(0, Event::Start)];
    let mut feed = |h: &mut H, t: Millis, e: Event| {
        h.at(t);
        inputs.push((t, e.clone()));
        h.ev(e)
    };
    for (k, n) in nodes.iter().enumerate() {
        let t = 100 * (k as Millis + 1);
        feed(
            &mut h,
            t,
            Event::StepSucceeded {
                node: n.to_string(),
                epoch: EPOCH,
                step: 0,
                duration_ms: Some(1),
            },
        );
    }
    // a and b wait at barrier `pre`; c has not arrived when the coordinator dies.
    for n in ["a", "b"] {
        feed(
            &mut h,
            SEC,
            Event::BarrierArrived {
                node: n.to_string(),
                epoch: EPOCH,
                barrier: "pre".into(),
            },
        );
    }
    let barrier = h.r.barrier();
    assert_eq!(barrier.as_ref().map(|b| b.arrived), Some(2));

    let rebuild = |inputs: &[(Millis, Event)]| {
        let mut r = Rollout::new(spec(&nodes, one_wave(), vec![pre(), post()]), EPOCH, 0);
        let mut commands = Vec::new();
        for (t, e) in through_json(inputs) {
            commands.extend(r.handle(t, e).unwrap_or_default());
        }
        (r, commands)
    };
    let (mut r, replayed) = rebuild(&inputs);
    assert_eq!(
        format!("{r:?}"),
        format!("{:?}", h.r),
        "replay rebuilt the same state"
    );
    assert_eq!(replayed, h.log, "replay produced the same commands");
    assert_eq!(r.barrier(), barrier);
    assert_eq!(r.next_deadline(), h.r.next_deadline());

    // Restart at 2 s: every session is lost, the grace runs from the restart.
    let restart = 2 * SEC;
    for n in nodes {
        assert!(no_node_commands(
            &r.handle(restart, Event::SessionLost { node: n.into() })
                .unwrap_or_default()
        ));
    }
    assert!(r.nodes().iter().all(|n| !n.connected));
    // The barrier deadline (first arrival + its timeout) is unchanged and earlier than the
    // grace, so nothing is due at the grace's start.
    assert!(r.next_deadline().is_some_and(|d| d <= restart + GRACE));
    // Everyone is back within the grace; c arrives and the barrier releases a, b and c.
    for n in nodes {
        let out = r
            .handle(restart + SEC, Event::SessionRestored { node: n.into() })
            .unwrap_or_default();
        assert!(no_node_commands(&out), "nothing to re-tell {n}: {out:?}");
    }
    let out = r
        .handle(
            restart + 2 * SEC,
            Event::BarrierArrived {
                node: "c".into(),
                epoch: EPOCH,
                barrier: "pre".into(),
            },
        )
        .unwrap_or_default();
    assert_eq!(
        releases(&out),
        vec![("a".into(), true), ("b".into(), true), ("c".into(), true)]
    );
    assert_eq!(r.state(), R::Preparing);
    assert_eq!(r.failures(), 0);
}

#[test]
fn a_node_that_does_not_come_back_after_a_restart_fails_at_the_end_of_the_grace() {
    let mut h = H::started(spec(&["a", "b"], one_wave(), vec![]));
    h.prepare("a");
    // The coordinator restarted at 1 s: both sessions are lost then.
    h.at(SEC);
    h.lost("a");
    h.lost("b");
    assert_eq!(h.r.next_deadline(), Some(SEC + GRACE));
    h.at(2 * SEC);
    h.restored("a");
    let out = h.tick(SEC + GRACE);
    assert_eq!(h.state_of("b"), N::Failed);
    // Before the point of no return that aborts every node; a hears it now, b when it returns.
    let mut told = aborts(&out);
    told.sort();
    assert_eq!(told, s(&["a", "b"]));
    let out = h.restored("b");
    assert_eq!(aborts(&out), s(&["b"]), "told again when it comes back");
}
