//! Observability: one task is one trace across the master and the worker
//! process (checked by an OTLP/HTTP receiver inside the test that decodes
//! the protobuf the real exporters send), and `/metrics` counts what
//! happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use flotilla_e2e::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;

#[derive(Clone, Debug)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A minimal OTLP/HTTP trace receiver on a loopback port.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<SpanRecord>>>) {
    let spans: Arc<Mutex<Vec<SpanRecord>>> = Default::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(SpanRecord {
                                service: service.clone(),
                                name: s.name.clone(),
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), text(&a.value)))
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

fn find<'a>(
    spans: &'a [SpanRecord],
    service: &str,
    name: &str,
    task: u64,
) -> Option<&'a SpanRecord> {
    spans.iter().find(|s| {
        s.service == service
            && s.name == name
            && s.attrs.get("task.id").map(String::as_str) == Some(&task.to_string())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_task_is_one_trace_across_master_and_worker_with_its_lock_wait() {
    let (endpoint, spans) = otlp_receiver().await;
    let manifest = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n",
        native_manifest(&[2], 1.0, 5.0, 3)
    );
    let c = Cluster::start_with(
        &manifest,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .unwrap();
    let t = c
        .run_python("with write_resource('total') as t:\n    t.value += 1\nresponse = t.value")
        .await;
    assert_eq!(t["result"]["response"], 1, "{t}");
    let id = t["id"].as_u64().unwrap();

    // Wait for both processes' exports.
    let deadline = Instant::now() + Duration::from_secs(20);
    let snapshot = loop {
        let snapshot = spans.lock().unwrap().clone();
        let ready = find(&snapshot, "flotilla-master", "task", id).is_some()
            && find(&snapshot, "flotilla-worker", "running", id).is_some()
            && snapshot
                .iter()
                .any(|s| s.service == "flotilla-worker" && s.name == "lock held")
            && snapshot
                .iter()
                .any(|s| s.service == "flotilla-master" && s.name == "result received");
        if ready {
            break snapshot;
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived; got {:?}",
            snapshot
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let root = find(&snapshot, "flotilla-master", "task", id).unwrap();
    assert!(root.parent.is_empty(), "the task span is the trace's root");
    assert_eq!(root.attrs["task.state"], "succeeded");
    assert_eq!(root.attrs["task.kind"], "python");
    let trace: Vec<&SpanRecord> = snapshot
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    let by_id: HashMap<&str, &SpanRecord> =
        trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let parent_of = |s: &SpanRecord| {
        by_id
            .get(s.parent.as_str())
            .map(|p| (p.service.clone(), p.name.clone()))
    };

    let queued = find(&snapshot, "flotilla-master", "queued", id).expect("queued span");
    assert_eq!(queued.parent, root.span_id);
    let attempt = find(&snapshot, "flotilla-master", "attempt", id).expect("attempt span");
    assert_eq!(attempt.parent, root.span_id);
    assert_eq!(attempt.attrs["task.attempt"], "1");
    assert_eq!(attempt.attrs["worker.id"], "0");
    assert!(attempt.attrs.contains_key("worker.incarnation"));
    let running = find(&snapshot, "flotilla-worker", "running", id).unwrap();
    assert_eq!(
        running.trace_id, root.trace_id,
        "the worker's span is in the task's trace"
    );
    assert_eq!(
        running.parent, attempt.span_id,
        "running is a child of the master's attempt"
    );
    assert_eq!(running.attrs["worker.id"], "0");
    let wait = trace
        .iter()
        .find(|s| s.name == "lock wait")
        .expect("lock wait span in the trace");
    assert_eq!(wait.service, "flotilla-worker");
    assert_eq!(wait.parent, running.span_id);
    assert_eq!(wait.attrs["resource"], "total");
    assert_eq!(wait.attrs["lock.mode"], "write");
    let held = trace
        .iter()
        .find(|s| s.name == "lock held")
        .expect("lock held span");
    assert_eq!(held.parent, running.span_id);
    let grant = trace
        .iter()
        .find(|s| {
            s.service == "flotilla-master"
                && s.name == "lock call"
                && s.attrs["lock.action"] == "Acquire"
        })
        .expect("the master's side of the lock call");
    assert_eq!(
        parent_of(grant),
        Some(("flotilla-worker".into(), "lock wait".into()))
    );
    let received = trace
        .iter()
        .find(|s| s.name == "result received")
        .expect("result span");
    assert_eq!(received.parent, running.span_id);
    assert!(trace.iter().any(|s| s.name == "assigned"));
}

/// `spec.telemetry.sampleRatio`: a share of the tasks is traced, each of
/// them whole on both sides (the worker follows the master's decision), and
/// an unsampled task leaves no span anywhere: every exported span belongs
/// to the trace of a sampled task's root span.
#[tokio::test(flavor = "multi_thread")]
async fn a_sample_ratio_traces_a_share_of_the_tasks_each_one_whole() {
    let (endpoint, spans) = otlp_receiver().await;
    let manifest = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n  telemetry: {{ sampleRatio: 0.5 }}\n",
        native_manifest(&[2, 2], 1.0, 5.0, 3)
    );
    let c = Cluster::start_with(
        &manifest,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .unwrap();
    const N: u64 = 40;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(
            c.send_python(
                "with write_resource('total') as t:\n    t.value += 1\nresponse = t.value",
            )
            .await
            .unwrap(),
        );
    }
    for id in &ids {
        let t = c.wait_task(*id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    // Every sampled task's worker span has arrived, and nothing more comes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = usize::MAX;
    let snapshot = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let snapshot = spans.lock().unwrap().clone();
        let roots = snapshot
            .iter()
            .filter(|s| s.service == "flotilla-master" && s.name == "task")
            .count();
        let running = snapshot
            .iter()
            .filter(|s| s.service == "flotilla-worker" && s.name == "running")
            .count();
        if roots > 0 && running >= roots && snapshot.len() == last {
            break snapshot;
        }
        last = snapshot.len();
        assert!(
            Instant::now() < deadline,
            "exports never settled: {} spans",
            snapshot.len()
        );
    };
    let roots: HashMap<&str, &SpanRecord> = snapshot
        .iter()
        .filter(|s| s.service == "flotilla-master" && s.name == "task")
        .map(|s| (s.trace_id.as_str(), s))
        .collect();
    let sampled = roots.len() as u64;
    // 0.5 of 40: all or none would be a chance of 2^-39 each.
    assert!(
        0 < sampled && sampled < N,
        "{sampled} of {N} tasks traced at ratio 0.5"
    );
    for root in roots.values() {
        assert!(root.parent.is_empty());
        let id: u64 = root.attrs["task.id"].parse().unwrap();
        let running = find(&snapshot, "flotilla-worker", "running", id)
            .unwrap_or_else(|| panic!("sampled task {id} has no worker span"));
        assert_eq!(running.trace_id, root.trace_id);
        for name in ["lock wait", "lock held"] {
            assert!(
                snapshot
                    .iter()
                    .any(|s| s.trace_id == root.trace_id && s.name == name),
                "sampled task {id} has no {name} span"
            );
        }
    }
    for s in &snapshot {
        assert!(
            roots.contains_key(s.trace_id.as_str()),
            "a span outside every sampled task's trace: {s:?}"
        );
    }
    let running = snapshot
        .iter()
        .filter(|s| s.service == "flotilla-worker" && s.name == "running")
        .count() as u64;
    assert_eq!(
        running, sampled,
        "one worker span per sampled task, none for the others"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened() {
    let manifest = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n",
        native_manifest(&[4, 4], 1.0, 5.0, 3)
    );
    let c = Cluster::start(&manifest).await.unwrap();
    for _ in 0..3 {
        let t = c
            .run_python("with write_resource('total') as t:\n    t.value += 1")
            .await;
        assert_eq!(t["state"], "succeeded");
    }
    assert_eq!(c.run_python("1 / 0").await["state"], "failed");
    // Two sleepers on node 0: node 1 steals the second.
    let a = c
        .send_to_path("/send/0", "import time\ntime.sleep(0.5)")
        .await
        .unwrap();
    let b = c
        .send_to_path("/send/0", "import time\ntime.sleep(0.5)")
        .await
        .unwrap();
    for id in [a, b] {
        c.wait_task(id, Duration::from_secs(20)).await.unwrap();
    }
    let (status, _) = c.post("/stop/1", json!({})).await.unwrap();
    assert_eq!(status, 200);
    c.wait_until(Duration::from_secs(20), |n| {
        n[1]["restarts"] == 1 && n[1]["state"] == "active"
    })
    .await
    .unwrap();

    let resp = c
        .http
        .get(format!("{}/metrics", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("openmetrics-text"));
    let text = resp.text().await.unwrap();
    assert_eq!(metric(&text, "flotilla_tasks_submitted_total"), 6.0);
    assert_eq!(metric(&text, "flotilla_tasks{state=\"succeeded\"}"), 5.0);
    assert_eq!(metric(&text, "flotilla_tasks{state=\"failed\"}"), 1.0);
    assert_eq!(metric(&text, "flotilla_tasks{state=\"queued\"}"), 0.0);
    assert_eq!(metric(&text, "flotilla_run_seconds_count"), 6.0);
    assert_eq!(metric(&text, "flotilla_submit_to_start_seconds_count"), 6.0);
    assert_eq!(
        metric(
            &text,
            "flotilla_lock_wait_seconds_count{resource=\"total\",mode=\"write\"}"
        ),
        3.0
    );
    assert!(metric(&text, "flotilla_steals_total") >= 1.0);
    assert_eq!(metric(&text, "flotilla_worker_restarts_total"), 1.0);
    assert_eq!(metric(&text, "flotilla_missed_heartbeats_total"), 0.0);
    assert_eq!(
        metric(&text, "flotilla_worker_queue_length{worker=\"0\"}"),
        0.0
    );
    assert_eq!(metric(&text, "flotilla_master_queue_length"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_can_be_json() {
    let out = std::process::Command::new(bin("flotilla"))
        .args(["--log-format", "json", "--log-level", "info", "check"])
        .arg(temp_file("json-logs.yaml", "system:\n  node_quantity: 1\n"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = temp_file("json-run.yaml", "system:\n  node_quantity: 1\n  requests:\n    - endpoint: http://localhost:5000/send\n      body: { type: python, command: 'response = 1' }\n");
    let out = std::process::Command::new(bin("flotilla"))
        .args(["--log-format", "json", "--log-level", "info", "run"])
        .arg(&path)
        .args(["--port", "0", "--timeout", "30"])
        .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty(), "no JSON log lines in: {stderr}");
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Queueing instruction to Node 0"))),
        "{stderr}"
    );
    assert!(
        lines.iter().any(|l| l["target"] == "flotilla_worker"),
        "the workers log JSON too: {stderr}"
    );
}

/// `--metrics-port`: Prometheus scrapes /metrics without the token there,
/// while the API (its /metrics included) keeps requiring it, and nothing
/// else is served on the metrics port.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_scraped_without_the_token_on_their_own_port() {
    let port = free_port().to_string();
    let c = Cluster::start_with(
        &seed_manifest(&[1]),
        &["--metrics-port", &port],
        &[("FLOTILLA_TOKEN", "metrics-test-token")],
    )
    .await
    .unwrap();
    assert_eq!(c.run_python("response = 1").await["state"], "succeeded");
    let plain = reqwest::Client::new();
    let scrape = plain
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.unwrap();
    assert_eq!(metric(&text, "flotilla_tasks_submitted_total"), 1.0);
    for path in ["/nodes", "/resources", "/health", "/internal/poll"] {
        let resp = plain
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path} on the metrics port");
    }
    let resp = plain
        .post(format!("http://127.0.0.1:{port}/send"))
        .json(&json!({"type": "python", "command": "response = 2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The API's own /metrics still needs the token.
    let resp = plain
        .get(format!("{}/metrics", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(c.get("/metrics").await.unwrap().0, 200);
}

/// `/nodes` says where each worker runs as its runtime knows it.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_show_where_each_worker_runs() {
    let c = Cluster::start(&seed_manifest(&[1, 1])).await.unwrap();
    for node in c.nodes().await.unwrap() {
        let pid = node["pid"].as_u64().expect("process workers have a pid");
        assert_eq!(node["locator"], format!("pid {pid}"), "{node}");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}

/// OTEL_SERVICE_NAME names the master's service; workers keep theirs.
#[tokio::test(flavor = "multi_thread")]
async fn the_service_name_comes_from_otel_service_name() {
    let (endpoint, spans) = otlp_receiver().await;
    let c = Cluster::start_with(
        &native_manifest(&[1], 1.0, 5.0, 3),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "batch-master"),
        ],
    )
    .await
    .unwrap();
    let id = c.run_python("response = 1").await["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snapshot = spans.lock().unwrap().clone();
        if find(&snapshot, "batch-master", "task", id).is_some()
            && find(&snapshot, "flotilla-worker", "running", id).is_some()
        {
            assert!(find(&snapshot, "flotilla-master", "task", id).is_none());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans seen: {:?}",
            snapshot
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Logs at INFO carry IDs, states and sizes, never task data: a response,
/// printed output, a traceback or the code itself show up only at DEBUG.
#[tokio::test(flavor = "multi_thread")]
async fn info_logs_carry_no_task_data() {
    let marker = "MARKER-7f3a91";
    let scenario = format!(
        "system:\n  node_quantity: 1\n  requests:\n    - endpoint: http://localhost:5000/send\n      body: {{ type: python, command: \"print('{marker}-out')\\nresponse = '{marker}-response'\" }}\n    - endpoint: http://localhost:5000/send\n      body: {{ type: python, command: \"raise ValueError('{marker}-error')\" }}\n    - endpoint: http://localhost:5000/send\n      body: {{ type: shell, command: \"echo {marker}-shell; exit 3\" }}\n"
    );
    let path = temp_file("no-task-data.yaml", &scenario);
    let run = |level: &str| {
        std::process::Command::new(bin("flotilla"))
            .args(["--log-level", level, "run"])
            .arg(&path)
            .args(["--port", "0", "--timeout", "60", "--json"])
            .env("FLOTILLA_RUNTIME_DIR", fresh_runtime_dir())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = run("info");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The results are the user's: they are in the report...
    assert!(stdout.contains(&format!("{marker}-response")), "{stdout}");
    // ...and in no log line.
    assert!(
        stderr.contains("finished task") && stderr.contains("response_bytes"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(marker),
        "task data in INFO logs:\n{stderr}"
    );
    // At DEBUG the content is there, for whoever asks for it.
    let out = run("debug");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{marker}-response")), "{stderr}");
}
