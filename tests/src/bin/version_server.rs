//! `version-server`: the process runtime's test service. Every TCP connection it accepts gets
//! one line, `<version> <pid>\n`, and is closed.
//!
//! * Socket: the listener passed by socket activation (`LISTEN_FDS`, fd 3, honouring
//!   `LISTEN_PID`), else it binds `$LISTEN_ADDR`. When `LISTEN_FDS` is set but `LISTEN_PID`
//!   names another process it exits 2: a supervisor that gets `LISTEN_PID` wrong shows up.
//! * Version: `$VERSION`, else the file `VERSION` in the working directory (the release
//!   directory, when the hotroll agent runs it), else `unknown`. So releases "1.0" and "2.0"
//!   are the same binary next to different `VERSION` files.
//! * `FAIL_VERSION=v`: when the version is `v`, exit 1 at once (a release that crashes).
//! * `HANG_VERSION=v`: when the version is `v`, never accept (a release that never gets ready).
//! * `NOTIFY_SOCKET`: `READY=1` once it accepts (sd_notify).
//! * SIGTERM: stop accepting, finish the connections in flight, exit 0.

use std::process::ExitCode;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    // Socket activation first, before any thread exists: listenfd reads (and clears) the
    // LISTEN_* variables.
    let activated = std::env::var_os("LISTEN_FDS").is_some();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let inherited = match fds.take_tcp_listener(0) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("version-server: fd 3 is not a TCP listener: {e}");
            return ExitCode::from(2);
        }
    };
    if activated && inherited.is_none() {
        eprintln!("version-server: LISTEN_FDS is set but LISTEN_PID does not name this process");
        return ExitCode::from(2);
    }

    let version = std::env::var("VERSION")
        .ok()
        .or_else(|| std::fs::read_to_string("VERSION").ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let pid = std::process::id();
    if std::env::var("FAIL_VERSION").ok().as_deref() == Some(version.as_str()) {
        eprintln!("version-server {version} (pid {pid}): FAIL_VERSION says this release crashes");
        return ExitCode::from(1);
    }
    let hang = std::env::var("HANG_VERSION").ok().as_deref() == Some(version.as_str());

    let listener = match inherited {
        Some(listener) => {
            println!("version-server {version} (pid {pid}): socket activated, fd 3 ({names})");
            listener
        }
        None => {
            let address =
                std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:0".to_string());
            match std::net::TcpListener::bind(&address) {
                Ok(listener) => {
                    println!("version-server {version} (pid {pid}): bound {address}");
                    listener
                }
                Err(e) => {
                    eprintln!("version-server: cannot bind {address}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("version-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listener, version, hang)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("version-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    version: String,
    hang: bool,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    if hang {
        println!("version-server {version}: HANG_VERSION says this release never accepts");
        term.recv().await;
        return Ok(());
    }
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.send_to(b"READY=1\n", &path)?;
    }
    let line = format!("{version} {}\n", std::process::id());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let line = line.clone();
                tasks.spawn(async move {
                    // A client (or a readiness probe) that left early is not an error.
                    let _ = stream.write_all(line.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            _ = term.recv() => break,
        }
    }
    println!("version-server {version}: SIGTERM; finishing connections in flight");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
