//! The checker: reads a soak's history and reports every anomaly by kind,
//! with a summary of what ran. It trusts nothing the master says about
//! itself that it can cross-examine: results carry the attempt and worker
//! that produced them, lock tasks report their holds on the workers' clock,
//! counters carry the ledger of their commits, and observers sampled the
//! nodes and resources while the faults ran.

use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_proto::api::{TaskState, TaskView, WorkerState};
use flotilla_proto::{LockMode, TaskId, WorkerId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::history::{Call, Event, Expect, Outcome};

/// What can go wrong, by the promise it breaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// An accepted task without exactly one final result: lost, still
    /// unfinished at the end, finished twice, or its result changed.
    NotExactlyOneResult,
    /// A result from an attempt the master had revoked: the attempt or
    /// worker the result names is not the task's last.
    RevokedAttemptResult,
    /// A counter's final value differs from the sum of the increments that
    /// committed, or a commit was lost or doubled.
    CounterMismatch,
    /// A resource version (fencing token) went backwards or was granted twice.
    VersionBackwards,
    /// Two write grants live at once on one resource.
    TwoWriters,
    /// A reader and a writer at once on one resource.
    ReaderAndWriter,
    /// One task ID for two submissions.
    TaskIdReused,
    /// Two workers under one ID, or one incarnation handed out twice.
    WorkerIdDuplicated,
    /// A task ended in a way its code cannot: a failing task succeeded, a
    /// task that must succeed failed, a cancelled task finished otherwise.
    WrongOutcome,
    /// The master ran a task that no accepted (or undecided) submission
    /// explains.
    PhantomTask,
}

impl AnomalyKind {
    pub fn name(self) -> &'static str {
        serde_variant::to_variant_name(&self).expect("a unit variant has a name")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub detail: String,
}

/// Median and worst.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Spread {
    pub count: usize,
    pub median_ms: f64,
    pub worst_ms: f64,
}

impl Spread {
    fn of(mut xs: Vec<f64>) -> Spread {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median_ms = match n {
            0 => 0.0,
            _ if n % 2 == 1 => xs[n / 2],
            _ => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
        };
        Spread {
            count: n,
            median_ms,
            worst_ms: xs.last().copied().unwrap_or(0.0),
        }
    }
}

/// The checker's verdict and the soak's summary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Report {
    pub seed: u64,
    pub runtime: String,
    /// From the first line of the history to the final state.
    pub seconds: f64,
    /// Client operations: by call, then by outcome.
    pub operations: BTreeMap<String, BTreeMap<String, usize>>,
    pub tasks_accepted: usize,
    /// The accepted tasks' final states.
    pub tasks_final: BTreeMap<String, usize>,
    /// Tasks that failed as poison (every attempt lost to a fault).
    pub tasks_poisoned: usize,
    /// Finished accepted tasks per second of the soak.
    pub throughput: f64,
    /// Committed increments (ledger entries), all counters together.
    pub commits: usize,
    pub faults: BTreeMap<String, usize>,
    /// From each fault to the cluster whole again, all faults and by kind.
    pub recovery: Spread,
    pub recovery_by_kind: BTreeMap<String, Spread>,
    pub unrecovered: usize,
    pub anomalies: Vec<Anomaly>,
}

impl Report {
    pub fn by_kind(&self) -> BTreeMap<AnomalyKind, usize> {
        let mut m = BTreeMap::new();
        for a in &self.anomalies {
            *m.entry(a.kind).or_default() += 1;
        }
        m
    }

    pub fn has(&self, kind: AnomalyKind) -> bool {
        self.anomalies.iter().any(|a| a.kind == kind)
    }

