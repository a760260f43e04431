//! Bad input of every kind gets a clear 4xx naming the problem, and never
//! loses or corrupts work already accepted.

use std::time::Duration;

use flotilla_e2e::*;
use serde_json::json;

fn error_of(body: &serde_json::Value) -> String {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no {{\"error\"}} in {body}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_clearly_and_accepted_work_survives() {
    let c = Cluster::start(&seed_manifest(&[2, 2])).await.unwrap();
    // Work accepted before the bad input.
    let accepted = c
        .send_python("import time\ntime.sleep(0.5)\nresponse = 'kept'")
        .await
        .unwrap();
    let tasks_before = c.health().await.unwrap()["tasks"].as_u64().unwrap();

    let cases: Vec<(&str, &[u8], u16, &str)> = vec![
        (
            "/send",
            b"{\"type\": \"python\", \"command\": ",
            400,
            "invalid JSON",
        ),
        ("/send", b"", 400, "empty"),
        ("/send", br#"{"type": "python"}"#, 400, "command"),
        ("/send", br#"{"command": "x"}"#, 400, "type"),
        ("/send", br#"{"type": "ruby", "command": "x"}"#, 400, "ruby"),
        (
            "/send",
            br#"{"type": "python", "command": "x", "priority": 1}"#,
            400,
            "priority",
        ),
        ("/send", br#"["python", "x"]"#, 400, "invalid JSON"),
        (
            "/send/99",
            br#"{"type": "python", "command": "x"}"#,
            404,
            "node 99 does not exist",
        ),
        (
            "/send/abc",
            br#"{"type": "python", "command": "x"}"#,
            404,
            "node 'abc'",
        ),
        ("/stop/7", b"{}", 404, "node 7 does not exist"),
        ("/add", br#"{"max_capacity": 0}"#, 400, "max_capacity"),
        ("/add", br#"{"max_capacity": "big"}"#, 400, "max_capacity"),
        ("/add", br#"{"capacity": 3}"#, 400, "capacity"),
        ("/tasks", br#"{"tasks": []}"#, 400, "empty"),
        (
            "/tasks",
            br#"{"tasks": [{"type": "python", "command": "response = 1"}, {"type": "python"}]}"#,
            400,
            "tasks[1]",
        ),
        ("/tasks", br#"{"tasks": "all"}"#, 400, "list"),
        ("/nowhere", b"{}", 404, "no such endpoint"),
    ];
    for (path, body, status, needle) in cases {
        let (got, resp) = c.post_raw(path, body.to_vec()).await.unwrap();
        assert_eq!(
            got,
            status,
            "POST {path} {}: {resp}",
            String::from_utf8_lossy(body)
        );
        let err = error_of(&resp);
        assert!(
            err.contains(needle),
            "POST {path}: {err:?} should mention {needle:?}"
        );
    }

    // Oversized body: 413 naming the limit, before any parsing.
    let huge = format!(
        r#"{{"type": "python", "command": "x = '{}'"}}"#,
        "a".repeat(2 << 20)
    );
    // (On its own connection: the server answers before reading the whole
    // body and closes it, as HTTP servers do.)
    let resp = reqwest::Client::new()
        .post(format!("{}/send", c.url))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp: serde_json::Value = resp.json().await.unwrap();
    assert!(error_of(&resp).contains("limit"), "{resp}");

    for (path, status, needle) in [
        ("/tasks/999999", 404, "task 999999 does not exist"),
        ("/tasks/abc", 404, "task 'abc'"),
        ("/tasks/1?wait=soon", 400, "wait"),
        ("/tasks/finished?after=-1", 400, "after"),
    ] {
        let (got, resp) = c.get(path).await.unwrap();
        assert_eq!(got, status, "GET {path}: {resp}");
        assert!(error_of(&resp).contains(needle), "GET {path}: {resp}");
    }

    // Nothing half-accepted: the refused batch created no task.
    assert_eq!(
        c.health().await.unwrap()["tasks"].as_u64().unwrap(),
        tasks_before
    );
    let t = c
        .wait_task(accepted, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (t["state"].as_str(), t["result"]["response"].as_str()),
        (Some("succeeded"), Some("kept"))
    );
    let t = c
        .wait_task(
            c.send_python("response = 'still serving'").await.unwrap(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(t["result"]["response"], "still serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_protects_the_api_but_not_health() {
    let c = Cluster::start_with(&seed_manifest(&[1]), &[], &[("FLOTILLA_TOKEN", "s3cret")])
        .await
        .unwrap();
    let anon = reqwest::Client::new();
    let send = json!({"type": "python", "command": "response = 1"});
    let r = anon
        .post(format!("{}/send", c.url))
        .json(&send)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("FLOTILLA_TOKEN"));
    let r = anon
        .post(format!("{}/send", c.url))
        .bearer_auth("wrong")
        .json(&send)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        anon.get(format!("{}/health", c.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The worker routes want the cluster's own secret, not the API token.
    let r = anon
        .post(format!("{}/internal/poll", c.url))
        .bearer_auth("s3cret")
        .json(&json!({"worker_id": 0, "incarnation": 1, "slot": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // With the token all works.
    let id = c.send_python("response = 'authorised'").await.unwrap();
    let t = c.wait_task(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(t["result"]["response"], "authorised");
}

/// A File resource through the API takes content only: no path on the
/// master's machine is ever opened for a client, so nothing (a secret file,
/// a FIFO nobody writes, /dev/zero) can leak or stall the API.
#[tokio::test(flavor = "multi_thread")]
async fn file_resources_through_the_api_never_read_the_masters_files() {
    let c = Cluster::start(&seed_manifest(&[1])).await.unwrap();
    let dir = std::env::temp_dir().join(format!("flotilla-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let paths = [
        "/etc/shadow".to_string(),
        "/proc/self/environ".to_string(),
        "/dev/zero".to_string(),
        fifo.display().to_string(),
    ];
    for (i, path) in paths.iter().enumerate() {
        let name = format!("f{i}");
        let started = std::time::Instant::now();
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(10),
            c.post(
                "/resource",
                json!({"name": name, "type": "File", "values": {"path": path}}),
            ),
        )
        .await
        .expect("POST /resource must answer, not block on the path")
        .unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        let error = error_of(&body);
        assert!(
            error.contains("not accepted through the API") && error.contains("initial_value"),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nothing was created, and the API still answers.
        assert_eq!(c.get(&format!("/resources/{name}")).await.unwrap().0, 404);
        assert_eq!(c.health().await.unwrap()["status"], "ok");
    }
    // The content itself is accepted, as any other type's value.
    let (status, body) = c
        .post(
            "/resource",
            json!({"name": "notes", "type": "File", "values": {"initial_value": "a\nb\n"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, got) = c.get("/resources/notes").await.unwrap();
    assert_eq!(got["value"], "a\nb\n");
    let _ = std::fs::remove_dir_all(&dir);
}
