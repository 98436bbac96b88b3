//! A fake coordinator (the `Agent` gRPC service on 127.0.0.1:0) and helpers to drive the real
//! agent's `run()` against it. Every test stops the agent, then the fake.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hotroll_agent::{AgentError, Config};
use hotroll_proto::v1::agent_message::Msg as AgentMsg;
use hotroll_proto::v1::agent_server::{Agent, AgentServer};
use hotroll_proto::v1::coordinator_message::Msg as CoordMsg;
use hotroll_proto::v1::{self as pb};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Event {
    /// A session was opened with this Hello (and answered with Welcome).
    Hello(pb::Hello),
    /// A session was refused with this status.
    Refused(tonic::Code),
    Message(AgentMsg),
    /// The agent's side of a session ended.
    Closed,
}

struct Live {
    id: u64,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    /// Dropping it ends the session's response stream.
    _end: oneshot::Sender<()>,
}

struct State {
    heartbeat_ms: u64,
    heartbeats: AtomicBool,
    refuse: Mutex<Option<Status>>,
    live: Mutex<Option<Live>>,
    sessions: AtomicU64,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Clone)]
struct Service(Arc<State>);

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Service {
    type SessionStream = SessionStream;
    type FetchArtifactStream = ChunkStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let state = Arc::clone(&self.0);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.msg) {
            Some(AgentMsg::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let refusal = state.refuse.lock().ok().and_then(|mut r| r.take());
        if let Some(status) = refusal {
            let _ = state.events.send(Event::Refused(status.code()));
            return Err(status);
        }
        let id = state.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = mpsc::channel(256);
        let (end_tx, end_rx) = oneshot::channel::<()>();
        let welcome = pb::Welcome {
            epoch: id,
            protocol_version: hotroll_proto::PROTOCOL_VERSION,
            coordinator_id: "fake".into(),
            heartbeat_interval_ms: state.heartbeat_ms,
            leader_epoch: 0,
        };
        let _ = tx.send(Ok(msg(CoordMsg::Welcome(welcome)))).await;
        if let Ok(mut live) = state.live.lock() {
            *live = Some(Live {
                id,
                tx: tx.clone(),
                _end: end_tx,
            });
        }
        let _ = state.events.send(Event::Hello(hello));

        // Heartbeats until the response stream is gone.
        let beat_state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut seq = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(beat_state.heartbeat_ms)).await;
                if !beat_state.heartbeats.load(Ordering::SeqCst) {
                    if tx.is_closed() {
                        return;
                    }
                    continue;
                }
                seq += 1;
                let beat = msg(CoordMsg::Heartbeat(pb::Heartbeat {
                    seq,
                    sent_unix_ms: 0,
                    next_within_ms: 0,
                }));
                if tx.send(Ok(beat)).await.is_err() {
                    return;
                }
            }
        });
        // Everything the agent sends goes to the test; when the agent ends its side, so does
        // this session (like the real coordinator).
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(m) = message.msg {
                    let _ = state.events.send(Event::Message(m));
                }
            }
            if let Ok(mut live) = state.live.lock()
                && live.as_ref().is_some_and(|l| l.id == id)
            {
                *live = None;
            }
            let _ = state.events.send(Event::Closed);
        });
        let stream = ReceiverStream::new(rx).take_until(end_rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_artifact(
        &self,
        _request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        Err(Status::unimplemented(
            "the fake coordinator stores no artifacts",
        ))
    }
}

pub fn msg(m: CoordMsg) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { msg: Some(m) }
}

pub struct Fake {
    pub addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Fake {
    /// Start a fake coordinator whose Welcome asks for `heartbeat` heartbeats.
    pub async fn start(heartbeat: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let (events_tx, events) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            heartbeat_ms: u64::try_from(heartbeat.as_millis()).unwrap_or(1000),
            heartbeats: AtomicBool::new(true),
            refuse: Mutex::new(None),
            live: Mutex::new(None),
            sessions: AtomicU64::new(0),
            events: events_tx,
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = Service(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(AgentServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("fake coordinator: {e}");
            }
        });
        Self {
            addr,
            events,
            state,
            stop: Some(stop_tx),
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuse the next session with `status`.
    pub fn refuse_next(&self, status: Status) {
        if let Ok(mut r) = self.state.refuse.lock() {
            *r = Some(status);
        }
    }

    pub fn set_heartbeats(&self, on: bool) {
        self.state.heartbeats.store(on, Ordering::SeqCst);
    }

    /// End the live session's response stream (the agent sees the stream close).
    pub fn drop_session(&self) {
        if let Ok(mut live) = self.state.live.lock() {
            *live = None;
        }
    }

    pub async fn send(&self, m: CoordMsg) {
        let tx = self
            .state
            .live
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|l| l.tx.clone()));
        match tx {
            Some(tx) => {
                if tx.send(Ok(msg(m))).await.is_err() {
                    panic!("the live session is gone");
                }
            }
            None => panic!("no live session to send to"),
        }
    }

