//! Take part in hotroll's state handover (`docs/handover.md` in the hotroll repository, which
//! any language can implement) in a few lines.
//!
//! A service declared with `handover = true` in the agent's config moves to a new release with
//! its in-memory state: on `code_change` the agent asks the running instance to **export** its
//! state over a control socket, starts the new release's instance with that state and the same
//! listening sockets, waits until it is ready, and then stops the old instance gracefully (or,
//! if anything fails, stops the new one and lets the old one carry on).
//!
//! ```no_run
//! # async fn run() -> Result<(), hotroll_handover::Error> {
//! use hotroll_handover::{Outcome, incoming, listeners, notify_ready, Control};
//!
//! // 1. The state the previous instance exported (None on a plain start).
//! let mut state: Vec<u64> = match incoming()? {
//!     Some(previous) => decode(&previous.state), // your code_change: convert if the format changed
//!     None => Vec::new(),
//! };
//! // 2. The listening sockets the agent holds for this service (LISTEN_FDS).
//! let listeners = listeners()?;
//! // 3. The control socket, then READY=1.
//! let mut control = Control::from_env()?;
//! notify_ready()?;
//! // 4. Serve; when the agent asks for the state: freeze, export, wait for the verdict.
//! if let Some(control) = control.as_mut() {
//!     let request = control.next_export().await?;
//!     // ... stop accepting connections, stop changing `state` ...
//!     let outcome = request.send_state(&encode(&state)).await?.outcome().await;
//!     if outcome == Outcome::Aborted {
//!         // ... carry on as before: accept again, change the state again ...
//!     }
//!     // Committed: the new instance serves; the stop signal follows.
//! }
//! # Ok(()) }
//! # fn decode(_: &[u8]) -> Vec<u64> { Vec::new() }
//! # fn encode(_: &[u64]) -> Vec<u8> { Vec::new() }
//! ```
//!
//! Everything here is safe code: the listening sockets come through the `listenfd` crate, the
//! control socket is a path this crate binds, the state is a file the agent names.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The protocol version this crate speaks (`HOTROLL_HANDOVER_PROTOCOL`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Environment variables of the protocol.
pub mod env {
    /// The protocol version the agent speaks, `1`. Set for every instance of a handover service.
    pub const PROTOCOL: &str = "HOTROLL_HANDOVER_PROTOCOL";
    /// Path of the unix stream socket the instance listens on for the agent's requests. Set for
    /// every instance of a handover service; each instance gets its own path.
    pub const SOCKET: &str = "HOTROLL_HANDOVER_SOCKET";
    /// Path of a file holding the state the previous instance exported. Only for an instance
    /// started by a handover.
    pub const STATE: &str = "HOTROLL_HANDOVER_STATE";
    /// The release (version) of the instance that exported the state.
    pub const FROM: &str = "HOTROLL_HANDOVER_FROM";
    /// `up` (upgrade) or `down` (downgrade), as the script's `code_change` says.
    pub const MODE: &str = "HOTROLL_HANDOVER_MODE";
    /// The script's `extra` for `code_change`, when it gives one.
    pub const EXTRA: &str = "HOTROLL_HANDOVER_EXTRA";
    /// sd_notify's datagram socket.
    pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
    /// The release (version) this instance runs, set by the agent for every service.
    pub const RELEASE: &str = "HOTROLL_RELEASE";
}

/// The longest request or answer line the protocol allows (bytes, newline included).
pub const MAX_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("LISTEN_FDS fd {fd} (index {index}) is neither a TCP nor a unix stream listener")]
    NotAListener { index: usize, fd: usize },
    #[error("{variable} = {value:?}: {why}")]
    Env {
        variable: &'static str,
        value: String,
        why: String,
    },
    #[error("handover protocol: {0}")]
    Protocol(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        what: what.into(),
        source,
    }
}

/// One listening socket passed by the agent (systemd socket activation).
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A listening socket with its name from `LISTEN_FDNAMES`.
#[derive(Debug)]
pub struct NamedListener {
    /// The `name` of the `listen` entry in the agent's config (default: the service name).
    pub name: String,
    pub listener: Listener,
}

impl NamedListener {
    /// The TCP listener, if it is one.
    pub fn into_tcp(self) -> Option<std::net::TcpListener> {
        match self.listener {
            Listener::Tcp(l) => Some(l),
            Listener::Unix(_) => None,
        }
    }
}

/// The listening sockets passed as `LISTEN_FDS` (fds 3, 4, …) when `LISTEN_PID` names this
/// process, in order, named by `LISTEN_FDNAMES`. Empty when the service was not started with
/// sockets. Call it early, before starting threads: like `sd_listen_fds`, it reads the
/// environment once.
pub fn listeners() -> Result<Vec<NamedListener>, Error> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::with_capacity(fds.len());
    for index in 0..fds.len() {
        let listener = match fds.take_tcp_listener(index) {
            Ok(Some(l)) => Listener::Tcp(l),
            Ok(None) => continue,
            Err(_) => match fds.take_unix_listener(index) {
                Ok(Some(l)) => Listener::Unix(l),
                Ok(None) => continue,
                Err(_) => {
                    return Err(Error::NotAListener {
                        index,
                        fd: 3 + index,
                    });
                }
            },
        };
        let name = names.get(index).cloned().unwrap_or_default();
        out.push(NamedListener { name, listener });
    }
    Ok(out)
}

