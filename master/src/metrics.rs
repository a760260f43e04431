//! Prometheus metrics, served as text at `GET /metrics`. This module sits
//! beside the scheduler, not inside it: the scheduler notes what its
//! transitions did ([`Tally`]) and the [`crate::cluster::Cluster`] records
//! those here; gauges that describe the current state (tasks by state, queue
//! lengths) are set from a [`Snapshot`] the cluster takes at scrape time, so
//! they can never drift from the state. The registry is built once.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use flotilla_proto::api::{NodeView, TaskState};
use flotilla_proto::LockMode;

use crate::scheduler::Tally;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
    mode: String,
}

/// Seconds, from 100 µs to about 100 s.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 21)
}

/// The state the gauges show, read in one critical section at scrape time.
pub struct Snapshot {
    pub tasks_by_state: Vec<(TaskState, usize)>,
    pub nodes: Vec<NodeView>,
    pub master_queue: usize,
    /// The durable store's writer so far (`None`: ephemeral).
    pub store: Option<crate::store::StoreStats>,
}

pub struct Metrics {
    registry: Registry,
    submitted: Counter,
    submit_to_start: Histogram,
    run_time: Histogram,
    lock_wait: Family<ResourceLabel, Histogram>,
    steals: Counter,
    restarts: Counter,
    missed_heartbeats: Counter,
    retries: Counter,
    tasks: Family<StateLabel, Gauge>,
    worker_queue: Family<WorkerLabel, Gauge>,
    worker_running: Family<WorkerLabel, Gauge>,
    master_queue: Gauge,
    dashboard_lock: Counter<f64, std::sync::atomic::AtomicU64>,
    dashboard_cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    dashboard_updates: Counter,
    dashboard_rows: Counter,
    store_commits: Gauge,
    store_ops: Gauge,
    store_apply: Gauge<f64, std::sync::atomic::AtomicU64>,
    store_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::with_prefix("flotilla"),
            submitted: Counter::default(),
            submit_to_start: Histogram::new(seconds_buckets()),
            run_time: Histogram::new(seconds_buckets()),
            lock_wait: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            steals: Counter::default(),
            restarts: Counter::default(),
            missed_heartbeats: Counter::default(),
            retries: Counter::default(),
            tasks: Family::default(),
            worker_queue: Family::default(),
            worker_running: Family::default(),
            master_queue: Gauge::default(),
            dashboard_lock: Counter::default(),
            dashboard_cpu: Counter::default(),
            dashboard_updates: Counter::default(),
            dashboard_rows: Counter::default(),
            store_commits: Gauge::default(),
            store_ops: Gauge::default(),
            store_apply: Gauge::default(),
            store_sync: Gauge::default(),
        };
        m.register()
    }
}

