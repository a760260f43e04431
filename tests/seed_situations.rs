//! The seed's five test situations, on real processes over HTTP, plus the
//! fault cases (a paused worker, a task that kills its worker,
//! poison tasks).

use std::time::Duration;

use flotilla_e2e::situations::{self, Runtime};
use flotilla_e2e::*;
use serde_json::{json, Value};

/// Seed test 1: capacities 3, 4, 5 and 11 long tasks end as 3, 4, 4.
#[tokio::test(flavor = "multi_thread")]
async fn round_robin_fills_capacities_3_4_5_as_3_4_4() {
    situations::round_robin_3_4_4(Runtime::Process, "rr").await;
}

/// Seed test 5: tasks sent to node 0 are stolen by idle nodes 1..4.
#[tokio::test(flavor = "multi_thread")]
async fn idle_nodes_steal_work_sent_to_node_0() {
    situations::idle_workers_steal_from_node_0(Runtime::Process, "steal", 5, 7).await;
}

/// Seed test 3 (example 1): kill node 0 mid-queue; nothing is lost, node 0
/// comes back with the same ID and capacity, as a new process.
#[tokio::test(flavor = "multi_thread")]
async fn killing_node_0_mid_queue_loses_no_task() {
    let c = Runtime::Process.start("stop", &[5, 5, 5]).await;
    let old_pid = c.nodes().await.unwrap()[0]["pid"].as_u64().unwrap();
    let (_c, nodes) = situations::stop_node_0(c).await;
    // The old process is really gone, and node 0 is a new one.
    let gone =
        |pid: u64| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err();
    assert!(gone(old_pid), "the stopped worker's process is gone");
    assert_ne!(nodes[0]["pid"].as_u64().unwrap(), old_pid);
}

/// Seed test 3 (example 2): a task that calls exit() on node 1 ends its
/// interpreter; it is retried on another node, where it survives.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_exits_its_interpreter_is_retried_elsewhere() {
    situations::a_task_that_exits_on_node_1_survives_elsewhere(Runtime::Process, "exit").await;
}

/// Seed test 4: nodes added with /add immediately receive work; `/add`
/// without a body adds the seed's default capacity, 10.
#[tokio::test(flavor = "multi_thread")]
async fn added_nodes_receive_work() {
    let (c, _) = situations::added_workers_receive_work(Runtime::Process, "add", 5).await;
    let (status, body) = c.post_raw("/add", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.nodes().await.unwrap()[4]["capacity"], 10);
}

/// A worker that stops answering (SIGSTOP, a hang) is declared dead by
/// the heartbeat timeout; its in-flight task runs elsewhere; when it wakes
/// process is killed before the new incarnation starts, and the task has
/// exactly one result (a late one would be refused by incarnation, as the
/// scheduler's unit tests and the Docker partition test show).
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_worker_is_declared_dead_by_heartbeat_and_its_task_runs_elsewhere() {
    let c = Cluster::start(&native_manifest(&[2, 2], 0.5, 3.0, 3))
        .await
        .unwrap();
    let nodes = c.nodes().await.unwrap();
    let pid = nix::unistd::Pid::from_raw(nodes[0]["pid"].as_u64().unwrap() as i32);
    let id = c
        .send_to_path(
            "/send/0",
            "import time\ntime.sleep(0.5)\nresponse = self.node_id",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 2, "{t}");
    let nodes = c
        .wait_until(Duration::from_secs(10), |n| n[0]["restarts"] == 1)
        .await
        .unwrap();
    assert_eq!(nodes[0]["incarnation"], 2);
    // The hung process is not left behind: the restart killed it.
    assert!(
        nix::sys::signal::kill(pid, None).is_err(),
        "the paused worker was killed on restart"
    );
    let again = c.get(&format!("/tasks/{id}")).await.unwrap().1;
    assert_eq!(again["attempts"], 2);
    assert_eq!(
        again["result"], t["result"],
        "the late result did not overwrite the recorded one"
    );
    let executed: u64 = c
        .nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| n["executed"].as_u64().unwrap())
        .sum();
    assert_eq!(executed, 1);
}

