//! `agent.toml`: who this node is, where its coordinator is, and the only commands `apply` and
//! `check` may ever run on it (docs/design.md §5: the agent never executes anything its own config does
//! not declare).
//!
//! ```toml
//! node = "node-1"                          # unique name; defaults to the host name
//! coordinator = "https://coordinator.example:7070"  # a group: ["https://a:7070", "https://b:7070"]
//! join_token = "hr1.…"                     # once, to get a node certificate (or --join)
//! # ca_file = "/etc/hotroll/ca.pem"        # optional: else the CA the join token names
//! # insecure = true                        # plaintext http:// (coordinator --insecure too)
//! data_dir = "/var/lib/hotroll"
//! labels = { role = "miner", zone = "a" }
//! heartbeat_interval = "5s"                # optional; the coordinator's Welcome usually decides
//! reconnect_max_backoff = "5s"             # optional
//! keep_releases = 3                        # optional: releases per app kept by make-permanent
//!
//! [hooks]
//! disk_space = { command = ["sh", "-c", "test -w /"], timeout = "10s" }
//! migrate    = { command = ["/usr/local/bin/migrate"], timeout = "5m" }
//!
//! [[services]]
//! name = "primes"
//! app = "primes"
//!
//! [[beam]]                                 # an Erlang node whose app hotroll upgrades in place
//! app = "counter"
//! node = "counter@myhost"
//! cookie_file = "/var/lib/counter/.erlang.cookie"
//! code_dir = "/opt/counter/ebin"
//! start = ["/opt/counter/bin/counter", "start"]
//! mfa_allow = ["counter_admin:drain/0"]
//!
//! [[release]]                              # an OTP release (config/release.rs)
//! app = "pm"
//! root_dir = "/opt/pm"
//! node = "pm@myhost"
//! cookie_file = "/opt/pm/cookie"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/hotroll";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Releases kept per app by make-permanent when the config names no number.
pub const DEFAULT_KEEP_RELEASES: usize = 3;

mod beam;
mod release;
mod service;

use beam::RawBeam;
pub use beam::{BeamConfig, is_atom, is_mfa};
use release::RawRelease;
pub use release::ReleaseConfig;
use service::RawService;
pub use service::{
    ListenAddress, ListenSpec, Ready, ServiceConfig, check_name, parse_http_url, parse_signal,
};

/// The agent's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique node name; the coordinator refuses a second live session with the same name.
    pub node: String,
    /// `https://host:port` of the coordinator's gRPC endpoint (`http://` with `insecure`);
    /// the first of `coordinators`.
    pub coordinator: String,
    /// Every coordinator of the group, in the configured order (`coordinator = [..]`); one for
    /// a single coordinator. The agent talks to the leader and follows standbys to it.
    pub coordinators: Vec<String>,
    /// Plaintext, no node identity: only with a coordinator started with `--insecure`.
    pub insecure: bool,
    /// A join token (`hotroll token create --role agent`), used once when the data dir holds
    /// no node certificate for this node yet.
    pub join_token: Option<String>,
    /// The CA to trust; default: the one the join token names, then the one stored at join.
    pub ca_file: Option<PathBuf>,
    /// Where the journal, the boot generation and (later) releases live; hooks run here.
    pub data_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// The only commands `apply` and `check` may run, by name.
    pub hooks: BTreeMap<String, HookConfig>,
    /// Services this node supervises (only names and apps are used so far).
    pub services: Vec<ServiceConfig>,
    /// Erlang apps (BEAM runtime), by app name.
    pub beam: BTreeMap<String, BeamConfig>,
    /// Nodes running OTP releases (`[[release]]`, the otp_release runtime), by app name.
    pub releases: BTreeMap<String, ReleaseConfig>,
    /// Heartbeat interval used until (and unless) the coordinator's Welcome names one.
    pub heartbeat_interval: Duration,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max_backoff: Duration,
    /// Releases per app that make-permanent keeps (current and permanent always stay).
    pub keep_releases: usize,
    /// `[prometheus] url`: the only Prometheus the `gate` instruction may query (a script
    /// cannot name another); `None`: a `gate` step fails.
    pub prometheus: Option<hotroll_gate::Prometheus>,
}

