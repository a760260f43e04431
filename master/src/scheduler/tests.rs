use super::*;
use flotilla_proto::TaskKind;
use proptest::prelude::*;
use tokio::sync::oneshot::{self, Receiver};

fn spec(code: &str) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Python,
        command: code.to_string(),
        timeout: None,
    }
}

fn ok(response: i64) -> Outcome {
    Outcome::Succeeded {
        result: TaskResult {
            response: response.into(),
            ..Default::default()
        },
    }
}

/// A scheduler with registered workers of the given capacities.
fn cluster(caps: &[usize]) -> Scheduler {
    let mut s = Scheduler::new(3);
    for &c in caps {
        let (id, inc) = s.add_worker(c);
        s.register(id, inc, c as u32, None, None).unwrap();
    }
    s
}

fn poll(
    s: &mut Scheduler,
    w: WorkerId,
    slot: u32,
    report: Option<TaskReport>,
) -> Receiver<Assignment> {
    let inc = s.worker(w).unwrap().incarnation;
    let (tx, rx) = oneshot::channel();
    s.poll(w, inc, slot, report, tx).unwrap();
    rx
}

fn report(a: &Assignment, outcome: Outcome) -> Option<TaskReport> {
    Some(TaskReport {
        task_id: a.task_id,
        attempt: a.attempt,
        outcome,
    })
}

fn held(s: &Scheduler) -> Vec<usize> {
    s.nodes().iter().map(|n| n.queued + n.running).collect()
}

#[test]
fn seed_test_1_eleven_tasks_on_capacities_3_4_5_end_as_3_4_4() {
    let mut s = cluster(&[3, 4, 5]);
    for _ in 0..11 {
        s.submit(spec("long"));
    }
    assert_eq!(held(&s), vec![3, 4, 4]);
    assert_eq!(s.master_queue_len(), 0);
    // A twelfth and thirteenth: only node 2 has room, then everyone is full.
    s.submit(spec("long"));
    s.submit(spec("long"));
    assert_eq!(held(&s), vec![3, 4, 5]);
    assert_eq!(s.master_queue_len(), 1);
}

#[test]
fn seed_test_5_idle_workers_steal_the_last_waiting_task_from_node_0() {
    let mut s = cluster(&[5, 5, 5, 5, 5]);
    let mut polls: Vec<_> = (0..5).map(|w| poll(&mut s, w, 0, None)).collect();
    for _ in 0..7 {
        s.submit_to(0, spec("fib")).unwrap();
    }
    // Five run at once (one per node), two wait on node 0.
    let running: Vec<_> = polls.iter_mut().map(|rx| rx.try_recv().unwrap()).collect();
    assert_eq!(running.len(), 5);
    assert_eq!(running[0].task_id, 1, "node 0 runs the first task");
    assert_eq!(s.steals(), 4);
    let nodes = s.nodes();
    assert_eq!(nodes[0].queued, 2);
    assert!(nodes[1..].iter().all(|n| n.running == 1 && n.queued == 0));
    // Stolen from the back: node 1 took task 2 (the last waiting when it stole).
    assert_eq!(running[1].task_id, 2);
    // Node 3 finishes and steals again (the last waiting: task 7).
    let mut rx = poll(&mut s, 3, 0, report(&running[3], ok(1)));
    assert_eq!(rx.try_recv().unwrap().task_id, 7);
    assert_eq!(s.steals(), 5);
}

#[test]
fn send_to_a_full_node_is_refused_and_an_unknown_node_too() {
    let mut s = cluster(&[1]);
    s.submit_to(0, spec("a")).unwrap();
    assert_eq!(s.submit_to(0, spec("b")), Err(SubmitError::Full(0)));
    assert_eq!(
        s.submit_to(9, spec("b")),
        Err(SubmitError::UnknownWorker(9))
    );
}

