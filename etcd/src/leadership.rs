//! Leader election on etcd (docs/design.md §12): a coordinator takes a lease of a few seconds,
//! keeps it alive, and campaigns on `<prefix>/leader` with its advertised URL as the value.
//! The leader key's creation revision is the **epoch**: strictly greater for each new leader,
//! compared by every store write and carried by every command to the agents.
//!
//! A leader stops acting as soon as it may no longer be the leader: when a keep-alive says the
//! lease is gone, or when none has succeeded for long enough that the lease may have expired at
//! etcd (judged from when the last successful keep-alive was *sent*, so a paused process wakes
//! up deposed), or when a fenced write fails ([`Leadership::depose`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::client::{EtcdClient, EtcdError, LeaderKey};

/// Why a coordinator stopped being the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeadershipLost {
    #[error("the lease expired at etcd")]
    LeaseExpired,
    #[error("no keep-alive succeeded for {0:?}: the lease may have expired")]
    KeepAliveSilent(Duration),
    #[error("a write fenced by epoch {epoch} was refused: another coordinator leads")]
    Fenced { epoch: u64 },
    #[error("resigned")]
    Resigned,
}

/// The election's name under a prefix.
pub fn election_name(prefix: &str) -> Vec<u8> {
    format!("{}/leader", prefix.trim_end_matches('/')).into_bytes()
}

/// This coordinator leads, at [`Leadership::epoch`], until [`Leadership::lost`] fires.
#[derive(Debug, Clone)]
pub struct Leadership {
    client: EtcdClient,
    key: LeaderKey,
    lost_tx: Arc<watch::Sender<Option<LeadershipLost>>>,
}

impl Leadership {
    /// Take a lease of `ttl`, keep it alive, and wait until elected leader of `prefix`'s
    /// election with `advertise` as the value. While it waits, the lease is kept alive; if it
    /// is lost the campaign starts over with a new one.
    pub async fn campaign(
        client: &EtcdClient,
        prefix: &str,
        advertise: &str,
        ttl: Duration,
    ) -> Result<Leadership, EtcdError> {
        let name = election_name(prefix);
        loop {
            let (lease, granted) = client.lease_grant(ttl).await?;
            let (lost_tx, mut lost_rx) = watch::channel(None);
            let lost_tx = Arc::new(lost_tx);
            tokio::spawn(keep_alive(
                client.clone(),
                lease,
                granted,
                Arc::downgrade(&lost_tx),
            ));
            let campaign = client.campaign(&name, lease, advertise.as_bytes());
            let key = tokio::select! {
                key = campaign => key?,
                _ = lost_rx.wait_for(Option::is_some) => {
                    tracing::warn!(lease, "lease lost while campaigning; campaigning again");
                    continue;
                }
            };
            // etcd's campaign can answer after the lease expired (it waits for the earlier
            // candidates only): make sure the key is ours and alive before acting on it.
            match client.get(&key.key).await? {
                Some(kv) if kv.create_revision == key.revision && kv.lease == lease => {}
                _ => {
                    tracing::warn!(
                        lease,
                        "elected with a lease that is gone; campaigning again"
                    );
                    continue;
                }
            }
            if lost_tx.borrow().is_some() {
                continue;
            }
            tracing::info!(epoch = key.revision, advertise, "elected leader");
            return Ok(Leadership {
                client: client.clone(),
                key,
                lost_tx,
            });
        }
    }

    /// The epoch of this leadership: the leader key's creation revision.
    pub fn epoch(&self) -> u64 {
        self.key.revision.max(0) as u64
    }

    pub fn leader_key(&self) -> &LeaderKey {
        &self.key
    }

    /// Resolves (with the reason) once this coordinator is no longer the leader.
    pub fn lost(&self) -> impl std::future::Future<Output = LeadershipLost> + Send + 'static {
        let mut rx = self.lost_tx.subscribe();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or(LeadershipLost::Resigned),
                Err(_) => LeadershipLost::Resigned,
            }
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost_tx.borrow().is_some()
    }

    /// Stop leading now (a fenced write was refused, say); the first reason given stays.
    pub fn depose(&self, reason: LeadershipLost) {
        self.lost_tx.send_if_modified(|lost| {
            if lost.is_none() {
                tracing::warn!(epoch = self.epoch(), %reason, "leadership lost");
                *lost = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Give leadership up (revoking the lease deletes the leader key at once, so a standby
    /// takes over without waiting for the TTL).
    pub async fn resign(&self) {
        self.depose(LeadershipLost::Resigned);
        if let Err(e) = self.client.lease_revoke(self.key.lease).await {
            tracing::warn!(error = %e, "cannot revoke the leader's lease; it expires by itself");
        }
    }
}

/// Keep `lease` alive every third of its TTL until it is lost or nobody listens any more.
async fn keep_alive(
    client: EtcdClient,
    lease: i64,
    ttl: Duration,
    lost: std::sync::Weak<watch::Sender<Option<LeadershipLost>>>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(200));
    // Stop acting a little before etcd could let the lease expire.
    let margin = (ttl / 6).max(Duration::from_millis(100));
    let mut renewed_from = Instant::now();
    loop {
        let Some(sender) = lost.upgrade() else { return };
        if sender.borrow().is_some() {
            return;
        }
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(interval, client.lease_keep_alive(lease)).await {
            Ok(Ok(left)) if left.is_zero() => Some(LeadershipLost::LeaseExpired),
            Ok(Ok(_)) => {
                renewed_from = sent;
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(lease, error = %e, "keep-alive failed");
                None
            }
            Err(_) => None,
        };
        let silent = renewed_from.elapsed();
        let outcome = outcome.or_else(|| {
            (silent + margin >= ttl).then_some(LeadershipLost::KeepAliveSilent(silent))
        });
        if let Some(reason) = outcome {
            sender.send_if_modified(|lost| {
                if lost.is_none() {
                    tracing::warn!(lease, %reason, "lease lost");
                    *lost = Some(reason);
                    true
                } else {
                    false
                }
            });
            return;
        }
        drop(sender);
        tokio::time::sleep(interval.saturating_sub(sent.elapsed())).await;
    }
}
