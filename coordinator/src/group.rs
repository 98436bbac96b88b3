//! A coordinator in a group on etcd (docs/ha.md): standby until elected, then leader until its
//! leadership is lost, then standby again, all on one listener.
//!
//! * Standby ([`crate::standby`]): every RPC but the leader's artifact replication is answered
//!   `UNAVAILABLE` "not the leader" with the leader's advertised URL in the message and in the
//!   `hotroll-leader` metadata; agents and the CLI follow it.
//! * Leader: the ordinary server ([`crate::server`]) on an [`EtcdStore`] fenced by this
//!   leadership's epoch. It rebuilds every unfinished rollout from the stored inputs, exactly as
//!   a restart does, and tells every agent its epoch in the Welcome. Before a rollout starts,
//!   its artifacts are copied to the other coordinators ([`crate::replication`]).
//! * Lost (lease expired, keep-alives silent for the TTL, a fenced write refused): the server
//!   stops at once (sessions and watch streams end, rollout drivers stop with it) and the
//!   coordinator campaigns again as a standby.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::Stream;
use hotroll_etcd::leadership::election_name;
use hotroll_etcd::{EtcdClient, EtcdOptions, EtcdStore, Leadership};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use hotroll_proto::v1::control_server::ControlServer;

use crate::artifacts::ArtifactStore;
use crate::auth::{Guarded, TokenFence, TokenStore};
use crate::replication::Replication;
use crate::server::{MAX_MESSAGE_BYTES, ServerConfig, ServerError, serve_with};
use crate::standby::StandbyControl;

pub use crate::standby::{LEADER_METADATA, not_leader};

/// How often the leader compacts etcd's old revisions, and how many it keeps.
const COMPACT_EVERY: Duration = Duration::from_secs(60);
const COMPACT_KEEP: i64 = 10_000;
/// Before campaigning again after a term failed to start (etcd unreachable, say).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where the group keeps its state and how this coordinator takes part.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub etcd: EtcdOptions,
    /// Every key of the group starts with it (`/hotroll`).
    pub prefix: String,
    /// The URL agents and the CLI reach this coordinator at (what standbys redirect to).
    pub advertise: String,
    /// The leader's lease: a leader that cannot renew it for this long stops acting.
    pub lease_ttl: Duration,
}

impl GroupOptions {
    pub fn new(endpoints: Vec<String>, advertise: String) -> Self {
        Self {
            etcd: EtcdOptions::new(endpoints),
            prefix: "/hotroll".into(),
            advertise,
            lease_ttl: Duration::from_secs(3),
        }
    }
}

/// Run one coordinator of the group on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    group: GroupOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let client = EtcdClient::new(&group.etcd).map_err(|e| ServerError::Group(e.to_string()))?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, advertise = %group.advertise, etcd = ?group.etcd.endpoints, prefix = %group.prefix, "coordinator listening as a member of a group on etcd");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // Tells the terms to stop, then waits for them (never completes on its own).
    let outer = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        std::future::pending::<()>().await;
    };
    let terms = async {
        // The group's tokens are in etcd, written under this coordinator's epoch while it
        // leads (a join redeems its token): the cell holds the leadership of the term.
        let leading = Arc::new(RwLock::new(None));
        if let Some(tls) = config.tls.clone() {
            let tokens = TokenStore::etcd(
                client.clone(),
                &group.prefix,
                TokenFence::Leader(leading.clone()),
            );
            let auth = Arc::new(crate::auth::Auth::secure_with(tls.clone(), tokens));
            let incoming = tls.incoming(listener, auth.throttle.clone()).into_inner();
            run_terms(incoming, &client, &config, &group, auth, leading, stop_rx).await
        } else {
            let (tx, incoming) = mpsc::channel(64);
            tokio::spawn(forward_plaintext(listener, tx));
            let auth = Arc::new(crate::auth::Auth::insecure());
            run_terms(incoming, &client, &config, &group, auth, leading, stop_rx).await
        }
    };
    tokio::select! {
        () = outer => Ok(()),
        result = terms => result,
    }
}

/// Accepted plaintext connections, with TCP_NODELAY (see `server::run`).
async fn forward_plaintext(
    listener: TcpListener,
    tx: mpsc::Sender<Result<tokio::net::TcpStream, std::io::Error>>,
) {
    let mut accepted = TcpListenerStream::new(listener);
    while let Some(stream) = accepted.next().await {
        if let Ok(stream) = &stream {
            crate::accepted::tune(stream);
        }
        if tx.send(stream).await.is_err() {
            return;
        }
    }
}

