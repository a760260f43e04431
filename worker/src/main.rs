//! `flotilla-worker`: runs tasks for a Flotilla master.
//!
//! A runtime (process, Docker, ...) starts this binary with its identity in
//! the environment (see `flotilla_proto::env`). The worker registers, sends a
//! heartbeat every interval, and runs one long-poll loop per execution slot:
//! each poll carries the report of the task the slot just finished and
//! receives the next one. Queues live in the master; a worker holds at most
//! one task per slot, so a dead worker can lose nothing the master does not
//! already know about.

mod locks;
mod python;
mod shell;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_proto::telemetry::{self, adopt_parent, traceparent, TRACEPARENT, TRACE_TARGET};
use flotilla_proto::{
    env, routes, Assignment, Heartbeat, Incarnation, Poll, Register, RegisterReply, TaskKind,
    TaskReport, WorkerId,
};
use reqwest::StatusCode;
use tracing::{debug, error, info, info_span, warn};

struct Config {
    master_url: String,
    worker_id: WorkerId,
    incarnation: Incarnation,
    secret: String,
    slots: u32,
    python: String,
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("environment variable {name} is not set (flotilla-worker is started by the master's runtime, which sets it)"))
}

fn parse_var<T: std::str::FromStr>(name: &str, default: Option<T>) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| {
            anyhow::anyhow!("environment variable {name}={v:?} is not a valid number")
        }),
        Err(_) => default.with_context(|| format!("environment variable {name} is not set")),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        Ok(Config {
            master_url: var(env::MASTER_URL)?.trim_end_matches('/').to_string(),
            worker_id: parse_var(env::WORKER_ID, None)?,
            incarnation: parse_var(env::INCARNATION, None)?,
            secret: credential()?,
            slots: parse_var(env::SLOTS, Some(1))?.max(1),
            python: std::env::var(env::PYTHON).unwrap_or_else(|_| "python3".to_string()),
        })
    }
}

