//! The contract every [`Store`] keeps, as one check that each store's tests run on a real
//! instance of it (redb, memory, etcd): rollouts newest first (records decoded only where
//! asked), histories and inputs in order from a position, one engine step stored all together,
//! node records.

use super::{
    Commit, NodeRecord, RolloutRecord, RolloutSnapshot, Store, StoreError, StoredEvent, StoredInput,
};
use crate::engine::{Event, Record, RolloutState, StepPhase};

/// A way `check` found the store breaking its contract, or the store's own error.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store contract broken at {line}: {what}")]
    Broken { line: u32, what: String },
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(ContractError::Broken {
                line: line!(),
                what: format!("{} is {:?}, expected {:?}", stringify!($left), left, right),
            });
        }
    }};
}

macro_rules! ensure {
    ($cond:expr) => {{
        if !$cond {
            return Err(ContractError::Broken {
                line: line!(),
                what: format!("{} does not hold", stringify!($cond)),
            });
        }
    }};
}

/// A rollout record for the contract's checks.
pub fn record(id: &str) -> RolloutRecord {
    RolloutRecord {
        id: id.to_string(),
        epoch: 1,
        created_ms: 1,
        script_name: "s.toml".into(),
        script_source: "app = 'x'".into(),
        artifacts: vec![],
        targets: vec!["n1".into()],
        status: RolloutSnapshot {
            id: id.to_string(),
            state: RolloutState::Preparing,
            app: "x".into(),
            from: "1".into(),
            to: "2".into(),
            failures: 0,
            max_failures: 0,
            current_wave: 0,
            waves: 1,
            steps_total: 3,
            nodes: vec![],
            barrier: None,
            error: None,
            created_ms: 1,
            finished_ms: None,
            held_on_store: None,
            left_out: vec![],
            dry_run: false,
            window_opens_ms: None,
            gate_holding: None,
        },
        session_grace_ms: Some(10_000),
        step_slack_ms: None,
        left_out: vec![],
        target_labels: Default::default(),
        dry_run: false,
    }
}

/// Check that `store` keeps what the coordinator gives it, as every [`Store`] must.
pub fn check(store: &dyn Store) -> Result<(), ContractError> {
    store.put_rollout(&record("a"))?;
    store.put_rollout(&record("b"))?;
    let ids: Vec<_> = store.list_rollouts()?.into_iter().map(|r| r.id).collect();
    ensure_eq!(ids, vec!["b", "a"]);
    let newest: Vec<_> = store
        .newest_rollouts(1)?
        .into_iter()
        .map(|r| r.id)
        .collect();
    ensure_eq!(newest, vec!["b"]);
    ensure_eq!(store.newest_rollouts(5)?.len(), 2);
    // Every id in order; a record only for the ids the caller does not know.
    let listed: Vec<_> = store
        .newest_rollouts_unless(5, &|id| id == "b")?
        .into_iter()
        .map(|(id, record)| (id, record.map(|r| r.id)))
        .collect();
    ensure_eq!(
        listed,
        vec![
            ("b".to_string(), None),
            ("a".to_string(), Some("a".to_string()))
        ]
    );
    let events: Vec<_> = (1..=3)
        .map(|seq| StoredEvent {
            seq,
            at_ms: seq * 10,
            record: Record::Step {
                node: "n1".into(),
                step: seq as u32,
                phase: StepPhase::Started,
                error: None,
                duration_ms: None,
                warning: None,
            },
        })
        .collect();
    store.append_events("a", &events)?;
    store.append_events("b", &events[..1])?;
    ensure_eq!(store.events("a", 0)?, events);
    ensure_eq!(store.events("a", 2)?, events[1..].to_vec());
    ensure_eq!(store.events("b", 0)?.len(), 1);
    ensure!(store.get_rollout("zzz")?.is_none());
    store.put_node(&NodeRecord {
        name: "n1".into(),
        ..NodeRecord::default()
    })?;
    ensure_eq!(store.nodes()?.len(), 1);

    // One engine step: input, records and status together.
    let input = StoredInput {
        seq: 1,
        at_ms: 5,
        event: Event::SessionLost { node: "n1".into() },
    };
    let mut moved = record("a");
    moved.status.state = RolloutState::Committing;
    let more = [StoredEvent {
        seq: 4,
        at_ms: 5,
        record: Record::RolloutState {
            state: RolloutState::Committing,
            reason: None,
        },
    }];
    store.commit(Commit {
        rollout: "a",
        inputs: std::slice::from_ref(&input),
        events: &more,
        record: Some(&moved),
    })?;
    store.commit(Commit {
        rollout: "b",
        inputs: &[StoredInput {
            seq: 1,
            at_ms: 6,
            event: Event::Tick,
        }],
        events: &[],
        record: None,
    })?;
    ensure_eq!(store.inputs("a")?, vec![input]);
    ensure_eq!(store.inputs("b")?.len(), 1);
    ensure!(store.inputs("zzz")?.is_empty());
    ensure_eq!(store.events("a", 4)?, more.to_vec());

    // Many inputs and events in one step: all back in order, and a history read from a
    // position inside that step starts there.
    let inputs: Vec<_> = (2..=6)
        .map(|seq| StoredInput {
            seq,
            at_ms: 7,
            event: Event::Tick,
        })
        .collect();
    let step_events: Vec<_> = (5..=9)
        .map(|seq| StoredEvent {
            seq,
            at_ms: 7,
            record: Record::RolloutState {
                state: RolloutState::Committing,
                reason: None,
            },
        })
        .collect();
    store.commit(Commit {
        rollout: "a",
        inputs: &inputs,
        events: &step_events,
        record: None,
    })?;
    let seqs = |inputs: Vec<StoredInput>| inputs.iter().map(|i| i.seq).collect::<Vec<_>>();
    ensure_eq!(seqs(store.inputs("a")?), vec![1, 2, 3, 4, 5, 6]);
    ensure_eq!(store.events("a", 7)?, step_events[2..].to_vec());
    ensure_eq!(store.events("a", 10)?, Vec::<StoredEvent>::new());
    ensure_eq!(store.events("a", 0)?.len(), 9);
    ensure_eq!(
        store.get_rollout("a")?.map(|r| r.status.state),
        Some(RolloutState::Committing)
    );
    Ok(())
}
