//! A stand-in for the Kubernetes API server, for pods only. It is NOT a
//! cluster: no real cluster can run on the machine these tests run on (no
//! kind or minikube, no registry), so the Kubernetes runtime is tested
//! against this instead. It speaks the real REST paths and watch protocol of
//! `/api/v1/namespaces/{ns}/pods`, as much as the runtime (kube-rs' `Api`,
//! `watcher` and `await_condition`) uses:
//!
//! - `POST` creates a pod (`409 AlreadyExists` on a duplicate name), giving
//!   it a UID, a resourceVersion and `status.phase: Pending`;
//! - `GET` lists (label and field selectors with `=`, `==`, `!=`; a
//!   `PodList` carrying the list's resourceVersion; one page: a real server
//!   also ignores `limit` for `resourceVersion=0`);
//! - `GET ?watch=true` streams newline-delimited `WatchEvent`s (`ADDED`,
//!   `MODIFIED`, `DELETED`) after the given resourceVersion (or the current
//!   pods as `ADDED` for none or `0`), a `BOOKMARK` with the current
//!   resourceVersion when `allowWatchBookmarks=true`, and ends after
//!   `timeoutSeconds`, as the real one does; a resourceVersion older than the
//!   kept history gets an `ERROR` event with `410 Expired`, as from a real
//!   server whose history was compacted (see
//!   [`KubeApiStandin::lose_watches_and_compact`]);
//! - `GET {name}` reads one pod; `DELETE {name}` removes it at once (honouring
//!   `preconditions.uid` with `409 Conflict`) and sends `DELETED`. A real API
//!   server also deletes at once a pod that was never bound to a node, which
//!   is every pod here.
//!
//! - ReplicaSets (`apps/v1`): `GET {name}` of those the test puts
//!   ([`KubeApiStandin::put_replicaset`]), to find the master's Deployment;
//! - Leases (`coordination.k8s.io/v1`, what a master claims its release
//!   with): `POST` creates (`409 AlreadyExists`), `GET {name}` reads, `PUT
//!   {name}` replaces only with the current `metadata.resourceVersion`
//!   (else `409 Conflict`, the optimistic concurrency every Lease client
//!   relies on).
//! - Secrets (`v1`, the workers' credentials): `POST` creates (`409
//!   AlreadyExists`; `data` must be base64, as the real server checks),
//!   `GET {name}` reads, `PATCH {name}` with a JSON merge patch
//!   (`application/merge-patch+json`, RFC 7386; other patch types `415`),
//!   `DELETE {name}` removes. A pod's `env[].valueFrom.secretKeyRef` is
//!   resolved when its worker process starts, as the kubelet does: a
//!   missing Secret or key (not `optional`) leaves the container waiting
//!   with `CreateContainerConfigError`, the kubelet's reason.
//!
//! Pods never run, and the test plays the kubelet with
//! [`KubeApiStandin::set_pod_status`], unless the stand-in is started with
//! [`KubeApiStandin::start_with_kubelet`]: then each pod created runs at once
//! as a local process of the worker binary with the pod's environment (no
//! image, no container: a process, as the process runtime runs workers),
//! `phase: Running`; deleting the pod kills the process's group, and a
//! process that ends by itself makes its pod `Failed` with the exit code,
//! as a kubelet reports a container that ended under `restartPolicy: Never`.
//!
//! Errors are `Status` objects with the real reasons. Nothing else exists:
//! no scheduler, no graceful deletion, no
//! authentication, no periodic bookmarks or compaction, no other resources or
//! verbs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// The stand-in server, listening on 127.0.0.1; stopped on drop.
pub struct KubeApiStandin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

struct Shared {
    state: Mutex<ApiState>,
    /// Fires on every change to the pods.
    changed: Notify,
    /// With a kubelet: the worker binary each pod runs.
    kubelet: Option<std::path::PathBuf>,
    /// The running pods' processes, by (namespace, name): (pod UID, PID).
    processes: Mutex<HashMap<(String, String), (String, u32)>>,
}

