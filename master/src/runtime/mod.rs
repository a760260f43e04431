//! Runtimes: how a worker is started, killed and inspected. One small
//! interface (after Nomad's task drivers) and one module per way of running
//! workers: `process` (child processes, the default), `docker` (containers
//! through the engine's API) and `kubernetes` (pods). The scheduler never
//! knows which one it drives.

pub mod docker;
pub mod process;
// Worker pods through the Kubernetes API server.
pub mod kubernetes;

use async_trait::async_trait;
use flotilla_proto::{Incarnation, WorkerId};

/// Everything a runtime needs to start one incarnation of a worker.
#[derive(Clone, Debug)]
pub struct WorkerLaunch {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
    pub capacity: usize,
    /// How many tasks the worker runs at once (1 by default).
    pub slots: u32,
    /// Where the worker reaches the master.
    pub master_url: String,
    /// The per-cluster secret the worker authenticates with.
    pub secret: String,
    /// Settings the worker takes from its master's environment (trace
    /// export endpoint, log level and format): see [`inherited_env`].
    pub inherited_env: Vec<(String, String)>,
}

/// The variables a worker inherits from its master wherever it runs, so
/// that its logs and traces follow the master's settings.
pub const INHERITED_ENV: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "RUST_LOG",
    "FLOTILLA_LOG_FORMAT",
];

/// The master's values of [`INHERITED_ENV`] that are set.
pub fn inherited_env() -> Vec<(String, String)> {
    INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Something the runtime noticed by itself, without the heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The worker's process or container ended.
    Exited {
        worker_id: WorkerId,
        incarnation: Incarnation,
        detail: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start worker {worker}: {reason}")]
    Start { worker: WorkerId, reason: String },
    #[error("cannot kill worker {worker}: {reason}")]
    Kill { worker: WorkerId, reason: String },
}

/// What `inspect` reports about a running worker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkerHandle {
    pub incarnation: Incarnation,
    /// A process ID, a container ID...
    pub locator: String,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Starts one incarnation. Any previous incarnation of the same worker
    /// must already be gone (the caller kills it first).
    async fn start(&self, launch: WorkerLaunch) -> Result<(), RuntimeError>;
    /// Kills the worker's current incarnation at once (SIGKILL or the like).
    /// Killing a worker that is not running is not an error.
    async fn kill(&self, worker: WorkerId) -> Result<(), RuntimeError>;
    async fn inspect(&self, worker: WorkerId) -> Option<WorkerHandle>;
    /// Kills every worker this runtime started (master shutdown).
    async fn shutdown(&self);
}
