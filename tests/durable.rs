//! The master's durable state, end to end: a SIGKILLed master started again
//! on the same state directory loses no accepted task and no resource
//! value, hands out no task ID twice; a second master on the directory and
//! bad state directories are refused with errors that name the way out.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_e2e::{
    flotilla_fails, free_port, fresh_state_dir, read_banner_url, temp_file, Cluster,
};
use serde_json::{json, Value};

fn manifest(name: &str, capacities: &[usize]) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  heartbeat: {{ intervalSeconds: 1, timeoutSeconds: 10 }}\n  workers:\n{workers}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n"
    )
}

/// Which master answered (the response header every answer carries).
async fn master_incarnation(c: &Cluster) -> u64 {
    let resp = c
        .http
        .get(format!("{}/health", c.url))
        .send()
        .await
        .unwrap();
    resp.headers()["flotilla-master-incarnation"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// (worker ID, incarnation, PID) of each worker.
async fn worker_identities(c: &Cluster) -> Vec<(u64, u64, u64)> {
    c.nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["incarnation"].as_u64().unwrap(),
                n["pid"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Whether a process is running (not gone, not a zombie).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

const ADD_ONE: &str = "import time\ntotal = request_write_resource('total')\ntotal.value += 1\nrelease_write_resource('total')\ntime.sleep(0.15)\nresponse = total.value";

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_master_started_again_loses_no_task_and_no_value() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let text = manifest("durable-kill", &[2, 2, 2]);
    let args = [
        "--state-dir",
        dir_arg.as_str(),
        "--port",
        port.as_str(),
        "--slots",
        "2",
    ];
    let mut first = Cluster::start_with(&text, &args, &[]).await.unwrap();
    assert_eq!(master_incarnation(&first).await, 1);
    let tasks: Vec<Value> = (0..120)
        .map(|_| json!({"type": "python", "command": ADD_ONE}))
        .collect();
    let (status, body) = first
        .post("/tasks", json!({ "tasks": tasks }))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u64> = body["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 120);

    let before = first.feed(40, Duration::from_secs(60)).await.unwrap();
    assert!(before.len() >= 40, "only {} finished", before.len());
    let workers_before = worker_identities(&first).await;
    first.kill_master(); // SIGKILL, the master only
                         // Its workers run on, without a master.
    for (id, _, pid) in &workers_before {
        assert!(alive(*pid), "worker {id} (pid {pid}) died with its master");
    }

    let second = Cluster::start_with(&text, &args, &[]).await.unwrap();
    assert_eq!(
        master_incarnation(&second).await,
        2,
        "another master answers"
    );
    let after = second.feed(120, Duration::from_secs(120)).await.unwrap();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for t in &after {
        *seen.entry(t["id"].as_u64().unwrap()).or_default() += 1;
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    for id in &ids {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "task {id} must be in the completion feed exactly once"
        );
    }
    assert_eq!(after.len(), 120, "nothing else in the feed");
    // A result from before the kill is still there, the same.
    let early = &before[0];
    let (status, got) = second
        .get(&format!("/tasks/{}", early["id"]))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(got["result"], early["result"]);

    // Exactly once: the workers were adopted, so the attempts that were
    // running at the kill finished once, and every increment (one write
    // grant each) counted once.
    let (_, res) = second.get("/resources/total").await.unwrap();
    assert_eq!(res["value"], 120, "{res}");
    assert_eq!(res["version"], 120, "{res}");
    // No worker was restarted: the same processes, same incarnations.
    assert_eq!(worker_identities(&second).await, workers_before);
    for n in second.nodes().await.unwrap() {
        assert_eq!(n["restarts"], 0, "{n}");
    }

    // IDs go on from where they were: none is handed out again.
    let new_id = second.send_python("response = 1").await.unwrap();
    assert!(new_id > *ids.iter().max().unwrap(), "{new_id}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_master_on_the_state_directory_is_refused_naming_the_first() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap();
    let text = manifest("durable-lock", &[1]);
    let first = Cluster::start_with(&text, &["--state-dir", dir_arg], &[])
        .await
        .unwrap();
    let path = temp_file("durable-lock.yaml", &text);
    let err = flotilla_fails(
        &[
            "up",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--state-dir",
            dir_arg,
        ],
        &[],
    );
    assert!(err.contains("in use by another master"), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    assert!(err.contains(dir_arg), "{err}");
    // The first one is untouched.
    assert_eq!(
        first.run_python("response = 6 * 7").await["result"]["response"],
        42
    );
    let nodes = first.nodes().await.unwrap();
    assert_eq!(nodes[0]["restarts"], 0);
    assert_eq!(nodes[0]["incarnation"], 1);
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

fn up_fails(manifest_path: &Path, state_dir: &Path) -> String {
    flotilla_fails(
        &[
            "up",
            manifest_path.to_str().unwrap(),
            "--port",
            "0",
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_state_directories_are_refused_with_the_way_out_and_kept() {
    // A store of cluster `durable-bad`, with a finished task in it.
    let dir = fresh_state_dir();
    let text = manifest("durable-bad", &[1]);
    let c = Cluster::start_with(&text, &["--state-dir", dir.to_str().unwrap()], &[])
        .await
        .unwrap();
    assert_eq!(c.run_python("response = 1").await["result"]["response"], 1);
    drop(c); // SIGINT: a clean stop
    let db = dir.join("state.sqlite");
    let size = std::fs::metadata(&db).unwrap().len();

    // Another cluster's manifest on it.
    let other = temp_file("durable-other.yaml", &manifest("durable-other", &[1]));
    let err = up_fails(&other, &dir);
    assert!(
        err.contains("belongs to cluster `durable-bad`, not `durable-other`"),
        "{err}"
    );
    assert!(err.contains(dir.to_str().unwrap()), "{err}");

    // Written by a newer version (python3's sqlite3 stands for it).
    let set_version = |v: i64| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA user_version={v}'); c.commit(); c.close()"
                ),
                db.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    set_version(99);
    let path = temp_file("durable-bad.yaml", &text);
    let err = up_fails(&path, &dir);
    assert!(err.contains("newer Flotilla"), "{err}");
    assert!(err.contains("store format 99"), "{err}");
    set_version(1);

    // Damaged: cut short.
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.set_len(50).unwrap();
    drop(f);
    let err = up_fails(&path, &dir);
    assert!(
        err.contains("damaged") && err.contains("truncated"),
        "{err}"
    );
    assert!(err.contains("nothing was deleted"), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 50, "kept as it was");
    assert!(size > 50);

    // Not a directory at all.
    let file = temp_file("durable-not-a-dir", "hello");
    let err = up_fails(&path, &file);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "hello");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn task_ids_never_repeat_even_when_nothing_is_kept() {
    let text = manifest("durable-ephemeral", &[1]);
    let first = Cluster::start_with(&text, &["--ephemeral"], &[])
        .await
        .unwrap();
    let a = first.send_python("response = 1").await.unwrap();
    drop(first);
    let second = Cluster::start_with(&text, &["--ephemeral"], &[])
        .await
        .unwrap();
    let b = second.send_python("response = 1").await.unwrap();
    assert!(
        b > a,
        "the restarted ephemeral master handed out {b} after {a}"
    );
    assert!(
        b < (1u64 << 53),
        "IDs stay exact in JSON clients (2^53): {b}"
    );
}

/// Every ID present in the master, by paging through `GET /tasks`.
async fn all_task_ids(c: &Cluster) -> std::collections::HashSet<u64> {
    let mut ids = std::collections::HashSet::new();
    let mut after = 0u64;
    loop {
        let (status, page) = c
            .get(&format!("/tasks?after={after}&limit=1000"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{page}");
        for t in page["tasks"].as_array().unwrap() {
            ids.insert(t["id"].as_u64().unwrap());
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => return ids,
        }
    }
}

/// Torn writes: the master is SIGKILLed in the middle of heavy submission
/// (batches of 50 every 50 ms: 1,000 tasks/s), ten times in a row on the same
/// state directory. It always starts again, no acknowledged task is
/// missing, and no ID is handed out twice.
#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_during_heavy_submission_ten_times_nothing_acknowledged_is_lost() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let text = manifest("durable-torn", &[4, 4]);
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..10 {
        let mut c = Cluster::start_with(&text, &["--state-dir", dir_arg.as_str()], &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: the master does not start again: {e}"));
        let present = all_task_ids(&c).await;
        let missing: Vec<_> = acked.iter().filter(|id| !present.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged tasks missing: {missing:?}"
        );
        // Submit until the kill, a varying time into the round.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        let kill_after = Duration::from_millis(300 + nanos % 900);
        let url = c.url.clone();
        let submitter = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let batch: Vec<Value> = (0..50)
                .map(|_| json!({"type": "python", "command": "response = 1"}))
                .collect();
            let mut got = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let sent = http
                    .post(format!("{url}/tasks"))
                    .json(&json!({ "tasks": batch }))
                    .send()
                    .await;
                let Ok(resp) = sent else { return got };
                if resp.status() != 200 {
                    return got;
                }
                let Ok(body) = resp.json::<Value>().await else {
                    return got;
                };
                got.extend(
                    body["task_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap()),
                );
            }
        });
        tokio::time::sleep(kill_after).await;
        c.kill_master();
        let got = submitter.await.unwrap();
        assert!(!got.is_empty(), "round {round}: nothing was acknowledged");
        let max_before = acked.iter().copied().max().unwrap_or(0);
        assert!(
            got.iter().all(|&id| id > max_before),
            "round {round}: an ID was handed out again"
        );
        acked.extend(got);
    }
    let c = Cluster::start_with(&text, &["--state-dir", dir_arg.as_str()], &[])
        .await
        .unwrap();
    let present = all_task_ids(&c).await;
    assert!(acked.iter().all(|id| present.contains(id)));
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `flotilla up --ephemeral` with its stderr in a file; returns the child,
/// its URL and the log path.
fn up_ephemeral(name: &str, extra: &[&str]) -> (std::process::Child, String, std::path::PathBuf) {
    let path = temp_file(&format!("{name}.yaml"), &manifest(name, &[1]));
    let log = temp_file(&format!("{name}.log"), "");
    let mut child = std::process::Command::new(flotilla_e2e::bin("flotilla"))
        .args(["up", path.to_str().unwrap(), "--port", "0", "--ephemeral"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("FLOTILLA_RUNTIME_DIR", flotilla_e2e::fresh_runtime_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = read_banner_url(&mut child);
    (child, url, log)
}

fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_without_a_store_drains_the_accepted_tasks_then_exits() {
    let http = reqwest::Client::new();
    let (mut child, url, log) = up_ephemeral("durable-drain", &[]);
    let tasks: Vec<Value> = (0..4)
        .map(|_| json!({"type": "python", "command": "import time\ntime.sleep(0.3)\nresponse = 1"}))
        .collect();
    let resp = http
        .post(format!("{url}/tasks"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sigterm(&child);
    // Refused while draining, with a reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http
            .post(format!("{url}/send"))
            .json(&json!({"type": "python", "command": "response = 1"}))
            .send()
            .await
            .unwrap();
        if resp.status() == 503 {
            let body: Value = resp.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("shutting down"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never refused");
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("drained: every accepted task finished"),
        "{text}"
    );

    // A drain that runs out of time says what it dropped.
    let (mut child, url, log) = up_ephemeral("durable-drop", &["--drain-seconds", "0.5"]);
    let resp = http
        .post(format!("{url}/tasks"))
        .json(&json!({"tasks": [
            {"type": "python", "command": "import time\ntime.sleep(20)"},
            {"type": "python", "command": "import time\ntime.sleep(20)"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("dropping 2 unfinished tasks"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn results_past_their_ttl_answer_410_and_the_feed_keeps_its_positions() {
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let text = manifest("durable-ttl", &[1]).replace("spec:\n", "spec:\n  resultTtlSeconds: 1\n");
    let args = ["--state-dir", dir_arg.as_str()];
    let c = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let first = c.run_python("response = 1").await;
    let id = first["id"].as_u64().unwrap();
    assert_eq!(c.get(&format!("/tasks/{id}")).await.unwrap().0, 200);
    // Gone once the TTL has passed (the expiry runs every quarter of it).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = c.get(&format!("/tasks/{id}?wait=0")).await.unwrap();
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 410, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    // An ID never handed out is still a 404.
    assert_eq!(c.get("/tasks/999999").await.unwrap().0, 404);
    // The feed keeps its positions: the expired entry is skipped, not renumbered.
    let (_, feed) = c.get("/tasks/finished?after=0").await.unwrap();
    assert_eq!(feed["next"], 1, "{feed}");
    assert_eq!(feed["tasks"].as_array().unwrap().len(), 0, "{feed}");
    drop(c);

    // After a restart: still expired, and the feed goes on at position 1.
    let c = Cluster::start_with(&text, &args, &[]).await.unwrap();
    assert_eq!(c.get(&format!("/tasks/{id}")).await.unwrap().0, 410);
    let second = c.run_python("response = 2").await;
    assert!(second["id"].as_u64().unwrap() > id);
    let (_, feed) = c.get("/tasks/finished?after=0&wait=10").await.unwrap();
    // Position 1 (not renumbered to 0); the entry itself may have expired
    // already (its TTL is 1 s), the position stays.
    assert_eq!(feed["next"], 2, "{feed}");
    for t in feed["tasks"].as_array().unwrap() {
        assert_eq!(t["id"], second["id"], "{feed}");
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}
