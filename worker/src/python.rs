//! The warm Python interpreter: one long-lived `python3` per execution slot.
//!
//! Starting CPython costs tens of milliseconds; a task like `response = 1`
//! costs microseconds. So each slot keeps one interpreter running
//! `runner.py` and hands it tasks over the typed pipe protocol of
//! `flotilla_proto::runner` (one JSON object per line, each line at most
//! [`max_message`] bytes). Each interpreter is the leader of its own process
//! group: a cancel or timeout kills that group alone and the slot starts a
//! fresh interpreter, without touching the other slots. When a task kills
//! the interpreter (it calls `exit()`, segfaults, is OOM-killed), the
//! attempt is reported as crashed and a fresh interpreter is started for
//! the next one.

use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use flotilla_proto::runner::{Ended, FromRunner, RunLimits, ToRunner};
use flotilla_proto::{Outcome, TaskResult, WorkerId};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::cleanup::Cleaner;
use crate::limits::{bound_text, Limits};
use crate::locks::LockProxy;

const RUNNER: &str = include_str!("runner.py");
const BOOTSTRAP: &str =
    "import sys, json; exec(compile(json.loads(sys.stdin.readline()), 'flotilla-runner', 'exec'))";

/// The longest line the runner may send: a result and its output at their
/// limits, JSON-escaped, with room to spare. A longer line is a protocol
/// violation (task code writing to the pipe) and ends the interpreter.
pub fn max_message(limits: &Limits) -> usize {
    (limits.result + 8 * limits.output + (1 << 20)) as usize
}

pub struct Interpreter {
    child: Child,
    pid: i32,
    stdin: ChildStdin,
    lines: FramedRead<ChildStdout, LinesCodec>,
}

impl Interpreter {
    /// Starts an interpreter for `slot` (`None`: a spare), registered with
    /// `cleaner` (so that its sweeps know it is no leftover).
    pub async fn start(
        python: &str,
        worker_id: WorkerId,
        slot: Option<u32>,
        cleaner: &Cleaner,
        limits: &Limits,
    ) -> Result<Self> {
        let mut cmd = Command::new(python);
        // The runner arrives as the first line on stdin (JSON-encoded), so
        // `ps` shows a short command line rather than the whole script.
        cmd.arg("-u")
            .arg("-c")
            .arg(BOOTSTRAP)
            .env("FLOTILLA_WORKER_ID", worker_id.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        crate::die_with_parent(&mut cmd);
        let mut child = cleaner
            .spawn_interpreter(slot, &mut cmd)
            .with_context(|| format!("cannot start the Python interpreter `{python}`"))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut interp = Interpreter {
            child,
            pid,
            stdin,
            lines: FramedRead::new(stdout, LinesCodec::new_with_max_length(max_message(limits))),
        };
        let runner = serde_json::to_string(RUNNER).expect("a string serialises") + "\n";
        let ready = async {
            interp
                .stdin
                .write_all(runner.as_bytes())
                .await
                .context("cannot hand the runner to the Python interpreter")?;
            interp.next_message().await
        };
        match ready.await {
            Ok(Some(FromRunner::Ready { .. })) => Ok(interp),
            other => {
                interp.kill(cleaner, slot).await;
                bail!("the Python interpreter did not start properly: {other:?}")
            }
        }
    }

    async fn next_message(&mut self) -> Result<Option<FromRunner>> {
        match self.lines.next().await {
            None => Ok(None),
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => bail!(
                "the Python interpreter sent a message longer than {} bytes (task code wrote to the worker's pipe)",
                self.lines.decoder().max_length()
            ),
            Some(Err(LinesCodecError::Io(e))) => Err(e).context("cannot read from the Python interpreter"),
            Some(Ok(line)) => Ok(Some(serde_json::from_str(&line).with_context(|| {
                let head: String = line.chars().take(200).collect();
                format!("unreadable message from the Python interpreter: {head}")
            })?)),
        }
    }

    async fn send(&mut self, msg: &ToRunner) -> std::io::Result<()> {
        let line = serde_json::to_string(msg).expect("serialisable") + "\n";
        self.stdin.write_all(line.as_bytes()).await
    }

    /// Kills the interpreter's whole process group and waits for it, then
    /// tells `cleaner` it is gone.
    pub async fn kill(mut self, cleaner: &Cleaner, slot: Option<u32>) {
        if self.pid > 0 {
            flotilla_proto::reap::kill_group(self.pid);
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        cleaner.interpreter_gone(slot, self.pid);
    }

    /// Runs one task, answering its lock calls through `locks`. `Err` means
    /// the interpreter is gone: the caller reports the attempt as crashed
    /// (with the returned outcome) and starts a new one.
    pub async fn run(
        &mut self,
        request: ToRunner,
        limits: &Limits,
        locks: &LockProxy<'_>,
    ) -> std::result::Result<Outcome, Outcome> {
        if let Err(e) = self.send(&request).await {
            return Err(self
                .crashed(
                    format!("cannot hand the task to the interpreter: {e}"),
                    String::new(),
                )
                .await);
        }
        loop {
            let msg = match self.next_message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    return Err(self
                        .crashed(
                            "the Python interpreter died while running the task".into(),
                            String::new(),
                        )
                        .await)
                }
                Err(e) => return Err(self.crashed(format!("{e:#}"), String::new()).await),
            };
            match msg {
                FromRunner::Done {
                    ended,
                    stdout,
                    stdout_dropped,
                } => {
                    return Ok(done_outcome(
                        ended,
                        bound_text(stdout, stdout_dropped, limits.output),
                    ))
                }
                FromRunner::Lock {
                    action,
                    name,
                    mode,
                    value,
                    token,
                    timeout_s,
                } => {
                    let reply = locks
                        .call(action, name, mode, value, token, timeout_s)
                        .await;
                    if let Err(e) = self.send(&reply).await {
                        return Err(self
                            .crashed(
                                format!("cannot answer the task's lock call: {e}"),
                                String::new(),
                            )
                            .await);
                    }
                }
                FromRunner::Exit {
                    code,
                    stdout,
                    stdout_dropped,
                } => {
                    let stdout = bound_text(stdout, stdout_dropped, limits.output);
                    return Err(self
                        .crashed(
                            format!(
                                "the task called exit({code}) and ended its Python interpreter"
                            ),
                            stdout,
                        )
                        .await);
                }
                FromRunner::Ready { .. } => {
                    let text = "the Python interpreter announced itself again while running a task";
                    return Err(self.crashed(text.into(), String::new()).await);
                }
            }
        }
    }

