//! `cryo ls`, `cryo describe`, `cryo verify` and `cryo gc`: looking at and
//! looking after a store.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cryo_core::format::chunk::{ChunkHash, FLAG_RAW_CHECK, FLAG_SHUFFLE8, FLAG_ZSTD};
use cryo_core::format::header::{CodecId, FileKind, Header, HeaderError, HEADER_LEN};
use cryo_core::format::manifest::ChunkIndex;
use cryo_core::format::manifest::{Manifest, RankRecord};
use cryo_core::store::{
    decode_meta_file, EpochState, EpochSummary, GcOptions, GcReport, JobStore, Store,
};
use serde::Serialize;

use crate::human;

/// One line of `cryo ls`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochListing {
    /// Job name.
    pub job: String,
    /// Epoch number.
    pub epoch: u64,
    /// `committed`, `partial` or `unreadable`.
    pub state: String,
    /// Rank count (committed) or rank parts present (partial).
    pub ranks: u64,
    /// Logical bytes of all regions.
    pub logical_bytes: u64,
    /// Stored bytes of the distinct chunks the epoch references.
    pub stored_bytes: u64,
    /// Stored bytes this epoch wrote itself.
    pub new_bytes: u64,
    /// Raw / stored of distinct chunks.
    pub compression_ratio: f64,
    /// Fraction of logical bytes saved by deduplication within the epoch.
    pub dedup_savings: f64,
    /// Fraction of the epoch's stored bytes reused from earlier epochs.
    pub reused_fraction: f64,
    /// Commit time (UTC) or a problem.
    pub note: String,
}

/// The one job asked for, or every job of the store.
pub fn job_names(store: &Store, only_job: Option<&str>) -> Result<Vec<String>> {
    Ok(match only_job {
        Some(job) => vec![job.to_owned()],
        None => store.jobs()?,
    })
}

/// Says on stderr which jobs of the store, other users', a command over
/// every job passes over (nothing when it names one job).
pub fn name_closed_jobs(store: &Store, only_job: Option<&str>) {
    if only_job.is_some() {
        return;
    }
    let closed = store.jobs_closed_to_us().unwrap_or_default();
    let (count, verbs) = match closed.len() {
        0 => return,
        1 => ("1 job".to_owned(), ("belongs", "is")),
        n => (format!("{n} jobs"), ("belong", "are")),
    };
    cryo_core::say!(
        "cryo: {count} in {} {} to other users and {} passed over (closed to you): {}",
        store.root().display(),
        verbs.0,
        verbs.1,
        closed.join(", ")
    );
}

/// Lists every job and epoch in the store.
pub fn list(store: &Store, only_job: Option<&str>) -> Result<Vec<EpochListing>> {
    let mut rows = Vec::new();
    for name in job_names(store, only_job)? {
        let job = store.existing_job(&name)?;
        for (epoch, state) in job.epochs()? {
            rows.push(match state {
                EpochState::Committed => match job.summarize(epoch) {
                    Ok(summary) => committed_row(&name, &summary),
                    Err(err) => blank_row(&name, epoch, "unreadable", 0, err.to_string()),
                },
                EpochState::Partial { parts } => blank_row(
                    &name,
                    epoch,
                    "partial",
                    parts as u64,
                    "not committed: being written or abandoned".into(),
                ),
            });
        }
    }
    Ok(rows)
}

fn committed_row(job: &str, summary: &EpochSummary) -> EpochListing {
    EpochListing {
        job: job.to_owned(),
        epoch: summary.epoch,
        state: "committed".into(),
        ranks: u64::from(summary.ranks),
        logical_bytes: summary.logical_bytes,
        stored_bytes: summary.unique_stored_bytes,
        new_bytes: summary.new_stored_bytes,
        compression_ratio: summary.compression_ratio(),
        dedup_savings: summary.dedup_savings(),
        reused_fraction: if summary.unique_stored_bytes == 0 {
            0.0
        } else {
            1.0 - (summary.new_stored_bytes as f64 / summary.unique_stored_bytes as f64).min(1.0)
        },
        note: human::utc(summary.created_unix_ms),
    }
}

fn blank_row(job: &str, epoch: u64, state: &str, ranks: u64, note: String) -> EpochListing {
    EpochListing {
        job: job.to_owned(),
        epoch,
        state: state.into(),
        ranks,
        logical_bytes: 0,
        stored_bytes: 0,
        new_bytes: 0,
        compression_ratio: 0.0,
        dedup_savings: 0.0,
        reused_fraction: 0.0,
        note,
    }
}

