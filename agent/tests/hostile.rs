//! Hostile input at the agent: what a (fake) coordinator sends on the session. Scripts naming
//! undeclared hooks, services or MFAs, and artifacts outside the release, are refused whole
//! before anything runs; arbitrary coordinator messages (a proptest harness with a bounded case
//! count, `PROPTEST_CASES` overrides) neither crash the agent nor stop it from serving its
//! session.

mod common;

use std::time::Duration;

use common::{Event, Fake, RunningAgent, agent_config, data_path, run_script, script};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_message::Msg as AgentMsg;
use hotroll_proto::v1::coordinator_message::Msg as CoordMsg;
use proptest::prelude::*;

/// Wait (bounded) for the agent's answer about `rollout`, skipping anything else.
async fn answer_about(fake: &mut Fake, rollout: &str) -> AgentMsg {
    let wait = async {
        loop {
            if let Event::Message(m) = fake.next_event().await {
                let id = match &m {
                    AgentMsg::ScriptRefused(r) => &r.rollout_id,
                    AgentMsg::ScriptAccepted(a) => &a.rollout_id,
                    AgentMsg::Outcome(o) => &o.rollout_id,
                    AgentMsg::Step(s) => &s.rollout_id,
                    _ => continue,
                };
                if id == rollout {
                    return m;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no answer about {rollout} within 20 s"))
}

fn artifact(name: &str) -> pb::ScriptArtifact {
    pb::ScriptArtifact {
        name: name.into(),
        digest: format!("sha256:{}", "0".repeat(64)),
        size: 1,
        mode: 0,
        unpack: false,
    }
}

#[tokio::test]
async fn undeclared_names_and_escaping_artifacts_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut fake = Fake::start(Duration::from_millis(500)).await;
    let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
    fake.expect_hello().await;
    let marker = data_path(dir.path(), "ran").display().to_string();
    let first = format!(r#"  {{ apply = {{ hook = "marker", args = ["{marker}"] }} }},"#);
    let cases: Vec<(&str, String, Vec<pb::ScriptArtifact>, &str)> = vec![
        (
            "hook",
            script(&format!("{first}\n  {{ apply = \"rm_rf\" }},"), None),
            vec![],
            "rm_rf",
        ),
        (
            "service",
            script(
                &format!("{first}\n  \"point_of_no_return\",\n  {{ restart = \"sshd\" }},"),
                None,
            ),
            vec![],
            "sshd",
        ),
        (
            "mfa",
            "app = \"primes\"\nruntime = \"beam\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = [\n  { apply = { mfa = \"os:cmd/1\", args = [\"rm -rf /\"] } },\n]\n"
                .to_string(),
            vec![],
            "os:cmd/1",
        ),
    ];
    for (i, (what, source, artifacts, needle)) in cases.into_iter().enumerate() {
        let id = format!("r-{what}");
        let mut command = run_script(&id, i as u64 + 1, source);
        if let CoordMsg::RunScript(run) = &mut command {
            run.artifacts = artifacts;
        }
        fake.send(command).await;
        match answer_about(&mut fake, &id).await {
            AgentMsg::ScriptRefused(r) => assert!(
                r.errors.iter().any(|e| e.contains(needle)),
                "{what}: {:?}",
                r.errors
            ),
            other => panic!("{what}: expected ScriptRefused, got {other:?}"),
        }
    }
    // Artifacts whose names leave the release, sent straight to the agent (the coordinator
    // refuses such scripts too).
    for (i, name) in ["../../etc/passwd", "/etc/passwd", "a/../../b"]
        .into_iter()
        .enumerate()
    {
        let id = format!("r-path-{i}");
        let source = format!(
            "app = \"primes\"\nfrom = \"1\"\nto = \"2\"\n[[artifacts]]\nname = \"{name}\"\nsource = \"x\"\n[script]\nup = [\n  {{ load_object_code = [\"{name}\"] }},\n{first}\n]\n"
        );
        let mut command = run_script(&id, 10 + i as u64, source);
        if let CoordMsg::RunScript(run) = &mut command {
            run.artifacts = vec![artifact(name)];
        }
        fake.send(command).await;
        match answer_about(&mut fake, &id).await {
            AgentMsg::ScriptRefused(r) => assert!(!r.errors.is_empty()),
            other => panic!("{name}: expected ScriptRefused, got {other:?}"),
        }
    }
    fake.quiet_for(Duration::from_millis(300)).await;
    assert!(
        !std::path::Path::new(&marker).exists(),
        "a refused script ran its first step"
    );
    agent.stop().await.unwrap_or_else(|e| panic!("{e}"));
    fake.stop().await;
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("r-1".to_string()),
        Just("../../etc".to_string()),
        "[ -~]{0,30}",
        any::<String>(),
    ]
}

fn arb_source() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_text(),
        Just(script("  { apply = \"rm_rf\" },", None)),
        Just("app = \"primes\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = [\"point_of_no_return\", \"point_of_no_return\"]\n".to_string()),
        prop::collection::vec(any::<char>(), 0..300).prop_map(|c| c.into_iter().collect()),
    ]
}

/// Any command a coordinator could send, with arbitrary contents.
fn arb_command() -> impl Strategy<Value = CoordMsg> {
    prop_oneof![
        (
            arb_text(),
            any::<u64>(),
            arb_source(),
            prop::collection::vec(
                (
                    arb_text(),
                    arb_text(),
                    any::<u64>(),
                    any::<u32>(),
                    any::<bool>()
                ),
                0..3
            ),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(rollout_id, epoch, source, artifacts, step, barrier)| {
                CoordMsg::RunScript(pb::RunScript {
                    rollout_id,
                    epoch,
                    script_name: "fuzz.toml".into(),
                    script_source: source,
                    artifacts: artifacts
                        .into_iter()
                        .map(|(name, digest, size, mode, unpack)| pb::ScriptArtifact {
                            name,
                            digest,
                            size,
                            mode,
                            unpack,
                        })
                        .collect(),
                    step_timeout_ms: step,
                    barrier_timeout_ms: barrier,
                })
            }),
        (arb_text(), any::<u64>(), arb_text(), any::<bool>()).prop_map(
            |(rollout_id, epoch, barrier_id, ok)| {
                CoordMsg::BarrierRelease(pb::BarrierRelease {
                    rollout_id,
                    epoch,
                    barrier_id,
                    ok,
                    reason: String::new(),
                })
            }
        ),
        (arb_text(), any::<u64>())
            .prop_map(|(rollout_id, epoch)| CoordMsg::Commit(pb::Commit { rollout_id, epoch })),
        (arb_text(), any::<u64>(), arb_text()).prop_map(|(rollout_id, epoch, reason)| {
            CoordMsg::Abort(pb::Abort {
                rollout_id,
                epoch,
                reason,
            })
        }),
        (arb_text(), any::<u64>(), arb_text()).prop_map(|(rollout_id, epoch, reason)| {
            CoordMsg::Rollback(pb::Rollback {
                rollout_id,
                epoch,
                reason,
            })
        }),
        (arb_text(), any::<u64>()).prop_map(|(rollout_id, epoch)| CoordMsg::MakePermanent(
            pb::MakePermanent { rollout_id, epoch }
        )),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
            |(epoch, protocol_version, heartbeat_interval_ms)| {
                CoordMsg::Welcome(pb::Welcome {
                    epoch,
                    protocol_version,
                    coordinator_id: "x".into(),
                    heartbeat_interval_ms,
                    leader_epoch: epoch,
                })
            }
        ),
        any::<u64>().prop_map(|seq| CoordMsg::Heartbeat(pb::Heartbeat {
            seq,
            sent_unix_ms: seq,
            next_within_ms: seq,
        })),
    ]
}

