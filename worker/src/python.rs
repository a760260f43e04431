//! The warm Python interpreter: one long-lived `python3` per execution slot.
//!
//! Starting CPython costs tens of milliseconds; a task like `response = 1`
//! costs microseconds. So each slot keeps one interpreter running
//! `runner.py` and hands it tasks over framed JSON lines. When a task kills
//! the interpreter (it calls `exit()`, segfaults, is OOM-killed), the attempt
//! is reported as crashed and a fresh interpreter is started for the next one.

use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use flotilla_proto::{Outcome, TaskResult, WorkerId};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::locks::LockProxy;

const RUNNER: &str = include_str!("runner.py");
const BOOTSTRAP: &str =
    "import sys, json; exec(compile(json.loads(sys.stdin.readline()), 'flotilla-runner', 'exec'))";

pub struct Interpreter {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Interpreter {
    pub async fn start(python: &str, worker_id: WorkerId) -> Result<Self> {
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
            .kill_on_drop(true);
        crate::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the Python interpreter `{python}`"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let runner = serde_json::to_string(RUNNER).expect("a string serialises") + "\n";
        stdin
            .write_all(runner.as_bytes())
            .await
            .context("cannot hand the runner to the Python interpreter")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut interp = Interpreter {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        match interp.next_message().await? {
            Some(msg) if msg["op"] == "ready" => Ok(interp),
            other => bail!("the Python interpreter did not start properly: {other:?}"),
        }
    }

    async fn next_message(&mut self) -> Result<Option<Value>> {
        match self.lines.next_line().await? {
            None => Ok(None),
            Some(line) => Ok(Some(serde_json::from_str(&line).with_context(|| {
                format!("unreadable message from the Python interpreter: {line}")
            })?)),
        }
    }

    /// Runs one task, answering its lock calls through `locks`. `Err` means
    /// the interpreter is gone: the caller reports the attempt as crashed
    /// (with the returned outcome) and starts a new one.
    pub async fn run(
        &mut self,
        code: &str,
        locks: &LockProxy<'_>,
    ) -> std::result::Result<Outcome, Outcome> {
        let request = json!({"op": "run", "code": code}).to_string() + "\n";
        if let Err(e) = self.stdin.write_all(request.as_bytes()).await {
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
            match msg["op"].as_str() {
                Some("done") => return Ok(done_outcome(msg)),
                Some("lock") => {
                    let reply = locks.call(msg).await.to_string() + "\n";
                    if let Err(e) = self.stdin.write_all(reply.as_bytes()).await {
                        return Err(self
                            .crashed(
                                format!("cannot answer the task's lock call: {e}"),
                                String::new(),
                            )
                            .await);
                    }
                }
                Some("exit") => {
                    let code = msg["code"].as_i64().unwrap_or(0);
                    let stdout = msg["stdout"].as_str().unwrap_or_default().to_string();
                    return Err(self
                        .crashed(
                            format!(
                                "the task called exit({code}) and ended its Python interpreter"
                            ),
                            stdout,
                        )
                        .await);
                }
                other => {
                    let text = format!("unexpected message from the Python interpreter: {other:?}");
                    return Err(self.crashed(text, String::new()).await);
                }
            }
        }
    }

    async fn crashed(&mut self, error: String, stdout: String) -> Outcome {
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
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("interpreter exit code {code}"),
        (None, Some(sig)) => format!("interpreter killed by signal {sig}"),
        _ => "interpreter ended".to_string(),
    }
}

fn done_outcome(msg: Value) -> Outcome {
    let stdout = msg["stdout"].as_str().unwrap_or_default().to_string();
    if msg["ok"].as_bool() == Some(true) {
        Outcome::Succeeded {
            result: TaskResult {
                response: msg["response"].clone(),
                stdout,
                exit_code: None,
                stderr: None,
            },
        }
    } else {
        let traceback = msg["traceback"].as_str().unwrap_or_default().to_string();
        let error = msg["error"]
            .as_str()
            .unwrap_or("python exception")
            .to_string();
        Outcome::Failed {
            result: TaskResult {
                response: Value::String(traceback),
                stdout,
                exit_code: None,
                stderr: None,
            },
            error,
        }
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
