//! Flotilla's master: scheduling state, HTTP API, health monitor, runtimes
//! and manifest loader. `main.rs` is the CLI on top of this library.

pub mod api;
pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod dashboard;
pub mod manifest;
pub mod metrics;
pub mod resources;
pub mod runner;
pub mod runtime;
pub mod scheduler;
pub mod settings;
pub mod store;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::cluster::{Cluster, ClusterConfig};
use crate::manifest::{ClusterSpec, RuntimeKind};
use crate::runtime::owner::Owner;
use crate::runtime::WorkerEndpoint;

/// How the master listens.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub bind: IpAddr,
    pub port: u16,
    /// `FLOTILLA_TOKEN`: required from API clients when set.
    pub token: Option<String>,
    /// Allow a non-loopback bind without a token.
    pub insecure: bool,
    pub runtime: Option<RuntimeKind>,
    /// Tasks each worker runs at once.
    pub slots: u32,
    /// `--advertise-url` (`FLOTILLA_ADVERTISE_URL`): the URL workers reach
    /// this master at, when its own address is not (a master in a
    /// container or behind a Service). Checked by `runtime::advertised_url`.
    pub advertise_url: Option<String>,
    /// The environment every worker gets from its master (log and trace
    /// settings), decided once at start.
    pub worker_env: Vec<(String, String)>,
    /// `--metrics-port`: a second listener on `bind` serving `GET /metrics`
    /// without the token (for Prometheus). None: /metrics only on the API,
    /// behind the token.
    pub metrics_port: Option<u16>,
    /// Where the durable state lives (`flotilla up`: `--state-dir`,
    /// `spec.stateDir` or `.flotilla/<name>`); `None`: nothing is kept.
    pub state_dir: Option<std::path::PathBuf>,
    /// With nothing kept: task IDs start from the clock (microseconds since
    /// the epoch), so a restarted master never hands out an ID again.
    pub time_based_ids: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 5000,
            token: None,
            insecure: false,
            runtime: None,
            slots: 1,
            advertise_url: None,
            worker_env: Vec::new(),
            metrics_port: None,
            state_dir: None,
            time_based_ids: false,
        }
    }
}

/// A master that is up: listening, workers started.
pub struct Master {
    pub cluster: Arc<Cluster>,
    pub addr: SocketAddr,
    /// The token-free metrics listener (`--metrics-port`), when there is one.
    pub metrics_addr: Option<SocketAddr>,
    server: JoinHandle<()>,
    metrics_server: Option<JoinHandle<()>>,
    /// Docker runtime with the master on the host: the worker routes on the
    /// network's gateway.
    worker_server: Option<JoinHandle<()>>,
}

impl Master {
    /// `http://host:port` as a client on this machine reaches it.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(host, self.addr.port()))
    }

    /// Waits until every worker has registered (or `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        if let Err((active, total)) = self.cluster.wait_ready(timeout).await {
            bail!("only {active} of {total} workers registered within {timeout:?}; see the worker errors above");
        }
        Ok(())
    }

    pub async fn shutdown(self) {
        self.cluster.shutdown().await;
        self.stop_serving();
    }

    /// SIGTERM of a durable master: stops serving and exits, leaving the
    /// workers running for the next master (`Cluster::leave_workers`).
    pub async fn leave(self) {
        self.server.abort();
        self.cluster.leave_workers().await;
        self.stop_serving();
    }

    fn stop_serving(self) {
        self.server.abort();
        if let Some(s) = self.metrics_server {
            s.abort();
        }
        if let Some(s) = self.worker_server {
            s.abort();
        }
    }
}

static API_TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The API token (`FLOTILLA_TOKEN`, if set and not empty), as [`take_token`]
/// read it at start: the one place the master and the CLI verbs get it from.
pub fn api_token() -> Option<String> {
    API_TOKEN.get().cloned().flatten()
}

/// Reads `FLOTILLA_TOKEN` once and puts it out of reach of other processes
/// of the same user (the process runtime's workers and their tasks): the
/// master becomes non-dumpable (its /proc/<pid>/environ and memory are then
/// readable by root alone), the token's bytes in the initial environment
/// block (the one /proc/<pid>/environ shows) are overwritten, and the
/// variable is removed from the environment, so that no child process
/// (worker, bench or chaos master, `docker`) inherits it; a child that needs
/// it is given [`api_token`] explicitly. It changes the environment, so it
/// must run first thing in `main`, before any other thread exists (before
/// the async runtime is built); it is the only change the master makes to
/// its environment.
pub fn take_token() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_dumpable(false);
    let value = flotilla_proto::secret::take_env("FLOTILLA_TOKEN").filter(|t| !t.is_empty());
    let _ = API_TOKEN.set(value);
}

