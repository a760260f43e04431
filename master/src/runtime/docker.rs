//! The Docker runtime: each worker is a container `<cluster>-worker-<id>`,
//! started through the engine's API (bollard) on a user-defined bridge
//! network, with a CPU quota proportional to its queue capacity and a memory
//! limit. A restart removes the container and creates it again under the same
//! name, for the next incarnation.
//!
//! Deaths are seen at once through the engine's event stream (`die`, `oom`,
//! a `kill` with SIGKILL), filtered by the cluster's label; the heartbeat
//! stays the backstop for a container that hangs (`docker pause`).
//!
//! A master restarted on the same state directory adopts the containers of
//! the previous one that still run the incarnation its store names (by
//! container ID, checked against the labels): same containers, nothing
//! recreated. Its workers reach it at the same address, because a master on
//! the host serves them on the network's gateway at its own API port. What
//! it does not adopt (other incarnations, stopped containers, or everything
//! when nothing is kept) is removed before any worker starts, and only once
//! the cluster is claimed
//! (see [`super::owner`]): a container `<cluster>-owner`, created and never
//! started, labelled with its owner's record. Creating a container under a
//! taken name fails, so the engine itself decides between two masters
//! starting at once; a claim whose owner is seen gone (its process on this
//! host, or its API not answering with its session) is removed and taken.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, EventMessage, HostConfig, NetworkCreateRequest, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use flotilla_proto::{env, Incarnation, WorkerId};
use futures::StreamExt;
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
/// Labels on every worker container (and on a network this runtime creates).
pub const LABEL_CLUSTER: &str = "dev.flotilla.cluster";
pub const LABEL_WORKER: &str = "dev.flotilla.worker";
pub const LABEL_INCARNATION: &str = "dev.flotilla.incarnation";
/// On the claim container `<cluster>-owner`: the cluster it claims, and the
/// owner's record (JSON).
pub const LABEL_OWNER_OF: &str = "dev.flotilla.owner-of";
pub const LABEL_OWNER: &str = "dev.flotilla.owner";

/// Longest wait for one engine call (the event stream is not bounded by it).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The user worker containers run as: the image's unprivileged `flotilla`.
pub const WORKER_USER: &str = "10001:10001";
/// The most processes (threads included) one worker container may have: a
/// fork bomb in a task stops there, not at the host's limit.
pub const PIDS_LIMIT: i64 = 512;
/// The size of the writable `/tmp` (a tmpfs, counted in the memory limit);
/// the rest of the root filesystem is read-only.
pub const TMP_SIZE_BYTES: u64 = 128 << 20;

/// What the manifest says about the worker containers.
#[derive(Clone, Debug)]
pub struct DockerSettings {
    /// `metadata.name`: container names, labels, default network.
    pub cluster: String,
    pub image: String,
    pub network: String,
    /// CPU cores per unit of queue capacity (`NanoCpus` = capacity x this x 1e9).
    pub cpu_per_capacity: f64,
    pub memory_bytes: u64,
    /// `spec.telemetry.workerOtlpEndpoint`: replaces the OTLP endpoint the
    /// workers inherit from the master.
    pub worker_otlp_endpoint: Option<String>,
}

impl DockerSettings {
    /// The settings of `spec`, with the documented defaults.
    pub fn from_spec(spec: &crate::manifest::ClusterSpec) -> Self {
        DockerSettings {
            cluster: spec.name.clone(),
            image: spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into()),
            network: spec.network.clone().unwrap_or_else(|| spec.name.clone()),
            cpu_per_capacity: spec.worker_resources.cpu_per_capacity,
            memory_bytes: spec.worker_resources.memory_bytes,
            worker_otlp_endpoint: spec.worker_otlp_endpoint.clone(),
        }
    }

    pub fn container_name(&self, worker: WorkerId) -> String {
        format!("{}-worker-{worker}", self.cluster)
    }

    /// The claim container's name (see the module comment).
    pub fn claim_name(&self) -> String {
        format!("{}-owner", self.cluster)
    }

    /// The CPU quota of a worker of this capacity, in units of 1e-9 CPUs:
    /// capacity x cpuPerCapacity, capped at the engine's CPU count (Docker
    /// refuses a quota above it).
    pub fn nano_cpus(&self, capacity: usize, engine_cpus: u32) -> i64 {
        let wanted = (capacity as f64 * self.cpu_per_capacity * 1e9).round() as i64;
        wanted.min(i64::from(engine_cpus.max(1)) * 1_000_000_000)
    }
}

/// Why the runtime could not be set up; each names what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DockerSetupError {
    #[error("cannot reach the Docker engine ({host}): {source}. Is dockerd running, and is DOCKER_HOST right? (`runtime: docker` needs it; `--runtime process` does not)")]
    Unreachable { host: String, source: BollardError },
    #[error("the worker image `{image}` is not on this machine: build it with `cargo build --release && docker/build-images.sh` (offline, no registry needed), or name another in spec.image")]
    ImageMissing { image: String },
    #[error("docker network `{network}`: {reason}")]
    Network { network: String, reason: String },
}

