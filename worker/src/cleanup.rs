//! Every process a task starts ends with the task.
//!
//! The first line is process groups: each slot's interpreter and each shell
//! command lead their own group, killed as a whole when a task is cancelled
//! or times out (and, for shell commands, whenever the command ends). The
//! second line catches processes that leave the group (`setsid`, a double
//! fork): the worker is a child subreaper, so such a process stays its
//! descendant whatever happens to its parents. Every task's processes carry
//! `FLOTILLA_TASK_TAG` in their environment (the runner sets it per task,
//! shell commands get it at start). After each task a *sweep* reads the
//! process table and kills every descendant of the worker that belongs to no
//! running task:
//! - a child of a slot's interpreter whose tag is not the slot's running
//!   task (one the task left behind; untagged ones only when the slot is idle),
//! - a process re-parented to the worker whose tag names no running task.
//!
//! It also reaps re-parented processes that ended by themselves. A process
//! that both escapes and clears its environment is taken for a leftover at
//! the next sweep, whichever task started it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::reap;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tracing::{debug, info};

pub const TAG_ENV: &str = "FLOTILLA_TASK_TAG";

#[derive(Clone, Debug, Default)]
struct SlotProcs {
    interpreter: Option<i32>,
    shell: Option<i32>,
    /// The running task's tag.
    tag: Option<String>,
}

#[derive(Default)]
pub struct Cleaner {
    slots: Mutex<Vec<SlotProcs>>,
    /// Warm interpreters no slot uses yet (the worker's standby).
    spares: Mutex<Vec<i32>>,
    wake: Notify,
}

impl Cleaner {
    pub fn new(slots: u32) -> Arc<Self> {
        Arc::new(Cleaner {
            slots: Mutex::new(vec![SlotProcs::default(); slots as usize]),
            spares: Mutex::new(Vec::new()),
            wake: Notify::new(),
        })
    }

    fn with_slot<R>(&self, slot: u32, f: impl FnOnce(&mut SlotProcs) -> R) -> R {
        let mut slots = self.slots.lock().expect("cleaner lock");
        f(&mut slots[slot as usize])
    }

    /// Spawns the interpreter of `slot` (`None`: a spare) and records it in
    /// one step, so that a sweep never sees it unrecorded.
    pub fn spawn_interpreter(
        &self,
        slot: Option<u32>,
        cmd: &mut Command,
    ) -> std::io::Result<Child> {
        let mut slots = self.slots.lock().expect("cleaner lock");
        let mut spares = self.spares.lock().expect("cleaner lock");
        let child = cmd.spawn()?;
        let pid = child.id().map(|p| p as i32);
        match slot {
            Some(slot) => slots[slot as usize].interpreter = pid,
            None => spares.extend(pid),
        }
        Ok(child)
    }

    /// A spare interpreter now serves `slot`.
    pub fn adopt_spare(&self, slot: u32, pid: i32) {
        let mut slots = self.slots.lock().expect("cleaner lock");
        let mut spares = self.spares.lock().expect("cleaner lock");
        spares.retain(|&p| p != pid);
        slots[slot as usize].interpreter = Some(pid);
    }

    /// The interpreter has been waited for.
    pub fn interpreter_gone(&self, slot: Option<u32>, pid: i32) {
        let mut slots = self.slots.lock().expect("cleaner lock");
        let mut spares = self.spares.lock().expect("cleaner lock");
        match slot {
            Some(slot) if slots[slot as usize].interpreter == Some(pid) => {
                slots[slot as usize].interpreter = None
            }
            _ => spares.retain(|&p| p != pid),
        }
        drop((slots, spares));
        self.wake.notify_one();
    }

    /// Spawns a shell task's `sh` and records it.
    pub fn spawn_shell(&self, slot: u32, cmd: &mut Command) -> std::io::Result<Child> {
        self.with_slot(slot, |s| {
            let child = cmd.spawn()?;
            s.shell = child.id().map(|p| p as i32);
            Ok(child)
        })
    }

