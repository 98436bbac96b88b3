//! Tokens of a coordinator group, in etcd: `<prefix>/tokens/<sha256 of the secret>` holds the
//! record as JSON (a used join token keeps its key, with `used_by` set). Every write is one
//! transaction fenced by a leader's epoch ([`TokenFence`]), like every other write of the group;
//! redeeming a join token is a compare-and-swap on the key's last revision, so of concurrent
//! redeemers (on one leader or across a failover) exactly one succeeds.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hotroll_etcd::leadership::election_name;
use hotroll_etcd::{Condition, EtcdClient, EtcdError, KeyValue, Leadership, LeadershipLost, Op};
use hotroll_tls::Token;
use hotroll_tls::identity::unix_ms;
use hotroll_tls::token::short_id;

use super::{
    ListedToken, TokenError, TokenRecord, TokenRole, check_record, check_revoke_prefix, new_record,
};

/// Under whose epoch a token write lands.
#[derive(Debug, Clone)]
pub enum TokenFence {
    /// A coordinator of the group: only while it leads, under its own epoch (a join redeemed
    /// by a deposed leader is refused). `None`: not leading now.
    Leader(Arc<RwLock<Option<Leadership>>>),
    /// `hotroll token` on an administrator's machine: under the epoch of whichever coordinator
    /// leads at that moment (there must be one).
    CurrentLeader,
}

#[derive(Debug, Clone)]
pub struct EtcdTokens {
    client: EtcdClient,
    /// `<prefix>/tokens/`
    keys: String,
    /// The group's election, for [`TokenFence::CurrentLeader`].
    election: Vec<u8>,
    fence: TokenFence,
}

fn remote(e: EtcdError) -> TokenError {
    TokenError::Io(format!("etcd: {e}"))
}

