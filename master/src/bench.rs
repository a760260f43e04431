//! `flotilla bench`: the workloads of README's "Performance" section, measured from outside
//! the cluster. Each run starts a fresh `flotilla up` as a separate process
//! and drives it over HTTP through `flotilla-client`, as a user would;
//! figures are medians of the runs.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flotilla_client::api::{TaskState, TaskView};
use flotilla_client::Client;
use flotilla_proto::{TaskKind, TaskSpec};
use serde_json::{json, Value};

mod scale;

#[derive(Clone)]
pub struct BenchOptions {
    pub workloads: Vec<String>,
    pub runs: usize,
    pub flotilla: PathBuf,
    /// Export traces (OTLP/HTTP) from the cluster under test to this
    /// endpoint; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// With an endpoint: the cluster's `spec.telemetry.sampleRatio`
    /// (`None`: the manifest's default, 1). The `trace` workload's sampled
    /// share (0.1 when not given).
    pub trace_ratio: Option<f64>,
    /// W7's number of tasks (1,000,000 by default; the first figure is
    /// taken after a tenth of them).
    pub w7_tasks: usize,
    /// Every cluster under test runs `--ephemeral` (no store).
    pub ephemeral: bool,
    /// The queued tasks of the restart workload (100,000 by default).
    pub restart_tasks: usize,
}

/// A stand-in trace collector for measuring the cost of tracing: accepts
/// OTLP/HTTP exports and counts them, as a collector's front door would.
pub async fn start_trace_sink() -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let bytes = std::sync::Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            counter.fetch_add(body.len() as u64, Ordering::Relaxed);
            async {
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, bytes))
}

/// The bench's scratch directory (manifests, state directories, claims).
fn bench_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flotilla-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts `flotilla up` on `manifest` as a child: durable on `state_dir`
/// (`None`: `--ephemeral`), its runtime's claims in `claims`, on `port`
/// (0: any free one); its stdout piped (it prints its address first).
fn spawn_master(
    opts: &BenchOptions,
    manifest: &str,
    state_dir: Option<&std::path::Path>,
    claims: &std::path::Path,
    port: u16,
) -> Result<Child> {
    let flotilla = &opts.flotilla;
    let path = bench_dir()?.join("cluster.yaml");
    // Ratio 1 is the default: not written, so that an earlier build
    // without the setting (`--cluster-binary`) can be measured too.
    let manifest = match (&opts.otlp_endpoint, opts.trace_ratio) {
        (Some(_), Some(ratio)) if ratio < 1.0 => with_sample_ratio(manifest, ratio),
        _ => manifest.to_string(),
    };
    std::fs::write(&path, manifest)?;
    let state_args: Vec<std::ffi::OsString> = match state_dir {
        Some(d) => vec!["--state-dir".into(), d.into()],
        None => vec!["--ephemeral".into()],
    };
    Command::new(flotilla)
        .env("FLOTILLA_RUNTIME_DIR", claims)
        .args(["--log-level", "error", "up"])
        .arg(&path)
        .args(["--port", &port.to_string()])
        .args(state_args)
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(crate::api_token().map(|t| (flotilla_client::TOKEN_ENV, t)))
        .envs(
            opts.otlp_endpoint
                .iter()
                .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e.as_str())),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", flotilla.display()))
}

/// A cluster under test: a child `flotilla up`.
struct Target {
    child: Child,
    client: Client,
    url: String,
    /// Its state directory (removed when it is done); `None`: `--ephemeral`.
    state_dir: Option<PathBuf>,
}

impl Target {
    /// A durable master (as `flotilla up` is by default), on a fresh state
    /// directory; with `--ephemeral`, one without a store.
    async fn start(opts: &BenchOptions, manifest: &str) -> Result<Target> {
        Self::start_with(opts, manifest, opts.ephemeral).await
    }

    async fn start_with(opts: &BenchOptions, manifest: &str, ephemeral: bool) -> Result<Target> {
        let dir = bench_dir()?;
        let state_dir = (!ephemeral).then(|| {
            use rand::Rng;
            dir.join(format!("state-{:x}", rand::thread_rng().gen::<u64>()))
        });
        // A claim directory of its own: a bench beside other masters of the
        // same cluster name (another bench, a test) must not be refused.
        let claims = {
            use rand::Rng;
            dir.join(format!("run-{:x}", rand::thread_rng().gen::<u64>()))
        };
        let child = spawn_master(opts, manifest, state_dir.as_deref(), &claims, 0)?;
        Self::ready(child, state_dir).await
    }

    /// Reads the address the child printed and waits for its workers.
    async fn ready(mut child: Child, state_dir: Option<PathBuf>) -> Result<Target> {
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or_else(|| anyhow!("flotilla up printed no address: {line:?}"))?
            .to_string();
        let t = Target {
            child,
            client: Client::new(&url, crate::api_token())?,
            url,
            state_dir,
        };
        t.client
            .wait_ready(Duration::from_secs(120))
            .await
            .context("workers did not come up")?;
        Ok(t)
    }

    /// Follows the completion feed until `ids` are all final; returns them
    /// in completion order with the instant the last one was seen.
    async fn collect(&self, ids: &[u64]) -> Result<(Vec<TaskView>, Instant)> {
        let done = self.client.follow(ids.iter().copied(), 0).all(None).await?;
        let mut seen = HashSet::new();
        for t in &done {
            if !seen.insert(t.id) {
                bail!("task {} finished twice", t.id);
            }
        }
        Ok((done, Instant::now()))
    }
}

