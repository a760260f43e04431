//! The Docker runtime end to end: a real `flotilla up --runtime docker` (or
//! the compose file) starting real worker containers, driven over HTTP like
//! a user, with faults made by the `docker` CLI (kill, pause, network
//! disconnect). The seed situations, W5 (README, "Performance"), the CPU quota, the
//! cleanup of an earlier run's containers, and the bad states.
//!
//! They need Docker and the images (built once by docker/build-images.sh if
//! missing). In CI, or with FLOTILLA_REQUIRE_DOCKER set, no Docker is a
//! failure; elsewhere the tests skip with the reason printed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flotilla_e2e::docker::*;
use flotilla_e2e::situations::{self, held, Runtime};
use flotilla_e2e::*;
use serde_json::{json, Value};

/// Starts a Docker cluster after removing anything an earlier, interrupted
/// run of the same test left.
async fn start(cluster: &str, capacities: &[usize], interval: f64, timeout: f64) -> Cluster {
    remove_cluster(cluster);
    Cluster::start(&docker_manifest(cluster, capacities, interval, timeout))
        .await
        .unwrap()
}

fn node(nodes: &[Value], id: usize) -> &Value {
    &nodes[id]
}

/// Seed test 1 on containers (the body of `situations`): capacities 3, 4,
/// 5 and 11 long tasks end as 3, 4, 4. Each worker is a container named
/// `<cluster>-worker-<id>` with its identity in labels and environment, and
/// `docker inspect` shows a CPU quota of capacity x cpuPerCapacity and the
/// memory limit; the master removes its containers when it stops.
#[tokio::test(flavor = "multi_thread")]
async fn round_robin_on_containers_and_the_cpu_quota_follows_capacity() {
    let Some(_d) = DockerTest::begin("round_robin").await else {
        return;
    };
    let c = situations::round_robin_3_4_4(Runtime::Docker, "e2e-rr").await;
    for (id, capacity) in [3u64, 4, 5].into_iter().enumerate() {
        let name = format!("e2e-rr-worker-{id}");
        let ct = inspect(&name).unwrap_or_else(|| panic!("container {name} exists"));
        assert_eq!(ct["State"]["Running"], true, "{name}");
        assert_eq!(label(&ct, "dev.flotilla.cluster"), "e2e-rr");
        assert_eq!(label(&ct, "dev.flotilla.worker"), id.to_string());
        assert_eq!(label(&ct, "dev.flotilla.incarnation"), "1");
        assert!(has_env(&ct, &format!("FLOTILLA_WORKER_ID={id}")));
        assert_eq!(
            ct["HostConfig"]["NanoCpus"].as_u64(),
            Some(capacity * 250_000_000),
            "{name}: NanoCpus = capacity {capacity} x 0.25 CPU"
        );
        assert_eq!(ct["HostConfig"]["Memory"].as_u64(), Some(256 << 20));
        let networks = ct["NetworkSettings"]["Networks"].as_object().unwrap();
        assert!(networks.contains_key("e2e-rr"), "{networks:?}");
    }
    assert_eq!(c.health().await.unwrap()["runtime"], "docker");
    drop(c);
    assert!(
        cluster_containers("e2e-rr").is_empty(),
        "the master removed its containers when it stopped"
    );
}

/// Seed test 5 on containers: tasks sent to node 0 are stolen by idle nodes.
#[tokio::test(flavor = "multi_thread")]
async fn idle_containers_steal_work_sent_to_node_0() {
    let Some(_d) = DockerTest::begin("stealing").await else {
        return;
    };
    situations::idle_workers_steal_from_node_0(Runtime::Docker, "e2e-steal", 3, 5).await;
}

/// Seed test 3 (example 2) on containers: a task that calls exit() on node
/// 1 is retried in another container, where it survives.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_exits_on_node_1_survives_in_another_container() {
    let Some(_d) = DockerTest::begin("exit").await else {
        return;
    };
    situations::a_task_that_exits_on_node_1_survives_elsewhere(Runtime::Docker, "e2e-exit").await;
}

/// Seed test 4 on containers: `/add` starts a new container, which receives
/// work at once. Prints the worker container start time.
#[tokio::test(flavor = "multi_thread")]
async fn add_starts_a_container_that_receives_work() {
    let Some(_d) = DockerTest::begin("add").await else {
        return;
    };
    let (_c, start_times) =
        situations::added_workers_receive_work(Runtime::Docker, "e2e-add", 4).await;
    for id in [2, 3] {
        let ct = inspect(&format!("e2e-add-worker-{id}")).expect("the new container");
        assert_eq!(label(&ct, "dev.flotilla.worker"), id.to_string());
        assert_eq!(ct["HostConfig"]["NanoCpus"].as_u64(), Some(1_000_000_000));
    }
    println!(
        "FIGURE worker container start (POST /add -> registered and active): {:?} ms",
        start_times
            .iter()
            .map(Duration::as_millis)
            .collect::<Vec<_>>()
    );
}

