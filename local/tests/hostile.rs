//! Hostile clients against a real TLS coordinator on 127.0.0.1 (in-process, a local fleet):
//! every case gets a clear error, is logged, changes nothing, and the server keeps serving
//! others (checked after each case with a legitimate call).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotroll_coordinator::auth::{
    FREE_FAILURES, MAX_ARTIFACTS_PER_SCRIPT, MAX_CONCURRENT_UPLOADS, TokenRole,
};
use hotroll_coordinator::store::MemoryStore;
use hotroll_local::Fleet;
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_client::AgentClient;
use hotroll_proto::v1::control_client::ControlClient;
use hotroll_proto::v1::identity_client::IdentityClient;
use hotroll_tls::client::{ClientCert, channel_uri};
use hotroll_tls::{ClientTls, Trust, files};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Log lines the server wrote during the test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn assert_contains(&self, what: &str) {
        let text = self.text();
        assert!(text.contains(what), "the log lacks {what:?}:\n{text}");
    }
}

/// A TLS coordinator alone (a local fleet without agents) on a MemoryStore, its log captured.
struct Server {
    fleet: Fleet,
    url: String,
    ca: PathBuf,
    pin: [u8; 32],
    logs: Logs,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Server {
    async fn start(node_cert_ttl: Duration) -> Self {
        let logs = Logs::default();
        let writer = logs.clone();
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish(),
        );
        let fleet = Fleet::builder()
            .agents(0)
            .store(Arc::new(MemoryStore::default()))
            .tls_options(move |options| options.node_cert_ttl = node_cert_ttl)
            .server_config(|config| config.heartbeat_interval = Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        Self {
            url: fleet.url().to_string(),
            ca: fleet.ca_path().unwrap(),
            pin: fleet.ca_pin().unwrap(),
            fleet,
            logs,
            _guard: guard,
        }
    }

    fn token(&self, role: TokenRole, ttl: Duration, node: Option<&str>) -> String {
        self.fleet.token(role, ttl, node).unwrap()
    }

    async fn try_channel(
        &self,
        cert: Option<ClientCert>,
        from: Option<IpAddr>,
    ) -> Result<Channel, tonic::transport::Error> {
        let trust = Trust::Ca(files::read_certs(&self.ca).unwrap());
        let tls = ClientTls::new(&trust, cert)
            .unwrap()
            .with_local_address(from);
        tls.connect(Endpoint::from_shared(channel_uri(&self.url)).unwrap())
            .await
    }

    async fn channel(&self, cert: Option<ClientCert>) -> Channel {
        self.try_channel(cert, None).await.unwrap()
    }

    /// Join as `node` with `token`: the node's certificate and key.
    async fn join(&self, node: &str, token: &str) -> Result<ClientCert, tonic::Status> {
        self.join_from(node, token, None).await
    }

    /// [`Server::join`] from another loopback address (each failing case from its own, so
    /// that the back-off after failures does not mix them up).
    async fn join_from(
        &self,
        node: &str,
        token: &str,
        from: Option<[u8; 4]>,
    ) -> Result<ClientCert, tonic::Status> {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let channel = self
            .try_channel(None, from.map(IpAddr::from))
            .await
            .unwrap();
        let response = IdentityClient::new(channel)
            .join(pb::JoinRequest {
                token: token.to_string(),
                node: node.to_string(),
                csr_pem: csr,
            })
            .await?
            .into_inner();
        Ok(ClientCert {
            chain: files::parse_certs(response.certificate_pem.as_bytes()).unwrap(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    async fn node_cert(&self, node: &str) -> ClientCert {
        let token = self.token(TokenRole::Agent, Duration::from_secs(60), Some(node));
        self.join(node, &token).await.unwrap()
    }

    /// A Control client with `token` as bearer.
    async fn control(&self, token: &str) -> ControlClient<Channel> {
        let channel = self.channel(None).await;
        let _ = token;
        ControlClient::new(channel)
    }

    async fn nodes(&self, token: &str) -> Result<Vec<pb::NodeInfo>, tonic::Status> {
        let mut control = self.control(token).await;
        Ok(control
            .list_nodes(bearer(pb::ListNodesRequest {}, token))
            .await?
            .into_inner()
            .nodes)
    }

    async fn rollouts(&self, token: &str) -> usize {
        let mut control = self.control(token).await;
        control
            .list_rollouts(bearer(pb::ListRolloutsRequest { limit: 0 }, token))
            .await
            .unwrap()
            .into_inner()
            .rollouts
            .len()
    }

    async fn shutdown(self) {
        self.fleet.shutdown().await.unwrap();
    }
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
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

/// Open a session and read its first answer: Welcome, or the status it was refused with.
async fn session(
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
    let mut stream = AgentClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("no answer within 5s")
        .expect("stream ended")?;
    assert!(
        matches!(first.msg, Some(pb::coordinator_message::Msg::Welcome(_))),
        "{first:?}"
    );
    Ok((tx, stream))
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, text: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} ({text}), got {v:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(text),
                "{:?} lacks {text:?}",
                status.message()
            );
        }
    }
}

/// A legitimate operator still gets answers, and a legitimate node still opens a session.
async fn still_serving(server: &Server, operator: &str, node: &str) {
    let nodes = server.nodes(operator).await.unwrap();
    let cert = server.node_cert(node).await;
    let (_tx, _stream) = session(server.channel(Some(cert)).await, hello(node, 1, 1))
        .await
        .unwrap();
    let _ = nodes;
    let listed = server.nodes(operator).await.unwrap();
    assert!(listed.iter().any(|n| n.name == node && n.connected));
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test]
async fn an_agent_without_a_certificate_is_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let result = session(server.channel(None).await, hello("node-1", 1, 1)).await;
    expect_code(
        result.map(|_| ()),
        Code::Unauthenticated,
        "needs a node certificate",
    );
    let fetch = AgentClient::new(server.channel(None).await)
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: format!("sha256:{}", "0".repeat(64)),
            offset: 0,
            node: "node-1".into(),
        })
        .await;
    expect_code(fetch.map(|_| ()), Code::Unauthenticated, "node certificate");
    server
        .logs
        .assert_contains("Agent call without a node certificate refused");
    assert!(server.nodes(&operator).await.unwrap().is_empty());
    // An operator's token is no node identity either.
    let mut request = tonic::Request::new(tokio_stream::iter(vec![hello("node-1", 1, 1)]));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {operator}").parse().unwrap(),
    );
    let with_token = AgentClient::new(server.channel(None).await)
        .session(request)
        .await;
    expect_code(
        with_token.map(|_| ()),
        Code::Unauthenticated,
        "node certificate",
    );
    still_serving(&server, &operator, "node-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_agent_presenting_another_nodes_name_is_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let cert = server.node_cert("node-1").await;
    let result = session(
        server.channel(Some(cert.clone())).await,
        hello("node-2", 1, 1),
    )
    .await;
    expect_code(
        result.map(|_| ()),
        Code::PermissionDenied,
        "certificate is for node `node-1`, but its Hello says `node-2`",
    );
    server
        .logs
        .assert_contains("the Hello names another node than the certificate");
    assert!(server.nodes(&operator).await.unwrap().is_empty());
    // Nor may it fetch as another node.
    let fetch = AgentClient::new(server.channel(Some(cert.clone())).await)
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: format!("sha256:{}", "0".repeat(64)),
            offset: 0,
            node: "node-2".into(),
        })
        .await;
    expect_code(
        fetch.map(|_| ()),
        Code::PermissionDenied,
        "for node `node-1`",
    );
    // A node certificate does not open the Control service.
    let mut control = ControlClient::new(server.channel(Some(cert.clone())).await);
    expect_code(
        control
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "node certificate",
    );
    // Under its own name it is welcome.
    let (_tx, _stream) = session(server.channel(Some(cert)).await, hello("node-1", 1, 1))
        .await
        .unwrap();
    still_serving(&server, &operator, "node-3").await;
    server.shutdown().await;
}

