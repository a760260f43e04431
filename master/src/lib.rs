//! Flotilla's master: scheduling state, HTTP API, health monitor, runtimes
//! and manifest loader. `main.rs` is the CLI on top of this library.

pub mod api;
pub mod bench;
pub mod cluster;
pub mod manifest;
pub mod metrics;
pub mod resources;
pub mod runner;
pub mod runtime;
pub mod scheduler;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::cluster::{Cluster, ClusterConfig};
use crate::manifest::{ClusterSpec, RuntimeKind};
use crate::runtime::process::{find_worker_binary, ProcessRuntime};
use crate::runtime::Runtime;

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 5000,
            token: std::env::var("FLOTILLA_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            insecure: false,
            runtime: None,
            slots: 1,
        }
    }
}

/// A master that is up: listening, workers started.
pub struct Master {
    pub cluster: Arc<Cluster>,
    pub addr: SocketAddr,
    server: JoinHandle<()>,
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
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (total, active) = self.cluster.with_state(|s| {
                let nodes = s.nodes();
                let active = nodes
                    .iter()
                    .filter(|n| n.state == scheduler::WorkerState::Active)
                    .count();
                (nodes.len(), active)
            });
            if active == total {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("only {active} of {total} workers registered within {timeout:?}; see the worker errors above");
            }
            // Registration has no notification of its own; this is start-up only.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(self) {
        self.cluster.shutdown().await;
        self.server.abort();
    }
}

/// Starts a master for `spec`: binds, serves the API, starts the workers.
pub async fn start(spec: &ClusterSpec, opts: &ServeOptions) -> Result<Master> {
    if !opts.bind.is_loopback() && opts.token.is_none() && !opts.insecure {
        bail!(
            "refusing to listen on {} without a token: the API runs code. Set FLOTILLA_TOKEN (clients send it as a bearer token) or pass --insecure",
            opts.bind
        );
    }
    let runtime_kind = opts.runtime.unwrap_or(spec.runtime);
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime: Arc<dyn Runtime> = match runtime_kind {
        RuntimeKind::Process => Arc::new(ProcessRuntime::new(find_worker_binary(), events_tx)),
        RuntimeKind::Kubernetes => Arc::new(
            runtime::kubernetes::KubernetesRuntime::connect(
                runtime::kubernetes::KubernetesSettings::from_spec(spec)?,
                events_tx,
            )
            .await?,
        ),
        other => bail!(
            "runtime `{}` is not available in this build yet; use `process` or `kubernetes`",
            serde_json::to_value(other)?.as_str().unwrap_or("?")
        ),
    };
    let cfg = ClusterConfig {
        name: spec.name.clone(),
        heartbeat_interval: spec.heartbeat_interval,
        heartbeat_timeout: spec.heartbeat_timeout,
        max_attempts: spec.max_attempts,
        slots: opts.slots.max(1),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::new(cfg, runtime);
    for r in &spec.resources {
        let value = resources::initial_value(r).map_err(anyhow::Error::msg)?;
        cluster
            .with_state(|s| s.locks.create(&r.name, r.kind, value))
            .map_err(|e| anyhow::anyhow!("shared resource `{}`: {e}", r.name))?;
    }
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
    cluster.set_master_url(format!(
        "http://{}",
        SocketAddr::new(worker_host, addr.port())
    ));
    let app = api::router(cluster.clone(), opts.token.clone());
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    cluster.spawn_runtime_events(events_rx);
    cluster.spawn_health_monitor();
    info!(%addr, runtime = runtime_kind_name(runtime_kind), workers = spec.capacities.len(), "master listening");
    for &capacity in &spec.capacities {
        cluster.add_worker(capacity).await?;
    }
    Ok(Master {
        cluster,
        addr,
        server,
    })
}

fn runtime_kind_name(k: RuntimeKind) -> &'static str {
    match k {
        RuntimeKind::Process => "process",
        RuntimeKind::Docker => "docker",
        RuntimeKind::Kubernetes => "kubernetes",
    }
}
