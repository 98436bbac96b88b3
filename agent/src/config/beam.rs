//! A `[[beam]]` entry of `agent.toml`: an Erlang node whose app `runtime = "beam"` scripts
//! upgrade in place, and the only functions `apply` may call in it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

/// A `[[beam]]` entry: an app running in a local Erlang node that `runtime = "beam"` scripts
/// upgrade in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeamConfig {
    pub app: String,
    /// The node to drive, `name@host` (a node started with `-name` or `-sname`).
    pub node: String,
    /// The node's distribution cookie (read when the agent connects).
    pub cookie_file: PathBuf,
    /// Where the app's permanent `.beam` files live: the node loads them when it (re)starts,
    /// the agent writes the new release there when it is made permanent.
    pub code_dir: PathBuf,
    /// Program and arguments that start the node (for `restart_new_emulator` and a rollback by
    /// restart).
    pub start: Vec<String>,
    /// The only `module:function/arity` an `apply` may call.
    pub mfa_allow: BTreeSet<String>,
}

/// A `[[beam]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBeam {
    app: String,
    node: String,
    cookie_file: PathBuf,
    code_dir: PathBuf,
    start: Vec<String>,
    #[serde(default)]
    mfa_allow: Vec<String>,
}

impl RawBeam {
    /// Check the entry; the error names what is wrong.
    pub(super) fn check(self) -> Result<BeamConfig, String> {
        let raw = self;
        let app = raw.app;
        if app.is_empty()
            || app == "."
            || app == ".."
            || app.contains(['/', '\\'])
            || app.chars().any(char::is_control)
        {
            return Err(format!(
                "beam `app` = `{app}` must be a non-empty name without path separators"
            ));
        }
        match raw.node.split_once('@') {
            Some((name, host))
                if !name.is_empty()
                    && !host.is_empty()
                    && !raw
                        .node
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control()) => {}
            _ => {
                return Err(format!(
                    "beam app `{app}`: `node` = `{}` must be an Erlang node name, name@host",
                    raw.node
                ));
            }
        }
        if raw.cookie_file.as_os_str().is_empty() {
            return Err(format!("beam app `{app}`: `cookie_file` must not be empty"));
        }
        if raw.code_dir.as_os_str().is_empty() {
            return Err(format!("beam app `{app}`: `code_dir` must not be empty"));
        }
        if raw.start.first().is_none_or(String::is_empty) {
            return Err(format!(
                "beam app `{app}`: `start` must name a program that starts the node"
            ));
        }
        let mut mfa_allow = BTreeSet::new();
        for mfa in raw.mfa_allow {
            if !is_mfa(&mfa) {
                return Err(format!(
                    "beam app `{app}`: `mfa_allow` entry `{mfa}` is not module:function/arity \
                 (unquoted atoms)"
                ));
            }
            mfa_allow.insert(mfa);
        }
        Ok(BeamConfig {
            app,
            node: raw.node,
            cookie_file: raw.cookie_file,
            code_dir: raw.code_dir,
            start: raw.start,
            mfa_allow,
        })
    }
}

/// `module:function/arity` with unquoted atoms (the form `apply` scripts use).
pub fn is_mfa(text: &str) -> bool {
    text.split_once(':')
        .and_then(|(module, rest)| {
            let (function, arity) = rest.split_once('/')?;
            let arity_ok =
                !arity.is_empty() && arity.len() <= 3 && arity.chars().all(|c| c.is_ascii_digit());
            Some(is_atom(module) && is_atom(function) && arity_ok)
        })
        .unwrap_or(false)
}

/// An unquoted Erlang atom: a lowercase letter, then letters, digits, `_` or `@`.
pub fn is_atom(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@')
        && text.len() <= 255
}
