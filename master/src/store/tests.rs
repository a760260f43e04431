use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use flotilla_proto::{TaskKind, TaskResult, TaskSpec};
use serde_json::json;

use super::*;

/// A scratch directory, removed when the test ends.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    let dir = std::env::temp_dir().join(format!("flotilla-store-{tag}-{n:x}"));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn spec(i: u64) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Python,
        command: format!("response = {i}"),
        timeout: None,
    }
}

fn submit(id: u64) -> Op {
    Op::Submit {
        id,
        spec: spec(id),
        target: None,
        submitted_at: 1000 + id,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn open(dir: &Path, cluster: &str) -> Result<(Store, Recovered), StoreError> {
    Store::open(dir, cluster, "secret-1")
}

#[test]
fn first_start_creates_a_store_and_the_next_one_finds_it() {
    let dir = tempdir("fresh");
    let (store, rec) = open(&dir, "alpha").unwrap();
    assert!(rec.fresh);
    assert_eq!(rec.master_incarnation, 1);
    assert_eq!(rec.next_task_id, 1);
    assert_eq!(rec.worker_secret, "secret-1");
    drop(store);
    let (_store, rec) = Store::open(&dir, "alpha", "another").unwrap();
    assert!(!rec.fresh);
    assert_eq!(rec.master_incarnation, 2, "each master is the next one");
    assert_eq!(
        rec.worker_secret, "secret-1",
        "the secret is the cluster's, kept"
    );
    assert!(rec.tasks.is_empty());
}

#[test]
fn everything_written_is_read_back_in_order() {
    let dir = tempdir("roundtrip");
    let (store, _) = open(&dir, "alpha").unwrap();
    let result = TaskResult {
        response: json!(42),
        stdout: "hi\n".into(),
        exit_code: None,
        stderr: None,
    };
    let seq = store.append(vec![
        submit(1),
        submit(2),
        Op::Submit {
            id: 3,
            spec: TaskSpec {
                timeout: Some(1.5),
                ..spec(3)
            },
            target: Some(1),
            submitted_at: 7,
        },
        Op::Queue {
            id: 2,
            node: Some(0),
        },
        Op::Start(AttemptRecord {
            task: 1,
            attempt: 1,
            worker: 0,
            incarnation: 4,
            slot: 0,
            started_at: 2000,
            outcome: None,
            epoch: 0,
        }),
        Op::Finish {
            id: 1,
            state: TaskState::Succeeded,
            node: Some(0),
            attempts: 1,
            result: Some(result.clone()),
            error: None,
            finished_at: 3000,
            feed_pos: 0,
        },
        Op::Start(AttemptRecord {
            task: 3,
            attempt: 1,
            worker: 1,
            incarnation: 2,
            slot: 1,
            started_at: 2500,
            outcome: None,
            epoch: 0,
        }),
        Op::Resource(ResourceRecord {
            name: "total".into(),
            kind: "Integer".into(),
            value: json!(5),
            version: 5,
        }),
        Op::Grant(GrantRecord {
            resource: "total".into(),
            request: 9,
            mode: "write".into(),
            token: 5,
            worker: 1,
            incarnation: 2,
            task: 3,
            attempt: 1,
        }),
        Op::Worker(WorkerRecord {
            id: 1,
            capacity: 2,
            incarnation: 2,
            restarts: 1,
            pid: Some(4242),
            handle: None,
        }),
    ]);
    rt().block_on(store.durable(seq)).unwrap();
    drop(store);

    let (_store, rec) = open(&dir, "alpha").unwrap();
    assert_eq!(rec.next_task_id, 4);
    assert_eq!(rec.feed_len, 1);
    // A starting master gets the unfinished tasks; finished ones are read
    // from the store when asked for.
    let ids: Vec<_> = rec.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, [2, 3]);
    let t1 = _store.task(1).unwrap().unwrap();
    assert_eq!(t1.state, TaskState::Succeeded);
    assert_eq!(t1.result.as_ref(), Some(&result));
    assert_eq!(t1.started_at, Some(2000));
    assert_eq!(t1.feed_pos, Some(0));
    assert!(t1.is_final());
    assert_eq!(_store.feed(0, 1, 10).unwrap(), vec![t1.clone()]);
    assert_eq!(rec.tasks[0].state, TaskState::Assigned);
    assert_eq!(rec.tasks[0].node, Some(0));
    assert_eq!(rec.tasks[1].state, TaskState::Running);
    assert_eq!(rec.tasks[1].target, Some(1));
    assert_eq!(rec.tasks[1].spec.command, spec(3).command);
    // The task's own timeout survives a restart.
    assert_eq!(rec.tasks[1].spec.timeout, Some(1.5));
    assert_eq!(
        rec.open_attempts,
        vec![AttemptRecord {
            task: 3,
            attempt: 1,
            worker: 1,
            incarnation: 2,
            slot: 1,
            started_at: 2500,
            outcome: None,
            epoch: 0,
        }],
        "the finished task's attempt is closed"
    );
    assert_eq!(rec.resources[0].value, json!(5));
    assert_eq!(rec.resources[0].version, 5);
    assert_eq!(rec.grants.len(), 1);
    assert_eq!(rec.grants[0].token, 5);
    assert_eq!(rec.workers[0].pid, Some(4242));
    assert_eq!(rec.workers[0].incarnation, 2);

    // The reader connection sees committed tasks too.
    let (store, _) = {
        drop(_store);
        open(&dir, "alpha").unwrap()
    };
    assert_eq!(store.task(1).unwrap().unwrap().state, TaskState::Succeeded);
    assert_eq!(store.task(99).unwrap(), None);
}

#[test]
fn grants_and_attempts_can_be_closed() {
    let dir = tempdir("close");
    let (store, _) = open(&dir, "alpha").unwrap();
    let seq = store.append(vec![
        submit(1),
        Op::Start(AttemptRecord {
            task: 1,
            attempt: 1,
            worker: 0,
            incarnation: 1,
            slot: 0,
            started_at: 1,
            outcome: None,
            epoch: 0,
        }),
        Op::Grant(GrantRecord {
            resource: "r".into(),
            request: 1,
            mode: "read".into(),
            token: 0,
            worker: 0,
            incarnation: 1,
            task: 1,
            attempt: 1,
        }),
        Op::Ungrant {
            resource: "r".into(),
            request: 1,
        },
        Op::EndAttempt {
            task: 1,
            attempt: 1,
            outcome: "crashed".into(),
        },
        Op::Queue { id: 1, node: None },
    ]);
    rt().block_on(store.durable(seq)).unwrap();
    drop(store);
    let (_s, rec) = open(&dir, "alpha").unwrap();
    assert!(rec.grants.is_empty());
    assert!(rec.open_attempts.is_empty());
    assert_eq!(rec.tasks[0].state, TaskState::Queued);
    assert_eq!(rec.tasks[0].node, None);
    assert_eq!(rec.tasks[0].attempts, 1);
}

#[test]
fn expired_results_are_gone_but_their_ids_are_never_handed_out_again() {
    let dir = tempdir("expire");
    let (store, _) = open(&dir, "alpha").unwrap();
    let mut ops: Vec<Op> = (1..=5).map(submit).collect();
    for id in 1..=5 {
        ops.push(Op::Finish {
            id,
            state: TaskState::Succeeded,
            node: Some(0),
            attempts: 1,
            result: None,
            error: None,
            finished_at: 100 * id,
            feed_pos: id - 1,
        });
    }
    let seq = store.append(ops);
    rt().block_on(store.durable(seq)).unwrap();
    assert_eq!(store.feed(0, 5, 10).unwrap().len(), 5);
    // Only those finished before the cutoff go.
    let seq = store.expire(350);
    rt().block_on(store.expired(seq)).unwrap();
    assert_eq!(store.task(3).unwrap(), None);
    let left: Vec<_> = store.feed(0, 5, 10).unwrap().iter().map(|t| t.id).collect();
    assert_eq!(left, [4, 5], "the feed skips expired entries");
    let seq = store.expire(10_000);
    rt().block_on(store.expired(seq)).unwrap();
    drop(store);
    let (s, rec) = open(&dir, "alpha").unwrap();
    assert!(rec.tasks.is_empty());
    assert!((1..=5).all(|id| s.task(id).unwrap().is_none()));
    assert_eq!(rec.next_task_id, 6);
    assert_eq!(rec.feed_len, 5, "the feed's positions outlive its entries");
}

#[test]
fn a_batch_costs_one_commit() {
    let dir = tempdir("group");
    let (store, _) = open(&dir, "alpha").unwrap();
    // Appends come far faster than syncs: they must share commits.
    let mut last = 0;
    for id in 1..=2000 {
        last = store.append(vec![submit(id)]);
    }
    rt().block_on(store.durable(last)).unwrap();
    let commits = store.commits();
    assert!(
        commits < 1000,
        "2000 appends took {commits} commits: no group commit"
    );
    drop(store);
    let (_s, rec) = open(&dir, "alpha").unwrap();
    assert_eq!(rec.tasks.len(), 2000);
}

#[test]
fn a_second_master_on_the_directory_is_refused_naming_the_first() {
    let dir = tempdir("lock");
    let (_first, _) = open(&dir, "alpha").unwrap();
    let err = open(&dir, "alpha").err().expect("second open refused");
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Locked { .. }), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
}