#[test]
fn a_dead_worker_s_tasks_go_to_the_front_of_the_master_queue_in_order() {
    let mut s = cluster(&[3, 1]);
    let mut rx0 = poll(&mut s, 0, 0, None);
    let t: Vec<_> = (0..5).map(|i| s.submit(spec(&format!("t{i}")))).collect();
    // RR: t0->0, t1->1, t2->0, t3->0 (1 full), t4 stays in the master queue.
    assert_eq!(held(&s), vec![3, 1]);
    assert_eq!(rx0.try_recv().unwrap().task_id, t[0]);
    assert!(s.declare_dead(0, 1, "killed", false));
    assert!(
        !s.declare_dead(0, 1, "heartbeat", false),
        "death is decided once"
    );
    let order: Vec<_> = s.master_queue.iter().copied().collect();
    assert_eq!(order, vec![t[0], t[2], t[3], t[4]]);
    assert_eq!(s.task(t[0]).unwrap().attempts, 1);
    let (inc, cap) = s.begin_restart(0).unwrap();
    assert_eq!((inc, cap), (2, 3));
    // The restarted node gets the requeued work first, front of queue first.
    assert_eq!(held(&s), vec![3, 1]);
    assert_eq!(
        s.master_queue.iter().copied().collect::<Vec<_>>(),
        vec![t[4]]
    );
    s.register(0, 2, 1, None, None).unwrap();
    let mut rx0 = poll(&mut s, 0, 0, None);
    assert_eq!(rx0.try_recv().unwrap().task_id, t[0]);
    // Its old incarnation is refused.
    let (tx, _rx) = oneshot::channel();
    assert!(matches!(
        s.poll(0, 1, 0, None, tx),
        Err(Refusal::Stale { .. })
    ));
    assert!(matches!(
        s.heartbeat(0, 1, Instant::now()),
        Err(Refusal::Stale { .. })
    ));
}

#[test]
fn a_late_result_from_a_dead_incarnation_is_not_recorded_twice() {
    let mut s = cluster(&[2, 2]);
    let mut rx0 = poll(&mut s, 0, 0, None);
    let id = s.submit(spec("x"));
    let first = rx0.try_recv().unwrap();
    assert!(s.declare_dead(0, 1, "partitioned", false));
    let mut rx1 = poll(&mut s, 1, 0, None);
    let second = rx1.try_recv().unwrap();
    assert_eq!((second.task_id, second.attempt), (id, 2));
    // The zombie's report: refused at the door (stale incarnation).
    let (tx, _rx) = oneshot::channel();
    let late = TaskReport {
        task_id: id,
        attempt: first.attempt,
        outcome: ok(7),
    };
    assert!(s.poll(0, 1, 0, Some(late), tx).is_err());
    // A stale attempt from a live slot is dropped too.
    let _rx = poll(
        &mut s,
        1,
        1,
        Some(TaskReport {
            task_id: id,
            attempt: 1,
            outcome: ok(8),
        }),
    );
    assert_eq!(s.task(id).unwrap().state, TaskState::Running);
    let _rx = poll(&mut s, 1, 0, report(&second, ok(9)));
    let view = s.task(id).unwrap();
    assert_eq!(view.state, TaskState::Succeeded);
    assert_eq!(view.result.unwrap().response, 9);
    assert_eq!(s.completions_after(0, 10).unwrap().0.len(), 1);
}

#[test]
fn a_crashing_task_is_retried_elsewhere_then_fails_as_poison() {
    let mut s = cluster(&[2, 2, 2]);
    let mut rxs: Vec<_> = (0..3).map(|w| poll(&mut s, w, 0, None)).collect();
    let id = s.submit(spec("exit()"));
    let crash = || Outcome::Crashed {
        error: "exit".into(),
        stdout: String::new(),
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (w, a) = rxs
            .iter_mut()
            .enumerate()
            .find_map(|(w, rx)| rx.try_recv().ok().map(|a| (w, a)))
            .expect("someone runs it");
        assert!(!seen.contains(&w), "retried on a different worker");
        seen.push(w);
        rxs[w] = poll(&mut s, w as WorkerId, 0, report(&a, crash()));
    }
    let view = s.task(id).unwrap();
    assert_eq!(view.state, TaskState::Failed);
    assert_eq!(view.attempts, 3);
    assert!(view.error.unwrap().contains("3 attempts"));
}

#[test]
fn an_undelivered_assignment_goes_back_without_using_an_attempt() {
    let mut s = cluster(&[2]);
    let (tx, mut rx) = oneshot::channel();
    let poll_id = s.poll(0, 1, 0, None, tx).unwrap();
    let id = s.submit(spec("x"));
    let a = rx.try_recv().unwrap();
    s.withdraw_poll(0, 0, poll_id, Some(a));
    let view = s.task(id).unwrap();
    assert_eq!((view.state, view.attempts), (TaskState::Assigned, 0));
    let mut rx = poll(&mut s, 0, 0, None);
    assert_eq!(rx.try_recv().unwrap().attempt, 1);
}

