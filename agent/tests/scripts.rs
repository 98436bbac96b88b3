//! Running scripts sent by a (fake) coordinator, as docs/protocol.md describes. These go through
//! `hotroll_script::parse`, so they need the script parser.

mod common;

use std::time::Duration;

use common::{
    Fake, RunningAgent, agent_config, assert_gone, data_path, hang_pids, run_script, script,
};
use hotroll_proto::v1::agent_message::Msg as AgentMsg;
use hotroll_proto::v1::coordinator_message::Msg as CoordMsg;
use hotroll_proto::v1::{self as pb, NodeState, StepList, StepPhase};

const UP: StepList = StepList::Up;
const DOWN: StepList = StepList::Down;

struct Setup {
    dir: tempfile::TempDir,
    fake: Fake,
    agent: RunningAgent,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_millis(500)).await;
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    fake.expect_hello().await;
    Setup { dir, fake, agent }
}

impl Setup {
    fn path(&self, name: &str) -> String {
        data_path(self.dir.path(), name).display().to_string()
    }

    async fn finish(self) {
        self.agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
        self.fake.stop().await;
    }

    async fn run(&mut self, source: String) {
        self.fake.send(run_script("r1", 1, source)).await;
    }

    async fn command(&mut self, m: CoordMsg) {
        self.fake.send(m).await;
    }

    async fn expect_accepted(&mut self) {
        match self.fake.expect_message().await {
            AgentMsg::ScriptAccepted(a) => assert_eq!((a.rollout_id.as_str(), a.epoch), ("r1", 1)),
            other => panic!("expected ScriptAccepted, got {other:?}"),
        }
    }

    async fn expect_prepared(&mut self) {
        match self.fake.expect_message().await {
            AgentMsg::Prepared(p) => assert_eq!(p.rollout_id, "r1"),
            other => panic!("expected Prepared, got {other:?}"),
        }
    }

    async fn expect_arrive(&mut self, id: &str, step: u32) {
        match self.fake.expect_message().await {
            AgentMsg::BarrierArrive(b) => assert_eq!((b.barrier_id.as_str(), b.step), (id, step)),
            other => panic!("expected BarrierArrive {id}, got {other:?}"),
        }
    }
}

fn commit() -> CoordMsg {
    CoordMsg::Commit(pb::Commit {
        rollout_id: "r1".into(),
        epoch: 1,
    })
}

fn abort(reason: &str) -> CoordMsg {
    CoordMsg::Abort(pb::Abort {
        rollout_id: "r1".into(),
        epoch: 1,
        reason: reason.into(),
    })
}

fn release(id: &str, ok: bool) -> CoordMsg {
    CoordMsg::BarrierRelease(pb::BarrierRelease {
        rollout_id: "r1".into(),
        epoch: 1,
        barrier_id: id.into(),
        ok,
        reason: String::new(),
    })
}

fn make_permanent() -> CoordMsg {
    CoordMsg::MakePermanent(pb::MakePermanent {
        rollout_id: "r1".into(),
        epoch: 1,
    })
}

