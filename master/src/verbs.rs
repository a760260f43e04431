//! The command line for a running master: `flotilla submit`, `get`, `wait`,
//! `tasks`, `nodes`, `resources`, `add`, `stop`, `watch`. Client code only:
//! every verb is calls of `flotilla-client` over HTTP. Tables for people,
//! `--json` for scripts.
//!
//! Exit codes: 0 done; 1 a task failed; 2 bad usage; 3 the master could not
//! be reached or refused the request; 4 `wait --timeout` ran out.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use comfy_table::{presets, Table};
use flotilla_client::api::{NodeView, ResourceView, TaskState, TaskView};
use flotilla_client::{Client, TaskQuery, DEFAULT_SERVER};
use flotilla_proto::{TaskId, TaskKind, TaskSpec, WorkerId};
use serde_json::{json, Value};

/// Exit code when a task the verb reports on failed.
pub const EXIT_TASK_FAILED: i32 = 1;
/// Exit code when the master cannot be reached or refuses the request.
pub const EXIT_MASTER: i32 = 3;
/// Exit code when tasks were still unfinished at `--timeout`.
pub const EXIT_TIMEOUT: i32 = 4;

/// Tasks still unfinished when `wait --timeout` ran out.
#[derive(Debug, thiserror::Error)]
#[error("{pending} task(s) still unfinished after {after:?}")]
pub struct TimedOut {
    pending: usize,
    after: Duration,
}

/// Where the master is and how to print.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The master's URL (token: FLOTILLA_TOKEN).
    #[arg(long, env = "FLOTILLA_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Print JSON for scripts instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.server, flotilla::api_token())?)
    }
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    conn: Conn,
    /// The code: Python (default) or, with --shell, a shell command.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    code: Option<String>,
    /// Read the code from this file (`-`: standard input).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// A shell command (`sh -c`) instead of Python.
    #[arg(long)]
    shell: bool,
    /// Straight into this worker's queue (waits while it is full).
    #[arg(long)]
    node: Option<WorkerId>,
    /// Wait for the task and print its result (exit code 1 if it failed).
    #[arg(long)]
    wait: bool,
    /// Seconds the task may run before it is stopped (it then fails).
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    conn: Conn,
    /// Task IDs.
    #[arg(required = true)]
    ids: Vec<TaskId>,
    /// Give up after this many seconds (exit code 4).
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(Args, Debug)]
pub struct TasksArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only tasks in this state (queued, assigned, running, succeeded, failed).
    #[arg(long)]
    state: Option<TaskState>,
    /// Only tasks on this node.
    #[arg(long)]
    node: Option<WorkerId>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Only tasks with an ID above this one (paging).
    #[arg(long)]
    after: Option<TaskId>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Stop after this many finished tasks (default: until Ctrl-C).
    #[arg(long)]
    count: Option<usize>,
}

fn out_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_string()));
    t
}

