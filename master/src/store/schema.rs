//! Opening a state directory: its lock, the database's checks (ours, the
//! format, the cluster, intact), the tables, and reading everything back.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flotilla_proto::{TaskKind, TaskSpec};
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{
    AttemptRecord, GrantRecord, Recovered, ResourceRecord, StoreError, TaskRecord, WorkerRecord,
    DB_FILE, FORMAT_VERSION, LOCK_FILE,
};

/// `PRAGMA application_id` of a Flotilla store ("FLOT").
const APPLICATION_ID: i64 = 0x464C_4F54;

/// Bytes the WAL file is truncated to after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 8 << 20;

/// Indexes added after format 1 was first written: created when missing
/// on every open (older binaries read a store that has them unchanged).
/// `tasks_open` finds the unfinished tasks a starting master needs without
/// reading the finished ones.
const ADDED_INDEXES: &str =
    "CREATE INDEX IF NOT EXISTS tasks_open ON tasks(id) WHERE feed_pos IS NULL;";

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    target INTEGER,
    node INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    submitted_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    feed_pos INTEGER,
    timeout_s REAL
);
CREATE INDEX tasks_feed ON tasks(feed_pos) WHERE feed_pos IS NOT NULL;
CREATE INDEX tasks_finished_at ON tasks(finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE attempts (
    task INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    outcome TEXT,
    epoch INTEGER,
    PRIMARY KEY (task, attempt)
) WITHOUT ROWID;
CREATE TABLE resources (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE grants (
    resource TEXT NOT NULL,
    request INTEGER NOT NULL,
    mode TEXT NOT NULL,
    token INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    task INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    PRIMARY KEY (resource, request)
) WITHOUT ROWID;
CREATE TABLE workers (
    id INTEGER PRIMARY KEY,
    capacity INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    pid INTEGER,
    handle TEXT
);
";

fn unreadable(dir: &Path, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Unreadable {
        dir: dir.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Creates the directory if needed and takes its lock (an exclusive
/// `flock` on `LOCK`, released by the kernel when the process dies, so a
/// SIGKILLed master never leaves a stale lock). The lock file names the
/// holder, for the next master's error.
pub(super) fn lock_dir(dir: &Path) -> Result<Flock<File>, StoreError> {
    if dir.exists() && !dir.is_dir() {
        return Err(unreadable(dir, "it exists and is not a directory"));
    }
    std::fs::create_dir_all(dir).map_err(|e| unreadable(dir, format!("cannot create it: {e}")))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| unreadable(dir, format!("cannot open {}: {e}", path.display())))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "a master that is starting".into()
                } else {
                    holder.to_string()
                },
            });
        }
        Err((_, e)) => {
            return Err(unreadable(
                dir,
                format!("cannot lock {}: {e}", path.display()),
            ))
        }
    };
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into());
    let holder = format!(
        "pid {} on host {host}, since {} (Unix ms)",
        std::process::id(),
        crate::scheduler::unix_ms()
    );
    let written = lock
        .set_len(0)
        .and_then(|_| (&*lock).write_all(holder.as_bytes()))
        .and_then(|_| lock.sync_all());
    written.map_err(|e| unreadable(dir, format!("cannot write {}: {e}", path.display())))?;
    Ok(lock)
}

fn db_error(dir: &Path, file: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let name = file.display().to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotOurs {
            dir: dir.to_path_buf(),
            file: name,
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            dir: dir.to_path_buf(),
            file: name,
            detail: e.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            unreadable(dir, format!("{name}: {e}"))
        }
        _ => unreadable(dir, format!("{name}: {e}")),
    }
}