#[tokio::test]
async fn apply_hook_runs_and_its_output_is_reported() {
    let mut s = setup().await;
    let marker = s.path("applied");
    s.run(script(
        &format!(r#"  {{ apply = {{ hook = "marker", args = ["{marker}"] }} }},"#),
        None,
    ))
    .await;
    s.expect_accepted().await;
    // No staging instruction: the node is prepared before the first one.
    s.expect_prepared().await;
    s.command(commit()).await;
    s.fake.expect_step(UP, 0, "apply", StepPhase::Started).await;
    let done = s
        .fake
        .expect_step(UP, 0, "apply", StepPhase::Succeeded)
        .await;
    assert!(done.output.contains("hello-from-hook"), "{done:?}");
    assert!(done.output.contains("warn-from-hook"), "{done:?}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default().trim(),
        "r1 0 up"
    );
    s.fake.expect_outcome(NodeState::Committed).await;
    s.command(make_permanent()).await;
    s.fake.expect_outcome(NodeState::Permanent).await;
    s.finish().await;
}

#[tokio::test]
async fn a_hook_timeout_kills_its_process_group_and_aborts() {
    let mut s = setup().await;
    let pids_file = s.path("pids");
    // `hang` has timeout = "1s" in the agent config.
    s.run(script(
        &format!(r#"  {{ check = {{ hook = "hang", args = ["{pids_file}"] }} }},"#),
        None,
    ))
    .await;
    s.expect_accepted().await;
    s.fake.expect_step(UP, 0, "check", StepPhase::Started).await;
    let pids = hang_pids(std::path::Path::new(&pids_file)).await;
    let failed = s.fake.expect_step(UP, 0, "check", StepPhase::Failed).await;
    assert!(failed.error.contains("timed out after 1s"), "{failed:?}");
    s.fake.expect_outcome(NodeState::Aborted).await;
    assert_gone(&pids).await;
    s.finish().await;
}

#[tokio::test]
async fn an_undeclared_hook_is_refused_before_anything_runs() {
    let mut s = setup().await;
    let marker = s.path("applied");
    s.run(script(
        &format!(
            r#"  {{ apply = {{ hook = "marker", args = ["{marker}"] }} }},
  {{ apply = "rm_rf" }},"#
        ),
        None,
    ))
    .await;
    match s.fake.expect_message().await {
        AgentMsg::ScriptRefused(r) => {
            assert!(
                r.errors
                    .iter()
                    .any(|e| e.starts_with("upgrade.toml:") && e.contains("rm_rf")),
                "{:?}",
                r.errors
            );
        }
        other => panic!("expected ScriptRefused, got {other:?}"),
    }
    s.fake.quiet_for(Duration::from_millis(300)).await;
    assert!(!std::path::Path::new(&marker).exists());
    s.finish().await;
}

#[tokio::test]
async fn sync_nodes_blocks_until_released() {
    let mut s = setup().await;
    s.run(script(
        r#"  { sync_nodes = "staged" },
  { check = "ok" },"#,
        None,
    ))
    .await;
    s.expect_accepted().await;
    s.fake
        .expect_step(UP, 0, "sync_nodes", StepPhase::Started)
        .await;
    s.expect_arrive("staged", 0).await;
    s.fake.quiet_for(Duration::from_millis(500)).await;
    s.command(release("staged", true)).await;
    s.fake
        .expect_step(UP, 0, "sync_nodes", StepPhase::Succeeded)
        .await;
    s.fake.expect_step(UP, 1, "check", StepPhase::Started).await;
    s.fake
        .expect_step(UP, 1, "check", StepPhase::Succeeded)
        .await;
    s.expect_prepared().await;
    s.command(abort("done testing")).await;
    s.fake.expect_outcome(NodeState::Aborted).await;
    s.finish().await;
}

#[tokio::test]
async fn the_point_of_no_return_waits_for_commit() {
    let mut s = setup().await;
    let marker = s.path("committed");
    s.run(script(
        &format!(
            r#"  {{ check = "ok" }},
  "point_of_no_return",
  {{ apply = {{ hook = "marker", args = ["{marker}"] }} }},"#
        ),
        None,
    ))
    .await;
    s.expect_accepted().await;
    s.fake.expect_step(UP, 0, "check", StepPhase::Started).await;
    s.fake
        .expect_step(UP, 0, "check", StepPhase::Succeeded)
        .await;
    s.fake
        .expect_step(UP, 1, "point_of_no_return", StepPhase::Started)
        .await;
    s.expect_prepared().await;
    s.fake.quiet_for(Duration::from_millis(500)).await;
    assert!(!std::path::Path::new(&marker).exists());
    s.command(commit()).await;
    s.fake
        .expect_step(UP, 1, "point_of_no_return", StepPhase::Succeeded)
        .await;
    s.fake.expect_step(UP, 2, "apply", StepPhase::Started).await;
    s.fake
        .expect_step(UP, 2, "apply", StepPhase::Succeeded)
        .await;
    s.fake.expect_outcome(NodeState::Committed).await;
    assert!(std::path::Path::new(&marker).exists());
    s.finish().await;
}

#[tokio::test]
async fn abort_at_a_barrier_aborts_the_node() {
    let mut s = setup().await;
    s.run(script(
        r#"  { sync_nodes = "staged" },
  "point_of_no_return","#,
        None,
    ))
    .await;
    s.expect_accepted().await;
    s.fake
        .expect_step(UP, 0, "sync_nodes", StepPhase::Started)
        .await;
    s.expect_arrive("staged", 0).await;
    s.command(abort("node-2 failed its check")).await;
    let failed = s
        .fake
        .expect_step(UP, 0, "sync_nodes", StepPhase::Failed)
        .await;
    assert!(
        failed.error.contains("node-2 failed its check"),
        "{failed:?}"
    );
    let outcome = s.fake.expect_outcome(NodeState::Aborted).await;
    assert!(
        outcome.error.contains("aborted by the coordinator"),
        "{outcome:?}"
    );
    s.finish().await;
}

#[tokio::test]
async fn a_failure_after_the_point_of_no_return_rolls_back_with_down() {
    let mut s = setup().await;
    let rolled = s.path("rolled-back");
    s.run(script(
        r#"  "point_of_no_return",
  { apply = "fail" },"#,
        Some(&format!(
            r#"  {{ apply = {{ hook = "marker", args = ["{rolled}"] }} }},"#
        )),
    ))
    .await;
    s.expect_accepted().await;
    s.fake
        .expect_step(UP, 0, "point_of_no_return", StepPhase::Started)
        .await;
    s.expect_prepared().await;
    s.command(commit()).await;
    s.fake
        .expect_step(UP, 0, "point_of_no_return", StepPhase::Succeeded)
        .await;
    s.fake.expect_step(UP, 1, "apply", StepPhase::Started).await;
    let failed = s.fake.expect_step(UP, 1, "apply", StepPhase::Failed).await;
    assert!(failed.error.contains("exited with status 3"), "{failed:?}");
    let rolling = s.fake.expect_outcome(NodeState::RollingBack).await;
    assert!(
        rolling.error.contains("exited with status 3"),
        "{rolling:?}"
    );
    s.fake
        .expect_step(DOWN, 0, "apply", StepPhase::Started)
        .await;
    s.fake
        .expect_step(DOWN, 0, "apply", StepPhase::Succeeded)
        .await;
    s.fake.expect_outcome(NodeState::RolledBack).await;
    assert_eq!(
        std::fs::read_to_string(&rolled).unwrap_or_default().trim(),
        "r1 0 down"
    );
    s.finish().await;
}

#[tokio::test]
async fn reports_made_while_disconnected_arrive_after_reconnect() {
    let mut s = setup().await;
    s.run(script(
        r#"  "point_of_no_return",
  { apply = "ok" },"#,
        None,
    ))
    .await;
    s.expect_accepted().await;
    s.fake
        .expect_step(UP, 0, "point_of_no_return", StepPhase::Started)
        .await;
    s.expect_prepared().await;
    s.command(commit()).await;
    s.fake
        .expect_step(UP, 0, "point_of_no_return", StepPhase::Succeeded)
        .await;
    s.fake.expect_step(UP, 1, "apply", StepPhase::Started).await;
    s.fake
        .expect_step(UP, 1, "apply", StepPhase::Succeeded)
        .await;
    s.fake.expect_outcome(NodeState::Committed).await;

    // The session drops while the node waits for MakePermanent; after the reconnect the node
    // says again where it is.
    s.fake.drop_session();
    loop {
        match s.fake.next().await {
            common::Event::Closed => {}
            common::Event::Hello(hello) => {
                assert_eq!(hello.journal.len(), 1);
                assert_eq!(hello.journal[0].node_state, NodeState::Committed as i32);
                break;
            }
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    s.fake.expect_outcome(NodeState::Committed).await;
    s.command(make_permanent()).await;
    s.fake.expect_outcome(NodeState::Permanent).await;
    s.finish().await;
}
