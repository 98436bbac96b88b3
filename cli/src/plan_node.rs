//! `hotroll plan beam --node NAME`: what the running node has loaded. The node is asked once,
//! with `erl_call` (Erlang's own client, no crate), for every loaded module's md5
//! (`Mod:module_info(md5)`) and the app's loaded version; the new ebin's md5s come from
//! `beam_lib:md5/1` in a local `erl`, so both sides are the same digest of the same chunks.
//! Read-only: nothing is loaded, changed or started in the node.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// What the node runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Module -> md5 (hex, upper case).
    pub md5: BTreeMap<String, String>,
    /// The app's version as loaded (`application:get_key(App, vsn)`), when it is.
    pub app_vsn: Option<String>,
}

/// The cookie: the file given, else `~/.erlang.cookie`.
pub fn cookie(file: Option<&Path>) -> anyhow::Result<String> {
    let path = match file {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".erlang.cookie"))
            .context("no --cookie-file and no HOME for ~/.erlang.cookie")?,
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the cookie file {}", path.display()))?;
    let cookie = text.trim().to_string();
    if cookie.is_empty() {
        bail!("the cookie file {} is empty", path.display());
    }
    Ok(cookie)
}

/// `M=HEX;` pairs (and `@app=VSN;`) as both Erlang snippets print them, quotes, spaces and
/// line breaks of the printer ignored.
fn parse_pairs(text: &str) -> BTreeMap<String, String> {
    let flat: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '"')
        .collect();
    flat.split(';')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@' || c == '.' || c == '-')
}

/// Ask `node` for its loaded modules' md5 and `app`'s loaded version.
pub fn loaded(node: &str, cookie: &str, app: &str) -> anyhow::Result<Loaded> {
    if !valid_name(node) || !valid_name(app) {
        bail!("`{node}` / `{app}`: not a node or app name");
    }
    let expr = format!(
        "lists:flatten([[io_lib:format(\"~s=~s;\", [M, binary:encode_hex(M:module_info(md5))]) \
         || {{M, F}} <- code:all_loaded(), is_list(F)], \
         case application:get_key('{app}', vsn) of {{ok, V}} -> io_lib:format(\"@app=~s;\", [V]); \
         _ -> \"\" end]).\n"
    );
    let mut child = Command::new("erl_call")
        .args(["-name", node, "-c", cookie, "-timeout", "15", "-e"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run erl_call (install Erlang: apt-get install erlang-base)")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("erl_call stdin")?;
        stdin.write_all(expr.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    if !out.status.success() || !text.starts_with("{ok,") {
        bail!(
            "cannot ask {node} for its loaded modules: {text}{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut pairs = parse_pairs(text.trim_start_matches("{ok,").trim_end_matches('}'));
    let app_vsn = pairs.remove("@app");
    Ok(Loaded {
        md5: pairs,
        app_vsn,
    })
}

/// `beam_lib:md5/1` of every `.beam` in `ebin`, in a local `erl`.
pub fn md5s(ebin: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let eval = "[D] = init:get_plain_arguments(), \
        io:format(\"~s\", [lists:flatten([io_lib:format(\"~s=~s;\", [M, binary:encode_hex(Md5)]) \
        || F <- filelib:wildcard(filename:join(D, \"*.beam\")), {ok, {M, Md5}} <- [beam_lib:md5(F)]])]), \
        halt().";
    let out = Command::new("erl")
        .args(["-noshell", "-noinput", "-eval", eval, "-extra"])
        .arg(ebin)
        .stdin(Stdio::null())
        .output()
        .context("cannot run erl (install Erlang: apt-get install erlang-base)")?;
    if !out.status.success() {
        bail!(
            "erl could not read {}: {}",
            ebin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_pairs(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_pairs_are_read() {
        let text = "\"counter_server=0A1B;counter_fmt=FF00;\"\n \"@app=1;\"";
        let pairs = parse_pairs(text);
        assert_eq!(
            pairs.get("counter_server").map(String::as_str),
            Some("0A1B")
        );
        assert_eq!(pairs.get("@app").map(String::as_str), Some("1"));
        assert_eq!(pairs.len(), 3);
        assert!(!valid_name("a'b"));
        assert!(valid_name("counter-node-1@127.0.0.1"));
    }
}
