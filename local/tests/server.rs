//! The coordinator's gRPC services, driven through a real server on 127.0.0.1 (a local fleet
//! without agents) with raw clients: session handshake rules, liveness, and the artifact store.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::sync::Arc;
use std::time::Duration;

use hotroll_coordinator::store::MemoryStore;
use hotroll_local::Fleet;
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_client::AgentClient;
use hotroll_proto::v1::control_client::ControlClient;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A plaintext coordinator alone, on a MemoryStore.
struct TestServer {
    fleet: Fleet,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with_idle(Duration::from_millis(200)).await
    }

    /// Heartbeats every 200 ms for rollout targets, every `idle` for idle protocol-2 sessions.
    async fn start_with_idle(idle: Duration) -> Self {
        let fleet = Fleet::builder()
            .insecure()
            .agents(0)
            .store(Arc::new(MemoryStore::default()))
            .server_config(move |config| {
                config.heartbeat_interval = Duration::from_millis(200);
                config.idle_heartbeat_interval = idle;
            })
            .build()
            .await
            .unwrap();
        Self { fleet }
    }

    async fn channel(&self) -> Channel {
        self.fleet.channel().await.unwrap()
    }

    async fn shutdown(self) {
        self.fleet.shutdown().await.unwrap();
    }
}

fn hello(node: &str, min: u32, max: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: node.to_string(),
            labels: [("role".to_string(), "web".to_string())].into(),
            boot_generation: 1,
            min_protocol_version: min,
            max_protocol_version: max,
            agent_version: "test".into(),
            apps: vec![],
            journal: vec![],
        })),
    }
}

/// Open a session; returns the sender (keep it to keep the session) and the server's stream.
async fn open_session(
    channel: Channel,
    first: pb::AgentMessage,
) -> Result<
    (
        mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let response = AgentClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?;
    Ok((tx, response.into_inner()))
}

async fn first_message(
    stream: &mut tonic::Streaming<pb::CoordinatorMessage>,
) -> Result<pb::coordinator_message::Msg, tonic::Status> {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("no message within 5s")
        .expect("stream ended")?;
    Ok(message.msg.expect("empty message"))
}

async fn connected(control: &mut ControlClient<Channel>, node: &str) -> Option<bool> {
    control
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.name == node)
        .map(|n| n.connected)
}