/// A task that kills its interpreter everywhere is poison: it fails after
/// max_attempts with a clear error, and the cluster keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_task_fails_after_max_attempts_and_the_cluster_goes_on() {
    let c = Cluster::start(&native_manifest(&[2, 2, 2], 1.0, 5.0, 3))
        .await
        .unwrap();
    let poison = c.send_python("import os\nos._exit(3)").await.unwrap();
    let killer = c
        .send_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        .await
        .unwrap();
    for id in [poison, killer] {
        let t = c.wait_task(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "failed", "{t}");
        assert_eq!(t["attempts"], 3, "{t}");
        let err = t["error"].as_str().unwrap();
        assert!(err.contains("3 attempts"), "{err}");
    }
    let t = c
        .wait_task(
            c.send_python("response = 42").await.unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(t["result"]["response"], 42);
    // The worker-killing task took three workers down; all came back.
    let nodes = c
        .wait_until(Duration::from_secs(20), |n| {
            n.iter().all(|n| n["state"] == "active")
        })
        .await
        .unwrap();
    let restarts: u64 = nodes.iter().map(|n| n["restarts"].as_u64().unwrap()).sum();
    assert_eq!(restarts, 3, "{nodes:?}");
}

/// Results, prints, tracebacks and shell exit codes.
#[tokio::test(flavor = "multi_thread")]
async fn python_and_shell_results_as_in_the_seed() {
    let c = Cluster::start(&seed_manifest(&[2, 2])).await.unwrap();
    let cases = [
        (
            json!({"type": "python", "command": "print('hi')\nresponse = [1, 'a', None]"}),
            json!([1, "a", null]),
            "hi\n",
        ),
        (
            json!({"type": "python", "command": "x = 1"}),
            json!("No result returned."),
            "",
        ),
        (
            json!({"type": "python", "command": "response = {1, 2}"}),
            json!("{1, 2}"),
            "",
        ),
        (
            json!({"type": "shell", "command": "echo out; echo err >&2"}),
            json!("out\n"),
            "out\n",
        ),
    ];
    for (body, response, stdout) in cases {
        let (status, sent) = c.post("/tasks", body.clone()).await.unwrap();
        assert_eq!(status, 200, "{sent}");
        let id = sent["task_ids"][0].as_u64().unwrap();
        let t = c.wait_task(id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{body}: {t}");
        assert_eq!(t["result"]["response"], response, "{body}");
        assert_eq!(t["result"]["stdout"], stdout, "{body}");
    }
    let id = c
        .send_python("def f():\n    return 1 / 0\nf()")
        .await
        .unwrap();
    let t = c.wait_task(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(t["state"], "failed");
    assert_eq!(
        t["attempts"], 1,
        "an exception is a result, not a crash: no retry"
    );
    assert!(t["error"].as_str().unwrap().contains("ZeroDivisionError"));
    let tb = t["result"]["response"].as_str().unwrap();
    assert!(
        tb.contains("Traceback") && tb.contains("line 2, in f"),
        "{tb}"
    );
    let (_, sent) = c
        .post(
            "/tasks",
            json!({"type": "shell", "command": "echo partial; exit 3"}),
        )
        .await
        .unwrap();
    let t = c
        .wait_task(
            sent["task_ids"][0].as_u64().unwrap(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(t["state"], "failed");
    assert_eq!(t["result"]["exit_code"], 3);
    assert_eq!(t["result"]["stdout"], "partial\n");
    // A batch keeps its order and each gets its own result.
    let tasks: Vec<Value> = (0..20)
        .map(|i| json!({"type": "python", "command": format!("response = {i}")}))
        .collect();
    let (status, sent) = c.post("/tasks", json!({ "tasks": tasks })).await.unwrap();
    assert_eq!(status, 200);
    for (i, id) in sent["task_ids"].as_array().unwrap().iter().enumerate() {
        let t = c
            .wait_task(id.as_u64().unwrap(), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(t["result"]["response"], i as u64);
    }
}

/// The warm interpreter keeps nothing between tasks: each gets a fresh namespace.
#[tokio::test(flavor = "multi_thread")]
async fn each_python_task_gets_a_fresh_namespace_in_a_warm_interpreter() {
    let c = Cluster::start(&seed_manifest(&[4])).await.unwrap();
    let a = c
        .send_python("import os\nleak = 1\nresponse = os.getpid()")
        .await
        .unwrap();
    let b = c
        .send_python("import os\nresponse = [os.getpid(), 'leak' in globals()]")
        .await
        .unwrap();
    let a = c.wait_task(a, Duration::from_secs(20)).await.unwrap();
    let b = c.wait_task(b, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        b["result"]["response"][0], a["result"]["response"],
        "same warm interpreter"
    );
    assert_eq!(b["result"]["response"][1], false, "fresh namespace");
}