fn set_pragmas(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers never block the writer; FULL: a commit is on disk
    // (the WAL synced) before it returns.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // After a checkpoint the WAL file is cut back to this size, so a burst
    // of writes does not leave a large file behind.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// A first start: the database is built under a temporary name and renamed
/// into place once complete, so `state.sqlite` always is a whole store.
fn create(dir: &Path, path: &Path, cluster: &str, secret: &str) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{DB_FILE}.new"));
    // Only an interrupted creation leaves this; it never held any task.
    for leftover in [
        tmp.clone(),
        tmp.with_extension("new-wal"),
        tmp.with_extension("new-shm"),
        tmp.with_extension("new-journal"),
    ] {
        let _ = std::fs::remove_file(leftover);
    }
    let build = || -> rusqlite::Result<()> {
        let conn = Connection::open(&tmp)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", FORMAT_VERSION)?;
        conn.execute_batch(SCHEMA)?;
        let now = crate::scheduler::unix_ms().to_string();
        for (k, v) in [
            ("cluster", cluster),
            ("worker_secret", secret),
            ("next_task_id", "1"),
            ("created_at", now.as_str()),
        ] {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        conn.close().map_err(|(_, e)| e)?;
        Ok(())
    };
    build().map_err(|e| db_error(dir, &tmp, e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| unreadable(dir, format!("cannot move the new store into place: {e}")))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| unreadable(dir, format!("cannot sync the directory: {e}")))?;
    Ok(())
}

/// Opens the store (creating it on a first start) and checks that it is a
/// Flotilla store of a format this binary reads, of this cluster, intact.
pub(super) fn open_db(dir: &Path, cluster: &str, secret: &str) -> Result<Connection, StoreError> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        create(dir, &path, cluster, secret)?;
    }
    check_header(dir, &path)?;
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_error(dir, &path, e))?;
    set_pragmas(&conn).map_err(|e| db_error(dir, &path, e))?;
    let app: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| db_error(dir, &path, e))?;
    if app != APPLICATION_ID {
        return Err(StoreError::NotOurs {
            dir: dir.to_path_buf(),
            file: path.display().to_string(),
        });
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| db_error(dir, &path, e))?;
    if version > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            dir: dir.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let problems: Vec<String> = (|| {
        let mut st = conn.prepare("PRAGMA quick_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })()
    .map_err(|e| StoreError::Corrupt {
        dir: dir.to_path_buf(),
        file: path.display().to_string(),
        detail: e.to_string(),
    })?;
    if problems.iter().any(|p| p != "ok") {
        return Err(StoreError::Corrupt {
            dir: dir.to_path_buf(),
            file: path.display().to_string(),
            detail: problems.into_iter().take(3).collect::<Vec<_>>().join("; "),
        });
    }
    let found: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'cluster'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| db_error(dir, &path, e))?;
    let found = found.ok_or_else(|| StoreError::Corrupt {
        dir: dir.to_path_buf(),
        file: path.display().to_string(),
        detail: "the cluster name is missing".into(),
    })?;
    if found != cluster {
        return Err(StoreError::OtherCluster {
            dir: dir.to_path_buf(),
            found,
            expected: cluster.to_string(),
        });
    }
    conn.execute_batch(ADDED_INDEXES)
        .map_err(|e| db_error(dir, &path, e))?;
    if version < FORMAT_VERSION {
        // Format 1 did not keep a task's `timeout` (a restart ran its tasks
        // without one: those are lost; the column is added); format 2 not
        // which master started an attempt (its `epoch`: those are 0).
        upgrade(&conn).map_err(|e| db_error(dir, &path, e))?;
    }
    Ok(conn)
}

/// Adds what older formats lack, in one transaction.
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    let mut sql = String::from("BEGIN;");
    if !has("tasks", "timeout_s")? {
        sql.push_str("ALTER TABLE tasks ADD COLUMN timeout_s REAL;");
    }
    if !has("attempts", "epoch")? {
        sql.push_str("ALTER TABLE attempts ADD COLUMN epoch INTEGER;");
    }
    sql.push_str(&format!("PRAGMA user_version = {FORMAT_VERSION}; COMMIT;"));
    conn.execute_batch(&sql)
}

/// SQLite would take a non-database for an empty one in some cases: look
/// at the header ourselves first.
fn check_header(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let mut head = [0u8; 100];
    let mut f = File::open(path)
        .map_err(|e| unreadable(dir, format!("cannot open {}: {e}", path.display())))?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                return Err(unreadable(
                    dir,
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        }
    }
    let magic = b"SQLite format 3\0";
    if got >= magic.len() && &head[..magic.len()] != magic {
        return Err(StoreError::NotOurs {
            dir: dir.to_path_buf(),
            file: path.display().to_string(),
        });
    }
    if got < head.len() {
        return Err(StoreError::Corrupt {
            dir: dir.to_path_buf(),
            file: path.display().to_string(),
            detail: format!("the file is truncated ({got} bytes, shorter than its header)"),
        });
    }
    Ok(())
}