#[test]
fn a_slot_that_polls_without_its_report_had_lost_its_assignment() {
    let mut s = cluster(&[2]);
    let mut rx = poll(&mut s, 0, 0, None);
    let id = s.submit(spec("x"));
    let _lost = rx.try_recv().unwrap();
    let mut rx = poll(&mut s, 0, 0, None);
    let again = rx.try_recv().unwrap();
    assert_eq!((again.task_id, again.attempt), (id, 2));
}

#[derive(Debug, Clone)]
enum Op {
    Submit,
    SubmitTo(u8),
    Poll(u8, bool),
    Kill(u8, bool),
    Restart(u8),
    Add(u8),
    Retire(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Submit),
        1 => (0u8..6).prop_map(Op::SubmitTo),
        4 => (0u8..6, any::<bool>()).prop_map(|(w, c)| Op::Poll(w, c)),
        1 => (0u8..6, any::<bool>()).prop_map(|(w, b)| Op::Kill(w, b)),
        1 => (0u8..6).prop_map(Op::Restart),
        1 => (1u8..4).prop_map(Op::Add),
        1 => (0u8..4).prop_map(Op::Retire),
    ]
}

proptest! {
    /// Whatever happens, every task is in exactly one place, no queue is over
    /// capacity, and a finished task is finished once.
    #[test]
    fn tasks_are_never_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..120)) {
        let mut s = cluster(&[2, 3]);
        let mut pending: HashMap<WorkerId, Receiver<Assignment>> = HashMap::new();
        let mut submitted = 0usize;
        let mut retired = 0usize;
        let mut retired_ended = 0usize;
        for op in ops {
            let n = s.worker_count() as u8;
            match op {
                Op::Submit => { s.submit(spec("x")); submitted += 1; }
                Op::SubmitTo(w) => { if s.submit_to((w % n) as WorkerId, spec("x")).is_ok() { submitted += 1; } }
                Op::Poll(w, crash) => {
                    let w = (w % n) as WorkerId;
                    let wk = s.worker(w).unwrap();
                    if wk.state == WorkerState::Starting { let inc = wk.incarnation; s.register(w, inc, 1, None, None).unwrap(); }
                    if s.worker(w).unwrap().state != WorkerState::Active { continue; }
                    let rep = pending.get_mut(&w).and_then(|rx| rx.try_recv().ok()).map(|a| TaskReport {
                        task_id: a.task_id, attempt: a.attempt,
                        outcome: if crash { Outcome::Crashed { error: "boom".into(), stdout: String::new() } } else { ok(1) },
                    });
                    let rx = poll(&mut s, w, 0, rep);
                    pending.insert(w, rx);
                }
                Op::Kill(w, crash_kill) => {
                    let w = (w % n) as WorkerId;
                    let inc = s.worker(w).unwrap().incarnation;
                    s.declare_dead(w, inc, "killed", crash_kill);
                    pending.remove(&w);
                }
                Op::Restart(w) => { s.begin_restart((w % n) as WorkerId); }
                Op::Add(c) => { s.add_worker(c as usize); }
                Op::Retire(keep) => {
                    let before = s.feed_len();
                    let ended = |s: &Scheduler| -> usize { s.tasks.values().map(|t| t.attempt_log.iter().filter(|a| a.ended_at.is_some()).count()).sum() };
                    let ended_before = ended(&s);
                    let (n, _) = s.retire(&Retire { keep: keep as usize, finished_before: 0, durable_below: u64::MAX, budget: 2 });
                    prop_assert!(n <= 2);
                    prop_assert_eq!(s.feed_len(), before, "the feed keeps its positions");
                    retired += n;
                    retired_ended += ended_before - ended(&s);
                }
            }
            // Invariants.
            let mut seen = std::collections::HashSet::new();
            for &t in &s.master_queue { prop_assert!(seen.insert(t)); prop_assert_eq!(s.tasks[&t].state, TaskState::Queued); }
            for w in &s.workers {
                prop_assert!(w.held() <= w.capacity);
                for &t in &w.waiting { prop_assert!(seen.insert(t)); prop_assert_eq!(s.tasks[&t].state, TaskState::Assigned); prop_assert_eq!(s.tasks[&t].node, Some(w.id)); }
                for &(t, a) in w.running.values() { prop_assert!(seen.insert(t)); prop_assert_eq!(s.tasks[&t].state, TaskState::Running); prop_assert_eq!(s.tasks[&t].attempts, a); }
            }
            let mut finished = std::collections::HashSet::new();
            for &t in &s.completions { prop_assert!(finished.insert(t), "finished twice"); prop_assert!(seen.insert(t)); prop_assert!(s.tasks[&t].state.is_final()); }
            prop_assert_eq!(s.feed_base() as usize, retired);
            prop_assert_eq!(seen.len() + retired, submitted);
            prop_assert_eq!(s.tasks.len() + retired, submitted);
            // The dashboard's counts, kept without a walk, are the walk's.
            prop_assert_eq!(s.state_counts(), s.tasks_by_state());
            // Every attempt that left a slot is a bar of the stream.
            let ended: usize = s.tasks.values().map(|t| t.attempt_log.iter().filter(|a| a.ended_at.is_some()).count()).sum();
            prop_assert_eq!(s.activity.bars_after(0, usize::MAX).0.len(), ended + retired_ended);
        }
    }
}