/// Why a container name could not be made free for a new worker container.
#[derive(Debug, thiserror::Error)]
pub enum NameTaken {
    #[error("cannot inspect the container named {name}: {source}")]
    Inspect { name: String, source: BollardError },
    #[error("a container named {name} exists and is not a worker of cluster `{cluster}`: remove or rename it (docker rm -f {name}), or give the cluster another metadata.name")]
    NotOurs { name: String, cluster: String },
    #[error("cannot remove the old container {name}: {source}")]
    Remove { name: String, source: BollardError },
}

/// The container that runs a worker's current incarnation.
#[derive(Clone, Debug)]
struct Tracked {
    incarnation: Incarnation,
    container_id: String,
}

struct Inner {
    docker: Docker,
    settings: DockerSettings,
    /// The network's gateway: where a loopback OTLP endpoint of the master's
    /// is reached from a container.
    gateway: Option<IpAddr>,
    /// CPUs the engine has: the most a quota can be.
    engine_cpus: u32,
    containers: Mutex<HashMap<WorkerId, Tracked>>,
    events: UnboundedSender<RuntimeEvent>,
    /// Set on shutdown: deaths are then expected, and not reported.
    stopping: AtomicBool,
    /// This master's claim on the cluster, once made: (owner, container ID).
    claim: Mutex<Option<(Owner, String)>>,
    /// Checks that the claim stays this master's (see `watch_claim`).
    claim_watch: Mutex<Option<JoinHandle<()>>>,
}

pub struct DockerRuntime {
    inner: Arc<Inner>,
    gateway: Option<IpAddr>,
    /// Removed again on shutdown if this runtime created it.
    created_network: bool,
    watcher: JoinHandle<()>,
}

fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn docker_host() -> String {
    crate::settings::get()
        .docker_host
        .clone()
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

fn now_unix() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl DockerRuntime {
    /// Connects to the engine (DOCKER_HOST or the local socket), checks the
    /// image, creates the network if it is missing, and starts following
    /// the cluster's events. Containers left by an earlier run are removed
    /// by [`Runtime::remove_workers`], once the cluster is claimed.
    pub async fn connect(
        settings: DockerSettings,
        events: UnboundedSender<RuntimeEvent>,
    ) -> Result<DockerRuntime, DockerSetupError> {
        let host = docker_host();
        let unreachable = |source| DockerSetupError::Unreachable {
            host: host.clone(),
            source,
        };
        let docker = Docker::connect_with_defaults()
            .map_err(unreachable)?
            .with_timeout(CALL_TIMEOUT)
            // The engine may be older than bollard (20.10 speaks API 1.41).
            .negotiate_version()
            .await
            .map_err(unreachable)?;
        // Events from here on are replayed to the watcher, however late it
        // subscribes: no death between now and then is missed.
        let since = now_unix();

        let engine_cpus = docker
            .info()
            .await
            .map_err(unreachable)?
            .ncpu
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1);
        match docker.inspect_image(&settings.image).await {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => {
                return Err(DockerSetupError::ImageMissing {
                    image: settings.image.clone(),
                })
            }
            Err(e) => return Err(unreachable(e)),
        }

        let (gateway, created_network) = ensure_network(&docker, &settings).await?;

        let inner = Arc::new(Inner {
            docker,
            settings,
            gateway,
            engine_cpus,
            containers: Mutex::new(HashMap::new()),
            events,
            stopping: AtomicBool::new(false),
            claim: Mutex::new(None),
            claim_watch: Mutex::new(None),
        });
        let watcher = tokio::spawn(inner.clone().watch_events(since));
        Ok(DockerRuntime {
            inner,
            gateway,
            created_network,
            watcher,
        })
    }

    /// The network's gateway: the host's address on it, where a master
    /// running on the host can serve the workers.
    pub fn gateway(&self) -> Option<IpAddr> {
        self.gateway
    }

    pub fn settings(&self) -> &DockerSettings {
        &self.inner.settings
    }
}

