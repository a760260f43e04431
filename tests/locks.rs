//! Shared resources and read/write locks: exact under
//! contention, fair, and exact under faults (a holder killed mid-update, a
//! zombie's stale write-back refused by fencing).

use std::time::{Duration, Instant};

use flotilla_e2e::*;
use serde_json::{json, Value};

fn manifest_with(capacities: &[usize], interval: f64, timeout: f64, resources: &str) -> String {
    format!(
        "{}  resources:\n{resources}",
        native_manifest(capacities, interval, timeout, 3)
    )
}

async fn resource(c: &Cluster, name: &str) -> Value {
    let (status, body) = c.get(&format!("/resources/{name}")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_resource(
    c: &Cluster,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = resource(c, name).await;
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "condition on {name} not met: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// W4: 1,000 increments from 4 workers end at exactly 1,000. In the same
/// test, two readers hold one resource at once, and a writer queued behind
/// them gets in before a reader that came after it.
#[tokio::test(flavor = "multi_thread")]
async fn w4_increments_are_exact_readers_share_and_writers_are_not_starved() {
    let c = Cluster::start(&manifest_with(
        &[64, 64, 64, 64],
        1.0,
        5.0,
        "    - { name: total, type: Integer, initialValue: 0 }\n    - { name: gate, type: String, initialValue: start }\n",
    ))
    .await
    .unwrap();

    // Readers share.
    let reader = "import time\ng = request_read_resource('gate')\ntime.sleep(1.5)\nresponse = g.value\nrelease_read_resource('gate')";
    let r1 = c.send_to_path("/send/0", reader).await.unwrap();
    let r2 = c.send_to_path("/send/1", reader).await.unwrap();
    let both = wait_resource(&c, "gate", Duration::from_secs(10), |r| {
        r["holders"].as_array().unwrap().len() == 2
    })
    .await;
    assert!(
        both["holders"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["mode"] == "read"),
        "{both}"
    );
    // A writer queues behind them, then a later reader queues behind the writer.
    let w = c
        .send_to_path(
            "/send/2",
            "with write_resource('gate') as g:\n    g.value = 'written'\nresponse = 'wrote'",
        )
        .await
        .unwrap();
    wait_resource(&c, "gate", Duration::from_secs(5), |r| {
        r["waiting"].as_array().unwrap().len() == 1
    })
    .await;
    let r3 = c
        .send_to_path(
            "/send/3",
            "with read_resource('gate') as g:\n    response = g.value",
        )
        .await
        .unwrap();
    let queued = wait_resource(&c, "gate", Duration::from_secs(5), |r| {
        r["waiting"].as_array().unwrap().len() == 2
    })
    .await;
    let modes: Vec<_> = queued["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["mode"].clone())
        .collect();
    assert_eq!(modes, vec![json!("write"), json!("read")], "{queued}");
    for id in [r1, r2] {
        assert_eq!(
            c.wait_task(id, Duration::from_secs(20)).await.unwrap()["result"]["response"],
            "start"
        );
    }
    assert_eq!(
        c.wait_task(w, Duration::from_secs(20)).await.unwrap()["state"],
        "succeeded"
    );
    let late = c.wait_task(r3, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        late["result"]["response"], "written",
        "the writer got in before the later reader"
    );

    // 1,000 increments, the seed's API.
    let inc = "total = request_write_resource('total')\ntry:\n\ttotal.value += 1\nfinally:\n\trelease_write_resource('total')\nresponse = self.node_id";
    let tasks: Vec<Value> = (0..1000)
        .map(|_| json!({"type": "python", "command": inc}))
        .collect();
    let (status, sent) = c.post("/tasks", json!({ "tasks": tasks })).await.unwrap();
    assert_eq!(status, 200, "{sent}");
    let mut nodes = std::collections::HashSet::new();
    for id in sent["task_ids"].as_array().unwrap() {
        let t = c
            .wait_task(id.as_u64().unwrap(), Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        nodes.insert(t["node"].as_u64().unwrap());
    }
    assert_eq!(nodes.len(), 4, "all four workers contended");
    let total = resource(&c, "total").await;
    assert_eq!(total["value"], 1000);
    assert_eq!(total["version"], 1000, "one write grant per increment");
    assert!(total["holders"].as_array().unwrap().is_empty());
}

/// A worker SIGKILLed while its task holds the write lock mid-update: no
/// partial write lands, the lock is freed at once (the runtime sees the
/// death before the heartbeat timeout would), the task is retried
/// elsewhere, and the counter ends at exactly the number of tasks.
#[tokio::test(flavor = "multi_thread")]
async fn killing_a_write_lock_holder_mid_update_loses_and_doubles_nothing() {
    let c = Cluster::start(&manifest_with(
        &[4, 4, 4],
        0.5,
        3.0,
        "    - { name: counter, type: Integer, initialValue: 0 }\n",
    ))
    .await
    .unwrap();
    let update = "import time\nc = request_write_resource('counter')\nc.value += 1\ntime.sleep(0.4)\nrelease_write_resource('counter')\nresponse = c.value";
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(c.send_python(update).await.unwrap());
    }
    let held = wait_resource(&c, "counter", Duration::from_secs(10), |r| {
        r["holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["mode"] == "write")
    })
    .await;
    let victim = held["holders"][0]["worker"].as_u64().unwrap() as usize;
    let pid = c.nodes().await.unwrap()[victim]["pid"].as_u64().unwrap();
    let committed_before = held["value"].as_u64().unwrap();
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The lock leaves the dead holder quickly, with nothing of its update.
    let after = wait_resource(&c, "counter", Duration::from_secs(3), |r| {
        r["holders"].as_array().unwrap().iter().all(|h| {
            h["worker"].as_u64() != Some(victim as u64)
                || h["incarnation"] != held["holders"][0]["incarnation"]
        })
    })
    .await;
    let freed_in = killed_at.elapsed();
    assert!(
        freed_in < Duration::from_secs(3),
        "freed within the heartbeat timeout: {freed_in:?}"
    );
    assert!(
        after["value"].as_u64().unwrap() <= committed_before + 1,
        "{after}"
    );
    let mut retried = 0;
    for id in &ids {
        let t = c.wait_task(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        if t["attempts"] == 2 {
            retried += 1;
        }
    }
    assert!(retried >= 1, "the killed holder's task ran again");
    let counter = resource(&c, "counter").await;
    assert_eq!(
        counter["value"], 6,
        "no lost and no double update: {counter}"
    );
    let responses: std::collections::BTreeSet<u64> = {
        let mut s = std::collections::BTreeSet::new();
        for id in &ids {
            s.insert(
                c.get(&format!("/tasks/{id}")).await.unwrap().1["result"]["response"]
                    .as_u64()
                    .unwrap(),
            );
        }
        s
    };
    assert_eq!(
        responses,
        (1..=6).collect(),
        "each task saw its own increment"
    );
    eprintln!("write lock freed {freed_in:?} after SIGKILL");
}

/// A paused worker's task leaves a zombie: someone still holding the task's
/// lease and write token after the worker is gone. (A process the task
/// starts cannot be it: those end with the worker, and the lease never
/// leaves the worker. The test plays the zombie, with the token the task
/// wrote down and the lease derived as the master derives it, from the
/// cluster's secret in its state store.) The worker is
/// paused (SIGSTOP) until the heartbeat timeout declares it dead: its grant
/// is revoked and the task retried elsewhere. When the zombie then writes
/// back with its old token, fencing refuses it and the value stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_s_stale_write_back_is_refused_by_fencing() {
    let state_dir = fresh_state_dir();
    let c = Cluster::start_with(
        &manifest_with(
            &[2, 2],
            0.25,
            1.5,
            "    - { name: fenced, type: Integer, initialValue: 0 }\n",
        ),
        &["--state-dir", state_dir.to_str().unwrap()],
        &[],
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("flotilla-zombie-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let script = format!(
        r#"token_of() {{ python3 -c 'import sys, json; print(json.load(sys.stdin)["token"])'; }}
value_of() {{ python3 -c 'import sys, json; print(json.load(sys.stdin)["value"])'; }}
grant=$(flotilla-worker lock acquire write fenced) || exit 1
token=$(echo "$grant" | token_of)
if [ "$FLOTILLA_ATTEMPT" = 1 ]; then
  echo "$token" > {d}/ready
  sleep 60
fi
value=$(echo "$grant" | value_of)
flotilla-worker lock release write fenced --value $((value + 1)) --token $token"#
    );
    let (status, sent) = c
        .post("/send/0", json!({"type": "shell", "command": script}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{sent}");
    let id = sent["task_id"].as_u64().unwrap();
    let ready = dir.join("ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the task never took the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = std::fs::read_to_string(&ready).unwrap();
    let zombie_token: u64 = written.trim().parse().unwrap();
    let zombie_lease = lease_of(&state_dir, id, 1, 0, 1);
    let pid = c.nodes().await.unwrap()[0]["pid"].as_u64().unwrap() as i32;
    let paused_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
    let recovered_in = paused_at.elapsed();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 2);
    let r = resource(&c, "fenced").await;
    assert_eq!(r["value"], 1, "only the retry's write landed: {r}");
    assert!(r["version"].as_u64().unwrap() > zombie_token);
    // Now the zombie writes back with its revoked token.
    let (status, out) = c
        .post(
            "/internal/lock",
            json!({"lease": zombie_lease, "action": "release", "name": "fenced",
                   "mode": "write", "value": 1000, "token": zombie_token}),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "the write-back was refused: {out}");
    let out = out["error"].as_str().unwrap();
    assert!(
        out.contains("stale write-back") && out.contains(&format!("fencing token {zombie_token}")),
        "{out}"
    );
    let r = resource(&c, "fenced").await;
    assert_eq!(r["value"], 1, "the value stays the last committed one: {r}");
    eprintln!("paused holder's task recovered in {recovered_in:?} (heartbeat timeout 1.5 s)");
}

/// The lease of an attempt (task, attempt, worker, incarnation), as the
/// master derives it: HMAC-SHA256 under "flotilla lease key/" and the
/// cluster's worker secret of "task/attempt/worker/incarnation/epoch" (the
/// epoch: the incarnation of the master that started the attempt, as the
/// store records it), its first 16 bytes in hex.
fn lease_of(state_dir: &std::path::Path, task: u64, attempt: u32, worker: u32, inc: u64) -> String {
    let db = rusqlite::Connection::open_with_flags(
        state_dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let secret: String = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'worker_secret'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let epoch: Option<i64> = db
        .query_row(
            "SELECT epoch FROM attempts WHERE task = ?1 AND attempt = ?2",
            [task as i64, attempt as i64],
            |r| r.get(0),
        )
        .unwrap();
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("flotilla lease key/{secret}").as_bytes(),
    );
    let material = match epoch.unwrap_or(0) {
        0 => format!("{task}/{attempt}/{worker}/{inc}"),
        e => format!("{task}/{attempt}/{worker}/{inc}/{e}"),
    };
    let tag = ring::hmac::sign(&key, material.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bad input around resources: clear errors, nothing corrupted, no hangs.
#[tokio::test(flavor = "multi_thread")]
async fn resource_errors_are_named_and_never_hang() {
    let c = Cluster::start(&manifest_with(
        &[4, 4],
        1.0,
        5.0,
        "    - { name: total, type: Integer, initialValue: 5 }\n",
    ))
    .await
    .unwrap();
    let cases = [
        (
            json!({"name": "x", "type": "Integer", "values": {"initial_value": "five"}}),
            "cannot hold the string",
        ),
        (
            json!({"name": "x", "type": "Integr", "values": {"initial_value": 1}}),
            "unknown resource type `Integr`",
        ),
        (
            json!({"name": "total", "type": "Integer", "values": {"initial_value": 1}}),
            "already exists",
        ),
        (
            json!({"type": "Integer", "values": {"initial_value": 1}}),
            "name",
        ),
        (
            json!({"name": "f", "type": "File", "values": {"path": "/nonexistent/data.txt"}}),
            "not accepted through the API",
        ),
        (
            json!({"name": "l", "type": "List", "values": {"initial_value": {"a": 1}}}),
            "List",
        ),
    ];
    for (body, needle) in cases {
        let (status, resp) = c.post("/resource", body.clone()).await.unwrap();
        assert_eq!(status, 400, "{body}: {resp}");
        assert!(
            resp["error"].as_str().unwrap().contains(needle),
            "{body}: {resp}"
        );
    }
    // Good creations, every type.
    let file = temp_file("content.txt", "line one\n");
    for (name, kind, value) in [
        ("s", "String", json!("hi")),
        ("fl", "Float", json!(1.5)),
        ("b", "Boolean", json!(true)),
        ("l", "List", json!([1, 2])),
        ("d", "Dictionary", json!({"k": "v"})),
        ("t", "Tuple", json!([1, "a"])),
    ] {
        let (status, resp) = c
            .post(
                "/resource",
                json!({"name": name, "type": kind, "values": {"initial_value": value}}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{resp}");
        assert_eq!(
            resp["message"],
            format!("Resource {name} created successfully")
        );
    }
    // A File through the API takes its content, never a path on the master.
    let (status, resp) = c.post("/resource", json!({"name": "f", "type": "File", "values": {"path": file.display().to_string(), "mode": "r"}})).await.unwrap();
    assert_eq!(status, 400, "{resp}");
    let (status, resp) = c
        .post(
            "/resource",
            json!({"name": "f", "type": "File", "values": {"initial_value": "line one\n"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resource(&c, "f").await["value"], "line one\n");
    assert_eq!(c.get("/resources/nope").await.unwrap().0, 404);
    assert_eq!(
        c.get("/resources")
            .await
            .unwrap()
            .1
            .as_array()
            .unwrap()
            .len(),
        8
    );

    // Unknown resource: a clear error in the task, not a hang.
    let t = c.run_python("request_read_resource('nope')").await;
    assert_eq!(t["state"], "failed");
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("`nope` does not exist"),
        "{t}"
    );
    // Wrong type on write: refused, stored value unchanged.
    let t = c.run_python("t = request_write_resource('total')\nt.value = 'many'\nrelease_write_resource('total')").await;
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("Integer resource cannot hold the string"),
        "{t}"
    );
    assert_eq!(resource(&c, "total").await["value"], 5);
    // The context manager publishes nothing on an exception and releases.
    let t = c
        .run_python(
            "with write_resource('total') as t:\n    t.value = 99\n    raise ValueError('abort')",
        )
        .await;
    assert!(t["error"].as_str().unwrap().contains("abort"));
    let r = resource(&c, "total").await;
    assert_eq!(
        (r["value"].as_u64(), r["holders"].as_array().unwrap().len()),
        (Some(5), 0)
    );
    // Types come back as the seed's objects.
    let t = c.run_python("l = request_read_resource('l'); d = request_read_resource('d'); tu = request_read_resource('t'); f = request_read_resource('f')\nresponse = [sum(l), d['k'], list(tu), f.read(), isinstance(tu, tuple)]").await;
    assert_eq!(
        t["result"]["response"],
        json!([3, "v", [1, "a"], "line one\n", true]),
        "{t}"
    );
    let t = c.run_python("with write_resource('f') as f:\n    f.write('line two\\n')\nwith write_resource('t') as tu:\n    tu.value = (2, 'b')\nwith write_resource('l') as l:\n    l.append(3)\nresponse = 'ok'").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(resource(&c, "f").await["value"], "line one\nline two\n");
    assert_eq!(resource(&c, "t").await["value"], json!([2, "b"]));
    assert_eq!(resource(&c, "l").await["value"], json!([1, 2, 3]));
    // Releasing what you do not hold, or asking twice.
    let t = c.run_python("release_read_resource('total')").await;
    assert!(
        t["error"].as_str().unwrap().contains("holds no read lock"),
        "{t}"
    );
    let t = c
        .run_python("request_read_resource('total')\nrequest_write_resource('total')")
        .await;
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("already holds a read lock"),
        "{t}"
    );
    // A wait that times out says so.
    let holder = c
        .send_python("import time\nwith write_resource('s'):\n    time.sleep(2)")
        .await
        .unwrap();
    wait_resource(&c, "s", Duration::from_secs(10), |r| {
        !r["holders"].as_array().unwrap().is_empty()
    })
    .await;
    let t = c
        .run_python("request_read_resource('s', timeout=0.2)")
        .await;
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 0.2s waiting for the read lock on `s`"),
        "{t}"
    );
    assert_eq!(
        c.wait_task(holder, Duration::from_secs(20)).await.unwrap()["state"],
        "succeeded"
    );
    // A made-up lease is refused.
    let (status, resp) = c
        .post(
            "/internal/lock",
            json!({"lease": "forged", "action": "acquire", "name": "total", "mode": "write"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{resp}");
    assert!(resp["error"]
        .as_str()
        .unwrap()
        .contains("lease is not live"));
    assert_eq!(resource(&c, "total").await["value"], 5, "nothing corrupted");
}
