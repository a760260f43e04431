//! One task can never wedge a slot, a worker or the master: oversized
//! output and results, results JSON cannot carry, processes a task leaves
//! behind. Real master, real workers, HTTP as a user would.

use std::time::{Duration, Instant};

use flotilla_e2e::Cluster;
use serde_json::{json, Value};

fn one_worker() -> String {
    flotilla_e2e::native_manifest(&[1], 0.5, 3.0, 3)
}

/// The master's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// How long the task took from submission to its end, by its own times.
fn took(task: &Value) -> Duration {
    let ms = task["finished_at"].as_u64().unwrap() - task["submitted_at"].as_u64().unwrap();
    Duration::from_millis(ms)
}

async fn run(c: &Cluster, kind: &str, command: &str) -> Value {
    let (status, body) = c
        .post("/tasks", json!({"type": kind, "command": command}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["task_ids"][0].as_u64().unwrap();
    c.wait_task(id, Duration::from_secs(30)).await.unwrap()
}

#[tokio::test]
async fn oversized_output_results_and_tracebacks_end_the_task_and_free_the_slot() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    // Shell output of 600 KB is sent twice (response and stdout): it fits now.
    let t = run(&c, "shell", "head -c 600000 /dev/zero | tr '\\0' x").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["response"].as_str().unwrap().len(), 600_000);
    assert!(took(&t) < Duration::from_secs(2), "{t}");

    let t = run(&c, "shell", "head -c 3000000 /dev/zero | tr '\\0' x").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let out = t["result"]["stdout"].as_str().unwrap();
    assert!(out.starts_with(&"x".repeat(1 << 20)));
    assert!(
        out.ends_with("[flotilla: output truncated at 1048576 bytes; 1951424 more bytes dropped]"),
        "{}",
        &out[1 << 20..]
    );

    let t = run(&c, "python", "print('x' * 1_100_000)").await;
    assert_eq!(t["state"], "succeeded", "{}", t["error"]);
    let out = t["result"]["stdout"].as_str().unwrap();
    assert!(out.ends_with(
        "[flotilla: output truncated at 1048576 characters; 51425 more characters dropped]"
    ));
    assert!(took(&t) < Duration::from_secs(2), "{}", t["error"]);

    let t = run(&c, "python", "response = 'y' * 50_000_000").await;
    assert_eq!(t["state"], "failed");
    assert_eq!(
        t["error"],
        "the task's result is 50000002 bytes of JSON, over the limit of 8388608 bytes"
    );
    assert!(took(&t) < Duration::from_secs(2), "{}", t["error"]);

    let t = run(&c, "python", "raise ValueError('m' * 2_000_000)").await;
    assert_eq!(t["state"], "failed");
    let tb = t["result"]["response"].as_str().unwrap();
    assert!(
        tb.len() < (1 << 20) + 200,
        "traceback cut to the output limit: {}",
        tb.len()
    );
    assert!(tb.contains("more characters dropped (limit 1048576)]"));
    assert!(t["error"].as_str().unwrap().len() < 5000);
    assert!(took(&t) < Duration::from_secs(2));

    // The same (only) slot runs a normal task; nothing was restarted.
    let t = run(&c, "python", "response = 6 * 7").await;
    assert_eq!(t["result"]["response"], 42);
    assert_eq!(t["attempts"], 1);
    let nodes = c.nodes().await.unwrap();
    assert_eq!(nodes[0]["restarts"], 0);
    // The master held at most one bounded report at a time: well under the
    // 50 MB result and the 2 MB messages it was spared.
    let rss = rss_kib(c.pid());
    assert!(rss < 100 * 1024, "master RSS {rss} KiB");
}

#[tokio::test]
async fn results_json_cannot_carry_succeed_on_the_first_attempt() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    let cases = [
        ("response = float('nan')", json!("NaN")),
        ("response = {'x': float('inf')}", json!({"x": "Infinity"})),
        ("response = 2**64 + 1", json!("18446744073709551617")),
        ("response = -float('inf')", json!("-Infinity")),
    ];
    for (code, form) in cases {
        let t = c.run_python(code).await;
        assert_eq!(t["state"], "succeeded", "{code}: {t}");
        assert_eq!(t["attempts"], 1, "{code}");
        assert_eq!(t["result"]["response"], form, "{code}");
    }
    let t = c.run_python("print('\\udcff')").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 1);
    assert_eq!(t["result"]["stdout"], "\\udcff\n");
    assert_eq!(c.nodes().await.unwrap()[0]["restarts"], 0);
}

