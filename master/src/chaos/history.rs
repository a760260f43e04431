//! The history of a soak, one JSON object per line: every client operation
//! (its invocation and its outcome, with times), the faults (planned and
//! injected), what the observers saw (the completion feed, the nodes, the
//! resources and their holders) and the final state. The checker reads
//! nothing else, so a history can be checked again later
//! (`flotilla chaos check FILE`).
//!
//! Times are Unix milliseconds (f64) from the wall clock of the machine the
//! driver runs on; task code reports its own lock holds with `time.time()`
//! on the same clock (workers run on that machine, containers included).

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use flotilla_proto::api::{Holder, NodeView, TaskView, WorkerState};
use flotilla_proto::{Incarnation, TaskId, WorkerId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::schedule::{Fault, FaultKind};

/// What a submitted task is meant to do, so the checker knows what its end
/// may be.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum Expect {
    /// Python that returns at once.
    Short,
    /// Python that sleeps `ms` first.
    Long { ms: u64 },
    /// A shell command that echoes its task, attempt and worker.
    Shell,
    /// Takes the write lock on each of `writes` (adding `delta` to each
    /// counter) and the read lock on each of `reads`, in name order.
    Locks {
        writes: Vec<String>,
        reads: Vec<String>,
        delta: i64,
    },
    /// Python that raises: must end failed.
    Fail,
    /// A shell command that exits 3: must end failed.
    ShellFail,
    /// Sleeps well past its `timeout`: must end failed.
    Timeout,
}

impl Expect {
    pub fn name(&self) -> &'static str {
        match self {
            Expect::Short => "short",
            Expect::Long { .. } => "long",
            Expect::Shell => "shell",
            Expect::Locks { .. } => "locks",
            Expect::Fail => "fail",
            Expect::ShellFail => "shell_fail",
            Expect::Timeout => "timeout",
        }
    }
}

/// A client operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// `POST /send` of one task.
    Send { task: Expect },
    /// `POST /send/{node}` of one task.
    SendTo { node: WorkerId, task: Expect },
    /// `POST /tasks`: a batch, all accepted or none.
    Batch { tasks: Vec<Expect> },
    /// `DELETE /tasks/{id}`.
    Cancel { id: TaskId },
    /// `POST /resource`: a counter (`{"sum": 0, "log": []}`).
    CreateCounter { name: String },
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::Send { .. } => "send",
            Call::SendTo { .. } => "send_to",
            Call::Batch { .. } => "batch",
            Call::Cancel { .. } => "cancel",
            Call::CreateCounter { .. } => "create_counter",
        }
    }

    /// The tasks it submits, in order.
    pub fn tasks(&self) -> Vec<&Expect> {
        match self {
            Call::Send { task } | Call::SendTo { task, .. } => vec![task],
            Call::Batch { tasks } => tasks.iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// How an operation ended, as far as the client can know.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The master answered yes.
    Ok,
    /// It certainly did not happen: the connection was refused, or the
    /// master answered no (4xx).
    Fail,
    /// It may or may not have happened: the connection broke, timed out,
    /// or the master answered 5xx.
    Unknown,
}

/// A worker as an observer saw it (the parts the checker reads).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeSeen {
    pub id: WorkerId,
    pub state: WorkerState,
    pub incarnation: Incarnation,
    /// `pid N` or `container NAME (ID)`.
    #[serde(default)]
    pub locator: Option<String>,
}

impl From<&NodeView> for NodeSeen {
    fn from(n: &NodeView) -> Self {
        NodeSeen {
            id: n.id,
            state: n.state,
            incarnation: n.incarnation,
            locator: n
                .locator
                .clone()
                .or_else(|| n.pid.map(|p| format!("pid {p}"))),
        }
    }
}

/// A resource as an observer saw it: its version and who held it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResourceSeen {
    pub name: String,
    pub version: u64,
    pub holders: Vec<Holder>,
}

/// One line of the history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First line: what ran.
    Meta {
        seed: u64,
        runtime: String,
        seconds: f64,
        cluster: String,
        workers: usize,
        heartbeat_timeout_ms: u64,
        t: f64,
    },
    /// The whole planned schedule (a soak runs a prefix of it).
    Schedule { faults: Vec<Fault> },
    /// A client operation starts.
    Invoke {
        op: u64,
        t: f64,
        #[serde(flatten)]
        call: Call,
    },
    /// It ended: `ids` are the task IDs a submission got.
    Complete {
        op: u64,
        t: f64,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<TaskId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The master's answer (a cancel's `{"state", "was"}`).
        #[serde(default, skip_serializing_if = "Value::is_null")]
        answer: Value,
    },
    /// A planned fault is injected.
    Fault {
        index: usize,
        kind: FaultKind,
        t: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<WorkerId>,
        /// What was done (PIDs, containers, the master's answer).
        detail: String,
        /// `/add`: the ID the new worker got.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        added: Option<WorkerId>,
    },
    /// A pause or disconnect is lifted.
    Heal {
        index: usize,
        t: f64,
        detail: String,
    },
    /// The cluster is whole again after fault `index` (every worker active,
    /// the struck one in a new incarnation or back from its pause); absent
    /// when it did not recover in time.
    Recovered { index: usize, t: f64, after_ms: f64 },
    /// An entry of the completion feed.
    Feed { t: f64, task: TaskView },
    /// `GET /nodes`, asked at `t0`, answered at `t1`.
    Nodes {
        t0: f64,
        t1: f64,
        nodes: Vec<NodeSeen>,
    },
    /// `GET /resources`, asked at `t0`, answered at `t1`.
    Resources {
        t0: f64,
        t1: f64,
        resources: Vec<ResourceSeen>,
    },
    /// The end: every task the master holds, the resources (values and
    /// versions) and the nodes, after the workload stopped and the faults
    /// were healed.
    Final {
        t: f64,
        tasks: Vec<TaskView>,
        resources: Vec<FinalResource>,
        nodes: Vec<NodeSeen>,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FinalResource {
    pub name: String,
    pub version: u64,
    pub value: Value,
}

/// Appends events to a history file, one line each, flushed per line (a
/// soak that is killed leaves every line it wrote).
pub struct Recorder {
    out: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Recorder> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create the history file {}", path.display()))?;
        Ok(Recorder {
            out: std::sync::Mutex::new(std::io::BufWriter::new(file)),
        })
    }

    pub fn record(&self, event: &Event) {
        let line = serde_json::to_string(event).expect("events are JSON");
        let mut out = self.out.lock().expect("history writer");
        // A history that cannot be written is not worth a soak: fail loudly.
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .expect("cannot write the history");
    }
}

/// Reads a history file; names the line of anything it cannot read.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the history {}", path.display()))?;
    let mut events = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).with_context(|| {
            format!("{}: line {} is not a history event", path.display(), n + 1)
        })?;
        events.push(event);
    }
    Ok(events)
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
