//! Support for the end-to-end tests: start the real `flotilla` binary (which
//! starts real `flotilla-worker` processes), talk HTTP to it like a user.

pub mod kube_standin;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub mod docker;
pub mod situations;

/// The workspace's target directory holding the built binaries.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo test --workspace builds it)",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The repository's own scenario files (`tests/scenarios/`), in the original
/// system's `system:` format.
pub fn scenarios_dir() -> PathBuf {
    workspace_root().join("tests/scenarios")
}

/// An extra directory of scenario files in the same format (for instance the
/// original system's own copies), named by `FLOTILLA_SEED_SCENARIOS`; the
/// scenario tests run those too when it is set.
pub fn extra_scenarios_dir() -> Option<PathBuf> {
    std::env::var_os("FLOTILLA_SEED_SCENARIOS")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

pub fn temp_file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// A new, empty state directory under the temporary directory.
pub fn fresh_state_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir()
        .join(format!("flotilla-e2e-{}", std::process::id()))
        .join(format!("state-{n}"))
}

/// A new runtime directory (`FLOTILLA_RUNTIME_DIR`: where a process
/// cluster's claim file is), so that tests running side by side with the
/// same cluster name do not refuse each other's masters.
pub fn fresh_runtime_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir()
        .join(format!("flotilla-e2e-{}", std::process::id()))
        .join(format!("run-{n}"))
}

/// A running `flotilla up`, killed (with its workers) on drop.
pub struct Cluster {
    child: Child,
    pub url: String,
    /// Raw HTTP, for requests no well-behaved client sends (malformed bodies).
    pub http: reqwest::Client,
    /// The typed client the CLI uses (carries the token, if any).
    pub client: flotilla_client::Client,
    token: Option<String>,
    _stderr: std::thread::JoinHandle<()>,
}

impl Cluster {
    /// Starts `flotilla up` on a manifest given as YAML text.
    pub async fn start(manifest: &str) -> Result<Cluster> {
        Self::start_with(manifest, &[], &[]).await
    }

