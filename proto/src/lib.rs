//! Wire types shared by the Flotilla master, its workers and its clients.
//!
//! Everything that crosses a process boundary as JSON is defined here once, so
//! the master and the worker cannot drift apart. The worker protocol is pull
//! based: a worker long-polls `POST /internal/poll` once per execution slot,
//! carrying the report of the task it just finished, and the master answers
//! with the next assignment for that slot (or `204 No Content` when the poll
//! times out with nothing to do).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task's identity, kept across every attempt.
pub type TaskId = u64;
/// A worker's identity, kept across restarts (the seed's node ID).
pub type WorkerId = u32;
/// One start of a worker: the master bumps it on every (re)start so that a
/// message from an older process of the same worker ID can be told apart.
pub type Incarnation = u64;
/// One hand-off of a task to a worker; a result counts only for the current one.
pub type Attempt = u32;

/// Internal (worker to master) routes.
pub mod routes {
    pub const REGISTER: &str = "/internal/register";
    pub const HEARTBEAT: &str = "/internal/heartbeat";
    pub const POLL: &str = "/internal/poll";
    pub const LOCK: &str = "/internal/lock";
    /// Long-poll, one per worker: the master answers with the attempts the
    /// worker must stop (cancelled tasks).
    pub const CONTROL: &str = "/internal/control";
}

/// Size limits of what a task sends back. A worker keeps a task's output and
/// result within them, so that its report always fits the master's body
/// limit for worker calls ([`limits::REPORT_BODY`]).
pub mod limits {
    /// Captured stdout (and stderr, for shell tasks) kept per task, and the
    /// length a Python traceback is cut to: 1 MiB each by default.
    pub const DEFAULT_OUTPUT: u64 = 1 << 20;
    /// The largest result (`response`, JSON-encoded): 8 MiB by default.
    pub const DEFAULT_RESULT: u64 = 8 << 20;
    /// The most a worker puts in one report. A report that would be larger
    /// (configured limits too high, output full of characters JSON escapes
    /// six-fold) is replaced by a failure naming its size.
    pub const REPORT: u64 = 48 << 20;
    /// The master's body limit on worker routes: a report plus the poll
    /// around it.
    pub const REPORT_BODY: usize = (REPORT as usize) + (1 << 20);
    /// The largest poll body whose report a worker keeps and sends again
    /// with the next poll (bytes); larger ones are confirmed durable before
    /// the poll is answered. Well within `REPORT_BODY - REPORT`, so a poll
    /// carrying a kept report beside a full one still fits.
    pub const KEPT_REPORT: usize = 64 << 10;
    /// Worker environment variables overriding the output and result limits
    /// (bytes; the result limit is capped below [`REPORT`]).
    pub const OUTPUT_ENV: &str = "FLOTILLA_MAX_OUTPUT_BYTES";
    pub const RESULT_ENV: &str = "FLOTILLA_MAX_RESULT_BYTES";
}

/// Environment variables through which a runtime tells a worker who it is.
pub mod env {
    pub const MASTER_URL: &str = "FLOTILLA_MASTER_URL";
    pub const WORKER_ID: &str = "FLOTILLA_WORKER_ID";
    pub const INCARNATION: &str = "FLOTILLA_INCARNATION";
    pub const WORKER_SECRET: &str = "FLOTILLA_WORKER_SECRET";
    pub const SLOTS: &str = "FLOTILLA_SLOTS";
    pub const PYTHON: &str = "FLOTILLA_PYTHON";
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Python,
    Shell,
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskKind::Python => "python",
            TaskKind::Shell => "shell",
        })
    }
}

/// What a user submits: the seed's `{"type": "python" | "shell", "command": "..."}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    #[serde(rename = "type")]
    pub kind: TaskKind,
    pub command: String,
    /// Seconds the task may run (each attempt) before it is stopped and
    /// fails with "timed out after N s"; unset: the cluster's
    /// `spec.taskTimeoutSeconds`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

/// The longest `timeout` a task may ask for: one week.
pub const MAX_TASK_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

impl TaskSpec {
    pub fn new(kind: TaskKind, command: impl Into<String>) -> Self {
        TaskSpec {
            kind,
            command: command.into(),
            timeout: None,
        }
    }

    /// Refuses a `timeout` that is not a number of seconds in
    /// (0, [`MAX_TASK_TIMEOUT_S`]].
    pub fn check(&self) -> Result<(), TaskSpecError> {
        match self.timeout {
            Some(t) if !(t.is_finite() && t > 0.0 && t <= MAX_TASK_TIMEOUT_S) => {
                Err(TaskSpecError::Timeout(t))
            }
            _ => Ok(()),
        }
    }
}

/// What is wrong with a [`TaskSpec`] that deserialised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskSpecError {
    #[error("timeout must be a number of seconds above 0 and at most {MAX_TASK_TIMEOUT_S} (one week), got {0}")]
    Timeout(f64),
}

/// What a finished task produced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TaskResult {
    /// Python: the `response` variable (JSON value, or its `repr` when it is
    /// not JSON-serialisable; the string `No result returned.` when unset; the
    /// traceback on an exception). Shell: stdout.
    pub response: Value,
    /// Captured `print` output (Python) or stdout (shell).
    pub stdout: String,
    /// Shell only: the exit code of `sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Shell only: captured stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

