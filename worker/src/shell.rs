//! Shell tasks: `sh -c COMMAND`, stdout, stderr and exit code captured.

use std::process::Stdio;

use flotilla_proto::{Outcome, TaskResult};
use serde_json::Value;
use tokio::process::Command;

/// `env` reaches the command's environment: the attempt's lease and the
/// lock URL (so that `flotilla-worker lock ...` can take locks as this task
/// attempt), its task ID and attempt number.
pub async fn run(command: &str, env: &[(&str, String)]) -> Outcome {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    crate::die_with_parent(&mut cmd);
    let output = match cmd.output().await {
        Ok(output) => output,
        Err(e) => {
            return Outcome::Crashed {
                error: format!("cannot start `sh -c`: {e}"),
                stdout: String::new(),
            }
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let exit_code = output.status.code();
    let result = TaskResult {
        response: Value::String(stdout.clone()),
        stdout,
        exit_code: Some(exit_code.unwrap_or(-1)),
        stderr: Some(stderr),
    };
    match exit_code {
        Some(0) => Outcome::Succeeded { result },
        Some(code) => Outcome::Failed {
            result,
            error: format!("shell command exited with code {code}"),
        },
        None => {
            use std::os::unix::process::ExitStatusExt;
            let sig = output.status.signal().unwrap_or(0);
            Outcome::Failed {
                result,
                error: format!("shell command was killed by signal {sig}"),
            }
        }
    }
}
