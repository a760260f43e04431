//! The scenario files of `tests/scenarios/`, in the original system's
//! `system:` format, each run through `flotilla run` as a user would, with
//! its outcome checked. They cover the original system's situations:
//! capacities 3, 4, 5 assigned 3, 4, 4; five tasks summing a shared list
//! under locks; node 0 stopped mid-queue; `exit()` on node 1; a read lock held
//! by a stopped node; `/add`; idle nodes stealing from node 0.
//!
//! When `FLOTILLA_SEED_SCENARIOS` names a directory holding the original
//! system's own files of the same situations (`Prueba1.yaml` ...), each test
//! runs that copy too, with the same checks, as an extra check of
//! compatibility. Those files compute Fibonacci numbers that take minutes, so
//! their sizes are shrunk to the ones our files use; sleeps are scaled with
//! `--sleep-scale`, which keeps each scenario's meaning.

use std::collections::HashSet;
use std::path::Path;

use flotilla_e2e::*;
use serde_json::Value;

/// One situation: our file, the original's file, and how to run both.
struct Situation {
    /// File name under `tests/scenarios/`.
    ours: &'static str,
    /// File name of the original system's copy (extra check only).
    original: &'static str,
    /// A text replacement making the original's copy finish in seconds;
    /// the text must be found.
    shrink: Option<(&'static str, &'static str)>,
    /// `--sleep-scale` for the scenario's `sleep`s.
    sleep_scale: &'static str,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("scenario {} cannot be read: {e}", path.display()))
}

fn run(file: &Path, sleep_scale: &str) -> Value {
    flotilla_run(file, &["--sleep-scale", sleep_scale, "--timeout", "120"]).unwrap()
}

/// Runs our file of the situation, then the original's copy when
/// `FLOTILLA_SEED_SCENARIOS` is set; `check` gets each report and the
/// scenario it came from.
fn run_situation(s: Situation, check: impl Fn(&Value, &serde_yaml::Value)) {
    let ours = scenarios_dir().join(s.ours);
    let text = read(&ours);
    let report = run(&ours, s.sleep_scale);
    check(&report, &serde_yaml::from_str(&text).unwrap());

    let Some(dir) = extra_scenarios_dir() else {
        return;
    };
    let mut text = read(&dir.join(s.original));
    if let Some((from, to)) = s.shrink {
        assert!(
            text.contains(from),
            "{} no longer contains {from:?}",
            s.original
        );
        text = text.replace(from, to);
    }
    let copy = temp_file(s.original, &text);
    let report = run(&copy, s.sleep_scale);
    check(&report, &serde_yaml::from_str(&text).unwrap());
}

fn tasks(report: &Value) -> &Vec<Value> {
    report["tasks"].as_array().unwrap()
}

fn resource<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no resource {name} in {report}"))
}

fn assert_all_succeeded_once(report: &Value, expected: usize) {
    let tasks = tasks(report);
    assert_eq!(tasks.len(), expected, "{report}");
    let ids: HashSet<_> = tasks.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), expected, "one result per task");
    for t in tasks {
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    let executed: u64 = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["executed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        executed as usize, expected,
        "every task executed exactly once to completion"
    );
}

#[test]
fn assignment_follows_capacities_3_4_5() {
    let situation = Situation {
        ours: "assignment.yaml",
        original: "Prueba1.yaml",
        shrink: Some(("fibonacci(45)", "fibonacci(20)")),
        sleep_scale: "1",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 11);
        for t in tasks(report) {
            assert_eq!(t["result"]["response"], fib(20));
        }
        let caps: Vec<_> = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["capacity"].as_u64().unwrap())
            .collect();
        assert_eq!(caps, vec![3, 4, 5]);
    });
}

#[test]
fn stopping_node_0_loses_nothing() {
    let situation = Situation {
        ours: "stop-node-0.yaml",
        original: "Prueba3-1.yaml",
        shrink: Some(("fibonacci(40)", "fibonacci(29)")),
        sleep_scale: "1",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 10);
        let stop = report["requests"].as_array().unwrap().last().unwrap();
        assert_eq!(stop["path"], "/stop/0");
        assert_eq!(stop["body"]["message"], "Node 0 stopped successfully");
        assert_eq!(report["nodes"][0]["restarts"], 1);
        for t in tasks(report) {
            assert_eq!(t["result"]["response"], fib(29));
        }
    });
}