#[derive(Default)]
struct ApiState {
    resource_version: u64,
    next_uid: u64,
    /// (namespace, name) -> the pod as a GET returns it.
    pods: BTreeMap<(String, String), Value>,
    /// The events since `compacted`, for watches that resume from a
    /// resourceVersion.
    history: Vec<Recorded>,
    /// Watches from before this resourceVersion get `410 Expired`.
    compacted: u64,
    watches: Vec<Watch>,
    /// `METHOD path?query` of every request, in order.
    requests: Vec<String>,
    /// (namespace, name) -> the Lease as a GET returns it.
    leases: BTreeMap<(String, String), Value>,
    /// (namespace, name) -> a ReplicaSet (read only: see `put_replicaset`).
    replicasets: BTreeMap<(String, String), Value>,
    /// (namespace, name) -> the Secret as a GET returns it.
    secrets: BTreeMap<(String, String), Value>,
}

struct Recorded {
    resource_version: u64,
    namespace: String,
    kind: &'static str,
    object: Value,
}

struct Watch {
    namespace: String,
    labels: Selector,
    fields: Selector,
    lines: mpsc::UnboundedSender<Bytes>,
}

/// `key=value`, `key==value` and `key!=value` terms, all of which must hold.
#[derive(Clone, Default)]
struct Selector(Vec<(String, bool, String)>);

impl Selector {
    fn parse(raw: Option<&String>) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for term in raw.map(String::as_str).unwrap_or("").split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "stand-in: only =, == and != selectors are supported, not `{term}`"
                ));
            };
            terms.push((key.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(Selector(terms))
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0
            .iter()
            .all(|(key, equal, value)| (get(key).as_deref() == Some(value.as_str())) == *equal)
    }
}

fn label_of(pod: &Value, key: &str) -> Option<String> {
    pod["metadata"]["labels"][key].as_str().map(String::from)
}

fn field_of(pod: &Value, field: &str) -> Option<String> {
    match field {
        "metadata.name" => pod["metadata"]["name"].as_str().map(String::from),
        "metadata.namespace" => pod["metadata"]["namespace"].as_str().map(String::from),
        "status.phase" => pod["status"]["phase"].as_str().map(String::from),
        _ => None,
    }
}

const SUPPORTED_FIELDS: [&str; 3] = ["metadata.name", "metadata.namespace", "status.phase"];

impl Watch {
    fn wants(&self, namespace: &str, pod: &Value) -> bool {
        self.namespace == namespace
            && self.labels.matches(|k| label_of(pod, k))
            && self.fields.matches(|f| field_of(pod, f))
    }
}

/// A `Status` error as the API server sends it.
fn status_error(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"kind": "pods"},
        "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// RFC 3339 in UTC, as `metav1.Time` is written.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl ApiState {
    /// Records an event and sends it to every watch that selects the pod.
    fn emit(&mut self, namespace: &str, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        self.watches
            .retain(|w| !w.wants(namespace, &object) || w.lines.send(line.clone()).is_ok());
        self.history.push(Recorded {
            resource_version: self.resource_version,
            namespace: namespace.to_string(),
            kind,
            object,
        });
    }

    fn bump(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Removes a pod at once and sends `DELETED`.
    fn remove(&mut self, namespace: &str, name: &str) -> Option<Value> {
        let mut pod = self
            .pods
            .remove(&(namespace.to_string(), name.to_string()))?;
        pod["metadata"]["resourceVersion"] = json!(self.bump());
        self.emit(namespace, "DELETED", pod.clone());
        Some(pod)
    }
}

impl KubeApiStandin {
    pub async fn start() -> KubeApiStandin {
        Self::start_inner(None).await
    }

    /// A stand-in whose pods run, each as a process of `worker_bin` (see the
    /// module comment).
    pub async fn start_with_kubelet(worker_bin: std::path::PathBuf) -> KubeApiStandin {
        Self::start_inner(Some(worker_bin)).await
    }

