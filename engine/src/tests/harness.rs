//! What every engine test uses: the script, the spec, a driver that feeds events at the current
//! time ([`H`]), and pickers over the commands.

// The test files import everything they need from here.
pub(super) use std::time::Duration;

pub(super) use hotroll_script::{BarrierSpec, NodeCount, OnFailure, RolloutPolicy};

pub(super) use crate::rollout::Mode;
pub(super) use crate::{
    Command, Event, Millis, NodeState, NodeView, NotApplicable, Outcome, Record, Rollout,
    RolloutSpec, RolloutState, StepPhase,
};

pub(super) const EPOCH: u64 = 7;
pub(super) const SEC: Millis = 1_000;
/// Deadline of the ordinary steps and the policy's step timeout.
pub(super) const STEP: Millis = 10 * SEC;
pub(super) const SLACK: Millis = 2 * SEC;
pub(super) const GRACE: Millis = 10 * SEC;
pub(super) const BARRIER: Millis = 30 * SEC;
/// Between reports a node has the slack plus the step timeout.
pub(super) const IDLE: Millis = SLACK + STEP;
/// Make-permanent / abort confirmations: slack + the largest step deadline (a barrier's).
pub(super) const CONFIRM: Millis = SLACK + BARRIER;
/// Rollback confirmations: slack + the sum of the step deadlines.
pub(super) const ROLLBACK: Millis = SLACK + 4 * STEP + 2 * BARRIER;

pub(super) fn pre() -> BarrierSpec {
    BarrierSpec {
        id: "pre".into(),
        step: 1,
        before_ponr: true,
        timeout: Duration::from_millis(BARRIER),
        members: vec![],
    }
}

pub(super) fn post() -> BarrierSpec {
    BarrierSpec {
        id: "post".into(),
        step: 4,
        before_ponr: false,
        timeout: Duration::from_millis(BARRIER),
        members: vec![],
    }
}

pub(super) fn policy(
    on_failure: OnFailure,
    canary: u32,
    max_in_flight: u32,
    max_failures: u32,
) -> RolloutPolicy {
    RolloutPolicy {
        canary: NodeCount::nodes(canary),
        max_in_flight: NodeCount::nodes(max_in_flight),
        max_failures,
        on_failure,
        barrier_timeout: Duration::from_millis(BARRIER),
        step_timeout: Duration::from_millis(STEP),
        ..RolloutPolicy::default()
    }
}

/// Everything at once, no canary, `rollback_node` with no budget.
pub(super) fn one_wave() -> RolloutPolicy {
    policy(OnFailure::RollbackNode, 0, 0, 0)
}

pub(super) fn spec(
    nodes: &[&str],
    policy: RolloutPolicy,
    barriers: Vec<BarrierSpec>,
) -> RolloutSpec {
    let d = Duration::from_millis;
    RolloutSpec {
        id: "r1".into(),
        app: "primes".into(),
        from: "1.0".into(),
        to: "1.1".into(),
        targets: nodes.iter().map(|n| n.to_string()).collect(),
        policy,
        barriers,
        steps_total: 6,
        first_commit_step: 3,
        step_deadlines: vec![d(STEP), d(BARRIER), d(STEP), d(STEP), d(BARRIER), d(STEP)],
        session_grace: d(GRACE),
        step_slack: d(SLACK),
        left_out: Vec::new(),
        labels: Default::default(),
        dry_run: false,
    }
}

/// Drives one rollout: every helper feeds an event at the current time and returns the
/// commands; `log` keeps all of them.
pub(super) struct H {
    pub(super) r: Rollout,
    pub(super) now: Millis,
    pub(super) log: Vec<Command>,
}

impl H {
    pub(super) fn new(spec: RolloutSpec) -> Self {
        Self {
            r: Rollout::new(spec, EPOCH, 0),
            now: 0,
            log: Vec::new(),
        }
    }

    /// Started, with every node past Start.
    pub(super) fn started(spec: RolloutSpec) -> Self {
        let mut h = Self::new(spec);
        h.ev(Event::Start);
        h
    }

    pub(super) fn at(&mut self, now: Millis) -> &mut Self {
        assert!(now >= self.now, "time goes forward");
        self.now = now;
        self
    }

    pub(super) fn ev(&mut self, event: Event) -> Vec<Command> {
        let out = self
            .r
            .handle(self.now, event.clone())
            .unwrap_or_else(|e| panic!("{event:?} should apply: {e}"));
        self.log.extend(out.clone());
        out
    }

    pub(super) fn op(&mut self, event: Event) -> Result<Vec<Command>, NotApplicable> {
        let out = self.r.handle(self.now, event)?;
        self.log.extend(out.clone());
        Ok(out)
    }