#[test]
fn another_clusters_directory_is_refused() {
    let dir = tempdir("other");
    drop(open(&dir, "alpha").unwrap());
    let err = open(&dir, "beta").err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::OtherCluster { .. }), "{msg}");
    assert!(msg.contains("`alpha`") && msg.contains("`beta`"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    // Still alpha's, untouched.
    assert!(open(&dir, "alpha").is_ok());
}

#[test]
fn a_newer_format_is_refused() {
    let dir = tempdir("newer");
    drop(open(&dir, "alpha").unwrap());
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", FORMAT_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = open(&dir, "alpha").err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::NewerFormat { .. }), "{msg}");
    assert!(msg.contains("newer Flotilla"), "{msg}");
    assert!(dir.join(DB_FILE).exists(), "nothing deleted");
}

#[test]
fn a_format_1_store_is_opened_and_keeps_task_timeouts_from_then_on() {
    let dir = tempdir("format1");
    drop(open(&dir, "alpha").unwrap());
    // Format 1: no timeout column.
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.execute_batch("ALTER TABLE tasks DROP COLUMN timeout_s; PRAGMA user_version = 1;")
        .unwrap();
    drop(conn);
    let (store, _) = open(&dir, "alpha").unwrap();
    let seq = store.append(vec![Op::Submit {
        id: 1,
        spec: TaskSpec {
            timeout: Some(2.0),
            ..spec(1)
        },
        target: None,
        submitted_at: 1,
    }]);
    rt().block_on(store.durable(seq)).unwrap();
    store.close();
    drop(store);
    let (_, rec) = open(&dir, "alpha").unwrap();
    assert_eq!(rec.tasks[0].spec.timeout, Some(2.0));
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, FORMAT_VERSION);
}

