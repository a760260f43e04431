//! The running cluster: the scheduling state under one mutex, the runtime
//! that starts workers, and the reactions to deaths (requeue, restart). HTTP
//! handlers, the health monitor and the runtime's event stream all come
//! through here.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flotilla_proto::{Incarnation, TaskId, WorkerId};
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use crate::runtime::{Runtime, RuntimeEvent, WorkerLaunch};
use crate::scheduler::{Scheduler, TaskView};

/// The most task IDs one listing request looks at (bounds the time it
/// holds the scheduling state, whatever the filters).
pub const LIST_SCAN: usize = 50_000;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub name: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_attempts: u32,
    /// How long a worker's poll is held open when there is nothing to do.
    pub poll_hold: Duration,
    /// Tasks a worker runs at once.
    pub slots: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: "flotilla".into(),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            max_attempts: 3,
            poll_hold: Duration::from_secs(25),
            slots: 1,
        }
    }
}

pub struct Cluster {
    sched: Mutex<Scheduler>,
    runtime: Arc<dyn Runtime>,
    pub cfg: ClusterConfig,
    /// Per-cluster secret the workers authenticate with.
    pub worker_secret: String,
    master_url: OnceLock<String>,
    /// Fires whenever a task reaches a final state.
    pub completed: Notify,
    /// Fires whenever a worker queue shrinks.
    pub room: Notify,
    /// Fires whenever a worker registers.
    pub registered: Notify,
    /// Consecutive failed starts per worker, for restart backoff.
    failed_starts: Mutex<std::collections::HashMap<WorkerId, u32>>,
    /// Set on shutdown: deaths are then expected, nothing is restarted.
    stopping: std::sync::atomic::AtomicBool,
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    pub fn new(cfg: ClusterConfig, runtime: Arc<dyn Runtime>) -> Arc<Self> {
        Arc::new(Cluster {
            sched: Mutex::new(Scheduler::new(cfg.max_attempts)),
            runtime,
            cfg,
            worker_secret: random_secret(),
            master_url: OnceLock::new(),
            completed: Notify::new(),
            room: Notify::new(),
            registered: Notify::new(),
            failed_starts: Mutex::new(Default::default()),
            stopping: Default::default(),
        })
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// The address workers use to reach this master; set once it listens.
    pub fn set_master_url(&self, url: String) {
        let _ = self.master_url.set(url);
    }

    fn master_url(&self) -> String {
        self.master_url
            .get()
            .cloned()
            .expect("master URL is set before workers start")
    }

    /// Runs `f` on the scheduling state, then wakes whoever its transition
    /// concerns. Never hold the state across an `.await`.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        let (out, effects) = {
            let mut s = self.sched.lock().expect("scheduler lock poisoned");
            let out = f(&mut s);
            (out, s.take_effects())
        };
        if effects.completed {
            self.completed.notify_waiters();
        }
        if effects.room_freed {
            self.room.notify_waiters();
        }
        out
    }

    fn launch(
        &self,
        worker_id: WorkerId,
        incarnation: Incarnation,
        capacity: usize,
    ) -> WorkerLaunch {
        WorkerLaunch {
            worker_id,
            incarnation,
            capacity,
            slots: self.cfg.slots.min(capacity as u32).max(1),
            master_url: self.master_url(),
            secret: self.worker_secret.clone(),
            inherited_env: crate::runtime::inherited_env(),
        }
    }

    /// Startup and `/add`: a new worker ID, started by the runtime.
    pub async fn add_worker(
        &self,
        capacity: usize,
    ) -> Result<WorkerId, crate::runtime::RuntimeError> {
        let (id, inc) = self.with_state(|s| s.add_worker(capacity));
        info!(
            worker = id,
            capacity, "Node {id} added with capacity {capacity}"
        );
        self.runtime.start(self.launch(id, inc, capacity)).await?;
        Ok(id)
    }

    /// `/stop/{node}`: kill it for real, then recover as from any death.
    pub async fn stop_worker(
        self: &Arc<Self>,
        id: WorkerId,
    ) -> Result<(), crate::runtime::RuntimeError> {
        let inc = self.with_state(|s| s.worker(id).map(|w| w.incarnation));
        let Some(inc) = inc else { return Ok(()) };
        self.runtime.kill(id).await?;
        info!(worker = id, "Node {id} stopped (SIGKILL)");
        if self.with_state(|s| s.declare_dead(id, inc, "stopped by /stop", false)) {
            self.spawn_restart(id);
        }
        Ok(())
    }

    fn spawn_restart(self: &Arc<Self>, id: WorkerId) {
        let me = self.clone();
        tokio::spawn(async move { me.restart(id).await });
    }

    /// Same ID and capacity, next incarnation. A worker that keeps dying
    /// before it registers is restarted with a growing delay.
    async fn restart(self: Arc<Self>, id: WorkerId) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let failures = self
            .failed_starts
            .lock()
            .expect("lock")
            .get(&id)
            .copied()
            .unwrap_or(0);
        if failures > 0 {
            let delay =
                Duration::from_millis(250u64 << failures.min(5)).min(Duration::from_secs(10));
            warn!(
                worker = id,
                failures,
                ?delay,
                "worker keeps failing to start; backing off"
            );
            tokio::time::sleep(delay).await;
        }
        if let Err(e) = self.runtime.kill(id).await {
            warn!(worker = id, error = %e, "could not make sure the old worker is gone");
        }
        let Some((inc, capacity)) = self.with_state(|s| s.begin_restart(id)) else {
            return;
        };
        self.with_state(|s| s.metrics.restarts.inc());
        match self.runtime.start(self.launch(id, inc, capacity)).await {
            Ok(()) => info!(worker = id, incarnation = inc, "Node {id} restarted"),
            // The heartbeat monitor declares it dead again and we retry.
            Err(e) => error!(worker = id, error = %e, "restart failed"),
        }
    }

    /// A worker registered: its start worked.
    pub fn started_ok(&self, id: WorkerId) {
        self.failed_starts.lock().expect("lock").remove(&id);
        self.registered.notify_waiters();
    }

    fn died(self: &Arc<Self>, id: WorkerId, inc: Incarnation, reason: &str, task_suspect: bool) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let never_registered = self.with_state(|s| {
            s.worker(id).is_some_and(|w| {
                w.incarnation == inc && w.state == crate::scheduler::WorkerState::Starting
            })
        });
        if self.with_state(|s| s.declare_dead(id, inc, reason, task_suspect)) {
            if never_registered {
                *self
                    .failed_starts
                    .lock()
                    .expect("lock")
                    .entry(id)
                    .or_default() += 1;
            }
            self.spawn_restart(id);
        }
    }

    /// The heartbeat monitor: sleeps until the earliest deadline, declares
    /// the overdue dead. No polling: a heartbeat only moves deadlines later.
    pub fn spawn_health_monitor(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let timeout = me.cfg.heartbeat_timeout;
            loop {
                let deadline = me
                    .with_state(|s| s.next_deadline(timeout))
                    .unwrap_or_else(|| Instant::now() + timeout);
                tokio::time::sleep_until(deadline.into()).await;
                let overdue = me.with_state(|s| s.overdue(Instant::now(), timeout));
                for (id, inc) in overdue {
                    me.with_state(|s| s.metrics.missed_heartbeats.inc());
                    let reason = format!("no heartbeat for {:.1}s", timeout.as_secs_f64());
                    me.died(id, inc, &reason, false);
                }
            }
        });
    }

    /// Deaths the runtime saw by itself (a process exit, a container event).
    pub fn spawn_runtime_events(
        self: &Arc<Self>,
        mut events: mpsc::UnboundedReceiver<RuntimeEvent>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    RuntimeEvent::Exited {
                        worker_id,
                        incarnation,
                        detail,
                    } => me.died(worker_id, incarnation, &detail, true),
                }
            }
        });
    }

    /// Waits until task `id` is final or `wait` has passed; `None` if unknown.
    pub async fn wait_task(&self, id: TaskId, wait: Duration) -> Option<TaskView> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = self.with_state(|s| s.wait_for(id, tx))?;
        if !done && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
        self.with_state(|s| s.task(id))
    }

    /// `GET /tasks`: one page of the task listing (see `Scheduler::list_tasks`).
    pub fn list_tasks(
        &self,
        after: TaskId,
        state: Option<crate::scheduler::TaskState>,
        node: Option<WorkerId>,
        limit: usize,
    ) -> (Vec<TaskView>, Option<TaskId>) {
        self.with_state(|s| s.list_tasks(after, state, node, limit, LIST_SCAN))
    }

    /// The completion feed: tasks finished after position `after`, waiting
    /// up to `wait` for the first one.
    pub async fn finished_after(
        &self,
        after: usize,
        limit: usize,
        wait: Duration,
    ) -> (Vec<TaskView>, usize) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (tasks, next) = self.with_state(|s| s.completions_after(after, limit));
            if !tasks.is_empty() {
                return (tasks, next);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (tasks, next);
            }
        }
    }

    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.runtime.shutdown().await;
    }
}
