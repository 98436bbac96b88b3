//! Hostile input, at the coordinator's RPC handlers: random bytes (and mutations of valid
//! encodings) sent as the message of every RPC the coordinator serves, and random sequences of
//! agent messages after a valid Hello, to a real server on 127.0.0.1. Every call must end with
//! an answer or a status within a deadline (no panic, no hang), and the server must keep
//! serving a legitimate client afterwards. Bounded case counts (`PROPTEST_CASES` overrides).
//!
//! Two servers: plaintext (garbage reaches the handlers directly) and TLS with an operator and
//! a node certificate (garbage passes the guards first).
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut};
use hotroll_coordinator::store::MemoryStore;
use hotroll_local::Fleet;
use hotroll_proto::v1 as pb;
use hotroll_tls::client::{ClientCert, channel_uri};
use hotroll_tls::{ClientTls, Trust, files};
use proptest::prelude::*;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

/// Passes bytes through as the gRPC message, both ways.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Unary,
    ClientStream,
    ServerStream,
    Bidi,
}

/// Every RPC of the Agent, Control and Identity services.
const METHODS: [(&str, Kind); 16] = [
    ("/hotroll.v1.Agent/Session", Kind::Bidi),
    ("/hotroll.v1.Agent/FetchArtifact", Kind::ServerStream),
    ("/hotroll.v1.Control/UploadArtifact", Kind::ClientStream),
    ("/hotroll.v1.Control/HasArtifacts", Kind::Unary),
    ("/hotroll.v1.Control/StartRollout", Kind::Unary),
    ("/hotroll.v1.Control/GetRollout", Kind::Unary),
    ("/hotroll.v1.Control/ListRollouts", Kind::Unary),
    ("/hotroll.v1.Control/WatchRollout", Kind::ServerStream),
    ("/hotroll.v1.Control/ListNodes", Kind::Unary),
    ("/hotroll.v1.Control/AbortRollout", Kind::Unary),
    ("/hotroll.v1.Control/PauseRollout", Kind::Unary),
    ("/hotroll.v1.Control/ResumeRollout", Kind::Unary),
    ("/hotroll.v1.Control/PromoteRollout", Kind::Unary),
    ("/hotroll.v1.Identity/Join", Kind::Unary),
    ("/hotroll.v1.Identity/Renew", Kind::Unary),
    ("/hotroll.v1.Control/ListNodes", Kind::Unary),
];

static CALLS: AtomicU64 = AtomicU64::new(0);

struct Fixture {
    plain: Channel,
    /// Operator certificate (Control), and a node certificate (Agent, Renew).
    operator: Channel,
    node: Channel,
    // Before `runtime`: the servers are aborted while their runtime still exists.
    _fleets: Vec<Fleet>,
    runtime: tokio::runtime::Runtime,
}

/// A coordinator alone on a MemoryStore: plaintext, or TLS.
async fn server(tls: bool) -> Fleet {
    let builder = Fleet::builder()
        .agents(0)
        .store(Arc::new(MemoryStore::default()))
        .server_config(|config| config.heartbeat_interval = Duration::from_millis(200));
    let builder = if tls { builder } else { builder.insecure() };
    builder.build().await.unwrap()
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (plain, operator, node, fleets) = runtime.block_on(async {
        let plain_fleet = server(false).await;
        let tls_fleet = server(true).await;
        // Certificates, not tokens: the guards see a client identity on every call.
        let pki = tls_fleet.credentials().unwrap().server().pki().clone();
        let ca = Trust::Ca(files::parse_certs(pki.ca_pem().as_bytes()).unwrap());
        let cert = |role, name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let (pem, _) = pki
                .issue_client(
                    &hotroll_tls::Identity::new(role, name),
                    &key,
                    Duration::from_secs(3600),
                )
                .unwrap();
            ClientCert {
                chain: files::parse_certs(pem.as_bytes()).unwrap(),
                key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            }
        };
        let endpoint = || Endpoint::from_shared(channel_uri(tls_fleet.url())).unwrap();
        let operator = ClientTls::new(&ca, Some(cert(hotroll_tls::Role::Operator, "fuzz")))
            .unwrap()
            .connect(endpoint())
            .await
            .unwrap();
        let node = ClientTls::new(&ca, Some(cert(hotroll_tls::Role::Node, "node-1")))
            .unwrap()
            .connect(endpoint())
            .await
            .unwrap();
        let plain = plain_fleet.channel().await.unwrap();
        (plain, operator, node, vec![plain_fleet, tls_fleet])
    });
    Fixture {
        plain,
        operator,
        node,
        _fleets: fleets,
        runtime,
    }
}

