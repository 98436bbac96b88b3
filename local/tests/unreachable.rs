//! A rollout never skips a node silently: a known node that is not connected when the rollout
//! starts (an agent in its reconnect back-off, say) is a target and the rollout waits for it;
//! `skip_unreachable` leaves it out and says so; one that never comes back fails prepare, and
//! the rollout aborts before the point of no return.
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_local::{Fleet, OperatorClient};
use hotroll_proto::v1 as pb;

use tokio_stream::StreamExt;

mod support;
use support::{mark_around_the_point_of_no_return, marking_agent_toml, marks};

const NODES: usize = 3;
const AWAY: usize = 2;
const AWAY_NAME: &str = "node-3";
/// How long agents get to (dis)connect.
const CONNECT: Duration = Duration::from_secs(20);

static SCRIPT: LazyLock<String> = LazyLock::new(|| mark_around_the_point_of_no_return("60s"));

/// A fleet of [`NODES`] agents, all connected, then the one at [`AWAY`] stopped (known, not
/// connected) with the given session grace.
async fn fleet_with_one_away(root: &Path, grace: Duration) -> (Fleet, OperatorClient) {
    let mut fleet = Fleet::builder()
        .agents(NODES)
        .insecure()
        .root(root)
        .server_config(move |config| {
            config.heartbeat_interval = Duration::from_millis(200);
            config.session_grace = grace;
        })
        .agent_toml(marking_agent_toml)
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap();
    let client = fleet.control().await.unwrap();
    fleet.wait_connected(NODES, CONNECT).await.unwrap();
    fleet.stop_agent(AWAY).await.unwrap();
    fleet.wait_connected(NODES - 1, CONNECT).await.unwrap();
    (fleet, client)
}

async fn start(
    client: &mut OperatorClient,
    script: &str,
    skip_unreachable: bool,
) -> pb::StartRolloutResponse {
    client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "s.toml".into(),
            script_source: script.into(),
            skip_unreachable,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn final_status(client: &mut OperatorClient, id: &str) -> pb::RolloutStatus {
    for _ in 0..1200 {
        let status = client
            .get_rollout(pb::GetRolloutRequest {
                rollout_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let state = pb::RolloutState::try_from(status.state).unwrap();
        if !matches!(
            state,
            pb::RolloutState::Pending
                | pb::RolloutState::Preparing
                | pb::RolloutState::Committing
                | pb::RolloutState::Paused
        ) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rollout {id} did not end within 60 s");
}

/// The stored history, from the first event to the rollout's final state.
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
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        events.push(event.unwrap());
    }
    events
}

fn node<'a>(status: &'a pb::RolloutStatus, name: &str) -> &'a pb::NodeStatus {
    status
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} is not in {status:?}"))
}

#[tokio::test]
async fn a_known_node_that_is_reconnecting_is_a_target_and_is_waited_for() {
    let root = tempfile::tempdir().unwrap();
    let (mut fleet, mut client) = fleet_with_one_away(root.path(), Duration::from_secs(30)).await;

    let started = start(&mut client, &SCRIPT, false).await;
    assert_eq!(started.nodes, ["node-1", "node-2", "node-3"], "{started:?}");
    assert_eq!(started.awaited, [AWAY_NAME], "{started:?}");
    assert!(started.left_out.is_empty(), "{started:?}");

    // The agent comes back a moment later, as one in its reconnect back-off does.
    tokio::time::sleep(Duration::from_millis(700)).await;
    fleet.start_agent(AWAY).unwrap();

    let status = final_status(&mut client, &started.rollout_id).await;
    assert_eq!(
        status.state,
        pb::RolloutState::Succeeded as i32,
        "{status:?}"
    );
    assert!(status.left_out.is_empty());
    for i in 0..NODES {
        let spec = fleet.agent(i).unwrap();
        assert_eq!(node(&status, spec.name()).error, "", "{status:?}");
        assert_eq!(
            marks(spec.data_dir(), "post"),
            1,
            "{} ran post",
            spec.name()
        );
    }
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn skip_unreachable_leaves_the_node_out_and_names_it() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = fleet_with_one_away(root.path(), Duration::from_secs(30)).await;

    let started = start(&mut client, &SCRIPT, true).await;
    assert_eq!(started.nodes, ["node-1", "node-2"], "{started:?}");
    assert!(started.awaited.is_empty(), "{started:?}");
    assert_eq!(started.left_out.len(), 1, "{started:?}");
    assert_eq!(started.left_out[0].node, AWAY_NAME);
    assert!(
        started.left_out[0].reason.contains("not connected"),
        "{started:?}"
    );

    let status = final_status(&mut client, &started.rollout_id).await;
    assert_eq!(
        status.state,
        pb::RolloutState::Succeeded as i32,
        "{status:?}"
    );
    assert_eq!(status.left_out.len(), 1, "{status:?}");
    assert_eq!(status.left_out[0].node, AWAY_NAME);
    assert!(status.nodes.iter().all(|n| n.name != AWAY_NAME));

    let events = history(&mut client, &started.rollout_id).await;
    let first_state = events
        .iter()
        .find(|e| e.kind == "rollout_state")
        .unwrap_or_else(|| panic!("no rollout_state event in {events:?}"));
    assert!(
        first_state
            .message
            .contains("left out: node-3 (not connected"),
        "{first_state:?}"
    );
    let away_dir = fleet.agent(AWAY).unwrap().data_dir().to_path_buf();
    assert_eq!(marks(&away_dir, "pre"), 0, "the left-out node ran nothing");
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_that_never_comes_back_aborts_the_rollout_before_the_point_of_no_return() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = fleet_with_one_away(root.path(), Duration::from_secs(2)).await;

    let started = start(&mut client, &SCRIPT, false).await;
    assert_eq!(started.awaited, [AWAY_NAME], "{started:?}");

    let status = final_status(&mut client, &started.rollout_id).await;
    assert_eq!(status.state, pb::RolloutState::Aborted as i32, "{status:?}");
    let away = node(&status, AWAY_NAME);
    assert!(away.error.contains("no session"), "{away:?}");
    for i in 0..NODES {
        let spec = fleet.agent(i).unwrap();
        assert_eq!(
            marks(spec.data_dir(), "post"),
            0,
            "{} ran a step after the point of no return",
            spec.name()
        );
    }
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn skip_unreachable_in_the_script_leaves_the_node_out_and_says_where_it_came_from() {
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut client) = fleet_with_one_away(root.path(), Duration::from_secs(30)).await;

    let script = SCRIPT.replace("[rollout]\n", "[rollout]\nskip_unreachable = true\n");
    let started = start(&mut client, &script, false).await;
    assert_eq!(started.nodes, ["node-1", "node-2"], "{started:?}");
    assert_eq!(started.left_out.len(), 1, "{started:?}");
    assert!(
        started.left_out[0]
            .reason
            .contains("skip_unreachable in [rollout]"),
        "{started:?}"
    );
    let status = final_status(&mut client, &started.rollout_id).await;
    assert_eq!(
        status.state,
        pb::RolloutState::Succeeded as i32,
        "{status:?}"
    );
    fleet.shutdown().await.unwrap();
}
