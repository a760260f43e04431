//! The checker against hand-made histories: a clean one passes, and each
//! kind of anomaly, put in on purpose, is reported (a checker that cannot
//! fail proves nothing).

use super::*;
use crate::chaos::history::{FinalResource, NodeSeen, ResourceSeen};
use crate::chaos::schedule::FaultKind;
use flotilla_proto::api::{Holder, Owner};
use flotilla_proto::TaskResult;
use serde_json::json;

const C0: &str = "chaos_c0";

fn view(id: TaskId, state: TaskState, node: u32, attempts: u32, response: Value) -> TaskView {
    TaskView {
        id,
        state,
        node: Some(node),
        attempts,
        result: Some(TaskResult {
            response,
            stdout: String::new(),
            exit_code: None,
            stderr: None,
        }),
        error: None,
        submitted_at: 1_000,
        started_at: Some(1_100),
        finished_at: Some(1_200),
    }
}

fn write_hold(v: u64, t0: f64, t1: f64) -> Value {
    json!({"r": C0, "m": "w", "v": v, "t0": t0, "t1": t1, "consistent": true})
}

fn locks(delta: i64) -> Expect {
    Expect::Locks {
        writes: vec![C0.into()],
        reads: vec![],
        delta,
    }
}

fn node(id: u32, incarnation: u64, pid: u32) -> NodeSeen {
    NodeSeen {
        id,
        state: WorkerState::Active,
        incarnation,
        locator: Some(format!("pid {pid}")),
    }
}

fn final_tasks() -> Vec<TaskView> {
    let mut fail = view(13, TaskState::Failed, 1, 1, json!("Traceback ..."));
    fail.error = Some("RuntimeError: chaos op 5 item 0 fails on purpose".into());
    let mut cancelled = view(15, TaskState::Cancelled, 0, 1, Value::Null);
    cancelled.result = None;
    vec![
        view(
            10,
            TaskState::Succeeded,
            0,
            1,
            json!({"op": 2, "i": 0, "attempt": 1, "node": 0}),
        ),
        view(
            11,
            TaskState::Succeeded,
            1,
            1,
            json!({"op": 3, "i": 0, "attempt": 1, "node": 1, "holds": [write_hold(1, 1_300.0, 1_400.0)]}),
        ),
        // Its first attempt died with worker 0; the second one finished.
        view(
            12,
            TaskState::Succeeded,
            0,
            2,
            json!({"op": 4, "i": 0, "attempt": 2, "node": 0, "holds": [write_hold(3, 2_000.0, 2_100.0)]}),
        ),
        fail,
        view(
            14,
            TaskState::Succeeded,
            1,
            1,
            json!("op=5 i=1 attempt=1 node=1\n"),
        ),
        cancelled,
    ]
}

fn call(op: u64, t: f64, call: Call) -> Event {
    Event::Invoke { op, t, call }
}

fn ok(op: u64, t: f64, ids: Vec<TaskId>) -> Event {
    Event::Complete {
        op,
        t,
        outcome: Outcome::Ok,
        ids,
        status: None,
        error: None,
        answer: Value::Null,
    }
}

