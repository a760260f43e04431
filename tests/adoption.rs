//! Workers outlive their master. A master that is SIGKILLed or SIGTERMed
//! leaves its process workers running; the next master on the same state
//! directory and port adopts them (same IDs, incarnations and processes, no
//! restart), takes the reports and lock releases of what they ran meanwhile,
//! and every task ends once. A worker whose master never comes back stops
//! by itself after its grace period, leaving no process behind. Ctrl-C stops
//! the workers with the master.
//! (The 120-task SIGKILL test is in `durable.rs`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flotilla_e2e::{alive, free_port, fresh_state_dir, process_tree, Cluster};
use serde_json::{json, Value};

fn manifest(name: &str, capacities: &[usize], extra: &str) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n{extra}  workers:\n{workers}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n"
    )
}

/// (worker ID, incarnation, PID, restarts) of each worker.
async fn workers(c: &Cluster) -> Vec<(u64, u64, u32, u64)> {
    c.nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["incarnation"].as_u64().unwrap(),
                n["pid"].as_u64().unwrap() as u32,
                n["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The master dies while a task holds the write lock on `total` in the
/// middle of its update; the task goes on, and its release reaches the next
/// master, which publishes it once. The tasks queued behind the lock (their
/// acquire calls were waiting in the dead master) get it from the next one.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_lock_held_across_a_master_kill_publishes_once() {
    let dir = fresh_state_dir();
    let signals = dir.with_extension("signals");
    std::fs::create_dir_all(&signals).unwrap();
    let dir_arg = dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let text = manifest(
        "adopt-lock",
        &[2, 2, 2],
        "  heartbeat: { intervalSeconds: 1, timeoutSeconds: 10 }\n",
    );
    let args = [
        "--state-dir",
        dir_arg.as_str(),
        "--port",
        port.as_str(),
        "--slots",
        "2",
    ];
    let mut first = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let before = workers(&first).await;
    // Each task takes the lock, says so with a file, waits for `go`, adds 1.
    let code = format!(
        "import os, time\nd = {signals:?}\ntotal = request_write_resource('total')\nopen(os.path.join(d, 'holding-%d' % self.task_id), 'w').close()\nwhile not os.path.exists(os.path.join(d, 'go')):\n    time.sleep(0.02)\ntotal.value += 1\nrelease_write_resource('total')\nresponse = total.value",
        signals = signals.to_str().unwrap()
    );
    let tasks: Vec<Value> = (0..6)
        .map(|_| json!({"type": "python", "command": code}))
        .collect();
    let (status, body) = first
        .post("/tasks", json!({ "tasks": tasks }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // One task is inside its critical section, the others wait for the lock.
    wait_until("a task holds the lock", Duration::from_secs(30), || {
        std::fs::read_dir(&signals).unwrap().count() == 1
    })
    .await;
    let (_, res) = first.get("/resources/total").await.unwrap();
    assert_eq!(res["holders"].as_array().unwrap().len(), 1, "{res}");
    assert_eq!(res["version"], 1, "{res}");
    first.kill_master();
    for (id, _, pid, _) in &before {
        assert!(alive(*pid), "worker {id} died with its master");
    }

    let second = Cluster::start_with(&text, &args, &[]).await.unwrap();
    // The holder still holds it, under the next master, with its token.
    let (_, res) = second.get("/resources/total").await.unwrap();
    assert_eq!(res["value"], 0, "{res}");
    assert_eq!(res["version"], 1, "{res}");
    assert_eq!(res["holders"].as_array().unwrap().len(), 1, "{res}");
    std::fs::write(signals.join("go"), "").unwrap();

    let done = second.feed(6, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.len(), 6, "{done:?}");
    let mut responses: Vec<u64> = done
        .iter()
        .map(|t| {
            assert_eq!(t["state"], "succeeded", "{t}");
            assert_eq!(t["attempts"], 1, "each task ran once: {t}");
            t["result"]["response"].as_u64().unwrap()
        })
        .collect();
    responses.sort_unstable();
    assert_eq!(responses, vec![1, 2, 3, 4, 5, 6], "each saw the one before");
    let (_, res) = second.get("/resources/total").await.unwrap();
    assert_eq!(res["value"], 6, "{res}");
    assert_eq!(res["version"], 6, "one write grant per task: {res}");
    assert_eq!(workers(&second).await, before, "no worker was restarted");
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&signals);
}

/// A master SIGKILLed for good: its workers go on for the grace period
/// (`spec.masterGraceSeconds`, 2 s here), then stop by themselves with
/// everything their tasks started (a `setsid` escapee included).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_master_never_comes_back_stops_after_the_grace_period() {
    let text = manifest(
        "adopt-orphan",
        &[2, 2],
        "  heartbeat: { intervalSeconds: 0.5, timeoutSeconds: 5 }\n  masterGraceSeconds: 2\n",
    );
    let mut c = Cluster::start_with(&text, &["--slots", "2"], &[])
        .await
        .unwrap();
    let ids = [
        c.send_python("import time\ntime.sleep(120)").await.unwrap(),
        c.post(
            "/send",
            json!({"type": "shell", "command": "setsid sleep 300 & sleep 120"}),
        )
        .await
        .unwrap()
        .1["task_id"]
            .as_u64()
            .unwrap(),
    ];
    // Both running, the escapee started.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut running = 0;
        for id in ids {
            let (_, t) = c.get(&format!("/tasks/{id}")).await.unwrap();
            running += (t["state"] == "running") as usize;
        }
        let sleeps = workers(&c)
            .await
            .iter()
            .flat_map(|w| process_tree(w.2))
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep\x00300"))
            })
            .count();
        if running == 2 && sleeps == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "tasks not running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = workers(&c).await;
    let pids: Vec<u32> = before.iter().flat_map(|w| process_tree(w.2)).collect();
    // Workers, their interpreters (slots and standby), the shell and sleeps.
    assert!(pids.len() >= 6, "{pids:?}");
    c.kill_master();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (id, _, pid, _) in &before {
        assert!(alive(*pid), "worker {id} stopped before its grace period");
    }
    // Gone after the grace period (2 s) and the time to stop (a few s on a
    // loaded machine), every one of them.
    let deadline = killed + Duration::from_secs(20);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 20 s after the master died: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "stopped before the grace period"
    );
}

