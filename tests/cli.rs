//! The `flotilla` command line against a real master: every verb, `--json`
//! parsed, exit codes, and the error messages for a stopped master and a
//! missing token. Also the task listing endpoint (`GET /tasks`) it uses.

use std::time::Duration;

use flotilla_e2e::*;
use serde_json::{json, Value};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `flotilla ARGS` against `server` (FLOTILLA_SERVER), with `token` in
/// FLOTILLA_TOKEN when given.
async fn cli(server: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(bin("flotilla"));
    cmd.args(args).env("FLOTILLA_SERVER", server);
    match token {
        Some(t) => cmd.env("FLOTILLA_TOKEN", t),
        None => cmd.env_remove("FLOTILLA_TOKEN"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("flotilla {args:?} did not finish in 60 s"))
        .expect("run flotilla");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `flotilla ARGS` with `input` on its standard input.
async fn cli_stdin(server: &str, args: &[&str], input: &str) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin("flotilla"))
        .args(args)
        .env("FLOTILLA_SERVER", server)
        .env_remove("FLOTILLA_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run flotilla");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("flotilla finishes")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(o: &Out) {
    assert_eq!(o.code, 0, "stdout: {}\nstderr: {}", o.stdout, o.stderr);
}

const MANIFEST: &str = "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: { name: cli }\nspec:\n  workers:\n    - capacity: 4\n      replicas: 2\n  resources:\n    - { name: total, type: Integer, initialValue: 7 }\n    - { name: names, type: List, initialValue: [a, b] }\n";

#[tokio::test(flavor = "multi_thread")]
async fn every_verb_against_a_real_master() {
    let c = Cluster::start(MANIFEST).await.unwrap();
    let url = c.url.as_str();

    // submit: the ID; --json: {"task_id"}.
    let o = cli(url, None, &["submit", "response = 6 * 7"]).await;
    ok(&o);
    let first: u64 = o.stdout.trim().parse().expect("a task ID");
    let o = cli(url, None, &["submit", "--json", "response = 1"]).await;
    ok(&o);
    let second = o.json()["task_id"].as_u64().unwrap();
    assert_eq!(second, first + 1);

    // submit --wait: stdout then the response; a failure is exit code 1
    // with the traceback.
    let o = cli(
        url,
        None,
        &["submit", "--wait", "print('hello')\nresponse = 6 * 7"],
    )
    .await;
    ok(&o);
    assert_eq!(o.stdout, "hello\n42\n");
    let o = cli(url, None, &["submit", "--wait", "1 / 0"]).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("ZeroDivisionError"), "{}", o.stderr);
    let o = cli(
        url,
        None,
        &["submit", "--wait", "--json", "raise ValueError('no')"],
    )
    .await;
    assert_eq!(o.code, 1);
    let failed = o.json();
    assert_eq!(failed["state"], "failed");
    assert!(failed["result"]["response"]
        .as_str()
        .unwrap()
        .contains("Traceback"));
    let failed_id = failed["id"].as_u64().unwrap();

    // --shell, --node, -f FILE and -f - (stdin is not used here: a file).
    let o = cli(
        url,
        None,
        &["submit", "--shell", "--wait", "--json", "echo out; exit 3"],
    )
    .await;
    assert_eq!(o.code, 1);
    assert_eq!(o.json()["result"]["exit_code"], 3);
    let o = cli(
        url,
        None,
        &[
            "submit",
            "--node",
            "1",
            "--wait",
            "--json",
            "response = self.node_id",
        ],
    )
    .await;
    ok(&o);
    assert_eq!(o.json()["result"]["response"], 1);
    assert_eq!(o.json()["node"], 1);
    let file = temp_file("cli-task.py", "x = 5\nresponse = x * x\n");
    let o = cli(
        url,
        None,
        &["submit", "--wait", "-f", file.to_str().unwrap()],
    )
    .await;
    ok(&o);
    assert_eq!(o.stdout.trim(), "25");
    let o = cli_stdin(
        url,
        &["submit", "--wait", "-f", "-"],
        "x = 3\nresponse = x + 1\n",
    )
    .await;
    ok(&o);
    assert_eq!(o.stdout.trim(), "4");
    let o = cli(url, None, &["submit", "-f", "/nonexistent/task.py"]).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("/nonexistent/task.py"), "{}", o.stderr);
    let o = cli(url, None, &["submit", "--node", "9", "response = 1"]).await;
    assert_eq!(o.code, 3);
    assert!(
        o.stderr.contains("404") && o.stderr.contains("node 9"),
        "{}",
        o.stderr
    );

    // get: a table, and --json.
    let o = cli(url, None, &["get", &first.to_string()]).await;
    ok(&o);
    assert!(
        o.stdout.contains("state") && o.stdout.contains("succeeded"),
        "{}",
        o.stdout
    );
    let o = cli(url, None, &["get", "--json", &first.to_string()]).await;
    ok(&o);
    assert_eq!(o.json()["result"]["response"], 42);
    let o = cli(url, None, &["get", "999999"]).await;
    assert_eq!(o.code, 3);
    assert!(
        o.stderr.contains("task 999999 does not exist"),
        "{}",
        o.stderr
    );

    // wait: many IDs, in the order given; 1 when one failed.
    let slow = cli(
        url,
        None,
        &["submit", "import time\ntime.sleep(1)\nresponse = 'slow'"],
    )
    .await;
    let slow_id = slow.stdout.trim().to_string();
    let o = cli(url, None, &["wait", "--json", &slow_id, &first.to_string()]).await;
    ok(&o);
    let views = o.json();
    assert_eq!(views[0]["result"]["response"], "slow");
    assert_eq!(views[1]["id"], first);
    let o = cli(
        url,
        None,
        &["wait", &first.to_string(), &failed_id.to_string()],
    )
    .await;
    assert_eq!(o.code, 1);
    let sleeper = cli(url, None, &["submit", "import time\ntime.sleep(5)"]).await;
    let o = cli(
        url,
        None,
        &["wait", "--timeout", "0.5", "--json", sleeper.stdout.trim()],
    )
    .await;
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert!(o.stderr.contains("unfinished"), "{}", o.stderr);

    // cancel: a running task (stopped) and one queued behind it on the same
    // one-slot worker; a finished one is reported, not an error.
    let running = cli(
        url,
        None,
        &["submit", "--node", "0", "import time\ntime.sleep(60)"],
    )
    .await;
    let running = running.stdout.trim().to_string();
    let queued = cli(url, None, &["submit", "--node", "0", "response = 'never'"]).await;
    let queued = queued.stdout.trim().to_string();
    // Running: the state has no event to wait on; look every 20 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.client.task(running.parse().unwrap()).await.unwrap().state
        != flotilla_client::api::TaskState::Running
    {
        assert!(
            std::time::Instant::now() < deadline,
            "task {running} never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let o = cli(
        url,
        None,
        &["cancel", "--json", &queued, &running, &first.to_string()],
    )
    .await;
    ok(&o);
    let cancelled: Vec<Value> = o
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cancelled"].clone())
        .collect();
    assert_eq!(cancelled, [json!(true), json!(true), json!(false)]);
    for id in [&queued, &running] {
        let o = cli(url, None, &["wait", "--json", id]).await;
        assert_eq!(o.code, 1, "a cancelled task is not a success");
        assert_eq!(o.json()[0]["state"], "cancelled");
    }
    let o = cli(url, None, &["cancel", &first.to_string()]).await;
    ok(&o);
    assert!(o.stdout.contains("already finished"), "{}", o.stdout);
    let o = cli(url, None, &["cancel", "999999"]).await;
    assert_eq!(o.code, 3);
    assert!(o.stderr.contains("999999"), "{}", o.stderr);

    // submit --timeout: the task is stopped and fails.
    let o = cli(
        url,
        None,
        &[
            "submit",
            "--wait",
            "--timeout",
            "0.5",
            "import time\ntime.sleep(30)",
        ],
    )
    .await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("timed out"), "{}", o.stderr);

    // wait on more than 50 IDs: the listing, then the completion feed.
    let ids: Vec<String> = (0..60).map(|i| i.to_string()).collect::<Vec<_>>();
    let mut submitted = Vec::new();
    for i in &ids {
        let o = cli(url, None, &["submit", &format!("response = {i}")]).await;
        submitted.push(o.stdout.trim().to_string());
    }
    let mut args = vec!["wait", "--json"];
    args.extend(submitted.iter().map(String::as_str));
    let o = cli(url, None, &args).await;
    ok(&o);
    let got: Vec<Value> = o
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["result"]["response"].clone())
        .collect();
    assert_eq!(got, (0..60).map(|i| json!(i)).collect::<Vec<_>>());

    // tasks: filters and paging.
    let o = cli(url, None, &["tasks", "--json", "--state", "failed"]).await;
    ok(&o);
    let listed = o.json();
    let failed_ids: Vec<u64> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert!(
        failed_ids.contains(&failed_id) && !failed_ids.contains(&first),
        "{failed_ids:?}"
    );
    assert!(listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["state"] == "failed"));
    let o = cli(url, None, &["tasks", "--json", "--node", "1"]).await;
    ok(&o);
    assert!(o.json()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["node"] == 1));
    let o = cli(url, None, &["tasks", "--json", "--limit", "3"]).await;
    ok(&o);
    let page = o.json();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 3);
    let next = page["next"].as_u64().expect("more pages");
    let o = cli(
        url,
        None,
        &[
            "tasks",
            "--json",
            "--limit",
            "2",
            "--after",
            &next.to_string(),
        ],
    )
    .await;
    assert_eq!(o.json()["tasks"][0]["id"], next + 1);
    let o = cli(url, None, &["tasks", "--state", "succeeded"]).await;
    ok(&o);
    assert!(
        o.stdout.contains("STATE") && o.stdout.contains("succeeded"),
        "{}",
        o.stdout
    );
    let o = cli(url, None, &["tasks", "--state", "done"]).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("done"), "{}", o.stderr);

    // nodes, resources.
    let o = cli(url, None, &["nodes", "--json"]).await;
    ok(&o);
    assert_eq!(o.json().as_array().unwrap().len(), 2);
    let o = cli(url, None, &["nodes"]).await;
    assert!(
        o.stdout.contains("CAPACITY") && o.stdout.contains("active"),
        "{}",
        o.stdout
    );
    let o = cli(url, None, &["resources", "--json"]).await;
    ok(&o);
    let names: Vec<Value> = o
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(names, ["names", "total"]);
    let o = cli(url, None, &["resources", "--json", "total"]).await;
    ok(&o);
    assert_eq!(o.json()["value"], 7);
    assert_eq!(o.json()["type"], "Integer");
    let o = cli(url, None, &["resources", "names"]).await;
    assert!(o.stdout.contains("[\"a\",\"b\"]"), "{}", o.stdout);
    let o = cli(url, None, &["resources", "nope"]).await;
    assert_eq!(o.code, 3);
    assert!(o.stderr.contains("`nope` does not exist"), "{}", o.stderr);

    // watch: follows the completion feed (and node changes) live. It says
    // on stderr when it is watching; what finishes after that is printed.
    let mut watcher = tokio::process::Command::new(bin("flotilla"))
        .args(["watch", "--json", "--count", "2", "--server", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(watcher.stderr.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line)
        .await
        .unwrap();
    assert!(line.starts_with("watching"), "{line}");
    let a = cli(url, None, &["submit", "response = 'a'"])
        .await
        .stdout
        .trim()
        .to_string();
    let b = cli(url, None, &["submit", "1 / 0"])
        .await
        .stdout
        .trim()
        .to_string();
    let out = tokio::time::timeout(Duration::from_secs(30), watcher.wait_with_output())
        .await
        .expect("watch --count 2 ends")
        .unwrap();
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut seen: Vec<(String, Value)> = events
        .iter()
        .filter(|e| e["event"] == "task")
        .map(|e| (e["id"].to_string(), e["state"].clone()))
        .collect();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        [(a, json!("succeeded")), (b, json!("failed"))],
        "{events:?}"
    );

    // add, stop.
    let o = cli(url, None, &["add", "--json", "--capacity", "2"]).await;
    ok(&o);
    let added = o.json()["node_id"].as_u64().unwrap();
    assert_eq!(added, 2);
    c.wait_until(Duration::from_secs(30), |n| {
        n.len() == 3 && n[2]["capacity"] == 2 && n[2]["state"] == "active"
    })
    .await
    .unwrap();
    let o = cli(url, None, &["stop", "0"]).await;
    ok(&o);
    assert!(o.stdout.contains("Node 0 stopped"), "{}", o.stdout);
    c.wait_until(Duration::from_secs(30), |n| {
        n[0]["restarts"] == 1 && n[0]["state"] == "active"
    })
    .await
    .unwrap();
    let o = cli(url, None, &["add", "--capacity", "0"]).await;
    assert_eq!(o.code, 3);
    assert!(o.stderr.contains("max_capacity"), "{}", o.stderr);

    // completions.
    for shell in ["bash", "zsh", "fish"] {
        let o = cli(url, None, &["completions", shell]).await;
        ok(&o);
        assert!(
            o.stdout.contains("submit") && o.stdout.contains("resources"),
            "{shell}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_master_and_a_missing_token_are_named_with_the_fix() {
    // Nothing listens on a port we bound and let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("http://127.0.0.1:{port}");
    for args in [
        &["nodes"][..],
        &["submit", "response = 1"],
        &["tasks", "--json"],
        &["watch"],
    ] {
        let o = cli(&down, None, args).await;
        assert_eq!(o.code, 3, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("connection refused"), "{}", o.stderr);
        assert!(
            o.stderr.contains(&down) && o.stderr.contains("flotilla up"),
            "{}",
            o.stderr
        );
        assert!(o.stdout.is_empty());
    }
    // --server wins over FLOTILLA_SERVER.
    let o = cli("http://127.0.0.1:1", None, &["nodes", "--server", &down]).await;
    assert!(o.stderr.contains(&down), "{}", o.stderr);
    let o = cli("not a url", None, &["nodes"]).await;
    assert_eq!(o.code, 3);
    assert!(
        o.stderr.contains("invalid server URL `not a url`"),
        "{}",
        o.stderr
    );

    let c = Cluster::start_with(&seed_manifest(&[1]), &[], &[("FLOTILLA_TOKEN", "s3cret")])
        .await
        .unwrap();
    let o = cli(&c.url, None, &["nodes"]).await;
    assert_eq!(o.code, 3);
    assert!(
        o.stderr.contains("401") && o.stderr.contains("set FLOTILLA_TOKEN"),
        "{}",
        o.stderr
    );
    let o = cli(&c.url, Some("wrong"), &["submit", "response = 1"]).await;
    assert_eq!(o.code, 3);
    assert!(o.stderr.contains("does not match"), "{}", o.stderr);
    let o = cli(
        &c.url,
        Some("s3cret"),
        &["submit", "--wait", "response = 'in'"],
    )
    .await;
    ok(&o);
    assert_eq!(o.stdout.trim(), "in");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_task_listing_refuses_bad_queries_by_name() {
    let c = Cluster::start(&seed_manifest(&[2])).await.unwrap();
    for i in 0..5 {
        c.send_python(&format!("response = {i}")).await.unwrap();
    }
    let cases = [
        ("/tasks?state=done", "unknown task state `done`"),
        (
            "/tasks?limit=0",
            "limit must be a number between 1 and 1000",
        ),
        (
            "/tasks?limit=5000",
            "limit must be a number between 1 and 1000",
        ),
        ("/tasks?limit=x", "limit"),
        ("/tasks?node=zero", "node must be a node ID"),
        ("/tasks?after=-1", "after must be a task ID"),
        ("/tasks?sort=id", "unknown query parameter `sort`"),
    ];
    for (path, needle) in cases {
        let (status, body) = c.get(path).await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        let err = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: {body}"));
        assert!(err.contains(needle), "{path}: {err}");
    }
    let (status, body) = c.get("/tasks?limit=2&after=1").await.unwrap();
    assert_eq!(status, 200);
    let ids: Vec<u64> = body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2, 3]);
    assert_eq!(body["next"], 3);
    let (_, body) = c.get("/tasks?after=3").await.unwrap();
    assert_eq!(body["tasks"].as_array().unwrap().len(), 2);
    assert!(body["next"].is_null());
}