/// A second, read-only connection for lookups while the writer writes.
pub(super) fn open_reader(dir: &Path) -> Result<Connection, StoreError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_error(dir, &path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| db_error(dir, &path, e))?;
    Ok(conn)
}

fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}

fn task_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRecord> {
    let kind: String = r.get("kind")?;
    let kind = match kind.as_str() {
        "shell" => TaskKind::Shell,
        _ => TaskKind::Python,
    };
    let result: Option<String> = r.get("result")?;
    let result = match result {
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?),
        None => None,
    };
    Ok(TaskRecord {
        id: to_u64(r.get("id")?),
        spec: TaskSpec {
            kind,
            command: r.get("command")?,
            timeout: r.get("timeout_s")?,
        },
        state: r.get::<_, String>("state")?.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        target: r.get::<_, Option<i64>>("target")?.map(|v| v as u32),
        node: r.get::<_, Option<i64>>("node")?.map(|v| v as u32),
        attempts: r.get::<_, i64>("attempts")? as u32,
        result,
        error: r.get("error")?,
        submitted_at: to_u64(r.get("submitted_at")?),
        started_at: r.get::<_, Option<i64>>("started_at")?.map(to_u64),
        finished_at: r.get::<_, Option<i64>>("finished_at")?.map(to_u64),
        feed_pos: r.get::<_, Option<i64>>("feed_pos")?.map(to_u64),
    })
}

pub(super) fn read_task(conn: &Connection, id: u64) -> rusqlite::Result<Option<TaskRecord>> {
    conn.prepare_cached("SELECT * FROM tasks WHERE id = ?1")?
        .query_row([id as i64], task_from_row)
        .optional()
}

/// A task's attempts, oldest first (the dashboard's task detail for a
/// task that left memory).
pub(super) fn read_attempts(conn: &Connection, task: u64) -> rusqlite::Result<Vec<AttemptRecord>> {
    conn.prepare_cached(
        "SELECT task, attempt, worker, incarnation, slot, started_at, outcome, epoch \
         FROM attempts WHERE task = ?1 ORDER BY attempt",
    )?
    .query_map([task as i64], |r| {
        Ok(AttemptRecord {
            task: to_u64(r.get(0)?),
            attempt: r.get::<_, i64>(1)? as u32,
            worker: r.get::<_, i64>(2)? as u32,
            incarnation: to_u64(r.get(3)?),
            slot: r.get::<_, i64>(4)? as u32,
            started_at: to_u64(r.get(5)?),
            outcome: r.get(6)?,
            epoch: r.get::<_, Option<i64>>(7)?.map_or(0, to_u64),
        })
    })?
    .collect()
}

/// The completion feed's entries at positions `from..before`, in order, at
/// most `limit` (expired ones are simply not there).
pub(super) fn read_feed(
    conn: &Connection,
    from: u64,
    before: u64,
    limit: usize,
) -> rusqlite::Result<Vec<TaskRecord>> {
    conn.prepare_cached(
        "SELECT * FROM tasks WHERE feed_pos >= ?1 AND feed_pos < ?2 ORDER BY feed_pos LIMIT ?3",
    )?
    .query_map(
        params![from as i64, before as i64, limit as i64],
        task_from_row,
    )?
    .collect()
}

/// Finished tasks with an ID in `after+1..end` and a feed position below
/// `feed_below`, in ID order, matching `state` and `node`, at most `limit`.
pub(super) fn read_finished(
    conn: &Connection,
    q: &super::FinishedQuery<'_>,
) -> rusqlite::Result<Vec<TaskRecord>> {
    conn.prepare_cached(
        "SELECT * FROM tasks WHERE id > ?1 AND id < ?2 AND feed_pos < ?3 \
         AND (?4 IS NULL OR state = ?4) AND (?5 IS NULL OR node = ?5) ORDER BY id LIMIT ?6",
    )?
    .query_map(
        params![
            q.after as i64,
            q.end.min(i64::MAX as u64) as i64,
            q.feed_below.min(i64::MAX as u64) as i64,
            q.state,
            q.node.map(i64::from),
            q.limit as i64
        ],
        task_from_row,
    )?
    .collect()
}

