//! [`EtcdStore`]: the rollouts' [`Store`] in etcd, for a group of coordinators.
//!
//! Keys, under the group's prefix `P`:
//! * `P/rollouts/<id>`: the rollout's record (JSON, as in redb);
//! * `P/inputs/<id>/<first seq>` and `P/events/<id>/<first seq>`: the engine's inputs and the
//!   history, one key per commit holding that commit's entries in order (a commit is one etcd
//!   transaction of a few keys, far under etcd's 128 operations per transaction);
//! * `P/nodes/<name>`: the node registry.
//!
//! Fencing: only a [`Leadership`] makes a store, and every write is a transaction whose only
//! condition is that the leader key still exists with the creation revision of this
//! leadership's epoch. A deposed leader's write is refused by etcd; the store then deposes its
//! leadership so the coordinator stops acting (docs/design.md §12).
//!
//! Size (docs/ha.md): once a rollout is final, in the transaction that stores its final record,
//! its engine inputs are deleted (recovery replays unfinished rollouts only) and its history
//! moves into gzipped archive keys `P/archive/<id>/<index>`. The leader also compacts etcd's old
//! revisions ([`EtcdStore::compact_history`]).

use std::time::Duration;

use hotroll_rollouts::store::{
    Commit, NodeRecord, RolloutRecord, Store, StoreError, StoredEvent, StoredInput, decode, encode,
};

use crate::client::{Condition, EtcdClient, EtcdError, Op};
use crate::leadership::{Leadership, LeadershipLost};

/// etcd refuses requests over 1.5 MiB by default; leave room for the keys and framing.
pub const MAX_WRITE_BYTES: usize = 1_400 * 1024;
/// Node records per transaction (etcd allows 128 operations in one by default).
const NODES_PER_TXN: usize = 100;

#[derive(Debug, Clone)]
pub struct EtcdStore {
    client: EtcdClient,
    prefix: String,
    leadership: Leadership,
}

impl EtcdStore {
    /// The store of the group under `prefix`, writing as `leadership`'s leader.
    pub fn new(client: EtcdClient, prefix: &str, leadership: Leadership) -> Self {
        Self {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            leadership,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.leadership.epoch()
    }

    fn key(&self, parts: &[&str]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push('/');
            key.push_str(part);
        }
        key.into_bytes()
    }

    /// `P/<kind>/<rollout>/`: a rollout's chunks of inputs or events.
    fn chunks_prefix(&self, kind: &str, rollout: &str) -> Vec<u8> {
        let mut key = self.key(&[kind, rollout]);
        key.push(b'/');
        key
    }

    fn chunk_key(&self, kind: &str, rollout: &str, first_seq: u64) -> Vec<u8> {
        self.key(&[kind, rollout, &format!("{first_seq:020}")])
    }

