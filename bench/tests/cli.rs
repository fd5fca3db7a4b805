//! `cryo-bench` run as a user would run it.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn cryo_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cryo-bench"))
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_names_the_suite_options_and_both_benchmarks() {
    let out = cryo_bench(&["--help"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for needle in ["--quick", "--lock", "store", "agent"] {
        assert!(t.contains(needle), "{needle} missing from\n{t}");
    }
}

#[test]
fn store_measures_a_small_state_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = cryo_bench(&[
        "store",
        "--size",
        "8M",
        "--dir",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for needle in [
        "cryo store, full epoch",
        "cryo restore (decode + verify)",
        "incremental bytes written",
        "\"store_ratio\"",
    ] {
        assert!(t.contains(needle), "{needle} missing from\n{t}");
    }
}

#[test]
fn agent_names_a_missing_agent() {
    let out = cryo_bench(&["agent", "--agent", "/nonexistent/cryo-agent"]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains("/nonexistent/cryo-agent not found") && t.contains("--agent"),
        "{t}"
    );
}
