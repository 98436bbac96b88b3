//! Readiness probes (`ready` of a service): one attempt each; `health` repeats them until one
//! succeeds or its timeout passes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cancel::CancelToken;
use crate::config::HookConfig;
use crate::hooks::{self, Invocation};

use super::listen::{self, HeldInfo};
use super::supervisor::{Status, resolve};
use crate::config::{Ready, parse_http_url};

/// Bound of one connection attempt or request.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe of a held socket waits for the service to accept its connection.
const ACCEPT_WAIT: Duration = Duration::from_millis(500);
/// Bound of one `exec` probe.
const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// One probe of `ready` against the instance described by `status`, bounded by `budget`. `Err`
/// says why it is not ready (yet).
pub async fn probe(
    service: &str,
    ready: &Ready,
    status: &Status,
    budget: Duration,
    cancel: &CancelToken,
) -> Result<(), String> {
    if !status.running() {
        let why = match (&status.last_error, &status.last_exit) {
            (Some(error), _) => format!("not running: {error}"),
            (None, Some(exit)) => format!("not running (it {exit})"),
            (None, None) => "not running".to_string(),
        };
        return Err(why);
    }
    if status.suspended {
        return Err("suspended".to_string());
    }
    match ready {
        Ready::Running => Ok(()),
        Ready::Notify => {
            if status.notified_ready {
                Ok(())
            } else {
                Err("no READY=1 on NOTIFY_SOCKET yet".to_string())
            }
        }
        Ready::Tcp(address) => tcp(address, &status.held, budget).await,
        Ready::Http(url) => http(url, budget).await,
        Ready::Exec(command) => exec(service, command, status, budget, cancel).await,
    }
}

/// The shortest wait worth making, even when the budget is nearly spent.
const MIN_WAIT: Duration = Duration::from_millis(20);

async fn tcp(address: &str, held: &[HeldInfo], budget: Duration) -> Result<(), String> {
    let limit = ATTEMPT_TIMEOUT.min(budget).max(MIN_WAIT);
    let stream = tokio::time::timeout(limit, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connecting to {address} timed out"))?
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let peer: Option<SocketAddr> = stream.peer_addr().ok();
    let Some(socket) = peer.and_then(|p| held.iter().find(|h| listen::probes_held(&p, h))) else {
        return Ok(());
    };
    // The agent holds this socket, so the kernel completed the handshake on its own: ready
    // means the service took the connection off the listen queue.
    let started = tokio::time::Instant::now();
    let wait = ACCEPT_WAIT.min(budget).max(MIN_WAIT);
    loop {
        match socket.accept_queue_empty() {
            Some(true) | None => return Ok(()),
            Some(false) if started.elapsed() >= wait => {
                return Err(format!(
                    "{address} is held by the agent but the service does not accept connections"
                ));
            }
            Some(false) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn http(url: &str, budget: Duration) -> Result<(), String> {
    let (authority, path) = parse_http_url(url)?;
    let attempt = async {
        let mut stream = TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: hotroll-agent\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let mut head = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        while head.len() < 1024 && !head.ends_with(b"\r\n") {
            match stream.read(&mut byte).await {
                Ok(0) => break,
                Ok(_) => head.push(byte[0]),
                Err(e) => return Err(format!("{url}: {e}")),
            }
        }
        let line = String::from_utf8_lossy(&head);
        let code = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("{url}: not an HTTP response: {:?}", line.trim()))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("{url} answered {code}"))
        }
    };
    let limit = ATTEMPT_TIMEOUT.min(budget).max(MIN_WAIT);
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| format!("{url} did not answer within {limit:?}"))?
}

async fn exec(
    service: &str,
    command: &[String],
    status: &Status,
    budget: Duration,
    cancel: &CancelToken,
) -> Result<(), String> {
    let Some(release) = &status.release_dir else {
        return Err("no release directory".to_string());
    };
    let Some((program, args)) = command.split_first() else {
        return Err("empty probe command".to_string());
    };
    let mut argv = vec![resolve(release, program).display().to_string()];
    argv.extend(args.iter().cloned());
    let hook = HookConfig {
        command: argv,
        timeout: None,
    };
    let env = vec![("HOTROLL_SERVICE".to_string(), service.to_string())];
    let name = format!("{service} readiness probe");
    let invocation = Invocation {
        name: &name,
        hook: &hook,
        args: &[],
        cwd: release,
        env: &env,
        timeout: budget.clamp(Duration::from_millis(100), EXEC_TIMEOUT),
    };
    let run = hooks::run(&invocation, cancel)
        .await
        .map_err(|e| e.to_string())?;
    match run.error() {
        None => Ok(()),
        Some(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(release: &std::path::Path) -> Status {
        Status {
            pid: Some(1),
            release_dir: Some(release.to_path_buf()),
            ..Status::default()
        }
    }

    #[tokio::test]
    async fn http_probe_wants_a_2xx_or_3xx() -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 503 Busy\r\n\r\n"] {
                if let Ok((mut stream, _)) = listener.accept().await {
                    let mut buf = [0u8; 512];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(answer.as_bytes()).await;
                }
            }
        });
        let ready = Ready::Http(format!("http://127.0.0.1:{port}/health"));
        let status = running(std::path::Path::new("/"));
        let never = CancelToken::never();
        let budget = Duration::from_secs(2);
        probe("s", &ready, &status, budget, &never).await?;
        let err = probe("s", &ready, &status, budget, &never).await;
        assert!(err.is_err_and(|e| e.contains("503")));
        Ok(())
    }

    #[tokio::test]
    async fn exec_probe_runs_in_the_release() {
        let never = CancelToken::never();
        let status = running(std::path::Path::new("/"));
        let ok = Ready::Exec(vec![
            "/bin/sh".into(),
            "-c".into(),
            "test \"$PWD\" = /".into(),
        ]);
        assert_eq!(
            probe("s", &ok, &status, Duration::from_secs(5), &never).await,
            Ok(())
        );
        let fail = Ready::Exec(vec!["/bin/sh".into(), "-c".into(), "exit 3".into()]);
        assert!(
            probe("s", &fail, &status, Duration::from_secs(5), &never)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_stopped_or_suspended_service_is_not_ready() {
        let never = CancelToken::never();
        let mut status = Status {
            last_exit: Some("exited with status 1".into()),
            ..Status::default()
        };
        let err = probe(
            "s",
            &Ready::Running,
            &status,
            Duration::from_secs(1),
            &never,
        )
        .await;
        assert!(err.is_err_and(|e| e.contains("exited with status 1")));
        status.pid = Some(1);
        status.suspended = true;
        assert!(
            probe(
                "s",
                &Ready::Running,
                &status,
                Duration::from_secs(1),
                &never
            )
            .await
            .is_err()
        );
        status.suspended = false;
        assert!(
            probe("s", &Ready::Notify, &status, Duration::from_secs(1), &never)
                .await
                .is_err()
        );
        status.notified_ready = true;
        assert_eq!(
            probe("s", &Ready::Notify, &status, Duration::from_secs(1), &never).await,
            Ok(())
        );
    }
}
