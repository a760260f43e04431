//! Workloads about scale: W8 (many workers) and `backlog` (a long master
//! queue). Kept apart from the other workloads; they use the same `Target`
//! (a child `flotilla up` driven over HTTP).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use flotilla_client::api::{TaskState, WorkerState};
use flotilla_proto::TaskSpec;
use serde_json::{json, Value};

use super::{descendants, manifest, proc_stat, python, rss_bytes, BenchOptions, Target};

/// Proportional set size of a process (`Pss:` of /proc/<pid>/smaps_rollup):
/// its resident memory with each shared page divided among its sharers, so
/// that summing it over processes counts shared libraries once.
fn pss_bytes(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no Pss in /proc/{pid}/smaps_rollup"))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

/// Submits `n` tasks `response = i` in batches of 2,000, all before the
/// first result is read, then follows the feed: tasks/s from the first
/// submit to the last result, every response checked once.
async fn throughput(t: &Target, n: usize) -> Result<f64> {
    Ok(n as f64 / super::batches(t, n, 2_000).await?)
}

/// Every worker active, none restarted, each heard from within the
/// heartbeat timeout: the master handled every worker's heartbeats.
async fn all_alive(t: &Target, workers: usize) -> Result<Value> {
    let nodes = t.client.nodes().await?;
    let active = nodes
        .iter()
        .filter(|n| n.state == WorkerState::Active)
        .count();
    let restarts: u64 = nodes.iter().map(|n| n.restarts).sum();
    let oldest = nodes
        .iter()
        .map(|n| n.last_heartbeat_ms_ago)
        .max()
        .unwrap_or(0);
    if nodes.len() != workers || active != workers || restarts != 0 {
        bail!(
            "{workers} workers expected active and never restarted: {} listed, {active} active, {restarts} restarts",
            nodes.len()
        );
    }
    Ok(json!({"active": active, "restarts": restarts, "oldest_heartbeat_ms_ago": oldest}))
}

/// W8, many workers: 100 workers of capacity 2 (one slot each, as
/// `flotilla up` runs them) on the process runtime
/// (`--ephemeral`). Measured: the start-up (from `flotilla up` to every
/// worker registered), the master's CPU over 10 idle seconds (and the
/// whole cluster's), every worker alive and unrestarted after the idle
/// window and after the load (heartbeats all handled), the memory of the
/// warm interpreters (RSS and PSS of each `python3`, per execution slot),
/// and W1 (10,000 tasks `response = i` in batches of 2,000) on it against
/// W1 on the usual 4 workers of capacity 64, side by side (the order
/// alternates between runs).
pub(super) async fn w8(opts: &BenchOptions, run: usize) -> Result<Value> {
    const WORKERS: usize = 100;
    const CAPACITY: usize = 2;
    const N: usize = 10_000;
    let mut out = serde_json::Map::new();
    let reference = || async {
        let t = Target::start_with(opts, &manifest(4, 64), true).await?;
        throughput(&t, N).await
    };
    let mut four = None;
    if run % 2 == 1 {
        four = Some(reference().await?);
    }
    {
        let manifest = manifest(WORKERS, CAPACITY).replace("spec:\n", "spec:\n  maxWorkers: 100\n");
        let t0 = Instant::now();
        let t = Target::start_with(opts, &manifest, true).await?;
        out.insert("startup_s".into(), json!(t0.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let master = t.child.id();
        let pids = descendants(master)?;
        let ticks = |pids: &[u32]| -> u64 {
            pids.iter()
                .filter_map(|p| proc_stat(*p))
                .map(|(_, u, s)| u + s)
                .sum()
        };
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
        let window = 10.0;
        let (m0, a0) = (ticks(&[master]), ticks(&pids));
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (m1, a1) = (ticks(&[master]), ticks(&pids));
        out.insert(
            "idle_master_cpu_percent".into(),
            json!(100.0 * (m1 - m0) as f64 / hz / window),
        );
        out.insert(
            "idle_cluster_cpu_percent".into(),
            json!(100.0 * (a1 - a0) as f64 / hz / window),
        );
        out.insert("processes".into(), json!(pids.len()));
        out.insert("after_idle".into(), all_alive(&t, WORKERS).await?);
        // The warm interpreters: every python3 under the workers (each slot's
        // and each worker's spare).
        let pythons: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| comm(*p).starts_with("python"))
            .collect();
        let workers: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| comm(*p).starts_with("flotilla-worker"))
            .collect();
        let (mut rss, mut pss) = (0u64, 0u64);
        for p in &pythons {
            rss += rss_bytes(*p)?;
            pss += pss_bytes(*p)?;
        }
        let worker_rss: u64 = workers.iter().filter_map(|p| rss_bytes(*p).ok()).sum();
        // One execution slot per worker (`flotilla up` without `--slots`);
        // each worker also keeps one spare warm interpreter.
        let slots = WORKERS as f64;
        out.insert("interpreters".into(), json!(pythons.len()));
        out.insert(
            "interpreter_rss_bytes".into(),
            json!(rss as f64 / pythons.len().max(1) as f64),
        );
        out.insert(
            "interpreter_pss_bytes".into(),
            json!(pss as f64 / pythons.len().max(1) as f64),
        );
        out.insert("pss_per_slot_bytes".into(), json!(pss as f64 / slots));
        out.insert(
            "worker_rss_bytes".into(),
            json!(worker_rss as f64 / workers.len().max(1) as f64),
        );
        out.insert("master_rss_bytes".into(), json!(rss_bytes(master)?));
        out.insert("w1_100_tasks_per_s".into(), json!(throughput(&t, N).await?));
        out.insert("after_load".into(), all_alive(&t, WORKERS).await?);
    }
    let four = match four {
        Some(f) => f,
        None => reference().await?,
    };
    out.insert("w1_4_tasks_per_s".into(), json!(four));
    let ratio = out["w1_100_tasks_per_s"].as_f64().unwrap_or(0.0) / four;
    out.insert("w1_100_vs_4".into(), json!(ratio));
    Ok(Value::Object(out))
}

/// Waits until `count` tasks succeeded after feed position `after`: the
/// seconds it took.
async fn until_succeeded(t: &Target, mut after: u64, count: usize) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0;
    while done < count {
        let page = t.client.finished(after, Duration::from_secs(10)).await?;
        after = page.next;
        done += page
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Succeeded)
            .count();
        if start.elapsed() > Duration::from_secs(300) {
            bail!("only {done} of {count} tasks succeeded in 300 s");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// One backlog measurement: 4 workers of capacity 4 (durable, as `flotilla
/// up` runs), their queues filled with 16 sleeping tasks so that everything
/// submitted next waits in the master queue; `queued` tasks submitted in
/// batches of 2,000; then the sleepers are cancelled and the time to the
/// first 20,000 results is the dispatch rate.
async fn backlog_once(
    opts: &BenchOptions,
    queued: usize,
) -> Result<serde_json::Map<String, Value>> {
    const SLOTS: usize = 16; // 4 workers x capacity 4
    const MEASURED: usize = 20_000;
    let t = Target::start(opts, &manifest(4, 4)).await?;
    let pid = t.child.id();
    let sleepers = t
        .client
        .submit(&vec![python("import time\ntime.sleep(600)".into()); SLOTS])
        .await?;
    // Every worker's queue is full of sleepers (one running on its slot,
    // the rest waiting): what comes next stays in the master queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    while t
        .client
        .nodes()
        .await?
        .iter()
        .map(|n| n.running + n.queued)
        .sum::<usize>()
        < SLOTS
    {
        if Instant::now() > deadline {
            bail!("the sleepers did not all start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = t.client.feed_position().await?;
    let rss_before = rss_bytes(pid)?;
    let start = Instant::now();
    let mut first = 0;
    while first < queued {
        let tasks: Vec<TaskSpec> = (first..(first + 2_000).min(queued))
            .map(|i| python(format!("response = {i}")))
            .collect();
        t.client.submit(&tasks).await?;
        first += tasks.len();
    }
    let submit_s = start.elapsed().as_secs_f64();
    let rss_after = rss_bytes(pid)?;
    let mut health = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        t.client.health().await?;
        health.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    health.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    for id in sleepers {
        t.client.cancel(id).await?;
    }
    let dispatch_s = until_succeeded(&t, after, MEASURED.min(queued)).await?;
    let mut out = serde_json::Map::new();
    out.insert("queued".into(), json!(queued));
    out.insert("submit_tasks_per_s".into(), json!(queued as f64 / submit_s));
    out.insert(
        "rss_bytes_per_queued_task".into(),
        json!((rss_after as f64 - rss_before as f64) / queued as f64),
    );
    out.insert(
        "health_p50_ms".into(),
        json!(super::percentile(&health, 0.5)),
    );
    out.insert("health_max_ms".into(), json!(health[health.len() - 1]));
    out.insert(
        "dispatch_tasks_per_s".into(),
        json!(MEASURED.min(queued) as f64 / dispatch_s),
    );
    Ok(out)
}

/// Backlog: 300,000 tasks waiting in the master queue (submit rate, master
/// RSS per queued task, `/health` latency with the backlog, the dispatch
/// rate of the first 20,000), against the same measurement with 20,000
/// queued (so the dispatch rates differ only by the length of the queue).
pub(super) async fn backlog(opts: &BenchOptions) -> Result<Value> {
    let big = backlog_once(opts, 300_000).await?;
    let small = backlog_once(opts, 20_000).await?;
    let mut out = big;
    out.insert(
        "dispatch_without_backlog_tasks_per_s".into(),
        small["dispatch_tasks_per_s"].clone(),
    );
    let ratio = out["dispatch_tasks_per_s"].as_f64().unwrap_or(0.0)
        / small["dispatch_tasks_per_s"].as_f64().unwrap_or(f64::NAN);
    out.insert("dispatch_with_vs_without".into(), json!(ratio));
    Ok(Value::Object(out))
}
