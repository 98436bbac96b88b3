//! Failures before the point of no return (abort everyone) and after it (the failure policy).

use super::harness::*;

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
// Aborts and rollbacks that cross a node's own reports.

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
