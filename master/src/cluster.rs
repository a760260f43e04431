//! The running cluster: the scheduling state under one mutex, the runtime
//! that starts workers, and the reactions to deaths (requeue, restart).
//!
//! `Cluster` is the only door to the scheduling state: HTTP handlers, the
//! health monitor and the runtime's event stream call its methods, each one
//! short critical section that never spans an `.await`. Whoever waits for a
//! transition (a poll for its next task, a lock request for its grant, a
//! client for a task's end, for the completion feed, for room in a queue,
//! for the workers to register) waits the same way: see [`Pending`].

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flotilla_proto::api::{NodeView, ResourceView};
use flotilla_proto::{
    Assignment, Incarnation, LockGrant, LockMode, StopAttempt, TaskId, TaskReport, TaskSpec,
    WorkerId,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::dashboard::{
    AttemptRow, ClusterHeader, Cursor, Running, TaskDetail, TaskRow, Update, WorkerCard,
};
use crate::metrics::{Metrics, Snapshot};
use crate::resources::ResourceType;
use crate::runtime::{Runtime, RuntimeError, RuntimeEvent, WorkerLaunch};
use crate::scheduler::{
    AdoptedWorker, CancelError, LockCallError, Refusal, Scheduler, SubmitError, TaskState,
    TaskView, WorkerState,
};
use crate::store::{Store, StoreError};

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
    /// The environment every worker gets from its master (log and trace
    /// settings).
    pub worker_env: Vec<(String, String)>,
    /// How long a finished task stays readable (`spec.resultTtlSeconds`).
    pub result_ttl: Duration,
    /// `spec.taskTimeoutSeconds`: the timeout of tasks that give none.
    pub task_timeout: Option<f64>,
    /// `spec.maxWorkers`: `/add` beyond it is refused.
    pub max_workers: usize,
    /// `spec.masterGraceSeconds`: told to each worker when it registers.
    pub master_grace: Duration,
    /// `spec.telemetry.jaegerUrl`: the dashboard links each task's trace
    /// there.
    pub jaeger_url: Option<String>,
    /// This start of the master, as its claim on the cluster records it;
    /// every response carries it (`Flotilla-Master-Session`), so that a
    /// second master can tell this one is alive.
    pub session: String,
    /// `spec.memoryRetention`: how long finished tasks stay in memory.
    pub retention: Retention,
}

/// How many finished tasks the master keeps in memory, and for how long
/// (`spec.memoryRetention`). Past either limit a finished task leaves
/// memory, oldest first; with a store it is read back from there until
/// the result TTL, without one it is gone (`GET /tasks/{id}` then answers
/// 410).
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// `finishedTasks`: finished tasks kept in memory at most.
    pub finished_tasks: usize,
    /// `seconds`: how long a finished task stays in memory at most.
    pub age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_tasks: 10_000,
            age: Duration::from_secs(60),
        }
    }
}

/// Finished tasks taken out of memory at most per critical section.
const RETIRE_BUDGET: usize = 4_096;

/// What `GET /tasks/{id}` finds.
#[derive(Debug)]
pub enum Lookup {
    Found(TaskView),
    /// Handed out, finished, and its result is no longer kept: with a
    /// store, past the result TTL; without one, also past the retention.
    Gone,
    /// Never handed out.
    Unknown,
}

/// The default of `spec.maxWorkers`.
pub const DEFAULT_MAX_WORKERS: usize = 64;

/// Why `/add` did not add a worker.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(
        "the cluster already has {0} workers, its limit (spec.maxWorkers); no worker was added"
    )]
    Limit(usize),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
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
            worker_env: Vec::new(),
            result_ttl: Duration::from_secs(24 * 3600),
            task_timeout: None,
            max_workers: DEFAULT_MAX_WORKERS,
            master_grace: Duration::from_secs(60),
            jaeger_url: None,
            session: random_secret()[..16].to_string(),
            retention: Retention::default(),
        }
    }
}

pub struct Cluster {
    sched: Mutex<Scheduler>,
    runtime: Arc<dyn Runtime>,
    pub cfg: ClusterConfig,
    /// The cluster's key for worker credentials. Never sent anywhere: each
    /// worker incarnation gets its own credential derived from it (see
    /// [`Cluster::worker_credential`]).
    pub worker_secret: String,
    /// Which master this is: the store's count of masters on the state
    /// directory, or the start time (Unix ms) when nothing is kept. Every
    /// response carries it (`Flotilla-Master-Incarnation`).
    pub master_incarnation: u64,
    master_url: OnceLock<String>,
    /// Beside the state: counts what its transitions did.
    metrics: Metrics,
    /// Consecutive failed starts per worker, for restart backoff.
    failed_starts: Mutex<std::collections::HashMap<WorkerId, u32>>,
    /// Set on shutdown: deaths are then expected, nothing is restarted.
    stopping: std::sync::atomic::AtomicBool,
    /// Set by a drain: new tasks are refused.
    draining: std::sync::atomic::AtomicBool,
    /// The durable state (`None`: ephemeral). Every transition's journal is
    /// appended to it inside the same critical section, so in order.
    store: Option<Arc<Store>>,
    /// Per worker slot: the incarnation and the store sequence number of
    /// its last poll's changes (what its next poll's `kept` report needs
    /// durable). Bounded by the slots of the workers.
    slot_seqs: Mutex<std::collections::HashMap<(WorkerId, u32), (Incarnation, u64)>>,
    /// The scheduler's activity revision, published after every critical
    /// section that moved it: the dashboard's live updates wait on this.
    changes: tokio::sync::watch::Sender<u64>,
    /// When this master started (the dashboard's uptime).
    started: Instant,
    /// Throughput and queue length, one sample a second (the dashboard's
    /// charts).
    series: Mutex<crate::dashboard::Series>,
    /// The dashboard's shared live updates (see [`crate::dashboard::Hub`]).
    hub: crate::dashboard::Hub,
    /// Set when another master took the cluster's claim over (see
    /// [`Cluster::claim_lost`]).
    claim_lost: tokio::sync::watch::Sender<Option<String>>,
}

