//! Runtimes: how a worker is started, killed and inspected. One small
//! interface (after Nomad's task drivers) and one module per way of running
//! workers: `process` (child processes, the default), `docker` (containers
//! through the engine's API) and `kubernetes` (pods). The scheduler never
//! knows which one it drives.

pub mod docker;
pub mod process;
// Worker pods through the Kubernetes API server.
pub mod kubernetes;
// One owner per cluster: the claim each runtime keeps.
pub mod owner;

use async_trait::async_trait;
use flotilla_proto::{Incarnation, WorkerId};

/// Everything a runtime needs to start one incarnation of a worker.
#[derive(Clone, Debug)]
pub struct WorkerLaunch {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
    pub capacity: usize,
    /// How many tasks the worker runs at once (1 by default).
    pub slots: u32,
    /// Where the worker reaches the master.
    pub master_url: String,
    /// The per-cluster secret the worker authenticates with.
    pub secret: String,
    /// Settings the worker takes from its master's environment (trace
    /// export endpoint, log level and format): see [`inherited_env`].
    pub inherited_env: Vec<(String, String)>,
}

/// The variables a worker inherits from its master wherever it runs, so
/// that its logs and traces follow the master's settings.
/// The standard `OTEL_*` exporter settings are among them; the service
/// name is not (workers are `flotilla-worker` unless their own environment
/// says otherwise).
pub const INHERITED_ENV: [&str; 13] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
    "RUST_LOG",
    "FLOTILLA_LOG_FORMAT",
    "FLOTILLA_LOG_COLOR",
];

/// `endpoint` with a loopback host (`localhost`, `127.x`, `[::1]`) replaced
/// by `to`: the host as a container on the workers' network reaches it.
/// Anything else (or no `to`) comes back unchanged.
pub fn loopback_to(endpoint: &str, to: Option<std::net::IpAddr>) -> String {
    let (Some(to), Ok(mut url)) = (to, url::Url::parse(endpoint)) else {
        return endpoint.to_string();
    };
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback || url.set_ip_host(to).is_err() {
        return endpoint.to_string();
    }
    let out = url.to_string();
    // Url adds a `/` to a bare origin; the exporter appends /v1/traces itself.
    if endpoint.ends_with('/') {
        out
    } else {
        out.trim_end_matches('/').to_string()
    }
}

/// The master's values of [`INHERITED_ENV`] that are set.
pub fn inherited_env() -> Vec<(String, String)> {
    INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Something the runtime noticed by itself, without the heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The worker's process or container ended.
    Exited {
        worker_id: WorkerId,
        incarnation: Incarnation,
        detail: String,
    },
    /// Another master took the cluster's claim over: this one was not heard
    /// from for its lease (a partition, a long pause). It must stop managing
    /// the workers, which are the new owner's now.
    ClaimLost { detail: String },
}

/// The runtime `kind` for `spec`, connected (an engine or API server that
/// cannot be reached is an error naming it), its deaths sent to `events`.
pub async fn connect(
    kind: crate::manifest::RuntimeKind,
    spec: &crate::manifest::ClusterSpec,
    events: tokio::sync::mpsc::UnboundedSender<RuntimeEvent>,
) -> anyhow::Result<std::sync::Arc<dyn Runtime>> {
    use crate::manifest::RuntimeKind;
    Ok(match kind {
        RuntimeKind::Process => std::sync::Arc::new(
            process::ProcessRuntime::new(process::find_worker_binary(), events)
                .with_memory_limit(spec.worker_resources.memory_bytes)
                .with_claim(&spec.name, owner::runtime_dir()),
        ),
        RuntimeKind::Docker => std::sync::Arc::new(
            docker::DockerRuntime::connect(docker::DockerSettings::from_spec(spec), events).await?,
        ),
        RuntimeKind::Kubernetes => std::sync::Arc::new(
            kubernetes::KubernetesRuntime::connect(
                kubernetes::KubernetesSettings::from_spec(spec)?,
                events,
            )
            .await?,
        ),
    })
}

/// Where a runtime's workers reach the master.
pub enum WorkerEndpoint {
    /// At this URL.
    Url(String),
    /// At a listener of the runtime's own (the Docker network's gateway),
    /// which serves only the worker routes.
    Listener(tokio::net::TcpListener),
}

/// Checks the advertised URL (`--advertise-url`, `FLOTILLA_ADVERTISE_URL`):
/// an `http://` or `https://` URL, returned without a trailing `/`.
pub fn advertised_url(raw: &str) -> Result<String, RuntimeError> {
    let url = raw.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(RuntimeError::Endpoint(format!(
            "FLOTILLA_ADVERTISE_URL `{raw}` is not an http:// or https:// URL"
        )));
    }
    Ok(url.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Endpoint(String),
    #[error("cannot start worker {worker}: {reason}")]
    Start { worker: WorkerId, reason: String },
    #[error("cannot kill worker {worker}: {reason}")]
    Kill { worker: WorkerId, reason: String },
    #[error("cannot remove the workers: {0}")]
    Remove(String),
}

/// A worker as the state directory recorded it: what `flotilla down`
/// looks for besides what the runtime lists itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedWorker {
    pub id: WorkerId,
    pub incarnation: Incarnation,
    /// The process worker's PID, as it registered.
    pub pid: Option<u32>,
    /// The runtime's handle of it ([`WorkerHandle::key`]), when recorded.
    pub key: Option<String>,
}

