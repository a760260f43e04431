//! A task and its transitions. Each rule of a task's life is written once,
//! here: the scheduler decides *when* (which queue, which worker) and calls
//! these methods; they keep the state, the node, the attempt count, the
//! timestamps and the trace consistent.
//!
//! ```text
//! queued --assign--> assigned --start--> running --finish--> succeeded | failed
//!   ^                  |   ^                |
//!   |                  |   +----unhand------+   (the hand-off never arrived)
//!   +-----requeue------+--------------------+   (its worker died; a crash retried)
//! ```

use std::time::Instant;

use flotilla_proto::{Attempt, Incarnation, TaskId, TaskResult, TaskSpec, WorkerId};
use tokio::sync::oneshot;

use super::trace::TaskTrace;
use super::{unix_ms, TaskState, TaskView};

pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub node: Option<WorkerId>,
    pub attempts: Attempt,
    pub result: Option<TaskResult>,
    pub error: Option<String>,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Workers on which an attempt died with its interpreter or worker: the
    /// retry goes elsewhere when anywhere else exists.
    pub(super) crashed_on: Vec<WorkerId>,
    crash_errors: Vec<String>,
    /// Fired when the task reaches a final state (`GET /tasks/{id}?wait=`).
    waiters: Vec<oneshot::Sender<()>>,
    trace: TaskTrace,
    /// Monotonic times for the latency histograms.
    submitted_instant: Instant,
    started_instant: Option<Instant>,
    /// This master's attempts, oldest first (the dashboard's task detail).
    pub attempt_log: Vec<AttemptLog>,
    /// The trace ID of the task's trace, when traces are exported.
    pub trace_id: Option<String>,
}

/// One attempt as the task detail shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AttemptLog {
    pub attempt: Attempt,
    pub worker: WorkerId,
    pub incarnation: Incarnation,
    pub slot: u32,
    /// Unix milliseconds.
    pub started_at: u64,
    pub ended_at: Option<u64>,
    /// How it ended (`succeeded`, `failed`, `crashed`, `cancelled`, `lost`).
    pub outcome: Option<super::activity::BarOutcome>,
}

/// What [`Task::crashed`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum CrashVerdict {
    /// Run it again (it is queued, not yet placed).
    Retry,
    /// It has used up its attempts: fail it with this reason.
    GiveUp(String),
}

impl Task {
    pub fn new(id: TaskId, spec: TaskSpec) -> Task {
        let trace = TaskTrace::new(id, spec.kind);
        Task {
            id,
            spec,
            state: TaskState::Queued,
            node: None,
            attempts: 0,
            result: None,
            error: None,
            submitted_at: unix_ms(),
            started_at: None,
            finished_at: None,
            crashed_on: Vec::new(),
            crash_errors: Vec::new(),
            waiters: Vec::new(),
            trace,
            submitted_instant: Instant::now(),
            started_instant: None,
            attempt_log: Vec::new(),
            trace_id: None,
        }
    }

    /// A task as the durable store kept it, in `state` (queued again, or
    /// final with its result).
    pub fn restored(rec: &crate::store::TaskRecord, state: TaskState) -> Task {
        let mut task = Task::new(rec.id, rec.spec.clone());
        task.state = state;
        task.attempts = rec.attempts;
        task.result = rec.result.clone();
        task.error = rec.error.clone();
        task.submitted_at = rec.submitted_at;
        task.started_at = rec.started_at;
        task.finished_at = rec.finished_at;
        task
    }

    /// A task whose attempt was running on an adopted worker when the
    /// previous master stopped: it runs on, as that attempt.
    pub fn resume(&mut self, worker: WorkerId, attempt: Attempt) {
        self.state = TaskState::Running;
        self.node = Some(worker);
        self.attempts = attempt;
        self.started_instant = Some(Instant::now());
    }

    /// Placed in `worker`'s queue (by round-robin, `/send/{node}`, or a
    /// steal from `stolen_from`).
    pub fn assign(&mut self, worker: WorkerId, stolen_from: Option<WorkerId>) {
        self.state = TaskState::Assigned;
        self.node = Some(worker);
        self.trace.assigned(self.id, worker, stolen_from);
    }

