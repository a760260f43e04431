//! Bounded memory, end to end: finished tasks leave the master's memory
//! after the retention window (`spec.memoryRetention`) and stay readable
//! from the store (a task, the listing, the completion feed) until their
//! TTL, across a restart too; with `--ephemeral` they are gone and a read
//! answers 410 saying so, never 404 for an ID that was handed out.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flotilla_e2e::{fresh_state_dir, Cluster};
use serde_json::{json, Value};

fn manifest(name: &str, keep: usize, seconds: f64) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  heartbeat: {{ intervalSeconds: 1, timeoutSeconds: 10 }}\n  memoryRetention: {{ finishedTasks: {keep}, seconds: {seconds} }}\n  workers:\n    - capacity: 4\n    - capacity: 4\n"
    )
}

/// Submits `n` tasks `response = i` in one batch; their IDs in order.
async fn submit(c: &Cluster, n: usize) -> Vec<u64> {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"type": "python", "command": format!("response = {i}")}))
        .collect();
    let (status, body) = c.post("/tasks", json!({ "tasks": tasks })).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// Reads the whole completion feed from `from`, following `next`, until
/// `want` entries came (or `timeout`).
async fn feed_from(c: &Cluster, from: u64, want: usize, timeout: Duration) -> (Vec<Value>, u64) {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    let mut next = from;
    while all.len() < want && Instant::now() < deadline {
        let (status, body) = c
            .get(&format!("/tasks/finished?after={next}&wait=2"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        all.extend(body["tasks"].as_array().unwrap().iter().cloned());
        next = body["next"].as_u64().unwrap();
    }
    (all, next)
}

/// Every task in the listing, paging with `after`/`next`.
async fn listing(c: &Cluster, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) = c
            .get(&format!("/tasks?after={after}&limit=7{query}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{page}");
        out.extend(page["tasks"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(n) => after = n,
            None => return out,
        }
    }
}

/// Waits until the master holds at most `most` tasks in memory (`/health`).
async fn memory_down_to(c: &Cluster, most: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = c.health().await.unwrap();
        if health["tasks"].as_u64().unwrap() <= most {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "finished tasks did not leave memory: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a client reads of 40 finished tasks that left memory: the
/// task, the feed and the listing, the same as when they had just finished.
async fn check_reads(c: &Cluster, ids: &[u64], done: &[Value]) {
    // One task, from the store: the same as the feed showed.
    let (status, first) = c.get(&format!("/tasks/{}?wait=1", ids[0])).await.unwrap();
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["state"], "succeeded");
    assert_eq!(first["result"]["response"], 0);
    let shown = done.iter().find(|t| t["id"] == ids[0]).unwrap();
    assert_eq!(&first, shown);
    // The completion feed from its start: every entry, in the same
    // order, at the same positions.
    let (again, next) = feed_from(c, 0, 40, Duration::from_secs(10)).await;
    assert_eq!(again, done);
    assert_eq!(next, 40);
    let (tail, _) = feed_from(c, 30, 10, Duration::from_secs(10)).await;
    assert_eq!(&tail[..], &done[30..]);
    // The listing, in pages, all of them, and filtered.
    let all: Vec<u64> = listing(c, "")
        .await
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(all, ids);
    assert_eq!(listing(c, "&state=succeeded").await.len(), 40);
    assert!(listing(c, "&state=queued").await.is_empty());
    let on_1 = listing(c, "&node=1").await;
    assert!(on_1.iter().all(|t| t["node"] == 1));
    let on_0 = listing(c, "&node=0").await;
    assert_eq!(on_0.len() + on_1.len(), 40);
    // A finished task that left memory cannot be cancelled (409,
    // not 404: it exists).
    let (status, body) = c
        .client
        .request(
            flotilla_client::Method::DELETE,
            &format!("/tasks/{}", ids[3]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("already finished"));
    // An ID never handed out is still unknown.
    assert_eq!(c.get("/tasks/999999").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_tasks_leave_memory_and_are_read_back_from_the_store_across_a_restart() {
    let dir = fresh_state_dir();
    let args = ["--state-dir", dir.to_str().unwrap()];
    let text = manifest("memory-durable", 5, 1.0);
    let c = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let ids = submit(&c, 40).await;
    let (done, next) = feed_from(&c, 0, 40, Duration::from_secs(60)).await;
    assert_eq!(done.len(), 40);
    assert_eq!(next, 40);
    // Past the retention (5 tasks, 1 s) the finished ones leave memory.
    memory_down_to(&c, 0).await;

    check_reads(&c, &ids, &done).await;
    drop(c);

    // A restart reads none of them back into memory and shows them all.
    let c = Cluster::start_with(&text, &args, &[]).await.unwrap();
    assert_eq!(c.health().await.unwrap()["tasks"], 0);
    check_reads(&c, &ids, &done).await;
    // The feed goes on at the next position, mixing store and memory.
    let more = submit(&c, 3).await;
    let (tail, next) = feed_from(&c, 38, 5, Duration::from_secs(30)).await;
    let tail_ids: Vec<u64> = tail.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let last_two: Vec<u64> = done[38..]
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(&tail_ids[..2], &last_two[..]);
    assert_eq!(
        tail_ids[2..].iter().copied().collect::<HashSet<_>>(),
        more.iter().copied().collect::<HashSet<_>>()
    );
    assert_eq!(next, 43);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_store_finished_tasks_leave_memory_and_reads_say_they_are_gone() {
    let text = manifest("memory-ephemeral", 3, 60.0);
    let c = Cluster::start_with(&text, &["--ephemeral"], &[])
        .await
        .unwrap();
    let ids = submit(&c, 12).await;
    // By count: only the last 3 to finish stay. Unfinished tasks never
    // leave memory, so 3 final ones left in memory means all 12 finished.
    memory_down_to(&c, 3).await;
    let listed = listing(&c, "").await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed.iter().all(|t| t["state"] == "succeeded"),
        "{listed:?}"
    );
    let kept: Vec<u64> = listed.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    for id in &ids {
        let (status, body) = c.get(&format!("/tasks/{id}")).await.unwrap();
        if kept.contains(id) {
            assert_eq!(status, 200, "{body}");
        } else {
            assert_eq!(status, 410, "task {id}: {body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains("no longer kept"), "{error}");
            assert!(error.contains("--ephemeral"), "{error}");
            assert!(error.contains("spec.memoryRetention"), "{error}");
        }
    }
    assert_eq!(c.get("/tasks/1").await.unwrap().0, 404, "never handed out");
    // The feed skips what left memory: from its start, the entries kept.
    let (status, page) = c.get("/tasks/finished?after=0").await.unwrap();
    assert_eq!(status, 200);
    let shown: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        shown.iter().copied().collect::<HashSet<_>>(),
        kept.iter().copied().collect::<HashSet<_>>()
    );
    assert_eq!(page["next"], 12);
}

/// A state directory this master may not read (its permissions) is refused
/// with an error naming it and the way out, and nothing in it is touched.
/// Run as root (as CI's containers are), the master under test runs as the
/// unprivileged user `nobody`, for whom the mode is enforced.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_state_directory_is_refused_naming_it_and_the_way_out() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = fresh_state_dir();
    let text = manifest("memory-unreadable", 1, 60.0);
    let c = Cluster::start_with(&text, &["--state-dir", dir.to_str().unwrap()], &[])
        .await
        .unwrap();
    assert_eq!(c.run_python("response = 1").await["result"]["response"], 1);
    drop(c);
    let listing = |d: &std::path::Path| -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&dir);
    assert!(
        before.iter().any(|(f, _)| f == "state.sqlite"),
        "{before:?}"
    );

    let path = flotilla_e2e::temp_file("memory-unreadable.yaml", &text);
    let runtime_dir = flotilla_e2e::fresh_runtime_dir();
    std::fs::create_dir_all(&runtime_dir).unwrap();
    std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The parents must let `nobody` reach the directory itself.
    for d in [dir.parent().unwrap(), path.parent().unwrap()] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = std::process::Command::new(flotilla_e2e::bin("flotilla"));
    cmd.args(["up", path.to_str().unwrap(), "--port", "0", "--state-dir"])
        .arg(&dir)
        .env("FLOTILLA_RUNTIME_DIR", &runtime_dir);
    // `/proc/self` belongs to this process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    if root {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {err}");
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    assert!(err.contains("cannot be used"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("--state-dir")
            && err.contains("--ephemeral")
            && err.contains("nothing was deleted"),
        "{err}"
    );
    assert_eq!(listing(&dir), before, "nothing in it was touched");
    let _ = std::fs::remove_dir_all(&dir);
}
