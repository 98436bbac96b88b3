//! The etcd store and its fenced leadership against a real 3-member etcd cluster on 127.0.0.1
//! (issue 16): the store keeps the same contract as redb; a deposed leader's writes are refused
//! by etcd and depose it; one member down changes nothing; a final rollout's inputs go.

use std::time::Duration;

use anyhow::Context;
use hotroll_engine::{Event, Record, RolloutState, StepPhase};
use hotroll_etcd::{EtcdClient, EtcdOptions, EtcdStore, Leadership, LeadershipLost};
use hotroll_rollouts::store::contract::{check, record};
use hotroll_rollouts::store::{Commit, Store, StoreError, StoredEvent, StoredInput};
use hotroll_tests::etcd::EtcdCluster;

const TTL: Duration = Duration::from_secs(2);

fn client(etcd: &EtcdCluster) -> anyhow::Result<EtcdClient> {
    Ok(EtcdClient::new(&EtcdOptions::new(etcd.endpoints()))?)
}

/// Store calls block (the `Store` trait is synchronous): run them off the test's runtime.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|e| panic!("store call panicked: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_keeps_the_store_contract() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3)?;
    let client = client(&etcd)?;
    let leader = Leadership::campaign(&client, "/contract", "http://a", TTL).await?;
    let store = EtcdStore::new(client, "/contract", leader);
    blocking(move || check(&store)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_writes_are_refused_and_depose_it() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3)?;
    let client = client(&etcd)?;
    let a = Leadership::campaign(&client, "/fence", "http://a", TTL).await?;
    let a_store = EtcdStore::new(client.clone(), "/fence", a.clone());
    let first = record("r1");
    {
        let (store, first) = (a_store.clone(), first.clone());
        blocking(move || store.put_rollout(&first)).await?;
    }

    // B campaigns while A leads: it waits.
    let b_client = client.clone();
    let b =
        tokio::spawn(
            async move { Leadership::campaign(&b_client, "/fence", "http://b", TTL).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    anyhow::ensure!(!b.is_finished(), "B was elected while A still led");

    // A's lease goes away behind its back (as when A is paused past its TTL): B leads.
    client.lease_revoke(a.leader_key().lease).await?;
    let b = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .context("B was not elected after A's lease went")???;
    anyhow::ensure!(
        b.epoch() > a.epoch(),
        "B's epoch {} is not above A's {}",
        b.epoch(),
        a.epoch()
    );
    let leader = client
        .leader(b"/fence/leader")
        .await?
        .context("no leader")?;
    anyhow::ensure!(
        leader.value == b"http://b",
        "the election names another leader"
    );

    // A still thinks it leads until it writes: etcd refuses the write, and A is deposed.
    let mut stale = first.clone();
    stale.status.state = RolloutState::Aborted;
    let refused = {
        let (store, stale) = (a_store.clone(), stale.clone());
        blocking(move || store.put_rollout(&stale)).await
    };
    anyhow::ensure!(
        matches!(refused, Err(StoreError::Fenced { epoch }) if epoch == a.epoch()),
        "A's write was not refused as fenced: {refused:?}"
    );
    anyhow::ensure!(a.is_lost(), "A was not deposed by its refused write");
    let reason = tokio::time::timeout(Duration::from_secs(1), a.lost()).await?;
    anyhow::ensure!(
        matches!(
            reason,
            LeadershipLost::Fenced { .. } | LeadershipLost::LeaseExpired
        ),
        "A lost its leadership for another reason: {reason:?}"
    );

    // Nothing A wrote after losing shows; B's writes go through.
    let b_store = EtcdStore::new(client.clone(), "/fence", b.clone());
    let kept = {
        let store = b_store.clone();
        blocking(move || store.get_rollout("r1")).await?
    };
    anyhow::ensure!(kept == Some(first), "the stored record changed: {kept:?}");
    {
        let store = b_store.clone();
        blocking(move || store.put_rollout(&record("r2"))).await?;
    }
    b.resign().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_down_changes_nothing_for_the_store() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let client = client(&etcd)?;
    let leader = Leadership::campaign(&client, "/member", "http://a", TTL).await?;
    let store = EtcdStore::new(client, "/member", leader.clone());
    // The first endpoint is the one the client tries first.
    etcd.member(0).kill()?;
    for i in 0..20 {
        let store = store.clone();
        blocking(move || store.put_rollout(&record(&format!("r{i:02}")))).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = {
        let store = store.clone();
        blocking(move || store.list_rollouts()).await?
    };
    anyhow::ensure!(listed.len() == 20, "{} rollouts listed", listed.len());
    anyhow::ensure!(
        !leader.is_lost(),
        "the leader lost its lease over one dead member"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_rollouts_engine_inputs_are_deleted_and_its_history_kept() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3)?;
    let client = client(&etcd)?;
    let leader = Leadership::campaign(&client, "/final", "http://a", TTL).await?;
    let store = EtcdStore::new(client, "/final", leader);
    blocking({
        let store = store.clone();
        move || -> anyhow::Result<()> {
            store.put_rollout(&record("r"))?;
            let inputs: Vec<_> = (1..=3)
                .map(|seq| StoredInput {
                    seq,
                    at_ms: seq,
                    event: Event::Tick,
                })
                .collect();
            store.commit(Commit {
                rollout: "r",
                inputs: &inputs[..2],
                events: &[],
                record: None,
            })?;
            anyhow::ensure!(store.inputs("r")?.len() == 2);
            let mut done = record("r");
            done.status.state = RolloutState::Succeeded;
            store.commit(Commit {
                rollout: "r",
                inputs: &inputs[2..],
                events: &[],
                record: Some(&done),
            })?;
            anyhow::ensure!(store.inputs("r")?.is_empty(), "inputs kept after the end");
            anyhow::ensure!(
                store.get_rollout("r")?.map(|r| r.status.state) == Some(RolloutState::Succeeded)
            );
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// One history entry whose error is `len` bytes of hex that compresses poorly.
fn noisy_event(seq: u64, len: usize) -> StoredEvent {
    use sha2::Digest;
    let mut error = String::new();
    while error.len() < len {
        error.push_str(&hex::encode(sha2::Sha256::digest(
            format!("{seq}/{}", error.len()).as_bytes(),
        )));
    }
    StoredEvent {
        seq,
        at_ms: seq,
        record: Record::Step {
            node: format!("node-{}", seq % 1000),
            step: 1,
            phase: StepPhase::Failed,
            error: Some(error),
            duration_ms: Some(seq),
            warning: None,
        },
    }
}

/// A final rollout's history moves into gzipped archive keys in its final commit (the live
/// chunks go), and reads the same as before: a small one in the final transaction, one larger
/// than an etcd request in chunks written first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_rollouts_history_is_archived_and_reads_the_same() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3)?;
    let client = client(&etcd)?;
    let leader = Leadership::campaign(&client, "/archive", "http://a", TTL).await?;
    let store = EtcdStore::new(client.clone(), "/archive", leader);
    for (rollout, events, batch, len) in [
        ("small", 40u64, 10usize, 50usize),
        ("large", 12_000, 1_000, 256),
    ] {
        let store = store.clone();
        let history: Vec<StoredEvent> = (1..=events).map(|seq| noisy_event(seq, len)).collect();
        let check = history.clone();
        let raw = serde_json::to_vec(&history)?.len();
        blocking(move || -> anyhow::Result<()> {
            store.put_rollout(&record(rollout))?;
            let (last, earlier) = history.split_last().context("no history")?;
            for chunk in earlier.chunks(batch) {
                store.append_events(rollout, chunk)?;
            }
            let mut done = record(rollout);
            done.status.state = RolloutState::RolledBack;
            store.commit(Commit {
                rollout,
                inputs: &[],
                events: std::slice::from_ref(last),
                record: Some(&done),
            })?;
            anyhow::ensure!(
                store.events(rollout, 0)? == check,
                "{rollout}: the archived history differs from what was stored"
            );
            anyhow::ensure!(store.events(rollout, events - 1)?.len() == 2);
            Ok(())
        })
        .await?;
        let live = client
            .get_prefix(format!("/archive/events/{rollout}/").as_bytes())
            .await?;
        let archive = client
            .get_prefix(format!("/archive/archive/{rollout}/").as_bytes())
            .await?;
        let archived: usize = archive.iter().map(|kv| kv.value.len()).sum();
        anyhow::ensure!(
            live.is_empty(),
            "{rollout}: live chunks left: {}",
            live.len()
        );
        anyhow::ensure!(
            !archive.is_empty() && (rollout == "small" || archive.len() > 1),
            "{rollout}: {} archive keys",
            archive.len()
        );
        eprintln!(
            "{rollout}: {events} events, {raw} bytes as JSON, archived in {} keys of {archived} bytes",
            archive.len()
        );
    }
    Ok(())
}

/// A group's tokens in etcd: made by an administrator under the current leader's epoch (and
/// refused when nobody leads), checked by any coordinator, a join token redeemed once only,
/// and never by a deposed leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_tokens_are_shared_single_use_and_fenced() -> anyhow::Result<()> {
    use hotroll_coordinator::auth::{TokenError, TokenFence, TokenRole, TokenStore};
    use std::sync::{Arc, RwLock};

    let etcd = EtcdCluster::start(3)?;
    let endpoints = etcd.endpoints();
    let admin = TokenStore::for_group(endpoints.clone(), "/tokens")?;
    {
        let admin = admin.clone();
        let refused = blocking(move || {
            admin.create([7; 32], TokenRole::Operator, Duration::from_secs(60), None)
        })
        .await;
        anyhow::ensure!(
            matches!(&refused, Err(TokenError::Io(e)) if e.contains("no coordinator of the group leads")),
            "a token was made with no leader: {refused:?}"
        );
    }

    let client = client(&etcd)?;
    let a = Leadership::campaign(&client, "/tokens", "http://a", TTL).await?;
    let cell = Arc::new(RwLock::new(Some(a.clone())));
    let leader = TokenStore::etcd(client.clone(), "/tokens", TokenFence::Leader(cell.clone()));
    let standby = TokenStore::etcd(
        client.clone(),
        "/tokens",
        TokenFence::Leader(Arc::new(RwLock::new(None))),
    );

    let (operator, join, other_join) = {
        let admin = admin.clone();
        blocking(move || -> Result<_, TokenError> {
            let ttl = Duration::from_secs(60);
            let (operator, _) = admin.create([7; 32], TokenRole::Operator, ttl, None)?;
            let (join, _) = admin.create([7; 32], TokenRole::Agent, ttl, None)?;
            let (other, _) = admin.create([7; 32], TokenRole::Agent, ttl, None)?;
            Ok((operator, join, other))
        })
        .await?
    };
    let (leader_c, standby_c) = (leader.clone(), standby.clone());
    let (op, j) = (operator.clone(), join.clone());
    blocking(move || -> anyhow::Result<()> {
        // Checked on any coordinator of the group, leader or not.
        standby_c.check(&op, &[TokenRole::Operator])?;
        leader_c.check(&op, &[TokenRole::Operator])?;
        anyhow::ensure!(matches!(
            standby_c.check(&op, &[TokenRole::Agent]),
            Err(TokenError::WrongRole(_))
        ));
        // A standby does not redeem.
        anyhow::ensure!(standby_c.redeem(&j, "node-1").is_err());
        // Redeemed once.
        leader_c.redeem(&j, "node-1")?;
        anyhow::ensure!(matches!(
            leader_c.redeem(&j, "node-2"),
            Err(TokenError::Used { by }) if by == "node-1"
        ));
        anyhow::ensure!(matches!(
            standby_c.check(&j, &[TokenRole::Agent]),
            Err(TokenError::Used { .. })
        ));
        Ok(())
    })
    .await?;

    // A is deposed behind its back: its redeem is refused by etcd, and A learns it.
    client.lease_revoke(a.leader_key().lease).await?;
    let b = Leadership::campaign(&client, "/tokens", "http://b", TTL).await?;
    let (leader_c, oj) = (leader.clone(), other_join.clone());
    let refused = blocking(move || leader_c.redeem(&oj, "node-3")).await;
    anyhow::ensure!(refused.is_err(), "a deposed leader redeemed a join token");
    anyhow::ensure!(a.is_lost(), "the refused write did not depose A");
    *cell.write().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(b.clone());
    let (leader_c, oj, admin_c) = (leader.clone(), other_join.clone(), admin.clone());
    blocking(move || -> anyhow::Result<()> {
        leader_c.redeem(&oj, "node-3")?;
        let listed = admin_c.list()?;
        anyhow::ensure!(listed.len() == 3, "listed: {listed:?}");
        anyhow::ensure!(listed.iter().filter(|t| t.used).count() == 2);
        anyhow::ensure!(admin_c.revoke(&operator.id()[..12])? == 1);
        anyhow::ensure!(matches!(
            leader_c.check(&operator, &[TokenRole::Operator]),
            Err(TokenError::Unknown)
        ));
        Ok(())
    })
    .await?;
    b.resign().await;
    Ok(())
}
