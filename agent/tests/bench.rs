//! `cryo-agent bench` runs `cryo-bench agent` with this agent.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// A stand-in `cryo-bench` beside a copy of `cryo-agent` prints the
/// arguments it is handed. The files are written by child processes, so no
/// fd of them is open in this one when they are executed (ETXTBSY).
#[test]
fn bench_hands_over_to_cryo_bench_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("cryo-agent");
    let script =
        "cp \"$1\" \"$2\" && printf '#!/bin/sh\\necho \"$*\"\\n' > \"$3\" && chmod 755 \"$3\"";
    let status = Command::new("/bin/sh")
        .args(["-c", script, "sh", env!("CARGO_BIN_EXE_cryo-agent")])
        .arg(&agent)
        .arg(dir.path().join("cryo-bench"))
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(&agent)
        .args(["bench", "--procs", "1"])
        .output()
        .unwrap();
    let agent = std::fs::canonicalize(&agent).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("agent --agent {} --procs 1\n", agent.display())
    );
}
