//! Whether an application buffer given to `cryo_protect` is memory the
//! runtime can write back on a restart: every byte of it in a mapping that
//! is writable. A `const` table or a buffer the program made read-only
//! would otherwise be saved at every checkpoint and crash the restart as
//! its contents were poured back (SIGSEGV inside the runtime).
//!
//! And whether a buffer lies in memory shared with other processes (an MPI
//! shared-memory window, a segment in `/dev/shm`, a shared file mapping):
//! their writes go through their own page tables, which the rank's write
//! tracking never sees, so such a buffer is copied whole at every
//! checkpoint.

use cryo_core::maps;

/// What in `[start, end)` is not writable memory, by `/proc/self/maps`;
/// `None` when all of it is (or when the maps cannot be read: the buffer
/// is then taken at the caller's word, as before).
pub(crate) fn unwritable(start: u64, len: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    unwritable_in(&maps, start, len)
}

/// [`unwritable`] over the text of a maps file.
fn unwritable_in(maps: &str, start: u64, len: u64) -> Option<String> {
    let Some(end) = start.checked_add(len) else {
        return Some(format!(
            "it runs past the end of the address space ({start:#x} + {len} bytes)"
        ));
    };
    let mut covered = start;
    for line in maps::lines(maps) {
        if line.end <= covered {
            continue;
        }
        if line.start > covered {
            // The maps are sorted: nothing is mapped at `covered`.
            break;
        }
        if line.prot() & maps::PROT_WRITE == 0 {
            return Some(format!(
                "{} at {:#x}-{:#x} is mapped {} (read-only)",
                line.what(),
                line.start,
                line.end,
                line.perms
            ));
        }
        covered = line.end;
        if covered >= end {
            return None;
        }
    }
    Some(format!("nothing is mapped at {covered:#x}"))
}

/// The first mapping shared with other processes (`MAP_SHARED`) that
/// overlaps `[start, start + len)`, described; `None` when there is none
/// (or when the maps cannot be read, which the caller then treats as
/// shared: tracking is only an optimisation).
pub(crate) fn shared_memory(start: u64, len: u64) -> Option<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Some("/proc/self/maps could not be read".into());
    };
    shared_in(&maps, start, len)
}

/// [`shared_memory`] over the text of a maps file.
fn shared_in(maps: &str, start: u64, len: u64) -> Option<String> {
    let end = start.saturating_add(len);
    maps::lines(maps)
        .find(|line| line.shared() && line.overlaps(start, end))
        .map(|line| format!("{} at {:#x}-{:#x}", line.what(), line.start, line.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d000000000-55d000001000 r--p 00000000 08:01 12 /usr/bin/app
55d000001000-55d000003000 rw-p 00001000 08:01 12 /usr/bin/app
55d000003000-55d000005000 rw-p 00000000 00:00 0 \n\
7f0000000000-7f0000400000 r--p 00000000 00:00 0 \n";

    #[test]
    fn a_buffer_touching_shared_memory_is_named() {
        let maps = "\
55d000003000-55d000005000 rw-p 00000000 00:00 0 \n\
7f0000000000-7f0000004000 rw-s 00000000 00:1a 77 /dev/shm/mpich_win.1234\n";
        assert_eq!(shared_in(maps, 0x55d0_0000_3000, 0x2000), None);
        let window = shared_in(maps, 0x55d0_0000_4000, 0x7f00_0000_0000).expect("shared");
        assert!(window.contains("/dev/shm/mpich_win.1234"), "{window}");
        assert!(shared_in(maps, 0x7f00_0000_1000, 8).is_some());
    }

    #[test]
    fn a_buffer_in_writable_mappings_is_taken_even_across_two() {
        assert_eq!(unwritable_in(MAPS, 0x55d0_0000_1000, 0x2000), None);
        assert_eq!(unwritable_in(MAPS, 0x55d0_0000_2ff0, 0x20), None);
    }

    #[test]
    fn a_read_only_or_unmapped_part_is_named() {
        let constant = unwritable_in(MAPS, 0x55d0_0000_0100, 16).expect("read-only");
        assert!(
            constant.contains("/usr/bin/app") && constant.contains("r--p"),
            "{constant}"
        );
        let protected = unwritable_in(MAPS, 0x7f00_0000_0000, 4096).expect("read-only");
        assert!(protected.contains("[anonymous]"), "{protected}");
        let past = unwritable_in(MAPS, 0x55d0_0000_4000, 0x2000).expect("runs off the end");
        assert!(
            past.contains("nothing is mapped at 0x55d000005000"),
            "{past}"
        );
        let wrapped = unwritable_in(MAPS, u64::MAX - 8, 64).expect("wraps");
        assert!(wrapped.contains("past the end"), "{wrapped}");
    }
}