    /// The PID of the process running pod `name`, while it runs.
    pub fn pod_process(&self, namespace: &str, name: &str) -> Option<u32> {
        let procs = self.shared.processes.lock().unwrap();
        procs
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(_, pid)| *pid)
    }

    async fn start_inner(kubelet: Option<std::path::PathBuf>) -> KubeApiStandin {
        let shared = Arc::new(Shared {
            state: Mutex::new(ApiState::default()),
            changed: Notify::new(),
            kubelet,
            processes: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_or_watch).post(create),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(read).delete(delete),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/replicasets/{name}",
                get(read_replicaset),
            )
            .route(
                "/api/v1/namespaces/{ns}/secrets",
                axum::routing::post(create_secret),
            )
            .route(
                "/api/v1/namespaces/{ns}/secrets/{name}",
                get(read_secret).patch(patch_secret).delete(delete_secret),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                axum::routing::post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(read_lease).put(replace_lease),
            )
            .fallback(|method: Method, uri: Uri| async move {
                status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("stand-in: {method} {uri} is not served (pods only)"),
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                record_request,
            ))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        KubeApiStandin {
            addr,
            shared,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at the stand-in, with `namespace` as the
    /// context's default.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: {namespace}\ncurrent-context: standin\nusers:\n- name: standin\n  user: {{}}\n",
            self.url()
        )
    }

    /// The pods of `namespace`, by name.
    pub fn pods(&self, namespace: &str) -> Vec<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .pods
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, pod)| pod.clone())
            .collect()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// What `kubectl delete pod NAME` does to a pod no node runs.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let removed = self
            .shared
            .state
            .lock()
            .unwrap()
            .remove(namespace, name)
            .is_some();
        stop_pod(&self.shared, namespace, name);
        self.shared.changed.notify_waiters();
        removed
    }

    /// Plays the kubelet: replaces a pod's status (e.g. `phase: Failed`).
    pub fn set_pod_status(&self, namespace: &str, name: &str, status: Value) {
        let mut state = self.shared.state.lock().unwrap();
        let rv = state.bump();
        let key = (namespace.to_string(), name.to_string());
        let pod = state.pods.get_mut(&key).expect("no such pod");
        pod["status"] = status;
        pod["metadata"]["resourceVersion"] = json!(rv);
        let pod = pod.clone();
        state.emit(namespace, "MODIFIED", pod);
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Plays `kubectl create`: a pod made by someone else than the runtime.
    pub fn put_pod(&self, namespace: &str, pod: Value) -> Value {
        let mut state = self.shared.state.lock().unwrap();
        let created = admit(&mut state, namespace, pod)
            .unwrap_or_else(|(_, _, message)| panic!("the stand-in refused the pod: {message}"));
        drop(state);
        self.shared.changed.notify_waiters();
        created
    }

    /// A watch outage that outlasts the server's event history: every open
    /// watch is closed, pod `name` is deleted meanwhile, and the history is
    /// compacted, all at once; a watcher resuming from its resourceVersion
    /// then gets `410 Expired` and must list again to learn what it missed.
    pub fn lose_watches_and_compact(&self, namespace: &str, name: &str) {
        let mut state = self.shared.state.lock().unwrap();
        state.watches.clear();
        state.remove(namespace, name).expect("no such pod");
        state.history.clear();
        state.compacted = state.resource_version + 1;
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Plays the Deployment controller: a ReplicaSet (its metadata is what
    /// matters), read back with `GET`.
    pub fn put_replicaset(&self, namespace: &str, mut set: Value) {
        let name = set["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        set["kind"] = json!("ReplicaSet");
        set["apiVersion"] = json!("apps/v1");
        set["metadata"]["namespace"] = json!(namespace);
        let mut state = self.shared.state.lock().unwrap();
        set["metadata"]["resourceVersion"] = json!(state.bump());
        state.replicasets.insert((namespace.to_string(), name), set);
    }

    /// Plays another Lease client: replaces Lease `lease` (matched by its
    /// namespace and name), with a new resourceVersion.
    pub fn put_lease(&self, namespace: &str, mut lease: Value) {
        let name = lease["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let mut state = self.shared.state.lock().unwrap();
        lease["metadata"]["resourceVersion"] = json!(state.bump());
        state.leases.insert((namespace.to_string(), name), lease);
    }

    /// The Lease `name` of `namespace`, as a GET returns it.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The Secret `name` of `namespace`, as a GET returns it.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The names of the Secrets of `namespace`.
    pub fn secret_names(&self, namespace: &str) -> Vec<String> {
        let state = self.shared.state.lock().unwrap();
        state
            .secrets
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// Waits (without polling) until `ready` holds for the pods of
    /// `namespace`; returns them.
    pub async fn wait_for_pods(
        &self,
        namespace: &str,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pods = self.pods(namespace);
            if ready(&pods) {
                return Ok(pods);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let names: Vec<String> = pods.iter().map(describe).collect();
                bail!("stand-in: {what}: not so after {timeout:?}; pods: {names:?}");
            }
        }
    }
}

/// `name (incarnation N, uid U)`, for failure messages.
pub fn describe(pod: &Value) -> String {
    format!(
        "{} (incarnation {}, uid {})",
        pod["metadata"]["name"].as_str().unwrap_or("?"),
        pod["metadata"]["labels"]["flotilla.dev/incarnation"]
            .as_str()
            .unwrap_or("?"),
        pod["metadata"]["uid"].as_str().unwrap_or("?")
    )
}

impl Drop for KubeApiStandin {
    fn drop(&mut self) {
        self.server.abort();
        let all: Vec<(String, u32)> = self
            .shared
            .processes
            .lock()
            .unwrap()
            .drain()
            .map(|(_, p)| p)
            .collect();
        for (_, pid) in all {
            kill_group(pid);
        }
    }
}

async fn record_request(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let line = format!("{} {}", req.method(), req.uri());
    shared.state.lock().unwrap().requests.push(line);
    next.run(req).await
}

/// Why the API server refuses something: code, reason, message.
type Refusal = (StatusCode, &'static str, String);

/// Validates and stores a new pod; sends `ADDED`.
fn admit(state: &mut ApiState, namespace: &str, mut pod: Value) -> Result<Value, Refusal> {
    if !pod.is_object() {
        return Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a Pod object".into(),
        ));
    }
    if let Some(kind) = pod["kind"].as_str() {
        if kind != "Pod" {
            return Err((
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("kind {kind} posted to pods"),
            ));
        }
    }
    let Some(name) = pod["metadata"]["name"].as_str().map(String::from) else {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Pod \"\" is invalid: metadata.name: Required value (generateName is not supported by the stand-in)".into(),
        ));
    };
    if let Some(ns) = pod["metadata"]["namespace"].as_str() {
        if ns != namespace {
            return Err((
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
    }
    if !matches!(pod["spec"]["containers"].as_array(), Some(c) if !c.is_empty()) {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("Pod \"{name}\" is invalid: spec.containers: Required value"),
        ));
    }
    let key = (namespace.to_string(), name.clone());
    if state.pods.contains_key(&key) {
        return Err((
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("pods \"{name}\" already exists"),
        ));
    }
    state.next_uid += 1;
    let rv = state.bump();
    pod["kind"] = json!("Pod");
    pod["apiVersion"] = json!("v1");
    let meta = &mut pod["metadata"];
    meta["namespace"] = json!(namespace);
    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", state.next_uid));
    meta["resourceVersion"] = json!(rv);
    meta["creationTimestamp"] = json!(now_rfc3339());
    pod["status"] = json!({"phase": "Pending"});
    state.pods.insert(key, pod.clone());
    state.emit(namespace, "ADDED", pod.clone());
    Ok(pod)
}

async fn create(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(pod) = serde_json::from_slice::<Value>(&body) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        );
    };
    let created = admit(&mut shared.state.lock().unwrap(), &ns, pod);
    let created = match created {
        Ok(pod) if shared.kubelet.is_some() => Ok(run_pod(&shared, &ns, pod)),
        other => other,
    };
    shared.changed.notify_waiters();
    match created {
        Ok(pod) => (StatusCode::CREATED, Json(pod)).into_response(),
        Err((code, reason, message)) => status_error(code, reason, message),
    }
}

