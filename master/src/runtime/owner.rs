//! One owner per cluster. A master claims its cluster on the runtime before
//! it touches any worker, with a record of who it is ([`Owner`]); a second
//! master of the same cluster name refuses to start while the first is
//! alive ([`ClaimError::Held`], naming the first), and workers are taken
//! over (removed or adopted) only once their owner is gone.
//!
//! Each runtime keeps the claim where its workers are:
//! - processes: a claim file per cluster name in the user's runtime
//!   directory, held with an exclusive `flock` ([`ClaimFile`]). The kernel
//!   releases it the moment the master's process ends, however it ends, so
//!   the file alone says whether the owner lives; no lease is needed.
//! - Docker: a labelled, never-started container `<cluster>-owner` (a
//!   container name is the one thing the engine creates atomically, and
//!   labels cannot be updated, so there is nothing to renew); whether its
//!   owner lives is checked ([`liveness`]): its process on this host, else
//!   its API answering with its session. An owner that can be neither seen
//!   nor reached for [`LEASE`] is taken for gone.
//! - Kubernetes: a `coordination.k8s.io/v1` Lease `<release>-owner`,
//!   renewed every [`LEASE`]/3, taken over once it has not been renewed for
//!   [`LEASE`] or its holder is seen gone.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// How long an owner that can be neither seen nor reached keeps its claim
/// (Docker), and how long a Kubernetes Lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(15);

/// The response header carrying the answering master's session (see
/// [`Owner::session`]); the liveness probe compares it.
pub const SESSION_HEADER: &str = "flotilla-master-session";

/// Who owns a cluster: enough to name it in an error and to tell whether it
/// is still alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Random, one per start of a master: tells it from any other, even one
    /// with the same PID or address later.
    pub session: String,
    /// The machine (the container's or pod's hostname when it runs in one).
    pub host: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot, from
    /// `/proc/<pid>/stat`), so that a reused PID is not taken for it.
    #[serde(default)]
    pub pid_start: u64,
    /// `pod <namespace>/<name>` when the master runs in a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The Docker container it runs in, when it runs in one (its ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Where its API is reached (empty for `flotilla down`).
    #[serde(default)]
    pub address: String,
    /// When it claimed the cluster (Unix ms).
    pub since: u64,
    /// What it is: `master`, or `flotilla down`.
    #[serde(default = "master")]
    pub role: String,
}

fn master() -> String {
    "master".into()
}

impl Owner {
    /// This process, claiming now, as `role`, its API at `address`.
    pub fn me(role: &str, address: &str) -> Owner {
        let pid = std::process::id();
        let env = crate::settings::get();
        let pod = env.pod_name.as_ref().map(|name| match &env.namespace {
            Some(ns) => format!("pod {ns}/{name}"),
            None => format!("pod {name}"),
        });
        Owner {
            session: crate::cluster::random_secret()[..16].to_string(),
            host: hostname(),
            pid,
            pid_start: pid_start(pid).unwrap_or(0),
            pod,
            container: container_id(),
            address: address.to_string(),
            since: crate::scheduler::unix_ms(),
            role: role.to_string(),
        }
    }

    /// The Kubernetes Lease's `holderIdentity`: the pod, else host/PID.
    pub fn holder_identity(&self) -> String {
        match &self.pod {
            Some(pod) => pod.trim_start_matches("pod ").to_string(),
            None => format!("{}/{}", self.host, self.pid),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = if self.role == "master" {
            "master"
        } else {
            self.role.as_str()
        };
        write!(f, "{role} ")?;
        match (&self.pod, &self.container) {
            (Some(pod), _) => write!(f, "{pod} (pid {} on host {})", self.pid, self.host)?,
            (None, Some(id)) => write!(
                f,
                "container {} (pid {} on host {})",
                &id[..12.min(id.len())],
                self.pid,
                self.host
            )?,
            (None, None) => write!(f, "pid {} on host {}", self.pid, self.host)?,
        }
        if !self.address.is_empty() {
            write!(f, ", API at {}", self.address)?;
        }
        write!(f, ", since {}", rfc3339_ms(self.since))
    }
}

/// Unix ms as `2026-12-01T16:30:00Z` (UTC).
pub fn rfc3339_ms(ms: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| format!("{:.0}", t))
        .unwrap_or_else(|_| format!("{ms} (Unix ms)"))
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into())
}