    pub(super) fn tick(&mut self, now: Millis) -> Vec<Command> {
        self.at(now);
        self.ev(Event::Tick)
    }

    pub(super) fn started_step(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepStarted {
            node: node.into(),
            epoch: EPOCH,
            step,
        })
    }

    pub(super) fn step_ok(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepSucceeded {
            node: node.into(),
            epoch: EPOCH,
            step,
            duration_ms: Some(7),
            warning: None,
        })
    }

    pub(super) fn step_failed(&mut self, node: &str, step: u32) -> Vec<Command> {
        self.ev(Event::StepFailed {
            node: node.into(),
            epoch: EPOCH,
            step,
            error: "boom".into(),
            duration_ms: Some(9),
        })
    }

    pub(super) fn arrive(&mut self, node: &str, barrier: &str) -> Vec<Command> {
        self.ev(Event::BarrierArrived {
            node: node.into(),
            epoch: EPOCH,
            barrier: barrier.into(),
        })
    }

    pub(super) fn prepared(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::Prepared {
            node: node.into(),
            epoch: EPOCH,
        })
    }

    pub(super) fn outcome(&mut self, node: &str, outcome: Outcome) -> Vec<Command> {
        self.ev(Event::Outcome {
            node: node.into(),
            epoch: EPOCH,
            outcome,
            error: None,
        })
    }

    /// The nodes told to abort confirm it.
    pub(super) fn confirm_aborted(&mut self, nodes: &[&str]) {
        for node in nodes {
            self.outcome(node, Outcome::Aborted);
        }
    }

    pub(super) fn lost(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::SessionLost { node: node.into() })
    }

    pub(super) fn restored(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::SessionRestored { node: node.into() })
    }

    /// Run the prepare part (step 0, then the point of no return).
    pub(super) fn prepare(&mut self, node: &str) -> Vec<Command> {
        self.ev(Event::ScriptAccepted {
            node: node.into(),
            epoch: EPOCH,
        });
        self.started_step(node, 0);
        self.step_ok(node, 0);
        self.prepared(node)
    }

    /// Prepare every node; returns the commands of the last one (where wave 1 starts).
    pub(super) fn prepare_all(&mut self) -> Vec<Command> {
        let names: Vec<String> = self.r.nodes().iter().map(|n| n.name.clone()).collect();
        let mut last = Vec::new();
        for n in names {
            last = self.prepare(&n);
        }
        last
    }

    /// Run the commit part (step 3) and report Committed.
    pub(super) fn commit(&mut self, node: &str) -> Vec<Command> {
        self.started_step(node, 3);
        self.step_ok(node, 3);
        self.outcome(node, Outcome::Committed)
    }

    pub(super) fn node(&self, node: &str) -> &NodeView {
        self.r
            .nodes()
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    pub(super) fn state_of(&self, node: &str) -> NodeState {
        self.node(node).state
    }

    pub(super) fn states(&self) -> Vec<NodeState> {
        self.r.nodes().iter().map(|n| n.state).collect()
    }
}

pub(super) fn to(cmds: &[Command], pick: impl Fn(&Command) -> Option<&String>) -> Vec<String> {
    cmds.iter().filter_map(pick).cloned().collect()
}

pub(super) fn run_scripts(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::RunScript { node } => Some(node),
        _ => None,
    })
}

pub(super) fn commits(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Commit { node } => Some(node),
        _ => None,
    })
}

pub(super) fn aborts(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Abort { node, .. } => Some(node),
        _ => None,
    })
}

pub(super) fn rollbacks(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::Rollback { node, .. } => Some(node),
        _ => None,
    })
}

pub(super) fn permanents(cmds: &[Command]) -> Vec<String> {
    to(cmds, |c| match c {
        Command::MakePermanent { node } => Some(node),
        _ => None,
    })
}

pub(super) fn releases(cmds: &[Command]) -> Vec<(String, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ReleaseBarrier { node, ok, .. } => Some((node.clone(), *ok)),
            _ => None,
        })
        .collect()
}

pub(super) fn records(cmds: &[Command]) -> Vec<&Record> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

pub(super) fn rollout_states(cmds: &[Command]) -> Vec<RolloutState> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::RolloutState { state, .. } => Some(*state),
            _ => None,
        })
        .collect()
}

pub(super) fn rollout_reasons(cmds: &[Command]) -> Vec<String> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::RolloutState {
                reason: Some(reason),
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn waves_started(cmds: &[Command]) -> Vec<(u32, Vec<String>)> {
    records(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Record::WaveStarted { wave, nodes } => Some((*wave, nodes.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn no_node_commands(cmds: &[Command]) -> bool {
    cmds.iter().all(|c| matches!(c, Command::Record(_)))
}

pub(super) fn s(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

pub(super) use NodeState as N;
pub(super) use RolloutState as R;