/// How one attempt of a task ended, as reported by the worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// The code ran to the end (Python without exception, shell with exit 0).
    Succeeded { result: TaskResult },
    /// The code ran and failed on its own terms (a Python exception, a
    /// non-zero shell exit). Deterministic: not retried.
    Failed { result: TaskResult, error: String },
    /// The code killed the thing running it (the interpreter exited or was
    /// killed). The master retries the task on another worker.
    Crashed {
        error: String,
        #[serde(default)]
        stdout: String,
    },
}

/// `POST /internal/register`: a freshly started worker process says hello.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Register {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
    pub slots: u32,
    pub pid: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RegisterReply {
    pub heartbeat_interval_ms: u64,
    pub capacity: usize,
    /// `spec.masterGraceSeconds` in ms: how long the worker goes on without
    /// reaching a master (running its tasks, retrying) before it stops by
    /// itself. Absent: 60 s.
    #[serde(default)]
    pub master_grace_ms: Option<u64>,
    /// The master keeps its state in a durable store and takes reports the
    /// worker keeps (see [`Poll::keeps`]): a slot need not wait for its
    /// report's sync before it runs its next task. Absent: false.
    #[serde(default)]
    pub keep_reports: bool,
}

/// `POST /internal/heartbeat`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
}

/// A task attempt's report, carried by the next poll of the same slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskReport {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub outcome: Outcome,
}

/// `POST /internal/poll`: "slot `slot` is free (here is what it just did)".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Poll {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
    pub slot: u32,
    #[serde(default)]
    pub report: Option<TaskReport>,
    /// The worker keeps `report` and sends it again as `kept` with the
    /// slot's next poll, until an answer says it is durable: so this poll's
    /// answer need not wait until the store has it. (Only small reports are
    /// kept: [`limits::KEPT_REPORT`].)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keeps: bool,
    /// The report the slot's previous poll carried with `keeps`, sent again:
    /// any answer to this poll means it is durable (the worker then forgets
    /// it). A master that has it already ignores it; a master started since
    /// (which may lack it) records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<TaskReport>,
}

/// The master's answer to a poll: one task attempt to run now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Assignment {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub spec: TaskSpec,
    /// A secret naming this attempt, for its lock calls.
    pub lease: String,
    /// Seconds the attempt may run before the worker stops it (the task's
    /// `timeout`, else the cluster's `taskTimeoutSeconds`); none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// W3C trace context of the master's attempt span; travels in the
    /// `traceparent` header of the poll's answer, not in the body.
    #[serde(skip)]
    pub traceparent: Option<String>,
}

/// `POST /internal/control`: a worker waits for instructions about the
/// attempts it runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ControlPoll {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
}

/// One attempt a worker must stop at once (its slot's interpreter or shell
/// process group is killed, the slot starts fresh). Its report is not
/// wanted: the master has already decided the task's fate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StopAttempt {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub reason: String,
}

/// The master's answer to a control poll.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Control {
    #[serde(default)]
    pub stop: Vec<StopAttempt>,
}

/// Error body used by every endpoint: `{"error": "..."}` (the seed's shape).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_spec_is_the_seed_shape() {
        let spec: TaskSpec =
            serde_json::from_str(r#"{"type":"python","command":"response = 1"}"#).unwrap();
        assert_eq!(spec.kind, TaskKind::Python);
        let err = serde_json::from_str::<TaskSpec>(r#"{"type":"python","comand":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("comand"), "{err}");
        let err = serde_json::from_str::<TaskSpec>(r#"{"type":"ruby","command":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ruby"), "{err}");
    }

    #[test]
    fn outcome_round_trips_with_a_status_tag() {
        let o = Outcome::Crashed {
            error: "interpreter exited".into(),
            stdout: "bye".into(),
        };
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["status"], "crashed");
        assert_eq!(serde_json::from_value::<Outcome>(v).unwrap(), o);
    }
}

/// Lock modes on a shared resource.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Read,
    Write,
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockMode::Read => "read",
            LockMode::Write => "write",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LockAction {
    Acquire,
    Release,
}

/// `POST /internal/lock`: a task attempt takes or gives back a lock. It is
/// authenticated by the attempt's `lease` (handed out with the assignment),
/// so task code can act only as itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    pub lease: String,
    pub action: LockAction,
    pub name: String,
    pub mode: LockMode,
    /// Write release: the new value to publish (absent: release without writing).
    #[serde(default)]
    pub value: Option<Value>,
    /// Write release: the fencing token of the grant being released.
    #[serde(default)]
    pub token: Option<u64>,
    /// Acquire: give up after this many seconds.
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// The same call again, after the first got no answer (the master went
    /// away): if the first was carried out, the master answers as it did
    /// then (the grant held, the release done) instead of refusing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resend: bool,
}

/// The answer to an acquire: the value as of the grant, and for writes the
/// fencing token that the release must carry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LockGrant {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub mode: LockMode,
    pub value: Value,
    /// The resource's version at grant time; for a write grant, the fencing
    /// token (every write grant gets a larger one).
    pub token: u64,
}

/// The answer to a release.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LockReleased {
    pub name: String,
    /// The resource's version after the release.
    pub version: u64,
    /// Whether a new value was published.
    pub committed: bool,
}

pub mod api;
pub mod reap;
pub mod runner;
pub mod secret;
pub mod telemetry;
