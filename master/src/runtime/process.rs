//! The embedded default: each worker is a process (`flotilla-worker`)
//! started by the master, in a session and process group of its own so that
//! a kill takes its Python interpreters with it, and so that it does not die
//! with the master (no `PDEATHSIG`, no shared terminal session): a master
//! that is SIGKILLed or SIGTERMed leaves its workers running, and the next
//! master on the same state directory adopts them ([`Runtime::adopt`]) by
//! PID and start time. A worker without a master stops by itself after its
//! grace period. A child's exit is noticed at once through `wait`; an
//! adopted worker (no longer our child) is watched through `/proc`. Either
//! way its death is reported as a [`RuntimeEvent::Exited`].
//!
//! The master is a child subreaper: what a dead worker's tasks left running
//! (processes in their own session, out of reach of the group kill) is
//! re-parented to the master, which kills it right after the death (and a
//! few times more, for processes re-parented late) and reaps it.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use flotilla_proto::{env, Incarnation, WorkerId};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use super::owner::{ClaimError, ClaimFile, Owner};
use super::{
    Adoptable, RecordedWorker, Runtime, RuntimeError, RuntimeEvent, WorkerHandle, WorkerLaunch,
};

/// The worker processes alive in this process, whichever runtime started
/// them (tests run several masters in one process): the sweep spares them.
static LIVE_WORKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills and reaps the master's children that are no live worker but come
/// from one (they carry a worker's or task's variables, or none at all).
fn sweep_orphans() -> usize {
    use flotilla_proto::reap;
    let me = std::process::id() as i32;
    let procs = reap::snapshot();
    let kids = reap::children(&procs);
    let live = LIVE_WORKERS.lock().expect("live workers").clone();
    let mut doomed = Vec::new();
    let mut reapable = Vec::new();
    for child in kids.get(&me).into_iter().flatten() {
        if live.contains(&(child.pid as u32)) {
            continue;
        }
        let from_a_worker = || {
            let tagged = reap::env_var(child.pid, env::WORKER_ID).is_some()
                || reap::env_var(child.pid, "FLOTILLA_TASK_TAG").is_some();
            let cleared =
                std::fs::read(format!("/proc/{}/environ", child.pid)).is_ok_and(|e| e.is_empty());
            tagged || cleared
        };
        if child.zombie {
            reapable.push(child.pid);
        } else if from_a_worker() {
            reapable.push(child.pid);
            doomed.extend(reap::subtree(&kids, child.pid));
        }
    }
    if !doomed.is_empty() {
        info!(
            count = doomed.len(),
            "killing processes a dead worker's tasks left behind"
        );
        reap::kill_all(&doomed);
    }
    for pid in reapable {
        for _ in 0..50 {
            if reap::reap(pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    doomed.len()
}

/// Sweeps now and a few times over the next seconds.
async fn sweep_after_death() {
    for delay in [0, 100, 400, 1500] {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        let _ = tokio::task::spawn_blocking(sweep_orphans).await;
    }
}

pub struct ProcessRuntime {
    worker_bin: PathBuf,
    /// `spec.workerResources.memory`: each process of a worker (the worker,
    /// its interpreters, its tasks' processes) may hold this much data
    /// (RLIMIT_DATA, inherited); beyond it allocations fail (`MemoryError`
    /// in Python). Per process, not a total as a container's limit is.
    memory_limit: Option<u64>,
    /// The workers this runtime runs (started or adopted): incarnation,
    /// PID, start time.
    children: Mutex<HashMap<WorkerId, Tracked>>,
    events: UnboundedSender<RuntimeEvent>,
    /// Set by `detach`: deaths are no longer reported.
    detached: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The cluster's name: its claim file's.
    cluster: String,
    /// Where the claim file is (see [`super::owner::runtime_dir`]).
    claim_dir: PathBuf,
    claim: Mutex<Option<ClaimFile>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tracked {
    incarnation: Incarnation,
    pid: u32,
    /// Clock ticks since boot (`/proc/PID/stat`); 0 when it could not be read.
    started: u64,
}

/// `pid:<PID>:start:<ticks>`, the key an adoption looks for.
fn key_of(t: &Tracked) -> Option<String> {
    (t.started != 0).then(|| format!("pid:{}:start:{}", t.pid, t.started))
}

fn parse_key(key: &str) -> Option<(u32, u64)> {
    let mut parts = key.split(':');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("pid"), Some(pid), Some("start"), Some(started), None) => {
            Some((pid.parse().ok()?, started.parse().ok()?))
        }
        _ => None,
    }
}

/// How often an adopted worker (not our child: no `wait`) is looked at.
const ADOPTED_WATCH: std::time::Duration = std::time::Duration::from_millis(200);

/// Where `flotilla-worker` is: `FLOTILLA_WORKER_BIN` (`--worker-bin`), else
/// beside the running executable, else on `PATH`.
pub fn find_worker_binary() -> PathBuf {
    if let Some(p) = &crate::settings::get().worker_bin {
        return p.clone();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("flotilla-worker");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("flotilla-worker")
}

impl ProcessRuntime {
    /// Limits the data each of a worker's processes may hold.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// The cluster whose claim this runtime takes, in `dir` (the default:
    /// [`super::owner::runtime_dir`]).
    pub fn with_claim(mut self, cluster: &str, dir: PathBuf) -> Self {
        self.cluster = cluster.to_string();
        self.claim_dir = dir;
        self
    }

    pub fn new(worker_bin: PathBuf, events: UnboundedSender<RuntimeEvent>) -> Self {
        if let Err(e) = flotilla_proto::reap::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper; processes a dead worker's tasks started in their own session may outlive it");
        }
        ProcessRuntime {
            worker_bin,
            memory_limit: None,
            children: Mutex::new(HashMap::new()),
            events,
            detached: Default::default(),
            cluster: "flotilla".into(),
            claim_dir: super::owner::runtime_dir(),
            claim: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, launch: WorkerLaunch) -> Result<(), RuntimeError> {
        let memory_limit = self.memory_limit;
        let mut cmd = Command::new(&self.worker_bin);
        // The worker inherits the master's environment (PATH, FLOTILLA_PYTHON,
        // ...) but never the API token, nor the master's service name.
        cmd.env_remove("FLOTILLA_TOKEN")
            .env_remove("OTEL_SERVICE_NAME")
            .env(env::MASTER_URL, &launch.master_url)
            .env(env::WORKER_ID, launch.worker_id.to_string())
            .env(env::INCARNATION, launch.incarnation.to_string())
            .env(env::SLOTS, launch.slots.to_string())
            .envs(launch.inherited_env.iter().map(|(k, v)| (k, v)))
            // The credential goes on stdin, never in the environment.
            .stdin(Stdio::piped());
        #[cfg(target_os = "linux")]
        unsafe {
            // A session (and process group) of its own: a kill of the group
            // takes its interpreters, and neither a Ctrl-C in the master's
            // terminal nor the master's death reaches it. It outlives its
            // master on purpose: the next master adopts it, or it stops by
            // itself after its grace period.
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if let Some(bytes) = memory_limit {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_DATA,
                        bytes,
                        bytes,
                    )
                    .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = {
            // Recorded as live before any sweep can see it.
            let mut live = LIVE_WORKERS.lock().expect("live workers");
            let child = cmd.spawn().map_err(|e| RuntimeError::Start {
                worker: launch.worker_id,
                reason: format!("{}: {e}", self.worker_bin.display()),
            })?;
            live.push(child.id().unwrap_or(0));
            child
        };
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            let line = format!("{}\n", launch.secret);
            if let Err(e) = stdin.write_all(line.as_bytes()).await {
                warn!(worker = launch.worker_id, error = %e, "could not hand the worker its credential");
            }
        }
        let pid = child.id().unwrap_or(0);
        info!(
            worker = launch.worker_id,
            incarnation = launch.incarnation,
            pid,
            "started worker process"
        );
        let started = flotilla_proto::reap::start_time(pid as i32).unwrap_or(0);
        self.children.lock().expect("children lock").insert(
            launch.worker_id,
            Tracked {
                incarnation: launch.incarnation,
                pid,
                started,
            },
        );
        let events = self.events.clone();
        let detached = self.detached.clone();
        let (worker_id, incarnation) = (launch.worker_id, launch.incarnation);
        tokio::spawn(async move {
            let detail = match child.wait().await {
                Ok(status) => format!("process {pid} exited ({status})"),
                Err(e) => format!("process {pid} could not be waited for: {e}"),
            };
            LIVE_WORKERS
                .lock()
                .expect("live workers")
                .retain(|&p| p != pid);
            // Its interpreters and shell commands go with it, and what its
            // tasks started in other sessions.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            tokio::spawn(sweep_after_death());
            debug!(worker = worker_id, incarnation, %detail, "worker process ended");
            if detached.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let _ = events.send(RuntimeEvent::Exited {
                worker_id,
                incarnation,
                detail,
            });
        });
        Ok(())
    }

    async fn kill(&self, worker: WorkerId) -> Result<(), RuntimeError> {
        let entry = self.children.lock().expect("children lock").remove(&worker);
        if let Some(Tracked { pid, started, .. }) = entry {
            // An adopted worker's PID may have been reused since it ended.
            if started != 0 && flotilla_proto::reap::start_time(pid as i32) != Some(started) {
                return Ok(());
            }
            match killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(RuntimeError::Kill {
                        worker,
                        reason: format!("kill -9 -{pid}: {e}"),
                    })
                }
            }
        }
        Ok(())
    }

    async fn inspect(&self, worker: WorkerId) -> Option<WorkerHandle> {
        let children = self.children.lock().expect("children lock");
        children.get(&worker).map(|t| WorkerHandle {
            incarnation: t.incarnation,
            locator: format!("pid {}", t.pid),
            key: key_of(t),
        })
    }

    async fn adopt(&self, worker: &Adoptable) -> Result<Option<WorkerHandle>, RuntimeError> {
        let Some((pid, started)) = parse_key(&worker.key) else {
            return Ok(None);
        };
        // The same PID started at the same tick is the same process.
        if flotilla_proto::reap::start_time(pid as i32) != Some(started) {
            return Ok(None);
        }
        let tracked = Tracked {
            incarnation: worker.incarnation,
            pid,
            started,
        };
        self.children
            .lock()
            .expect("children lock")
            .insert(worker.worker_id, tracked);
        info!(
            worker = worker.worker_id,
            incarnation = worker.incarnation,
            pid,
            "adopted a running worker process"
        );
        let events = self.events.clone();
        let detached = self.detached.clone();
        let (worker_id, incarnation) = (worker.worker_id, worker.incarnation);
        tokio::spawn(async move {
            // Not our child: no `wait`; it is gone when its PID no longer
            // names the process that started at that tick.
            while flotilla_proto::reap::start_time(pid as i32) == Some(started) {
                tokio::time::sleep(ADOPTED_WATCH).await;
            }
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            if detached.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            debug!(
                worker = worker_id,
                incarnation, "adopted worker process ended"
            );
            let _ = events.send(RuntimeEvent::Exited {
                worker_id,
                incarnation,
                detail: format!("process {pid} (adopted) ended"),
            });
        });
        Ok(Some(WorkerHandle {
            incarnation: worker.incarnation,
            locator: format!("pid {pid}"),
            key: key_of(&tracked),
        }))
    }

    async fn detach(&self) {
        self.detached
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let left = self.children.lock().expect("children lock").len();
        if left > 0 {
            info!(
                workers = left,
                "leaving the worker processes running for the next master"
            );
        }
    }

    async fn claim(&self, me: &Owner) -> Result<(), ClaimError> {
        let file = ClaimFile::claim(&self.claim_dir, &self.cluster, me)?;
        debug!(claim = %file.path().display(), "cluster claimed");
        *self.claim.lock().expect("claim lock") = Some(file);
        Ok(())
    }

    async fn release_claim(&self) {
        self.claim.lock().expect("claim lock").take();
    }

    async fn remove_workers(
        &self,
        recorded: &[RecordedWorker],
    ) -> Result<Vec<String>, RuntimeError> {
        let recorded = recorded.to_vec();
        tokio::task::spawn_blocking(move || remove_recorded(&recorded))
            .await
            .map_err(|e| RuntimeError::Remove(e.to_string()))
    }

    async fn shutdown(&self) {
        let all: Vec<_> = self
            .children
            .lock()
            .expect("children lock")
            .drain()
            .collect();
        for (_, t) in &all {
            if t.started != 0 && flotilla_proto::reap::start_time(t.pid as i32) != Some(t.started) {
                continue; // gone already; the PID may be another process's now
            }
            let _ = killpg(Pid::from_raw(t.pid as i32), Signal::SIGKILL);
        }
        if !all.is_empty() {
            // What the workers and their tasks started is re-parented here
            // as they die: sweep until three sweeps in a row find nothing.
            let mut quiet = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while quiet < 3 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                match tokio::task::spawn_blocking(sweep_orphans).await {
                    Ok(0) => quiet += 1,
                    _ => quiet = 0,
                }
            }
        }
    }
}