    pub async fn start_with(
        manifest: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Cluster> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = temp_file(&format!("cluster-{n}.yaml"), manifest);
        let mut cmd = Command::new(bin("flotilla"));
        cmd.arg("up").arg(&path).args(args);
        if !args.contains(&"--port") {
            cmd.args(["--port", "0"]);
        }
        // Durable by default, each cluster in a state directory of its own
        // (tests run in parallel and reuse cluster names).
        if !args
            .iter()
            .any(|a| *a == "--state-dir" || *a == "--ephemeral")
        {
            cmd.arg("--state-dir").arg(fresh_state_dir());
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("FLOTILLA_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        // A claim of its own unless the test shares one on purpose.
        cmd.env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let token = envs
            .iter()
            .find(|(k, _)| *k == "FLOTILLA_TOKEN")
            .map(|(_, v)| v.to_string());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("start flotilla up")?;
        let stderr = child.stderr.take().unwrap();
        let tag = format!("[cluster {n}]");
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{tag} {line}");
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let url = banner_url(&line)
            .ok_or_else(|| anyhow!("flotilla up did not print its address; printed {line:?}"))?;
        let cluster = Cluster {
            child,
            client: flotilla_client::Client::new(&url, token.clone())?,
            url,
            http: reqwest::Client::new(),
            token,
            _stderr: stderr_thread,
        };
        cluster
            .wait_until(Duration::from_secs(30), |nodes| {
                nodes.iter().all(|n| n["state"] == "active")
            })
            .await?;
        Ok(cluster)
    }

    /// The master's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The master's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILLs the master's process (only it) and reaps it.
    pub fn kill_master(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the master SIGTERM (what systemd, `docker stop` and Kubernetes
    /// send) and waits up to `within` for it to exit; its exit status.
    pub fn terminate_master(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the master did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a request (with the token, if any); returns (status, body),
    /// the body as JSON when it is JSON.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let resp = self.auth(req).send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// POST a JSON body; returns (status, body).
    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        Ok(self
            .client
            .request(flotilla_client::Method::POST, path, Some(&body))
            .await?)
    }

    /// POST raw bytes (for malformed-input tests).
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(u16, Value)> {
        let req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json");
        self.call(req.body(body)).await
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        Ok(self
            .client
            .request(flotilla_client::Method::GET, path, None)
            .await?)
    }

    /// Submits a Python task through `/send`; returns its ID.
    pub async fn send_python(&self, code: &str) -> Result<u64> {
        self.send_to_path("/send", code).await
    }

    pub async fn send_to_path(&self, path: &str, code: &str) -> Result<u64> {
        let (status, body) = self
            .post(path, json!({"type": "python", "command": code}))
            .await?;
        if status != 200 {
            bail!("{path} answered {status}: {body}");
        }
        body["task_id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no task_id in {body}"))
    }

    /// Sends a Python task and waits for its final state.
    pub async fn run_python(&self, code: &str) -> Value {
        let id = self.send_python(code).await.unwrap();
        self.wait_task(id, Duration::from_secs(30)).await.unwrap()
    }

    /// Long-polls a task until it is final.
    pub async fn wait_task(&self, id: u64, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(&format!("/tasks/{id}?wait=5")).await?;
            if status != 200 {
                bail!("GET /tasks/{id} answered {status}: {body}");
            }
            if body["state"] == "succeeded" || body["state"] == "failed" {
                return Ok(body);
            }
            if Instant::now() >= deadline {
                bail!("task {id} not finished after {timeout:?}: {body}");
            }
        }
    }

    pub async fn nodes(&self) -> Result<Vec<Value>> {
        let (status, body) = self.get("/nodes").await?;
        if status != 200 {
            bail!("GET /nodes answered {status}: {body}");
        }
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    /// Waits until `pred` holds for `/nodes` (checked every 50 ms; test-side only).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(nodes) = self.nodes().await {
                if pred(&nodes) {
                    return Ok(nodes);
                }
                if Instant::now() >= deadline {
                    bail!("condition on /nodes not met after {timeout:?}: {nodes:?}");
                }
            } else if Instant::now() >= deadline {
                bail!("master not answering after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Follows the completion feed from the start until `want` tasks are in
    /// it (or `timeout`); returns every entry, in feed order.
    pub async fn feed(&self, want: usize, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        let mut next = 0u64;
        while all.len() < want && Instant::now() < deadline {
            let (status, body) = self
                .get(&format!("/tasks/finished?after={next}&wait=5"))
                .await?;
            if status != 200 {
                bail!("GET /tasks/finished answered {status}: {body}");
            }
            all.extend(body["tasks"].as_array().cloned().unwrap_or_default());
            next = body["next"].as_u64().unwrap_or(next);
        }
        Ok(all)
    }

    pub async fn health(&self) -> Result<Value> {
        Ok(self.get("/health").await?.1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGINT: the master kills its workers (removes their containers) and exits.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `flotilla run FILE --json` to completion; returns its report.
pub fn flotilla_run(file: &Path, extra: &[&str]) -> Result<Value> {
    let out = Command::new(bin("flotilla"))
        .arg("run")
        .arg(file)
        .args(["--port", "0", "--json"])
        .args(extra)
        .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir())
        .env(
            "RUST_LOG",
            std::env::var("FLOTILLA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .output()
        .context("run flotilla run")?;
    if !out.status.success() {
        bail!(
            "flotilla run {} failed ({}): {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "flotilla run printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs the CLI expecting failure; returns stderr.
pub fn flotilla_fails(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin("flotilla"));
    cmd.args(args)
        .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run flotilla");
    assert!(
        !out.status.success(),
        "flotilla {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A seed-form manifest with the given capacities and fast heartbeats.
pub fn seed_manifest(capacities: &[usize]) -> String {
    format!(
        "system:\n  node_quantity: {}\n  node_capacities: {:?}\n",
        capacities.len(),
        capacities
    )
}

/// A native manifest with the given capacities and heartbeat settings.
pub fn native_manifest(
    capacities: &[usize],
    interval: f64,
    timeout: f64,
    max_attempts: u32,
) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: test\nspec:\n  heartbeat: {{ intervalSeconds: {interval}, timeoutSeconds: {timeout} }}\n  maxAttempts: {max_attempts}\n  workers:\n{workers}"
    )
}

pub fn fib_code(n: u32) -> String {
    format!("def fibonacci(n):\n\tif n == 0:\n\t\treturn 0\n\telif n == 1:\n\t\treturn 1\n\telse:\n\t\treturn fibonacci(n-1) + fibonacci(n-2)\nresponse = fibonacci({n})")
}

pub fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

/// The address in the first line `flotilla up` prints
/// ("flotilla master listening on http://...").
pub fn banner_url(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_string)
}

/// Reads `flotilla up`'s first line from its stdout and returns the address
/// in it.
pub fn read_banner_url(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    banner_url(&line).unwrap_or_else(|| panic!("flotilla up printed no address: {line:?}"))
}

/// A free loopback port (bound, then released for the master to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a process is running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// `pid` and every live process below it (read from `/proc`).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let me = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == me)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree.retain(|&p| alive(p));
    tree
}
