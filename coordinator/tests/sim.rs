//! Protocol edge cases under a simulated network (turmoil): the real coordinator (`serve`) and
//! real agents (`hotroll_agent::run_with`) on simulated hosts, with partitions between them and
//! simulated time, so deadlines and grace periods play out deterministically and fast.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hotroll_agent::{Dialer, HooksOnlyRuntime};
use hotroll_coordinator::store::MemoryStore;
use hotroll_coordinator::{ServerConfig, serve};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

const PORT: u16 = 7070;
const URL: &str = "http://coordinator:7070";

/// A turmoil connection that tonic's server accepts.
struct SimStream(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn sim_channel(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or("coordinator").to_string();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
        .await
}

fn sim_dialer() -> Dialer {
    Arc::new(|endpoint: Endpoint| Box::pin(sim_channel(endpoint)))
}

struct Fleet {
    sim: turmoil::Sim<'static>,
    _dirs: Vec<tempfile::TempDir>,
}

/// A coordinator and `nodes` agents (`node-1`..) on simulated hosts.
fn fleet(nodes: usize, session_grace: Duration) -> Fleet {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(300))
        .enable_tokio_io()
        .build();
    let mut dirs = Vec::new();
    let coordinator_dir = tempfile::tempdir().unwrap();
    let data_dir = coordinator_dir.path().to_path_buf();
    dirs.push(coordinator_dir);
    sim.host("coordinator", move || {
        let data_dir = data_dir.clone();
        async move {
            let listener =
                turmoil::net::TcpListener::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), PORT))
                    .await?;
            let incoming = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| SimStream(stream));
                Some((accepted, listener))
            });
            let mut config = ServerConfig::new(data_dir);
            config.heartbeat_interval = Duration::from_millis(500);
            config.session_grace = session_grace;
            config.step_slack = Duration::from_secs(5);
            serve(
                Box::pin(incoming),
                Arc::new(MemoryStore::default()),
                config,
                std::future::pending(),
            )
            .await?;
            Ok(())
        }
    });
    for i in 1..=nodes {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_path_buf();
        dirs.push(dir);
        sim.host(format!("node-{i}").as_str(), move || {
            let mut config = hotroll_agent::Config::new(format!("node-{i}"), URL, data_dir.clone());
            config.reconnect_max_backoff = Duration::from_millis(500);
            config.labels.insert("role".into(), "sim".into());
            async move {
                hotroll_agent::run_with(
                    config,
                    Arc::new(HooksOnlyRuntime),
                    sim_dialer(),
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }
    Fleet { sim, _dirs: dirs }
}

async fn control() -> ControlClient<Channel> {
    ControlClient::new(sim_channel(Endpoint::from_static(URL)).await.unwrap())
}

async fn wait_connected(client: &mut ControlClient<Channel>, nodes: usize) {
    for _ in 0..400 {
        let listed = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if listed.iter().filter(|n| n.connected).count() == nodes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agents did not connect");
}

async fn start(client: &mut ControlClient<Channel>, script: &str) -> String {
    client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "sim.toml".into(),
            script_source: script.into(),
            select: Default::default(),
            artifacts: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .rollout_id
}

async fn status(client: &mut ControlClient<Channel>, id: &str) -> pb::RolloutStatus {
    client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Poll (in simulated time) until `done` holds for the rollout's status.
async fn wait_for(
    client: &mut ControlClient<Channel>,
    id: &str,
    what: &str,
    done: impl Fn(&pb::RolloutStatus) -> bool,
) -> pb::RolloutStatus {
    for _ in 0..1200 {
        let s = status(client, id).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: not reached within 120s of simulated time; last status {:?}",
        status(client, id).await
    );
}

fn node_state(s: &pb::RolloutStatus, node: &str) -> pb::NodeState {
    s.nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.state())
        .unwrap()
}

fn is_final(s: &pb::RolloutStatus) -> bool {
    !matches!(
        s.state(),
        pb::RolloutState::Pending
            | pb::RolloutState::Preparing
            | pb::RolloutState::Committing
            | pb::RolloutState::Paused
    )
}

const TWO_BARRIERS: &str = r#"
app = "sim"
from = "1"
to = "2"
[rollout]
on_failure = "rollback_node"
max_failures = 1
barrier_timeout = "4s"
step_timeout = "5s"
[script]
up = [ { sync_nodes = "staged" }, "point_of_no_return", { sync_nodes = "done" } ]
"#;

#[test]
fn a_node_cut_off_before_the_point_of_no_return_aborts_the_rollout_everywhere() {
    let mut fleet = fleet(3, Duration::from_secs(3));
    fleet.sim.client("operator", async {
        let mut client = control().await;
        wait_connected(&mut client, 3).await;
        // Cut node-3 off before the coordinator notices: it is still selected, but never
        // receives the script and never arrives at the barrier.
        turmoil::partition("coordinator", "node-3");
        let id = start(&mut client, TWO_BARRIERS).await;
        let s = wait_for(&mut client, &id, "final state", is_final).await;
        assert_eq!(s.state(), pb::RolloutState::Aborted, "{s:?}");
        assert!(
            s.nodes
                .iter()
                .all(|n| n.state() != pb::NodeState::Committing
                    && n.state() != pb::NodeState::Committed),
            "{s:?}"
        );
        for node in ["node-1", "node-2"] {
            let s = wait_for(&mut client, &id, "reachable nodes aborted", |s| {
                node_state(s, node) == pb::NodeState::Aborted
            })
            .await;
            assert_eq!(s.current_wave, 0, "no wave was ever committed");
        }
        assert_eq!(node_state(&s, "node-3"), pb::NodeState::Failed);

        // When the link heals, node-3 comes back and the fleet is whole again.
        turmoil::repair("coordinator", "node-3");
        for _ in 0..200 {
            let listed = client
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            if listed.iter().all(|n| n.connected) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("node-3 did not reconnect after the partition healed");
    });
    fleet.sim.run().unwrap();
}

#[test]
fn a_partition_shorter_than_the_grace_period_loses_nothing() {
    let mut fleet = fleet(3, Duration::from_secs(6));
    fleet.sim.client("operator", async {
        let mut client = control().await;
        wait_connected(&mut client, 3).await;
        let script = TWO_BARRIERS.replace("\"4s\"", "\"20s\"");
        let id = start(&mut client, &script).await;
        // node-2 drops off right away: commands and reports in flight are lost, the session
        // times out (3 x 500ms), and the agent reconnects once the link heals.
        turmoil::partition("coordinator", "node-2");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        turmoil::repair("coordinator", "node-2");
        let s = wait_for(&mut client, &id, "final state", is_final).await;
        assert_eq!(s.state(), pb::RolloutState::Succeeded, "{s:?}");
        assert!(
            s.nodes
                .iter()
                .all(|n| n.state() == pb::NodeState::Committed),
            "{s:?}"
        );
        assert_eq!(s.failures, 0);
        Ok(())
    });
    fleet.sim.run().unwrap();
}

#[test]
fn a_node_lost_after_the_point_of_no_return_is_rolled_back_and_the_rest_completes() {
    let mut fleet = fleet(3, Duration::from_secs(2));
    fleet.sim.client("operator", async {
        let mut client = control().await;
        wait_connected(&mut client, 3).await;
        let script = TWO_BARRIERS
            .replace(
                "[rollout]",
                "[rollout]\ncanary = 1\npause_after_canary = true",
            )
            .replace("\"4s\"", "\"10s\"");
        let id = start(&mut client, &script).await;
        // Deterministic window: after the canary wave the rollout holds; node-2 waits prepared.
        wait_for(&mut client, &id, "paused after canary", |s| {
            s.state() == pb::RolloutState::Paused
        })
        .await;
        turmoil::partition("coordinator", "node-2");
        client
            .promote_rollout(pb::RolloutControlRequest {
                rollout_id: id.clone(),
                reason: String::new(),
            })
            .await?;
        let s = wait_for(&mut client, &id, "final state", is_final).await;
        assert_eq!(s.state(), pb::RolloutState::PartiallyRolledBack, "{s:?}");
        assert_eq!(s.failures, 1);
        assert_eq!(node_state(&s, "node-1"), pb::NodeState::Committed);
        assert_eq!(node_state(&s, "node-3"), pb::NodeState::Committed);
        assert_ne!(node_state(&s, "node-2"), pb::NodeState::Committed);

        // Back on the network, node-2 is told to roll back, never to resume; it never got the
        // Commit, so it discards what it staged.
        turmoil::repair("coordinator", "node-2");
        let s = wait_for(&mut client, &id, "node-2 settles", |s| {
            matches!(
                node_state(s, "node-2"),
                pb::NodeState::Aborted | pb::NodeState::RolledBack
            )
        })
        .await;
        assert_eq!(s.state(), pb::RolloutState::PartiallyRolledBack);
        Ok(())
    });
    fleet.sim.run().unwrap();
}
