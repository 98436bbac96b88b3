//! A client of etcd's v3 API, just what hotroll needs. Every request is bounded in time and
//! tried on the next member when one is down or has no quorum in reach, so one dead member
//! changes nothing for the caller.
//!
//! The client owns a small runtime of its own (one thread): the store calls it from synchronous
//! code (`Store` is synchronous), which must not block the caller's runtime on it, and its
//! connections then live as long as the client does, whichever runtime calls it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::wire::etcdserverpb as pb;
use crate::wire::etcdserverpb::kv_client::KvClient;
use crate::wire::etcdserverpb::lease_client::LeaseClient;
use crate::wire::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::wire::v3electionpb as epb;
use crate::wire::v3electionpb::election_client::ElectionClient;

/// Responses (a page of a range) may be larger than tonic's 4 MiB default.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Keys per page when reading a prefix: keeps each response well under etcd's limits.
const RANGE_PAGE: i64 = 256;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: no endpoint given")]
    NoEndpoints,
    #[error("etcd: bad endpoint `{endpoint}`: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    /// No member answered within the request's time (all down, or the cluster has no quorum).
    #[error("etcd: {what}: no member answered within {timeout:?} (last error: {last})")]
    Unavailable {
        what: &'static str,
        timeout: Duration,
        last: String,
    },
    #[error("etcd: {what}: {status}")]
    Rejected { what: &'static str, status: String },
    #[error("etcd: the client's runtime has stopped")]
    Stopped,
}

/// How to reach the etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the members (`http://127.0.0.1:2379`, ...).
    pub endpoints: Vec<String>,
    /// How long one request may take on one member before the next is tried.
    pub request_timeout: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// One key as etcd has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl From<pb::KeyValue> for KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    DeletePrefix { prefix: Vec<u8> },
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Condition {
    /// The key exists and was created at this revision (the fence: the leader key of an epoch).
    CreatedAt { key: Vec<u8>, revision: i64 },
    /// The key exists and was last written at this revision (nobody wrote it since it was
    /// read: a compare-and-swap).
    ModifiedAt { key: Vec<u8>, revision: i64 },
}

/// The leader key etcd's election gave: its creation revision is the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: Vec<u8>,
    pub key: Vec<u8>,
    pub revision: i64,
    pub lease: i64,
}

/// What etcd's Maintenance.Status says of the member that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub version: String,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub revision: i64,
}

#[derive(Clone)]
pub struct EtcdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.inner.urls)
            .finish_non_exhaustive()
    }
}

struct Inner {
    urls: Vec<String>,
    channels: Vec<Channel>,
    /// The member tried first: the last one that answered.
    current: AtomicUsize,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// Dropped with the client: the runtime's thread then ends.
    _stop: std::sync::mpsc::SyncSender<()>,
}

