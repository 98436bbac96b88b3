//! Losing nodes: sessions dropping within and past the grace period, nodes coming back.

use super::harness::*;

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