pub fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// A cluster; with a `store`, every transition is kept in it and the
    /// worker secret is the one the store holds.
    pub fn new(
        cfg: ClusterConfig,
        runtime: Arc<dyn Runtime>,
        store: Option<(Arc<Store>, String, u64)>,
    ) -> Arc<Self> {
        let mut sched = Scheduler::new(cfg.max_attempts);
        sched.set_task_timeout(cfg.task_timeout);
        let (store, worker_secret, master_incarnation) = match store {
            Some((store, secret, incarnation)) => {
                sched.keep_journal();
                sched.set_lease_secret(&secret);
                sched.set_epoch(incarnation);
                (Some(store), secret, incarnation)
            }
            None => (None, random_secret(), crate::scheduler::unix_ms()),
        };
        Arc::new(Cluster {
            sched: Mutex::new(sched),
            runtime,
            cfg,
            worker_secret,
            master_incarnation,
            master_url: OnceLock::new(),
            metrics: Metrics::default(),
            failed_starts: Mutex::new(Default::default()),
            stopping: Default::default(),
            draining: Default::default(),
            store,
            slot_seqs: Mutex::new(Default::default()),
            changes: tokio::sync::watch::Sender::new(0),
            started: Instant::now(),
            series: Mutex::new(Default::default()),
            hub: Default::default(),
            claim_lost: tokio::sync::watch::Sender::new(None),
        })
    }

    /// Waits until another master has taken this cluster's claim over (this
    /// one was not heard from for its lease); says how. From then on this
    /// master must leave the workers alone: `flotilla up` stops.
    pub async fn claim_lost(&self) -> String {
        let mut rx = self.claim_lost.subscribe();
        let got = rx.wait_for(|l| l.is_some()).await;
        match got {
            Ok(detail) => detail.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// The runtime's name (`process`, `docker`, `kubernetes`).
    pub fn runtime_name(&self) -> &'static str {
        self.runtime.name()
    }

    /// Where the runtime's workers reach this master (see
    /// `Runtime::worker_endpoint`).
    pub async fn worker_endpoint(
        &self,
        advertised: Option<&str>,
        api: &str,
    ) -> Result<crate::runtime::WorkerEndpoint, RuntimeError> {
        self.runtime.worker_endpoint(advertised, api).await
    }

    /// Where the runtime runs `worker`'s `incarnation` (`pid 123`, a
    /// container, a pod), if it is that incarnation.
    pub async fn locate(&self, worker: WorkerId, incarnation: Incarnation) -> Option<String> {
        self.runtime
            .inspect(worker)
            .await
            .filter(|h| h.incarnation == incarnation)
            .map(|h| h.locator)
    }

    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Waits until every transition made so far is durable (at once when
    /// the state is ephemeral). Submissions, published lock releases and
    /// results are acknowledged only after this.
    pub async fn durable(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.flush().await,
            None => Ok(()),
        }
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

    /// Runs `f` on the scheduling state: one short critical section. The
    /// transitions inside fire whatever waits for them, and what they
    /// changed is appended to the store in the same critical section (so in
    /// order).
    fn with_state<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        self.with_state_seq(f).0
    }

    /// [`Cluster::with_state`], also returning the store's sequence number
    /// that covers the changes made (0 without a store): once it is
    /// durable, so are they.
    fn with_state_seq<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> (R, u64) {
        let mut s = self.sched.lock().expect("scheduler lock poisoned");
        let out = f(&mut s);
        for tally in s.drain_tallies() {
            self.metrics.record(tally);
        }
        s.note_lock_grants();
        let revision = s.activity.revision();
        if *self.changes.borrow() != revision {
            self.changes.send_replace(revision);
        }
        let mut seq = 0;
        if let Some(store) = &self.store {
            let ops = s.take_journal();
            seq = if ops.is_empty() {
                store.last_seq()
            } else {
                store.append(ops)
            };
        }
        (out, seq)
    }

    fn credential_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.worker_secret.as_bytes())
    }

    /// The credential of one worker incarnation: `<id>.<incarnation>.<HMAC of
    /// both under the cluster key>`. It names the one worker it speaks for,
    /// and a new incarnation's credential says nothing about the old one's.
    pub fn worker_credential(&self, worker: WorkerId, incarnation: Incarnation) -> String {
        let tag = ring::hmac::sign(
            &self.credential_key(),
            format!("{worker}/{incarnation}").as_bytes(),
        );
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{worker}.{incarnation}.{hex}")
    }

    /// The worker incarnation a credential was issued to, if it is genuine
    /// (checked in constant time by `ring`).
    pub fn verify_credential(&self, credential: &str) -> Option<(WorkerId, Incarnation)> {
        let mut parts = credential.splitn(3, '.');
        let worker: WorkerId = parts.next()?.parse().ok()?;
        let incarnation: Incarnation = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .ok()?;
        ring::hmac::verify(
            &self.credential_key(),
            format!("{worker}/{incarnation}").as_bytes(),
            &tag,
        )
        .ok()
        .map(|()| (worker, incarnation))
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
            secret: self.worker_credential(worker_id, incarnation),
            inherited_env: self.cfg.worker_env.clone(),
        }
    }

    /// Bounded memory, in the background. Every half second (at most a
    /// quarter of the retention age) finished tasks beyond the retention
    /// window leave memory, oldest first, a bounded batch per critical
    /// section so dispatch never waits long; with a store, only once their
    /// result is committed (reads then find them there). Every quarter of
    /// the result TTL (at most every minute) the store is told to delete
    /// results past it, which its writer thread does in bounded steps
    /// between commits.
    pub fn spawn_retention(self: &Arc<Self>) {
        let me = self.clone();
        let ttl = self.cfg.result_ttl;
        let keep = self.cfg.retention.finished_tasks;
        let age = self.cfg.retention.age;
        let every = (age / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let expire_every = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_expiry = Instant::now();
            loop {
                tick.tick().await;
                let now = crate::scheduler::unix_ms();
                let ttl_cutoff = now.saturating_sub(ttl.as_millis() as u64);
                if let Some(store) = &me.store {
                    if last_expiry.elapsed() >= expire_every {
                        last_expiry = Instant::now();
                        store.expire(ttl_cutoff);
                    }
                }
                let finished_before = now.saturating_sub(age.as_millis() as u64).max(ttl_cutoff);
                let mut retired = 0;
                loop {
                    // Everything finished up to here has been appended to
                    // the store (inside the same critical section):
                    // once that is committed, it may leave memory.
                    let feed_len = me.with_state(|s| s.feed_len());
                    let durable_below = match &me.store {
                        Some(store) => match store.flush().await {
                            Ok(()) => feed_len,
                            Err(_) => break, // reported by the writes
                        },
                        None => u64::MAX,
                    };
                    let rule = crate::scheduler::Retire {
                        keep,
                        finished_before,
                        durable_below,
                        budget: RETIRE_BUDGET,
                    };
                    let (n, more) = me.with_state(|s| s.retire(&rule));
                    retired += n;
                    if !more {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if retired > 0 {
                    tracing::debug!(retired, "finished tasks left memory");
                }
            }
        });
    }

    /// Whether `id` was handed out and is not in memory: it finished and
    /// left (read it from the store, if one keeps it).
    pub fn expired(&self, id: TaskId) -> bool {
        self.with_state(|s| s.handed_out(id) && s.task(id).is_none())
    }

    /// Where a task is: in memory, or (finished) in the store, or gone.
    async fn lookup(&self, id: TaskId) -> Result<Lookup, StoreError> {
        let (view, handed_out) = self.with_state(|s| (s.task(id), s.handed_out(id)));
        if let Some(view) = view {
            return Ok(Lookup::Found(view));
        }
        if !handed_out {
            return Ok(Lookup::Unknown);
        }
        // Not in memory, so finished and retired: committed before it left.
        let Some(store) = self.store.clone() else {
            return Ok(Lookup::Gone);
        };
        let rec = tokio::task::spawn_blocking(move || store.task(id))
            .await
            .expect("a store read does not panic")?;
        Ok(match rec {
            Some(rec) => Lookup::Found(record_view(&rec)),
            None => Lookup::Gone,
        })
    }

    /// Accepted tasks not final yet.
    pub fn unfinished(&self) -> usize {
        self.with_state(|s| s.unfinished())
    }

    /// Whether new tasks are accepted (not while draining).
    pub fn accepting(&self) -> bool {
        !self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// SIGTERM without a store: refuse new tasks and wait up to `limit` for
    /// the accepted ones to finish. Returns how many are still unfinished.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        loop {
            let (tx, rx) = oneshot::channel();
            let left = self.with_state(|s| {
                let left = s.unfinished();
                if left > 0 {
                    s.wait_for_completion(tx);
                }
                left
            });
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            let woken = self
                .pending(rx, |s, _| s.forget_abandoned_waiters())
                .wait(Some(deadline))
                .await;
            if matches!(woken, Woken::TimedOut) {
                return self.unfinished();
            }
        }
    }

    /// The first task ID to hand out (see `Scheduler::set_next_task_id`).
    pub fn set_next_task_id(&self, next: TaskId) {
        self.with_state(|s| s.set_next_task_id(next));
    }

    /// Startup: the manifest's workers, known to the scheduler but not
    /// started yet (so a restore can give them back their queues).
    pub fn add_workers_unstarted(&self, capacities: &[usize]) -> Vec<WorkerId> {
        self.with_state(|s| capacities.iter().map(|&c| s.add_worker(c).0).collect())
    }

    /// Startup, after the manifest's workers: the store's workers beyond
    /// them (added through `/add` under an earlier master), in ID order,
    /// with their recorded capacities, not started yet. Worker IDs are
    /// dense (`/add` takes the next one), so each gets its own ID back.
    pub fn add_recorded_workers(&self, rec: &crate::store::Recovered) -> Vec<WorkerId> {
        self.with_state(|s| {
            let mut extra: Vec<_> = rec
                .workers
                .iter()
                .filter(|w| w.id as usize >= s.worker_count())
                .collect();
            extra.sort_by_key(|w| w.id);
            let mut ids = Vec::new();
            for w in extra {
                if w.id as usize != s.worker_count() {
                    warn!(
                        worker = w.id,
                        "the store skips worker IDs before node {}; it is not taken back", w.id
                    );
                    break;
                }
                ids.push(s.add_worker(w.capacity).0);
            }
            ids
        })
    }

    /// Takes back what the previous master on this state directory left:
    /// resource values and versions, then tasks and workers (see
    /// `Scheduler::restore`).
    pub fn restore(
        &self,
        rec: &crate::store::Recovered,
        adopted: &[AdoptedWorker],
    ) -> Result<(), crate::resources::ResourceError> {
        self.with_state(|s| {
            for r in &rec.resources {
                s.locks.restore(r)?;
            }
            s.restore(rec, adopted);
            Ok(())
        })
    }

    /// Startup, before `restore`: asks the runtime to take over each worker
    /// incarnation the previous master started (the store keeps the
    /// runtime's handle of each) and that this manifest still has. Returns
    /// those it found running; then removes what it left and did not adopt
    /// (see `Runtime::remove_leftovers`).
    pub async fn adopt_workers(
        &self,
        rec: &crate::store::Recovered,
    ) -> Result<Vec<AdoptedWorker>, RuntimeError> {
        let count = self.with_state(|s| s.worker_count());
        let mut adopted = Vec::new();
        for wr in rec.workers.iter().filter(|w| (w.id as usize) < count) {
            let Some(key) = wr.handle.clone() else {
                continue;
            };
            let candidate = crate::runtime::Adoptable {
                worker_id: wr.id,
                incarnation: wr.incarnation,
                key,
            };
            match self.runtime.adopt(&candidate).await {
                Ok(Some(h)) => adopted.push(AdoptedWorker {
                    id: wr.id,
                    incarnation: wr.incarnation,
                    locator: h.locator,
                    handle: h.key,
                }),
                Ok(None) => info!(
                    worker = wr.id,
                    incarnation = wr.incarnation,
                    "Node {} of the previous master is gone; it is started again",
                    wr.id
                ),
                Err(e) => {
                    warn!(worker = wr.id, error = %e, "cannot adopt; the worker is started again")
                }
            }
        }
        self.runtime.remove_leftovers().await?;
        Ok(adopted)
    }

    /// Startup without a store: removes what an earlier master of this
    /// cluster left (see `Runtime::remove_leftovers`).
    pub async fn remove_leftovers(&self) -> Result<(), RuntimeError> {
        self.runtime.remove_leftovers().await
    }

    /// Keeps the runtime's handle of a worker it just started, for the
    /// next master to adopt it by.
    async fn record_handle(&self, id: WorkerId, inc: Incarnation) {
        if self.store.is_none() {
            return;
        }
        if let Some(h) = self.runtime.inspect(id).await {
            if h.incarnation == inc {
                self.with_state(|s| s.set_handle(id, inc, h.key));
            }
        }
    }

    /// Startup and `/add`: a new worker ID, started by the runtime.
    pub async fn add_worker(&self, capacity: usize) -> Result<WorkerId, AddError> {
        let max = self.cfg.max_workers;
        let (id, _) = self
            .with_state(|s| (s.worker_count() < max).then(|| s.add_worker(capacity)))
            .ok_or(AddError::Limit(max))?;
        self.start_worker(id).await?;
        Ok(id)
    }

    /// Starts a worker the scheduler already has (at startup, after the
    /// state was restored).
    pub async fn start_worker(&self, id: WorkerId) -> Result<(), crate::runtime::RuntimeError> {
        let Some((inc, capacity)) =
            self.with_state(|s| s.worker(id).map(|w| (w.incarnation, w.capacity)))
        else {
            return Ok(());
        };
        info!(
            worker = id,
            capacity, "Node {id} added with capacity {capacity}"
        );
        self.runtime.start(self.launch(id, inc, capacity)).await?;
        self.record_handle(id, inc).await;
        Ok(())
    }

    /// `/stop/{node}`: kill it for real, then recover as from any death.
    pub async fn stop_worker(self: &Arc<Self>, id: WorkerId) -> Result<(), StopError> {
        let inc = self.with_state(|s| s.worker(id).map(|w| w.incarnation));
        let Some(inc) = inc else {
            return Err(StopError::UnknownNode(id));
        };
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
        self.metrics.worker_restarted();
        match self.runtime.start(self.launch(id, inc, capacity)).await {
            Ok(()) => {
                info!(worker = id, incarnation = inc, "Node {id} restarted");
                self.record_handle(id, inc).await;
            }
            // Declared dead at once (not after the start-up grace, which is
            // for a start that worked and is still warming): restarted again
            // with the growing delay of a worker that never registered.
            Err(e) => {
                error!(worker = id, error = %e, "restart failed");
                self.died(id, inc, &format!("its start failed: {e}"), false);
            }
        }
    }

    /// A worker registered: its start worked.
    fn started_ok(&self, id: WorkerId) {
        self.failed_starts.lock().expect("lock").remove(&id);
    }

    fn died(self: &Arc<Self>, id: WorkerId, inc: Incarnation, reason: &str, task_suspect: bool) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let (never_registered, dead) = self.with_state(|s| {
            let never_registered = s
                .worker(id)
                .is_some_and(|w| w.incarnation == inc && w.state == WorkerState::Starting);
            (
                never_registered,
                s.declare_dead(id, inc, reason, task_suspect),
            )
        });
        if dead {
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

    /// The heartbeat monitor: sleeps until the earliest deadline (or one
    /// heartbeat timeout, whichever is sooner), declares the overdue dead. A
    /// heartbeat only moves deadlines later; a registration can move one
    /// earlier, seen at the next wake, which comes before that deadline.
    pub fn spawn_health_monitor(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let timeout = me.cfg.heartbeat_timeout;
            loop {
                // At most one heartbeat timeout at a time: a registration
                // moves a worker's deadline earlier (from its start-up
                // grace to one timeout), which this sleep would not see.
                let deadline = me
                    .with_state(|s| s.next_deadline(timeout))
                    .unwrap_or_else(|| Instant::now() + timeout)
                    .min(Instant::now() + timeout);
                tokio::time::sleep_until(deadline.into()).await;
                let overdue = me.with_state(|s| s.overdue(Instant::now(), timeout));
                for (id, inc, starting) in overdue {
                    me.metrics.heartbeat_missed();
                    let reason = if starting {
                        format!(
                            "not registered {:.0}s after its start",
                            timeout.max(crate::scheduler::STARTUP_GRACE).as_secs_f64()
                        )
                    } else {
                        format!("no heartbeat for {:.1}s", timeout.as_secs_f64())
                    };
                    me.with_state(|s| {
                        s.activity.event(
                            crate::scheduler::activity::EventKind::MissedHeartbeat,
                            Some(id),
                            None,
                            format!("node {id} incarnation {inc} missed its heartbeats ({reason})"),
                        )
                    });
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
                    RuntimeEvent::ClaimLost { detail } => {
                        error!(%detail, "this master lost its claim on the cluster");
                        me.claim_lost.send_replace(Some(detail));
                    }
                }
            }
        });
    }

    // ----- tasks ---------------------------------------------------------

    /// `/send` and `POST /tasks`: into the master queue, in order.
    pub fn submit(&self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        self.with_state(|s| specs.into_iter().map(|spec| s.submit(spec)).collect())
    }

    /// `/send/{node}`: straight into that worker's queue, waiting while it
    /// is full (woken each time a queue shrinks).
    pub async fn submit_to(&self, node: WorkerId, spec: TaskSpec) -> Result<TaskId, SubmitError> {
        loop {
            let (tx, rx) = oneshot::channel();
            let full = self.with_state(|s| match s.submit_to(node, spec.clone()) {
                Err(SubmitError::Full(_)) => {
                    s.wait_for_room(tx);
                    None
                }
                done => Some(done),
            });
            if let Some(done) = full {
                return done;
            }
            self.pending(rx, |s, _| s.forget_abandoned_waiters())
                .wait(None)
                .await;
        }
    }

    /// A task as it is now, after waiting up to `wait` for it to be final
    /// (from memory, or from the store once it has left memory).
    pub async fn wait_task(&self, id: TaskId, wait: Duration) -> Result<Lookup, StoreError> {
        if !wait.is_zero() {
            // One waiter per request; dropped with the request (the
            // scheduler prunes waiters whose request went away).
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.with_state(|s| s.wait_for(id, tx)) == Some(false) {
                self.pending(rx, |_, _| {})
                    .wait(Some(Instant::now() + wait))
                    .await;
            }
        }
        let found = self.lookup(id).await?;
        if let Lookup::Found(view) = &found {
            if view.state.is_final() {
                // Never show a result a restart could take back.
                self.durable_reads().await?;
            }
        }
        Ok(found)
    }

    /// Client reads of final results wait until they are durable, so what a
    /// client saw (a result, a place in the completion feed) is still there
    /// after a restart. When the store cannot make them durable (it failed,
    /// or it is closed because the master is stopping) the read is refused
    /// rather than shown: a restart would take it back.
    async fn durable_reads(&self) -> Result<(), StoreError> {
        self.durable().await.inspect_err(|e| {
            warn!(error = %e, "not showing results that are not durable");
        })
    }

    /// `DELETE /tasks/{id}`: see `Scheduler::cancel`; the state it was in.
    pub fn cancel(&self, id: TaskId) -> Result<TaskState, CancelError> {
        self.with_state(|s| s.cancel(id).map_err(|e| left_memory(s, e)))
    }

    /// Bulk cancel: the tasks in `state` (all of them, or only those in
    /// `ids`), or else those in `ids`, in one critical section. The
    /// cancelled IDs, and the others with the reason.
    pub fn cancel_many(
        &self,
        state: Option<TaskState>,
        ids: Option<&[TaskId]>,
    ) -> (Vec<TaskId>, Vec<(TaskId, CancelError)>) {
        self.with_state(|s| {
            let targets = match (state, ids) {
                (Some(state), Some(ids)) => {
                    let mut t = s.task_ids_in(state);
                    t.retain(|t| ids.contains(t));
                    t
                }
                (Some(state), None) => s.task_ids_in(state),
                (None, Some(ids)) => ids.to_vec(),
                (None, None) => Vec::new(),
            };
            let mut cancelled = Vec::new();
            let mut refused = Vec::new();
            for tid in targets {
                match s.cancel(tid) {
                    Ok(_) => cancelled.push(tid),
                    Err(e) => refused.push((tid, left_memory(s, e))),
                }
            }
            (cancelled, refused)
        })
    }

    /// `GET /tasks`: one page of the task listing, tasks in ID order. The
    /// scheduler gives the tasks in memory (see `Scheduler::list_tasks`),
    /// the store those that left memory (feed positions below the memory's
    /// base, read in the same ID range): the two never overlap, and a task
    /// retired between the two reads was already in the first.
    pub async fn list_tasks(
        &self,
        after: TaskId,
        state: Option<TaskState>,
        node: Option<WorkerId>,
        limit: usize,
    ) -> Result<(Vec<TaskView>, Option<TaskId>), StoreError> {
        let (mut page, end, more, feed_below) = self.with_state(|s| {
            let (page, end, more) = s.list_tasks(after, state, node, limit, LIST_SCAN);
            (page, end, more, s.feed_base())
        });
        let query = crate::store::FinishedQuery {
            after,
            end,
            feed_below,
            state: state.map(|s| s.name()),
            node,
            limit,
        };
        // Only finished tasks leave memory.
        if state.is_none_or(|s| s.is_final()) {
            self.merge_stored(&mut page, query, record_view, |t| t.id)
                .await?;
        }
        let next = crate::scheduler::listing_next(&page, |t| t.id, limit, end, more);
        Ok((page, next))
    }

    /// The store's part of a task listing: the finished tasks of `query`'s
    /// range that left memory (feed positions below `query.feed_below`),
    /// merged
    /// into the memory's `page` in ID order and cut to `query.limit`. The
    /// two parts never overlap (see `Scheduler::retire`).
    async fn merge_stored<T>(
        &self,
        page: &mut Vec<T>,
        query: crate::store::FinishedQuery<'static>,
        show: impl Fn(&crate::store::TaskRecord) -> T,
        id: impl Fn(&T) -> TaskId,
    ) -> Result<(), StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        if query.feed_below == 0 {
            return Ok(());
        }
        let limit = query.limit;
        let rows = tokio::task::spawn_blocking(move || store.finished(&query))
            .await
            .expect("a store read does not panic")?;
        page.extend(rows.iter().map(show));
        page.sort_unstable_by_key(|t| id(t));
        page.truncate(limit);
        Ok(())
    }

    /// The completion feed: tasks finished from position `after`, waiting
    /// up to `wait` for the first one. Positions that left memory are read
    /// from the store (expired ones are skipped); without a store they are
    /// skipped.
    pub async fn finished_after(
        &self,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<(Vec<TaskView>, u64), StoreError> {
        let deadline = Instant::now() + wait;
        let mut after = after;
        loop {
            let (tx, rx) = oneshot::channel();
            let page = self.with_state(|s| {
                let page = s.completions_after(after, limit);
                if matches!(&page, Ok((tasks, _)) if tasks.is_empty()) {
                    s.wait_for_completion(tx);
                }
                page
            });
            let (tasks, next) = match page {
                Ok(page) => page,
                Err(base) => {
                    if let Some(store) = self.store.clone() {
                        let rows =
                            tokio::task::spawn_blocking(move || store.feed(after, base, limit))
                                .await
                                .expect("a store read does not panic")?;
                        if !rows.is_empty() {
                            let next = if rows.len() == limit {
                                rows.last().and_then(|r| r.feed_pos).map_or(base, |p| p + 1)
                            } else {
                                base
                            };
                            return Ok((rows.iter().map(record_view).collect(), next));
                        }
                    }
                    after = base;
                    continue;
                }
            };
            if !tasks.is_empty() {
                self.durable_reads().await?;
                return Ok((tasks, next));
            }
            if Instant::now() >= deadline {
                return Ok((tasks, next));
            }
            let woken = self
                .pending(rx, |s, _| s.forget_abandoned_waiters())
                .wait(Some(deadline))
                .await;
            if matches!(woken, Woken::TimedOut) {
                return Ok((tasks, next));
            }
        }
    }

    // ----- workers, as the API sees them -------------------------------

    pub fn nodes(&self) -> Vec<NodeView> {
        self.with_state(|s| s.nodes())
    }

    /// `GET /health`'s figures.
    pub fn health(&self) -> flotilla_proto::api::Health {
        let (nodes, master_queue, tasks, steals) =
            self.with_state(|s| (s.nodes(), s.master_queue_len(), s.task_count(), s.steals()));
        flotilla_proto::api::Health {
            status: "ok".into(),
            cluster: self.cfg.name.clone(),
            runtime: self.runtime.name().into(),
            nodes: nodes.len(),
            active_nodes: nodes
                .iter()
                .filter(|n| n.state == WorkerState::Active)
                .count(),
            master_queue,
            tasks,
            steals,
        }
    }

    /// `GET /metrics`: the OpenMetrics text, gauges read now.
    pub fn metrics_text(&self) -> String {
        let now = self.with_state(|s| Snapshot {
            tasks_by_state: s.tasks_by_state(),
            nodes: s.nodes(),
            master_queue: s.master_queue_len(),
            store: None,
        });
        let now = Snapshot {
            store: self.store.as_ref().map(|st| st.stats()),
            ..now
        };
        self.metrics.render(&now)
    }

    /// Waits until every worker has registered (or `timeout`): the active
    /// and total counts when it gives up.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), (usize, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            let (active, total) = self.with_state(|s| {
                let nodes = s.nodes();
                let active = nodes
                    .iter()
                    .filter(|n| n.state == WorkerState::Active)
                    .count();
                if active < nodes.len() {
                    s.wait_for_registration(tx);
                }
                (active, nodes.len())
            });
            if active == total {
                return Ok(());
            }
            let woken = self
                .pending(rx, |s, _| s.forget_abandoned_waiters())
                .wait(Some(deadline))
                .await;
            if matches!(woken, Woken::TimedOut) {
                return Err((active, total));
            }
        }
    }

    // ----- the dashboard --------------------------------------------------

    /// Changes after every critical section that moved the scheduler's
    /// activity revision (any transition).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The dashboard's tick: one live update shared by every open page.
    pub fn dashboard_hub(&self) -> &crate::dashboard::Hub {
        &self.hub
    }

    /// Counts `cpu` (this thread's CPU time, see
    /// [`crate::dashboard::thread_cpu`]) as the dashboard's
    /// (`flotilla_dashboard_cpu_seconds_total`).
    pub fn dashboard_cpu(&self, cpu: Duration) {
        self.metrics.dashboard_cpu(cpu.as_secs_f64());
    }

    /// Runs `f` on the scheduling state for the dashboard, counting the
    /// time it held the lock (`flotilla_dashboard_lock_seconds_total`).
    fn with_state_for_dashboard<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        let (out, held) = self.with_state(|s| {
            let t0 = Instant::now();
            let out = f(s);
            (out, t0.elapsed())
        });
        self.metrics.dashboard_locked(held.as_secs_f64());
        out
    }

    /// Dashboard updates, one per cursor: the cluster as it is now, and the
    /// bars, events and samples each cursor has not been sent yet (each
    /// cursor then moved past them). All are read in one critical section,
    /// so updates built together end at the same positions; its work is
    /// bounded by the number of workers, slots and resources, and by the
    /// update's limits, never by the number of tasks. Serialising them is
    /// the caller's, outside the lock.
    pub fn dashboard_updates(&self, cursors: &mut [&mut Cursor]) -> Vec<Update> {
        let (max_bars, max_events) = crate::dashboard::UPDATE_LIMITS;
        let (counts, master_queue, next_task_id, nodes, slots, running, fresh, resources) = self
            .with_state_for_dashboard(|s| {
                let nodes = s.nodes();
                let slots: Vec<u32> = nodes
                    .iter()
                    .map(|n| s.worker(n.id).map_or(1, |w| w.slots))
                    .collect();
                let fresh: Vec<_> = cursors
                    .iter()
                    .map(|c| {
                        (
                            s.activity.bars_after(c.bars, max_bars),
                            s.activity.events_after(c.events, max_events),
                        )
                    })
                    .collect();
                (
                    s.state_counts(),
                    s.master_queue_len(),
                    s.next_task_id(),
                    nodes,
                    slots,
                    s.running_attempts(),
                    fresh,
                    s.locks.previews(
                        crate::dashboard::HOLDERS_SHOWN,
                        crate::dashboard::value_preview,
                    ),
                )
            });
        let samples: Vec<_> = {
            let series = self.series.lock().expect("series lock");
            cursors
                .iter()
                .map(|c| {
                    let (fresh, last) = series.after(c.samples);
                    (fresh, last, series.throughput_now())
                })
                .collect()
        };
        let now = crate::scheduler::unix_ms();
        let workers: Vec<WorkerCard> = nodes
            .into_iter()
            .zip(slots)
            .map(|(node, slots)| WorkerCard {
                cpu_quota: self.runtime.cpu_quota(node.capacity),
                slots,
                node,
            })
            .collect();
        let running: Vec<Running> = running
            .into_iter()
            .map(|(worker, slot, task, attempt, started_at)| Running {
                worker,
                slot,
                task,
                attempt,
                started_at,
            })
            .collect();
        let resources = Update::resource_rows(resources);
        cursors
            .iter_mut()
            .zip(fresh)
            .zip(samples)
            .map(
                |((cursor, (bars, events)), (series, last_sample, throughput))| {
                    self.metrics.dashboard_update_built();
                    let hello = !cursor.sent_any;
                    cursor.sent_any = true;
                    cursor.bars = bars.1;
                    cursor.events = events.1;
                    cursor.samples = last_sample;
                    Update {
                        hello,
                        now,
                        cluster: ClusterHeader {
                            name: self.cfg.name.clone(),
                            runtime: self.runtime.name(),
                            master_incarnation: self.master_incarnation,
                            uptime_s: self.started.elapsed().as_secs_f64(),
                            jaeger_url: self.cfg.jaeger_url.clone(),
                        },
                        counts: counts.clone(),
                        master_queue,
                        next_task_id,
                        throughput,
                        series,
                        workers: workers.clone(),
                        running: running.clone(),
                        bars: bars.0,
                        events: events.0,
                        resources: resources.clone(),
                    }
                },
            )
            .collect()
    }

    /// One dashboard update for `cursor` (see [`Self::dashboard_updates`]).
    pub fn dashboard_update(&self, cursor: &mut Cursor) -> Update {
        self.dashboard_updates(&mut [cursor])
            .pop()
            .expect("one update per cursor")
    }

    /// Samples throughput and queue lengths once a second for the
    /// dashboard's charts (one short critical section, O(workers)).
    pub fn spawn_dashboard_sampler(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let (completed, queued, running) = me.with_state(|s| {
                    let counts = s.state_counts();
                    let of = |state| {
                        counts
                            .iter()
                            .find(|(s, _)| *s == state)
                            .map_or(0, |(_, n)| *n)
                    };
                    (
                        s.completed_total(),
                        of(TaskState::Queued) + of(TaskState::Assigned),
                        of(TaskState::Running),
                    )
                });
                me.series.lock().expect("series lock").push(
                    crate::scheduler::unix_ms(),
                    completed,
                    queued,
                    running,
                );
            }
        });
    }

    /// One page of the dashboard's task table: the listing of `GET /tasks`
    /// (same parameters, same paging, see [`Self::list_tasks`]) in rows that
    /// carry no result, only a bounded summary, so the work under the lock
    /// is per row shown and copies no task's output.
    pub async fn dashboard_rows(
        &self,
        after: TaskId,
        state: Option<TaskState>,
        node: Option<WorkerId>,
        limit: usize,
    ) -> Result<(Vec<TaskRow>, Option<TaskId>), StoreError> {
        let cpu = crate::dashboard::thread_cpu();
        let (mut page, end, more, feed_below) = self.with_state_for_dashboard(|s| {
            let (page, end, more) =
                s.list_tasks_as(after, state, node, limit, LIST_SCAN, TaskRow::of_task);
            (page, end, more, s.feed_base())
        });
        self.dashboard_cpu(crate::dashboard::thread_cpu().saturating_sub(cpu));
        let query = crate::store::FinishedQuery {
            after,
            end,
            feed_below,
            state: state.map(|s| s.name()),
            node,
            limit,
        };
        // Only finished tasks leave memory.
        if state.is_none_or(|s| s.is_final()) {
            self.merge_stored(&mut page, query, TaskRow::of_record, |t| t.id)
                .await?;
        }
        self.metrics.dashboard_rows_served(page.len());
        let next = crate::scheduler::listing_next(&page, |t| t.id, limit, end, more);
        Ok((page, next))
    }

    /// A task with its code, its attempts and its trace (the dashboard's
    /// task detail); a final result only once durable.
    pub async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>, StoreError> {
        let jaeger = self.cfg.jaeger_url.clone();
        let detail = self.with_state_for_dashboard(|s| {
            s.task_entry(id).map(|t| TaskDetail {
                view: t.view(),
                kind: t.spec.kind,
                code: t.spec.command.clone(),
                timeout: t.spec.timeout,
                attempt_log: t.attempt_log.iter().map(AttemptRow::from).collect(),
                trace_id: t.trace_id.clone(),
                jaeger: jaeger
                    .as_ref()
                    .zip(t.trace_id.as_ref())
                    .map(|(url, trace)| format!("{}/trace/{trace}", url.trim_end_matches('/'))),
            })
        });
        let detail = match detail {
            Some(detail) => detail,
            // A finished task that left memory: what the store keeps of it,
            // its attempts included (no trace: trace IDs are not stored).
            None => {
                let Some(store) = self.store.clone() else {
                    return Ok(None);
                };
                let handed_out = self.with_state(|s| s.handed_out(id));
                if !handed_out {
                    return Ok(None);
                }
                let read = tokio::task::spawn_blocking(move || {
                    let Some(rec) = store.task(id)? else {
                        return Ok(None);
                    };
                    let attempts = store.attempts(id)?;
                    Ok::<_, StoreError>(Some((rec, attempts)))
                })
                .await
                .expect("a store read does not panic")?;
                let Some((rec, attempts)) = read else {
                    return Ok(None);
                };
                TaskDetail {
                    view: record_view(&rec),
                    kind: rec.spec.kind,
                    attempt_log: AttemptRow::of_records(&attempts, rec.finished_at),
                    code: rec.spec.command,
                    timeout: rec.spec.timeout,
                    trace_id: None,
                    jaeger: None,
                }
            }
        };
        if detail.view.state.is_final() {
            self.durable_reads().await?;
        }
        Ok(Some(detail))
    }

    // ----- shared resources and locks ----------------------------------

    /// A new shared resource (manifest or `POST /resource`).
    pub fn create_resource(
        &self,
        name: &str,
        kind: ResourceType,
        value: Value,
    ) -> Result<(), crate::resources::ResourceError> {
        self.with_state(|s| s.locks.create(name, kind, value))
    }

    pub fn resources(&self) -> Vec<ResourceView> {
        self.with_state(|s| s.locks.views())
    }

    pub fn resource(&self, name: &str) -> Option<ResourceView> {
        self.with_state(|s| s.locks.view(name))
    }

    /// A lock request from task code (authenticated by its attempt's
    /// lease), answered when granted, or refused after `wait`. A request
    /// whose caller goes away leaves the queue; a grant made meanwhile is
    /// given back.
    pub async fn acquire_lock(
        &self,
        lease: &str,
        name: &str,
        mode: LockMode,
        wait: Option<Duration>,
        resend: bool,
    ) -> Result<LockGrant, LockCallError> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let id = self.with_state(|s| s.lock_acquire(lease, name, mode, tx, resend))?;
        let (lease_owned, name_owned) = (lease.to_string(), name.to_string());
        let woken = self
            .pending(rx, move |s, granted| {
                s.lock_cancel(&lease_owned, &name_owned, id, granted.as_ref())
            })
            .wait(wait.map(|w| started + w))
            .await;
        match woken {
            Woken::Fired(grant) => {
                let waited = started.elapsed().as_secs_f64();
                self.metrics.observe_lock_wait(name, mode, waited);
                Ok(grant)
            }
            Woken::Dropped => Err(LockCallError::Dropped {
                name: name.to_string(),
                mode,
            }),
            Woken::TimedOut => Err(LockCallError::TimedOut {
                name: name.to_string(),
                mode,
                after: wait.unwrap_or_default(),
            }),
        }
    }

    /// Releases a lock (a write release may publish a value with the
    /// grant's fencing token): the new version and whether it committed.
    /// `resend`: see `Scheduler::lock_release`.
    pub fn release_lock(
        &self,
        lease: &str,
        name: &str,
        mode: LockMode,
        publish: Option<(Value, u64)>,
        resend: bool,
    ) -> Result<(u64, bool), LockCallError> {
        self.with_state(|s| s.lock_release(lease, name, mode, publish, resend))
    }

    // ----- the worker protocol ------------------------------------------

    /// A worker registered: its capacity.
    /// A worker says hello with the slots it runs: at least 1, at most what
    /// the master gives a worker of its capacity (what it started it with).
    pub fn register(
        &self,
        id: WorkerId,
        inc: Incarnation,
        slots: u32,
        pid: Option<u32>,
        locator: Option<String>,
    ) -> Result<usize, Refusal> {
        let most = self.cfg.slots;
        let capacity = self.with_state(|s| {
            let capacity = s.worker(id).map(|w| w.capacity).unwrap_or(0);
            let most = most.min(capacity as u32).max(1);
            if slots == 0 || slots > most {
                return Err(Refusal::BadSlots {
                    worker: id,
                    asked: slots,
                    most,
                });
            }
            s.register(id, inc, slots, pid, locator)
        })?;
        self.started_ok(id);
        Ok(capacity)
    }

    pub fn heartbeat(&self, id: WorkerId, inc: Incarnation) -> Result<(), Refusal> {
        let now = Instant::now();
        self.with_state(|s| s.heartbeat(id, inc, now))
    }

    /// A worker slot's long-poll: records the report it carries, then holds
    /// until a task is handed to the slot (`Some`) or `poll_hold` passes
    /// (`None`). If the caller goes away with a task handed to it but not
    /// sent, the task goes back to the worker's queue unspent.
    ///
    /// With a store, an answer means to the worker that what it may now
    /// forget is durable, so the answer waits for that (see ARCHITECTURE.md,
    /// "Adoption"): the report this poll carries, unless the worker keeps it
    /// (`keeps`: it sends it again with its next poll, as `kept`); and the
    /// report it kept from its previous poll. The attempt handed out is not
    /// waited for: its task code may start before its start is synced.
    pub async fn poll(
        &self,
        worker: WorkerId,
        inc: Incarnation,
        slot: u32,
        report: Option<TaskReport>,
        kept: Kept,
    ) -> Result<Option<Assignment>, Refusal> {
        let carried = report.is_some();
        let had_kept = kept.kept.is_some();
        let (tx, rx) = oneshot::channel();
        let (poll_id, seq) =
            self.with_state_seq(|s| s.poll_keeping(worker, inc, slot, kept.kept, report, tx));
        let poll_id = poll_id?;
        // The append that holds this poll's report, for the next poll of
        // the slot; and the one that held the previous poll's.
        let previous = self.store.as_ref().and_then(|_| {
            self.slot_seqs
                .lock()
                .expect("slot sequence lock")
                .insert((worker, slot), (inc, seq))
        });
        let mut needed: Option<u64> = None;
        if carried && !kept.keeps {
            needed = Some(seq);
        }
        if had_kept {
            // Appended by this master when the previous poll came: wait for
            // that. Not seen by this master (it started since): it was
            // recorded just now, if it was missing.
            let at = match previous {
                Some((i, p)) if i == inc => p,
                _ => seq,
            };
            needed = Some(needed.map_or(at, |n| n.max(at)));
        }
        let woken = self
            .pending(rx, move |s, undelivered| {
                s.withdraw_poll(worker, slot, poll_id, undelivered)
            })
            .wait(Some(Instant::now() + self.cfg.poll_hold))
            .await;
        if let (Some(store), Some(seq)) = (&self.store, needed) {
            if let Err(e) = store.durable(seq).await {
                warn!(error = %e, "answering a worker with changes that are not durable");
            }
        }
        match woken {
            Woken::Fired(assignment) => Ok(Some(assignment)),
            Woken::TimedOut => Ok(None),
            // The scheduler let go of the poll: the incarnation is dead, or
            // the slot polled again. The staleness rule is the scheduler's.
            Woken::Dropped => self
                .with_state(|s| s.check_current(worker, inc))
                .map(|_| None),
        }
    }

    /// A worker's control poll: the attempts it must stop, as soon as there
    /// are any, or none after `poll_hold`.
    pub async fn control(
        &self,
        worker: WorkerId,
        inc: Incarnation,
    ) -> Result<Vec<StopAttempt>, Refusal> {
        let deadline = Instant::now() + self.cfg.poll_hold;
        loop {
            let (tx, rx) = oneshot::channel();
            let stops = self.with_state(|s| s.take_stops(worker, inc, tx))?;
            if !stops.is_empty() {
                return Ok(stops);
            }
            let woken = self
                .pending(rx, |s, _| s.forget_abandoned_waiters())
                .wait(Some(deadline))
                .await;
            match woken {
                Woken::Fired(()) => continue,
                Woken::TimedOut => return Ok(Vec::new()),
                // Replaced by a newer control poll, or the worker died.
                Woken::Dropped => {
                    return self
                        .with_state(|s| s.check_current(worker, inc))
                        .map(|_| Vec::new())
                }
            }
        }
    }

    // ----- waiting -------------------------------------------------------

    /// Waits for the transition that fires `tx`'s sender; `undo` runs in
    /// the state if the wait ends any other way (see [`Pending`]).
    fn pending<T: Send>(
        &self,
        rx: oneshot::Receiver<T>,
        undo: impl FnOnce(&mut Scheduler, Option<T>) + Send + 'static,
    ) -> Pending<'_, T> {
        Pending {
            cluster: self,
            rx: Some(rx),
            undo: Some(Box::new(undo)),
        }
    }

    /// Stops the master and its workers (Ctrl-C, a failed start).
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.runtime.shutdown().await;
        self.runtime.release_claim().await;
        self.close_store().await;
    }

    /// SIGTERM of a durable master: stops, leaving the workers running for
    /// the next master (see `Runtime::detach`); what they report meanwhile
    /// waits in them. Everything appended is committed first.
    pub async fn leave_workers(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.runtime.detach().await;
        self.runtime.release_claim().await;
        self.close_store().await;
    }

    async fn close_store(&self) {
        if let Some(store) = &self.store {
            if let Err(e) = store.flush().await {
                error!(error = %e, "the last changes could not be stored");
            }
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }
}

