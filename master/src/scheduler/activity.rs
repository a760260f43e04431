//! What the scheduler did recently, kept for the dashboard: a revision
//! number that every transition moves, the last attempts that ended (the
//! task stream's bars) and the last notable events (steals, restarts,
//! retries, deaths, lock grants). Both are bounded rings with sequence
//! numbers, so a reader asks for what came after the last one it saw and the
//! memory they take never grows with the number of tasks.

use std::collections::VecDeque;

use flotilla_proto::{Attempt, TaskId, WorkerId};
use serde::Serialize;

/// The most ended attempts kept (the task stream's window).
pub const BAR_RING: usize = 20_000;
/// The most events kept.
pub const EVENT_RING: usize = 1_000;

/// How an attempt ended, as the task stream colours it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BarOutcome {
    Succeeded,
    Failed,
    /// The interpreter or worker died under it (it may be retried).
    Crashed,
    /// Taken off its slot by a cancel.
    Cancelled,
    /// Its worker was declared dead, or the hand-off was lost.
    Lost,
}

/// One ended attempt: a bar of the task stream.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bar {
    pub seq: u64,
    pub task: TaskId,
    pub attempt: Attempt,
    pub worker: WorkerId,
    pub slot: u32,
    /// Unix milliseconds.
    pub started_at: u64,
    pub ended_at: u64,
    pub outcome: BarOutcome,
}

/// What kind of thing happened (the event log's filter and colour).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Steal,
    Retry,
    Dead,
    MissedHeartbeat,
    Restart,
    Registered,
    Added,
    Cancel,
    LockGrant,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub seq: u64,
    /// Unix milliseconds.
    pub at: u64,
    pub kind: EventKind,
    pub worker: Option<WorkerId>,
    pub task: Option<TaskId>,
    pub text: String,
}

/// A bounded ring of items with increasing sequence numbers.
struct Ring<T> {
    items: VecDeque<T>,
    next: u64,
    cap: usize,
}

impl<T: Clone> Ring<T> {
    fn new(cap: usize) -> Self {
        Ring {
            items: VecDeque::new(),
            next: 1,
            cap,
        }
    }

    fn push(&mut self, make: impl FnOnce(u64) -> T) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        let seq = self.next;
        self.next += 1;
        self.items.push_back(make(seq));
    }

    /// The items with a sequence number above `after`, at most the last
    /// `limit` of them, and the last sequence number handed out.
    fn after(&self, after: u64, limit: usize) -> (Vec<T>, u64) {
        let last = self.next - 1;
        let first_kept = self.next - self.items.len() as u64;
        let skip = after.saturating_add(1).saturating_sub(first_kept) as usize;
        let fresh = self.items.len().saturating_sub(skip);
        let take = fresh.min(limit);
        let start = self.items.len() - take;
        (self.items.range(start..).cloned().collect(), last)
    }
}

pub struct Activity {
    revision: u64,
    bars: Ring<Bar>,
    events: Ring<Event>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            revision: 0,
            bars: Ring::new(BAR_RING),
            events: Ring::new(EVENT_RING),
        }
    }
}

impl Activity {
    /// Moves with every transition: a reader that saw this number has seen
    /// everything up to it.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn touch(&mut self) {
        self.revision += 1;
    }

    #[allow(clippy::too_many_arguments)]
    pub fn bar(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        worker: WorkerId,
        slot: u32,
        started_at: u64,
        ended_at: u64,
        outcome: BarOutcome,
    ) {
        self.touch();
        self.bars.push(|seq| Bar {
            seq,
            task,
            attempt,
            worker,
            slot,
            started_at,
            ended_at,
            outcome,
        });
    }

    pub fn event(
        &mut self,
        kind: EventKind,
        worker: Option<WorkerId>,
        task: Option<TaskId>,
        text: String,
    ) {
        self.touch();
        let at = super::unix_ms();
        self.events.push(|seq| Event {
            seq,
            at,
            kind,
            worker,
            task,
            text,
        });
    }

    /// Bars that ended after `after` (at most the last `limit`), and the
    /// last bar's sequence number.
    pub fn bars_after(&self, after: u64, limit: usize) -> (Vec<Bar>, u64) {
        self.bars.after(after, limit)
    }

    /// Events after `after` (at most the last `limit`), and the last
    /// event's sequence number.
    pub fn events_after(&self, after: u64, limit: usize) -> (Vec<Event>, u64) {
        self.events.after(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_hands_out_what_came_after_a_position_within_its_bounds() {
        let mut r: Ring<u64> = Ring::new(3);
        assert_eq!(r.after(0, 10), (vec![], 0));
        for _ in 0..5 {
            r.push(|seq| seq * 10);
        }
        // 1 and 2 fell off the front; 3, 4, 5 are kept.
        assert_eq!(r.after(0, 10), (vec![30, 40, 50], 5));
        assert_eq!(r.after(3, 10), (vec![40, 50], 5));
        assert_eq!(r.after(5, 10), (vec![], 5));
        // A reader past the end (another master's numbers) gets nothing.
        assert_eq!(r.after(99, 10), (vec![], 5));
        // The limit keeps the newest.
        assert_eq!(r.after(0, 2), (vec![40, 50], 5));
    }

    #[test]
    fn bars_and_events_move_the_revision() {
        let mut a = Activity::default();
        let r0 = a.revision();
        a.bar(1, 1, 0, 0, 10, 20, BarOutcome::Succeeded);
        a.event(EventKind::Steal, Some(1), Some(1), "stolen".into());
        assert!(a.revision() >= r0 + 2);
        let (bars, last) = a.bars_after(0, 10);
        assert_eq!((bars.len(), last, bars[0].task), (1, 1, 1));
        let (events, last) = a.events_after(0, 10);
        assert_eq!(
            (events.len(), last, events[0].kind),
            (1, 1, EventKind::Steal)
        );
    }
}
