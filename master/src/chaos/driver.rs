//! The soak driver: starts a real master (a child `flotilla up` on a state
//! directory and a port of its own), drives the workload through the public
//! API, injects the scheduled faults, watches the cluster, and writes it all
//! to the history. Then it lets the cluster settle, takes the final state
//! and hands the history to the checker.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_client::api::WorkerState;
use flotilla_client::{Client, TaskQuery};
use flotilla_proto::{TaskId, TaskSpec, WorkerId};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::process::{Child, Command};

use super::history::{
    now_ms, Call, Event, Expect, FinalResource, NodeSeen, Outcome, Recorder, ResourceSeen,
};
use super::schedule::{schedule, Fault, FaultKind, Plan};
use super::workload;
use crate::manifest::{self, ClusterSpec, RuntimeKind};

/// `flotilla chaos FILE ...`.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub manifest: PathBuf,
    pub seconds: f64,
    pub seed: u64,
    pub runtime: Option<RuntimeKind>,
    pub history: PathBuf,
    /// The `flotilla` binary that runs the master.
    pub flotilla: PathBuf,
    /// Tasks each worker runs at once.
    pub slots: u32,
    /// Concurrent workload clients.
    pub clients: usize,
}

/// At most this many accepted tasks unfinished at once: the workload waits
/// beyond it (the point is faults under load, not an ever longer queue).
const MAX_IN_FLIGHT: usize = 48;
/// How long the cluster gets to recover from one fault.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the accepted tasks get to finish once the soak's time is up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Accepted tasks not yet seen finished, and those seen finished.
#[derive(Default)]
struct Tracker {
    in_flight: HashSet<TaskId>,
    finished: HashSet<TaskId>,
}

struct Soak {
    opts: ChaosOptions,
    spec: ClusterSpec,
    runtime: RuntimeKind,
    client: Client,
    rec: Recorder,
    port: u16,
    state_dir: PathBuf,
    log: PathBuf,
    next_op: AtomicU64,
    tracker: Mutex<Tracker>,
    /// The last `GET /nodes` answer.
    nodes: Mutex<Vec<NodeSeen>>,
    master: tokio::sync::Mutex<Option<Child>>,
    /// Stops the workload clients.
    stop_workload: AtomicBool,
    /// Stops the observers.
    stop_observers: AtomicBool,
}

/// Runs a soak; returns the checker's report on its history.
pub async fn run(opts: ChaosOptions) -> Result<super::check::Report> {
    let mut spec = manifest::load_file(&opts.manifest)?;
    let runtime = opts.runtime.unwrap_or(spec.runtime);
    spec.runtime = runtime;
    if !matches!(runtime, RuntimeKind::Process | RuntimeKind::Docker) {
        bail!("flotilla chaos drives the process and docker runtimes (got {runtime:?}): it injects faults through them");
    }
    let port = free_port()?;
    let state_dir = std::env::temp_dir().join(format!(
        "flotilla-chaos-{}-{:x}",
        std::process::id(),
        rand::thread_rng().gen::<u32>()
    ));
    std::fs::create_dir_all(&state_dir)?;
    let mut log = opts.history.clone().into_os_string();
    log.push(".master.log");
    let log = PathBuf::from(log);
    let _ = std::fs::remove_file(&log);
    let client = Client::new(&format!("http://127.0.0.1:{port}"), crate::api_token())?;
    let soak = Arc::new(Soak {
        rec: Recorder::create(&opts.history)?,
        opts,
        spec,
        runtime,
        client,
        port,
        state_dir,
        log,
        next_op: AtomicU64::new(1),
        tracker: Mutex::default(),
        nodes: Mutex::default(),
        master: tokio::sync::Mutex::new(None),
        stop_workload: AtomicBool::new(false),
        stop_observers: AtomicBool::new(false),
    });
    let outcome = soak.clone().drive().await;
    // Whatever happened, no master (and so no worker) outlives the soak.
    soak.stop_master(Signal::SIGINT, Duration::from_secs(60))
        .await;
    let _ = std::fs::remove_dir_all(&soak.state_dir);
    outcome?;
    let events = super::history::read(&soak.opts.history)?;
    Ok(super::check::check(&events))
}

