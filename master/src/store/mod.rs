//! The master's durable state: an embedded SQLite database (WAL mode,
//! `synchronous=FULL`) in the cluster's state directory. Why SQLite and not
//! redb or fjall: ARCHITECTURE.md, "Durable state".
//!
//! What it holds: the accepted tasks (spec, state, the worker they are
//! queued for, result), every attempt (worker, incarnation, slot), the shared
//! resources with value and version (the fencing token), the lock grants,
//! the workers with their incarnations, the cluster's worker secret and the
//! task-ID counter (an ID is never handed out twice).
//!
//! How it is written: the scheduler's transitions become [`Op`]s, appended
//! in order with [`Store::append`] (never blocks: a channel). One writer
//! thread drains the channel and applies everything that queued up meanwhile
//! in **one** transaction, so a batch of any size costs one sync (group
//! commit). Every append gets a sequence number; [`Store::durable`] waits
//! until that number is committed, which is when a submission is
//! acknowledged.
//!
//! What it refuses: a directory another master holds (an exclusive `flock`
//! on `LOCK`), a store of another cluster, of a newer format, or one that is
//! not a Flotilla store or is damaged. Each error names the directory and
//! the way out. Nothing in a state directory is ever deleted automatically.

mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use flotilla_proto::api::TaskState;
use flotilla_proto::{Attempt, Incarnation, TaskId, TaskResult, TaskSpec, WorkerId};
use nix::fcntl::Flock;
use serde_json::Value;
use tokio::sync::watch;

/// The store's layout version; a directory written by a newer one is refused.
pub const FORMAT_VERSION: i64 = 3;

/// The file names inside a state directory.
pub const DB_FILE: &str = "state.sqlite";
pub const LOCK_FILE: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {dir} cannot be used: {detail}. Fix it (permissions, a file in the way), or start with another --state-dir or --ephemeral; nothing was deleted")]
    Unreadable { dir: PathBuf, detail: String },
    #[error("state directory {dir} is in use by another master ({holder}); stop that master first, or give this one another --state-dir")]
    Locked { dir: PathBuf, holder: String },
    #[error("state directory {dir} holds a damaged store ({file}: {detail}); nothing was deleted. Move the directory aside (or restore a backup of it) to start with an empty state, or use another --state-dir")]
    Corrupt {
        dir: PathBuf,
        file: String,
        detail: String,
    },
    #[error("state directory {dir}: {file} is not a Flotilla state store; nothing was deleted. Point --state-dir at a directory of its own")]
    NotOurs { dir: PathBuf, file: String },
    #[error("state directory {dir} was written by a newer Flotilla (store format {found}; this one reads up to {supported}); nothing was deleted. Run a newer flotilla, or use another --state-dir")]
    NewerFormat {
        dir: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("state directory {dir} belongs to cluster `{found}`, not `{expected}`; nothing was deleted. Give cluster `{expected}` a --state-dir (or spec.stateDir) of its own, or run the manifest of `{found}` on it")]
    OtherCluster {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error("state store in {dir} cannot be written: {detail}")]
    Write { dir: PathBuf, detail: String },
    #[error("state store in {dir} cannot be read: {detail}")]
    Read { dir: PathBuf, detail: String },
    #[error("state store in {dir} is closed")]
    Closed { dir: PathBuf },
}

/// A task as the store keeps it (its state by name, `queued` ... `cancelled`,
/// in the database).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// `/send/{node}`: the worker it was submitted to (kept on recovery).
    pub target: Option<WorkerId>,
    pub node: Option<WorkerId>,
    pub attempts: Attempt,
    pub result: Option<TaskResult>,
    pub error: Option<String>,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Position in the completion feed, once final.
    pub feed_pos: Option<u64>,
}

impl TaskRecord {
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }
}