/// The Docker container this process runs in: the engine bind-mounts
/// `/var/lib/docker/containers/<id>/hostname` on `/etc/hostname`.
pub fn container_id() -> Option<String> {
    container_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// [`container_id`] from a mount table's text.
fn container_in(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        if mount_point != "/etc/hostname" {
            return None;
        }
        let rest = &root[root.find("/containers/")? + "/containers/".len()..];
        let id: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        (id.len() == 64 && rest[64..].starts_with("/hostname")).then_some(id)
    })
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
pub fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Why a cluster could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cluster `{cluster}` is owned by a live {owner} (claim: {claim}); its workers were left alone. Stop that master first (Ctrl-C there, or SIGTERM), or give this cluster another name (metadata.name)")]
    Held {
        cluster: String,
        owner: Box<Owner>,
        /// Where the claim is kept (a file, a container, a Lease).
        claim: String,
    },
    #[error("cannot claim cluster `{cluster}` ({claim}): {detail}")]
    Failed {
        cluster: String,
        claim: String,
        detail: String,
    },
}

/// What is known about a recorded owner.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// Gone, and why it is known.
    Gone(String),
    /// Neither seen nor reached (another machine, a paused master, an
    /// address this machine cannot resolve): only its lease decides.
    Unknown(String),
}

/// Whether `owner` is still alive. On its own machine its process decides
/// (PID and start time); elsewhere its API must answer with its session.
pub async fn liveness(owner: &Owner) -> Verdict {
    if owner.host == hostname() && owner.pid_start != 0 {
        return match pid_start(owner.pid) {
            Some(start) if start == owner.pid_start => Verdict::Alive,
            _ => Verdict::Gone(format!(
                "pid {} on host {} is not running",
                owner.pid, owner.host
            )),
        };
    }
    if owner.address.is_empty() {
        return Verdict::Unknown(format!(
            "{} runs on another machine and has no API",
            owner.holder_identity()
        ));
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Verdict::Unknown(e.to_string()),
    };
    let url = format!("{}/health", owner.address.trim_end_matches('/'));
    match client.get(&url).send().await {
        Ok(resp) => {
            let session = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok());
            if session == Some(owner.session.as_str()) {
                Verdict::Alive
            } else {
                Verdict::Gone(format!(
                    "another master (or none) answers at {}",
                    owner.address
                ))
            }
        }
        Err(e) if e.is_connect() && !is_dns(&e) => {
            Verdict::Gone(format!("nothing listens at {}", owner.address))
        }
        Err(e) => Verdict::Unknown(format!("{url}: {e}")),
    }
}

fn is_dns(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("dns error") || text.contains("failed to lookup") {
            return true;
        }
        source = s.source();
    }
    false
}

/// Where process clusters' claim files are: `FLOTILLA_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/flotilla`, else `/tmp/flotilla-<uid>`.
pub fn runtime_dir() -> PathBuf {
    let env = crate::settings::get();
    if let Some(dir) = &env.runtime_dir {
        return dir.clone();
    }
    if let Some(dir) = &env.xdg_runtime_dir {
        return dir.join("flotilla");
    }
    std::env::temp_dir().join(format!("flotilla-{}", my_uid()))
}

/// This process's user ID (the owner of `/proc/self`).
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// A process cluster's claim: `<runtime dir>/<cluster>.owner`, locked with
/// an exclusive `flock` for as long as it is held and holding the owner's
/// record. The kernel drops the lock when the process ends, however it
/// ends; the file (never inherited: opened close-on-exec) stays, with the
/// last owner's record, and means nothing unlocked.
pub struct ClaimFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl ClaimFile {
    pub fn path_for(dir: &Path, cluster: &str) -> PathBuf {
        dir.join(format!("{cluster}.owner"))
    }

