//! The Kubernetes runtime against a STAND-IN for the API server, not a
//! cluster: no real cluster can run on the machine these tests run on (no
//! kind or minikube, no registry). The stand-in (`support/kube_standin.rs`)
//! speaks the real REST paths and watch protocol for pods, and nothing more;
//! pods never run, so the tests play `kubectl` and the kubelet themselves.
//!
//! Most tests drive `KubernetesRuntime` through the `Runtime` trait, as the
//! cluster does; the last two run the real `flotilla up --runtime
//! kubernetes` binary against the stand-in through a kubeconfig file.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::runtime::kubernetes::{KubernetesRuntime, KubernetesSettings};
use flotilla::runtime::owner::Owner;
use flotilla::runtime::{Runtime, RuntimeEvent, WorkerLaunch};
use flotilla_e2e::kube_standin::{base64_decode, describe, KubeApiStandin};
use flotilla_e2e::{bin, fresh_state_dir, read_banner_url, temp_file};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const NS: &str = "flotilla-test";
const WAIT: Duration = Duration::from_secs(10);

fn settings(release: &str) -> KubernetesSettings {
    KubernetesSettings {
        release: release.into(),
        namespace: None,
        image: "flotilla-worker:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        cpu_per_capacity: 0.25,
        memory_bytes: 512 << 20,
        delete_timeout: WAIT,
        owner: None,
        worker_owner: None,
        worker_otlp_endpoint: None,
        worker_pods: Default::default(),
    }
}

async fn connect(
    standin: &KubeApiStandin,
    release: &str,
) -> (KubernetesRuntime, UnboundedReceiver<RuntimeEvent>) {
    let mut config = kube::Config::new(standin.url().parse().unwrap());
    config.default_namespace = NS.into();
    let (tx, rx) = unbounded_channel();
    let runtime = KubernetesRuntime::connect_with(config, settings(release), tx)
        .await
        .expect("connect to the stand-in");
    (runtime, rx)
}

fn launch(worker_id: u32, incarnation: u64, capacity: usize) -> WorkerLaunch {
    WorkerLaunch {
        worker_id,
        incarnation,
        capacity,
        slots: 1,
        // The advertised URL (the chart's Service), as the master hands it
        // to every runtime.
        master_url: "http://flotilla:5000".into(),
        secret: "worker-secret".into(),
        inherited_env: Vec::new(),
    }
}

/// Waits until the runtime's pod watch is established (a watch request with
/// the release's selector has arrived), so that what follows is seen by the
/// watch itself and not by its initial list.
async fn watching(standin: &KubeApiStandin, release: &str) {
    let selector = format!("app.kubernetes.io%2Finstance%3D{release}");
    let deadline = Instant::now() + WAIT;
    while !standin
        .requests()
        .iter()
        .any(|r| r.contains("watch=true") && r.contains(&selector))
    {
        assert!(
            Instant::now() < deadline,
            "the runtime never watched its pods"
        );
        // The stand-in has no notification for requests; this is test set-up.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_event(rx: &mut UnboundedReceiver<RuntimeEvent>) -> (u32, u64, String) {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(RuntimeEvent::Exited {
            worker_id,
            incarnation,
            detail,
        })) => (worker_id, incarnation, detail),
        Ok(Some(other)) => panic!("not a death: {other:?}"),
        Ok(None) => panic!("the runtime's event channel closed"),
        Err(_) => panic!("no event from the runtime within {WAIT:?}"),
    }
}

fn names(pods: &[Value]) -> Vec<&str> {
    pods.iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect()
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap().to_string()
}

fn incarnation(pod: &Value) -> &str {
    pod["metadata"]["labels"]["flotilla.dev/incarnation"]
        .as_str()
        .unwrap()
}

fn env_of(pod: &Value) -> HashMap<String, String> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn standin_api_server_one_pod_per_worker_with_name_labels_cpu_and_env() {
    let standin = KubeApiStandin::start().await;
    let (rt, mut events) = connect(&standin, "demo").await;
    rt.start(launch(0, 1, 4)).await.unwrap();
    rt.start(launch(1, 1, 2)).await.unwrap();

    let pods = standin.pods(NS);
    assert_eq!(names(&pods), ["demo-worker-0", "demo-worker-1"]);
    let pod = &pods[0];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "flotilla");
    assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    assert_eq!(labels["app.kubernetes.io/component"], "worker");
    assert_eq!(labels["flotilla.dev/worker"], "0");
    assert_eq!(labels["flotilla.dev/incarnation"], "1");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "flotilla-worker:0.1.0");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    // capacity 4 x 0.25 cores; capacity 2 x 0.25 cores.
    assert_eq!(container["resources"]["requests"]["cpu"], "1000m");
    assert_eq!(container["resources"]["limits"]["cpu"], "1000m");
    assert_eq!(container["resources"]["limits"]["memory"], "512Mi");
    let small = &pods[1]["spec"]["containers"][0]["resources"];
    assert_eq!(small["requests"]["cpu"], "500m");
    assert_eq!(small["limits"]["cpu"], "500m");
    let env = env_of(pod);
    assert_eq!(env["FLOTILLA_MASTER_URL"], "http://flotilla:5000");
    assert_eq!(env["FLOTILLA_WORKER_ID"], "0");
    assert_eq!(env["FLOTILLA_INCARNATION"], "1");
    assert_eq!(env["FLOTILLA_SLOTS"], "1");
    // The credential is in the worker's Secret, which the pod refers to: the
    // Pod object (what anyone who may read pods sees) carries none.
    assert_eq!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "FLOTILLA_WORKER_SECRET")
            .unwrap()["valueFrom"],
        json!({"secretKeyRef": {"name": "demo-worker-0", "key": "credential", "optional": false}})
    );
    assert!(!pod.to_string().contains("worker-secret"), "{pod}");
    assert_eq!(container["command"], json!(["flotilla-worker"]));
    let secret = standin.secret(NS, "demo-worker-0").unwrap();
    assert_eq!(secret["data"]["credential"], "d29ya2VyLXNlY3JldA==");
    assert_eq!(secret["metadata"]["labels"], pod["metadata"]["labels"]);
    assert_eq!(standin.secret_names(NS), ["demo-worker-0", "demo-worker-1"]);

    let handle = rt.inspect(0).await.unwrap();
    assert_eq!(handle.incarnation, 1);
    assert_eq!(handle.locator, "pod flotilla-test/demo-worker-0");
    assert!(rt.inspect(5).await.is_none());
    watching(&standin, "demo").await;
    // kube's watcher: a list, then a watch from its resourceVersion, with bookmarks.
    let requests = standin.requests();
    let watch = requests.iter().find(|r| r.contains("watch=true")).unwrap();
    assert!(
        watch.contains("allowWatchBookmarks=true") && watch.contains("resourceVersion="),
        "{watch}"
    );
    assert!(events.try_recv().is_err(), "a pending pod is not a death");
}

