//! A `[[services]]` entry of `agent.toml`: a service the process runtime supervises, typed and
//! checked when the config loads:
//!
//! ```toml
//! [[services]]
//! name = "primes"
//! app = "primes"
//! command = ["bin/primes", "--port", "8080"]   # program relative to the app's current release
//! env = { RUST_LOG = "info" }
//! listen = ["tcp://127.0.0.1:8080"]            # held by the agent, passed as LISTEN_FDS
//! ready = { tcp = "127.0.0.1:8080" }           # or { http = "http://…/health" }, "notify", { exec = [..] }
//! stop_signal = "SIGTERM"
//! stop_timeout = "10s"
//! drain = "primes_drain"                       # optional: `suspend` runs this hook instead of SIGSTOP
//! undrain = "primes_undrain"                   # optional: `resume` runs this hook instead of SIGCONT
//! handover = false                             # code_change hands the state over (docs/handover.md)
//! ```
//!
//! A `listen` entry is `"tcp://HOST:PORT"`, `"unix:/absolute/path"`, or a table
//! `{ address = "tcp://…", name = "http" }` whose `name` goes to `LISTEN_FDNAMES` (default: the
//! service name, as systemd names a socket unit's fds).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

use super::parse_duration;

pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A service the agent supervises.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub app: String,
    /// Program (relative to the app's current release unless absolute) and arguments.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub listen: Vec<ListenSpec>,
    pub ready: Ready,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// Hook `suspend` runs instead of SIGSTOP.
    pub drain: Option<String>,
    /// Hook `resume` runs instead of SIGCONT (after a drain).
    pub undrain: Option<String>,
    /// The service speaks the handover protocol (`docs/handover.md`): `code_change` moves its
    /// state to the new release's instance instead of restarting it.
    pub handover: bool,
}

/// One listening socket the agent binds and holds for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub address: ListenAddress,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// `host:port`, resolved when bound.
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(addr) => write!(f, "tcp://{addr}"),
            ListenAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How the agent tells that a service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Ready as soon as the process runs.
    Running,
    /// A TCP connection to `host:port` is accepted. When the agent holds that socket, the kernel
    /// completes every handshake itself, so the probe also waits for the service to take the
    /// connection off the listen queue.
    Tcp(String),
    /// `GET` answers 2xx or 3xx.
    Http(String),
    /// `READY=1` on `NOTIFY_SOCKET` (sd_notify).
    Notify,
    /// The command exits 0 (program relative to the release unless absolute; run in it).
    Exec(Vec<String>),
}

impl Ready {
    pub fn describe(&self) -> String {
        match self {
            Ready::Running => "running".to_string(),
            Ready::Tcp(addr) => format!("tcp {addr}"),
            Ready::Http(url) => format!("http {url}"),
            Ready::Notify => "notify".to_string(),
            Ready::Exec(command) => format!("exec {}", command.join(" ")),
        }
    }
}

/// A `[[services]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    name: String,
    app: String,
    command: RawCommand,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    listen: Vec<RawListen>,
    ready: Option<RawReady>,
    stop_signal: Option<String>,
    stop_timeout: Option<String>,
    drain: Option<String>,
    undrain: Option<String>,
    #[serde(default)]
    handover: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Program(String),
    Argv(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawListen {
    Address(String),
    Named {
        address: String,
        name: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawReady {
    Word(String),
    Probe(RawProbe),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    tcp: Option<String>,
    http: Option<String>,
    exec: Option<Vec<String>>,
}

/// A name that becomes a file or directory name (apps, services): one path component, no
/// leading dot, no separators or control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "{what} `{name}` must be a plain name (it names a directory or file): no `/`, \
             whitespace, or leading `.`"
        ));
    }
    Ok(())
}