    async fn crashed(&mut self, error: String, stdout: String) -> Outcome {
        if self.pid > 0 {
            flotilla_proto::reap::kill_group(self.pid);
        }
        let _ = self.child.start_kill();
        let status = self.child.wait().await.ok();
        let how = match status {
            Some(s) => describe_exit(s),
            None => "unknown status".to_string(),
        };
        Outcome::Crashed {
            error: format!("{error} ({how})"),
            stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("interpreter exit code {code}"),
        (None, Some(sig)) => format!("interpreter killed by signal {sig}"),
        _ => "interpreter ended".to_string(),
    }
}

fn done_outcome(ended: Ended, stdout: String) -> Outcome {
    match ended {
        Ended::Returned { response } => Outcome::Succeeded {
            result: TaskResult {
                response,
                stdout,
                exit_code: None,
                stderr: None,
            },
        },
        Ended::Raised { error, traceback } => Outcome::Failed {
            result: TaskResult {
                response: Value::String(traceback),
                stdout,
                exit_code: None,
                stderr: None,
            },
            error,
        },
        Ended::TooLarge { size, limit } => {
            let error = format!(
                "the task's result is {size} bytes of JSON, over the limit of {limit} bytes"
            );
            Outcome::Failed {
                result: TaskResult {
                    response: Value::String(error.clone()),
                    stdout,
                    exit_code: None,
                    stderr: None,
                },
                error,
            }
        }
    }
}

/// The `run` message for one attempt.
pub fn run_request(
    code: &str,
    task_id: flotilla_proto::TaskId,
    attempt: flotilla_proto::Attempt,
    tag: &str,
    limits: &Limits,
) -> ToRunner {
    ToRunner::Run {
        code: code.to_string(),
        task_id,
        attempt,
        tag: tag.to_string(),
        limits: RunLimits {
            output: limits.output,
            result: limits.result,
        },
    }
}

pub fn check_python(python: &str) -> Result<()> {
    let status = std::process::Command::new(python)
        .arg("-c")
        .arg("import json, traceback")
        .stdout(Stdio::null())
        .status()
        .map_err(|e| anyhow!("python interpreter `{python}` cannot be run: {e}"))?;
    if !status.success() {
        bail!("python interpreter `{python}` failed a smoke test ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    struct Fixture {
        cleaner: Arc<Cleaner>,
        http: reqwest::Client,
        span: tracing::Span,
        limits: Limits,
        /// No master here: lock calls are not retried.
        link: crate::link::MasterLink,
    }

    impl Fixture {
        fn new(limits: Limits) -> Self {
            Fixture {
                cleaner: Cleaner::new(1),
                http: reqwest::Client::new(),
                span: tracing::Span::none(),
                limits,
                link: {
                    let link = crate::link::MasterLink::default();
                    link.set_grace(std::time::Duration::from_millis(1));
                    link
                },
            }
        }

        async fn interpreter(&self) -> Interpreter {
            Interpreter::start("python3", 3, Some(0), &self.cleaner, &self.limits)
                .await
                .expect("python3 starts")
        }

        async fn run(
            &self,
            interp: &mut Interpreter,
            code: &str,
        ) -> std::result::Result<Outcome, Outcome> {
            let proxy = LockProxy {
                http: &self.http,
                master_url: "http://127.0.0.1:9",
                lease: "none",
                link: &self.link,
                span: &self.span,
                held: Default::default(),
            };
            let req = run_request(code, 1, 1, "test-tag", &self.limits);
            interp.run(req, &self.limits, &proxy).await
        }
    }

    fn succeeded(o: std::result::Result<Outcome, Outcome>) -> TaskResult {
        match o {
            Ok(Outcome::Succeeded { result }) => result,
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn results_json_cannot_carry_come_back_in_their_documented_form() {
        let _serial = crate::cleanup::TEST_PROCESSES.lock().await;
        let f = Fixture::new(Limits::default());
        let mut i = f.interpreter().await;
        let cases = [
            ("response = float('nan')", json!("NaN")),
            (
                "response = {'x': float('inf'), 'y': -float('inf')}",
                json!({"x": "Infinity", "y": "-Infinity"}),
            ),
            ("response = 2**64 + 1", json!("18446744073709551617")),
            ("response = -(2**63) - 1", json!("-9223372036854775809")),
            (
                "response = [2**64 - 1, -(2**63)]",
                json!([u64::MAX, i64::MIN]),
            ),
            ("response = '\\udcff'", json!("\\udcff")),
            ("response = (1, 'a', None)", json!([1, "a", null])),
            (
                "response = {1: 2.5, None: [float('nan')]}",
                json!({"1": 2.5, "null": ["NaN"]}),
            ),
            ("response = {(1, 2): 3}", json!("{(1, 2): 3}")),
            ("response = set()", json!("set()")),
            ("x = []; x.append(x); response = x", json!("[[...]]")),
            ("response = 6 * 7", json!(42)),
        ];
        for (code, want) in cases {
            let result = succeeded(f.run(&mut i, code).await);
            assert_eq!(result.response, want, "{code}");
        }
        let result = succeeded(f.run(&mut i, "print('\\udcff')").await);
        assert_eq!(result.stdout, "\\udcff\n");
        assert_eq!(result.response, json!("No result returned."));
        // Still the same interpreter: nothing above crashed it.
        assert_eq!(
            succeeded(f.run(&mut i, "response = 1").await).response,
            json!(1)
        );
    }

    #[tokio::test]
    async fn output_results_and_tracebacks_are_bounded() {
        let _serial = crate::cleanup::TEST_PROCESSES.lock().await;
        let limits = Limits {
            output: 1000,
            result: 10_000,
        };
        let f = Fixture::new(limits);
        let mut i = f.interpreter().await;
        let result = succeeded(f.run(&mut i, "print('x' * 1_100_000)").await);
        assert!(result.stdout.starts_with(&"x".repeat(1000)), "head kept");
        assert!(
            result.stdout.ends_with("1099001 more characters dropped]"),
            "{}",
            &result.stdout[1000..]
        );
        match f.run(&mut i, "response = 'y' * 50_000_000").await {
            Ok(Outcome::Failed { error, .. }) => assert_eq!(
                error,
                "the task's result is 50000002 bytes of JSON, over the limit of 10000 bytes"
            ),
            other => panic!("{other:?}"),
        }
        match f.run(&mut i, "response = [1] * 10_000").await {
            Ok(Outcome::Failed { error, .. }) => {
                assert!(error.contains("over the limit of 10000 bytes"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        match f.run(&mut i, "raise ValueError('z' * 2_000_000)").await {
            Ok(Outcome::Failed { error, result }) => {
                assert!(error.len() < 5000, "summary cut: {}", error.len());
                let tb = result.response.as_str().unwrap();
                assert!(tb.len() < 1200, "traceback cut: {}", tb.len());
                assert!(tb.contains("more characters dropped (limit 1000)"), "{tb}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            succeeded(f.run(&mut i, "response = 2").await).response,
            json!(2)
        );
    }

    #[tokio::test]
    async fn exit_is_a_crash_and_a_killed_interpreter_leaves_nothing() {
        let _serial = crate::cleanup::TEST_PROCESSES.lock().await;
        let f = Fixture::new(Limits::default());
        let mut i = f.interpreter().await;
        match f.run(&mut i, "print('bye'); exit(3)").await {
            Err(Outcome::Crashed { error, stdout }) => {
                assert!(error.contains("exit(3)"), "{error}");
                assert_eq!(stdout, "bye\n");
            }
            other => panic!("{other:?}"),
        }
        let mut i = f.interpreter().await;
        let pid = i.pid();
        // A task that never ends: stopped from outside by killing the slot.
        let spin = tokio::time::timeout(
            Duration::from_millis(300),
            f.run(
                &mut i,
                "import subprocess\nsubprocess.Popen(['sleep', '300'])\nwhile True: pass",
            ),
        )
        .await;
        assert!(spin.is_err(), "the task spins");
        i.kill(&f.cleaner, Some(0)).await;
        let gone = |pid: i32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(gone(pid));
        let left: Vec<_> = flotilla_proto::reap::snapshot()
            .into_iter()
            .filter(|p| !p.zombie)
            .filter(|p| {
                flotilla_proto::reap::env_var(p.pid, crate::cleanup::TAG_ENV).as_deref()
                    == Some("test-tag")
            })
            .collect();
        assert!(
            left.is_empty(),
            "the task's sleep died with its group: {left:?}"
        );
    }

    use std::time::Duration;
}