async fn read(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let state = shared.state.lock().unwrap();
    match state.pods.get(&(ns, name.clone())) {
        Some(pod) => Json(pod.clone()).into_response(),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        ),
    }
}

async fn delete(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "DeleteOptions is not JSON".into(),
                )
            }
        }
    };
    let mut state = shared.state.lock().unwrap();
    let Some(pod) = state.pods.get(&(ns.clone(), name.clone())) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        );
    };
    if let Some(want) = options["preconditions"]["uid"].as_str() {
        let has = pod["metadata"]["uid"].as_str().unwrap_or("");
        if want != has {
            return status_error(
                StatusCode::CONFLICT,
                "Conflict",
                format!("Operation cannot be fulfilled on Pod \"{name}\": Precondition failed: UID in precondition: {want}, UID in object meta: {has}"),
            );
        }
    }
    let removed = state.remove(&ns, &name).expect("present");
    drop(state);
    stop_pod(&shared, &ns, &name);
    shared.changed.notify_waiters();
    Json(removed).into_response()
}

async fn list_or_watch(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let labels = Selector::parse(q.get("labelSelector"));
    let fields = Selector::parse(q.get("fieldSelector"));
    let (labels, fields) = match (labels, fields) {
        (Ok(l), Ok(f)) => (l, f),
        (Err(e), _) | (_, Err(e)) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    if let Some((field, _, _)) = fields
        .0
        .iter()
        .find(|(f, _, _)| !SUPPORTED_FIELDS.contains(&f.as_str()))
    {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("field label not supported: {field}"),
        );
    }
    let watch = Watch {
        namespace: ns,
        labels,
        fields,
        lines: mpsc::unbounded_channel().0,
    };
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !is_watch {
        let state = shared.state.lock().unwrap();
        let items: Vec<Value> = state
            .pods
            .iter()
            .filter(|((pod_ns, _), pod)| watch.wants(pod_ns, pod))
            .map(|(_, pod)| {
                // Items of a list carry no kind or apiVersion of their own.
                let mut item = pod.clone();
                let obj = item.as_object_mut().unwrap();
                obj.remove("kind");
                obj.remove("apiVersion");
                item
            })
            .collect();
        return Json(json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        }))
        .into_response();
    }
    let since: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("resourceVersion `{rv}` is not a number"),
                )
            }
        },
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::unbounded_channel();
    {
        // Replay and subscribe under one lock: no event falls in between.
        let mut state = shared.state.lock().unwrap();
        match since {
            Some(rv) if rv < state.compacted => {
                let expired = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {rv} ({})", state.compacted)});
                let _ = tx.send(event_line("ERROR", &expired));
                // Not subscribed: the stream ends after the error.
                drop(tx);
                return watch_response(rx, timeout);
            }
            None => {
                for ((pod_ns, _), pod) in &state.pods {
                    if watch.wants(pod_ns, pod) {
                        let _ = tx.send(event_line("ADDED", pod));
                    }
                }
            }
            Some(rv) => {
                for e in state.history.iter().filter(|e| e.resource_version > rv) {
                    if watch.wants(&e.namespace, &e.object) {
                        let _ = tx.send(event_line(e.kind, &e.object));
                    }
                }
            }
        }
        if bookmarks {
            let mark = json!({"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": state.resource_version.to_string()}});
            let _ = tx.send(event_line("BOOKMARK", &mark));
        }
        state.watches.push(Watch { lines: tx, ..watch });
    }
    watch_response(rx, timeout)
}

