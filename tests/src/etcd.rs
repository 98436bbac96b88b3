//! A real etcd cluster on 127.0.0.1 for the HA tests: N members (Debian's `etcd-server`), each
//! a [`Process`] that can be SIGKILLed, SIGSTOPped and restarted on its own data dir. Dropping
//! the cluster kills every member.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ports::free_port;
use crate::process::Process;

/// One member: its client URL and process.
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub process: Process,
}

#[derive(Debug)]
pub struct EtcdCluster {
    _dir: tempfile::TempDir,
    members: Vec<EtcdMember>,
}

/// The `etcd` binary, or an error that says how to install it.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("etcd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`etcd` is not installed: run `apt-get install etcd-server` (tests/run does)")
}

impl EtcdCluster {
    /// Start `members` members as one new cluster and wait until every one is healthy.
    pub fn start(members: usize) -> anyhow::Result<Self> {
        let etcd = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("hotroll-etcd-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let ports = (0..members)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("hotroll-test-{}", std::process::id());
        let mut started = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{}", i + 1);
            let data = dir.path().join(&name);
            let args = vec![
                "--name".to_string(),
                name.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                initial_cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
                // Faster elections than the WAN defaults: the members share one machine.
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                "--log-level".into(),
                "warn".into(),
            ];
            let mut process = Process::new(
                format!("etcd-{name}"),
                &etcd,
                args,
                dir.path(),
                dir.path().join(format!("{name}.log")),
            );
            // Debian's etcd refuses to start on some architectures without this; harmless here.
            process.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
            process.start()?;
            started.push(EtcdMember {
                name,
                client_port: *client,
                process,
            });
        }
        let mut cluster = Self {
            _dir: dir,
            members: started,
        };
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `--etcd-endpoints` for the coordinators.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    pub fn member(&mut self, i: usize) -> &mut Process {
        &mut self.members[i].process
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Wait until every running member answers `/health` as healthy (which needs a quorum).
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if !self.members[i].process.is_running() {
                continue;
            }
            loop {
                let member = &mut self.members[i];
                if let Some(status) = member.process.exit_status() {
                    bail!(
                        "etcd member {} exited: {status}; log:\n{}",
                        member.name,
                        member.process.log_tail(20)
                    );
                }
                if health(member.client_port) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "etcd member {} not healthy after {timeout:?}; log:\n{}",
                        member.name,
                        member.process.log_tail(20)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// GET /health on a member's client port: `{"health":"true"}` once it has a leader.
fn health(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
