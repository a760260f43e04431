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
    let (ok, _, err) = flotilla(&["up", &f, "--port", "0", "--ephemeral"]);
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
    let (ok, _, err) = flotilla(&["up", &f, "--port", "0", "--ephemeral", "--runtime", "nomad"]);
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

/// `check` and `up` refuse the same manifests with the same message.
fn both_refuse(file: &str, needles: &[&str]) {
    let (ok, _, check) = flotilla(&["check", file]);
    assert!(!ok, "check accepted {file}");
    let (ok, _, up) = flotilla(&["up", file, "--port", "0"]);
    assert!(!ok, "up accepted {file}");
    for needle in needles {
        assert!(check.contains(needle), "check: {check}");
        assert!(up.contains(needle), "up: {up}");
    }
}

#[test]
fn check_refuses_exactly_what_up_refuses() {
    // A value of the wrong type: once accepted by check and refused by up.
    let f = write(
        "zero.yaml",
        "system:\n  node_quantity: 1\n  shared_resources:\n    - name: n\n      type: Integer\n      values: { initial_value: \"zero\" }\n",
    );
    both_refuse(&f, &["shared resource `n`", "Integer", "zero"]);
}

#[test]
fn file_resources_read_only_regular_files_under_the_file_root() {
    let root = std::env::temp_dir().join(format!("flotilla-cli-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("data.txt"), "hello").unwrap();
    nix::unistd::mkfifo(&root.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let manifest = |path: &str, file_root: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata: {{ name: files }}\nspec:\n  fileRoot: {file_root}\n  workers: [{{ capacity: 1 }}]\n  resources:\n    - {{ name: f, type: File, path: '{path}' }}\n"
        )
    };
    let root_s = root.display().to_string();
    let good = write("file-good.yaml", &manifest("data.txt", &root_s));
    let (ok, out, err) = flotilla(&["check", &good]);
    assert!(ok, "{err}");
    assert!(out.contains("1 shared resources"), "{out}");

    for (name, path, file_root, needles) in [
        (
            "outside",
            "/etc/passwd",
            root_s.as_str(),
            &["outside spec.fileRoot"][..],
        ),
        (
            "environ",
            "/proc/self/environ",
            root_s.as_str(),
            &["outside spec.fileRoot"][..],
        ),
        ("fifo", "pipe", root_s.as_str(), &["a FIFO"][..]),
        (
            "device",
            "zero",
            "/dev",
            &["a device", "regular files only"][..],
        ),
    ] {
        let f = write(&format!("file-{name}.yaml"), &manifest(path, file_root));
        both_refuse(&f, needles);
    }
    // No fileRoot: no path at all.
    let f = write(
        "file-noroot.yaml",
        "system:\n  node_quantity: 1\n  shared_resources:\n    - name: f\n      type: File\n      values: { path: /etc/hostname }\n",
    );
    both_refuse(&f, &["spec.fileRoot"]);
    std::fs::remove_dir_all(&root).unwrap();
}