#[tokio::test]
async fn expired_reused_and_misdirected_join_tokens_are_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);

    let expired = server.token(TokenRole::Agent, Duration::ZERO, None);
    expect_code(
        server
            .join_from("node-1", &expired, Some([127, 0, 0, 11]))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "expired",
    );

    let once = server.token(TokenRole::Agent, DAY, None);
    server.join("node-1", &once).await.unwrap();
    expect_code(
        server
            .join_from("node-9", &once, Some([127, 0, 0, 12]))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "already used (by node `node-1`)",
    );

    let bound = server.token(TokenRole::Agent, DAY, Some("node-5"));
    expect_code(
        server
            .join_from("node-6", &bound, Some([127, 0, 0, 13]))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "for node `node-5`",
    );

    // node-1 has a certificate: an unbound token cannot take its name.
    let another = server.token(TokenRole::Agent, DAY, None);
    expect_code(
        server
            .join_from("node-1", &another, Some([127, 0, 0, 14]))
            .await
            .map(|_| ()),
        Code::AlreadyExists,
        "already has a certificate",
    );

    expect_code(
        server
            .join_from("node-7", &operator, Some([127, 0, 0, 15]))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "operator token",
    );
    expect_code(
        server
            .join_from("node-7", "hr1.garbage", Some([127, 0, 0, 16]))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "not a hotroll token",
    );
    // A bad CSR does not use the token up.
    let fresh = server.token(TokenRole::Agent, DAY, None);
    let bad_csr = IdentityClient::new(
        server
            .try_channel(None, Some(IpAddr::from([127, 0, 0, 30])))
            .await
            .unwrap(),
    )
    .join(pb::JoinRequest {
        token: fresh.clone(),
        node: "node-8".into(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
    })
    .await;
    expect_code(
        bad_csr.map(|_| ()),
        Code::InvalidArgument,
        "certificate signing request",
    );
    server.join("node-8", &fresh).await.unwrap();

    server.logs.assert_contains("authentication failed");
    server.logs.assert_contains("join tokens are single-use");
    still_serving(&server, &operator, "node-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_viewer_cannot_start_or_steer_a_rollout() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let viewer = server.token(TokenRole::Viewer, DAY, None);
    let mut control = server.control(&viewer).await;
    let start = control
        .start_rollout(bearer(
            pb::StartRolloutRequest {
                script_name: "x.toml".into(),
                script_source: "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[script]\nup = []\n".into(),
                select: Default::default(),
                artifacts: vec![],
                skip_unreachable: false,
                dry_run: false,
            },
            &viewer,
        ))
        .await;
    expect_code(
        start.map(|_| ()),
        Code::PermissionDenied,
        "may not start rollout",
    );
    for (name, result) in [
        (
            "abort",
            control
                .abort_rollout(bearer(pb::RolloutControlRequest::default(), &viewer))
                .await,
        ),
        (
            "pause",
            control
                .pause_rollout(bearer(pb::RolloutControlRequest::default(), &viewer))
                .await,
        ),
        (
            "resume",
            control
                .resume_rollout(bearer(pb::RolloutControlRequest::default(), &viewer))
                .await,
        ),
        (
            "promote",
            control
                .promote_rollout(bearer(pb::RolloutControlRequest::default(), &viewer))
                .await,
        ),
    ] {
        expect_code(result.map(|_| ()), Code::PermissionDenied, name);
    }
    let upload = control
        .upload_artifact(bearer(
            tokio_stream::iter(Vec::<pb::ArtifactChunk>::new()),
            &viewer,
        ))
        .await;
    expect_code(upload.map(|_| ()), Code::PermissionDenied, "upload");
    // What a viewer may do.
    server.nodes(&viewer).await.unwrap();
    assert_eq!(server.rollouts(&viewer).await, 0);
    let missing = control
        .get_rollout(bearer(
            pb::GetRolloutRequest {
                rollout_id: "x".into(),
            },
            &viewer,
        ))
        .await;
    expect_code(missing.map(|_| ()), Code::NotFound, "");
    // No credentials at all.
    let anonymous = control.list_nodes(pb::ListNodesRequest {}).await;
    expect_code(
        anonymous.map(|_| ()),
        Code::Unauthenticated,
        "no credentials",
    );
    // An agent join token is not a CLI credential.
    let agent = server.token(TokenRole::Agent, DAY, None);
    expect_code(
        server.nodes(&agent).await.map(|_| ()),
        Code::Unauthenticated,
        "join token",
    );
    server
        .logs
        .assert_contains("refused: not allowed for this role");
    assert_eq!(server.rollouts(&operator).await, 0);
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_failed_logins_backs_off_that_address_only() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let attacker: IpAddr = [127, 0, 0, 2].into();
    let channel = server.try_channel(None, Some(attacker)).await.unwrap();
    let mut control = ControlClient::new(channel);
    let mut refused = 0;
    let mut throttled = 0;
    for i in 0..40 {
        let guess = format!("hr1.{:064x}.{}", i, hex_pin(server.pin));
        match control
            .list_nodes(bearer(pb::ListNodesRequest {}, &guess))
            .await
        {
            Err(s) if s.code() == Code::Unauthenticated => refused += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message()
                        .contains("too many failed authentication attempts from 127.0.0.2"),
                    "{s:?}"
                );
                throttled += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // The first few were looked at; after that the address waits and is turned away unread.
    assert!(
        refused > FREE_FAILURES as usize && refused < 10,
        "{refused} refused"
    );
    assert_eq!(refused + throttled, 40);
    // While it waits, even a valid token from that address is turned away...
    let blocked = control
        .list_nodes(bearer(pb::ListNodesRequest {}, &operator))
        .await;
    expect_code(blocked.map(|_| ()), Code::ResourceExhausted, "retry in");
    // ...and joins too.
    let join_token = server.token(TokenRole::Agent, DAY, None);
    let join = IdentityClient::new(server.try_channel(None, Some(attacker)).await.unwrap())
        .join(pb::JoinRequest {
            token: join_token,
            node: "x".into(),
            csr_pem: String::new(),
        })
        .await;
    expect_code(join.map(|_| ()), Code::ResourceExhausted, "too many failed");
    server.logs.assert_contains("authentication failed");
    // Everyone else is served as usual.
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

fn hex_pin(pin: [u8; 32]) -> String {
    pin.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_hello_out_of_range_or_bounds_is_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let cert = server.node_cert("node-1").await;
    let newer = hotroll_proto::PROTOCOL_VERSION + 1;
    for (min, max) in [
        (newer, newer + 7),
        (0, 0),
        (newer + 3, 1),
        (u32::MAX, u32::MAX),
    ] {
        let result = session(
            server.channel(Some(cert.clone())).await,
            hello("node-1", min, max),
        )
        .await;
        expect_code(
            result.map(|_| ()),
            Code::FailedPrecondition,
            "protocol versions",
        );
    }
    server
        .logs
        .assert_contains("session refused: protocol version");
    let mut big = hello("node-1", 1, 1);
    if let Some(pb::agent_message::Msg::Hello(h)) = &mut big.msg {
        h.labels = (0..1000)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
    }
    let result = session(server.channel(Some(cert.clone())).await, big).await;
    expect_code(result.map(|_| ()), Code::InvalidArgument, "labels");
    let not_hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
    };
    let result = session(server.channel(Some(cert.clone())).await, not_hello).await;
    expect_code(result.map(|_| ()), Code::InvalidArgument, "must be Hello");
    assert!(server.nodes(&operator).await.unwrap().is_empty());
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

#[tokio::test]
async fn oversize_messages_and_too_many_artifacts_are_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let mut control = server.control(&operator).await;
    let huge = control
        .start_rollout(bearer(
            pb::StartRolloutRequest {
                script_name: "x.toml".into(),
                script_source: "#".repeat(5 << 20),
                ..Default::default()
            },
            &operator,
        ))
        .await;
    let status = huge.err().unwrap();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    let big_script = control
        .start_rollout(bearer(
            pb::StartRolloutRequest {
                script_name: "x.toml".into(),
                script_source: "#".repeat((1 << 20) + 1),
                ..Default::default()
            },
            &operator,
        ))
        .await;
    expect_code(
        big_script.map(|_| ()),
        Code::InvalidArgument,
        "the limit is",
    );
    let many = control
        .start_rollout(bearer(
            pb::StartRolloutRequest {
                script_name: "x.toml".into(),
                script_source: String::new(),
                artifacts: (0..=MAX_ARTIFACTS_PER_SCRIPT)
                    .map(|i| pb::ScriptArtifact {
                        name: format!("a{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            &operator,
        ))
        .await;
    expect_code(many.map(|_| ()), Code::InvalidArgument, "at most 256");
    let digests = control
        .has_artifacts(bearer(
            pb::HasArtifactsRequest {
                digests: vec![String::new(); MAX_ARTIFACTS_PER_SCRIPT + 1],
            },
            &operator,
        ))
        .await;
    expect_code(digests.map(|_| ()), Code::InvalidArgument, "at most 256");
    // A CSR bigger than the Identity service takes.
    let token = server.token(TokenRole::Agent, DAY, None);
    let join = IdentityClient::new(server.channel(None).await)
        .join(pb::JoinRequest {
            token,
            node: "n".into(),
            csr_pem: "x".repeat(100 << 10),
        })
        .await;
    let status = join.err().unwrap();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    assert_eq!(server.rollouts(&operator).await, 0);
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

#[tokio::test]
async fn uploads_are_limited_per_client_and_verified() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    // Uploads that stay open (their streams never end) hold the client's slots.
    let mut held = Vec::new();
    for i in 0..MAX_CONCURRENT_UPLOADS {
        let (tx, rx) = mpsc::channel::<pb::ArtifactChunk>(4);
        tx.send(pb::ArtifactChunk {
            digest: format!("sha256:{:064x}", i + 1),
            offset: 0,
            data: vec![1],
            total_size: 10,
        })
        .await
        .unwrap();
        let mut control = server.control(&operator).await;
        let token = operator.clone();
        let call = tokio::spawn(async move {
            control
                .upload_artifact(bearer(ReceiverStream::new(rx), &token))
                .await
        });
        held.push((tx, call));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut control = server.control(&operator).await;
    let extra = control
        .upload_artifact(bearer(
            tokio_stream::iter(vec![pb::ArtifactChunk {
                digest: format!("sha256:{:064x}", 99),
                offset: 0,
                data: vec![1],
                total_size: 1,
            }]),
            &operator,
        ))
        .await;
    expect_code(
        extra.map(|_| ()),
        Code::ResourceExhausted,
        "uploads at a time",
    );
    // Another client is not affected.
    let other = server.token(TokenRole::Operator, DAY, None);
    let data = b"hello".to_vec();
    let wrong = format!("sha256:{}", "a".repeat(64));
    let mismatch = control
        .upload_artifact(bearer(
            tokio_stream::iter(vec![pb::ArtifactChunk {
                digest: wrong.clone(),
                offset: 0,
                data: data.clone(),
                total_size: data.len() as u64,
            }]),
            &other,
        ))
        .await;
    expect_code(
        mismatch.map(|_| ()),
        Code::InvalidArgument,
        "does not match its digest",
    );
    let present = control
        .has_artifacts(bearer(
            pb::HasArtifactsRequest {
                digests: vec![wrong],
            },
            &other,
        ))
        .await
        .unwrap()
        .into_inner()
        .present;
    assert!(present.is_empty());
    // Traversal in a digest never becomes a path.
    let traversal = control
        .upload_artifact(bearer(
            tokio_stream::iter(vec![pb::ArtifactChunk {
                digest: "sha256:../../../etc/passwd".into(),
                offset: 0,
                data,
                total_size: 5,
            }]),
            &other,
        ))
        .await;
    expect_code(traversal.map(|_| ()), Code::InvalidArgument, "not a digest");
    for (tx, call) in held {
        drop(tx);
        let _ = call.await;
    }
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_script_with_a_path_traversal_artifact_is_refused() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let cert = server.node_cert("node-1").await;
    let (_tx, _stream) = session(server.channel(Some(cert)).await, hello("node-1", 1, 1))
        .await
        .unwrap();
    let mut control = server.control(&operator).await;
    for name in ["../../etc/passwd", "/etc/passwd", "a/../../b"] {
        let source = format!(
            "app = \"a\"\nfrom = \"1\"\nto = \"2\"\n[[artifacts]]\nname = \"{name}\"\nsource = \"x\"\n[script]\nup = [{{ load_object_code = [\"{name}\"] }}]\n"
        );
        let start = control
            .start_rollout(bearer(
                pb::StartRolloutRequest {
                    script_name: "evil.toml".into(),
                    script_source: source,
                    ..Default::default()
                },
                &operator,
            ))
            .await;
        let status = start.err().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("not valid"), "{status:?}");
    }
    assert_eq!(server.rollouts(&operator).await, 0);
    still_serving(&server, &operator, "node-2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let server = Server::start(DAY).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let other_dir = tempfile::tempdir().unwrap();
    let other = hotroll_coordinator::tls::Pki::ensure(other_dir.path()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (pem, _) = other
        .issue_client(
            &hotroll_tls::Identity::new(hotroll_tls::Role::Node, "node-1"),
            &key,
            DAY,
        )
        .unwrap();
    let forged = ClientCert {
        chain: files::parse_certs(pem.as_bytes()).unwrap(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    };
    let attempt = match server.try_channel(Some(forged), None).await {
        Err(_) => true,
        Ok(channel) => session(channel, hello("node-1", 1, 1)).await.is_err(),
    };
    assert!(attempt, "a certificate of another CA was accepted");
    // A client that trusts another CA does not talk to this coordinator.
    let tls = ClientTls::new(&Trust::Pin([7; 32]), None).unwrap();
    let endpoint = Endpoint::from_shared(channel_uri(&server.url)).unwrap();
    let refused = match tls.connect(endpoint).await {
        Err(_) => true,
        Ok(channel) => ControlClient::new(channel)
            .list_nodes(bearer(pb::ListNodesRequest {}, &operator))
            .await
            .is_err(),
    };
    assert!(refused);
    server.logs.assert_contains("TLS handshake refused");
    assert!(server.nodes(&operator).await.unwrap().is_empty());
    still_serving(&server, &operator, "node-1").await;
    server.shutdown().await;
}

#[tokio::test]
async fn certificates_renew_and_sessions_end_when_theirs_expires() {
    // Node certificates valid for 4 s (plus the 5 min backdating, so the expiry is what counts).
    let server = Server::start(Duration::from_secs(4)).await;
    let operator = server.token(TokenRole::Operator, DAY, None);
    let cert = server.node_cert("node-1").await;
    let first = hotroll_tls::identity::inspect(&cert.chain[0]).unwrap();
    let (tx, mut stream) = session(
        server.channel(Some(cert.clone())).await,
        hello("node-1", 1, 1),
    )
    .await
    .unwrap();
    // Keep the session alive with heartbeats.
    let beats = tokio::spawn(async move {
        loop {
            let beat = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
            };
            if tx.send(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Renew with the current certificate (later, so that the new one outlives the old one):
    // same name, new serial.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let renewed = IdentityClient::new(server.channel(Some(cert.clone())).await)
        .renew(pb::RenewRequest { csr_pem: csr })
        .await
        .unwrap()
        .into_inner();
    let chain = files::parse_certs(renewed.certificate_pem.as_bytes()).unwrap();
    let info = hotroll_tls::identity::inspect(&chain[0]).unwrap();
    assert_eq!(info.identity, first.identity);
    assert_ne!(info.serial, first.serial);
    server.logs.assert_contains("node certificate renewed");
    // Renewal without a certificate is refused.
    let anonymous = IdentityClient::new(server.channel(None).await)
        .renew(pb::RenewRequest {
            csr_pem: String::new(),
        })
        .await;
    expect_code(
        anonymous.map(|_| ()),
        Code::Unauthenticated,
        "node certificate",
    );
    // The session opened with the old certificate ends when it expires.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the session outlived its certificate");
    let status = ended.expect("the session ended without a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    // The renewed certificate opens a new session.
    let renewed_cert = ClientCert {
        chain,
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    };
    let opened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // The old session may take a heartbeat to be noticed as gone.
            match session(
                server.channel(Some(renewed_cert.clone())).await,
                hello("node-1", 1, 1),
            )
            .await
            {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the renewed certificate did not open a session");
    drop(opened);
    beats.abort();
    let _ = operator;
    server.shutdown().await;
}