/// A soak in miniature where everything went right: a worker was killed
/// during task 12's first attempt (whose write grant, token 2, was fenced),
/// task 15 was cancelled, one submission was refused while the master was
/// away.
fn clean() -> Vec<Event> {
    let mut h = vec![
        Event::Meta {
            seed: 1,
            runtime: "process".into(),
            seconds: 3.0,
            cluster: "t".into(),
            workers: 2,
            heartbeat_timeout_ms: 3_000,
            t: 1_000.0,
        },
        call(1, 1_000.0, Call::CreateCounter { name: C0.into() }),
        ok(1, 1_001.0, vec![]),
        Event::Nodes {
            t0: 1_002.0,
            t1: 1_003.0,
            nodes: vec![node(0, 1, 100), node(1, 1, 101)],
        },
        call(
            2,
            1_010.0,
            Call::Send {
                task: Expect::Short,
            },
        ),
        ok(2, 1_011.0, vec![10]),
        call(3, 1_020.0, Call::Send { task: locks(2) }),
        ok(3, 1_021.0, vec![11]),
        call(4, 1_030.0, Call::Send { task: locks(3) }),
        ok(4, 1_031.0, vec![12]),
        call(
            5,
            1_040.0,
            Call::Batch {
                tasks: vec![Expect::Fail, Expect::Shell],
            },
        ),
        ok(5, 1_041.0, vec![13, 14]),
        call(
            6,
            1_050.0,
            Call::Send {
                task: Expect::Long { ms: 3_000 },
            },
        ),
        ok(6, 1_051.0, vec![15]),
        Event::Resources {
            t0: 1_200.0,
            t1: 1_201.0,
            resources: vec![ResourceSeen {
                name: C0.into(),
                version: 0,
                holders: vec![],
            }],
        },
        Event::Fault {
            index: 0,
            kind: FaultKind::Kill,
            t: 1_500.0,
            target: Some(0),
            detail: "SIGKILL to 100".into(),
            added: None,
        },
        Event::Recovered {
            index: 0,
            t: 2_300.0,
            after_ms: 800.0,
        },
        Event::Nodes {
            t0: 2_400.0,
            t1: 2_401.0,
            nodes: vec![node(0, 2, 200), node(1, 1, 101)],
        },
        call(7, 2_500.0, Call::Cancel { id: 15 }),
        Event::Complete {
            op: 7,
            t: 2_501.0,
            outcome: Outcome::Ok,
            ids: vec![],
            status: None,
            error: None,
            answer: json!({"id": 15, "state": "cancelled", "was": "running"}),
        },
        call(
            8,
            2_600.0,
            Call::Send {
                task: Expect::Short,
            },
        ),
        Event::Complete {
            op: 8,
            t: 2_601.0,
            outcome: Outcome::Fail,
            ids: vec![],
            status: None,
            error: Some("connection refused".into()),
            answer: Value::Null,
        },
        Event::Resources {
            t0: 3_000.0,
            t1: 3_001.0,
            resources: vec![ResourceSeen {
                name: C0.into(),
                version: 3,
                holders: vec![],
            }],
        },
    ];
    for t in final_tasks() {
        h.push(Event::Feed {
            t: 3_100.0,
            task: t,
        });
    }
    h.push(Event::Final {
        t: 4_000.0,
        tasks: final_tasks(),
        resources: vec![FinalResource {
            name: C0.into(),
            version: 3,
            value: json!({"sum": 5, "log": [[11, 1, 2, 1], [12, 2, 3, 3]]}),
        }],
        nodes: vec![node(0, 2, 200), node(1, 1, 101)],
    });
    h
}

fn final_mut(
    h: &mut [Event],
) -> (
    &mut Vec<TaskView>,
    &mut Vec<FinalResource>,
    &mut Vec<NodeSeen>,
) {
    match h.last_mut() {
        Some(Event::Final {
            tasks,
            resources,
            nodes,
            ..
        }) => (tasks, resources, nodes),
        _ => unreachable!("the last event is the final state"),
    }
}

fn task_mut(h: &mut [Event], id: TaskId) -> &mut TaskView {
    final_mut(h)
        .0
        .iter_mut()
        .find(|t| t.id == id)
        .expect("task")
}

/// The kinds reported, and the report printed when the assertion fails.
fn expect_only(h: &[Event], kind: AnomalyKind) {
    let r = check(h);
    assert!(r.has(kind), "{kind:?} not reported:\n{r}");
    let others: Vec<_> = r.anomalies.iter().filter(|a| a.kind != kind).collect();
    assert!(others.is_empty(), "more than {kind:?} reported: {others:?}");
}

#[test]
fn a_clean_history_passes_and_is_summarised() {
    let r = check(&clean());
    assert!(r.clean(), "{r}");
    assert_eq!(r.tasks_accepted, 6);
    assert_eq!(r.tasks_final["succeeded"], 4);
    assert_eq!(r.tasks_final["cancelled"], 1);
    assert_eq!(r.commits, 2);
    assert_eq!(r.faults["kill"], 1);
    assert_eq!(r.recovery.median_ms, 800.0);
    assert_eq!(r.operations["send"]["fail"], 1);
    assert_eq!(r.seconds, 3.0);
    let text = r.to_string();
    assert!(text.contains("anomalies: none"), "{text}");
}

