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
