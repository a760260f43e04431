//! Scheduling decisions as pure functions over a read-only view of the
//! workers. No state, no I/O: the scheduler asks, these answer.

use flotilla_proto::WorkerId;

/// What a decision needs to know about one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerView {
    pub id: WorkerId,
    /// Alive (starting or active): may be given work.
    pub eligible: bool,
    /// Tasks held: waiting + running (the seed's queue length).
    pub held: usize,
    pub capacity: usize,
    /// Tasks waiting in its queue, not yet handed over.
    pub waiting: usize,
    /// It has a free execution slot with a poll waiting for work.
    pub idle_slot: bool,
}

impl WorkerView {
    pub fn has_room(&self) -> bool {
        self.eligible && self.held < self.capacity
    }
}

/// Round-robin (S4): starting at `cursor`, the first worker in order that is
/// eligible, has room and is `acceptable`. Returns its index in `workers`.
pub fn round_robin(
    workers: &[WorkerView],
    cursor: usize,
    acceptable: impl Fn(WorkerId) -> bool,
) -> Option<usize> {
    let n = workers.len();
    (0..n)
        .map(|k| (cursor + k) % n)
        .find(|&i| workers[i].has_room() && acceptable(workers[i].id))
}

/// Work stealing (S5): may `thief` take work, and from whom? A thief is an
/// eligible worker with an idle slot and nothing waiting in its own queue; a
/// victim holds more than one task and has at least one still waiting. The
/// busiest victim is chosen (ties: lowest position), and the thief takes its
/// **last** waiting task.
pub fn steal_victim(workers: &[WorkerView], thief: usize) -> Option<usize> {
    let t = &workers[thief];
    if !(t.eligible && t.idle_slot && t.waiting == 0 && t.held < t.capacity) {
        return None;
    }
    workers
        .iter()
        .enumerate()
        .filter(|(i, w)| *i != thief && w.held > 1 && w.waiting > 0)
        .max_by(|(ia, a), (ib, b)| a.held.cmp(&b.held).then(ib.cmp(ia)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(id: WorkerId, held: usize, capacity: usize) -> WorkerView {
        WorkerView {
            id,
            eligible: true,
            held,
            capacity,
            waiting: held.saturating_sub(1),
            idle_slot: held == 0,
        }
    }

    #[test]
    fn seed_test_1_capacities_3_4_5_and_11_tasks_end_as_3_4_4() {
        let mut workers = vec![view(0, 0, 3), view(1, 0, 4), view(2, 0, 5)];
        let mut cursor = 0;
        for _ in 0..11 {
            let i = round_robin(&workers, cursor, |_| true).expect("room");
            workers[i].held += 1;
            cursor = i + 1;
        }
        let held: Vec<_> = workers.iter().map(|w| w.held).collect();
        assert_eq!(held, vec![3, 4, 4]);
    }

    #[test]
    fn round_robin_skips_full_inactive_and_unacceptable_workers() {
        let mut workers = vec![view(0, 3, 3), view(1, 0, 4), view(2, 0, 5)];
        workers[1].eligible = false;
        assert_eq!(round_robin(&workers, 0, |_| true), Some(2));
        assert_eq!(round_robin(&workers, 0, |id| id != 2), None);
        workers[1].eligible = true;
        assert_eq!(round_robin(&workers, 2, |id| id != 2), Some(1));
    }

    #[test]
    fn an_idle_worker_steals_from_the_busiest_queue() {
        let workers = vec![view(0, 5, 5), view(1, 0, 5), view(2, 2, 5)];
        assert_eq!(steal_victim(&workers, 1), Some(0));
        // A busy worker does not steal, and a queue of one is left alone.
        assert_eq!(steal_victim(&workers, 2), None);
        let workers = vec![view(0, 1, 5), view(1, 0, 5)];
        assert_eq!(steal_victim(&workers, 1), None);
    }

    proptest! {
        #[test]
        fn round_robin_only_picks_workers_with_room(
            caps in proptest::collection::vec(1usize..6, 1..8),
            helds in proptest::collection::vec(0usize..7, 8),
            elig in proptest::collection::vec(any::<bool>(), 8),
            cursor in 0usize..20,
        ) {
            let workers: Vec<_> = caps.iter().enumerate().map(|(i, &c)| WorkerView {
                id: i as WorkerId, eligible: elig[i], held: helds[i].min(c), capacity: c,
                waiting: 0, idle_slot: false,
            }).collect();
            match round_robin(&workers, cursor, |_| true) {
                Some(i) => prop_assert!(workers[i].has_room()),
                None => prop_assert!(workers.iter().all(|w| !w.has_room())),
            }
        }

        #[test]
        fn a_victim_always_keeps_at_least_one_task(
            helds in proptest::collection::vec(0usize..6, 2..8),
            thief in 0usize..8,
        ) {
            let workers: Vec<_> = helds.iter().enumerate().map(|(i, &h)| view(i as WorkerId, h, 6)).collect();
            let thief = thief % workers.len();
            if let Some(v) = steal_victim(&workers, thief) {
                prop_assert!(v != thief);
                prop_assert!(workers[v].held >= 2 && workers[v].waiting >= 1);
                prop_assert!(workers[thief].held == 0);
            }
        }
    }
}