#[tokio::test]
async fn standin_api_server_pod_deleted_under_the_runtime_is_reported_at_once_and_recreated_under_the_same_name(
) {
    let standin = KubeApiStandin::start().await;
    let (rt, mut events) = connect(&standin, "demo").await;
    rt.start(launch(0, 1, 4)).await.unwrap();
    watching(&standin, "demo").await;
    let first = standin.pod(NS, "demo-worker-0").unwrap();

    // `kubectl delete pod demo-worker-0`
    let deleted_at = Instant::now();
    assert!(standin.delete_pod(NS, "demo-worker-0"));
    let (worker, inc, detail) = next_event(&mut events).await;
    let noticed = deleted_at.elapsed();
    assert_eq!((worker, inc), (0, 1), "{detail}");
    assert!(detail.contains("demo-worker-0 was deleted"), "{detail}");
    assert!(
        noticed < Duration::from_secs(2),
        "noticed after {noticed:?}"
    );

    // What the cluster does next: restart = kill + start, next incarnation.
    rt.kill(0).await.unwrap();
    rt.start(launch(0, 2, 4)).await.unwrap();
    let pods = standin.pods(NS);
    assert_eq!(names(&pods), ["demo-worker-0"]);
    assert_eq!(incarnation(&pods[0]), "2");
    assert_eq!(env_of(&pods[0])["FLOTILLA_WORKER_ID"], "0");
    assert_eq!(env_of(&pods[0])["FLOTILLA_INCARNATION"], "2");
    assert_ne!(uid(&pods[0]), uid(&first), "a new pod, same name");
    assert_eq!(rt.inspect(0).await.unwrap().incarnation, 2);

    // The new incarnation's pod is watched like the first.
    assert!(standin.delete_pod(NS, "demo-worker-0"));
    assert_eq!(next_event(&mut events).await.1, 2);
    assert!(events.try_recv().is_err(), "each death is reported once");
}