    /// The shell has been waited for.
    pub fn shell_gone(&self, slot: u32) {
        self.with_slot(slot, |s| s.shell = None);
    }

    pub fn task_started(&self, slot: u32, tag: &str) {
        self.with_slot(slot, |s| s.tag = Some(tag.to_string()));
    }

    /// The slot's task is over: sweep soon.
    pub fn task_ended(&self, slot: u32) {
        self.with_slot(slot, |s| s.tag = None);
        self.wake.notify_one();
    }

    /// Sweeps after each wake-up, and again shortly after (processes that
    /// were forking while they were killed, or re-parented late).
    pub async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            for delay in [0, 100, 400] {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.sweep()).await;
            }
        }
    }

    /// The worker is stopping by itself (no master within its grace
    /// period): every process below it is killed (interpreters, shells,
    /// whatever tasks started, escapees included: the worker is their
    /// subreaper) and reaped. Returns how many were killed.
    pub fn kill_everything(&self) -> usize {
        let me = std::process::id() as i32;
        let mut killed = std::collections::HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        // Until nothing is left below: descendants re-parented to the worker
        // as their parents die are found by the next look.
        while std::time::Instant::now() < deadline {
            let procs = reap::snapshot();
            let kids = reap::children(&procs);
            let below: Vec<i32> = reap::subtree(&kids, me).into_iter().skip(1).collect();
            if below.is_empty() {
                break;
            }
            reap::kill_all(&below);
            killed.extend(below);
            for child in kids.get(&me).into_iter().flatten() {
                reap::reap(child.pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        killed.len()
    }

    /// One sweep; returns how many processes it killed.
    pub fn sweep(&self) -> usize {
        let me = std::process::id() as i32;
        // Only the worker's subtree: what it must judge is all below it.
        let procs = reap::snapshot_below(me);
        let kids = reap::children(&procs);
        // Read after the table: a process in the table that belongs to a
        // task started before it was read, so that task is in here.
        let (slots, spares) = {
            let slots = self.slots.lock().expect("cleaner lock");
            let spares = self.spares.lock().expect("cleaner lock");
            (slots.clone(), spares.clone())
        };
        let running: HashSet<&str> = slots.iter().filter_map(|s| s.tag.as_deref()).collect();
        let mut doomed = Vec::new();
        let mut reapable = Vec::new();
        for child in kids.get(&me).into_iter().flatten() {
            if let Some(slot) = slots.iter().find(|s| s.interpreter == Some(child.pid)) {
                for grandchild in kids.get(&child.pid).into_iter().flatten() {
                    if grandchild.zombie {
                        continue;
                    }
                    let leftover = match reap::env_var(grandchild.pid, TAG_ENV) {
                        Some(tag) => !running.contains(tag.as_str()),
                        None => slot.tag.is_none(),
                    };
                    if leftover {
                        doomed.extend(reap::subtree(&kids, grandchild.pid));
                    }
                }
            } else if slots.iter().any(|s| s.shell == Some(child.pid))
                || spares.contains(&child.pid)
            {
                continue;
            } else if child.zombie {
                reapable.push(child.pid);
            } else {
                let running_task = reap::env_var(child.pid, TAG_ENV)
                    .is_some_and(|tag| running.contains(tag.as_str()));
                if !running_task {
                    reapable.push(child.pid);
                    doomed.extend(reap::subtree(&kids, child.pid));
                }
            }
        }
        if !doomed.is_empty() {
            debug!(?doomed, "sweep");
            info!(
                count = doomed.len(),
                "killing processes left behind by finished tasks"
            );
            reap::kill_all(&doomed);
        }
        for pid in reapable {
            // SIGKILL is delivered at once, but the exit takes a moment.
            for _ in 0..50 {
                if reap::reap(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        debug!(killed = doomed.len(), "sweep done");
        doomed.len()
    }
}

/// Tests that start processes hold this: a sweep in one test must not see
/// another test's interpreters (they are all children of the test binary).
#[cfg(test)]
pub static TEST_PROCESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
