//! Finding and ending processes a task left behind (Linux).
//!
//! A process that leaves its task's process group (`setsid`) and whose
//! parent exits is re-parented to the nearest *subreaper* ancestor. The
//! worker and the master (process runtime) make themselves subreapers
//! ([`become_subreaper`]), so every such escapee stays their descendant and
//! can be found in `/proc` and ended; they also reap the ones that exit on
//! their own (otherwise they would stay zombies). The policy — which
//! processes belong to a task that is over — is the caller's; this module
//! only reads the process table, kills and reaps.

use std::collections::HashMap;

/// One process of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub zombie: bool,
}

/// The processes of the table, read from `/proc`. Processes that vanish
/// while it is read are left out.
#[cfg(target_os = "linux")]
pub fn snapshot() -> Vec<Proc> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(|p| p.ok())
        .filter_map(|p| p.stat().ok())
        .map(|st| Proc {
            pid: st.pid,
            ppid: st.ppid,
            zombie: st.state == 'Z',
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
pub fn snapshot() -> Vec<Proc> {
    Vec::new()
}

/// The descendants of `root` (not `root` itself), found by walking the
/// kernel's per-thread `children` lists down from it, so that the cost is
/// that of the subtree, not of every process on the host (a worker's sweep
/// on a host running hundreds of processes read them all after each task).
/// Like the whole table, a process forking or exiting meanwhile may be
/// missed and is seen by the next look. Without `children` lists (a kernel
/// built without them): the whole table.
#[cfg(target_os = "linux")]
pub fn snapshot_below(root: i32) -> Vec<Proc> {
    if std::fs::metadata(format!("/proc/{root}/task/{root}/children")).is_err() {
        return snapshot();
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    let mut seen: std::collections::HashSet<i32> = [root].into();
    while let Some(pid) = todo.pop() {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in threads.flatten() {
            let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for child in list
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if !seen.insert(child) {
                    continue;
                }
                let Ok(st) = procfs::process::Process::new(child).and_then(|p| p.stat()) else {
                    continue;
                };
                out.push(Proc {
                    pid: st.pid,
                    ppid: st.ppid,
                    zombie: st.state == 'Z',
                });
                todo.push(child);
            }
        }
    }
    out
}

#[cfg(not(target_os = "linux"))]
pub fn snapshot_below(_root: i32) -> Vec<Proc> {
    Vec::new()
}

/// Children of each process.
pub fn children(procs: &[Proc]) -> HashMap<i32, Vec<&Proc>> {
    let mut map: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in procs {
        map.entry(p.ppid).or_default().push(p);
    }
    map
}

/// `root` and all its descendants, parents before children.
pub fn subtree(kids: &HashMap<i32, Vec<&Proc>>, root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut seen: std::collections::HashSet<i32> = [root].into();
    let mut i = 0;
    while i < out.len() {
        for c in kids.get(&out[i]).into_iter().flatten() {
            if seen.insert(c.pid) {
                out.push(c.pid);
            }
        }
        i += 1;
    }
    out
}

/// One variable of a process's initial environment (`/proc/PID/environ`).
/// `None` also for a process caught inside its `execve`, before the kernel
/// has laid out the new environment.
#[cfg(target_os = "linux")]
pub fn env_var(pid: i32, name: &str) -> Option<String> {
    let env = procfs::process::Process::new(pid).ok()?.environ().ok()?;
    env.get(std::ffi::OsStr::new(name))
        .map(|v| v.to_string_lossy().into_owned())
}

#[cfg(not(target_os = "linux"))]
pub fn env_var(_pid: i32, _name: &str) -> Option<String> {
    None
}

/// When a live process started (clock ticks since boot, field 22 of
/// `/proc/PID/stat`): with its PID, what names it for good, since a PID is
/// reused once its process is gone. `None` when there is no such process or
/// it has ended (a zombie).
#[cfg(target_os = "linux")]
pub fn start_time(pid: i32) -> Option<u64> {
    let st = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    (!matches!(st.state, 'Z' | 'X' | 'x')).then_some(st.starttime)
}

#[cfg(not(target_os = "linux"))]
pub fn start_time(_pid: i32) -> Option<u64> {
    None
}

/// Makes this process the reaper of its orphaned descendants.
#[cfg(target_os = "linux")]
pub fn become_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
pub fn become_subreaper() -> std::io::Result<()> {
    Ok(())
}

/// SIGKILLs each process (parents first, so that they cannot fork more).
pub fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// SIGKILLs a process group.
pub fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Collects the exit status of a child that has ended, if it has.
pub fn reap(pid: i32) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    !matches!(
        waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive) | Err(_)
    )
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_subtree_is_found_without_reading_the_whole_table() {
        // sh -> sleep: a child and a grandchild of this process.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let sh = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let below = loop {
            let below = snapshot_below(me);
            if below.iter().any(|p| p.ppid == sh) || std::time::Instant::now() > deadline {
                break below;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            below.iter().any(|p| p.pid == sh && p.ppid == me),
            "{below:?}"
        );
        let sleep = below.iter().find(|p| p.ppid == sh).expect("the grandchild");
        assert!(!below.iter().any(|p| p.pid == me), "not the root itself");
        // The same subtree as the whole table shows.
        let table = snapshot();
        let kids = children(&table);
        assert!(subtree(&kids, sh).contains(&sleep.pid));
        kill_all(&[sleep.pid, sh]);
        let _ = child.wait();
    }

    #[test]
    fn the_table_shows_a_child_and_its_environment() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("FLOTILLA_REAP_TEST", "here")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let procs = snapshot();
        let kids = children(&procs);
        let pid = child.id() as i32;
        assert!(kids[&me].iter().any(|p| p.pid == pid));
        assert_eq!(subtree(&kids, pid), vec![pid]);
        // `spawn` returns once the child has begun its `execve`, which can be
        // a moment before the kernel has laid out the new image's
        // environment: until then `/proc/PID/environ` reads empty.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = env_var(pid, "FLOTILLA_REAP_TEST");
        while seen.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            seen = env_var(pid, "FLOTILLA_REAP_TEST");
        }
        assert_eq!(seen.as_deref(), Some("here"));
        let started = start_time(pid).expect("a live child has a start time");
        assert_eq!(start_time(pid), Some(started), "it does not change");
        kill_all(&[pid]);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert_eq!(start_time(pid), None, "gone");
    }
}