/// A task as the store kept it, as the API shows it.
fn record_view(rec: &crate::store::TaskRecord) -> TaskView {
    TaskView {
        id: rec.id,
        state: rec.state,
        node: rec.node,
        attempts: rec.attempts,
        result: rec.result.clone(),
        error: rec.error.clone(),
        submitted_at: rec.submitted_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
    }
}

/// A cancel of a task that is not in memory but was handed out: it has
/// finished (only finished tasks leave memory).
fn left_memory(s: &Scheduler, e: CancelError) -> CancelError {
    match e {
        CancelError::Unknown(id) if s.handed_out(id) => CancelError::LeftMemory(id),
        e => e,
    }
}

/// Why `/stop/{node}` failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("node {0} does not exist")]
    UnknownNode(WorkerId),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// What a poll says about the reports the worker keeps (see
/// [`flotilla_proto::Poll`]).
#[derive(Debug, Default)]
pub struct Kept {
    /// The worker keeps this poll's report until an answer to a later poll.
    pub keeps: bool,
    /// The report its previous poll carried and kept.
    pub kept: Option<TaskReport>,
}

/// How a [`Pending`] wait ended.
pub enum Woken<T> {
    /// The transition happened and sent this.
    Fired(T),
    /// The deadline passed first.
    TimedOut,
    /// The scheduler dropped the sender without firing it (the worker or
    /// attempt waited for is gone).
    Dropped,
}

