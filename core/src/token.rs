//! Per-job secret tokens: every peer on a job's channels must present it.
//!
//! A token is 32 random bytes from the kernel, written as 64 hex digits. It
//! is handed to agents and ranks through a 0600 file or the environment, and
//! compared in constant time so a peer cannot learn it byte by byte.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use thiserror::Error;

use crate::store::durable;
use crate::store::fs::{IoStep, IoStepError};

/// A job's secret token.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

/// A token could not be made or read.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The kernel's random source failed.
    #[error(transparent)]
    Io(#[from] IoStepError),
    /// The text is not a token.
    #[error("malformed job token in {0}: expected 64 hex digits")]
    Malformed(String),
}

impl JobToken {
    /// A fresh random token.
    pub fn generate() -> Result<JobToken, TokenError> {
        let path = Path::new("/dev/urandom");
        let mut bytes = [0u8; 32];
        File::open(path)
            .step("open", path)?
            .read_exact(&mut bytes)
            .step("read", path)?;
        Ok(JobToken(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Parses a token's text (`what` names its source for errors).
    pub fn parse(text: &str, what: &str) -> Result<JobToken, TokenError> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed(what.to_owned()));
        }
        Ok(JobToken(text.to_ascii_lowercase()))
    }

    /// Reads a token from a file.
    pub fn read(path: &Path) -> Result<JobToken, TokenError> {
        let bytes = durable::read_capped(path, 1024)
            .map_err(|err| TokenError::Malformed(format!("{} ({err})", path.display())))?;
        JobToken::parse(
            &String::from_utf8_lossy(&bytes),
            &path.display().to_string(),
        )
    }

    /// Writes the token durably to a 0600 file.
    pub fn write(&self, path: &Path) -> Result<(), TokenError> {
        durable::write_replace(path, &[self.0.as_bytes(), b"\n"])?;
        Ok(())
    }

    /// The token's text, for handing to a child process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a peer presented.
    pub fn matches(&self, presented: &str) -> bool {
        let ours = self.0.as_bytes();
        let theirs = presented.as_bytes();
        let mut diff = u8::from(ours.len() != theirs.len());
        for (i, byte) in ours.iter().enumerate() {
            diff |= byte ^ theirs.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.write_str("JobToken(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_match() {
        let token = JobToken::generate().expect("random");
        assert_eq!(token.expose().len(), 64);
        assert_ne!(token, JobToken::generate().expect("random"));
        assert!(token.matches(token.expose()));
        assert!(!token.matches(""));
        assert!(!token.matches(&token.expose()[..63]));
        let mut wrong = token.expose().to_owned();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert!(!token.matches(&wrong));
        assert_eq!(format!("{token:?}"), "JobToken(…)");
        assert!(JobToken::parse("xyz", "env").is_err());
    }

    #[test]
    fn file_round_trip_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let token = JobToken::generate().expect("random");
        token.write(&path).expect("write");
        assert_eq!(JobToken::read(&path).expect("read"), token);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
