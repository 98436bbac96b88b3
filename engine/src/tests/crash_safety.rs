//! Replay and crash safety: replaying gives the same commands, late outcomes after
//! make-permanent, rebuilding an engine from its stored inputs.

use super::harness::*;

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
            warning: None,
        },
        Event::StepSucceeded {
            node: node(),
            epoch: EPOCH,
            step: 1,
            duration_ms: None,
            warning: None,
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
                warning: None,
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