/// Which way the release changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    Down,
}

/// What the previous instance handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The release the exporting instance ran (`HOTROLL_HANDOVER_FROM`).
    pub from: String,
    pub mode: Mode,
    /// The script's `extra`, if it gave one.
    pub extra: Option<String>,
    /// The exported bytes, exactly as the previous instance sent them.
    pub state: Vec<u8>,
}

/// The state handed over to this instance, or `None` when it was not started by a handover.
/// Your `code_change` runs on it: if it cannot be converted, exit with a non-zero status (after
/// [`notify_status`] with the reason, which the agent reports).
pub fn incoming() -> Result<Option<Incoming>, Error> {
    let Some(path) = std::env::var_os(env::STATE) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let state = std::fs::read(&path).map_err(io_error(format!(
        "cannot read the handed-over state {}",
        path.display()
    )))?;
    let from = std::env::var(env::FROM).unwrap_or_default();
    let mode = match std::env::var(env::MODE).as_deref() {
        Ok("down") => Mode::Down,
        Ok("up") | Err(_) => Mode::Up,
        Ok(other) => {
            return Err(Error::Env {
                variable: env::MODE,
                value: other.to_string(),
                why: "expected `up` or `down`".to_string(),
            });
        }
    };
    let extra = std::env::var(env::EXTRA).ok();
    Ok(Some(Incoming {
        from,
        mode,
        extra,
        state,
    }))
}

