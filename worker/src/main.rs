//! `flotilla-worker`: runs tasks for a Flotilla master.
//!
//! A runtime (process, Docker, ...) starts this binary with its identity in
//! the environment (see `flotilla_proto::env`). The worker registers, sends a
//! heartbeat every interval, and runs one long-poll loop per execution slot:
//! each poll carries the report of the task the slot just finished and
//! receives the next one. Queues live in the master; a worker holds at most
//! one task per slot, so a dead worker can lose nothing the master does not
//! already know about.
//!
//! A worker outlives its master: when the master cannot be reached it keeps
//! running its tasks, keeps their reports and lock calls and sends them
//! again with a growing delay; the next master adopts it (refusing its
//! first poll until it registers again, which it then does). After the
//! grace period (`spec.masterGraceSeconds`) without any answer it kills
//! everything it started and exits.

mod cleanup;
mod limits;
mod link;
mod lockdoor;
mod locks;
mod python;
mod shell;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_proto::telemetry::{self, adopt_parent, traceparent, TRACEPARENT, TRACE_TARGET};
use flotilla_proto::{
    env, routes, Assignment, Attempt, Control, ControlPoll, Heartbeat, Incarnation, Outcome, Poll,
    Register, RegisterReply, StopAttempt, TaskId, TaskKind, TaskReport, TaskResult, WorkerId,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;

use crate::cleanup::Cleaner;
use crate::limits::Limits;
use crate::python::Interpreter;
use tracing::{debug, error, info, info_span, warn};

struct Config {
    master_url: String,
    worker_id: WorkerId,
    incarnation: Incarnation,
    secret: String,
    slots: u32,
    python: String,
    limits: Limits,
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
    /// `taken`: the credential [`take_env_credential`] took out of the
    /// environment, if it was there.
    fn from_env(taken: Option<String>) -> Result<Self> {
        Ok(Config {
            master_url: var(env::MASTER_URL)?.trim_end_matches('/').to_string(),
            worker_id: parse_var(env::WORKER_ID, None)?,
            incarnation: parse_var(env::INCARNATION, None)?,
            secret: credential(taken)?,
            slots: parse_var(env::SLOTS, Some(1))?.max(1),
            python: std::env::var(env::PYTHON).unwrap_or_else(|_| "python3".to_string()),
            limits: Limits::from_env()?,
        })
    }
}

/// This incarnation's credential, kept out of everything task code can read:
/// the first line on stdin (how the process and Docker runtimes hand it
/// over), or `FLOTILLA_WORKER_SECRET` (a Kubernetes pod's, from the worker's
/// Secret), which is then removed from the environment the tasks inherit.
/// (The worker is also made non-dumpable, so that a task of the same user
/// cannot read it from /proc/<worker>/environ or mem; in a pod the worker is
/// the container's first process, so no other process there holds it.)
fn credential(taken: Option<String>) -> Result<String> {
    if let Some(v) = taken {
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

/// `FLOTILLA_WORKER_SECRET`, taken out of this process's environment: its
/// bytes in the initial environment block (what `/proc/<pid>/environ`
/// shows, even to a reader allowed to see it) are overwritten and the
/// variable is removed, so no child inherits it. Called before any thread
/// exists, since it changes the environment.
fn take_env_credential() -> Option<String> {
    flotilla_proto::secret::take_env(env::WORKER_SECRET)
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
    cleaner: Arc<Cleaner>,
    /// A warm interpreter no slot uses yet, for the next slot whose
    /// interpreter is killed.
    standby: std::sync::Mutex<Option<tokio::task::JoinHandle<Result<Interpreter>>>>,
    /// Attempts the master told this worker to stop (the most recent ones);
    /// each slot watches for its own.
    stops: watch::Sender<Vec<StopAttempt>>,
    /// When the master last answered, and the grace period.
    link: link::MasterLink,
}

/// How many recent stop orders are remembered (an order may arrive before
/// its attempt reached the slot).
const STOPS_KEPT: usize = 256;

/// How an attempt ended on the slot.
enum End {
    Ran(Outcome),
    TimedOut(f64),
    Stopped(String),
}

/// `1` for whole seconds, `0.5` otherwise.
fn seconds(s: f64) -> String {
    if s.fract() == 0.0 && s.abs() < 1e15 {
        format!("{}", s as i64)
    } else {
        format!("{s}")
    }
}

/// What the master said about this process.
enum Verdict {
    /// The master knows a newer incarnation of this worker ID: this process
    /// is a zombie (it was declared dead) and must exit.
    Superseded,
    /// The master does not want this worker any more (it has no such
    /// worker, or refuses to register it again): it must exit.
    Refused(String),
    /// No master answered for the whole grace period.
    Orphaned,
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
        let resp = self
            .http
            .post(self.url(route))
            .bearer_auth(&self.cfg.secret)
            .json(body)
            .send()
            .await?;
        self.link.heard();
        Ok(resp)
    }

    /// Registers again with a master that does not know this incarnation
    /// as registered: a new master that adopted it. `Err`: the worker must
    /// exit.
    async fn register_again(&self) -> Result<(), Verdict> {
        let body = Register {
            worker_id: self.cfg.worker_id,
            incarnation: self.cfg.incarnation,
            slots: self.cfg.slots,
            pid: std::process::id(),
        };
        let mut delay = Duration::from_millis(50);
        loop {
            match self.post(routes::REGISTER, &body).await {
                Ok(resp) if resp.status().is_success() => {
                    if let Ok(reply) = resp.json::<RegisterReply>().await {
                        self.adopt_settings(&reply);
                    }
                    info!(
                        worker = self.cfg.worker_id,
                        incarnation = self.cfg.incarnation,
                        "registered again with a new master"
                    );
                    return Ok(());
                }
                Ok(resp) if resp.status() == StatusCode::CONFLICT => {
                    return Err(Verdict::Superseded)
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(Verdict::Refused(format!(
                        "the master refused to register this worker again ({status}): {text}"
                    )));
                }
                Err(e) => {
                    if self.link.lost() {
                        return Err(Verdict::Orphaned);
                    }
                    debug!(error = %e, "master not reachable to register again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// What a master says at registration.
    fn adopt_settings(&self, reply: &RegisterReply) {
        if let Some(ms) = reply.master_grace_ms {
            self.link.set_grace(Duration::from_millis(ms));
        }
        self.link.set_keep_reports(reply.keep_reports);
    }

    /// Ends the worker when no master has answered for the grace period.
    async fn watchdog(self: Arc<Self>) -> Verdict {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if self.link.lost() {
                return Verdict::Orphaned;
            }
        }
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
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                    return Verdict::Refused(resp.text().await.unwrap_or_default())
                }
                // A new master adopted this worker: register again.
                Ok(resp) if resp.status() == StatusCode::PRECONDITION_REQUIRED => {
                    if let Err(verdict) = self.register_again().await {
                        return verdict;
                    }
                }
                Ok(resp) if !resp.status().is_success() => {
                    warn!(status = %resp.status(), "heartbeat refused")
                }
                Ok(_) => debug!(worker = self.cfg.worker_id, "Heartbeat sent"),
                Err(e) => warn!(error = %e, "heartbeat could not reach the master"),
            }
        }
    }

    /// Waits for the master's stop orders (task cancels) and passes them to
    /// the slots.
    async fn control(self: Arc<Self>) -> Verdict {
        let body = ControlPoll {
            worker_id: self.cfg.worker_id,
            incarnation: self.cfg.incarnation,
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.post(routes::CONTROL, &body).await {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    backoff = Duration::from_millis(50);
                    match resp.json::<Control>().await {
                        Ok(control) => {
                            for stop in control.stop {
                                info!(task = stop.task_id, attempt = stop.attempt, reason = %stop.reason, "stopping a task");
                                self.stops.send_modify(|kept| {
                                    kept.push(stop);
                                    if kept.len() > STOPS_KEPT {
                                        kept.remove(0);
                                    }
                                });
                            }
                        }
                        Err(e) => error!(error = %e, "unreadable control answer from the master"),
                    }
                }
                Ok(resp) if resp.status() == StatusCode::NO_CONTENT => {}
                Ok(resp) if resp.status() == StatusCode::CONFLICT => return Verdict::Superseded,
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                    // A master without the control channel: nothing will be cancelled.
                    info!("the master has no control channel; task cancels will not reach this worker");
                    return std::future::pending().await;
                }
                Ok(resp) => {
                    warn!(status = %resp.status(), "control poll refused by the master");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    debug!(error = %e, "control poll could not reach the master");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// An interpreter for `slot`, to be awaited when a task needs it: the
    /// worker's standby (warm already; a new standby starts warming), or
    /// else a fresh one. So a slot whose interpreter was killed (cancel,
    /// timeout, crash) runs its next task without waiting for CPython to
    /// start, one slot at a time.
    fn replacement(self: &Arc<Self>, slot: u32) -> tokio::task::JoinHandle<Result<Interpreter>> {
        let standby = self.standby.lock().expect("standby lock").take();
        match standby {
            Some(handle) => {
                self.warm_standby();
                let w = self.clone();
                tokio::spawn(async move {
                    let interp = handle.await.map_err(|e| anyhow::anyhow!("{e}"))??;
                    w.cleaner.adopt_spare(slot, interp.pid());
                    Ok(interp)
                })
            }
            None => self.warm(Some(slot)),
        }
    }

    /// Starts the standby interpreter (a spare in the cleaner's books).
    fn warm_standby(self: &Arc<Self>) {
        let handle = self.warm(None);
        *self.standby.lock().expect("standby lock") = Some(handle);
    }

    /// Starts an interpreter for `slot` in the background.
    fn warm(self: &Arc<Self>, slot: Option<u32>) -> tokio::task::JoinHandle<Result<Interpreter>> {
        let w = self.clone();
        tokio::spawn(async move {
            Interpreter::start(
                &w.cfg.python,
                w.cfg.worker_id,
                slot,
                &w.cleaner,
                &w.cfg.limits,
            )
            .await
        })
    }

    /// The poll's body, with the report checked against the size the master
    /// accepts, and the report kept from the previous poll; and whether the
    /// worker keeps this one (a durable master, a small report: see
    /// [`link::Kept`]).
    fn poll_body(
        &self,
        slot: u32,
        report: &mut Option<TaskReport>,
        kept: &link::Kept,
    ) -> (Vec<u8>, bool) {
        let mut poll = Poll {
            worker_id: self.cfg.worker_id,
            incarnation: self.cfg.incarnation,
            slot,
            report: report.take(),
            keeps: false,
            kept: None,
        };
        let mut body = serde_json::to_vec(&poll).expect("serialisable");
        if body.len() as u64 > flotilla_proto::limits::REPORT {
            let r = poll.report.take().expect("only a report can be this large");
            let error = format!(
                "the task's report is {} bytes, over the limit of {} bytes",
                body.len(),
                flotilla_proto::limits::REPORT
            );
            warn!(task = r.task_id, %error, "report replaced");
            poll.report = Some(failed_report(r.task_id, r.attempt, error));
            body = serde_json::to_vec(&poll).expect("serialisable");
        }
        poll.keeps = poll.report.is_some()
            && self.link.keeps_reports()
            && body.len() <= flotilla_proto::limits::KEPT_REPORT;
        if poll.keeps || kept.kept.is_some() {
            poll.kept = kept.kept.clone();
            body = serde_json::to_vec(&poll).expect("serialisable");
        }
        *report = poll.report;
        (body, poll.keeps)
    }

    async fn slot(self: Arc<Self>, slot: u32, mut interpreter: Option<Interpreter>) -> Verdict {
        let mut report: Option<TaskReport> = None;
        // The report an earlier poll carried, kept until it is durable.
        let mut kept = link::Kept::default();
        // The finished task's span context, sent with its report.
        let mut report_trace: Option<String> = None;
        // Whether the pending report already replaces one the master refused.
        let mut replaced = false;
        let mut warming: Option<tokio::task::JoinHandle<Result<Interpreter>>> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let (body, keeps) = self.poll_body(slot, &mut report, &kept);
            let mut call = self
                .http
                .post(self.url(routes::POLL))
                .bearer_auth(&self.cfg.secret)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            if let Some(tp) = &report_trace {
                call = call.header(TRACEPARENT, tp);
            }
            let resp = match call.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    // Keep the report: it is delivered with the next poll,
                    // to this master or the next one (the watchdog ends the
                    // worker after the grace period).
                    warn!(error = %e, slot, "cannot reach the master; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            self.link.heard();
            backoff = Duration::from_millis(50);
            match resp.status() {
                StatusCode::OK => {
                    kept.answered(report.take(), keeps);
                    report_trace = None;
                    replaced = false;
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
                    // Traced only when the master sampled the task: an
                    // unsampled task costs no span here either.
                    let span = match parent.as_deref() {
                        Some(tp) if telemetry::parent_sampled(tp) => {
                            let span = info_span!(target: TRACE_TARGET, "running", task.id = assignment.task_id,
                                task.attempt = assignment.attempt, task.kind = %assignment.spec.kind, worker.id = self.cfg.worker_id);
                            adopt_parent(&span, Some(tp));
                            span
                        }
                        _ => tracing::Span::none(),
                    };
                    if assignment.spec.kind == TaskKind::Python && interpreter.is_none() {
                        if let Some(w) = warming.take() {
                            interpreter = w.await.ok().and_then(|r| r.ok());
                        }
                    }
                    let (task_id, attempt) = (assignment.task_id, assignment.attempt);
                    match self
                        .attempt(slot, &mut interpreter, assignment, &span)
                        .await
                    {
                        End::Ran(outcome) => {
                            report = Some(TaskReport {
                                task_id,
                                attempt,
                                outcome,
                            })
                        }
                        End::TimedOut(after) => {
                            let error = format!("timed out after {} s", seconds(after));
                            warn!(
                                task = task_id,
                                attempt, "{error}; its processes were killed"
                            );
                            report = Some(failed_report(task_id, attempt, error));
                        }
                        End::Stopped(reason) => {
                            info!(task = task_id, attempt, %reason, "task stopped");
                        }
                    }
                    if interpreter.is_none() && warming.is_none() {
                        warming = Some(self.replacement(slot));
                    }
                    report_trace = if span.is_none() {
                        None
                    } else {
                        traceparent(&span)
                    };
                }
                StatusCode::NO_CONTENT => {
                    kept.answered(report.take(), keeps);
                    report_trace = None;
                    replaced = false;
                }
                StatusCode::CONFLICT => return Verdict::Superseded,
                // A new master adopted this worker: register again, then
                // poll again with the same report.
                StatusCode::PRECONDITION_REQUIRED => {
                    if let Err(verdict) = self.register_again().await {
                        return verdict;
                    }
                }
                StatusCode::NOT_FOUND => {
                    return Verdict::Refused(resp.text().await.unwrap_or_default())
                }
                status => {
                    let text = resp.text().await.unwrap_or_default();
                    let text: String = text.chars().take(500).collect();
                    match report.take() {
                        Some(r) if !replaced => {
                            // Never retried as is: the task ends with the refusal.
                            let error =
                                format!("the master refused this task's report ({status}): {text}");
                            error!(task = r.task_id, %error, "report refused");
                            report = Some(failed_report(r.task_id, r.attempt, error));
                            replaced = true;
                        }
                        Some(r) => {
                            error!(task = r.task_id, %status, %text, "the replacement report was refused too; dropping it");
                            replaced = false;
                        }
                        None => {
                            error!(%status, %text, "poll refused by the master");
                            tokio::time::sleep(backoff).await;
                        }
                    }
                }
            }
        }
    }

    /// Runs one attempt on `slot` until it ends, times out, or the master
    /// stops it; in the last two cases the slot's interpreter (or the
    /// shell's process group) is killed.
    async fn attempt(
        &self,
        slot: u32,
        interpreter: &mut Option<Interpreter>,
        a: Assignment,
        span: &tracing::Span,
    ) -> End {
        let tag = format!(
            "w{}.{}-s{}-t{}.{}",
            self.cfg.worker_id, self.cfg.incarnation, slot, a.task_id, a.attempt
        );
        self.cleaner.task_started(slot, &tag);
        let key: (TaskId, Attempt) = (a.task_id, a.attempt);
        let timeout = a
            .timeout_s
            .and_then(|t| Duration::try_from_secs_f64(t).ok().map(|d| (t, d)));
        let mut stops = self.stops.subscribe();
        let end = {
            let run = self.execute(slot, interpreter, &a, &tag, span);
            let deadline = async {
                match timeout {
                    Some((_, d)) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let stopped = async {
                let found = stops
                    .wait_for(|kept| kept.iter().any(|s| (s.task_id, s.attempt) == key))
                    .await
                    .ok()
                    .and_then(|kept| {
                        kept.iter()
                            .find(|s| (s.task_id, s.attempt) == key)
                            .map(|s| s.reason.clone())
                    });
                match found {
                    Some(reason) => reason,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                outcome = run => End::Ran(outcome),
                _ = deadline => End::TimedOut(timeout.map(|(t, _)| t).unwrap_or_default()),
                reason = stopped => End::Stopped(reason),
            }
        };
        if !matches!(end, End::Ran(_)) {
            if let Some(interp) = interpreter.take() {
                interp.kill(&self.cleaner, Some(slot)).await;
            }
        }
        self.cleaner.task_ended(slot);
        end
    }

    async fn execute(
        &self,
        slot: u32,
        interpreter: &mut Option<Interpreter>,
        a: &Assignment,
        tag: &str,
        span: &tracing::Span,
    ) -> Outcome {
        debug!(task = a.task_id, attempt = a.attempt, kind = %a.spec.kind, "running task");
        let proxy = locks::LockProxy {
            http: &self.http,
            master_url: &self.cfg.master_url,
            lease: &a.lease,
            link: &self.link,
            span,
            held: Default::default(),
        };
        let limits = &self.cfg.limits;
        match a.spec.kind {
            TaskKind::Shell => {
                let door = match lockdoor::Door::new() {
                    Ok(door) => door,
                    Err(e) => {
                        return Outcome::Crashed {
                            error: format!("cannot make the task's lock door: {e}"),
                            stdout: String::new(),
                        }
                    }
                };
                let env = [
                    ("FLOTILLA_TASK_ID", a.task_id.to_string()),
                    ("FLOTILLA_ATTEMPT", a.attempt.to_string()),
                    (cleanup::TAG_ENV, tag.to_string()),
                    (env::WORKER_ID, self.cfg.worker_id.to_string()),
                    ("PATH", self.task_path.clone()),
                ];
                let run = shell::run(
                    &a.spec.command,
                    &env,
                    limits,
                    &self.cleaner,
                    slot,
                    Some(&door.task),
                );
                // The door serves the task's lock calls while it runs.
                tokio::select! {
                    outcome = run => outcome,
                    never = lockdoor::serve(door.worker, &proxy) => match never {},
                }
            }
            TaskKind::Python => {
                if interpreter.is_none() {
                    match Interpreter::start(
                        &self.cfg.python,
                        self.cfg.worker_id,
                        Some(slot),
                        &self.cleaner,
                        limits,
                    )
                    .await
                    {
                        Ok(i) => *interpreter = Some(i),
                        Err(e) => {
                            return Outcome::Crashed {
                                error: format!("{e:#}"),
                                stdout: String::new(),
                            }
                        }
                    }
                }
                let interp = interpreter.as_mut().expect("started above");
                let request =
                    python::run_request(&a.spec.command, a.task_id, a.attempt, tag, limits);
                match interp.run(request, limits, &proxy).await {
                    Ok(outcome) => outcome,
                    Err(crash) => {
                        warn!(
                            task = a.task_id,
                            "the task ended its Python interpreter; starting a fresh one"
                        );
                        if let Some(gone) = interpreter.take() {
                            self.cleaner.interpreter_gone(Some(slot), gone.pid());
                        }
                        crash
                    }
                }
            }
        }
    }
}

/// A report that ends the attempt as failed with `error`.
fn failed_report(task_id: TaskId, attempt: Attempt, error: String) -> TaskReport {
    TaskReport {
        task_id,
        attempt,
        outcome: Outcome::Failed {
            result: TaskResult {
                response: Value::String(error.clone()),
                stdout: String::new(),
                exit_code: None,
                stderr: None,
            },
            error,
        },
    }
}

/// The first process of its container (a Kubernetes pod runs the worker
/// itself, see the Kubernetes runtime): the kernel delivers no signal that
/// has no handler to it, so SIGTERM (the kubelet stopping the pod) and
/// SIGINT are handled here by exiting, which ends every process of the
/// container with it.
fn pid_one_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, code) in [
        (SignalKind::terminate(), 143),
        (SignalKind::interrupt(), 130),
    ] {
        match signal(kind) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    s.recv().await;
                    info!(code, "stopped by a signal");
                    std::process::exit(code);
                });
            }
            Err(e) => warn!(error = %e, "cannot handle a stop signal as PID 1"),
        }
    }
}

fn main() -> Result<()> {
    // Before the async runtime starts its threads: no task (same user) may
    // read this process's memory or /proc/<pid>/environ, and the credential
    // leaves the environment (both changes to the process as a whole).
    let taken = if std::env::args().nth(1).as_deref() == Some("lock") {
        None
    } else {
        #[cfg(target_os = "linux")]
        nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE, 0)")?;
        take_env_credential()
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(taken))
}

async fn run(taken: Option<String>) -> Result<()> {
    let format = std::env::var("FLOTILLA_LOG_FORMAT")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or_default();
    let color = std::env::var("FLOTILLA_LOG_COLOR")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or_default();
    // No sampler of its own: a task's spans follow the master's decision
    // (the sampled flag of the traceparent each assignment carries).
    let _telemetry = telemetry::init("flotilla-worker", "info", format, color, None, None);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("lock") {
        return locks::cli(&args[1..]).await;
    }
    let cfg = Config::from_env(taken)?;
    if std::process::id() == 1 {
        pid_one_signals();
    }
    // Processes that escape a task's process group stay ours to end.
    if let Err(e) = flotilla_proto::reap::become_subreaper() {
        warn!(error = %e, "cannot become a child subreaper; processes that escape a task with setsid may outlive it");
    }
    let cleaner = Cleaner::new(cfg.slots);
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
        cleaner: cleaner.clone(),
        standby: Default::default(),
        stops: watch::channel(Vec::new()).0,
        link: link::MasterLink::default(),
    });
    tokio::spawn(cleaner.run());
    // Warm (all interpreters at once) before registering: an active worker
    // runs its first task at once, and its queue is not stolen from while
    // it warms up.
    let warm = futures::future::join_all((0..worker.cfg.slots).map(|slot| {
        let w = &worker;
        async move {
            match Interpreter::start(&w.cfg.python, w.cfg.worker_id, Some(slot), &w.cleaner, &w.cfg.limits).await {
                Ok(i) => Some(i),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot start the Python interpreter yet; will retry per task");
                    None
                }
            }
        }
    }));
    let interpreters = warm.await;
    if interpreters.iter().all(Option::is_none) {
        // Not one would start: say plainly whether Python itself is the
        // problem (checked only now, so that a healthy start costs no extra
        // interpreter: workers starting together share the CPU).
        python::check_python(&worker.cfg.python)?;
    }
    let reply = worker.register().await?;
    // The spare interpreter (for a slot whose interpreter is killed) starts
    // once the worker has registered, not on the way to it.
    worker.warm_standby();
    worker.adopt_settings(&reply);
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
    tasks.spawn(worker.clone().control());
    tasks.spawn(worker.clone().watchdog());
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
        Some(Ok(Verdict::Refused(why))) => {
            warn!(worker = id, incarnation = inc, %why, "the master does not want this worker any more; exiting");
            let cleaner = worker.cleaner.clone();
            let _ = tokio::task::spawn_blocking(move || cleaner.kill_everything()).await;
            std::process::exit(0)
        }
        Some(Ok(Verdict::Orphaned)) => {
            let grace = worker.link.grace().as_secs_f64();
            warn!(
                worker = id,
                incarnation = inc,
                grace_s = grace,
                "no master for {grace} s (spec.masterGraceSeconds): stopping this worker and its tasks"
            );
            let cleaner = worker.cleaner.clone();
            let killed = tokio::task::spawn_blocking(move || cleaner.kill_everything())
                .await
                .unwrap_or(0);
            info!(worker = id, killed, "worker stopped by itself");
            std::process::exit(0)
        }
        Some(Err(e)) => bail!("worker loop failed: {e}"),
        None => Ok(()),
    }
}