/// Seed test 3 on containers: `/stop/0` kills the container; its tasks are
/// requeued and all run once; it comes back under the same name and worker
/// ID, as the next incarnation.
#[tokio::test(flavor = "multi_thread")]
async fn stop_kills_the_container_and_it_comes_back_under_the_same_name() {
    let Some(_d) = DockerTest::begin("stop").await else {
        return;
    };
    let c = Runtime::Docker.start("e2e-stop", &[5, 5, 5]).await;
    let old_id = inspect("e2e-stop-worker-0").unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_c, nodes) = situations::stop_node_0(c).await;
    assert!(inspect(&old_id).is_none(), "the old container is gone");
    assert_eq!(node(&nodes, 0)["incarnation"], 2);
    let new = inspect("e2e-stop-worker-0").expect("the container is back under its name");
    assert_ne!(new["Id"].as_str().unwrap(), old_id);
    assert_eq!(label(&new, "dev.flotilla.worker"), "0");
    assert_eq!(label(&new, "dev.flotilla.incarnation"), "2");
    assert!(has_env(&new, "FLOTILLA_WORKER_ID=0"));
    assert!(has_env(&new, "FLOTILLA_INCARNATION=2"));
    assert_eq!(
        cluster_containers("e2e-stop").len(),
        3,
        "nothing duplicated"
    );
}

/// W5 (README, "Performance") on containers: 4 workers of capacity 16, 40 tasks of
/// 0.5 s, `docker kill` of one worker 1 s in. Every task has exactly one
/// final result; the death is seen through the engine's events, so the
/// worker's tasks are requeued long before the heartbeat timeout could have
/// fired; the container comes back under the same name and worker ID.
#[tokio::test(flavor = "multi_thread")]
async fn w5_docker_kill_mid_run_is_seen_through_events() {
    let Some(_d) = DockerTest::begin("w5").await else {
        return;
    };
    // The seed's heartbeat settings: a missed heartbeat would take 5..10 s.
    let (interval, timeout) = (5.0, 10.0);
    let c = &start("e2e-w5", &[16, 16, 16, 16], interval, timeout).await;
    let old_id = inspect("e2e-w5-worker-1").unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let t_submit = Instant::now();
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            c.send_python(&format!("import time\ntime.sleep(0.5)\nresponse = {i}"))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(t_submit.elapsed())).await;
    let before = c.nodes().await.unwrap();
    assert!(
        held(&before)[1] >= 2,
        "worker 1 holds tasks when it is killed: {before:?}"
    );
    let t_kill = Instant::now();
    docker(&["kill", "e2e-w5-worker-1"]).unwrap();
    let kill_cli = t_kill.elapsed();
    let kill_to_requeue = poll_until(
        Duration::from_secs(15),
        "worker 1 declared dead",
        || async move {
            let nodes = c.nodes().await.ok()?;
            let n = &nodes[1];
            (n["state"] != "active" || n["incarnation"] != 1).then(|| {
                assert_eq!(
                    n["queued"].as_u64().unwrap() + n["running"].as_u64().unwrap(),
                    0,
                    "its tasks left it when it was declared dead: {n}"
                );
                t_kill.elapsed()
            })
        },
    )
    .await
    .unwrap();
    let kill_to_back = poll_until(Duration::from_secs(30), "worker 1 back", || async move {
        let nodes = c.nodes().await.ok()?;
        (nodes[1]["state"] == "active" && nodes[1]["incarnation"] == 2).then(|| t_kill.elapsed())
    })
    .await
    .unwrap();
    let mut retried = 0;
    for (i, id) in ids.iter().enumerate() {
        let t = c.wait_task(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["result"]["response"], i as u64, "its own result: {t}");
        if t["attempts"] != 1 {
            retried += 1;
        }
    }
    let makespan = t_submit.elapsed();
    let nodes = c.nodes().await.unwrap();
    let executed: u64 = nodes.iter().map(|n| n["executed"].as_u64().unwrap()).sum();
    assert_eq!(executed, 40, "exactly one final result per task");
    let new = inspect("e2e-w5-worker-1").expect("the container is back under its name");
    assert_ne!(new["Id"].as_str().unwrap(), old_id);
    assert_eq!(label(&new, "dev.flotilla.worker"), "1");
    assert_eq!(label(&new, "dev.flotilla.incarnation"), "2");
    assert!(has_env(&new, "FLOTILLA_WORKER_ID=1"));
    // 16 x 0.25 = 4 CPUs, capped at what the engine has (Docker refuses more).
    let engine_cpus: u64 = docker(&["info", "--format", "{{.NCPU}}"])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        new["HostConfig"]["NanoCpus"].as_u64(),
        Some(engine_cpus.min(4) * 1_000_000_000)
    );
    assert_eq!(cluster_containers("e2e-w5").len(), 4, "nothing duplicated");
    println!(
        "FIGURE W5 docker kill: kill -> requeue {} ms (Docker events; the `docker kill` \
         CLI itself took {} ms of it), kill -> back {} ms; {retried} task(s) ran twice; \
         40 tasks in {:.1} s; the heartbeat path would need {interval}..{timeout} s",
        kill_to_requeue.as_millis(),
        kill_cli.as_millis(),
        kill_to_back.as_millis(),
        makespan.as_secs_f64()
    );
    assert!(
        kill_to_requeue < Duration::from_secs_f64(timeout - interval),
        "requeued by the event, before any heartbeat timeout could fire: {kill_to_requeue:?}"
    );
}

