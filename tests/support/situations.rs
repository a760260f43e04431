//! The seed's situations, one body each, run on any runtime:
//! `tests/seed_situations.rs` runs them on processes and `tests/docker.rs`
//! on containers, each adding what only its runtime shows (PIDs; container
//! names, labels and CPU quotas). A body starts its cluster through the
//! [`Runtime`] it is given, drives it over HTTP as a user would, checks the
//! situation's outcome, and hands the cluster back for those extra checks.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::docker::{docker_manifest, remove_cluster};
use crate::{native_manifest, Cluster};

/// A task that holds its slot for the whole situation.
pub const LONG: &str = "import time\ntime.sleep(30)\nresponse = 'done'";

/// Where the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Child processes of the master.
    Process,
    /// Containers; clusters are named by the situation (and removed first,
    /// in case an interrupted run left them).
    Docker,
}

impl Runtime {
    /// A cluster of `capacities` named `name` (the Docker runtime names its
    /// containers and network after it), with the seed's heartbeat settings
    /// scaled down.
    pub async fn start(self, name: &str, capacities: &[usize]) -> Cluster {
        let manifest = match self {
            Runtime::Process => native_manifest(capacities, 1.0, 5.0, 3),
            Runtime::Docker => {
                remove_cluster(name);
                docker_manifest(name, capacities, 1.0, 5.0)
            }
        };
        Cluster::start(&manifest).await.unwrap()
    }
}

/// Each worker's tasks: waiting in its queue plus running.
pub fn held(nodes: &[Value]) -> Vec<u64> {
    nodes
        .iter()
        .map(|n| n["queued"].as_u64().unwrap() + n["running"].as_u64().unwrap())
        .collect()
}

/// Seed test 1: capacities 3, 4, 5 and 11 long tasks end as 3, 4, 4; a
/// full cluster keeps the rest in the master queue.
pub async fn round_robin_3_4_4(rt: Runtime, name: &str) -> Cluster {
    let c = rt.start(name, &[3, 4, 5]).await;
    for _ in 0..11 {
        c.send_python(LONG).await.unwrap();
    }
    let nodes = c.nodes().await.unwrap();
    assert_eq!(held(&nodes), vec![3, 4, 4], "{nodes:?}");
    c.send_python(LONG).await.unwrap();
    c.send_python(LONG).await.unwrap();
    assert_eq!(held(&c.nodes().await.unwrap()), vec![3, 4, 5]);
    assert_eq!(c.health().await.unwrap()["master_queue"], 1);
    c
}

/// Seed test 5: `tasks` tasks of 1.5 s sent to node 0 of `workers` idle
/// workers are stolen until every worker has worked.
pub async fn idle_workers_steal_from_node_0(
    rt: Runtime,
    name: &str,
    workers: usize,
    tasks: usize,
) -> Cluster {
    let c = rt.start(name, &vec![5; workers]).await;
    let mut ids = Vec::new();
    for i in 0..tasks {
        let code = format!("import time\ntime.sleep(1.5)\nresponse = {i}");
        ids.push(c.send_to_path("/send/0", &code).await.unwrap());
    }
    let mut nodes_used = HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        let t = c.wait_task(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["result"]["response"], i as u64);
        nodes_used.insert(t["node"].as_u64().unwrap());
    }
    assert_eq!(
        nodes_used.len(),
        workers,
        "every worker worked: {nodes_used:?}"
    );
    let steals = c.health().await.unwrap()["steals"].as_u64().unwrap();
    assert!(steals as usize >= workers - 1, "{steals} steals");
    c
}

/// Seed test 3, example 1: `/stop/0` with node 0 holding a queue. Every
/// task still has exactly one result, and node 0 is back with the same ID
/// and capacity as incarnation 2. Returns the cluster and `/nodes` then.
pub async fn stopping_node_0_mid_queue_loses_nothing(
    rt: Runtime,
    name: &str,
) -> (Cluster, Vec<Value>) {
    stop_node_0(rt.start(name, &[5, 5, 5]).await).await
}

