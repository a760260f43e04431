//! Shell tasks: `sh -c COMMAND` as the leader of its own process group,
//! stdout and stderr captured up to the output limit, exit code kept. When
//! the command ends (or its task is cancelled or times out: the future is
//! dropped) the whole group is killed, so a `cmd &` does not outlive it.

use std::process::Stdio;
use std::time::Duration;

use flotilla_proto::{Outcome, TaskResult};
use serde_json::Value;
use tokio::process::Command;

use crate::cleanup::Cleaner;
use crate::limits::{Capped, Limits};

/// How long the output of processes that outlived `sh` (they hold its
/// pipes) is still read after `sh` ended and its group was killed.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Kills the group however the task ends.
struct Group<'a> {
    pgid: i32,
    cleaner: &'a Cleaner,
    slot: u32,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if self.pgid > 0 {
            flotilla_proto::reap::kill_group(self.pgid);
        }
        self.cleaner.shell_gone(self.slot);
    }
}

/// `env` reaches the command's environment: its task ID, attempt number
/// and tag. `door`, the task's end of its lock door
/// ([`crate::lockdoor`]), is inherited by the command, so that
/// `flotilla-worker lock ...` can take locks as this task attempt.
pub async fn run(
    command: &str,
    env: &[(&str, String)],
    limits: &Limits,
    cleaner: &Cleaner,
    slot: u32,
    door: Option<&std::os::fd::OwnedFd>,
) -> Outcome {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::die_with_parent(&mut cmd);
    if let Some(door) = door {
        crate::lockdoor::inherit(&mut cmd, door);
    }
    let mut child = match cleaner.spawn_shell(slot, &mut cmd) {
        Ok(child) => child,
        Err(e) => {
            return Outcome::Crashed {
                error: format!("cannot start `sh -c`: {e}"),
                stdout: String::new(),
            }
        }
    };
    let group = Group {
        pgid: child.id().map(|p| p as i32).unwrap_or(0),
        cleaner,
        slot,
    };
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let mut out = Capped::new(limits.output);
    let mut err = Capped::new(limits.output);
    let status = {
        let reading = async {
            tokio::join!(out.read_from(&mut out_pipe), err.read_from(&mut err_pipe));
        };
        tokio::pin!(reading);
        let mut read_all = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = &mut reading, if !read_all => read_all = true,
            }
        };
        // sh is done: so is everything it left in its group.
        flotilla_proto::reap::kill_group(group.pgid);
        if !read_all {
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut reading).await;
        }
        status
    };
    drop(group);
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Crashed {
                error: format!("cannot wait for `sh -c`: {e}"),
                stdout: out.text(),
            }
        }
    };
    let stdout = out.text();
    let exit_code = status.code();
    let result = TaskResult {
        response: Value::String(stdout.clone()),
        stdout,
        exit_code: Some(exit_code.unwrap_or(-1)),
        stderr: Some(err.text()),
    };
    match exit_code {
        Some(0) => Outcome::Succeeded { result },
        Some(code) => Outcome::Failed {
            result,
            error: format!("shell command exited with code {code}"),
        },
        None => {
            use std::os::unix::process::ExitStatusExt;
            let sig = status.signal().unwrap_or(0);
            Outcome::Failed {
                result,
                error: format!("shell command was killed by signal {sig}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(tag: &str) -> Vec<i32> {
        flotilla_proto::reap::snapshot()
            .into_iter()
            .filter(|p| !p.zombie)
            .filter(|p| {
                flotilla_proto::reap::env_var(p.pid, crate::cleanup::TAG_ENV).as_deref()
                    == Some(tag)
            })
            .map(|p| p.pid)
            .collect()
    }

    #[tokio::test]
    async fn output_is_capped_and_the_group_ends_with_the_command() {
        let _serial = crate::cleanup::TEST_PROCESSES.lock().await;
        let cleaner = Cleaner::new(1);
        let limits = Limits {
            output: 1000,
            result: 10_000,
        };
        let env = [(crate::cleanup::TAG_ENV, "shell-test-1".to_string())];
        let started = std::time::Instant::now();
        let outcome = run(
            "head -c 600000 /dev/zero | tr '\\0' x; head -c 5000 /dev/zero >&2; sleep 300 & echo",
            &env,
            &limits,
            &cleaner,
            0,
            None,
        )
        .await;
        // The background sleep holds the pipes, but the task ends with sh.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let Outcome::Succeeded { result } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(result.stdout.starts_with(&"x".repeat(1000)));
        assert!(
            result.stdout.ends_with("599001 more bytes dropped]"),
            "{}",
            &result.stdout[1000..]
        );
        assert_eq!(result.response, Value::String(result.stdout.clone()));
        assert!(result.stderr.unwrap().ends_with("4000 more bytes dropped]"));
        assert!(
            tagged("shell-test-1").is_empty(),
            "the background sleep was killed"
        );
    }

    #[tokio::test]
    async fn a_process_that_escapes_with_setsid_is_swept() {
        let _serial = crate::cleanup::TEST_PROCESSES.lock().await;
        flotilla_proto::reap::become_subreaper().unwrap();
        let cleaner = Cleaner::new(1);
        let limits = Limits::default();
        cleaner.task_started(0, "shell-test-2");
        let env = [(crate::cleanup::TAG_ENV, "shell-test-2".to_string())];
        let outcome = run(
            "setsid sh -c 'sleep 300 & sleep 301 &' ; sleep 0.2",
            &env,
            &limits,
            &cleaner,
            0,
            None,
        )
        .await;
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(tagged("shell-test-2").len(), 2, "escaped the group");
        // While the task counts as running, its processes are left alone.
        assert_eq!(cleaner.sweep(), 0);
        cleaner.task_ended(0);
        assert_eq!(cleaner.sweep(), 2);
        assert!(tagged("shell-test-2").is_empty());
    }
}
