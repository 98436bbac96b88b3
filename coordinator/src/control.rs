//! The `Control` gRPC service: what the operator's CLI calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use hotroll_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::{ArtifactError, ArtifactStore, parse_digest};
use crate::auth::MAX_ARTIFACTS_PER_SCRIPT;
use crate::convert;
use crate::engine::{Event, LeftOut, Record};
use crate::registry::{Registry, Selected};
use crate::replication::ReplicationError;
use crate::rollouts::{LiveEvent, NewRollout, RolloutError, Rollouts, instruction_namer};
use crate::store::ArtifactBinding;

/// Largest script source accepted.
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;

/// Response metadata of `WatchRollout`: the seq of the last event stored when the watch began
/// (0 when the rollout had none at or after `from_seq`). A client that wants the history up to
/// now, not the events that follow (`hotroll rollout events`), stops once it has this one.
pub const HISTORY_SEQ_HEADER: &str = "hotroll-history-seq";

/// Events queued per watch stream between the replay/broadcast task and gRPC.
const WATCH_QUEUE: usize = 256;

/// How long a watch stream lets live events gather before it forwards them. Events come in
/// bursts (one engine step records several); forwarding a burst at once costs every watcher
/// one wake-up, one gRPC frame and one write instead of one per event, which keeps fifty
/// watchers from competing with the rollout's own traffic for the CPU. Invisible to a person.
const WATCH_BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

pub struct ControlService {
    pub registry: Arc<Registry>,
    pub rollouts: Arc<Rollouts>,
    pub artifacts: ArtifactStore,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ends every watch stream when the server stops (the CLI resumes from its last seq).
    pub stopping: crate::stopping::Stopping,
    /// In a group: artifacts go to a second coordinator before a rollout starts.
    pub replication: Option<crate::replication::Replication>,
}

impl std::fmt::Debug for ControlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService").finish_non_exhaustive()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn rollout_status_error(e: RolloutError) -> Status {
    match e {
        RolloutError::NotFound(_) => Status::not_found(e.to_string()),
        RolloutError::NotApplicable(_) | RolloutError::NoPrometheus { .. } => {
            Status::failed_precondition(e.to_string())
        }
        RolloutError::Store(_) => Status::internal(e.to_string()),
        RolloutError::Stopped | RolloutError::Held(_) | RolloutError::HeldQueued(_) => {
            Status::unavailable(e.to_string())
        }
    }
}

