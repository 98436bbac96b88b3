//! The driver never acts on an undurable decision. With a store that fails on demand and fake
//! node sessions (the registry's queues, read by the test, which answers like an agent): no
//! node hears a command of a step the store did not take, status says the rollout holds, and
//! once the store heals the rollout ends as it would have, with a stored history that is what
//! the nodes were told.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::spec::{StartedWith, build_spec, script_to_run};
use super::{RolloutError, RolloutTiming, Rollouts};
use crate::engine::{Event, Outcome, Record, Rollout, RolloutState};
use crate::outbound::{NodeCommand, Order, Outbound};
use crate::registry::Registry;
use crate::store::faults::{FailingStore, INJECTED_ERROR};
use crate::store::{Commit, NodeRecord, RolloutSnapshot, Store};

const SCRIPT: &str = r#"
app = "x"
from = "1"
to = "2"
[rollout]
barrier_timeout = "60s"
step_timeout = "60s"
[script]
up = [
  { apply = { hook = "pre" } },
  { sync_nodes = "b" },
  "point_of_no_return",
  { apply = { hook = "post" } },
]
"#;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// A rollout over three fake nodes, on a store that fails on demand.
struct Fleet {
    store: Arc<FailingStore>,
    rollouts: Rollouts,
    sessions: BTreeMap<String, mpsc::Receiver<Outbound>>,
    /// Every command each node has received, in order.
    told: BTreeMap<String, Vec<NodeCommand>>,
    /// The same, as queued: the shared commands themselves, in the order they were read.
    queued: Vec<(String, Arc<NodeCommand>)>,
    id: String,
}

impl Fleet {
    fn new(store: Arc<FailingStore>) -> Self {
        let dyn_store: Arc<dyn Store> = store.clone();
        let registry =
            Arc::new(Registry::load(dyn_store.clone()).unwrap_or_else(|e| panic!("{e}")));
        let mut sessions = BTreeMap::new();
        for node in NODES {
            let (tx, rx) = mpsc::channel(256);
            let record = NodeRecord {
                name: node.into(),
                ..NodeRecord::default()
            };
            registry
                .attach(record, tx, "test".into())
                .unwrap_or_else(|e| panic!("{e}"));
            sessions.insert(node.to_string(), rx);
        }
        let rollouts = Rollouts::new(
            dyn_store,
            registry,
            RolloutTiming {
                session_grace: Duration::from_secs(60),
                step_slack: Duration::from_secs(5),
            },
        );
        Self {
            store,
            rollouts,
            sessions,
            told: BTreeMap::new(),
            queued: Vec::new(),
            id: String::new(),
        }
    }

    fn start(&mut self) {
        let parsed = hotroll_script::parse("s.toml", SCRIPT)
            .unwrap_or_else(|d| panic!("{}", d.to_short_lines().join("\n")));
        self.id = self
            .rollouts
            .start(super::NewRollout {
                script_name: "s.toml".into(),
                script_source: SCRIPT.into(),
                script: parsed.script,
                artifacts: Vec::new(),
                targets: NODES.iter().map(|n| n.to_string()).collect(),
                left_out: Vec::new(),
                not_connected: Vec::new(),
                labels: Default::default(),
                dry_run: false,
            })
            .unwrap_or_else(|e| panic!("{e}"))
            .id;
    }

