//! The `Agent` gRPC service: one long-lived session per node, and artifact download.
//!
//! A session: Hello → Welcome (or a status that says why not), then heartbeats and rollout
//! traffic. Heartbeats are paced by one sweep over every session (`liveness`): a heartbeat
//! unanswered for three heartbeat intervals, a closed stream or a Goodbye end a session; the
//! rollouts that target the node are told, and their engines decide (grace period, failure).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use hotroll_proto::frame::CoordinatorFrame;
use hotroll_proto::frames;
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_message::Msg as AgentMsg;
use hotroll_proto::v1::coordinator_message::Msg as CoordMsg;
use hotroll_proto::{MIN_PROTOCOL_VERSION, PACED_HEARTBEATS, PROTOCOL_VERSION};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::{ArtifactStore, parse_digest};
use crate::auth::{NodeIdentity, check_hello};
use crate::convert;
use crate::liveness::{Liveness, SessionWatch};
use crate::registry::Registry;
use crate::rollouts::{Rollouts, now_ms};
use crate::stopping::Stopping;
use crate::store::{AppVersions, NodeRecord, OtpRelease};

/// Outbound queue per session. Rollout traffic is a handful of messages per step, so a full
/// queue means the agent stopped reading: the session is then treated as lost.
const OUTBOUND_QUEUE: usize = 256;

