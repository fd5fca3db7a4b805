//! What `cryo describe` says of a pack file and what `cryo verify` says of
//! a job's packs.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use cryo_core::format::pack::{read_index_with, IndexSource, PackId, PACK_VERSION};
use cryo_core::store::pack_read::PackReadError;
use cryo_core::store::JobStore;

use crate::human;

/// Describes a pack: its id, its index (or what a scan finds without one)
/// and the chunks it holds.
pub fn describe_pack(path: &Path, file: &File, len: u64) -> Result<String> {
    let read = |offset: u64, buf: &mut [u8]| {
        file.read_exact_at(buf, offset)
            .with_context(|| format!("reading {}", path.display()))
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}: cryo pack", path.display());
    let (id, entries, source) = match read_index_with(len, read)? {
        Ok(found) => found,
        Err(err) => {
            let _ = writeln!(out, "  readable        no: {err}");
            return Ok(out);
        }
    };
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".pack"))
        .and_then(|n| n.parse::<PackId>().ok());
    let _ = writeln!(
        out,
        "  pack id         {id}{}",
        match named {
            Some(named) if named == id => " (matches its name)".to_string(),
            Some(named) => format!(" (MISMATCH: the file is named {named})"),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "  format version  {}.{}",
        PACK_VERSION.0, PACK_VERSION.1
    );
    let _ = writeln!(out, "  file length     {len} bytes");
    let how = match source {
        IndexSource::Sealed { index_offset } => {
            format!("sealed, {} entries, at offset {index_offset}", entries.len())
        }
        IndexSource::Scanned { stopped: None, .. } => format!(
            "none (its writer stopped before sealing it); {} entries found by scanning",
            entries.len()
        ),
        IndexSource::Scanned {
            end,
            stopped: Some(why),
        } => format!(
            "none (its writer stopped before sealing it); {} entries found by scanning, which stopped at offset {end}: {why}",
            entries.len()
        ),
    };
    let _ = writeln!(out, "  index           {how}");
    let stored: u64 = entries.iter().map(|e| u64::from(e.blob_len)).sum();
    let raw: u64 = entries.iter().map(|e| u64::from(e.raw_len)).sum();
    let _ = writeln!(
        out,
        "  chunks          {}: {} stored, {} decoded",
        entries.len(),
        human::bytes(stored),
        human::bytes(raw)
    );
    Ok(out)
}

/// Checks that every pack of `job` has a readable index (from its footer or
/// by scanning). Returns whether all do, and lines for the report: one per
/// damaged pack, one per pack that was never sealed.
pub fn verify_packs(job: &JobStore) -> Result<(bool, String)> {
    let mut ok = true;
    let mut text = String::new();
    let packs = job.list_packs()?;
    let mut sealed = 0;
    for id in &packs {
        match job.pack_index(id) {
            Ok(index) if index.sealed => sealed += 1,
            Ok(index) => {
                let _ = write!(
                    text,
                    "pack {id}: not sealed (its writer stopped first); {} chunks indexed by scanning",
                    index.entries.len()
                );
                if let Some(why) = &index.scan_stopped {
                    let _ = write!(
                        text,
                        "; the bytes after the last whole entry are unreadable ({why})"
                    );
                }
                text.push('\n');
            }
            Err(PackReadError::Missing(_)) => {}
            Err(err) => {
                ok = false;
                let _ = writeln!(text, "pack {id}: BAD: {err}");
            }
        }
    }
    if !packs.is_empty() {
        let _ = writeln!(text, "packs: {} of {} sealed", sealed, packs.len());
    }
    Ok((ok, text))
}

/// One line per job: its packs and format 1 chunk files, and their bytes,
/// for `cryo ls`.
pub fn render_usage(store: &cryo_core::store::Store, only_job: Option<&str>) -> Result<String> {
    let mut out = String::new();
    for name in crate::inspect::job_names(store, only_job)? {
        let job = store.existing_job(&name)?;
        let packs = job.list_packs()?;
        let bytes: u64 = packs
            .iter()
            .filter_map(|id| std::fs::metadata(job.pack_path(id)).ok())
            .map(|meta| meta.len())
            .sum();
        let _ = write!(
            out,
            "{name}: {} pack(s), {}",
            packs.len(),
            human::bytes(bytes)
        );
        let loose = count_files(&job.chunks_dir());
        if loose > 0 {
            let _ = write!(out, "; {loose} format 1 chunk file(s)");
        }
        out.push('\n');
    }
    Ok(out)
}

/// Files in the fan-outs of a format 1 chunk area.
fn count_files(dir: &Path) -> u64 {
    let Ok(fanouts) = std::fs::read_dir(dir) else {
        return 0;
    };
    fanouts
        .flatten()
        .filter_map(|fanout| std::fs::read_dir(fanout.path()).ok())
        .map(|entries| entries.count() as u64)
        .sum()
}
