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
    fleet
        .wait_connected(NODES, Duration::from_secs(20))
        .await
        .unwrap();
    let client = fleet.control().await.unwrap();
    (fleet, client)
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

/// `daily HH:MM:SS-HH:MM:SS UTC` from `opens_in` to `opens_in + length` after now.
fn window_from_now(opens_in: Duration, length: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let clock = |d: Duration| {
        let s = d.as_secs() % 86_400;
        format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    };
    format!(
        "daily {}-{} UTC",
        clock(now + opens_in),
        clock(now + opens_in + length)
    )
}

fn windowed_script(window: &str, window_timeout: &str) -> String {
    format!(
        r#"
app = "x"
from = "1.0.0"
to = "2.0.0"
[rollout]
windows = ["{window}"]
window_timeout = "{window_timeout}"
barrier_timeout = "60s"
step_timeout = "60s"
[script]
up = [
  {{ apply = {{ hook = "mark", args = ["pre"] }} }},
  "point_of_no_return",
  {{ apply = {{ hook = "mark", args = ["post"] }} }},
]
down = []
"#
    )
}

async fn start(client: &mut OperatorClient, script: &str) -> String {
    client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "windowed.toml".into(),
            script_source: script.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollout_id
}

/// Test 4 of the issue: a window that opens 3 s after the start: the first wave waits and the
/// status says until when; then it proceeds and the rollout succeeds.
#[tokio::test]
async fn the_first_wave_waits_for_a_window_then_proceeds() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = zoned_fleet(root.path()).await;
    let script = windowed_script(
        &window_from_now(Duration::from_secs(3), Duration::from_secs(3600)),
        "1h",
    );
    let id = start(&mut client, &script).await;

    // Every node prepares, and the rollout says it waits for the window, and until when.
    let mut waiting = None;
    for _ in 0..400 {
        let status = client
            .get_rollout(pb::GetRolloutRequest {
                rollout_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if status.window_opens_unix_ms > 0 {
            waiting = Some(status);
            break;
        }
        assert!(!is_final(status.state), "ended without waiting: {status:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let waiting = waiting.unwrap_or_else(|| panic!("the rollout never waited for its window"));
    assert_eq!(waiting.current_wave, 0, "no wave started: {waiting:?}");
    let opens = waiting.window_opens_unix_ms;

    let events = history(&mut client, &id).await;
    let last = events.last().unwrap();
    assert_eq!(
        last.rollout_state,
        pb::RolloutState::Succeeded as i32,
        "{events:#?}"
    );
    let waited = events
        .iter()
        .position(|e| {
            e.message
                .starts_with("waiting for window: wave 1 starts at")
        })
        .unwrap_or_else(|| panic!("no waiting record: {events:#?}"));
    let first_wave = events
        .iter()
        .position(|e| e.kind == "wave_started")
        .unwrap_or_else(|| panic!("no wave: {events:#?}"));
    assert!(waited < first_wave, "{events:#?}");
    assert!(
        events[first_wave].at_unix_ms >= opens,
        "wave 1 started at {} before the window opened at {opens}",
        events[first_wave].at_unix_ms
    );
    for i in 0..NODES {
        let spec = fleet.agent(i).unwrap();
        assert_eq!(marks(spec.data_dir(), "post"), 1, "{}", spec.name());
    }
    fleet.shutdown().await.unwrap();
}

/// Test 4, second half: a window that does not open within `window_timeout` ends the rollout
/// before the point of no return, aborted, saying so; nothing ran past it.
#[tokio::test]
async fn a_window_that_never_opens_within_its_timeout_aborts_with_a_clear_reason() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = zoned_fleet(root.path()).await;
    let script = windowed_script(
        &window_from_now(Duration::from_secs(2 * 3600), Duration::from_secs(600)),
        "1m",
    );
    let id = start(&mut client, &script).await;
    let events = history(&mut client, &id).await;
    let last = events.last().unwrap();
    assert_eq!(
        last.rollout_state,
        pb::RolloutState::Aborted as i32,
        "{events:#?}"
    );
    assert!(
        last.message
            .contains("no window opens within window_timeout 1m for wave 1"),
        "{last:?}"
    );
    for i in 0..NODES {
        let spec = fleet.agent(i).unwrap();
        assert_eq!(marks(spec.data_dir(), "post"), 0, "{}", spec.name());
    }
    fleet.shutdown().await.unwrap();
}