/// Inspects the network, creating it (a bridge, labelled with the cluster)
/// if missing. Returns its gateway and whether it was created here.
async fn ensure_network(
    docker: &Docker,
    settings: &DockerSettings,
) -> Result<(Option<IpAddr>, bool), DockerSetupError> {
    let network = settings.network.clone();
    let fail = |reason: String| DockerSetupError::Network {
        network: network.clone(),
        reason,
    };
    let mut created = false;
    let inspected = match docker.inspect_network(&network, None).await {
        Ok(n) => n,
        Err(e) if status_of(&e) == Some(404) => {
            let request = NetworkCreateRequest {
                name: network.clone(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(
                    LABEL_CLUSTER.to_string(),
                    settings.cluster.clone(),
                )])),
                ..Default::default()
            };
            match docker.create_network(request).await {
                Ok(_) => {
                    created = true;
                    info!(%network, "created docker network");
                }
                // Another master (or compose) made it meanwhile: use it.
                Err(e) if status_of(&e) == Some(409) => {}
                Err(e) => return Err(fail(format!("cannot create it: {e}"))),
            }
            docker
                .inspect_network(&network, None)
                .await
                .map_err(|e| fail(format!("cannot inspect it after creating it: {e}")))?
        }
        Err(e) => return Err(fail(format!("cannot inspect it: {e}"))),
    };
    let gateway = inspected
        .ipam
        .and_then(|ipam| ipam.config)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.gateway)
        .filter_map(|g| g.parse::<IpAddr>().ok())
        // An IPv4 gateway when there is one: every container has IPv4.
        .min_by_key(|ip| ip.is_ipv6());
    Ok((gateway, created))
}

impl Inner {
    fn cluster_filter(&self) -> String {
        format!("{LABEL_CLUSTER}={}", self.settings.cluster)
    }

    /// Removes every container labelled with this cluster but those it
    /// tracks when `spare_tracked` (adopted ones); returns their names and
    /// short IDs.
    async fn remove_labelled(&self, spare_tracked: bool) -> Result<Vec<String>, BollardError> {
        let spared: Vec<String> = if spare_tracked {
            let containers = self.containers.lock().expect("containers lock");
            containers
                .values()
                .map(|t| t.container_id.clone())
                .collect()
        } else {
            Vec::new()
        };
        let filters = HashMap::from([("label", vec![self.cluster_filter()])]);
        let list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        let found: Vec<(String, String)> = list
            .into_iter()
            .filter_map(|c| {
                let name = c.names.and_then(|n| n.first().cloned()).unwrap_or_default();
                c.id.map(|id| (id, name.trim_start_matches('/').to_string()))
            })
            .filter(|(id, _)| !spared.contains(id))
            .collect();
        let removals = found.iter().map(|(id, _)| self.remove(id));
        for result in futures::future::join_all(removals).await {
            result?;
        }
        Ok(found
            .into_iter()
            .map(|(id, name)| format!("container {name} ({})", &id[..12.min(id.len())]))
            .collect())
    }

    /// Whether a claim's owner lives: a master in a container of this
    /// engine (seen from elsewhere: another container, the host) lives while
    /// its container runs; else [`owner::liveness`].
    async fn holder_liveness(&self, holder: &Owner) -> Verdict {
        if let (Some(id), false) = (&holder.container, holder.host == owner::hostname()) {
            match self.docker.inspect_container(id, None).await {
                Ok(c) => {
                    let state = c.state.unwrap_or_default();
                    return if state.running == Some(true) {
                        Verdict::Alive
                    } else {
                        Verdict::Gone(format!(
                            "its container {} is not running",
                            &id[..12.min(id.len())]
                        ))
                    };
                }
                // Not one of this engine's: ask it.
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Verdict::Unknown(format!("cannot inspect its container: {e}")),
            }
        }
        owner::liveness(holder).await
    }

