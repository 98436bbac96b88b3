//! Fleet gates: run in order once a wave's nodes committed, before the next wave or
//! make-permanent; a failed (or overdue) gate rolls the wave back and the policy decides.

use super::harness::*;
use crate::GatePhase;
use hotroll_script::{Comparison, FleetGate, GateSpec, Located, Span};

const GATE_TIMEOUT: Millis = 20 * SEC;
const GATE_INTERVAL: Millis = SEC;

fn gate(name: &str) -> FleetGate {
    FleetGate {
        name: Located::new(name.to_string(), Span::default()),
        gate: GateSpec {
            query: Located::new("rate(errors_total[5s])".to_string(), Span::default()),
            pass_if: Comparison::parse("< 0.5").unwrap_or_else(|e| panic!("{e}")),
            hold: Duration::from_secs(3),
            interval: Duration::from_millis(GATE_INTERVAL),
            timeout: Duration::from_millis(GATE_TIMEOUT),
        },
        span: Span::default(),
    }
}

fn gated(nodes: &[&str], mut policy: RolloutPolicy, gates: &[&str]) -> RolloutSpec {
    policy.gates = gates.iter().map(|g| gate(g)).collect();
    spec(nodes, policy, vec![])
}

fn run_gates(cmds: &[Command]) -> Vec<(u32, u32, String)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::RunGate { wave, gate, name } => Some((*wave, *gate, name.clone())),
            _ => None,
        })
        .collect()
}

fn gate_records(cmds: &[Command]) -> Vec<(u32, String, GatePhase, Option<String>)> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::Gate {
                wave,
                name,
                phase,
                value,
                ..
            } => Some((*wave, name.clone(), *phase, value.clone())),
            _ => None,
        })
        .collect()
}

impl H {
    fn gate(&mut self, wave: u32, gate: u32, passed: bool, value: &str) -> Vec<Command> {
        self.ev(Event::GateResult {
            wave,
            gate,
            passed,
            value: Some(value.to_string()),
            reason: if passed {
                format!("= {value} held < 0.5 for 3s")
            } else {
                format!("= {value}, not < 0.5")
            },
        })
    }
}

#[test]
fn gates_run_in_order_after_each_wave_before_the_next_wave_and_make_permanent() {
    let mut h = H::started(gated(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 1, 0, 0),
        &["errors", "latency"],
    ));
    assert_eq!(commits(&h.prepare_all()), s(&["a"]));
    let out = h.commit("a");
    assert_eq!(run_gates(&out), vec![(1, 0, "errors".to_string())]);
    assert!(commits(&out).is_empty(), "wave 2 waits for the gates");
    assert_eq!(h.r.gate_holding(), Some("errors"));
    assert_eq!(h.r.running_gate(), Some((1, 0)));
    assert_eq!(h.r.state(), R::Committing);

    let out = h.gate(1, 0, true, "0.1");
    assert_eq!(run_gates(&out), vec![(1, 1, "latency".to_string())]);
    assert!(commits(&out).is_empty());
    let out = h.gate(1, 1, true, "0.2");
    assert_eq!(commits(&out), s(&["b"]));
    assert_eq!(h.r.gate_holding(), None);

    let out = h.commit("b");
    assert_eq!(run_gates(&out), vec![(2, 0, "errors".to_string())]);
    assert!(permanents(&out).is_empty(), "the last wave is gated too");
    h.gate(2, 0, true, "0.3");
    let out = h.gate(2, 1, true, "0.4");
    assert_eq!(permanents(&out), s(&["a", "b"]));

    assert_eq!(
        gate_records(&h.log),
        vec![
            (1, "errors".into(), GatePhase::Started, None),
            (1, "errors".into(), GatePhase::Passed, Some("0.1".into())),
            (1, "latency".into(), GatePhase::Started, None),
            (1, "latency".into(), GatePhase::Passed, Some("0.2".into())),
            (2, "errors".into(), GatePhase::Started, None),
            (2, "errors".into(), GatePhase::Passed, Some("0.3".into())),
            (2, "latency".into(), GatePhase::Started, None),
            (2, "latency".into(), GatePhase::Passed, Some("0.4".into())),
        ]
    );
    h.outcome("a", Outcome::Permanent);
    h.outcome("b", Outcome::Permanent);
    assert_eq!(h.r.state(), R::Succeeded);
}

#[test]
fn a_failed_gate_rolls_the_wave_back_and_without_budget_the_whole_rollout() {
    let mut h = H::started(gated(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 1, 0, 0),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.gate(1, 0, false, "7.5");
    assert_eq!(rollbacks(&out), s(&["a"]));
    assert_eq!(aborts(&out), s(&["b", "c"]));
    assert_eq!(h.state_of("a"), N::RollingBack);
    assert!(
        h.node("a")
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gate `errors` failed after wave 1: = 7.5, not < 0.5")),
        "{:?}",
        h.node("a").error
    );
    h.outcome("a", Outcome::RolledBack);
    h.confirm_aborted(&["b", "c"]);
    assert_eq!(h.r.state(), R::RolledBack);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("failure budget exceeded") && e.contains("7.5")),
        "{:?}",
        h.r.error()
    );
    assert!(commits(&h.log) == s(&["a"]), "no other wave started");
}