/// What `inspect` reports about a running worker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkerHandle {
    pub incarnation: Incarnation,
    /// A process ID, a container ID...
    pub locator: String,
    /// What names this very incarnation for good, so that a later master
    /// can find it again ([`Runtime::adopt`]): for a process its PID and
    /// start time (a PID alone may be reused), for a container its ID, for
    /// a pod its UID. The master keeps it in its store. `None`: the runtime
    /// cannot adopt.
    pub key: Option<String>,
}

/// A worker incarnation an earlier master started, as the store remembers
/// it: what [`Runtime::adopt`] looks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoptable {
    pub worker_id: WorkerId,
    pub incarnation: Incarnation,
    /// [`WorkerHandle::key`] as that master's runtime reported it.
    pub key: String,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Starts one incarnation. Any previous incarnation of the same worker
    /// must already be gone (the caller kills it first).
    async fn start(&self, launch: WorkerLaunch) -> Result<(), RuntimeError>;
    /// Kills the worker's current incarnation at once (SIGKILL or the like).
    /// Killing a worker that is not running is not an error.
    async fn kill(&self, worker: WorkerId) -> Result<(), RuntimeError>;
    async fn inspect(&self, worker: WorkerId) -> Option<WorkerHandle>;
    /// The CPU cores a worker of `capacity` gets, where the runtime sets a
    /// quota (containers, pods); `None` for plain processes.
    fn cpu_quota(&self, _capacity: usize) -> Option<f64> {
        None
    }
    /// Where this runtime's workers reach the master: `advertised` (the one
    /// setting for every runtime, `FLOTILLA_ADVERTISE_URL`) when given,
    /// else what the runtime knows; `api` is the API's own address as a
    /// process on this machine reaches it.
    async fn worker_endpoint(
        &self,
        advertised: Option<&str>,
        api: &str,
    ) -> Result<WorkerEndpoint, RuntimeError> {
        Ok(WorkerEndpoint::Url(advertised.unwrap_or(api).to_string()))
    }
    /// Kills every worker this runtime started or adopted (master shutdown:
    /// Ctrl-C, `flotilla down`).
    async fn shutdown(&self);

    /// Master restart: takes over the worker incarnation an earlier master
    /// started, if it is still running and is that very incarnation (its
    /// [`Adoptable::key`] matches). From then on it is this runtime's as if
    /// it had started it: `inspect` reports it, `kill` and `shutdown` end
    /// it, and its death is sent as a [`RuntimeEvent::Exited`]. Nothing is
    /// restarted or recreated. `Ok(None)`: it is gone (or something else
    /// has its PID or name); the master then starts that worker afresh, as
    /// the next incarnation, under the same ID. Called at start, before any
    /// `start` and before [`Runtime::remove_leftovers`]. The default adopts
    /// nothing.
    async fn adopt(&self, worker: &Adoptable) -> Result<Option<WorkerHandle>, RuntimeError> {
        let _ = worker;
        Ok(None)
    }

    /// Called once at start, after every `adopt`: removes what an earlier
    /// master of this cluster left and was not adopted (containers, pods),
    /// so that names are free for `start`. The default has nothing to do (a
    /// process worker that was not adopted is refused as stale by the
    /// master, or exits after its grace period, by itself).
    async fn remove_leftovers(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Master SIGTERM: leaves every worker running for the next master to
    /// adopt (they stop by themselves after `spec.masterGraceSeconds`
    /// without a master). The runtime stops watching them; nothing is
    /// killed or removed. The default does nothing.
    async fn detach(&self) {}

    /// Claims the cluster for `me` (see [`owner`]) before any worker is
    /// touched: refused, naming the holder, while another live master (or
    /// `flotilla down`) holds it. Held until [`release_claim`] or the end
    /// of this process.
    ///
    /// [`release_claim`]: Runtime::release_claim
    async fn claim(&self, me: &owner::Owner) -> Result<(), owner::ClaimError>;
    /// Gives the claim up (a clean exit), so the next master need not wait
    /// for it to expire. Only a claim this runtime holds is touched.
    async fn release_claim(&self);
    /// Removes every worker of the cluster it finds, whoever started it:
    /// the runtime's own (labelled containers, pods of the release) and, for
    /// processes, the `recorded` ones still running as this user's
    /// `flotilla-worker`. Only with the claim held (their owner is gone) or
    /// by `flotilla down --force`. Returns one line per worker removed.
    async fn remove_workers(
        &self,
        recorded: &[RecordedWorker],
    ) -> Result<Vec<String>, RuntimeError>;
}

#[cfg(test)]
mod tests {
    use super::loopback_to;
    use std::net::IpAddr;

    #[test]
    fn a_loopback_endpoint_becomes_the_gateway() {
        let gw = Some(IpAddr::from([172, 18, 0, 1]));
        assert_eq!(
            loopback_to("http://127.0.0.1:4318", gw),
            "http://172.18.0.1:4318"
        );
        assert_eq!(
            loopback_to("http://localhost:4318/", gw),
            "http://172.18.0.1:4318/"
        );
        assert_eq!(
            loopback_to("http://[::1]:4318", gw),
            "http://172.18.0.1:4318"
        );
        assert_eq!(
            loopback_to("https://127.0.0.5/otlp", gw),
            "https://172.18.0.1/otlp"
        );
        // Anything else is left alone.
        assert_eq!(loopback_to("http://jaeger:4318", gw), "http://jaeger:4318");
        assert_eq!(
            loopback_to("http://10.0.0.2:4318", gw),
            "http://10.0.0.2:4318"
        );
        assert_eq!(
            loopback_to("http://127.0.0.1:4318", None),
            "http://127.0.0.1:4318"
        );
        assert_eq!(loopback_to("not a url", gw), "not a url");
    }
}