/// A command the agent may run for `apply`/`check`; script args are appended to `command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// Program and its fixed arguments (no shell unless the operator writes one).
    pub command: Vec<String>,
    /// The hook's own bound; the script's step deadline applies too, the shorter wins.
    pub timeout: Option<Duration>,
}

impl Config {
    /// A config with defaults for everything but the node name, for tests and embedding.
    /// Plaintext when `coordinator` is `http://` (tests, simulations, embedding); a config
    /// file or the flags must say `insecure` for that.
    pub fn new(node: impl Into<String>, coordinator: impl Into<String>, data_dir: PathBuf) -> Self {
        let coordinator = coordinator.into();
        Self {
            node: node.into(),
            insecure: !hotroll_tls::client::is_tls_url(&coordinator),
            join_token: None,
            ca_file: None,
            coordinators: vec![coordinator.clone()],
            coordinator,
            data_dir,
            labels: BTreeMap::new(),
            hooks: BTreeMap::new(),
            services: Vec::new(),
            beam: BTreeMap::new(),
            releases: BTreeMap::new(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            reconnect_max_backoff: DEFAULT_RECONNECT_MAX_BACKOFF,
            keep_releases: DEFAULT_KEEP_RELEASES,
            prometheus: None,
        }
    }

    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parse and validate `text`; `path` is only used in error messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            ConfigError::invalid(path, text, span.map(|s| s.start), message)
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().trim().to_string()))?;

        let mut beam = BTreeMap::new();
        for entry in raw.beam {
            let span = entry.span();
            let entry = entry
                .into_inner()
                .check()
                .map_err(|m| at(Some(span.clone()), m))?;
            if beam.contains_key(&entry.app) {
                return Err(at(
                    Some(span),
                    format!("beam app `{}` is declared twice", entry.app),
                ));
            }
            beam.insert(entry.app.clone(), entry);
        }
        let mut releases = BTreeMap::new();
        for entry in raw.release {
            let span = entry.span();
            let entry = entry
                .into_inner()
                .check()
                .map_err(|m| at(Some(span.clone()), m))?;
            let twice = if releases.contains_key(&entry.app) {
                Some("declared twice")
            } else if beam.contains_key(&entry.app) {
                Some("both a [[release]] and a [[beam]] app")
            } else {
                None
            };
            if let Some(problem) = twice {
                return Err(at(
                    Some(span),
                    format!("release app `{}` is {problem}", entry.app),
                ));
            }
            releases.insert(entry.app.clone(), entry);
        }

        let node = match raw.node {
            Some(node) => {
                check_node_name(node.get_ref()).map_err(|m| at(Some(node.span()), m))?;
                node.into_inner()
            }
            None => default_node_name().map_err(|m| at(None, m))?,
        };
        let coordinators = match raw.coordinator {
            Some(c) => {
                let span = c.span();
                let urls = c.into_inner().into_urls();
                check_coordinators(&urls).map_err(|m| at(Some(span), m))?;
                urls
            }
            None => vec![DEFAULT_COORDINATOR.to_string()],
        };
        let coordinator = coordinators[0].clone();
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let join_token = match raw.join_token {
            Some(token) => {
                hotroll_tls::Token::parse(token.get_ref())
                    .map_err(|e| at(Some(token.span()), format!("`join_token`: {e}")))?;
                Some(token.into_inner())
            }
            None => None,
        };

        let mut hooks = BTreeMap::new();
        for (name, hook) in raw.hooks {
            let span = hook.span();
            let hook = hook.into_inner();
            if hook.command.is_empty() || hook.command[0].is_empty() {
                return Err(at(
                    Some(span),
                    format!("hook `{name}`: `command` must name a program"),
                ));
            }
            let timeout = match hook.timeout {
                Some(t) if t.get_ref().0.is_zero() => {
                    return Err(at(
                        Some(t.span()),
                        format!("hook `{name}`: `timeout` must be greater than zero"),
                    ));
                }
                t => t.map(|t| t.into_inner().0),
            };
            hooks.insert(
                name,
                HookConfig {
                    command: hook.command,
                    timeout,
                },
            );
        }

        let mut services = Vec::with_capacity(raw.services.len());
        let mut seen = BTreeSet::new();
        let hook_names: BTreeSet<String> = hooks.keys().cloned().collect();
        for service in raw.services {
            let span = service.span();
            let service = service.into_inner();
            let name = service.name().to_string();
            if name.is_empty() {
                return Err(at(Some(span), "service `name` must not be empty".into()));
            }
            if !seen.insert(name.clone()) {
                return Err(at(
                    Some(span),
                    format!("service `{name}` is declared twice"),
                ));
            }
            // Checked here so that a bad entry stops the agent with its position.
            let service = service
                .check(&hook_names)
                .map_err(|m| at(Some(span), format!("service `{name}`: {m}")))?;
            services.push(service);
        }
        let keep_releases = match raw.keep_releases {
            Some(n) if *n.get_ref() < 1 => {
                return Err(at(
                    Some(n.span()),
                    "`keep_releases` must be at least 1".to_string(),
                ));
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => DEFAULT_KEEP_RELEASES,
        };

        let positive = |d: Option<Spanned<HumanDuration>>, key: &str, default: Duration| match d {
            Some(d) if d.get_ref().0.is_zero() => Err(at(
                Some(d.span()),
                format!("`{key}` must be greater than zero"),
            )),
            Some(d) => Ok(d.into_inner().0),
            None => Ok(default),
        };
        let prometheus = match raw.prometheus {
            Some(section) => {
                let url = section.into_inner().url;
                let prometheus = hotroll_gate::Prometheus::new(url.get_ref())
                    .map_err(|e| at(Some(url.span()), format!("[prometheus] `url`: {e}")))?;
                Some(prometheus)
            }
            None => None,
        };
        let heartbeat_interval = positive(
            raw.heartbeat_interval,
            "heartbeat_interval",
            DEFAULT_HEARTBEAT_INTERVAL,
        )?;
        let reconnect_max_backoff = positive(
            raw.reconnect_max_backoff,
            "reconnect_max_backoff",
            DEFAULT_RECONNECT_MAX_BACKOFF,
        )?;

        Ok(Self {
            node,
            coordinator,
            coordinators,
            insecure: raw.insecure.unwrap_or(false),
            join_token,
            ca_file: raw.ca_file,
            data_dir,
            labels: raw.labels,
            hooks,
            services,
            beam,
            releases,
            heartbeat_interval,
            reconnect_max_backoff,
            keep_releases,
            prometheus,
        })
    }

    /// Apply command-line overrides, validated like the file's values.
    pub fn apply_overrides(
        &mut self,
        node: Option<String>,
        coordinator: Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(node) = node {
            check_node_name(&node).map_err(|message| ConfigError::Override {
                what: "--node",
                message,
            })?;
            self.node = node;
        }
        if let Some(coordinator) = coordinator {
            // A group: comma-separated URLs.
            let urls: Vec<String> = coordinator
                .split(',')
                .map(|url| url.trim().to_string())
                .collect();
            check_coordinators(&urls).map_err(|message| ConfigError::Override {
                what: "--coordinator",
                message,
            })?;
            self.coordinator = urls[0].clone();
            self.coordinators = urls;
        }
        Ok(())
    }

    /// `--insecure` and `--join TOKEN`.
    pub fn apply_security_overrides(
        &mut self,
        insecure: bool,
        join_token: Option<String>,
    ) -> Result<(), ConfigError> {
        if insecure {
            self.insecure = true;
        }
        if let Some(token) = join_token {
            hotroll_tls::Token::parse(&token).map_err(|e| ConfigError::Override {
                what: "--join",
                message: e.to_string(),
            })?;
            self.join_token = Some(token);
        }
        Ok(())
    }

    /// Plaintext only when asked for: `http://` needs `insecure`, `insecure` needs `http://`.
    pub fn check_transport(&self) -> Result<(), ConfigError> {
        let tls = hotroll_tls::client::is_tls_url(&self.coordinator);
        let message = match (tls, self.insecure) {
            (false, false) => format!(
                "coordinator `{}` is plaintext http://: use https://, or set `insecure = true` \
                 (--insecure) to talk to a coordinator started with `serve --insecure`",
                self.coordinator
            ),
            (true, true) => format!(
                "`insecure` talks plaintext, but coordinator `{}` is https://",
                self.coordinator
            ),
            _ => return Ok(()),
        };
        Err(ConfigError::Override {
            what: "coordinator",
            message,
        })
    }

    /// Names of the declared hooks.
    pub fn hook_names(&self) -> BTreeSet<String> {
        self.hooks.keys().cloned().collect()
    }

    /// Names of the declared services.
    pub fn service_names(&self) -> BTreeSet<String> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }

    /// Every MFA some `[[beam]]` entry allows `apply` to call.
    pub fn mfa_names(&self) -> BTreeSet<String> {
        self.beam
            .values()
            .flat_map(|b| b.mfa_allow.iter().cloned())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{what}: {message}")]
    Override { what: &'static str, message: String },
}

impl ConfigError {
    fn invalid(path: &Path, text: &str, offset: Option<usize>, message: String) -> Self {
        match offset {
            Some(offset) => {
                let (line, column) = hotroll_script::diagnostic::line_col(text, offset);
                ConfigError::At {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message,
                }
            }
            None => ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<Spanned<String>>,
    coordinator: Option<Spanned<CoordinatorList>>,
    insecure: Option<bool>,
    join_token: Option<Spanned<String>>,
    ca_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    hooks: BTreeMap<String, Spanned<RawHook>>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    reconnect_max_backoff: Option<Spanned<HumanDuration>>,
    keep_releases: Option<Spanned<i64>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    beam: Vec<Spanned<RawBeam>>,
    #[serde(default)]
    release: Vec<Spanned<RawRelease>>,
    prometheus: Option<Spanned<RawPrometheus>>,
}

/// `[prometheus]`: where this node's `gate` instructions send their queries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrometheus {
    url: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    command: Vec<String>,
    timeout: Option<Spanned<HumanDuration>>,
}

/// A duration written as `"500ms"`, `"30s"`, `"5m"` or `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parse `"500ms"`, `"30s"`, `"5m"`, `"1h"`: the script's syntax and bound (at most 24h).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::parse_duration(text.trim()).map_err(|e| format!("invalid duration: {e}"))
}

fn check_node_name(node: &str) -> Result<(), String> {
    if node.is_empty() {
        return Err("`node` must not be empty".into());
    }
    if node.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "node name `{node}` must not contain whitespace or control characters"
        ));
    }
    Ok(())
}

