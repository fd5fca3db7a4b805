//! Tests of `launch.rs`.

use super::*;

fn nodes(spec: &str) -> Vec<NodeSpec> {
    parse_nodes(spec).expect("parses")
}

/// The command's arguments, space-separated.
fn args(command: &Command) -> String {
    command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn parses_and_refuses() {
    assert_eq!(
        nodes("a:2, b:2"),
        vec![
            NodeSpec {
                name: "a".into(),
                slots: Some(2)
            },
            NodeSpec {
                name: "b".into(),
                slots: Some(2)
            }
        ]
    );
    assert_eq!(parse_nodes(""), Err(PlacementError::Empty));
    assert!(matches!(
        parse_nodes("a:0"),
        Err(PlacementError::BadSlots { .. })
    ));
    assert!(matches!(
        parse_nodes("a:x"),
        Err(PlacementError::BadSlots { .. })
    ));
    assert!(matches!(
        parse_nodes("../a:1"),
        Err(PlacementError::BadName(_))
    ));
    assert!(matches!(
        parse_nodes("a,a"),
        Err(PlacementError::Duplicate(_))
    ));
}

#[test]
fn places_blocks() {
    let placed = place(&nodes("a:2,b:2"), 4).expect("fits");
    assert_eq!(
        placed[0],
        NodePlacement {
            node: "a".into(),
            ranks: 0..2
        }
    );
    assert_eq!(
        placed[1],
        NodePlacement {
            node: "b".into(),
            ranks: 2..4
        }
    );
    let placed = place(&nodes("a,b,c"), 4).expect("fits");
    let sizes: Vec<u32> = placed.iter().map(|p| p.ranks.end - p.ranks.start).collect();
    assert_eq!(sizes, vec![2, 1, 1]);
    let placed = place(&nodes("a:4,b:4"), 4).expect("fits");
    assert_eq!(placed.len(), 1);
    assert!(matches!(
        place(&nodes("a:1,b:1"), 4),
        Err(PlacementError::TooFewSlots {
            ranks: 4,
            slots: 2,
            ..
        })
    ));
    assert_eq!(place(&nodes("a"), 0), Err(PlacementError::NoRanks));
}

#[test]
fn srun_merges_blocks_into_one_step() {
    let blocks = [
        LaunchBlock {
            ranks: 3,
            env: vec![(
                "CRYO_AGENT_SOCKET".into(),
                "/tmp/cryo-1/j/agent.sock".into(),
            )],
        },
        LaunchBlock {
            ranks: 1,
            env: vec![],
        },
    ];
    let command = build_command(
        &Launcher::Srun("srun".into()),
        &[],
        &blocks,
        &"app".into(),
        &["--x".into()],
        &[],
    );
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(args[0], "--ntasks=4");
    assert!(args.contains(&"--kill-on-bad-exit=1".to_owned()));
    assert_eq!(&args[args.len() - 2..], ["app", "--x"]);
    let env: Vec<_> = command.get_envs().collect();
    assert!(env
        .iter()
        .any(|(k, v)| *k == "CRYO_AGENT_SOCKET"
            && v.is_some_and(|v| v == "/tmp/cryo-1/j/agent.sock")));
}

#[test]
fn hydra_mpmd_blocks() {
    let blocks = [
        LaunchBlock {
            ranks: 2,
            env: vec![("CRYO_AGENT_SOCKET".into(), "/s/a".into())],
        },
        LaunchBlock {
            ranks: 2,
            env: vec![("CRYO_AGENT_SOCKET".into(), "/s/b".into())],
        },
    ];
    let command = build_command(
        &Launcher::Hydra("mpiexec".into()),
        &[],
        &blocks,
        &OsString::from("heat2d"),
        &[OsString::from("--iters"), OsString::from("100")],
        &["CRYO_JOB".into()],
    );
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args.join(" "),
        "-n 2 -env CRYO_AGENT_SOCKET /s/a heat2d --iters 100 : -n 2 -env CRYO_AGENT_SOCKET /s/b heat2d --iters 100"
    );
}

#[test]
fn hosts_reach_the_launcher() {
    let hosts = place(&nodes("n0:2,n1:2"), 3).expect("fits");
    let blocks = [LaunchBlock {
        ranks: 3,
        env: vec![],
    }];
    let hydra = Launcher::Hydra("mpiexec".into());
    let command = build_command(&hydra, &hosts, &blocks, &"app".into(), &[], &[]);
    assert_eq!(args(&command), "-hosts n0:2,n1:1 -n 3 app");
    let ompi = Launcher::OpenMpi("mpirun".into());
    let command = build_command(&ompi, &hosts, &blocks, &"app".into(), &[], &[]);
    assert!(args(&command).ends_with("--host n0:2,n1:1 -np 3 app"));
    let names = vec!["n0".to_owned(), "n1".to_owned()];
    assert_eq!(
        args(&agent_step_command(&hydra, &names, 2, &[])),
        "-disable-auto-cleanup -hosts n0:1,n1:1 -n 2"
    );
    assert!(args(&agent_step_command(&ompi, &names, 2, &[])).ends_with("--host n0:1,n1:1 -np 2"));
    assert!(args(&agent_step_command(
        &Launcher::Srun("srun".into()),
        &[],
        3,
        &[]
    ))
    .contains("--nodes=3 --ntasks=3 --ntasks-per-node=1"));
}