    /// Apply `ops` if this coordinator still leads.
    fn fenced_write(&self, what: &str, ops: Vec<Op>) -> Result<(), StoreError> {
        let bytes: usize = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => key.len() + value.len(),
                Op::DeletePrefix { prefix } => prefix.len() * 2,
            })
            .sum();
        if bytes > MAX_WRITE_BYTES {
            return Err(StoreError::TooLarge {
                what: what.to_string(),
                bytes,
                limit: MAX_WRITE_BYTES,
            });
        }
        if self.leadership.is_lost() {
            return Err(StoreError::Fenced {
                epoch: self.epoch(),
            });
        }
        let fence = Condition::CreatedAt {
            key: self.leadership.leader_key().key.clone(),
            revision: self.leadership.leader_key().revision,
        };
        let client = self.client.clone();
        let applied = self
            .client
            .block_on(async move { client.txn(&[fence], &ops).await })
            .map_err(remote)?;
        if applied {
            Ok(())
        } else {
            let epoch = self.epoch();
            self.leadership.depose(LeadershipLost::Fenced { epoch });
            Err(StoreError::Fenced { epoch })
        }
    }

    fn read_prefix(&self, prefix: Vec<u8>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client.clone();
        let kvs = self
            .client
            .block_on(async move { client.get_prefix(&prefix).await })
            .map_err(remote)?;
        Ok(kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
            .collect())
    }

    /// Every entry of a rollout's chunks of one kind, in order.
    fn read_chunks<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        rollout: &str,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for (key, value) in self.read_prefix(self.chunks_prefix(kind, rollout))? {
            out.extend(decode::<Vec<T>>(&key, &value)?);
        }
        Ok(out)
    }

    /// The commit that makes a rollout final. A final rollout is never replayed, so its
    /// inputs go; its history (every chunk and this commit's events) is archived gzipped in
    /// `P/archive/<id>/<index>` keys and its live chunks go, all in the transaction that stores
    /// the final record. An archive too large for one transaction is written first, chunk by
    /// chunk; until the final transaction lands the live chunks stay and are what is read, so
    /// a crash in between loses nothing (the recovered rollout commits its end again).
    fn commit_final(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        let mut history = self.read_chunks::<StoredEvent>("events", commit.rollout)?;
        history.extend(commit.events.iter().cloned());
        let archive = gzip(&encode(&history)?)?;
        let chunks: Vec<&[u8]> = archive.chunks(ARCHIVE_CHUNK_BYTES).collect();
        let archive_ops: Vec<Op> = chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| Op::Put {
                key: self.key(&["archive", commit.rollout, &format!("{index:06}")]),
                value: chunk.to_vec(),
            })
            .collect();
        let mut ops = vec![
            Op::DeletePrefix {
                prefix: self.chunks_prefix("inputs", commit.rollout),
            },
            Op::DeletePrefix {
                prefix: self.chunks_prefix("events", commit.rollout),
            },
        ];
        let record = commit.record.map(encode).transpose()?;
        let record_bytes = record.as_ref().map_or(0, Vec::len);
        if archive.len() + record_bytes + 64 * 1024 <= MAX_WRITE_BYTES {
            ops.extend(archive_ops);
        } else {
            for op in archive_ops {
                self.fenced_write("the rollout's archived history", vec![op])?;
            }
        }
        if let Some(record) = record {
            ops.push(Op::Put {
                key: self.key(&["rollouts", commit.rollout]),
                value: record,
            });
        }
        self.fenced_write("the rollout's final step", ops)
    }

    /// A final rollout's archived history (empty when there is none).
    fn read_archive(&self, rollout: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let chunks = self.read_prefix(self.chunks_prefix("archive", rollout))?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let key = String::from_utf8_lossy(&self.chunks_prefix("archive", rollout)).into_owned();
        let gzipped: Vec<u8> = chunks.into_iter().flat_map(|(_, value)| value).collect();
        let json = gunzip(&gzipped)
            .map_err(|e| StoreError::Remote(format!("{key}: not a gzipped history: {e}")))?;
        decode(&key, &json)
    }

    /// Forget etcd's revisions older than `keep` revisions back (a rollout's many commits
    /// otherwise keep every superseded record). Returns the revision compacted to, if any.
    pub fn compact_history(&self, keep: i64) -> Result<Option<i64>, StoreError> {
        let client = self.client.clone();
        self.client
            .block_on(async move {
                let now = client.revision().await?;
                let to = now - keep;
                if to <= 1 {
                    return Ok(None);
                }
                match client.compact(to).await {
                    Ok(()) => Ok(Some(to)),
                    // Already compacted that far (another leader did): nothing to do.
                    Err(EtcdError::Rejected { status, .. }) if status.contains("compacted") => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .map_err(remote)
    }

    /// The leader compacts etcd every `interval`, keeping the last `keep` revisions, until
    /// its leadership is lost.
    pub fn spawn_compaction(&self, interval: Duration, keep: i64) {
        let store = self.clone();
        let lost = self.leadership.lost();
        tokio::spawn(async move {
            let compact = async {
                loop {
                    tokio::time::sleep(interval).await;
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.compact_history(keep)).await {
                        Ok(Ok(Some(revision))) => {
                            tracing::debug!(revision, "etcd compacted")
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot compact etcd"),
                        Err(e) => tracing::warn!(error = %e, "compaction task failed"),
                    }
                }
            };
            tokio::select! {
                () = compact => {}
                _ = lost => {}
            }
        });
    }
}

/// One key of an archived history: well under etcd's request limit.
const ARCHIVE_CHUNK_BYTES: usize = 1024 * 1024;

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(bytes)
        .and_then(|()| encoder.finish())
        .map_err(|e| StoreError::Remote(format!("cannot compress a history: {e}")))
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn remote(error: EtcdError) -> StoreError {
    StoreError::Remote(error.to_string())
}

impl Store for EtcdStore {
    fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        let ops = vec![Op::Put {
            key: self.key(&["rollouts", &record.id]),
            value: encode(record)?,
        }];
        self.fenced_write("the rollout's record", ops)
    }

    fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let key = self.key(&["rollouts", id]);
        let client = self.client.clone();
        let kv = self
            .client
            .block_on(async move { client.get(&key).await })
            .map_err(remote)?;
        kv.map(|kv| decode(id, &kv.value)).transpose()
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut prefix = self.key(&["rollouts"]);
        prefix.push(b'/');
        let mut out = self
            .read_prefix(prefix)?
            .into_iter()
            .map(|(key, value)| decode::<RolloutRecord>(&key, &value))
            .collect::<Result<Vec<_>, _>>()?;
        // uuid v7 ids sort by creation time.
        out.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(out)
    }

    fn append_events(&self, rollout: &str, events: &[StoredEvent]) -> Result<(), StoreError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let ops = vec![Op::Put {
            key: self.chunk_key("events", rollout, first.seq),
            value: encode(&events)?,
        }];
        self.fenced_write("the rollout's history", ops)
    }

    fn events(&self, rollout: &str, from_seq: u64) -> Result<Vec<StoredEvent>, StoreError> {
        // The live chunks while the rollout runs (and while a final commit that archives is
        // under way); the archive once it is final.
        let mut events = self.read_chunks::<StoredEvent>("events", rollout)?;
        if events.is_empty() {
            events = self.read_archive(rollout)?;
        }
        events.retain(|event| event.seq >= from_seq);
        Ok(events)
    }

    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        let finished = commit
            .record
            .is_some_and(|record| record.status.state.is_final());
        if finished {
            return self.commit_final(commit);
        }
        let mut ops = Vec::new();
        if let Some(first) = commit.inputs.first() {
            ops.push(Op::Put {
                key: self.chunk_key("inputs", commit.rollout, first.seq),
                value: encode(&commit.inputs)?,
            });
        }
        if let Some(first) = commit.events.first() {
            ops.push(Op::Put {
                key: self.chunk_key("events", commit.rollout, first.seq),
                value: encode(&commit.events)?,
            });
        }
        if let Some(record) = commit.record {
            ops.push(Op::Put {
                key: self.key(&["rollouts", commit.rollout]),
                value: encode(record)?,
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.fenced_write("the rollout's step", ops)
    }

    fn inputs(&self, rollout: &str) -> Result<Vec<StoredInput>, StoreError> {
        self.read_chunks("inputs", rollout)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put_nodes(std::slice::from_ref(node))
    }

    fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        for batch in nodes.chunks(NODES_PER_TXN) {
            let ops = batch
                .iter()
                .map(|node| {
                    Ok(Op::Put {
                        key: self.key(&["nodes", &node.name]),
                        value: encode(node)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.fenced_write("node records", ops)?;
        }
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut prefix = self.key(&["nodes"]);
        prefix.push(b'/');
        self.read_prefix(prefix)?
            .into_iter()
            .map(|(key, value)| decode::<NodeRecord>(&key, &value))
            .collect()
    }
}