/// The one way of waiting for a transition. The waiter registers a oneshot
/// sender in the scheduling state in the same critical section that found
/// the transition had not happened yet; the transition fires it. If the wait
/// ends any other way (deadline, or the caller dropped: a closed
/// connection), `undo` runs in the state with whatever was sent at the last
/// moment, so nothing handed over is lost: a task goes back to its queue, a
/// grant is given back, a stale waiter is forgotten.
pub struct Pending<'a, T: Send> {
    cluster: &'a Cluster,
    rx: Option<oneshot::Receiver<T>>,
    undo: Option<Undo<T>>,
}

type Undo<T> = Box<dyn FnOnce(&mut Scheduler, Option<T>) + Send>;

impl<T: Send> Pending<'_, T> {
    /// Waits until fired, dropped, or `deadline` (`None`: no deadline).
    pub async fn wait(mut self, deadline: Option<Instant>) -> Woken<T> {
        let rx = self.rx.as_mut().expect("a pending wait has its receiver");
        let got = match deadline {
            None => rx.await,
            Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                Ok(got) => got,
                Err(_) => return Woken::TimedOut,
            },
        };
        match got {
            Ok(value) => {
                // Delivered: nothing to undo.
                self.rx = None;
                self.undo = None;
                Woken::Fired(value)
            }
            Err(_) => Woken::Dropped,
        }
    }
}

