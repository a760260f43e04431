//! `flotilla chaos`: a soak that proves the master's promises the way
//! Jepsen does. A real cluster runs a mixed workload driven through the
//! public API while faults from a seeded schedule strike it (worker kills,
//! pauses, network cuts, interpreter kills, `/add`, `/stop`, master kills
//! and restarts on the same state); every client operation and observation
//! goes to a history, and a checker reads the history for anomalies.
//!
//! - `schedule`: the faults, a pure function of the seed;
//! - `workload`: the tasks, which report which attempt ran them and what
//!   locks they held;
//! - `history`: the JSON-lines record;
//! - `check`: the anomalies, by kind, and the summary;
//! - `driver`: the soak itself.

pub mod check;
mod driver;
pub mod history;
pub mod schedule;
pub mod workload;

pub use driver::{run, ChaosOptions};