/// Whether `pid` is a worker process of this user: a `flotilla-worker`
/// leading its own process group, as this runtime starts them. (A worker is
/// not dumpable: its environment cannot be read to check more.)
fn is_our_worker(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let named = Path::new(std::ffi::OsStr::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n == "flotilla-worker");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = super::owner::my_uid().to_string();
    let same_user = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        == Some(uid.as_str());
    let leader = nix::unistd::getpgid(Some(Pid::from_raw(pid as i32)))
        .is_ok_and(|g| g.as_raw() == pid as i32);
    named && same_user && leader
}

/// SIGKILLs each recorded worker that still runs (and everything under
/// it), waits until they are gone; one line per worker removed.
fn remove_recorded(recorded: &[RecordedWorker]) -> Vec<String> {
    use flotilla_proto::reap;
    let mine = std::process::id();
    let procs = reap::snapshot();
    let kids = reap::children(&procs);
    let mut removed = Vec::new();
    let mut doomed = Vec::new();
    for w in recorded {
        // The handle names the very process (PID and start time); a bare
        // PID must at least still be one of this user's workers.
        let (pid, checked) = match w.key.as_deref().and_then(parse_key) {
            Some((pid, started)) => (
                pid,
                flotilla_proto::reap::start_time(pid as i32) == Some(started),
            ),
            None => match w.pid {
                Some(pid) => (pid, true),
                None => continue,
            },
        };
        if !checked || pid == mine || pid <= 1 || !is_our_worker(pid) {
            continue;
        }
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        doomed.extend(reap::subtree(&kids, pid as i32));
        doomed.push(pid as i32);
        removed.push(format!(
            "worker {} (incarnation {}): process {pid}",
            w.id, w.incarnation
        ));
    }
    reap::kill_all(&doomed);
    // Gone once reaped by whoever is their parent now (zombies count as gone).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for pid in &doomed {
        while std::time::Instant::now() < deadline && runs(*pid) {
            reap::reap(*pid);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    removed
}

/// A process that exists and is not a zombie.
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// `sleep 60` started as `name`, leading its own process group.
    fn sleeper(dir: &Path, name: &str) -> std::process::Child {
        let exe = dir.join(name);
        std::fs::copy("/bin/sleep", &exe).unwrap();
        std::process::Command::new(&exe)
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[test]
    fn only_recorded_processes_that_are_still_workers_are_removed() {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-remove-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut worker = sleeper(&dir, "flotilla-worker");
        // A recorded PID now used by something else (the PID was reused).
        let mut stranger = sleeper(&dir, "not-a-worker");
        let recorded = [
            RecordedWorker {
                id: 0,
                incarnation: 3,
                pid: Some(worker.id()),
                key: None,
            },
            RecordedWorker {
                id: 1,
                incarnation: 1,
                pid: Some(stranger.id()),
                key: None,
            },
            RecordedWorker {
                id: 2,
                incarnation: 1,
                pid: None,
                key: None,
            },
        ];
        let removed = remove_recorded(&recorded);
        assert_eq!(
            removed,
            [format!("worker 0 (incarnation 3): process {}", worker.id())]
        );
        let status = worker.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(stranger.try_wait().unwrap().is_none(), "left alone");
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
