//! CLI errors a user meets before any cluster starts: bad manifests and
//! unsafe binds are refused with a message naming the problem. (Having an
//! integration test here also makes `cargo test --workspace` build the
//! `flotilla` binary, which the end-to-end tests run.)

use std::process::Command;

fn flotilla(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env_remove("FLOTILLA_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("flotilla-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_describes_a_good_manifest() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out, err) = flotilla(&["check", &format!("{root}/../manifests/quickstart.yaml")]);
    assert!(ok, "{err}");
    assert!(
        out.contains("3 workers") && out.contains("[3, 4, 5]"),
        "{out}"
    );
}

#[test]
fn malformed_yaml_is_refused_with_its_location() {
    let f = write("bad.yaml", "system:\n  node_quantity: [3\n");
    let (ok, _, err) = flotilla(&["run", &f, "--port", "0"]);
    assert!(!ok);
    assert!(
        err.contains("not valid YAML") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let f = write(
        "unknown.yaml",
        "system:\n  node_quantity: 2\n  node_capacites: [1, 2]\n",
    );
    let (ok, _, err) = flotilla(&["up", &f, "--port", "0"]);
    assert!(!ok);
    assert!(
        err.contains("node_capacites") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn a_missing_field_is_named() {
    let f = write("missing.yaml", "system:\n  node_capacities: [1, 2]\n");
    let (ok, _, err) = flotilla(&["check", &f]);
    assert!(!ok);
    assert!(err.contains("node_quantity"), "{err}");
    let (ok, _, err) = flotilla(&["check", "/nonexistent/cluster.yaml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/cluster.yaml"), "{err}");
}

#[test]
fn binding_beyond_loopback_needs_a_token_or_insecure() {
    let f = write("ok.yaml", "system:\n  node_quantity: 1\n");
    let (ok, _, err) = flotilla(&["up", &f, "--port", "0", "--bind", "0.0.0.0"]);
    assert!(!ok);
    assert!(
        err.contains("FLOTILLA_TOKEN") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn an_unknown_runtime_is_named() {
    let f = write("ok2.yaml", "system:\n  node_quantity: 1\n");
    let (ok, _, err) = flotilla(&["up", &f, "--port", "0", "--runtime", "nomad"]);
    assert!(!ok);
    assert!(err.contains("nomad"), "{err}");
}

#[test]
fn every_example_manifest_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let (ok, out, err) = flotilla(&["check", path.to_str().unwrap()]);
        assert!(ok, "{}: {err}", path.display());
        assert!(out.contains("workers"), "{out}");
        checked += 1;
    }
    assert!(checked >= 6, "examples for each seed situation: {checked}");
}
