//! The master's settings from its environment, read once at start: clap
//! reads each variable (or the flag of the same meaning) when the command
//! line is parsed, and `main` hands the result to [`init`]. Nothing in the
//! master reads these variables anywhere else, so a value cannot change
//! under a running master. Empty values count as unset (so paths are taken as
//! text first: clap's path parser refuses an empty value).

use std::path::PathBuf;
use std::sync::OnceLock;

/// Where the runtimes find what is not in the manifest.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EnvSettings {
    /// The `flotilla-worker` binary the process runtime starts (default:
    /// beside this executable, else on PATH).
    #[arg(long, env = "FLOTILLA_WORKER_BIN", global = true, value_name = "PATH")]
    worker_bin: Option<String>,
    /// Where process clusters' claim files are (default:
    /// $XDG_RUNTIME_DIR/flotilla, else /tmp/flotilla-<uid>).
    #[arg(long, env = "FLOTILLA_RUNTIME_DIR", global = true, value_name = "DIR")]
    runtime_dir: Option<String>,
    /// The user's runtime directory, the default home of claim files.
    #[arg(skip = std::env::var("XDG_RUNTIME_DIR").ok())]
    xdg_runtime_dir: Option<String>,
    /// The Docker engine (default: unix:///var/run/docker.sock).
    #[arg(long, env = "DOCKER_HOST", global = true, value_name = "URL")]
    pub docker_host: Option<String>,
    /// Kubernetes: the release the worker pods belong to (the Helm chart
    /// sets it; default: the manifest's metadata.name).
    #[arg(long, env = "FLOTILLA_RELEASE", global = true)]
    pub release: Option<String>,
    /// Kubernetes: the namespace of the worker pods (default: the
    /// ServiceAccount's, else the kubeconfig's).
    #[arg(long, env = "FLOTILLA_NAMESPACE", global = true)]
    pub namespace: Option<String>,
    /// Kubernetes: the master's own pod (name and UID, from the downward
    /// API), which owns the worker pods and names the cluster's owner.
    #[arg(long, env = "FLOTILLA_POD_NAME", global = true)]
    pub pod_name: Option<String>,
    #[arg(long, env = "FLOTILLA_POD_UID", global = true)]
    pub pod_uid: Option<String>,
}

/// [`EnvSettings`] as the master uses them: empty values dropped.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub worker_bin: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub docker_host: Option<String>,
    pub release: Option<String>,
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the settings, once, at start (later calls are ignored).
pub fn init(env: EnvSettings) {
    let clean = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let path = |v: Option<String>| clean(v).map(PathBuf::from);
    let _ = SETTINGS.set(Settings {
        worker_bin: path(env.worker_bin),
        runtime_dir: path(env.runtime_dir),
        xdg_runtime_dir: path(env.xdg_runtime_dir),
        docker_host: clean(env.docker_host),
        release: clean(env.release),
        namespace: clean(env.namespace),
        pod_name: clean(env.pod_name),
        pod_uid: clean(env.pod_uid),
    });
}

/// The settings given to [`init`]; all unset if it was not called (the
/// library's unit tests).
pub fn get() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}
