//! Barriers: release, timeouts before and after the point of no return, wave scoping, stale
//! arrivals, named members.

use super::harness::*;

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
