//! The manifest loader: one entry point for the seed's scenario form
//! (`system:`, exactly as the original system read it) and the native Kubernetes-style form
//! (`apiVersion: flotilla.dev/v1`, `kind: Cluster`). Both become one
//! [`ClusterSpec`]. Unknown keys are errors that name the key and its line.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::resources::{ResourceSpec, ResourceType};

pub const API_VERSION: &str = "flotilla.dev/v1";
/// What Kubernetes accepts as a container's `imagePullPolicy`.
pub const IMAGE_PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];
/// The seed's default capacity for a node (`/add` without a body).
pub const DEFAULT_CAPACITY: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {problem}")]
    Invalid {
        origin: String,
        problem: Box<SpecError>,
    },
}

/// What is wrong with a manifest's content; each message names the field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("not valid YAML: {0}")]
    NotYaml(serde_yaml::Error),
    /// A key or value the format does not have (the message names it and its line).
    #[error("{0}")]
    Shape(serde_yaml::Error),
    #[error("line {line}: collections nested more than {MAX_NESTING} levels deep")]
    TooDeep { line: usize },
    #[error("spec.workerResources.{0}")]
    Memory(QuantityError),
    #[error("{field} must be a positive number of seconds, got {value}")]
    Seconds { field: &'static str, value: f64 },
    #[error("requests[{index}].endpoint: {source}")]
    Endpoint { index: usize, source: EndpointError },
    #[error("shared resource `{name}`: {source}")]
    Value {
        name: String,
        source: crate::resources::ResourceError,
    },
    /// A value breaking a rule; the message names the field and states the rule.
    #[error("{0}")]
    Rule(String),
}

/// A memory quantity that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("memory `{0}` is not a quantity like 512Mi or 1Gi")]
    NotANumber(String),
    #[error("memory `{raw}` has an unknown unit `{unit}` (use Ki, Mi, Gi, K, M or G)")]
    UnknownUnit { raw: String, unit: String },
}

/// A scenario endpoint that is not an http(s) URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an http:// URL")]
pub struct EndpointError(pub String);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Process,
    Docker,
    Kubernetes,
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "process" => Ok(RuntimeKind::Process),
            "docker" => Ok(RuntimeKind::Docker),
            "kubernetes" => Ok(RuntimeKind::Kubernetes),
            other => Err(format!(
                "unknown runtime `{other}`: expected process, docker or kubernetes"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

/// One entry of `requests`: sent `times` times, sleeping `sleep` seconds
/// after each send.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub endpoint: String,
    #[serde(default = "one")]
    pub times: u32,
    #[serde(default = "post")]
    pub method: Method,
    #[serde(default)]
    pub sleep: f64,
    #[serde(default)]
    pub body: Option<Value>,
}

fn one() -> u32 {
    1
}
fn post() -> Method {
    Method::Post
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerResources {
    /// CPU cores per unit of queue capacity (Docker/Kubernetes quota).
    pub cpu_per_capacity: f64,
    pub memory_bytes: u64,
}

impl Default for WorkerResources {
    fn default() -> Self {
        WorkerResources {
            cpu_per_capacity: 0.25,
            memory_bytes: 512 << 20,
        }
    }
}

/// A cluster as the rest of Flotilla sees it, whichever form it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    pub runtime: RuntimeKind,
    pub image: Option<String>,
    /// `spec.imagePullPolicy` of worker pods (Kubernetes runtime):
    /// `Always`, `IfNotPresent` or `Never`; unset: the cluster's default.
    pub image_pull_policy: Option<String>,
    pub network: Option<String>,
    pub worker_resources: WorkerResources,
    /// One entry per worker, in ID order: its capacity.
    pub capacities: Vec<usize>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_attempts: u32,
    /// `spec.taskTimeoutSeconds`: how long a task that gives no `timeout`
    /// may run (each attempt). Unset: no limit.
    pub task_timeout: Option<f64>,
    /// `spec.maxWorkers` (default 64): `/add` beyond it is refused.
    pub max_workers: usize,
    pub resources: Vec<ResourceSpec>,
    pub requests: Vec<RequestSpec>,
    pub otlp_endpoint: Option<String>,
    /// `spec.telemetry.workerOtlpEndpoint`: the OTLP/HTTP endpoint workers
    /// export to, when they cannot reach the master's (a loopback address
    /// seen from a container). Unset: the master's, a loopback host
    /// rewritten by the Docker runtime to the network's gateway.
    pub worker_otlp_endpoint: Option<String>,
    /// `spec.telemetry.jaegerUrl`: the Jaeger UI the dashboard links each
    /// task's trace to (`<url>/trace/<trace id>`).
    pub jaeger_url: Option<String>,
    /// `spec.telemetry.sampleRatio` (0 to 1, default 1): the share of tasks
    /// whose traces are exported (a parent-based ratio sampler on each
    /// task's root span; workers follow the task's decision).
    /// `OTEL_TRACES_SAMPLER` wins when set.
    pub sample_ratio: f64,
    /// `spec.workerPods`: scheduling and extra settings of worker pods
    /// (Kubernetes runtime only).
    pub worker_pods: WorkerPods,
    /// `spec.fileRoot`: the directory File resources' `path`s must be in.
    /// Unset: no File resource may name a path.
    pub file_root: Option<std::path::PathBuf>,
    /// `spec.resultTtlSeconds`: how long a finished task's result stays
    /// readable (default 24 h); past it `GET /tasks/{id}` answers 410.
    pub result_ttl: Duration,
    /// `spec.masterGraceSeconds` (default 60): how long a worker that has
    /// lost its master keeps running its tasks and retrying, for the next
    /// master to adopt it; then it stops by itself.
    pub master_grace: Duration,
    /// `spec.stateDir`: where `flotilla up` keeps the durable state (the
    /// CLI's `--state-dir` wins; default `.flotilla/<name>`).
    pub state_dir: Option<std::path::PathBuf>,
    /// `spec.memoryRetention`: how many finished tasks stay in the master's
    /// memory, and how long (default 10,000 and 60 s).
    pub retention: crate::cluster::Retention,
}

/// `spec.workerPods`: copied into every worker pod the Kubernetes runtime
/// creates, with the PodSpec's own field names and types (checked when the
/// manifest loads).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkerPods {
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    #[serde(default)]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    #[serde(default)]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
    /// Extra variables of the worker container (tasks inherit them).
    #[serde(default)]
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    #[serde(default)]
    pub volumes: Vec<k8s_openapi::api::core::v1::Volume>,
    #[serde(default)]
    pub volume_mounts: Vec<k8s_openapi::api::core::v1::VolumeMount>,
}

