//! The agent's end of `Agent.Session` (docs/protocol.md, "Connecting"): dial, Hello, Welcome,
//! heartbeats, reconnect with backoff and full jitter, Goodbye on a clean shutdown.
//!
//! One session at a time, each on a fresh connection. While no session is up the executor keeps
//! running and its reports wait in the outbox; they go out after the next Welcome.

use std::time::Duration;

use hotroll_proto::v1::agent_client::AgentClient;
use hotroll_proto::v1::agent_message::Msg as Out;
use hotroll_proto::v1::{self as pb};
use hotroll_proto::{LEADER_METADATA, MIN_PROTOCOL_VERSION, PACED_HEARTBEATS, PROTOCOL_VERSION};
use hotroll_tls::error_chain;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;

use crate::cancel::CancelToken;
use crate::coordinators::Coordinators;
use crate::dialer::Dialer;
use crate::executor::{CommandKind, Env, Node};
use crate::wire::{self, Inbound};

/// First reconnect delay; doubles up to `reconnect_max_backoff` (protocol: 200 ms to 5 s).
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// TCP connect bound.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From opening the stream to Welcome.
/// In a group of coordinators: the longest wait between the first attempts to find the leader.
const GROUP_RETRY_MAX: Duration = Duration::from_millis(300);
const GROUP_QUICK_RETRIES: u32 = 40;
/// Before connecting to the leader a standby named (a standby answers at once).
const REDIRECT_DELAY: Duration = Duration::from_millis(50);
/// Where the session logs each barrier release it receives (trace level; scale-bench reads it).
const RECEIVED_TARGET: &str = module_path!();
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive ping, in heartbeat intervals.
const KEEPALIVE_INTERVALS: u32 = 4;
/// The shortest HTTP/2 keepalive interval: longer than an idle session's heartbeat pace (the
/// coordinator's default, 30 s, stretched to 50 s at 10,000 idle nodes; hyper pings a
/// connection it has read nothing from for the interval, and an idle fleet of 10,000 pinging
/// in between would cost the coordinator more than its heartbeats). A silent coordinator is
/// noticed by the heartbeats' own deadline (three announced intervals).
const KEEPALIVE_FLOOR: Duration = Duration::from_secs(120);

/// HTTP/2 keepalive: a dead TCP connection is noticed even when no heartbeat is due.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long to wait for the coordinator to close its side after our Goodbye, so
/// that the Goodbye is flushed before the connection is torn down.
const GOODBYE_GRACE: Duration = Duration::from_secs(2);
/// Messages buffered between the session loop and the gRPC request stream. Small on purpose:
/// what sits here when the connection breaks is lost (the waiting states are re-sent).
const OUTBOUND_QUEUE: usize = 16;
/// Heartbeat intervals without any message from the coordinator before the session is lost.
const SILENT_INTERVALS: u32 = 3;
/// Bounds on the heartbeat interval a coordinator may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// The session loop's fixed inputs.
pub struct Sessions<'a> {
    pub env: &'a Env,
    pub boot_generation: u64,
    pub dialer: Dialer,
    /// Which coordinator of the group to talk to, and the highest leader epoch seen.
    pub coordinators: Coordinators,
}

/// How one session ended.
#[derive(Debug)]
enum End {
    Shutdown,
    /// Lost (or never established): reconnect with the normal backoff.
    Lost {
        reason: String,
        established: bool,
    },
    /// The coordinator turned this agent away; retrying soon will not help.
    Refused(tonic::Status),
    /// A standby named the group's leader: connect there now.
    Redirected {
        leader: String,
    },
}

