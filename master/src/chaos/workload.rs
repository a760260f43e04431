//! The tasks a soak submits. Each carries its operation and item number in
//! its code and in its result, with the attempt and worker that ran it, so
//! the checker can tell which attempt a result came from. Lock tasks report
//! every lock they held (resource, mode, version, the times of the grant and
//! of the release on the worker's clock) and write to counters that keep a
//! ledger of their commits.

use flotilla_proto::{TaskKind, TaskSpec};
use rand::Rng;
use serde_json::json;

use super::history::Expect;

/// The counters the lock tasks share (Dictionary resources).
pub const COUNTERS: [&str; 4] = ["chaos_c0", "chaos_c1", "chaos_c2", "chaos_c3"];

/// A counter's initial value: the running sum, and the ledger of commits
/// (`[task, attempt, delta, fencing token]`, in commit order).
pub fn counter_initial() -> serde_json::Value {
    json!({"sum": 0, "log": []})
}

/// How long a timeout task may run, and how long it would sleep.
pub const TIMEOUT_S: f64 = 1.0;

/// A random task to submit.
pub fn pick(rng: &mut impl Rng, allow_timeout: bool) -> Expect {
    match rng.gen_range(0..if allow_timeout { 100 } else { 96 }) {
        0..=19 => Expect::Short,
        20..=31 => Expect::Long {
            ms: rng.gen_range(300..=3_000),
        },
        32..=43 => Expect::Shell,
        44..=47 => Expect::ShellFail,
        48..=89 => locks(rng),
        90..=95 => Expect::Fail,
        _ => Expect::Timeout,
    }
}

/// A lock task: writes to one or two counters, reads up to two others.
pub fn locks(rng: &mut impl Rng) -> Expect {
    let mut names: Vec<&str> = COUNTERS.to_vec();
    // A partial shuffle: the first `w + r` names, in random order.
    for i in 0..names.len() {
        let j = rng.gen_range(i..names.len());
        names.swap(i, j);
    }
    let w = rng.gen_range(1..=2);
    let r = rng.gen_range(0..=2);
    let mut writes: Vec<String> = names[..w].iter().map(|s| s.to_string()).collect();
    let mut reads: Vec<String> = names[w..w + r].iter().map(|s| s.to_string()).collect();
    writes.sort();
    reads.sort();
    Expect::Locks {
        writes,
        reads,
        delta: rng.gen_range(1..=9),
    }
}

/// The task's spec: code that names its operation and item.
pub fn spec(op: u64, item: usize, expect: &Expect, rng: &mut impl Rng) -> TaskSpec {
    let tag = format!("# flotilla chaos: op {op} item {item}\n");
    let me = format!(
        r#"response = {{"op": {op}, "i": {item}, "attempt": self.attempt, "node": self.node_id}}"#
    );
    let python = |code: String| TaskSpec::new(TaskKind::Python, format!("{tag}{code}"));
    match expect {
        Expect::Short => python(me),
        Expect::Long { ms } => python(format!(
            "import time\ntime.sleep({})\n{me}",
            *ms as f64 / 1000.0
        )),
        Expect::Shell => TaskSpec::new(
            TaskKind::Shell,
            format!(
                "{tag}echo \"op={op} i={item} attempt=$FLOTILLA_ATTEMPT node=$FLOTILLA_WORKER_ID\""
            ),
        ),
        Expect::ShellFail => TaskSpec::new(
            TaskKind::Shell,
            format!("{tag}echo \"op={op} i={item} fails on purpose\"; exit 3"),
        ),
        Expect::Fail => python(format!(
            "raise RuntimeError('chaos op {op} item {item} fails on purpose')"
        )),
        Expect::Timeout => {
            let mut s = python(format!("import time\ntime.sleep(60)\n{me}"));
            s.timeout = Some(TIMEOUT_S);
            s
        }
        Expect::Locks {
            writes,
            reads,
            delta,
        } => {
            let hold = rng.gen_range(0..=150) as f64 / 1000.0;
            python(format!(
                r#"import time
writes = {writes}
reads = {reads}
got = []
for name in sorted(writes + reads):
    if name in writes:
        r = request_write_resource(name)
    else:
        r = request_read_resource(name)
    got.append((name, r, time.time() * 1000))
time.sleep({hold})
holds = []
for name, r, t0 in reversed(got):
    seen = {{"r": name, "v": r.version, "t0": t0, "consistent": r["sum"] == sum(e[2] for e in r["log"])}}
    if name in writes:
        r["sum"] = r["sum"] + {delta}
        r["log"].append([self.task_id, self.attempt, {delta}, r.version])
        seen["m"] = "w"
        seen["t1"] = time.time() * 1000
        release_write_resource(name)
    else:
        seen["m"] = "r"
        seen["t1"] = time.time() * 1000
        release_read_resource(name)
    holds.append(seen)
{me}
response["holds"] = holds
"#,
                writes = json!(writes),
                reads = json!(reads),
            ))
        }
    }
}
