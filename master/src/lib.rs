//! Flotilla's master: scheduling state, HTTP API, health monitor, runtimes
//! and manifest loader. `main.rs` is the CLI on top of this library.
pub mod scheduler;
