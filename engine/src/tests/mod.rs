//! Engine tests: one scenario per transition, driven through the public API, asserting on the
//! commands and the states; then a property test over random event sequences.
//!
//! The script every test uses (indexes of `up`):
//! 0 load_object_code · 1 sync_nodes "pre" · 2 point_of_no_return ·
//! 3 load · 4 sync_nodes "post" · 5 health.
//! Nodes that a test does not need at a barrier simply skip reporting it.
//!
//! The files follow the engine's concerns; `harness` holds the shared spec, driver and pickers.

mod barriers;
mod crash_safety;
mod deadlines;
mod failure;
mod gates;
mod harness;
mod operator;
mod progress;
mod random;
mod sessions;
mod stale_input;
mod state_names;