#[test]
fn a_history_survives_its_file() {
    let dir = std::env::temp_dir().join(format!("flotilla-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("history.jsonl");
    let rec = crate::chaos::history::Recorder::create(&path).unwrap();
    for e in clean() {
        rec.record(&e);
    }
    drop(rec);
    let back = crate::chaos::history::read(&path).unwrap();
    assert_eq!(back, clean());
    std::fs::write(&path, "{\"type\": \"meta\"}\n").unwrap();
    let err = crate::chaos::history::read(&path).unwrap_err();
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_lost_task_is_reported() {
    let mut h = clean();
    final_mut(&mut h).0.retain(|t| t.id != 10);
    h.retain(|e| !matches!(e, Event::Feed { task, .. } if task.id == 10));
    expect_only(&h, AnomalyKind::NotExactlyOneResult);
}

#[test]
fn a_task_unfinished_at_the_end_is_reported() {
    let mut h = clean();
    let t = task_mut(&mut h, 14);
    t.state = TaskState::Queued;
    t.result = None;
    h.retain(|e| !matches!(e, Event::Feed { task, .. } if task.id == 14));
    expect_only(&h, AnomalyKind::NotExactlyOneResult);
}

#[test]
fn a_task_finished_twice_is_reported() {
    let mut h = clean();
    let again = final_tasks().remove(0);
    h.insert(
        h.len() - 1,
        Event::Feed {
            t: 3_500.0,
            task: again,
        },
    );
    expect_only(&h, AnomalyKind::NotExactlyOneResult);
}

#[test]
fn a_result_taken_back_is_reported() {
    // The feed showed one result; after a restart the master has another.
    let mut h = clean();
    task_mut(&mut h, 14).result.as_mut().unwrap().stdout = "again".into();
    expect_only(&h, AnomalyKind::NotExactlyOneResult);
}

#[test]
fn a_result_from_a_revoked_attempt_is_reported() {
    // Task 12's first attempt (on worker 0 before the kill) reported after
    // its second attempt had started: the master must have refused it.
    let stale = json!({"op": 4, "i": 0, "attempt": 1, "node": 1, "holds": []});
    let mut h = clean();
    for e in h.iter_mut() {
        if let Event::Feed { task, .. } = e {
            if task.id == 12 {
                task.result.as_mut().unwrap().response = stale.clone();
            }
        }
    }
    task_mut(&mut h, 12).result.as_mut().unwrap().response = stale;
    // Its hold vanished with the response: the ledger entry is then a
    // commit the checker cannot tie to a finished attempt, which is fine.
    expect_only(&h, AnomalyKind::RevokedAttemptResult);
}

#[test]
fn a_counter_off_its_commits_is_reported() {
    let mut h = clean();
    final_mut(&mut h).1[0].value["sum"] = json!(6);
    expect_only(&h, AnomalyKind::CounterMismatch);
}

#[test]
fn a_doubled_commit_is_reported() {
    let mut h = clean();
    final_mut(&mut h).1[0].value =
        json!({"sum": 8, "log": [[11, 1, 2, 1], [12, 2, 3, 3], [12, 2, 3, 4]]});
    final_mut(&mut h).1[0].version = 4;
    expect_only(&h, AnomalyKind::CounterMismatch);
}

#[test]
fn a_lost_commit_is_reported() {
    // Task 11 committed under token 1 and finished; its write is gone
    // (say, a restart restored an older value).
    let mut h = clean();
    final_mut(&mut h).1[0].value = json!({"sum": 3, "log": [[12, 2, 3, 3]]});
    expect_only(&h, AnomalyKind::CounterMismatch);
}

#[test]
fn a_version_going_backwards_is_reported() {
    let mut h = clean();
    h.insert(
        h.len() - 1,
        Event::Resources {
            t0: 3_500.0,
            t1: 3_501.0,
            resources: vec![ResourceSeen {
                name: C0.into(),
                version: 1,
                holders: vec![],
            }],
        },
    );
    expect_only(&h, AnomalyKind::VersionBackwards);
}

#[test]
fn a_stale_write_in_the_ledger_is_reported() {
    // A commit under token 2 after one under token 3: a fenced writer's
    // write went through.
    let mut h = clean();
    final_mut(&mut h).1[0].value =
        json!({"sum": 8, "log": [[11, 1, 2, 1], [12, 2, 3, 3], [12, 1, 3, 2]]});
    expect_only(&h, AnomalyKind::VersionBackwards);
}

#[test]
fn two_writers_at_once_are_reported() {
    // From the tasks' own holds: task 12 held the write lock while task 11 did.
    let mut h = clean();
    let overlapping = json!({"op": 4, "i": 0, "attempt": 2, "node": 0, "holds": [write_hold(3, 1_350.0, 1_450.0)]});
    for e in h.iter_mut() {
        if let Event::Feed { task, .. } = e {
            if task.id == 12 {
                task.result.as_mut().unwrap().response = overlapping.clone();
            }
        }
    }
    task_mut(&mut h, 12).result.as_mut().unwrap().response = overlapping;
    expect_only(&h, AnomalyKind::TwoWriters);

    // From the master's own holder list.
    let mut h = clean();
    let holder = |task| Holder {
        mode: LockMode::Write,
        owner: Owner {
            worker: 0,
            incarnation: 1,
            task,
            attempt: 1,
        },
    };
    h.insert(
        5,
        Event::Resources {
            t0: 1_300.0,
            t1: 1_301.0,
            resources: vec![ResourceSeen {
                name: C0.into(),
                version: 1,
                holders: vec![holder(11), holder(12)],
            }],
        },
    );
    expect_only(&h, AnomalyKind::TwoWriters);
}

#[test]
fn a_reader_beside_a_writer_is_reported() {
    // Task 16 read the counter while task 11 held its write lock.
    let mut h = clean();
    let reads = Expect::Locks {
        writes: vec![],
        reads: vec![C0.into()],
        delta: 1,
    };
    let reader = view(
        16,
        TaskState::Succeeded,
        0,
        1,
        json!({"op": 9, "i": 0, "attempt": 1, "node": 0,
               "holds": [{"r": C0, "m": "r", "v": 1, "t0": 1_380.0, "t1": 1_390.0, "consistent": true}]}),
    );
    let at = h.len() - 1;
    h.insert(
        at,
        Event::Feed {
            t: 3_200.0,
            task: reader.clone(),
        },
    );
    h.insert(at, ok(9, 1_011.0, vec![16]));
    h.insert(at, call(9, 1_010.0, Call::Send { task: reads }));
    final_mut(&mut h).0.push(reader);
    expect_only(&h, AnomalyKind::ReaderAndWriter);
}

#[test]
fn a_reused_task_id_is_reported() {
    let mut h = clean();
    let at = h.len() - 1;
    h.insert(at, ok(20, 3_011.0, vec![10]));
    h.insert(
        at,
        call(
            20,
            3_010.0,
            Call::Send {
                task: Expect::Short,
            },
        ),
    );
    expect_only(&h, AnomalyKind::TaskIdReused);
}

#[test]
fn a_duplicated_worker_is_reported() {
    // Listed twice at once.
    let mut h = clean();
    final_mut(&mut h).2.push(node(1, 1, 101));
    expect_only(&h, AnomalyKind::WorkerIdDuplicated);

    // One incarnation, two processes.
    let mut h = clean();
    final_mut(&mut h).2[1] = node(1, 1, 999);
    expect_only(&h, AnomalyKind::WorkerIdDuplicated);

    // An incarnation handed out again after a newer one.
    let mut h = clean();
    final_mut(&mut h).2[0] = node(0, 1, 300);
    expect_only(&h, AnomalyKind::WorkerIdDuplicated);

    // /add gave an ID a worker already had.
    let mut h = clean();
    h.insert(
        h.len() - 1,
        Event::Fault {
            index: 1,
            kind: FaultKind::Add,
            t: 3_050.0,
            target: None,
            detail: "added worker 1".into(),
            added: Some(1),
        },
    );
    expect_only(&h, AnomalyKind::WorkerIdDuplicated);
}

#[test]
fn a_wrong_outcome_is_reported() {
    // The task that raises succeeded.
    let mut h = clean();
    let t = task_mut(&mut h, 13);
    t.state = TaskState::Succeeded;
    t.error = None;
    for e in h.iter_mut() {
        if let Event::Feed { task, .. } = e {
            if task.id == 13 {
                task.state = TaskState::Succeeded;
                task.error = None;
            }
        }
    }
    expect_only(&h, AnomalyKind::WrongOutcome);

    // A task that must succeed failed (not as poison).
    let mut h = clean();
    let fail = |t: &mut TaskView| {
        t.state = TaskState::Failed;
        t.result = None;
        t.error = Some("ResourceError: the grant was revoked".into());
    };
    fail(task_mut(&mut h, 10));
    for e in h.iter_mut() {
        if let Event::Feed { task, .. } = e {
            if task.id == 10 {
                fail(task);
            }
        }
    }
    expect_only(&h, AnomalyKind::WrongOutcome);
}

#[test]
fn a_poisoned_task_is_no_anomaly() {
    // Every attempt lost to a fault: failed as poison is an allowed end.
    let mut h = clean();
    let poison = |t: &mut TaskView| {
        t.state = TaskState::Failed;
        t.result = None;
        t.error = Some(
            "gave up after 10 attempts, each of which killed its interpreter or worker: ...".into(),
        );
    };
    poison(task_mut(&mut h, 10));
    for e in h.iter_mut() {
        if let Event::Feed { task, .. } = e {
            if task.id == 10 {
                poison(task);
            }
        }
    }
    let r = check(&h);
    assert!(r.clean(), "{r}");
    assert_eq!(r.tasks_poisoned, 1);
}

#[test]
fn a_phantom_task_is_reported() {
    // The master ran op 8's task, though it refused op 8.
    let mut h = clean();
    final_mut(&mut h).0.push(view(
        99,
        TaskState::Succeeded,
        0,
        1,
        json!({"op": 8, "i": 0, "attempt": 1, "node": 0}),
    ));
    expect_only(&h, AnomalyKind::PhantomTask);
}

#[test]
fn a_history_without_an_end_is_reported() {
    let mut h = clean();
    h.pop();
    expect_only(&h, AnomalyKind::NotExactlyOneResult);
}
