//! Start, prepare, waves, the canary and pauses.

use super::harness::*;

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
            warning: None,
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
fn waves_by_a_label_commit_one_value_at_a_time_in_the_stated_order() {
    let mut p = policy(OnFailure::RollbackNode, 1, 0, 0);
    p.waves_by = Some("zone".into());
    p.order = vec!["b".into(), "a".into()];
    let mut sp = spec(&["a1", "a2", "b1", "b2"], p, vec![]);
    for (node, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        sp.labels
            .insert(node.into(), [("zone".to_string(), zone.to_string())].into());
    }
    let mut h = H::started(sp);
    assert_eq!(h.r.waves(), 3);
    assert_eq!(
        h.r.nodes().iter().map(|n| n.wave).collect::<Vec<_>>(),
        vec![3, 3, 1, 2],
        "canary b1, then zone b's rest, then zone a"
    );
    for node in ["a1", "a2", "b1"] {
        h.prepare(node);
    }
    let out = h.prepare("b2");
    assert_eq!(commits(&out), s(&["b1"]));
    let out = h.commit("b1");
    assert_eq!(waves_started(&out), vec![(2, s(&["b2"]))]);
    let out = h.commit("b2");
    assert_eq!(waves_started(&out), vec![(3, s(&["a1", "a2"]))]);
    h.commit("a1");
    let out = h.commit("a2");
    assert_eq!(permanents(&out), s(&["a1", "a2", "b1", "b2"]));
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
// Dry run.

fn verdicts(cmds: &[Command]) -> Vec<(String, bool, Option<String>)> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::DryRunVerdict {
                node,
                would_commit,
                reason,
            } => Some((node.clone(), *would_commit, reason.clone())),
            _ => None,
        })
        .collect()
}

fn dry(nodes: &[&str]) -> RolloutSpec {
    let mut sp = spec(nodes, policy(OnFailure::RollbackNode, 1, 1, 0), vec![]);
    sp.dry_run = true;
    sp
}

#[test]
fn a_dry_run_prepares_everywhere_then_aborts_and_every_node_would_commit() {
    let mut h = H::started(dry(&["a", "b", "c"]));
    h.prepare("a");
    h.prepare("b");
    let out = h.prepare("c");
    assert!(commits(&h.log).is_empty(), "a dry run never commits");
    assert_eq!(aborts(&out), s(&["a", "b", "c"]));
    h.confirm_aborted(&["a", "b", "c"]);
    assert_eq!(h.r.state(), R::Aborted);
    assert_eq!(
        verdicts(&h.log),
        vec![
            ("a".into(), true, None),
            ("b".into(), true, None),
            ("c".into(), true, None)
        ]
    );
    assert!(
        rollout_reasons(&h.log)
            .iter()
            .any(|r| r.contains("dry run: every node would commit")),
        "{:?}",
        rollout_reasons(&h.log)
    );
}

#[test]
fn a_node_failing_a_dry_run_does_not_stop_the_others_preparing() {
    let mut h = H::started(dry(&["a", "b", "c"]));
    h.ev(Event::ScriptAccepted {
        node: "b".into(),
        epoch: EPOCH,
    });
    h.started_step("b", 0);
    h.step_failed("b", 0);
    let out = h.ev(Event::Outcome {
        node: "b".into(),
        epoch: EPOCH,
        outcome: Outcome::Aborted,
        error: Some("check `ready` failed: exit 1".into()),
    });
    assert!(aborts(&out).is_empty(), "the others go on: {out:?}");
    h.prepare("a");
    let out = h.prepare("c");
    assert_eq!(aborts(&out), s(&["a", "c"]));
    h.confirm_aborted(&["a", "c"]);
    assert_eq!(h.r.state(), R::Aborted);
    let v = verdicts(&h.log);
    assert_eq!(v[0], ("a".into(), true, None));
    assert_eq!(v[2], ("c".into(), true, None));
    assert_eq!(v[1].0, "b");
    assert!(!v[1].1);
    assert!(
        v[1].2.as_deref().is_some_and(|r| r.contains("failed")),
        "{v:?}"
    );
    assert!(commits(&h.log).is_empty());
}