    pub async fn next_event(&mut self) -> Event {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("the fake coordinator's event channel closed"),
            Err(_) => panic!("no event from the agent within {WAIT:?}"),
        }
    }

    /// The next event that is not a heartbeat.
    pub async fn next(&mut self) -> Event {
        loop {
            match self.next_event().await {
                Event::Message(AgentMsg::Heartbeat(_)) => {}
                event => return event,
            }
        }
    }

    /// Nothing but heartbeats for `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Err(_) => return,
                Ok(Some(Event::Message(AgentMsg::Heartbeat(_)))) => {}
                Ok(other) => panic!("expected nothing but heartbeats, got {other:?}"),
            }
        }
    }

    pub async fn expect_hello(&mut self) -> pb::Hello {
        match self.next().await {
            Event::Hello(hello) => hello,
            other => panic!("expected a Hello, got {other:?}"),
        }
    }

    pub async fn expect_message(&mut self) -> AgentMsg {
        match self.next().await {
            Event::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn expect_step(
        &mut self,
        list: pb::StepList,
        step: u32,
        instruction: &str,
        phase: pb::StepPhase,
    ) -> pb::StepReport {
        match self.expect_message().await {
            AgentMsg::Step(s)
                if s.list == list as i32
                    && s.step == step
                    && s.instruction == instruction
                    && s.phase == phase as i32 =>
            {
                s
            }
            other => panic!("expected {list:?}[{step}] {instruction} {phase:?}, got {other:?}"),
        }
    }

    pub async fn expect_outcome(&mut self, state: pb::NodeState) -> pb::NodeOutcome {
        match self.expect_message().await {
            AgentMsg::Outcome(o) if o.state == state as i32 => o,
            other => panic!("expected outcome {state:?}, got {other:?}"),
        }
    }

    pub async fn stop(mut self) {
        self.drop_session();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(WAIT, &mut server).await.is_err()
        {
            server.abort();
        }
    }
}

/// The real agent, running [`hotroll_agent::Agent::run`] in a task.
pub struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AgentError>>>,
}

impl RunningAgent {
    pub fn spawn(config: Config) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(hotroll_agent::Agent::builder(config).build().run(async {
            let _ = stop_rx.await;
        }));
        Self {
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => panic!("the agent task panicked: {e}"),
            Err(_) => panic!("the agent did not stop within 20s"),
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        // A test that failed midway: do not leave the agent running.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Hooks for the tests; script arguments arrive as `$1`, `$2`, ...
pub const HOOKS: &str = r#"
[hooks]
ok = { command = ["true"] }
marker = { command = ["sh", "-c", "echo \"$HOTROLL_ROLLOUT_ID $HOTROLL_STEP $HOTROLL_PHASE\" > \"$1\"; echo hello-from-hook; echo warn-from-hook >&2", "marker"] }
fail = { command = ["sh", "-c", "echo broken >&2; exit 3", "fail"] }
hang = { command = ["sh", "-c", "echo $$ > \"$1\"; sleep 1000 & echo $! >> \"$1\"; sleep 1000", "hang"], timeout = "1s" }
"#;

/// Write an agent.toml for `fake` into `dir` and load it (through the real config parser).
pub fn agent_config(dir: &Path, node: &str, coordinator: &str) -> Config {
    let data_dir = dir.join("data");
    let text = format!(
        "node = \"{node}\"\ncoordinator = \"{coordinator}\"\ninsecure = true\ndata_dir = \"{}\"\nlabels = {{ role = \"miner\", zone = \"a\" }}\nreconnect_max_backoff = \"500ms\"\n{HOOKS}",
        data_dir.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write agent.toml: {e}"));
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn data_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("data").join(name)
}

/// An upgrade script with `up` and optional `down` lists (TOML arrays of instructions).
pub fn script(up: &str, down: Option<&str>) -> String {
    let down = down
        .map(|d| format!("down = [\n{d}\n]\n"))
        .unwrap_or_default();
    format!(
        r#"app = "primes"
from = "1.0.0"
to = "1.1.0"

[rollout]
barrier_timeout = "20s"
step_timeout = "20s"

[script]
up = [
{up}
]
{down}"#
    )
}

pub fn run_script(rollout_id: &str, epoch: u64, source: String) -> CoordMsg {
    CoordMsg::RunScript(pb::RunScript {
        rollout_id: rollout_id.into(),
        epoch,
        script_name: "upgrade.toml".into(),
        script_source: source,
        artifacts: Vec::new(),
        step_timeout_ms: 0,
        barrier_timeout_ms: 0,
    })
}

/// Is `pid` a live process (not gone, not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The two pids the `hang` hook writes to `path`, once both are there.
pub async fn hang_pids(path: &Path) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() == 2 {
                return pids;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hang hook never wrote its pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (bounded) until none of `pids` is alive.
pub async fn assert_gone(pids: &[i32]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes {pids:?} are still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
