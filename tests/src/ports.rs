//! Ports for the servers a test starts: free on 127.0.0.1 and below the kernel's ephemeral range.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use anyhow::Context;

/// A port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` lies in the ephemeral range, which is also where
/// every outgoing connection takes its source port: with hundreds of loopback connections in
/// a suite, one of them could take the port before the service binds it ("address already in
/// use"). Ports below the range are only ever taken by an explicit bind.
///
/// A port is handed out once per process: a caller that takes many before binding any (a
/// fleet's worth of service sockets) would otherwise get the same one twice about one time in
/// five at 100 ports, since each call probes from a fresh random place.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_start.saturating_sub(1_000));
    let high = ephemeral_start.saturating_sub(1).max(low + 1);
    // Processes of the suite run side by side: start at a place of our own and probe upwards.
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let span = u32::from(high - low);
    for attempt in 0..span {
        let offset = (seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(attempt * 7_919))
            % span;
        let port = low + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() && hand_out(port) {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
}

/// Ports this process has handed out already; `false` when `port` is one of them.
fn hand_out(port: u16) -> bool {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    HANDED_OUT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_never_gets_the_same_port_twice() {
        let ports: Vec<u16> = (0..300)
            .map(|_| free_port().expect("a free port"))
            .collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }
}
