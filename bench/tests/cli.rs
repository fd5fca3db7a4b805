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
        "--ops-sizes",
        "4M,8M",
        "--ops-ranks",
        "1,2",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for needle in [
        "cryo store, full epoch",
        "format 1 layout (file per chunk), full",
        "cryo restore (decode + verify)",
        "incremental bytes written",
        "\"store_ratio\"",
        "metadata operations",
        "projection: 1000 nodes",
        "\"dirs_touched\"",
    ] {
        assert!(t.contains(needle), "{needle} missing from\n{t}");
    }
    // One full checkpoint of 8 MiB (8 chunks) on one rank: a file per chunk
    // in format 1; a pack, a part, the manifest and the chunk index in 2.
    let created = |format: &str| -> u64 {
        t.lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|w| {
                w.len() > 5 && w[0] == format && w[1] == "8.0" && w[3] == "1" && w[4] == "full"
            })
            .unwrap_or_else(|| panic!("no format {format} row in\n{t}"))[5]
            .parse()
            .unwrap()
    };
    assert!(created("1") >= 8, "{t}");
    assert_eq!(created("2"), 4, "{t}");
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
