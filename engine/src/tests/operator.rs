//! Operator commands: abort, and every command where it does not apply.

use super::harness::*;

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
