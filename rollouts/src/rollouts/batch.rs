//! A batch: the inputs the driver handles together, and what the engine made of them, until it
//! is durable and sent (see `Driver::run`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::{Command, Millis, NotApplicable};
use crate::store::{RolloutSnapshot, StoredEvent, StoredInput};

/// Most inputs the driver handles before it makes them durable and sends their commands.
pub(super) const MAX_BATCH: usize = 4096;

/// Longest a quiet batch waits for more inputs before it is committed (see `Driver::linger`).
pub(super) const LINGER: Duration = Duration::from_millis(2);

/// Inputs handled together.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) inputs: Vec<StoredInput>,
    pub(super) stored: Vec<StoredEvent>,
    pub(super) commands: Vec<Command>,
    /// The time given to the engine with the last input.
    pub(super) now: Millis,
    /// Nodes whose session came back.
    pub(super) restored: Vec<String>,
    /// Operator commands, answered once the batch is durable and sent.
    pub(super) replies: Vec<PendingReply>,
    /// Barriers the batch releases, and when the input that released each reached the
    /// rollouts (what `hotroll_barrier_fanout_seconds` measures from).
    pub(super) releases: HashMap<String, Instant>,
}

impl Batch {
    /// Nothing in it leaves when it is durable but history: no command for a node or a gate,
    /// no operator waiting for its reply, no session come back to be sent its last command.
    pub(super) fn is_quiet(&self) -> bool {
        self.replies.is_empty()
            && self.restored.is_empty()
            && self
                .commands
                .iter()
                .all(|command| matches!(command, Command::Record(_)))
    }
}

/// An operator command's reply channel and the engine's verdict on it.
pub(super) type PendingReply = (
    oneshot::Sender<Result<RolloutSnapshot, NotApplicable>>,
    Result<(), NotApplicable>,
);