#[tokio::test]
async fn standin_api_server_pod_deleted_while_the_watch_was_down_is_found_by_the_re_list() {
    let standin = KubeApiStandin::start().await;
    let (rt, mut events) = connect(&standin, "demo").await;
    rt.start(launch(0, 1, 4)).await.unwrap();
    rt.start(launch(1, 1, 4)).await.unwrap();
    watching(&standin, "demo").await;

    // The watch drops, worker 1's pod goes meanwhile, and the server no
    // longer has the events since the runtime's resourceVersion (410).
    standin.lose_watches_and_compact(NS, "demo-worker-1");
    let (worker, inc, detail) = next_event(&mut events).await;
    assert_eq!((worker, inc), (1, 1));
    assert!(
        detail.contains("demo-worker-1 was deleted while the watch was reconnecting"),
        "{detail}"
    );
    let relisted = standin
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET") && !r.contains("watch=true") && r.contains("labelSelector")
        })
        .count();
    assert!(relisted >= 2, "the runtime listed its pods again");

    // Worker 0, listed again, is alive and still watched.
    standin.delete_pod(NS, "demo-worker-0");
    assert_eq!(next_event(&mut events).await.0, 0);
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn standin_api_server_failed_evicted_or_unpullable_pods_are_reported_and_replaced() {
    let standin = KubeApiStandin::start().await;
    let (rt, mut events) = connect(&standin, "demo").await;
    rt.start(launch(0, 1, 4)).await.unwrap();
    rt.start(launch(1, 1, 4)).await.unwrap();
    watching(&standin, "demo").await;

    // The kubelet evicts worker 0 (node pressure): phase Failed, reason Evicted.
    standin.set_pod_status(
        NS,
        "demo-worker-0",
        json!({"phase": "Failed", "reason": "Evicted",
               "message": "The node was low on resource: memory."}),
    );
    let (worker, inc, detail) = next_event(&mut events).await;
    assert_eq!((worker, inc), (0, 1));
    assert!(detail.contains("failed: Evicted"), "{detail}");
    // A failed pod stays until deleted: the restart deletes it, then creates.
    assert!(standin.pod(NS, "demo-worker-0").is_some());
    rt.kill(0).await.unwrap();
    assert!(standin.pod(NS, "demo-worker-0").is_none());
    rt.start(launch(0, 2, 4)).await.unwrap();
    assert_eq!(incarnation(&standin.pod(NS, "demo-worker-0").unwrap()), "2");

    // Worker 1's image is not on the node (`kind load` forgotten).
    standin.set_pod_status(
        NS,
        "demo-worker-1",
        json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "flotilla-worker:0.1.0", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImageNeverPull",
                                  "message": "image is not present with pull policy of Never"}}}]}),
    );
    let (worker, _, detail) = next_event(&mut events).await;
    assert_eq!(worker, 1);
    assert!(
        detail.contains("cannot start: ErrImageNeverPull"),
        "{detail}"
    );

    // A pod that runs is no news.
    standin.set_pod_status(NS, "demo-worker-0", json!({"phase": "Running"}));
    rt.kill(1).await.unwrap();
    assert_eq!(names(&standin.pods(NS)), ["demo-worker-0"]);
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn standin_api_server_second_master_adopts_existing_pods_without_duplicates() {
    let standin = KubeApiStandin::start().await;
    let (first, _first_events) = connect(&standin, "demo").await;
    for id in 0..3 {
        first.start(launch(id, 1, 4)).await.unwrap();
    }
    let before: Vec<String> = standin.pods(NS).iter().map(uid).collect();
    // A pod of another release is none of its business.
    standin.put_pod(
        NS,
        json!({"metadata": {"name": "other-worker-0", "labels": {
                   "app.kubernetes.io/name": "flotilla",
                   "app.kubernetes.io/instance": "other",
                   "app.kubernetes.io/component": "worker"}},
               "spec": {"containers": [{"name": "worker", "image": "x"}]}}),
    );
    // The first master dies without cleaning up (OOM-killed, node lost).
    drop(first);

    // The next master of the same release, whose manifest has two workers:
    // it claims the release (no one holds it), then deletes what is left.
    let (second, mut events) = connect(&standin, "demo").await;
    assert_eq!(standin.pods(NS).len(), 4, "connecting deletes nothing");
    second
        .claim(&Owner::me("master", "http://127.0.0.1:1"))
        .await
        .unwrap();
    second.remove_leftovers().await.unwrap();
    assert_eq!(
        names(&standin.pods(NS)),
        ["other-worker-0"],
        "the leftovers are deleted before any worker starts"
    );
    second.start(launch(0, 1, 4)).await.unwrap();
    second.start(launch(1, 1, 4)).await.unwrap();
    let pods = standin.pods(NS);
    assert_eq!(
        names(&pods),
        ["demo-worker-0", "demo-worker-1", "other-worker-0"],
        "same names, no duplicates, worker 2 of the old manifest gone"
    );
    for pod in &pods[..2] {
        assert!(!before.contains(&uid(pod)), "{} was reused", describe(pod));
        assert_eq!(incarnation(pod), "1");
    }

    // A pod of the old master labelled like the new master's worker 0,
    // incarnation 1, going away is not taken for a death of the new one.
    watching(&standin, "demo").await;
    standin.put_pod(
        NS,
        json!({"metadata": {"name": "demo-worker-old", "labels": {
                   "app.kubernetes.io/name": "flotilla",
                   "app.kubernetes.io/instance": "demo",
                   "app.kubernetes.io/component": "worker",
                   "flotilla.dev/worker": "0", "flotilla.dev/incarnation": "1"},
                   "annotations": {"flotilla.dev/master-session": "an-earlier-master"}},
               "spec": {"containers": [{"name": "worker", "image": "x"}]}}),
    );
    standin.delete_pod(NS, "demo-worker-old");
    // ...while the new master's own worker 0 is.
    standin.delete_pod(NS, "demo-worker-0");
    let (worker, inc, detail) = next_event(&mut events).await;
    assert_eq!((worker, inc), (0, 1));
    assert!(detail.contains("demo-worker-0"), "{detail}");
    assert!(events.try_recv().is_err());
    second.shutdown().await;
}

#[tokio::test]
async fn standin_api_server_kill_deletes_the_pod_and_shutdown_deletes_them_all() {
    let standin = KubeApiStandin::start().await;
    let (rt, mut events) = connect(&standin, "demo").await;
    for id in 0..3 {
        rt.start(launch(id, 1, 2)).await.unwrap();
    }
    watching(&standin, "demo").await;

    // `/stop/1` kills the worker: its pod is gone when kill returns.
    rt.kill(1).await.unwrap();
    assert_eq!(names(&standin.pods(NS)), ["demo-worker-0", "demo-worker-2"]);
    assert!(rt.inspect(1).await.is_none());
    rt.kill(1).await.expect("killing a dead worker is no error");
    let deletes: Vec<String> = standin
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("DELETE"))
        .map(|r| r.trim_end_matches('?').to_string())
        .collect();
    assert_eq!(
        deletes,
        ["DELETE /api/v1/namespaces/flotilla-test/pods/demo-worker-1"]
    );

    // The next incarnation's credential replaces the previous one in the
    // worker's Secret.
    let mut next = launch(1, 2, 2);
    next.secret = "second-secret".into();
    rt.start(next).await.unwrap();
    let secret = standin.secret(NS, "demo-worker-1").unwrap();
    assert_eq!(secret["data"]["credential"], "c2Vjb25kLXNlY3JldA==");
    assert_eq!(
        secret["metadata"]["labels"]["flotilla.dev/incarnation"],
        "2"
    );

    rt.shutdown().await;
    assert!(standin.pods(NS).is_empty(), "{:?}", standin.pods(NS));
    assert!(
        standin.secret_names(NS).is_empty(),
        "the credential Secrets go with their pods: {:?}",
        standin.secret_names(NS)
    );
    assert!(
        events.try_recv().is_err(),
        "deletions the runtime made itself are not deaths"
    );
}

