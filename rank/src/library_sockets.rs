//! The MPI library's own TCP connections between ranks. Open MPI's TCP
//! transport listens during `MPI_Init`, before `cryo_init`, but connects
//! to a peer only at the first message to it, after: such a socket is not
//! among the fds open at `cryo_init`, and would be named at every
//! checkpoint as the application's socket that a restart cannot give back.
//!
//! At `cryo_init` each rank notes the TCP ports its fds of that moment
//! listen on, and the ranks exchange them. A socket opened since is the
//! library's when it was accepted on one of this rank's listening ports,
//! or connects to a port some rank of the job listens on. The restarted
//! job's `MPI_Init` makes its own connections again.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::RawFd;

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: u8 = 0x0A;

/// One socket of `/proc/self/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    state: u8,
}

/// The TCP ports the MPI library listens on: this rank's, and every
/// rank's of the job.
#[derive(Debug, Default, Clone)]
pub(crate) struct LibraryPorts {
    own: HashSet<u16>,
    job: HashSet<u16>,
}

/// The socket inode an fd link names (`socket:[N]`).
fn socket_inode(fd: RawFd) -> Option<u64> {
    let link = fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Parses `/proc/net/tcp` (or `tcp6`): each socket by its inode. Lines it
/// cannot read are left out.
fn parse_tcp(text: &str) -> HashMap<u64, TcpSocket> {
    let port = |endpoint: &str| {
        let (_, port) = endpoint.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    };
    let mut sockets = HashMap::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state), Some(inode)) =
            (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
        else {
            continue;
        };
        let socket = (|| {
            Some(TcpSocket {
                local_port: port(local)?,
                remote_port: port(remote)?,
                state: u8::from_str_radix(state, 16).ok()?,
            })
        })();
        if let (Some(socket), Ok(inode)) = (socket, inode.parse::<u64>()) {
            sockets.insert(inode, socket);
        }
    }
    sockets
}

/// The TCP sockets of this process's network namespace.
fn tcp_sockets() -> HashMap<u64, TcpSocket> {
    let mut sockets = HashMap::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            sockets.extend(parse_tcp(&text));
        }
    }
    sockets
}

impl LibraryPorts {
    /// The ports that `fds` (open at `cryo_init`) listen on.
    pub(crate) fn listening(fds: impl IntoIterator<Item = RawFd>) -> Vec<u16> {
        let inodes: Vec<u64> = fds.into_iter().filter_map(socket_inode).collect();
        if inodes.is_empty() {
            return Vec::new();
        }
        let sockets = tcp_sockets();
        let mut ports: Vec<u16> = (inodes.iter())
            .filter_map(|inode| sockets.get(inode))
            .filter(|socket| socket.state == LISTEN)
            .map(|socket| socket.local_port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// From this rank's listening ports and every rank's (this one's among
    /// them).
    pub(crate) fn new(own: &[u16], job: impl IntoIterator<Item = u16>) -> LibraryPorts {
        LibraryPorts {
            own: own.iter().copied().collect(),
            job: job.into_iter().collect(),
        }
    }

    /// Which of `fds` (opened since `cryo_init`) are the library's
    /// connections to other ranks.
    pub(crate) fn connections(&self, fds: &[RawFd]) -> Vec<RawFd> {
        if self.job.is_empty() {
            return Vec::new();
        }
        let inodes: Vec<(RawFd, u64)> = (fds.iter())
            .filter_map(|&fd| socket_inode(fd).map(|inode| (fd, inode)))
            .collect();
        if inodes.is_empty() {
            return Vec::new();
        }
        let sockets = tcp_sockets();
        (inodes.into_iter())
            .filter(|(_, inode)| sockets.get(inode).is_some_and(|s| self.is_library(s)))
            .map(|(fd, _)| fd)
            .collect()
    }

    fn is_library(&self, socket: &TcpSocket) -> bool {
        socket.state != LISTEN
            && (self.own.contains(&socket.local_port) || self.job.contains(&socket.remote_port))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn the_kernel_table_is_read_by_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
            1: 0100007F:9C40 0100007F:0CEA 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1\n   \
            2: garbage\n";
        let sockets = parse_tcp(text);
        assert_eq!(
            sockets[&4242],
            TcpSocket {
                local_port: 3306,
                remote_port: 0,
                state: LISTEN
            }
        );
        assert_eq!(sockets[&4343].remote_port, 3306);
        assert_eq!(sockets[&4343].state, 1);
        assert_eq!(sockets.len(), 2);
    }

    #[test]
    fn connections_to_and_from_the_ports_ranks_listen_on_are_the_library_s() {
        // The library's listener, open at cryo_init; another rank's; and
        // a server of the application's own, opened later.
        let library = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpListener::bind("127.0.0.1:0").unwrap();
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let own = LibraryPorts::listening([library.as_raw_fd(), 0]);
        assert_eq!(own, [library.local_addr().unwrap().port()]);
        let ports = LibraryPorts::new(
            &own,
            own.iter()
                .copied()
                .chain([peer.local_addr().unwrap().port()]),
        );

        let to_peer = TcpStream::connect(peer.local_addr().unwrap()).unwrap();
        let to_library = TcpStream::connect(library.local_addr().unwrap()).unwrap();
        let (accepted, _) = library.accept().unwrap();
        let to_app = TcpStream::connect(app.local_addr().unwrap()).unwrap();
        let fds = [
            to_peer.as_raw_fd(),
            accepted.as_raw_fd(),
            to_app.as_raw_fd(),
            app.as_raw_fd(),
        ];
        assert_eq!(
            ports.connections(&fds),
            [to_peer.as_raw_fd(), accepted.as_raw_fd()]
        );
        drop(to_library);
        // Without peers' ports (a rank alone), nothing is the library's.
        assert_eq!(LibraryPorts::default().connections(&fds), []);
    }
}