/// One call of `path` with `messages` as its raw request message(s); it must end (an answer or
/// a status) within the deadline.
async fn call(channel: Channel, path: &'static str, kind: Kind, messages: Vec<Vec<u8>>) {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    let name = path;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let first = messages.first().cloned().unwrap_or_default();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async move {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        match kind {
            Kind::Unary => grpc
                .unary(tonic::Request::new(first), path, Raw)
                .await
                .map(|_| ()),
            Kind::ClientStream => grpc
                .client_streaming(tonic::Request::new(tokio_stream::iter(messages)), path, Raw)
                .await
                .map(|_| ()),
            Kind::ServerStream => {
                let mut stream = grpc
                    .server_streaming(tonic::Request::new(first), path, Raw)
                    .await?
                    .into_inner();
                // Read a little (a watch of a running rollout would not end on its own).
                for _ in 0..4 {
                    match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) | Err(_) => break,
                        Ok(Err(status)) => return Err(status),
                    }
                }
                Ok(())
            }
            Kind::Bidi => {
                let mut stream = grpc
                    .streaming(tonic::Request::new(tokio_stream::iter(messages)), path, Raw)
                    .await?
                    .into_inner();
                // The first answer (Welcome) or the status.
                match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Ok(()),
                }
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "{name} did not answer within 10 s");
    let n = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_multiple_of(64) {
        eprintln!("rpc fuzz: {n} calls answered");
    }
}

/// A legitimate client is still served.
async fn alive(fx_channel: Channel) {
    let mut control = pb::control_client::ControlClient::new(fx_channel);
    tokio::time::timeout(
        Duration::from_secs(5),
        control.list_nodes(pb::ListNodesRequest {}),
    )
    .await
    .expect("the server stopped answering")
    .expect("the server refused a legitimate call");
}

