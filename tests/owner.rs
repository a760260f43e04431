//! One owner per cluster, on processes: a second master of the same
//! cluster name (with a state directory of its own) refuses to start while
//! the first lives, naming it, and leaves its workers alone; once the first
//! is gone (even SIGKILLed) the claim is free. `flotilla down` refuses while
//! the owner lives.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_e2e::*;
use serde_json::Value;

fn manifest(name: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{ name: {name} }}\nspec:\n  heartbeat: {{ intervalSeconds: 1, timeoutSeconds: 10 }}\n  workers:\n    - capacity: 2\n    - capacity: 2\n"
    )
}

/// Runs `flotilla ARGS` with `FLOTILLA_RUNTIME_DIR=runtime_dir`, expecting
/// it to end within 30 s; returns (success, stdout, stderr).
fn flotilla(args: &[&str], runtime_dir: &std::path::Path) -> (bool, String, String) {
    let mut child = Command::new(bin("flotilla"))
        .args(args)
        .env("FLOTILLA_RUNTIME_DIR", runtime_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "flotilla {args:?} still running after 30 s; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (id, pid, incarnation, restarts) of each worker.
fn workers(nodes: &[Value]) -> Vec<(u64, u64, u64, u64)> {
    nodes
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["pid"].as_u64().unwrap_or(0),
                n["incarnation"].as_u64().unwrap(),
                n["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_master_of_the_cluster_refuses_naming_the_first_and_leaves_its_workers_alone() {
    let runtime_dir = fresh_runtime_dir();
    let rt = runtime_dir.to_str().unwrap();
    let text = manifest("owned");
    let first_dir = fresh_state_dir();
    let mut first = Cluster::start_with(
        &text,
        &["--state-dir", first_dir.to_str().unwrap()],
        &[("FLOTILLA_RUNTIME_DIR", rt)],
    )
    .await
    .unwrap();
    let before = workers(&first.nodes().await.unwrap());
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|w| w.1 > 0), "{before:?}");

    // Another state directory, the same cluster name.
    let path = temp_file("owned.yaml", &text);
    let second_dir = fresh_state_dir();
    let (ok, _, err) = flotilla(
        &[
            "up",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--state-dir",
            second_dir.to_str().unwrap(),
        ],
        &runtime_dir,
    );
    assert!(!ok, "the second master started: {err}");
    let first_pid = first.pid();
    for expected in [
        "cluster `owned` is owned by a live master".to_string(),
        format!("pid {first_pid} on host"),
        format!("API at {}", first.url),
        "since ".to_string(),
        "owned.owner".to_string(),
    ] {
        assert!(err.contains(&expected), "`{expected}` in: {err}");
    }

    // Untouched: the same processes, never restarted, still serving.
    let after = workers(&first.nodes().await.unwrap());
    assert_eq!(after, before);
    for pid in after.iter().map(|w| w.1) {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker process {pid} is gone"
        );
    }
    for node in 0..2 {
        let id = first
            .send_to_path(&format!("/send/{node}"), "response = self.node_id")
            .await
            .unwrap();
        let t = first.wait_task(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["result"]["response"], node);
    }

    // `flotilla down` refuses as well, naming the owner.
    let (ok, _, err) = flotilla(
        &[
            "down",
            path.to_str().unwrap(),
            "--state-dir",
            second_dir.to_str().unwrap(),
        ],
        &runtime_dir,
    );
    assert!(!ok, "down went ahead: {err}");
    assert!(
        err.contains("refusing: cluster `owned` is owned by a live master")
            && err.contains(&format!("pid {first_pid} on host"))
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(workers(&first.nodes().await.unwrap()), before);

    // Once the owner is gone, SIGKILLed without a word, the claim is free
    // (the kernel dropped its lock): the next master of the name starts.
    first.kill_master();
    let next = Cluster::start_with(
        &text,
        &["--state-dir", second_dir.to_str().unwrap()],
        &[("FLOTILLA_RUNTIME_DIR", rt)],
    )
    .await
    .unwrap();
    let t = next.run_python("response = 1").await;
    assert_eq!(t["state"], "succeeded", "{t}");
}

/// Every process under `pid` (its interpreters lead groups of their own).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        all.extend(parents.get(&all[i]).cloned().unwrap_or_default());
        i += 1;
    }
    all.remove(0);
    all
}

/// Running: present and not a zombie.
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// `flotilla down` removes for good the worker processes a master left
/// running (SIGTERM leaves them for the next master), their interpreters
/// with them, and says which; then there is nothing left to remove.
#[tokio::test(flavor = "multi_thread")]
async fn flotilla_down_removes_the_worker_processes_a_master_left() {
    let runtime_dir = fresh_runtime_dir();
    let rt = runtime_dir.to_str().unwrap();
    let text = manifest("downed");
    let state = fresh_state_dir();
    let state_arg = state.to_str().unwrap();
    let mut master = Cluster::start_with(
        &text,
        &["--state-dir", state_arg],
        &[("FLOTILLA_RUNTIME_DIR", rt)],
    )
    .await
    .unwrap();
    let t = master.run_python("response = 1").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let pids: Vec<u32> = workers(&master.nodes().await.unwrap())
        .iter()
        .map(|w| w.1 as u32)
        .collect();
    let under: Vec<u32> = pids.iter().flat_map(|p| descendants(*p)).collect();
    assert!(!under.is_empty(), "each worker keeps a warm interpreter");
    // SIGTERM: the master goes, its workers stay for the next one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while runs(master.pid()) {
        assert!(
            Instant::now() < deadline,
            "the master did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    master.kill_master(); // reaps it
    assert!(pids.iter().all(|p| runs(*p)), "SIGTERM leaves the workers");

    let path = temp_file("downed.yaml", &text);
    let (ok, out, err) = flotilla(
        &["down", path.to_str().unwrap(), "--state-dir", state_arg],
        &runtime_dir,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("cluster `downed` (process): removed 2 workers"),
        "{out}"
    );
    for (id, pid) in pids.iter().enumerate() {
        assert!(
            out.contains(&format!("worker {id} (incarnation 1): process {pid}")),
            "{out}"
        );
    }
    for pid in pids.iter().chain(&under) {
        assert!(!runs(*pid), "process {pid} outlived flotilla down");
    }
    let (ok, out, err) = flotilla(
        &["down", path.to_str().unwrap(), "--state-dir", state_arg],
        &runtime_dir,
    );
    assert!(ok, "{err}");
    assert!(out.contains("no worker left to remove"), "{out}");
}