/// `docker pause` is a hang: no event, so the heartbeat timeout catches it;
/// the task runs elsewhere, and the paused container is removed when the
/// worker restarts under the same name.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_container_is_caught_by_the_heartbeat_timeout() {
    let Some(_d) = DockerTest::begin("pause").await else {
        return;
    };
    let (interval, timeout) = (0.25, 1.5);
    let c = &start("e2e-pause", &[2, 2], interval, timeout).await;
    let old_id = inspect("e2e-pause-worker-0").unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let id = c
        .send_to_path(
            "/send/0",
            "import time\ntime.sleep(1)\nresponse = self.node_id",
        )
        .await
        .unwrap();
    poll_until(
        Duration::from_secs(10),
        "task running on node 0",
        || async move {
            let (_, t) = c.get(&format!("/tasks/{id}")).await.ok()?;
            (t["state"] == "running").then_some(())
        },
    )
    .await
    .unwrap();
    let t_pause = Instant::now();
    docker(&["pause", "e2e-pause-worker-0"]).unwrap();
    let pause_to_dead = poll_until(
        Duration::from_secs(15),
        "worker 0 declared dead",
        || async move {
            let nodes = c.nodes().await.ok()?;
            (nodes[0]["incarnation"] != 1 || nodes[0]["state"] != "active")
                .then(|| t_pause.elapsed())
        },
    )
    .await
    .unwrap();
    let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 2, "{t}");
    assert_eq!(t["result"]["response"], 1, "it ran on node 1: {t}");
    let nodes = c
        .wait_until(Duration::from_secs(20), |n| {
            n[0]["state"] == "active" && n[0]["incarnation"] == 2
        })
        .await
        .unwrap();
    assert!(
        inspect(&old_id).is_none(),
        "the paused container was removed"
    );
    let new = inspect("e2e-pause-worker-0").unwrap();
    assert_eq!(label(&new, "dev.flotilla.incarnation"), "2");
    let executed: u64 = nodes.iter().map(|n| n["executed"].as_u64().unwrap()).sum();
    assert_eq!(executed, 1);
    println!(
        "FIGURE docker pause -> declared dead by heartbeat: {} ms (interval {interval} s, timeout {timeout} s)",
        pause_to_dead.as_millis()
    );
    assert!(pause_to_dead >= Duration::from_secs_f64(timeout - interval));
}

/// A partition: worker 0's container is disconnected from the network, and
/// the master loses the engine too (its Docker socket goes through a proxy
/// the test cuts), as when a worker's whole host is cut off. The heartbeat
/// timeout declares worker 0 dead; its task runs on node 1. When the network
/// comes back, the stale worker's late result is refused (its incarnation is
/// replaced: 409) and it exits; nothing is counted twice. When the engine
/// comes back, worker 0 restarts under the same name and ID.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_worker_is_declared_dead_and_its_late_result_is_refused() {
    let Some(_d) = DockerTest::begin("partition").await else {
        return;
    };
    let cluster = "e2e-part";
    remove_cluster(cluster);
    let proxy = EngineProxy::start(cluster).await.unwrap();
    let host = proxy.docker_host();
    let c = &Cluster::start_with(
        &docker_manifest(cluster, &[2, 2], 0.25, 1.5),
        &[],
        &[("DOCKER_HOST", host.as_str())],
    )
    .await
    .unwrap();
    let worker0 = "e2e-part-worker-0";
    let old_id = inspect(worker0).unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let id = c
        .send_to_path(
            "/send/0",
            "import time\ntime.sleep(2)\nresponse = self.node_id",
        )
        .await
        .unwrap();
    poll_until(
        Duration::from_secs(10),
        "task running on node 0",
        || async move {
            let (_, t) = c.get(&format!("/tasks/{id}")).await.ok()?;
            (t["state"] == "running").then_some(())
        },
    )
    .await
    .unwrap();

    proxy.cut();
    docker(&["network", "disconnect", cluster, worker0]).unwrap();
    let t_cut = Instant::now();
    c.wait_until(Duration::from_secs(15), |n| n[0]["state"] != "active")
        .await
        .unwrap();
    let to_dead = t_cut.elapsed();
    let t = c.wait_task(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(
        (t["attempts"].as_u64(), t["node"].as_u64()),
        (Some(2), Some(1)),
        "{t}"
    );
    assert_eq!(t["result"]["response"], 1);
    // The master could not reach the engine: the stale container still runs,
    // its task finished, its result unsent.
    let stale = inspect(&old_id).expect("the partitioned container still exists");
    assert_eq!(stale["State"]["Running"], true);

    docker(&["network", "connect", cluster, worker0]).unwrap();
    let old = old_id.as_str();
    let exited = poll_until(
        Duration::from_secs(20),
        "stale worker exits",
        || async move {
            let s = inspect(old)?;
            (s["State"]["Running"] == false).then_some(s)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        exited["State"]["ExitCode"], 0,
        "it exited by itself on 409, not killed: {}",
        exited["State"]
    );
    let again = c.get(&format!("/tasks/{id}")).await.unwrap().1;
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["node"], 1);
    assert_eq!(
        again["result"], t["result"],
        "the late result was not counted"
    );

    proxy.restore();
    let nodes = c
        .wait_until(Duration::from_secs(40), |n| n[0]["state"] == "active")
        .await
        .unwrap();
    let executed: u64 = nodes.iter().map(|n| n["executed"].as_u64().unwrap()).sum();
    assert_eq!(executed, 1, "one final result: {nodes:?}");
    let new = inspect(worker0).expect("worker 0 is back under its name");
    assert_ne!(new["Id"].as_str().unwrap(), old_id);
    assert_eq!(label(&new, "dev.flotilla.worker"), "0");
    assert_eq!(
        label(&new, "dev.flotilla.incarnation"),
        nodes[0]["incarnation"].to_string()
    );
    assert!(
        inspect(&old_id).is_none(),
        "the stale container was removed"
    );
    assert_eq!(cluster_containers(cluster).len(), 2, "nothing duplicated");
    println!(
        "FIGURE partition -> declared dead by heartbeat: {} ms (timeout 1.5 s)",
        to_dead.as_millis()
    );
}