impl RawService {
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Check the entry. `hooks` are the declared hook names (for `drain`/`undrain`).
    pub(super) fn check(self, hooks: &BTreeSet<String>) -> Result<ServiceConfig, String> {
        let raw = self;
        check_name("the service name", &raw.name)?;
        check_name("`app`", &raw.app)?;

        let command = match raw.command {
            RawCommand::Program(program) => vec![program],
            RawCommand::Argv(argv) => argv,
        };
        if command.first().is_none_or(String::is_empty) {
            return Err("`command` must name a program".to_string());
        }
        for key in raw.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(format!("`env` key `{key}` is not a valid variable name"));
            }
            if key.starts_with("LISTEN_") || key == "NOTIFY_SOCKET" {
                return Err(format!(
                    "`env` cannot set `{key}`: the agent sets it for socket activation"
                ));
            }
            if key.starts_with("HOTROLL_HANDOVER_") {
                return Err(format!(
                    "`env` cannot set `{key}`: the agent sets it for the handover protocol"
                ));
            }
        }

        let mut listen = Vec::new();
        for entry in raw.listen {
            let (address, name) = match entry {
                RawListen::Address(address) => (address, None),
                RawListen::Named { address, name } => (address, name),
            };
            let address = parse_listen(&address)?;
            let name = name.unwrap_or_else(|| raw.name.clone());
            if name.is_empty() || name.contains([':', '\0']) || name.len() > 255 {
                return Err(format!(
                    "listen name `{name}` must be 1 to 255 characters without `:`"
                ));
            }
            listen.push(ListenSpec { address, name });
        }

        let ready = match raw.ready {
            None => Ready::Running,
            Some(RawReady::Word(word)) => match word.as_str() {
                "notify" => Ready::Notify,
                "running" => Ready::Running,
                other => {
                    return Err(format!(
                        "`ready` = \"{other}\": write \"notify\", \"running\", {{ tcp = \"host:port\" }}, \
                         {{ http = \"http://host:port/path\" }} or {{ exec = [\"program\", …] }}"
                    ));
                }
            },
            Some(RawReady::Probe(probe)) => match (probe.tcp, probe.http, probe.exec) {
                (Some(tcp), None, None) => {
                    if !tcp.contains(':') {
                        return Err(format!("`ready.tcp` = `{tcp}` must be host:port"));
                    }
                    Ready::Tcp(tcp)
                }
                (None, Some(http), None) => {
                    parse_http_url(&http)?;
                    Ready::Http(http)
                }
                (None, None, Some(exec)) => {
                    if exec.first().is_none_or(String::is_empty) {
                        return Err("`ready.exec` must name a program".to_string());
                    }
                    Ready::Exec(exec)
                }
                _ => return Err("`ready` takes exactly one of `tcp`, `http` or `exec`".to_string()),
            },
        };

        let stop_signal = match raw.stop_signal {
            None => Signal::SIGTERM,
            Some(name) => parse_signal(&name)?,
        };
        let stop_timeout = match raw.stop_timeout {
            None => DEFAULT_STOP_TIMEOUT,
            Some(text) => {
                let d = parse_duration(&text).map_err(|e| format!("`stop_timeout`: {e}"))?;
                if d.is_zero() {
                    return Err("`stop_timeout` must be greater than zero".to_string());
                }
                d
            }
        };
        for (key, hook) in [("drain", &raw.drain), ("undrain", &raw.undrain)] {
            if let Some(hook) = hook
                && !hooks.contains(hook)
            {
                return Err(format!(
                    "`{key}` names hook `{hook}`, which `[hooks]` does not declare"
                ));
            }
        }
        if raw.undrain.is_some() && raw.drain.is_none() {
            return Err("`undrain` needs a `drain` hook".to_string());
        }
        Ok(ServiceConfig {
            name: raw.name,
            app: raw.app,
            command,
            env: raw.env,
            listen,
            ready,
            stop_signal,
            stop_timeout,
            drain: raw.drain,
            undrain: raw.undrain,
            handover: raw.handover,
        })
    }
}

fn parse_listen(address: &str) -> Result<ListenAddress, String> {
    if let Some(rest) = address.strip_prefix("tcp://") {
        let ok = rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(format!(
                "listen address `{address}` must be tcp://HOST:PORT, e.g. tcp://127.0.0.1:8080"
            ));
        }
        return Ok(ListenAddress::Tcp(rest.to_string()));
    }
    if let Some(rest) = address.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(format!(
                "listen address `{address}` must name an absolute path, e.g. unix:/run/app.sock"
            ));
        }
        return Ok(ListenAddress::Unix(PathBuf::from(path)));
    }
    Err(format!(
        "listen address `{address}` must start with tcp:// or unix:"
    ))
}