/// `coordinator = "URL"` or, for a group, `coordinator = ["URL", ..]`.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum CoordinatorList {
    One(String),
    Many(Vec<String>),
}

impl CoordinatorList {
    fn into_urls(self) -> Vec<String> {
        match self {
            CoordinatorList::One(url) => vec![url],
            CoordinatorList::Many(urls) => urls,
        }
    }
}

/// Every URL valid, at least one, no repeats, one scheme for all (the transport is one).
fn check_coordinators(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("`coordinator` names no coordinator".into());
    }
    for url in urls {
        check_coordinator(url)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(repeated) = urls.iter().find(|url| !seen.insert(url.as_str())) {
        return Err(format!("coordinator `{repeated}` is listed twice"));
    }
    let tls = hotroll_tls::client::is_tls_url(&urls[0]);
    if let Some(other) = urls
        .iter()
        .find(|url| hotroll_tls::client::is_tls_url(url) != tls)
    {
        return Err(format!(
            "coordinator `{other}` does not use the scheme of `{}`: the group's coordinators are all https:// or all http://",
            urls[0]
        ));
    }
    Ok(())
}

fn check_coordinator(address: &str) -> Result<(), String> {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("coordinator address `{address}` must start with https:// (or http://)")
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!(
            "coordinator address `{address}` names no host, e.g. https://10.0.0.1:7070"
        ));
    }
    tonic::transport::Endpoint::from_shared(address.to_string())
        .map(|_| ())
        .map_err(|e| format!("coordinator address `{address}` is not a valid URI: {e}"))
}