/// Processes running `sleep MARK`.
fn sleepers(mark: &str) -> usize {
    let want = format!("sleep\0{mark}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes())
        })
        .count()
}

/// Waits (polling /proc, test side) until `n` sleepers with `mark` exist.
async fn until_sleepers(mark: &str, pred: impl Fn(usize) -> bool, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = sleepers(mark);
        if pred(n) || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 150 plain children and 50 that escape into their own session (the
/// `sh` that started them exits, so they are orphans).
fn spawner(mark: &str, then: &str) -> String {
    format!(
        "import subprocess\n\
         for i in range(150):\n    subprocess.Popen(['sleep', '{mark}'])\n\
         for i in range(50):\n    subprocess.Popen(['setsid', 'sh', '-c', 'sleep {mark} &']).wait()\n\
         {then}\n"
    )
}

#[tokio::test]
async fn processes_a_task_starts_end_with_it_and_with_its_worker() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    // The task ends normally: everything it started goes.
    let t = c.run_python(&spawner("3001", "response = 'spawned'")).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let left = until_sleepers("3001", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the task ended");

    // The task fails: the same.
    let t = c
        .run_python(&spawner("3002", "raise RuntimeError('boom')"))
        .await;
    assert_eq!(t["state"], "failed", "{t}");
    let left = until_sleepers("3002", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the task failed");

    // A shell task: background jobs and setsid escapees.
    let t = run(
        &c,
        "shell",
        "for i in $(seq 100); do sleep 3003 & done; for i in $(seq 100); do setsid sh -c 'sleep 3003 &'; done; echo done",
    )
    .await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let left = until_sleepers("3003", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the shell task");

    // The worker is stopped while the task runs: its processes go too.
    let id = c
        .send_python(&spawner("3004", "import time\ntime.sleep(600)"))
        .await
        .unwrap();
    let n = until_sleepers("3004", |n| n == 200, Duration::from_secs(30)).await;
    assert_eq!(n, 200, "the task started its sleepers");
    let (status, body) = c.post("/stop/0", json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let left = until_sleepers("3004", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after /stop");
    // The task runs again on the restarted worker (at-least-once) and
    // starts its sleepers again; the master's shutdown ends them.
    let n = until_sleepers("3004", |n| n == 200, Duration::from_secs(30)).await;
    assert_eq!(n, 200, "task {id} ran again");
    drop(c);
    let left = until_sleepers("3004", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the master's shutdown");
}

fn manifest(extra_spec: &str, capacities: &[usize]) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: contain\nspec:\n  heartbeat: {{ intervalSeconds: 0.5, timeoutSeconds: 3 }}\n{extra_spec}  workers:\n{workers}"
    )
}

async fn submit(c: &Cluster, body: Value) -> u64 {
    let (status, out) = c.post("/tasks", body).await.unwrap();
    assert_eq!(status, 200, "{out}");
    out["task_ids"][0].as_u64().unwrap()
}

async fn state_of(c: &Cluster, id: u64) -> Value {
    c.get(&format!("/tasks/{id}")).await.unwrap().1
}

/// Waits (test side) until the task is in `state`.
async fn until_state(c: &Cluster, id: u64, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = state_of(c, id).await;
        if t["state"] == state || Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delete(c: &Cluster, path: &str) -> (u16, Value) {
    let resp = c
        .http
        .delete(format!("{}{path}", c.url))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn cancel_frees_the_slot_and_spares_the_other_slot() {
    let c = Cluster::start_with(&manifest("", &[2]), &["--slots", "2"], &[])
        .await
        .unwrap();
    let spin = submit(&c, json!({"type": "python", "command": "while True: pass"})).await;
    let other = submit(
        &c,
        json!({"type": "python", "command": "import time\ntime.sleep(1.5)\nresponse = 'other slot'"}),
    )
    .await;
    assert_eq!(until_state(&c, spin, "running").await["state"], "running");
    assert_eq!(until_state(&c, other, "running").await["state"], "running");
    // A third waits in the queue: cancel it there.
    let queued = c.send_python("response = 'never'").await.unwrap();
    let (status, body) = delete(&c, &format!("/tasks/{queued}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["was"] == "queued" || body["was"] == "assigned",
        "{body}"
    );
    assert_eq!(state_of(&c, queued).await["state"], "cancelled");

    let (status, body) = delete(&c, &format!("/tasks/{spin}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["was"], "running");
    let t = state_of(&c, spin).await;
    assert_eq!(t["state"], "cancelled");
    assert_eq!(t["error"], "cancelled while running");
    // The freed slot runs the next task while the other is still busy.
    let next = c.run_python("response = 'next'").await;
    assert_eq!(next["result"]["response"], "next");
    assert_eq!(
        state_of(&c, other).await["state"],
        "running",
        "the other slot is untouched"
    );
    let o = c.wait_task(other, Duration::from_secs(30)).await.unwrap();
    assert_eq!(o["result"]["response"], "other slot");
    assert_eq!(o["attempts"], 1);
    let nodes = c.nodes().await.unwrap();
    assert_eq!(nodes[0]["restarts"], 0);
    assert_eq!(nodes[0]["incarnation"], 1);

    // Finished: 409 saying so; unknown: 404; not a number: 404.
    let (status, body) = delete(&c, &format!("/tasks/{other}")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("already finished (succeeded)"));
    assert_eq!(delete(&c, "/tasks/99999").await.0, 404);
    assert_eq!(delete(&c, "/tasks/+1").await.0, 404);

    // Several at once: everything queued, or a list of IDs.
    let blocker = submit(
        &c,
        json!({"type": "python", "command": "import time\ntime.sleep(60)"}),
    )
    .await;
    let blocker2 = submit(
        &c,
        json!({"type": "python", "command": "import time\ntime.sleep(60)"}),
    )
    .await;
    until_state(&c, blocker, "running").await;
    until_state(&c, blocker2, "running").await;
    let mut waiting = Vec::new();
    for i in 0..5 {
        waiting.push(c.send_python(&format!("response = {i}")).await.unwrap());
    }
    let (status, body) = delete(&c, "/tasks?state=queued").await;
    assert_eq!(status, 200, "{body}");
    let (status, body2) = delete(&c, "/tasks?state=assigned").await;
    assert_eq!(status, 200, "{body2}");
    let mut gone: Vec<u64> = body["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .chain(body2["cancelled"].as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .collect();
    gone.sort();
    assert_eq!(gone, waiting);
    let (status, body) = delete(&c, &format!("/tasks?ids={blocker},{blocker2},{other}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancelled"], json!([blocker, blocker2]));
    assert_eq!(body["not_cancelled"][0]["id"], other);
    assert_eq!(delete(&c, "/tasks?state=succeeded").await.0, 400);
    assert_eq!(delete(&c, "/tasks").await.0, 400);
    let again = c.run_python("response = 'after bulk cancel'").await;
    assert_eq!(again["state"], "succeeded");
}

#[tokio::test]
async fn cancel_and_timeout_end_the_task_s_processes() {
    let c = Cluster::start(&one_worker()).await.unwrap();
    let id = c
        .send_python(&spawner("3005", "import time\ntime.sleep(600)"))
        .await
        .unwrap();
    let n = until_sleepers("3005", |n| n == 200, Duration::from_secs(30)).await;
    assert_eq!(n, 200);
    let (status, body) = delete(&c, &format!("/tasks/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let left = until_sleepers("3005", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after cancel");

    let id = submit(
        &c,
        json!({"type": "shell", "timeout": 3,
               "command": "for i in $(seq 100); do sleep 3006 & done; for i in $(seq 100); do setsid sh -c 'sleep 3006 &'; done; sleep 600"}),
    )
    .await;
    let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "failed");
    assert_eq!(t["error"], "timed out after 3 s");
    let left = until_sleepers("3006", |n| n == 0, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sleepers left after the timeout");
    assert_eq!(c.nodes().await.unwrap()[0]["restarts"], 0);
}

#[tokio::test]
async fn timeouts_end_spinning_tasks_and_lock_deadlocks() {
    let spec = "  taskTimeoutSeconds: 3\n  resources:\n    - { name: r1, type: Integer, initialValue: 0 }\n    - { name: r2, type: Integer, initialValue: 0 }\n";
    let c = Cluster::start(&manifest(spec, &[2, 2])).await.unwrap();
    let spin = submit(
        &c,
        json!({"type": "python", "command": "while True: pass", "timeout": 1}),
    )
    .await;
    let t = c.wait_task(spin, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "failed");
    assert_eq!(t["error"], "timed out after 1 s");
    assert_eq!(t["attempts"], 1, "not retried");
    let ran = t["finished_at"].as_u64().unwrap() - t["started_at"].as_u64().unwrap();
    assert!(ran < 2000, "ended {ran} ms after it started");

    // r1 -> r2 against r2 -> r1, no timeout= on the locks: the cluster's
    // default task timeout ends them.
    let pair = |a: &str, b: &str| {
        format!(
            "import time\nx = request_write_resource('{a}')\ntime.sleep(0.5)\ny = request_write_resource('{b}')\nrelease_write_resource('{b}')\nrelease_write_resource('{a}')\nresponse = 'got both'"
        )
    };
    let first = c.send_to_path("/send/0", &pair("r1", "r2")).await.unwrap();
    let second = c.send_to_path("/send/1", &pair("r2", "r1")).await.unwrap();
    let a = c.wait_task(first, Duration::from_secs(30)).await.unwrap();
    let b = c.wait_task(second, Duration::from_secs(30)).await.unwrap();
    let timed_out = [&a, &b]
        .iter()
        .filter(|t| t["error"] == "timed out after 3 s")
        .count();
    assert!(timed_out >= 1, "{a} {b}");
    for t in [&a, &b] {
        assert!(
            t["state"] == "failed" || t["result"]["response"] == "got both",
            "{t}"
        );
    }
    // The locks are free again and the cluster goes on.
    let t = c
        .run_python("with write_resource('r1') as x:\n    with write_resource('r2') as y:\n        response = 'free'")
        .await;
    assert_eq!(t["result"]["response"], "free", "{t}");
    // Bad timeouts are refused.
    for bad in [json!(0), json!(-1), json!(1e20), json!("5")] {
        let (status, body) = c
            .post(
                "/tasks",
                json!({"type": "python", "command": "x = 1", "timeout": bad}),
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("timeout"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn limits_and_malformed_parameters_get_clear_json_errors() {
    let c = Cluster::start(&manifest("  maxWorkers: 2\n", &[1]))
        .await
        .unwrap();
    let (status, body) = c.post("/add", json!({"max_capacity": 1})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = c.post("/add", json!({"max_capacity": 1})).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("spec.maxWorkers"),
        "{body}"
    );
    assert_eq!(c.nodes().await.unwrap().len(), 2);

    let done = c.run_python("response = 1").await;
    let id = done["id"].as_u64().unwrap();
    // A huge wait is clamped (the task is final: answered at once).
    let (status, body) = c.get(&format!("/tasks/{id}?wait=1e20")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    for bad in ["nan", "-1", "inf", "soon"] {
        let (status, body) = c.get(&format!("/tasks/{id}?wait={bad}")).await.unwrap();
        assert_eq!(status, 400, "wait={bad}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with("wait must be"));
    }
    // A lock timeout of 1e20 is clamped, not a crash.
    let t = c
        .run_python("with write_resource('big', timeout=1e20) as x:\n    pass")
        .await;
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("`big` does not exist"),
        "{t}"
    );
    // 405 and 414 have JSON bodies.
    let resp = c.http.put(format!("{}/send", c.url)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("method PUT is not allowed on /send"),
        "{body}"
    );
    let long = "x".repeat(20_000);
    let (status, body) = c.get(&format!("/tasks/1?{long}")).await.unwrap();
    assert_eq!(status, 414);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 8192"),
        "{body}"
    );
    // Resource names: a documented alphabet, at most 253 characters.
    let (status, body) = c
        .post(
            "/resource",
            json!({"name": "n".repeat(100_000), "type": "Integer", "values": {"initial_value": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("at most 253"),
        "{body}"
    );
    let (status, body) = c
        .post(
            "/resource",
            json!({"name": "a b", "type": "Integer", "values": {"initial_value": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, _) = c
        .post(
            "/resource",
            json!({"name": "ok-name_1.x", "type": "Integer", "values": {"initial_value": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Node IDs are plain decimal.
    for node in ["+1", "01x", " 1", "1e0"] {
        let (status, body) = c
            .post(
                &format!("/send/{node}"),
                json!({"type": "python", "command": "x = 1"}),
            )
            .await
            .unwrap();
        assert_eq!(status, 404, "/send/{node}: {body}");
    }
    // Status reads of an unfinished task do not pile up in the master.
    let slow = c.send_python("import time\ntime.sleep(30)").await.unwrap();
    let before = rss_kib(c.pid());
    for _ in 0..20_000 {
        let (status, _) = c.get(&format!("/tasks/{slow}")).await.unwrap();
        assert_eq!(status, 200);
    }
    let after = rss_kib(c.pid());
    assert!(
        after < before + 8 * 1024,
        "master grew from {before} to {after} KiB"
    );
}
