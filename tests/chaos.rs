//! `flotilla chaos` end to end: two short soaks on the process runtime with
//! the same seed inject the same faults in the same order and find no
//! anomaly; `flotilla chaos check` gives the same verdict on a history, and
//! exits 1 naming the anomaly once the history is tampered with.

use std::path::Path;
use std::process::Command;

use flotilla_e2e::{bin, workspace_root};
use serde_json::Value;

fn soak(history: &Path) -> String {
    let out = Command::new(bin("flotilla"))
        .current_dir(workspace_root())
        .args([
            "chaos",
            "manifests/chaos.yaml",
            "--seconds",
            "10",
            "--seed",
            "42",
        ])
        .arg("--history")
        .arg(history)
        .env_remove("RUST_LOG")
        .output()
        .expect("flotilla chaos runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the soak failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("anomalies: none"), "{text}");
    text
}

fn events(history: &Path) -> Vec<Value> {
    std::fs::read_to_string(history)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The faults a soak injected, in order: (index, kind).
fn injected(events: &[Value]) -> Vec<(u64, String)> {
    of_type(events, "fault")
        .iter()
        .map(|f| {
            (
                f["index"].as_u64().unwrap(),
                f["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_seed_replays_its_faults_and_the_checker_judges_the_history() {
    let dir = std::env::temp_dir().join(format!("flotilla-chaos-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (dir.join("first.jsonl"), dir.join("second.jsonl"));
    soak(&first);
    soak(&second);
    let (a, b) = (events(&first), events(&second));

    // Same seed, same schedule, same faults injected in the same order.
    assert_eq!(of_type(&a, "schedule"), of_type(&b, "schedule"));
    let (fa, fb) = (injected(&a), injected(&b));
    assert!(fa.len() >= 3, "too few faults in 10 s: {fa:?}");
    let n = fa.len().min(fb.len());
    assert_eq!(fa[..n], fb[..n]);
    // Seed 42 starts with a worker kill, an interpreter kill, a /stop.
    let kinds: Vec<&str> = fa.iter().take(3).map(|f| f.1.as_str()).collect();
    assert_eq!(kinds, ["kill", "interpreter", "stop"]);
    // Every accepted task came through the feed; counters committed.
    assert!(of_type(&a, "feed").len() > 20, "too little work done");

    // The checker from the command line: the same verdict...
    let check = |history: &Path| {
        Command::new(bin("flotilla"))
            .args(["chaos", "check"])
            .arg(history)
            .output()
            .unwrap()
    };
    let out = check(&first);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("anomalies: none"),
        "{text}"
    );

    // ...and a lost commit put in by hand: exit code 1, the kind named.
    let tampered = dir.join("tampered.jsonl");
    let lines: Vec<String> = a
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if e["type"] == "final" {
                for r in e["resources"].as_array_mut().unwrap() {
                    if r["name"] == "chaos_c0" {
                        r["value"]["sum"] = (r["value"]["sum"].as_i64().unwrap() + 1).into();
                    }
                }
            }
            e.to_string()
        })
        .collect();
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let out = check(&tampered);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("counter_mismatch"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
