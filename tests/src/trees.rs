//! Comparing output folders: a run's against the uninterrupted reference's,
//! name by name and byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// What a path in an output folder is.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file, with its bytes.
    File(Vec<u8>),
    /// Anything else, by its file type.
    Other(String),
}

/// Everything under `root`, by path relative to it.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(rel, Entry::File(fs::read(&path).unwrap()));
            } else {
                out.insert(rel, Entry::Other(format!("{:?}", meta.file_type())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The line of `bytes` around offset `at`, escaped, for a message.
fn excerpt(bytes: &[u8], at: usize) -> String {
    let at = at.min(bytes.len());
    let line_start = bytes[..at]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let start = line_start.max(at.saturating_sub(60));
    let end = bytes.len().min(start + 100);
    format!("\"{}\"", bytes[start..end].escape_ascii())
}

/// How two versions of one file differ: sizes, the first differing byte,
/// its line, and both sides there.
fn file_diff(name: &Path, reference: &[u8], run: &[u8]) -> String {
    let at = reference
        .iter()
        .zip(run)
        .position(|(a, b)| a != b)
        .unwrap_or(reference.len().min(run.len()));
    let line = reference[..at].iter().filter(|b| **b == b'\n').count() + 1;
    format!(
        "{}: reference {} bytes, run {} bytes; first difference at byte {at} (line {line})\n    reference: {}\n    run:       {}",
        name.display(),
        reference.len(),
        run.len(),
        excerpt(reference, at),
        excerpt(run, at)
    )
}

/// Every difference between the reference folder and the run's; empty
/// when they are the same names with the same bytes.
pub fn compare_trees(reference: &Path, run: &Path) -> Vec<String> {
    let want = tree(reference);
    let got = tree(run);
    let mut problems = Vec::new();
    for (name, entry) in &want {
        match (entry, got.get(name)) {
            (_, None) => problems.push(format!(
                "{}: in the reference, missing from the run",
                name.display()
            )),
            (Entry::File(a), Some(Entry::File(b))) if a != b => {
                problems.push(file_diff(name, a, b));
            }
            (a, Some(b)) if std::mem::discriminant(a) != std::mem::discriminant(b) => {
                problems.push(format!(
                    "{}: {} in the reference, {} in the run",
                    name.display(),
                    kind(a),
                    kind(b)
                ));
            }
            _ => {}
        }
    }
    for (name, entry) in &got {
        if !want.contains_key(name) {
            problems.push(format!(
                "{}: {} left by the run, not in the reference",
                name.display(),
                kind(entry)
            ));
        }
    }
    problems
}

fn kind(entry: &Entry) -> String {
    match entry {
        Entry::Dir => "a directory".into(),
        Entry::File(bytes) => format!("a file of {} bytes", bytes.len()),
        Entry::Other(what) => what.clone(),
    }
}