/// A streaming response of the watch's lines, ended after `timeout`.
fn watch_response(rx: mpsc::UnboundedReceiver<Bytes>, timeout: Duration) -> Response {
    let deadline = tokio::time::Instant::now() + timeout;
    let lines = futures::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => Some((Ok::<_, std::convert::Infallible>(line), rx)),
            // Timed out (the watch ends, as timeoutSeconds says) or dropped.
            _ => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .unwrap()
}

async fn create_lease(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        );
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(String::from) else {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Lease \"\" is invalid: metadata.name: Required value".into(),
        );
    };
    let mut state = shared.state.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if state.leases.contains_key(&key) {
        return status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    state.next_uid += 1;
    let rv = state.bump();
    lease["kind"] = json!("Lease");
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    let meta = &mut lease["metadata"];
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(format!("00000000-0000-4000-9000-{:012x}", state.next_uid));
    meta["resourceVersion"] = json!(rv);
    meta["creationTimestamp"] = json!(now_rfc3339());
    state.leases.insert(key, lease.clone());
    (StatusCode::CREATED, Json(lease)).into_response()
}

async fn read_lease(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let state = shared.state.lock().unwrap();
    match state.leases.get(&(ns, name.clone())) {
        Some(lease) => Json(lease.clone()).into_response(),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

async fn replace_lease(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        );
    };
    let mut state = shared.state.lock().unwrap();
    let key = (ns.clone(), name.clone());
    let Some(current) = state.leases.get(&key) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        );
    };
    let has = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("");
    let sent = lease["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if sent != has {
        return status_error(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        );
    }
    let (uid, created) = (
        current["metadata"]["uid"].clone(),
        current["metadata"]["creationTimestamp"].clone(),
    );
    let rv = state.bump();
    lease["kind"] = json!("Lease");
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    let meta = &mut lease["metadata"];
    meta["namespace"] = json!(ns);
    meta["uid"] = uid;
    meta["creationTimestamp"] = created;
    meta["resourceVersion"] = json!(rv);
    state.leases.insert(key, lease.clone());
    Json(lease).into_response()
}