/// Open MPI starts a rank on another host with sshd's environment plus
/// what `-x` names: every exported name is carried, by name only, and
/// a block's own value wins over the launcher's.
#[test]
fn open_mpi_carries_exported_names_to_other_hosts() {
    let blocks = [
        LaunchBlock {
            ranks: 2,
            env: vec![("CRYO_AGENT_SOCKET".into(), "/s/a".into())],
        },
        LaunchBlock {
            ranks: 1,
            env: vec![],
        },
    ];
    let exported: Vec<String> = ["CRYO_AGENT_SOCKET", "CRYO_JOB", "CRYO_TOKEN"]
        .map(String::from)
        .to_vec();
    let ompi = Launcher::OpenMpi("mpirun".into());
    let command = build_command(&ompi, &[], &blocks, &"app".into(), &[], &exported);
    assert!(
        args(&command).ends_with(
            "-np 2 -x CRYO_AGENT_SOCKET=/s/a -x CRYO_JOB -x CRYO_TOKEN app : \
             -np 1 -x CRYO_AGENT_SOCKET -x CRYO_JOB -x CRYO_TOKEN app"
        ),
        "{}",
        args(&command)
    );
    // No value on the command line, where any user could read it.
    assert!(!args(&command).contains("CRYO_TOKEN="));
    let names = vec!["n0".to_owned(), "n1".to_owned()];
    assert!(args(&agent_step_command(&ompi, &names, 2, &exported))
        .ends_with("-np 2 -x CRYO_AGENT_SOCKET -x CRYO_JOB -x CRYO_TOKEN"));
}

/// A job whose ranks 0 and 1 ran on host a and rank 2 on host b, each
/// host writing a log of its own at `/tmp/node.log`.
fn logs_of_each_host() -> cryo_core::Manifest {
    use cryo_core::format::chunk::ChunkHash;
    use cryo_core::format::manifest::{ChunkRef, RankRecord, RegionKind, RegionRecord};
    use cryo_core::format::pack::ChunkPlace;
    use cryo_core::format::process::SavedFile;
    let rank = |rank: u32, node: &str| {
        let mut record = RankRecord::new(rank, node, 10 + rank);
        record.process.machine = format!("boot-{node}");
        let path = "/tmp/node.log".to_owned();
        (record.process.saved_files).push(SavedFile {
            path: path.clone(),
            mode: Some(0o644),
            on_node: true,
            written: true,
            dev: 1,
            ino: 2,
        });
        record.regions.push(RegionRecord {
            name: "cryo:closed:0".into(),
            addr: 0,
            len: 1,
            kind: RegionKind::NodeFileContents { path },
            chunks: vec![ChunkRef {
                offset: 0,
                len: 1,
                stored_len: 0,
                hash: ChunkHash::of(node.as_bytes()),
                place: ChunkPlace::Loose,
            }],
        });
        record
    };
    cryo_core::Manifest {
        job: "j".into(),
        epoch: 1,
        created_unix_ms: 0,
        world_size: 3,
        chunk_size: 1 << 20,
        ranks: vec![rank(0, "a"), rank(1, "a"), rank(2, "b")],
    }
}

#[test]
fn a_restart_that_would_put_two_hosts_logs_on_one_node_is_refused() {
    let manifest = logs_of_each_host();
    let check = |spec: &str, emulated: bool| {
        let placed = place(&nodes(spec), 3).unwrap();
        check_restart_placement(&manifest, &placed, emulated).map_err(|err| err.to_string())
    };
    // Host a's ranks together, b's elsewhere, or every rank apart.
    assert_eq!(check("c:2,d:1", false), Ok(()));
    assert_eq!(check("b:1,a:1,c:1", false), Ok(()));
    let refused = check("c:1,d:2", false).unwrap_err();
    assert!(
        refused.starts_with(
            "ranks 1 (on node a at the checkpoint) and 2 (on node b) held different files at \
             /tmp/node.log"
        ) && refused.contains("placed together on node d")
            && refused.ends_with("place them on different ones"),
        "{refused}"
    );
    // Nodes emulated on this machine are one as far as its files go.
    let refused = check("c:2,d:1", true).unwrap_err();
    assert!(
        refused.starts_with("ranks 0 (on node a at the checkpoint) and 2 (on node b)")
            && refused.contains("placed together on node this machine (nodes c, d)")
            && refused.ends_with("restart these ranks on separate hosts (--hosts)"),
        "{refused}"
    );
}
