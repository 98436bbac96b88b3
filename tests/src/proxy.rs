//! A TCP proxy on 127.0.0.1 between clients and the coordinator: it counts the bytes in each
//! direction and can throttle what flows back to the clients, so a test can see how many
//! artifact bytes moved, or slow a download down enough to interrupt it; it can also cut every
//! connection and refuse new ones (a browser's broken network, in the console's tests).
//!
//! Agents reach the coordinator through it with `HOTROLL_COORDINATOR` (the agent's
//! `--coordinator`); the upstream can be set after the proxy starts, because the coordinator's
//! port is only known once the cluster runs (see [`crate::services`] for the whole dance).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(Debug, Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    /// Bytes per second towards the clients; 0 = unlimited.
    rate: AtomicU64,
    to_upstream: AtomicU64,
    from_upstream: AtomicU64,
    stop: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
}

/// A running proxy; dropping it closes every connection.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free port of 127.0.0.1; connections are refused until an upstream is set.
    pub fn start() -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind the proxy")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let state = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || accept_loop(&listener, &state));
        Ok(Self {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`: TLS passes through the proxy untouched (the coordinator's
    /// certificate names 127.0.0.1). [`Proxy::plain_url`] for an insecure cluster.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn plain_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forward new connections to `127.0.0.1:<port>`.
    pub fn set_upstream_port(&self, port: u16) {
        if let Ok(mut upstream) = self.shared.upstream.lock() {
            *upstream = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }

    /// Refuse new connections (they are closed at once) until an upstream is set again.
    pub fn clear_upstream(&self) {
        if let Ok(mut upstream) = self.shared.upstream.lock() {
            *upstream = None;
        }
    }

    /// Close every connection open now, as a broken network would; new ones are forwarded
    /// (or refused, after [`Proxy::clear_upstream`]).
    pub fn cut(&self) {
        if let Ok(mut connections) = self.shared.connections.lock() {
            for c in connections.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Limit what flows back to the clients to `bytes_per_second` per connection (0 = none).
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Bytes the clients sent upstream so far.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.shared.to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes the upstream sent back to the clients so far.
    pub fn bytes_from_upstream(&self) -> u64 {
        self.shared.from_upstream.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Ok(connections) = self.shared.connections.lock() {
            for c in connections.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        let upstream = shared.upstream.lock().ok().and_then(|u| *u);
        let Some(upstream) = upstream else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        if let Ok(mut connections) = shared.connections.lock() {
            connections.retain(|c| c.peer_addr().is_ok());
            if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                connections.push(a);
                connections.push(b);
            }
        }
        let up = Arc::clone(shared);
        std::thread::spawn(move || pump(client, server, &up, false));
        let down = Arc::clone(shared);
        std::thread::spawn(move || pump(server2, client2, &down, true));
    }
}

/// Copy `from` to `to` until either side closes; `downstream` is the throttled, counted
/// direction towards the client.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, downstream: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    let mut window_rate = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if downstream {
            let rate = shared.rate.load(Ordering::Relaxed);
            if rate != window_rate {
                window_rate = rate;
                window_start = Instant::now();
                window_bytes = 0;
            }
            if rate > 0 {
                window_bytes += n as u64;
                let due = Duration::from_secs_f64(window_bytes as f64 / rate as f64);
                let elapsed = window_start.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        let counter = if downstream {
            &shared.from_upstream
        } else {
            &shared.to_upstream
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
