//! Lines for people on stderr, each written in one `write(2)`.
//!
//! `eprintln!` writes a formatted line piece by piece, a system call each.
//! cryo's processes share their stderr with the job's ranks (the launcher
//! merges the ranks' output into `cryo run`'s), so such a line can be cut
//! in two by another process's. One write of a line shorter than the pipe
//! buffer (4 KiB) is never interleaved with another.

use std::fmt;
use std::io::Write;

/// Writes `text` and a newline to stderr in one write (errors are
/// ignored, as `eprintln!` would panic on them and a lost line must not
/// stop a rank or a checkpoint).
pub fn line(text: fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_all(&line_bytes(text));
}

fn line_bytes(text: fmt::Arguments<'_>) -> Vec<u8> {
    let mut bytes = fmt::format(text).into_bytes();
    bytes.push(b'\n');
    bytes
}

/// `eprintln!`, in one write: see [`line`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_formatted_whole_with_its_newline() {
        let rank = 3;
        assert_eq!(
            line_bytes(format_args!("cryo: rank {rank}: {}", "gone")),
            b"cryo: rank 3: gone\n"
        );
    }
}
