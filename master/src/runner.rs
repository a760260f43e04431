//! `flotilla run`: replays a manifest's `requests` against the master it
//! started (over real HTTP, as the seed's runner did), then follows the
//! completion feed until every task it created has finished, printing each
//! result as it arrives and a summary at the end. Client code: it sees the
//! master only through `flotilla-client`, as any user would.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_client::api::{NodeView, ResourceView, TaskState, TaskView};
use flotilla_client::Client;
use serde::Serialize;
use serde_json::Value;

use crate::manifest::{endpoint_path, ClusterSpec, Method};

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Print one JSON document at the end instead of text.
    pub json: bool,
    /// Multiplies every `sleep` of the scenario (tests shorten them).
    pub sleep_scale: f64,
    /// Give up waiting for results after this long (`None`: wait forever).
    pub timeout: Option<Duration>,
}

#[derive(Serialize, Debug, Clone)]
pub struct RequestOutcome {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Value,
}

#[derive(Serialize, Debug, Clone)]
pub struct RunReport {
    pub requests: Vec<RequestOutcome>,
    pub tasks: Vec<TaskView>,
    pub nodes: Vec<NodeView>,
    pub steals: u64,
    pub restarts: u64,
    pub resources: Vec<ResourceView>,
    pub succeeded: usize,
    pub failed: usize,
}

fn method_of(m: &Method) -> flotilla_client::Method {
    use flotilla_client::Method as M;
    match m {
        Method::Get => M::GET,
        Method::Post => M::POST,
        Method::Put => M::PUT,
        Method::Delete => M::DELETE,
    }
}

/// A result or error as text lines: a string as it is (no quotes, no
/// trailing newline), anything else as JSON.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim_end().to_string(),
        other => other.to_string(),
    }
}

pub async fn run(client: &Client, spec: &ClusterSpec, opts: &RunOptions) -> Result<RunReport> {
    let mut out = std::io::stdout();
    let mut requests = Vec::new();
    let mut created: Vec<u64> = Vec::new();
    for (i, r) in spec.requests.iter().enumerate() {
        let path = endpoint_path(&r.endpoint)?;
        for _ in 0..r.times {
            let (status, body) = client
                .request(method_of(&r.method), &path, r.body.as_ref())
                .await
                .with_context(|| format!("requests[{i}]: {path} could not be sent"))?;
            if let Some(id) = body.get("task_id").and_then(Value::as_u64) {
                created.push(id);
            }
            if !opts.json {
                writeln!(out, "{} {path} -> {status} {body}", method_of(&r.method))?;
            }
            requests.push(RequestOutcome {
                method: method_of(&r.method).to_string(),
                path: path.clone(),
                status,
                body,
            });
            if r.sleep > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(r.sleep * opts.sleep_scale)).await;
            }
        }
    }

    let tasks = follow(client, &created, opts).await?;
    let nodes = client.nodes().await?;
    let resources = client.resources().await?;
    let steals = client.health().await?["steals"].as_u64().unwrap_or(0);
    let restarts = nodes.iter().map(|n| n.restarts).sum();
    let succeeded = tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .count();
    let failed = tasks.len() - succeeded;
    let report = RunReport {
        requests,
        tasks,
        nodes,
        steals,
        restarts,
        resources,
        succeeded,
        failed,
    };
    if opts.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_summary(&report)?;
    }
    Ok(report)
}

/// Follows the completion feed until every task in `ids` is final.
async fn follow(client: &Client, ids: &[u64], opts: &RunOptions) -> Result<Vec<TaskView>> {
    let mut feed = client.follow(ids.iter().copied(), 0);
    let mut done: BTreeMap<u64, TaskView> = BTreeMap::new();
    let mut per_node: BTreeMap<u32, usize> = BTreeMap::new();
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} tasks done {elapsed} | {msg}",
        )
        .expect("valid template"),
    );
    // indicatif swallows println when it is not drawing (not a terminal).
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    while !feed.is_done() {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bar.abandon();
            bail!(
                "{} task(s) still unfinished after {:?}",
                feed.pending(),
                opts.timeout.unwrap(),
            );
        }
        for t in feed.next(Duration::from_millis(500)).await? {
            if let Some(n) = t.node {
                *per_node.entry(n).or_default() += 1;
            }
            if !opts.json {
                let what = match (&t.result, &t.error) {
                    (_, Some(e)) => format!("error: {}", e.trim_end()),
                    (Some(r), None) => text_of(&r.response),
                    (None, None) => String::new(),
                };
                let node = t
                    .node
                    .map(|n| format!("node {n}"))
                    .unwrap_or_else(|| "no node".into());
                // A multi-line result (a traceback, a text) prints as lines:
                // the first beside the task, the rest indented below it.
                let mut lines = what.lines();
                say(format!(
                    "task {} on {node} (attempt {}): {:?}: {}",
                    t.id,
                    t.attempts,
                    t.state,
                    lines.next().unwrap_or("")
                ));
                for line in lines {
                    say(format!("      {}", clip(line, 160)));
                }
                if let Some(r) = &t.result {
                    for line in r.stdout.lines() {
                        say(format!("    | {}", clip(line, 160)));
                    }
                }
            }
            done.insert(t.id, t);
            bar.inc(1);
        }
        let counts: Vec<String> = per_node
            .iter()
            .map(|(n, c)| format!("node {n}: {c}"))
            .collect();
        bar.set_message(counts.join(", "));
    }
    bar.finish_and_clear();
    Ok(ids.iter().filter_map(|id| done.remove(id)).collect())
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &s[..end], s.len() - end)
}

fn print_summary(r: &RunReport) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(
        out,
        "\nSummary: {} tasks, {} succeeded, {} failed; {} steals, {} restarts",
        r.tasks.len(),
        r.succeeded,
        r.failed,
        r.steals,
        r.restarts
    )?;
    for res in &r.resources {
        writeln!(
            out,
            "  resource {} ({}): {} (version {})",
            res.name,
            res.kind,
            clip(&res.value.to_string(), 120),
            res.version
        )?;
    }
    for n in &r.nodes {
        writeln!(
            out,
            "  node {}: capacity {}, executed {}, restarts {}, {:?}",
            n.id, n.capacity, n.executed, n.restarts, n.state
        )?;
    }
    Ok(())
}