impl Sessions<'_> {
    /// Keep a session up until `shutdown`; then say Goodbye (when connected) and return.
    pub async fn run(&self, node: &mut Node, shutdown: &CancelToken) {
        let config = &self.env.config;
        let mut backoff = Backoff::new(INITIAL_BACKOFF, config.reconnect_max_backoff);
        // Consecutive failed attempts: a coordinator that is down is logged as a warning at
        // first and then about once a minute, not at every retry.
        let mut failures = 0u32;
        loop {
            let delay = match self.session(node, shutdown).await {
                End::Shutdown => return,
                End::Redirected { leader } => {
                    if self.coordinators.follow(&leader) {
                        tracing::info!(%leader, "not the leader: following it to the group's leader");
                        REDIRECT_DELAY
                    } else {
                        self.coordinators.next();
                        backoff.next_delay()
                    }
                }
                End::Lost {
                    reason,
                    established,
                } => {
                    let coordinator = self.coordinators.current();
                    if !established {
                        // Perhaps down for good: the group's next coordinator may lead now.
                        self.coordinators.next();
                    }
                    if established {
                        backoff.reset();
                        failures = 0;
                        tracing::warn!(%coordinator, %reason, "session lost; reconnecting");
                    } else {
                        failures = failures.saturating_add(1);
                        if failures == 1 || failures.is_multiple_of(12) {
                            tracing::warn!(%coordinator, %reason, attempts = failures, "cannot open a session; retrying");
                        } else {
                            tracing::debug!(%coordinator, %reason, attempts = failures, "cannot open a session; retrying");
                        }
                    }
                    let delay = backoff.next_delay();
                    if self.coordinators.urls().len() > 1 && failures <= GROUP_QUICK_RETRIES {
                        // A group elects a new leader within about its lease: while it does,
                        // the next coordinator is tried soon rather than after a long back-off.
                        delay.min(GROUP_RETRY_MAX)
                    } else {
                        delay
                    }
                }
                End::Refused(status) => {
                    self.log_refusal(&status);
                    backoff.max_delay()
                }
            };
            tracing::debug!(?delay, "next connection attempt");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn log_refusal(&self, status: &tonic::Status) {
        let config = &self.env.config;
        let message = status.message();
        match status.code() {
            Code::AlreadyExists => tracing::error!(
                node = %config.node,
                "the coordinator refused the session: another live session already holds node name `{}` \
                 (ALREADY_EXISTS: {message}); is a second agent running under that name? Retrying slowly",
                config.node
            ),
            Code::FailedPrecondition => tracing::error!(
                "the coordinator refused the session: this agent speaks protocol versions \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, which the coordinator does not \
                 (FAILED_PRECONDITION: {message}); upgrade one side. Retrying slowly"
            ),
            Code::InvalidArgument => tracing::error!(
                "the coordinator rejected this agent's Hello (INVALID_ARGUMENT: {message}). Retrying slowly"
            ),
            code => tracing::error!(
                "the coordinator refused the session ({code:?}: {message}). Retrying slowly"
            ),
        }
    }

    fn endpoint(&self) -> Result<Endpoint, tonic::transport::Error> {
        let config = &self.env.config;
        // The session's heartbeats notice a dead peer; the HTTP/2 ping only backs them up
        // while no session stream is open (connecting, or fetching an artifact), so it runs
        // slower than any heartbeat pace: at 10,000 agents every extra frame per interval is
        // coordinator CPU.
        let keepalive = (config.heartbeat_interval * KEEPALIVE_INTERVALS).max(KEEPALIVE_FLOOR);
        Ok(Endpoint::from_shared(hotroll_tls::client::channel_uri(
            &self.coordinators.current(),
        ))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
    }

    fn hello(&self) -> pb::AgentMessage {
        let config = &self.env.config;
        let journal = self.env.journal.entries().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the journal for Hello; sending none");
            Vec::new()
        });
        wire::message(Out::Hello(pb::Hello {
            node: config.node.clone(),
            labels: config.labels.clone().into_iter().collect(),
            boot_generation: self.boot_generation,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            max_protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            apps: self
                .env
                .runtime
                .apps()
                .into_iter()
                .map(wire::app_state)
                .collect(),
            journal: journal.into_iter().map(wire::journal_entry).collect(),
        }))
    }

    async fn session(&self, node: &mut Node, shutdown: &CancelToken) -> End {
        let config = &self.env.config;
        let lost = |reason: String| End::Lost {
            reason,
            established: false,
        };
        let endpoint = match self.endpoint() {
            Ok(endpoint) => endpoint,
            Err(e) => return lost(format!("invalid coordinator address: {}", error_chain(&e))),
        };
        let channel = tokio::select! {
            connected = (self.dialer)(endpoint) => match connected {
                Ok(channel) => channel,
                Err(e) => return lost(format!("cannot connect: {}", error_chain(&e))),
            },
            () = shutdown.cancelled() => return End::Shutdown,
        };

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        if tx.try_send(self.hello()).is_err() {
            return lost("cannot queue Hello".into());
        }
        let mut client = AgentClient::new(channel);
        let open = async {
            let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
            let first = inbound.message().await?;
            Ok::<_, tonic::Status>((inbound, first))
        };
        let open = tokio::time::timeout(HANDSHAKE_TIMEOUT, open);
        tokio::pin!(open);
        let opened = tokio::select! {
            opened = &mut open => opened,
            () = shutdown.cancelled() => {
                // Hello is out, so the coordinator may already count this session: leave
                // cleanly rather than just close.
                let _ = tx.try_send(goodbye());
                drop(tx);
                if let Ok(Ok(Ok((mut inbound, _)))) = tokio::time::timeout(GOODBYE_GRACE, &mut open).await {
                    drain(&mut inbound).await;
                }
                return End::Shutdown;
            }
        };
        let (mut inbound, first) = match opened {
            Err(_) => return lost(format!("no Welcome within {HANDSHAKE_TIMEOUT:?}")),
            Ok(Err(status)) => return classify(status, false),
            Ok(Ok(opened)) => opened,
        };
        let welcome = match first.map(wire::inbound) {
            Some(Inbound::Welcome(welcome)) => welcome,
            Some(other) => return lost(format!("expected Welcome, got {other:?}")),
            None => return lost("the coordinator closed the stream before Welcome".into()),
        };
        if let Err(stale) = self.coordinators.accept_epoch(welcome.leader_epoch) {
            // Fencing (docs/ha.md): leave before a command of the deposed leader is run.
            tracing::error!(%stale, "ignoring a deposed leader");
            let _ = tx.try_send(goodbye());
            return lost(stale.to_string());
        }
        let interval = heartbeat_interval(welcome.heartbeat_interval_ms, config.heartbeat_interval);
        tracing::info!(
            coordinator = %self.coordinators.current(),
            leader_epoch = welcome.leader_epoch,
            coordinator_id = %welcome.coordinator_id,
            epoch = welcome.epoch,
            protocol = welcome.protocol_version,
            heartbeat = ?interval,
            "session established"
        );
        node.on_connected();

        // Protocol 2: the coordinator paces heartbeats and this agent answers each one; the
        // coordinator is lost after three of its announced intervals of silence. Protocol 1:
        // both sides beat every interval.
        let paced = welcome.protocol_version >= PACED_HEARTBEATS;
        let mut pace = Pace::new(interval, paced);
        let mut last_heard = Instant::now();
        let lost = |reason: String| End::Lost {
            reason,
            established: true,
        };
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.goodbye(tx, &mut inbound).await;
                    return End::Shutdown;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        last_heard = Instant::now();
                        match wire::inbound(message) {
                            Inbound::Heartbeat { seq, next_within_ms } => {
                                if paced {
                                    pace.announced(next_within_ms);
                                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(beat(seq)) {
                                        return lost("the outbound stream closed".into());
                                    }
                                }
                            }
                            Inbound::Command(command) => {
                                if let CommandKind::BarrierRelease { barrier_id, .. } = &command.kind {
                                    // scale-bench's probe of the agent's side of a release.
                                    tracing::trace!(target: RECEIVED_TARGET, node = %config.node, rollout_id = %command.rollout_id, barrier_id = %barrier_id, "barrier release received");
                                }
                                node.handle(command)
                            }
                            Inbound::Goodbye(reason) => {
                                return lost(format!("the coordinator said goodbye: {reason}"));
                            }
                            Inbound::Welcome(_) => tracing::warn!("ignoring a second Welcome"),
                            Inbound::Unknown => tracing::debug!("ignoring an empty or unknown message"),
                        }
                    }
                    Ok(None) => return lost("the coordinator closed the stream".into()),
                    Err(status) => return classify(status, true),
                },
                () = tokio::time::sleep_until(pace.wake(last_heard)) => {
                    let silent = last_heard.elapsed();
                    let allowed = pace.silence_allowed();
                    if silent >= allowed {
                        return lost(format!(
                            "nothing heard from the coordinator for {silent:?} ({SILENT_INTERVALS} heartbeat intervals)"
                        ));
                    }
                    if let Some(seq) = pace.own_beat() {
                        match tx.try_send(beat(seq)) {
                            // Full: the stream is backed up, so the coordinator hears from us anyway.
                            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                return lost("the outbound stream closed".into());
                            }
                        }
                    }
                }
                // Only take a report when it can be queued at once, so the loop never blocks on
                // a stalled stream (a heartbeat tick re-checks the capacity).
                report = self.env.outbox.pop(), if tx.capacity() > 0 => {
                    if let Err(e) = tx.try_send(wire::report(report.clone())) {
                        self.env.outbox.push_front(report);
                        if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                            return lost("the outbound stream closed".into());
                        }
                    }
                }
            }
        }
    }

    /// Flush what is queued, send Goodbye, end our side of the stream, and wait (bounded) for the
    /// coordinator to end its side.
    async fn goodbye(
        &self,
        tx: mpsc::Sender<pb::AgentMessage>,
        inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
    ) {
        while tx.capacity() > 1 {
            let Some(report) = self.env.outbox.try_pop() else {
                break;
            };
            if tx.try_send(wire::report(report)).is_err() {
                break;
            }
        }
        match tokio::time::timeout(GOODBYE_GRACE, tx.send(goodbye())).await {
            Ok(Ok(())) => tracing::info!("sent Goodbye"),
            _ => tracing::warn!("could not send Goodbye"),
        }
        drop(tx);
        drain(inbound).await;
    }
}

