//! A `[[release]]` entry of `agent.toml`: an Erlang node running an OTP release (a rebar3/relx
//! release root) that `runtime = "otp_release"` scripts upgrade with the node's own release
//! handler (docs/design.md §13).
//!
//! ```toml
//! [[release]]
//! app = "pm"                              # the app scripts name
//! root_dir = "/opt/pm"                    # the release root: bin/, lib/, releases/
//! name = "pm"                             # the relx release name (default: app)
//! node = "pm@10.0.0.1"                    # what -name in vm.args(.src) gives this node
//! cookie_file = "/opt/pm/cookie"
//! start = ["/opt/pm/bin/pm", "daemon"]    # default: <root_dir>/bin/<name> daemon
//! env = { NODE_NAME = "pm@10.0.0.1" }     # this node's variables for vm.args.src/sys.config.src
//! cookie_env = "COOKIE"                   # optional: also set to the cookie file's content
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::beam::is_atom;

/// A `[[release]]` entry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseConfig {
    pub app: String,
    /// The release root (relx's `RELEASE_ROOT_DIR`).
    pub root_dir: PathBuf,
    /// The release name: `bin/<name>`, `releases/<vsn>/<name>.rel`.
    pub name: String,
    /// `name@host`, as the node's `vm.args` gives it.
    pub node: String,
    pub cookie_file: PathBuf,
    /// Program and arguments that start the node (a rollback by restart, a node found down).
    pub start: Vec<String>,
    /// OS variables the node is started with, on top of the agent's own environment.
    pub env: BTreeMap<String, String>,
    /// A variable set to the cookie when the node is started (so the cookie stays in its file).
    pub cookie_env: Option<String>,
}

impl ReleaseConfig {
    /// `<root_dir>/bin/<name>`: relx's start script.
    pub fn script(&self) -> PathBuf {
        self.root_dir.join("bin").join(&self.name)
    }
}

/// A `[[release]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelease {
    app: String,
    root_dir: PathBuf,
    name: Option<String>,
    node: String,
    cookie_file: PathBuf,
    start: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cookie_env: Option<String>,
}