impl EtcdClient {
    /// A client of the cluster (no connection is made until the first request).
    pub fn new(options: &EtcdOptions) -> Result<Self, EtcdError> {
        if options.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let (runtime, stop) = spawn_runtime()?;
        let mut channels = Vec::new();
        for url in &options.endpoints {
            let endpoint =
                Endpoint::from_shared(url.clone()).map_err(|e| EtcdError::BadEndpoint {
                    endpoint: url.clone(),
                    reason: e.to_string(),
                })?;
            let endpoint = endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true);
            // Lazy channels spawn their workers on the runtime they are made in: ours.
            let _guard = runtime.enter();
            channels.push(endpoint.connect_lazy());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                urls: options.endpoints.clone(),
                channels,
                current: AtomicUsize::new(0),
                timeout: options.request_timeout,
                runtime,
                _stop: stop,
            }),
        })
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Run `call` on the client's runtime, on each member in turn from the last that answered,
    /// until one answers or every one failed to.
    async fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: Fn(Channel) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
    {
        let inner = self.inner.clone();
        let task = self.inner.runtime.spawn(async move {
            let count = inner.channels.len();
            let first = inner.current.load(Ordering::Relaxed);
            let mut last = String::from("none");
            for attempt in 0..count {
                let index = (first + attempt) % count;
                let channel = inner.channels[index].clone();
                match tokio::time::timeout(inner.timeout, call(channel)).await {
                    Ok(Ok(value)) => {
                        inner.current.store(index, Ordering::Relaxed);
                        return Ok(value);
                    }
                    Ok(Err(status)) if member_unavailable(&status) => {
                        last = format!("{}: {}", inner.urls[index], status.message());
                    }
                    Ok(Err(status)) => {
                        return Err(EtcdError::Rejected {
                            what,
                            status: status.message().to_string(),
                        });
                    }
                    Err(_) => last = format!("{}: timed out", inner.urls[index]),
                }
            }
            Err(EtcdError::Unavailable {
                what,
                timeout: inner.timeout,
                last,
            })
        });
        task.await.map_err(|_| EtcdError::Stopped)?
    }

    /// Run an async call from synchronous code (the `Store`), waiting for its answer.
    pub fn block_on<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, EtcdError>> + Send + 'static,
    ) -> Result<T, EtcdError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| EtcdError::Stopped)?
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let key = key.to_vec();
        self.call("get", move |channel| {
            let request = pb::RangeRequest {
                key: key.clone(),
                ..Default::default()
            };
            async move {
                let response = kv(channel).range(request).await?.into_inner();
                Ok(response.kvs.into_iter().next().map(KeyValue::from))
            }
        })
        .await
    }

    /// Every key under `prefix`, in key order, read page by page.
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut from = prefix.to_vec();
        loop {
            let (start, range_end) = (from.clone(), end.clone());
            let (page, more) = self
                .call("range", move |channel| {
                    let request = pb::RangeRequest {
                        key: start.clone(),
                        range_end: range_end.clone(),
                        limit: RANGE_PAGE,
                        ..Default::default()
                    };
                    async move {
                        let response = kv(channel).range(request).await?.into_inner();
                        Ok((response.kvs, response.more))
                    }
                })
                .await?;
            let Some(last) = page.last() else { break };
            // The next page starts just after the last key of this one.
            from = last.key.clone();
            from.push(0);
            out.extend(page.into_iter().map(KeyValue::from));
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// Apply `ops` if every condition holds; `Ok(false)` when one does not (nothing applied).
    pub async fn txn(&self, conditions: &[Condition], ops: &[Op]) -> Result<bool, EtcdError> {
        let request = pb::TxnRequest {
            compare: conditions.iter().map(compare_of).collect(),
            success: ops.iter().map(request_op_of).collect(),
            failure: Vec::new(),
        };
        self.call("txn", move |channel| {
            let request = request.clone();
            async move { Ok(kv(channel).txn(request).await?.into_inner().succeeded) }
        })
        .await
    }

    /// The cluster's current revision.
    pub async fn revision(&self) -> Result<i64, EtcdError> {
        self.call("revision", move |channel| async move {
            let response = kv(channel)
                .range(pb::RangeRequest {
                    key: vec![0],
                    count_only: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(response.header.map(|h| h.revision).unwrap_or_default())
        })
        .await
    }

    /// Forget every revision before `revision` (etcd keeps them all until told).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call("compact", move |channel| async move {
            kv(channel)
                .compact(pb::CompactionRequest {
                    revision,
                    physical: false,
                })
                .await?;
            Ok(())
        })
        .await
    }

    /// A new lease of `ttl`; returns its id and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let seconds = ttl.as_secs().max(1) as i64;
        self.call("lease grant", move |channel| async move {
            let response = LeaseClient::new(channel)
                .lease_grant(pb::LeaseGrantRequest {
                    ttl: seconds,
                    id: 0,
                })
                .await?
                .into_inner();
            if !response.error.is_empty() {
                return Err(Status::failed_precondition(response.error));
            }
            Ok((response.id, Duration::from_secs(response.ttl.max(0) as u64)))
        })
        .await
    }

    /// Renew the lease once; returns the TTL left (zero: the lease is gone).
    pub async fn lease_keep_alive(&self, lease: i64) -> Result<Duration, EtcdError> {
        self.call("lease keep-alive", move |channel| async move {
            let requests = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease });
            let mut responses = LeaseClient::new(channel)
                .lease_keep_alive(requests)
                .await?
                .into_inner();
            match responses.message().await? {
                Some(response) => Ok(Duration::from_secs(response.ttl.max(0) as u64)),
                None => Err(Status::unavailable("keep-alive stream ended")),
            }
        })
        .await
    }

    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", move |channel| async move {
            LeaseClient::new(channel)
                .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                .await?;
            Ok(())
        })
        .await
    }

    /// Campaign for `name` with `lease` (its holder leads while the lease lives); waits, with
    /// no time limit, until elected. The answer's revision is the epoch.
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<LeaderKey, EtcdError> {
        let request = epb::CampaignRequest {
            name: name.to_vec(),
            lease,
            value: value.to_vec(),
        };
        let inner = self.inner.clone();
        // Not through `call`: a campaign waits as long as another leader lives. A member that
        // goes away ends the call; the next one is asked (campaigning again with the same
        // lease finds the key already made).
        let task = self.inner.runtime.spawn(async move {
            let count = inner.channels.len();
            let mut index = inner.current.load(Ordering::Relaxed);
            loop {
                let channel = inner.channels[index % count].clone();
                match ElectionClient::new(channel).campaign(request.clone()).await {
                    Ok(response) => {
                        let leader = response.into_inner().leader.unwrap_or_default();
                        return Ok(LeaderKey {
                            name: leader.name,
                            key: leader.key,
                            revision: leader.rev,
                            lease: leader.lease,
                        });
                    }
                    Err(status) if member_unavailable(&status) => {
                        tracing::debug!(endpoint = %inner.urls[index % count], error = %status.message(), "campaign: member unavailable, trying the next");
                        index += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(status) => {
                        return Err(EtcdError::Rejected {
                            what: "campaign",
                            status: status.message().to_string(),
                        });
                    }
                }
            }
        });
        task.await.map_err(|_| EtcdError::Stopped)?
    }

    /// The current leader's value (its advertised URL) and leader key, if there is one.
    pub async fn leader(&self, name: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let name = name.to_vec();
        self.call("leader", move |channel| {
            let request = epb::LeaderRequest { name: name.clone() };
            async move {
                match ElectionClient::new(channel).leader(request).await {
                    Ok(response) => Ok(response.into_inner().kv.map(KeyValue::from)),
                    // etcd answers "election: no leader" when nobody campaigns.
                    Err(status) if status.message().contains("no leader") => Ok(None),
                    Err(status) => Err(status),
                }
            }
        })
        .await
    }

    pub async fn resign(&self, leader: &LeaderKey) -> Result<(), EtcdError> {
        let request = epb::ResignRequest {
            leader: Some(epb::LeaderKey {
                name: leader.name.clone(),
                key: leader.key.clone(),
                rev: leader.revision,
                lease: leader.lease,
            }),
        };
        self.call("resign", move |channel| {
            let request = request.clone();
            async move {
                ElectionClient::new(channel).resign(request).await?;
                Ok(())
            }
        })
        .await
    }

    /// The status of the member that answers first.
    pub async fn status(&self) -> Result<MemberStatus, EtcdError> {
        self.call("status", move |channel| async move {
            let response = MaintenanceClient::new(channel)
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            Ok(MemberStatus {
                version: response.version,
                db_size: response.db_size,
                db_size_in_use: response.db_size_in_use,
                revision: response.header.map(|h| h.revision).unwrap_or_default(),
            })
        })
        .await
    }
}

fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Errors after which another member may answer: this one is down, partitioned, or has no
/// quorum (etcd says "no leader" / "request timed out" as Unavailable).
fn member_unavailable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// The end of the range of keys that start with `prefix` (etcd's convention).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

fn compare_of(condition: &Condition) -> pb::Compare {
    match condition {
        Condition::CreatedAt { key, revision } => pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Create as i32,
            key: key.clone(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(*revision)),
            range_end: Vec::new(),
        },
        Condition::ModifiedAt { key, revision } => pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(pb::compare::TargetUnion::ModRevision(*revision)),
            range_end: Vec::new(),
        },
    }
}

fn request_op_of(op: &Op) -> pb::RequestOp {
    let request = match op {
        Op::Put { key, value } => pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        }),
        Op::DeletePrefix { prefix } => {
            pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(prefix),
                prev_kv: false,
            })
        }
    };
    pb::RequestOp {
        request: Some(request),
    }
}

/// A one-thread runtime for the client's connections and calls; it stops when the returned
/// sender is dropped.
fn spawn_runtime() -> Result<(tokio::runtime::Handle, std::sync::mpsc::SyncSender<()>), EtcdError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("etcd-client")
        .build()
        .map_err(|_| EtcdError::Stopped)?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
    std::thread::Builder::new()
        .name("etcd-client".into())
        .spawn(move || {
            // Runs the spawned calls until the client is dropped.
            runtime.block_on(async move {
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = stopped.recv();
                })
                .await;
            });
        })
        .map_err(|_| EtcdError::Stopped)?;
    Ok((handle, stop))
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/hotroll/"), b"/hotroll0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