fn list(
    s: &Scheduler,
    after: TaskId,
    state: Option<TaskState>,
    node: Option<WorkerId>,
    limit: usize,
    scan: usize,
) -> (Vec<TaskView>, Option<TaskId>) {
    let (page, end, more) = s.list_tasks(after, state, node, limit, scan);
    let next = listing_next(&page, |t| t.id, limit, end, more);
    (page, next)
}

#[test]
fn the_task_listing_filters_pages_and_bounds_its_scan() {
    let mut s = cluster(&[1, 1]);
    // Worker 0 runs task 1 to the end; the rest wait in queues.
    let mut rx = poll(&mut s, 0, 0, None);
    let ids: Vec<TaskId> = (0..6).map(|i| s.submit(spec(&format!("{i}")))).collect();
    let a = rx.try_recv().unwrap();
    assert_eq!(a.task_id, ids[0]);
    let _rx = poll(&mut s, 0, 0, report(&a, ok(1)));

    let (all, next) = list(&s, 0, None, None, 100, 1000);
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), ids);
    assert_eq!(next, None, "one page holds everything");

    let (done, _) = list(&s, 0, Some(TaskState::Succeeded), None, 100, 1000);
    assert_eq!(done.iter().map(|t| t.id).collect::<Vec<_>>(), vec![ids[0]]);
    let (on_1, _) = list(&s, 0, None, Some(1), 100, 1000);
    assert!(!on_1.is_empty() && on_1.iter().all(|t| t.node == Some(1)));

    // Pages of two, each continuing after the previous `next`.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (page, next) = list(&s, after, None, None, 2, 1000);
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|t| t.id));
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seen, ids);

    // A bounded scan returns a short (even empty) page with a place to go on from.
    let (page, next) = list(&s, 0, Some(TaskState::Failed), None, 100, 3);
    assert!(page.is_empty());
    assert_eq!(next, Some(3));
    let (page, next) = list(&s, 3, Some(TaskState::Failed), None, 100, 3);
    assert!(page.is_empty());
    assert_eq!(next, None);
}

#[test]
fn a_poll_for_a_slot_the_worker_does_not_have_is_refused() {
    let mut s = Scheduler::new(3);
    let (id, inc) = s.add_worker(4);
    s.register(id, inc, 2, None, None).unwrap();
    let (tx, _rx) = oneshot::channel();
    assert_eq!(
        s.poll(id, inc, 2, None, tx).unwrap_err(),
        Refusal::BadSlot {
            worker: id,
            slot: 2,
            slots: 2
        }
    );
    let (tx, _rx) = oneshot::channel();
    assert!(s.poll(id, inc, 1, None, tx).is_ok());
}

