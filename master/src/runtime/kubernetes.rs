//! The Kubernetes runtime: each worker is a pod `<release>-worker-<id>`,
//! created through the API server (kube-rs) in the master's namespace, with
//! a CPU request and limit proportional to its queue capacity (the Docker
//! runtime's rule) and a memory limit. `restartPolicy: Never`: the master,
//! not the kubelet, restarts workers, because each start is a new
//! incarnation with its own environment. A restart deletes the pod, waits
//! until the name is free, and creates it again under the same name.
//!
//! Deaths are seen at once through a watch on the release's worker pods: a
//! pod deleted (`kubectl delete pod`, a drain), being deleted (an eviction
//! through the API), finished or failed (a crash, an OOM kill, a kubelet
//! eviction), or unable to start (an image that cannot be pulled). The
//! heartbeat stays the backstop for a pod that hangs.
//!
//! One owner. Before it touches any pod, a master claims the release with a
//! `coordination.k8s.io/v1` Lease `<release>-owner` (holder: its pod, else
//! host/PID; its full record in an annotation), renewed every third of
//! [`owner::LEASE`]. A second master refuses to start while the holder is
//! alive and its lease fresh; it takes the Lease over once the lease has
//! expired or the holder is seen gone (its pod deleted or finished, its
//! process on this host ended, its API answering with another session).
//!
//! Adoption. A master started after a crash or SIGTERM adopts the pods the
//! store names ([`Runtime::adopt`]: same name, same UID, same incarnation,
//! and the pod may run): nothing is deleted or created, and the pod's events
//! are recognised by its UID. What was not adopted (another incarnation,
//! workers added with `/add`, a master without a store) is deleted by
//! [`Runtime::remove_leftovers`], once the release's Lease is held, and
//! created again under the same name: no name is ever duplicated.
//!
//! Credentials. A worker's per-incarnation credential is never in its Pod
//! object: it is in a Secret of the worker's own (`<release>-worker-<id>`,
//! key `credential`, owned like the pods), written before each incarnation's
//! pod is created and read by the pod through `valueFrom.secretKeyRef`. The
//! container runs `flotilla-worker` itself as its first process, which
//! makes itself non-dumpable and removes the variable before it starts any
//! task, so task code finds it neither in its environment nor in any
//! `/proc/<pid>/environ` it may read. The Secrets go with their pods at
//! shutdown and `flotilla down`, and with the master's Deployment.
//!
//! Pods this master created carry an annotation with a random session ID,
//! so that events about an earlier master's pods (same names, same
//! incarnation numbers) are never taken for deaths of this master's workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_proto::{env, Incarnation, WorkerId};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod, PodSecurityContext,
    PodSpec, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::owner::{self, ClaimError, Owner, Verdict};
use super::{
    Adoptable, RecordedWorker, Runtime, RuntimeError, RuntimeEvent, WorkerEndpoint, WorkerHandle,
    WorkerLaunch,
};

/// The worker image when the manifest names none.
pub const DEFAULT_IMAGE: &str = "flotilla-worker:0.1.0";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Always `worker` on worker pods. Never `master`: the chart's Deployment
/// and Service select `component=master`, and would take in a worker pod
/// that carried it.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_WORKER: &str = "flotilla.dev/worker";
pub const LABEL_INCARNATION: &str = "flotilla.dev/incarnation";
/// Which start of a master created the pod (see the module comment).
pub const ANNOTATION_SESSION: &str = "flotilla.dev/master-session";
/// On the release's Lease: the holder's full record (JSON).
pub const ANNOTATION_OWNER: &str = "flotilla.dev/owner";

/// The key of a worker's Secret that holds its credential.
pub const CREDENTIAL_KEY: &str = "credential";
/// What a worker pod runs: the worker binary itself, as the container's
/// first process (not the image's `tini` entrypoint), so that the only
/// process whose initial environment holds the credential is the worker,
/// which makes itself non-dumpable before it runs any task.
pub const WORKER_COMMAND: &str = "flotilla-worker";

/// The environment the chart gives the master.
pub const ENV_RELEASE: &str = "FLOTILLA_RELEASE";
pub const ENV_NAMESPACE: &str = "FLOTILLA_NAMESPACE";
/// The master's own pod, from the downward API (see `KubernetesSettings::owner`).
pub const ENV_POD_NAME: &str = "FLOTILLA_POD_NAME";
pub const ENV_POD_UID: &str = "FLOTILLA_POD_UID";

/// What the manifest and the master's environment say about worker pods.
#[derive(Clone, Debug)]
pub struct KubernetesSettings {
    /// `FLOTILLA_RELEASE`, else `metadata.name`: pod names and labels.
    pub release: String,
    /// `FLOTILLA_NAMESPACE`, else the configuration's default namespace.
    pub namespace: Option<String>,
    pub image: String,
    /// `spec.imagePullPolicy`; unset: Kubernetes' default for the tag.
    pub image_pull_policy: Option<String>,
    /// CPU cores per unit of queue capacity (request = limit = capacity x this).
    pub cpu_per_capacity: f64,
    pub memory_bytes: u64,
    /// The longest wait for a deleted pod to be gone before its name is used
    /// again.
    pub delete_timeout: Duration,
    /// The master's own pod (name, UID), when it runs in one
    /// (`FLOTILLA_POD_NAME`, `FLOTILLA_POD_UID`): where the worker pods' owner
    /// is found (see [`KubernetesSettings::worker_owner`]).
    pub owner: Option<(String, String)>,
    /// What worker pods name as their owner, so that Kubernetes' garbage
    /// collector deletes them with it (`helm uninstall`) even when the
    /// master could not: the Deployment that runs the master (found at
    /// connect through its pod and ReplicaSet), so that a replaced master
    /// pod (`helm upgrade`, a deleted pod) leaves them to the next master to
    /// adopt; else the master's pod itself; none outside a pod.
    pub worker_owner: Option<OwnerReference>,
    /// `spec.telemetry.workerOtlpEndpoint`: replaces the OTLP endpoint the
    /// workers inherit from the master.
    pub worker_otlp_endpoint: Option<String>,
    /// `spec.workerPods`: scheduling, pull secrets, extra env and volumes.
    pub worker_pods: crate::manifest::WorkerPods,
}

/// The size of the worker's writable `/tmp` (an emptyDir); the rest of its
/// root filesystem is read-only.
pub const TMP_SIZE: &str = "128Mi";