/// The body of [`stopping_node_0_mid_queue_loses_nothing`] on a cluster
/// already started (a caller that notes something about node 0 first).
pub async fn stop_node_0(c: Cluster) -> (Cluster, Vec<Value>) {
    let mut ids = Vec::new();
    for i in 0..10 {
        let code = format!("import time\ntime.sleep(0.8)\nresponse = {i}");
        ids.push(c.send_python(&code).await.unwrap());
    }
    let before = c.nodes().await.unwrap();
    assert!(held(&before)[0] >= 3, "node 0 holds a queue: {before:?}");
    let (status, body) = c.post("/stop/0", json!({})).await.unwrap();
    assert_eq!(
        (status, body["message"].as_str().unwrap()),
        (200, "Node 0 stopped successfully")
    );
    for (i, id) in ids.iter().enumerate() {
        let t = c.wait_task(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(
            t["result"]["response"], i as u64,
            "each task has its own result"
        );
    }
    let nodes = c
        .wait_until(Duration::from_secs(20), |n| {
            n[0]["state"] == "active" && n[0]["incarnation"] == 2
        })
        .await
        .unwrap();
    assert_eq!(nodes[0]["restarts"], 1);
    assert_eq!(nodes[0]["capacity"], 5);
    let executed: u64 = nodes.iter().map(|n| n["executed"].as_u64().unwrap()).sum();
    assert_eq!(executed, 10, "exactly one final result per task");
    (c, nodes)
}

/// Seed test 3, example 2: a task that calls `exit()` on node 1 ends its
/// interpreter; it is retried on another worker, where it survives; node 1
/// keeps working.
pub async fn a_task_that_exits_on_node_1_survives_elsewhere(rt: Runtime, name: &str) -> Cluster {
    let c = rt.start(name, &[5, 5, 5]).await;
    let code = "if self.node_id == 1:\n\tprint(\"Me voy a suicidar\")\n\texit()\nelse:\n\tprint(\"Sobreviví\")";
    let id = c.send_to_path("/send/1", code).await.unwrap();
    let t = c.wait_task(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 2);
    assert_ne!(t["node"], 1);
    assert_eq!(t["result"]["stdout"], "Sobreviví\n");
    assert_eq!(t["result"]["response"], "No result returned.");
    let id = c
        .send_to_path("/send/1", "response = self.node_id")
        .await
        .unwrap();
    let t = c.wait_task(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        (t["node"].as_u64(), t["result"]["response"].as_u64()),
        (Some(1), Some(1))
    );
    c
}

/// Seed test 4: two workers of capacity 1 are busy; two added with `/add`
/// (`capacity` each) get the next IDs, 2 and 3, and receive the next work.
/// Returns the cluster and how long each `/add` took until its worker was
/// active.
pub async fn added_workers_receive_work(
    rt: Runtime,
    name: &str,
    capacity: usize,
) -> (Cluster, Vec<Duration>) {
    let c = rt.start(name, &[1, 1]).await;
    c.send_python(LONG).await.unwrap();
    c.send_python(LONG).await.unwrap();
    let mut start_times = Vec::new();
    for expected in [2u64, 3] {
        let t0 = std::time::Instant::now();
        let (status, body) = c
            .post("/add", json!({"max_capacity": capacity}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["message"],
            format!("Node {expected} added successfully")
        );
        assert_eq!(body["node_id"], expected);
        c.wait_until(Duration::from_secs(30), |n| {
            n.len() as u64 > expected && n[expected as usize]["state"] == "active"
        })
        .await
        .unwrap();
        start_times.push(t0.elapsed());
    }
    let a = c.send_python("response = self.node_id").await.unwrap();
    let b = c.send_python("response = self.node_id").await.unwrap();
    let mut nodes = HashSet::new();
    for id in [a, b] {
        let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(t["result"]["response"], t["node"]);
        nodes.insert(t["node"].as_u64().unwrap());
    }
    assert_eq!(nodes, HashSet::from([2, 3]));
    assert_eq!(c.nodes().await.unwrap()[2]["capacity"], capacity);
    (c, start_times)
}
