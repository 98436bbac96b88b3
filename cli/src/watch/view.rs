//! The live view's state, built client-side by folding a rollout's event stream over the
//! totals of one `GetRollout` (app, versions, nodes and their waves, instruction count).
//!
//! Pure: no I/O, no clock (times come with the events and with the `now` the renderer is
//! given), so it is tested by feeding it events.

use hotroll_proto::v1 as pb;

/// One node's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub name: String,
    /// 1-based wave the node commits in.
    pub wave: u32,
    pub state: pb::NodeState,
    /// Index in `up` of the current or last instruction.
    pub step: Option<u32>,
    pub instruction: String,
    pub phase: pb::StepPhase,
    /// When the current instruction started (coordinator time).
    pub step_started_ms: Option<u64>,
    /// Instructions of `up` the node finished.
    pub steps_done: u32,
    pub error: Option<String>,
}

impl NodeRow {
    /// The node will not move again in this rollout (before make-permanent).
    pub fn is_settled(&self) -> bool {
        matches!(
            self.state,
            pb::NodeState::Committed
                | pb::NodeState::Aborted
                | pb::NodeState::RolledBack
                | pb::NodeState::Failed
                | pb::NodeState::Permanent
        )
    }

    /// Running an instruction right now.
    pub fn is_busy(&self) -> bool {
        !self.is_settled() && self.phase == pb::StepPhase::Started && self.step.is_some()
    }
}

/// A barrier some node waits at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierRow {
    pub id: String,
    pub arrived: u32,
    pub expected: u32,
}

/// Everything the live view shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub id: String,
    pub app: String,
    pub from: String,
    pub to: String,
    pub state: pb::RolloutState,
    pub created_ms: u64,
    /// Time of the event that made the rollout final.
    pub finished_ms: Option<u64>,
    /// Failures counted against the budget. The stream does not carry the engine's count, so
    /// this comes from `GetRollout` ([`View::refresh`]).
    pub failures: u32,
    pub max_failures: u32,
    /// 1-based wave being committed; 0 while preparing.
    pub wave: u32,
    pub waves: u32,
    pub steps_total: u32,
    /// Barriers with arrivals and no release yet, the latest arrival last.
    pub barriers: Vec<BarrierRow>,
    pub nodes: Vec<NodeRow>,
    /// Why the rollout ended the way it did (the final state's reason).
    pub error: Option<String>,
    /// The last operator command or rollout-wide decision, while it matters (a pending pause,
    /// "rolling back every node: ...").
    pub operator: Option<String>,
    /// The last note about the stream itself (reconnecting...), until the next event.
    pub notice: Option<String>,
    /// Why the rollout holds on the coordinator's store, while it does.
    pub held: Option<String>,
    /// Seq of the last event folded in.
    pub last_seq: u64,
}

fn state_of(value: i32) -> pb::RolloutState {
    pb::RolloutState::try_from(value).unwrap_or(pb::RolloutState::Unspecified)
}