    fn status(&self) -> RolloutSnapshot {
        self.rollouts
            .status(&self.id)
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    /// Read every session queue and answer each command like an agent running the script.
    fn pump(&mut self) {
        let mut answers = Vec::new();
        for (node, rx) in &mut self.sessions {
            while let Ok(outbound) = rx.try_recv() {
                let Outbound::Rollout(command, _) = outbound else {
                    continue;
                };
                answers.extend(agent_answer(node, &command));
                self.told
                    .entry(node.clone())
                    .or_default()
                    .push(NodeCommand::clone(&command));
                self.queued.push((node.clone(), command));
            }
        }
        for event in answers {
            self.rollouts.deliver(&self.id, event);
        }
    }

    /// Pump until `done` holds (fails after 10 s).
    async fn pump_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        for _ in 0..1000 {
            self.pump();
            if done(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "never got to: {what}; status {:?}, told {:?}",
            self.status(),
            self.told
        );
    }

    /// What the nodes would have been told by the steps the store holds: the engine replayed
    /// over the stored inputs. Also checks that the stored history is what that replay records.
    fn stored_commands(&self) -> BTreeMap<String, Vec<NodeCommand>> {
        let store = self.store.inner();
        let record = store
            .get_rollout(&self.id)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no record"));
        let script = hotroll_script::parse(&record.script_name, &record.script_source)
            .unwrap_or_else(|d| panic!("{}", d.to_short_lines().join("\n")))
            .script;
        let spec = build_spec(
            &record.id,
            &script,
            &StartedWith::of(&record),
            Duration::from_millis(record.session_grace_ms.unwrap_or_default()),
            Duration::from_millis(record.step_slack_ms.unwrap_or_default()),
        );
        let mut engine = Rollout::new(spec, record.epoch, record.created_ms);
        let run = Arc::new(script_to_run(&record, &script));
        let mut commands: BTreeMap<String, Vec<NodeCommand>> = BTreeMap::new();
        let mut records = Vec::new();
        for input in store.inputs(&self.id).unwrap_or_else(|e| panic!("{e}")) {
            let Ok(out) = engine.handle(input.at_ms, input.event) else {
                continue;
            };
            for command in &out {
                if let crate::engine::Command::Record(r) = command {
                    records.push(r.clone());
                }
                if let (Some(node), Some(c)) = (
                    NodeCommand::addressee(command),
                    NodeCommand::from_engine(&record.id, record.epoch, &run, command),
                ) {
                    commands.entry(node.to_string()).or_default().push(c);
                }
            }
        }
        let history: Vec<Record> = store
            .events(&self.id, 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|e| e.record)
            .collect();
        assert_eq!(history, records, "the stored history is the replay's");
        commands
    }
}

/// What an agent running [`SCRIPT`] reports when it gets `command`.
fn agent_answer(node: &str, command: &NodeCommand) -> Vec<Event> {
    let node = node.to_string();
    let epoch = command.epoch;
    let step = |step, ok: bool| {
        if ok {
            Event::StepSucceeded {
                node: node.clone(),
                epoch,
                step,
                duration_ms: Some(1),
                warning: None,
            }
        } else {
            Event::StepStarted {
                node: node.clone(),
                epoch,
                step,
            }
        }
    };
    let outcome = |outcome| Event::Outcome {
        node: node.clone(),
        epoch,
        outcome,
        error: None,
    };
    match &command.order {
        Order::RunScript(_) => vec![
            Event::ScriptAccepted {
                node: node.clone(),
                epoch,
            },
            step(0, false),
            step(0, true),
            step(1, false),
            Event::BarrierArrived {
                node: node.clone(),
                epoch,
                barrier: "b".into(),
            },
        ],
        Order::ReleaseBarrier { ok: true, .. } => vec![
            step(1, true),
            Event::Prepared {
                node: node.clone(),
                epoch,
            },
        ],
        Order::ReleaseBarrier { ok: false, .. } | Order::Abort { .. } => {
            vec![outcome(Outcome::Aborted)]
        }
        Order::Commit => vec![step(3, false), step(3, true), outcome(Outcome::Committed)],
        Order::MakePermanent => vec![outcome(Outcome::Permanent)],
        Order::Rollback { .. } => vec![outcome(Outcome::RolledBack)],
    }
}

/// What kind of command it is, for counting.
fn kind(command: &NodeCommand) -> &'static str {
    match command.order {
        Order::RunScript(_) => "run_script",
        Order::ReleaseBarrier { .. } => "release_barrier",
        Order::Commit => "commit",
        Order::Abort { .. } => "abort",
        Order::Rollback { .. } => "rollback",
        Order::MakePermanent => "make_permanent",
    }
}

fn has_record(commit: &Commit<'_>, pick: impl Fn(&Record) -> bool) -> bool {
    commit.events.iter().any(|e| pick(&e.record))
}

fn has_input(commit: &Commit<'_>, pick: impl Fn(&Event) -> bool) -> bool {
    commit.inputs.iter().any(|i| pick(&i.event))
}