fn artifact_status(e: ArtifactError) -> Status {
    match e {
        ArtifactError::Io { .. } => Status::internal(e.to_string()),
        ArtifactError::Missing(_) => Status::not_found(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl ControlService {
    async fn operate(
        &self,
        request: Request<pb::RolloutControlRequest>,
        action: &str,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let request = request.into_inner();
        let event = match action {
            "abort" => Event::OperatorAbort {
                reason: if request.reason.is_empty() {
                    "aborted by the operator".to_string()
                } else {
                    request.reason.clone()
                },
            },
            "pause" => Event::OperatorPause,
            "resume" => Event::OperatorResume,
            _ => Event::OperatorPromote,
        };
        tracing::info!(rollout = %request.rollout_id, action, "operator command");
        let snapshot = self
            .rollouts
            .operate(&request.rollout_id, event)
            .await
            .map_err(rollout_status_error)?;
        let (_, names) = self
            .rollouts
            .status(&request.rollout_id)
            .map_err(rollout_status_error)?;
        Ok(Response::new(convert::rollout_status(
            &snapshot,
            &instruction_namer(&names),
        )))
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    type WatchRolloutStream = BoxStream<pb::RolloutEvent>;

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::ArtifactChunk>>,
    ) -> Result<Response<pb::ArtifactRef>, Status> {
        receive_upload(&self.artifacts, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn has_artifacts(
        &self,
        request: Request<pb::HasArtifactsRequest>,
    ) -> Result<Response<pb::HasArtifactsResponse>, Status> {
        present(&self.artifacts, request.into_inner()).map(Response::new)
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let request = request.into_inner();
        let bound = request.artifacts.len();
        if bound > MAX_ARTIFACTS_PER_SCRIPT {
            tracing::warn!(artifacts = bound, "start refused: too many artifacts");
            return Err(Status::invalid_argument(format!(
                "the script binds {bound} artifacts; at most {MAX_ARTIFACTS_PER_SCRIPT}"
            )));
        }
        if request.script_source.len() > MAX_SCRIPT_BYTES {
            return Err(Status::invalid_argument(format!(
                "script is {} bytes; the limit is {MAX_SCRIPT_BYTES}",
                request.script_source.len()
            )));
        }
        let name = if request.script_name.is_empty() {
            "script.toml".to_string()
        } else {
            request.script_name.clone()
        };
        let parsed =
            hotroll_script::parse(&name, &request.script_source).map_err(|diagnostics| {
                Status::invalid_argument(format!(
                    "the script is not valid:\n{}",
                    diagnostics.to_short_lines().join("\n")
                ))
            })?;
        let script = parsed.script;

        // Every declared artifact must be bound to a stored digest.
        let given: HashMap<&str, &pb::ScriptArtifact> = request
            .artifacts
            .iter()
            .map(|a| (a.name.as_str(), a))
            .collect();
        let mut artifacts = Vec::new();
        for declared in &script.artifacts {
            let name = declared.name.value.as_str();
            let bound = given.get(name).ok_or_else(|| {
                Status::invalid_argument(format!("artifact `{name}` was not uploaded"))
            })?;
            let digest = parse_digest(&bound.digest).map_err(artifact_status)?;
            if !self.artifacts.contains(&digest) {
                return Err(Status::failed_precondition(format!(
                    "artifact `{name}` ({}) is not stored on the coordinator; upload it first",
                    bound.digest
                )));
            }
            let size = self.artifacts.size_of(&digest).map_err(artifact_status)?;
            artifacts.push(ArtifactBinding {
                name: name.to_string(),
                digest: bound.digest.clone(),
                size,
                mode: declared.mode.unwrap_or(0),
                unpack: declared.unpack,
            });
        }

        let select: BTreeMap<String, String> = if request.select.is_empty() {
            script.rollout.select.clone()
        } else {
            request.select.clone().into_iter().collect()
        };
        let selected = self.registry.select(&select);
        let labels: crate::engine::TargetLabels = selected
            .iter()
            .map(|node| (node.name.clone(), node.labels.clone()))
            .collect();
        // Who asked to leave unreachable nodes out, for the reason recorded with each.
        let skip_source = if request.skip_unreachable {
            Some("--skip-unreachable")
        } else {
            script
                .rollout
                .skip_unreachable
                .then_some("skip_unreachable in [rollout]")
        };
        let (targets, left_out, awaited): (Vec<String>, Vec<LeftOut>, Vec<String>) =
            match skip_source {
                Some(source) => {
                    let (reachable, unreachable): (Vec<Selected>, Vec<Selected>) =
                        selected.into_iter().partition(|node| node.connected);
                    let left_out: Vec<LeftOut> = unreachable
                        .into_iter()
                        .map(|node| LeftOut {
                            node: node.name,
                            reason: format!("not connected when the rollout started ({source})"),
                        })
                        .collect();
                    let targets = reachable.into_iter().map(|node| node.name).collect();
                    (targets, left_out, Vec::new())
                }
                // Every match is a target, in the registry's order (it decides the waves); the
                // ones not connected are waited for.
                None => {
                    let awaited = selected
                        .iter()
                        .filter(|node| !node.connected)
                        .map(|node| node.name.clone())
                        .collect();
                    let targets = selected.into_iter().map(|node| node.name).collect();
                    (targets, Vec::new(), awaited)
                }
            };
        if targets.is_empty() {
            let wanted = if select.is_empty() {
                "any known node".to_string()
            } else {
                select
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let why = match skip_source {
                Some(source) if !left_out.is_empty() => format!(
                    "no connected node matches {wanted} ({} not connected, left out by {source})",
                    left_out.len()
                ),
                _ => format!("no known node matches {wanted}"),
            };
            return Err(Status::failed_precondition(why));
        }
        // Named barrier members must be targets, or the barrier could never complete.
        let target_set: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
        for barrier in script.barriers() {
            for member in &barrier.members {
                if !target_set.contains(member.as_str()) {
                    return Err(Status::failed_precondition(format!(
                        "sync_nodes `{}` names node `{member}`, which is not a target of this rollout",
                        barrier.id
                    )));
                }
            }
        }
        // An OTP release rollout: what the release tarball says against what each target
        // runs, before anything changes anywhere (reads the tarball: off the workers).
        if script.runtime == hotroll_script::Runtime::OtpRelease {
            let known: BTreeMap<String, crate::store::NodeRecord> = self
                .registry
                .list()
                .into_iter()
                .map(|n| (n.record.name.clone(), n.record))
                .collect();
            let nodes: BTreeMap<String, Option<crate::store::AppVersions>> = targets
                .iter()
                .map(|t| {
                    let app = known
                        .get(t)
                        .and_then(|r| r.apps.get(&script.app.value).cloned());
                    (t.clone(), app)
                })
                .collect();
            let (checked, bindings, store) =
                (script.clone(), artifacts.clone(), self.artifacts.clone());
            let verdict = tokio::task::spawn_blocking(move || {
                crate::releases::check_start(&checked, &bindings, &store, &nodes)
            })
            .await
            .map_err(|e| Status::internal(format!("release check failed: {e}")))?;
            if let Err(why) = verdict {
                tracing::warn!(app = %script.app.value, %why, "start refused");
                return Err(Status::failed_precondition(why));
            }
        }
        // In a group, a second coordinator must hold the artifacts before anything starts
        // (a new leader serves them to the agents).
        if let Some(replication) = &self.replication {
            let digests = artifacts
                .iter()
                .map(|a| parse_digest(&a.digest))
                .collect::<Result<Vec<_>, _>>()
                .map_err(artifact_status)?;
            replication
                .ensure(&self.artifacts, &digests)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "start refused: artifacts not replicated");
                    match e {
                        ReplicationError::TooFewHolders { .. } => {
                            Status::failed_precondition(e.to_string())
                        }
                        _ => Status::unavailable(e.to_string()),
                    }
                })?;
        }
        let snapshot = self
            .rollouts
            .start(NewRollout {
                script_name: name,
                script_source: request.script_source,
                script,
                artifacts,
                targets: targets.clone(),
                left_out: left_out.clone(),
                not_connected: awaited.clone(),
                labels,
                dry_run: request.dry_run,
            })
            .map_err(rollout_status_error)?;
        tracing::info!(rollout = %snapshot.id, app = %snapshot.app, from = %snapshot.from, to = %snapshot.to, nodes = targets.len(), awaited = ?awaited, left_out = ?left_out, "rollout started");
        Ok(Response::new(pb::StartRolloutResponse {
            rollout_id: snapshot.id,
            nodes: targets,
            left_out: left_out.iter().map(convert::left_out).collect(),
            awaited,
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let id = request.into_inner().rollout_id;
        let (snapshot, names) = self.rollouts.status(&id).map_err(rollout_status_error)?;
        Ok(Response::new(convert::rollout_status(
            &snapshot,
            &instruction_namer(&names),
        )))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 50,
            n => n as usize,
        };
        // Reading the store is blocking I/O: off the runtime's workers, which also carry every
        // agent's session (a status poll must not delay a barrier's release).
        let rollouts = self.rollouts.clone();
        let listed = tokio::task::spawn_blocking(move || rollouts.list(limit))
            .await
            .map_err(|e| Status::internal(format!("listing rollouts failed: {e}")))?
            .map_err(rollout_status_error)?;
        let rollouts = listed.iter().map(convert::rollout_summary).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let request = request.into_inner();
        let id = request.rollout_id.clone();
        // Reading the history is blocking store I/O: keep it off the runtime's workers, so that
        // many watchers (re)connecting at once cannot delay the rollout drivers and sessions.
        let rollouts = self.rollouts.clone();
        let from_seq = request.from_seq;
        let lookup = id.clone();
        let crate::rollouts::WatchStart { past, live, names } =
            tokio::task::spawn_blocking(move || rollouts.watch(&lookup, from_seq))
                .await
                .map_err(|e| Status::internal(format!("watch task failed: {e}")))?
                .map_err(rollout_status_error)?;
        let history_seq = past
            .last()
            .map_or(from_seq.saturating_sub(1), |event| event.seq);
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let guard = self.metrics.watch_stream();
        tokio::spawn(async move {
            let _guard = guard;
            forward_watch(id, from_seq, past, live, names, tx).await;
        });
        let mut response =
            Response::new(Box::pin(self.stopping.bound(ReceiverStream::new(rx))) as BoxStream<_>);
        if let Ok(value) = history_seq.to_string().parse() {
            response.metadata_mut().insert(HISTORY_SEQ_HEADER, value);
        }
        Ok(response)
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .registry
            .list()
            .into_iter()
            .map(|n| pb::NodeInfo {
                name: n.record.name.clone(),
                labels: n.record.labels.clone().into_iter().collect(),
                connected: n.connected,
                apps: n
                    .record
                    .apps
                    .iter()
                    .map(|(app, v)| pb::AppState {
                        app: app.clone(),
                        current: v.current.clone(),
                        permanent: v.permanent.clone(),
                        releases: v
                            .releases
                            .iter()
                            .map(|r| pb::OtpReleaseState {
                                name: r.name.clone(),
                                version: r.version.clone(),
                                status: r.status.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
                last_seen_unix_ms: n.record.last_seen_ms,
                boot_generation: n.record.boot_generation,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.operate(request, "abort").await
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.operate(request, "pause").await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.operate(request, "resume").await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.operate(request, "promote").await
    }
}

/// Send the stored history, then live events, to one watcher until the rollout's final state.
/// A watcher that falls more than the broadcast buffer behind gets `DATA_LOSS` naming the seq
/// to reconnect from; the rollout's driver never waits for a watcher.
/// `UploadArtifact`: store an upload in `artifacts`, verified against its digest. What the
/// leader does for the CLI and a standby for the leader's replication.
pub(crate) async fn receive_upload(
    artifacts: &ArtifactStore,
    mut chunks: Streaming<pb::ArtifactChunk>,
) -> Result<pb::ArtifactRef, Status> {
    let first = chunks
        .next()
        .await
        .ok_or_else(|| Status::invalid_argument("empty upload"))??;
    let declared = parse_digest(&first.digest).map_err(artifact_status)?;
    if artifacts.contains(&declared) {
        // Already stored and verified: drain nothing more, the client may stop sending.
        let size = artifacts.size_of(&declared).map_err(artifact_status)?;
        return Ok(pb::ArtifactRef {
            digest: first.digest,
            size,
        });
    }
    let mut upload = artifacts
        .begin(&declared, first.total_size)
        .map_err(artifact_status)?;
    upload
        .write(first.offset, &first.data)
        .map_err(artifact_status)?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        upload
            .write(chunk.offset, &chunk.data)
            .map_err(artifact_status)?;
    }
    let (digest, size) = upload.finish().map_err(|e| {
        tracing::warn!(error = %e, "artifact upload refused");
        artifact_status(e)
    })?;
    tracing::info!(%digest, size, "artifact stored");
    Ok(pb::ArtifactRef {
        digest: digest.to_string(),
        size,
    })
}

/// `HasArtifacts`: the asked digests `artifacts` holds.
pub(crate) fn present(
    artifacts: &ArtifactStore,
    request: pb::HasArtifactsRequest,
) -> Result<pb::HasArtifactsResponse, Status> {
    let digests = request.digests;
    if digests.len() > MAX_ARTIFACTS_PER_SCRIPT {
        return Err(Status::invalid_argument(format!(
            "{} digests asked about; at most {MAX_ARTIFACTS_PER_SCRIPT}",
            digests.len()
        )));
    }
    let present = digests
        .into_iter()
        // A malformed digest is simply not present.
        .filter(|d| parse_digest(d).is_ok_and(|d| artifacts.contains(&d)))
        .collect();
    Ok(pb::HasArtifactsResponse { present })
}

async fn forward_watch(
    id: String,
    from_seq: u64,
    past: Vec<crate::store::StoredEvent>,
    live: Option<broadcast::Receiver<LiveEvent>>,
    names: crate::rollouts::InstructionNames,
    tx: mpsc::Sender<Result<pb::RolloutEvent, Status>>,
) {
    let namer = instruction_namer(&names);
    let mut last_seq = from_seq.saturating_sub(1);
    for event in &past {
        last_seq = event.seq;
        if tx
            .send(Ok(convert::rollout_event(&id, event, &namer)))
            .await
            .is_err()
        {
            return;
        }
        if is_final(&event.record) {
            return;
        }
    }
    let Some(mut live) = live else { return };
    loop {
        let mut batch = Vec::new();
        let first = live.recv().await;
        let lagged = match first {
            Ok(event) => {
                batch.push(event);
                tokio::time::sleep(WATCH_BATCH_DELAY).await;
                loop {
                    match live.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => break Some(n),
                        Err(_) => break None,
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => Some(n),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // What arrived before a lag is still good: send it, then say where to resume.
        for event in batch {
            let event = match event {
                LiveEvent::Stored(event) => event,
                notice => {
                    // Not part of the history (seq 0): a hold on the store and its end.
                    if let Some(notice) = convert::live_notice(&id, &notice)
                        && tx.send(Ok(notice)).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            if event.seq <= last_seq {
                continue;
            }
            last_seq = event.seq;
            if tx
                .send(Ok(convert::rollout_event(&id, &event, &namer)))
                .await
                .is_err()
            {
                return;
            }
            if is_final(&event.record) {
                return;
            }
        }
        if let Some(n) = lagged {
            let _ = tx
                .send(Err(Status::data_loss(format!(
                    "watcher fell {n} events behind; reconnect with from_seq {}",
                    last_seq + 1
                ))))
                .await;
            return;
        }
    }
}

fn is_final(record: &Record) -> bool {
    matches!(record, Record::RolloutState { state, .. } if state.is_final())
}