fn default_node_name() -> Result<String, String> {
    let host = nix::unistd::gethostname()
        .map_err(|e| format!("`node` is not set and the host name cannot be read: {e}"))?;
    let host = host
        .into_string()
        .map_err(|_| "`node` is not set and the host name is not UTF-8".to_string())?;
    check_node_name(&host)
        .map_err(|e| format!("`node` is not set and the host name is unusable: {e}"))?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/hotroll/agent.toml"), text)
    }

    #[test]
    fn parses_the_documented_example() -> Result<(), ConfigError> {
        let config = parse(
            r#"
node = "node-1"
coordinator = "http://127.0.0.1:7070"
data_dir = "/var/lib/hotroll"
labels = { role = "miner", zone = "a" }

[hooks]
disk_space = { command = ["sh", "-c", "test $(df --output=avail -k / | tail -1) -gt 1000000"], timeout = "10s" }
migrate    = { command = ["/usr/local/bin/migrate"], timeout = "5m" }

[[services]]
name = "primes"
app = "primes"
command = "bin/primes"
"#,
        )?;
        assert_eq!(config.node, "node-1");
        assert_eq!(config.labels.get("role").map(String::as_str), Some("miner"));
        assert_eq!(
            config.hooks.get("migrate").and_then(|h| h.timeout),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            config.hooks.get("disk_space").map(|h| h.command.len()),
            Some(3)
        );
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.services[0].command, ["bin/primes"]);
        assert_eq!(config.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        Ok(())
    }

    #[test]
    fn the_prometheus_of_gates_is_declared_and_checked() -> Result<(), ConfigError> {
        let config = parse("[prometheus]\nurl = \"http://127.0.0.1:9090\"\n")?;
        assert_eq!(
            config.prometheus.as_ref().map(|p| p.url()),
            Some("http://127.0.0.1:9090")
        );
        assert!(parse("")?.prometheus.is_none());
        let err = parse("[prometheus]\nurl = \"https://prom:9090\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("/etc/hotroll/agent.toml:2:7: ") && err.contains("only http://"),
            "{err}"
        );
        let err = parse("[prometheus]\nurl = \"http://p:1\"\nquery = \"up\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("query"), "{err}");
        Ok(())
    }

    #[test]
    fn defaults_apply() -> Result<(), ConfigError> {
        let config = parse("")?;
        assert!(!config.node.is_empty());
        assert_eq!(config.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        Ok(())
    }

    #[test]
    fn unknown_keys_are_rejected_with_position() {
        let err = parse("node = \"a\"\ncoordinatr = \"http://x:1\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("/etc/hotroll/agent.toml:2:1: "), "{err}");
        assert!(err.contains("coordinatr"), "{err}");

        let err = parse("[hooks]\nx = { command = [\"true\"], tmeout = \"1s\" }\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("tmeout"), "{err}");
    }

    #[test]
    fn durations_are_checked() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("3d").is_err());

        let err = parse("heartbeat_interval = \"5 parsecs\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(":1:") && err.contains("invalid duration"),
            "{err}"
        );
        assert!(parse("reconnect_max_backoff = \"0s\"\n").is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse("coordinator = \"127.0.0.1:7070\"\n").is_err());
        assert!(parse("coordinator = \"ftp://c:7070\"\n").is_err());
        assert!(parse("join_token = \"hr1.nope\"\n").is_err());
        assert!(parse("node = \"\"\n").is_err());
        assert!(parse("node = \"a b\"\n").is_err());
        assert!(parse("[hooks]\nx = { command = [] }\n").is_err());
        assert!(
            parse(
                "[[services]]\nname = \"a\"\napp = \"a\"\n[[services]]\nname = \"a\"\napp = \"b\"\n"
            )
            .is_err()
        );
        let err = parse("[[beam]]\nnode = \"x@y\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn beam_apps_are_parsed_and_checked() -> Result<(), ConfigError> {
        let config = parse(
            r#"
[[beam]]
app = "counter"
node = "counter@127.0.0.1"
cookie_file = "/var/lib/counter/.erlang.cookie"
code_dir = "/opt/counter/ebin"
start = ["/opt/counter/bin/counter", "start"]
mfa_allow = ["counter_admin:drain/0"]
"#,
        )?;
        let beam = config.beam.get("counter");
        assert_eq!(beam.map(|b| b.node.as_str()), Some("counter@127.0.0.1"));
        assert!(config.mfa_names().contains("counter_admin:drain/0"));

        let base = "app = \"c\"\nnode = \"c@h\"\ncookie_file = \"/c\"\ncode_dir = \"/e\"\nstart = [\"x\"]\n";
        assert!(parse(&format!("[[beam]]\n{base}")).is_ok());
        for (bad, what) in [
            ("mfa_allow = [\"os:cmd\"]\n", "mfa_allow"),
            ("mfa_allow = [\"'os':cmd/1\"]\n", "mfa_allow"),
            ("extra = 1\n", "extra"),
        ] {
            let err = parse(&format!("[[beam]]\n{base}{bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(what), "{bad}: {err}");
        }
        assert!(parse("[[beam]]\napp = \"c\"\nnode = \"nohost\"\ncookie_file = \"/c\"\ncode_dir = \"/e\"\nstart = [\"x\"]\n").is_err());
        assert!(parse(&format!("[[beam]]\n{base}[[beam]]\n{base}")).is_err());
        assert!(is_mfa("counter_admin:drain/0") && !is_mfa("a:b/") && !is_mfa("A:b/1"));
        Ok(())
    }

    #[test]
    fn plaintext_only_when_asked_for() -> Result<(), ConfigError> {
        assert!(
            parse("coordinator = \"https://c:7070\"\n")?
                .check_transport()
                .is_ok()
        );
        let plain = parse("coordinator = \"http://c:7070\"\n")?;
        let err = plain
            .check_transport()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("insecure"), "{err}");
        assert!(
            parse("coordinator = \"http://c:7070\"\ninsecure = true\n")?
                .check_transport()
                .is_ok()
        );
        assert!(
            parse("coordinator = \"https://c:7070\"\ninsecure = true\n")?
                .check_transport()
                .is_err()
        );
        let mut flagged = plain;
        flagged.apply_security_overrides(true, None)?;
        assert!(flagged.check_transport().is_ok());
        assert!(
            flagged
                .apply_security_overrides(false, Some("x".into()))
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn overrides_are_validated() -> Result<(), ConfigError> {
        let mut config = parse("node = \"a\"\n")?;
        config.apply_overrides(Some("b".into()), Some("http://c:1".into()))?;
        assert_eq!(
            (config.node.as_str(), config.coordinator.as_str()),
            ("b", "http://c:1")
        );
        assert!(config.apply_overrides(Some(String::new()), None).is_err());
        Ok(())
    }
}
