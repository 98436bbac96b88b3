//! Stale and unknown input: other epochs, unknown nodes, events before start, duplicates.

use super::harness::*;

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
                warning: None,
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