/// Containers left by a master that was SIGKILLed are removed when a master
/// of the same cluster starts: never duplicated, never adopted.
#[tokio::test(flavor = "multi_thread")]
async fn containers_left_by_an_earlier_run_are_removed_at_start() {
    let Some(_d) = DockerTest::begin("leftovers").await else {
        return;
    };
    let first = start("e2e-left", &[2, 2], 1.0, 5.0).await;
    let old: HashSet<String> = cluster_containers("e2e-left").into_iter().collect();
    assert_eq!(old.len(), 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(first);
    assert_eq!(
        cluster_containers("e2e-left").len(),
        2,
        "a SIGKILLed master leaves its containers"
    );
    let second = Cluster::start(&docker_manifest("e2e-left", &[2, 2], 1.0, 5.0))
        .await
        .unwrap();
    let now: HashSet<String> = cluster_containers("e2e-left").into_iter().collect();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.is_disjoint(&old), "the old containers were removed");
    let t = second.run_python("response = self.node_id").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    drop(second);
    // The network was the first master's: the second found it and keeps it.
    remove_cluster("e2e-left");
}

/// A SIGKILLed master's containers run on; the next master, on the same
/// state directory and port, adopts them: the same containers (IDs), no
/// restart, and the lock-protected increments of 120 tasks (3 workers of
/// capacity 2, 2 slots each), killed after about 40, count exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_master_s_containers_are_adopted_by_the_next_one() {
    let Some(_d) = DockerTest::begin("adoption").await else {
        return;
    };
    let name = "e2e-adopt";
    remove_cluster(name);
    let text = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n",
        docker_manifest(name, &[2, 2, 2], 1.0, 10.0)
    );
    let dir = fresh_state_dir();
    let dir_arg = dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let args = [
        "--state-dir",
        dir_arg.as_str(),
        "--port",
        port.as_str(),
        "--slots",
        "2",
    ];
    let mut first = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let containers: HashSet<String> = cluster_containers(name).into_iter().collect();
    assert_eq!(containers.len(), 3, "{containers:?}");
    let nodes_of = |nodes: Vec<Value>| -> Vec<(Value, Value, Value, Value)> {
        nodes
            .into_iter()
            .map(|n| {
                (
                    n["id"].clone(),
                    n["incarnation"].clone(),
                    n["restarts"].clone(),
                    n["locator"].clone(),
                )
            })
            .collect()
    };
    let before = nodes_of(first.nodes().await.unwrap());
    let add_one = "import time\ntotal = request_write_resource('total')\ntotal.value += 1\nrelease_write_resource('total')\ntime.sleep(0.15)\nresponse = total.value";
    let tasks: Vec<Value> = (0..120)
        .map(|_| json!({"type": "python", "command": add_one}))
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
    let mut next = 0u64;
    let mut finished = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while finished < 40 {
        assert!(Instant::now() < deadline, "only {finished} finished");
        let (_, page) = first
            .get(&format!("/tasks/finished?after={next}&wait=5"))
            .await
            .unwrap();
        finished += page["tasks"].as_array().unwrap().len();
        next = page["next"].as_u64().unwrap();
    }
    first.kill_master(); // SIGKILL, the master only
    for id in &containers {
        let ct = inspect(id).expect("the container is still there");
        assert_eq!(ct["State"]["Running"], true, "{id} stopped with its master");
    }

    let second = Cluster::start_with(&text, &args, &[]).await.unwrap();
    let mut seen = std::collections::HashMap::<u64, usize>::new();
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.values().sum::<usize>() < 120 {
        assert!(Instant::now() < deadline, "only {} finished", seen.len());
        let (_, page) = second
            .get(&format!("/tasks/finished?after={next}&wait=5"))
            .await
            .unwrap();
        for t in page["tasks"].as_array().unwrap() {
            assert_eq!(t["state"], "succeeded", "{t}");
            *seen.entry(t["id"].as_u64().unwrap()).or_default() += 1;
        }
        next = page["next"].as_u64().unwrap();
    }
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "task {id} must finish exactly once");
    }
    let (_, res) = second.get("/resources/total").await.unwrap();
    assert_eq!(res["value"], 120, "{res}");
    assert_eq!(res["version"], 120, "{res}");
    let now: HashSet<String> = cluster_containers(name).into_iter().collect();
    assert_eq!(now, containers, "the same containers, none recreated");
    assert_eq!(
        nodes_of(second.nodes().await.unwrap()),
        before,
        "no restart"
    );
    drop(second); // Ctrl-C: the containers go with the master
    assert!(cluster_containers(name).is_empty());
    remove_cluster(name);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The compose file starts a working cluster: the master container starts