/// Why the runtime could not be set up; each names the bad value or what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesSetupError {
    #[error("spec.image is empty (\"{0}\"): name the worker image, e.g. {DEFAULT_IMAGE}")]
    EmptyImage(String),
    #[error("release name `{0}` (FLOTILLA_RELEASE, else metadata.name) cannot name Kubernetes pods: use at most 45 lowercase letters, digits and '-', starting and ending with a letter or digit")]
    BadRelease(String),
    #[error("FLOTILLA_NAMESPACE `{0}` is not a Kubernetes namespace name (lowercase letters, digits and '-')")]
    BadNamespace(String),
    #[error("no Kubernetes configuration: {0}. Inside a cluster the master uses its ServiceAccount (KUBERNETES_SERVICE_HOST is set there); outside, a kubeconfig (KUBECONFIG or ~/.kube/config)")]
    Config(String),
    #[error("cannot list the worker pods of release `{release}` in namespace `{namespace}` at {url}: {source}. The master's ServiceAccount needs get, list, watch, create and delete on pods (the chart's Role)")]
    Api {
        release: String,
        namespace: String,
        url: String,
        source: Box<kube::Error>,
    },
    #[error("cannot delete the worker pods of release `{release}`: {reason}")]
    Leftovers { release: String, reason: String },
}

impl KubernetesSettings {
    /// The settings of `spec` and the master's environment (as read at start).
    pub fn from_spec(spec: &crate::manifest::ClusterSpec) -> Result<Self, KubernetesSetupError> {
        let env = crate::settings::get();
        Self::from_spec_with(spec, |key| match key {
            ENV_RELEASE => env.release.clone(),
            ENV_NAMESPACE => env.namespace.clone(),
            ENV_POD_NAME => env.pod_name.clone(),
            ENV_POD_UID => env.pod_uid.clone(),
            _ => None,
        })
    }

    /// As [`from_spec`](Self::from_spec), reading the environment through
    /// `lookup`. Empty variables count as unset.
    pub fn from_spec_with(
        spec: &crate::manifest::ClusterSpec,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, KubernetesSetupError> {
        let var = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let image = spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into());
        if image.trim().is_empty() {
            return Err(KubernetesSetupError::EmptyImage(image));
        }
        let release = var(ENV_RELEASE).unwrap_or_else(|| spec.name.clone());
        // `-worker-` and a worker ID must still fit a 63-character name.
        if release.len() > 45 || !is_dns_label(&release) {
            return Err(KubernetesSetupError::BadRelease(release));
        }
        let namespace = var(ENV_NAMESPACE);
        if let Some(ns) = &namespace {
            if !is_dns_label(ns) {
                return Err(KubernetesSetupError::BadNamespace(ns.clone()));
            }
        }
        Ok(KubernetesSettings {
            release,
            namespace,
            image,
            image_pull_policy: spec.image_pull_policy.clone(),
            cpu_per_capacity: spec.worker_resources.cpu_per_capacity,
            memory_bytes: spec.worker_resources.memory_bytes,
            delete_timeout: Duration::from_secs(60),
            owner: var(ENV_POD_NAME).zip(var(ENV_POD_UID)),
            worker_owner: var(ENV_POD_NAME)
                .zip(var(ENV_POD_UID))
                .map(|(name, uid)| pod_owner(&name, &uid)),
            worker_otlp_endpoint: spec.worker_otlp_endpoint.clone(),
            worker_pods: spec.worker_pods.clone(),
        })
    }

    pub fn pod_name(&self, worker: WorkerId) -> String {
        format!("{}-worker-{worker}", self.release)
    }

    /// The release's Lease (see the module comment).
    pub fn lease_name(&self) -> String {
        format!("{}-owner", self.release)
    }

    /// Selects this release's worker pods, and nothing else.
    pub fn selector(&self) -> String {
        format!(
            "{LABEL_NAME}=flotilla,{LABEL_INSTANCE}={},{LABEL_COMPONENT}=worker",
            self.release
        )
    }

    /// The CPU request and limit of a worker of this capacity, in millicores:
    /// capacity x cpuPerCapacity cores, as the Docker runtime's quota.
    pub fn cpu_millis(&self, capacity: usize) -> u64 {
        ((capacity as f64 * self.cpu_per_capacity * 1000.0).round() as u64).max(1)
    }

    /// The Secret that holds a worker's credential: one per worker, named
    /// as its pod (Secrets and Pods are separate kinds), its content
    /// replaced for each incarnation.
    pub fn secret_name(&self, worker: WorkerId) -> String {
        self.pod_name(worker)
    }