fn goodbye() -> pb::AgentMessage {
    wire::message(Out::Goodbye(pb::Goodbye {
        reason: "agent shutting down".into(),
    }))
}

/// Read what the coordinator still sends until it ends the stream, bounded by
/// [`GOODBYE_GRACE`]: tearing the connection down earlier could cut off our Goodbye.
async fn drain(inbound: &mut tonic::Streaming<pb::CoordinatorMessage>) {
    let rest = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(GOODBYE_GRACE, rest).await;
}

/// The interval Welcome asks for (0 = the config's), kept within sane bounds: it comes off the
/// wire, and an absurd value must neither spin the loop nor overflow a deadline.
/// A heartbeat from this agent.
fn beat(seq: u64) -> pb::AgentMessage {
    wire::message(Out::Heartbeat(pb::Heartbeat {
        seq,
        sent_unix_ms: crate::report::now_unix_ms(),
        next_within_ms: 0,
    }))
}

/// When the session loop wakes for heartbeats, and how much silence it allows.
#[derive(Debug)]
struct Pace {
    interval: Duration,
    /// Protocol 2: the coordinator's announced pace; this agent only answers.
    paced: bool,
    /// The longest the coordinator said its next heartbeat may take.
    expected: Duration,
    /// Protocol 1: when this agent's own next heartbeat is due, and its number.
    next_own: Instant,
    seq: u64,
}

