//! Who a release's `vm.args` (or relx's `vm.args.src`) makes the node: a tarball carries one
//! `vm.args` for the whole fleet, so before anything changes the agent checks that the new
//! release, started with this node's variables, boots the same node name and cookie.

use std::collections::BTreeMap;

/// The name and cookie a `vm.args` gives, after relx's `${VAR}` substitution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmIdentity {
    /// `-name X` (long) or `-sname X` (short): `(long, X)`.
    pub name: Option<(bool, String)>,
    pub cookie: Option<String>,
}

/// relx's `replace_os_vars`: `${VAR}` becomes the variable's value (empty when unset),
/// `${VAR:-default}` the default when it is unset or empty.
pub fn substitute(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &after[..end];
        let value = match inner.split_once(":-") {
            Some((var, default)) => env(var)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string()),
            None => env(inner).unwrap_or_default(),
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The `-name`/`-sname` and `-setcookie` lines of a `vm.args` (one flag per line, `#` comments).
pub fn parse_vm_args(text: &str) -> VmIdentity {
    let mut identity = VmIdentity::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("-name"), Some(v)) => identity.name = Some((true, v.to_string())),
            (Some("-sname"), Some(v)) => identity.name = Some((false, v.to_string())),
            (Some("-setcookie"), Some(v)) => identity.cookie = Some(v.to_string()),
            _ => {}
        }
    }
    identity
}

/// Check the identity `vm_args` (with variables from `vars`, then the agent's environment)
/// gives against the node's declared name and cookie. `Ok` says what was checked.
pub fn check(
    vm_args: &str,
    vars: &BTreeMap<String, String>,
    node: &str,
    cookie: &str,
) -> Result<String, String> {
    let lookup = |var: &str| vars.get(var).cloned().or_else(|| std::env::var(var).ok());
    let identity = parse_vm_args(&substitute(vm_args, &lookup));
    let name = match &identity.name {
        None => {
            return Err(format!(
                "its vm.args sets no -name or -sname: the node would not come back as {node}"
            ));
        }
        Some((true, name)) if name != node => {
            return Err(format!(
                "its vm.args makes the node `{name}`, not `{node}` (set the node's variables in \
                 the [[release]] `env` of agent.toml)"
            ));
        }
        Some((false, name))
            if node.split('@').next() != Some(name.split('@').next().unwrap_or(name)) =>
        {
            return Err(format!(
                "its vm.args makes the node `-sname {name}`, not `{node}`"
            ));
        }
        Some((_, name)) => name.clone(),
    };
    match &identity.cookie {
        Some(c) if c != cookie => Err(format!(
            "its vm.args sets a different cookie than the node's cookie file: `bin/<rel> eval`, \
             the agent and the other nodes could not reach {name}"
        )),
        Some(_) => Ok(format!("the new release boots {name} with the same cookie")),
        None => Ok(format!(
            "the new release boots {name} (no -setcookie: the cookie file stays in use)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn relx_variables_are_substituted() {
        let env = vars(&[("NODE_NAME", "pm1@127.0.0.1"), ("EMPTY", "")]);
        let lookup = |v: &str| env.get(v).cloned();
        assert_eq!(
            substitute("-name ${NODE_NAME}\n", &lookup),
            "-name pm1@127.0.0.1\n"
        );
        assert_eq!(
            substitute("${UNSET_X_1}|${EMPTY:-d}|${NO:-x}", &lookup),
            "|d|x"
        );
        assert_eq!(substitute("a ${open", &lookup), "a ${open");
    }

    #[test]
    fn the_new_release_must_boot_the_same_node() {
        let env = vars(&[("NODE_NAME", "pm1@127.0.0.1"), ("COOKIE", "c1")]);
        let src = "## node\n-name ${NODE_NAME}\n-setcookie ${COOKIE}\n+K true\n";
        assert!(check(src, &env, "pm1@127.0.0.1", "c1").is_ok());
        let err = check(src, &env, "pm2@127.0.0.1", "c1")
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("pm1@127.0.0.1") && err.contains("pm2@127.0.0.1"),
            "{err}"
        );
        let err = check(src, &env, "pm1@127.0.0.1", "c2")
            .err()
            .unwrap_or_default();
        assert!(err.contains("cookie"), "{err}");
        // A fixed name in the tarball: the classic mistake.
        let err = check("-name pm@10.0.0.9\n", &env, "pm1@127.0.0.1", "c1")
            .err()
            .unwrap_or_default();
        assert!(err.contains("pm@10.0.0.9"), "{err}");
        assert!(check("-setcookie c1\n", &env, "pm1@127.0.0.1", "c1").is_err());
        assert!(check("-sname pm1\n", &env, "pm1@127.0.0.1", "c1").is_ok());
    }
}
