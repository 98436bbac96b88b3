//! The session protocol against a fake coordinator: handshake, Goodbye, reconnects, refusals.
//! None of these needs the script parser.

mod common;

use std::time::{Duration, Instant};

use common::{Event, Fake, RunningAgent, agent_config};
use hotroll_proto::v1::agent_message::Msg as AgentMsg;

#[tokio::test]
async fn hello_welcome_heartbeats_and_goodbye() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_millis(100)).await;
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));

    let hello = fake.expect_hello().await;
    assert_eq!(hello.node, "node-1");
    assert_eq!(hello.labels.get("role").map(String::as_str), Some("miner"));
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(hello.boot_generation, 1);
    assert_eq!(
        hello.min_protocol_version,
        hotroll_proto::MIN_PROTOCOL_VERSION
    );
    assert_eq!(hello.max_protocol_version, hotroll_proto::PROTOCOL_VERSION);
    assert!(!hello.agent_version.is_empty());
    assert!(hello.apps.is_empty() && hello.journal.is_empty());

    // The agent heartbeats at the interval Welcome asked for.
    match fake.next_event().await {
        Event::Message(AgentMsg::Heartbeat(beat)) => assert_eq!(beat.seq, 1),
        other => panic!("expected a heartbeat, got {other:?}"),
    }

    let stopping = tokio::spawn(agent.stop());
    match fake.expect_message().await {
        AgentMsg::Goodbye(goodbye) => assert!(!goodbye.reason.is_empty()),
        other => panic!("expected Goodbye, got {other:?}"),
    }
    assert!(matches!(fake.next().await, Event::Closed));
    match stopping.await {
        Ok(result) => result.unwrap_or_else(|e| panic!("run() failed: {e}")),
        Err(e) => panic!("{e}"),
    }
    fake.stop().await;
}

#[tokio::test]
async fn boot_generation_counts_restarts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_secs(1)).await;
    for generation in 1..=2 {
        let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
        assert_eq!(fake.expect_hello().await.boot_generation, generation);
        agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
        // Goodbye, then the stream closes.
        assert!(matches!(fake.expect_message().await, AgentMsg::Goodbye(_)));
        assert!(matches!(fake.next().await, Event::Closed));
    }
    fake.stop().await;
}

#[tokio::test]
async fn reconnects_after_the_stream_is_dropped() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_millis(200)).await;
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    let first = fake.expect_hello().await;

    fake.drop_session();
    // The agent notices the closed stream, ends its side and comes back with a new Hello from
    // the same boot (a reconnect, not a restart).
    loop {
        match fake.next().await {
            Event::Closed => {}
            Event::Hello(again) => {
                assert_eq!(again.boot_generation, first.boot_generation);
                break;
            }
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
    fake.stop().await;
}

#[tokio::test]
async fn a_silent_coordinator_counts_as_lost() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_millis(100)).await;
    fake.set_heartbeats(false);
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    fake.expect_hello().await;
    let started = Instant::now();
    loop {
        match fake.next().await {
            Event::Closed => {}
            Event::Hello(_) => break,
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    // Three silent 100 ms intervals, not the first one.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
    fake.stop().await;
}

#[tokio::test]
async fn a_duplicate_node_name_is_retried_slowly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_secs(1)).await;
    fake.refuse_next(tonic::Status::already_exists(
        "node `node-1` has a live session",
    ));
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    assert!(matches!(
        fake.next().await,
        Event::Refused(tonic::Code::AlreadyExists)
    ));
    let refused_at = Instant::now();
    fake.expect_hello().await;
    // reconnect_max_backoff is 500ms in the test config: a refusal waits in its upper half.
    assert!(
        refused_at.elapsed() >= Duration::from_millis(240),
        "retried after {:?}",
        refused_at.elapsed()
    );
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
    fake.stop().await;
}

#[tokio::test]
async fn shutdown_while_disconnected_returns() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Nothing listens at this address (bound, then closed).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().unwrap_or_else(|e| panic!("{e}"))
    };
    let agent = RunningAgent::spawn(agent_config(
        dir.path(),
        "node-1",
        &format!("http://{addr}"),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_second_agent_on_the_same_data_dir_fails_clearly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_secs(1)).await;
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    fake.expect_hello().await;
    let second = hotroll_agent::Agent::builder(agent_config(dir.path(), "node-1", &fake.url()))
        .build()
        .run(async {})
        .await;
    let error = second.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("another agent holds it"), "{error}");
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
    fake.stop().await;
}