/// `flotilla up` as a child process, with its stderr passed through.
struct Master {
    child: std::process::Child,
    url: String,
}

impl Master {
    fn start(manifest: &str, kubeconfig: &str, envs: &[(&str, &str)]) -> Master {
        let state = fresh_state_dir();
        let args = ["--port", "0", "--state-dir", state.to_str().unwrap()];
        Self::start_with(manifest, kubeconfig, envs, &args)
    }

    /// `flotilla up --runtime kubernetes` with `args` (port, state
    /// directory...).
    fn start_with(
        manifest: &str,
        kubeconfig: &str,
        envs: &[(&str, &str)],
        args: &[&str],
    ) -> Master {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let manifest = temp_file(&format!("k8s-cluster-{n}.yaml"), manifest);
        let kubeconfig = temp_file(&format!("k8s-kubeconfig-{n}.yaml"), kubeconfig);
        let mut cmd = Command::new(bin("flotilla"));
        cmd.arg("up")
            .arg(&manifest)
            .args(["--runtime", "kubernetes"])
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env(
                "RUST_LOG",
                std::env::var("FLOTILLA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start flotilla up");
        let url = read_banner_url(&mut child);
        Master { child, url }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Ctrl-C, as a user would; waits for the master to exit.
    fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const E2E_MANIFEST: &str = r#"
apiVersion: flotilla.dev/v1
kind: Cluster
metadata: { name: e2e }
spec:
  image: flotilla-worker:0.1.0
  imagePullPolicy: Never
  workerResources: { cpuPerCapacity: 0.25, memory: 256Mi }
  # Pods never run here, so workers never register: keep the heartbeat
  # timeout out of the way of what is tested.
  heartbeat: { intervalSeconds: 60, timeoutSeconds: 300 }
  workers:
    - capacity: 4
    - capacity: 2
"#;

// The master is a child process this test waits for; the stand-in keeps
// serving it on the other thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_flotilla_up_runtime_kubernetes_stop_deletes_and_recreates_the_pod() {
    let standin = KubeApiStandin::start().await;
    let master = Master::start(
        E2E_MANIFEST,
        &standin.kubeconfig(NS),
        &[
            ("FLOTILLA_ADVERTISE_URL", "http://e2e:5000"),
            // As the chart passes them from the downward API.
            ("FLOTILLA_POD_NAME", "e2e-master-0"),
            ("FLOTILLA_POD_UID", "uid-of-the-master-pod"),
        ],
    );
    let pods = standin
        .wait_for_pods(NS, WAIT, "two worker pods", |p| p.len() == 2)
        .await
        .unwrap();
    assert_eq!(names(&pods), ["e2e-worker-0", "e2e-worker-1"]);
    assert_eq!(env_of(&pods[0])["FLOTILLA_MASTER_URL"], "http://e2e:5000");
    assert_eq!(
        pods[0]["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod",
                "name": "e2e-master-0", "uid": "uid-of-the-master-pod"}]),
        "garbage-collected with the master's pod"
    );
    assert_eq!(
        pods[1]["spec"]["containers"][0]["resources"]["limits"]["cpu"],
        "500m"
    );
    assert_eq!(pods[1]["spec"]["containers"][0]["imagePullPolicy"], "Never");
    let (pod0, pod1) = (uid(&pods[0]), uid(&pods[1]));