#[test]
fn a_truncated_store_is_refused_and_kept() {
    let dir = tempdir("trunc");
    let (store, _) = open(&dir, "alpha").unwrap();
    let seq = store.append((1..=3000).map(submit).collect());
    rt().block_on(store.durable(seq)).unwrap();
    drop(store);
    let path = dir.join(DB_FILE);
    // Closing checkpointed the WAL into the main file: cut that in half.
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 100_000, "{len}");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let err = open(&dir, "alpha").err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("Move the directory aside"), "{msg}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len / 2, "kept");

    // Cut below the header: still named damaged, still kept.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(40).unwrap();
    drop(f);
    let err = open(&dir, "alpha").err().unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(path.exists());
}

#[test]
fn a_foreign_file_or_a_file_in_the_way_is_refused() {
    let dir = tempdir("foreign");
    std::fs::write(dir.join(DB_FILE), vec![b'x'; 4096]).unwrap();
    let err = open(&dir, "alpha").err().unwrap();
    assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");
    assert_eq!(std::fs::read(dir.join(DB_FILE)).unwrap(), vec![b'x'; 4096]);

    // Another program's SQLite database.
    let other = tempdir("foreign-sqlite");
    let conn = rusqlite::Connection::open(other.join(DB_FILE)).unwrap();
    conn.execute_batch("CREATE TABLE t (x)").unwrap();
    drop(conn);
    let err = open(&other, "alpha").err().unwrap();
    assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");

    let parent = tempdir("in-the-way");
    let file = parent.join("state");
    std::fs::write(&file, "not a directory").unwrap();
    let err = open(&file, "alpha").err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Unreadable { .. }), "{msg}");
    assert!(msg.contains("not a directory"), "{msg}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}

/// The child half of the torn-write test: submits as fast as it can and
/// prints `ACK first last` once a batch is durable, until it is killed.
#[test]
fn torn_write_child() {
    let Ok(dir) = std::env::var("FLOTILLA_TORN_WRITE_DIR") else {
        return;
    };
    let (store, rec) = open(Path::new(&dir), "torn").unwrap();
    let rt = rt();
    let mut next = rec.next_task_id;
    loop {
        let first = next;
        let mut ops = Vec::new();
        for _ in 0..50 {
            ops.push(submit(next));
            // Results too, so that the file is rewritten, not only appended.
            if next % 3 == 0 {
                ops.push(Op::Finish {
                    id: next,
                    state: TaskState::Succeeded,
                    node: Some(0),
                    attempts: 1,
                    result: Some(TaskResult {
                        response: json!("x".repeat(200)),
                        ..Default::default()
                    }),
                    error: None,
                    finished_at: next,
                    feed_pos: next,
                });
            }
            next += 1;
        }
        let seq = store.append(ops);
        rt.block_on(store.durable(seq)).unwrap();
        println!("ACK {first} {}", next - 1);
    }
}

#[test]
fn torn_writes_never_lose_an_acknowledged_task_nor_reuse_an_id() {
    use rand::Rng;
    let dir = tempdir("torn");
    let exe = std::env::current_exe().unwrap();
    let mut acked: HashSet<u64> = HashSet::new();
    for round in 0..10 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "store::tests::torn_write_child", "--nocapture"])
            .env("FLOTILLA_TORN_WRITE_DIR", &*dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stop_after = rand::thread_rng().gen_range(5..60);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut batches = 0;
        while batches < stop_after {
            let line = lines.next().expect("child alive").unwrap();
            let Some(rest) = line.strip_prefix("ACK ") else {
                continue;
            };
            let (a, b) = rest.split_once(' ').unwrap();
            for id in a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap() {
                assert!(
                    acked.insert(id),
                    "round {round}: task ID {id} handed out twice"
                );
            }
            batches += 1;
        }
        child.kill().unwrap(); // SIGKILL, in the middle of its writes
        child.wait().unwrap();

        let (store, rec) = open(&dir, "torn")
            .unwrap_or_else(|e| panic!("round {round}: the store does not open: {e}"));
        let missing: Vec<_> = acked
            .iter()
            .filter(|&&id| store.task(id).unwrap().is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged tasks missing: {missing:?}"
        );
        let max = *acked.iter().max().unwrap();
        assert!(
            rec.next_task_id > max,
            "round {round}: ID counter went back"
        );
    }
}