    pub fn clean(&self) -> bool {
        self.anomalies.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} on {}: {:.0} s",
            self.seed, self.runtime, self.seconds
        )?;
        let ops: Vec<String> = self
            .operations
            .iter()
            .map(|(call, outcomes)| {
                let o: Vec<String> = outcomes.iter().map(|(k, n)| format!("{n} {k}")).collect();
                format!("{call} ({})", o.join(", "))
            })
            .collect();
        let total: usize = self.operations.values().flat_map(|m| m.values()).sum();
        writeln!(f, "operations: {total}: {}", ops.join("; "))?;
        let states: Vec<String> = self
            .tasks_final
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        writeln!(
            f,
            "tasks: {} accepted; final: {} ({} as poison); {:.1} finished/s; {} counter commits",
            self.tasks_accepted,
            states.join(", "),
            self.tasks_poisoned,
            self.throughput,
            self.commits
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        writeln!(
            f,
            "faults: {}: {}",
            self.faults.values().sum::<usize>(),
            faults.join(", ")
        )?;
        writeln!(
            f,
            "recovery: median {:.2} s, worst {:.2} s over {} faults ({} did not recover)",
            self.recovery.median_ms / 1000.0,
            self.recovery.worst_ms / 1000.0,
            self.recovery.count,
            self.unrecovered
        )?;
        for (k, s) in &self.recovery_by_kind {
            writeln!(
                f,
                "  {k}: median {:.2} s, worst {:.2} s ({})",
                s.median_ms / 1000.0,
                s.worst_ms / 1000.0,
                s.count
            )?;
        }
        if self.anomalies.is_empty() {
            return writeln!(f, "anomalies: none");
        }
        let kinds: Vec<String> = self
            .by_kind()
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect();
        writeln!(
            f,
            "anomalies: {}: {}",
            self.anomalies.len(),
            kinds.join(", ")
        )?;
        let mut shown: HashMap<AnomalyKind, usize> = HashMap::new();
        for a in &self.anomalies {
            let n = shown.entry(a.kind).or_default();
            *n += 1;
            if *n <= 10 {
                writeln!(f, "  {}: {}", a.kind.name(), a.detail)?;
            }
        }
        Ok(())
    }
}

/// A submitted task: which operation and item, and what it should do.
struct Submitted<'a> {
    op: u64,
    item: usize,
    expect: &'a Expect,
}

/// A lock held by an accepted attempt, as its task reported it.
#[derive(Clone, Debug)]
struct Hold {
    task: TaskId,
    attempt: u64,
    resource: String,
    mode: LockMode,
    version: u64,
    t0: f64,
    t1: f64,
}

/// A version seen during `[t0, t1]`.
#[derive(Clone, Debug)]
struct Seen {
    t0: f64,
    t1: f64,
    value: u64,
    by: String,
}

/// How an operation ended: its outcome, the task IDs it got, the answer.
type Done<'a> = (Outcome, &'a [TaskId], &'a Value);

struct Checker<'a> {
    report: Report,
    ops: BTreeMap<u64, (&'a Call, Option<Done<'a>>)>,
}

impl Checker<'_> {
    fn anomaly(&mut self, kind: AnomalyKind, detail: String) {
        self.report.anomalies.push(Anomaly { kind, detail });
    }
}