/// The store trips on the first commit `trigger` matches; the rollout must hold with nothing
/// of that step sent, then finish as it would have once the store heals.
async fn holds_then_finishes(
    trigger: impl Fn(&Commit<'_>) -> bool + Send + Sync + 'static,
    withheld: &[&str],
) {
    let store = Arc::new(FailingStore::default());
    let mut fleet = Fleet::new(store.clone());
    store.fail_from(trigger);
    fleet.start();
    fleet
        .pump_until("the store trips", |f| f.store.is_failing())
        .await;
    fleet
        .pump_until("status says held", |f| f.status().held_on_store.is_some())
        .await;
    // Give the driver time for several retries and the nodes time to answer anything sent.
    for _ in 0..40 {
        fleet.pump();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.failed_commits() >= 2, "the held commit is retried");
    assert_eq!(
        fleet.told,
        fleet.stored_commands(),
        "while held, the nodes have been told exactly what the store holds"
    );
    let told_kinds: Vec<&str> = fleet.told.values().flatten().map(kind).collect();
    for kind in withheld {
        assert!(
            !told_kinds.contains(kind),
            "no {kind} leaves while held: {told_kinds:?}"
        );
    }
    let status = fleet.status();
    let hold = status
        .held_on_store
        .clone()
        .unwrap_or_else(|| panic!("held"));
    assert!(
        hold.error.contains("cannot store the rollout's step")
            && hold.error.contains(INJECTED_ERROR),
        "{}",
        hold.error
    );
    assert!(hold.since_ms >= status.created_ms);
    match fleet
        .rollouts
        .operate(&fleet.id, Event::OperatorPause)
        .await
    {
        Err(RolloutError::Held(h)) => assert_eq!(h.error, hold.error),
        other => panic!("an operator command while held: {other:?}"),
    }

    store.heal();
    fleet
        .pump_until("the rollout succeeds", |f| {
            f.status().state == RolloutState::Succeeded
        })
        .await;
    fleet.pump();
    let status = fleet.status();
    assert_eq!(status.held_on_store, None, "no longer held");
    assert_eq!(
        fleet.told,
        fleet.stored_commands(),
        "the stored history is what the nodes were told"
    );
    for node in NODES {
        let kinds: Vec<&str> = fleet.told[node].iter().map(kind).collect();
        assert_eq!(
            kinds,
            ["run_script", "release_barrier", "commit", "make_permanent"],
            "{node} is told each command once, in order"
        );
    }
    let seqs: Vec<u64> = store
        .inner()
        .events(&fleet.id, 0)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
}

#[tokio::test]
async fn a_failed_commit_before_the_point_of_no_return_holds_the_barrier_release() {
    holds_then_finishes(
        |c| has_record(c, |r| matches!(r, Record::BarrierReleased { .. })),
        &["release_barrier", "commit"],
    )
    .await;
}

#[tokio::test]
async fn a_failed_commit_of_the_commit_decision_sends_no_commit() {
    holds_then_finishes(
        |c| has_record(c, |r| matches!(r, Record::WaveStarted { .. })),
        &["commit", "make_permanent"],
    )
    .await;
}

#[tokio::test]
async fn a_failed_commit_after_the_point_of_no_return_holds_make_permanent() {
    holds_then_finishes(
        |c| {
            has_input(c, |e| {
                matches!(
                    e,
                    Event::Outcome {
                        outcome: Outcome::Committed,
                        ..
                    }
                )
            })
        },
        &["make_permanent"],
    )
    .await;
}

#[tokio::test]
async fn a_failed_commit_during_make_permanent_holds_the_end() {
    holds_then_finishes(
        |c| {
            has_input(c, |e| {
                matches!(
                    e,
                    Event::Outcome {
                        outcome: Outcome::Permanent,
                        ..
                    }
                )
            })
        },
        &[],
    )
    .await;
}

/// Inputs that arrive while held are not lost: they wait, and go through the engine in order
/// once the store takes the held step (here: the nodes' reports that arrive during the hold).
#[tokio::test]
async fn a_rollout_held_before_it_starts_sends_nothing_until_the_store_heals() {
    let store = Arc::new(FailingStore::default());
    let mut fleet = Fleet::new(store.clone());
    store.fail_from(|c| has_input(c, |e| *e == Event::Start));
    fleet.start();
    fleet
        .pump_until("status says held", |f| f.status().held_on_store.is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.pump();
    assert!(fleet.told.is_empty(), "nothing sent: {:?}", fleet.told);
    assert_eq!(
        fleet.status().state,
        RolloutState::Pending,
        "the durable state"
    );
    store.heal();
    fleet
        .pump_until("the rollout succeeds", |f| {
            f.status().state == RolloutState::Succeeded
        })
        .await;
    assert_eq!(fleet.told, fleet.stored_commands());
}

/// A command the same for every node is one command, queued to each: its wire form is then
/// encoded once for the whole fan-out (`outbound::WireForm`).
#[tokio::test]
async fn a_command_to_every_node_is_one_shared_command() {
    let store = Arc::new(FailingStore::default());
    let mut fleet = Fleet::new(store);
    fleet.start();
    fleet
        .pump_until("the rollout succeeds", |f| {
            f.status().state == RolloutState::Succeeded
        })
        .await;
    for wanted in ["run_script", "release_barrier", "commit", "make_permanent"] {
        let sent: Vec<&(String, Arc<NodeCommand>)> = fleet
            .queued
            .iter()
            .filter(|(_, c)| kind(c) == wanted)
            .collect();
        assert_eq!(sent.len(), NODES.len(), "{wanted} to every node: {sent:?}");
        assert!(
            sent.iter().all(|(_, c)| Arc::ptr_eq(c, &sent[0].1)),
            "one {wanted} shared by every node: {sent:?}"
        );
    }
    // What one session encodes, the others reuse; a clone (which may be changed) starts over.
    let (_, release) = fleet
        .queued
        .iter()
        .find(|(_, c)| kind(c) == "release_barrier")
        .unwrap_or_else(|| panic!("no release"));
    let mut encodes = 0;
    for (_, command) in fleet.queued.iter().filter(|(_, c)| Arc::ptr_eq(c, release)) {
        command.wire.get_or_encode(|| {
            encodes += 1;
            bytes::Bytes::from_static(b"wire form")
        });
    }
    assert_eq!(encodes, 1, "encoded once for the fan-out");
    assert!(!NodeCommand::clone(release).wire.is_encoded());
}