    /// Every third of [`owner::LEASE`], checks that the claim container is
    /// still this master's: another master takes it over when this one could
    /// be neither seen nor reached for the lease, and this one must then
    /// stop ([`RuntimeEvent::ClaimLost`]). A claim removed by hand is made
    /// again.
    async fn watch_claim(self: Arc<Self>, me: Owner, mut id: String) {
        let name = self.settings.claim_name();
        loop {
            tokio::time::sleep(owner::LEASE / 3).await;
            match self.read_claim().await {
                Ok(Some((now, _))) if now == id => {}
                Ok(Some((_, holder))) => {
                    let by = holder
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "no owner".into());
                    let _ = self.events.send(RuntimeEvent::ClaimLost {
                        detail: format!("container {name} now names {by}: this master was not heard from for the lease"),
                    });
                    return;
                }
                Ok(None) => match self.create_claim(&me).await {
                    Ok(Some(new)) => {
                        warn!(claim = %name, "the cluster's claim container was removed; made again");
                        id = new.clone();
                        if let Some(c) = self.claim.lock().expect("claim lock").as_mut() {
                            c.1 = new;
                        }
                    }
                    Ok(None) => {} // someone else's now: seen next time
                    Err(e) => warn!(error = %e, "cannot make the cluster's claim again"),
                },
                Err(e) => warn!(error = %e, "cannot check the cluster's claim"),
            }
        }
    }

    /// The claim container as it is now: its ID and owner record, if any.
    async fn read_claim(&self) -> Result<Option<(String, Option<Owner>)>, String> {
        let name = self.settings.claim_name();
        match self.docker.inspect_container(&name, None).await {
            Ok(c) => {
                let owner = c
                    .config
                    .and_then(|c| c.labels)
                    .and_then(|l| l.get(LABEL_OWNER).cloned())
                    .and_then(|json| serde_json::from_str::<Owner>(&json).ok());
                Ok(Some((c.id.unwrap_or(name), owner)))
            }
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(format!("cannot inspect container {name}: {e}")),
        }
    }

    /// Creates the claim container for `me`; `Ok(None)` when the name is
    /// taken.
    async fn create_claim(&self, me: &Owner) -> Result<Option<String>, String> {
        let name = self.settings.claim_name();
        let body = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            labels: Some(HashMap::from([
                (LABEL_OWNER_OF.to_string(), self.settings.cluster.clone()),
                (
                    LABEL_OWNER.to_string(),
                    serde_json::to_string(me).expect("an owner serialises"),
                ),
            ])),
            // Never started: a record, not a process.
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        match self.docker.create_container(Some(options), body).await {
            Ok(c) => Ok(Some(c.id)),
            Err(e) if status_of(&e) == Some(409) => Ok(None),
            Err(e) => Err(format!("cannot create container {name}: {e}")),
        }
    }

    /// `docker rm -f`: SIGKILL if running (paused too), then remove.
    /// A container that is already gone is not an error.
    async fn remove(&self, container: &str) -> Result<(), BollardError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // "removal already in progress": someone else is removing it.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn create_body(&self, launch: &WorkerLaunch) -> ContainerCreateBody {
        let s = &self.settings;
        let mut envs = vec![
            format!("{}={}", env::MASTER_URL, launch.master_url),
            format!("{}={}", env::WORKER_ID, launch.worker_id),
            format!("{}={}", env::INCARNATION, launch.incarnation),
            format!("{}={}", env::SLOTS, launch.slots),
        ];
        // The worker logs and traces as its master does, as process workers
        // do; a trace endpoint on the master's loopback is not the
        // container's: it becomes the network's gateway (the host).
        envs.extend(launch.inherited_env.iter().map(|(k, v)| {
            let v = match k.as_str() {
                "OTEL_EXPORTER_OTLP_ENDPOINT" | "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => self
                    .settings
                    .worker_otlp_endpoint
                    .clone()
                    .unwrap_or_else(|| super::loopback_to(v, self.gateway)),
                _ => v.clone(),
            };
            format!("{k}={v}")
        }));
        let labels = HashMap::from([
            (LABEL_CLUSTER.to_string(), s.cluster.clone()),
            (LABEL_WORKER.to_string(), launch.worker_id.to_string()),
            (
                LABEL_INCARNATION.to_string(),
                launch.incarnation.to_string(),
            ),
        ]);
        let memory = i64::try_from(s.memory_bytes).unwrap_or(i64::MAX);
        ContainerCreateBody {
            image: Some(s.image.clone()),
            env: Some(envs),
            labels: Some(labels),
            // Tasks run arbitrary code: never as root, whatever the image says.
            user: Some(WORKER_USER.into()),
            // The credential arrives on stdin (see `start`), never in the
            // environment, which every process in the container (tini as
            // PID 1 included) would show in /proc/<pid>/environ.
            open_stdin: Some(true),
            stdin_once: Some(true),
            attach_stdin: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some(s.network.clone()),
                // Nothing a worker does needs a capability, nor gaining one
                // through a setuid binary.
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                pids_limit: Some(PIDS_LIMIT),
                // Nothing in the image can be changed; tasks write to /tmp.
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_string(),
                    format!("rw,nosuid,nodev,size={TMP_SIZE_BYTES},mode=1777"),
                )])),
                nano_cpus: Some(s.nano_cpus(launch.capacity, self.engine_cpus)),
                memory: Some(memory),
                // No swap beyond the limit: the limit is the limit.
                memory_swap: Some(memory),
                // The master restarts workers (next incarnation), not Docker.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Makes the name free for a new container: removes what holds it if it
    /// is one of this cluster's; refuses to touch anyone else's.
    async fn free_name(&self, name: &str) -> Result<(), NameTaken> {
        let holder = match self.docker.inspect_container(name, None).await {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => return Ok(()),
            Err(source) => {
                return Err(NameTaken::Inspect {
                    name: name.to_string(),
                    source,
                })
            }
        };
        let ours = holder
            .config
            .and_then(|c| c.labels)
            .and_then(|l| l.get(LABEL_CLUSTER).cloned())
            .is_some_and(|c| c == self.settings.cluster);
        if !ours {
            return Err(NameTaken::NotOurs {
                name: name.to_string(),
                cluster: self.settings.cluster.clone(),
            });
        }
        self.remove(name).await.map_err(|source| NameTaken::Remove {
            name: name.to_string(),
            source,
        })
    }

    /// Follows the engine's events for this cluster's containers, and
    /// reports the death of a container that runs a current incarnation.
    /// Reconnects (replaying what it missed) if the stream breaks.
    async fn watch_events(self: Arc<Self>, mut since: Duration) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let filters = HashMap::from([
                ("type", vec!["container".to_string()]),
                ("label", vec![self.cluster_filter()]),
                (
                    "event",
                    vec!["die".to_string(), "oom".to_string(), "kill".to_string()],
                ),
            ]);
            let options = EventsOptionsBuilder::default()
                .since(&format!("{}.{:09}", since.as_secs(), since.subsec_nanos()))
                .filters(&filters)
                .build();
            let mut stream = self.docker.events(Some(options));
            let outcome = loop {
                match stream.next().await {
                    Some(Ok(event)) => {
                        backoff = Duration::from_millis(100);
                        if let Some(t) = event.time_nano {
                            since = Duration::from_nanos(t.max(0) as u64);
                        }
                        self.on_event(event);
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the engine closed the stream".to_string(),
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            warn!(reason = %outcome, ?backoff, "docker event stream broken; reconnecting");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn on_event(&self, event: EventMessage) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let action = event.action.unwrap_or_default();
        let Some(actor) = event.actor else { return };
        let container_id = actor.id.unwrap_or_default();
        let attrs = actor.attributes.unwrap_or_default();
        let label = |k: &str| attrs.get(k).and_then(|v| v.parse::<u64>().ok());
        let (Some(worker), Some(incarnation)) = (label(LABEL_WORKER), label(LABEL_INCARNATION))
        else {
            return;
        };
        let worker = worker as WorkerId;
        let name = attrs.get("name").cloned().unwrap_or_default();
        let detail = match action.as_str() {
            "die" => format!(
                "container {name} died (exit code {})",
                attrs.get("exitCode").map(String::as_str).unwrap_or("?")
            ),
            "oom" => format!("container {name} ran out of memory (OOM-killed)"),
            // SIGKILL cannot be caught: the `die` that follows is certain.
            "kill" if attrs.get("signal").map(String::as_str) == Some("9") => {
                format!("container {name} was sent SIGKILL")
            }
            _ => return,
        };
        // Only a container that runs a current incarnation: the ones this
        // runtime removed itself (restart, /stop) were forgotten first.
        let current = self
            .containers
            .lock()
            .expect("containers lock")
            .get(&worker)
            .is_some_and(|t| t.container_id == container_id && t.incarnation == incarnation);
        if !current {
            debug!(worker, incarnation, %action, "event for a container no longer tracked");
            return;
        }
        info!(worker, incarnation, %detail, "worker container event");
        let _ = self.events.send(RuntimeEvent::Exited {
            worker_id: worker,
            incarnation,
            detail,
        });
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn cpu_quota(&self, capacity: usize) -> Option<f64> {
        let nano = self
            .inner
            .settings
            .nano_cpus(capacity, self.inner.engine_cpus);
        Some(nano as f64 / 1e9)
    }

    /// A master in a container on the workers' network (compose) is
    /// reached at its advertised URL (`http://master:5000`). A master on the
    /// host gets a listener of its own on the network's gateway, serving
    /// only the worker routes (the API stays on its bind address, loopback
    /// by default).
    async fn worker_endpoint(
        &self,
        advertised: Option<&str>,
        api: &str,
    ) -> Result<WorkerEndpoint, RuntimeError> {
        if let Some(url) = advertised {
            return Ok(WorkerEndpoint::Url(url.to_string()));
        }
        let network = &self.settings().network;
        let gateway = self.gateway().ok_or_else(|| RuntimeError::Endpoint(format!(
            "docker network `{network}` has no gateway address for the workers to reach the master at; set FLOTILLA_ADVERTISE_URL to a URL they can reach"
        )))?;
        let cannot = |e: std::io::Error| {
            RuntimeError::Endpoint(format!(
            "cannot listen on {gateway}, the gateway of docker network `{network}`, for the workers ({e}). If the master runs in a container, set FLOTILLA_ADVERTISE_URL to the URL workers reach it at (e.g. http://master:5000)"
        ))
        };
        // The API's own port, so that a master started again on the same
        // port is where the containers it adopts look for it.
        let port = url::Url::parse(api)
            .ok()
            .and_then(|u| u.port_or_known_default())
            .unwrap_or(0);
        let listener = match tokio::net::TcpListener::bind((gateway, port)).await {
            Ok(l) => l,
            Err(e) if port != 0 => {
                warn!(%gateway, port, error = %e, "cannot serve the workers on the API's port on the network's gateway; using another port (containers adopted after a restart will not find this master there)");
                tokio::net::TcpListener::bind((gateway, 0))
                    .await
                    .map_err(cannot)?
            }
            Err(e) => return Err(cannot(e)),
        };
        Ok(WorkerEndpoint::Listener(listener))
    }

    async fn start(&self, launch: WorkerLaunch) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let name = inner.settings.container_name(launch.worker_id);
        let fail = |reason: String| RuntimeError::Start {
            worker: launch.worker_id,
            reason,
        };
        let body = inner.create_body(&launch);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = match inner
            .docker
            .create_container(Some(options.clone()), body.clone())
            .await
        {
            // The name is taken (an old incarnation not yet removed).
            Err(e) if status_of(&e) == Some(409) => {
                inner
                    .free_name(&name)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                inner.docker.create_container(Some(options), body).await
            }
            other => other,
        };
        let created = match created {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => {
                return Err(fail(format!(
                    "image `{}` not found: build it with docker/build-images.sh",
                    inner.settings.image
                )))
            }
            Err(e) => return Err(fail(format!("cannot create container {name}: {e}"))),
        };
        // Tracked before it starts, so that a death right after start is
        // recognised as this incarnation's.
        inner.containers.lock().expect("containers lock").insert(
            launch.worker_id,
            Tracked {
                incarnation: launch.incarnation,
                container_id: created.id.clone(),
            },
        );
        // Attached before it starts, so the worker's first read finds the
        // credential; detaching then closes its stdin (stdin_once).
        let attach = inner
            .docker
            .attach_container(
                &created.id,
                Some(
                    AttachContainerOptionsBuilder::default()
                        .stdin(true)
                        .stream(true)
                        .build(),
                ),
            )
            .await;
        let started = match attach {
            Err(e) => Err(format!("cannot attach to container {name}: {e}")),
            Ok(mut attached) => match inner.docker.start_container(&created.id, None).await {
                Err(e) => Err(format!("cannot start container {name}: {e}")),
                Ok(()) => {
                    use tokio::io::AsyncWriteExt;
                    let line = format!("{}\n", launch.secret);
                    let handover = async {
                        attached.input.write_all(line.as_bytes()).await?;
                        attached.input.flush().await?;
                        attached.input.shutdown().await
                    };
                    match tokio::time::timeout(CALL_TIMEOUT, handover).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            Err(format!("cannot hand container {name} its credential: {e}"))
                        }
                        Err(_) => Err(format!("handing container {name} its credential timed out")),
                    }
                }
            },
        };
        if let Err(reason) = started {
            inner
                .containers
                .lock()
                .expect("containers lock")
                .remove(&launch.worker_id);
            let _ = inner.remove(&created.id).await;
            return Err(fail(reason));
        }
        info!(
            worker = launch.worker_id,
            incarnation = launch.incarnation,
            container = %name,
            id = %&created.id[..12.min(created.id.len())],
            nano_cpus = inner.settings.nano_cpus(launch.capacity, inner.engine_cpus),
            "started worker container"
        );
        Ok(())
    }

    async fn kill(&self, worker: WorkerId) -> Result<(), RuntimeError> {
        let tracked = self
            .inner
            .containers
            .lock()
            .expect("containers lock")
            .remove(&worker);
        if let Some(t) = tracked {
            self.inner
                .remove(&t.container_id)
                .await
                .map_err(|e| RuntimeError::Kill {
                    worker,
                    reason: format!(
                        "docker rm -f {}: {e}",
                        self.inner.settings.container_name(worker)
                    ),
                })?;
        }
        Ok(())
    }

    async fn inspect(&self, worker: WorkerId) -> Option<WorkerHandle> {
        let containers = self.inner.containers.lock().expect("containers lock");
        containers.get(&worker).map(|t| WorkerHandle {
            incarnation: t.incarnation,
            locator: format!(
                "container {} ({})",
                self.inner.settings.container_name(worker),
                &t.container_id[..12.min(t.container_id.len())]
            ),
            key: Some(t.container_id.clone()),
        })
    }

    async fn claim(&self, me: &Owner) -> Result<(), ClaimError> {
        let inner = &self.inner;
        let cluster = inner.settings.cluster.clone();
        let claim = format!("container {}", inner.settings.claim_name());
        let failed = |detail: String| ClaimError::Failed {
            cluster: cluster.clone(),
            claim: claim.clone(),
            detail,
        };
        // When an owner that can be neither seen nor reached loses its claim.
        let mut unknown_since: Option<tokio::time::Instant> = None;
        loop {
            if let Some(id) = inner.create_claim(me).await.map_err(&failed)? {
                *inner.claim.lock().expect("claim lock") = Some((me.clone(), id.clone()));
                let watch = tokio::spawn(inner.clone().watch_claim(me.clone(), id));
                if let Some(old) = inner.claim_watch.lock().expect("claim lock").replace(watch) {
                    old.abort();
                }
                return Ok(());
            }
            let Some((id, holder)) = inner.read_claim().await.map_err(&failed)? else {
                continue; // removed meanwhile: try again
            };
            let verdict = match &holder {
                Some(h) if h.session == me.session => Verdict::Alive,
                Some(h) => inner.holder_liveness(h).await,
                None => Verdict::Gone("the claim names no owner".into()),
            };
            match (verdict, holder) {
                (Verdict::Alive, Some(h)) => {
                    return Err(ClaimError::Held {
                        cluster,
                        owner: Box::new(h),
                        claim,
                    })
                }
                (Verdict::Unknown(why), Some(h))
                    if unknown_since
                        .get_or_insert_with(tokio::time::Instant::now)
                        .elapsed()
                        < owner::LEASE =>
                {
                    warn!(owner = %h, %why, lease = ?owner::LEASE, "the cluster's owner cannot be reached; taking its claim over if it stays so for the lease");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                (verdict, _) => {
                    info!(
                        ?verdict,
                        "the cluster's previous owner is gone; taking its claim over"
                    );
                    inner.remove(&id).await.map_err(|e| {
                        failed(format!("cannot remove the gone owner's claim: {e}"))
                    })?;
                }
            }
        }
    }

    async fn release_claim(&self) {
        let inner = &self.inner;
        if let Some(w) = inner.claim_watch.lock().expect("claim lock").take() {
            w.abort();
        }
        let Some((me, id)) = inner.claim.lock().expect("claim lock").take() else {
            return;
        };
        // Only if it is still ours.
        if let Ok(Some((now, Some(holder)))) = inner.read_claim().await {
            if now == id && holder.session == me.session {
                if let Err(e) = inner.remove(&id).await {
                    warn!(error = %e, "could not remove the cluster's claim container");
                }
            }
        }
    }

    async fn remove_workers(
        &self,
        _recorded: &[RecordedWorker],
    ) -> Result<Vec<String>, RuntimeError> {
        let inner = &self.inner;
        let removed = inner.remove_labelled(false).await.map_err(|e| {
            RuntimeError::Remove(format!(
                "containers of cluster `{}`: {e}",
                inner.settings.cluster
            ))
        })?;
        // The network goes too if a master of this cluster made it (its
        // label says so) and nothing else uses it now.
        let network = &inner.settings.network;
        let ours = inner
            .docker
            .inspect_network(network, None)
            .await
            .ok()
            .and_then(|n| n.labels)
            .and_then(|l| l.get(LABEL_CLUSTER).cloned())
            .is_some_and(|c| c == inner.settings.cluster);
        if ours {
            match inner.docker.remove_network(network).await {
                Ok(()) => info!(%network, "removed the cluster's docker network"),
                Err(e) => debug!(%network, error = %e, "docker network kept (in use)"),
            }
        }
        Ok(removed)
    }

    async fn adopt(&self, worker: &Adoptable) -> Result<Option<WorkerHandle>, RuntimeError> {
        let inner = &self.inner;
        let name = inner.settings.container_name(worker.worker_id);
        let forget = || {
            inner
                .containers
                .lock()
                .expect("containers lock")
                .remove(&worker.worker_id);
        };
        // Tracked first: a death from here on is this incarnation's.
        inner.containers.lock().expect("containers lock").insert(
            worker.worker_id,
            Tracked {
                incarnation: worker.incarnation,
                container_id: worker.key.clone(),
            },
        );
        let found = match inner.docker.inspect_container(&worker.key, None).await {
            Ok(c) => Some(c),
            Err(e) if status_of(&e) == Some(404) => None,
            Err(e) => {
                forget();
                return Err(RuntimeError::Start {
                    worker: worker.worker_id,
                    reason: format!("cannot inspect container {name}: {e}"),
                });
            }
        };
        let labels = found
            .as_ref()
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let is_it = labels.get(LABEL_CLUSTER) == Some(&inner.settings.cluster)
            && labels.get(LABEL_WORKER) == Some(&worker.worker_id.to_string())
            && labels.get(LABEL_INCARNATION) == Some(&worker.incarnation.to_string());
        let running = found
            .as_ref()
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.running)
            .unwrap_or(false);
        if !(is_it && running) {
            forget();
            return Ok(None);
        }
        info!(
            worker = worker.worker_id,
            incarnation = worker.incarnation,
            container = %name,
            id = %&worker.key[..12.min(worker.key.len())],
            "adopted a running worker container"
        );
        Ok(self.inspect(worker.worker_id).await)
    }

    async fn detach(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        self.watcher.abort();
        let left = inner.containers.lock().expect("containers lock").len();
        info!(
            containers = left,
            "leaving the worker containers running for the next master"
        );
    }

    /// With the claim held (their master is gone): the containers of the
    /// cluster that were not adopted.
    async fn remove_leftovers(&self) -> Result<(), RuntimeError> {
        let removed = self.inner.remove_labelled(true).await.map_err(|e| {
            RuntimeError::Remove(format!(
                "cannot remove the containers left by an earlier master of cluster `{}`: {e}",
                self.inner.settings.cluster
            ))
        })?;
        if !removed.is_empty() {
            info!(cluster = %self.inner.settings.cluster, ?removed, "removed worker containers left by a master that is gone");
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        self.watcher.abort();
        inner.containers.lock().expect("containers lock").clear();
        // Every container with the label, tracked or not (a start that
        // failed half-way leaves one).
        match inner.remove_labelled(false).await {
            Ok(n) => info!(removed = n.len(), "removed the worker containers"),
            Err(e) => warn!(error = %e, "could not remove every worker container"),
        }
        if self.created_network {
            match inner.docker.remove_network(&inner.settings.network).await {
                Ok(()) => debug!(network = %inner.settings.network, "removed docker network"),
                Err(e) => {
                    debug!(network = %inner.settings.network, error = %e, "docker network kept")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DockerSettings {
        DockerSettings {
            cluster: "demo".into(),
            image: DEFAULT_IMAGE.into(),
            network: "demo".into(),
            cpu_per_capacity: 0.25,
            memory_bytes: 512 << 20,
            worker_otlp_endpoint: None,
        }
    }

    #[test]
    fn the_cpu_quota_is_proportional_to_capacity() {
        let s = settings();
        assert_eq!(s.nano_cpus(4, 2), 1_000_000_000);
        assert_eq!(s.nano_cpus(3, 2), 750_000_000);
        assert_eq!(s.nano_cpus(1, 2), 250_000_000);
        // Never above what the engine has (it would refuse the container).
        assert_eq!(s.nano_cpus(16, 2), 2_000_000_000);
        assert_eq!(s.nano_cpus(16, 8), 4_000_000_000);
        assert_eq!(s.container_name(7), "demo-worker-7");
    }

    #[test]
    fn defaults_come_from_the_manifest() {
        let spec = crate::manifest::parse(
            "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: blue }\nspec:\n  runtime: docker\n  workers: [{ capacity: 2 }]\n",
            "m",
        )
        .unwrap();
        let s = DockerSettings::from_spec(&spec);
        assert_eq!(
            (s.image.as_str(), s.network.as_str()),
            (DEFAULT_IMAGE, "blue")
        );
        assert_eq!(s.nano_cpus(2, 4), 500_000_000);
        assert_eq!(s.memory_bytes, 512 << 20);
    }

    /// A runtime over an engine address nothing answers at: enough to build
    /// container bodies.
    fn test_inner(settings: DockerSettings) -> Inner {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Inner {
            docker: Docker::connect_with_http(
                "http://127.0.0.1:1",
                1,
                bollard::API_DEFAULT_VERSION,
            )
            .unwrap(),
            settings,
            gateway: Some(IpAddr::from([172, 18, 0, 1])),
            engine_cpus: 4,
            containers: Mutex::new(HashMap::new()),
            events: tx,
            stopping: AtomicBool::new(false),
            claim: Mutex::new(None),
            claim_watch: Mutex::new(None),
        }
    }

    #[test]
    fn a_container_create_carries_identity_labels_and_limits() {
        let inner = test_inner(settings());
        let body = inner.create_body(&WorkerLaunch {
            worker_id: 2,
            incarnation: 3,
            capacity: 8,
            slots: 1,
            master_url: "http://172.18.0.1:4321".into(),
            secret: "s3cret".into(),
            inherited_env: vec![
                ("RUST_LOG".into(), "debug".into()),
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                    "http://127.0.0.1:4318".into(),
                ),
            ],
        });
        let env = body.env.unwrap();
        for expected in [
            "FLOTILLA_MASTER_URL=http://172.18.0.1:4321",
            "FLOTILLA_WORKER_ID=2",
            "FLOTILLA_INCARNATION=3",
            "FLOTILLA_SLOTS=1",
            "RUST_LOG=debug",
            // The master's loopback is the host: the gateway, from the container.
            "OTEL_EXPORTER_OTLP_ENDPOINT=http://172.18.0.1:4318",
        ] {
            assert!(env.iter().any(|e| e == expected), "{expected} in {env:?}");
        }
        // The credential goes on stdin, never in the environment.
        assert!(!env.iter().any(|e| e.contains("s3cret")), "{env:?}");
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(true));
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_CLUSTER], "demo");
        assert_eq!(labels[LABEL_WORKER], "2");
        assert_eq!(labels[LABEL_INCARNATION], "3");
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(2_000_000_000));
        assert_eq!(host.memory, Some(512 << 20));
        assert_eq!(host.network_mode.as_deref(), Some("demo"));
        // Hardened: no capability, no privilege gain, bounded processes,
        // read-only image, a size-limited /tmp, never root.
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(host.pids_limit, Some(PIDS_LIMIT));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert!(host.tmpfs.unwrap()["/tmp"].contains(&format!("size={TMP_SIZE_BYTES}")));
        assert_eq!(body.user.as_deref(), Some(WORKER_USER));
    }

    #[test]
    fn a_worker_otlp_endpoint_replaces_the_inherited_one() {
        let mut settings = settings();
        settings.worker_otlp_endpoint = Some("http://collector:4318".into());
        let inner = test_inner(settings);
        let body = inner.create_body(&WorkerLaunch {
            worker_id: 0,
            incarnation: 1,
            capacity: 1,
            slots: 1,
            master_url: "http://172.18.0.1:4321".into(),
            secret: "s".into(),
            inherited_env: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                "http://127.0.0.1:4318".into(),
            )],
        });
        let env = body.env.unwrap();
        assert!(env.contains(&"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318".to_string()));
    }
}