/// One hand-off of a task to a worker slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub task: TaskId,
    pub attempt: Attempt,
    pub worker: WorkerId,
    pub incarnation: Incarnation,
    pub slot: u32,
    pub started_at: u64,
    /// How it ended (`succeeded`, `failed`, `crashed`, `lost`), once it has.
    pub outcome: Option<String>,
    /// The incarnation of the master that started it (0: a store of format
    /// 2 or older did not say); part of what its lease is derived from.
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourceRecord {
    pub name: String,
    /// The resource type's name (`Integer`, `List`...).
    pub kind: String,
    pub value: Value,
    /// The version: every write grant bumps it; it is the fencing token.
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    pub resource: String,
    /// The lock table's request ID of the grant.
    pub request: u64,
    /// `read` or `write`.
    pub mode: String,
    /// The write grant's fencing token (0 for a read grant).
    pub token: u64,
    pub worker: WorkerId,
    pub incarnation: Incarnation,
    pub task: TaskId,
    pub attempt: Attempt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub capacity: usize,
    pub incarnation: Incarnation,
    pub restarts: u64,
    /// The process worker's PID, as it registered.
    pub pid: Option<u32>,
    /// The runtime's handle (a container ID, a pod UID), when it has one.
    pub handle: Option<String>,
}

/// One change, in the order the scheduler made it.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Accepted: from now on the task must not be lost.
    Submit {
        id: TaskId,
        spec: TaskSpec,
        target: Option<WorkerId>,
        submitted_at: u64,
    },
    /// Moved to a worker's queue (`node`), or back to the master queue (`None`).
    Queue {
        id: TaskId,
        node: Option<WorkerId>,
    },
    /// Handed to a slot: a new attempt.
    Start(AttemptRecord),
    /// An attempt ended without finishing the task (crash, lost, worker death).
    EndAttempt {
        task: TaskId,
        attempt: Attempt,
        outcome: String,
    },
    /// Final: the result, and its place in the completion feed.
    Finish {
        id: TaskId,
        state: TaskState,
        node: Option<WorkerId>,
        attempts: Attempt,
        result: Option<TaskResult>,
        error: Option<String>,
        finished_at: u64,
        feed_pos: u64,
    },
    /// A resource created, or its value and version changed.
    Resource(ResourceRecord),
    Grant(GrantRecord),
    Ungrant {
        resource: String,
        request: u64,
    },
    Worker(WorkerRecord),
    /// Finished tasks whose result is older than `before` (Unix ms) are
    /// forgotten (result TTL).
    Expire {
        before: u64,
    },
}

/// What a master finds in its state directory when it starts.
#[derive(Debug, Default)]
pub struct Recovered {
    /// True when the directory held no store (a first start).
    pub fresh: bool,
    /// This master's incarnation: one more than the previous master's on
    /// this state directory (1 on a first start).
    pub master_incarnation: u64,
    /// The first ID this master may hand out: above every ID ever handed out.
    pub next_task_id: TaskId,
    /// The completion feed's length (expired entries included): the next
    /// completion goes at this position.
    pub feed_len: u64,
    pub worker_secret: String,
    /// The unfinished tasks, by ID (finished ones stay in the store and are
    /// read when asked for: see [`Store::task`], [`Store::feed`],
    /// [`Store::finished`]).
    pub tasks: Vec<TaskRecord>,
    /// The attempts that have not ended.
    pub open_attempts: Vec<AttemptRecord>,
    pub resources: Vec<ResourceRecord>,
    pub grants: Vec<GrantRecord>,
    pub workers: Vec<WorkerRecord>,
}

/// How far the writer has got.
#[derive(Clone, Debug, Default)]
struct Progress {
    committed: u64,
    /// Transactions committed (each one sync).
    commits: u64,
    /// Operations committed.
    ops: u64,
    /// Time spent applying operations (SQL statements) and committing
    /// (writing and syncing the WAL), in µs.
    apply_us: u64,
    sync_us: u64,
    /// Set when a commit failed: nothing later can be acknowledged.
    failed: Option<String>,
    /// Expired results are being deleted (in steps, between commits).
    expiring: bool,
}

/// The writer's work so far (see [`Store::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Transactions committed: each one cost one sync.
    pub commits: u64,
    /// Operations committed.
    pub ops: u64,
    /// Seconds spent running the operations' SQL statements.
    pub apply_seconds: f64,
    /// Seconds spent committing: writing the WAL and syncing it.
    pub sync_seconds: f64,
}

