//! The wire's floor for a barrier's fan-out, measured in the same run as the bench: one thread
//! writes one 32-byte frame to each of N connected loopback TCP sockets (no runtime, no HTTP/2,
//! no coordinator; what telling N peers one small thing costs the kernel here), then reads all
//! N frames back on the other ends. `scale-bench` prints the coordinator's fan-out and the
//! agents' release latency as ratios to it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::Stats;

/// Frame size: about what a barrier release is on the wire.
const FRAME: usize = 32;

/// One floor measurement.
#[derive(Debug, Clone, Serialize)]
pub struct WireFloor {
    pub sockets: usize,
    /// From the first write to the last write returned, ms.
    pub written_ms: Stats,
    /// From the first write to the last frame read on the other ends, ms.
    pub all_read_ms: Stats,
}

/// Measure the floor over `sockets` connections, `rounds` times.
pub fn wire_fanout(sockets: usize, rounds: usize) -> anyhow::Result<WireFloor> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("floor: cannot bind 127.0.0.1")?;
    let address = listener.local_addr()?;
    let mut senders = Vec::with_capacity(sockets);
    let mut receivers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let receiver = TcpStream::connect(address).context("floor: cannot connect")?;
        let (sender, _) = listener.accept().context("floor: cannot accept")?;
        sender.set_nodelay(true)?;
        receiver.set_nodelay(true)?;
        senders.push(sender);
        receivers.push(receiver);
    }
    let frame = [7u8; FRAME];
    let mut buffer = [0u8; FRAME];
    let (mut written, mut all_read) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        for sender in &mut senders {
            sender.write_all(&frame).context("floor: write")?;
        }
        written.push(started.elapsed().as_secs_f64() * 1000.0);
        for receiver in &mut receivers {
            receiver.read_exact(&mut buffer).context("floor: read")?;
        }
        all_read.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(WireFloor {
        sockets,
        written_ms: Stats::of(written),
        all_read_ms: Stats::of(all_read),
    })
}
