//! The scheduling state: the master queue, one bounded queue per worker,
//! worker and task states. One owner (the [`crate::cluster::Cluster`] holds it
//! under one mutex with short critical sections); every change goes through a
//! named transition here, and the decisions are the pure functions of
//! [`policy`]. Nothing in this module knows how workers are run.
//!
//! Identity rules (ARCHITECTURE.md, "Identity"): a worker keeps its ID across restarts
//! and gets a new *incarnation* on each start; a message from an older
//! incarnation is refused. A task keeps its ID and gets a new *attempt* each
//! time it is handed to a worker; a report counts only for the current attempt
//! of a task running on that very worker. That is how every task ends with
//! exactly one final result.

pub mod activity;
pub mod policy;
mod task;
mod trace;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_proto::{
    Assignment, Attempt, Incarnation, Outcome, StopAttempt, TaskId, TaskReport, TaskResult,
    TaskSpec, WorkerId,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use policy::WorkerView;
pub use task::{AttemptLog, CrashVerdict, Task};

use activity::{Activity, BarOutcome, EventKind};

use crate::resources::locks::{LockError, LockTable, Owner, RequestId};
use crate::store::{AttemptRecord, Op, Recovered, WorkerRecord};
use flotilla_proto::{LockGrant, LockMode};

pub use flotilla_proto::api::{NodeView, TaskState, TaskView, WorkerState};

/// A long-poll held open by a worker slot, waiting for its next task.
struct PollWaiter {
    poll_id: u64,
    tx: oneshot::Sender<Assignment>,
}

pub struct Worker {
    pub id: WorkerId,
    pub capacity: usize,
    pub incarnation: Incarnation,
    pub state: WorkerState,
    /// Assigned tasks not yet handed over, in order.
    waiting: VecDeque<TaskId>,
    /// Slot -> the attempt it is running.
    running: BTreeMap<u32, (TaskId, Attempt)>,
    idle: BTreeMap<u32, PollWaiter>,
    pub executed: u64,
    pub restarts: u64,
    pub last_heartbeat: Instant,
    /// The worker's process ID on the master's host (process runtime only:
    /// inside a container or pod it means nothing outside).
    pub pid: Option<u32>,
    /// What the runtime runs it in, as the runtime tells it: `pid 123`,
    /// `container flotilla-worker-0 (3f2a...)`, `pod ns/name`.
    pub locator: Option<String>,
    /// How many slots (tasks at once) it registered with; polls name one
    /// of 0..slots.
    pub slots: u32,
    /// What names this incarnation for good in its runtime (PID and start
    /// time, container ID, pod UID), kept in the store so that the next
    /// master can adopt it.
    pub handle: Option<String>,
    /// Taken over from the previous master and not registered again yet:
    /// it is warm already, so it has one heartbeat timeout to register,
    /// not the start-up grace (see [`Worker::allowed_silence`]).
    adopted: bool,
}

/// A worker incarnation the previous master started that this master's
/// runtime found running and took over: it keeps its ID, incarnation and
/// restart count, and the attempts it was running run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedWorker {
    pub id: WorkerId,
    pub incarnation: Incarnation,
    pub locator: String,
    pub handle: Option<String>,
}

impl Worker {
    fn held(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// How long the master waits for it before declaring it dead: the
    /// heartbeat timeout once registered; while starting (warming its
    /// interpreters, then registering), [`STARTUP_GRACE`]. A hundred
    /// workers started at once on two cores take longer than a heartbeat
    /// timeout to warm, and declaring them dead there restarts them all
    /// again, a storm that never settles. A start that fails is seen by
    /// the runtime (the process or container exits) without this wait. An
    /// adopted worker is warm: it only has to register again, within the
    /// heartbeat timeout, or it is declared dead and started afresh.
    fn allowed_silence(&self, timeout: Duration) -> Duration {
        if self.state == WorkerState::Starting && !self.adopted {
            timeout.max(STARTUP_GRACE)
        } else {
            timeout
        }
    }

    fn alive(&self) -> bool {
        self.state != WorkerState::Dead
    }
}

/// How long a starting worker may take to register (see
/// `Worker::allowed_silence`).
pub const STARTUP_GRACE: Duration = Duration::from_secs(60);

/// Why a worker message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node {0} does not exist")]
    UnknownWorker(WorkerId),
    #[error("node {worker} incarnation {got} is no longer current: the master declared it dead or started a newer one (its current incarnation: {current})")]
    Stale {
        worker: WorkerId,
        got: Incarnation,
        current: Incarnation,
    },
    #[error("node {0} must register before polling")]
    NotRegistered(WorkerId),
    #[error("node {worker} has no slot {slot}: its slots are 0..{slots}")]
    BadSlot {
        worker: WorkerId,
        slot: u32,
        slots: u32,
    },
    #[error("node {worker} asks for {asked} slots; it may have 1 to {most}")]
    BadSlots {
        worker: WorkerId,
        asked: u32,
        most: u32,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("node {0} does not exist")]
    UnknownWorker(WorkerId),
    #[error("node {0}'s queue is full")]
    Full(WorkerId),
}

/// Who waits for a condition rather than for one task, lock or poll: each
/// is a oneshot fired (and dropped) by the transition that makes the
/// condition true, so the waiter then looks again.
#[derive(Default)]
struct Waiters {
    /// A task reached a final state (the completion feed).
    completed: Vec<oneshot::Sender<()>>,
    /// A worker queue shrank (`/send/{node}` waiting for room).
    room: Vec<oneshot::Sender<()>>,
    /// A worker registered.
    registered: Vec<oneshot::Sender<()>>,
    /// A worker's control poll: fired when it has attempts to stop.
    control: HashMap<WorkerId, oneshot::Sender<()>>,
}

fn fire(waiters: &mut Vec<oneshot::Sender<()>>) {
    for tx in waiters.drain(..) {
        let _ = tx.send(());
    }
}

pub struct Scheduler {
    max_attempts: Attempt,
    tasks: HashMap<TaskId, Task>,
    next_task: TaskId,
    master_queue: VecDeque<TaskId>,
    workers: Vec<Worker>,
    cursor: usize,
    next_poll: u64,
    /// The completion feed's entries still in memory: the IDs of the tasks
    /// at positions `feed_base..`, in the order they finished. Every one is
    /// in `tasks`; those before `feed_base` were retired (see
    /// [`Scheduler::retire`]) and are read from the store, if kept.
    completions: VecDeque<TaskId>,
    feed_base: u64,
    waiters: Waiters,
    /// Shared resources and their locks: revoked in the same critical
    /// section as a death, released when an attempt ends.
    pub locks: LockTable,
    /// Live attempts' leases (the secret their lock calls carry).
    leases: HashMap<String, Owner>,
    lease_of: HashMap<(TaskId, Attempt), String>,
    /// What happened since the owner last looked, for its metrics.
    tallies: Vec<Tally>,
    steals: u64,
    /// The first ID this master (or the first one on its state directory)
    /// handed out: IDs from here to `next_task` not in `tasks` have
    /// finished and left memory.
    first_task: TaskId,
    /// Accepted tasks not final yet.
    open_tasks: usize,
    /// `spec.taskTimeoutSeconds`: the timeout of tasks that give none.
    task_timeout: Option<f64>,
    /// Attempts each worker must stop (cancelled while running), until its
    /// control poll takes them.
    stops: HashMap<WorkerId, Vec<StopAttempt>>,
    /// The changes the durable store must keep, in order (`None`: the
    /// state is ephemeral). The owner drains it after every transition.
    journal: Option<Vec<Op>>,
    /// The key attempt leases are derived from (see [`Scheduler::lease`]).
    lease_key: ring::hmac::Key,
    /// The master's incarnation (see [`Scheduler::set_epoch`]); 0 without
    /// a store.
    epoch: u64,
    /// What happened lately (the dashboard's stream and event log).
    pub activity: Activity,
    /// Tasks that finished under this master, by final state (succeeded,
    /// failed, cancelled), so the counts by state cost no walk over the
    /// tasks (finished tasks do not stay in memory to be counted).
    finished_counts: [usize; 3],
}

