//! The `primes` binary as the demo and the hot-upgrade tests run it: it serves its stats and
//! its primes over HTTP, and a SIGTERM stops it cleanly. (This test also makes cargo build the
//! `primes` executable with the rest of the suite, where the end-to-end harness finds it.)
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills the service if the test fails before stopping it.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[test]
fn serves_stats_and_primes_and_stops_on_sigterm() {
    // A port the kernel just gave out and took back: free unless something races us for it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_primes"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--version",
            "1.0.0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut service = Service(child);

    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        match get(port, "/health") {
            Ok(answer) => break answer,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("primes never answered on port {port}: {e}"),
        }
    };
    assert_eq!(health.0, 200, "health: {health:?}");

    let (status, body) = get(port, "/stats").unwrap();
    assert_eq!(status, 200, "stats: {body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["version"], "1.0.0", "{stats}");
    assert_eq!(stats["code"], 1, "{stats}");

    // The miner finds primes in the background, and /primes lists them in order.
    let primes = loop {
        let (_, body) = get(port, "/primes?limit=5").unwrap();
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let primes: Vec<u64> = listed["primes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect();
        if primes.len() == 5 || Instant::now() > deadline {
            break primes;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(primes, [2, 3, 5, 7, 11]);

    let pid = Pid::from_raw(i32::try_from(service.0.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let stop_deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = service.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < stop_deadline, "primes ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "primes exited with {status}");
}