/// A value on one line, cut to `max` characters.
fn short(v: &Value, max: usize) -> String {
    let s = match v {
        Value::String(s) => s.trim_end().to_string(),
        other => other.to_string(),
    };
    let s = s.replace('\n', "\\n");
    if s.chars().count() <= max {
        s
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

fn node_name(n: Option<WorkerId>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

fn outcome(t: &TaskView) -> String {
    match (&t.result, &t.error) {
        (_, Some(e)) if t.result.is_none() => short(&Value::String(e.clone()), 60),
        (Some(r), _) => short(&r.response, 60),
        _ => String::new(),
    }
}

fn seconds(t: &TaskView) -> String {
    match (t.started_at, t.finished_at) {
        (Some(s), Some(f)) => format!("{:.3}s", f.saturating_sub(s) as f64 / 1000.0),
        _ => "-".into(),
    }
}

pub async fn submit(a: SubmitArgs) -> Result<i32> {
    let code = match (&a.code, &a.file) {
        (Some(c), None) => c.clone(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the code from standard input")?;
            s
        }
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the code from {}", f.display()))?,
        _ => bail!("give the code or -f FILE, not both"),
    };
    let spec = TaskSpec {
        kind: if a.shell {
            TaskKind::Shell
        } else {
            TaskKind::Python
        },
        command: code,
        timeout: a.timeout,
    };
    let client = a.conn.client()?;
    let id = match a.node {
        Some(n) => client.send_to(n, &spec).await?,
        None => client.send(&spec).await?,
    };
    if !a.wait {
        if a.conn.json {
            out_json(&json!({ "task_id": id }))?;
        } else {
            println!("{id}");
        }
        return Ok(0);
    }
    let view = client.wait_final(id, None).await?;
    if a.conn.json {
        out_json(&view)?;
    } else {
        print_result(&view);
    }
    Ok(if view.state == TaskState::Succeeded {
        0
    } else {
        EXIT_TASK_FAILED
    })
}

/// A finished task for a person: its output, then its response (or error).
fn print_result(t: &TaskView) {
    if let Some(r) = &t.result {
        print!("{}", r.stdout);
        if !r.stdout.is_empty() && !r.stdout.ends_with('\n') {
            println!();
        }
        if let Some(err) = &r.stderr {
            eprint!("{err}");
        }
        match (&r.response, t.state) {
            // A shell task's response is its stdout, printed already.
            (_, _) if r.exit_code.is_some() => {}
            (Value::String(s), TaskState::Failed) => eprintln!("{}", s.trim_end()),
            (Value::String(s), _) => println!("{s}"),
            (v, _) => println!("{v}"),
        }
    }
    if t.state == TaskState::Failed {
        if let Some(e) = &t.error {
            eprintln!("task {} failed: {e}", t.id);
        } else {
            eprintln!("task {} failed", t.id);
        }
    }
}

pub async fn get(conn: Conn, id: TaskId) -> Result<i32> {
    let t = conn.client()?.task(id).await?;
    if conn.json {
        out_json(&t)?;
        return Ok(0);
    }
    let mut tb = table(&["FIELD", "VALUE"]);
    tb.add_row(vec!["id".into(), t.id.to_string()]);
    tb.add_row(vec!["state".into(), t.state.to_string()]);
    tb.add_row(vec!["node".into(), node_name(t.node)]);
    tb.add_row(vec!["attempts".into(), t.attempts.to_string()]);
    tb.add_row(vec!["run time".into(), seconds(&t)]);
    if let Some(r) = &t.result {
        tb.add_row(vec!["response".into(), short(&r.response, 200)]);
        tb.add_row(vec![
            "stdout".into(),
            short(&Value::String(r.stdout.clone()), 200),
        ]);
        if let Some(c) = r.exit_code {
            tb.add_row(vec!["exit code".into(), c.to_string()]);
        }
    }
    if let Some(e) = &t.error {
        tb.add_row(vec!["error".into(), short(&Value::String(e.clone()), 200)]);
    }
    println!("{tb}");
    Ok(0)
}

/// The final views of `ids`: those already final from the listing (or one
/// request each for a few), the rest from the completion feed, followed
/// from before the look (so nothing finishing meanwhile is missed).
async fn wait_tasks(
    client: &Client,
    ids: &[TaskId],
    timeout: Option<Duration>,
    mut each: impl FnMut(&TaskView),
) -> Result<HashMap<TaskId, TaskView>> {
    let from = client.feed_position().await?;
    let mut done = HashMap::new();
    if ids.len() <= 50 {
        for &id in ids {
            let t = client.task(id).await?;
            if t.state.is_final() {
                done.insert(id, t);
            }
        }
    } else {
        let wanted: std::collections::HashSet<TaskId> = ids.iter().copied().collect();
        let (lo, hi) = (
            *ids.iter().min().expect("ids"),
            *ids.iter().max().expect("ids"),
        );
        let mut after = lo.saturating_sub(1);
        loop {
            let page = client
                .tasks(&TaskQuery {
                    after: Some(after),
                    limit: Some(1000),
                    ..Default::default()
                })
                .await?;
            for t in page.tasks {
                if wanted.contains(&t.id) && t.state.is_final() {
                    done.insert(t.id, t);
                }
            }
            match page.next {
                Some(n) if n < hi => after = n,
                _ => break,
            }
        }
        for &id in &wanted {
            if !done.contains_key(&id) {
                // Unknown IDs are an error, as with GET /tasks/{id}.
                if let Err(e) = client.task(id).await {
                    return Err(e.into());
                }
            }
        }
    }
    for t in done.values() {
        each(t);
    }
    let rest: Vec<TaskId> = ids
        .iter()
        .copied()
        .filter(|id| !done.contains_key(id))
        .collect();
    let mut feed = client.follow(rest, from);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    while !feed.is_done() {
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(TimedOut {
                        pending: feed.pending(),
                        after: timeout.unwrap_or_default(),
                    }
                    .into());
                }
                left.min(Duration::from_secs(30))
            }
            None => Duration::from_secs(30),
        };
        for t in feed.next(wait).await? {
            each(&t);
            done.insert(t.id, t);
        }
    }
    Ok(done)
}