impl ClusterSpec {
    fn defaults(name: String) -> Self {
        ClusterSpec {
            name,
            runtime: RuntimeKind::Process,
            image: None,
            image_pull_policy: None,
            network: None,
            worker_resources: WorkerResources::default(),
            capacities: Vec::new(),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            max_attempts: 3,
            task_timeout: None,
            max_workers: crate::cluster::DEFAULT_MAX_WORKERS,
            resources: Vec::new(),
            requests: Vec::new(),
            otlp_endpoint: None,
            worker_otlp_endpoint: None,
            sample_ratio: 1.0,
            jaeger_url: None,
            worker_pods: WorkerPods::default(),
            file_root: None,
            state_dir: None,
            result_ttl: Duration::from_secs(24 * 3600),
            master_grace: Duration::from_secs(60),
            retention: crate::cluster::Retention::default(),
        }
    }
}

// ----- seed form -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    system: SeedSystem,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedSystem {
    node_quantity: usize,
    #[serde(default)]
    node_capacities: Option<Vec<usize>>,
    #[serde(default)]
    shared_resources: Vec<SeedResource>,
    #[serde(default)]
    requests: Vec<RequestSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedResource {
    name: String,
    #[serde(rename = "type")]
    kind: ResourceType,
    #[serde(default)]
    values: ResourceValues,
}

/// The seed's `values` of a shared resource, in a scenario file and in the
/// body of `POST /resource` alike.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourceValues {
    #[serde(default)]
    pub initial_value: Option<Value>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
}

impl ResourceValues {
    pub fn into_spec(self, name: String, kind: ResourceType) -> ResourceSpec {
        ResourceSpec {
            name,
            kind,
            initial_value: self.initial_value.unwrap_or(Value::Null),
            path: self.path,
            mode: self.mode,
        }
    }
}

