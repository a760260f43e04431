//! One task can never wedge a slot, a worker or the master: oversized
//! output and results, results JSON cannot carry, processes a task leaves
//! behind. Real master, real workers, HTTP as a user would.

use std::time::{Duration, Instant};

use flotilla_e2e::Cluster;
use serde_json::{json, Value};

fn one_worker() -> String {
    flotilla_e2e::native_manifest(&[1], 0.5, 3.0, 3)
}

/// The master's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// How long the task took from submission to its end, by its own times.
fn took(task: &Value) -> Duration {
    let ms = task["finished_at"].as_u64().unwrap() - task["submitted_at"].as_u64().unwrap();
    Duration::from_millis(ms)
}

async fn run(c: &Cluster, kind: &str, command: &str) -> Value {
    let (status, body) = c
        .post("/tasks", json!({"type": kind, "command": command}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["task_ids"][0].as_u64().unwrap();
    c.wait_task(id, Duration::from_secs(30)).await.unwrap()
}

#[tokio::test]
async fn oversized_output_results_and_tracebacks_end_the_task_and_free_the_slot() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    // Shell output of 600 KB is sent twice (response and stdout): it fits now.
    let t = run(&c, "shell", "head -c 600000 /dev/zero | tr '\\0' x").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["response"].as_str().unwrap().len(), 600_000);
    assert!(took(&t) < Duration::from_secs(2), "{t}");

    let t = run(&c, "shell", "head -c 3000000 /dev/zero | tr '\\0' x").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let out = t["result"]["stdout"].as_str().unwrap();
    assert!(out.starts_with(&"x".repeat(1 << 20)));
    assert!(
        out.ends_with("[flotilla: output truncated at 1048576 bytes; 1951424 more bytes dropped]"),
        "{}",
        &out[1 << 20..]
    );

    let t = run(&c, "python", "print('x' * 1_100_000)").await;
    assert_eq!(t["state"], "succeeded", "{}", t["error"]);
    let out = t["result"]["stdout"].as_str().unwrap();
    assert!(out.ends_with(
        "[flotilla: output truncated at 1048576 characters; 51425 more characters dropped]"
    ));
    assert!(took(&t) < Duration::from_secs(2), "{}", t["error"]);

    let t = run(&c, "python", "response = 'y' * 50_000_000").await;
    assert_eq!(t["state"], "failed");
    assert_eq!(
        t["error"],
        "the task's result is 50000002 bytes of JSON, over the limit of 8388608 bytes"
    );
    assert!(took(&t) < Duration::from_secs(2), "{}", t["error"]);

    let t = run(&c, "python", "raise ValueError('m' * 2_000_000)").await;
    assert_eq!(t["state"], "failed");
    let tb = t["result"]["response"].as_str().unwrap();
    assert!(
        tb.len() < (1 << 20) + 200,
        "traceback cut to the output limit: {}",
        tb.len()
    );
    assert!(tb.contains("more characters dropped (limit 1048576)]"));
    assert!(t["error"].as_str().unwrap().len() < 5000);
    assert!(took(&t) < Duration::from_secs(2));

    // The same (only) slot runs a normal task; nothing was restarted.
    let t = run(&c, "python", "response = 6 * 7").await;
    assert_eq!(t["result"]["response"], 42);
    assert_eq!(t["attempts"], 1);
    let nodes = c.nodes().await.unwrap();
    assert_eq!(nodes[0]["restarts"], 0);
    // The master held at most one bounded report at a time: well under the
    // 50 MB result and the 2 MB messages it was spared.
    let rss = rss_kib(c.pid());
    assert!(rss < 100 * 1024, "master RSS {rss} KiB");
}

#[tokio::test]
async fn results_json_cannot_carry_succeed_on_the_first_attempt() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    let cases = [
        ("response = float('nan')", json!("NaN")),
        ("response = {'x': float('inf')}", json!({"x": "Infinity"})),
        ("response = 2**64 + 1", json!("18446744073709551617")),
        ("response = -float('inf')", json!("-Infinity")),
    ];
    for (code, form) in cases {
        let t = c.run_python(code).await;
        assert_eq!(t["state"], "succeeded", "{code}: {t}");
        assert_eq!(t["attempts"], 1, "{code}");
        assert_eq!(t["result"]["response"], form, "{code}");
    }
    let t = c.run_python("print('\\udcff')").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 1);
    assert_eq!(t["result"]["stdout"], "\\udcff\n");
    assert_eq!(c.nodes().await.unwrap()[0]["restarts"], 0);
}

/// Processes running `sleep MARK`.
fn sleepers(mark: &str) -> usize {
    let want = format!("sleep\0{mark}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes())
        })
        .count()
}

/// Waits (polling /proc, test side) until `n` sleepers with `mark` exist.
async fn until_sleepers(mark: &str, pred: impl Fn(usize) -> bool, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = sleepers(mark);
        if pred(n) || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 150 plain children and 50 that escape into their own session (the
/// `sh` that started them exits, so they are orphans).
fn spawner(mark: &str, then: &str) -> String {
    format!(
        "import subprocess\n\
         for i in range(150):\n    subprocess.Popen(['sleep', '{mark}'])\n\
         for i in range(50):\n    subprocess.Popen(['setsid', 'sh', '-c', 'sleep {mark} &']).wait()\n\
         {then}\n"
    )
}

#[tokio::test]
async fn processes_a_task_starts_end_with_it_and_with_its_worker() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    // The task ends normally: everything it started goes.
    let t = c.run_python(&spawner("3001", "response = 'spawned'")).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let left = until_sleepers("3001", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the task ended");

    // The task fails: the same.
    let t = c
        .run_python(&spawner("3002", "raise RuntimeError('boom')"))
        .await;
    assert_eq!(t["state"], "failed", "{t}");
    let left = until_sleepers("3002", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the task failed");

    // A shell task: background jobs and setsid escapees.
    let t = run(
        &c,
        "shell",
        "for i in $(seq 100); do sleep 3003 & done; for i in $(seq 100); do setsid sh -c 'sleep 3003 &'; done; echo done",
    )
    .await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let left = until_sleepers("3003", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the shell task");

    // The worker is stopped while the task runs: its processes go too.
    let id = c
        .send_python(&spawner("3004", "import time\ntime.sleep(600)"))
        .await
        .unwrap();
    let n = until_sleepers("3004", |n| n == 200, Duration::from_secs(30)).await;
    assert_eq!(n, 200, "the task started its sleepers");
    let (status, body) = c.post("/stop/0", json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let left = until_sleepers("3004", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after /stop");
    // The task runs again on the restarted worker (at-least-once) and
    // starts its sleepers again; the master's shutdown ends them.
    let n = until_sleepers("3004", |n| n == 200, Duration::from_secs(30)).await;
    assert_eq!(n, 200, "task {id} ran again");
    drop(c);
    let left = until_sleepers("3004", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the master's shutdown");
}
