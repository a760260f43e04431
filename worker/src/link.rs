//! The worker's link to its master: when the master last answered, and how
//! long the worker goes on without one (`spec.masterGraceSeconds`, told at
//! registration). While the master is away (killed, restarting) the worker
//! keeps running its tasks and retrying its calls; the next master adopts
//! it. Past the grace period it stops by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The grace period when the master says none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

pub struct MasterLink {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last answer from the master.
    heard: AtomicU64,
    grace_ms: AtomicU64,
}

impl Default for MasterLink {
    fn default() -> Self {
        MasterLink {
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
            grace_ms: AtomicU64::new(DEFAULT_GRACE.as_millis() as u64),
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

    /// No master for longer than the grace period.
    pub fn lost(&self) -> bool {
        self.silent_for() > self.grace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