/// Everything a starting master needs, in one read transaction.
pub(super) fn load(dir: &Path, conn: &mut Connection) -> Result<Recovered, StoreError> {
    let path: PathBuf = dir.join(DB_FILE);
    let read = |conn: &mut Connection| -> rusqlite::Result<Recovered> {
        let tx = conn.transaction()?;
        let meta = |key: &str| -> rusqlite::Result<Option<String>> {
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let counter: u64 = meta("next_task_id")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let worker_secret = meta("worker_secret")?.unwrap_or_default();
        let feed_len: u64 = meta("feed_len")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        // Only the unfinished tasks: finished ones stay in the store, read
        // when asked for (a restart does not read every result back).
        let tasks = tx
            .prepare("SELECT * FROM tasks WHERE feed_pos IS NULL ORDER BY id")?
            .query_map([], task_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let max_id: u64 = tx
            .query_row("SELECT coalesce(max(id), 0) FROM tasks", [], |r| r.get(0))
            .map(to_u64)?;
        let open_attempts = tx
            .prepare(
                "SELECT task, attempt, worker, incarnation, slot, started_at, outcome, epoch \
                 FROM attempts WHERE outcome IS NULL ORDER BY task, attempt",
            )?
            .query_map([], |r| {
                Ok(AttemptRecord {
                    task: to_u64(r.get(0)?),
                    attempt: r.get::<_, i64>(1)? as u32,
                    worker: r.get::<_, i64>(2)? as u32,
                    incarnation: to_u64(r.get(3)?),
                    slot: r.get::<_, i64>(4)? as u32,
                    started_at: to_u64(r.get(5)?),
                    outcome: r.get(6)?,
                    epoch: r.get::<_, Option<i64>>(7)?.map_or(0, to_u64),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let resources = tx
            .prepare("SELECT name, kind, value, version FROM resources ORDER BY name")?
            .query_map([], |r| {
                let value: String = r.get(2)?;
                Ok(ResourceRecord {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    value: serde_json::from_str(&value).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                    version: to_u64(r.get(3)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let grants = tx
            .prepare(
                "SELECT resource, request, mode, token, worker, incarnation, task, attempt \
                 FROM grants ORDER BY resource, request",
            )?
            .query_map([], |r| {
                Ok(GrantRecord {
                    resource: r.get(0)?,
                    request: to_u64(r.get(1)?),
                    mode: r.get(2)?,
                    token: to_u64(r.get(3)?),
                    worker: r.get::<_, i64>(4)? as u32,
                    incarnation: to_u64(r.get(5)?),
                    task: to_u64(r.get(6)?),
                    attempt: r.get::<_, i64>(7)? as u32,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let workers = tx
            .prepare(
                "SELECT id, capacity, incarnation, restarts, pid, handle FROM workers ORDER BY id",
            )?
            .query_map([], |r| {
                Ok(WorkerRecord {
                    id: r.get::<_, i64>(0)? as u32,
                    capacity: r.get::<_, i64>(1)? as usize,
                    incarnation: to_u64(r.get(2)?),
                    restarts: to_u64(r.get(3)?),
                    pid: r.get::<_, Option<i64>>(4)?.map(|p| p as u32),
                    handle: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let master_incarnation: u64 = meta("master_incarnation")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            + 1;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('master_incarnation', ?1)",
            [master_incarnation.to_string()],
        )?;
        let ever: i64 = tx.query_row(
            "SELECT count(*) FROM meta WHERE key = 'first_open_done'",
            [],
            |r| r.get(0),
        )?;
        if ever == 0 {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('first_open_done', '1')",
                [],
            )?;
        }
        tx.commit()?;
        Ok(Recovered {
            fresh: ever == 0,
            master_incarnation,
            feed_len,
            next_task_id: counter.max(max_id + 1),
            worker_secret,
            tasks,
            open_attempts,
            resources,
            grants,
            workers,
        })
    };
    read(conn).map_err(|e| match e.sqlite_error_code() {
        Some(_) => db_error(dir, &path, e),
        None => StoreError::Corrupt {
            dir: dir.to_path_buf(),
            file: path.display().to_string(),
            detail: e.to_string(),
        },
    })
}