#[test]
fn many_expired_results_go_in_bounded_steps_while_commits_go_on() {
    let dir = tempdir("expire-steps");
    let (store, _) = open(&dir, "alpha").unwrap();
    let n = 3 * super::writer::EXPIRE_STEP as u64 + 17;
    let mut ops = Vec::new();
    for id in 1..=n {
        ops.push(submit(id));
        ops.push(Op::Finish {
            id,
            state: TaskState::Succeeded,
            node: Some(0),
            attempts: 1,
            result: Some(TaskResult {
                response: json!("y".repeat(500)),
                ..Default::default()
            }),
            error: None,
            finished_at: id,
            feed_pos: id - 1,
        });
    }
    let seq = store.append(ops);
    rt().block_on(store.durable(seq)).unwrap();
    let full = store.disk_bytes();
    let commits = store.commits();
    store.expire(n + 1);
    // A submission made meanwhile is committed without waiting for the
    // whole deletion.
    let seq = store.append(vec![submit(n + 1)]);
    rt().block_on(store.durable(seq)).unwrap();
    rt().block_on(store.expired(seq)).unwrap();
    assert!(store.commits() > commits);
    assert!((1..=n)
        .step_by(97)
        .all(|id| store.task(id).unwrap().is_none()));
    assert!(
        store.task(n + 1).unwrap().is_some(),
        "unfinished tasks stay"
    );
    drop(store);
    let (store, rec) = open(&dir, "alpha").unwrap();
    assert_eq!(rec.tasks.len(), 1);
    assert_eq!(rec.feed_len, n);
    let sizes: Vec<_> = ["state.sqlite", "state.sqlite-wal", "state.sqlite-shm"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .collect();
    assert!(
        store.disk_bytes() < full,
        "the file shrinks: {} ({sizes:?}) then {full}",
        store.disk_bytes()
    );
}