fn node_state_of(value: i32) -> pb::NodeState {
    pb::NodeState::try_from(value).unwrap_or(pb::NodeState::Unspecified)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// `"2/3 arrived"` (how `barrier_arrived` events spell the count) as `(2, 3)`.
pub fn parse_arrivals(message: &str) -> Option<(u32, u32)> {
    let count = message.split_whitespace().next()?;
    let (arrived, expected) = count.split_once('/')?;
    Some((arrived.parse().ok()?, expected.parse().ok()?))
}

pub fn is_final_state(state: pb::RolloutState) -> bool {
    matches!(
        state,
        pb::RolloutState::Succeeded
            | pb::RolloutState::Aborted
            | pb::RolloutState::RolledBack
            | pb::RolloutState::PartiallyRolledBack
            | pb::RolloutState::Halted
            | pb::RolloutState::Failed
    )
}

impl View {
    /// The view before the first event: the totals of `status`, every node pending.
    pub fn new(status: &pb::RolloutStatus) -> Self {
        let steps_total = status.nodes.first().map_or(0, |n| n.steps_total);
        Self {
            id: status.id.clone(),
            app: status.app.clone(),
            from: status.from.clone(),
            to: status.to.clone(),
            state: pb::RolloutState::Pending,
            created_ms: status.created_unix_ms,
            finished_ms: None,
            failures: status.failures,
            max_failures: status.max_failures,
            wave: 0,
            waves: status.waves,
            steps_total,
            barriers: Vec::new(),
            nodes: status
                .nodes
                .iter()
                .map(|n| NodeRow {
                    name: n.name.clone(),
                    wave: n.wave,
                    state: pb::NodeState::Pending,
                    step: None,
                    instruction: String::new(),
                    phase: pb::StepPhase::Unspecified,
                    step_started_ms: None,
                    steps_done: 0,
                    error: None,
                })
                .collect(),
            error: None,
            operator: None,
            notice: None,
            held: non_empty(&status.held_on_store),
            last_seq: 0,
        }
    }

    pub fn is_final(&self) -> bool {
        is_final_state(self.state)
    }

    /// Take what the event stream does not carry from a fresh `GetRollout`.
    pub fn refresh(&mut self, status: &pb::RolloutStatus) {
        self.failures = status.failures;
        self.max_failures = status.max_failures;
        self.waves = status.waves;
        if self.error.is_none() {
            self.error = non_empty(&status.error);
        }
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut NodeRow> {
        if name.is_empty() {
            return None;
        }
        if let Some(i) = self.nodes.iter().position(|n| n.name == name) {
            return self.nodes.get_mut(i);
        }
        // A node the initial status did not list (it should not happen): show it anyway.
        self.nodes.push(NodeRow {
            name: name.to_string(),
            wave: 0,
            state: pb::NodeState::Pending,
            step: None,
            instruction: String::new(),
            phase: pb::StepPhase::Unspecified,
            step_started_ms: None,
            steps_done: 0,
            error: None,
        });
        self.nodes.last_mut()
    }

    /// Fold one event in. Events at or before [`View::last_seq`] are ignored (replays).
    pub fn apply(&mut self, event: &pb::RolloutEvent) {
        if event.seq != 0 && event.seq <= self.last_seq {
            return;
        }
        self.last_seq = self.last_seq.max(event.seq);
        self.notice = None;
        let error = non_empty(&event.error);
        match event.kind.as_str() {
            "rollout_state" => {
                self.state = state_of(event.rollout_state);
                if self.state == pb::RolloutState::Paused
                    || self.state == pb::RolloutState::Committing
                {
                    // A pending pause took effect, or a resume/promote let it go.
                    self.operator = None;
                }
                if !event.message.is_empty() {
                    self.operator = Some(event.message.clone());
                }
                if is_final_state(self.state) {
                    self.finished_ms = Some(event.at_unix_ms);
                    self.barriers.clear();
                    self.operator = None;
                    if self.state != pb::RolloutState::Succeeded {
                        self.error = non_empty(&event.message).or(error);
                    }
                }
            }
            "node_state" => {
                if let Some(node) = self.node_mut(&event.node) {
                    node.state = node_state_of(event.node_state);
                    if error.is_some() {
                        node.error = error;
                    }
                    if node.is_settled() {
                        node.step_started_ms = None;
                    }
                }
            }
            "step" => {
                let phase =
                    pb::StepPhase::try_from(event.step_phase).unwrap_or(pb::StepPhase::Unspecified);
                if let Some(node) = self.node_mut(&event.node) {
                    let step = u32::try_from(event.step).ok();
                    node.step = step;
                    node.instruction = event.instruction.clone();
                    node.phase = phase;
                    match phase {
                        pb::StepPhase::Started => node.step_started_ms = Some(event.at_unix_ms),
                        pb::StepPhase::Succeeded => {
                            node.step_started_ms = None;
                            if let Some(step) = step {
                                node.steps_done = node.steps_done.max(step + 1);
                            }
                        }
                        pb::StepPhase::Failed | pb::StepPhase::Unspecified => {
                            node.step_started_ms = None;
                            if error.is_some() {
                                node.error = error;
                            }
                        }
                    }
                }
            }
            "barrier_arrived" => {
                let (arrived, expected) = parse_arrivals(&event.message).unwrap_or((0, 0));
                self.barriers.retain(|b| b.id != event.barrier_id);
                self.barriers.push(BarrierRow {
                    id: event.barrier_id.clone(),
                    arrived,
                    expected,
                });
            }
            "barrier_released" | "barrier_failed" => {
                self.barriers.retain(|b| b.id != event.barrier_id);
            }
            "wave_started" => self.wave = event.wave,
            "operator" => {
                self.operator = non_empty(&event.message);
            }
            // A fleet gate is a rollout-wide decision in the making: shown where those are.
            "gate" => {
                let value = non_empty(&event.gate_value)
                    .map(|v| format!(" (value {v})"))
                    .unwrap_or_default();
                self.operator = Some(match event.gate_phase.as_str() {
                    "started" => format!(
                        "gate {} holding after wave {}: {}",
                        event.gate_name, event.wave, event.message
                    ),
                    "failed" => format!(
                        "gate {} FAILED after wave {}{value}: {}",
                        event.gate_name, event.wave, event.message
                    ),
                    phase => format!(
                        "gate {} {phase} after wave {}{value}",
                        event.gate_name, event.wave
                    ),
                });
            }
            "held_on_store" => self.held = error.or_else(|| non_empty(&event.message)),
            "store_recovered" => self.held = None,
            _ => {}
        }
    }

    /// `(done, total)` instructions over every node; a settled node counts as done.
    pub fn progress(&self) -> (u64, u64) {
        let per_node = u64::from(self.steps_total.max(1));
        let total = per_node * self.nodes.len() as u64;
        if self.is_final() {
            return (total, total);
        }
        let done = self
            .nodes
            .iter()
            .map(|n| {
                if n.is_settled() {
                    per_node
                } else {
                    u64::from(n.steps_done).min(per_node)
                }
            })
            .sum();
        (done, total)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const T0: u64 = 1_700_000_000_000;

    pub(crate) fn status(nodes: &[(&str, u32)], steps: u32) -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            state: pb::RolloutState::Committing as i32,
            app: "demo".into(),
            from: "1.0.0".into(),
            to: "2.0.0".into(),
            failures: 0,
            max_failures: 1,
            nodes: nodes
                .iter()
                .map(|(name, wave)| pb::NodeStatus {
                    name: (*name).into(),
                    wave: *wave,
                    steps_total: steps,
                    ..Default::default()
                })
                .collect(),
            created_unix_ms: T0,
            waves: nodes.iter().map(|(_, w)| *w).max().unwrap_or(0),
            ..Default::default()
        }
    }

    /// Builds events with increasing seq, `ms` after [`T0`].
    #[derive(Default)]
    pub(crate) struct Script {
        pub events: Vec<pb::RolloutEvent>,
    }

    impl Script {
        fn push(&mut self, ms: u64, mut event: pb::RolloutEvent) -> &mut Self {
            event.rollout_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into();
            event.seq = self.events.len() as u64 + 1;
            event.at_unix_ms = T0 + ms;
            if event.kind != "step" {
                event.step = -1;
            }
            self.events.push(event);
            self
        }

        pub fn rollout(&mut self, ms: u64, state: pb::RolloutState, message: &str) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "rollout_state".into(),
                    rollout_state: state as i32,
                    message: message.into(),
                    ..Default::default()
                },
            )
        }

        pub fn node(
            &mut self,
            ms: u64,
            node: &str,
            state: pb::NodeState,
            error: &str,
        ) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "node_state".into(),
                    node: node.into(),
                    node_state: state as i32,
                    error: error.into(),
                    ..Default::default()
                },
            )
        }

        #[allow(clippy::too_many_arguments)]
        pub fn step(
            &mut self,
            ms: u64,
            node: &str,
            step: i32,
            instruction: &str,
            phase: pb::StepPhase,
            duration_ms: u64,
            error: &str,
        ) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "step".into(),
                    node: node.into(),
                    step,
                    instruction: instruction.into(),
                    step_phase: phase as i32,
                    duration_ms,
                    error: error.into(),
                    ..Default::default()
                },
            )
        }

        pub fn arrive(&mut self, ms: u64, node: &str, barrier: &str, m: u32, n: u32) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "barrier_arrived".into(),
                    node: node.into(),
                    barrier_id: barrier.into(),
                    message: format!("{m}/{n} arrived"),
                    ..Default::default()
                },
            )
        }

        pub fn released(&mut self, ms: u64, barrier: &str, wave: u32) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "barrier_released".into(),
                    barrier_id: barrier.into(),
                    wave,
                    ..Default::default()
                },
            )
        }

        pub fn wave(&mut self, ms: u64, wave: u32, nodes: &str) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "wave_started".into(),
                    wave,
                    message: nodes.into(),
                    ..Default::default()
                },
            )
        }

        pub fn operator(&mut self, ms: u64, message: &str) -> &mut Self {
            self.push(
                ms,
                pb::RolloutEvent {
                    kind: "operator".into(),
                    message: message.into(),
                    ..Default::default()
                },
            )
        }
    }

    /// A 3-node rollout (canary 1, then 2): check, sync_nodes `staged`, point_of_no_return,
    /// apply; node-3's apply fails and it rolls back.
    pub(crate) fn three_node_rollout() -> Script {
        use pb::NodeState as N;
        use pb::RolloutState as R;
        use pb::StepPhase as P;
        let mut s = Script::default();
        s.rollout(0, R::Preparing, "");
        for n in ["node-1", "node-2", "node-3"] {
            s.node(0, n, N::Preparing, "");
        }
        for (i, n) in ["node-1", "node-2", "node-3"].iter().enumerate() {
            let t = 10 * i as u64;
            s.step(5 + t, n, 0, "check", P::Started, 0, "");
            s.step(20 + t, n, 0, "check", P::Succeeded, 15, "");
            s.step(21 + t, n, 1, "sync_nodes", P::Started, 0, "");
            s.arrive(22 + t, n, "staged", i as u32 + 1, 3);
        }
        s.released(60, "staged", 0);
        for n in ["node-1", "node-2", "node-3"] {
            s.step(62, n, 1, "sync_nodes", P::Succeeded, 40, "");
            s.step(63, n, 2, "point_of_no_return", P::Started, 0, "");
            s.node(64, n, N::Prepared, "");
        }
        s.wave(70, 1, "node-1");
        s.rollout(70, R::Committing, "");
        s.node(70, "node-1", N::Committing, "");
        s.step(75, "node-1", 2, "point_of_no_return", P::Succeeded, 12, "");
        s.step(76, "node-1", 3, "apply", P::Started, 0, "");
        s.step(1_276, "node-1", 3, "apply", P::Succeeded, 1_200, "");
        s.node(1_280, "node-1", N::Committed, "");
        s.wave(1_300, 2, "node-2,node-3");
        for n in ["node-2", "node-3"] {
            s.node(1_300, n, N::Committing, "");
            s.step(1_305, n, 2, "point_of_no_return", P::Succeeded, 1_240, "");
            s.step(1_306, n, 3, "apply", P::Started, 0, "");
        }
        s.step(1_400, "node-2", 3, "apply", P::Succeeded, 94, "");
        s.node(1_401, "node-2", N::Committed, "");
        s.step(
            1_500,
            "node-3",
            3,
            "apply",
            P::Failed,
            194,
            "hook `apply` exited 1",
        );
        s.node(1_501, "node-3", N::RollingBack, "hook `apply` exited 1");
        s.node(2_000, "node-3", N::RolledBack, "");
        s.rollout(2_100, R::PartiallyRolledBack, "1 node rolled back");
        s
    }

    #[test]
    fn folding_a_rollout_tracks_every_node() {
        let script = three_node_rollout();
        let mut view = View::new(&status(&[("node-1", 1), ("node-2", 2), ("node-3", 2)], 4));
        assert_eq!(view.progress(), (0, 12));

        // Up to the moment every node waits at the barrier.
        for event in &script.events[..16] {
            view.apply(event);
        }
        assert_eq!(view.state, pb::RolloutState::Preparing);
        assert_eq!(
            view.barriers,
            vec![BarrierRow {
                id: "staged".into(),
                arrived: 3,
                expected: 3
            }]
        );
        let node = &view.nodes[2];
        assert_eq!(node.step, Some(1));
        assert_eq!(node.instruction, "sync_nodes");
        assert!(node.is_busy());
        assert_eq!(node.step_started_ms, Some(T0 + 41));
        assert_eq!(view.progress(), (3, 12));

        // Up to wave 2 in flight.
        let in_wave_2 = script
            .events
            .iter()
            .position(|e| e.kind == "wave_started" && e.wave == 2)
            .unwrap();
        for event in &script.events[16..=in_wave_2] {
            view.apply(event);
        }
        assert_eq!(view.wave, 2);
        assert!(view.barriers.is_empty());
        assert_eq!(view.nodes[0].state, pb::NodeState::Committed);
        assert_eq!(view.nodes[1].state, pb::NodeState::Prepared);
        assert_eq!(view.progress(), (4 + 2 + 2, 12));

        for event in &script.events {
            view.apply(event); // replays are ignored
        }
        assert!(view.is_final());
        assert_eq!(view.state, pb::RolloutState::PartiallyRolledBack);
        assert_eq!(view.finished_ms, Some(T0 + 2_100));
        assert_eq!(view.error.as_deref(), Some("1 node rolled back"));
        let node3 = &view.nodes[2];
        assert_eq!(node3.state, pb::NodeState::RolledBack);
        assert_eq!(node3.error.as_deref(), Some("hook `apply` exited 1"));
        assert_eq!(node3.instruction, "apply");
        assert_eq!(view.progress(), (12, 12));
        assert_eq!(view.last_seq, script.events.len() as u64);
    }

    #[test]
    fn a_pending_pause_shows_until_it_takes_effect() {
        let mut view = View::new(&status(&[("a", 1), ("b", 2)], 2));
        let mut s = Script::default();
        s.rollout(0, pb::RolloutState::Committing, "")
            .operator(5, "pause: takes effect before the next wave starts");
        for e in &s.events {
            view.apply(e);
        }
        assert_eq!(
            view.operator.as_deref(),
            Some("pause: takes effect before the next wave starts")
        );
        let mut more = Script {
            events: s.events.clone(),
        };
        more.rollout(9, pb::RolloutState::Paused, "");
        view.apply(more.events.last().unwrap());
        assert_eq!(view.state, pb::RolloutState::Paused);
        assert_eq!(view.operator, None);
    }

    #[test]
    fn arrival_counts_parse() {
        assert_eq!(parse_arrivals("2/3 arrived"), Some((2, 3)));
        assert_eq!(parse_arrivals("garbage"), None);
        assert_eq!(parse_arrivals(""), None);
    }

    #[test]
    fn arrival_counts_match_what_the_coordinator_writes() {
        use hotroll_coordinator::engine::Record;
        use hotroll_coordinator::store::StoredEvent;
        let event = hotroll_coordinator::convert::rollout_event(
            "r",
            &StoredEvent {
                seq: 1,
                at_ms: 0,
                record: Record::BarrierArrived {
                    node: "n".into(),
                    barrier: "b".into(),
                    arrived: 4,
                    expected: 7,
                },
            },
            &|_| String::new(),
        );
        assert_eq!(parse_arrivals(&event.message), Some((4, 7)));
    }
}
