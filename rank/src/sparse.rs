//! Writing saved file contents back with their holes: runs of zero blocks
//! are punched out (`fallocate(FALLOC_FL_PUNCH_HOLE)`) rather than written,
//! so a sparse file (a table written at scattered offsets, a file extended
//! with `lseek` past its end) takes the blocks it took before the restart,
//! and bytes written there since are still undone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The unit of a hole: a page, which every filesystem that punches holes
/// allocates in, or in a fraction of.
const BLOCK: usize = 4096;

/// Writes `bytes` at `offset` of `file`, punching each run of whole
/// [`BLOCK`]s of zeros (aligned in the file) instead of writing it. Where
/// the filesystem cannot punch holes, the zeros are written.
pub(crate) fn write_sparse_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    // How far `offset` lies into its block of the file: bytes[i] starts a
    // block where (i + misalign) % BLOCK == 0.
    let misalign = usize::try_from(offset % 4096).unwrap_or(0);
    let zero_block_at = |i: usize| {
        (i + misalign) % BLOCK == 0 && i + BLOCK <= bytes.len() && is_zero(&bytes[i..i + BLOCK])
    };
    let file_offset = |i: usize| offset + i as u64;
    let mut at = 0usize;
    while at < bytes.len() {
        let mut end = at;
        if zero_block_at(at) {
            while zero_block_at(end) {
                end += BLOCK;
            }
            punch_or_write(file, &bytes[at..end], file_offset(at))?;
        } else {
            // Data up to the next whole block of zeros.
            end = (at + BLOCK - (at + misalign) % BLOCK).min(bytes.len());
            while end < bytes.len() && !zero_block_at(end) {
                end = (end + BLOCK).min(bytes.len());
            }
            file.write_all_at(&bytes[at..end], file_offset(at))?;
        }
        at = end;
    }
    Ok(())
}

fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits
        // the slice at u64 boundaries.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Makes `zeros.len()` bytes at `offset` read as zeros: a hole where the
/// filesystem punches one, else the zeros written.
fn punch_or_write(file: &File, zeros: &[u8], offset: u64) -> io::Result<()> {
    let (Ok(start), Ok(len)) = (i64::try_from(offset), i64::try_from(zeros.len())) else {
        return file.write_all_at(zeros, offset);
    };
    // SAFETY: fallocate on an fd this File owns, over a range it names; it
    // touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            len,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        err if matches!(
            err.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
        ) =>
        {
            file.write_all_at(zeros, offset)
        }
        err => Err(err),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn zero_blocks_become_holes_and_undo_what_was_written_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // What the rank wrote after the checkpoint, to be undone.
        file.write_all_at(&vec![0xAB; 8 << 20], 0).unwrap();
        // Saved: 8 bytes every MiB, in two pieces cut off any block edge.
        let mut saved = vec![0u8; 8 << 20];
        for mib in 0..8 {
            saved[mib << 20..(mib << 20) + 8].copy_from_slice(b"record!\n");
        }
        let cut = (3 << 20) + 1000;
        write_sparse_at(&file, &saved[..cut], 0).unwrap();
        write_sparse_at(&file, &saved[cut..], cut as u64).unwrap();
        file.set_len(saved.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), saved);
        // A few blocks, not 8 MiB of them (where holes can be punched).
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
    }

    #[test]
    fn unaligned_data_around_zeros_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let mut saved = vec![0u8; 3 * 4096 + 100];
        saved[0] = 1;
        saved[3 * 4096 + 99] = 2;
        write_sparse_at(&file, &saved[10..], 10).unwrap();
        file.write_all_at(&saved[..10], 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), saved);
    }
}
