//! The worker binary refuses to start without its identity, naming what is
//! missing. (Having an integration test here also makes `cargo test
//! --workspace` build `flotilla-worker`, which the end-to-end tests run.)

use std::process::Command;

#[test]
fn without_its_environment_the_worker_names_the_missing_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"))
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FLOTILLA_MASTER_URL"), "{err}");
}

#[test]
fn a_bad_number_is_named_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"))
        .env_clear()
        .env("FLOTILLA_MASTER_URL", "http://127.0.0.1:1")
        .env("FLOTILLA_WORKER_ID", "zero")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FLOTILLA_WORKER_ID") && err.contains("zero"),
        "{err}"
    );
}
