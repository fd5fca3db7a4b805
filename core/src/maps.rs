//! One line of `/proc/<pid>/maps`, parsed in one place for every reader:
//! the agent's capture of a parked rank's mappings, and the rank's own
//! checks (the files it maps, whether a buffer is writable memory, what
//! occupies an address it wants).
//!
//! A line is `start-end perms offset dev inode [path]`; the path, which may
//! hold spaces, is the rest of the line.

/// `PROT_READ`, `PROT_WRITE` and `PROT_EXEC` as [`MapsLine::prot`] gives
/// them (the values of `<sys/mman.h>`).
pub const PROT_READ: u32 = 1;
/// See [`PROT_READ`].
pub const PROT_WRITE: u32 = 2;
/// See [`PROT_READ`].
pub const PROT_EXEC: u32 = 4;

/// One mapping, borrowed from the maps text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsLine<'a> {
    /// Its first address.
    pub start: u64,
    /// One past its last address.
    pub end: u64,
    /// `rwxp` as the kernel shows it (four characters).
    pub perms: &'a str,
    /// Its offset in the file behind it.
    pub offset: u64,
    /// The inode of the file behind it; 0 for anonymous memory.
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `/dev/zero (deleted)`); empty
    /// for anonymous memory.
    pub path: &'a str,
}

impl<'a> MapsLine<'a> {
    /// Parses one line; `None` when it is not a maps line.
    pub fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        let _dev = fields.next()?;
        let inode = fields.next()?;
        let path = fields.next().unwrap_or("").trim_start();
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let offset = u64::from_str_radix(offset, 16).ok()?;
        let inode = inode.parse().ok()?;
        (perms.len() == 4 && end > start).then_some(MapsLine {
            start,
            end,
            perms,
            offset,
            inode,
            path,
        })
    }

    /// Its protection as `PROT_*` bits.
    pub fn prot(&self) -> u32 {
        let bytes = self.perms.as_bytes();
        let bit = |i: usize, c: u8, v: u32| if bytes.get(i) == Some(&c) { v } else { 0 };
        bit(0, b'r', PROT_READ) | bit(1, b'w', PROT_WRITE) | bit(2, b'x', PROT_EXEC)
    }

    /// Mapped `MAP_SHARED`.
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    /// The path of the file behind it, when a file is.
    pub fn file(&self) -> Option<&'a str> {
        (self.inode != 0 && self.path.starts_with('/')).then_some(self.path)
    }

    /// What it is, for people: its path or pseudo-name, or `[anonymous]`.
    pub fn what(&self) -> &'a str {
        if self.path.is_empty() {
            "[anonymous]"
        } else {
            self.path
        }
    }

    /// Whether it overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && self.end > start
    }
}

/// The lines of a maps text that parse, in order (the kernel sorts them by
/// address).
pub fn lines(text: &str) -> impl Iterator<Item = MapsLine<'_>> {
    text.lines().filter_map(MapsLine::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_every_field_and_keeps_spaces_in_its_path() {
        let line = MapsLine::parse(
            "7f00aa000000-7f00aa002000 rw-s 00003000 08:01 4242   /scratch/my run/out.dat",
        )
        .unwrap();
        assert_eq!((line.start, line.end), (0x7f00_aa00_0000, 0x7f00_aa00_2000));
        assert_eq!(line.prot(), PROT_READ | PROT_WRITE);
        assert!(line.shared());
        assert_eq!(line.offset, 0x3000);
        assert_eq!(line.file(), Some("/scratch/my run/out.dat"));
        assert!(line.overlaps(0x7f00_aa00_1fff, 0x7f00_aa00_3000));
        assert!(!line.overlaps(0x7f00_aa00_2000, 0x7f00_aa00_3000));
    }

    #[test]
    fn anonymous_and_pseudo_mappings_have_no_file() {
        let anon = MapsLine::parse("1000-2000 r-xp 00000000 00:00 0 ").unwrap();
        assert_eq!((anon.file(), anon.what()), (None, "[anonymous]"));
        assert_eq!(anon.prot(), PROT_READ | PROT_EXEC);
        assert!(!anon.shared());
        let heap = MapsLine::parse("1000-2000 rw-p 00000000 00:00 0    [heap]").unwrap();
        assert_eq!((heap.file(), heap.what()), (None, "[heap]"));
    }

    #[test]
    fn what_is_not_a_maps_line_does_not_parse() {
        for bad in [
            "",
            "zzzz-1000 rw-p 0 0:0 0",
            "2000-1000 rw-p 0 0:0 0",
            "1000-2000 rw-p",
            "1000-2000 rw 0 0:0 0",
            "1000-2000 rw-p 0 0:0 x",
        ] {
            assert_eq!(MapsLine::parse(bad), None, "{bad:?}");
        }
        assert_eq!(lines("junk\n1000-2000 rw-p 0 0:0 0\n").count(), 1);
    }
}
