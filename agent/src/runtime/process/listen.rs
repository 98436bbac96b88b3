//! Listening sockets the agent binds once and holds for a service, so that they outlive every
//! instance of it: a restart, a crash or a `code_change` never closes the port, and connections
//! that arrive while no instance accepts wait in the kernel's listen queue.
//!
//! They reach the service the systemd way (`sd_listen_fds`): mapped to fds 3, 4, … with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (see `supervisor.rs` for how `LISTEN_PID`
//! is set to the child's own pid without `unsafe`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::config::{ListenAddress, ListenSpec};

/// One bound socket.
#[derive(Debug)]
pub struct HeldSocket {
    pub spec: ListenSpec,
    pub fd: OwnedFd,
    /// For TCP: the bound address.
    pub local: Option<SocketAddr>,
    /// The socket's inode, to find it in `/proc/net/tcp`.
    pub inode: u64,
    /// A duplicate of `fd` for the readiness probes (see [`accept_queue_empty`]).
    probe: Option<Arc<OwnedFd>>,
}

/// What probes need to know about a held socket.
#[derive(Debug, Clone)]
pub struct HeldInfo {
    pub local: SocketAddr,
    pub inode: u64,
    probe: Option<Arc<OwnedFd>>,
}

impl PartialEq for HeldInfo {
    fn eq(&self, other: &Self) -> bool {
        self.local == other.local && self.inode == other.inode
    }
}

impl Eq for HeldInfo {}

impl HeldInfo {
    /// Whether the service took every connection off the listen queue: a poll of the held
    /// socket (readable = a connection waits), one cheap syscall; `/proc/net/tcp` (the whole
    /// table, read and parsed) only when the socket could not be duplicated. `None` when it
    /// cannot be told.
    pub fn accept_queue_empty(&self) -> Option<bool> {
        match &self.probe {
            Some(fd) => accept_queue_empty(fd),
            None => accept_queue(self.inode).map(|n| n == 0),
        }
    }
}

impl HeldSocket {
    pub fn info(&self) -> Option<HeldInfo> {
        self.local.map(|local| HeldInfo {
            local,
            inode: self.inode,
            probe: self.probe.clone(),
        })
    }
}

/// Whether the listening socket `fd` has no connection waiting: a listening socket polls
/// readable exactly when its accept queue holds one.
pub fn accept_queue_empty(fd: &OwnedFd) -> Option<bool> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => Some(true),
        Ok(_) => Some(!fds[0].revents()?.contains(PollFlags::POLLIN)),
        Err(_) => None,
    }
}

/// Bind `spec`.
pub fn bind(spec: &ListenSpec) -> Result<HeldSocket, String> {
    let what = spec.address.to_string();
    let (fd, local): (OwnedFd, Option<SocketAddr>) = match &spec.address {
        ListenAddress::Tcp(address) => {
            let addrs: Vec<SocketAddr> = address
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {what}: {e}"))?
                .collect();
            // std sets SO_REUSEADDR, so a port left in TIME_WAIT by an earlier agent binds.
            let listener = std::net::TcpListener::bind(&addrs[..])
                .map_err(|e| format!("cannot listen on {what}: {e}"))?;
            let local = listener.local_addr().ok();
            (OwnedFd::from(listener), local)
        }
        ListenAddress::Unix(path) => {
            // A socket file left by an earlier run would make bind fail; anything else there is
            // not ours to delete.
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && meta.file_type().is_socket()
            {
                let _ = std::fs::remove_file(path);
            }
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {what}: {e}"))?;
            (OwnedFd::from(listener), None)
        }
    };
    let inode = fd
        .try_clone()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .map(|m| m.ino())
        .unwrap_or_default();
    let probe = local
        .is_some()
        .then(|| fd.try_clone().ok().map(Arc::new))
        .flatten();
    Ok(HeldSocket {
        spec: spec.clone(),
        fd,
        local,
        inode,
        probe,
    })
}

/// Connections waiting in the listen queue of the TCP socket with `inode` (Linux: the
/// `rx_queue` column of a LISTEN socket in `/proc/net/tcp{,6}`). `None` when it cannot be told.
pub fn accept_queue(inode: u64) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(queue) = queue_in(&text, inode) {
            return Some(queue);
        }
    }
    None
}

fn queue_in(table: &str, inode: u64) -> Option<u64> {
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        if fields.len() < 10 || fields[9].parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let (_, rx) = fields[4].split_once(':')?;
        return u64::from_str_radix(rx, 16).ok();
    }
    None
}

/// Whether a probe of `target` reaches the held socket `held` (same port, and the same address
/// or a wildcard bind).
pub fn probes_held(target: &SocketAddr, held: &HeldInfo) -> bool {
    target.port() == held.local.port()
        && (held.local.ip().is_unspecified() || held.local.ip() == target.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_queue_is_read_from_proc() -> Result<(), String> {
        let spec = ListenSpec {
            address: ListenAddress::Tcp("127.0.0.1:0".into()),
            name: "t".into(),
        };
        let held = bind(&spec)?;
        let local = held.local.ok_or("no local address")?;
        assert_eq!(accept_queue(held.inode), Some(0));
        // Nobody accepts: the kernel queues the connection.
        let _client = std::net::TcpStream::connect(local).map_err(|e| e.to_string())?;
        let mut queued = None;
        for _ in 0..100 {
            queued = accept_queue(held.inode);
            if queued == Some(1) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(queued, Some(1));
        let info = held.info().ok_or("no info")?;
        assert!(probes_held(&local, &info));
        // The poll of the held socket agrees with /proc.
        assert_eq!(info.accept_queue_empty(), Some(false));
        let listener = std::net::TcpListener::from(held.fd.try_clone().map_err(|e| e.to_string())?);
        let _accepted = listener.accept().map_err(|e| e.to_string())?;
        assert_eq!(info.accept_queue_empty(), Some(true));
        assert_eq!(accept_queue(held.inode), Some(0));
        Ok(())
    }

    #[test]
    fn proc_table_parsing() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(queue_in(table, 4242), Some(3));
        assert_eq!(queue_in(table, 1), None);
    }
}
