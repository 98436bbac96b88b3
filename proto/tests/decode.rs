//! Hostile input: every message type the agent and the coordinator accept, decoded from random
//! bytes and from mutations of valid encodings. Decoding must never panic; what decodes must
//! survive a re-encode/decode round trip. Runs in CI with a bounded case count
//! (`PROPTEST_CASES` overrides it); the number of decodes is printed.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::sync::atomic::{AtomicU64, Ordering};

use hotroll_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;

static DECODES: AtomicU64 = AtomicU64::new(0);

/// Decode `bytes` as `M`; when it decodes, encoding and decoding again gives the same message.
fn check<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> u64 {
    if let Ok(message) = M::decode(bytes) {
        let again = M::decode(message.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again, message);
    }
    1
}

/// Every message type of `hotroll.proto` (44 of them).
fn decode_all(bytes: &[u8]) {
    let mut n = 0;
    n += check::<pb::AgentMessage>(bytes);
    n += check::<pb::Hello>(bytes);
    n += check::<pb::AppState>(bytes);
    n += check::<pb::JournalEntry>(bytes);
    n += check::<pb::Heartbeat>(bytes);
    n += check::<pb::Goodbye>(bytes);
    n += check::<pb::ScriptAccepted>(bytes);
    n += check::<pb::ScriptRefused>(bytes);
    n += check::<pb::StepReport>(bytes);
    n += check::<pb::BarrierArrive>(bytes);
    n += check::<pb::Prepared>(bytes);
    n += check::<pb::NodeOutcome>(bytes);
    n += check::<pb::CoordinatorMessage>(bytes);
    n += check::<pb::Welcome>(bytes);
    n += check::<pb::RunScript>(bytes);
    n += check::<pb::ScriptArtifact>(bytes);
    n += check::<pb::BarrierRelease>(bytes);
    n += check::<pb::Commit>(bytes);
    n += check::<pb::Abort>(bytes);
    n += check::<pb::Rollback>(bytes);
    n += check::<pb::MakePermanent>(bytes);
    n += check::<pb::FetchArtifactRequest>(bytes);
    n += check::<pb::ArtifactChunk>(bytes);
    n += check::<pb::ArtifactRef>(bytes);
    n += check::<pb::HasArtifactsRequest>(bytes);
    n += check::<pb::HasArtifactsResponse>(bytes);
    n += check::<pb::StartRolloutRequest>(bytes);
    n += check::<pb::StartRolloutResponse>(bytes);
    n += check::<pb::GetRolloutRequest>(bytes);
    n += check::<pb::ListRolloutsRequest>(bytes);
    n += check::<pb::ListRolloutsResponse>(bytes);
    n += check::<pb::RolloutSummary>(bytes);
    n += check::<pb::RolloutStatus>(bytes);
    n += check::<pb::NodeStatus>(bytes);
    n += check::<pb::BarrierStatus>(bytes);
    n += check::<pb::WatchRolloutRequest>(bytes);
    n += check::<pb::RolloutEvent>(bytes);
    n += check::<pb::ListNodesRequest>(bytes);
    n += check::<pb::ListNodesResponse>(bytes);
    n += check::<pb::NodeInfo>(bytes);
    n += check::<pb::RolloutControlRequest>(bytes);
    n += check::<pb::JoinRequest>(bytes);
    n += check::<pb::RenewRequest>(bytes);
    n += check::<pb::CertificateResponse>(bytes);
    DECODES.fetch_add(n, Ordering::Relaxed);
}

/// Valid encodings to mutate: a full Hello, a RunScript, a StartRolloutRequest, a JoinRequest.
fn seeds() -> Vec<Vec<u8>> {
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: "node-1".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            boot_generation: 7,
            min_protocol_version: 1,
            max_protocol_version: 1,
            agent_version: "0.1.0".into(),
            apps: vec![pb::AppState {
                app: "a".into(),
                current: "1".into(),
                permanent: "1".into(),
                ..Default::default()
            }],
            journal: vec![pb::JournalEntry {
                rollout_id: "r".into(),
                epoch: 1,
                step: 2,
                phase: 3,
                node_state: 4,
                error: "e".into(),
            }],
        })),
    };
    let run = pb::CoordinatorMessage {
        msg: Some(pb::coordinator_message::Msg::RunScript(pb::RunScript {
            rollout_id: "r".into(),
            epoch: 1,
            script_name: "s.toml".into(),
            script_source: "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n".into(),
            artifacts: vec![pb::ScriptArtifact {
                name: "bin/x".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
                size: 3,
                mode: 0o755,
                unpack: true,
            }],
            step_timeout_ms: 1000,
            barrier_timeout_ms: 1000,
        })),
    };
    let start = pb::StartRolloutRequest {
        script_name: "s.toml".into(),
        script_source: "x".into(),
        select: [("zone".to_string(), "a".to_string())].into(),
        artifacts: vec![],
        skip_unreachable: false,
        dry_run: false,
    };
    let join = pb::JoinRequest {
        token: "hr1.x.y".into(),
        node: "n".into(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
    };
    vec![
        hello.encode_to_vec(),
        run.encode_to_vec(),
        start.encode_to_vec(),
        join.encode_to_vec(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match *m {
        Mutation::Flip(at, mask) => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b ^= mask;
            }
        }
        Mutation::Truncate(at) => bytes.truncate(at % len),
        Mutation::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
        Mutation::Remove(at) => {
            if !bytes.is_empty() {
                bytes.remove(at % bytes.len());
            }
        }
    }
}

/// The case count: `PROPTEST_CASES` when set (a deeper run), else `default` (CI).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1024), ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_encodings_decode_or_fail_cleanly(
        seed in 0..4usize,
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let mut bytes = seeds()[seed].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_all(&bytes);
    }
}

/// Runs after the property tests in the same process only by chance; it reports what one
/// `decode_all` covers and that the seeds are valid.
#[test]
fn seeds_decode_and_the_count_is_reported() {
    for seed in seeds() {
        decode_all(&seed);
    }
    eprintln!(
        "decode fuzz: {} message types per input; {} decodes in this test",
        44,
        DECODES.load(Ordering::Relaxed)
    );
}