pub struct AgentService {
    pub registry: Arc<Registry>,
    pub rollouts: Arc<Rollouts>,
    pub artifacts: ArtifactStore,
    pub heartbeat_interval: Duration,
    pub coordinator_id: String,
    /// The group's leader epoch this server leads at (0: a single coordinator).
    pub leader_epoch: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ends every session when the server stops (see `stopping`).
    pub stopping: Stopping,
    /// Paces every session's heartbeats and ends the silent ones.
    pub liveness: Arc<Liveness>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The highest protocol version both sides speak, if any.
pub fn negotiate(agent_min: u32, agent_max: u32) -> Option<u32> {
    let high = agent_max.min(PROTOCOL_VERSION);
    let low = agent_min.max(MIN_PROTOCOL_VERSION);
    (agent_min <= agent_max && low <= high).then_some(high)
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[tonic::async_trait]
impl frames::agent_server::Agent for AgentService {
    type SessionStream = BoxStream<CoordinatorFrame>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
        // With TLS, the node the session's certificate names (see `auth::Guarded`).
        let certified = request.extensions().get::<NodeIdentity>().cloned();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(self.heartbeat_interval * 5, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within the handshake timeout"))?;
        let hello = match first {
            Some(Ok(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(hello)),
            })) => hello,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first session message must be Hello",
                ));
            }
            Some(Err(status)) => return Err(status),
            None => return Err(Status::cancelled("stream closed before Hello")),
        };
        if !valid_node_name(&hello.node) {
            tracing::warn!(%peer, node = %hello.node, "session refused: bad node name");
            return Err(Status::invalid_argument(format!(
                "node name `{}` is not valid: use 1-253 characters of [A-Za-z0-9._-]",
                hello.node.escape_debug()
            )));
        }
        // Only the node the certificate names, and a Hello within bounds.
        check_hello(certified.as_ref(), &hello, &peer)?;
        let Some(version) = negotiate(hello.min_protocol_version, hello.max_protocol_version)
        else {
            tracing::warn!(%peer, node = %hello.node, min = hello.min_protocol_version, max = hello.max_protocol_version, "session refused: protocol version");
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol versions {}..={}, this coordinator speaks {}..={}; upgrade \
                 the older side",
                hello.min_protocol_version,
                hello.max_protocol_version,
                MIN_PROTOCOL_VERSION,
                PROTOCOL_VERSION
            )));
        };

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let node = hello.node.clone();
        let record = NodeRecord {
            name: node.clone(),
            labels: hello.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
            apps: app_versions(&hello.apps),
            boot_generation: hello.boot_generation,
            last_seen_ms: now_ms(),
        };
        let link = self
            .registry
            .attach(record, tx.clone(), peer.clone())
            .map_err(|e| {
                tracing::warn!(%peer, node = %node, "session refused: {e}");
                Status::already_exists(e.to_string())
            })?;
        tracing::info!(%peer, node = %node, epoch = link.epoch, boot = hello.boot_generation, "agent connected");

        let welcome = CoordinatorFrame::encode(&pb::CoordinatorMessage {
            msg: Some(CoordMsg::Welcome(pb::Welcome {
                epoch: link.epoch,
                protocol_version: version,
                coordinator_id: self.coordinator_id.clone(),
                heartbeat_interval_ms: u64::try_from(self.heartbeat_interval.as_millis())
                    .unwrap_or(u64::MAX),
                leader_epoch: self.leader_epoch,
            })),
        });
        self.rollouts.session_changed(&node, true);
        // Outcomes the node reached while it had no session (it finished, or its agent restarted
        // and recovered): its journal says so.
        self.rollouts
            .journal_reported(&node, convert::journal_events(&node, &hello.journal));

        let registry = self.registry.clone();
        let rollouts = self.rollouts.clone();
        let watch = self
            .liveness
            .watch(&node, tx.clone(), version >= PACED_HEARTBEATS);
        drop(tx);
        let stopping = self.stopping.wait();
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = serve_session(&node, &mut inbound, &watch, &registry, &rollouts) => reason,
                reason = watch.ended() => reason,
                () = stopping => "coordinator shutting down",
            };
            drop(watch);
            tracing::info!(node = %node, reason, "agent session ended");
            if registry.detach(&node, link.id, now_ms()) {
                rollouts.session_changed(&node, false);
            }
        });

        // The Welcome first, then what the rollouts and the heartbeat queue, as wire messages.
        let outbound = ReceiverStream::new(rx).map(convert::coordinator_frame);
        let messages = tokio_stream::once(welcome).chain(outbound);
        Ok(Response::new(Box::pin(
            self.stopping.bound(messages.map(Ok)),
        )))
    }

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        // With TLS, a node fetches as itself only (the guard put its certificate's name here).
        if let Some(identity) = request.extensions().get::<NodeIdentity>()
            && !request.get_ref().node.is_empty()
            && request.get_ref().node != identity.name
        {
            let peer = request
                .remote_addr()
                .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
            tracing::warn!(%peer, certificate = %identity.name, asked = %request.get_ref().node, "artifact fetch for another node refused");
            return Err(Status::permission_denied(format!(
                "this certificate is for node `{}`",
                identity.name
            )));
        }
        let request = request.into_inner();
        let digest =
            parse_digest(&request.digest).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let path = self.artifacts.path_of(&digest);
        let total = self
            .artifacts
            .size_of(&digest)
            .map_err(|e| Status::not_found(e.to_string()))?;
        if request.offset > total {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of the artifact ({total} bytes)",
                request.offset
            )));
        }
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::not_found(format!("artifact {}: {e}", request.digest)))?;
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        let digest = request.digest.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut offset = request.offset;
            let mut buf = vec![0u8; hotroll_proto::ARTIFACT_CHUNK_SIZE];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = pb::ArtifactChunk {
                            digest: digest.clone(),
                            offset,
                            data: buf[..n].to_vec(),
                            total_size: total,
                        };
                        offset += n as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                        metrics.artifact_bytes_sent(n as u64);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn app_versions(apps: &[pb::AppState]) -> BTreeMap<String, AppVersions> {
    apps.iter()
        .map(|a| {
            (
                a.app.clone(),
                AppVersions {
                    current: a.current.clone(),
                    permanent: a.permanent.clone(),
                    releases: a
                        .releases
                        .iter()
                        .map(|r| OtpRelease {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            status: r.status.clone(),
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

/// Pump one session until it ends; returns why it ended (the liveness sweep ends silent
/// sessions on its own).
async fn serve_session(
    node: &str,
    inbound: &mut Streaming<pb::AgentMessage>,
    watch: &SessionWatch,
    registry: &Registry,
    rollouts: &Rollouts,
) -> &'static str {
    loop {
        let message = match inbound.next().await {
            None => return "stream closed without Goodbye",
            Some(Err(status)) => {
                tracing::debug!(node, %status, "session stream error");
                return "stream error";
            }
            Some(Ok(pb::AgentMessage { msg: None })) => continue,
            Some(Ok(pb::AgentMessage { msg: Some(m) })) => m,
        };
        watch.heard();
        registry.touch(node, now_ms());
        match &message {
            AgentMsg::Goodbye(g) => {
                tracing::info!(node, reason = %g.reason, "agent said goodbye");
                return "goodbye";
            }
            AgentMsg::Heartbeat(_) => {}
            AgentMsg::Hello(_) => tracing::warn!(node, "second Hello on one session ignored"),
            AgentMsg::Outcome(outcome) if !outcome.apps.is_empty() => {
                registry.update_apps(node, app_versions(&outcome.apps));
                if let Some((rollout_id, event)) = convert::agent_event(node, &message) {
                    rollouts.deliver(&rollout_id, event);
                }
            }
            other => match convert::agent_event(node, other) {
                Some((rollout_id, event)) => rollouts.deliver(&rollout_id, event),
                None => tracing::debug!(node, ?other, "agent message not about a rollout"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate(0, 0), None);
        assert_eq!(negotiate(3, 1), None);
    }

    #[test]
    fn node_names_are_restricted() {
        assert!(valid_node_name("node-1.zone_a"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("../etc"));
        assert!(!valid_node_name("a b"));
    }
}