/// Renders `cryo ls` as a table.
pub fn render_list(rows: &[EpochListing]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>6} {:<10} {:>5} {:>11} {:>11} {:>11} {:>6} {:>6} {:>7}  COMMITTED",
        "JOB",
        "EPOCH",
        "STATE",
        "RANKS",
        "LOGICAL",
        "STORED",
        "WRITTEN",
        "RATIO",
        "DEDUP",
        "REUSED"
    );
    for row in rows {
        if row.state == "committed" {
            let _ = writeln!(
                out,
                "{:<20} {:>6} {:<10} {:>5} {:>11} {:>11} {:>11} {:>5.2}x {:>5.1}% {:>6.1}%  {}",
                row.job,
                row.epoch,
                row.state,
                row.ranks,
                human::bytes(row.logical_bytes),
                human::bytes(row.stored_bytes),
                human::bytes(row.new_bytes),
                row.compression_ratio,
                row.dedup_savings * 100.0,
                row.reused_fraction * 100.0,
                row.note
            );
        } else {
            let _ = writeln!(
                out,
                "{:<20} {:>6} {:<10} {:>5} {}",
                row.job,
                row.epoch,
                row.state,
                if row.state == "partial" {
                    format!("{} part(s)", row.ranks)
                } else {
                    "-".into()
                },
                row.note
            );
        }
    }
    if rows.is_empty() {
        out.push_str("(no checkpoints)\n");
    }
    out
}

/// Describes any file from its header; loads it too when this build can.
pub fn describe(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    if cryo_core::format::pack::is_pack(&head) {
        return crate::pack_view::describe_pack(path, &file, len);
    }
    let header = match Header::parse(&head) {
        Ok(header) => header,
        Err(HeaderError::BadMagic(magic)) => {
            bail!("{}: not a cryo file (magic {magic:#018x})", path.display())
        }
        Err(err) => bail!("{}: {err}", path.display()),
    };
    let mut out = String::new();
    let codec = match CodecId::from_u16(header.codec) {
        Some(CodecId::Raw) => "raw".to_string(),
        Some(CodecId::Bincode2FixintLe) => "bincode2-fixint-le".to_string(),
        None => format!("unknown codec {}", header.codec),
    };
    let _ = writeln!(out, "{}: cryo {}", path.display(), header.kind);
    let _ = writeln!(out, "  format version  {}", header.version);
    let _ = writeln!(out, "  codec           {codec} (id {})", header.codec);
    let _ = writeln!(
        out,
        "  flags           {:#x}{}",
        header.flags,
        chunk_flags(&header)
    );
    let _ = writeln!(
        out,
        "  payload         {} bytes stored, {} decoded",
        header.payload_len, header.raw_len
    );
    let _ = writeln!(out, "  file length     {len} bytes");
    if let Err(err) = header.check_loadable() {
        let _ = writeln!(out, "  loadable        no: {err}");
        return Ok(out);
    }
    if len != HEADER_LEN as u64 + header.payload_len {
        let _ = writeln!(
            out,
            "  loadable        no: file is {len} bytes, header says {}",
            HEADER_LEN as u64 + header.payload_len
        );
        return Ok(out);
    }
    let bytes = cryo_core::store::durable::read_capped(
        path,
        HEADER_LEN as u64 + header.kind.max_payload(),
    )?;
    match header.kind {
        FileKind::Manifest => match decode_meta_file::<Manifest>(header.kind, &bytes) {
            Ok(manifest) => {
                let summary = EpochSummary::of(&manifest);
                let _ = writeln!(out, "  loadable        yes, checksum ok");
                let _ = writeln!(
                    out,
                    "  job {:?} epoch {}: {} ranks, {} logical, {} stored, committed {}",
                    manifest.job,
                    manifest.epoch,
                    manifest.world_size,
                    human::bytes(summary.logical_bytes),
                    human::bytes(summary.unique_stored_bytes),
                    human::utc(manifest.created_unix_ms)
                );
                if let Err(err) = manifest.validate_shape() {
                    let _ = writeln!(out, "  inconsistent: {err}");
                }
                for rank in &manifest.ranks {
                    let _ = writeln!(
                        out,
                        "  rank {} on {} (pid {}): at restart",
                        rank.rank, rank.node, rank.pid
                    );
                    for line in crate::holdings::rank_plan(rank) {
                        let _ = writeln!(out, "    {line}");
                    }
                }
            }
            Err(err) => {
                let _ = writeln!(out, "  loadable        no: {err}");
            }
        },
        FileKind::RankPart => match decode_meta_file::<RankRecord>(header.kind, &bytes) {
            Ok(rank) => {
                let _ = writeln!(out, "  loadable        yes, checksum ok");
                let _ = writeln!(
                    out,
                    "  rank {} on {} (pid {}): {} regions, {} fds, {}",
                    rank.rank,
                    rank.node,
                    rank.pid,
                    rank.regions.len(),
                    rank.fds.len(),
                    human::bytes(rank.region_bytes())
                );
                for line in crate::holdings::rank_plan(&rank) {
                    let _ = writeln!(out, "    {line}");
                }
            }
            Err(err) => {
                let _ = writeln!(out, "  loadable        no: {err}");
            }
        },
        FileKind::ChunkIndex => match decode_meta_file::<ChunkIndex>(header.kind, &bytes) {
            Ok(index) => {
                let _ = writeln!(out, "  loadable        yes, checksum ok");
                let _ = writeln!(
                    out,
                    "  job {:?} as of epoch {}: {} packed chunks",
                    index.job,
                    index.epoch,
                    index.chunks.len()
                );
            }
            Err(err) => {
                let _ = writeln!(out, "  loadable        no: {err}");
            }
        },
        FileKind::Chunk => {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match name.parse::<ChunkHash>() {
                Ok(hash) => {
                    let mut raw = vec![0u8; usize::try_from(header.raw_len).unwrap_or(0)];
                    match cryo_core::format::chunk::decode_into_rehash(&bytes, &hash, &mut raw) {
                        Ok(()) => {
                            let _ =
                                writeln!(out, "  loadable        yes, content matches its name");
                        }
                        Err(err) => {
                            let _ = writeln!(out, "  loadable        no: {err}");
                        }
                    }
                }
                Err(_) => {
                    let ok = header.payload_matches(&bytes[HEADER_LEN..]);
                    let _ = writeln!(
                        out,
                        "  payload checksum {} (file is not named by its hash, content not checked)",
                        if ok { "ok" } else { "BAD" }
                    );
                }
            }
        }
    }
    Ok(out)
}

