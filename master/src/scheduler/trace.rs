//! A task's trace: one root span from submission to its final result, with
//! one child span per phase (queued, assigned, attempt) and events for
//! steals, retries and the end. The spans use the trace-only target, so with
//! tracing export off they are disabled at their call sites and cost
//! nothing; with it on, the attempt span's `traceparent` goes to the worker,
//! whose spans then join the same trace.
//!
//! Sampling is decided once per task, on its root span (the tracer's
//! sampler: parent-based ratio, `spec.telemetry.sampleRatio`). An unsampled
//! task keeps no span at all: no phase spans, no events, no `traceparent`
//! for its worker, so it costs neither side more than that one decision.

use flotilla_proto::telemetry::{sampled, traceparent, TRACE_TARGET};
use flotilla_proto::{Attempt, Incarnation, TaskId, TaskKind, WorkerId};
use tracing::{field, info_span, Level, Span};

use super::TaskState;

/// Both spans are none when the task is not traced (export off, or not
/// sampled); every method then does nothing.
pub struct TaskTrace {
    root: Span,
    phase: Span,
}

impl TaskTrace {
    pub fn new(id: TaskId, kind: TaskKind) -> Self {
        let root = info_span!(target: TRACE_TARGET, "task", task.id = id, task.kind = %kind,
            task.state = field::Empty, task.attempts = field::Empty, worker.id = field::Empty);
        if !sampled(&root) {
            return TaskTrace {
                root: Span::none(),
                phase: Span::none(),
            };
        }
        let phase = info_span!(target: TRACE_TARGET, parent: &root, "queued", task.id = id);
        TaskTrace { root, phase }
    }

    /// Whether this task's trace is recorded (a child of a none root would
    /// start a trace of its own: never made).
    fn off(&self) -> bool {
        self.root.is_none()
    }

    pub fn queued(&mut self, id: TaskId) {
        if self.off() {
            return;
        }
        self.phase = info_span!(target: TRACE_TARGET, parent: &self.root, "queued", task.id = id);
    }

    pub fn assigned(&mut self, id: TaskId, worker: WorkerId, stolen_from: Option<WorkerId>) {
        if self.off() {
            return;
        }
        if let Some(victim) = stolen_from {
            tracing::event!(target: TRACE_TARGET, parent: &self.phase, Level::INFO, { task.id = id, thief = worker, victim }, "stolen");
        }
        self.phase = info_span!(target: TRACE_TARGET, parent: &self.root, "assigned", task.id = id,
            worker.id = worker, stolen_from = stolen_from.map(|v| v as i64).unwrap_or(-1));
    }

    /// The attempt is handed to a worker: returns the `traceparent` to send along.
    pub fn dispatched(
        &mut self,
        id: TaskId,
        attempt: Attempt,
        worker: WorkerId,
        incarnation: Incarnation,
    ) -> Option<String> {
        if self.off() {
            return None;
        }
        self.phase = info_span!(target: TRACE_TARGET, parent: &self.root, "attempt", task.id = id,
            task.attempt = attempt, worker.id = worker, worker.incarnation = incarnation);
        traceparent(&self.phase)
    }

    pub fn retried(&mut self, id: TaskId, reason: &str) {
        if self.off() {
            return;
        }
        tracing::event!(target: TRACE_TARGET, parent: &self.root, Level::INFO, { task.id = id, reason }, "retried");
        self.queued(id);
    }

    pub fn finished(&mut self, state: TaskState, attempts: Attempt, worker: Option<WorkerId>) {
        if self.off() {
            return;
        }
        let state = state.name();
        self.root.record("task.state", state);
        self.root.record("task.attempts", attempts);
        if let Some(w) = worker {
            self.root.record("worker.id", w);
        }
        tracing::event!(target: TRACE_TARGET, parent: &self.root, Level::INFO, { state }, "finished");
        // Ending the spans exports them.
        self.phase = Span::none();
        self.root = Span::none();
    }
}