/// two worker containers on the `flotilla` network, a task submitted with
/// the token runs, and `down` leaves no worker container behind (the master
/// removes them on the SIGINT compose sends it: `stop_signal`).
#[tokio::test(flavor = "multi_thread")]
async fn compose_up_starts_a_working_cluster_and_down_leaves_nothing() {
    let Some(_d) = DockerTest::begin("compose").await else {
        return;
    };
    let cmd = match compose_command() {
        Some(c) => c,
        None if docker_required() => panic!("docker-compose (or docker compose) is required here"),
        None => {
            eprintln!("SKIPPED compose: neither docker-compose nor `docker compose` is installed");
            return;
        }
    };
    let project = "flotilla-e2e";
    let token = format!("e2e-{}-{}", std::process::id(), rand_suffix());
    let gid = docker_socket_gid();
    let envs = [
        ("FLOTILLA_TOKEN", token.as_str()),
        ("FLOTILLA_DOCKER_GID", gid.as_str()),
        ("RUST_LOG", "info"),
    ];
    // The compose file names its container and network: clear what an
    // interrupted earlier run may have left.
    let _ = compose(
        &cmd,
        project,
        &["down", "--remove-orphans", "--volumes"],
        &envs,
        Duration::from_secs(90),
    );
    remove_cluster("flotilla");
    if inspect("flotilla-master").is_some() {
        panic!(
            "a container named flotilla-master exists (another compose project?): stop it first"
        );
    }
    struct Down<'a>(&'a [String], &'a str, &'a [(&'a str, &'a str)]);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                if let Ok(logs) = docker(&["logs", "--tail", "40", "flotilla-master"]) {
                    eprintln!("flotilla-master logs:\n{logs}");
                }
                let _ = compose(
                    self.0,
                    self.1,
                    &["down", "--volumes"],
                    self.2,
                    Duration::from_secs(90),
                );
                remove_cluster("flotilla");
            }
        }
    }
    let guard = Down(&cmd, project, &envs);
    let t0 = Instant::now();
    compose(
        &cmd,
        project,
        &["up", "-d"],
        &envs,
        Duration::from_secs(120),
    )
    .unwrap();
    let http = &reqwest::Client::new();
    let token = &token;
    let base = "http://127.0.0.1:5000";
    let health = poll_until(Duration::from_secs(60), "2 active workers", || async move {
        let r = http
            .get(format!("{base}/health"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        let h: Value = r.json().await.ok()?;
        (h["active_nodes"] == 2 && h["nodes"] == 2).then_some(h)
    })
    .await
    .unwrap();
    println!(
        "FIGURE compose up -> 2 worker containers active: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(health["runtime"], "docker");
    for id in 0..2 {
        let ct = inspect(&format!("flotilla-worker-{id}")).expect("worker container");
        assert_eq!(label(&ct, "dev.flotilla.cluster"), "flotilla");
        assert!(has_env(&ct, "FLOTILLA_MASTER_URL=http://master:5000"));
        assert_hardened(&ct);
        // Only the master has the Docker socket; no worker ever sees it.
        assert_eq!(
            ct["Mounts"].as_array().map(Vec::len),
            Some(0),
            "{}",
            ct["Mounts"]
        );
    }
    // The master: not root, the socket's group only, no capability, a
    // read-only image, and nothing of the token reaches the workers.
    let master = inspect("flotilla-master").expect("master container");
    assert_eq!(master["Config"]["User"], "10001:10001");
    assert_eq!(master["HostConfig"]["GroupAdd"], json!([gid]));
    assert_eq!(master["HostConfig"]["CapDrop"], json!(["ALL"]));
    assert_eq!(master["HostConfig"]["ReadonlyRootfs"], true);
    assert!(master["HostConfig"]["SecurityOpt"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o.as_str().unwrap().starts_with("no-new-privileges")));
    for id in 0..2 {
        let ct = inspect(&format!("flotilla-worker-{id}")).unwrap();
        let env = ct["Config"]["Env"].to_string();
        assert!(
            !env.contains(token.as_str()) && !env.contains("FLOTILLA_TOKEN"),
            "{env}"
        );
    }
    // Prometheus scrapes without the token, on loopback only.
    let scrape = http
        .get("http://127.0.0.1:9464/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().await.unwrap().contains("flotilla_tasks"));
    let refused = http
        .post(format!("{base}/send"))
        .json(&json!({"type": "python", "command": "response = 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "the API needs the token");
    let sent: Value = http
        .post(format!("{base}/send"))
        .bearer_auth(token)
        .json(&json!({"type": "python", "command": "response = 6 * 7"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["task_id"].as_u64().expect("a task id");
    let task: Value = http
        .get(format!("{base}/tasks/{id}?wait=30"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["result"]["response"], 42);

    let t_down = Instant::now();
    compose(
        &cmd,
        project,
        &["down", "--volumes"],
        &envs,
        Duration::from_secs(90),
    )
    .unwrap();
    println!("FIGURE compose down: {} ms", t_down.elapsed().as_millis());
    assert!(
        cluster_containers("flotilla").is_empty(),
        "no worker container is left behind"
    );
    assert!(
        docker(&["network", "inspect", "flotilla"]).is_err(),
        "network removed"
    );
    std::mem::forget(guard);
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_007
}

/// Bad states name their fix: a missing image says how to build it.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_says_to_run_build_images() {
    let Some(_d) = DockerTest::begin("missing_image").await else {
        return;
    };
    remove_cluster("e2e-noimage");
    let manifest = docker_manifest("e2e-noimage", &[1], 1.0, 5.0).replace(
        "  runtime: docker\n",
        "  runtime: docker\n  image: flotilla-worker:no-such-tag\n",
    );
    let path = temp_file("noimage.yaml", &manifest);
    let err = flotilla_fails(
        &["up", path.to_str().unwrap(), "--port", "0", "--ephemeral"],
        &[],
    );
    assert!(
        err.contains("flotilla-worker:no-such-tag") && err.contains("docker/build-images.sh"),
        "{err}"
    );
    assert!(cluster_containers("e2e-noimage").is_empty());
}

/// An unreachable engine is named as such (no Docker needed to check it).
#[test]
fn an_unreachable_engine_is_reported_clearly() {
    let path = temp_file(
        "unreachable.yaml",
        &docker_manifest("e2e-nodaemon", &[1], 1.0, 5.0),
    );
    let err = flotilla_fails(
        &["up", path.to_str().unwrap(), "--port", "0", "--ephemeral"],
        &[(
            "DOCKER_HOST",
            "unix:///nonexistent/flotilla-e2e/docker.sock",
        )],
    );
    assert!(
        err.contains("cannot reach the Docker engine") && err.contains("DOCKER_HOST"),
        "{err}"
    );
    // --runtime overrides the manifest: `process` needs no engine.
    let err = flotilla_fails(
        &[
            "up",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--ephemeral",
            "--runtime",
            "nomad",
        ],
        &[],
    );
    assert!(err.contains("nomad"), "{err}");
}

/// The group of the Docker socket, for compose's FLOTILLA_DOCKER_GID.
fn docker_socket_gid() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/var/run/docker.sock")
        .map(|m| m.gid().to_string())
        .unwrap_or_else(|_| "0".into())
}

/// What every worker container must have: no capability, no privilege
/// gain, a PID limit, a read-only image with a size-limited /tmp, not root.
fn assert_hardened(ct: &Value) {
    let host = &ct["HostConfig"];
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    assert!(
        host["CapAdd"].is_null() || host["CapAdd"] == json!([]),
        "{host}"
    );
    assert_eq!(
        host["SecurityOpt"],
        json!(["no-new-privileges:true"]),
        "{host}"
    );
    assert!(
        host["PidsLimit"]
            .as_i64()
            .is_some_and(|n| n > 0 && n <= 1024),
        "{host}"
    );
    assert_eq!(host["ReadonlyRootfs"], true, "{host}");
    assert_eq!(host["Privileged"], false);
    let tmp = host["Tmpfs"]["/tmp"].as_str().expect("a tmpfs on /tmp");
    assert!(tmp.contains("size="), "{tmp}");
    assert_eq!(ct["Config"]["User"], "10001:10001");
}

/// `docker compose up` without FLOTILLA_TOKEN refuses, saying how to make one.
#[tokio::test(flavor = "multi_thread")]
async fn compose_without_a_token_refuses_and_says_how_to_make_one() {
    let Some(_d) = DockerTest::begin("compose_no_token").await else {
        return;
    };
    let Some(cmd) = compose_command() else {
        assert!(
            !docker_required(),
            "docker-compose (or docker compose) is required here"
        );
        return;
    };
    let gid = docker_socket_gid();
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .arg("-f")
        .arg(compose_file())
        .args(["-p", "flotilla-e2e-notoken", "up", "-d"])
        .env_remove("FLOTILLA_TOKEN")
        .env("FLOTILLA_DOCKER_GID", &gid);
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("FLOTILLA_TOKEN") && text.contains("openssl rand"),
        "{text}"
    );
    assert!(inspect("flotilla-master").is_none(), "nothing was started");
    // And without the socket's group: refused the same way, naming it.
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .arg("-f")
        .arg(compose_file())
        .args(["-p", "flotilla-e2e-notoken", "up", "-d"])
        .env("FLOTILLA_TOKEN", "x")
        .env_remove("FLOTILLA_DOCKER_GID");
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("FLOTILLA_DOCKER_GID") && text.contains("stat -c %g"),
        "{text}"
    );
}

/// Worker containers are hardened, and task code lives with it: it is not
/// root, cannot write the image, can write /tmp; /nodes shows the
/// container, not a PID inside it.
#[tokio::test(flavor = "multi_thread")]
async fn worker_containers_are_hardened_and_tasks_still_write_tmp() {
    let Some(_d) = DockerTest::begin("hardened").await else {
        return;
    };
    let c = start("e2e-hard", &[1], 1.0, 5.0).await;
    let ct = inspect("e2e-hard-worker-0").expect("the worker container");
    assert_hardened(&ct);
    assert_eq!(ct["Mounts"].as_array().map(Vec::len), Some(0));
    let t = c
        .run_python(concat!(
            "import os\n",
            "open('/tmp/scratch.txt', 'w').write('ok')\n",
            "try:\n",
            "    open('/usr/local/bin/flotilla-worker', 'ab')\n",
            "    image = 'writable'\n",
            "except OSError as e:\n",
            "    image = type(e).__name__\n",
            "try:\n",
            "    open(os.path.expanduser('~/x'), 'w')\n",
            "    home = 'writable'\n",
            "except OSError as e:\n",
            "    home = type(e).__name__\n",
            "response = [open('/tmp/scratch.txt').read(), os.getuid(), image, home]\n",
        ))
        .await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let r = &t["result"]["response"];
    assert_eq!(r[0], "ok", "{t}");
    assert_eq!(r[1], 10001, "{t}");
    assert_ne!(r[2], "writable", "{t}");
    assert_ne!(r[3], "writable", "{t}");
    // No credential anywhere task code can look: its environment, every
    // process's environ and cmdline in the container (tini's included).
    let t = c
        .run_python(concat!(
            "import os, re, glob\n",
            "seen = [v for v in os.environ.values()]\n",
            "denied = 0\n",
            "for p in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):\n",
            "    try:\n",
            "        seen.append(open(p, 'rb').read().decode('utf-8', 'replace'))\n",
            "    except OSError:\n",
            "        denied += 1\n",
            "text = '\\n'.join(seen)\n",
            "response = [bool(re.search(r'\\d+\\.\\d+\\.[0-9a-f]{64}', text)), 'FLOTILLA_WORKER_SECRET' in text, denied]\n",
        ))
        .await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let r = &t["result"]["response"];
    assert_eq!(r[0], false, "a worker credential is readable by tasks: {t}");
    assert_eq!(r[1], false, "{t}");
    assert!(
        r[2].as_u64().unwrap() >= 1,
        "the worker's own /proc is closed to tasks: {t}"
    );
    // A fork bomb stops at the PID limit, and the worker survives it.
    let t = c
        .run_python(concat!(
            "import subprocess\n",
            "procs = []\n",
            "try:\n",
            "    for _ in range(2000):\n",
            "        procs.append(subprocess.Popen(['sleep', '30']))\n",
            "    response = 'unbounded'\n",
            "except OSError as e:\n",
            "    response = 'limited'\n",
            "finally:\n",
            "    for p in procs:\n",
            "        p.kill()\n",
            "        p.wait()\n",
        ))
        .await;
    assert_eq!(t["result"]["response"], "limited", "{t}");
    assert_eq!(c.run_python("response = 1").await["state"], "succeeded");
    let nodes = c.nodes().await.unwrap();
    let id = ct["Id"].as_str().unwrap();
    let locator = nodes[0]["locator"].as_str().unwrap();
    assert!(
        locator.contains("e2e-hard-worker-0") && locator.contains(&id[..12]),
        "{locator}"
    );
    assert!(nodes[0]["pid"].is_null(), "{}", nodes[0]);
}

/// Master on the host, workers in containers, a local OTLP receiver: the
/// workers' spans arrive, though the endpoint the master was given is a
/// loopback address (rewritten to the network's gateway for them).
#[tokio::test(flavor = "multi_thread")]
async fn worker_spans_reach_a_collector_on_the_host() {
    let Some(_d) = DockerTest::begin("telemetry").await else {
        return;
    };
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let services: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let sink = services.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            sink.lock().unwrap().push((service.clone(), span.name));
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    // On every interface: the workers reach it at the gateway's address.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let endpoint = format!("http://127.0.0.1:{port}");
    remove_cluster("e2e-otel");
    let c = Cluster::start_with(
        &docker_manifest("e2e-otel", &[2], 1.0, 5.0),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .unwrap();
    let ct = inspect("e2e-otel-worker-0").unwrap();
    assert!(!has_env(
        &ct,
        &format!("OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}")
    ));
    for _ in 0..5 {
        assert_eq!(c.run_python("response = 1").await["state"], "succeeded");
    }
    poll_until(Duration::from_secs(30), "worker spans", || {
        let services = services.clone();
        async move {
            let seen = services.lock().unwrap().clone();
            let worker = seen
                .iter()
                .filter(|(s, n)| s.contains("flotilla-worker") && n == "running")
                .count();
            let master = seen
                .iter()
                .filter(|(s, _)| s.contains("flotilla-master"))
                .count();
            (worker >= 5 && master > 0).then_some(())
        }
    })
    .await
    .unwrap();
}

/// One owner per cluster on Docker: a second master of the cluster (another
/// state directory) refuses to start, naming the first, whose containers are
/// untouched and still serve; `flotilla down` refuses while the owner lives,
/// and once it is gone (SIGKILLed, its containers left running) removes
/// them, saying which.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_master_refuses_and_flotilla_down_removes_what_a_dead_one_left() {
    let Some(_d) = DockerTest::begin("owner").await else {
        return;
    };
    let name = "e2e-owner";
    let first = start(name, &[2, 2], 1.0, 5.0).await;
    let before: HashSet<String> = cluster_containers(name).into_iter().collect();
    assert_eq!(before.len(), 2);
    let claim = inspect(&format!("{name}-owner")).expect("the claim container");
    assert_eq!(claim["State"]["Status"], "created", "never started");
    assert_eq!(label(&claim, "dev.flotilla.owner-of"), name);

    let manifest = temp_file(
        "docker-owner.yaml",
        &docker_manifest(name, &[2, 2], 1.0, 5.0),
    );
    let second_state = fresh_state_dir();
    let err = flotilla_fails(
        &[
            "up",
            manifest.to_str().unwrap(),
            "--port",
            "0",
            "--state-dir",
            second_state.to_str().unwrap(),
        ],
        &[],
    );
    for expected in [
        format!(
            "cluster `{name}` is owned by a live master pid {} on host",
            first.pid()
        ),
        format!("container {name}-owner"),
    ] {
        assert!(err.contains(&expected), "`{expected}` in: {err}");
    }
    let now: HashSet<String> = cluster_containers(name).into_iter().collect();
    assert_eq!(now, before, "the same containers");
    for node in 0..2 {
        let id = first
            .send_to_path(&format!("/send/{node}"), "response = self.node_id")
            .await
            .unwrap();
        let t = first.wait_task(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    let nodes = first.nodes().await.unwrap();
    assert!(
        nodes
            .iter()
            .all(|n| n["restarts"] == 0 && n["incarnation"] == 1),
        "{nodes:?}"
    );

    let down = |force: bool| {
        let mut args = vec![
            "down",
            manifest.to_str().unwrap(),
            "--state-dir",
            second_state.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        std::process::Command::new(bin("flotilla"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = down(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refusing"), "{err}");
    assert_eq!(
        cluster_containers(name).into_iter().collect::<HashSet<_>>(),
        before
    );

    // SIGKILL: the containers stay; `down` removes them for good.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(first);
    assert_eq!(
        cluster_containers(name).len(),
        2,
        "a SIGKILLed master leaves them"
    );
    let out = down(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("removed 2 workers")
            && stdout.contains(&format!("container {name}-worker-0"))
            && stdout.contains(&format!("container {name}-worker-1")),
        "{stdout}"
    );
    assert!(cluster_containers(name).is_empty());
    assert!(
        inspect(&format!("{name}-owner")).is_none(),
        "the claim is gone too"
    );
    remove_cluster(name);
}

/// A master in a container (as with compose) owns its cluster too: a master
/// on the host with the same cluster name refuses, naming the container,
/// since that container runs (whatever the host can resolve of its address);
/// once the container is stopped, `flotilla down` from the host takes the
/// claim over and removes the workers it left.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_in_a_container_owns_the_cluster_against_one_on_the_host() {
    let Some(_d) = DockerTest::begin("owner_container").await else {
        return;
    };
    let name = "e2e-ownc";
    let master_ct = format!("{name}-master");
    remove_cluster(name);
    let _ = docker(&["rm", "-f", &master_ct]);
    let text = docker_manifest(name, &[1, 1], 1.0, 5.0);
    let manifest = temp_file("docker-ownc.yaml", &text);
    let _ = docker(&["network", "create", name]);
    let gid = docker_socket_gid();
    let mount = format!("{}:/etc/flotilla/cluster.yaml:ro", manifest.display());
    let advertise = format!("FLOTILLA_ADVERTISE_URL=http://{master_ct}:5000");
    docker(&[
        "run",
        "-d",
        "--name",
        &master_ct,
        "--network",
        name,
        "--user",
        "10001:10001",
        "--group-add",
        &gid,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        &mount,
        "-e",
        &advertise,
        "-e",
        "FLOTILLA_TOKEN=e2e-ownc-token",
        MASTER_IMAGE,
        "up",
        "/etc/flotilla/cluster.yaml",
        "--bind",
        "0.0.0.0",
        "--port",
        "5000",
        "--ephemeral",
    ])
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster_containers(name).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the master in a container started no workers: {}",
            docker(&["logs", &master_ct]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before: HashSet<String> = cluster_containers(name).into_iter().collect();
    let container_id = inspect(&master_ct).unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();

    let err = flotilla_fails(
        &[
            "up",
            manifest.to_str().unwrap(),
            "--port",
            "0",
            "--ephemeral",
        ],
        &[],
    );
    assert!(
        err.contains(&format!(
            "cluster `{name}` is owned by a live master container {}",
            &container_id[..12]
        )),
        "{err}"
    );
    assert_eq!(
        cluster_containers(name).into_iter().collect::<HashSet<_>>(),
        before
    );

    // Stopped: its claim is taken over at once, and `down` removes its workers.
    docker(&["kill", &master_ct]).unwrap();
    let out = std::process::Command::new(bin("flotilla"))
        .args(["down", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed 2 workers"), "{stdout}");
    assert!(cluster_containers(name).is_empty());
    let _ = docker(&["rm", "-f", &master_ct]);
    remove_cluster(name);
}

/// A master whose claim another master took over (this one was not heard
/// from for the lease) stops at once, leaving the containers to the new
/// owner.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_whose_claim_was_taken_over_stops_and_leaves_its_containers() {
    let Some(_d) = DockerTest::begin("owner_lost").await else {
        return;
    };
    let name = "e2e-ownl";
    let mut master = start(name, &[1, 1], 1.0, 5.0).await;
    let before: HashSet<String> = cluster_containers(name).into_iter().collect();
    let claim = format!("{name}-owner");
    let owner_label = format!(
        "dev.flotilla.owner={}",
        json!({"session": "another", "host": "elsewhere", "pid": 1, "since": 0,
               "address": "http://10.0.0.9:5000"})
    );
    let owner_of = format!("dev.flotilla.owner-of={name}");
    // What the other master does once this one's lease is out: the claim
    // is removed and made again, naming it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = docker(&["rm", "-f", &claim]);
        let made = docker(&[
            "create",
            "--name",
            &claim,
            "--label",
            &owner_of,
            "--label",
            &owner_label,
            "--network",
            "none",
            WORKER_IMAGE,
        ]);
        if made.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cannot replace the claim: {made:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = master.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the master did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert_eq!(
        cluster_containers(name).into_iter().collect::<HashSet<_>>(),
        before,
        "its containers are left to the new owner"
    );
    drop(master);
    remove_cluster(name);
}
