//! The `cryo` store subcommands, run as a user would run them.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cryo_core::format::chunk::ChunkCodec;
use cryo_core::format::header::HEADER_LEN;
use cryo_core::format::manifest::{RankRecord, RegionKind};
use cryo_core::store::writer::WriterConfig;
use cryo_core::store::{JobStore, Store};
use cryo_core::Manifest;

const CHUNK: usize = 64 << 10;

fn cryo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cryo"))
        .args(args)
        .output()
        .expect("cryo runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_add(seed))
        .collect()
}

fn write_epoch(job: &JobStore, epoch: u64, ranks: u32, seed: u8) -> Manifest {
    let config = WriterConfig {
        chunk_size: CHUNK,
        codec: ChunkCodec::default(),
        ..WriterConfig::default()
    };
    let writer = job.begin_epoch(epoch, config).unwrap();
    for rank in 0..ranks {
        let rank_writer = writer.rank(rank);
        let region = rank_writer
            .store_region(
                "grid",
                0x5a00_0000_0000,
                RegionKind::Anonymous,
                &data(CHUNK * 3, seed + rank as u8),
            )
            .unwrap();
        rank_writer
            .finish(RankRecord {
                regions: vec![region],
                ..RankRecord::new(rank, "n0", 1)
            })
            .unwrap();
    }
    drop(writer);
    job.commit_epoch(epoch, ranks, CHUNK as u32).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    job: JobStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let job = store.job("heat2d").unwrap();
    write_epoch(&job, 1, 2, 0);
    write_epoch(&job, 2, 2, 1);
    Fixture {
        _dir: dir,
        root,
        job,
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn ls_lists_committed_and_partial_epochs() {
    let f = fixture();
    // an abandoned epoch 3 with one rank part
    {
        let writer = f
            .job
            .begin_epoch(
                3,
                WriterConfig {
                    chunk_size: CHUNK,
                    ..WriterConfig::default()
                },
            )
            .unwrap();
        let rank = writer.rank(0);
        rank.finish(RankRecord::new(0, "n0", 1)).unwrap();
    }
    let out = cryo(&["ls", s(&f.root)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[1].starts_with("heat2d") && lines[1].contains("committed"),
        "{t}"
    );
    assert!(lines[2].contains("committed"), "{t}");
    assert!(
        lines[3].contains("partial") && lines[3].contains("1 part(s)"),
        "{t}"
    );
    assert!(
        t.lines().any(|l| l.starts_with("heat2d: 2 pack(s), ")),
        "{t}"
    );

    let out = cryo(&["ls", s(&f.root), "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["ranks"], 2);
    assert_eq!(rows[0]["epoch"], 1);
    assert_eq!(rows[2]["state"], "partial");
}

#[test]
fn ls_on_a_missing_store_names_it() {
    let out = cryo(&["ls", "/nonexistent/cryo-store"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("/nonexistent/cryo-store does not exist"),
        "{}",
        text(&out)
    );
}

#[test]
fn verify_passes_then_names_the_corrupt_chunk() {
    let f = fixture();
    let out = cryo(&["verify", s(&f.root), "heat2d"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("epoch 1: ok") && text(&out).contains("epoch 2: ok"));

    let manifest = f.job.load_manifest(2).unwrap();
    let chunk = manifest.ranks[1].regions[0].chunks[2];
    let hash = chunk.hash;
    let stored = f.job.locate_chunk(&chunk).unwrap();
    let mut bytes = fs::read(&stored.path).unwrap();
    let at = (stored.offset + stored.len - 1) as usize;
    bytes[at] ^= 0xff;
    fs::write(&stored.path, bytes).unwrap();

    let out = cryo(&["verify", s(&f.root), "heat2d", "2"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("rank 1 region \"grid\" offset 131072"), "{t}");
    assert!(t.contains(&hash.to_hex()), "{t}");
}

#[test]
fn verify_reports_a_missing_manifest_and_unknown_job() {
    let f = fixture();
    let out = cryo(&["verify", s(&f.root), "heat2d", "9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("is missing"), "{}", text(&out));
    let out = cryo(&["verify", s(&f.root), "nosuchjob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("\"nosuchjob\" has no checkpoints"),
        "{}",
        text(&out)
    );
    let out = cryo(&["verify", s(&f.root), "../etc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("invalid job name"), "{}", text(&out));
}

#[test]
fn describe_tells_each_kind() {
    let f = fixture();
    let manifest = f.job.manifest_path(2);
    let out = cryo(&["describe", s(&manifest)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("cryo epoch manifest")
            && t.contains(&format!(
                "format version  {}",
                cryo_core::format::header::FORMAT_VERSION
            )),
        "{t}"
    );
    assert!(t.contains("job \"heat2d\" epoch 2: 2 ranks"), "{t}");
    assert!(t.contains("rank 1 on n0 (pid 1): at restart"), "{t}");

    let chunk = f.job.load_manifest(2).unwrap().ranks[0].regions[0].chunks[0];
    let pack = f.job.locate_chunk(&chunk).unwrap().path;
    let out = cryo(&["describe", s(&pack)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("cryo pack") && t.contains("(matches its name)") && t.contains("sealed, "),
        "{t}"
    );
    assert!(t.contains("format version  2.0"), "{t}");

    // A pack whose writer died before its index: described by scanning.
    let len = fs::metadata(&pack).unwrap().len();
    let cryo_core::format::pack::ChunkPlace::Pack { pack: id, .. } = chunk.place else {
        panic!("not packed: {chunk:?}");
    };
    let index = f.job.pack_index(&id).unwrap();
    let end = index.entries.iter().map(|e| e.end()).max().unwrap();
    assert!(end < len);
    let torn = f.root.join("torn.pack");
    fs::copy(&pack, &torn).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .unwrap()
        .set_len(end - 5)
        .unwrap();
    let out = cryo(&["describe", s(&torn)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("entries found by scanning, which stopped"),
        "{t}"
    );

    let index = f.job.chunk_index_path(2);
    let out = cryo(&["describe", s(&index)]);
    let t = text(&out);
    assert!(
        t.contains("cryo chunk index") && t.contains("as of epoch 2"),
        "{t}"
    );
}

#[test]
fn describe_reads_future_versions_it_cannot_load() {
    let f = fixture();
    let mut bytes = fs::read(f.job.manifest_path(1)).unwrap();
    bytes[8..10].copy_from_slice(&7u16.to_le_bytes());
    bytes[10..12].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    let future = f.root.join("future.manifest");
    fs::write(&future, &bytes).unwrap();
    let out = cryo(&["describe", s(&future)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("cryo epoch manifest") && t.contains("format version  7.3.0"),
        "{t}"
    );
    assert!(
        t.contains("loadable        no") && t.contains("major version 7"),
        "{t}"
    );

    let junk = f.root.join("junk");
    fs::write(
        &junk,
        b"#!/bin/sh\necho hello, this is not a manifest at all....................",
    )
    .unwrap();
    let out = cryo(&["describe", s(&junk)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not a cryo file"), "{}", text(&out));

    let short = f.root.join("short");
    fs::write(&short, &bytes[..HEADER_LEN - 1]).unwrap();
    let out = cryo(&["describe", s(&short)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("truncated header"), "{}", text(&out));
}

fn crc32c(bytes: &[u8]) -> u32 {
    // Bitwise CRC-32C (Castagnoli), independent of the implementation under test.
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn gc_keeps_the_newest_epochs() {
    let f = fixture();
    let out = cryo(&["gc", s(&f.root), "--keep", "1", "--repack-below", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a fraction between 0 and 1"),
        "{}",
        text(&out)
    );
    // Epoch 1's pack keeps rank 1's chunks alive for epoch 2 (half of it):
    // repacked at --repack-below 1, and epoch 2 still verifies.
    let out = cryo(&["gc", s(&f.root), "--keep", "1", "--repack-below", "1"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("removed 1 epoch(s) [1]"), "{t}");
    assert!(t.contains("repacked 1 pack(s)"), "{t}");
    assert_eq!(f.job.committed_epochs().unwrap(), vec![2]);
    let out = cryo(&["verify", s(&f.root), "heat2d"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("packs: 2 of 2 sealed"),
        "{}",
        text(&out)
    );
}

/// `cryo bench` hands its arguments to the `cryo-bench` beside it (a stand-in
/// that prints them), and names `cryo-bench` when there is none. The files
/// are written by child processes, so no fd of them is open in this one
/// when they are executed (ETXTBSY).
#[test]
fn bench_hands_over_to_cryo_bench() {
    let dir = tempfile::tempdir().unwrap();
    let cryo = dir.path().join("cryo");
    let bench = dir.path().join("cryo-bench");
    let status = Command::new("cp")
        .arg(env!("CARGO_BIN_EXE_cryo"))
        .arg(&cryo)
        .status()
        .unwrap();
    assert!(status.success());
    let run = |args: &[&str]| {
        Command::new(&cryo)
            .args(args)
            .env("PATH", dir.path())
            .output()
            .unwrap()
    };

    let out = run(&["bench", "--quick"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cryo-bench not found"),
        "{}",
        text(&out)
    );

    let script = "printf '#!/bin/sh\\necho \"$*\"\\nexit 3\\n' > \"$1\" && chmod 755 \"$1\"";
    let status = Command::new("/bin/sh")
        .args(["-c", script, "sh"])
        .arg(&bench)
        .status()
        .unwrap();
    assert!(status.success());
    for args in [
        &["--quick", "--lock", "F"][..],
        &["store", "--size", "1G", "--dir", "D"],
        &["--help"],
    ] {
        let out = run(&[&["bench"][..], args].concat());
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert_eq!(text(&out), format!("{}\n", args.join(" ")));
    }
}

#[test]
fn describe_checks_a_chunk_file_against_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..65536u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    let encoded = ChunkCodec::default().encode(&data).unwrap();
    let path = dir.path().join(encoded.hash.to_hex());
    fs::write(&path, &encoded.file).unwrap();
    let out = cryo(&["describe", s(&path)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("shuffle8 + zstd + raw check 0x") && t.contains("content matches its name"),
        "{t}"
    );

    // The same bytes under another chunk's name.
    let other = dir.path().join(
        ChunkCodec::default()
            .encode(b"other")
            .unwrap()
            .hash
            .to_hex(),
    );
    fs::write(&other, &encoded.file).unwrap();
    let t = text(&cryo(&["describe", s(&other)]));
    assert!(
        t.contains("loadable        no: decoded bytes fail the chunk's raw check"),
        "{t}"
    );
}