/// This incarnation's credential, kept out of everything task code can read:
/// the first line on stdin (how the master's process runtime hands it over),
/// or `FLOTILLA_WORKER_SECRET`, which is then removed from the environment
/// the tasks inherit. (The worker is also made non-dumpable, so that a task
/// of the same user cannot read it from /proc/<worker>/environ or mem.)
fn credential() -> Result<String> {
    if let Ok(v) = std::env::var(env::WORKER_SECRET) {
        std::env::remove_var(env::WORKER_SECRET);
        if !v.trim().is_empty() {
            return Ok(v.trim().to_string());
        }
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the worker credential from stdin")?;
    let line = line.trim();
    if line.is_empty() {
        anyhow::bail!("no worker credential: FLOTILLA_WORKER_SECRET is not set and stdin gave none (flotilla-worker is started by the master's runtime, which hands it over)");
    }
    Ok(line.to_string())
}

/// Children of the worker (interpreters, shell commands) die with it, so a
/// SIGKILLed worker leaves nothing running behind.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

struct Worker {
    cfg: Config,
    http: reqwest::Client,
    /// PATH for shell tasks: this binary's folder first, so that
    /// `flotilla-worker lock ...` is found.
    task_path: String,
}

/// What the master said about this process.
enum Verdict {
    /// The master knows a newer incarnation of this worker ID: this process
    /// is a zombie (it was declared dead) and must exit.
    Superseded,
}

impl Worker {
    fn url(&self, route: &str) -> String {
        format!("{}{}", self.cfg.master_url, route)
    }

    async fn post<T: serde::Serialize>(
        &self,
        route: &str,
        body: &T,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(route))
            .bearer_auth(&self.cfg.secret)
            .json(body)
            .send()
            .await
    }

    async fn register(&self) -> Result<RegisterReply> {
        let body = Register {
            worker_id: self.cfg.worker_id,
            incarnation: self.cfg.incarnation,
            slots: self.cfg.slots,
            pid: std::process::id(),
        };
        let mut delay = Duration::from_millis(20);
        for _ in 0..60 {
            match self.post(routes::REGISTER, &body).await {
                Ok(resp) if resp.status().is_success() => return Ok(resp.json().await?),
                Ok(resp) => {
                    let status = resp.status();
                    bail!(
                        "the master refused registration ({status}): {}",
                        resp.text().await.unwrap_or_default()
                    )
                }
                Err(e) => {
                    debug!(error = %e, "master not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
        bail!("the master at {} could not be reached", self.cfg.master_url)
    }

    async fn heartbeats(self: Arc<Self>, interval: Duration) -> Verdict {
        let body = Heartbeat {
            worker_id: self.cfg.worker_id,
            incarnation: self.cfg.incarnation,
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.post(routes::HEARTBEAT, &body).await {
                Ok(resp) if resp.status() == StatusCode::CONFLICT => return Verdict::Superseded,
                Ok(resp) if !resp.status().is_success() => {
                    warn!(status = %resp.status(), "heartbeat refused")
                }
                Ok(_) => debug!(worker = self.cfg.worker_id, "Heartbeat sent"),
                Err(e) => warn!(error = %e, "heartbeat could not reach the master"),
            }
        }
    }

    async fn slot(
        self: Arc<Self>,
        slot: u32,
        mut interpreter: Option<python::Interpreter>,
    ) -> Verdict {
        let mut report: Option<TaskReport> = None;
        // The finished task's span context, sent with its report.
        let mut report_trace: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let poll = Poll {
                worker_id: self.cfg.worker_id,
                incarnation: self.cfg.incarnation,
                slot,
                report: report.clone(),
            };
            let mut call = self
                .http
                .post(self.url(routes::POLL))
                .bearer_auth(&self.cfg.secret)
                .json(&poll);
            if let Some(tp) = &report_trace {
                call = call.header(TRACEPARENT, tp);
            }
            let resp = match call.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    // Keep the report: it is delivered with the next poll.
                    warn!(error = %e, slot, "cannot reach the master; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            match resp.status() {
                StatusCode::OK => {
                    report = None;
                    report_trace = None;
                    let parent = resp
                        .headers()
                        .get(TRACEPARENT)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let assignment: Assignment = match resp.json().await {
                        Ok(a) => a,
                        Err(e) => {
                            error!(error = %e, "unreadable assignment from the master");
                            continue;
                        }
                    };
                    let span = info_span!(target: TRACE_TARGET, "running", task.id = assignment.task_id,
                        task.attempt = assignment.attempt, task.kind = %assignment.spec.kind, worker.id = self.cfg.worker_id);
                    adopt_parent(&span, parent.as_deref());
                    report = Some(self.execute(&mut interpreter, assignment, &span).await);
                    report_trace = traceparent(&span);
                }
                StatusCode::NO_CONTENT => {
                    report = None;
                    report_trace = None;
                }
                StatusCode::CONFLICT => return Verdict::Superseded,
                status => {
                    // The report stays pending; a refusal here is a bug worth seeing.
                    let text = resp.text().await.unwrap_or_default();
                    error!(%status, %text, "poll refused by the master");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn execute(
        &self,
        interpreter: &mut Option<python::Interpreter>,
        a: Assignment,
        span: &tracing::Span,
    ) -> TaskReport {
        debug!(task = a.task_id, attempt = a.attempt, kind = %a.spec.kind, "running task");
        let proxy = locks::LockProxy {
            http: &self.http,
            master_url: &self.cfg.master_url,
            lease: &a.lease,
            span,
            held: Default::default(),
        };
        let outcome = match a.spec.kind {
            TaskKind::Shell => {
                let env = [
                    (env::LEASE, a.lease.clone()),
                    (env::LOCK_URL, self.cfg.master_url.clone()),
                    ("FLOTILLA_TASK_ID", a.task_id.to_string()),
                    ("FLOTILLA_ATTEMPT", a.attempt.to_string()),
                    (env::WORKER_ID, self.cfg.worker_id.to_string()),
                    ("PATH", self.task_path.clone()),
                ];
                shell::run(&a.spec.command, &env).await
            }
            TaskKind::Python => {
                if interpreter.is_none() {
                    match python::Interpreter::start(&self.cfg.python, self.cfg.worker_id).await {
                        Ok(i) => *interpreter = Some(i),
                        Err(e) => {
                            return TaskReport {
                                task_id: a.task_id,
                                attempt: a.attempt,
                                outcome: flotilla_proto::Outcome::Crashed {
                                    error: format!("{e:#}"),
                                    stdout: String::new(),
                                },
                            }
                        }
                    }
                }
                let interp = interpreter.as_mut().expect("started above");
                match interp.run(&a.spec.command, &proxy).await {
                    Ok(outcome) => outcome,
                    Err(crash) => {
                        warn!(
                            task = a.task_id,
                            "the task ended its Python interpreter; starting a fresh one"
                        );
                        *interpreter = None;
                        crash
                    }
                }
            }
        };
        TaskReport {
            task_id: a.task_id,
            attempt: a.attempt,
            outcome,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let format = std::env::var("FLOTILLA_LOG_FORMAT")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or_default();
    let color = std::env::var("FLOTILLA_LOG_COLOR")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or_default();
    let _telemetry = telemetry::init("flotilla-worker", "info", format, color, None);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("lock") {
        return locks::cli(&args[1..]).await;
    }
    // Before anything else reads or spawns: no task (same user) may read this
    // process's memory or /proc/<pid>/environ, where the credential was.
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE, 0)")?;
    let cfg = Config::from_env()?;
    python::check_python(&cfg.python)?;
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()?;
    let own_dir = std::env::current_exe()?
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let task_path = match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{own_dir}:{p}"),
        _ => format!("{own_dir}:/usr/local/bin:/usr/bin:/bin"),
    };
    let worker = Arc::new(Worker {
        cfg,
        http,
        task_path,
    });
    // Warm before registering: an active worker runs its first task at once.
    let mut interpreters = Vec::new();
    for _ in 0..worker.cfg.slots {
        interpreters.push(match python::Interpreter::start(&worker.cfg.python, worker.cfg.worker_id).await {
            Ok(i) => Some(i),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot start the Python interpreter yet; will retry per task");
                None
            }
        });
    }
    let reply = worker.register().await?;
    let (id, inc) = (worker.cfg.worker_id, worker.cfg.incarnation);
    info!(
        worker = id,
        incarnation = inc,
        capacity = reply.capacity,
        "Node {id} created: {} with capacity of {}",
        std::process::id(),
        reply.capacity
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        worker
            .clone()
            .heartbeats(Duration::from_millis(reply.heartbeat_interval_ms)),
    );
    for (slot, interpreter) in interpreters.into_iter().enumerate() {
        tasks.spawn(worker.clone().slot(slot as u32, interpreter));
    }
    match tasks.join_next().await {
        Some(Ok(Verdict::Superseded)) => {
            warn!(
                worker = id,
                incarnation = inc,
                "the master has replaced this incarnation; exiting"
            );
            std::process::exit(0)
        }
        Some(Err(e)) => bail!("worker loop failed: {e}"),
        None => Ok(()),
    }
}
