//! Every file of the original system's `seed-scenarios/` (beside the
//! repository), run unchanged through `flotilla run`, except that the
//! Fibonacci sizes are shrunk so each finishes in seconds and the sleeps are
//! scaled down (`--sleep-scale`), which keeps each scenario's meaning.

use std::collections::HashSet;
use std::path::PathBuf;

use flotilla_e2e::*;
use serde_json::Value;

fn scenario(name: &str) -> String {
    let path = seed_scenarios_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "seed scenario {} is missing ({e}): the seed scenarios must sit in ../shared/seed-scenarios beside the repository (or set FLOTILLA_SEED_SCENARIOS)",
            path.display()
        )
    })
}

/// The scenario with `fibonacci(from)` made `fibonacci(to)`.
fn shrunk(name: &str, from: u32, to: u32) -> PathBuf {
    let text = scenario(name);
    let needle = format!("fibonacci({from})");
    assert!(text.contains(&needle), "{name} no longer computes {needle}");
    temp_file(name, &text.replace(&needle, &format!("fibonacci({to})")))
}

fn run(file: &std::path::Path, sleep_scale: &str) -> Value {
    flotilla_run(file, &["--sleep-scale", sleep_scale, "--timeout", "120"]).unwrap()
}

fn tasks(report: &Value) -> &Vec<Value> {
    report["tasks"].as_array().unwrap()
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
fn prueba1_assignment_and_load_balancing() {
    let report = run(&shrunk("Prueba1.yaml", 45, 20), "1");
    assert_all_succeeded_once(&report, 11);
    for t in tasks(&report) {
        assert_eq!(t["result"]["response"], fib(20));
    }
    let caps: Vec<_> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["capacity"].as_u64().unwrap())
        .collect();
    assert_eq!(caps, vec![3, 4, 5]);
}

#[test]
fn prueba3_1_stopping_node_0_loses_nothing() {
    let report = run(&shrunk("Prueba3-1.yaml", 40, 29), "1");
    assert_all_succeeded_once(&report, 10);
    let stop = report["requests"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(stop["path"], "/stop/0");
    assert_eq!(stop["body"]["message"], "Node 0 stopped successfully");
    assert_eq!(report["nodes"][0]["restarts"], 1);
    for t in tasks(&report) {
        assert_eq!(t["result"]["response"], fib(29));
    }
}

#[test]
fn prueba3_2_a_task_that_exits_node_1_survives_elsewhere() {
    let report = run(&shrunk("Prueba3-2.yaml", 40, 22), "0.05");
    assert_all_succeeded_once(&report, 7);
    let suicide = tasks(&report).last().unwrap();
    assert_eq!(
        suicide["attempts"], 2,
        "first attempt on node 1 ended its interpreter: {suicide}"
    );
    assert_ne!(suicide["node"], 1);
    assert_eq!(suicide["result"]["stdout"], "Sobreviví\n");
    assert_eq!(suicide["result"]["response"], "No result returned.");
}

#[test]
fn prueba4_added_nodes_get_work() {
    let report = run(&shrunk("Prueba4.yaml", 40, 22), "0.05");
    assert_all_succeeded_once(&report, 12);
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
}

#[test]
fn prueba5_idle_nodes_steal_from_node_0() {
    let report = run(&shrunk("Prueba5.yaml", 40, 31), "0.05");
    assert_all_succeeded_once(&report, 7);
    assert!(report["steals"].as_u64().unwrap() >= 1, "{report}");
    let used: HashSet<_> = tasks(&report)
        .iter()
        .map(|t| t["node"].as_u64().unwrap())
        .collect();
    assert!(used.len() >= 2, "work spread beyond node 0: {used:?}");
    for t in tasks(&report) {
        assert_eq!(t["result"]["response"], fib(31));
    }
}

#[test]
fn prueba2_five_tasks_sum_the_shared_list_exactly() {
    let text = scenario("Prueba2.yaml");
    // The expected sum, from the scenario's own list.
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let list = &doc["system"]["shared_resources"][0]["values"]["initial_value"];
    let expected: u64 = list
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let report = run(&temp_file("Prueba2.yaml", &text), "0.05");
    assert_all_succeeded_once(&report, 6);
    let total = report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "total")
        .unwrap();
    assert_eq!(total["value"], expected, "{total}");
    assert_eq!(
        total["version"], 5,
        "one write grant per partial sum (read grants do not bump it)"
    );
    let last = tasks(&report).last().unwrap();
    assert_eq!(
        last["result"]["response"], expected,
        "the last task reads the exact sum"
    );
    let partials: u64 = tasks(&report)[..5]
        .iter()
        .map(|t| t["result"]["response"].as_u64().unwrap())
        .sum();
    assert_eq!(partials, expected);
}

#[test]
fn prueba3_3_a_read_lock_held_by_a_stopped_node_is_released() {
    // fibonacci(shared_list[0]) with shared_list[0] = 40: shrink the list's
    // first element, which is the Fibonacci size here.
    let text = scenario("Prueba3-3.yaml");
    assert!(text.contains("initial_value: [40, 2, 3, 4, 5]"));
    let file = temp_file(
        "Prueba3-3.yaml",
        &text.replace(
            "initial_value: [40, 2, 3, 4, 5]",
            "initial_value: [35, 2, 3, 4, 5]",
        ),
    );
    // fib(35) takes over a second; the scenario stops node 0 after its 3 s
    // sleep, scaled to 0.6 s: mid-computation, read lock held.
    let report = run(&file, "0.2");
    assert_all_succeeded_once(&report, 1);
    let t = &tasks(&report)[0];
    assert_eq!(t["result"]["response"], fib(35));
    assert_eq!(t["attempts"], 2, "node 0 was stopped while running it: {t}");
    assert_eq!(report["nodes"][0]["restarts"], 1);
    let list = report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "shared_list")
        .unwrap();
    assert_eq!(
        list["holders"].as_array().unwrap().len(),
        0,
        "no lock left behind: {list}"
    );
}
