//! The driver's store-fault cases with real agents: an in-process fleet (the coordinator on a
//! store that fails on demand, three agents running hooks) whose store fails before the point
//! of no return, at the commit decision, after it and during make-permanent. While the store
//! fails the rollout holds and no node runs what an unstored step decided; once it heals the
//! rollout succeeds, and what the coordinator recorded agrees with every node's journal.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_agent::journal::Journal;
use hotroll_agent::report::{NodeState as AgentState, Phase};
use hotroll_coordinator::engine::{Event, Outcome, Record};
use hotroll_coordinator::store::faults::FailingStore;
use hotroll_coordinator::store::{Commit, Store};
use hotroll_local::Fleet;
use hotroll_proto::v1 as pb;

mod support;
use support::{mark_around_the_point_of_no_return, marking_agent_toml, marks};

const NODES: usize = 3;

static SCRIPT: LazyLock<String> = LazyLock::new(|| mark_around_the_point_of_no_return("120s"));

/// Index of the instruction after the point of no return in [`SCRIPT`].
const POST_STEP: u32 = 3;

fn has_record(commit: &Commit<'_>, pick: impl Fn(&Record) -> bool) -> bool {
    commit.events.iter().any(|e| pick(&e.record))
}

fn has_outcome(commit: &Commit<'_>, wanted: Outcome) -> bool {
    commit
        .inputs
        .iter()
        .any(|i| matches!(&i.event, Event::Outcome { outcome, .. } if *outcome == wanted))
}

async fn status(client: &mut hotroll_local::OperatorClient, id: &str) -> pb::RolloutStatus {
    client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: id.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("status: {e}"))
        .into_inner()
}

async fn wait_for(
    client: &mut hotroll_local::OperatorClient,
    id: &str,
    what: &str,
    done: impl Fn(&pb::RolloutStatus) -> bool,
) -> pb::RolloutStatus {
    for _ in 0..600 {
        let s = status(client, id).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{what}: not within 30 s; last status {:?}",
        status(client, id).await
    );
}

/// The store trips on the first commit `trigger` matches; `post_ran` says whether the nodes may
/// already have run their post-PONR step by then (the commit that trips comes after it).
async fn holds_then_agrees(
    trigger: impl Fn(&Commit<'_>) -> bool + Send + Sync + 'static,
    post_may_have_run: bool,
) {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Arc::new(FailingStore::default());
    let fleet = Fleet::builder()
        .agents(NODES)
        .insecure()
        .root(root.path())
        .store(store.clone() as Arc<dyn Store>)
        .server_config(|config| config.heartbeat_interval = Duration::from_millis(200))
        .agent_toml(marking_agent_toml)
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap_or_else(|e| panic!("fleet: {e}"));
    let data_dirs: Vec<_> = (0..NODES)
        .map(|i| {
            fleet
                .agent(i)
                .unwrap_or_else(|e| panic!("{e}"))
                .data_dir()
                .to_path_buf()
        })
        .collect();
    let mut client = fleet.control().await.unwrap_or_else(|e| panic!("{e}"));
    let mut connected = 0;
    for _ in 0..400 {
        let listed = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .nodes;
        connected = listed.iter().filter(|n| n.connected).count();
        if connected == NODES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if connected != NODES {
        let stopped = fleet.shutdown().await;
        panic!(
            "{connected} of {NODES} agents connected in 20 s; the fleet stopped with {stopped:?}"
        );
    }

    store.fail_from(trigger);
    let id = client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "s.toml".into(),
            script_source: SCRIPT.clone(),
            select: Default::default(),
            artifacts: vec![],
            skip_unreachable: false,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("start: {e}"))
        .into_inner()
        .rollout_id;
    let held = wait_for(&mut client, &id, "held on its store", |s| {
        !s.held_on_store.is_empty()
    })
    .await;
    assert!(
        held.held_on_store
            .contains("cannot store the rollout's step"),
        "{}",
        held.held_on_store
    );
    let posts_when_held: Vec<usize> = data_dirs.iter().map(|d| marks(d, "post")).collect();
    // The nodes have time to run anything they were sent; none was sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, dir) in data_dirs.iter().enumerate() {
        let posts = marks(dir, "post");
        assert_eq!(posts, posts_when_held[i], "node-{} moved while held", i + 1);
        if !post_may_have_run {
            assert_eq!(posts, 0, "node-{} ran its post-PONR step while held", i + 1);
        }
    }
    let still = status(&mut client, &id).await;
    assert!(
        !still.held_on_store.is_empty(),
        "held until healed: {still:?}"
    );
    assert_ne!(still.state(), pb::RolloutState::Succeeded);
    let refused = client
        .pause_rollout(pb::RolloutControlRequest {
            rollout_id: id.clone(),
            reason: String::new(),
        })
        .await;
    match refused {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(reply) => panic!("pause while held: {:?}", reply.into_inner()),
    }

    store.heal();
    let done = wait_for(&mut client, &id, "succeeded", |s| {
        s.state() == pb::RolloutState::Succeeded
    })
    .await;
    assert!(done.held_on_store.is_empty());
    // Only what the store holds: the history read straight from it.
    let history = store
        .inner()
        .events(&id, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    drop(client);
    fleet
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("shutdown: {e}"));

    for (i, dir) in data_dirs.iter().enumerate() {
        let node = format!("node-{}", i + 1);
        assert_eq!(marks(dir, "post"), 1, "{node} ran its post-PONR step once");
        let recorded = history
            .iter()
            .filter(|e| {
                matches!(&e.record, Record::Step { node: n, step, phase, .. }
                    if *n == node && *step == POST_STEP
                        && *phase == hotroll_coordinator::engine::StepPhase::Succeeded)
            })
            .count();
        assert_eq!(
            recorded, 1,
            "the history records {node}'s post-PONR step once"
        );
        let shown = done
            .nodes
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("{node} not in the status"));
        assert_eq!(shown.state(), pb::NodeState::Committed, "{node}");
        let journal = Journal::open(dir).unwrap_or_else(|e| panic!("{e}"));
        let record = journal
            .get(&id)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("{node} has no journal record of {id}"));
        assert_eq!(record.phase, Phase::Done, "{node}: {record:?}");
        assert_eq!(
            record.node_state,
            AgentState::Permanent,
            "{node}: the coordinator says committed, the journal {record:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_fails_before_the_point_of_no_return() {
    holds_then_agrees(
        |c| has_record(c, |r| matches!(r, Record::BarrierReleased { .. })),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_fails_at_the_commit_decision() {
    holds_then_agrees(
        |c| has_record(c, |r| matches!(r, Record::WaveStarted { .. })),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_fails_after_the_point_of_no_return() {
    holds_then_agrees(|c| has_outcome(c, Outcome::Committed), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_fails_during_make_permanent() {
    holds_then_agrees(|c| has_outcome(c, Outcome::Permanent), true).await;
}