pub async fn wait(a: WaitArgs) -> Result<i32> {
    let client = a.conn.client()?;
    let bar = if a.ids.len() > 1 && !a.conn.json && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(a.ids.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tasks finished, {msg} failed {elapsed}",
            )
            .expect("valid template"),
        );
        Some(bar)
    } else {
        None
    };
    let mut failed = 0;
    let done = wait_tasks(
        &client,
        &a.ids,
        a.timeout.map(Duration::from_secs_f64),
        |t| {
            if t.state != TaskState::Succeeded {
                failed += 1;
            }
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(failed.to_string());
            }
        },
    )
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let mut done = done?;
    let views: Vec<TaskView> = a.ids.iter().filter_map(|id| done.remove(id)).collect();
    if a.conn.json {
        out_json(&views)?;
    } else if views.len() == 1 {
        print_result(&views[0]);
    } else {
        print_tasks(&views);
    }
    Ok(if views.iter().all(|t| t.state == TaskState::Succeeded) {
        0
    } else {
        EXIT_TASK_FAILED
    })
}

/// `flotilla cancel ID...`: each task cancelled, or said to have finished
/// already (not an error); an unknown ID is (exit code 3).
pub async fn cancel(conn: Conn, ids: Vec<TaskId>) -> Result<i32> {
    let client = conn.client()?;
    let mut out = Vec::new();
    for id in ids {
        let (cancelled, was) = match client.cancel(id).await {
            Ok(c) => (true, Some(c.was)),
            // 409: it had finished already; not an error for this verb.
            Err(flotilla_client::Error::Api { status: 409, .. }) => (false, None),
            Err(e) => return Err(e.into()),
        };
        if !conn.json {
            match was {
                Some(was) => println!("task {id} cancelled (was {was})"),
                None => println!("task {id} had already finished"),
            }
        }
        out.push(json!({ "id": id, "cancelled": cancelled, "was": was }));
    }
    if conn.json {
        out_json(&out)?;
    }
    Ok(0)
}

fn print_tasks(tasks: &[TaskView]) {
    let mut tb = table(&["ID", "STATE", "NODE", "ATTEMPTS", "RUN TIME", "RESULT"]);
    for t in tasks {
        tb.add_row(vec![
            t.id.to_string(),
            t.state.to_string(),
            node_name(t.node),
            t.attempts.to_string(),
            seconds(t),
            outcome(t),
        ]);
    }
    println!("{tb}");
}

pub async fn tasks(a: TasksArgs) -> Result<i32> {
    if a.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let client = a.conn.client()?;
    let mut out = Vec::new();
    let mut after = a.after;
    let mut next;
    // Pages of up to 1,000 until the limit is reached or nothing is left.
    loop {
        let page = client
            .tasks(&TaskQuery {
                state: a.state,
                node: a.node,
                limit: Some((a.limit - out.len()).min(1000)),
                after,
            })
            .await?;
        out.extend(page.tasks);
        next = page.next;
        match page.next {
            Some(n) if out.len() < a.limit => after = Some(n),
            _ => break,
        }
    }
    if a.conn.json {
        out_json(&json!({ "tasks": out, "next": next }))?;
    } else {
        print_tasks(&out);
        if let Some(n) = next {
            eprintln!("(more: --after {n})");
        }
    }
    Ok(0)
}

