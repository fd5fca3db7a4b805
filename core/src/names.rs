//! Names that become path components or identifiers: jobs and regions.
//!
//! A job name becomes a directory in the store, so it must never climb out
//! of it: no `/`, no `..`, no leading dot, nothing but a small alphabet.

use thiserror::Error;

/// Longest accepted job name.
pub const MAX_JOB_NAME: usize = 128;
/// Longest accepted region name.
pub const MAX_REGION_NAME: usize = 255;

/// A name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    /// A bad job name.
    #[error("invalid job name {name:?}: {why}")]
    Job {
        /// The name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A bad region name.
    #[error("invalid region name {name:?}: {why}")]
    Region {
        /// The name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
}

/// Checks a job name: 1–128 characters of `[A-Za-z0-9._-]`, not starting
/// with a dot.
pub fn check_job_name(name: &str) -> Result<(), NameError> {
    let bad = |why| {
        Err(NameError::Job {
            name: name.chars().take(200).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_JOB_NAME {
        return bad("longer than 128 bytes");
    }
    if name.starts_with('.') {
        return bad("starts with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a region name: 1–255 bytes, no `/`, no NUL, not `.` or `..`.
pub fn check_region_name(name: &str) -> Result<(), NameError> {
    let bad = |why| {
        Err(NameError::Region {
            name: name.chars().take(300).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_REGION_NAME {
        return bad("longer than 255 bytes");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("contains '/' or NUL");
    }
    if name == "." || name == ".." {
        return bad("is '.' or '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        assert!(check_job_name("heat2d-42.run_1").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\0", &"a".repeat(129)] {
            assert!(check_job_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn region_names() {
        assert!(check_region_name("grid[0] of rank 3").is_ok());
        for bad in ["", ".", "..", "a/b", "\0", &"r".repeat(256)] {
            assert!(check_region_name(bad).is_err(), "{bad:?}");
        }
    }
}