impl Metrics {
    /// Every series, registered once (the registry holds handles to the
    /// same atomics this struct updates).
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register("tasks_submitted", "Tasks accepted", self.submitted.clone());
        r.register(
            "submit_to_start_seconds",
            "Time from submission to the first hand-off to a worker",
            self.submit_to_start.clone(),
        );
        r.register(
            "run_seconds",
            "Run time of a task's final attempt",
            self.run_time.clone(),
        );
        r.register(
            "lock_wait_seconds",
            "Time a lock request waited for its grant",
            self.lock_wait.clone(),
        );
        r.register(
            "steals",
            "Tasks stolen by an idle worker from a busier queue",
            self.steals.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers restarted after a death",
            self.restarts.clone(),
        );
        r.register(
            "missed_heartbeats",
            "Workers declared dead for lack of heartbeats",
            self.missed_heartbeats.clone(),
        );
        r.register(
            "task_retries",
            "Attempts that died with their interpreter or worker and were retried",
            self.retries.clone(),
        );
        r.register("tasks", "Tasks by state", self.tasks.clone());
        r.register(
            "worker_queue_length",
            "Tasks waiting in a worker's queue",
            self.worker_queue.clone(),
        );
        r.register(
            "worker_running",
            "Tasks a worker is running",
            self.worker_running.clone(),
        );
        r.register(
            "master_queue_length",
            "Tasks waiting in the master queue",
            self.master_queue.clone(),
        );
        r.register(
            "dashboard_lock_seconds",
            "Time the dashboard held the scheduler's lock (updates, table rows, task details)",
            self.dashboard_lock.clone(),
        );
        r.register(
            "dashboard_cpu_seconds",
            "CPU time of the dashboard's own work: building and serialising updates and table rows, framing each page's events",
            self.dashboard_cpu.clone(),
        );
        r.register(
            "dashboard_updates_built",
            "Live updates the dashboard built (one per tick, shared by every open page, plus each page's first)",
            self.dashboard_updates.clone(),
        );
        r.register(
            "dashboard_table_rows",
            "Task table rows the dashboard served",
            self.dashboard_rows.clone(),
        );
        r.register(
            "store_commits",
            "Transactions the state store committed since the master started (each one sync)",
            self.store_commits.clone(),
        );
        r.register(
            "store_ops",
            "Operations (task, attempt, lock, worker changes) the state store committed since the master started",
            self.store_ops.clone(),
        );
        r.register(
            "store_apply_seconds",
            "Seconds the state store's writer spent running the operations' SQL since the master started",
            self.store_apply.clone(),
        );
        r.register(
            "store_sync_seconds",
            "Seconds the state store's writer spent committing (writing and syncing its log) since the master started",
            self.store_sync.clone(),
        );
        self
    }

    /// Counts what a transition did.
    pub fn record(&self, tally: Tally) {
        match tally {
            Tally::Submitted => {
                self.submitted.inc();
            }
            Tally::Started { waited } => self.submit_to_start.observe(waited),
            Tally::Finished { ran } => self.run_time.observe(ran),
            Tally::Retried => {
                self.retries.inc();
            }
            Tally::Stolen => {
                self.steals.inc();
            }
        }
    }

    pub fn worker_restarted(&self) {
        self.restarts.inc();
    }

    pub fn heartbeat_missed(&self) {
        self.missed_heartbeats.inc();
    }

    pub fn observe_lock_wait(&self, resource: &str, mode: LockMode, seconds: f64) {
        self.lock_wait
            .get_or_create(&ResourceLabel {
                resource: resource.to_string(),
                mode: mode.to_string(),
            })
            .observe(seconds);
    }

    /// The dashboard held the scheduler's lock for `seconds`.
    pub fn dashboard_locked(&self, seconds: f64) {
        self.dashboard_lock.inc_by(seconds);
    }

    /// The dashboard's own work used `seconds` of CPU.
    pub fn dashboard_cpu(&self, seconds: f64) {
        self.dashboard_cpu.inc_by(seconds);
    }

    pub fn dashboard_update_built(&self) {
        self.dashboard_updates.inc();
    }

    pub fn dashboard_rows_served(&self, rows: usize) {
        self.dashboard_rows.inc_by(rows as u64);
    }

    /// The text exposition: the counters and histograms as they are, the
    /// gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> String {
        for &(state, n) in &now.tasks_by_state {
            self.tasks
                .get_or_create(&StateLabel {
                    state: state.name(),
                })
                .set(n as i64);
        }
        for n in &now.nodes {
            let label = WorkerLabel {
                worker: n.id.to_string(),
            };
            self.worker_queue.get_or_create(&label).set(n.queued as i64);
            self.worker_running
                .get_or_create(&label)
                .set(n.running as i64);
        }
        self.master_queue.set(now.master_queue as i64);
        if let Some(st) = &now.store {
            self.store_commits.set(st.commits as i64);
            self.store_ops.set(st.ops as i64);
            self.store_apply.set(st.apply_seconds);
            self.store_sync.set(st.sync_seconds);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_and_the_snapshot_show_in_the_text() {
        let m = Metrics::default();
        m.record(Tally::Submitted);
        m.record(Tally::Submitted);
        m.record(Tally::Stolen);
        m.record(Tally::Started { waited: 0.001 });
        let snapshot = |queued| Snapshot {
            tasks_by_state: TaskState::ALL.iter().map(|&s| (s, 1)).collect(),
            nodes: vec![],
            master_queue: queued,
            store: Some(crate::store::StoreStats {
                commits: 3,
                ops: 40,
                apply_seconds: 0.5,
                sync_seconds: 0.25,
            }),
        };
        let text = m.render(&snapshot(7));
        assert!(text.contains("flotilla_tasks_submitted_total 2"), "{text}");
        assert!(text.contains("flotilla_steals_total 1"), "{text}");
        assert!(
            text.contains("flotilla_submit_to_start_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("flotilla_master_queue_length 7"), "{text}");
        assert!(text.contains("flotilla_store_commits 3"), "{text}");
        assert!(text.contains("flotilla_store_sync_seconds 0.25"), "{text}");
        assert!(
            text.contains("flotilla_tasks{state=\"succeeded\"} 1"),
            "{text}"
        );
        // The same registry, read again: gauges follow the new snapshot.
        let text = m.render(&snapshot(0));
        assert!(text.contains("flotilla_master_queue_length 0"), "{text}");
        assert!(text.contains("flotilla_tasks_submitted_total 2"), "{text}");
    }
}