pub async fn nodes(conn: Conn) -> Result<i32> {
    let nodes = conn.client()?.nodes().await?;
    if conn.json {
        out_json(&nodes)?;
        return Ok(0);
    }
    let mut tb = table(&[
        "NODE",
        "STATE",
        "CAPACITY",
        "QUEUED",
        "RUNNING",
        "EXECUTED",
        "RESTARTS",
        "INCARNATION",
        "HEARTBEAT",
        "WHERE",
    ]);
    for n in &nodes {
        tb.add_row(vec![
            n.id.to_string(),
            n.state.to_string(),
            n.capacity.to_string(),
            n.queued.to_string(),
            n.running.to_string(),
            n.executed.to_string(),
            n.restarts.to_string(),
            n.incarnation.to_string(),
            format!("{:.1}s ago", n.last_heartbeat_ms_ago as f64 / 1000.0),
            // The runtime's locator (pid, container, pod); else the pid.
            n.locator
                .clone()
                .or_else(|| n.pid.map(|p| format!("pid {p}")))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{tb}");
    Ok(0)
}

fn holders(r: &ResourceView) -> (String, String) {
    let fmt = |hs: &[flotilla_client::api::Holder]| {
        if hs.is_empty() {
            return "-".to_string();
        }
        hs.iter()
            .map(|h| {
                format!(
                    "{} by task {} (node {})",
                    h.mode, h.owner.task, h.owner.worker
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    (fmt(&r.holders), fmt(&r.waiting))
}

pub async fn resources(conn: Conn, name: Option<String>) -> Result<i32> {
    let client = conn.client()?;
    let list = match &name {
        Some(n) => vec![client.resource(n).await?],
        None => client.resources().await?,
    };
    if conn.json {
        match name {
            Some(_) => out_json(&list[0])?,
            None => out_json(&list)?,
        }
        return Ok(0);
    }
    let width = if name.is_some() { 2000 } else { 60 };
    let mut tb = table(&["NAME", "TYPE", "VERSION", "VALUE", "HELD", "WAITING"]);
    for r in &list {
        let (held, waiting) = holders(r);
        tb.add_row(vec![
            r.name.clone(),
            r.kind.clone(),
            r.version.to_string(),
            short(&r.value, width),
            held,
            waiting,
        ]);
    }
    println!("{tb}");
    Ok(0)
}

pub async fn add(conn: Conn, capacity: Option<usize>) -> Result<i32> {
    let id = conn.client()?.add_worker(capacity).await?;
    if conn.json {
        out_json(&json!({ "node_id": id }))?;
    } else {
        println!("{id}");
    }
    Ok(0)
}

pub async fn stop(conn: Conn, node: WorkerId) -> Result<i32> {
    let message = conn.client()?.stop_worker(node).await?;
    if conn.json {
        out_json(&json!({ "message": message }))?;
    } else {
        println!("{message}");
    }
    Ok(0)
}

fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// Node changes between two looks at `GET /nodes`.
fn node_events(before: &BTreeMap<WorkerId, NodeView>, now: &[NodeView]) -> Vec<Value> {
    let mut out = Vec::new();
    for n in now {
        let what = match before.get(&n.id) {
            None => Some("added"),
            Some(b) if b.incarnation != n.incarnation => Some("restarted"),
            Some(b) if b.state != n.state => Some(n.state.name()),
            _ => None,
        };
        if let Some(what) = what {
            out.push(
                json!({"event": "node", "node": n.id, "what": what, "state": n.state,
                "incarnation": n.incarnation, "capacity": n.capacity}),
            );
        }
    }
    out
}

/// `flotilla watch`: tasks as they finish (the completion feed) and node
/// changes, one line each (`--json`: one JSON object per line).
pub async fn watch(a: WatchArgs) -> Result<i32> {
    let client = a.conn.client()?;
    let mut after = client.feed_position().await?;
    let mut known: BTreeMap<WorkerId, NodeView> = client
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.id, n))
        .collect();
    eprintln!(
        "watching {} ({} nodes); Ctrl-C to stop",
        client.url(),
        known.len()
    );
    let mut seen = 0usize;
    loop {
        // One long-poll of up to a second, then a look at the nodes.
        let page = client.finished(after, Duration::from_secs(1)).await?;
        after = page.next;
        for t in &page.tasks {
            if a.conn.json {
                println!(
                    "{}",
                    json!({"event": "task", "id": t.id, "state": t.state, "node": t.node,
                        "attempts": t.attempts, "result": t.result, "error": t.error})
                );
            } else {
                println!(
                    "{} task {} {} on node {} (attempt {}): {}",
                    clock(),
                    t.id,
                    t.state,
                    node_name(t.node),
                    t.attempts,
                    outcome(t)
                );
            }
            seen += 1;
            if a.count.is_some_and(|c| seen >= c) {
                return Ok(0);
            }
        }
        let nodes = client.nodes().await?;
        for e in node_events(&known, &nodes) {
            if a.conn.json {
                println!("{e}");
            } else {
                println!(
                    "{} node {} {} (incarnation {}, capacity {})",
                    clock(),
                    e["node"],
                    e["what"].as_str().unwrap_or(""),
                    e["incarnation"],
                    e["capacity"]
                );
            }
        }
        known = nodes.into_iter().map(|n| (n.id, n)).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_client::api::WorkerState;

    fn node(id: WorkerId, state: WorkerState, incarnation: u64) -> NodeView {
        NodeView {
            id,
            state,
            capacity: 2,
            incarnation,
            queued: 0,
            running: 0,
            executed: 0,
            restarts: 0,
            last_heartbeat_ms_ago: 0,
            pid: None,
            locator: None,
        }
    }

    #[test]
    fn node_changes_are_named() {
        let before: BTreeMap<_, _> = [
            (0, node(0, WorkerState::Active, 1)),
            (1, node(1, WorkerState::Active, 1)),
        ]
        .into_iter()
        .collect();
        let now = [
            node(0, WorkerState::Dead, 1),
            node(1, WorkerState::Starting, 2),
            node(2, WorkerState::Starting, 1),
        ];
        let what: Vec<_> = node_events(&before, &now)
            .iter()
            .map(|e| e["what"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(what, ["dead", "restarted", "added"]);
        assert!(node_events(&before, &[node(0, WorkerState::Active, 1)]).is_empty());
    }

    #[test]
    fn values_are_cut_to_one_line() {
        assert_eq!(short(&json!("a\nb\n"), 10), "a\\nb");
        assert_eq!(short(&json!("abcdef"), 3), "abc...");
        assert_eq!(short(&json!([1, 2]), 10), "[1,2]");
    }
}
