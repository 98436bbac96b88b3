//! The builder's own contract: a TLS fleet whose agents join with their tokens, an agent
//! stopped and started again, the coordinator restarted on the same address and store.
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_local::{Fleet, OperatorClient};
use hotroll_proto::v1 as pb;

/// Wait until exactly the nodes in `names` are connected.
async fn wait_connected(control: &mut OperatorClient, names: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let connected: Vec<String> = match control.list_nodes(pb::ListNodesRequest {}).await {
            Ok(listed) => listed
                .into_inner()
                .nodes
                .into_iter()
                .filter(|n| n.connected)
                .map(|n| n.name)
                .collect(),
            Err(e) => vec![format!("error: {e}")],
        };
        if connected
            .iter()
            .map(String::as_str)
            .eq(names.iter().copied())
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connected {connected:?}, expected {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn agents_join_stop_start_and_survive_a_coordinator_restart() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let mut fleet = Fleet::builder()
        .agents(2)
        .server_config(|config| config.heartbeat_interval = Duration::from_millis(200))
        .label("role", "test")
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap();
    assert!(fleet.url().starts_with("https://127.0.0.1:"));
    assert!(fleet.ca_path().unwrap().is_file());
    let mut control = fleet.control().await.unwrap();
    wait_connected(&mut control, &["node-1", "node-2"]).await;
    let nodes = control
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(
        nodes
            .iter()
            .all(|n| n.labels.get("role").map(String::as_str) == Some("test")),
        "{nodes:?}"
    );

    fleet.stop_agent(0).await.unwrap();
    wait_connected(&mut control, &["node-2"]).await;
    // Started again, the node uses the certificate it got at join (its token is used up).
    fleet.start_agent(0).unwrap();
    assert!(
        fleet.start_agent(0).is_err(),
        "a running agent started twice"
    );
    wait_connected(&mut control, &["node-1", "node-2"]).await;

    fleet.restart_coordinator().await.unwrap();
    let mut control = fleet.control().await.unwrap();
    wait_connected(&mut control, &["node-1", "node-2"]).await;
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_insecure_fleet_has_no_credentials() {
    let fleet = Fleet::builder().insecure().agents(0).build().await.unwrap();
    assert!(fleet.url().starts_with("http://127.0.0.1:"));
    assert!(fleet.ca_path().is_err());
    assert!(fleet.operator_token().is_none());
    let mut control = fleet.control().await.unwrap();
    let listed = control.list_nodes(pb::ListNodesRequest {}).await.unwrap();
    assert!(listed.into_inner().nodes.is_empty());
    fleet.shutdown().await.unwrap();
}