/// A shared resource as the cluster starts with it: name, type, value.
pub type InitialResource = (String, resources::ResourceType, serde_json::Value);

/// Everything about `spec` that `flotilla up` refuses before it starts
/// anything (the manifest's own rules ran when it loaded): resource values
/// and File contents, and the runtime's settings. `flotilla check` runs
/// exactly this, so the two never disagree. Returns the resources' values.
pub async fn check(
    spec: &ClusterSpec,
    runtime: Option<RuntimeKind>,
) -> Result<Vec<InitialResource>> {
    let values = resources::initial_values(&spec.resources, spec.file_root.as_deref()).await?;
    if runtime.unwrap_or(spec.runtime) == RuntimeKind::Kubernetes {
        runtime::kubernetes::KubernetesSettings::from_spec(spec)?;
    }
    Ok(values)
}

/// Starts a master for `spec`: binds, serves the API, starts the workers.
pub async fn start(spec: &ClusterSpec, opts: &ServeOptions) -> Result<Master> {
    if !opts.bind.is_loopback() && opts.token.is_none() && !opts.insecure {
        bail!(
            "refusing to listen on {} without a token: the API runs code. Set FLOTILLA_TOKEN (clients send it as a bearer token) or pass --insecure",
            opts.bind
        );
    }
    // A bad manifest is refused before anything is created.
    let initial = check(spec, opts.runtime).await?;
    // Then the state directory: a second master on it must refuse before
    // it touches any worker.
    let durable = match &opts.state_dir {
        Some(dir) => {
            let (store, recovered) =
                store::Store::open(dir, &spec.name, &cluster::random_secret())?;
            info!(dir = %dir.display(), fresh = recovered.fresh, tasks = recovered.tasks.len(), "state directory opened");
            Some((Arc::new(store), recovered))
        }
        None => None,
    };
    let listener = TcpListener::bind((opts.bind, opts.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}:{} (is another master running? try --port)",
                opts.bind, opts.port
            )
        })?;
    let addr = listener.local_addr()?;
    let worker_host = if opts.bind.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        opts.bind
    };
    let api_url = format!("http://{}", SocketAddr::new(worker_host, addr.port()));
    let runtime_kind = opts.runtime.unwrap_or(spec.runtime);
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime = runtime::connect(runtime_kind, spec, events_tx).await?;
    // One owner per cluster: claimed before any worker is touched, so a
    // live owner's workers are left alone; only then are a gone owner's
    // adopted or removed (below).
    let me = Owner::me("master", opts.advertise_url.as_deref().unwrap_or(&api_url));
    runtime.claim(&me).await?;
    let cfg = ClusterConfig {
        name: spec.name.clone(),
        heartbeat_interval: spec.heartbeat_interval,
        heartbeat_timeout: spec.heartbeat_timeout,
        max_attempts: spec.max_attempts,
        result_ttl: spec.result_ttl,
        retention: spec.retention.clone(),
        slots: opts.slots.max(1),
        worker_env: opts.worker_env.clone(),
        task_timeout: spec.task_timeout,
        max_workers: spec.max_workers,
        master_grace: spec.master_grace,
        jaeger_url: spec.jaeger_url.clone(),
        session: me.session.clone(),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::new(
        cfg,
        runtime,
        durable.as_ref().map(|(store, rec)| {
            (
                store.clone(),
                rec.worker_secret.clone(),
                rec.master_incarnation,
            )
        }),
    );
    if opts.time_based_ids && durable.is_none() {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        cluster.set_next_task_id(micros);
    }
    for (name, kind, value) in initial {
        cluster
            .create_resource(&name, kind, value)
            .map_err(|e| anyhow::anyhow!("shared resource `{name}`: {e}"))?;
    }
    // The manifest's workers, not started yet: the restored tasks sent to
    // a node go back to its queue.
    let mut worker_ids = cluster.add_workers_unstarted(&spec.capacities);
    // Workers added later through `/add` are the cluster's too: they come
    // back with their IDs and capacities (adopted or started again), so no
    // later `/add` hands out one of their IDs a second time.
    if let Some((_, rec)) = &durable {
        worker_ids.extend(cluster.add_recorded_workers(rec));
    }
    // The previous master's workers that still run are taken over (same
    // ID, incarnation, running attempts and grants); the others start
    // again below. Without a store there is nothing to adopt, and what an
    // earlier master left is removed.
    let adopted = match &durable {
        Some((_, rec)) => cluster.adopt_workers(rec).await?,
        None => {
            cluster.remove_leftovers().await?;
            Vec::new()
        }
    };
    worker_ids.retain(|id| !adopted.iter().any(|a| a.id == *id));
    if let Some((store, rec)) = &durable {
        cluster
            .restore(rec, &adopted)
            .map_err(|e| anyhow::anyhow!("state directory {}: {e}", store.dir().display()))?;
    }
    drop(durable);
    let metrics_listener = match opts.metrics_port {
        None => None,
        Some(port) => Some(
            TcpListener::bind((opts.bind, port))
                .await
                .with_context(|| {
                    format!(
                "cannot listen on {}:{port} for the metrics (--metrics-port): is the port taken?",
                opts.bind
            )
                })?,
        ),
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let worker_server = match cluster
        .worker_endpoint(opts.advertise_url.as_deref(), &api_url)
        .await?
    {
        WorkerEndpoint::Url(url) => {
            cluster.set_master_url(url);
            None
        }
        WorkerEndpoint::Listener(listener) => {
            let at = listener.local_addr()?;
            cluster.set_master_url(format!("http://{at}"));
            info!(%at, "worker routes listening on a listener of the runtime's own");
            Some(tokio::spawn(serve(
                listener,
                api::internal_router(cluster.clone()),
            )))
        }
    };
    let app = api::router(cluster.clone(), opts.token.clone());
    let server = tokio::spawn(serve(listener, app));
    let metrics_server = metrics_listener.map(|l| {
        info!(at = %metrics_addr.expect("bound"), "metrics listening (GET /metrics, no token)");
        tokio::spawn(serve(l, api::metrics_router(cluster.clone())))
    });
    cluster.spawn_runtime_events(events_rx);
    cluster.spawn_health_monitor();
    cluster.spawn_dashboard_sampler();
    cluster.spawn_retention();
    info!(%addr, runtime = runtime_kind_name(runtime_kind), workers = spec.capacities.len(), "master listening");
    // All at once: a container or pod start is mostly waiting on the engine
    // or the API server.
    let starts = worker_ids.into_iter().map(|id| cluster.start_worker(id));
    let failed = futures::future::join_all(starts)
        .await
        .into_iter()
        .find_map(Result::err);
    if let Some(e) = failed {
        // Leave no half-started cluster behind (containers outlive us).
        cluster.shutdown().await;
        return Err(e.into());
    }
    Ok(Master {
        cluster,
        addr,
        metrics_addr,
        server,
        metrics_server,
        worker_server,
    })
}

/// What `flotilla down` is told.
#[derive(Clone, Debug, Default)]
pub struct DownOptions {
    pub runtime: Option<RuntimeKind>,
    /// Where the cluster's state is (the recorded process workers' PIDs).
    pub state_dir: Option<std::path::PathBuf>,
    /// Remove the workers even though a live master owns the cluster.
    pub force: bool,
}

/// `flotilla down`: removes the cluster's workers for good (processes
/// recorded in the state directory and still ours, labelled containers,
/// the release's pods). Refuses while a live master owns the cluster,
/// unless `force`. Returns one line per worker removed.
pub async fn down(spec: &ClusterSpec, opts: &DownOptions) -> Result<Vec<String>> {
    use crate::runtime::owner::ClaimError;
    let kind = opts.runtime.unwrap_or(spec.runtime);
    let (events, _ignored) = tokio::sync::mpsc::unbounded_channel();
    let runtime = runtime::connect(kind, spec, events).await?;
    let me = Owner::me("flotilla down", "");
    match runtime.claim(&me).await {
        Ok(()) => {}
        Err(ClaimError::Held { owner, claim, .. }) if opts.force => {
            tracing::warn!(%owner, %claim, "--force: removing the workers of a cluster a live master owns (it will start them again)");
        }
        Err(ClaimError::Held {
            cluster,
            owner,
            claim,
        }) => bail!(
            "refusing: cluster `{cluster}` is owned by a live {owner} (claim: {claim}). Stop that master (Ctrl-C there stops its workers too), or pass --force to remove its workers anyway (a live master starts them again)"
        ),
        Err(e) => return Err(e.into()),
    }
    let recorded = match &opts.state_dir {
        Some(dir) => store::Store::recorded_workers(dir)?
            .into_iter()
            .map(|(id, incarnation, pid, key)| runtime::RecordedWorker {
                id,
                incarnation,
                pid,
                key,
            })
            .collect(),
        None => Vec::new(),
    };
    let removed = runtime.remove_workers(&recorded).await;
    runtime.release_claim().await;
    Ok(removed?)
}

async fn serve(listener: TcpListener, app: axum::Router) {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Handlers may ask who is calling (the dashboard's sign-in limit).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

fn runtime_kind_name(k: RuntimeKind) -> &'static str {
    match k {
        RuntimeKind::Process => "process",
        RuntimeKind::Docker => "docker",
        RuntimeKind::Kubernetes => "kubernetes",
    }
}
