use super::driver::RETIRE_AFTER;
use super::*;
use crate::engine::{NodeState, Outcome, Record, RolloutState};
use crate::store::MemoryStore;

const SCRIPT: &str = r#"
app = "x"
from = "1"
to = "2"
[rollout]
barrier_timeout = "30s"
step_timeout = "30s"
[script]
up = [ { sync_nodes = "b" }, "point_of_no_return" ]
"#;

fn rollouts(store: &Arc<dyn Store>) -> Rollouts {
    let registry = Arc::new(Registry::load(store.clone()).unwrap_or_else(|e| panic!("{e}")));
    Rollouts::new(
        store.clone(),
        registry,
        RolloutTiming {
            session_grace: Duration::from_secs(60),
            step_slack: Duration::from_secs(5),
        },
    )
}

fn new_rollout() -> NewRollout {
    let parsed = hotroll_script::parse("s.toml", SCRIPT)
        .unwrap_or_else(|d| panic!("{}", d.to_short_lines().join("\n")));
    NewRollout {
        script_name: "s.toml".into(),
        script_source: SCRIPT.into(),
        script: parsed.script,
        artifacts: Vec::new(),
        targets: vec!["a".into(), "b".into()],
        left_out: Vec::new(),
        not_connected: Vec::new(),
        labels: Default::default(),
        dry_run: false,
    }
}

/// Poll the rollout's status until `done` holds (the driver works asynchronously).
async fn wait(rollouts: &Rollouts, id: &str, done: impl Fn(&RolloutSnapshot) -> bool) {
    for _ in 0..500 {
        if let Ok((s, _)) = rollouts.status(id)
            && done(&s)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("status of {id} never got there: {:?}", rollouts.status(id));
}

fn arrive(node: &str) -> Event {
    Event::BarrierArrived {
        node: node.into(),
        epoch: 1,
        barrier: "b".into(),
    }
}

/// A finished rollout leaves memory (its task retires) but not the record: status comes
/// from the store with every node's final state, and operator commands are refused as for
/// any finished rollout.
#[tokio::test(start_paused = true)]
async fn a_finished_rollout_retires_and_is_served_from_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let rollouts = rollouts(&store);
    let id = rollouts
        .start(new_rollout())
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let abort = Event::OperatorAbort {
        reason: "test".into(),
    };
    rollouts
        .operate(&id, abort.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for node in ["a", "b"] {
        rollouts.deliver(
            &id,
            Event::Outcome {
                node: node.into(),
                epoch: 1,
                outcome: Outcome::Aborted,
                error: None,
            },
        );
    }
    wait(&rollouts, &id, |s| s.state == RolloutState::Aborted).await;
    assert!(
        rollouts.lock().contains_key(&id),
        "running until it retires"
    );
    tokio::time::sleep(RETIRE_AFTER + Duration::from_secs(1)).await;
    assert!(!rollouts.lock().contains_key(&id), "retired");
    let (status, names) = rollouts.status(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.state, RolloutState::Aborted);
    assert!(status.nodes.iter().all(|n| n.state == NodeState::Aborted));
    assert_eq!(names.as_slice(), ["sync_nodes", "point_of_no_return"]);
    match rollouts.operate(&id, abort).await {
        Err(RolloutError::NotApplicable(n)) => assert_eq!(n.state, "aborted"),
        other => panic!("abort of a retired rollout: {other:?}"),
    }
    assert_eq!(rollouts.list(10).unwrap_or_else(|e| panic!("{e}")).len(), 1);
}

#[tokio::test]
async fn a_restarted_coordinator_rebuilds_an_unfinished_rollout() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let first = rollouts(&store);
    let id = first
        .start(new_rollout())
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    first.deliver(&id, arrive("a"));
    wait(&first, &id, |s| {
        s.barrier.as_ref().is_some_and(|b| b.arrived == 1)
    })
    .await;
    let before = first.status(&id).unwrap_or_else(|e| panic!("{e}")).0;
    let inputs = store.inputs(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inputs.first().map(|i| &i.event), Some(&Event::Start));

    // The "restart": a new coordinator over the same store.
    let second = rollouts(&store);
    assert_eq!(
        second.recover().unwrap_or_else(|e| panic!("{e}")),
        vec![id.clone()]
    );
    let (after, names) = second.status(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.barrier, before.barrier, "the barrier survives");
    assert_eq!(after.state, RolloutState::Preparing);
    assert!(
        after.nodes.iter().all(|n| !n.connected),
        "sessions lost at the restart"
    );
    assert_eq!(names.as_slice(), ["sync_nodes", "point_of_no_return"]);
    // The history goes on where it stopped.
    let seqs: Vec<u64> = store
        .events(&id, 0)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // b arrives at the rebuilt coordinator: the barrier (with a's arrival) releases, and
    // both prepared start the commit.
    second.deliver(&id, arrive("b"));
    wait(&second, &id, |s| s.barrier.is_none()).await;
    for node in ["a", "b"] {
        second.deliver(
            &id,
            Event::Prepared {
                node: node.into(),
                epoch: 1,
            },
        );
    }
    wait(&second, &id, |s| s.state == RolloutState::Committing).await;
    let events = store.events(&id, 0).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        events.iter().any(
            |e| matches!(&e.record, Record::BarrierReleased { barrier, .. } if barrier == "b")
        )
    );
}

#[tokio::test]
async fn a_rollout_stored_but_never_started_starts_after_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let first = rollouts(&store);
    let id = first
        .start(new_rollout())
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    wait(&first, &id, |s| s.state == RolloutState::Preparing).await;
    // Forget the inputs and go back to the stored-but-pending record: as if the coordinator
    // died between storing the rollout and starting it.
    let pending = {
        let mut record = store
            .get_rollout(&id)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no record"));
        record.status.state = RolloutState::Pending;
        record.id = format!("{id}-pending");
        record.status.id = record.id.clone();
        record
    };
    store
        .put_rollout(&pending)
        .unwrap_or_else(|e| panic!("{e}"));
    let second = rollouts(&store);
    let recovered = second.recover().unwrap_or_else(|e| panic!("{e}"));
    assert!(recovered.contains(&pending.id), "{recovered:?}");
    let (status, _) = second.status(&pending.id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.state, RolloutState::Preparing);
    let events: Vec<Event> = store
        .inputs(&pending.id)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|i| i.event)
        .collect();
    assert_eq!(
        events,
        vec![
            Event::Start,
            Event::SessionLost { node: "a".into() },
            Event::SessionLost { node: "b".into() },
        ]
    );
}

/// A script with fleet gates needs a Prometheus to ask: without one the rollout does not start
/// (nothing is stored or sent), and the error names the gates and the flag.
#[tokio::test(start_paused = true)]
async fn a_script_with_gates_does_not_start_without_a_prometheus() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let rollouts = rollouts(&store);
    let source = r#"
app = "x"
from = "1"
to = "2"
[[rollout.gates]]
name = "errors"
query = "up"
pass_if = "> 0"
[script]
up = [ { sync_nodes = "b" }, "point_of_no_return" ]
"#
    .to_string();
    let parsed = hotroll_script::parse("s.toml", &source)
        .unwrap_or_else(|d| panic!("{}", d.to_short_lines().join("\n")));
    let mut new = new_rollout();
    new.script_source = source;
    new.script = parsed.script;
    let error = rollouts.start(new).err().map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "the script has fleet gates (errors) but no Prometheus is configured on the \
             coordinator (hotroll serve --prometheus URL)"
        )
    );
    assert!(store.list_rollouts().unwrap_or_default().is_empty());
}