/// The connections of the listener, handed to whichever server (standby or leader) runs now.
fn shared<IO: Send + 'static>(
    incoming: Arc<Mutex<mpsc::Receiver<Result<IO, std::io::Error>>>>,
) -> impl Stream<Item = Result<IO, std::io::Error>> + Send + 'static {
    futures::stream::unfold(incoming, |incoming| async move {
        let next = incoming.lock().await.recv().await;
        next.map(|item| (item, incoming))
    })
}

async fn run_terms<IO>(
    incoming: mpsc::Receiver<Result<IO, std::io::Error>>,
    client: &EtcdClient,
    config: &ServerConfig,
    group: &GroupOptions,
    auth: Arc<crate::auth::Auth>,
    leading: Arc<RwLock<Option<Leadership>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServerError>
where
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let incoming = Arc::new(Mutex::new(incoming));
    let artifacts = ArtifactStore::new(&config.data_dir)?;
    let replication = Replication::new(
        client.clone(),
        election_name(&group.prefix),
        group.advertise.clone(),
        config.tls.clone(),
    );
    loop {
        // Standby until elected.
        let leadership = {
            let (leader_tx, leader_rx) = watch::channel(None::<String>);
            let watcher = tokio::spawn(watch_leader(
                client.clone(),
                election_name(&group.prefix),
                leader_tx,
            ));
            let (end_standby, standby_ended) = watch::channel(false);
            let standby = tokio::spawn(serve_standby(
                shared(incoming.clone()),
                artifacts.clone(),
                auth.clone(),
                leader_rx,
                standby_ended,
            ));
            let campaign =
                Leadership::campaign(client, &group.prefix, &group.advertise, group.lease_ttl);
            let elected = tokio::select! {
                elected = campaign => Some(elected),
                _ = stop.wait_for(|stop| *stop) => None,
            };
            watcher.abort();
            let _ = end_standby.send(true);
            if let Ok(Err(e)) = standby.await {
                tracing::warn!(error = %e, "the standby server failed");
            }
            match elected {
                None => return Ok(()),
                Some(Ok(leadership)) => leadership,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot campaign; trying again");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            }
        };

        // Leader until lost or told to stop.
        let epoch = leadership.epoch();
        tracing::info!(epoch, advertise = %group.advertise, "leading the group: recovering rollouts from etcd");
        let store = EtcdStore::new(client.clone(), &group.prefix, leadership.clone());
        store.spawn_compaction(COMPACT_EVERY, COMPACT_KEEP);
        set_leading(&leading, Some(leadership.clone()));
        let mut term = config.clone();
        term.leader_epoch = epoch;
        term.replication = Some(replication.clone());
        let lost = leadership.lost();
        let mut stopping = stop.clone();
        let end = async move {
            tokio::select! {
                reason = lost => tracing::warn!(epoch, %reason, "leadership lost: stopping every session and rollout driver"),
                _ = stopping.wait_for(|stop| *stop) => {}
            }
        };
        let result = serve_with(
            shared(incoming.clone()),
            Arc::new(store),
            term,
            end,
            auth.clone(),
        )
        .await;
        set_leading(&leading, None);
        if *stop.borrow() {
            leadership.resign().await;
            return result;
        }
        if let Err(e) = result {
            tracing::error!(epoch, error = %e, "the leader's term ended with an error");
        }
        // Whatever ended the term, this coordinator no longer acts on this epoch.
        leadership.resign().await;
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

fn set_leading(cell: &RwLock<Option<Leadership>>, leadership: Option<Leadership>) {
    match cell.write() {
        Ok(mut leading) => *leading = leadership,
        // A panic while holding it cannot leave a half-written Option: take it over.
        Err(poisoned) => *poisoned.into_inner() = leadership,
    }
}

/// Keep `leader` up to date with the advertised URL of the group's leader.
async fn watch_leader(client: EtcdClient, name: Vec<u8>, leader: watch::Sender<Option<String>>) {
    loop {
        match client.leader(&name).await {
            Ok(kv) => {
                let url = kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                leader.send_if_modified(|known| {
                    let changed = *known != url;
                    *known = url.clone();
                    changed
                });
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the group's leader"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn serve_standby<I, IO, IE>(
    incoming: I,
    artifacts: ArtifactStore,
    auth: Arc<crate::auth::Auth>,
    leader: watch::Receiver<Option<String>>,
    mut ended: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let control = StandbyControl {
        artifacts,
        leader: leader.clone(),
    };
    let router = tonic::service::Routes::new(Guarded::new(
        ControlServer::new(control)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth,
    ))
    .into_axum_router()
    .fallback(move || {
        let url = leader.borrow().clone();
        async move { not_leader(url.as_deref()).into_http::<axum::body::Body>() }
    });
    tonic::transport::Server::builder()
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = ended.wait_for(|ended| *ended).await;
        })
        .await
}