/// Send `message` (e.g. `"READY=1"`) on `NOTIFY_SOCKET`. `Ok(false)` when there is none.
pub fn notify(message: &str) -> Result<bool, Error> {
    let Some(path) = std::env::var_os(env::NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()
        .map_err(io_error("cannot create a datagram socket"))?;
    socket
        .send_to(message.as_bytes(), Path::new(&path))
        .map_err(io_error(format!(
            "cannot notify {}",
            Path::new(&path).display()
        )))?;
    Ok(true)
}

/// `READY=1`: this instance serves. Under a handover this is the moment the agent commits.
pub fn notify_ready() -> Result<bool, Error> {
    notify("READY=1")
}

/// `STATUS=<text>` (one line): shown by the agent, e.g. why a code_change failed.
pub fn notify_status(text: &str) -> Result<bool, Error> {
    let line: String = text.chars().filter(|c| *c != '\n').collect();
    notify(&format!("STATUS={line}"))
}

/// The control socket of this instance (`HOTROLL_HANDOVER_SOCKET`), bound.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Control {
    /// Bind `HOTROLL_HANDOVER_SOCKET`; `None` when the agent gave none (the service is not run
    /// with `handover = true`, or not by hotroll). Needs a tokio runtime.
    pub fn from_env() -> Result<Option<Self>, Error> {
        match std::env::var_os(env::SOCKET) {
            Some(path) => Self::bind(Path::new(&path)).map(Some),
            None => Ok(None),
        }
    }

    /// Bind `path` (a socket file left there is replaced; anything else is an error).
    pub fn bind(path: &Path) -> Result<Self, Error> {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.file_type().is_socket()
        {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(io_error(format!(
            "cannot listen on the handover socket {}",
            path.display()
        )))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait for the agent's next `EXPORT` request. Connections that ask for anything else get
    /// `ERROR` and are closed; a connection that breaks is skipped.
    pub async fn next_export(&mut self) -> Result<ExportRequest, Error> {
        loop {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(io_error("cannot accept on the handover socket"))?;
            let mut stream = BufReader::new(stream);
            match read_line(&mut stream).await {
                Ok(Some(line)) if line == "EXPORT" => return Ok(ExportRequest { stream }),
                Ok(Some(line)) => {
                    let answer = format!("ERROR unknown request {:?}\n", truncate(&line, 64));
                    let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                }
                Ok(None) | Err(_) => {}
            }
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// One line without its terminator (`\n`, an optional `\r` before it); `None` at EOF.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<String>, Error> {
    let mut bytes = Vec::new();
    let mut limited = (&mut *reader).take(MAX_LINE as u64);
    let n = limited
        .read_until(b'\n', &mut bytes)
        .await
        .map_err(io_error("handover socket"))?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.last() != Some(&b'\n') {
        return Err(Error::Protocol(format!(
            "a line longer than {MAX_LINE} bytes, or cut short"
        )));
    }
    bytes.pop();
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::Protocol("a line that is not UTF-8".to_string()))
}

/// The agent asked for the state. Before answering, freeze: stop accepting connections on the
/// listening sockets (they wait in the kernel's queue for the next instance) and stop changing
/// the state; requests already accepted may finish.
#[derive(Debug)]
pub struct ExportRequest {
    stream: BufReader<UnixStream>,
}

impl ExportRequest {
    /// Send the state (`STATE <len>\n` and the bytes). From now on this instance stays frozen
    /// until [`Exported::outcome`] says how the handover ended.
    pub async fn send_state(mut self, state: &[u8]) -> Result<Exported, Error> {
        let stream = self.stream.get_mut();
        let head = format!("STATE {}\n", state.len());
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(io_error("cannot send the state"))?;
        stream
            .write_all(state)
            .await
            .map_err(io_error("cannot send the state"))?;
        stream
            .flush()
            .await
            .map_err(io_error("cannot send the state"))?;
        Ok(Exported {
            stream: self.stream,
        })
    }

    /// Refuse (`ERROR <reason>`): the handover fails and this instance carries on unfrozen.
    pub async fn refuse(mut self, reason: &str) -> Result<(), Error> {
        let line: String = reason.chars().filter(|c| *c != '\n').collect();
        self.stream
            .get_mut()
            .write_all(format!("ERROR {line}\n").as_bytes())
            .await
            .map_err(io_error("cannot answer the agent"))
    }
}

/// The state went out; the agent now starts the new instance.
#[derive(Debug)]
pub struct Exported {
    stream: BufReader<UnixStream>,
}

/// How a handover ended, from the old instance's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The new instance serves; this one gets its stop signal next and should finish the
    /// requests it has and exit.
    Committed,
    /// The handover failed (or the agent went away): carry on as before the export.
    Aborted,
}

impl Exported {
    /// Wait for `COMMIT` or `ABORT`. A connection closed without a verdict counts as `ABORT`:
    /// an instance never stays frozen because the agent died.
    pub async fn outcome(mut self) -> Outcome {
        match read_line(&mut self.stream).await {
            Ok(Some(line)) if line == "COMMIT" => Outcome::Committed,
            _ => Outcome::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn agent_side(
        path: &Path,
        verdict: &str,
    ) -> Result<(String, Vec<u8>), Box<dyn std::error::Error>> {
        let stream = UnixStream::connect(path).await?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(b"EXPORT\n").await?;
        let head = read_line(&mut stream).await?.ok_or("no answer")?;
        let len: usize = head.strip_prefix("STATE ").ok_or("not STATE")?.parse()?;
        let mut state = vec![0u8; len];
        stream.read_exact(&mut state).await?;
        stream.get_mut().write_all(verdict.as_bytes()).await?;
        Ok((head, state))
    }

    #[tokio::test]
    async fn export_then_commit_or_abort() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ctl");
        let mut control = Control::bind(&path)?;
        for (verdict, expected) in [
            ("COMMIT\n", Outcome::Committed),
            ("ABORT\n", Outcome::Aborted),
            ("", Outcome::Aborted),
        ] {
            let agent = {
                let path = path.clone();
                tokio::spawn(
                    async move { agent_side(&path, verdict).await.map_err(|e| e.to_string()) },
                )
            };
            let request = control.next_export().await?;
            let exported = request.send_state(b"hello\nworld").await?;
            let (head, state) = agent.await??;
            assert_eq!(head, "STATE 11");
            assert_eq!(state, b"hello\nworld");
            assert_eq!(exported.outcome().await, expected);
        }
        drop(control);
        assert!(
            !path.exists(),
            "the socket file is removed with the Control"
        );
        Ok(())
    }

    #[tokio::test]
    async fn unknown_requests_get_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ctl");
        let mut control = Control::bind(&path)?;
        let client = {
            let path = path.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(UnixStream::connect(&path).await?);
                stream.get_mut().write_all(b"DANCE\n").await?;
                let answer = read_line(&mut stream).await.map_err(io::Error::other)?;
                // Then a real request on a new connection, refused by the service.
                let mut second = BufReader::new(UnixStream::connect(&path).await?);
                second.get_mut().write_all(b"EXPORT\r\n").await?;
                let refusal = read_line(&mut second).await.map_err(io::Error::other)?;
                Ok::<_, io::Error>((answer, refusal))
            })
        };
        let request = control.next_export().await?;
        request.refuse("not now\nreally").await?;
        let (answer, refusal) = client.await??;
        assert!(answer.is_some_and(|a| a.starts_with("ERROR unknown request")));
        assert_eq!(refusal.as_deref(), Some("ERROR not nowreally"));
        Ok(())
    }

    #[tokio::test]
    async fn long_lines_are_refused() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut reader = BufReader::new(&long[..]);
        assert!(matches!(
            read_line(&mut reader).await,
            Err(Error::Protocol(_))
        ));
        let mut empty = BufReader::new(&b""[..]);
        assert!(matches!(read_line(&mut empty).await, Ok(None)));
    }

    #[test]
    fn no_sockets_no_listeners() -> Result<(), Error> {
        // The test process was not socket-activated.
        if std::env::var_os("LISTEN_FDS").is_none() {
            assert!(listeners()?.is_empty());
        }
        Ok(())
    }
}
