//! The worker's link to its master: when the master last answered, and how
//! long the worker goes on without one (`spec.masterGraceSeconds`, told at
//! registration). While the master is away (killed, restarting) the worker
//! keeps running its tasks and retrying its calls; the next master adopts
//! it. Past the grace period it stops by itself.
//!
//! With a durable master a slot keeps each small report after sending it
//! and sends it again with its next poll ([`Kept`]): the master answers a
//! poll without waiting for the sync of the report it carries, and any
//! answer to the next poll means that report is durable. If the master
//! died before that sync, the next master finds the report in that next
//! poll (after it registered the worker again) and records it then.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flotilla_proto::TaskReport;
use std::time::{Duration, Instant};

/// The grace period when the master says none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

pub struct MasterLink {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last answer from the master.
    heard: AtomicU64,
    grace_ms: AtomicU64,
    /// The master takes kept reports (it said so at registration).
    keep_reports: AtomicBool,
}

impl Default for MasterLink {
    fn default() -> Self {
        MasterLink {
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
            grace_ms: AtomicU64::new(DEFAULT_GRACE.as_millis() as u64),
            keep_reports: AtomicBool::new(false),
        }
    }
}

impl MasterLink {
    /// The master answered (whatever it said).
    pub fn heard(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.heard.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since the master last answered.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.heard.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(Ordering::Relaxed))
    }

    pub fn set_grace(&self, grace: Duration) {
        self.grace_ms
            .store(grace.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn set_keep_reports(&self, keep: bool) {
        self.keep_reports.store(keep, Ordering::Relaxed);
    }

    pub fn keeps_reports(&self) -> bool {
        self.keep_reports.load(Ordering::Relaxed)
    }

    /// No master for longer than the grace period.
    pub fn lost(&self) -> bool {
        self.silent_for() > self.grace()
    }
}

/// One slot's reports on their way to durability: the one the next poll
/// carries, and the one the last answered poll carried and kept.
#[derive(Default)]
pub struct Kept {
    /// Sent again with every poll until one is answered.
    pub kept: Option<TaskReport>,
}

impl Kept {
    /// A poll carrying `report` (kept by the worker when `keeps`) was
    /// answered: the report kept before it is durable and forgotten; this
    /// one is kept in its place until the next answer.
    pub fn answered(&mut self, report: Option<TaskReport>, keeps: bool) {
        self.kept = if keeps { report } else { None };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Outcome, TaskResult};

    fn report(task: u64) -> TaskReport {
        TaskReport {
            task_id: task,
            attempt: 1,
            outcome: Outcome::Succeeded {
                result: TaskResult::default(),
            },
        }
    }

    #[test]
    fn a_kept_report_is_forgotten_only_when_the_next_poll_is_answered() {
        let mut k = Kept::default();
        k.answered(Some(report(1)), true);
        assert_eq!(k.kept.as_ref().map(|r| r.task_id), Some(1));
        // The next poll carries report 2 and kept 1; answered: 1 is durable.
        k.answered(Some(report(2)), true);
        assert_eq!(k.kept.as_ref().map(|r| r.task_id), Some(2));
        // An empty poll answered: 2 is durable, nothing left.
        k.answered(None, true);
        assert!(k.kept.is_none());
        // A report the master confirmed before answering is not kept.
        k.answered(Some(report(3)), false);
        assert!(k.kept.is_none());
    }

    #[test]
    fn lost_only_after_the_grace_period_without_an_answer() {
        let link = MasterLink::default();
        link.set_grace(Duration::from_millis(50));
        link.heard();
        assert!(!link.lost());
        std::thread::sleep(Duration::from_millis(80));
        assert!(link.lost());
        link.heard();
        assert!(!link.lost(), "an answer starts the grace period again");
        assert!(link.silent_for() < Duration::from_millis(50));
    }
}