fn is_plain_name(name: &str) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(|c| c.is_control() || c.is_whitespace()))
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl RawRelease {
    /// Check the entry; the error names what is wrong.
    pub(super) fn check(self) -> Result<ReleaseConfig, String> {
        let raw = self;
        let app = raw.app;
        if !is_plain_name(&app) {
            return Err(format!(
                "release `app` = `{app}` must be a non-empty name without path separators"
            ));
        }
        let name = raw.name.unwrap_or_else(|| app.clone());
        // The release name becomes file names (bin/<name>, <name>.rel) and an atom in the node.
        if !is_atom(&name) {
            return Err(format!(
                "release app `{app}`: `name` = `{name}` must be a release name (an unquoted \
                 Erlang atom, as relx's {{release, {{Name, Vsn}}, ..}})"
            ));
        }
        if !raw.root_dir.is_absolute() {
            return Err(format!(
                "release app `{app}`: `root_dir` = `{}` must be an absolute path",
                raw.root_dir.display()
            ));
        }
        match raw.node.split_once('@') {
            Some((n, host))
                if !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    && !host.is_empty()
                    && !host.chars().any(|c| c.is_whitespace() || c.is_control()) => {}
            _ => {
                return Err(format!(
                    "release app `{app}`: `node` = `{}` must be an Erlang node name, name@host",
                    raw.node
                ));
            }
        }
        if raw.cookie_file.as_os_str().is_empty() {
            return Err(format!(
                "release app `{app}`: `cookie_file` must not be empty"
            ));
        }
        for key in raw.env.keys() {
            if !is_env_name(key) {
                return Err(format!(
                    "release app `{app}`: `env` key `{key}` is not a valid variable name"
                ));
            }
        }
        if let Some(var) = &raw.cookie_env {
            if !is_env_name(var) {
                return Err(format!(
                    "release app `{app}`: `cookie_env` = `{var}` is not a valid variable name"
                ));
            }
            if raw.env.contains_key(var) {
                return Err(format!(
                    "release app `{app}`: `{var}` is both `cookie_env` and a key of `env`"
                ));
            }
        }
        let start = match raw.start {
            Some(start) if start.first().is_none_or(String::is_empty) => {
                return Err(format!(
                    "release app `{app}`: `start` must name a program that starts the node"
                ));
            }
            Some(start) => start,
            None => vec![
                raw.root_dir
                    .join("bin")
                    .join(&name)
                    .to_string_lossy()
                    .into_owned(),
                "daemon".to_string(),
            ],
        };
        Ok(ReleaseConfig {
            app,
            root_dir: raw.root_dir,
            name,
            node: raw.node,
            cookie_file: raw.cookie_file,
            start,
            env: raw.env,
            cookie_env: raw.cookie_env,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/hotroll/agent.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    const BASE: &str = "app = \"pm\"\nroot_dir = \"/opt/pm\"\nnode = \"pm@127.0.0.1\"\ncookie_file = \"/opt/pm/cookie\"\n";

    #[test]
    fn a_release_entry_gets_relx_defaults() -> Result<(), ConfigError> {
        let config = parse(&format!(
            "[[release]]\n{BASE}env = {{ NODE_NAME = \"pm@127.0.0.1\" }}\ncookie_env = \"COOKIE\"\n"
        ))?;
        let release = config.releases.get("pm");
        assert_eq!(release.map(|r| r.name.as_str()), Some("pm"));
        assert_eq!(
            release.map(|r| r.start.clone()),
            Some(vec!["/opt/pm/bin/pm".to_string(), "daemon".to_string()])
        );
        assert_eq!(
            release.and_then(|r| r.env.get("NODE_NAME").cloned()),
            Some("pm@127.0.0.1".to_string())
        );
        assert_eq!(
            release.and_then(|r| r.cookie_env.clone()),
            Some("COOKIE".to_string())
        );
        Ok(())
    }

    #[test]
    fn bad_release_entries_name_their_place() {
        for (extra, what) in [
            ("name = \"Pm\"\n", "`name`"),
            ("env = { \"A-B\" = \"x\" }\n", "`env` key"),
            ("cookie_env = \"1X\"\n", "cookie_env"),
            ("start = []\n", "`start`"),
            ("stray = 1\n", "stray"),
        ] {
            let err = error(&format!("node = \"n\"\n\n[[release]]\n{BASE}{extra}"));
            // file:line:col of the entry (or of the unknown key).
            let line: Option<usize> = err
                .strip_prefix("/etc/hotroll/agent.toml:")
                .and_then(|rest| rest.split(':').next()?.parse().ok());
            assert!(line.is_some_and(|l| l >= 3), "{extra}: {err}");
            assert!(err.contains(what), "{extra}: {err}");
        }
        let relative = BASE.replace("/opt/pm\"", "opt/pm\"");
        assert!(error(&format!("[[release]]\n{relative}")).contains("absolute"));
        let no_host = BASE.replace("pm@127.0.0.1", "pm");
        assert!(error(&format!("[[release]]\n{no_host}")).contains("name@host"));
        assert!(error(&format!("[[release]]\n{BASE}[[release]]\n{BASE}")).contains("twice"));
        assert!(
            error(&format!(
                "[[release]]\n{BASE}[[beam]]\napp = \"pm\"\nnode = \"c@h\"\ncookie_file = \"/c\"\ncode_dir = \"/e\"\nstart = [\"x\"]\n"
            ))
            .contains("both")
        );
        assert!(
            error(&format!(
                "[[release]]\n{BASE}cookie_env = \"C\"\nenv = {{ C = \"x\" }}\n"
            ))
            .contains("both")
        );
    }
}
