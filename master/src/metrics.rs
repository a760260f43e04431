//! Prometheus metrics, served as text at `GET /metrics`. Counters and
//! histograms are updated where things happen (cheap atomics); gauges that
//! describe the current state (tasks by state, queue lengths) are computed
//! from the scheduler at scrape time, so they can never drift from it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::scheduler::Scheduler;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
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

#[derive(Clone)]
pub struct Metrics {
    pub submitted: Counter,
    pub submit_to_start: Histogram,
    pub run_time: Histogram,
    lock_wait: Family<ResourceLabel, Histogram>,
    pub steals: Counter,
    pub restarts: Counter,
    pub missed_heartbeats: Counter,
    pub retries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            submitted: Counter::default(),
            submit_to_start: Histogram::new(seconds_buckets()),
            run_time: Histogram::new(seconds_buckets()),
            lock_wait: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            steals: Counter::default(),
            restarts: Counter::default(),
            missed_heartbeats: Counter::default(),
            retries: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn observe_lock_wait(&self, resource: &str, mode: flotilla_proto::LockMode, seconds: f64) {
        self.lock_wait
            .get_or_create(&ResourceLabel {
                resource: resource.to_string(),
                mode: mode.to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition: the live counters and histograms, plus gauges
    /// read from the scheduler now.
    pub fn render(&self, sched: &Scheduler) -> String {
        let mut r = Registry::with_prefix("flotilla");
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

        let by_state = Family::<StateLabel, Gauge>::default();
        for (state, n) in sched.tasks_by_state() {
            by_state
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n as i64);
        }
        r.register("tasks", "Tasks by state", by_state);
        let queued = Family::<WorkerLabel, Gauge>::default();
        let running = Family::<WorkerLabel, Gauge>::default();
        for n in sched.nodes() {
            let label = WorkerLabel {
                worker: n.id.to_string(),
            };
            queued.get_or_create(&label).set(n.queued as i64);
            running.get_or_create(&label).set(n.running as i64);
        }
        r.register(
            "worker_queue_length",
            "Tasks waiting in a worker's queue",
            queued,
        );
        r.register("worker_running", "Tasks a worker is running", running);
        let master_queue = Gauge::<i64>::default();
        master_queue.set(sched.master_queue_len() as i64);
        r.register(
            "master_queue_length",
            "Tasks waiting in the master queue",
            master_queue,
        );

        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)
            .expect("writing to a String cannot fail");
        out
    }
}