#[test]
fn cancel_takes_a_task_out_wherever_it_is_and_tells_the_worker_to_stop_a_running_one() {
    let mut s = cluster(&[2]);
    s.set_task_timeout(Some(7.0));
    let mut rx = poll(&mut s, 0, 0, None);
    let running = s.submit(spec("spin"));
    let a = rx.try_recv().unwrap();
    assert_eq!(a.task_id, running);
    assert_eq!(a.timeout_s, Some(7.0), "the cluster's default timeout");
    let waiting = s.submit(spec("waits on node 0"));
    let queued = s.submit(spec("master queue"));
    s.submit(spec("master queue too"));
    assert_eq!(s.task(waiting).unwrap().state, TaskState::Assigned);
    assert_eq!(s.task(queued).unwrap().state, TaskState::Queued);
    s.locks
        .create("r", crate::resources::ResourceType::Integer, 0.into())
        .unwrap();
    let (gtx, mut grx) = oneshot::channel();
    s.lock_acquire(&a.lease, "r", LockMode::Write, gtx, false)
        .unwrap();
    assert!(grx.try_recv().is_ok(), "the running task holds r");

    assert_eq!(s.cancel(queued), Ok(TaskState::Queued));
    assert_eq!(s.cancel(waiting), Ok(TaskState::Assigned));
    let (ctx, mut crx) = oneshot::channel();
    assert!(s.take_stops(0, 1, ctx).unwrap().is_empty());
    assert_eq!(s.cancel(running), Ok(TaskState::Running));
    assert!(crx.try_recv().is_ok(), "the control poll is woken");
    let (ctx, _crx) = oneshot::channel();
    let stops = s.take_stops(0, 1, ctx).unwrap();
    assert_eq!(stops.len(), 1);
    assert_eq!((stops[0].task_id, stops[0].attempt), (running, 1));
    for id in [queued, waiting, running] {
        let t = s.task(id).unwrap();
        assert_eq!(t.state, TaskState::Cancelled);
    }
    // Its lock is free and its lease dead: a late write-back is fenced.
    assert_eq!(s.locks.view("r").unwrap().holders.len(), 0);
    assert!(s
        .lock_release(&a.lease, "r", LockMode::Write, None, false)
        .is_err());
    // A late report from the killed attempt is dropped; the slot polls
    // again and gets the next task.
    let mut rx = poll(&mut s, 0, 0, report(&a, ok(1)));
    assert_eq!(s.task(running).unwrap().state, TaskState::Cancelled);
    assert_eq!(rx.try_recv().unwrap().task_id, queued + 1);
    assert_eq!(
        s.cancel(running),
        Err(CancelError::Finished(running, TaskState::Cancelled))
    );
    assert_eq!(s.cancel(999), Err(CancelError::Unknown(999)));
}