/// The index of a final state in `finished_counts`.
fn final_index(state: TaskState) -> Option<usize> {
    match state {
        TaskState::Succeeded => Some(0),
        TaskState::Failed => Some(1),
        TaskState::Cancelled => Some(2),
        _ => None,
    }
}

/// Appends a store operation when the state is durable; the operation is
/// not even built otherwise.
macro_rules! journal {
    ($self:ident, $op:expr) => {
        if let Some(j) = $self.journal.as_mut() {
            j.push($op);
        }
    };
}

/// Where a page of the task listing goes on from: after its last task when
/// it is full, else after the last ID looked at when more were handed out,
/// else nowhere (`end` and `more` as [`Scheduler::list_tasks`] returns them).
pub fn listing_next<T>(
    page: &[T],
    id: impl Fn(&T) -> TaskId,
    limit: usize,
    end: TaskId,
    more: bool,
) -> Option<TaskId> {
    if page.len() >= limit {
        page.last().map(id)
    } else {
        more.then(|| end - 1)
    }
}

/// When finished tasks leave memory: see [`Scheduler::retire`].
#[derive(Clone, Debug)]
pub struct Retire {
    /// Finished tasks kept in memory at most.
    pub keep: usize,
    /// Tasks that finished before this (Unix ms) leave.
    pub finished_before: u64,
    /// Only tasks at feed positions below this leave (committed ones).
    pub durable_below: u64,
    /// At most this many per call.
    pub budget: usize,
}

/// Something a transition did that the metrics count. The scheduler only
/// notes it; its owner records it (see `crate::metrics`), so the scheduler
/// knows nothing of metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tally {
    Submitted,
    /// A first attempt started, this long after submission (seconds).
    Started {
        waited: f64,
    },
    /// A task finished; its last attempt ran this long (seconds).
    Finished {
        ran: f64,
    },
    /// A crashed attempt is retried.
    Retried,
    Stolen,
}

/// Why a cancel was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("task {0} does not exist")]
    Unknown(TaskId),
    #[error("task {0} has already finished ({1}); only a queued, assigned or running task can be cancelled")]
    Finished(TaskId, TaskState),
    #[error(
        "task {0} has already finished; only a queued, assigned or running task can be cancelled"
    )]
    LeftMemory(TaskId),
}

/// Why a lock call was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockCallError {
    #[error("this task attempt's lease is not live: the attempt has ended or its worker was declared dead")]
    StaleLease,
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("timed out after {}s waiting for the {mode} lock on `{name}`", after.as_secs_f64())]
    TimedOut {
        name: String,
        mode: LockMode,
        after: Duration,
    },
    #[error("the {mode} lock request on `{name}` was dropped: this task attempt is no longer live (its worker was declared dead)")]
    Dropped { name: String, mode: LockMode },
}