impl EtcdTokens {
    pub fn new(client: EtcdClient, prefix: &str, fence: TokenFence) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            client,
            keys: format!("{prefix}/tokens/"),
            election: election_name(prefix),
            fence,
        }
    }

    fn key(&self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.keys).into_bytes()
    }

    fn get(&self, id: &str) -> Result<Option<(TokenRecord, i64)>, TokenError> {
        let client = self.client.clone();
        let key = self.key(id);
        let kv = self
            .client
            .block_on(async move { client.get(&key).await })
            .map_err(remote)?;
        kv.map(|kv| decode(&kv).map(|record| (record, kv.mod_revision)))
            .transpose()
    }

    /// The fence condition of a write now, and the leadership to depose if it is refused.
    fn fence(&self) -> Result<(Condition, Option<Leadership>), TokenError> {
        match &self.fence {
            TokenFence::Leader(cell) => {
                let leadership = cell
                    .read()
                    .map_err(|_| TokenError::Io("leadership cell poisoned".into()))?
                    .clone()
                    .filter(|l| !l.is_lost())
                    .ok_or_else(|| {
                        TokenError::Io("this coordinator does not lead the group now".into())
                    })?;
                let key = leadership.leader_key();
                let condition = Condition::CreatedAt {
                    key: key.key.clone(),
                    revision: key.revision,
                };
                Ok((condition, Some(leadership)))
            }
            TokenFence::CurrentLeader => {
                let client = self.client.clone();
                let name = self.election.clone();
                let leader = self
                    .client
                    .block_on(async move { client.leader(&name).await })
                    .map_err(remote)?
                    .ok_or_else(|| {
                        TokenError::Io(
                            "no coordinator of the group leads now; tokens are written under \
                             the leader's epoch: start a coordinator first"
                                .into(),
                        )
                    })?;
                let condition = Condition::CreatedAt {
                    key: leader.key,
                    revision: leader.create_revision,
                };
                Ok((condition, None))
            }
        }
    }

    /// Apply `ops` under the fence and `extra`; `Ok(false)`: `extra` did not hold.
    fn write(&self, extra: Option<Condition>, ops: Vec<Op>) -> Result<bool, TokenError> {
        let (fence, leadership) = self.fence()?;
        let client = self.client.clone();
        let fence_only = [fence.clone()];
        let conditions: Vec<Condition> = std::iter::once(fence).chain(extra.clone()).collect();
        let applied = self
            .client
            .block_on(async move { client.txn(&conditions, &ops).await })
            .map_err(remote)?;
        if applied {
            return Ok(true);
        }
        if extra.is_some() {
            // Which condition failed: the fence, or the caller's?
            let client = self.client.clone();
            let fence_holds = self
                .client
                .block_on(async move { client.txn(&fence_only, &[]).await })
                .map_err(remote)?;
            if fence_holds {
                return Ok(false);
            }
        }
        if let Some(leadership) = leadership {
            let epoch = leadership.epoch();
            leadership.depose(LeadershipLost::Fenced { epoch });
        }
        Err(TokenError::Io(
            "the write was refused by etcd: the group's leader changed; try again".into(),
        ))
    }

    pub fn create(
        &self,
        ca_pin: [u8; 32],
        role: TokenRole,
        ttl: Duration,
        node: Option<String>,
    ) -> Result<(Token, TokenRecord), TokenError> {
        let token = Token::generate(ca_pin);
        let record = new_record(role, ttl, node);
        let value = serde_json::to_vec(&record).map_err(|e| TokenError::Io(e.to_string()))?;
        self.write(
            None,
            vec![Op::Put {
                key: self.key(&token.id()),
                value,
            }],
        )?;
        Ok((token, record))
    }

    pub fn check(&self, token: &Token, roles: &[TokenRole]) -> Result<TokenRecord, TokenError> {
        match self.get(&token.id())? {
            None => Err(TokenError::Unknown),
            Some((record, _)) => match &record.used_by {
                Some(by) => Err(TokenError::Used { by: by.clone() }),
                None => check_record(record, roles),
            },
        }
    }

    pub fn redeem(&self, token: &Token, node: &str) -> Result<(), TokenError> {
        let id = token.id();
        let (mut record, revision) = self.get(&id)?.ok_or(TokenError::Unknown)?;
        if let Some(by) = record.used_by {
            return Err(TokenError::Used { by });
        }
        record.used_by = Some(node.to_string());
        record.used_unix_ms = Some(unix_ms(std::time::SystemTime::now()));
        let value = serde_json::to_vec(&record).map_err(|e| TokenError::Io(e.to_string()))?;
        let key = self.key(&id);
        let unchanged = Condition::ModifiedAt {
            key: key.clone(),
            revision,
        };
        if self.write(Some(unchanged), vec![Op::Put { key, value }])? {
            return Ok(());
        }
        // Someone redeemed (or revoked) it between our read and our write.
        Err(match self.get(&id)? {
            Some((record, _)) => TokenError::Used {
                by: record.used_by.unwrap_or_default(),
            },
            None => TokenError::Unknown,
        })
    }

    fn all(&self) -> Result<Vec<(String, TokenRecord)>, TokenError> {
        let client = self.client.clone();
        let prefix = self.keys.clone().into_bytes();
        let kvs = self
            .client
            .block_on(async move { client.get_prefix(&prefix).await })
            .map_err(remote)?;
        kvs.iter()
            .map(|kv| {
                let id = String::from_utf8_lossy(&kv.key[self.keys.len()..]).into_owned();
                decode(kv).map(|record| (id, record))
            })
            .collect()
    }

    pub fn list(&self) -> Result<Vec<ListedToken>, TokenError> {
        let now = unix_ms(std::time::SystemTime::now());
        let mut out: Vec<ListedToken> = self
            .all()?
            .into_iter()
            .map(|(id, record)| ListedToken {
                id: short_id(&id).to_string(),
                expired: now >= record.expires_unix_ms,
                used: record.used_by.is_some(),
                record,
            })
            .collect();
        out.sort_by_key(|t| t.record.created_unix_ms);
        Ok(out)
    }

    pub fn revoke(&self, prefix: &str) -> Result<usize, TokenError> {
        let prefix = check_revoke_prefix(prefix)?;
        let ids: Vec<String> = self
            .all()?
            .into_iter()
            .filter(|(id, record)| id.starts_with(&prefix) && record.used_by.is_none())
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        // Token ids are all 64 hex characters: a full key is a prefix of itself alone.
        let ops = ids
            .iter()
            .map(|id| Op::DeletePrefix {
                prefix: self.key(id),
            })
            .collect();
        self.write(None, ops)?;
        Ok(ids.len())
    }
}

fn decode(kv: &KeyValue) -> Result<TokenRecord, TokenError> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        TokenError::Io(format!(
            "etcd key {}: not a token record: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })
}