    // `/stop/0` deletes pod 0; the master creates it again, same name.
    let (status, body) = master.post("/stop/0", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let pods = standin
        .wait_for_pods(NS, WAIT, "e2e-worker-0 recreated", |p| {
            p.iter()
                .any(|p| p["metadata"]["name"] == "e2e-worker-0" && uid(p) != pod0)
        })
        .await
        .unwrap();
    assert_eq!(names(&pods), ["e2e-worker-0", "e2e-worker-1"]);
    assert_eq!(incarnation(&pods[0]), "2");
    assert_eq!(uid(&pods[1]), pod1, "worker 1 untouched");

    // `kubectl delete pod e2e-worker-1`: noticed by the watch, recreated.
    standin.delete_pod(NS, "e2e-worker-1");
    let pods = standin
        .wait_for_pods(NS, WAIT, "e2e-worker-1 recreated", |p| {
            p.iter()
                .any(|p| p["metadata"]["name"] == "e2e-worker-1" && uid(p) != pod1)
        })
        .await
        .unwrap();
    assert_eq!(names(&pods), ["e2e-worker-0", "e2e-worker-1"]);

    // `/add` creates a third pod, CPU from its capacity.
    let (status, body) = master.post("/add", json!({"max_capacity": 8})).await;
    assert_eq!(status, 200, "{body}");
    let pods = standin
        .wait_for_pods(NS, WAIT, "e2e-worker-2 created", |p| p.len() == 3)
        .await
        .unwrap();
    assert_eq!(
        pods[2]["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "2000m"
    );

    // Ctrl-C: the master deletes its pods on the way out.
    assert!(master.interrupt().success());
    assert!(
        standin.pods(NS).is_empty(),
        "{:?}",
        names(&standin.pods(NS))
    );
}

// The master is a child process this test waits for; the stand-in keeps
// serving it on the other thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_bad_values_fail_at_start_naming_them() {
    let standin = KubeApiStandin::start().await;
    let kubeconfig = temp_file("k8s-bad-kubeconfig.yaml", &standin.kubeconfig(NS));
    let run = |manifest: &str, args: &[&str], envs: &[(&str, &str)]| {
        let path = temp_file("k8s-bad.yaml", manifest);
        let mut cmd = Command::new(bin("flotilla"));
        cmd.arg("up")
            .arg(&path)
            .args(["--port", "0", "--ephemeral"])
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            !out.status.success(),
            "{manifest} {args:?} {envs:?} started"
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let k8s = "--runtime=kubernetes";

    let err = run(
        &E2E_MANIFEST.replace("image: flotilla-worker:0.1.0", "image: \"\""),
        &[k8s],
        &[],
    );
    assert!(err.contains("spec.image is empty"), "{err}");
    let err = run(
        &E2E_MANIFEST.replace("capacity: 2", "capacity: 0"),
        &[k8s],
        &[],
    );
    assert!(err.contains("capacity 0"), "{err}");
    let err = run(E2E_MANIFEST, &["--runtime=nomad"], &[]);
    assert!(err.contains("nomad"), "{err}");
    let err = run(E2E_MANIFEST, &[k8s], &[("FLOTILLA_RELEASE", "Not_A_Name")]);
    assert!(err.contains("`Not_A_Name`"), "{err}");
    let err = run(
        &E2E_MANIFEST.replace("imagePullPolicy: Never", "imagePullPolicy: Sometimes"),
        &[k8s],
        &[],
    );
    assert!(err.contains("`Sometimes`"), "{err}");
    assert!(standin.pods(NS).is_empty());
}

/// Runs `flotilla ARGS` against the stand-in (through `kubeconfig`),
/// expecting it to end within 30 s; returns (success, stdout, stderr).
fn flotilla_at(kubeconfig: &str, args: &[&str]) -> (bool, String, String) {
    let kubeconfig = temp_file("k8s-owner-kubeconfig.yaml", kubeconfig);
    let mut child = Command::new(bin("flotilla"))
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flotilla {args:?} still running after 30 s");
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

fn holder(standin: &KubeApiStandin) -> String {
    standin.lease(NS, "e2e-owner").expect("the release's Lease")["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// One owner per release: the master holds a Lease `<release>-owner` and
/// renews it; a second master of the release (another state directory)
/// refuses to start, naming the first, and no pod is deleted or created; a
/// master that took over from a SIGKILLed one holds the Lease next; the
/// Lease is handed back on Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_a_second_master_of_the_release_refuses_and_touches_no_pod() {
    // Its pods run (as worker processes), so they can be seen serving.
    let standin = KubeApiStandin::start_with_kubelet(bin("flotilla-worker")).await;
    let kubeconfig = standin.kubeconfig(NS);
    let port = flotilla_e2e::free_port().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let envs = [("FLOTILLA_ADVERTISE_URL", url.as_str())];
    let first_state = fresh_state_dir();
    let first = Master::start_with(
        E2E_MANIFEST,
        &kubeconfig,
        &envs,
        &[
            "--port",
            &port,
            "--state-dir",
            first_state.to_str().unwrap(),
        ],
    );
    let workers = active_workers(&url, 2).await;
    let pods = standin.pods(NS);
    let uids: Vec<String> = pods.iter().map(uid).collect();
    let first_pid = first.child.id();
    assert!(
        holder(&standin).ends_with(&format!("/{first_pid}")),
        "{}",
        holder(&standin)
    );
    let lease = standin.lease(NS, "e2e-owner").unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    let renewed = lease["spec"]["renewTime"].clone();

    let manifest = temp_file("k8s-owner.yaml", E2E_MANIFEST);
    let second_state = fresh_state_dir();
    let pod_requests = |standin: &KubeApiStandin| {
        standin
            .requests()
            .into_iter()
            .filter(|r| (r.starts_with("POST") || r.starts_with("DELETE")) && r.contains("/pods"))
            .count()
    };
    let writes_before = pod_requests(&standin);
    let (ok, _, err) = flotilla_at(
        &kubeconfig,
        &[
            "up",
            manifest.to_str().unwrap(),
            "--port",
            "0",
            "--runtime",
            "kubernetes",
            "--state-dir",
            second_state.to_str().unwrap(),
        ],
    );
    assert!(!ok, "the second master started: {err}");
    for expected in [
        "cluster `e2e` is owned by a live master".to_string(),
        format!("pid {first_pid} on host"),
        format!("API at {url}"),
        "Lease flotilla-test/e2e-owner".to_string(),
    ] {
        assert!(err.contains(&expected), "`{expected}` in: {err}");
    }
    let pods = standin.pods(NS);
    assert_eq!(pods.iter().map(uid).collect::<Vec<_>>(), uids, "same pods");
    assert_eq!(
        pod_requests(&standin),
        writes_before,
        "the refused master neither created nor deleted a pod"
    );
    // Its workers untouched: same incarnations, still serving.
    assert_eq!(active_workers(&url, 2).await, workers);
    for node in 0..2 {
        let (status, sent) = first
            .post(
                &format!("/send/{node}"),
                json!({"type": "python", "command": "response = self.node_id"}),
            )
            .await;
        assert_eq!(status, 200, "{sent}");
        let task = get_json(&format!("{url}/tasks/{}?wait=30", sent["task_id"])).await;
        assert_eq!(task["state"], "succeeded", "{task}");
        assert_eq!(task["result"]["response"], node);
    }

    // The owner renews its Lease (every third of its 15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while standin.lease(NS, "e2e-owner").unwrap()["spec"]["renewTime"] == renewed {
        assert!(Instant::now() < deadline, "the Lease was never renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `flotilla down` refuses while the owner lives.
    let (ok, _, err) = flotilla_at(
        &kubeconfig,
        &[
            "down",
            manifest.to_str().unwrap(),
            "--runtime",
            "kubernetes",
            "--state-dir",
            second_state.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("refusing: cluster `e2e` is owned by a live master"),
        "{err}"
    );
    assert_eq!(standin.pods(NS).iter().map(uid).collect::<Vec<_>>(), uids);

    // SIGKILLed: its Lease is still fresh, but its process is gone, so the
    // next master takes the Lease over at once.
    drop(first);
    let next_state = fresh_state_dir();
    let next = Master::start_with(
        E2E_MANIFEST,
        &kubeconfig,
        &envs,
        &["--port", &port, "--state-dir", next_state.to_str().unwrap()],
    );
    let next_pid = next.child.id();
    // (Nothing to adopt: its state directory is new, so it replaces them.)
    standin
        .wait_for_pods(NS, WAIT, "two new worker pods", |p| {
            p.len() == 2 && p.iter().all(|p| !uids.contains(&uid(p)))
        })
        .await
        .unwrap();
    assert!(
        holder(&standin).ends_with(&format!("/{next_pid}")),
        "{}",
        holder(&standin)
    );
    assert_eq!(
        standin.lease(NS, "e2e-owner").unwrap()["spec"]["leaseTransitions"],
        1
    );
    // Ctrl-C: pods deleted, the Lease handed back.
    let status = next.interrupt();
    assert!(status.success(), "{status:?}");
    assert!(standin.pods(NS).is_empty());
    assert_eq!(holder(&standin), "");
}

/// `flotilla down` deletes the pods a SIGKILLed master left, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_flotilla_down_deletes_the_pods_a_dead_master_left() {
    let standin = KubeApiStandin::start().await;
    let kubeconfig = standin.kubeconfig(NS);
    let master = Master::start(E2E_MANIFEST, &kubeconfig, &[]);
    standin
        .wait_for_pods(NS, WAIT, "two worker pods", |p| p.len() == 2)
        .await
        .unwrap();
    drop(master); // SIGKILL: the pods stay
    assert_eq!(standin.pods(NS).len(), 2);
    let manifest = temp_file("k8s-down.yaml", E2E_MANIFEST);
    let state = fresh_state_dir();
    let (ok, out, err) = flotilla_at(
        &kubeconfig,
        &[
            "down",
            manifest.to_str().unwrap(),
            "--runtime",
            "kubernetes",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("removed 2 workers")
            && out.contains("pod flotilla-test/e2e-worker-0")
            && out.contains("pod flotilla-test/e2e-worker-1"),
        "{out}"
    );
    assert!(standin.pods(NS).is_empty());
    assert!(
        standin.secret_names(NS).is_empty(),
        "down deletes the credential Secrets too: {:?}",
        standin.secret_names(NS)
    );
    assert_eq!(holder(&standin), "", "down hands the Lease back");
    let (ok, out, err) = flotilla_at(
        &kubeconfig,
        &[
            "down",
            manifest.to_str().unwrap(),
            "--runtime",
            "kubernetes",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("no worker left to remove"), "{out}");
}

/// The decoded credential in worker `id`'s Secret of release `release`.
fn credential_of(standin: &KubeApiStandin, release: &str, id: u32) -> String {
    let secret = standin
        .secret(NS, &format!("{release}-worker-{id}"))
        .expect("the worker's Secret");
    let data = base64_decode(secret["data"]["credential"].as_str().unwrap()).unwrap();
    String::from_utf8(data).unwrap()
}

/// The per-incarnation credential reaches a worker pod through its Secret
/// (`valueFrom.secretKeyRef`, resolved by the stand-in's kubelet as a real
/// one does) and never through the Pod object: the workers register with
/// it; task code finds it neither in its environment nor in any
/// `/proc/*/environ` or `cmdline` it can read (the worker's own is closed to
/// it); a restart writes the next incarnation's credential into the same
/// Secret; Ctrl-C deletes pods and Secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_worker_credentials_are_in_secrets_not_in_pods_nor_in_reach_of_tasks() {
    let standin = KubeApiStandin::start_with_kubelet(bin("flotilla-worker")).await;
    let kubeconfig = standin.kubeconfig(NS);
    let port = flotilla_e2e::free_port().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let state = fresh_state_dir();
    let manifest = "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: cred }\nspec:\n  heartbeat: { intervalSeconds: 1, timeoutSeconds: 10 }\n  workers: [{ capacity: 2 }, { capacity: 2 }]\n";
    let args = [
        "--port",
        port.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let envs = [("FLOTILLA_ADVERTISE_URL", url.as_str())];
    let master = Master::start_with(manifest, &kubeconfig, &envs, &args);
    assert_eq!(
        active_workers(&url, 2).await,
        [(0, 1, 0), (1, 1, 0)],
        "both workers registered with the credential from their Secret"
    );
    let first = credential_of(&standin, "cred", 0);
    assert!(first.starts_with("0.1."), "{first}");
    for pod in standin.pods(NS) {
        let text = pod.to_string();
        for id in 0..2 {
            let credential = credential_of(&standin, "cred", id);
            assert!(!text.contains(&credential), "a credential in pod {text}");
        }
    }

    let (status, body) = master
        .post(
            "/send/0",
            json!({"type": "python", "command": concat!(
                "import os, re, glob\n",
                "seen = list(os.environ.keys()) + list(os.environ.values())\n",
                "for p in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):\n",
                "    try:\n",
                "        seen.append(open(p, 'rb').read().decode('utf-8', 'replace'))\n",
                "    except OSError:\n",
                "        pass\n",
                "try:\n",
                "    open('/proc/%d/environ' % os.getppid(), 'rb').read()\n",
                "    worker = 'readable'\n",
                "except OSError as e:\n",
                "    worker = type(e).__name__\n",
                "text = '\\n'.join(seen)\n",
                "response = [sorted(set(re.findall(r'\\d+\\.\\d+\\.[0-9a-f]{64}', text))), 'FLOTILLA_WORKER_SECRET' in '\\n'.join(os.environ), worker]\n",
            )}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["task_id"].as_u64().unwrap();
    let t = get_json(&format!("{url}/tasks/{id}?wait=30")).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let r = &t["result"]["response"];
    let found: Vec<&str> = r[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for id in 0..2 {
        let credential = credential_of(&standin, "cred", id);
        assert!(
            !found.contains(&credential.as_str()),
            "task code read {credential}: {t}"
        );
    }
    assert_eq!(r[1], false, "{t}");
    // The worker is non-dumpable: its environ is closed to tasks of its
    // user. (A root task, as here when the tests run as root, may open it,
    // and the scan above shows the credential is not there either: the
    // worker overwrote it.)
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap();
    if !root {
        assert_eq!(
            r[2], "PermissionError",
            "the worker's environ is closed to tasks: {t}"
        );
    }

    // `/stop/0`: the next incarnation gets its own credential, in the same
    // Secret, and registers with it.
    let (status, body) = master.post("/stop/0", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while active_workers(&url, 2).await[0].1 != 2 {
        assert!(Instant::now() < deadline, "worker 0 never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = credential_of(&standin, "cred", 0);
    assert!(second.starts_with("0.2."), "{second}");
    assert_ne!(first, second);

    assert!(master.interrupt().success());
    assert!(standin.pods(NS).is_empty());
    assert!(
        standin.secret_names(NS).is_empty(),
        "{:?}",
        standin.secret_names(NS)
    );
}

const ADD_ONE: &str = "import time\ntotal = request_write_resource('total')\ntotal.value += 1\nrelease_write_resource('total')\ntime.sleep(0.15)\nresponse = total.value";

/// Follows the completion feed from the start until `want` tasks are in it.
async fn feed(url: &str, want: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let (mut all, mut next) = (Vec::new(), 0u64);
    while all.len() < want && Instant::now() < deadline {
        let body: Value = reqwest::get(format!("{url}/tasks/finished?after={next}&wait=5"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all.extend(body["tasks"].as_array().unwrap().iter().cloned());
        next = body["next"].as_u64().unwrap();
    }
    all
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// (id, incarnation, restarts) of each worker, once all are active.
async fn active_workers(url: &str, count: usize) -> Vec<(u64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = get_json(&format!("{url}/nodes")).await;
        let nodes = nodes.as_array().unwrap();
        if nodes.len() == count && nodes.iter().all(|n| n["state"] == "active") {
            return nodes
                .iter()
                .map(|n| {
                    (
                        n["id"].as_u64().unwrap(),
                        n["incarnation"].as_u64().unwrap(),
                        n["restarts"].as_u64().unwrap(),
                    )
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "workers not all active: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pod creations and deletions the API server was asked for.
fn pod_writes(standin: &KubeApiStandin) -> Vec<String> {
    standin
        .requests()
        .into_iter()
        .filter(|r| (r.starts_with("POST") || r.starts_with("DELETE")) && r.contains("/pods"))
        .collect()
}

/// A master restart on Kubernetes deletes and creates no pod: the stand-in
/// runs its pods (as processes of the worker binary); 60 tasks each add 1 to
/// an Integer under a write lock on 3 workers of 2 slots; the master is
/// SIGKILLed after about 20 have finished and started again on the same
/// state directory and address. Every task succeeds exactly once, the total
/// is 60 at version 60, the new master adopted the same pods (same UIDs, same
/// incarnations, no restart) and asked the API server for no pod creation or
/// deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_a_master_restart_deletes_or_creates_no_pod() {
    const TASKS: usize = 60;
    let standin = KubeApiStandin::start_with_kubelet(bin("flotilla-worker")).await;
    let kubeconfig = standin.kubeconfig(NS);
    let port = flotilla_e2e::free_port().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let state = fresh_state_dir();
    let manifest = "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: adopt }\nspec:\n  heartbeat: { intervalSeconds: 1, timeoutSeconds: 10 }\n  workers: [{ capacity: 2 }, { capacity: 2 }, { capacity: 2 }]\n  resources:\n    - { name: total, type: Integer, initialValue: 0 }\n";
    let args = [
        "--port",
        port.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
        "--slots",
        "2",
    ];
    // The pods reach the master where a Service would route them.
    let envs = [("FLOTILLA_ADVERTISE_URL", url.as_str())];
    let mut first = Master::start_with(manifest, &kubeconfig, &envs, &args);
    let workers = active_workers(&url, 3).await;
    let pods = standin.pods(NS);
    let uids: Vec<String> = pods.iter().map(uid).collect();
    assert_eq!(uids.len(), 3);

    let tasks: Vec<Value> = (0..TASKS)
        .map(|_| json!({"type": "python", "command": ADD_ONE}))
        .collect();
    let (status, body) = first.post("/tasks", json!({ "tasks": tasks })).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u64> = body["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let before = feed(&url, 20, Duration::from_secs(60)).await;
    assert!(before.len() >= 20, "only {} finished", before.len());

    let writes = pod_writes(&standin);
    let _ = first.child.kill(); // SIGKILL, the master only
    let _ = first.child.wait();
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(
            standin.pod_process(NS, name).is_some(),
            "pod {name} stopped with its master"
        );
    }

    let second = Master::start_with(manifest, &kubeconfig, &envs, &args);
    let after = feed(&second.url, TASKS, Duration::from_secs(120)).await;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for t in &after {
        *seen.entry(t["id"].as_u64().unwrap()).or_default() += 1;
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "task {id} once in the feed");
    }
    assert_eq!(after.len(), TASKS);
    let total = get_json(&format!("{url}/resources/total")).await;
    assert_eq!(total["value"], TASKS, "{total}");
    assert_eq!(total["version"], TASKS, "{total}");

    assert_eq!(
        pod_writes(&standin),
        writes,
        "the new master created or deleted no pod"
    );
    assert_eq!(standin.pods(NS).iter().map(uid).collect::<Vec<_>>(), uids);
    assert_eq!(
        active_workers(&url, 3).await,
        workers,
        "same incarnations, no restart"
    );

    // SIGTERM leaves the pods to the next master, which adopts them too.
    let mut second = second;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(second.child.wait().unwrap().success());
    let third = Master::start_with(manifest, &kubeconfig, &envs, &args);
    assert_eq!(active_workers(&third.url, 3).await, workers);
    assert_eq!(pod_writes(&standin), writes, "no pod created or deleted");
    assert_eq!(standin.pods(NS).iter().map(uid).collect::<Vec<_>>(), uids);
    let (status, body) = third
        .post(
            "/send",
            json!({"type": "python", "command": "response = 7"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    drop(third);
}

/// In a pod run by a Deployment, worker pods are owned by that Deployment
/// (found through the master's pod and its ReplicaSet), not by the master's
/// pod: a replaced master pod leaves them to the next master, and deleting
/// the Deployment (`helm uninstall`) deletes them.
#[tokio::test]
async fn standin_api_server_worker_pods_are_owned_by_the_masters_deployment() {
    let standin = KubeApiStandin::start().await;
    let master_pod = standin.put_pod(
        NS,
        json!({"metadata": {"name": "flotilla-7d9-x2", "labels": {"app.kubernetes.io/component": "master"},
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                "name": "flotilla-7d9", "uid": "rs-uid", "controller": true}]},
               "spec": {"containers": [{"name": "master", "image": "flotilla-master:0.1.0"}]}}),
    );
    standin.put_replicaset(
        NS,
        json!({"metadata": {"name": "flotilla-7d9", "uid": "rs-uid",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                "name": "flotilla", "uid": "deployment-uid", "controller": true,
                                "blockOwnerDeletion": true}]}}),
    );
    let mut s = settings("demo");
    let pod_uid = uid(&master_pod);
    s.owner = Some(("flotilla-7d9-x2".into(), pod_uid.clone()));
    // As from_spec gives it (FLOTILLA_POD_NAME, FLOTILLA_POD_UID): the pod.
    s.worker_owner = Some(
        serde_json::from_value(json!(
            {"apiVersion": "v1", "kind": "Pod", "name": "flotilla-7d9-x2", "uid": pod_uid}
        ))
        .unwrap(),
    );
    let mut config = kube::Config::new(standin.url().parse().unwrap());
    config.default_namespace = NS.into();
    let (tx, _rx) = unbounded_channel();
    let rt = KubernetesRuntime::connect_with(config, s, tx)
        .await
        .unwrap();
    rt.start(launch(0, 1, 1)).await.unwrap();
    let pod = standin.pod(NS, "demo-worker-0").unwrap();
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "flotilla", "uid": "deployment-uid"}])
    );

    // A master pod no Deployment runs (or whose ReplicaSet cannot be read)
    // owns its workers itself.
    let mut s = settings("solo");
    s.owner = Some(("flotilla-7d9-x2".into(), pod_uid.clone()));
    s.worker_owner = Some(
        serde_json::from_value(json!(
            {"apiVersion": "v1", "kind": "Pod", "name": "flotilla-7d9-x2", "uid": pod_uid}
        ))
        .unwrap(),
    );
    standin.put_replicaset(
        NS,
        json!({"metadata": {"name": "flotilla-7d9", "uid": "rs-uid"}}),
    );
    let mut config = kube::Config::new(standin.url().parse().unwrap());
    config.default_namespace = NS.into();
    let (tx, _rx) = unbounded_channel();
    let rt = KubernetesRuntime::connect_with(config, s, tx)
        .await
        .unwrap();
    rt.start(launch(0, 1, 1)).await.unwrap();
    let pod = standin.pod(NS, "solo-worker-0").unwrap();
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Pod");
}

/// A master whose Lease another master took over (this one was not heard
/// from for the lease: a partition, a long pause) stops at once and leaves
/// the pods, which are the new owner's now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_server_a_master_that_lost_its_lease_stops_and_leaves_its_pods() {
    let standin = KubeApiStandin::start().await;
    let kubeconfig = standin.kubeconfig(NS);
    let mut master = Master::start(
        E2E_MANIFEST,
        &kubeconfig,
        &[("FLOTILLA_ADVERTISE_URL", "http://e2e:5000")],
    );
    let pods = standin
        .wait_for_pods(NS, WAIT, "two worker pods", |p| p.len() == 2)
        .await
        .unwrap();
    let uids: Vec<String> = pods.iter().map(uid).collect();
    let mut lease = standin.lease(NS, "e2e-owner").unwrap();
    lease["spec"]["holderIdentity"] = json!("elsewhere/1");
    lease["metadata"]["annotations"]["flotilla.dev/owner"] = json!(json!({
        "session": "another", "host": "elsewhere", "pid": 1, "since": 0,
        "address": "http://10.0.0.9:5000"
    })
    .to_string());
    standin.put_lease(NS, lease);
    // Noticed at its next renewal (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = master.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the master did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert_eq!(
        standin.pods(NS).iter().map(uid).collect::<Vec<_>>(),
        uids,
        "its pods are left to the new owner"
    );
    assert_eq!(holder(&standin), "elsewhere/1");
}