/// SIGKILLs a pod's process and everything under it (its interpreters lead
/// process groups of their own), as a container's end takes all it ran.
fn kill_group(pid: u32) {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut doomed = vec![pid];
    let mut i = 0;
    while i < doomed.len() {
        doomed.extend(parents.get(&doomed[i]).cloned().unwrap_or_default());
        i += 1;
    }
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    for p in doomed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The kubelet: runs a just-admitted pod as a process of the worker binary
/// with the pod's environment, marks it `Running`, and follows the process:
/// when it ends by itself the pod is `Failed` with its exit code.
fn run_pod(shared: &Arc<Shared>, namespace: &str, pod: Value) -> Value {
    use std::os::unix::process::CommandExt;
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let mut cmd = std::process::Command::new(shared.kubelet.as_ref().expect("a kubelet"));
    // The container's environment starts empty but for what the pod gives
    // it (and PATH, as an image's config would).
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let resolved = {
        let state = shared.state.lock().unwrap();
        container_env(&state, namespace, &pod)
    };
    let status = match resolved {
        Err(message) => json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": message}}}]}),
        Ok(vars) => {
            cmd.envs(vars);
            cmd.stdin(std::process::Stdio::null()).process_group(0);
            spawn_pod(shared, namespace, &name, &uid, cmd)
        }
    };
    let mut state = shared.state.lock().unwrap();
    let rv = state.bump();
    let key = (namespace.to_string(), name);
    let Some(stored) = state.pods.get_mut(&key) else {
        return pod;
    };
    stored["status"] = status;
    stored["metadata"]["resourceVersion"] = json!(rv);
    let stored = stored.clone();
    state.emit(namespace, "MODIFIED", stored.clone());
    stored
}

/// The environment of a pod's (first) container, as the kubelet builds it:
/// `value`s as they are, `valueFrom.secretKeyRef` read from the Secret (its
/// base64 `data` decoded). A Secret or key that is missing and not
/// `optional` is an error, the kubelet's message.
fn container_env(
    state: &ApiState,
    namespace: &str,
    pod: &Value,
) -> Result<Vec<(String, String)>, String> {
    let mut vars = Vec::new();
    for e in pod["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(k) = e["name"].as_str() else {
            continue;
        };
        if let Some(v) = e["value"].as_str() {
            vars.push((k.to_string(), v.to_string()));
            continue;
        }
        let r = &e["valueFrom"]["secretKeyRef"];
        let (Some(secret), Some(key)) = (r["name"].as_str(), r["key"].as_str()) else {
            continue;
        };
        let optional = r["optional"].as_bool().unwrap_or(false);
        let found = state
            .secrets
            .get(&(namespace.to_string(), secret.to_string()));
        let value = match found {
            None if optional => continue,
            None => return Err(format!("secret \"{secret}\" not found")),
            Some(s) => match s["data"][key].as_str() {
                None if optional => continue,
                None => {
                    return Err(format!(
                        "couldn't find key {key} in Secret {namespace}/{secret}"
                    ))
                }
                Some(b64) => base64_decode(b64)
                    .ok_or_else(|| format!("secret {secret} key {key}: not base64"))?,
            },
        };
        vars.push((k.to_string(), String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(vars)
}

/// Starts a pod's process and follows it; returns the pod's status.
fn spawn_pod(
    shared: &Arc<Shared>,
    namespace: &str,
    name: &str,
    uid: &str,
    mut cmd: std::process::Command,
) -> Value {
    let name = name.to_string();
    let uid = uid.to_string();
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            shared
                .processes
                .lock()
                .unwrap()
                .insert((namespace.to_string(), name.clone()), (uid.clone(), pid));
            let (shared, ns, pod_name, pod_uid) = (
                shared.clone(),
                namespace.to_string(),
                name.clone(),
                uid.clone(),
            );
            std::thread::spawn(move || {
                let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(137);
                let mut procs = shared.processes.lock().unwrap();
                let key = (ns.clone(), pod_name.clone());
                if procs.get(&key).is_some_and(|(u, _)| *u == pod_uid) {
                    procs.remove(&key);
                    drop(procs);
                    ended(&shared, &ns, &pod_name, &pod_uid, code);
                }
            });
            json!({"phase": "Running"})
        }
        Err(e) => json!({"phase": "Failed", "reason": "StartError", "message": e.to_string()}),
    }
}

/// A pod's process ended by itself: the pod is `Failed` with its exit code.
fn ended(shared: &Arc<Shared>, namespace: &str, name: &str, uid: &str, code: i32) {
    let mut state = shared.state.lock().unwrap();
    let key = (namespace.to_string(), name.to_string());
    if state
        .pods
        .get(&key)
        .and_then(|p| p["metadata"]["uid"].as_str())
        != Some(uid)
    {
        return;
    }
    let rv = state.bump();
    let pod = state.pods.get_mut(&key).expect("present");
    pod["status"] = json!({"phase": "Failed", "containerStatuses": [{
        "name": "worker", "image": "", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]});
    pod["metadata"]["resourceVersion"] = json!(rv);
    let pod = pod.clone();
    state.emit(namespace, "MODIFIED", pod);
    drop(state);
    shared.changed.notify_waiters();
}

/// The pod is gone: its process goes too.
fn stop_pod(shared: &Arc<Shared>, namespace: &str, name: &str) {
    let gone = shared
        .processes
        .lock()
        .unwrap()
        .remove(&(namespace.to_string(), name.to_string()));
    if let Some((_, pid)) = gone {
        kill_group(pid);
    }
}

async fn read_replicaset(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let state = shared.state.lock().unwrap();
    match state.replicasets.get(&(ns, name.clone())) {
        Some(set) => Json(set.clone()).into_response(),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("replicasets.apps \"{name}\" not found"),
        ),
    }
}

async fn create_secret(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(mut secret) = serde_json::from_slice::<Value>(&body) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        );
    };
    let Some(name) = secret["metadata"]["name"].as_str().map(String::from) else {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Secret \"\" is invalid: metadata.name: Required value".into(),
        );
    };
    if let Err(message) = check_secret_data(&name, &secret) {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    }
    let mut state = shared.state.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if state.secrets.contains_key(&key) {
        return status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("secrets \"{name}\" already exists"),
        );
    }
    state.next_uid += 1;
    let rv = state.bump();
    secret["kind"] = json!("Secret");
    secret["apiVersion"] = json!("v1");
    let meta = &mut secret["metadata"];
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(format!("00000000-0000-4000-a000-{:012x}", state.next_uid));
    meta["resourceVersion"] = json!(rv);
    meta["creationTimestamp"] = json!(now_rfc3339());
    state.secrets.insert(key, secret.clone());
    (StatusCode::CREATED, Json(secret)).into_response()
}