    /// Claims `cluster` for `me` in `dir`.
    pub fn claim(dir: &Path, cluster: &str, me: &Owner) -> Result<ClaimFile, ClaimError> {
        let path = Self::path_for(dir, cluster);
        let failed = |detail: String| ClaimError::Failed {
            cluster: cluster.to_string(),
            claim: path.display().to_string(),
            detail,
        };
        create_private_dir(dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| failed(format!("cannot open it: {e}")))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let owner = serde_json::from_str::<Owner>(&text).unwrap_or_else(|_| Owner {
                    session: String::new(),
                    host: hostname(),
                    pid: 0,
                    pid_start: 0,
                    pod: None,
                    container: None,
                    address: String::new(),
                    since: 0,
                    role: "master that is starting".into(),
                });
                return Err(ClaimError::Held {
                    cluster: cluster.to_string(),
                    owner: Box::new(owner),
                    claim: format!("flock on {}", path.display()),
                });
            }
            Err((_, e)) => return Err(failed(format!("cannot lock it: {e}"))),
        };
        let record = serde_json::to_string(me).expect("an owner serialises");
        let written = lock
            .set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(record.as_bytes()))
            .and_then(|_| lock.flush());
        written.map_err(|e| failed(format!("cannot write it: {e}")))?;
        Ok(ClaimFile { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-owner-test-{}-{tag}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_claim_names_the_first_until_it_is_released() {
        let dir = temp_dir("claim");
        let first = Owner::me("master", "http://127.0.0.1:5000");
        let held = ClaimFile::claim(&dir, "demo", &first).unwrap();
        let second = Owner::me("master", "http://127.0.0.1:5001");
        let err = ClaimFile::claim(&dir, "demo", &second)
            .err()
            .expect("refused");
        match &err {
            ClaimError::Held { owner, .. } => assert_eq!(**owner, first),
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("cluster `demo` is owned by a live master pid")
                && text.contains("API at http://127.0.0.1:5000")
                && text.contains("demo.owner"),
            "{text}"
        );
        // Another cluster name is another claim.
        let _other = ClaimFile::claim(&dir, "other", &second).unwrap();
        drop(held);
        let again = ClaimFile::claim(&dir, "demo", &second).unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(serde_json::from_str::<Owner>(&text).unwrap(), second);
    }

    #[tokio::test]
    async fn liveness_follows_the_process_on_this_host() {
        let me = Owner::me("master", "");
        assert_eq!(liveness(&me).await, Verdict::Alive);
        // A PID whose start time is not the recorded one was reused.
        let reused = Owner {
            pid_start: me.pid_start + 1,
            ..me.clone()
        };
        assert!(matches!(liveness(&reused).await, Verdict::Gone(_)));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Owner {
            pid,
            pid_start: 1,
            ..me.clone()
        };
        assert!(matches!(liveness(&dead).await, Verdict::Gone(_)));
        // Elsewhere: nothing listening is gone; no address is unknown.
        let remote = Owner {
            host: "elsewhere".into(),
            address: "http://127.0.0.1:1".into(),
            ..me.clone()
        };
        assert!(matches!(liveness(&remote).await, Verdict::Gone(_)));
        let silent = Owner {
            address: String::new(),
            ..remote
        };
        assert!(matches!(liveness(&silent).await, Verdict::Unknown(_)));
    }

    #[test]
    fn the_container_is_found_from_the_hostname_mount_only() {
        let id = "9a".repeat(32);
        let table = format!(
            "1 0 8:1 / / rw - overlay overlay rw\n\
             2 1 8:1 /var/lib/docker/containers/{other}/mounts/shm /dev/shm rw - tmpfs shm rw\n\
             3 1 8:1 /var/lib/docker/containers/{id}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n",
            other = "11".repeat(32)
        );
        assert_eq!(container_in(&table), Some(id));
        // On a host, the engine's shm mounts name containers: not ours.
        let host = format!(
            "2 1 8:1 /var/lib/docker/containers/{}/mounts/shm /var/lib/docker/containers/x/mounts/shm rw - tmpfs shm rw\n",
            "11".repeat(32)
        );
        assert_eq!(container_in(&host), None);
    }

    #[test]
    fn an_owner_is_named_with_its_process_address_and_time() {
        let o = Owner {
            session: "s".into(),
            host: "h".into(),
            pid: 42,
            pid_start: 7,
            pod: None,
            container: None,
            address: "http://10.0.0.1:5000".into(),
            since: 1_764_606_600_000,
            role: "master".into(),
        };
        assert_eq!(
            o.to_string(),
            "master pid 42 on host h, API at http://10.0.0.1:5000, since 2025-12-01T16:30:00Z"
        );
        assert_eq!(o.holder_identity(), "h/42");
        let in_pod = Owner {
            pod: Some("pod jobs/flotilla-0".into()),
            ..o
        };
        assert_eq!(in_pod.holder_identity(), "jobs/flotilla-0");
        assert!(in_pod
            .to_string()
            .starts_with("master pod jobs/flotilla-0 (pid 42"));
    }
}
