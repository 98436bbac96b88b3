//! Property test: random event sequences, checking the invariants after every event and that
//! replaying the inputs gives the same outputs.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::harness::*;

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
        NodeState::Prepared if r.state().is_final() || r.mode != Mode::Normal => Event::Outcome {
            node,
            epoch,
            outcome: Outcome::Aborted,
            error: None,
        },
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
                        warning: None,
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