impl Soak {
    async fn drive(self: Arc<Self>) -> Result<()> {
        let o = &self.opts;
        let hb_timeout_ms = self.spec.heartbeat_timeout.as_millis() as u64;
        let plan = Plan {
            seed: o.seed,
            docker: self.runtime == RuntimeKind::Docker,
            workers: self.spec.capacities.len(),
            max_workers: self.spec.max_workers.min(self.spec.capacities.len() + 3),
            heartbeat_timeout_ms: hb_timeout_ms,
            faults: (o.seconds * 2.0) as usize + 10,
        };
        let faults = schedule(&plan);
        self.rec.record(&Event::Meta {
            seed: o.seed,
            runtime: runtime_name(self.runtime).into(),
            seconds: o.seconds,
            cluster: self.spec.name.clone(),
            workers: self.spec.capacities.len(),
            heartbeat_timeout_ms: hb_timeout_ms,
            t: now_ms(),
        });
        self.rec.record(&Event::Schedule {
            faults: faults.clone(),
        });
        println!(
            "chaos: seed {} on {} ({} workers, heartbeat timeout {} ms) for {} s; history {}; master log {}",
            o.seed,
            runtime_name(self.runtime),
            self.spec.capacities.len(),
            hb_timeout_ms,
            o.seconds,
            o.history.display(),
            self.log.display()
        );
        println!("fault schedule (seed {}), first faults:", o.seed);
        for f in faults.iter().take(12) {
            println!("  {f}");
        }
        println!("  ... (the whole schedule is in the history)");

        self.start_master().await?;
        self.wait_ready(Duration::from_secs(120)).await?;
        for name in workload::COUNTERS {
            let call = Call::CreateCounter { name: name.into() };
            let op = self.invoke(&call);
            match self
                .client
                .create_resource(name, "Dictionary", workload::counter_initial())
                .await
            {
                Ok(_) => self.complete(op, Outcome::Ok, vec![], None, None, Default::default()),
                Err(e) => bail!("cannot create the counter {name}: {e}"),
            }
        }

        let observers = vec![
            tokio::spawn(self.clone().follow_feed()),
            tokio::spawn(self.clone().watch_nodes()),
            tokio::spawn(self.clone().watch_resources()),
        ];
        let clients: Vec<_> = (0..o.clients.max(1))
            .map(|i| tokio::spawn(self.clone().client_loop(i)))
            .collect();

        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(o.seconds);
        let mut injected = 0;
        for fault in &faults {
            let gap = Duration::from_millis(fault.gap_ms);
            if Instant::now() + gap >= deadline {
                break;
            }
            tokio::time::sleep(gap).await;
            self.inject(fault).await?;
            injected += 1;
        }
        tokio::time::sleep_until(deadline.into()).await;
        println!(
            "chaos: {injected} faults injected in {:.0} s; stopping the workload",
            started.elapsed().as_secs_f64()
        );

        self.stop_workload.store(true, Ordering::SeqCst);
        for c in clients {
            // A client blocked in a request is given up on: its operation
            // stays without an outcome, which the checker reads as unknown.
            let abort = c.abort_handle();
            if tokio::time::timeout(Duration::from_secs(150), c)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.ensure_master().await?;
        let settle = Instant::now();
        loop {
            let left = self.tracker.lock().expect("tracker").in_flight.len();
            if left == 0 {
                break;
            }
            if settle.elapsed() > SETTLE_TIMEOUT {
                println!("chaos: {left} accepted tasks still unfinished after {SETTLE_TIMEOUT:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop_observers.store(true, Ordering::SeqCst);
        for o in observers {
            let abort = o.abort_handle();
            if tokio::time::timeout(Duration::from_secs(60), o)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.record_final().await
    }

    /// Waits for the master to answer and every worker to register.
    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.client.wait_ready(left).await {
                Ok(_) => return Ok(()),
                Err(flotilla_client::Error::Unreachable { .. }) if !left.is_zero() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "the cluster did not come up within {timeout:?} (see {})",
                            self.log.display()
                        )
                    })
                }
            }
        }
    }

    fn invoke(&self, call: &Call) -> u64 {
        let op = self.next_op.fetch_add(1, Ordering::SeqCst);
        self.rec.record(&Event::Invoke {
            op,
            t: now_ms(),
            call: call.clone(),
        });
        op
    }

    fn complete(
        &self,
        op: u64,
        outcome: Outcome,
        ids: Vec<TaskId>,
        status: Option<u16>,
        error: Option<String>,
        answer: serde_json::Value,
    ) {
        if outcome == Outcome::Ok && !ids.is_empty() {
            let mut t = self.tracker.lock().expect("tracker");
            for id in &ids {
                if !t.finished.contains(id) {
                    t.in_flight.insert(*id);
                }
            }
        }
        self.rec.record(&Event::Complete {
            op,
            t: now_ms(),
            outcome,
            ids,
            status,
            error,
            answer,
        });
    }

    fn fail(&self, op: u64, e: &flotilla_client::Error) {
        let (outcome, status) = classify(e);
        self.complete(
            op,
            outcome,
            vec![],
            status,
            Some(e.to_string()),
            Default::default(),
        );
    }

    // ----- the master process -------------------------------------------

    async fn start_master(&self) -> Result<()> {
        let o = &self.opts;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(&o.flotilla);
        cmd.args(["--log-level", "info", "--color", "never", "up"])
            .arg(&o.manifest)
            .args(["--port", &self.port.to_string()])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--slots", &o.slots.to_string()])
            .args(["--runtime", runtime_name(self.runtime)])
            // Its cluster's claim beside its state: a soak beside other
            // masters of the same name (a test, another soak) is not refused.
            .env("FLOTILLA_RUNTIME_DIR", self.state_dir.join("run"))
            .env_remove("RUST_LOG")
            .envs(crate::api_token().map(|t| (flotilla_client::TOKEN_ENV, t)))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", o.flotilla.display()))?;
        *self.master.lock().await = Some(child);
        Ok(())
    }

    /// Signals the master and waits for it to exit (SIGKILL after `patience`).
    async fn stop_master(&self, signal: Signal, patience: Duration) -> String {
        let mut guard = self.master.lock().await;
        let Some(mut child) = guard.take() else {
            return "no master running".into();
        };
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        if let Some(pid) = pid {
            let _ = kill(pid, signal);
        }
        let status = match tokio::time::timeout(patience, child.wait()).await {
            Ok(s) => s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            Err(_) => {
                let _ = child.kill().await;
                format!("did not exit within {patience:?} of {signal}: killed")
            }
        };
        format!(
            "master {} ({signal}): {status}",
            pid.map(|p| p.as_raw()).unwrap_or(0)
        )
    }

    /// Starts the master again if it is not running (the soak's end).
    async fn ensure_master(&self) -> Result<()> {
        let running = match self.master.lock().await.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            self.master.lock().await.take();
            self.start_master().await?;
        }
        Ok(())
    }

    // ----- faults --------------------------------------------------------

    async fn inject(self: &Arc<Self>, fault: &Fault) -> Result<()> {
        let before = self.fresh_nodes().await.unwrap_or_default();
        let target = fault.target.and_then(|t| {
            let mut ids: Vec<WorkerId> = before.iter().map(|n| n.id).collect();
            ids.sort_unstable();
            if ids.contains(&t) {
                Some(t)
            } else {
                ids.get(t as usize % ids.len().max(1)).copied()
            }
        });
        if fault.kind.has_target() && target.is_none() {
            println!(
                "chaos: fault #{} skipped: no workers to aim at",
                fault.index
            );
            return Ok(());
        }
        let t0 = now_ms();
        let start = Instant::now();
        let mut heal: Option<(Duration, Healer)> = None;
        let mut added = None;
        let detail = match fault.kind {
            FaultKind::Kill => match self.runtime {
                RuntimeKind::Docker => docker(&["kill", &self.container(target.unwrap())]).await,
                _ => match self.worker_pid(&before, target.unwrap()) {
                    Some(pid) => signal_all(&[pid], Signal::SIGKILL),
                    None => "no PID known for it".into(),
                },
            },
            FaultKind::Pause => {
                let d = Duration::from_millis(fault.duration_ms);
                match self.runtime {
                    RuntimeKind::Docker => {
                        let name = self.container(target.unwrap());
                        let r = docker(&["pause", &name]).await;
                        heal = Some((d, Healer::Unpause(name)));
                        r
                    }
                    _ => match self.worker_pid(&before, target.unwrap()) {
                        Some(pid) => {
                            let pids = with_descendants(pid);
                            let r = signal_all(&pids, Signal::SIGSTOP);
                            heal = Some((d, Healer::Continue(pids)));
                            r
                        }
                        None => "no PID known for it".into(),
                    },
                }
            }
            FaultKind::Net => {
                let name = self.container(target.unwrap());
                let net = self.network();
                let r = docker(&["network", "disconnect", "-f", &net, &name]).await;
                heal = Some((
                    Duration::from_millis(fault.duration_ms),
                    Healer::Connect(net, name),
                ));
                r
            }
            FaultKind::Interpreter => {
                let pids = match self.runtime {
                    RuntimeKind::Docker => {
                        docker_interpreters(&self.container(target.unwrap())).await
                    }
                    _ => self
                        .worker_pid(&before, target.unwrap())
                        .map(interpreters)
                        .unwrap_or_default(),
                };
                if pids.is_empty() {
                    "no interpreter found".into()
                } else {
                    let pid = pids[fault.pick as usize % pids.len()];
                    signal_all(&[pid], Signal::SIGKILL)
                }
            }
            FaultKind::Add => {
                let capacity = self.spec.capacities.first().copied().unwrap_or(4);
                match self.client.add_worker(Some(capacity)).await {
                    Ok(id) => {
                        added = Some(id);
                        format!("added worker {id}")
                    }
                    Err(e) => format!("/add refused: {e}"),
                }
            }
            FaultKind::Stop => match self.client.stop_worker(target.unwrap()).await {
                Ok(m) => m,
                Err(e) => format!("/stop refused: {e}"),
            },
            FaultKind::MasterKill | FaultKind::MasterTerm => {
                let sig = if fault.kind == FaultKind::MasterKill {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                let stopped = self.stop_master(sig, Duration::from_secs(60)).await;
                self.start_master().await?;
                format!("{stopped}; started again on port {}", self.port)
            }
        };
        println!(
            "chaos: fault {fault}{} -> {detail}",
            match target {
                Some(t) if Some(t) != fault.target => format!(" (aimed at worker {t})"),
                _ => String::new(),
            }
        );
        self.rec.record(&Event::Fault {
            index: fault.index,
            kind: fault.kind,
            t: t0,
            target,
            detail,
            added,
        });
        let before_inc = target
            .and_then(|t| before.iter().find(|n| n.id == t))
            .map(|n| n.incarnation);
        let healer = heal.map(|(d, h)| {
            let index = fault.index;
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until((start + d).into()).await;
                let detail = h.heal().await;
                me.rec.record(&Event::Heal {
                    index,
                    t: now_ms(),
                    detail,
                });
            })
        });
        let recovered = self
            .wait_recovered(
                fault.kind,
                target,
                before_inc,
                added,
                start,
                fault.duration_ms,
            )
            .await;
        if let Some(h) = healer {
            let _ = h.await;
        }
        match recovered {
            Some(after) => {
                self.rec.record(&Event::Recovered {
                    index: fault.index,
                    t: t0 + after.as_secs_f64() * 1000.0,
                    after_ms: after.as_secs_f64() * 1000.0,
                });
            }
            None => println!(
                "chaos: the cluster did not recover from fault #{} within {RECOVERY_TIMEOUT:?}",
                fault.index
            ),
        }
        Ok(())
    }

    /// Polls the nodes until the cluster is whole again after a fault.
    async fn wait_recovered(
        &self,
        kind: FaultKind,
        target: Option<WorkerId>,
        before: Option<u64>,
        added: Option<WorkerId>,
        start: Instant,
        duration_ms: u64,
    ) -> Option<Duration> {
        let healed_at = start + Duration::from_millis(duration_ms);
        let grace = self.spec.heartbeat_timeout;
        while start.elapsed() < RECOVERY_TIMEOUT {
            if let Ok(nodes) = self.fresh_nodes().await {
                let all_active =
                    !nodes.is_empty() && nodes.iter().all(|n| n.state == WorkerState::Active);
                let struck = target.and_then(|t| nodes.iter().find(|n| n.id == t));
                let renewed = match (struck, before) {
                    (Some(n), Some(b)) => n.incarnation > b,
                    _ => true,
                };
                let now = Instant::now();
                let whole = match kind {
                    FaultKind::Kill | FaultKind::Stop => renewed,
                    // Recovered by a restart, or (the master never noticed
                    // the pause) back and heartbeating well after the heal.
                    FaultKind::Pause | FaultKind::Net => renewed || now > healed_at + grace,
                    FaultKind::Add => added.is_none_or(|a| nodes.iter().any(|n| n.id == a)),
                    _ => true,
                };
                if all_active && whole {
                    return Some(start.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn fresh_nodes(&self) -> Result<Vec<NodeSeen>> {
        let nodes = self.client.nodes().await?;
        Ok(nodes.iter().map(NodeSeen::from).collect())
    }

    fn worker_pid(&self, nodes: &[NodeSeen], id: WorkerId) -> Option<i32> {
        nodes
            .iter()
            .find(|n| n.id == id)?
            .locator
            .as_deref()?
            .strip_prefix("pid ")?
            .parse()
            .ok()
    }

    fn container(&self, id: WorkerId) -> String {
        format!("{}-worker-{id}", self.spec.name)
    }

    fn network(&self) -> String {
        self.spec
            .network
            .clone()
            .unwrap_or_else(|| self.spec.name.clone())
    }

    // ----- observers -----------------------------------------------------

    async fn follow_feed(self: Arc<Self>) {
        let mut after = 0;
        while !self.stop_observers.load(Ordering::SeqCst) {
            match self.client.finished(after, Duration::from_secs(2)).await {
                Ok(page) => {
                    after = page.next;
                    let t = now_ms();
                    for task in page.tasks {
                        {
                            let mut tr = self.tracker.lock().expect("tracker");
                            tr.in_flight.remove(&task.id);
                            tr.finished.insert(task.id);
                        }
                        self.rec.record(&Event::Feed { t, task });
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn watch_nodes(self: Arc<Self>) {
        while !self.stop_observers.load(Ordering::SeqCst) {
            let t0 = now_ms();
            if let Ok(nodes) = self.fresh_nodes().await {
                self.rec.record(&Event::Nodes {
                    t0,
                    t1: now_ms(),
                    nodes: nodes.clone(),
                });
                *self.nodes.lock().expect("nodes") = nodes;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn watch_resources(self: Arc<Self>) {
        while !self.stop_observers.load(Ordering::SeqCst) {
            let t0 = now_ms();
            if let Ok(rs) = self.client.resources().await {
                let resources = rs
                    .into_iter()
                    .map(|r| ResourceSeen {
                        name: r.name,
                        version: r.version,
                        holders: r.holders,
                    })
                    .collect();
                self.rec.record(&Event::Resources {
                    t0,
                    t1: now_ms(),
                    resources,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn record_final(&self) -> Result<()> {
        let mut tasks = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .client
                .tasks(&TaskQuery {
                    limit: Some(1000),
                    after,
                    ..Default::default()
                })
                .await
                .context("the final task listing")?;
            tasks.extend(page.tasks);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let resources = self
            .client
            .resources()
            .await
            .context("the final resources")?
            .into_iter()
            .map(|r| FinalResource {
                name: r.name,
                version: r.version,
                value: r.value,
            })
            .collect();
        let nodes = self.fresh_nodes().await.context("the final nodes")?;
        self.rec.record(&Event::Final {
            t: now_ms(),
            tasks,
            resources,
            nodes,
        });
        Ok(())
    }

    // ----- the workload --------------------------------------------------

    async fn client_loop(self: Arc<Self>, index: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.opts.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1)),
        );
        while !self.stop_workload.load(Ordering::SeqCst) {
            if self.tracker.lock().expect("tracker").in_flight.len() >= MAX_IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let failed = match rng.gen_range(0..100) {
                0..=59 => {
                    let task = workload::pick(&mut rng, true);
                    self.submit(Call::Send { task }, &mut rng).await
                }
                60..=71 => {
                    let n = rng.gen_range(2..=6);
                    let tasks = (0..n).map(|_| workload::pick(&mut rng, true)).collect();
                    self.submit(Call::Batch { tasks }, &mut rng).await
                }
                72..=83 => {
                    let node = {
                        let nodes = self.nodes.lock().expect("nodes");
                        if nodes.is_empty() {
                            0
                        } else {
                            nodes[rng.gen_range(0..nodes.len())].id
                        }
                    };
                    let task = match rng.gen_range(0..3) {
                        0 => Expect::Short,
                        1 => workload::locks(&mut rng),
                        _ => Expect::Long {
                            ms: rng.gen_range(300..=2_000),
                        },
                    };
                    self.submit(Call::SendTo { node, task }, &mut rng).await
                }
                _ => self.submit_and_cancel(&mut rng).await,
            };
            let pause = if failed {
                // The master is away (a restart): do not spin.
                rng.gen_range(100..=400)
            } else {
                rng.gen_range(0..=120)
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Submits; returns true when the master could not be reached.
    async fn submit(&self, call: Call, rng: &mut ChaCha8Rng) -> bool {
        self.submit_ids(call, rng).await.is_none()
    }

    async fn submit_ids(&self, call: Call, rng: &mut ChaCha8Rng) -> Option<Vec<TaskId>> {
        let op = self.invoke(&call);
        let specs: Vec<TaskSpec> = call
            .tasks()
            .into_iter()
            .enumerate()
            .map(|(i, e)| workload::spec(op, i, e, rng))
            .collect();
        let result = match &call {
            Call::Send { .. } => self.client.send(&specs[0]).await.map(|id| vec![id]),
            Call::SendTo { node, .. } => self
                .client
                .send_to(*node, &specs[0])
                .await
                .map(|id| vec![id]),
            Call::Batch { .. } => self.client.submit(&specs).await,
            _ => unreachable!("not a submission"),
        };
        match result {
            Ok(ids) => {
                self.complete(op, Outcome::Ok, ids.clone(), None, None, Default::default());
                Some(ids)
            }
            Err(e) => {
                self.fail(op, &e);
                None
            }
        }
    }

    /// A long task, then its cancel a random moment later.
    async fn submit_and_cancel(&self, rng: &mut ChaCha8Rng) -> bool {
        let task = Expect::Long {
            ms: rng.gen_range(1_000..=4_000),
        };
        let Some(ids) = self.submit_ids(Call::Send { task }, rng).await else {
            return true;
        };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=2_000))).await;
        let id = ids[0];
        let op = self.invoke(&Call::Cancel { id });
        match self.client.cancel(id).await {
            Ok(c) => {
                self.complete(
                    op,
                    Outcome::Ok,
                    vec![],
                    None,
                    None,
                    serde_json::to_value(&c).unwrap_or_default(),
                );
                false
            }
            Err(e) => {
                self.fail(op, &e);
                false
            }
        }
    }
}

/// What lifts a pause or a disconnect.
enum Healer {
    Continue(Vec<i32>),
    Unpause(String),
    Connect(String, String),
}

impl Healer {
    async fn heal(self) -> String {
        match self {
            Healer::Continue(pids) => signal_all(&pids, Signal::SIGCONT),
            Healer::Unpause(name) => docker(&["unpause", &name]).await,
            Healer::Connect(net, name) => docker(&["network", "connect", &net, &name]).await,
        }
    }
}

/// Whether an operation that went wrong certainly did not happen.
fn classify(e: &flotilla_client::Error) -> (Outcome, Option<u16>) {
    use flotilla_client::Error as E;
    match e {
        // Not connected: nothing was sent.
        E::Unreachable { detail, .. }
            if detail.starts_with("connection refused") || detail.starts_with("cannot connect") =>
        {
            (Outcome::Fail, None)
        }
        E::Api { status, .. } | E::Unauthorized { status, .. } => {
            if *status >= 500 {
                (Outcome::Unknown, Some(*status))
            } else {
                (Outcome::Fail, Some(*status))
            }
        }
        E::BadUrl { .. } => (Outcome::Fail, None),
        _ => (Outcome::Unknown, None),
    }
}

fn runtime_name(r: RuntimeKind) -> &'static str {
    match r {
        RuntimeKind::Docker => "docker",
        RuntimeKind::Kubernetes => "kubernetes",
        _ => "process",
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn signal_all(pids: &[i32], sig: Signal) -> String {
    let mut done = Vec::new();
    for p in pids {
        match kill(Pid::from_raw(*p), sig) {
            Ok(()) => done.push(p.to_string()),
            Err(e) => done.push(format!("{p} ({e})")),
        }
    }
    format!("{sig} to {}", done.join(", "))
}

/// `(pid, ppid, command line)` of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, ppid, cmdline));
    }
    out
}

/// `pid` and every process below it.
fn with_descendants(pid: i32) -> Vec<i32> {
    let procs = processes();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    out
}

/// The Python interpreters a process worker runs, in PID order.
fn interpreters(worker: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, ppid, cmd)| *ppid == worker && cmd.contains("python"))
        .map(|p| p.0)
        .collect();
    pids.sort_unstable();
    pids
}

/// The Python interpreters of a container, as host PIDs, in PID order.
async fn docker_interpreters(container: &str) -> Vec<i32> {
    let out = docker(&["top", container, "-eo", "pid,args"]).await;
    let mut pids: Vec<i32> = out
        .lines()
        .filter(|l| l.contains("python"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// Runs `docker ARGS`; returns what it printed (or why it failed).
async fn docker(args: &[&str]) -> String {
    match Command::new("docker").args(args).output().await {
        Ok(out) if out.status.success() => {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if s.is_empty() {
                format!("docker {}: done", args.join(" "))
            } else {
                s
            }
        }
        Ok(out) => format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("docker {}: cannot run docker ({e})", args.join(" ")),
    }
}