/// `data` values must be base64, as the real API server checks.
fn check_secret_data(name: &str, secret: &Value) -> Result<(), String> {
    for (key, value) in secret["data"].as_object().into_iter().flatten() {
        let ok = value.as_str().and_then(base64_decode).is_some();
        if !ok {
            return Err(format!(
                "Secret \"{name}\" is invalid: data[{key}]: not base64"
            ));
        }
    }
    Ok(())
}

async fn read_secret(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let state = shared.state.lock().unwrap();
    match state.secrets.get(&(ns, name.clone())) {
        Some(secret) => Json(secret.clone()).into_response(),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("secrets \"{name}\" not found"),
        ),
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let obj = target.as_object_mut().expect("an object");
    for (k, v) in fields {
        if v.is_null() {
            obj.remove(k);
        } else {
            merge_patch(obj.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

async fn patch_secret(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let kind = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if kind != "application/merge-patch+json" {
        return status_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the stand-in serves merge patches only, not `{kind}`"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON".into(),
        );
    };
    let mut state = shared.state.lock().unwrap();
    let key = (ns, name.clone());
    let Some(current) = state.secrets.get(&key) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("secrets \"{name}\" not found"),
        );
    };
    let mut patched = current.clone();
    merge_patch(&mut patched, &patch);
    // What identifies the object stays.
    for field in ["name", "namespace", "uid", "creationTimestamp"] {
        patched["metadata"][field] = current["metadata"][field].clone();
    }
    if let Err(message) = check_secret_data(&name, &patched) {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    }
    patched["metadata"]["resourceVersion"] = json!(state.bump());
    state.secrets.insert(key, patched.clone());
    Json(patched).into_response()
}

async fn delete_secret(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let mut state = shared.state.lock().unwrap();
    match state.secrets.remove(&(ns, name.clone())) {
        Some(secret) => Json(secret).into_response(),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("secrets \"{name}\" not found"),
        ),
    }
}

/// Standard base64 with padding (RFC 4648), as Secret `data` is encoded;
/// `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n: u32 = 0;
        for &c in &chunk[..4 - pad] {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            n = n << 6 | v;
        }
        n <<= 6 * pad as u32;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad]);
    }
    Some(out)
}
