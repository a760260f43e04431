//! The public API's response bodies, as the master sends them and every
//! client (the CLI verbs, `flotilla run`, `flotilla bench`, the tests)
//! reads them. One definition for both sides.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Attempt, Incarnation, LockMode, TaskId, TaskResult, WorkerId};

/// Where a task is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    /// Stopped by `DELETE /tasks/{id}` before it finished.
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    /// The state's name on the wire (serde's, so there is one spelling).
    pub fn name(self) -> &'static str {
        serde_variant::to_variant_name(&self).expect("a unit variant has a name")
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TaskState {
    type Err = UnknownTaskState;
    fn from_str(s: &str) -> Result<Self, UnknownTaskState> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownTaskState(s.to_string()))
    }
}

/// A name that is none of [`TaskState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task state `{0}`: expected one of {names}", names = TaskState::ALL.map(TaskState::name).join(", "))]
pub struct UnknownTaskState(pub String);

/// Where a worker is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Started (or restarted) by the runtime; not registered yet. It may be
    /// given queued work (the seed queued to a restarting node at once).
    Starting,
    Active,
    Dead,
}

impl WorkerState {
    /// The state's name on the wire (serde's, so there is one spelling).
    pub fn name(self) -> &'static str {
        serde_variant::to_variant_name(&self).expect("a unit variant has a name")
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `GET /tasks/{id}`, the completion feed and the task listing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskView {
    pub id: TaskId,
    pub state: TaskState,
    pub node: Option<WorkerId>,
    pub attempts: Attempt,
    pub result: Option<TaskResult>,
    pub error: Option<String>,
    /// Unix milliseconds.
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

/// One entry of `GET /nodes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeView {
    pub id: WorkerId,
    pub state: WorkerState,
    pub capacity: usize,
    pub incarnation: Incarnation,
    pub queued: usize,
    pub running: usize,
    pub executed: u64,
    pub restarts: u64,
    pub last_heartbeat_ms_ago: u64,
    /// The worker's process ID on the master's host: process workers only
    /// (inside a container or pod it means nothing outside).
    pub pid: Option<u32>,
    /// Where the runtime runs it, as the runtime tells it: `pid 123`,
    /// `container flotilla-worker-0 (3f2a9c...)`, `pod ns/name`.
    #[serde(default)]
    pub locator: Option<String>,
}

/// The task attempt holding (or waiting for) a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub worker: WorkerId,
    pub incarnation: Incarnation,
    pub task: TaskId,
    pub attempt: Attempt,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Holder {
    pub mode: LockMode,
    #[serde(flatten)]
    pub owner: Owner,
}

/// `GET /resources/{name}` (and each entry of `GET /resources`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResourceView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Value,
    pub version: u64,
    pub holders: Vec<Holder>,
    pub waiting: Vec<Holder>,
}

/// `POST /send` and `POST /send/{node}` (the seed's answer).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sent {
    pub message: String,
    pub task_id: TaskId,
}

/// `POST /tasks`: the IDs in the order the tasks were given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Submitted {
    pub task_ids: Vec<TaskId>,
}

/// `GET /tasks/finished?after=N`: the completion feed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FinishedPage {
    /// The position to ask from next time.
    pub next: u64,
    pub tasks: Vec<TaskView>,
}

/// `GET /tasks?state=&node=&limit=&after=`: one page of tasks in ID order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    /// Ask with `after=` this for the next page; absent on the last page.
    pub next: Option<TaskId>,
}

/// `POST /add`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Added {
    pub message: String,
    pub node_id: WorkerId,
}

/// `POST /stop/{node}`, `POST /resource` and other acknowledgements.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Message {
    pub message: String,
}

/// `POST /resource`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResourceCreated {
    pub message: String,
    pub name: String,
}

/// `GET /health`: liveness and counters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Health {
    pub status: String,
    pub cluster: String,
    pub runtime: String,
    pub nodes: usize,
    pub active_nodes: usize,
    pub master_queue: usize,
    pub tasks: usize,
    pub steals: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_state_parses_its_own_names_only() {
        for s in TaskState::ALL {
            assert_eq!(s.name().parse::<TaskState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        let err = "done".parse::<TaskState>().unwrap_err().to_string();
        assert!(err.contains("done") && err.contains("succeeded"), "{err}");
    }

    #[test]
    fn holder_flattens_its_owner() {
        let h = Holder {
            mode: LockMode::Write,
            owner: Owner {
                worker: 1,
                incarnation: 2,
                task: 3,
                attempt: 1,
            },
        };
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["worker"], 1);
        assert_eq!(v["mode"], "write");
        assert_eq!(serde_json::from_value::<Holder>(v).unwrap(), h);
    }
}

/// `DELETE /tasks/{id}`: the task is cancelled; `was` is the state it left.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Cancelled {
    pub id: TaskId,
    pub state: TaskState,
    pub was: TaskState,
}

/// A task a bulk cancel left alone, and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NotCancelled {
    pub id: TaskId,
    pub error: String,
}

/// `DELETE /tasks?state=...|ids=...`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CancelReport {
    pub cancelled: Vec<TaskId>,
    pub not_cancelled: Vec<NotCancelled>,
}
