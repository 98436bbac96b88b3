//! The rollout state machine. Placeholder: the real transitions land with the engine.

use super::{
    BarrierView, Command, Event, Millis, NodeState, NodeView, NotApplicable, RolloutSpec,
    RolloutState,
};

#[derive(Debug, Clone)]
pub struct Rollout {
    spec: RolloutSpec,
    epoch: u64,
    state: RolloutState,
    nodes: Vec<NodeView>,
    failures: u32,
    error: Option<String>,
}

impl Rollout {
    /// A new rollout in state `pending`; feed it [`Event::Start`] to begin.
    pub fn new(spec: RolloutSpec, epoch: u64, _now: Millis) -> Self {
        let nodes = spec
            .targets
            .iter()
            .map(|name| NodeView {
                name: name.clone(),
                wave: 1,
                state: NodeState::Pending,
                step: None,
                step_started: None,
                error: None,
                connected: true,
            })
            .collect();
        Self {
            spec,
            epoch,
            state: RolloutState::Pending,
            nodes,
            failures: 0,
            error: None,
        }
    }

    /// Apply one event. Operator events that do not apply in the current state return
    /// [`NotApplicable`] and change nothing; every other event always applies (stale or unknown
    /// input is ignored).
    pub fn handle(&mut self, _now: Millis, _event: Event) -> Result<Vec<Command>, NotApplicable> {
        Ok(Vec::new())
    }

    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn state(&self) -> RolloutState {
        self.state
    }

    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// 1-based wave being committed; 0 during prepare.
    pub fn current_wave(&self) -> u32 {
        0
    }

    pub fn waves(&self) -> u32 {
        0
    }

    /// The barrier currently being waited at, if any.
    pub fn barrier(&self) -> Option<BarrierView> {
        None
    }

    /// The earliest time at which [`Event::Tick`] may change something.
    pub fn next_deadline(&self) -> Option<Millis> {
        None
    }

    /// Why the rollout failed, aborted or rolled back, when it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}