fn seeds() -> Vec<Vec<u8>> {
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: "node-1".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            boot_generation: 1,
            min_protocol_version: 1,
            max_protocol_version: 1,
            agent_version: "x".into(),
            apps: vec![],
            journal: vec![],
        })),
    };
    let start = pb::StartRolloutRequest {
        script_name: "s.toml".into(),
        script_source:
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = [{ check = \"ok\" }]\n".into(),
        select: Default::default(),
        artifacts: vec![],
        skip_unreachable: false,
        dry_run: false,
    };
    let chunk = pb::ArtifactChunk {
        digest: format!("sha256:{}", "a".repeat(64)),
        offset: 0,
        data: b"hello".to_vec(),
        total_size: 5,
    };
    let watch = pb::WatchRolloutRequest {
        rollout_id: "01970000-0000-7000-8000-000000000000".into(),
        from_seq: u64::MAX,
    };
    vec![
        hello.encode_to_vec(),
        start.encode_to_vec(),
        chunk.encode_to_vec(),
        watch.encode_to_vec(),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    for &(at, b) in edits {
        if bytes.is_empty() {
            bytes.push(b);
        } else {
            match b % 3 {
                0 => {
                    let i = at % bytes.len();
                    bytes[i] ^= b | 1;
                }
                1 => bytes.truncate(at % bytes.len()),
                _ => bytes.insert(at % (bytes.len() + 1), b),
            }
        }
    }
    bytes
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("node-1".to_string()),
        Just("../../etc/passwd".to_string()),
        Just(format!("sha256:{}", "0".repeat(64))),
        "[ -~]{0,40}",
        any::<String>(),
    ]
}

/// Agent messages with arbitrary contents (after a valid Hello).
fn arb_agent_message() -> impl Strategy<Value = pb::AgentMessage> {
    use pb::agent_message::Msg;
    let msg = prop_oneof![
        (arb_string(), any::<u32>(), any::<u32>()).prop_map(|(node, min, max)| Msg::Hello(
            pb::Hello {
                node,
                min_protocol_version: min,
                max_protocol_version: max,
                ..Default::default()
            }
        )),
        any::<u64>().prop_map(|seq| Msg::Heartbeat(pb::Heartbeat {
            seq,
            sent_unix_ms: seq,
            next_within_ms: seq,
        })),
        (arb_string(), any::<u64>()).prop_map(|(rollout_id, epoch)| Msg::ScriptAccepted(
            pb::ScriptAccepted { rollout_id, epoch }
        )),
        (arb_string(), any::<u64>(), arb_string()).prop_map(|(rollout_id, epoch, e)| {
            Msg::ScriptRefused(pb::ScriptRefused {
                rollout_id,
                epoch,
                errors: vec![e],
            })
        }),
        (
            arb_string(),
            any::<u64>(),
            any::<u32>(),
            any::<i32>(),
            any::<i32>(),
            arb_string()
        )
            .prop_map(|(rollout_id, epoch, step, list, phase, error)| Msg::Step(
                pb::StepReport {
                    rollout_id,
                    epoch,
                    step,
                    list,
                    instruction: "check".into(),
                    phase,
                    duration_ms: 1,
                    // More warnings than the coordinator keeps: it bounds them.
                    warnings: vec![error.clone(); 20],
                    error,
                    output: String::new(),
                    at_unix_ms: 0,
                }
            )),
        (arb_string(), any::<u64>(), arb_string(), any::<u32>()).prop_map(
            |(rollout_id, epoch, barrier_id, step)| Msg::BarrierArrive(pb::BarrierArrive {
                rollout_id,
                epoch,
                barrier_id,
                step,
            })
        ),
        (arb_string(), any::<u64>())
            .prop_map(|(rollout_id, epoch)| Msg::Prepared(pb::Prepared { rollout_id, epoch })),
        (
            arb_string(),
            any::<u64>(),
            any::<i32>(),
            any::<u32>(),
            arb_string()
        )
            .prop_map(|(rollout_id, epoch, state, step, app)| Msg::Outcome(
                pb::NodeOutcome {
                    rollout_id,
                    epoch,
                    state,
                    error: String::new(),
                    step,
                    apps: vec![pb::AppState {
                        app,
                        current: "1".into(),
                        permanent: "1".into(),
                        ..Default::default()
                    }],
                }
            )),
    ];
    prop::option::weighted(0.9, msg).prop_map(|msg| pb::AgentMessage { msg })
}

fn hello_bytes(node: &str) -> Vec<u8> {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: node.into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// The case count: `PROPTEST_CASES` when set (a deeper run), else `default` (CI).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// Random bytes as the request of every RPC, on both servers.
    #[test]
    fn random_bytes_to_every_rpc(
        method in 0..METHODS.len(),
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..256), 1..4),
    ) {
        let fx = FIXTURE.with(|f| f.clone());
        let (path, kind) = METHODS[method];
        fx.runtime.block_on(async {
            call(fx.plain.clone(), path, kind, messages.clone()).await;
            let channel = if path.starts_with("/hotroll.v1.Control") {
                fx.operator.clone()
            } else {
                fx.node.clone()
            };
            call(channel, path, kind, messages).await;
            alive(fx.plain.clone()).await;
            alive(fx.operator.clone()).await;
        });
    }

    /// Mutated valid encodings as the request of every RPC.
    #[test]
    fn mutated_encodings_to_every_rpc(
        method in 0..METHODS.len(),
        seed in 0..4usize,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let fx = FIXTURE.with(|f| f.clone());
        let (path, kind) = METHODS[method];
        let bytes = mutate(seeds()[seed].clone(), &edits);
        fx.runtime.block_on(async {
            call(fx.plain.clone(), path, kind, vec![bytes.clone()]).await;
            let channel = if path.starts_with("/hotroll.v1.Control") {
                fx.operator.clone()
            } else {
                fx.node.clone()
            };
            call(channel, path, kind, vec![bytes]).await;
            alive(fx.operator.clone()).await;
        });
    }

    /// A valid Hello, then arbitrary agent messages: the session handler must take them all.
    #[test]
    fn garbage_after_a_valid_hello(
        messages in prop::collection::vec(arb_agent_message(), 1..12),
    ) {
        let fx = FIXTURE.with(|f| f.clone());
        let mut raw = vec![hello_bytes("node-1")];
        raw.extend(messages.iter().map(Message::encode_to_vec));
        fx.runtime.block_on(async {
            call(fx.node.clone(), "/hotroll.v1.Agent/Session", Kind::Bidi, raw.clone()).await;
            let mut plain = raw;
            plain[0] = hello_bytes("fuzz-node");
            call(fx.plain.clone(), "/hotroll.v1.Agent/Session", Kind::Bidi, plain).await;
            alive(fx.plain.clone()).await;
        });
    }
}

thread_local! {
    static FIXTURE: Arc<Fixture> = Arc::new(fixture());
}

#[test]
fn the_call_count_is_reported() {
    // Each property test runs in its own process under nextest; this one only says how the
    // counts add up, for the report.
    eprintln!(
        "rpc fuzz: {} RPCs x 2 servers per random-bytes case, 2 calls per mutated case, 2 sessions \
         per garbage-session case ({} calls made in this process)",
        METHODS.len(),
        CALLS.load(Ordering::Relaxed)
    );
}