#[test]
fn a_failed_gate_within_the_budget_rolls_back_its_wave_only() {
    let mut h = H::started(gated(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 1, 0, 1),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.gate(1, 0, false, "0.9");
    assert_eq!(rollbacks(&out), s(&["a"]));
    assert!(aborts(&out).is_empty());
    assert!(
        commits(&out).is_empty(),
        "the next wave waits for the rollback"
    );
    let out = h.outcome("a", Outcome::RolledBack);
    assert_eq!(commits(&out), s(&["b"]));
    let out = h.commit("b");
    assert_eq!(run_gates(&out), vec![(2, 0, "errors".to_string())]);
    let out = h.gate(2, 0, true, "0.1");
    assert_eq!(permanents(&out), s(&["b"]));
    h.outcome("b", Outcome::Permanent);
    assert_eq!(h.r.state(), R::PartiallyRolledBack);
    assert_eq!(h.r.failures(), 1);
}

#[test]
fn a_failed_gate_under_halt_rolls_its_wave_back_and_halts() {
    let mut h = H::started(gated(
        &["a", "b"],
        policy(OnFailure::Halt, 1, 0, 0),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.gate(1, 0, false, "3");
    assert_eq!(rollbacks(&out), s(&["a"]));
    assert_eq!(aborts(&out), s(&["b"]));
    h.outcome("a", Outcome::RolledBack);
    h.confirm_aborted(&["b"]);
    assert_eq!(h.r.state(), R::Halted);
}

#[test]
fn a_gate_whose_result_never_comes_fails_at_its_deadline() {
    let mut h = H::started(gated(
        &["a"],
        policy(OnFailure::RollbackNode, 0, 0, 0),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    let deadline = h.now + GATE_TIMEOUT + GATE_INTERVAL + SLACK;
    assert_eq!(h.r.next_deadline(), Some(deadline));
    assert!(rollbacks(&h.tick(deadline - 1)).is_empty());
    let out = h.tick(deadline);
    assert_eq!(rollbacks(&out), s(&["a"]));
    let failed = gate_records(&out);
    assert_eq!(failed, vec![(1, "errors".into(), GatePhase::Failed, None)]);
    h.outcome("a", Outcome::RolledBack);
    assert_eq!(h.r.state(), R::RolledBack);
    assert!(
        h.r.error()
            .is_some_and(|e| e.contains("no result within 23000 ms")),
        "{:?}",
        h.r.error()
    );
}

#[test]
fn stale_and_repeated_gate_results_change_nothing() {
    let mut h = H::started(gated(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 1, 0, 0),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    assert!(h.gate(2, 0, false, "9").is_empty(), "another wave's result");
    assert!(h.gate(1, 3, false, "9").is_empty(), "another gate's result");
    assert_eq!(h.r.running_gate(), Some((1, 0)));
    assert_eq!(commits(&h.gate(1, 0, true, "0.1")), s(&["b"]));
    assert!(
        h.gate(1, 0, false, "9").is_empty(),
        "a repeat after the pass"
    );
    assert_eq!(h.state_of("a"), N::Committed);
}

#[test]
fn an_operator_abort_while_a_gate_runs_rolls_back_and_a_late_result_is_only_recorded() {
    let mut h = H::started(gated(
        &["a", "b"],
        policy(OnFailure::RollbackNode, 1, 0, 0),
        &["errors"],
    ));
    h.prepare_all();
    h.commit("a");
    let out = h.ev(Event::OperatorAbort {
        reason: "stop".into(),
    });
    assert_eq!(rollbacks(&out), s(&["a"]));
    let out = h.gate(1, 0, true, "0.1");
    assert!(no_node_commands(&out), "{out:?}");
    h.outcome("a", Outcome::RolledBack);
    h.confirm_aborted(&["b"]);
    assert_eq!(h.r.state(), R::RolledBack);
    assert_eq!(h.r.next_deadline(), None);
}

#[test]
fn a_wave_whose_nodes_all_failed_is_not_gated() {
    let mut h = H::started(gated(
        &["a", "b", "c"],
        policy(OnFailure::RollbackNode, 1, 0, 1),
        &["errors"],
    ));
    h.prepare_all();
    h.started_step("a", 3);
    h.step_failed("a", 3);
    let out = h.outcome("a", Outcome::RolledBack);
    assert!(run_gates(&out).is_empty());
    assert_eq!(commits(&out), s(&["b", "c"]));
}