impl Target {
    /// SIGINT, then waits up to `patience` for the master to remove its
    /// workers and exit.
    fn stop(&mut self, patience: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Docker worker start: from `flotilla up` to every worker registered, for
/// one worker and for three (started in parallel, so three should cost
/// little more than one). Needs Docker and the worker image.
async fn docker_start(opts: &BenchOptions) -> Result<Value> {
    let mut took = Vec::new();
    for n in [1usize, 3] {
        let manifest = format!(
            "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{ name: bench-start }}\nspec:\n  runtime: docker\n  workers:\n{}",
            "    - capacity: 1\n".repeat(n)
        );
        let t0 = Instant::now();
        let mut t = Target::start(opts, &manifest).await?;
        took.push(t0.elapsed().as_secs_f64());
        // Let it remove its containers, so the next start finds none.
        t.stop(Duration::from_secs(60));
    }
    Ok(json!({"one_s": took[0], "three_s": took[1], "ratio": took[1] / took[0]}))
}

impl Drop for Target {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let mut exited = false;
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(d) = &self.state_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn manifest(workers: usize, capacity: usize) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{ name: bench }}\nspec:\n  workers:\n    - capacity: {capacity}\n      replicas: {workers}\n"
    )
}

fn with_total(manifest: String) -> String {
    manifest + "  resources:\n    - { name: total, type: Integer, initialValue: 0 }\n"
}

fn python(code: String) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Python,
        command: code,
        timeout: None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

const FIB: &str = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n";

/// One fib(n) in a plain python3, timed inside the interpreter (median of 3).
fn single_fib_seconds(n: u32) -> Result<f64> {
    let code = format!(
        "{FIB}import time\nt = time.perf_counter()\nfib({n})\nprint(time.perf_counter() - t)"
    );
    let mut xs = Vec::new();
    for _ in 0..3 {
        let out = Command::new("python3").args(["-c", &code]).output()?;
        let s = String::from_utf8_lossy(&out.stdout);
        xs.push(
            s.trim()
                .parse::<f64>()
                .with_context(|| format!("python3 printed {s:?}"))?,
        );
    }
    Ok(median(xs))
}

fn check_unique_results(tasks: &[TaskView], n: usize) -> Result<()> {
    let mut seen = HashSet::new();
    for t in tasks {
        if t.state != TaskState::Succeeded {
            bail!("task failed: {t:?}");
        }
        let r = t
            .result
            .as_ref()
            .and_then(|r| r.response.as_u64())
            .ok_or_else(|| anyhow!("no numeric response: {t:?}"))?;
        if !seen.insert(r) {
            bail!("response {r} seen twice");
        }
    }
    if seen.len() != n || (0..n as u64).any(|i| !seen.contains(&i)) {
        bail!("expected responses 0..{n}, got {} distinct", seen.len());
    }
    Ok(())
}

/// Submits `n` tasks (`code` with `{i}` replaced by 0..n) in one batch
/// and follows the results: the seconds from first submit to last result.
async fn batch(t: &Target, n: usize, code: &str) -> Result<f64> {
    let tasks: Vec<TaskSpec> = (0..n)
        .map(|i| python(code.replace("{i}", &i.to_string())))
        .collect();
    let start = Instant::now();
    let ids = t.client.submit(&tasks).await?;
    let (done, end) = t.collect(&ids).await?;
    check_unique_results(&done, n)?;
    Ok((end - start).as_secs_f64())
}

impl Target {
    /// The `flotilla_store_*` figures of its `/metrics` (commits, operations,
    /// seconds applying and syncing), as `name -> value`.
    async fn store_figures(&self) -> Result<std::collections::HashMap<String, f64>> {
        let mut req = reqwest::Client::new().get(format!("{}/metrics", self.url));
        if let Some(t) = crate::api_token() {
            req = req.bearer_auth(t);
        }
        let text = req.send().await?.error_for_status()?.text().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("flotilla_store_"))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect())
    }
}

/// W1 twice, side by side: durable (as `flotilla up` runs by default) and
/// `--ephemeral`; only the latter when the bench runs `--ephemeral`. For
/// the durable run also what its store did during the batch: commits (one
/// sync each), operations per commit, and the share of the batch's time the
/// writer thread was busy (SQL, then sync); and the master's CPU per task.
async fn w1(opts: &BenchOptions) -> Result<Value> {
    let n = 2000;
    if opts.ephemeral {
        let t = Target::start(opts, &manifest(4, 64)).await?;
        let secs = batch(&t, n, "response = {i}").await?;
        return Ok(json!({"tasks_per_s": n as f64 / secs, "seconds": secs}));
    }
    let (secs, cpu, store) = {
        let t = Target::start(opts, &manifest(4, 64)).await?;
        let before = t.store_figures().await?;
        let cpu_before = cpu_seconds(t.child.id())?;
        let secs = batch(&t, n, "response = {i}").await?;
        let cpu = cpu_seconds(t.child.id())? - cpu_before;
        let after = t.store_figures().await?;
        let d = |k: &str| after.get(k).unwrap_or(&0.0) - before.get(k).unwrap_or(&0.0);
        let commits = d("commits");
        let store = json!({
            "commits": commits,
            "ops_per_commit": d("ops") / commits.max(1.0),
            "apply_share": d("apply_seconds") / secs,
            "sync_share": d("sync_seconds") / secs,
        });
        (secs, cpu, store)
    };
    let (ephemeral_secs, ephemeral_cpu) = {
        let t = Target::start_with(opts, &manifest(4, 64), true).await?;
        let cpu_before = cpu_seconds(t.child.id())?;
        let secs = batch(&t, n, "response = {i}").await?;
        (secs, cpu_seconds(t.child.id())? - cpu_before)
    };
    Ok(json!({
        "tasks_per_s": n as f64 / secs,
        "seconds": secs,
        "ephemeral_tasks_per_s": n as f64 / ephemeral_secs,
        "durable_vs_ephemeral": ephemeral_secs / secs,
        "master_cpu_us_per_task": 1e6 * cpu / n as f64,
        "ephemeral_master_cpu_us_per_task": 1e6 * ephemeral_cpu / n as f64,
        "store": store,
    }))
}