/// A page of finished tasks read from the store (the task listing's part
/// for tasks no longer in memory).
#[derive(Clone, Debug)]
pub struct FinishedQuery<'a> {
    /// IDs above this...
    pub after: TaskId,
    /// ...and below this.
    pub end: TaskId,
    /// Only tasks whose completion-feed position is below this.
    pub feed_below: u64,
    pub state: Option<&'a str>,
    pub node: Option<WorkerId>,
    pub limit: usize,
}

/// A recorded worker: ID, incarnation, PID, the runtime's handle.
pub type RecordedRow = (WorkerId, Incarnation, Option<u32>, Option<String>);

/// The open store of one state directory.
pub struct Store {
    dir: PathBuf,
    /// Sequence numbers and sends under one lock, so the channel carries
    /// them in order.
    sender: Mutex<(u64, Option<std::sync::mpsc::Sender<writer::Msg>>)>,
    progress: watch::Receiver<Progress>,
    appended: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<rusqlite::Connection>,
    /// Held for as long as the store is open: the directory is ours.
    _lock: Flock<File>,
}

impl Store {
    /// Opens (or creates) the store in `dir` for cluster `cluster`; fails,
    /// deleting nothing, when the directory is not this cluster's or another
    /// master holds it. `new_secret` is used on a first start only.
    pub fn open(
        dir: &Path,
        cluster: &str,
        new_secret: &str,
    ) -> Result<(Store, Recovered), StoreError> {
        let lock = schema::lock_dir(dir)?;
        let mut conn = schema::open_db(dir, cluster, new_secret)?;
        let recovered = schema::load(dir, &mut conn)?;
        let reader = schema::open_reader(dir)?;
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let wdir = dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("flotilla-store".into())
            .spawn(move || writer::run(wdir, conn, rx, progress_tx))
            .map_err(|e| StoreError::Write {
                dir: dir.to_path_buf(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((
            Store {
                dir: dir.to_path_buf(),
                sender: Mutex::new((0, Some(tx))),
                progress,
                appended: AtomicU64::new(0),
                writer: Mutex::new(Some(handle)),
                reader: Mutex::new(reader),
                _lock: lock,
            },
            recovered,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues `ops` for the writer; never blocks. Returns the sequence
    /// number to pass to [`Store::durable`].
    pub fn append(&self, ops: Vec<Op>) -> u64 {
        let mut guard = self.sender.lock().expect("store sender lock");
        guard.0 += 1;
        let seq = guard.0;
        self.appended.fetch_add(ops.len() as u64, Ordering::Relaxed);
        if let Some(tx) = &guard.1 {
            // A send fails only when the writer has stopped; `durable` then
            // reports it.
            let _ = tx.send(writer::Msg::Ops { seq, ops });
        }
        seq
    }

    /// The sequence number of the last append.
    pub fn last_seq(&self) -> u64 {
        self.sender.lock().expect("store sender lock").0
    }

    /// Waits until append `seq` (and everything before it) is committed.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.progress.clone();
        let got = rx
            .wait_for(|p| p.committed >= seq || p.failed.is_some())
            .await
            .map_err(|_| StoreError::Closed {
                dir: self.dir.clone(),
            })?;
        if got.committed >= seq {
            return Ok(());
        }
        Err(StoreError::Write {
            dir: self.dir.clone(),
            detail: got.failed.clone().unwrap_or_default(),
        })
    }

    /// Transactions committed so far: each one cost one sync.
    pub fn commits(&self) -> u64 {
        self.progress.borrow().commits
    }

    /// What the writer has done so far: commits, operations, and where its
    /// time went.
    pub fn stats(&self) -> StoreStats {
        let p = self.progress.borrow();
        StoreStats {
            commits: p.commits,
            ops: p.ops,
            apply_seconds: p.apply_us as f64 / 1e6,
            sync_seconds: p.sync_us as f64 / 1e6,
        }
    }

    /// Operations appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Everything appended so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.durable(self.last_seq()).await
    }

    /// Reads one task straight from the database (for tasks no longer in
    /// memory). Blocks on SQLite: call it off the async threads.
    pub fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let conn = self.reader.lock().expect("store reader lock");
        schema::read_task(&conn, id).map_err(|e| self.read_error(format!("reading task {id}: {e}")))
    }

    /// A task's attempts (committed ones), oldest first. Blocks on SQLite.
    pub fn attempts(&self, task: TaskId) -> Result<Vec<AttemptRecord>, StoreError> {
        let conn = self.reader.lock().expect("store reader lock");
        schema::read_attempts(&conn, task)
            .map_err(|e| self.read_error(format!("reading task {task}'s attempts: {e}")))
    }

    /// The completion feed's committed entries at positions `from..before`
    /// (expired ones are skipped), at most `limit`. Blocks on SQLite.
    pub fn feed(
        &self,
        from: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let conn = self.reader.lock().expect("store reader lock");
        schema::read_feed(&conn, from, before, limit)
            .map_err(|e| self.read_error(format!("reading the completion feed from {from}: {e}")))
    }

    /// Finished tasks, in ID order (see [`FinishedQuery`]). Blocks on SQLite.
    pub fn finished(&self, q: &FinishedQuery<'_>) -> Result<Vec<TaskRecord>, StoreError> {
        let conn = self.reader.lock().expect("store reader lock");
        schema::read_finished(&conn, q)
            .map_err(|e| self.read_error(format!("listing tasks after {}: {e}", q.after)))
    }

    fn read_error(&self, detail: String) -> StoreError {
        StoreError::Read {
            dir: self.dir.clone(),
            detail,
        }
    }

    /// Deletes, in the background, the finished tasks whose result is older
    /// than `before` (Unix ms): the result TTL. Returns at once; the writer
    /// deletes them a bounded step at a time between commits.
    pub fn expire(&self, before: u64) -> u64 {
        self.append(vec![Op::Expire { before }])
    }

    /// Waits until append `seq` is committed and no expired result is left
    /// to delete.
    pub async fn expired(&self, seq: u64) -> Result<(), StoreError> {
        self.durable(seq).await?;
        let mut rx = self.progress.clone();
        rx.wait_for(|p| !p.expiring || p.failed.is_some())
            .await
            .map_err(|_| StoreError::Closed {
                dir: self.dir.clone(),
            })?;
        Ok(())
    }

    /// The size on disk of the store's files (database, WAL, shared memory).
    pub fn disk_bytes(&self) -> u64 {
        disk_bytes(&self.dir)
    }

    /// Stops the writer after it has committed everything appended.
    pub fn close(&self) {
        let tx = self.sender.lock().expect("store sender lock").1.take();
        drop(tx);
        if let Some(h) = self.writer.lock().expect("store writer lock").take() {
            let _ = h.join();
        }
    }

    /// The workers a state directory records (ID, incarnation, PID, the
    /// runtime's handle), read without opening the store for writing (a
    /// live master may hold it); none when the directory holds no store.
    pub fn recorded_workers(dir: &Path) -> Result<Vec<RecordedRow>, StoreError> {
        if !dir.join(DB_FILE).is_file() {
            return Ok(Vec::new());
        }
        let conn = schema::open_reader(dir)?;
        let read = || -> rusqlite::Result<Vec<RecordedRow>> {
            let mut stmt =
                conn.prepare("SELECT id, incarnation, pid, handle FROM workers ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as WorkerId,
                    r.get::<_, i64>(1)? as Incarnation,
                    r.get::<_, Option<i64>>(2)?.map(|p| p as u32),
                    r.get::<_, Option<String>>(3)?,
                ))
            })?;
            rows.collect()
        };
        read().map_err(|e| StoreError::Unreadable {
            dir: dir.to_path_buf(),
            detail: format!("reading the recorded workers: {e}"),
        })
    }

    /// The default state directory of a cluster: `.flotilla/<name>` under
    /// the working directory.
    pub fn default_dir(cluster: &str) -> PathBuf {
        PathBuf::from(".flotilla").join(cluster)
    }
}

/// The size on disk of the store files in a state directory.
pub fn disk_bytes(dir: &Path) -> u64 {
    [DB_FILE, "state.sqlite-wal", "state.sqlite-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}