impl Pace {
    fn new(interval: Duration, paced: bool) -> Self {
        Self {
            interval,
            paced,
            expected: interval,
            next_own: Instant::now() + interval,
            seq: 0,
        }
    }

    /// The coordinator's heartbeat said when the next one comes (0: the Welcome's interval).
    fn announced(&mut self, next_within_ms: u64) {
        self.expected = heartbeat_interval(next_within_ms, self.interval);
    }

    fn silence_allowed(&self) -> Duration {
        self.expected.saturating_mul(SILENT_INTERVALS)
    }

    /// When to look again: the end of the allowed silence (protocol 2), or this agent's own
    /// next heartbeat (protocol 1), whichever the protocol needs.
    fn wake(&self, last_heard: Instant) -> Instant {
        let silence_ends = last_heard + self.silence_allowed();
        if self.paced {
            silence_ends
        } else {
            self.next_own.min(silence_ends)
        }
    }

    /// Protocol 1: the number of this agent's own heartbeat when one is due now.
    fn own_beat(&mut self) -> Option<u64> {
        if self.paced || Instant::now() < self.next_own {
            return None;
        }
        self.next_own = Instant::now() + self.interval;
        self.seq += 1;
        Some(self.seq)
    }
}

fn heartbeat_interval(welcome_ms: u64, configured: Duration) -> Duration {
    let asked = if welcome_ms > 0 {
        Duration::from_millis(welcome_ms)
    } else {
        configured
    };
    asked.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

fn classify(status: tonic::Status, established: bool) -> End {
    if status.code() == Code::Unavailable
        && let Some(leader) = status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|value| value.to_str().ok())
    {
        return End::Redirected {
            leader: leader.to_string(),
        };
    }
    match status.code() {
        Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied => End::Refused(status),
        code => End::Lost {
            reason: format!("{code:?}: {}", status.message()),
            established,
        },
    }
}

/// Exponential backoff with full jitter: the n-th delay is uniform in `[0, min(max, initial·2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.min(max),
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1).min(31);
        jitter(Duration::ZERO, ceiling)
    }

    /// For a refusal: wait about the maximum (jittered in its upper half, so that a fleet of
    /// refused agents does not come back in step).
    pub fn max_delay(&mut self) -> Duration {
        self.attempt = 31;
        jitter(self.max / 2, self.max)
    }
}

fn jitter(low: Duration, high: Duration) -> Duration {
    let low = u64::try_from(low.as_millis()).unwrap_or(u64::MAX);
    let high = u64::try_from(high.as_millis()).unwrap_or(u64::MAX).max(low);
    Duration::from_millis(rand::random_range(low..=high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval_is_bounded() {
        let configured = Duration::from_secs(5);
        assert_eq!(heartbeat_interval(0, configured), configured);
        assert_eq!(
            heartbeat_interval(200, configured),
            Duration::from_millis(200)
        );
        assert_eq!(heartbeat_interval(1, configured), MIN_HEARTBEAT);
        assert_eq!(heartbeat_interval(u64::MAX, configured), MAX_HEARTBEAT);
    }

    #[test]
    fn backoff_doubles_to_the_max_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let ceilings: Vec<u128> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                assert!(b.next_delay() <= c);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
        let d = b.max_delay();
        assert!(d >= Duration::from_millis(2500) && d <= Duration::from_secs(5));
        assert_eq!(b.ceiling(), Duration::from_secs(5));
    }
}