    /// The labels of one incarnation's pod and Secret.
    fn worker_labels(&self, launch: &WorkerLaunch) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_string(), "flotilla".to_string()),
            (LABEL_INSTANCE.to_string(), self.release.clone()),
            (LABEL_COMPONENT.to_string(), "worker".to_string()),
            (LABEL_WORKER.to_string(), launch.worker_id.to_string()),
            (
                LABEL_INCARNATION.to_string(),
                launch.incarnation.to_string(),
            ),
        ])
    }

    /// The Secret holding one incarnation's credential, which its pod reads
    /// through `valueFrom.secretKeyRef`: the Pod object itself carries no
    /// credential (anyone who may read pods would see it there). Owned like
    /// the worker pods, so Kubernetes deletes it with them.
    pub fn secret(&self, launch: &WorkerLaunch) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name(launch.worker_id)),
                labels: Some(self.worker_labels(launch)),
                owner_references: self.worker_owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                CREDENTIAL_KEY.to_string(),
                k8s_openapi::ByteString(launch.secret.clone().into_bytes()),
            )])),
            ..Default::default()
        }
    }

    /// The pod that runs one incarnation of a worker.
    pub fn pod(&self, launch: &WorkerLaunch, session: &str) -> Pod {
        let labels = self.worker_labels(launch);
        let credential = EnvVar {
            name: env::WORKER_SECRET.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: self.secret_name(launch.worker_id),
                    key: CREDENTIAL_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let master_url = launch.master_url.clone();
        let var = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        };
        let otlp = |k: &str, v: &String| match (k, &self.worker_otlp_endpoint) {
            ("OTEL_EXPORTER_OTLP_ENDPOINT" | "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", Some(e)) => {
                e.clone()
            }
            _ => v.clone(),
        };
        let extra = &self.worker_pods;
        let mut volumes = vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(TMP_SIZE.into())),
                ..Default::default()
            }),
            ..Default::default()
        }];
        volumes.extend(extra.volumes.iter().cloned());
        let mut mounts = vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        }];
        mounts.extend(extra.volume_mounts.iter().cloned());
        let cpu = Quantity(format!("{}m", self.cpu_millis(launch.capacity)));
        let memory = Quantity(memory_quantity(self.memory_bytes));
        Pod {
            metadata: ObjectMeta {
                name: Some(self.pod_name(launch.worker_id)),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_SESSION.to_string(),
                    session.to_string(),
                )])),
                owner_references: self.worker_owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                // The master restarts workers, each time as a new incarnation.
                restart_policy: Some("Never".into()),
                // Workers talk to the master, never to the Kubernetes API.
                automount_service_account_token: Some(false),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                containers: vec![Container {
                    name: "worker".into(),
                    image: Some(self.image.clone()),
                    image_pull_policy: self.image_pull_policy.clone(),
                    command: Some(vec![WORKER_COMMAND.into()]),
                    env: Some(
                        [
                            var(env::MASTER_URL, master_url),
                            var(env::WORKER_ID, launch.worker_id.to_string()),
                            var(env::INCARNATION, launch.incarnation.to_string()),
                            credential,
                            var(env::SLOTS, launch.slots.to_string()),
                        ]
                        .into_iter()
                        .chain(launch.inherited_env.iter().map(|(k, v)| var(k, otlp(k, v))))
                        .chain(extra.env.iter().cloned())
                        .collect(),
                    ),
                    volume_mounts: Some(mounts),
                    resources: Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([("cpu".to_string(), cpu.clone())])),
                        limits: Some(BTreeMap::from([
                            ("cpu".to_string(), cpu),
                            ("memory".to_string(), memory),
                        ])),
                        ..Default::default()
                    }),
                    security_context: Some(SecurityContext {
                        allow_privilege_escalation: Some(false),
                        read_only_root_filesystem: Some(true),
                        capabilities: Some(Capabilities {
                            drop: Some(vec!["ALL".into()]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                volumes: Some(volumes),
                node_selector: (!extra.node_selector.is_empty())
                    .then(|| extra.node_selector.clone()),
                tolerations: none_if_empty(&extra.tolerations),
                affinity: extra.affinity.clone(),
                image_pull_secrets: none_if_empty(&extra.image_pull_secrets),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The master's pod as an owner reference.
fn pod_owner(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: name.to_string(),
        uid: uid.to_string(),
        ..Default::default()
    }
}

/// The Deployment that runs the master's pod (pod -> its controlling
/// ReplicaSet -> its controlling Deployment), as the worker pods' owner;
/// `None` when there is none or it cannot be read (the master's pod is then
/// their owner).
async fn deployment_of(
    client: &Client,
    namespace: &str,
    pod: &(String, String),
) -> Option<OwnerReference> {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    let controller = |refs: &Option<Vec<OwnerReference>>, kind: &str| {
        refs.iter()
            .flatten()
            .find(|r| r.controller == Some(true) && r.kind == kind)
            .cloned()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let me = match pods.get_opt(&pod.0).await {
        Ok(Some(me)) if me.metadata.uid.as_deref() == Some(pod.1.as_str()) => me,
        Ok(_) => return None,
        Err(e) => {
            warn!(error = %e, pod = %pod.0, "cannot read the master's own pod; worker pods are owned by it");
            return None;
        }
    };
    let rs = controller(&me.metadata.owner_references, "ReplicaSet")?;
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let set = match sets.get_opt(&rs.name).await {
        Ok(set) => set?,
        Err(e) => {
            warn!(error = %e, replicaset = %rs.name, "cannot read the master's ReplicaSet (the Role needs get on replicasets); worker pods are owned by the master's pod, and go with it");
            return None;
        }
    };
    let deployment = controller(&set.metadata.owner_references, "Deployment")?;
    Some(OwnerReference {
        api_version: deployment.api_version,
        kind: deployment.kind,
        name: deployment.name,
        uid: deployment.uid,
        ..Default::default()
    })
}

fn none_if_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// RFC 1123 label: what Kubernetes accepts as a namespace, a label value and
/// (with `-worker-<id>`) a pod name.
fn is_dns_label(s: &str) -> bool {
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 63
        && ok_end(s.chars().next())
        && ok_end(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `536870912` -> `512Mi`: what `kubectl describe` shows the user.
fn memory_quantity(bytes: u64) -> String {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes > 0 && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// Containers waiting for one of these reasons will not start by themselves.
const CANNOT_START: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why a pod's worker is gone or will never run; `None` while it may run.
fn pod_gone(pod: &Pod, deleted: bool) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    if deleted {
        return Some(format!("pod {name} was deleted"));
    }
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref());
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    if phase == "Failed" || phase == "Succeeded" {
        let mut detail = format!("pod {name} {}", phase.to_lowercase());
        if let Some(why) = status.and_then(|s| s.reason.as_deref().or(s.message.as_deref())) {
            detail.push_str(&format!(": {why}"));
        }
        if let Some(t) = container.and_then(|s| s.terminated.as_ref()) {
            let reason = t.reason.as_deref().map(|r| format!(", {r}"));
            detail.push_str(&format!(
                " (worker exited with code {}{})",
                t.exit_code,
                reason.unwrap_or_default()
            ));
        }
        return Some(detail);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(format!("pod {name} is being deleted (evicted or drained)"));
    }
    // A container that cannot start keeps its pod Pending for ever.
    let waiting = container.and_then(|s| s.waiting.as_ref())?;
    let reason = waiting.reason.as_deref()?;
    CANNOT_START.contains(&reason).then(|| {
        let message = waiting.message.as_deref().map(|m| format!(": {m}"));
        format!(
            "pod {name} cannot start: {reason}{}",
            message.unwrap_or_default()
        )
    })
}

/// A (re-)list of the watch in progress: the pods this runtime had created
/// when it began, and the UIDs listed so far.
struct Relist {
    before: Vec<(WorkerId, Incarnation, String)>,
    listed: HashSet<String>,
}

/// The pod that runs a worker's current incarnation.
#[derive(Clone, Debug)]
struct Tracked {
    incarnation: Incarnation,
    /// Known once the API server has created it.
    uid: Option<String>,
    /// Its death was reported; once is enough.
    reported: bool,
}

struct Inner {
    pods: Api<Pod>,
    /// The workers' credential Secrets (see [`KubernetesSettings::secret`]).
    secrets: Api<Secret>,
    leases: Api<Lease>,
    /// The API server's URL, for errors.
    url: String,
    /// This master's claim, once made; and the task renewing it.
    claim: Mutex<Option<Owner>>,
    renewer: Mutex<Option<JoinHandle<()>>>,
    settings: KubernetesSettings,
    namespace: String,
    session: String,
    tracked: Mutex<HashMap<WorkerId, Tracked>>,
    events: UnboundedSender<RuntimeEvent>,
    /// Set on shutdown: deaths are then expected, and not reported.
    stopping: AtomicBool,
}

pub struct KubernetesRuntime {
    inner: Arc<Inner>,
    watch: JoinHandle<()>,
}

impl KubernetesRuntime {
    /// Connects with the in-cluster configuration when the master runs in a
    /// pod (`KUBERNETES_SERVICE_HOST` is set), else with the kubeconfig.
    pub async fn connect(
        settings: KubernetesSettings,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Result<Self, KubernetesSetupError> {
        let config = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            Config::incluster().map_err(|e| KubernetesSetupError::Config(e.to_string()))?
        } else {
            Config::infer()
                .await
                .map_err(|e| KubernetesSetupError::Config(e.to_string()))?
        };
        Self::connect_with(config, settings, events).await
    }

    /// Connects with `config`, checks that the release's worker pods can
    /// be listed, and starts watching them. The pods an earlier master left
    /// are deleted by [`Runtime::remove_workers`], once the release is
    /// claimed.
    pub async fn connect_with(
        config: Config,
        settings: KubernetesSettings,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Result<Self, KubernetesSetupError> {
        let url = config.cluster_url.to_string();
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client =
            Client::try_from(config).map_err(|e| KubernetesSetupError::Config(e.to_string()))?;
        let mut settings = settings;
        if let Some(pod) = &settings.owner {
            if let Some(deployment) = deployment_of(&client, &namespace, pod).await {
                info!(deployment = %deployment.name, "worker pods are owned by the master's Deployment");
                settings.worker_owner = Some(deployment);
            }
        }
        let inner = Arc::new(Inner {
            pods: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client.clone(), &namespace),
            leases: Api::namespaced(client, &namespace),
            url: url.clone(),
            claim: Mutex::new(None),
            renewer: Mutex::new(None),
            settings,
            namespace,
            session: random_session(),
            tracked: Mutex::new(HashMap::new()),
            events,
            stopping: AtomicBool::new(false),
        });
        // The master's ServiceAccount must be able to see the pods.
        inner.list_workers().await?;
        let watch = tokio::spawn(inner.clone().watch());
        Ok(KubernetesRuntime { inner, watch })
    }

    pub fn settings(&self) -> &KubernetesSettings {
        &self.inner.settings
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

impl Drop for KubernetesRuntime {
    fn drop(&mut self) {
        self.watch.abort();
        if let Some(r) = self.inner.renewer.lock().expect("renewer lock").take() {
            r.abort();
        }
    }
}

fn random_session() -> String {
    use rand::Rng;
    let bytes: [u8; 8] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a worker pod could not be created or deleted.
#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("{0}")]
    Create(Box<kube::Error>),
    #[error("cannot read the pod in the way: {0}")]
    ReadOld(Box<kube::Error>),
    #[error("delete failed: {0}")]
    Delete(Box<kube::Error>),
    #[error("could not watch it go: {0}")]
    Watch(kube::runtime::wait::Error),
    #[error("still there {}s after it was deleted", .0.as_secs())]
    StillThere(Duration),
    #[error("cannot write its credential Secret {name}: {source}. The master's ServiceAccount needs create, patch and delete on secrets (the chart's Role)")]
    Secret {
        name: String,
        source: Box<kube::Error>,
    },
}

fn is_api(e: &kube::Error, check: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(status) if check(status))
}

impl Inner {
    /// The release's worker pods.
    async fn list_workers(&self) -> Result<Vec<Pod>, KubernetesSetupError> {
        self.pods
            .list(&ListParams::default().labels(&self.settings.selector()))
            .await
            .map(|l| l.items)
            .map_err(|source| KubernetesSetupError::Api {
                release: self.settings.release.clone(),
                namespace: self.namespace.clone(),
                url: self.url.clone(),
                source: Box::new(source),
            })
    }

    /// Deletes every worker pod of the release that exists before this
    /// master starts any (see the module comment), and waits until they are
    /// gone so that their names are free; then their credential Secrets,
    /// and those of `recorded` workers (whose pods may be gone already).
    /// Returns the pods' names.
    async fn remove_leftovers(
        &self,
        spare_tracked: bool,
        recorded: &[WorkerId],
    ) -> Result<Vec<String>, KubernetesSetupError> {
        let spared: Vec<String> = if spare_tracked {
            let tracked = self.tracked.lock().expect("tracked lock");
            tracked.values().filter_map(|t| t.uid.clone()).collect()
        } else {
            Vec::new()
        };
        let items: Vec<Pod> = self
            .list_workers()
            .await?
            .into_iter()
            .filter(|p| p.metadata.uid.as_ref().is_none_or(|u| !spared.contains(u)))
            .collect();
        let mut workers: Vec<WorkerId> = items
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get(LABEL_WORKER)?.parse().ok())
            .chain(recorded.iter().copied())
            .collect();
        workers.sort_unstable();
        workers.dedup();
        if items.is_empty() {
            futures::future::join_all(workers.into_iter().map(|w| self.delete_secret(w))).await;
            return Ok(Vec::new());
        }
        let names: Vec<&str> = items
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        info!(
            release = %self.settings.release,
            pods = ?names,
            "deleting the worker pods of a master that is gone"
        );
        let deletions = items.iter().map(|pod| async move {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            self.delete_and_wait(&name, &uid)
                .await
                .map_err(|reason| format!("{name}: {reason}"))
        });
        let failures: Vec<String> = futures::future::join_all(deletions)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if failures.is_empty() {
            futures::future::join_all(workers.into_iter().map(|w| self.delete_secret(w))).await;
            Ok(items
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .map(|n| format!("pod {}/{n}", self.namespace))
                .collect())
        } else {
            Err(KubernetesSetupError::Leftovers {
                release: self.settings.release.clone(),
                reason: failures.join("; "),
            })
        }
    }

    /// The Lease naming `me` as the holder, renewed now.
    fn lease_for(
        &self,
        me: &Owner,
        transitions: i32,
        resource_version: Option<String>,
        acquired: Option<MicroTime>,
    ) -> Lease {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.lease_name()),
                resource_version,
                labels: Some(BTreeMap::from([
                    (LABEL_NAME.to_string(), "flotilla".to_string()),
                    (LABEL_INSTANCE.to_string(), self.settings.release.clone()),
                ])),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_OWNER.to_string(),
                    serde_json::to_string(me).expect("an owner serialises"),
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.holder_identity()),
                lease_duration_seconds: Some(owner::LEASE.as_secs() as i32),
                acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Whether a Lease's holder is alive: its pod when it runs in one (gone
    /// when deleted or finished), else [`owner::liveness`].
    async fn holder_liveness(&self, holder: &Owner) -> Verdict {
        if let Some(pod) = &holder.pod {
            let path = pod.trim_start_matches("pod ");
            let (ns, name) = path.split_once('/').unwrap_or(("", path));
            if ns.is_empty() || ns == self.namespace {
                return match self.pods.get_opt(name).await {
                    Ok(None) => Verdict::Gone(format!("pod {path} no longer exists")),
                    Ok(Some(p)) => match pod_gone(&p, false) {
                        Some(why) => Verdict::Gone(why),
                        None => Verdict::Alive,
                    },
                    Err(e) => Verdict::Unknown(format!("cannot read pod {path}: {e}")),
                };
            }
        }
        owner::liveness(holder).await
    }

    /// Claims the release's Lease for `me` (see the module comment).
    async fn claim_lease(&self, me: &Owner) -> Result<(), ClaimError> {
        let name = self.settings.lease_name();
        let claim = format!("Lease {}/{name}", self.namespace);
        let failed = |detail: String| {
            ClaimError::Failed {
            cluster: self.settings.release.clone(),
            claim: claim.clone(),
            detail: format!("{detail}. The master's ServiceAccount needs get, create and update on leases.coordination.k8s.io (the chart's Role)"),
        }
        };
        loop {
            let current = self
                .leases
                .get_opt(&name)
                .await
                .map_err(|e| failed(format!("cannot read it: {e}")))?;
            let Some(lease) = current else {
                let fresh = self.lease_for(me, 0, None, None);
                match self.leases.create(&PostParams::default(), &fresh).await {
                    Ok(_) => return Ok(()),
                    Err(e) if is_api(&e, |s| s.is_already_exists()) => continue,
                    Err(e) => return Err(failed(format!("cannot create it: {e}"))),
                }
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_OWNER))
                .and_then(|json| serde_json::from_str::<Owner>(json).ok());
            let free = spec.holder_identity.as_deref().unwrap_or("").is_empty();
            let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
            let expired = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .is_none_or(|t| t.0.as_millisecond() + duration < now);
            let verdict = match &holder {
                _ if free => Verdict::Gone("the Lease was released".into()),
                Some(h) if h.session == me.session => Verdict::Gone("it is this master".into()),
                Some(h) => self.holder_liveness(h).await,
                None => Verdict::Unknown("the Lease carries no Flotilla owner record".into()),
            };
            let take = match &verdict {
                Verdict::Gone(_) => true,
                Verdict::Alive | Verdict::Unknown(_) => expired,
            };
            if !take {
                if verdict == Verdict::Alive {
                    let owner = holder.expect("a live holder has a record");
                    return Err(ClaimError::Held {
                        cluster: self.settings.release.clone(),
                        owner: Box::new(owner),
                        claim,
                    });
                }
                warn!(?verdict, holder = ?spec.holder_identity, "the release's owner cannot be reached; taking the Lease over once it expires");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if !free {
                info!(?verdict, expired, holder = ?spec.holder_identity, "the release's previous owner is gone; taking its Lease over");
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!free);
            let taken = self.lease_for(me, transitions, lease.metadata.resource_version, None);
            match self
                .leases
                .replace(&name, &PostParams::default(), &taken)
                .await
            {
                Ok(_) => return Ok(()),
                // Someone else changed it meanwhile: look again.
                Err(e) if is_api(&e, |s| s.is_conflict()) => continue,
                Err(e) => return Err(failed(format!("cannot take it over: {e}"))),
            }
        }
    }

    /// Renews the Lease every third of its duration while it is `me`'s.
    async fn renew_lease(self: Arc<Self>, me: Owner) {
        let name = self.settings.lease_name();
        loop {
            tokio::time::sleep(owner::LEASE / 3).await;
            let lease = match self.leases.get_opt(&name).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, lease = %name, "cannot read the release's Lease to renew it; retrying");
                    continue;
                }
            };
            let Some(mut lease) = lease else {
                warn!(lease = %name, "the release's Lease was deleted; claiming it again");
                if let Err(e) = self.claim_lease(&me).await {
                    let _ = self.events.send(RuntimeEvent::ClaimLost {
                        detail: e.to_string(),
                    });
                    return;
                }
                continue;
            };
            let holder = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_OWNER))
                .and_then(|json| serde_json::from_str::<Owner>(json).ok());
            if holder.as_ref().map(|h| h.session.as_str()) != Some(me.session.as_str()) {
                let by = holder.map(|h| h.to_string()).unwrap_or_else(|| {
                    lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.clone())
                        .unwrap_or_else(|| "nobody (released)".into())
                });
                let _ = self.events.send(RuntimeEvent::ClaimLost {
                    detail: format!(
                        "Lease {}/{name} is now held by {by}: this master was not heard from for the lease",
                        self.namespace
                    ),
                });
                return;
            }
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
            }
            if let Err(e) = self
                .leases
                .replace(&name, &PostParams::default(), &lease)
                .await
            {
                warn!(error = %e, lease = %name, "cannot renew the release's Lease; retrying");
            }
        }
    }

    /// Hands the Lease back (holder cleared), if it is still `me`'s.
    async fn release_lease(&self, me: &Owner) {
        let name = self.settings.lease_name();
        let Ok(Some(mut lease)) = self.leases.get_opt(&name).await else {
            return;
        };
        let ours = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_OWNER))
            .and_then(|json| serde_json::from_str::<Owner>(json).ok())
            .is_some_and(|h| h.session == me.session);
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        if let Some(a) = lease.metadata.annotations.as_mut() {
            a.remove(ANNOTATION_OWNER);
        }
        if let Err(e) = self
            .leases
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, lease = %name, "could not hand the release's Lease back; the next master waits for it to expire");
        }
    }

    /// Writes the credential Secret of the incarnation about to start:
    /// created, or (left by the worker's previous incarnation) its content,
    /// labels and owner replaced by a merge patch. Before the pod is
    /// created, so the kubelet finds the credential when it starts the
    /// container.
    async fn put_secret(&self, secret: &Secret) -> Result<(), PodError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let failed = |source| PodError::Secret {
            name: name.clone(),
            source: Box::new(source),
        };
        match self.secrets.create(&PostParams::default(), secret).await {
            Ok(_) => return Ok(()),
            Err(e) if is_api(&e, |s| s.is_already_exists()) => {}
            Err(e) => return Err(failed(e)),
        }
        let patch = serde_json::json!({
            "metadata": {
                "labels": secret.metadata.labels,
                "ownerReferences": secret.metadata.owner_references,
            },
            "data": secret.data,
        });
        self.secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(failed)
    }

    /// Deletes the credential Secret of `worker` (its pod is gone for
    /// good). Already gone is fine; anything else is logged, since the
    /// Secret also goes with its owner.
    async fn delete_secret(&self, worker: WorkerId) {
        let name = self.settings.secret_name(worker);
        match self.secrets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => debug!(secret = %name, "deleted worker credential Secret"),
            Err(e) if is_api(&e, |s| s.is_not_found()) => {}
            Err(e) => {
                warn!(secret = %name, error = %e, "could not delete the worker's credential Secret (the Role needs delete on secrets)")
            }
        }
    }

    /// Deletes pod `name` at once, only if it is still the one with `uid`,
    /// and waits until no pod with that UID is left. Already gone is fine.
    async fn delete_and_wait(&self, name: &str, uid: &str) -> Result<(), PodError> {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {}
            // Gone, or the name already belongs to another pod: ours is gone.
            Err(e) if is_api(&e, |s| s.is_not_found() || s.is_conflict()) => return Ok(()),
            Err(e) => return Err(PodError::Delete(Box::new(e))),
        }
        let timeout = self.settings.delete_timeout;
        let gone = await_condition(self.pods.clone(), name, conditions::is_deleted(uid));
        match tokio::time::timeout(timeout, gone).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PodError::Watch(e)),
            Err(_) => Err(PodError::StillThere(timeout)),
        }
    }

    /// Creates the pod; if one of that name is still there (a leftover, or
    /// a delete that did not finish), deletes it and tries once more.
    async fn create(&self, pod: &Pod) -> Result<Pod, PodError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self.pods.create(&PostParams::default(), pod).await {
            Ok(created) => return Ok(created),
            Err(e) if is_api(&e, |s| s.is_already_exists()) => {}
            Err(e) => return Err(PodError::Create(Box::new(e))),
        }
        warn!(pod = %name, "a pod of that name is still there; deleting it first");
        let old = self
            .pods
            .get_opt(&name)
            .await
            .map_err(|e| PodError::ReadOld(Box::new(e)))?;
        if let Some(uid) = old.and_then(|p| p.metadata.uid) {
            self.delete_and_wait(&name, &uid).await?;
        }
        self.pods
            .create(&PostParams::default(), pod)
            .await
            .map_err(|e| PodError::Create(Box::new(e)))
    }

    /// Follows the release's worker pods until the runtime is dropped.
    async fn watch(self: Arc<Self>) {
        let config = watcher::Config::default().labels(&self.settings.selector());
        let mut stream = watcher::watcher(self.pods.clone(), config)
            .default_backoff()
            .boxed();
        let mut relist: Option<Relist> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Apply(pod)) => self.on_pod(&pod, false),
                Ok(Event::Delete(pod)) => self.on_pod(&pod, true),
                Ok(Event::Init) => {
                    relist = Some(Relist {
                        before: self.created_pods(),
                        listed: HashSet::new(),
                    })
                }
                Ok(Event::InitApply(pod)) => {
                    if let (Some(relist), Some(uid)) = (&mut relist, &pod.metadata.uid) {
                        relist.listed.insert(uid.clone());
                    }
                    self.on_pod(&pod, false);
                }
                Ok(Event::InitDone) => {
                    // A pod deleted while the watch was down shows up only as
                    // missing from the new list.
                    if let Some(Relist { before, listed }) = relist.take() {
                        for (worker, incarnation, uid) in before {
                            if listed.contains(&uid) {
                                continue;
                            }
                            let name = self.settings.pod_name(worker);
                            let detail =
                                format!("pod {name} was deleted while the watch was reconnecting");
                            self.report(worker, incarnation, detail);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "watching the worker pods failed; retrying (the heartbeat stays the backstop)")
                }
            }
        }
    }

    /// The pods this runtime has created and not yet killed.
    fn created_pods(&self) -> Vec<(WorkerId, Incarnation, String)> {
        let tracked = self.tracked.lock().expect("tracked lock");
        tracked
            .iter()
            .filter_map(|(&w, t)| t.uid.clone().map(|uid| (w, t.incarnation, uid)))
            .collect()
    }

    fn on_pod(&self, pod: &Pod, deleted: bool) {
        let meta = &pod.metadata;
        let label = |key: &str| meta.labels.as_ref().and_then(|l| l.get(key));
        let worker = label(LABEL_WORKER).and_then(|v| v.parse::<WorkerId>().ok());
        let incarnation = label(LABEL_INCARNATION).and_then(|v| v.parse::<Incarnation>().ok());
        let (Some(worker), Some(incarnation)) = (worker, incarnation) else {
            return;
        };
        // Created by this master, or adopted by it (that very pod).
        let created = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SESSION))
            .is_some_and(|s| *s == self.session);
        let adopted = || {
            let tracked = self.tracked.lock().expect("tracked lock");
            tracked
                .get(&worker)
                .is_some_and(|t| t.uid.is_some() && t.uid == meta.uid)
        };
        if !created && !adopted() {
            return;
        }
        if let Some(detail) = pod_gone(pod, deleted) {
            self.report(worker, incarnation, detail);
        }
    }

    /// Reports the death of `incarnation` of `worker`, once, if it is the
    /// incarnation this runtime runs.
    fn report(&self, worker: WorkerId, incarnation: Incarnation, detail: String) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut tracked = self.tracked.lock().expect("tracked lock");
            match tracked.get_mut(&worker) {
                Some(t) if t.incarnation == incarnation && !t.reported => t.reported = true,
                _ => return,
            }
        }
        info!(worker, incarnation, %detail, "worker pod lost");
        let _ = self.events.send(RuntimeEvent::Exited {
            worker_id: worker,
            incarnation,
            detail,
        });
    }
}