#[test]
fn a_task_that_exits_node_1_survives_elsewhere() {
    let situation = Situation {
        ours: "exit-on-node-1.yaml",
        original: "Prueba3-2.yaml",
        shrink: Some(("fibonacci(40)", "fibonacci(22)")),
        sleep_scale: "0.05",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 7);
        let survivor = tasks(report).last().unwrap();
        assert_eq!(
            survivor["attempts"], 2,
            "first attempt on node 1 ended its interpreter: {survivor}"
        );
        assert_ne!(survivor["node"], 1);
        assert_eq!(survivor["result"]["stdout"], "Sobreviví\n");
        assert_eq!(survivor["result"]["response"], "No result returned.");
    });
}

#[test]
fn added_nodes_get_work() {
    let situation = Situation {
        ours: "add-nodes.yaml",
        original: "Prueba4.yaml",
        shrink: Some(("fibonacci(40)", "fibonacci(22)")),
        sleep_scale: "0.05",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 12);
        let nodes = report["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 7);
        let adds: Vec<_> = report["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["path"] == "/add")
            .collect();
        assert_eq!(adds[0]["body"]["message"], "Node 5 added successfully");
        assert_eq!(adds[1]["body"]["message"], "Node 6 added successfully");
        for id in [5, 6] {
            assert_eq!(nodes[id]["capacity"], 5);
            assert!(
                nodes[id]["executed"].as_u64().unwrap() >= 1,
                "node {id} got work: {nodes:?}"
            );
        }
    });
}

#[test]
fn idle_nodes_steal_from_node_0() {
    let situation = Situation {
        ours: "steal-from-node-0.yaml",
        original: "Prueba5.yaml",
        shrink: Some(("fibonacci(40)", "fibonacci(31)")),
        sleep_scale: "0.05",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 7);
        assert!(report["steals"].as_u64().unwrap() >= 1, "{report}");
        let used: HashSet<_> = tasks(report)
            .iter()
            .map(|t| t["node"].as_u64().unwrap())
            .collect();
        assert!(used.len() >= 2, "work spread beyond node 0: {used:?}");
        for t in tasks(report) {
            assert_eq!(t["result"]["response"], fib(31));
        }
    });
}

#[test]
fn five_tasks_sum_the_shared_list_exactly() {
    let situation = Situation {
        ours: "shared-sum.yaml",
        original: "Prueba2.yaml",
        shrink: None,
        sleep_scale: "0.05",
    };
    run_situation(situation, |report, scenario| {
        // The expected sum, from the scenario's own list (its List resource).
        let list = scenario["system"]["shared_resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "List")
            .expect("the scenario has a List resource");
        let expected: u64 = list["values"]["initial_value"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_all_succeeded_once(report, 6);
        let total = resource(report, "total");
        assert_eq!(total["value"], expected, "{total}");
        assert_eq!(
            total["version"], 5,
            "one write grant per partial sum (read grants do not bump it)"
        );
        let last = tasks(report).last().unwrap();
        assert_eq!(
            last["result"]["response"], expected,
            "the last task reads the exact sum"
        );
        let partials: u64 = tasks(report)[..5]
            .iter()
            .map(|t| t["result"]["response"].as_u64().unwrap())
            .sum();
        assert_eq!(partials, expected);
    });
}

#[test]
fn a_read_lock_held_by_a_stopped_node_is_released() {
    // The original computes fibonacci(list[0]) with list[0] = 40: shrink the
    // list's first element, which is the Fibonacci size there.
    let situation = Situation {
        ours: "read-lock-stopped-node.yaml",
        original: "Prueba3-3.yaml",
        shrink: Some((
            "initial_value: [40, 2, 3, 4, 5]",
            "initial_value: [35, 2, 3, 4, 5]",
        )),
        // fib(35) takes over a second; the scenario stops node 0 after its
        // 3 s sleep, scaled to 0.6 s: mid-computation, read lock held.
        sleep_scale: "0.2",
    };
    run_situation(situation, |report, _| {
        assert_all_succeeded_once(report, 1);
        let t = &tasks(report)[0];
        assert_eq!(t["result"]["response"], fib(35));
        assert_eq!(t["attempts"], 2, "node 0 was stopped while running it: {t}");
        assert_eq!(report["nodes"][0]["restarts"], 1);
        for r in report["resources"].as_array().unwrap() {
            assert_eq!(
                r["holders"].as_array().unwrap().len(),
                0,
                "no lock left behind: {r}"
            );
        }
    });
}
