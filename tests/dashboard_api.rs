//! The dashboard's own HTTP routes, without a browser: the live stream
//! shared by every open page (nothing lost, nothing twice, at most about
//! ten updates a second each), the task table's rows and detail for tasks
//! that left the master's memory, and the sign-in limit.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use flotilla_e2e::*;
use serde_json::{json, Value};

fn manifest(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  heartbeat: {{ intervalSeconds: 1, timeoutSeconds: 10 }}\n{extra}  workers:\n    - capacity: 4\n    - capacity: 4\n"
    )
}

/// Reads `/ui/events` for `window`: each update's JSON, with when it came.
async fn read_stream(
    url: String,
    token: Option<&str>,
    window: Duration,
) -> Result<Vec<(Instant, Value)>> {
    let mut req = reqwest::Client::new().get(format!("{url}/ui/events"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await?.error_for_status()?;
    let end = Instant::now() + window;
    let mut carry = String::new();
    let mut out = Vec::new();
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(end.into(), resp.chunk()).await {
        carry.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = carry.find("\n\n") {
            let block: String = carry.drain(..at + 2).collect();
            if !block.contains("event: update") {
                continue;
            }
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            out.push((Instant::now(), serde_json::from_str(&data)?));
        }
    }
    Ok(out)
}

/// Two pages follow the stream while 600 tasks run: each gets every ended
/// attempt (bar) exactly once and in order, the first update says `hello`
/// and the others do not, updates come at most about ten a second, and
/// the updates both pages got at the same moment are the same update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_gets_each_bar_once_at_most_ten_updates_a_second() -> Result<()> {
    let c = Cluster::start_with(&manifest("dash-stream", ""), &["--ephemeral"], &[]).await?;
    let window = Duration::from_secs(4);
    let a = tokio::spawn(read_stream(c.url.clone(), None, window));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let b = tokio::spawn(read_stream(c.url.clone(), None, window));
    let tasks: Vec<Value> = (0..600)
        .map(|i| json!({"type": "python", "command": format!("response = {i}")}))
        .collect();
    let (status, body) = c.post("/tasks", json!({ "tasks": tasks })).await?;
    assert_eq!(status, 200, "{body}");
    let (a, b) = (a.await??, b.await??);
    for (name, updates) in [("first page", &a), ("second page", &b)] {
        assert!(updates[0].1["hello"] == true, "{name}: {}", updates[0].1);
        assert!(
            updates[1..].iter().all(|(_, u)| u["hello"] == false),
            "{name}: a later update said hello"
        );
        // At most one per 100 ms (a little slack for the network).
        for pair in updates.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= Duration::from_millis(60), "{name}: {gap:?} apart");
        }
        assert!(
            updates.len() <= 10 * window.as_secs() as usize + 2,
            "{name}: {} updates in {window:?}",
            updates.len()
        );
        let seqs: Vec<u64> = updates
            .iter()
            .flat_map(|(_, u)| u["bars"].as_array().unwrap().iter())
            .map(|bar| bar["seq"].as_u64().unwrap())
            .collect();
        let first = *seqs.first().ok_or_else(|| anyhow!("{name}: no bars"))?;
        let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{name}: bars lost, repeated or out of order"
        );
    }
    // The 600 attempts all ended within the window, and both pages saw
    // the last of them.
    let last_seq = |u: &[(Instant, Value)]| {
        u.iter()
            .flat_map(|(_, u)| u["bars"].as_array().unwrap().iter())
            .filter_map(|bar| bar["seq"].as_u64())
            .max()
    };
    assert_eq!(last_seq(&a), Some(600));
    assert_eq!(last_seq(&b), Some(600));
    // Shared: an update of the second page built at the same moment as one
    // of the first is the same update (same clock reading, same content).
    let shared = b[1..]
        .iter()
        .filter(|(_, u)| a.iter().any(|(_, v)| v["now"] == u["now"]))
        .inspect(|(_, u)| {
            let (_, v) = a.iter().find(|(_, v)| v["now"] == u["now"]).unwrap();
            assert_eq!(u, v, "the same tick, two different updates");
        })
        .count();
    assert!(
        shared + 2 >= b.len().min(a.len()) / 2,
        "{shared} updates shared"
    );
    Ok(())
}

/// A finished task read back from the store (it left memory) shows its
/// attempts in the task detail, and its table row carries a summary
/// bounded in size, not its whole response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_left_memory_show_their_attempts_and_rows_stay_small() -> Result<()> {
    let c = Cluster::start(&manifest(
        "dash-stored",
        "  memoryRetention: { finishedTasks: 0, seconds: 0.1 }\n",
    ))
    .await?;
    let small = c.run_python("response = 41 + 1").await;
    let big = c.run_python("response = 'x' * 100000").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.health().await?["tasks"].as_u64() != Some(0) {
        assert!(Instant::now() < deadline, "the tasks did not leave memory");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = small["id"].as_u64().unwrap();
    let (status, detail) = c.get(&format!("/ui/tasks/{id}")).await?;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["result"]["response"], 42);
    let log = detail["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 1, "{detail}");
    assert_eq!(log[0]["attempt"], 1);
    assert_eq!(log[0]["worker"], small["node"]);
    assert_eq!(log[0]["outcome"], "succeeded");
    assert_eq!(log[0]["started_at"], small["started_at"]);
    assert_eq!(log[0]["ended_at"], small["finished_at"]);

    let from = id - 1;
    let (status, page) = c.get(&format!("/ui/tasks?after={from}&limit=10")).await?;
    assert_eq!(status, 200, "{page}");
    let rows = page["tasks"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{page}");
    assert_eq!(rows[0]["summary"], "42");
    assert!(rows[0].get("result").is_none(), "a row carries no result");
    let summary = rows[1]["summary"].as_str().unwrap();
    assert_eq!(rows[1]["id"], big["id"]);
    assert!(
        summary.starts_with("xxxx") && summary.ends_with('…'),
        "{summary}"
    );
    assert!(summary.len() < 200, "a summary of {} bytes", summary.len());
    Ok(())
}

/// Wrong tokens from one client: refused (401) up to the limit, then 429
/// with a JSON error and `Retry-After`, the right token included, until
/// the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_tokens_are_answered_429_with_retry_after() -> Result<()> {
    let token = "dashboard-limit-token-93c1";
    let c = Cluster::start_with(
        &manifest("dash-limit", ""),
        &["--ephemeral"],
        &[("FLOTILLA_TOKEN", token)],
    )
    .await?;
    let login = |t: &str| {
        c.http
            .post(format!("{}/ui/login", c.url))
            .body(json!({ "token": t }).to_string())
            .send()
    };
    for i in 0..5 {
        let resp = login(&format!("wrong-{i}")).await?;
        assert_eq!(resp.status(), 401, "wrong token {i}");
    }
    for t in ["wrong-5", token] {
        let resp = login(t).await?;
        assert_eq!(resp.status(), 429, "after five wrong tokens");
        let wait: u64 = resp
            .headers()
            .get("retry-after")
            .ok_or_else(|| anyhow!("no Retry-After"))?
            .to_str()?
            .parse()?;
        assert!((1..=60).contains(&wait), "Retry-After: {wait}");
        assert!(resp.headers().get("set-cookie").is_none());
        let body: Value = resp.json().await?;
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("too many wrong tokens"), "{error}");
    }
    // The API's bearer token is not affected by the sign-in limit.
    assert_eq!(c.nodes().await?.len(), 2);
    Ok(())
}