// ------------------------------------------------------------------------------------------
// Windows.

/// 2026-12-07T00:00:00Z, a Monday.
const MONDAY: Millis = 1_796_601_600_000;
const HOUR: Millis = 3_600_000;

fn windowed(window: &str, timeout_s: u64) -> RolloutSpec {
    let mut p = policy(OnFailure::RollbackNode, 1, 0, 0);
    p.windows = vec![hotroll_script::Window::parse(window).unwrap_or_else(|e| panic!("{e}"))];
    p.window_timeout = std::time::Duration::from_secs(timeout_s);
    spec(&["a", "b"], p, vec![])
}

#[test]
fn a_wave_waits_for_its_window_and_starts_when_it_opens() {
    let mut h = H::new(windowed("daily 02:00-05:00 UTC", 24 * 3600));
    h.at(MONDAY + HOUR).ev(Event::Start);
    h.prepare("a");
    let out = h.prepare("b");
    assert!(commits(&out).is_empty(), "outside the window");
    assert_eq!(h.r.waiting_for_window(), Some(MONDAY + 2 * HOUR));
    assert_eq!(h.r.next_deadline(), Some(MONDAY + 2 * HOUR));
    assert!(
        rollout_reasons(&out)
            .iter()
            .any(|r| r.contains("waiting for window: wave 1 starts at 2026-12-07T02:00:00Z")),
        "{:?}",
        rollout_reasons(&out)
    );
    let out = h.tick(MONDAY + 2 * HOUR);
    assert_eq!(commits(&out), s(&["a"]));
    assert!(
        rollout_reasons(&out)
            .iter()
            .any(|r| r.starts_with("window open"))
    );
    assert_eq!(h.r.waiting_for_window(), None);
    // The wave in progress finishes even after the window closes; the next one waits.
    let out = h.at(MONDAY + 6 * HOUR).commit("a");
    assert!(commits(&out).is_empty());
    assert_eq!(
        h.r.waiting_for_window(),
        Some(MONDAY + 26 * HOUR),
        "{:?} {:?}",
        h.r.state(),
        rollout_reasons(&h.log)
    );
    let out = h.tick(MONDAY + 26 * HOUR);
    assert_eq!(commits(&out), s(&["b"]));
    let out = h.commit("b");
    assert_eq!(permanents(&out), s(&["a", "b"]));
}

#[test]
fn a_window_that_never_opens_within_its_timeout_aborts_before_the_point_of_no_return() {
    let mut h = H::new(windowed("daily 02:00-05:00 UTC", 60));
    h.at(MONDAY + HOUR).ev(Event::Start);
    h.prepare("a");
    let out = h.prepare("b");
    assert_eq!(aborts(&out), s(&["a", "b"]));
    h.confirm_aborted(&["a", "b"]);
    assert_eq!(h.r.state(), R::Aborted);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("no window opens within window_timeout 1m")),
        "{:?}",
        h.r.error()
    );
    assert!(commits(&h.log).is_empty());
}

#[test]
fn a_window_that_never_opens_between_waves_halts_the_rollout() {
    let mut h = H::new(windowed("daily 02:00-05:00 UTC", 3600));
    h.at(MONDAY + 2 * HOUR).ev(Event::Start);
    h.prepare("a");
    assert_eq!(commits(&h.prepare("b")), s(&["a"]));
    let out = h.at(MONDAY + 6 * HOUR).commit("a");
    assert_eq!(aborts(&out), s(&["b"]), "b is told to abort: {out:?}");
    h.confirm_aborted(&["b"]);
    assert_eq!(h.r.state(), R::Halted);
    assert_eq!(h.state_of("a"), N::Committed);
}