/// SIGTERM of a durable master: it exits at once, leaving the workers
/// running; the next master adopts them and their queued work goes on.
/// Ctrl-C then stops the master and its workers, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_leaves_the_workers_to_the_next_master_and_ctrl_c_stops_them() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let text = manifest(
        "adopt-term",
        &[2, 2],
        "  heartbeat: { intervalSeconds: 1, timeoutSeconds: 10 }\n",
    );
    let args = ["--state-dir", dir_arg.as_str(), "--port", port.as_str()];
    let mut first = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let before = workers(&first).await;
    let tasks: Vec<Value> = (0..8)
        .map(|i| json!({"type": "python", "command": format!("import time\ntime.sleep(0.3)\nresponse = {i}")}))
        .collect();
    let (status, body) = first
        .post("/tasks", json!({ "tasks": tasks }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let status = first.terminate_master(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}");
    for (id, _, pid, _) in &before {
        assert!(alive(*pid), "worker {id} stopped with a SIGTERMed master");
    }
    let second = Cluster::start_with(&text, &args, &[]).await.unwrap();
    assert_eq!(workers(&second).await, before, "adopted, not restarted");
    let done = second.feed(8, Duration::from_secs(60)).await.unwrap();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for t in &done {
        assert_eq!(t["state"], "succeeded", "{t}");
        *seen.entry(t["id"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 8, "{done:?}");
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    let trees: Vec<u32> = before.iter().flat_map(|w| process_tree(w.2)).collect();
    drop(second); // SIGINT, as Ctrl-C in a terminal
    let deadline = Instant::now() + Duration::from_secs(10);
    while trees.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "Ctrl-C left worker processes running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker added through `/add` is the cluster's as much as the manifest's
/// are: the next master adopts it (same ID, incarnation and process), runs
/// tasks on it, and a later `/add` gets a new ID, never one in use.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_added_through_add_is_adopted_and_its_id_never_handed_out_again() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let text = manifest(
        "adopt-added",
        &[1, 1],
        "  heartbeat: { intervalSeconds: 1, timeoutSeconds: 10 }\n",
    );
    let args = ["--state-dir", dir_arg.as_str(), "--port", port.as_str()];
    let mut first = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let (status, body) = first
        .post("/add", json!({"max_capacity": 3}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node_id"], 2, "{body}");
    first
        .wait_until(Duration::from_secs(30), |n| {
            n.len() == 3 && n.iter().all(|x| x["state"] == "active")
        })
        .await
        .unwrap();
    let before = workers(&first).await;
    assert_eq!(before.len(), 3, "{before:?}");
    first.kill_master();

    let second = Cluster::start_with(&text, &args, &[]).await.unwrap();
    second
        .wait_until(Duration::from_secs(30), |n| {
            n.len() == 3 && n.iter().all(|x| x["state"] == "active")
        })
        .await
        .unwrap();
    let after = workers(&second).await;
    assert_eq!(
        after, before,
        "same IDs, incarnations, processes, no restart"
    );
    let nodes = second.nodes().await.unwrap();
    assert_eq!(nodes[2]["capacity"], 3, "{nodes:?}");
    // The added worker runs tasks for the next master.
    let (status, body) = second
        .post(
            "/send/2",
            json!({"type": "python", "command": "response = 7"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["task_id"].as_u64().unwrap();
    let (_, task) = second.get(&format!("/tasks/{id}?wait=30")).await.unwrap();
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["node"], 2, "{task}");
    // And `/add` goes on after it.
    let (status, body) = second
        .post("/add", json!({"max_capacity": 1}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node_id"], 3, "{body}");
}