/// Checks a history.
pub fn check(events: &[Event]) -> Report {
    let mut c = Checker {
        report: Report::default(),
        ops: BTreeMap::new(),
    };
    let mut start_t = None;
    let mut feed: HashMap<TaskId, Vec<&TaskView>> = HashMap::new();
    let mut final_state = None;
    let mut faults = Vec::new();
    let mut recovered: HashMap<usize, f64> = HashMap::new();
    let mut resource_seen: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    let mut incarnation_seen: BTreeMap<WorkerId, Vec<Seen>> = BTreeMap::new();
    let mut nodes_events = Vec::new();
    for e in events {
        match e {
            Event::Meta {
                seed, runtime, t, ..
            } => {
                c.report.seed = *seed;
                c.report.runtime = runtime.clone();
                start_t = Some(*t);
            }
            Event::Invoke { op, call, .. } => {
                c.ops.insert(*op, (call, None));
            }
            Event::Complete {
                op,
                outcome,
                ids,
                answer,
                ..
            } => {
                if let Some(entry) = c.ops.get_mut(op) {
                    entry.1 = Some((*outcome, ids.as_slice(), answer));
                }
            }
            Event::Feed { task, .. } => feed.entry(task.id).or_default().push(task),
            Event::Fault { index, kind, .. } => faults.push((*index, *kind, e)),
            Event::Recovered {
                index, after_ms, ..
            } => {
                recovered.insert(*index, *after_ms);
            }
            Event::Resources { t0, t1, resources } => {
                for r in resources {
                    resource_seen.entry(r.name.clone()).or_default().push(Seen {
                        t0: *t0,
                        t1: *t1,
                        value: r.version,
                        by: "GET /resources".into(),
                    });
                    let writers = r
                        .holders
                        .iter()
                        .filter(|h| h.mode == LockMode::Write)
                        .count();
                    let readers = r.holders.len() - writers;
                    if writers > 1 {
                        c.anomaly(
                            AnomalyKind::TwoWriters,
                            format!(
                                "GET /resources at {t1:.0} shows {writers} write holders of {}: {:?}",
                                r.name, r.holders
                            ),
                        );
                    } else if writers == 1 && readers > 0 {
                        c.anomaly(
                            AnomalyKind::ReaderAndWriter,
                            format!(
                                "GET /resources at {t1:.0} shows a writer and {readers} readers of {}: {:?}",
                                r.name, r.holders
                            ),
                        );
                    }
                }
            }
            Event::Nodes { t0, t1, nodes } => {
                nodes_events.push((*t0, *t1, nodes));
                for n in nodes.iter() {
                    incarnation_seen.entry(n.id).or_default().push(Seen {
                        t0: *t0,
                        t1: *t1,
                        value: n.incarnation,
                        by: "GET /nodes".into(),
                    });
                }
            }
            Event::Final { .. } => final_state = Some(e),
            Event::Schedule { .. } | Event::Heal { .. } => {}
        }
    }

    // ----- operations and submissions -----
    let mut accepted: BTreeMap<TaskId, Submitted> = BTreeMap::new();
    let mut cancelled_ok: HashSet<TaskId> = HashSet::new();
    let mut cancel_tried: HashSet<TaskId> = HashSet::new();
    let mut undecided_tasks = 0usize;
    let mut refused_ops: HashSet<u64> = HashSet::new();
    let mut counters: Vec<String> = Vec::new();
    let mut reused = Vec::new();
    for (op, (call, done)) in &c.ops {
        let outcome = done.map(|d| d.0).unwrap_or(Outcome::Unknown);
        let name = match outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        };
        *c.report
            .operations
            .entry(call.name().to_string())
            .or_default()
            .entry(name.to_string())
            .or_default() += 1;
        let tasks = call.tasks();
        match (call, outcome) {
            (Call::Cancel { id }, Outcome::Ok) => {
                cancel_tried.insert(*id);
                let state = done.and_then(|d| d.2.get("state")).and_then(Value::as_str);
                if state == Some("cancelled") {
                    cancelled_ok.insert(*id);
                }
            }
            (Call::Cancel { id }, Outcome::Unknown) => {
                cancel_tried.insert(*id);
            }
            (Call::CreateCounter { name }, Outcome::Ok) => counters.push(name.clone()),
            (_, Outcome::Ok) if !tasks.is_empty() => {
                let ids = done.map(|d| d.1).unwrap_or_default();
                if ids.len() != tasks.len() {
                    reused.push(format!(
                        "op {op} submitted {} tasks and got {} IDs: {ids:?}",
                        tasks.len(),
                        ids.len()
                    ));
                }
                for (item, (id, expect)) in ids.iter().zip(tasks).enumerate() {
                    if let Some(prev) = accepted.get(id) {
                        reused.push(format!(
                            "task ID {id} given to op {op} item {item} and to op {} item {}",
                            prev.op, prev.item
                        ));
                        continue;
                    }
                    accepted.insert(
                        *id,
                        Submitted {
                            op: *op,
                            item,
                            expect,
                        },
                    );
                }
            }
            (_, Outcome::Unknown) => undecided_tasks += tasks.len(),
            (_, Outcome::Fail) if !tasks.is_empty() => {
                refused_ops.insert(*op);
            }
            _ => {}
        }
    }
    for r in reused {
        c.anomaly(AnomalyKind::TaskIdReused, r);
    }
    c.report.tasks_accepted = accepted.len();

    for (index, kind, _) in &faults {
        *c.report.faults.entry(kind.name().into()).or_default() += 1;
        if !recovered.contains_key(index) {
            c.report.unrecovered += 1;
        }
    }
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (index, kind, _) in &faults {
        if let Some(ms) = recovered.get(index) {
            by_kind.entry(kind.name().into()).or_default().push(*ms);
        }
    }
    c.report.recovery = Spread::of(by_kind.values().flatten().copied().collect());
    c.report.recovery_by_kind = by_kind
        .into_iter()
        .map(|(k, xs)| (k, Spread::of(xs)))
        .collect();

    // ----- the feed -----
    for (id, seen) in &feed {
        if seen.len() > 1 {
            let states: Vec<String> = seen.iter().map(|t| t.state.to_string()).collect();
            c.anomaly(
                AnomalyKind::NotExactlyOneResult,
                format!(
                    "task {id} is in the completion feed {} times ({})",
                    seen.len(),
                    states.join(", ")
                ),
            );
        }
    }

    let Some(Event::Final {
        t: end_t,
        tasks,
        resources,
        nodes: final_nodes,
    }) = final_state
    else {
        c.anomaly(
            AnomalyKind::NotExactlyOneResult,
            "the history has no final state: the soak did not finish, nothing can be said of its tasks".into(),
        );
        return c.report;
    };
    c.report.seconds = (end_t - start_t.unwrap_or(*end_t)) / 1000.0;

    let mut listing: HashMap<TaskId, &TaskView> = HashMap::new();
    for t in tasks {
        if listing.insert(t.id, t).is_some() {
            c.anomaly(
                AnomalyKind::TaskIdReused,
                format!("the final listing holds task {} twice", t.id),
            );
        }
    }

    // ----- every accepted task: exactly one final result, from its last attempt -----
    let mut holds: Vec<Hold> = Vec::new();
    let mut finished = 0usize;
    for (id, sub) in &accepted {
        let what = format!(
            "task {id} (op {} item {}, {})",
            sub.op,
            sub.item,
            sub.expect.name()
        );
        let Some(view) = listing.get(id) else {
            c.anomaly(
                AnomalyKind::NotExactlyOneResult,
                format!("{what} was accepted but the master does not hold it at the end"),
            );
            continue;
        };
        *c.report
            .tasks_final
            .entry(view.state.to_string())
            .or_default() += 1;
        if !view.state.is_final() {
            c.anomaly(
                AnomalyKind::NotExactlyOneResult,
                format!(
                    "{what} is still {} at the end (attempts {})",
                    view.state, view.attempts
                ),
            );
            continue;
        }
        finished += 1;
        match feed.get(id).map(|v| v.as_slice()) {
            None | Some([]) => c.anomaly(
                AnomalyKind::NotExactlyOneResult,
                format!(
                    "{what} ended {} but never came through the completion feed",
                    view.state
                ),
            ),
            Some([seen, ..]) => {
                if seen.state != view.state
                    || seen.result != view.result
                    || seen.error != view.error
                {
                    c.anomaly(
                        AnomalyKind::NotExactlyOneResult,
                        format!(
                            "{what}'s final result changed: the feed said {} {}, the end says {} {}",
                            seen.state,
                            short(&serde_json::to_value(&seen.result).unwrap_or_default()),
                            view.state,
                            short(&serde_json::to_value(&view.result).unwrap_or_default())
                        ),
                    );
                }
            }
        }
        let poisoned = view.state == TaskState::Failed
            && view
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("gave up after"));
        if poisoned {
            c.report.tasks_poisoned += 1;
        }
        // Which attempt and worker produced the result, by its own word.
        if let Some(me) = view.result.as_ref().and_then(|r| ran(view, r)) {
            if me.op != Some(sub.op) || me.item != Some(sub.item as u64) {
                c.anomaly(
                    AnomalyKind::TaskIdReused,
                    format!(
                        "{what}'s result is that of op {:?} item {:?}",
                        me.op, me.item
                    ),
                );
            }
            if me.attempt != Some(view.attempts as u64) || me.node != view.node {
                c.anomaly(
                    AnomalyKind::RevokedAttemptResult,
                    format!(
                        "{what}'s result comes from attempt {:?} on worker {:?}, but its last attempt is {} on worker {:?}",
                        me.attempt, me.node, view.attempts, view.node
                    ),
                );
            }
            for h in me.holds {
                holds.push(Hold {
                    task: *id,
                    attempt: me.attempt.unwrap_or(0),
                    ..h
                });
            }
        }
        // The end its code allows.
        let cancelled = cancelled_ok.contains(id);
        let wrong = match view.state {
            TaskState::Cancelled if !cancel_tried.contains(id) => {
                Some("was cancelled though no cancel was asked for".to_string())
            }
            TaskState::Cancelled => None,
            _ if cancelled => Some(format!(
                "was cancelled (the master said so) but ended {}",
                view.state
            )),
            TaskState::Failed if poisoned => None,
            TaskState::Succeeded => match sub.expect {
                Expect::Fail | Expect::ShellFail | Expect::Timeout => {
                    Some("succeeded though its code cannot".into())
                }
                _ => None,
            },
            TaskState::Failed => match sub.expect {
                Expect::Fail | Expect::ShellFail => None,
                Expect::Timeout
                    if view
                        .error
                        .as_deref()
                        .is_some_and(|e| e.contains("timed out")) =>
                {
                    None
                }
                _ => Some(format!(
                    "failed: {}",
                    view.error.as_deref().unwrap_or("(no error)")
                )),
            },
            _ => None,
        };
        if let Some(w) = wrong {
            c.anomaly(AnomalyKind::WrongOutcome, format!("{what} {w}"));
        }
    }
    c.report.throughput = if c.report.seconds > 0.0 {
        finished as f64 / c.report.seconds
    } else {
        0.0
    };

    // ----- tasks nobody accepted -----
    let mut unexplained = 0usize;
    for view in tasks {
        if accepted.contains_key(&view.id) {
            continue;
        }
        let from = view
            .result
            .as_ref()
            .and_then(|r| ran(view, r))
            .and_then(|m| m.op);
        match from.and_then(|op| c.ops.get(&op).map(|o| (op, o.1.map(|d| d.0)))) {
            Some((op, Some(Outcome::Fail))) => c.anomaly(
                AnomalyKind::PhantomTask,
                format!(
                    "task {} ran the code of op {op}, which the master refused",
                    view.id
                ),
            ),
            Some((op, Some(Outcome::Ok))) => c.anomaly(
                AnomalyKind::PhantomTask,
                format!(
                    "task {} ran the code of op {op}, which got other task IDs",
                    view.id
                ),
            ),
            _ => unexplained += 1,
        }
    }
    if unexplained > undecided_tasks {
        c.anomaly(
            AnomalyKind::PhantomTask,
            format!(
                "the master holds {unexplained} tasks no accepted submission got, but only {undecided_tasks} were in submissions of unknown outcome"
            ),
        );
    }

    // ----- counters: value, ledger, commits -----
    let final_resources: HashMap<&str, _> =
        resources.iter().map(|r| (r.name.as_str(), r)).collect();
    for name in &counters {
        let Some(r) = final_resources.get(name.as_str()) else {
            c.anomaly(
                AnomalyKind::CounterMismatch,
                format!("counter {name} is gone at the end"),
            );
            continue;
        };
        let sum = r.value.get("sum").and_then(Value::as_i64);
        let log = r.value.get("log").and_then(Value::as_array);
        let (Some(sum), Some(log)) = (sum, log) else {
            c.anomaly(
                AnomalyKind::CounterMismatch,
                format!(
                    "counter {name} ends as {} (not a sum and a ledger)",
                    short(&r.value)
                ),
            );
            continue;
        };
        let mut entries = Vec::new();
        for e in log {
            let nums: Vec<Option<i64>> = e
                .as_array()
                .map(|a| a.iter().map(Value::as_i64).collect())
                .unwrap_or_default();
            match nums.as_slice() {
                [Some(task), Some(attempt), Some(delta), Some(token)] => {
                    entries.push((*task as u64, *attempt as u64, *delta, *token as u64))
                }
                _ => c.anomaly(
                    AnomalyKind::CounterMismatch,
                    format!("counter {name}'s ledger holds a malformed entry {e}"),
                ),
            }
        }
        c.report.commits += entries.len();
        let committed: i64 = entries.iter().map(|e| e.2).sum();
        if sum != committed {
            c.anomaly(
                AnomalyKind::CounterMismatch,
                format!(
                    "counter {name} ends at {sum}, but the {} increments that committed add up to {committed}",
                    entries.len()
                ),
            );
        }
        let mut seen_commits = HashSet::new();
        let mut last_token: Option<u64> = None;
        for (task, attempt, delta, token) in &entries {
            if !seen_commits.insert((*task, *attempt)) {
                c.anomaly(
                    AnomalyKind::CounterMismatch,
                    format!("counter {name}: task {task} attempt {attempt} committed twice (a doubled commit)"),
                );
            }
            if let Some(prev) = last_token {
                if *token <= prev {
                    c.anomaly(
                        AnomalyKind::VersionBackwards,
                        format!("counter {name}: a commit under token {token} (task {task} attempt {attempt}) after one under token {prev}: a stale write got through"),
                    );
                }
            }
            last_token = Some(*token);
            match accepted.get(task) {
                Some(sub) => {
                    let fits = matches!(sub.expect, Expect::Locks { writes, delta: d, .. } if writes.contains(name) && d == delta);
                    let attempts = listing.get(task).map(|v| v.attempts).unwrap_or(0);
                    if !fits || *attempt > attempts as u64 {
                        c.anomaly(
                            AnomalyKind::CounterMismatch,
                            format!("counter {name}: a commit of {delta} by task {task} attempt {attempt}, which never made it (its code writes {:?}, its attempts {attempts})", sub.expect),
                        );
                    }
                }
                None if undecided_tasks == 0 => c.anomaly(
                    AnomalyKind::CounterMismatch,
                    format!("counter {name}: a commit by task {task}, which nobody submitted"),
                ),
                None => {}
            }
        }
        if let Some(last) = last_token {
            if r.version < last {
                c.anomaly(
                    AnomalyKind::VersionBackwards,
                    format!(
                        "counter {name} ends at version {}, below its last commit's token {last}",
                        r.version
                    ),
                );
            }
        }
        let ledger: HashSet<(u64, u64, u64)> = entries.iter().map(|e| (e.0, e.1, e.3)).collect();
        for h in holds
            .iter()
            .filter(|h| &h.resource == name && h.mode == LockMode::Write)
        {
            if !ledger.contains(&(h.task, h.attempt, h.version)) {
                c.anomaly(
                    AnomalyKind::CounterMismatch,
                    format!("counter {name}: task {} attempt {} committed under token {} and finished, but its commit is not in the ledger (a lost commit)", h.task, h.attempt, h.version),
                );
            }
        }
    }
    for (id, sub) in &accepted {
        if let (Some(view), Expect::Locks { .. }) = (listing.get(id), sub.expect) {
            if let Some(r) = &view.result {
                if let Some(hs) = r.response.get("holds").and_then(Value::as_array) {
                    for h in hs {
                        if h.get("consistent") == Some(&Value::Bool(false)) {
                            c.anomaly(
                                AnomalyKind::CounterMismatch,
                                format!(
                                    "task {id} read {} with a sum that disagrees with its ledger",
                                    h["r"]
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    // ----- lock exclusion, from the holds of accepted attempts -----
    let mut by_resource: BTreeMap<&str, Vec<&Hold>> = BTreeMap::new();
    for h in &holds {
        by_resource.entry(&h.resource).or_default().push(h);
    }
    for (name, mut hs) in by_resource {
        hs.sort_by(|a, b| a.t0.total_cmp(&b.t0));
        let mut tokens: HashMap<u64, &Hold> = HashMap::new();
        for (i, a) in hs.iter().enumerate() {
            if a.mode == LockMode::Write {
                if let Some(b) = tokens.insert(a.version, a) {
                    c.anomaly(
                        AnomalyKind::VersionBackwards,
                        format!("{name}: write token {} granted to task {} attempt {} and to task {} attempt {}", a.version, b.task, b.attempt, a.task, a.attempt),
                    );
                }
            }
            for b in &hs[i + 1..] {
                if b.t0 >= a.t1 {
                    break;
                }
                if a.task == b.task {
                    continue;
                }
                let kind = match (a.mode, b.mode) {
                    (LockMode::Write, LockMode::Write) => AnomalyKind::TwoWriters,
                    (LockMode::Read, LockMode::Read) => continue,
                    _ => AnomalyKind::ReaderAndWriter,
                };
                c.anomaly(
                    kind,
                    format!(
                        "{name}: task {} held it ({}, {:.0}..{:.0}) while task {} held it ({}, {:.0}..{:.0})",
                        a.task, a.mode, a.t0, a.t1, b.task, b.mode, b.t0, b.t1
                    ),
                );
            }
            resource_seen
                .entry(name.to_string())
                .or_default()
                .push(Seen {
                    t0: a.t0,
                    t1: a.t1,
                    value: a.version,
                    by: format!("task {} attempt {} ({})", a.task, a.attempt, a.mode),
                });
        }
    }
    for (name, seen) in resource_seen {
        for (a, b) in backwards(seen) {
            c.anomaly(
                AnomalyKind::VersionBackwards,
                format!(
                    "{name}: version {} seen by {} at {:.0}..{:.0}, after version {} seen by {} at {:.0}..{:.0}",
                    b.value, b.by, b.t0, b.t1, a.value, a.by, a.t0, a.t1
                ),
            );
        }
    }

    // ----- worker identity -----
    let mut known_ids: HashSet<WorkerId> = HashSet::new();
    let mut locators: HashMap<(WorkerId, u64), String> = HashMap::new();
    let mut fault_events = faults.iter().map(|f| f.2).peekable();
    let all_nodes = nodes_events
        .iter()
        .map(|(t0, t1, n)| (*t0, *t1, *n))
        .chain(std::iter::once((*end_t, *end_t, final_nodes)));
    for (t0, _t1, nodes) in all_nodes {
        // The /add faults injected before this observation.
        while let Some(Event::Fault {
            t, added, index, ..
        }) = fault_events.peek()
        {
            if *t > t0 {
                break;
            }
            if let Some(a) = added {
                if known_ids.contains(a) {
                    c.anomaly(
                        AnomalyKind::WorkerIdDuplicated,
                        format!("/add (fault #{index}) gave worker ID {a}, which an existing worker has"),
                    );
                }
                known_ids.insert(*a);
            }
            fault_events.next();
        }
        let mut here = HashSet::new();
        for n in nodes.iter() {
            known_ids.insert(n.id);
            if !here.insert(n.id) {
                c.anomaly(
                    AnomalyKind::WorkerIdDuplicated,
                    format!("GET /nodes at {t0:.0} lists worker {} twice", n.id),
                );
            }
            if let (WorkerState::Active, Some(loc)) = (n.state, &n.locator) {
                if let Some(prev) = locators.insert((n.id, n.incarnation), loc.clone()) {
                    if &prev != loc {
                        c.anomaly(
                            AnomalyKind::WorkerIdDuplicated,
                            format!(
                                "worker {} incarnation {} was {prev}, then {loc}: one identity, two workers",
                                n.id, n.incarnation
                            ),
                        );
                    }
                }
            }
        }
    }
    for (id, seen) in incarnation_seen {
        for (a, b) in backwards(seen) {
            c.anomaly(
                AnomalyKind::WorkerIdDuplicated,
                format!(
                    "worker {id} in incarnation {} at {:.0}, after incarnation {} at {:.0}: an incarnation handed out again",
                    b.value, b.t0, a.value, a.t1
                ),
            );
        }
    }
    c.report
}

/// Pairs (a, b) where `a` was seen entirely before `b` began, yet `b` is
/// smaller: a value that went backwards. One pair per drop.
fn backwards(mut seen: Vec<Seen>) -> Vec<(Seen, Seen)> {
    let mut by_end = seen.clone();
    by_end.sort_by(|a, b| a.t1.total_cmp(&b.t1));
    seen.sort_by(|a, b| a.t0.total_cmp(&b.t0));
    let mut out = Vec::new();
    let mut best: Option<&Seen> = None;
    let mut j = 0;
    let mut reported_below: Option<u64> = None;
    for b in &seen {
        while j < by_end.len() && by_end[j].t1 < b.t0 {
            if best.is_none_or(|x| by_end[j].value > x.value) {
                best = Some(&by_end[j]);
            }
            j += 1;
        }
        if let Some(a) = best {
            if b.value < a.value && reported_below != Some(a.value) {
                reported_below = Some(a.value);
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// What a result says about the attempt that produced it.
struct Ran {
    op: Option<u64>,
    item: Option<u64>,
    attempt: Option<u64>,
    node: Option<WorkerId>,
    holds: Vec<Hold>,
}

/// Reads the result's own account of its run: Python responses are objects
/// with `op`, `i`, `attempt`, `node` (and lock tasks' `holds`); shell tasks
/// print `op=.. i=.. attempt=.. node=..`. `None` for results without it
/// (a traceback, a failing shell command).
fn ran(view: &TaskView, result: &flotilla_proto::TaskResult) -> Option<Ran> {
    if view.state != TaskState::Succeeded {
        return None;
    }
    let r = &result.response;
    if let Some(obj) = r.as_object() {
        let num = |k: &str| obj.get(k).and_then(Value::as_u64);
        let mut holds = Vec::new();
        for h in obj
            .get("holds")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mode = match h.get("m").and_then(Value::as_str) {
                Some("w") => LockMode::Write,
                _ => LockMode::Read,
            };
            holds.push(Hold {
                task: view.id,
                attempt: 0,
                resource: h.get("r").and_then(Value::as_str).unwrap_or("").to_string(),
                mode,
                version: h.get("v").and_then(Value::as_u64).unwrap_or(0),
                t0: h.get("t0").and_then(Value::as_f64).unwrap_or(0.0),
                t1: h.get("t1").and_then(Value::as_f64).unwrap_or(0.0),
            });
        }
        return Some(Ran {
            op: num("op"),
            item: num("i"),
            attempt: num("attempt"),
            node: num("node").and_then(|n| WorkerId::try_from(n).ok()),
            holds,
        });
    }
    let text = r.as_str().unwrap_or(&result.stdout);
    if !text.starts_with("op=") {
        return None;
    }
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Ran {
        op: field("op"),
        item: field("i"),
        attempt: field("attempt"),
        node: field("node").and_then(|n| WorkerId::try_from(n).ok()),
        holds: Vec::new(),
    })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 160 {
        format!(
            "{}...",
            &s[..s
                .char_indices()
                .take_while(|(i, _)| *i < 160)
                .last()
                .map(|(i, c)| i + c.len_utf8())
                .unwrap_or(0)]
        )
    } else {
        s
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