#[async_trait]
impl Runtime for KubernetesRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn cpu_quota(&self, capacity: usize) -> Option<f64> {
        Some(self.inner.settings.cpu_millis(capacity) as f64 / 1000.0)
    }

    async fn worker_endpoint(
        &self,
        advertised: Option<&str>,
        api: &str,
    ) -> Result<WorkerEndpoint, RuntimeError> {
        if advertised.is_none() {
            warn!("FLOTILLA_ADVERTISE_URL is not set: worker pods are told the master's own listening address, which they reach only if the master runs where they can see it (the Helm chart sets it to its Service)");
        }
        Ok(WorkerEndpoint::Url(advertised.unwrap_or(api).to_string()))
    }

    async fn start(&self, launch: WorkerLaunch) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let pod = inner.settings.pod(&launch, &inner.session);
        let name = inner.settings.pod_name(launch.worker_id);
        // Tracked before it exists, so that a pod failing at once is reported.
        inner.tracked.lock().expect("tracked lock").insert(
            launch.worker_id,
            Tracked {
                incarnation: launch.incarnation,
                uid: None,
                reported: false,
            },
        );
        let created = match inner.put_secret(&inner.settings.secret(&launch)).await {
            Ok(()) => inner.create(&pod).await,
            Err(e) => Err(e),
        };
        let mut tracked = inner.tracked.lock().expect("tracked lock");
        let entry = tracked
            .get_mut(&launch.worker_id)
            .filter(|t| t.incarnation == launch.incarnation);
        match (created, entry) {
            (Ok(created), Some(t)) => t.uid = created.metadata.uid,
            // Killed while it was being created: the kill found no UID.
            (Ok(_), None) => {}
            (Err(reason), entry) => {
                if entry.is_some() {
                    tracked.remove(&launch.worker_id);
                }
                return Err(RuntimeError::Start {
                    worker: launch.worker_id,
                    reason: format!("pod {}/{name}: {reason}", inner.namespace),
                });
            }
        }
        drop(tracked);
        info!(
            worker = launch.worker_id,
            incarnation = launch.incarnation,
            pod = %name,
            namespace = %inner.namespace,
            cpu_millis = inner.settings.cpu_millis(launch.capacity),
            "created worker pod"
        );
        Ok(())
    }

    async fn kill(&self, worker: WorkerId) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        // Untracked first: the deletion this causes is not a death to report.
        let tracked = inner.tracked.lock().expect("tracked lock").remove(&worker);
        let Some(uid) = tracked.and_then(|t| t.uid) else {
            return Ok(());
        };
        let name = inner.settings.pod_name(worker);
        inner
            .delete_and_wait(&name, &uid)
            .await
            .map_err(|reason| RuntimeError::Kill {
                worker,
                reason: format!("pod {}/{name}: {reason}", inner.namespace),
            })?;
        debug!(worker, pod = %name, "deleted worker pod");
        Ok(())
    }

    /// Takes over the pod an earlier master created for this incarnation,
    /// if it is still there, is that very pod (its UID) and may run: no pod
    /// is deleted or created. From then on its events are this master's
    /// (by UID, as it carries the earlier master's session).
    async fn adopt(&self, worker: &Adoptable) -> Result<Option<WorkerHandle>, RuntimeError> {
        let inner = &self.inner;
        let name = inner.settings.pod_name(worker.worker_id);
        let pod = inner
            .pods
            .get_opt(&name)
            .await
            .map_err(|e| RuntimeError::Start {
                worker: worker.worker_id,
                reason: format!("cannot read pod {}/{name}: {e}", inner.namespace),
            })?;
        let Some(pod) = pod else { return Ok(None) };
        let incarnation = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_INCARNATION))
            .and_then(|v| v.parse::<Incarnation>().ok());
        let same = pod.metadata.uid.as_deref() == Some(worker.key.as_str())
            && incarnation == Some(worker.incarnation);
        if !same {
            return Ok(None);
        }
        if let Some(why) = pod_gone(&pod, false) {
            debug!(worker = worker.worker_id, %why, "not adopting a pod that will not run");
            return Ok(None);
        }
        inner.tracked.lock().expect("tracked lock").insert(
            worker.worker_id,
            Tracked {
                incarnation: worker.incarnation,
                uid: Some(worker.key.clone()),
                reported: false,
            },
        );
        info!(worker = worker.worker_id, incarnation = worker.incarnation, pod = %name, "adopted the worker pod of the previous master");
        Ok(Some(WorkerHandle {
            incarnation: worker.incarnation,
            locator: format!("pod {}/{name}", inner.namespace),
            key: Some(worker.key.clone()),
        }))
    }

    /// SIGTERM: the pods keep running for the next master; events about
    /// them are no longer this master's business.
    async fn detach(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        self.watch.abort();
        let left = inner.tracked.lock().expect("tracked lock").len();
        if left > 0 {
            info!(
                pods = left,
                "leaving the worker pods running for the next master"
            );
        }
    }

    async fn inspect(&self, worker: WorkerId) -> Option<WorkerHandle> {
        let inner = &self.inner;
        let tracked = inner.tracked.lock().expect("tracked lock");
        tracked.get(&worker).map(|t| WorkerHandle {
            incarnation: t.incarnation,
            locator: format!(
                "pod {}/{}",
                inner.namespace,
                inner.settings.pod_name(worker)
            ),
            key: t.uid.clone(),
        })
    }

    async fn claim(&self, me: &Owner) -> Result<(), ClaimError> {
        let inner = &self.inner;
        inner.claim_lease(me).await?;
        *inner.claim.lock().expect("claim lock") = Some(me.clone());
        let renewer = tokio::spawn(inner.clone().renew_lease(me.clone()));
        if let Some(old) = inner.renewer.lock().expect("renewer lock").replace(renewer) {
            old.abort();
        }
        Ok(())
    }

    async fn release_claim(&self) {
        let inner = &self.inner;
        if let Some(r) = inner.renewer.lock().expect("renewer lock").take() {
            r.abort();
        }
        let me = inner.claim.lock().expect("claim lock").take();
        if let Some(me) = me {
            inner.release_lease(&me).await;
        }
    }

    async fn remove_workers(
        &self,
        recorded: &[RecordedWorker],
    ) -> Result<Vec<String>, RuntimeError> {
        let ids: Vec<WorkerId> = recorded.iter().map(|w| w.id).collect();
        self.inner
            .remove_leftovers(false, &ids)
            .await
            .map_err(|e| RuntimeError::Remove(e.to_string()))
    }

    /// With the Lease held (their master is gone): the release's pods that
    /// were not adopted.
    async fn remove_leftovers(&self) -> Result<(), RuntimeError> {
        self.inner
            .remove_leftovers(true, &[])
            .await
            .map(|_| ())
            .map_err(|e| RuntimeError::Remove(e.to_string()))
    }

    async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        self.watch.abort();
        let all: Vec<(WorkerId, Tracked)> = inner
            .tracked
            .lock()
            .expect("tracked lock")
            .drain()
            .collect();
        let workers: Vec<WorkerId> = all.iter().map(|(w, _)| *w).collect();
        let deletions = all.into_iter().map(|(worker, t)| {
            let name = inner.settings.pod_name(worker);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: t.uid.map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            async move {
                match inner.pods.delete(&name, &params).await {
                    Ok(_) => debug!(pod = %name, "deleted worker pod"),
                    Err(e) if is_api(&e, |s| s.is_not_found() || s.is_conflict()) => {}
                    Err(e) => warn!(pod = %name, error = %e, "could not delete worker pod"),
                }
            }
        });
        let secrets = workers.into_iter().map(|w| inner.delete_secret(w));
        let all_done = futures::future::join(
            futures::future::join_all(deletions),
            futures::future::join_all(secrets),
        );
        if tokio::time::timeout(Duration::from_secs(20), all_done)
            .await
            .is_err()
        {
            warn!("gave up deleting the worker pods after 20s");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;
    use serde_json::json;

    fn spec(extra: &str) -> manifest::ClusterSpec {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{ name: demo }}\nspec:\n  runtime: kubernetes\n  workers: [{{ capacity: 4 }}]\n{extra}"
        );
        manifest::parse(&text, "test").unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn launch() -> WorkerLaunch {
        WorkerLaunch {
            worker_id: 3,
            incarnation: 7,
            capacity: 4,
            slots: 2,
            master_url: "http://127.0.0.1:5000".into(),
            secret: "s3cret".into(),
            inherited_env: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                "http://jaeger:4318".into(),
            )],
        }
    }

    #[test]
    fn settings_come_from_the_manifest_with_defaults() {
        let s = KubernetesSettings::from_spec_with(&spec(""), no_env).unwrap();
        assert_eq!(s.release, "demo");
        assert_eq!(s.image, DEFAULT_IMAGE);
        assert_eq!(s.image_pull_policy, None);
        assert_eq!(s.namespace, None);
        assert_eq!(s.pod_name(2), "demo-worker-2");
        assert_eq!(
            s.selector(),
            "app.kubernetes.io/name=flotilla,app.kubernetes.io/instance=demo,app.kubernetes.io/component=worker"
        );
    }

    #[test]
    fn the_environment_names_release_namespace_and_master() {
        let s = KubernetesSettings::from_spec_with(&spec(""), |k| match k {
            "FLOTILLA_RELEASE" => Some("prod".into()),
            "FLOTILLA_NAMESPACE" => Some("jobs".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.pod_name(0), "prod-worker-0");
        assert_eq!(s.namespace.as_deref(), Some("jobs"));
        assert_eq!(s.owner, None);
    }

    #[test]
    fn worker_pods_are_owned_by_the_master_pod_when_it_runs_in_one() {
        let s = KubernetesSettings::from_spec_with(&spec(""), |k| match k {
            "FLOTILLA_POD_NAME" => Some("flotilla-abc".into()),
            "FLOTILLA_POD_UID" => Some("u-1".into()),
            _ => None,
        })
        .unwrap();
        let pod = serde_json::to_value(s.pod(&launch(), "abc")).unwrap();
        assert_eq!(
            pod["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Pod", "name": "flotilla-abc", "uid": "u-1"}])
        );
        // The credential Secret goes with the same owner.
        let secret = serde_json::to_value(s.secret(&launch())).unwrap();
        assert_eq!(
            secret["metadata"]["ownerReferences"],
            pod["metadata"]["ownerReferences"]
        );
        let s = KubernetesSettings::from_spec_with(&spec(""), no_env).unwrap();
        let pod = serde_json::to_value(s.pod(&launch(), "abc")).unwrap();
        assert!(pod["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn bad_values_are_refused_naming_them() {
        let err = KubernetesSettings::from_spec_with(&spec("  image: \"\"\n"), no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.image is empty"), "{err}");
        let err = KubernetesSettings::from_spec_with(&spec(""), |k| {
            (k == "FLOTILLA_RELEASE").then(|| "My_Release".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("`My_Release`"), "{err}");
    }

    #[test]
    fn the_cpu_request_is_proportional_to_capacity() {
        let s = KubernetesSettings::from_spec_with(
            &spec("  workerResources: { cpuPerCapacity: 0.3, memory: 256Mi }\n"),
            no_env,
        )
        .unwrap();
        assert_eq!(s.cpu_millis(1), 300);
        assert_eq!(s.cpu_millis(10), 3000);
        assert_eq!(memory_quantity(256 << 20), "256Mi");
        assert_eq!(memory_quantity(1 << 30), "1Gi");
        assert_eq!(memory_quantity(1_000_000), "1000000");
    }

    #[test]
    fn the_pod_carries_identity_resources_and_environment() {
        let s = KubernetesSettings::from_spec_with(
            &spec("  image: registry.local/w:1\n  imagePullPolicy: Never\n"),
            no_env,
        )
        .unwrap();
        let pod = serde_json::to_value(s.pod(&launch(), "abc")).unwrap();
        assert_eq!(pod["metadata"]["name"], "demo-worker-3");
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "flotilla");
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(labels["flotilla.dev/worker"], "3");
        assert_eq!(labels["flotilla.dev/incarnation"], "7");
        assert_eq!(
            pod["metadata"]["annotations"]["flotilla.dev/master-session"],
            "abc"
        );
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.local/w:1");
        assert_eq!(c["imagePullPolicy"], "Never");
        assert_eq!(c["resources"]["requests"]["cpu"], "1000m");
        assert_eq!(c["resources"]["limits"]["cpu"], "1000m");
        assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
        assert_eq!(c["command"], json!(["flotilla-worker"]));
        let env: HashMap<&str, &serde_json::Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        let value = |k: &str| env[k]["value"].as_str().unwrap();
        assert_eq!(value("FLOTILLA_MASTER_URL"), "http://127.0.0.1:5000");
        assert_eq!(value("FLOTILLA_WORKER_ID"), "3");
        assert_eq!(value("FLOTILLA_INCARNATION"), "7");
        assert_eq!(value("FLOTILLA_SLOTS"), "2");
        // The credential is in the worker's Secret, never in the Pod object.
        assert_eq!(
            env["FLOTILLA_WORKER_SECRET"],
            &json!({"name": "FLOTILLA_WORKER_SECRET", "valueFrom": {"secretKeyRef":
                {"name": "demo-worker-3", "key": "credential", "optional": false}}})
        );
        assert!(!pod.to_string().contains("s3cret"), "{pod}");
        let secret = serde_json::to_value(s.secret(&launch())).unwrap();
        assert_eq!(secret["metadata"]["name"], "demo-worker-3");
        assert_eq!(secret["metadata"]["labels"], pod["metadata"]["labels"]);
        assert_eq!(secret["type"], "Opaque");
        assert_eq!(secret["data"]["credential"], "czNjcmV0", "base64 of s3cret");
        assert_eq!(
            value("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "http://jaeger:4318",
            "traces follow the master's settings"
        );
    }

    #[test]
    fn worker_pod_settings_reach_the_pod_and_it_stays_hardened() {
        let s = KubernetesSettings::from_spec_with(
            &spec("  telemetry: { workerOtlpEndpoint: 'http://collector:4318' }\n  workerPods:\n    nodeSelector: { pool: batch }\n    tolerations: [{ key: batch, operator: Exists, effect: NoSchedule }]\n    affinity: { nodeAffinity: { preferredDuringSchedulingIgnoredDuringExecution: [{ weight: 1, preference: { matchExpressions: [{ key: pool, operator: In, values: [batch] }] } }] } }\n    imagePullSecrets: [{ name: regcred }]\n    env: [{ name: DATA, value: /data }]\n    volumes: [{ name: data, persistentVolumeClaim: { claimName: data, readOnly: true } }]\n    volumeMounts: [{ name: data, mountPath: /data, readOnly: true }]\n"),
            no_env,
        )
        .unwrap();
        let pod = serde_json::to_value(s.pod(&launch(), "abc")).unwrap();
        let spec = &pod["spec"];
        assert_eq!(spec["nodeSelector"], json!({"pool": "batch"}));
        assert_eq!(spec["tolerations"][0]["key"], "batch");
        assert_eq!(
            spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
                ["weight"],
            1
        );
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(spec["volumes"][0]["name"], "tmp");
        assert_eq!(
            spec["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "data"
        );
        let c = &spec["containers"][0];
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": "/data", "readOnly": true}])
        );
        let env = c["env"].as_array().unwrap();
        assert!(env.contains(&json!({"name": "DATA", "value": "/data"})));
        assert!(env.contains(
            &json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"})
        ));
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    }

    #[test]
    fn pods_that_will_not_run_are_told_apart_from_live_ones() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "demo-worker-0"},
                "status": status,
            }))
            .unwrap()
        };
        let container = |state: serde_json::Value| {
            json!([{"name": "worker", "image": "x", "imageID": "", "ready": false,
                    "restartCount": 0, "state": state}])
        };
        assert_eq!(pod_gone(&pod(json!({"phase": "Running"})), false), None);
        assert_eq!(pod_gone(&pod(json!({"phase": "Pending"})), false), None);
        let evicted = pod(json!({"phase": "Failed", "reason": "Evicted"}));
        assert!(pod_gone(&evicted, false).unwrap().contains("Evicted"));
        let oom = pod(json!({"phase": "Failed", "containerStatuses": container(
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))}));
        let detail = pod_gone(&oom, false).unwrap();
        assert!(
            detail.contains("137") && detail.contains("OOMKilled"),
            "{detail}"
        );
        let never_pulled = pod(json!({"phase": "Pending", "containerStatuses": container(
            json!({"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}))}));
        assert!(pod_gone(&never_pulled, false)
            .unwrap()
            .contains("ErrImageNeverPull"));
        let creating = pod(json!({"phase": "Pending", "containerStatuses": container(
            json!({"waiting": {"reason": "ContainerCreating"}}))}));
        assert_eq!(pod_gone(&creating, false), None);
        assert!(pod_gone(&pod(json!({})), true).unwrap().contains("deleted"));
    }

    #[test]
    fn release_names_must_fit_pod_names_and_labels() {
        assert!(is_dns_label("flotilla"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("a.b"));
    }
}