fn chunk_flags(header: &Header) -> String {
    if header.kind != FileKind::Chunk {
        return String::new();
    }
    let mut parts = Vec::new();
    if header.flags & FLAG_SHUFFLE8 != 0 {
        parts.push("shuffle8".to_string());
    }
    if header.flags & FLAG_ZSTD != 0 {
        parts.push("zstd".to_string());
    }
    if parts.is_empty() {
        parts.push("stored raw".to_string());
    }
    if header.flags & FLAG_RAW_CHECK != 0 {
        parts.push(format!("raw check {:#018x}", header.raw_check));
    }
    format!(" ({})", parts.join(" + "))
}

/// Outcome of `cryo verify`.
#[derive(Debug)]
pub struct VerifyOutcome {
    /// Human-readable report.
    pub text: String,
    /// Whether every epoch and chunk checked out.
    pub ok: bool,
}

/// Verifies one epoch, or every committed epoch of the job.
pub fn verify(job: &JobStore, epoch: Option<u64>) -> Result<VerifyOutcome> {
    let epochs = match epoch {
        Some(epoch) => vec![epoch],
        None => job.committed_epochs()?,
    };
    if epochs.is_empty() {
        bail!("job {:?} has no committed epoch to verify", job.name());
    }
    let mut text = String::new();
    let mut ok = true;
    let mut manifests = Vec::new();
    for epoch in epochs {
        match job.load_manifest(epoch) {
            Ok(manifest) => manifests.push(manifest),
            Err(err) => {
                ok = false;
                let _ = writeln!(text, "epoch {epoch}: BAD manifest: {err}");
            }
        }
    }
    let (packs_ok, packs_text) = crate::pack_view::verify_packs(job)?;
    ok &= packs_ok;
    text.push_str(&packs_text);
    for report in job.verify_manifests(&manifests) {
        if report.is_ok() {
            let _ = writeln!(
                text,
                "epoch {}: ok ({} chunks, {} verified)",
                report.epoch,
                report.chunks_checked,
                human::bytes(report.bytes_checked)
            );
            continue;
        }
        ok = false;
        let _ = writeln!(
            text,
            "epoch {}: BAD: {} chunk uses failed (by rank, region and offset; {} distinct chunks checked)",
            report.epoch,
            report.bad.len(),
            report.chunks_checked
        );
        for bad in &report.bad {
            let _ = writeln!(
                text,
                "  rank {} region {:?} offset {}: {}",
                bad.rank, bad.region, bad.offset, bad.problem
            );
        }
    }
    Ok(VerifyOutcome { text, ok })
}

/// Runs retention and GC over one job or every job.
pub fn gc(store: &Store, job: Option<&str>, options: GcOptions) -> Result<Vec<GcReport>> {
    let mut reports = Vec::new();
    for name in job_names(store, job)? {
        let job = store.existing_job(&name)?;
        reports.push(
            job.gc_with(options)
                .with_context(|| format!("collecting garbage of job {name:?}"))?,
        );
    }
    Ok(reports)
}

/// Renders GC reports.
pub fn render_gc(reports: &[GcReport]) -> String {
    let mut out = String::new();
    for report in reports {
        let _ = write!(
            out,
            "{}: removed {} epoch(s){}, {} partial epoch(s), {} chunk file(s), {} temp file(s), {} dead pack(s); repacked {} pack(s) ({} chunk(s) moved to {} new pack(s)); freed {}; {} chunk(s) live in {} pack(s)",
            report.job,
            report.removed_epochs.len(),
            if report.removed_epochs.is_empty() {
                String::new()
            } else {
                format!(" {:?}", report.removed_epochs)
            },
            report.removed_partial_epochs.len(),
            report.removed_chunks,
            report.removed_temp_files,
            report.removed_packs,
            report.repacked_packs,
            report.moved_chunks,
            report.new_packs,
            human::bytes(report.freed_bytes),
            report.live_chunks,
            report.live_packs + report.new_packs,
        );
        for problem in &report.unreadable_packs {
            let _ = write!(out, "\n  kept: {problem}");
        }
        if let Some(why) = &report.skipped {
            let _ = write!(out, " (sweep skipped: {why})");
        }
        out.push('\n');
    }
    if reports.is_empty() {
        out.push_str("(no jobs)\n");
    }
    out
}
