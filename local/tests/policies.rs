//! Rollout policies on a real in-process fleet (issue 18): topology-aware waves.
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::collections::BTreeMap;
use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_local::{Fleet, OperatorClient};
use hotroll_proto::v1 as pb;

use tokio_stream::StreamExt;

mod support;
use support::{marking_agent_toml, marks};

/// The zone of `node-<i+1>`: a, b, c, a, b, c.
fn zone_of(index: usize) -> &'static str {
    ["a", "b", "c"][index % 3]
}

const NODES: usize = 6;

async fn zoned_fleet(root: &std::path::Path) -> (Fleet, OperatorClient) {
    let fleet = Fleet::builder()
        .agents(NODES)
        .insecure()
        .root(root)
        .agent_toml(marking_agent_toml)
        .agent_config(|slot, config| {
            config
                .labels
                .insert("zone".into(), zone_of(slot.index).into());
        })
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap();
    let mut client = fleet.control().await.unwrap();
    wait_connected(&mut client, NODES).await;
    (fleet, client)
}

async fn wait_connected(client: &mut OperatorClient, count: usize) {
    let mut connected = 0;
    for _ in 0..400 {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        connected = nodes.iter().filter(|n| n.connected).count();
        if connected == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{connected} agents connected, expected {count}");
}

fn is_final(state: i32) -> bool {
    !matches!(
        pb::RolloutState::try_from(state),
        Ok(pb::RolloutState::Pending
            | pb::RolloutState::Preparing
            | pb::RolloutState::Committing
            | pb::RolloutState::Paused)
    )
}

/// The rollout's history from its first event to its final state.
async fn history(client: &mut OperatorClient, id: &str) -> Vec<pb::RolloutEvent> {
    let mut stream = client
        .watch_rollout(pb::WatchRolloutRequest {
            rollout_id: id.into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no final state within 120 s: {events:#?}"))
            .unwrap_or_else(|| panic!("the watch ended before a final state: {events:#?}"))
            .unwrap();
        let done = event.kind == "rollout_state" && is_final(event.rollout_state);
        events.push(event);
        if done {
            return events;
        }
    }
}

const ZONED: &str = r#"
app = "x"
from = "1.0.0"
to = "2.0.0"
[rollout]
canary = 1
max_in_flight = "50%"
waves_by = "zone"
order = ["b", "c", "a"]
barrier_timeout = "60s"
step_timeout = "60s"
[script]
up = [
  { apply = { hook = "mark", args = ["pre"] } },
  "point_of_no_return",
  { apply = { hook = "mark", args = ["post"] } },
]
down = []
"#;

/// Test 2 of the issue: six nodes over zones a/b/c with `waves_by = "zone"`, `canary = 1` and
/// `max_in_flight = "50%"`: the history shows the canary, then one zone at a time in the stated
/// order, half a zone per wave, and a wave starts only once every node of the one before it
/// committed.
#[tokio::test]
async fn waves_by_zone_take_the_canary_then_one_zone_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = zoned_fleet(root.path()).await;
    let zone: BTreeMap<String, &str> = (0..NODES)
        .map(|i| (format!("node-{}", i + 1), zone_of(i)))
        .collect();

    let started = client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "zoned.toml".into(),
            script_source: ZONED.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let events = history(&mut client, &started.rollout_id).await;
    let last = events.last().unwrap();
    assert_eq!(
        last.rollout_state,
        pb::RolloutState::Succeeded as i32,
        "{events:#?}"
    );

    let waves: Vec<(u32, Vec<String>)> = events
        .iter()
        .filter(|e| e.kind == "wave_started")
        .map(|e| (e.wave, e.message.split(',').map(str::to_string).collect()))
        .collect();
    let expected: Vec<(u32, Vec<String>)> = [
        "node-2", // the canary: the first node of the first zone in `order`
        "node-5", // the rest of zone b
        "node-3", // zone c, half of it per wave
        "node-6", //
        "node-1", // zone a
        "node-4", //
    ]
    .iter()
    .enumerate()
    .map(|(i, n)| (u32::try_from(i + 1).unwrap(), vec![n.to_string()]))
    .collect();
    assert_eq!(waves, expected, "{events:#?}");

    // Never two zones at once: when a wave starts, every node of the waves before it has
    // committed, and no node of a later wave has.
    let committed = pb::NodeState::Committed as i32;
    let mut done: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for event in &events {
        if event.kind == "wave_started" {
            assert!(
                current.iter().all(|n| done.contains(n)),
                "wave {} started before {current:?} committed ({done:?})",
                event.wave
            );
            current = event.message.split(',').map(str::to_string).collect();
            let zones: std::collections::BTreeSet<&str> =
                current.iter().map(|n| zone[n.as_str()]).collect();
            assert_eq!(zones.len(), 1, "wave {} spans {zones:?}", event.wave);
        }
        if event.kind == "node_state" && event.node_state == committed {
            assert!(
                current.contains(&event.node),
                "{} committed outside its wave {current:?}",
                event.node
            );
            done.push(event.node.clone());
        }
    }
    assert_eq!(done.len(), NODES, "{events:#?}");
    for i in 0..NODES {
        let spec = fleet.agent(i).unwrap();
        assert_eq!(marks(spec.data_dir(), "post"), 1, "{}", spec.name());
    }
    fleet.shutdown().await.unwrap();
}