/// One open dashboard, as the page behaves: the live update stream
/// (`/ui/events`), read to the end of each message, and the task table's
/// refresh (the latest 1,000 task IDs) once a second. Counts the updates.
struct Dashboard {
    updates: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Dashboard {
    async fn open(url: &str) -> Result<Dashboard> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let http = reqwest::Client::new();
        let token = crate::api_token();
        let auth = move |req: reqwest::RequestBuilder| match &token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let mut events = auth(http.get(format!("{url}/ui/events")))
            .send()
            .await?
            .error_for_status()
            .context("GET /ui/events")?;
        let updates = std::sync::Arc::new(AtomicU64::new(0));
        let next_id = std::sync::Arc::new(AtomicU64::new(0));
        let (count, next) = (updates.clone(), next_id.clone());
        let stream = tokio::spawn(async move {
            let mut carry = String::new();
            while let Ok(Some(chunk)) = events.chunk().await {
                carry.push_str(&String::from_utf8_lossy(&chunk));
                // Each update is one `event: update` block ending in a blank
                // line; its `data:` is the JSON the page renders.
                while let Some(end) = carry.find("\n\n") {
                    let block: String = carry.drain(..end + 2).collect();
                    if !block.contains("event: update") {
                        continue;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                    if let Some(update) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                        next.store(
                            update["next_task_id"].as_u64().unwrap_or(0),
                            Ordering::Relaxed,
                        );
                    }
                }
            }
        });
        let base = url.to_string();
        let table = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                // The page's table: the latest 1,000 IDs, page by page.
                let mut after = next_id.load(Ordering::Relaxed).saturating_sub(1001);
                for _ in 0..10 {
                    let url = format!("{base}/ui/tasks?limit=1000&after={after}");
                    let Ok(resp) = auth(http.get(url)).send().await else {
                        break;
                    };
                    let Ok(page) = resp.json::<Value>().await else {
                        break;
                    };
                    match page["next"].as_u64() {
                        Some(n) => after = n,
                        None => break,
                    }
                }
            }
        });
        Ok(Dashboard {
            updates,
            tasks: vec![stream, table],
        })
    }

    fn updates(&self) -> u64 {
        self.updates.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The page's own weight: the HTML, script and styles `GET /` loads.
async fn page_bytes(url: &str) -> Result<usize> {
    let mut total = 0;
    for path in ["/", "/ui/app.js", "/ui/style.css"] {
        total += reqwest::get(format!("{url}{path}"))
            .await?
            .error_for_status()?
            .bytes()
            .await?
            .len();
    }
    Ok(total)
}

/// CPU seconds a process has used (user + system), from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let (_, utime, stime) =
        proc_stat(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat"))?;
    Ok((utime + stime) as f64 / hz)
}

/// The master's counters of its dashboard work, from `GET /metrics`:
/// seconds it held the scheduler's lock for the dashboard, updates it
/// built, table rows it served, CPU seconds of that work (NaN where a master, an earlier build under
/// `--cluster-binary`, has no such counter).
async fn dashboard_counters(url: &str) -> Result<[f64; 4]> {
    let http = reqwest::Client::new();
    let mut req = http.get(format!("{url}/metrics"));
    if let Some(t) = crate::api_token() {
        req = req.bearer_auth(t);
    }
    let text = req.send().await?.error_for_status()?.text().await?;
    let read = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok([
        read("flotilla_dashboard_lock_seconds_total"),
        read("flotilla_dashboard_updates_built_total"),
        read("flotilla_dashboard_table_rows_total"),
        read("flotilla_dashboard_cpu_seconds_total"),
    ])
}

/// One W1 batch measured: tasks/s, the master's CPU seconds per 1,000
/// tasks, and its dashboard counters' growth during the batch.
struct Phase {
    tasks_per_s: f64,
    cpu_per_1000: f64,
    lock_s: f64,
    updates_built: f64,
    rows: f64,
    dashboard_cpu_s: f64,
    secs: f64,
}

async fn measured_batch(t: &Target, n: usize) -> Result<Phase> {
    let pid = t.child.id();
    let url = t.client.url().to_string();
    let (cpu0, c0) = (cpu_seconds(pid)?, dashboard_counters(&url).await?);
    // Submitted in requests of at most 5,000 tasks (a request body is
    // bounded), the results followed together.
    let start = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for from in (0..n).step_by(5_000) {
        let tasks: Vec<TaskSpec> = (from..n.min(from + 5_000))
            .map(|i| python(format!("response = {i}")))
            .collect();
        ids.extend(t.client.submit(&tasks).await?);
    }
    let (done, end) = t.collect(&ids).await?;
    check_unique_results(&done, n)?;
    let secs = (end - start).as_secs_f64();
    let (cpu1, c1) = (cpu_seconds(pid)?, dashboard_counters(&url).await?);
    Ok(Phase {
        tasks_per_s: n as f64 / secs,
        cpu_per_1000: (cpu1 - cpu0) * 1000.0 / n as f64,
        lock_s: c1[0] - c0[0],
        updates_built: c1[1] - c0[1],
        rows: c1[2] - c0[2],
        dashboard_cpu_s: c1[3] - c0[3],
        secs,
    })
}

async fn open_dashboards(url: &str, n: usize) -> Result<Vec<Dashboard>> {
    let mut b = Vec::new();
    for _ in 0..n {
        b.push(Dashboard::open(url).await?);
    }
    // Let each take its first, full update and its first table.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(b)
}

/// W1 with three dashboards open against W1 without, on one master, in
/// the order off, on, on, off (so a drift of the machine cancels out),
/// each phase 4,000 tasks: tasks/s, and the master process's CPU seconds
/// per 1,000 tasks (from /proc, so other load on the machine does not
/// count), and the time the master held its scheduler lock for the
/// dashboards. Then the cluster as fast as it goes (`--ephemeral`, 40,000
/// tasks) with three dashboards open: the task rate reached and the
/// updates each dashboard received a second.
async fn dashboards(opts: &BenchOptions) -> Result<Value> {
    let n = 4000;
    let t = Target::start(opts, &manifest(4, 64)).await?;
    let url = t.client.url().to_string();
    // Warm up (interpreters started, store and caches in use).
    batch(&t, n, "response = {i}").await?;
    let mut off = Vec::new();
    let mut on = Vec::new();
    for open in [false, true, true, false] {
        let boards = if open {
            open_dashboards(&url, 3).await?
        } else {
            Vec::new()
        };
        let before: Vec<u64> = boards.iter().map(Dashboard::updates).collect();
        let phase = measured_batch(&t, n).await?;
        let per_client = boards
            .iter()
            .zip(&before)
            .map(|(b, &was)| (b.updates() - was) as f64 / phase.secs)
            .fold(0.0, f64::max);
        drop(boards);
        if open { &mut on } else { &mut off }.push((phase, per_client));
    }
    let mean = |xs: &[(Phase, f64)], f: fn(&(Phase, f64)) -> f64| {
        xs.iter().map(f).sum::<f64>() / xs.len() as f64
    };
    let (off_rate, on_rate) = (
        mean(&off, |p| p.0.tasks_per_s),
        mean(&on, |p| p.0.tasks_per_s),
    );
    let (off_cpu, on_cpu) = (
        mean(&off, |p| p.0.cpu_per_1000),
        mean(&on, |p| p.0.cpu_per_1000),
    );
    let on_secs: f64 = on.iter().map(|p| p.0.secs).sum();
    let lock_s: f64 = on.iter().map(|p| p.0.lock_s).sum();
    let updates_built: f64 = on.iter().map(|p| p.0.updates_built).sum();
    let rows: f64 = on.iter().map(|p| p.0.rows).sum();
    let dashboard_cpu: f64 = on.iter().map(|p| p.0.dashboard_cpu_s).sum();
    let on_tasks = (n * on.len()) as f64;
    let page = page_bytes(&url).await?;
    drop(t);

    // As fast as it goes: an ephemeral master (no commit to wait for).
    let t = Target::start_with(opts, &manifest(4, 64), true).await?;
    let url = t.client.url().to_string();
    batch(&t, n, "response = {i}").await?;
    let boards = open_dashboards(&url, 3).await?;
    let big = 40_000;
    let before: Vec<u64> = boards.iter().map(Dashboard::updates).collect();
    let fast = measured_batch(&t, big).await?;
    let per_client: Vec<f64> = boards
        .iter()
        .zip(&before)
        .map(|(b, &was)| (b.updates() - was) as f64 / fast.secs)
        .collect();
    Ok(json!({
        "tasks_per_s": off_rate,
        "with_dashboards_tasks_per_s": on_rate,
        "drop_percent": 100.0 * (off_rate - on_rate) / off_rate,
        "master_cpu_ms_per_1000_tasks": off_cpu * 1000.0,
        "with_dashboards_master_cpu_ms_per_1000_tasks": on_cpu * 1000.0,
        "cpu_increase_percent": 100.0 * (on_cpu - off_cpu) / off_cpu,
        "dashboard_lock_ms_per_s": lock_s * 1000.0 / on_secs,
        "dashboard_updates_built_per_s": updates_built / on_secs,
        "dashboard_table_rows_per_s": rows / on_secs,
        "dashboard_cpu_ms_per_s": dashboard_cpu * 1000.0 / on_secs,
        "dashboard_cpu_ms_per_1000_tasks": dashboard_cpu * 1e6 / on_tasks,
        "dashboard_cpu_share_percent": 100.0 * (dashboard_cpu * 1000.0 / on_tasks) / off_cpu,
        "updates_per_s_per_client_w1": mean(&on, |p| p.1),
        "fast_tasks_per_s": fast.tasks_per_s,
        "fast_master_cpu_ms_per_1000_tasks": fast.cpu_per_1000 * 1000.0,
        "fast_dashboard_cpu_ms_per_1000_tasks": fast.dashboard_cpu_s * 1e6 / big as f64,
        "updates_per_s_per_client": per_client.iter().cloned().fold(0.0, f64::max),
        "page_bytes": page,
    }))
}

async fn w2(opts: &BenchOptions) -> Result<Value> {
    let t = Target::start(opts, &manifest(4, 8)).await?;
    let mut lat = Vec::new();
    for i in 0..300u64 {
        let start = Instant::now();
        let id = t.client.send(&python(format!("response = {i}"))).await?;
        let done = t.client.wait_task(id, Duration::from_secs(10)).await?;
        lat.push(start.elapsed().as_secs_f64() * 1000.0);
        if done.result.as_ref().map(|r| &r.response) != Some(&json!(i)) {
            bail!("task {id} answered {done:?}");
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Ok(json!({"p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99)}))
}

/// W3 and W6: `count` fib(n) tasks; the figure is makespan over the
/// two-core limit (count x one task alone / 2).
async fn cpu_workload(
    opts: &BenchOptions,
    workers: usize,
    capacity: usize,
    count: usize,
    n: u32,
    node: Option<u32>,
) -> Result<Value> {
    let single = single_fib_seconds(n)?;
    let t = Target::start(opts, &manifest(workers, capacity)).await?;
    let code = format!("{FIB}fib({n})\nresponse = {{i}}");
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 0..count {
        let spec = python(code.replace("{i}", &i.to_string()));
        ids.push(match node {
            None => t.client.send(&spec).await?,
            Some(n) => t.client.send_to(n, &spec).await?,
        });
    }
    let (done, end) = t.collect(&ids).await?;
    check_unique_results(&done, count)?;
    let makespan = (end - start).as_secs_f64();
    let limit = count as f64 * single / 2.0;
    Ok(json!({"ratio": makespan / limit, "makespan_s": makespan, "single_task_s": single}))
}

/// W4: 1,000 tasks each take the write lock on `total`, add 1, release.
async fn w4(opts: &BenchOptions) -> Result<Value> {
    let t = Target::start(opts, &with_total(manifest(4, 64))).await?;
    let n = 1000;
    let code = "t = request_write_resource('total')\nt.value += 1\nrelease_write_resource('total')\nresponse = {i}";
    let secs = batch(&t, n, code).await?;
    let total = t.client.resource("total").await?.value;
    if total != n as u64 {
        bail!("W4 ended with total = {total} instead of {n}");
    }
    Ok(json!({"tasks_per_s": n as f64 / secs, "seconds": secs, "final_total": total}))
}

/// Uncontended lock round trip from task code: 1,000 acquire+release of a
/// write lock, timed in the task with perf_counter.
async fn lock_round_trip(opts: &BenchOptions) -> Result<Value> {
    let t = Target::start(opts, &with_total(manifest(1, 4))).await?;
    let code = "import time\nxs = []\nfor _ in range(1000):\n    s = time.perf_counter()\n    v = request_write_resource('total')\n    release_write_resource('total')\n    xs.append(time.perf_counter() - s)\nxs.sort()\nresponse = [xs[500] * 1000, xs[990] * 1000]";
    let id = t.client.send(&python(code.to_string())).await?;
    let done = t
        .client
        .wait_final(id, Some(Duration::from_secs(120)))
        .await?;
    let r = done.result.as_ref().map(|r| &r.response);
    match r.map(|r| (r[0].as_f64(), r[1].as_f64())) {
        Some((Some(p50), Some(p99))) => Ok(json!({"p50_ms": p50, "p99_ms": p99})),
        _ => bail!("lock round trip task answered {done:?}"),
    }
}

/// Cancel to next task: one worker with one slot runs `while True: pass`;
/// after a second it is cancelled while the next task waits in the
/// worker's queue. The
/// figure is from the cancel request to the moment the next task's code
/// runs on that very slot (in a fresh interpreter: the old one was killed),
/// read by that code from the same machine's clock, 20 times.
async fn cancel_latency(opts: &BenchOptions) -> Result<Value> {
    let t = Target::start(opts, &manifest(1, 2)).await?;
    let mut ms = Vec::new();
    for _ in 0..20 {
        let spin = t.client.send(&python("while True: pass".into())).await?;
        while t.client.task(spin).await?.state != TaskState::Running {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // It runs a while before it is cancelled, as a real one would.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let next = t
            .client
            .send(&python("import time\nresponse = time.time() * 1000".into()))
            .await?;
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        t.client.cancel(spin).await?;
        let done = t
            .client
            .wait_final(next, Some(Duration::from_secs(30)))
            .await?;
        let ran_at = done
            .result
            .as_ref()
            .and_then(|r| r.response.as_f64())
            .ok_or_else(|| anyhow!("task {next} answered {done:?}"))?;
        ms.push(ran_at - before as f64);
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(
        json!({"p50_ms": percentile(&sorted, 0.5), "p99_ms": percentile(&sorted, 0.99), "max_ms": sorted[sorted.len() - 1], "samples_ms": ms}),
    )
}

/// CPU used by an idle cluster of 4 workers (master + workers), from
/// /proc/<pid>/stat over a window.
async fn idle(opts: &BenchOptions) -> Result<Value> {
    let t = Target::start(opts, &manifest(4, 8)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The master and every process under it: workers and their interpreters.
    let pids = descendants(t.child.id())?;
    let ticks = || -> Result<u64> {
        let mut total = 0;
        for pid in &pids {
            if let Some((_, utime, stime)) = proc_stat(*pid) {
                total += utime + stime;
            }
        }
        Ok(total)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let window = 10.0;
    let before = ticks()?;
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let used = (ticks()? - before) as f64 / hz;
    Ok(
        json!({"cpu_percent_of_one_core": 100.0 * used / window, "window_s": window, "processes": pids.len()}),
    )
}

/// (ppid, utime, stime) of a process, from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the ")" closing the command name: state is field 0, ppid 1, utime 11, stime 12.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some((
        fields.get(1)?.parse().ok()?,
        fields.get(11)?.parse().ok()?,
        fields.get(12)?.parse().ok()?,
    ))
}

fn descendants(root: u32) -> Result<Vec<u32>> {
    let mut parent = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((ppid, _, _)) = proc_stat(pid) {
            parent.insert(pid, ppid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    Ok(out)
}

/// The resident set of a process, in bytes (`VmRSS` of /proc/<pid>/status).
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// A master restarted with `opts.restart_tasks` (100,000) queued tasks: one
/// worker of capacity 1 runs a task that sleeps until it is cancelled, the
/// tasks `response = i` are queued behind it, and the master (only the
/// master: its worker runs on) is SIGKILLed and started again on the same
/// state directory and port. Measured from the new master's start: until
/// `/health` answers, and until it dispatches again: the sleeping task is
/// cancelled as soon as `/health` answers, and the first queued task's
/// result is in the completion feed (the adopted worker registered again,
/// its slot was freed, the task handed to it and run).
async fn restart(opts: &BenchOptions) -> Result<Value> {
    let queued = opts.restart_tasks.max(1);
    let manifest = manifest(1, 1);
    let dir = bench_dir()?;
    let (state_dir, claims) = {
        use rand::Rng;
        let r: u64 = rand::thread_rng().gen();
        (
            dir.join(format!("state-{r:x}")),
            dir.join(format!("run-{r:x}")),
        )
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = spawn_master(opts, &manifest, Some(&state_dir), &claims, port)?;
    let mut t = Target::ready(child, Some(state_dir.clone())).await?;
    let blocker = t
        .client
        .submit(&[python("import time\ntime.sleep(600)".into())])
        .await?[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.client.task(blocker).await?.state != TaskState::Running {
        if Instant::now() > deadline {
            bail!("the sleeping task did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    const BATCH: usize = 10_000;
    let mut i = 0;
    while i < queued {
        let n = BATCH.min(queued - i);
        let tasks: Vec<TaskSpec> = (i..i + n)
            .map(|k| python(format!("response = {k}")))
            .collect();
        t.client.submit(&tasks).await?;
        i += n;
    }
    let after = t.client.feed_position().await?;
    // Acknowledged, so durable. Only the master dies.
    t.child.kill()?;
    t.child.wait()?;
    let started = Instant::now();
    let child = spawn_master(opts, &manifest, Some(&state_dir), &claims, port)?;
    // The old child is gone; dropping `t` stops the new one (and its worker).
    t.child = child;
    let health_s = loop {
        if t.client.health().await.is_ok() {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the restarted master did not answer /health within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    t.client.cancel(blocker).await?;
    let mut position = after;
    let dispatch_s = loop {
        let page = t.client.finished(position, Duration::from_secs(10)).await?;
        position = page.next;
        if let Some(task) = page.tasks.iter().find(|task| task.id != blocker) {
            if task.state != TaskState::Succeeded {
                bail!("the first task after the restart did not succeed: {task:?}");
            }
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the restarted master dispatched nothing within 60 s");
        }
    };
    let unfinished = t
        .client
        .health()
        .await?
        .get("master_queue")
        .and_then(Value::as_u64);
    Ok(json!({
        "queued": queued,
        "health_s": health_s,
        "dispatch_s": dispatch_s,
        "master_queue_after": unfinished,
        "store_bytes": crate::store::disk_bytes(&state_dir),
    }))
}

/// W7, memory over time: `opts.w7_tasks` (1,000,000) tasks `response = i`
/// in batches of 2,000 (four batches in flight), results read from the
/// completion feed, on a durable master with a short result TTL (10 s, so
/// the store holds about ten seconds of results). The master's RSS and the
/// state directory's size are read after a tenth of the tasks finished and
/// after all of them; the bytes kept per finished task are the RSS growth
/// between the two over the tasks finished in between. Each response is
/// checked to arrive exactly once.
async fn w7(opts: &BenchOptions) -> Result<Value> {
    let total = opts.w7_tasks.max(20_000);
    let first_at = total / 10;
    const BATCH: usize = 2_000;
    const IN_FLIGHT: usize = 4 * BATCH;
    let manifest = manifest(4, 4).replace("spec:\n", "spec:\n  resultTtlSeconds: 10\n");
    // Always durable, even under `--ephemeral`: W7 measures the store too.
    let t = Target::start_with(opts, &manifest, false).await?;
    let pid = t.child.id();
    let state_dir = t.state_dir.clone().expect("W7 runs durable");
    let mut seen = vec![false; total];
    let (mut submitted, mut done) = (0usize, 0usize);
    let mut after = t.client.feed_position().await?;
    let mut first: Option<(u64, u64)> = None;
    let start = Instant::now();
    while done < total {
        while submitted < total && submitted - done < IN_FLIGHT {
            let n = BATCH.min(total - submitted);
            let tasks: Vec<TaskSpec> = (submitted..submitted + n)
                .map(|i| python(format!("response = {i}")))
                .collect();
            t.client.submit(&tasks).await?;
            submitted += n;
        }
        let page = t.client.finished(after, Duration::from_secs(10)).await?;
        after = page.next;
        for task in page.tasks {
            if task.state != TaskState::Succeeded {
                bail!("W7 task failed: {task:?}");
            }
            let i = task
                .result
                .as_ref()
                .and_then(|r| r.response.as_u64())
                .filter(|&i| (i as usize) < total)
                .ok_or_else(|| anyhow!("W7 task answered {task:?}"))? as usize;
            if std::mem::replace(&mut seen[i], true) {
                bail!("W7: response {i} arrived twice");
            }
            done += 1;
        }
        if first.is_none() && done >= first_at {
            first = Some((rss_bytes(pid)?, crate::store::disk_bytes(&state_dir)));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (rss_first, disk_first) = first.expect("taken at a tenth");
    let rss_last = rss_bytes(pid)?;
    let disk_last = crate::store::disk_bytes(&state_dir);
    Ok(json!({
        "tasks": total,
        "rss_first_bytes": rss_first,
        "rss_last_bytes": rss_last,
        "rss_ratio": rss_last as f64 / rss_first as f64,
        "bytes_per_finished_task": (rss_last as f64 - rss_first as f64) / (total - first_at) as f64,
        "disk_first_bytes": disk_first,
        "disk_last_bytes": disk_last,
        "tasks_per_s": total as f64 / secs,
    }))
}

/// `manifest` with `spec.telemetry.sampleRatio` set.
fn with_sample_ratio(manifest: &str, ratio: f64) -> String {
    manifest.replacen(
        "spec:\n",
        &format!("spec:\n  telemetry: {{ sampleRatio: {ratio} }}\n"),
        1,
    )
}

/// Submits `n` tasks `response = i` in batches of `per_batch` (one request
/// each, all sent before the first result is read), then follows the
/// completion feed: the seconds from the first submit to the last result,
/// each response checked to arrive exactly once.
async fn batches(t: &Target, n: usize, per_batch: usize) -> Result<f64> {
    let start = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for first in (0..n).step_by(per_batch) {
        let tasks: Vec<TaskSpec> = (first..(first + per_batch).min(n))
            .map(|i| python(format!("response = {i}")))
            .collect();
        ids.extend(t.client.submit(&tasks).await?);
    }
    let (done, end) = t.collect(&ids).await?;
    check_unique_results(&done, n)?;
    Ok((end - start).as_secs_f64())
}

/// What trace export costs W1, side by side in one run: 10,000 tasks
/// `response = i` in batches of 2,000 on 4 workers of capacity 64
/// (`--ephemeral`, so the store's syncs do not hide the CPU that tracing
/// takes) with export off, on for every task (sample ratio 1), and on for
/// a share (`--trace-ratio`, else 0.1), each on a fresh master exporting to
/// a stand-in collector. The order rotates from run to run. Besides the
/// rates: the CPU time of the cluster's processes per task, and the bytes
/// exported.
async fn trace_cost(opts: &BenchOptions, run: usize) -> Result<Value> {
    const N: usize = 10_000;
    let (sink, bytes) = start_trace_sink().await?;
    let ratio = opts.trace_ratio.unwrap_or(0.1);
    let configs = [
        ("off", None, None),
        ("all", Some(sink.clone()), Some(1.0)),
        ("ratio", Some(sink), Some(ratio)),
    ];
    let mut out = serde_json::Map::new();
    for k in 0..configs.len() {
        let (name, endpoint, sample) = configs[(k + run) % configs.len()].clone();
        let o = BenchOptions {
            otlp_endpoint: endpoint,
            trace_ratio: sample,
            ..opts.clone()
        };
        let before = bytes.load(std::sync::atomic::Ordering::Relaxed);
        let (secs, cpu) = {
            let t = Target::start_with(&o, &manifest(4, 64), true).await?;
            // CPU of the master, its workers and their interpreters: a
            // figure that a machine shared with other work disturbs far
            // less than the rate. Taken until the exporters' next batch
            // (every 5 s by default) has gone out.
            let pids = descendants(t.child.id())?;
            let ticks = || -> u64 {
                pids.iter()
                    .filter_map(|p| proc_stat(*p))
                    .map(|(_, u, s)| u + s)
                    .sum()
            };
            let cpu0 = ticks();
            let secs = batches(&t, N, 2_000).await?;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let cpu = ticks() - cpu0;
            // Stopping the master flushes its last spans (and its workers').
            drop(t);
            (secs, cpu)
        };
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
        let exported = bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
        out.insert(format!("{name}_tasks_per_s"), json!(N as f64 / secs));
        out.insert(
            format!("{name}_cpu_us_per_task"),
            json!(cpu as f64 / hz / N as f64 * 1e6),
        );
        out.insert(format!("{name}_bytes_exported"), json!(exported));
    }
    let off = out["off_tasks_per_s"].as_f64().unwrap_or(f64::NAN);
    let off_cpu = out["off_cpu_us_per_task"].as_f64().unwrap_or(f64::NAN);
    for name in ["all", "ratio"] {
        let cpu = out[&format!("{name}_cpu_us_per_task")]
            .as_f64()
            .unwrap_or(f64::NAN);
        out.insert(
            format!("{name}_cpu_extra_percent"),
            json!(100.0 * (cpu / off_cpu - 1.0)),
        );
        let on = out[&format!("{name}_tasks_per_s")]
            .as_f64()
            .unwrap_or(f64::NAN);
        out.insert(
            format!("{name}_loss_percent"),
            json!(100.0 * (1.0 - on / off)),
        );
    }
    out.insert("ratio".into(), json!(ratio));
    Ok(Value::Object(out))
}

pub async fn run(opts: &BenchOptions) -> Result<Value> {
    let mut workloads = serde_json::Map::new();
    for w in &opts.workloads {
        let mut runs = Vec::new();
        for run in 0..opts.runs {
            let r = match w.as_str() {
                "trace" => trace_cost(opts, run).await?,
                "W8" => scale::w8(opts, run).await?,
                "backlog" => scale::backlog(opts).await?,
                "W1" => w1(opts).await?,
                "W2" => w2(opts).await?,
                "W3" => cpu_workload(opts, 2, 32, 32, 30, None).await?,
                "W6" => cpu_workload(opts, 4, 8, 8, 32, Some(0)).await?,
                "W4" => w4(opts).await?,
                "locks" => lock_round_trip(opts).await?,
                "idle" => idle(opts).await?,
                "docker-start" => docker_start(opts).await?,
                "cancel" => cancel_latency(opts).await?,
                "dashboards" => dashboards(opts).await?,
                "W7" => w7(opts).await?,
                "restart" => restart(opts).await?,
                other => {
                    bail!("unknown workload `{other}`: expected W1, W2, W3, W4, W6, W7, locks, idle, cancel, dashboards, trace, W8, backlog, restart or docker-start")
                }
            };
            eprintln!("{w}: {r}");
            runs.push(r);
        }
        let med = |key: &str| median(runs.iter().filter_map(|r| r[key].as_f64()).collect());
        let summary = match w.as_str() {
            "W1" => json!({
                "tasks_per_s": med("tasks_per_s"),
                "ephemeral_tasks_per_s": med("ephemeral_tasks_per_s"),
                "durable_vs_ephemeral": med("durable_vs_ephemeral"),
                "master_cpu_us_per_task": med("master_cpu_us_per_task"),
                "ephemeral_master_cpu_us_per_task": med("ephemeral_master_cpu_us_per_task"),
            }),
            "W2" | "locks" | "cancel" => {
                json!({"p50_ms": med("p50_ms"), "p99_ms": med("p99_ms")})
            }
            "W4" => json!({"tasks_per_s": med("tasks_per_s"), "final_total": 1000}),
            "W3" => {
                json!({"efficiency": med("ratio"), "makespan_s": med("makespan_s"), "single_task_s": med("single_task_s")})
            }
            "W6" => {
                json!({"ratio": med("ratio"), "makespan_s": med("makespan_s"), "single_task_s": med("single_task_s")})
            }
            "dashboards" => json!({
                "tasks_per_s": med("tasks_per_s"),
                "with_dashboards_tasks_per_s": med("with_dashboards_tasks_per_s"),
                "drop_percent": med("drop_percent"),
                "master_cpu_ms_per_1000_tasks": med("master_cpu_ms_per_1000_tasks"),
                "with_dashboards_master_cpu_ms_per_1000_tasks": med("with_dashboards_master_cpu_ms_per_1000_tasks"),
                "cpu_increase_percent": med("cpu_increase_percent"),
                "dashboard_lock_ms_per_s": med("dashboard_lock_ms_per_s"),
                "dashboard_updates_built_per_s": med("dashboard_updates_built_per_s"),
                "dashboard_cpu_ms_per_s": med("dashboard_cpu_ms_per_s"),
                "dashboard_cpu_ms_per_1000_tasks": med("dashboard_cpu_ms_per_1000_tasks"),
                "dashboard_cpu_share_percent": med("dashboard_cpu_share_percent"),
                "fast_dashboard_cpu_ms_per_1000_tasks": med("fast_dashboard_cpu_ms_per_1000_tasks"),
                "fast_tasks_per_s": med("fast_tasks_per_s"),
                "updates_per_s_per_client": med("updates_per_s_per_client"),
                "page_bytes": med("page_bytes"),
            }),
            "W8" => json!({
                "w1_100_tasks_per_s": med("w1_100_tasks_per_s"),
                "w1_4_tasks_per_s": med("w1_4_tasks_per_s"),
                "w1_100_vs_4": med("w1_100_vs_4"),
                "idle_master_cpu_percent": med("idle_master_cpu_percent"),
                "idle_cluster_cpu_percent": med("idle_cluster_cpu_percent"),
                "startup_s": med("startup_s"),
                "interpreter_rss_bytes": med("interpreter_rss_bytes"),
                "interpreter_pss_bytes": med("interpreter_pss_bytes"),
                "pss_per_slot_bytes": med("pss_per_slot_bytes"),
                "worker_rss_bytes": med("worker_rss_bytes"),
            }),
            "backlog" => json!({
                "submit_tasks_per_s": med("submit_tasks_per_s"),
                "rss_bytes_per_queued_task": med("rss_bytes_per_queued_task"),
                "health_p50_ms": med("health_p50_ms"),
                "health_max_ms": med("health_max_ms"),
                "dispatch_tasks_per_s": med("dispatch_tasks_per_s"),
                "dispatch_without_backlog_tasks_per_s": med("dispatch_without_backlog_tasks_per_s"),
                "dispatch_with_vs_without": med("dispatch_with_vs_without"),
            }),
            "trace" => json!({
                "off_tasks_per_s": med("off_tasks_per_s"),
                "all_tasks_per_s": med("all_tasks_per_s"),
                "ratio_tasks_per_s": med("ratio_tasks_per_s"),
                "off_cpu_us_per_task": med("off_cpu_us_per_task"),
                "all_cpu_us_per_task": med("all_cpu_us_per_task"),
                "ratio_cpu_us_per_task": med("ratio_cpu_us_per_task"),
                "all_cpu_extra_percent": med("all_cpu_extra_percent"),
                "ratio_cpu_extra_percent": med("ratio_cpu_extra_percent"),
                "all_loss_percent": med("all_loss_percent"),
                "ratio_loss_percent": med("ratio_loss_percent"),
                "all_bytes_exported": med("all_bytes_exported"),
                "ratio_bytes_exported": med("ratio_bytes_exported"),
                "ratio": runs.first().map(|r| r["ratio"].clone()),
            }),
            "docker-start" => {
                json!({"one_s": med("one_s"), "three_s": med("three_s"), "ratio": med("ratio")})
            }
            "restart" => json!({
                "health_s": med("health_s"),
                "dispatch_s": med("dispatch_s"),
                "queued": opts.restart_tasks,
            }),
            "W7" => json!({
                "rss_ratio": med("rss_ratio"),
                "bytes_per_finished_task": med("bytes_per_finished_task"),
                "rss_first_bytes": med("rss_first_bytes"),
                "rss_last_bytes": med("rss_last_bytes"),
                "disk_first_bytes": med("disk_first_bytes"),
                "disk_last_bytes": med("disk_last_bytes"),
                "tasks_per_s": med("tasks_per_s"),
            }),
            _ => json!({"cpu_percent_of_one_core": med("cpu_percent_of_one_core"), "window_s": 10}),
        };
        let mut summary = summary.as_object().cloned().expect("object");
        summary.insert("runs".into(), Value::Array(runs));
        workloads.insert(w.clone(), Value::Object(summary));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    Ok(json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kind": cpu},
        "runs": opts.runs,
        "workloads": workloads,
    }))
}