/// A master restarted on its store, with worker 0 adopted and worker 1
/// gone: worker 0 keeps its incarnation, its running attempt (same lease)
/// and its write grant (same token), so its release publishes once, and a
/// resent release is answered as done; worker 1 gets the next incarnation,
/// its attempt is lost (the task queued again) and its lease is dead.
#[test]
fn a_restart_keeps_the_attempts_and_grants_of_adopted_workers_only() {
    use crate::resources::ResourceType;
    use crate::store::Store;
    let dir = std::env::temp_dir().join(format!("flotilla-adopt-{:x}", rand::random::<u64>()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secret = "cluster-secret";
    let fresh = |s: &mut Scheduler| {
        s.keep_journal();
        s.set_lease_secret(secret);
        s.add_worker(1);
        s.add_worker(1);
    };

    // The first master: A runs on worker 0 and holds the write lock on r;
    // B runs on worker 1.
    let (store, _) = Store::open(&dir, "c", secret).unwrap();
    let mut s = Scheduler::new(3);
    fresh(&mut s);
    s.locks
        .create("r", ResourceType::Integer, serde_json::json!(0))
        .unwrap();
    for w in 0..2 {
        s.register(w, 1, 1, None, None).unwrap();
        s.set_handle(w, 1, Some(format!("h{w}")));
    }
    s.submit(spec("a"));
    s.submit(spec("b"));
    let a = poll(&mut s, 0, 0, None).try_recv().unwrap();
    let b = poll(&mut s, 1, 0, None).try_recv().unwrap();
    let (gtx, mut grx) = oneshot::channel();
    s.lock_acquire(&a.lease, "r", LockMode::Write, gtx, false)
        .unwrap();
    let grant = grx.try_recv().unwrap();
    assert_eq!(grant.token, 1);
    store.append(s.take_journal());
    rt.block_on(store.flush()).unwrap();
    drop(store);

    // The next master adopts worker 0 only.
    let (store, rec) = Store::open(&dir, "c", "unused").unwrap();
    let mut s = Scheduler::new(3);
    fresh(&mut s);
    for r in &rec.resources {
        s.locks.restore(r).unwrap();
    }
    let adopted = AdoptedWorker {
        id: 0,
        incarnation: 1,
        locator: "pid 1".into(),
        handle: Some("h0".into()),
    };
    s.restore(&rec, &[adopted]);
    assert_eq!(s.worker(0).unwrap().incarnation, 1);
    assert_eq!(s.worker(1).unwrap().incarnation, 2);
    // The adopted worker is warm: one heartbeat timeout to register again
    // (not the start-up grace of worker 1, started afresh).
    let timeout = Duration::from_secs(10);
    let adopted_at = s.workers[0].last_heartbeat;
    assert_eq!(
        s.overdue(adopted_at + timeout + Duration::from_millis(1), timeout)
            .iter()
            .map(|o| o.0)
            .collect::<Vec<_>>(),
        vec![0]
    );
    assert_eq!(s.task(a.task_id).unwrap().state, TaskState::Running);
    // B waits to run again (queued, or already placed in a worker's queue).
    assert!(matches!(
        s.task(b.task_id).unwrap().state,
        TaskState::Queued | TaskState::Assigned
    ));
    let view = s.locks.view("r").unwrap();
    assert_eq!(view.holders.len(), 1, "A's grant is held again");
    assert_eq!(view.holders[0].owner.task, a.task_id);
    // B's attempt is over: its lease is dead.
    assert_eq!(
        s.lock_release(&b.lease, "r", LockMode::Read, None, false),
        Err(LockCallError::StaleLease)
    );
    // A's release, with the lease and token of before, publishes once...
    let publish = Some((serde_json::json!(7), grant.token));
    assert_eq!(
        s.lock_release(&a.lease, "r", LockMode::Write, publish.clone(), false),
        Ok((1, true))
    );
    // ...and the same release resent (its answer lost) is answered as done,
    // not published again, while a plain repeat is refused.
    assert_eq!(
        s.lock_release(&a.lease, "r", LockMode::Write, publish.clone(), true),
        Ok((1, true))
    );
    assert!(s
        .lock_release(&a.lease, "r", LockMode::Write, publish, false)
        .is_err());
    assert_eq!(s.locks.view("r").unwrap().value, serde_json::json!(7));
    // Worker 0 registers again and reports A: recorded once.
    s.register(0, 1, 1, None, None).unwrap();
    let (tx, _rx) = oneshot::channel();
    s.poll(0, 1, 0, report(&a, ok(7)), tx).unwrap();
    assert_eq!(s.task(a.task_id).unwrap().state, TaskState::Succeeded);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn finish_one(s: &mut Scheduler, rx: &mut Receiver<Assignment>, i: u64) -> Receiver<Assignment> {
    let a = rx.try_recv().expect("a task was handed over");
    poll(s, 0, 0, report(&a, ok(i as i64)))
}

#[test]
fn finished_tasks_leave_memory_by_count_and_age_oldest_first_keeping_feed_positions() {
    let mut s = cluster(&[4]);
    let mut rx = poll(&mut s, 0, 0, None);
    let ids: Vec<TaskId> = (0..10).map(|i| s.submit(spec(&format!("{i}")))).collect();
    for i in 0..6 {
        rx = finish_one(&mut s, &mut rx, i);
    }
    assert_eq!(s.finished_in_memory(), 6);
    let rule = |keep, durable_below| Retire {
        keep,
        finished_before: 0,
        durable_below,
        budget: 100,
    };
    // Only what the store has committed may leave.
    assert_eq!(s.retire(&rule(2, 1)), (1, false));
    assert_eq!(s.feed_base(), 1);
    assert!(s.task(ids[0]).is_none() && s.handed_out(ids[0]));
    // By count: the oldest go, the newest `keep` stay; a bounded budget
    // says more are due.
    assert_eq!(
        s.retire(&Retire {
            budget: 2,
            ..rule(2, u64::MAX)
        }),
        (2, true)
    );
    assert_eq!(s.retire(&rule(2, u64::MAX)), (1, false));
    assert_eq!(s.finished_in_memory(), 2);
    assert!(s.task(ids[3]).is_none());
    assert!(s.task(ids[4]).is_some() && s.task(ids[5]).is_some());
    // Unfinished tasks never leave.
    assert!(s.task(ids[9]).is_some());
    // By age: everything finished before the cutoff goes, whatever `keep`.
    let later = unix_ms() + 1000;
    let (n, more) = s.retire(&Retire {
        finished_before: later,
        ..rule(100, u64::MAX)
    });
    assert_eq!((n, more), (2, false));
    assert_eq!(s.finished_in_memory(), 0);
    assert_eq!(s.feed_base(), 6);
    // The feed: positions before the base are not in memory; new entries
    // go on at the next position.
    assert_eq!(s.completions_after(0, 10).unwrap_err(), 6);
    rx = finish_one(&mut s, &mut rx, 6);
    let (page, next) = s.completions_after(6, 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, ids[6]);
    assert_eq!(next, 7);
    drop(rx);
    // An ID never handed out is not taken for one that left.
    assert!(!s.handed_out(ids[9] + 1));
}

#[test]
fn a_kept_report_is_recorded_once_whichever_poll_brings_it() {
    let mut s = cluster(&[1]);
    let mut rx = poll(&mut s, 0, 0, None);
    let id = s.submit(spec("a"));
    let a = rx.try_recv().unwrap();
    // The report comes with the next poll (kept by the worker), and again
    // as `kept` with the one after: recorded once, the second silently
    // ignored, and no task of the slot is taken for lost.
    let (tx, mut rx) = oneshot::channel();
    s.poll_keeping(0, 1, 0, None, report(&a, ok(1)), tx)
        .unwrap();
    assert_eq!(s.task(id).unwrap().state, TaskState::Succeeded);
    let b_id = s.submit(spec("b"));
    let b = rx.try_recv().unwrap();
    let (tx, _rx) = oneshot::channel();
    s.poll_keeping(0, 1, 0, report(&a, ok(2)), report(&b, ok(3)), tx)
        .unwrap();
    assert_eq!(s.completed_total(), 2);
    let (feed, _) = s.completions_after(0, 10).unwrap();
    let ids: Vec<_> = feed.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![id, b_id]);
    assert_eq!(feed[0].result.as_ref().unwrap().response, 1);
    assert_eq!(s.task(b_id).unwrap().attempts, 1, "b ran once");
}

#[test]
fn a_kept_report_a_restarted_master_lacks_is_recorded_before_the_new_one() {
    // As a master started after a crash sees it: the slot still runs A (its
    // report was never synced); the poll brings B's report (an attempt this
    // master never started: dropped) and A's report as kept (recorded).
    let mut s = cluster(&[1]);
    let mut rx = poll(&mut s, 0, 0, None);
    let id = s.submit(spec("a"));
    let a = rx.try_recv().unwrap();
    let orphan = TaskReport {
        task_id: id + 1,
        attempt: 1,
        outcome: ok(9),
    };
    let (tx, _rx) = oneshot::channel();
    s.poll_keeping(0, 1, 0, report(&a, ok(1)), Some(orphan), tx)
        .unwrap();
    let t = s.task(id).unwrap();
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(t.attempts, 1, "not taken for lost in transit");
    assert_eq!(s.completed_total(), 1);
}

#[test]
fn leases_of_the_same_attempt_differ_between_master_incarnations() {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
    let first = derive_lease(&key, 7, 2, 0, 1, 1);
    assert_ne!(first, derive_lease(&key, 7, 2, 0, 1, 2));
    assert_eq!(first, derive_lease(&key, 7, 2, 0, 1, 1));
    // Epoch 0 (a store that did not keep it) derives as before epochs.
    assert_ne!(first, derive_lease(&key, 7, 2, 0, 1, 0));
}

#[test]
fn a_starting_worker_has_the_startup_grace_then_the_heartbeat_timeout() {
    let mut s = Scheduler::new(3);
    let (id, inc) = s.add_worker(2);
    let timeout = Duration::from_secs(10);
    let start = Instant::now();
    // Still warming its interpreters: not overdue after a heartbeat timeout.
    assert!(s.overdue(start + timeout * 2, timeout).is_empty());
    assert_eq!(
        s.next_deadline(timeout),
        Some(s.workers[0].last_heartbeat + STARTUP_GRACE)
    );
    assert_eq!(
        s.overdue(start + STARTUP_GRACE + Duration::from_secs(1), timeout),
        vec![(id, inc, true)]
    );
    // Registered: the heartbeat timeout again.
    s.register(id, inc, 1, None, None).unwrap();
    let registered = s.workers[0].last_heartbeat;
    assert_eq!(s.next_deadline(timeout), Some(registered + timeout));
    assert_eq!(
        s.overdue(registered + timeout, timeout),
        vec![(id, inc, false)]
    );
}
