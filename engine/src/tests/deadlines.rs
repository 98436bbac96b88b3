//! Deadlines: silent nodes, the next deadline, make-permanent confirmations, early ticks.

use super::harness::*;

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
