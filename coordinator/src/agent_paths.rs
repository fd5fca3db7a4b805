//! Where the node agents' sockets and logs go. A Unix socket's path holds
//! at most 107 bytes, and a job's name may have 128: a long name goes into
//! these paths shortened, with a hash of the whole, so that every name a
//! job may have starts its agents.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The longest path a Unix socket can be bound at (`sun_path` less its
/// NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The longest a job's name goes into a path as it is.
const JOB_IN_PATH: usize = 32;

/// 48 bits of a hash of `bytes`, as 12 hex digits: enough to tell apart
/// the jobs of one user on one node.
fn short_hash(bytes: &[u8]) -> String {
    format!(
        "{:012x}",
        xxhash_rust::xxh3::xxh3_64(bytes) & 0xffff_ffff_ffff
    )
}

/// `job` as a folder name short enough for a socket's path: itself, or
/// for a longer name its first bytes and a hash of the whole.
fn job_in_path(job: &str) -> String {
    if job.len() <= JOB_IN_PATH {
        return job.to_owned();
    }
    let keep = JOB_IN_PATH - 13;
    let head: String = job.chars().take(keep).collect();
    format!("{head}-{}", short_hash(job.as_bytes()))
}

/// Where the agent of `job` of the store at `store` listens on every node
/// when agents are external: node-local and per user, and per store, so
/// that jobs of one name from two stores may share a host.
pub fn node_local_socket(job: &str, store: &Path) -> PathBuf {
    let key = short_hash(store.as_os_str().as_encoded_bytes());
    PathBuf::from(format!(
        "/tmp/cryo-{}/{}.{}/agent.sock",
        nix::unistd::getuid(),
        job_in_path(job),
        &key[..8]
    ))
}

/// Where `cryo run`'s own agents keep their sockets and logs: a folder of
/// this run's in the user's private folder of the temporary one.
pub fn default_scratch(job: &str) -> PathBuf {
    let user = format!("cryo-{}", nix::unistd::geteuid());
    std::env::temp_dir()
        .join(user)
        .join(format!("run-{}-{}", job_in_path(job), std::process::id()))
}

/// Refuses an agent socket path a Unix socket cannot be bound at, naming
/// what makes it long.
pub fn check_socket_path(socket: &Path) -> Result<()> {
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "the agent socket {} is {len} bytes long, and a Unix socket's path holds at most \
             {MAX_SOCKET_PATH}: pass a shorter --scratch (or set a shorter TMPDIR), or give \
             the nodes shorter names",
            socket.display()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_job_name_gives_a_socket_path_that_can_be_bound() {
        let longest = "j".repeat(cryo_core::names::MAX_JOB_NAME);
        cryo_core::names::check_job_name(&longest).unwrap();
        let socket = node_local_socket(&longest, Path::new("/shared/store"));
        check_socket_path(&socket).unwrap();
        assert!(socket.as_os_str().len() <= MAX_SOCKET_PATH);
        // Two long names alike in their first bytes stay apart.
        let other = format!("{}k", "j".repeat(cryo_core::names::MAX_JOB_NAME - 1));
        assert_ne!(
            node_local_socket(&other, Path::new("/shared/store")),
            socket
        );
        // A short name is kept as it is, readable.
        let short = node_local_socket("heat", Path::new("/shared/store"));
        assert!(short.to_str().unwrap().contains("/heat."), "{short:?}");
        assert!(
            default_scratch(&longest).as_os_str().len()
                < 80 + std::env::temp_dir().as_os_str().len()
        );
    }

    #[test]
    fn jobs_of_one_name_from_two_stores_have_their_own_agents() {
        let a = node_local_socket("heat", Path::new("/shared/a/store"));
        let b = node_local_socket("heat", Path::new("/shared/b/store"));
        assert_ne!(a, b);
        assert_eq!(a, node_local_socket("heat", Path::new("/shared/a/store")));
    }

    #[test]
    fn a_socket_path_too_long_is_refused_by_name() {
        let long = PathBuf::from(format!("/scratch/{}/agent.sock", "d".repeat(100)));
        let err = check_socket_path(&long).unwrap_err().to_string();
        assert!(
            err.contains("at most 107") && err.contains("--scratch"),
            "{err}"
        );
    }
}
