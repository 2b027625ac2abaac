//! Deterministic simulation of p2p-handler nodes on turmoil.
//!
//! * [`scenario`]: the scenario file format (TOML), parsed strictly.
//! * [`run`]: runs one scenario under one seed, checks the built-in invariants and the
//!   scenario's expectations, and records a [`trace::Trace`].
//! * [`transport`]: the handler's transport trait over turmoil's TCP.
//! * [`coverage`]: what a run exercised (transitions, messages, reasons, steps).
//! * [`explore`]: guided exploration: runs derived from those that reached new items.
//! * [`membership`]: signed membership documents a scenario makes, and their invariants.
//! * [`swarm`]: random fault schedules drawn from the seed (`[swarm]`).
//! * [`shrink`]: a failing run written down and reduced to the smallest scenario that
//!   fails the same way.
//! * [`report`]: sweep results as JSON lines, and the report merged from any set of them.
//!
//! The `p2p-sim` binary runs directories of scenarios, sweeps seeds, and writes traces.

pub mod coverage;
pub mod explore;
pub mod membership;
pub mod records;
pub mod report;
pub mod run;
pub mod scenario;
pub mod shrink;
pub mod swarm;
pub mod trace;
pub mod transport;
