//! What a standby of a group answers (docs/ha.md): the two artifact calls of the leader's
//! replication (`HasArtifacts`, `UploadArtifact`) from and into its own content store, and
//! `UNAVAILABLE` "not the leader" with the leader's advertised URL to everything else, so that
//! agents and the CLI go to the leader. Every call passes the same guard as on the leader
//! (`auth::Guarded`): with TLS an upload needs an operator, as the leader's peer certificate is.

use std::pin::Pin;

use futures::Stream;
use hotroll_proto::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::ArtifactStore;
use crate::control::{present, receive_upload};

pub use hotroll_proto::LEADER_METADATA;

/// The answer of a standby to every RPC it does not serve.
pub fn not_leader(leader: Option<&str>) -> Status {
    match leader {
        Some(url) => {
            let mut status = Status::unavailable(format!("not the leader; the leader is {url}"));
            if let Ok(value) = url.parse() {
                status.metadata_mut().insert(LEADER_METADATA, value);
            }
            status
        }
        None => Status::unavailable("not the leader; no leader is elected yet"),
    }
}

/// The `Control` service of a standby.
pub struct StandbyControl {
    pub artifacts: ArtifactStore,
    /// The leader's advertised URL, as etcd's election says.
    pub leader: watch::Receiver<Option<String>>,
}

impl StandbyControl {
    fn redirect<T>(&self) -> Result<T, Status> {
        Err(not_leader(self.leader.borrow().as_deref()))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for StandbyControl {
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
        _: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        self.redirect()
    }

    async fn get_rollout(
        &self,
        _: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.redirect()
    }

    async fn list_rollouts(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.redirect()
    }

    async fn watch_rollout(
        &self,
        _: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.redirect()
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.redirect()
    }

    async fn abort_rollout(
        &self,
        _: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.redirect()
    }

    async fn pause_rollout(
        &self,
        _: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.redirect()
    }

    async fn resume_rollout(
        &self,
        _: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.redirect()
    }

    async fn promote_rollout(
        &self,
        _: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.redirect()
    }
}