struct Rig {
    runtime: tokio::runtime::Runtime,
    fake: std::sync::Mutex<Option<Fake>>,
    _agent: RunningAgent,
    dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (fake, agent) = runtime.block_on(async {
        let mut fake = Fake::start(Duration::from_millis(500)).await;
        let agent = RunningAgent::spawn(agent_config(dir.path(), "node-1", &fake.url()));
        fake.expect_hello().await;
        (fake, agent)
    });
    Rig {
        runtime,
        fake: std::sync::Mutex::new(Some(fake)),
        _agent: agent,
        dir,
    }
}

thread_local! {
    static RIG: std::rc::Rc<Rig> = std::rc::Rc::new(rig());
    static PROBE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The case count: `PROPTEST_CASES` when set (a deeper run), else `default` (CI).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// After any burst of arbitrary commands the agent still answers on its session (a probe
    /// script is refused), and no undeclared command ran.
    #[test]
    fn arbitrary_commands_do_not_break_the_agent(commands in prop::collection::vec(arb_command(), 1..8)) {
        let rig = RIG.with(std::rc::Rc::clone);
        let probe = PROBE.with(|p| { p.set(p.get() + 1); p.get() });
        let mut fake = rig.fake.lock().unwrap_or_else(|e| panic!("{e}")).take().unwrap_or_else(|| panic!("no fake"));
        rig.runtime.block_on(async {
            for command in commands {
                fake.send(command).await;
            }
            let id = format!("probe-{probe}");
            fake.send(run_script(&id, u64::MAX - 1, script("  { apply = \"rm_rf\" },", None))).await;
            let _ = answer_about(&mut fake, &id).await;
        });
        *rig.fake.lock().unwrap_or_else(|e| panic!("{e}")) = Some(fake);
        prop_assert!(!data_path(rig.dir.path(), "rm_rf").exists());
    }
}