    /// Handed to `slot` of `worker` as a new attempt. Returns the attempt,
    /// the `traceparent` to send along, and, on the first attempt, how long
    /// the task waited since submission (seconds).
    pub fn start(
        &mut self,
        worker: WorkerId,
        incarnation: Incarnation,
        slot: u32,
    ) -> (Attempt, Option<String>, Option<f64>) {
        self.attempts += 1;
        self.state = TaskState::Running;
        let started_at = unix_ms();
        self.started_at = Some(started_at);
        self.attempt_log.push(AttemptLog {
            attempt: self.attempts,
            worker,
            incarnation,
            slot,
            started_at,
            ended_at: None,
            outcome: None,
        });
        let now = Instant::now();
        let first_wait =
            (self.attempts == 1).then(|| now.duration_since(self.submitted_instant).as_secs_f64());
        self.started_instant = Some(now);
        let traceparent = self
            .trace
            .dispatched(self.id, self.attempts, worker, incarnation);
        if self.trace_id.is_none() {
            // `00-<trace id>-<span id>-<flags>`
            self.trace_id = traceparent
                .as_deref()
                .and_then(|tp| tp.split('-').nth(1))
                .map(str::to_string);
        }
        (self.attempts, traceparent, first_wait)
    }

    /// The current attempt ended `outcome`: its log entry is closed. Returns
    /// when it started (Unix ms).
    pub fn attempt_ended(&mut self, outcome: super::activity::BarOutcome) -> u64 {
        let now = unix_ms();
        match self.attempt_log.last_mut() {
            Some(a) if a.ended_at.is_none() => {
                a.ended_at = Some(now);
                a.outcome = Some(outcome);
                a.started_at
            }
            _ => self.started_at.unwrap_or(now),
        }
    }

    /// The hand-off never reached the worker (its poll went away): back to
    /// `worker`'s queue as if never handed, the attempt not counted.
    pub fn unhand(&mut self, worker: WorkerId) {
        self.attempts -= 1;
        self.attempt_log.pop();
        self.assign(worker, None);
    }

    /// Back to the master queue (its worker died, or a crash is retried).
    pub fn requeue(&mut self) {
        if self.state != TaskState::Queued {
            self.trace.queued(self.id);
        }
        self.state = TaskState::Queued;
        self.node = None;
    }

    /// An attempt died with its interpreter or worker (`on`: the worker to
    /// avoid next time, when the task is suspected). Retried while attempts
    /// remain, up to `max_attempts`.
    pub fn crashed(
        &mut self,
        on: Option<WorkerId>,
        error: String,
        max_attempts: Attempt,
    ) -> CrashVerdict {
        self.crashed_on.extend(on);
        self.crash_errors.push(error);
        if self.attempts >= max_attempts {
            return CrashVerdict::GiveUp(format!(
                "gave up after {} attempts, each of which killed its interpreter or worker: {}",
                self.attempts,
                self.crash_errors.join("; ")
            ));
        }
        let reason = self.crash_errors.last().cloned().unwrap_or_default();
        self.trace.retried(self.id, &reason);
        self.state = TaskState::Queued;
        CrashVerdict::Retry
    }

    /// The final state, once. Wakes whoever waits for it; returns how long
    /// the last attempt ran (seconds), if one started.
    pub fn finish(
        &mut self,
        state: TaskState,
        result: Option<TaskResult>,
        error: Option<String>,
    ) -> Option<f64> {
        debug_assert!(state.is_final() && !self.state.is_final());
        self.state = state;
        self.result = result;
        self.error = error;
        self.finished_at = Some(unix_ms());
        self.trace.finished(state, self.attempts, self.node);
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
        self.started_instant
            .map(|started| started.elapsed().as_secs_f64())
    }

    /// Why the last crashed attempt died, if one did.
    pub fn crash_reason(&self) -> Option<String> {
        self.crash_errors.last().cloned()
    }

    /// Registers `tx` to fire when the task is final; false (nothing
    /// registered) when it already is.
    pub fn wait_final(&mut self, tx: oneshot::Sender<()>) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.waiters.retain(|w| !w.is_closed());
        self.waiters.push(tx);
        true
    }

    pub fn view(&self) -> TaskView {
        TaskView {
            id: self.id,
            state: self.state,
            node: self.node,
            attempts: self.attempts,
            result: self.result.clone(),
            error: self.error.clone(),
            submitted_at: self.submitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }
}