/// `http://host:port/path` → (`host:port`, `/path`). Only plain http (probes are local).
pub fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`ready.http` = `{url}` must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("`ready.http` = `{url}` names no host"));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// `"SIGTERM"`, `"TERM"`, `"sigterm"`.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&full) {
        Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(format!(
            "`stop_signal` = `{name}`: use a signal the service can handle (SIGKILL follows \
             `stop_timeout` anyway)"
        )),
        Ok(signal) => Ok(signal),
        Err(_) => Err(format!(
            "`stop_signal` = `{name}` is not a signal name, e.g. \"SIGTERM\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[[services]]` entry `primes` with the keys `rest`, next to a `drain_it` hook.
    fn spec(rest: &str) -> Result<ServiceConfig, String> {
        let text = format!(
            "[hooks]\ndrain_it = {{ command = [\"true\"] }}\n\n[[services]]\nname = \"primes\"\napp = \"primes\"\n{rest}\n"
        );
        let config = crate::config::Config::from_toml(std::path::Path::new("agent.toml"), &text)
            .map_err(|e| e.to_string())?;
        config
            .services
            .into_iter()
            .next()
            .ok_or_else(|| "no service".to_string())
    }

    #[test]
    fn the_contract_example_parses() -> Result<(), String> {
        let s = spec(
            r#"
command = ["bin/primes", "--port", "8080"]
env = { RUST_LOG = "info" }
listen = ["tcp://127.0.0.1:8080", { address = "unix:/run/p.sock", name = "admin" }]
ready = { tcp = "127.0.0.1:8080" }
stop_signal = "SIGTERM"
stop_timeout = "10s"
drain = "drain_it"
"#,
        )?;
        assert_eq!(s.command, ["bin/primes", "--port", "8080"]);
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.listen[0].name, "primes");
        assert_eq!(s.listen[1].name, "admin");
        assert_eq!(s.ready, Ready::Tcp("127.0.0.1:8080".into()));
        assert_eq!(s.stop_signal, Signal::SIGTERM);
        assert_eq!(s.stop_timeout, Duration::from_secs(10));
        assert_eq!(s.drain.as_deref(), Some("drain_it"));
        Ok(())
    }

    #[test]
    fn ready_forms() -> Result<(), String> {
        assert_eq!(
            spec("command = \"x\"\nready = \"notify\"")?.ready,
            Ready::Notify
        );
        assert_eq!(spec("command = \"x\"")?.ready, Ready::Running);
        assert!(matches!(
            spec("command = \"x\"\nready = { exec = [\"bin/check\"] }")?.ready,
            Ready::Exec(_)
        ));
        assert!(matches!(
            spec("command = \"x\"\nready = { http = \"http://127.0.0.1:1/h\" }")?.ready,
            Ready::Http(_)
        ));
        Ok(())
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "",
            "command = []",
            "command = \"x\"\nlisten = [\"udp://1.2.3.4:5\"]",
            "command = \"x\"\nlisten = [\"tcp://nohost\"]",
            "command = \"x\"\nready = \"soon\"",
            "command = \"x\"\nready = { tcp = \"a:1\", http = \"http://a:1\" }",
            "command = \"x\"\nstop_signal = \"SIGKILL\"",
            "command = \"x\"\nstop_signal = \"SIGFOO\"",
            "command = \"x\"\nstop_timeout = \"0s\"",
            "command = \"x\"\ndrain = \"undeclared\"",
            "command = \"x\"\nenv = { LISTEN_FDS = \"1\" }",
            "command = \"x\"\nenv = { HOTROLL_HANDOVER_STATE = \"/x\" }",
            "command = \"x\"\ncomand = \"y\"",
        ] {
            assert!(spec(bad).is_err(), "accepted: {bad}");
        }
        assert!(check_name("app", "../x").is_err());
        assert!(check_name("app", ".hidden").is_err());
        assert!(check_name("app", "primes-2").is_ok());
    }

    /// The commented `[[services]]` example of `deploy/agent.example.toml` is a valid entry.
    #[test]
    fn the_deploy_example_is_valid() -> Result<(), String> {
        let example = include_str!("../../../deploy/agent.example.toml");
        let block: Vec<&str> = example
            .lines()
            .skip_while(|l| l.trim() != "# [[services]]")
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .collect();
        assert!(block.len() > 5, "no [[services]] example found");
        let text = format!(
            "[hooks]\nprimes_drain = {{ command = [\"true\"] }}\nprimes_undrain = {{ command = [\"true\"] }}\n{}\n",
            block.join("\n")
        );
        let config = crate::config::Config::from_toml(std::path::Path::new("agent.toml"), &text)
            .map_err(|e| e.to_string())?;
        let spec = &config.services[0];
        assert_eq!(spec.listen.len(), 1);
        assert_eq!(spec.ready, Ready::Tcp("127.0.0.1:8080".into()));
        Ok(())
    }

    #[test]
    fn urls_and_signals() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/health"),
            Ok(("127.0.0.1:8080".into(), "/health".into()))
        );
        assert_eq!(
            parse_http_url("http://localhost"),
            Ok(("localhost:80".into(), "/".into()))
        );
        assert_eq!(parse_signal("term"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGINT"), Ok(Signal::SIGINT));
    }
}
