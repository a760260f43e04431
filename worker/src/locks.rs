//! Lock calls on behalf of a task: the Python interpreter asks through its
//! protocol pipe, shell tasks through `flotilla-worker lock ...`; either way
//! the call reaches the master's `/internal/lock` carrying the attempt's
//! lease, which the task's code never needs to know (Python) or can only use
//! as itself (shell).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::Mutex;

use flotilla_proto::runner::{FromRunner, ToRunner};
use flotilla_proto::telemetry::{traceparent, TRACEPARENT, TRACE_TARGET};
use flotilla_proto::{routes, LockAction, LockMode, LockRequest};
use serde_json::Value;
use tracing::info_span;

pub struct LockProxy<'a> {
    pub http: &'a reqwest::Client,
    pub master_url: &'a str,
    pub lease: &'a str,
    /// The link to the master: a call that cannot reach it is retried
    /// within the grace period (the master may be restarting).
    pub link: &'a crate::link::MasterLink,
    /// The task's running span: lock spans are its children.
    pub span: &'a tracing::Span,
    /// "lock held" spans, from grant to release, by resource.
    pub held: Mutex<HashMap<String, tracing::Span>>,
}

impl LockProxy<'_> {
    /// Forwards one call of the task's; the answer is the interpreter's
    /// `lock_reply`.
    pub async fn call(
        &self,
        action: LockAction,
        name: String,
        mode: LockMode,
        value: Option<Value>,
        token: Option<u64>,
        timeout_s: Option<f64>,
    ) -> ToRunner {
        let req = LockRequest {
            lease: self.lease.to_string(),
            action,
            name,
            mode,
            value,
            token,
            timeout_s,
            resend: false,
        };
        // The task's spans only when the task is traced (an untraced task's
        // running span is none; a child of none would start a trace).
        let span = match req.action {
            _ if self.span.is_none() => tracing::Span::none(),
            LockAction::Acquire => {
                info_span!(target: TRACE_TARGET, parent: self.span, "lock wait", resource = %req.name, lock.mode = %req.mode)
            }
            LockAction::Release => {
                // The release ends the "lock held" span; the call is its last child.
                let held = self.held.lock().expect("lock spans").remove(&req.name);
                let parent = held.as_ref().unwrap_or(self.span);
                info_span!(target: TRACE_TARGET, parent: parent, "lock release", resource = %req.name, lock.mode = %req.mode)
            }
        };
        let link = self.link;
        let result = send(
            self.http,
            self.master_url,
            req.clone(),
            (!span.is_none()).then(|| traceparent(&span)).flatten(),
            || link.grace().saturating_sub(link.silent_for()),
            || link.heard(),
        )
        .await;
        drop(span);
        match result {
            Ok(body) => {
                if req.action == LockAction::Acquire && !self.span.is_none() {
                    let held = info_span!(target: TRACE_TARGET, parent: self.span, "lock held", resource = %req.name,
                        lock.mode = %req.mode, lock.token = body["token"].as_u64().unwrap_or(0));
                    self.held
                        .lock()
                        .expect("lock spans")
                        .insert(req.name.clone(), held);
                }
                ToRunner::LockReply {
                    ok: true,
                    body: Some(body),
                    error: None,
                }
            }
            Err(e) => ToRunner::LockReply {
                ok: false,
                body: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// Sends a lock call. A call that gets no answer (the master is away: killed,
/// restarting) is sent again, marked `resend`, with a growing delay, for as
/// long as `budget` says there is time left (the worker's grace period);
/// the master answers a resent call it had already carried out as it did
/// the first time, so a call is never done twice. `heard` is told of every
/// answer.
async fn send(
    http: &reqwest::Client,
    master_url: &str,
    mut req: LockRequest,
    traceparent: Option<String>,
    budget: impl Fn() -> std::time::Duration,
    heard: impl Fn(),
) -> Result<Value> {
    let mut delay = std::time::Duration::from_millis(50);
    let mut unacknowledged_until: Option<std::time::Instant> = None;
    let resp = loop {
        let mut call = http
            .post(format!("{master_url}{}", routes::LOCK))
            .json(&req);
        if let Some(tp) = &traceparent {
            call = call.header(TRACEPARENT, tp);
        }
        match call.send().await {
            // 503: the master could not make the call durable (it is
            // stopping, or its store failed): not acknowledged, so it is
            // sent again like a call that got no answer; the next master
            // answers it as done if it was.
            // At most one grace period from the first such answer: a master
            // whose store stays broken does not hold the task forever.
            Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let until = *unacknowledged_until
                    .get_or_insert_with(|| std::time::Instant::now() + budget());
                let left = until.saturating_duration_since(std::time::Instant::now());
                let msg = resp.text().await.unwrap_or_default();
                if left.is_zero() {
                    bail!("the master did not acknowledge a lock call: {msg}");
                }
                tracing::warn!(resource = %req.name, answer = %msg, "lock call not acknowledged (503); retrying");
                tokio::time::sleep(delay.min(left)).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
                req.resend = true;
            }
            Ok(resp) => break resp,
            Err(e) => {
                let left = budget();
                if left.is_zero() {
                    return Err(e).context("cannot reach the master for a lock call");
                }
                tracing::warn!(error = %e, resource = %req.name, "lock call: cannot reach the master; retrying");
                tokio::time::sleep(delay.min(left)).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
                req.resend = true;
            }
        }
    };
    heard();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        bail!("{msg}");
    }
    Ok(body)
}

const USAGE: &str = "usage: flotilla-worker lock (acquire|release) (read|write) NAME [--timeout SECONDS] [--value JSON --token N]
  For shell tasks: calls through the task's lock door (FLOTILLA_LOCK_FD), the worker adds the lease.
  acquire prints the grant as JSON ({\"name\",\"type\",\"mode\",\"value\",\"token\"});
  release write with --value publishes it (the grant's --token is required).";

/// `flotilla-worker lock ...`, the shell tasks' way to the locks.
pub async fn cli(args: &[String]) -> Result<()> {
    let (action, mode, name) = match args {
        [a, m, n, ..] => (a.as_str(), m.as_str(), n.clone()),
        _ => bail!("{USAGE}"),
    };
    let action = match action {
        "acquire" => LockAction::Acquire,
        "release" => LockAction::Release,
        other => bail!("unknown lock action `{other}`\n{USAGE}"),
    };
    let mode = match mode {
        "read" => LockMode::Read,
        "write" => LockMode::Write,
        other => bail!("unknown lock mode `{other}`\n{USAGE}"),
    };
    let (mut value, mut token, mut timeout_s) = (None, None, None);
    let mut rest = args[3..].iter();
    while let Some(flag) = rest.next() {
        let arg = rest
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--timeout" => {
                timeout_s = Some(
                    arg.parse()
                        .with_context(|| format!("--timeout {arg:?} is not a number"))?,
                )
            }
            "--value" => {
                value = Some(
                    serde_json::from_str(arg)
                        .with_context(|| format!("--value {arg:?} is not JSON"))?,
                )
            }
            "--token" => {
                token = Some(
                    arg.parse()
                        .with_context(|| format!("--token {arg:?} is not a number"))?,
                )
            }
            other => bail!("unknown option `{other}`\n{USAGE}"),
        }
    }
    let call = FromRunner::Lock {
        action,
        name,
        mode,
        value,
        token,
        timeout_s,
    };
    let body = crate::lockdoor::call(&call)?;
    println!("{body}");
    Ok(())
}