/// The lease of one attempt: an HMAC of (task, attempt, worker,
/// incarnation) under the lease key. Task code gets only its own (the key
/// never leaves the master), and no other attempt's can be computed from it.
fn derive_lease(
    key: &ring::hmac::Key,
    task: TaskId,
    attempt: Attempt,
    worker: WorkerId,
    incarnation: Incarnation,
    epoch: u64,
) -> String {
    // The master's incarnation (`epoch`) is part of it: an attempt a master
    // started but never synced (it died first) may still run on an adopted
    // worker, and the next master, which does not know it, may hand out
    // the same attempt number to the same worker; their leases differ, so
    // the unknown attempt can take no lock. 0: started by a master whose
    // store did not keep the epoch.
    let material = match epoch {
        0 => format!("{task}/{attempt}/{worker}/{incarnation}"),
        e => format!("{task}/{attempt}/{worker}/{incarnation}/{e}"),
    };
    let tag = ring::hmac::sign(key, material.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key for leases nobody else can derive.
fn random_lease_key() -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>())
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Scheduler {
    pub fn new(max_attempts: Attempt) -> Self {
        Scheduler {
            max_attempts: max_attempts.max(1),
            tasks: HashMap::new(),
            next_task: 1,
            master_queue: VecDeque::new(),
            workers: Vec::new(),
            cursor: 0,
            next_poll: 0,
            completions: VecDeque::new(),
            feed_base: 0,
            waiters: Waiters::default(),
            locks: LockTable::default(),
            leases: HashMap::new(),
            lease_of: HashMap::new(),
            tallies: Vec::new(),
            steals: 0,
            first_task: 1,
            open_tasks: 0,
            journal: None,
            task_timeout: None,
            stops: HashMap::new(),
            lease_key: random_lease_key(),
            epoch: 0,
            activity: Activity::default(),
            finished_counts: [0; 3],
        }
    }

    /// Leases are derived from `secret` (the cluster's worker secret, kept
    /// in the store), so a master that adopts a running attempt knows the
    /// lease its task code already holds, without the store keeping any
    /// lease.
    /// This master's incarnation on its state directory, part of every
    /// lease it derives for an attempt it starts (see `derive_lease`).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    pub fn set_lease_secret(&mut self, secret: &str) {
        let mut material = b"flotilla lease key/".to_vec();
        material.extend_from_slice(secret.as_bytes());
        self.lease_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &material);
    }

    /// The tallies noted since the last call, oldest first.
    pub fn drain_tallies(&mut self) -> std::vec::Drain<'_, Tally> {
        self.tallies.drain(..)
    }

    /// A worker queue shrank: whoever waits for room looks again.
    fn room_freed(&mut self) {
        fire(&mut self.waiters.room);
    }

    /// Fires `tx` when some worker queue shrinks (`/send/{node}` on a full
    /// queue waits for this, then tries again).
    pub fn wait_for_room(&mut self, tx: oneshot::Sender<()>) {
        self.waiters.room.retain(|w| !w.is_closed());
        self.waiters.room.push(tx);
    }

    /// Fires `tx` at the next completion.
    pub fn wait_for_completion(&mut self, tx: oneshot::Sender<()>) {
        self.waiters.completed.retain(|w| !w.is_closed());
        self.waiters.completed.push(tx);
    }

    /// Fires `tx` at the next registration.
    pub fn wait_for_registration(&mut self, tx: oneshot::Sender<()>) {
        self.waiters.registered.retain(|w| !w.is_closed());
        self.waiters.registered.push(tx);
    }

    /// Drops the waiters whose receivers went away (a waiter that timed out).
    pub fn forget_abandoned_waiters(&mut self) {
        for list in [
            &mut self.waiters.completed,
            &mut self.waiters.room,
            &mut self.waiters.registered,
        ] {
            list.retain(|w| !w.is_closed());
        }
        self.waiters.control.retain(|_, w| !w.is_closed());
    }

    /// `spec.taskTimeoutSeconds`: applies to tasks submitted without a
    /// `timeout` (each attempt's run is bounded by it).
    pub fn set_task_timeout(&mut self, seconds: Option<f64>) {
        self.task_timeout = seconds;
    }

    /// From now on every transition is journaled for the durable store.
    pub fn keep_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
        self.locks.keep_grant_log();
    }

    /// The store operations of the transitions since the last call.
    pub fn take_journal(&mut self) -> Vec<Op> {
        let changed = self.locks.take_changed();
        let Some(j) = self.journal.as_mut() else {
            return Vec::new();
        };
        let mut ops = std::mem::take(j);
        ops.extend(self.locks.take_grant_ops());
        ops.extend(changed.into_iter().map(Op::Resource));
        ops
    }

    /// Accepted tasks that are not final.
    pub fn unfinished(&self) -> usize {
        self.open_tasks
    }

    /// Takes finished tasks out of memory, oldest first (in completion-feed
    /// order), while one of `rule`'s limits is exceeded: more than
    /// `rule.keep` finished tasks in memory, or one that finished before
    /// `rule.finished_before` (Unix ms: the retention age, or the result
    /// TTL when that is shorter). Only tasks at feed positions below
    /// `rule.durable_below` leave (their result is committed in the store,
    /// where reads find them from then on; without a store it is the feed's
    /// end). At most `rule.budget` per call, so a caller holding the
    /// scheduling lock holds it briefly. Returns how many left and whether
    /// more are due.
    pub fn retire(&mut self, rule: &Retire) -> (usize, bool) {
        let mut retired = 0;
        let more = loop {
            let Some(&id) = self.completions.front() else {
                break false;
            };
            if self.feed_base >= rule.durable_below {
                break false;
            }
            let finished_at = self.tasks.get(&id).and_then(|t| t.finished_at).unwrap_or(0);
            let due = self.completions.len() > rule.keep || finished_at < rule.finished_before;
            if !due {
                break false;
            }
            if retired == rule.budget {
                break true;
            }
            self.completions.pop_front();
            self.tasks.remove(&id);
            self.feed_base += 1;
            retired += 1;
        };
        // Give back what a peak (a large backlog, a burst) left allocated.
        if self.tasks.capacity() > 4096 && self.tasks.len() * 4 < self.tasks.capacity() {
            self.tasks.shrink_to(self.tasks.len() * 2);
        }
        if self.completions.capacity() > 4096
            && self.completions.len() * 4 < self.completions.capacity()
        {
            self.completions.shrink_to(self.completions.len() * 2);
        }
        (retired, more)
    }

    /// The completion feed's length (the position of the next completion).
    pub fn feed_len(&self) -> u64 {
        self.feed_base + self.completions.len() as u64
    }

    /// Feed positions below this have left memory.
    pub fn feed_base(&self) -> u64 {
        self.feed_base
    }

    /// Finished tasks in memory.
    pub fn finished_in_memory(&self) -> usize {
        self.completions.len()
    }

    /// `id` was handed out (by this master, or one before it on the same
    /// state directory). Such a task not in memory has finished and left.
    pub fn handed_out(&self, id: TaskId) -> bool {
        id >= self.first_task && id < self.next_task
    }

    /// The first task ID to hand out (a restored counter, or a time-based
    /// one when nothing is kept).
    pub fn set_next_task_id(&mut self, next: TaskId) {
        if self.tasks.is_empty() && self.next_task == self.first_task {
            self.first_task = self.first_task.max(next);
        }
        self.next_task = self.next_task.max(next);
    }

    fn worker_record(w: &Worker) -> WorkerRecord {
        WorkerRecord {
            id: w.id,
            capacity: w.capacity,
            incarnation: w.incarnation,
            restarts: w.restarts,
            pid: w.pid,
            handle: w.handle.clone(),
        }
    }

    /// Takes back what a previous master left in the store. Called after the
    /// manifest's workers were added (not yet started) and before anything
    /// else happens; `adopted` are the previous master's worker
    /// incarnations that the runtime found running and took over.
    ///
    /// An adopted worker keeps its incarnation and restart count; the
    /// attempts it was running run on (same slot, same attempt, same lease,
    /// which is derived, not stored), and their lock grants are held again,
    /// with the same fencing tokens. It is `starting` until it registers
    /// again (it does so when this master refuses its first poll), so its
    /// report of a running attempt is counted then. Every other worker the
    /// store knows gets the next incarnation (restarted as today), so
    /// nothing an old incarnation sends is taken for the new one's; its open
    /// attempts are lost and its grants revoked (their tokens fenced).
    /// Unfinished tasks that do not run on are queued again in ID order: a
    /// task that waited in a worker's queue (or was sent to a node) goes
    /// back to that worker's queue, the others to the master queue.
    /// Finished tasks stay in the store (the recovery reads none of them):
    /// the feed goes on after its last position, and reads of positions
    /// below it, or of finished tasks, go to the store.
    pub fn restore(&mut self, rec: &Recovered, adopted: &[AdoptedWorker]) {
        // IDs from 1 were handed out on this state directory.
        self.next_task = self.next_task.max(rec.next_task_id);
        let now = Instant::now();
        let mut live: Vec<(WorkerId, Incarnation)> = Vec::new();
        for wr in &rec.workers {
            let Some(w) = self.workers.get_mut(wr.id as usize) else {
                continue;
            };
            w.restarts = wr.restarts;
            match adopted
                .iter()
                .find(|a| a.id == wr.id && a.incarnation == wr.incarnation)
            {
                Some(a) => {
                    w.incarnation = wr.incarnation;
                    w.pid = wr.pid;
                    w.locator = Some(a.locator.clone());
                    w.handle = a.handle.clone();
                    w.last_heartbeat = now;
                    w.adopted = true;
                    live.push((wr.id, wr.incarnation));
                    info!(
                        worker = wr.id,
                        incarnation = wr.incarnation,
                        "Node {} adopted: still running since the previous master",
                        wr.id
                    );
                }
                None => w.incarnation = w.incarnation.max(wr.incarnation + 1),
            }
            journal!(self, Op::Worker(Self::worker_record(w)));
        }
        let is_live = |worker: WorkerId, inc: Incarnation| live.contains(&(worker, inc));
        // The attempts that run on: unfinished tasks on adopted workers.
        let unfinished: std::collections::HashSet<TaskId> =
            rec.tasks.iter().map(|t| t.id).collect();
        let mut resumed: HashMap<TaskId, &crate::store::AttemptRecord> = HashMap::new();
        for a in &rec.open_attempts {
            let slot_free = self
                .workers
                .get(a.worker as usize)
                .is_some_and(|w| !w.running.contains_key(&a.slot));
            if is_live(a.worker, a.incarnation)
                && unfinished.contains(&a.task)
                && slot_free
                && !resumed.contains_key(&a.task)
            {
                self.workers[a.worker as usize]
                    .running
                    .insert(a.slot, (a.task, a.attempt));
                resumed.insert(a.task, a);
            } else {
                journal!(
                    self,
                    Op::EndAttempt {
                        task: a.task,
                        attempt: a.attempt,
                        outcome: "lost: the master restarted".into(),
                    }
                );
            }
        }
        // Grants: those of attempts that run on are held again; the others
        // are revoked.
        for g in &rec.grants {
            self.locks.skip_request_ids(g.request);
        }
        for g in &rec.grants {
            if self.locks.restore_released(g) {
                continue;
            }
            let runs_on = resumed.get(&g.task).is_some_and(|a| {
                a.attempt == g.attempt && (a.worker, a.incarnation) == (g.worker, g.incarnation)
            });
            if !(runs_on && self.locks.restore_grant(g)) {
                self.locks.forget_grant(g);
            }
        }
        self.feed_base = rec.feed_len;
        for t in rec.tasks.iter().filter(|t| !t.is_final()) {
            let mut task = Task::restored(t, TaskState::Queued);
            if let Some(a) = resumed.get(&t.id) {
                task.resume(a.worker, a.attempt);
                task.attempt_log.push(AttemptLog {
                    attempt: a.attempt,
                    worker: a.worker,
                    incarnation: a.incarnation,
                    slot: a.slot,
                    started_at: a.started_at,
                    ended_at: None,
                    outcome: None,
                });
                let lease = derive_lease(
                    &self.lease_key,
                    t.id,
                    a.attempt,
                    a.worker,
                    a.incarnation,
                    a.epoch,
                );
                self.lease_of.insert((t.id, a.attempt), lease.clone());
                self.leases.insert(
                    lease,
                    Owner {
                        worker: a.worker,
                        incarnation: a.incarnation,
                        task: t.id,
                        attempt: a.attempt,
                    },
                );
            } else {
                let waited_in = (t.state == TaskState::Assigned).then_some(t.node).flatten();
                let target = waited_in
                    .or(t.target)
                    .filter(|&w| (w as usize) < self.workers.len());
                match target {
                    Some(w) => {
                        task.state = TaskState::Assigned;
                        task.node = Some(w);
                        self.workers[w as usize].waiting.push_back(t.id);
                    }
                    None => self.master_queue.push_back(t.id),
                }
                // Journaled only when the store says otherwise (an attempt
                // that was running, a task queued elsewhere).
                if (t.state, t.node) != (task.state, task.node) {
                    journal!(
                        self,
                        Op::Queue {
                            id: t.id,
                            node: target
                        }
                    );
                }
            }
            self.tasks.insert(t.id, task);
        }
        self.open_tasks = self.tasks.len();
        let queued = self.open_tasks - resumed.len();
        if !rec.fresh {
            info!(
                queued,
                running_on = resumed.len(),
                finished = rec.feed_len,
                adopted = live.len(),
                lost_attempts = rec.open_attempts.len() - resumed.len(),
                next_task_id = self.next_task,
                "state restored"
            );
        }
        self.dispatch();
    }

    /// The runtime's handle of `id`'s current incarnation `inc` (see
    /// [`Worker::handle`]), once it has started it.
    pub fn set_handle(&mut self, id: WorkerId, inc: Incarnation, handle: Option<String>) {
        let Some(w) = self.workers.get_mut(id as usize) else {
            return;
        };
        if w.incarnation != inc || w.handle == handle {
            return;
        }
        w.handle = handle;
        journal!(self, Op::Worker(Self::worker_record(w)));
    }

    // ----- workers -------------------------------------------------------

    /// A new worker (startup or `/add`): the next ID, first incarnation.
    pub fn add_worker(&mut self, capacity: usize) -> (WorkerId, Incarnation) {
        let id = self.workers.len() as WorkerId;
        self.workers.push(Worker {
            id,
            capacity: capacity.max(1),
            incarnation: 1,
            state: WorkerState::Starting,
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            idle: BTreeMap::new(),
            executed: 0,
            restarts: 0,
            last_heartbeat: Instant::now(),
            pid: None,
            locator: None,
            slots: 1,
            handle: None,
            adopted: false,
        });
        journal!(
            self,
            Op::Worker(Self::worker_record(&self.workers[id as usize]))
        );
        self.activity.event(
            EventKind::Added,
            Some(id),
            None,
            format!("node {id} added with capacity {}", capacity.max(1)),
        );
        self.dispatch();
        (id, 1)
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(id as usize)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The staleness rule: a message counts only from the current
    /// incarnation of a worker that is not dead.
    pub fn check_current(&self, id: WorkerId, inc: Incarnation) -> Result<(), Refusal> {
        self.check(id, inc).map(|_| ())
    }

    fn check(&self, id: WorkerId, inc: Incarnation) -> Result<&Worker, Refusal> {
        let w = self
            .workers
            .get(id as usize)
            .ok_or(Refusal::UnknownWorker(id))?;
        if w.incarnation != inc || w.state == WorkerState::Dead {
            return Err(Refusal::Stale {
                worker: id,
                got: inc,
                current: w.incarnation,
            });
        }
        Ok(w)
    }

    pub fn register(
        &mut self,
        id: WorkerId,
        inc: Incarnation,
        slots: u32,
        pid: Option<u32>,
        locator: Option<String>,
    ) -> Result<usize, Refusal> {
        self.check(id, inc)?;
        let w = &mut self.workers[id as usize];
        w.state = WorkerState::Active;
        w.adopted = false;
        w.slots = slots;
        w.pid = pid;
        w.locator = locator;
        w.last_heartbeat = Instant::now();
        journal!(self, Op::Worker(Self::worker_record(w)));
        info!(worker = id, incarnation = inc, "Node {id} activated");
        let capacity = w.capacity;
        self.activity.event(
            EventKind::Registered,
            Some(id),
            None,
            format!("node {id} incarnation {inc} registered"),
        );
        fire(&mut self.waiters.registered);
        self.dispatch();
        Ok(capacity)
    }

    pub fn heartbeat(
        &mut self,
        id: WorkerId,
        inc: Incarnation,
        now: Instant,
    ) -> Result<(), Refusal> {
        let w = self.check(id, inc)?;
        // A worker sends heartbeats once registered: one that is `starting`
        // was adopted from the previous master and must register again
        // (told so by the refusal), even if all its slots are busy.
        let adopted = w.state == WorkerState::Starting;
        self.workers[id as usize].last_heartbeat = now;
        if adopted {
            return Err(Refusal::NotRegistered(id));
        }
        Ok(())
    }

    /// Workers alive whose last heartbeat is older than `timeout`, or that
    /// are still starting [`STARTUP_GRACE`] (at least `timeout`) after their
    /// start: (ID, incarnation, whether it was still starting).
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Vec<(WorkerId, Incarnation, bool)> {
        self.workers
            .iter()
            .filter(|w| {
                w.alive()
                    && now.saturating_duration_since(w.last_heartbeat) >= w.allowed_silence(timeout)
            })
            .map(|w| (w.id, w.incarnation, w.state == WorkerState::Starting))
            .collect()
    }

    /// When the next worker would become overdue, if none sends a heartbeat.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.workers
            .iter()
            .filter(|w| w.alive())
            .map(|w| w.last_heartbeat + w.allowed_silence(timeout))
            .min()
    }

    /// Death is decided once per incarnation: by the runtime's exit event,
    /// the heartbeat timeout or `/stop`, whichever comes first. Returns false
    /// when it was already decided. The worker's running and waiting tasks go
    /// to the front of the master queue in their original order; the running
    /// attempts are invalidated (and count toward `max_attempts`). When the
    /// worker died by itself (`task_suspect`), its running tasks prefer
    /// another worker on retry; a `/stop` or a missed heartbeat blames no task.
    pub fn declare_dead(
        &mut self,
        id: WorkerId,
        inc: Incarnation,
        reason: &str,
        task_suspect: bool,
    ) -> bool {
        let Some(w) = self.workers.get_mut(id as usize) else {
            return false;
        };
        if w.incarnation != inc || w.state == WorkerState::Dead {
            return false;
        }
        w.state = WorkerState::Dead;
        // Its processes are gone with it: nothing left to stop.
        self.stops.remove(&id);
        let w = &mut self.workers[id as usize];
        warn!(
            worker = id,
            incarnation = inc,
            reason,
            "Node {id} is not responding: {reason}"
        );
        let running_slots = std::mem::take(&mut w.running);
        let waiting: Vec<TaskId> = std::mem::take(&mut w.waiting).into();
        w.idle.clear();
        self.activity.event(
            EventKind::Dead,
            Some(id),
            None,
            format!("node {id} incarnation {inc} is dead: {reason}"),
        );
        for (&slot, &(tid, attempt)) in &running_slots {
            self.attempt_bar(id, slot, tid, attempt, BarOutcome::Lost);
        }
        let running: Vec<(TaskId, Attempt)> = running_slots.into_values().collect();
        // Its grants are revoked in this same critical section: their
        // tokens go stale and the waiters behind them proceed.
        for &(tid, attempt) in &running {
            self.forget_lease(tid, attempt);
        }
        self.locks.revoke_worker(id, inc);
        let running: Vec<TaskId> = running.into_iter().map(|(t, _)| t).collect();
        info!(
            worker = id,
            running = running.len(),
            waiting = waiting.len(),
            "Requeueing tasks from Node {id}"
        );
        let mut requeue = Vec::with_capacity(running.len() + waiting.len());
        for tid in running {
            let error = format!("node {id} died while running it ({reason})");
            if self.crashed(tid, task_suspect.then_some(id), error) {
                requeue.push(tid);
            }
        }
        requeue.extend(waiting);
        for &tid in requeue.iter().rev() {
            self.task_mut(tid).requeue();
            self.master_queue.push_front(tid);
            journal!(
                self,
                Op::Queue {
                    id: tid,
                    node: None
                }
            );
        }
        self.room_freed();
        self.dispatch();
        true
    }

    /// The runtime is about to start the worker again: same ID and capacity,
    /// next incarnation.
    pub fn begin_restart(&mut self, id: WorkerId) -> Option<(Incarnation, usize)> {
        let w = self.workers.get_mut(id as usize)?;
        if w.state != WorkerState::Dead {
            return None;
        }
        w.incarnation += 1;
        w.state = WorkerState::Starting;
        w.adopted = false;
        w.pid = None;
        w.locator = None;
        w.handle = None;
        w.restarts += 1;
        w.last_heartbeat = Instant::now();
        let out = (w.incarnation, w.capacity);
        let restarts = w.restarts;
        journal!(self, Op::Worker(Self::worker_record(w)));
        self.activity.event(
            EventKind::Restart,
            Some(id),
            None,
            format!(
                "node {id} restarting as incarnation {} (restart {restarts})",
                out.0
            ),
        );
        self.dispatch();
        Some(out)
    }

    // ----- tasks ---------------------------------------------------------

    /// A task the scheduler holds (every ID in a queue or a slot is one).
    fn task_mut(&mut self, id: TaskId) -> &mut Task {
        self.tasks
            .get_mut(&id)
            .expect("a queued or running task exists")
    }

    fn new_task(&mut self, spec: TaskSpec, target: Option<WorkerId>) -> TaskId {
        let id = self.next_task;
        self.next_task += 1;
        let task = Task::new(id, spec);
        journal!(
            self,
            Op::Submit {
                id,
                spec: task.spec.clone(),
                target,
                submitted_at: task.submitted_at,
            }
        );
        self.tasks.insert(id, task);
        self.open_tasks += 1;
        self.tallies.push(Tally::Submitted);
        id
    }

    /// `/send`: into the master queue, assigned by round-robin.
    pub fn submit(&mut self, spec: TaskSpec) -> TaskId {
        let id = self.new_task(spec, None);
        self.master_queue.push_back(id);
        self.dispatch();
        id
    }

    /// `/send/{node}`: straight into that worker's queue if it has room.
    pub fn submit_to(&mut self, worker: WorkerId, spec: TaskSpec) -> Result<TaskId, SubmitError> {
        let w = self
            .workers
            .get(worker as usize)
            .ok_or(SubmitError::UnknownWorker(worker))?;
        if w.held() >= w.capacity {
            return Err(SubmitError::Full(worker));
        }
        let id = self.new_task(spec, Some(worker));
        self.task_mut(id).assign(worker, None);
        let w = &mut self.workers[worker as usize];
        w.waiting.push_back(id);
        info!(
            task = id,
            worker,
            "Queueing instruction to Node {worker}; queue length {}",
            w.held()
        );
        self.dispatch();
        Ok(id)
    }

    /// A worker slot is free: record what it did, then park its poll until a
    /// task is handed to `tx`.
    pub fn poll(
        &mut self,
        worker: WorkerId,
        inc: Incarnation,
        slot: u32,
        report: Option<TaskReport>,
        tx: oneshot::Sender<Assignment>,
    ) -> Result<u64, Refusal> {
        self.poll_keeping(worker, inc, slot, None, report, tx)
    }

    /// [`Scheduler::poll`] of a worker that sends again the report its
    /// previous poll carried (`kept`, see `flotilla_proto::Poll`). It is
    /// recorded first, if this slot still runs its attempt as far as this
    /// master knows (a master started since the report was first sent may
    /// lack it); else it was recorded already and is ignored, silently.
    pub fn poll_keeping(
        &mut self,
        worker: WorkerId,
        inc: Incarnation,
        slot: u32,
        kept: Option<TaskReport>,
        report: Option<TaskReport>,
        tx: oneshot::Sender<Assignment>,
    ) -> Result<u64, Refusal> {
        let w = self.check(worker, inc)?;
        if w.state != WorkerState::Active {
            return Err(Refusal::NotRegistered(worker));
        }
        if slot >= w.slots {
            return Err(Refusal::BadSlot {
                worker,
                slot,
                slots: w.slots,
            });
        }
        if let Some(kept) = kept {
            let runs = self.workers[worker as usize].running.get(&slot);
            if runs == Some(&(kept.task_id, kept.attempt)) {
                self.record(worker, slot, kept);
            }
        }
        if let Some(report) = report {
            self.record(worker, slot, report);
        }
        // A slot that polls without reporting the attempt we think it runs
        // never received it (the answer was lost on the way): run it again.
        if let Some((tid, attempt)) = self.workers[worker as usize].running.remove(&slot) {
            warn!(
                task = tid,
                attempt, worker, slot, "assignment was lost in transit; requeueing"
            );
            self.attempt_bar(worker, slot, tid, attempt, BarOutcome::Lost);
            self.end_attempt(tid, attempt);
            let error = format!("assignment to node {worker} was lost in transit");
            if self.crashed(tid, None, error) {
                self.requeue_front(tid);
            }
            self.room_freed();
        }
        let poll_id = self.next_poll;
        self.next_poll += 1;
        self.workers[worker as usize]
            .idle
            .insert(slot, PollWaiter { poll_id, tx });
        self.dispatch();
        Ok(poll_id)
    }

    /// A poll is going away (timed out or its connection closed). If a task
    /// was handed to it meanwhile, `undelivered` is that assignment: it goes
    /// back to the front of the worker's queue as if never handed over.
    pub fn withdraw_poll(
        &mut self,
        worker: WorkerId,
        slot: u32,
        poll_id: u64,
        undelivered: Option<Assignment>,
    ) {
        let Some(w) = self.workers.get_mut(worker as usize) else {
            return;
        };
        if w.idle.get(&slot).is_some_and(|p| p.poll_id == poll_id) {
            w.idle.remove(&slot);
        }
        let Some(a) = undelivered else { return };
        if w.running.get(&slot) == Some(&(a.task_id, a.attempt)) {
            w.running.remove(&slot);
            w.waiting.push_front(a.task_id);
            self.end_attempt(a.task_id, a.attempt);
            journal!(
                self,
                Op::EndAttempt {
                    task: a.task_id,
                    attempt: a.attempt,
                    outcome: "undelivered".into(),
                }
            );
            self.task_mut(a.task_id).unhand(worker);
            debug!(
                task = a.task_id,
                worker, "assignment not delivered; back to the queue"
            );
            self.dispatch();
        }
    }

    /// A report for `(task, attempt)` from `worker`'s `slot`. Counted only if
    /// that slot is running exactly that attempt; anything else is late or
    /// duplicated and dropped.
    fn record(&mut self, worker: WorkerId, slot: u32, report: TaskReport) {
        let w = &mut self.workers[worker as usize];
        if w.running.get(&slot) != Some(&(report.task_id, report.attempt)) {
            warn!(
                task = report.task_id,
                attempt = report.attempt,
                worker,
                "dropping a stale result"
            );
            return;
        }
        w.running.remove(&slot);
        self.room_freed();
        self.end_attempt(report.task_id, report.attempt);
        let tid = report.task_id;
        let outcome = match report.outcome {
            Outcome::Succeeded { .. } => BarOutcome::Succeeded,
            Outcome::Failed { .. } => BarOutcome::Failed,
            Outcome::Crashed { .. } => BarOutcome::Crashed,
        };
        self.attempt_bar(worker, slot, tid, report.attempt, outcome);
        match report.outcome {
            Outcome::Succeeded { result } => {
                // INFO carries IDs, states and sizes; the content (task
                // data) only at DEBUG.
                info!(
                    task = tid,
                    worker,
                    response_bytes = result.response.to_string().len(),
                    stdout_bytes = result.stdout.len(),
                    "Node {worker} finished task {tid}"
                );
                debug!(
                    task = tid,
                    worker,
                    "Node {worker} response: {}",
                    short(&result.response)
                );
                self.workers[worker as usize].executed += 1;
                self.finish(tid, TaskState::Succeeded, Some(result), None);
            }
            Outcome::Failed { result, error } => {
                info!(
                    task = tid,
                    worker,
                    error_bytes = error.len(),
                    "Node {worker} task {tid} failed"
                );
                debug!(task = tid, worker, %error, "Node {worker} task {tid} failed");
                self.workers[worker as usize].executed += 1;
                self.finish(tid, TaskState::Failed, Some(result), Some(error));
            }
            Outcome::Crashed { error, .. } => {
                warn!(task = tid, worker, %error, "task crashed its interpreter on Node {worker}");
                if self.crashed(tid, Some(worker), error) {
                    self.requeue_front(tid);
                }
            }
        }
    }

    /// An attempt died with its interpreter or worker. Returns true when the
    /// task should run again, false when it has used up its attempts (it is
    /// then failed as poison).
    fn crashed(&mut self, tid: TaskId, culprit_host: Option<WorkerId>, error: String) -> bool {
        let max = self.max_attempts;
        let attempt = self.task_mut(tid).attempts;
        journal!(
            self,
            Op::EndAttempt {
                task: tid,
                attempt,
                outcome: format!("crashed: {error}"),
            }
        );
        match self.task_mut(tid).crashed(culprit_host, error, max) {
            CrashVerdict::Retry => {
                self.tallies.push(Tally::Retried);
                let reason = self.tasks[&tid].crash_reason().unwrap_or_default();
                self.activity.event(
                    EventKind::Retry,
                    culprit_host,
                    Some(tid),
                    format!("task {tid} will be retried after attempt {attempt}: {reason}"),
                );
                true
            }
            CrashVerdict::GiveUp(why) => {
                warn!(task = tid, "{why}");
                self.activity.event(
                    EventKind::Retry,
                    culprit_host,
                    Some(tid),
                    format!("task {tid} failed: {why}"),
                );
                self.finish(tid, TaskState::Failed, None, Some(why));
                false
            }
        }
    }

    fn requeue_front(&mut self, tid: TaskId) {
        self.task_mut(tid).requeue();
        self.master_queue.push_front(tid);
        journal!(
            self,
            Op::Queue {
                id: tid,
                node: None
            }
        );
    }

    fn finish(
        &mut self,
        tid: TaskId,
        state: TaskState,
        result: Option<TaskResult>,
        error: Option<String>,
    ) {
        if let Some(ran) = self.task_mut(tid).finish(state, result, error) {
            self.tallies.push(Tally::Finished { ran });
        }
        let feed_pos = self.feed_len();
        let task = &self.tasks[&tid];
        journal!(
            self,
            Op::Finish {
                id: tid,
                state,
                node: task.node,
                attempts: task.attempts,
                result: task.result.clone(),
                error: task.error.clone(),
                finished_at: task.finished_at.unwrap_or_default(),
                feed_pos,
            }
        );
        self.completions.push_back(tid);
        self.open_tasks -= 1;
        if let Some(i) = final_index(state) {
            self.finished_counts[i] += 1;
        }
        fire(&mut self.waiters.completed);
    }

    // ----- cancel --------------------------------------------------------

    /// `DELETE /tasks/{id}`: a queued or assigned task leaves its queue; a
    /// running one loses its slot at once (its lease dies and its locks are
    /// released, fenced as on a death) and its worker is told to kill that
    /// slot's interpreter or shell. The task ends `cancelled`.
    pub fn cancel(&mut self, tid: TaskId) -> Result<TaskState, CancelError> {
        let task = self.tasks.get(&tid).ok_or(CancelError::Unknown(tid))?;
        let was = task.state;
        match was {
            s if s.is_final() => return Err(CancelError::Finished(tid, s)),
            TaskState::Queued => self.master_queue.retain(|&t| t != tid),
            TaskState::Assigned => {
                if let Some(w) = task.node.and_then(|n| self.workers.get_mut(n as usize)) {
                    w.waiting.retain(|&t| t != tid);
                }
                self.room_freed();
            }
            TaskState::Running => {
                let attempt = task.attempts;
                let found = self.workers.iter_mut().find_map(|w| {
                    let slot = w
                        .running
                        .iter()
                        .find(|(_, &run)| run == (tid, attempt))
                        .map(|(&slot, _)| slot)?;
                    w.running.remove(&slot);
                    Some((w.id, slot))
                });
                self.end_attempt(tid, attempt);
                if let Some((worker, slot)) = found {
                    self.attempt_bar(worker, slot, tid, attempt, BarOutcome::Cancelled);
                    self.stops.entry(worker).or_default().push(StopAttempt {
                        task_id: tid,
                        attempt,
                        reason: "cancelled".into(),
                    });
                    if let Some(tx) = self.waiters.control.remove(&worker) {
                        let _ = tx.send(());
                    }
                }
                self.room_freed();
            }
            _ => unreachable!("every non-final state is handled"),
        }
        info!(task = tid, was = %was, "task cancelled");
        self.activity.event(
            EventKind::Cancel,
            self.tasks[&tid].node,
            Some(tid),
            format!("task {tid} cancelled while {was}"),
        );
        self.finish(
            tid,
            TaskState::Cancelled,
            None,
            Some(format!("cancelled while {was}")),
        );
        self.dispatch();
        Ok(was)
    }

    /// The IDs of the tasks in `state`, oldest first.
    pub fn task_ids_in(&self, state: TaskState) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.state == state)
            .map(|t| t.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The stop orders waiting for `worker`'s control poll (taken); when
    /// there are none, `tx` fires when there are.
    pub fn take_stops(
        &mut self,
        worker: WorkerId,
        inc: Incarnation,
        tx: oneshot::Sender<()>,
    ) -> Result<Vec<StopAttempt>, Refusal> {
        self.check(worker, inc)?;
        let stops = self.stops.remove(&worker).unwrap_or_default();
        if stops.is_empty() {
            self.waiters.control.insert(worker, tx);
        }
        Ok(stops)
    }

    // ----- dispatch ------------------------------------------------------

    fn views(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|w| WorkerView {
                id: w.id,
                eligible: w.alive(),
                held: w.held(),
                capacity: w.capacity,
                waiting: w.waiting.len(),
                idle_slot: w.state == WorkerState::Active && !w.idle.is_empty(),
            })
            .collect()
    }

    /// Moves work as far as it can go: master queue to worker queues
    /// (round-robin), worker queues to idle slots, and steals for idle slots
    /// with nothing of their own. Called after every transition.
    fn dispatch(&mut self) {
        self.activity.touch();
        loop {
            let assigned = self.assign_from_master_queue();
            let handed = self.hand_over();
            let stolen = self.steal_once();
            if !(assigned || handed || stolen) {
                break;
            }
        }
    }

    fn assign_from_master_queue(&mut self) -> bool {
        if self.master_queue.is_empty() || self.workers.is_empty() {
            return false;
        }
        let mut views = self.views();
        let mut progressed = false;
        let mut i = 0;
        while i < self.master_queue.len() && views.iter().any(|v| v.has_room()) {
            let tid = self.master_queue[i];
            let avoid = &self.tasks[&tid].crashed_on;
            // Retry elsewhere when anywhere else exists.
            let elsewhere = views.iter().any(|v| v.eligible && !avoid.contains(&v.id));
            let pick =
                policy::round_robin(&views, self.cursor, |id| !elsewhere || !avoid.contains(&id));
            let Some(k) = pick else {
                i += 1;
                continue;
            };
            self.master_queue.remove(i);
            views[k].held += 1;
            views[k].waiting += 1;
            self.cursor = (k + 1) % views.len();
            let w = &mut self.workers[k];
            w.waiting.push_back(tid);
            self.tasks
                .get_mut(&tid)
                .expect("queued task exists")
                .assign(w.id, None);
            info!(
                task = tid,
                worker = w.id,
                "Queueing instruction to Node {}; queue length {}",
                w.id,
                w.held()
            );
            progressed = true;
        }
        progressed
    }

    fn hand_over(&mut self) -> bool {
        let default_timeout = self.task_timeout;
        let mut progressed = false;
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.state == WorkerState::Active)
        {
            while !w.waiting.is_empty() {
                let Some((slot, waiter)) = w.idle.pop_first() else {
                    break;
                };
                let tid = w.waiting.pop_front().expect("checked non-empty");
                let task = self.tasks.get_mut(&tid).expect("waiting task exists");
                let (attempt, traceparent, first_wait) = task.start(w.id, w.incarnation, slot);
                let started_at = task.started_at.unwrap_or_default();
                let lease = derive_lease(
                    &self.lease_key,
                    tid,
                    attempt,
                    w.id,
                    w.incarnation,
                    self.epoch,
                );
                let assignment = Assignment {
                    task_id: tid,
                    attempt,
                    spec: task.spec.clone(),
                    lease: lease.clone(),
                    timeout_s: task.spec.timeout.or(default_timeout),
                    traceparent,
                };
                match waiter.tx.send(assignment) {
                    Ok(()) => {
                        if let Some(waited) = first_wait {
                            self.tallies.push(Tally::Started { waited });
                        }
                        debug!(
                            task = tid,
                            attempt,
                            worker = w.id,
                            slot,
                            "Sending instruction to node {}",
                            w.id
                        );
                        w.running.insert(slot, (tid, attempt));
                        journal!(
                            self,
                            Op::Start(AttemptRecord {
                                task: tid,
                                attempt,
                                worker: w.id,
                                incarnation: w.incarnation,
                                slot,
                                started_at,
                                outcome: None,
                                epoch: self.epoch,
                            })
                        );
                        let owner = Owner {
                            worker: w.id,
                            incarnation: w.incarnation,
                            task: tid,
                            attempt,
                        };
                        self.lease_of.insert((tid, attempt), lease.clone());
                        self.leases.insert(lease, owner);
                        progressed = true;
                    }
                    Err(_) => {
                        // The poll went away before we answered: not handed over.
                        task.unhand(w.id);
                        w.waiting.push_front(tid);
                    }
                }
            }
        }
        progressed
    }

    fn steal_once(&mut self) -> bool {
        let views = self.views();
        for thief in 0..views.len() {
            let Some(victim) = policy::steal_victim(&views, thief) else {
                continue;
            };
            let tid = *self.workers[victim]
                .waiting
                .back()
                .expect("victim has waiting work");
            let thief_id = views[thief].id;
            if self.tasks[&tid].crashed_on.contains(&thief_id) {
                continue;
            }
            self.workers[victim].waiting.pop_back();
            self.workers[thief].waiting.push_back(tid);
            self.task_mut(tid).assign(thief_id, Some(views[victim].id));
            self.steals += 1;
            self.tallies.push(Tally::Stolen);
            self.activity.event(
                EventKind::Steal,
                Some(thief_id),
                Some(tid),
                format!(
                    "node {thief_id} stole task {tid} from node {}",
                    views[victim].id
                ),
            );
            self.room_freed();
            info!(
                task = tid,
                thief = thief_id,
                victim = views[victim].id,
                "Node {thief_id} is stealing work from Node {}",
                views[victim].id
            );
            return true;
        }
        false
    }

    // ----- locks ---------------------------------------------------------

    fn forget_lease(&mut self, task: TaskId, attempt: Attempt) {
        if let Some(lease) = self.lease_of.remove(&(task, attempt)) {
            self.leases.remove(&lease);
        }
    }

    /// An attempt left its slot: the task stream's bar, and the end of the
    /// task's attempt log entry.
    fn attempt_bar(
        &mut self,
        worker: WorkerId,
        slot: u32,
        tid: TaskId,
        attempt: Attempt,
        outcome: BarOutcome,
    ) {
        let started = self.task_mut(tid).attempt_ended(outcome);
        self.activity
            .bar(tid, attempt, worker, slot, started, unix_ms(), outcome);
    }

    /// The lock grants made since the last call go to the event log.
    pub fn note_lock_grants(&mut self) {
        for g in self.locks.take_grants() {
            self.activity.event(
                EventKind::LockGrant,
                Some(g.owner.worker),
                Some(g.owner.task),
                format!(
                    "node {} (task {}) acquired {} access to {} (version {})",
                    g.owner.worker, g.owner.task, g.mode, g.resource, g.token
                ),
            );
        }
    }

    /// An attempt is over: its lease dies and its locks are released.
    fn end_attempt(&mut self, task: TaskId, attempt: Attempt) {
        self.forget_lease(task, attempt);
        self.locks.release_attempt(task, attempt);
    }

    fn owner_of(&self, lease: &str) -> Result<Owner, LockCallError> {
        self.leases
            .get(lease)
            .copied()
            .ok_or(LockCallError::StaleLease)
    }

    pub fn lock_acquire(
        &mut self,
        lease: &str,
        name: &str,
        mode: LockMode,
        tx: oneshot::Sender<LockGrant>,
        resend: bool,
    ) -> Result<RequestId, LockCallError> {
        let owner = self.owner_of(lease)?;
        // The same request again after its answer was lost with a master:
        // if it was granted, the grant is answered again as it is.
        if resend {
            if let Some((id, grant)) = self.locks.held(name, mode, owner) {
                let _ = tx.send(grant);
                return Ok(id);
            }
        }
        Ok(self.locks.acquire(name, mode, owner, tx)?)
    }

    /// A lock request's caller went away (see `LockTable::cancel`). Only
    /// the live lease that made the request may cancel it; with a dead lease
    /// there is nothing left to cancel (its locks went with the attempt).
    pub fn lock_cancel(
        &mut self,
        lease: &str,
        name: &str,
        id: RequestId,
        granted: Option<&LockGrant>,
    ) {
        if let Ok(owner) = self.owner_of(lease) {
            self.locks.cancel(name, id, owner, granted);
        }
    }

    pub fn lock_release(
        &mut self,
        lease: &str,
        name: &str,
        mode: LockMode,
        publish: Option<(serde_json::Value, u64)>,
        resend: bool,
    ) -> Result<(u64, bool), LockCallError> {
        // A revoked grant's write-back still reaches the fencing check, so
        // the refusal names the stale token; other calls need a live lease.
        let owner = match (self.owner_of(lease), &publish) {
            (Ok(owner), _) => owner,
            (Err(_), Some((_, token))) => {
                let version = self.locks.view(name).map(|v| v.version);
                return Err(match version {
                    None => LockError::Unknown(name.to_string()).into(),
                    Some(version) => LockError::Fenced {
                        name: name.to_string(),
                        token: *token,
                        version,
                    }
                    .into(),
                });
            }
            (Err(e), None) => return Err(e),
        };
        match self.locks.release(name, mode, owner, publish.clone()) {
            Ok(done) => Ok(done),
            // The same release again after its answer was lost with a
            // master: if it was carried out, it is answered as done.
            Err(e @ (LockError::NotHeld { .. } | LockError::Fenced { .. })) if resend => self
                .locks
                .already_released(name, mode, owner, publish.as_ref())
                .ok_or(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    // ----- views ---------------------------------------------------------

    pub fn task(&self, id: TaskId) -> Option<TaskView> {
        self.tasks.get(&id).map(Task::view)
    }

    /// The in-memory part of one page of the task listing: tasks with an
    /// ID above `after`, in ID order, matching `state` and `node`, at most
    /// `limit`. The work per call is bounded: only IDs below `end = after +
    /// 1 + scan` (and below the next ID to hand out) are looked at. Returns
    /// the tasks, `end`, and whether IDs at or beyond `end` were handed out.
    /// Tasks that left memory are the store's part (see
    /// `Cluster::list_tasks`), with feed positions below [`Self::feed_base`].
    pub fn list_tasks(
        &self,
        after: TaskId,
        state: Option<TaskState>,
        node: Option<WorkerId>,
        limit: usize,
        scan: usize,
    ) -> (Vec<TaskView>, TaskId, bool) {
        self.list_tasks_as(after, state, node, limit, scan, Task::view)
    }

    /// [`Self::list_tasks`], each task shown by `show` (the dashboard's
    /// table takes a row without the result).
    pub fn list_tasks_as<T>(
        &self,
        after: TaskId,
        state: Option<TaskState>,
        node: Option<WorkerId>,
        limit: usize,
        scan: usize,
        show: impl Fn(&Task) -> T,
    ) -> (Vec<T>, TaskId, bool) {
        let mut out = Vec::new();
        // IDs below `first_task` were never handed out here (time-based
        // IDs start far from 1): the scan starts where the IDs do.
        let first = after.saturating_add(1).max(self.first_task);
        let end = first.saturating_add(scan as u64).min(self.next_task);
        let mut id = first;
        while id < end && out.len() < limit {
            if let Some(t) = self.tasks.get(&id) {
                if state.is_none_or(|s| t.state == s) && node.is_none_or(|n| t.node == Some(n)) {
                    out.push(show(t));
                }
            }
            id += 1;
        }
        (out, end.max(first), end < self.next_task)
    }

    /// Registers `tx` to fire when the task finishes. `None`: no such task;
    /// `Some(true)`: already finished (nothing registered).
    pub fn wait_for(&mut self, id: TaskId, tx: oneshot::Sender<()>) -> Option<bool> {
        Some(!self.tasks.get_mut(&id)?.wait_final(tx))
    }

    /// Finished tasks from position `after` of the completion feed, at most
    /// `limit`, and the position to ask from next. `Err(base)` when `after`
    /// is before the entries still in memory: those up to `base` are in the
    /// store (or, without one, gone).
    pub fn completions_after(&self, after: u64, limit: usize) -> Result<(Vec<TaskView>, u64), u64> {
        if after < self.feed_base {
            return Err(self.feed_base);
        }
        let start = ((after - self.feed_base) as usize).min(self.completions.len());
        let end = (start + limit).min(self.completions.len());
        let views = self
            .completions
            .range(start..end)
            .filter_map(|&id| self.task(id))
            .collect();
        Ok((views, self.feed_base + end as u64))
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        let now = Instant::now();
        self.workers
            .iter()
            .map(|w| NodeView {
                id: w.id,
                state: w.state,
                capacity: w.capacity,
                incarnation: w.incarnation,
                queued: w.waiting.len(),
                running: w.running.len(),
                executed: w.executed,
                restarts: w.restarts,
                last_heartbeat_ms_ago: now.saturating_duration_since(w.last_heartbeat).as_millis()
                    as u64,
                pid: w.pid,
                locator: w.locator.clone(),
            })
            .collect()
    }

    /// Unfinished tasks by state, and the tasks that finished under this
    /// master by final state, for the metrics.
    pub fn tasks_by_state(&self) -> Vec<(TaskState, usize)> {
        let mut counts: HashMap<TaskState, usize> = HashMap::new();
        for t in self.tasks.values().filter(|t| !t.state.is_final()) {
            *counts.entry(t.state).or_default() += 1;
        }
        for state in [
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            if let Some(i) = final_index(state) {
                counts.insert(state, self.finished_counts[i]);
            }
        }
        TaskState::ALL
            .into_iter()
            .map(|state| (state, counts.get(&state).copied().unwrap_or(0)))
            .collect()
    }

    /// How many tasks are in each state, from the queues and the finished
    /// counts (no walk over the tasks): the same figures as
    /// [`Scheduler::tasks_by_state`], cheap enough for every dashboard update.
    pub fn state_counts(&self) -> Vec<(TaskState, usize)> {
        let assigned = self.workers.iter().map(|w| w.waiting.len()).sum();
        let running = self.workers.iter().map(|w| w.running.len()).sum();
        vec![
            (TaskState::Queued, self.master_queue.len()),
            (TaskState::Assigned, assigned),
            (TaskState::Running, running),
            (TaskState::Succeeded, self.finished_counts[0]),
            (TaskState::Failed, self.finished_counts[1]),
            (TaskState::Cancelled, self.finished_counts[2]),
        ]
    }

    /// Positions handed out in the completion feed: how many tasks ever
    /// finished here (expired ones included).
    pub fn completed_total(&self) -> usize {
        self.feed_len() as usize
    }

    /// The next task ID to be handed out.
    pub fn next_task_id(&self) -> TaskId {
        self.next_task
    }

    /// The attempts running now: (worker, slot, task, attempt, started at).
    pub fn running_attempts(&self) -> Vec<(WorkerId, u32, TaskId, Attempt, u64)> {
        let mut out = Vec::new();
        for w in &self.workers {
            for (&slot, &(tid, attempt)) in &w.running {
                let started = self
                    .tasks
                    .get(&tid)
                    .and_then(|t| t.started_at)
                    .unwrap_or_default();
                out.push((w.id, slot, tid, attempt, started));
            }
        }
        out
    }

    /// A task with its spec and attempts (the dashboard's task detail).
    pub fn task_entry(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// Tasks stolen so far.
    pub fn steals(&self) -> u64 {
        self.steals
    }

    pub fn master_queue_len(&self) -> usize {
        self.master_queue.len()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.len() > 120 {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

#[cfg(test)]
mod tests;
