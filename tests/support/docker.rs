//! Support for the Docker end-to-end tests: is Docker here (and must it
//! be), the images built once, the `docker` CLI, and a Unix-socket proxy to
//! the engine that a test can cut to put the master out of the engine's reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex, MutexGuard};

use crate::{bin, workspace_root};

pub const WORKER_IMAGE: &str = "flotilla-worker:0.1.0";
pub const MASTER_IMAGE: &str = "flotilla-master:0.1.0";

fn flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// In CI (or with FLOTILLA_REQUIRE_DOCKER set) a Docker test must run: no
/// Docker there is a failure, never a silent skip.
pub fn docker_required() -> bool {
    flag("CI") || flag("FLOTILLA_REQUIRE_DOCKER")
}

/// Runs `docker ARGS`, bounded by `timeout`; its trimmed stdout, or an error
/// carrying its stderr.
pub fn docker_with_timeout(args: &[&str], timeout: Duration) -> Result<String> {
    let mut child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run the docker CLI")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "docker {} did not finish within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn docker(args: &[&str]) -> Result<String> {
    docker_with_timeout(args, Duration::from_secs(60))
}

/// `docker inspect NAME` as JSON (the first object), or None if it does not exist.
pub fn inspect(name: &str) -> Option<Value> {
    let out = docker(&["inspect", "--type", "container", name]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0).cloned()
}

/// IDs of the containers (running or not) labelled with `cluster`.
pub fn cluster_containers(cluster: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=dev.flotilla.cluster={cluster}"),
    ])
    .map(|out| out.lines().map(str::to_string).collect())
    .unwrap_or_default()
}

/// Removes what a test of `cluster` may have left (containers, network).
pub fn remove_cluster(cluster: &str) {
    let ids = cluster_containers(cluster);
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        let _ = docker(&args);
    }
    // The cluster's claim (a never-started container).
    let _ = docker(&["rm", "-f", &format!("{cluster}-owner")]);
    let _ = docker(&["network", "rm", cluster]);
}

fn image_exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_ok()
}

/// The worker and master images, built by docker/build-images.sh if either
/// is missing (from this test build's binaries), once per test binary.
/// FLOTILLA_TEST_REBUILD_IMAGES=1 refreshes them from this build even when
/// present (the script is idempotent: quick when nothing changed).
fn ensure_images() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let missing: Vec<&str> = [WORKER_IMAGE, MASTER_IMAGE]
            .into_iter()
            .filter(|i| !image_exists(i))
            .collect();
        if missing.is_empty() && !flag("FLOTILLA_TEST_REBUILD_IMAGES") {
            eprintln!(
                "docker tests: using the existing images {WORKER_IMAGE} and {MASTER_IMAGE} \
                 (after changing the worker or master: cargo build --release && docker/build-images.sh, \
                 or set FLOTILLA_TEST_REBUILD_IMAGES=1)"
            );
            return Ok(());
        }
        let bin_dir: PathBuf = bin("flotilla")
            .parent()
            .expect("binary folder")
            .to_path_buf();
        eprintln!(
            "docker tests: building the images with docker/build-images.sh from {} (missing: {missing:?})",
            bin_dir.display()
        );
        let status = Command::new("bash")
            .arg(workspace_root().join("docker/build-images.sh"))
            .env("FLOTILLA_BIN_DIR", &bin_dir)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run docker/build-images.sh: {e}"))?;
        if !status.success() {
            return Err(format!(
                "docker/build-images.sh failed ({status}); run it by hand to see why"
            ));
        }
        Ok(())
    })
    .clone()
}

/// Docker tests run one at a time: they time deaths and restarts, and two
/// machines' worth of containers on 2 cores would blur every figure.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Held for the length of one Docker test.
pub struct DockerTest {
    _serial: MutexGuard<'static, ()>,
}

impl DockerTest {
    /// `None` (with the reason printed) when Docker is not here and not
    /// required; a panic when it is required (CI) but missing.
    pub async fn begin(test: &str) -> Option<DockerTest> {
        let reachable = docker_with_timeout(
            &["info", "--format", "{{.ServerVersion}}"],
            Duration::from_secs(20),
        );
        if let Err(e) = reachable {
            if docker_required() {
                panic!("{test}: Docker is required here (CI or FLOTILLA_REQUIRE_DOCKER is set) but unavailable: {e:#}");
            }
            eprintln!("SKIPPED {test}: Docker is not available ({e:#}); set FLOTILLA_REQUIRE_DOCKER=1 to make this a failure");
            return None;
        }
        if let Err(e) = ensure_images() {
            panic!("{test}: the Flotilla images are needed: {e}");
        }
        Some(DockerTest {
            _serial: SERIAL.lock().await,
        })
    }
}

/// A native manifest for the Docker runtime.
pub fn docker_manifest(cluster: &str, capacities: &[usize], interval: f64, timeout: f64) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {cluster}\nspec:\n  runtime: docker\n  heartbeat: {{ intervalSeconds: {interval}, timeoutSeconds: {timeout} }}\n  workerResources: {{ cpuPerCapacity: 0.25, memory: 256Mi }}\n  maxAttempts: 3\n  workers:\n{workers}"
    )
}

/// A Unix-socket proxy to the Docker engine. The master under test talks to
/// the engine through it (DOCKER_HOST); `cut` drops every connection and
/// refuses new ones, as a network partition would between the master and a
/// worker's host; `restore` lets them through again.
pub struct EngineProxy {
    pub socket: PathBuf,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineProxy {
    pub async fn start(name: &str) -> Result<EngineProxy> {
        let upstream = match std::env::var("DOCKER_HOST") {
            Ok(h) if h.starts_with("unix://") => PathBuf::from(&h["unix://".len()..]),
            Ok(h) if !h.is_empty() => {
                bail!("the engine proxy needs a unix:// DOCKER_HOST, not {h}")
            }
            _ => PathBuf::from("/var/run/docker.sock"),
        };
        let dir = std::env::temp_dir().join(format!("flotilla-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream.clone(), cut_rx.clone()));
            }
        });
        Ok(EngineProxy { socket, cut, task })
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn relay(mut client: UnixStream, upstream: PathBuf, mut cut: watch::Receiver<bool>) {
    let Ok(mut engine) = UnixStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}

/// Polls `probe` every 10 ms until it yields a value or `timeout` passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The label `key` of an inspected container.
pub fn label<'a>(container: &'a Value, key: &str) -> &'a str {
    container["Config"]["Labels"][key].as_str().unwrap_or("")
}

/// Whether the inspected container's environment holds `KEY=VALUE`.
pub fn has_env(container: &Value, entry: &str) -> bool {
    container["Config"]["Env"]
        .as_array()
        .is_some_and(|env| env.iter().any(|e| e == entry))
}

pub fn compose_file() -> PathBuf {
    workspace_root().join("docker-compose.yml")
}

/// `docker-compose` (v1) or `docker compose` (v2), whichever is here.
pub fn compose_command() -> Option<Vec<String>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&["docker-compose"]) {
        Some(vec!["docker-compose".into()])
    } else if works(&["docker", "compose"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else {
        None
    }
}

/// Runs compose with `args` in the repository root, bounded by `timeout`.
pub fn compose(
    cmd: &[String],
    project: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> Result<String> {
    let file = compose_file();
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .arg("-f")
        .arg(&file)
        .args(["-p", project])
        .args(args)
        .current_dir(file.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut child = c.spawn().context("run compose")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "compose {} did not finish within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("compose {} failed ({}): {text}", args.join(" "), out.status);
    }
    Ok(text)
}