// ----- native form -----------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeFile {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: NativeSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeSpec {
    #[serde(default)]
    runtime: Option<RuntimeKind>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    image_pull_policy: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    worker_resources: Option<NativeWorkerResources>,
    #[serde(default)]
    heartbeat: Option<NativeHeartbeat>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    state_dir: Option<String>,
    #[serde(default)]
    result_ttl_seconds: Option<f64>,
    #[serde(default)]
    master_grace_seconds: Option<f64>,
    memory_retention: Option<NativeRetention>,
    #[serde(default)]
    task_timeout_seconds: Option<f64>,
    #[serde(default)]
    max_workers: Option<usize>,
    workers: Vec<NativeWorker>,
    #[serde(default)]
    resources: Vec<NativeResource>,
    #[serde(default)]
    requests: Vec<RequestSpec>,
    #[serde(default)]
    telemetry: Option<NativeTelemetry>,
    #[serde(default)]
    worker_pods: WorkerPods,
    #[serde(default)]
    file_root: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeWorkerResources {
    #[serde(default)]
    cpu_per_capacity: Option<f64>,
    #[serde(default)]
    memory: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeHeartbeat {
    #[serde(default)]
    interval_seconds: Option<f64>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeWorker {
    capacity: usize,
    #[serde(default = "one")]
    replicas: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeResource {
    name: String,
    #[serde(rename = "type")]
    kind: ResourceType,
    #[serde(default)]
    initial_value: Option<Value>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeTelemetry {
    #[serde(default)]
    otlp_endpoint: Option<String>,
    #[serde(default)]
    worker_otlp_endpoint: Option<String>,
    #[serde(default)]
    jaeger_url: Option<String>,
    #[serde(default)]
    sample_ratio: Option<f64>,
}

/// Parses `"512Mi"`, `"1Gi"`, `"500M"`, `"1048576"` into bytes.
pub fn parse_memory(raw: &str) -> Result<u64, QuantityError> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| QuantityError::NotANumber(raw.to_string()))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => {
            return Err(QuantityError::UnknownUnit {
                raw: raw.to_string(),
                unit: other.to_string(),
            })
        }
    };
    Ok(n * mult)
}

pub fn load_file(path: &Path) -> Result<ClusterSpec, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses either form. `origin` names the source in error messages.
pub fn parse(text: &str, origin: &str) -> Result<ClusterSpec, ManifestError> {
    let invalid = |problem: SpecError| ManifestError::Invalid {
        origin: origin.to_string(),
        problem: Box::new(problem),
    };
    check_nesting(text).map_err(invalid)?;
    let probe: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid(SpecError::NotYaml(e)))?;
    let Some(map) = probe.as_mapping() else {
        return Err(invalid(SpecError::Rule("a manifest is a YAML mapping: either `system:` (the seed form) or `apiVersion: flotilla.dev/v1` with `kind: Cluster`".into())));
    };
    let spec = if map.contains_key("apiVersion") {
        let file: NativeFile =
            serde_yaml::from_str(text).map_err(|e| invalid(SpecError::Shape(e)))?;
        from_native(file).map_err(invalid)?
    } else if map.contains_key("system") {
        let file: SeedFile =
            serde_yaml::from_str(text).map_err(|e| invalid(SpecError::Shape(e)))?;
        from_seed(file.system).map_err(invalid)?
    } else {
        let keys: Vec<String> = map
            .keys()
            .map(|k| {
                serde_yaml::to_string(k)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .collect();
        return Err(invalid(SpecError::Rule(format!(
            "unknown top-level key(s) {keys:?}: expected `system` (the seed form) or `apiVersion`, `kind`, `metadata`, `spec` (the native form)"
        ))));
    };
    validate(&spec).map_err(invalid)?;
    Ok(spec)
}

/// The deepest `[`/`{` nesting a manifest may use. The YAML parser takes
/// time quadratic in the nesting of flow collections before it gives up at
/// its own recursion limit, so deeper text is refused by a linear scan first.
pub const MAX_NESTING: usize = 64;

/// Refuses flow collections nested deeper than [`MAX_NESTING`] (brackets
/// inside quoted strings and comments do not count).
fn check_nesting(text: &str) -> Result<(), SpecError> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    let mut prev = '\n';
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\n') => line += 1,
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"') | (None, '\'') if !prev.is_alphanumeric() => quote = Some(c),
            (None, '#') if prev.is_whitespace() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            (None, '[') | (None, '{') => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(SpecError::TooDeep { line });
                }
            }
            (None, ']') | (None, '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

fn from_seed(system: SeedSystem) -> Result<ClusterSpec, SpecError> {
    let capacities = match system.node_capacities {
        None => vec![DEFAULT_CAPACITY; system.node_quantity],
        Some(c) if c.len() == system.node_quantity => c,
        Some(c) => {
            return Err(SpecError::Rule(format!(
                "system.node_capacities has {} entries but system.node_quantity is {}: give one capacity per node",
                c.len(),
                system.node_quantity
            )))
        }
    };
    let mut spec = ClusterSpec::defaults("flotilla".into());
    spec.capacities = capacities;
    spec.requests = system.requests;
    spec.resources = system
        .shared_resources
        .into_iter()
        .map(|r| r.values.into_spec(r.name, r.kind))
        .collect();
    Ok(spec)
}

fn from_native(file: NativeFile) -> Result<ClusterSpec, SpecError> {
    if file.api_version != API_VERSION {
        return Err(SpecError::Rule(format!(
            "apiVersion `{}` is not supported: use `{API_VERSION}`",
            file.api_version
        )));
    }
    if file.kind != "Cluster" {
        return Err(SpecError::Rule(format!(
            "kind `{}` is not supported: use `Cluster`",
            file.kind
        )));
    }
    let s = file.spec;
    let mut spec = ClusterSpec::defaults(file.metadata.name);
    if let Some(r) = s.runtime {
        spec.runtime = r;
    }
    spec.image = s.image;
    spec.image_pull_policy = s.image_pull_policy;
    spec.network = s.network;
    if let Some(wr) = s.worker_resources {
        if let Some(c) = wr.cpu_per_capacity {
            spec.worker_resources.cpu_per_capacity = c;
        }
        if let Some(m) = wr.memory {
            spec.worker_resources.memory_bytes = parse_memory(&m).map_err(SpecError::Memory)?;
        }
    }
    if let Some(hb) = s.heartbeat {
        if let Some(i) = hb.interval_seconds {
            spec.heartbeat_interval = seconds("spec.heartbeat.intervalSeconds", i)?;
        }
        if let Some(t) = hb.timeout_seconds {
            spec.heartbeat_timeout = seconds("spec.heartbeat.timeoutSeconds", t)?;
        }
    }
    if let Some(m) = s.max_attempts {
        spec.max_attempts = m;
    }
    if let Some(t) = s.result_ttl_seconds {
        spec.result_ttl = seconds("spec.resultTtlSeconds", t)?;
    }
    match s.master_grace_seconds {
        Some(t) => spec.master_grace = seconds("spec.masterGraceSeconds", t)?,
        // The default is 60 s, or two heartbeat intervals if longer.
        None => spec.master_grace = spec.master_grace.max(spec.heartbeat_interval * 2),
    }
    if let Some(r) = s.memory_retention {
        if let Some(n) = r.finished_tasks {
            if n > MAX_RETAINED_TASKS {
                return Err(SpecError::Rule(format!(
                    "spec.memoryRetention.finishedTasks must be at most {MAX_RETAINED_TASKS}, got {n} (0 keeps none in memory once stored)"
                )));
            }
            spec.retention.finished_tasks = n as usize;
        }
        if let Some(t) = r.seconds {
            spec.retention.age = seconds("spec.memoryRetention.seconds", t)?;
        }
    }
    if let Some(d) = s.state_dir {
        if d.trim().is_empty() {
            return Err(SpecError::Rule(
                "spec.stateDir must not be empty (leave it out for the default .flotilla/<name>)"
                    .into(),
            ));
        }
        spec.state_dir = Some(d.into());
    }
    if let Some(t) = s.task_timeout_seconds {
        if !(t.is_finite() && t > 0.0 && t <= flotilla_proto::MAX_TASK_TIMEOUT_S) {
            return Err(SpecError::Rule(format!(
                "spec.taskTimeoutSeconds must be a number of seconds above 0 and at most {} (one week), got {t}",
                flotilla_proto::MAX_TASK_TIMEOUT_S
            )));
        }
        spec.task_timeout = Some(t);
    }
    if let Some(m) = s.max_workers {
        if m == 0 {
            return Err(SpecError::Rule("spec.maxWorkers must be at least 1".into()));
        }
        spec.max_workers = m;
    }
    for w in s.workers {
        for _ in 0..w.replicas {
            spec.capacities.push(w.capacity);
        }
    }
    spec.resources = s
        .resources
        .into_iter()
        .map(|r| ResourceSpec {
            name: r.name,
            kind: r.kind,
            initial_value: r.initial_value.unwrap_or(Value::Null),
            path: r.path,
            mode: r.mode,
        })
        .collect();
    spec.requests = s.requests;
    if let Some(t) = s.telemetry {
        spec.otlp_endpoint = t.otlp_endpoint;
        spec.worker_otlp_endpoint = t.worker_otlp_endpoint;
        spec.jaeger_url = t.jaeger_url;
        spec.sample_ratio = t.sample_ratio.unwrap_or(1.0);
    }
    spec.worker_pods = s.worker_pods;
    spec.file_root = s.file_root;
    Ok(spec)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NativeRetention {
    #[serde(default)]
    finished_tasks: Option<u64>,
    #[serde(default)]
    seconds: Option<f64>,
}

/// The most finished tasks `spec.memoryRetention.finishedTasks` may keep in
/// memory (about 600 bytes each, plus their results).
pub const MAX_RETAINED_TASKS: u64 = 10_000_000;

fn seconds(field: &'static str, v: f64) -> Result<Duration, SpecError> {
    // At most a year: larger values mean nothing and would overflow a Duration.
    if v.is_finite() && v > 0.0 && v <= 365.0 * 24.0 * 3600.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(SpecError::Seconds { field, value: v })
    }
}

fn validate(spec: &ClusterSpec) -> Result<(), SpecError> {
    if let Some(i) = spec.capacities.iter().position(|&c| c == 0) {
        return Err(SpecError::Rule(format!(
            "worker {i} has capacity 0: every capacity must be at least 1"
        )));
    }
    if spec.heartbeat_timeout <= spec.heartbeat_interval {
        return Err(SpecError::Rule(format!(
            "the heartbeat timeout ({:?}) must be longer than the heartbeat interval ({:?})",
            spec.heartbeat_timeout, spec.heartbeat_interval
        )));
    }
    if spec.master_grace < spec.heartbeat_interval * 2 {
        return Err(SpecError::Rule(format!(
            "spec.masterGraceSeconds ({:?}) must be at least twice the heartbeat interval ({:?}): a worker that hears nothing from its master for that long stops by itself",
            spec.master_grace, spec.heartbeat_interval
        )));
    }
    if spec.capacities.len() > spec.max_workers {
        return Err(SpecError::Rule(format!(
            "the manifest has {} workers, more than spec.maxWorkers ({})",
            spec.capacities.len(),
            spec.max_workers
        )));
    }
    if spec.max_attempts == 0 {
        return Err(SpecError::Rule("maxAttempts must be at least 1".into()));
    }
    let cpu = spec.worker_resources.cpu_per_capacity;
    if !cpu.is_finite() || cpu <= 0.0 {
        return Err(SpecError::Rule(
            "spec.workerResources.cpuPerCapacity must be greater than 0".into(),
        ));
    }
    if let Some(p) = &spec.image_pull_policy {
        if !IMAGE_PULL_POLICIES.contains(&p.as_str()) {
            return Err(SpecError::Rule(format!(
                "spec.imagePullPolicy `{p}` is not one of {}",
                IMAGE_PULL_POLICIES.join(", ")
            )));
        }
    }
    for (field, url) in [
        ("spec.telemetry.otlpEndpoint", &spec.otlp_endpoint),
        (
            "spec.telemetry.workerOtlpEndpoint",
            &spec.worker_otlp_endpoint,
        ),
    ] {
        if let Some(url) = url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SpecError::Rule(format!(
                    "{field} `{url}` is not an http:// or https:// URL (OTLP over HTTP, port 4318)"
                )));
            }
        }
    }
    if !(0.0..=1.0).contains(&spec.sample_ratio) {
        return Err(SpecError::Rule(format!(
            "spec.telemetry.sampleRatio {} is not between 0 and 1 (the share of tasks whose traces are exported: 1 all, 0.1 one in ten, 0 none)",
            spec.sample_ratio
        )));
    }
    if let Some(url) = &spec.jaeger_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(SpecError::Rule(format!(
                "spec.telemetry.jaegerUrl `{url}` is not an http:// or https:// URL (the Jaeger UI, e.g. http://localhost:16686)"
            )));
        }
    }
    let pods = &spec.worker_pods;
    for (i, var) in pods.env.iter().enumerate() {
        if var.name.starts_with("FLOTILLA_") {
            return Err(SpecError::Rule(format!(
                "spec.workerPods.env[{i}]: `{}` is reserved (the master sets FLOTILLA_* variables itself)",
                var.name
            )));
        }
    }
    for (i, mount) in pods.volume_mounts.iter().enumerate() {
        if !pods.volumes.iter().any(|v| v.name == mount.name) {
            return Err(SpecError::Rule(format!(
                "spec.workerPods.volumeMounts[{i}] names volume `{}`, which spec.workerPods.volumes does not define",
                mount.name
            )));
        }
    }
    if let Some(root) = &spec.file_root {
        if !root.is_absolute() {
            return Err(SpecError::Rule(format!(
                "spec.fileRoot `{}` must be an absolute path",
                root.display()
            )));
        }
    }
    let mut names = std::collections::HashSet::new();
    for r in &spec.resources {
        if r.name.is_empty() {
            return Err(SpecError::Rule(
                "a shared resource needs a non-empty name".into(),
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(SpecError::Rule(format!(
                "shared resource `{}` is defined twice",
                r.name
            )));
        }
        match (&r.path, r.kind) {
            (Some(_), ResourceType::File) if !r.initial_value.is_null() => {
                return Err(SpecError::Rule(format!(
                    "File resource `{}`: give either path or initial_value, not both",
                    r.name
                )))
            }
            (Some(path), ResourceType::File) if spec.file_root.is_none() => {
                return Err(SpecError::Rule(format!(
                    "File resource `{}`: path `{path}` needs spec.fileRoot, the directory File paths are confined to (native form), or give the content as initial_value",
                    r.name
                )))
            }
            (Some(_), ResourceType::File) => {}
            (Some(_), other) => {
                return Err(SpecError::Rule(format!(
                    "resource `{}`: path is only for File resources, not {}",
                    r.name,
                    other.name()
                )))
            }
            (None, kind) if !r.initial_value.is_null() => {
                kind.check(r.initial_value.clone())
                    .map_err(|source| SpecError::Value {
                        name: r.name.clone(),
                        source,
                    })?;
            }
            (None, _) => {}
        }
    }
    for (i, r) in spec.requests.iter().enumerate() {
        if !(r.sleep.is_finite() && r.sleep >= 0.0) {
            return Err(SpecError::Rule(format!(
                "requests[{i}].sleep must be a number of seconds >= 0, got {}",
                r.sleep
            )));
        }
        let path = endpoint_path(&r.endpoint)
            .map_err(|source| SpecError::Endpoint { index: i, source })?;
        if !path.starts_with('/') {
            return Err(SpecError::Rule(format!(
                "requests[{i}].endpoint `{}` has no path",
                r.endpoint
            )));
        }
    }
    Ok(())
}

/// The path (and query) of a scenario endpoint: `http://localhost:5000/send`
/// -> `/send`. The runner sends it to the master it started, wherever that
/// listens.
pub fn endpoint_path(endpoint: &str) -> Result<String, EndpointError> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| EndpointError(endpoint.to_string()))?;
    match rest.find('/') {
        Some(i) => Ok(rest[i..].to_string()),
        None => Ok("/".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
system:
  node_quantity: 3
  node_capacities: [3, 4, 5]
  shared_resources:
    - name: total
      type: Integer
      values: { initial_value: 0 }
  requests:
    - endpoint: http://localhost:5000/send
      times: 11
      method: POST
      sleep: 0
      body: { type: python, command: "response = 1" }
"#;

    #[test]
    fn the_master_grace_period_defaults_to_a_minute_and_outlasts_two_heartbeats() {
        let native = |spec: &str| {
            format!("apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{name: g}}\nspec:\n  workers: [{{capacity: 1}}]\n{spec}")
        };
        let grace = |spec: &str| parse(&native(spec), "g.yaml").map(|s| s.master_grace);
        assert_eq!(grace("").unwrap(), Duration::from_secs(60));
        assert_eq!(
            grace("  masterGraceSeconds: 10\n").unwrap(),
            Duration::from_secs(10)
        );
        // A long heartbeat interval lengthens the default...
        assert_eq!(
            grace("  heartbeat: {intervalSeconds: 45, timeoutSeconds: 90}\n").unwrap(),
            Duration::from_secs(90)
        );
        // ...and a grace period shorter than two intervals is refused.
        let err = grace(
            "  heartbeat: {intervalSeconds: 5, timeoutSeconds: 10}\n  masterGraceSeconds: 8\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec.masterGraceSeconds"), "{err}");
        assert!(err.contains("twice the heartbeat interval"), "{err}");
        assert_eq!(
            parse(SEED, "seed.yaml").unwrap().master_grace,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn deep_nesting_is_refused_at_once() {
        let deep = format!(
            "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{name: x}}\nspec:\n  workers: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let started = std::time::Instant::now();
        let err = parse(&deep, "deep").unwrap_err().to_string();
        assert!(
            err.contains("line 5: collections nested more than 64 levels deep"),
            "{err}"
        );
        // Linear: well under the parser's quadratic minute.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Brackets in strings and comments do not count.
        let fine = format!(
            "system:\n  node_quantity: 1  # {}\n  node_capacities: [2]\n  requests: [{{endpoint: \"http://x/send\", body: {{type: python, command: \"x = '{}'\"}}}}]\n",
            "[".repeat(100),
            "[".repeat(100)
        );
        parse(&fine, "fine").unwrap();
    }

    #[test]
    fn the_seed_form_loads() {
        let spec = parse(SEED, "seed.yaml").unwrap();
        assert_eq!(spec.capacities, vec![3, 4, 5]);
        assert_eq!(spec.runtime, RuntimeKind::Process);
        assert_eq!(spec.resources[0].kind, ResourceType::Integer);
        assert_eq!(spec.requests[0].times, 11);
        assert_eq!(spec.requests[0].body.as_ref().unwrap()["type"], "python");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let bad = SEED.replace("node_capacities", "node_capacity");
        let err = parse(&bad, "seed.yaml").unwrap_err().to_string();
        assert!(err.contains("node_capacity"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        let bad = SEED.replace("      sleep: 0", "      sleep: 0\n      retries: 2");
        let err = parse(&bad, "seed.yaml").unwrap_err().to_string();
        assert!(err.contains("retries") && err.contains("line"), "{err}");
    }

    #[test]
    fn mismatched_capacities_and_bad_types_are_explained() {
        let bad = SEED.replace("[3, 4, 5]", "[3, 4]");
        let err = parse(&bad, "s").unwrap_err().to_string();
        assert!(
            err.contains("node_capacities has 2 entries") && err.contains("node_quantity is 3"),
            "{err}"
        );
        let bad = SEED.replace("type: Integer", "type: Integr");
        let err = parse(&bad, "s").unwrap_err().to_string();
        assert!(err.contains("Integr"), "{err}");
        let err = parse("system: [1, 2", "s").unwrap_err().to_string();
        assert!(err.contains("not valid YAML"), "{err}");
        let err = parse("nodes: 3", "s").unwrap_err().to_string();
        assert!(err.contains("nodes") && err.contains("system"), "{err}");
    }

    const NATIVE: &str = "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: d }\nspec:\n  workers: [{ capacity: 1 }]\n";

    #[test]
    fn resource_values_of_the_wrong_type_are_refused_when_the_manifest_loads() {
        // `flotilla check` loads the manifest as `up` does: it refuses these too.
        let text = format!(
            "{NATIVE}  resources:\n    - {{ name: n, type: Integer, initialValue: zero }}\n"
        );
        let err = parse(&text, "m").unwrap_err().to_string();
        assert!(
            err.contains("shared resource `n`") && err.contains("Integer") && err.contains("zero"),
            "{err}"
        );
        let seed = SEED.replace("initial_value: 0", "initial_value: \"zero\"");
        let err = parse(&seed, "s").unwrap_err().to_string();
        assert!(err.contains("shared resource `total`"), "{err}");
    }

    #[test]
    fn file_paths_need_a_file_root_and_only_file_resources_take_them() {
        let text =
            format!("{NATIVE}  resources:\n    - {{ name: f, type: File, path: data.txt }}\n");
        let err = parse(&text, "m").unwrap_err().to_string();
        assert!(err.contains("spec.fileRoot"), "{err}");
        let rooted = text.replace("  resources:", "  fileRoot: /srv/data\n  resources:");
        let spec = parse(&rooted, "m").unwrap();
        assert_eq!(spec.file_root.as_deref(), Some(Path::new("/srv/data")));
        let relative = text.replace("  resources:", "  fileRoot: srv\n  resources:");
        assert!(parse(&relative, "m")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        let not_file = rooted.replace("type: File", "type: String");
        assert!(parse(&not_file, "m")
            .unwrap_err()
            .to_string()
            .contains("only for File"));
    }

    #[test]
    fn worker_pod_settings_and_the_worker_otlp_endpoint_load() {
        let text = format!(
            "{NATIVE}  telemetry: {{ otlpEndpoint: 'http://127.0.0.1:4318', workerOtlpEndpoint: 'http://collector:4318' }}\n  workerPods:\n    nodeSelector: {{ pool: batch }}\n    tolerations: [{{ key: batch, operator: Exists }}]\n    imagePullSecrets: [{{ name: regcred }}]\n    env: [{{ name: DATA, value: /data }}]\n    volumes: [{{ name: data, emptyDir: {{}} }}]\n    volumeMounts: [{{ name: data, mountPath: /data }}]\n"
        );
        let spec = parse(&text, "m").unwrap();
        assert_eq!(
            spec.worker_otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(spec.worker_pods.node_selector["pool"], "batch");
        assert_eq!(
            spec.worker_pods.tolerations[0].key.as_deref(),
            Some("batch")
        );
        assert_eq!(spec.worker_pods.image_pull_secrets[0].name, "regcred");
        let err = parse(&text.replace("name: DATA", "name: FLOTILLA_TOKEN"), "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
        let err = parse(
            &text.replace(
                "mountPath: /data",
                "mountPath: /data }, { name: nope, mountPath: /x",
            ),
            "m",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = parse(
            &text.replace("http://collector:4318", "collector:4317"),
            "m",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("workerOtlpEndpoint"), "{err}");
        let err = parse(&text.replace("nodeSelector", "nodeSelecter"), "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nodeSelecter"), "{err}");
    }

    #[test]
    fn the_trace_sample_ratio_defaults_to_all_and_stays_within_0_and_1() {
        assert_eq!(parse(NATIVE, "m").unwrap().sample_ratio, 1.0);
        let with = |ratio: &str| {
            parse(
                &format!("{NATIVE}  telemetry: {{ sampleRatio: {ratio} }}\n"),
                "m",
            )
        };
        assert_eq!(with("0.1").unwrap().sample_ratio, 0.1);
        assert_eq!(with("0").unwrap().sample_ratio, 0.0);
        assert_eq!(with("1").unwrap().sample_ratio, 1.0);
        for bad in ["1.5", "-0.1", ".nan"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("spec.telemetry.sampleRatio"), "{bad}: {err}");
            assert!(err.contains("between 0 and 1"), "{bad}: {err}");
        }
        let err = with("often").unwrap_err().to_string();
        assert!(err.contains("sampleRatio"), "{err}");
    }

    #[test]
    fn the_native_form_loads_with_replicas_and_settings() {
        let text = r#"
apiVersion: flotilla.dev/v1
kind: Cluster
metadata: { name: demo }
spec:
  runtime: docker
  image: flotilla-worker:0.1.0
  workerResources: { cpuPerCapacity: 0.5, memory: 256Mi }
  heartbeat: { intervalSeconds: 0.5, timeoutSeconds: 2 }
  maxAttempts: 2
  stateDir: /var/lib/flotilla/demo
  workers:
    - capacity: 4
      replicas: 2
    - capacity: 8
  resources:
    - { name: total, type: Integer, initialValue: 0 }
"#;
        let spec = parse(text, "n").unwrap();
        assert_eq!(spec.name, "demo");
        assert_eq!(spec.runtime, RuntimeKind::Docker);
        assert_eq!(spec.capacities, vec![4, 4, 8]);
        assert_eq!(spec.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(spec.worker_resources.memory_bytes, 256 << 20);
        assert_eq!(spec.max_attempts, 2);
        assert_eq!(
            spec.state_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/flotilla/demo"))
        );
        let err = parse(&text.replace("/var/lib/flotilla/demo", "''"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.stateDir"), "{err}");
        let err = parse(&text.replace("capacity: 8", "capacity: 0"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("capacity 0"), "{err}");
        let err = parse(&text.replace("runtime: docker", "runtime: nomad"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nomad"), "{err}");
        let err = parse(&text.replace("kind: Cluster", "kind: Pod"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Pod"), "{err}");
        let err = parse(&text.replace("maxAttempts", "maxAttempt"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maxAttempt") && err.contains("line"), "{err}");
    }

    #[test]
    fn the_image_pull_policy_is_kept_and_checked() {
        let text = r#"
apiVersion: flotilla.dev/v1
kind: Cluster
metadata: { name: k }
spec:
  runtime: kubernetes
  imagePullPolicy: Never
  workers: [{ capacity: 2 }]
"#;
        let spec = parse(text, "k").unwrap();
        assert_eq!(spec.runtime, RuntimeKind::Kubernetes);
        assert_eq!(spec.image_pull_policy.as_deref(), Some("Never"));
        let err = parse(&text.replace("Never", "Sometimes"), "k")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`Sometimes`") && err.contains("IfNotPresent"),
            "{err}"
        );
    }

    #[test]
    fn endpoints_keep_only_their_path() {
        assert_eq!(
            endpoint_path("http://localhost:5000/send/0").unwrap(),
            "/send/0"
        );
        assert!(endpoint_path("localhost:5000/send").is_err());
        assert_eq!(parse_memory("1Gi").unwrap(), 1 << 30);
        assert!(parse_memory("lots").is_err());
    }
}