#[tokio::test]
async fn hello_gets_welcome_and_the_node_is_listed() {
    let server = TestServer::start().await;
    let (_tx, mut stream) = open_session(server.channel().await, hello("n1", 1, 1))
        .await
        .unwrap();
    match first_message(&mut stream).await.unwrap() {
        pb::coordinator_message::Msg::Welcome(w) => {
            assert_eq!(w.protocol_version, 1);
            assert_eq!(w.epoch, 1);
            assert_eq!(w.heartbeat_interval_ms, 200);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut control = ControlClient::new(server.channel().await);
    assert_eq!(connected(&mut control, "n1").await, Some(true));
    server.shutdown().await;
}

#[tokio::test]
async fn a_second_live_session_for_a_node_name_is_refused() {
    let server = TestServer::start().await;
    let (_keep, mut stream) = open_session(server.channel().await, hello("dup", 1, 1))
        .await
        .unwrap();
    first_message(&mut stream).await.unwrap();
    let second = match open_session(server.channel().await, hello("dup", 1, 1)).await {
        Err(status) => status,
        Ok((_tx, mut stream)) => first_message(&mut stream).await.unwrap_err(),
    };
    assert_eq!(second.code(), tonic::Code::AlreadyExists);
    assert!(
        second.message().contains("already has a live session"),
        "{}",
        second.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn protocol_versions_out_of_range_are_refused_clearly() {
    let server = TestServer::start().await;
    let status = match open_session(server.channel().await, hello("future", 7, 9)).await {
        Err(status) => status,
        Ok((_tx, mut stream)) => first_message(&mut stream).await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("7..=9"), "{}", status.message());
    let mut control = ControlClient::new(server.channel().await);
    assert_eq!(
        connected(&mut control, "future").await,
        None,
        "a refused node is not registered"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_first_message_must_be_hello() {
    let server = TestServer::start().await;
    let beat = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            next_within_ms: 0,
        })),
    };
    let status = match open_session(server.channel().await, beat).await {
        Err(status) => status,
        Ok((_tx, mut stream)) => first_message(&mut stream).await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_agent_is_noticed_within_three_heartbeats() {
    let server = TestServer::start().await;
    // Keep the stream open but never send a heartbeat.
    let (_silent, mut stream) = open_session(server.channel().await, hello("quiet", 1, 1))
        .await
        .unwrap();
    first_message(&mut stream).await.unwrap();
    let mut control = ControlClient::new(server.channel().await);
    assert_eq!(connected(&mut control, "quiet").await, Some(true));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if connected(&mut control, "quiet").await == Some(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "silent session still connected after 5s (interval 200ms)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

/// Heartbeats received on `stream` for `how_long`, each answered on `tx` when `answer`.
async fn beats_for(
    stream: &mut tonic::Streaming<pb::CoordinatorMessage>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    how_long: Duration,
    answer: bool,
) -> Vec<pb::Heartbeat> {
    let mut beats = Vec::new();
    let deadline = tokio::time::Instant::now() + how_long;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, stream.next()).await {
        if let Some(pb::coordinator_message::Msg::Heartbeat(beat)) = message.msg {
            if answer {
                let reply = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                        seq: beat.seq,
                        ..Default::default()
                    })),
                };
                tx.send(reply).await.unwrap();
            }
            beats.push(beat);
        }
    }
    beats
}

const WAIT_SCRIPT: &str = r#"app = "paced"
from = "1.0.0"
to = "2.0.0"

[rollout]
barrier_timeout = "60s"

[script]
up = [{ sync_nodes = "b" }]
"#;

/// Protocol 2: an idle session is beaten at the idle pace, announced in each heartbeat; once a
/// rollout targets the node it is beaten every heartbeat interval, announced too.
#[tokio::test]
async fn idle_sessions_are_beaten_slowly_and_a_rollouts_targets_closely() {
    let server = TestServer::start_with_idle(Duration::from_secs(1)).await;
    let (tx, mut stream) = open_session(server.channel().await, hello("idle", 1, 2))
        .await
        .unwrap();
    match first_message(&mut stream).await.unwrap() {
        pb::coordinator_message::Msg::Welcome(w) => assert_eq!(w.protocol_version, 2),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let idle = beats_for(&mut stream, &tx, Duration::from_millis(2500), true).await;
    assert!(!idle.is_empty(), "no heartbeat in 2.5 s");
    assert!(
        idle.iter().all(|b| b.next_within_ms == 1000),
        "idle beats announce the idle pace: {idle:?}"
    );
    // At the close pace (200 ms) 2.5 s would hold about twelve.
    assert!(idle.len() <= 4, "{} beats in 2.5 s while idle", idle.len());
    let mut control = ControlClient::new(server.channel().await);
    assert_eq!(
        connected(&mut control, "idle").await,
        Some(true),
        "an answering idle session stays"
    );

    let started = control
        .start_rollout(pb::StartRolloutRequest {
            script_name: "paced.toml".into(),
            script_source: WAIT_SCRIPT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let close = beats_for(&mut stream, &tx, Duration::from_millis(1500), true).await;
    assert!(
        close.iter().filter(|b| b.next_within_ms == 200).count() >= 3,
        "a rollout's target is beaten every 200 ms: {close:?}"
    );
    control
        .abort_rollout(pb::RolloutControlRequest {
            rollout_id: started.rollout_id,
            reason: "test over".into(),
        })
        .await
        .unwrap();
    drop(tx);
    server.shutdown().await;
}

/// Protocol 2: a session that stops answering heartbeats is ended, idle or not.
#[tokio::test]
async fn an_idle_session_that_does_not_answer_is_ended() {
    let server = TestServer::start_with_idle(Duration::from_secs(1)).await;
    let (tx, mut stream) = open_session(server.channel().await, hello("mute", 2, 2))
        .await
        .unwrap();
    first_message(&mut stream).await.unwrap();
    let mut control = ControlClient::new(server.channel().await);
    assert_eq!(connected(&mut control, "mute").await, Some(true));
    // The first beat leaves within 200 ms, the next answer is due 600 ms later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while connected(&mut control, "mute").await != Some(false) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a session that answers no heartbeat is still connected after 6 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_can_reconnect_after_its_session_ends() {
    let server = TestServer::start().await;
    let (tx, mut stream) = open_session(server.channel().await, hello("again", 1, 1))
        .await
        .unwrap();
    first_message(&mut stream).await.unwrap();
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Goodbye(pb::Goodbye {
            reason: "test".into(),
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let mut control = ControlClient::new(server.channel().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while connected(&mut control, "again").await != Some(false) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_tx, mut stream) = open_session(server.channel().await, hello("again", 1, 1))
        .await
        .unwrap();
    match first_message(&mut stream).await.unwrap() {
        pb::coordinator_message::Msg::Welcome(w) => assert_eq!(w.epoch, 2, "session epoch grows"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    server.shutdown().await;
}

fn chunks(digest: &str, bytes: &[u8], chunk: usize) -> Vec<pb::ArtifactChunk> {
    bytes
        .chunks(chunk)
        .enumerate()
        .map(|(i, data)| pb::ArtifactChunk {
            digest: digest.to_string(),
            offset: (i * chunk) as u64,
            data: data.to_vec(),
            total_size: bytes.len() as u64,
        })
        .collect()
}

#[tokio::test]
async fn artifacts_are_verified_stored_and_fetched_from_any_offset() {
    let server = TestServer::start().await;
    let mut control = ControlClient::new(server.channel().await);
    let bytes: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));

    let present = control
        .has_artifacts(pb::HasArtifactsRequest {
            digests: vec![digest.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .present;
    assert!(present.is_empty());

    // A body that does not match its digest is refused and not stored.
    let mut wrong = bytes.clone();
    wrong[10] ^= 1;
    let refused = control
        .upload_artifact(tokio_stream::iter(chunks(&digest, &wrong, 100_000)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("does not match"),
        "{}",
        refused.message()
    );

    let stored = control
        .upload_artifact(tokio_stream::iter(chunks(&digest, &bytes, 100_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.digest, digest);
    assert_eq!(stored.size, bytes.len() as u64);
    let present = control
        .has_artifacts(pb::HasArtifactsRequest {
            digests: vec![digest.clone(), format!("sha256:{}", "0".repeat(64))],
        })
        .await
        .unwrap()
        .into_inner()
        .present;
    assert_eq!(present, vec![digest.clone()]);

    // Resume from an offset, as an agent does after a dropped stream.
    let mut agent = AgentClient::new(server.channel().await);
    let mut stream = agent
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: digest.clone(),
            offset: 300_001,
            node: "n".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.offset, 300_001 + got.len() as u64);
        assert!(chunk.data.len() <= hotroll_proto::ARTIFACT_CHUNK_SIZE);
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, bytes[300_001..]);

    // Digests that are not sha256:<64 hex> never become paths.
    let bad = agent
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: "sha256:../../etc/passwd".into(),
            offset: 0,
            node: "n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_rollouts_and_inapplicable_commands_get_clear_errors() {
    let server = TestServer::start().await;
    let mut control = ControlClient::new(server.channel().await);
    let missing = control
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("nope"));
    let abort = control
        .abort_rollout(pb::RolloutControlRequest {
            rollout_id: "nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(abort.code(), tonic::Code::NotFound);
    server.shutdown().await;
}
