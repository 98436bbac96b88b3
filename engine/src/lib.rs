//! The rollout engine: a pure state machine `(state, event) -> (state, commands)` implementing
//! docs/design.md §4. It does no I/O and reads no clock: the caller passes `now` with every event, sends
//! the returned commands, appends the returned records to the store, and calls
//! [`Rollout::handle`] with [`Event::Tick`] at [`Rollout::next_deadline`].
//!
//! Being its own crate is what keeps it that way: it depends on no runtime, RPC, wire or
//! storage crate, and its `clippy.toml` forbids clocks, sleeps, files, sockets and processes.
//!
//! * `spec`, `event`, `command`, `view`, `state`: what goes in, what comes out, what status
//!   shows, and the state names (everything re-exported at the crate root).
//! * `rollout`: the [`Rollout`] itself. The transitions, and the choices the design leaves open
//!   (barrier deadline counted from the first arrival, what a lost or silent node becomes, which
//!   final state a mix of outcomes gives), are documented there, split by concern: operator
//!   commands, node reports, sessions, barriers (keying in `rollout/barriers/instance.rs`),
//!   deadlines, failure policy, progress through the waves, tallies.

mod command;
mod event;
mod rollout;
mod spec;
mod state;
#[cfg(test)]
mod tests;
mod view;

pub use command::{Command, GatePhase, Record, StepPhase};
pub use event::{Event, Outcome};
pub use rollout::{NotApplicable, Rollout};
pub use spec::{LeftOut, RolloutSpec, TargetLabels};
pub use state::{NodeState, RolloutState, UnknownState};
pub use view::{BarrierView, NodeView, NodeViews};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;