impl<T: Send> Drop for Pending<'_, T> {
    fn drop(&mut self) {
        let (Some(mut rx), Some(undo)) = (self.rx.take(), self.undo.take()) else {
            return;
        };
        let sent = rx.try_recv().ok();
        drop(rx);
        self.cluster.with_state(|s| undo(s, sent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_speaks_for_one_worker_incarnation_only() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let runtime = Arc::new(crate::runtime::process::ProcessRuntime::new(
            "flotilla-worker".into(),
            tx,
        ));
        let c = Cluster::new(ClusterConfig::default(), runtime, None);
        let cred = c.worker_credential(3, 7);
        assert!(cred.starts_with("3.7."), "{cred}");
        assert_eq!(c.verify_credential(&cred), Some((3, 7)));
        // Naming another worker or incarnation with the same tag fails.
        let tag = cred.rsplit('.').next().unwrap();
        assert_eq!(c.verify_credential(&format!("4.7.{tag}")), None);
        assert_eq!(c.verify_credential(&format!("3.8.{tag}")), None);
        assert_ne!(c.worker_credential(3, 8), cred);
        // Garbage, a truncated tag, another cluster's credential.
        for bad in ["", "3.7", "3.7.zz", &cred[..cred.len() - 2], "x.7.00"] {
            assert_eq!(c.verify_credential(bad), None, "{bad}");
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let other = Cluster::new(
            ClusterConfig::default(),
            Arc::new(crate::runtime::process::ProcessRuntime::new("w".into(), tx)),
            None,
        );
        assert_eq!(other.verify_credential(&cred), None);
        // The cluster key itself is not a credential.
        assert_eq!(c.verify_credential(&c.worker_secret), None);
    }
}
