//! What the `flotilla` command prints, as a user sees it: logs redirected to
//! a file carry no ANSI escape codes (unless `--color always` asks for them),
//! and `flotilla run` prints a multi-line result as lines.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_e2e::*;

/// `flotilla up FILE --port 0 [args] 2> log`: waits for the address, runs
/// one task (so master and worker both log), stops the master with Ctrl-C
/// and returns the log file's content.
fn up_with_stderr_to_a_file(name: &str, args: &[&str]) -> String {
    let manifest = temp_file(&format!("{name}.yaml"), &seed_manifest(&[2]));
    let log_path = temp_file(&format!("{name}.log"), "");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(bin("flotilla"))
        .arg("up")
        .arg(&manifest)
        .args(["--port", "0"])
        .arg("--state-dir")
        .arg(fresh_state_dir())
        .args(args)
        .env("RUST_LOG", "info")
        .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir())
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = read_banner_url(&mut child);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let sent: serde_json::Value = http
            .post(format!("{url}/send"))
            .json(&serde_json::json!({"type": "python", "command": "response = 6 * 7"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = sent["task_id"].as_u64().unwrap();
        let task: serde_json::Value = http
            .get(format!("{url}/tasks/{id}?wait=30"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(task["result"]["response"], 42, "{task}");
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "flotilla up did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(&log_path).unwrap()
}

#[test]
fn logs_redirected_to_a_file_have_no_escape_codes() {
    let log = up_with_stderr_to_a_file("plain-log", &[]);
    assert!(
        log.contains("master listening") && log.contains("Node 0 created"),
        "master and worker both logged: {log}"
    );
    assert!(!log.contains('\x1b'), "escape codes in the log: {log:?}");
}

#[test]
fn color_always_colours_even_a_file_and_never_does_not() {
    let log = up_with_stderr_to_a_file("coloured-log", &["--color", "always"]);
    assert!(
        log.contains("\x1b["),
        "--color always gave no colours: {log:?}"
    );
    let log = up_with_stderr_to_a_file("never-log", &["--color", "never"]);
    assert!(log.contains("Node 0 created"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in the log: {log:?}");
}

#[test]
fn an_unknown_color_mode_is_named() {
    let err = flotilla_fails(&["--color", "sometimes", "check", "x.yaml"], &[]);
    assert!(err.contains("sometimes"), "{err}");
    assert!(err.contains("auto, always or never"), "{err}");
}

fn run_text(file: &Path) -> String {
    let out = Command::new(bin("flotilla"))
        .arg("run")
        .arg(file)
        .args(["--port", "0", "--timeout", "60"])
        .env("RUST_LOG", "warn")
        .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "flotilla run failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn run_prints_a_multi_line_result_as_lines() {
    let scenario = "system:
  node_quantity: 1
  node_capacities: [2]
  requests:
    - endpoint: http://localhost:5000/send
      times: 1
      method: POST
      sleep: 0
      body:
        type: python
        command: |
          print('out one')
          print('out two')
          response = 'first line\\nsecond line\\nthird line'
";
    let stdout = run_text(&temp_file("multi-line.yaml", scenario));
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("task 1 on node 0") && l.ends_with(": first line"))
        .unwrap_or_else(|| panic!("no result line for task 1: {stdout}"));
    assert_eq!(lines[at + 1].trim(), "second line", "{stdout}");
    assert_eq!(lines[at + 2].trim(), "third line", "{stdout}");
    assert!(lines.iter().any(|l| l.trim() == "| out one"), "{stdout}");
    assert!(lines.iter().any(|l| l.trim() == "| out two"), "{stdout}");
    assert!(!stdout.contains("\\n"), "an escaped newline: {stdout}");
}
