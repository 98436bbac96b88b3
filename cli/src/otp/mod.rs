//! `hotroll check` on an otp_release script: read the tarball `unpack_release` names before
//! anything changes — its `.rel`, the `relup` (UpFrom/DownTo, and instructions hotroll cannot
//! honour safely), `sys.config` parses, the boot file, and the applications the relup touches
//! are in the tarball.

pub mod term;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use hotroll_script::{Diagnostic, Instruction, Runtime, Script};

use term::{Term, consult};

/// Release files are small; anything bigger under `releases/` is not read.
const MAX_RELEASE_FILE: u64 = 16 * 1024 * 1024;

/// What a release tarball holds, as far as the checks need.
#[derive(Debug, Default)]
pub struct Tarball {
    /// Files under `releases/`, by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// `lib/<app>-<vsn>` directories.
    pub libs: BTreeSet<String>,
}

/// Read a `.tar.gz` (or plain `.tar`) release package.
pub fn read_tarball(path: &Path) -> Result<Tarball, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut magic = [0u8; 2];
    let gz = {
        let mut probe = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        probe.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Tarball::default();
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("broken tar archive: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("broken tar entry: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if let Some(rest) = name.strip_prefix("lib/")
            && let Some(dir) = rest.split('/').next()
            && !dir.is_empty()
        {
            out.libs.insert(dir.to_string());
        }
        if name.starts_with("releases/")
            && entry.header().entry_type().is_file()
            && entry.size() <= MAX_RELEASE_FILE
        {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            out.files.insert(name, bytes);
        }
    }
    Ok(out)
}

/// Every problem of the tarball for a script moving `from` → `to`; empty = fine.
pub fn check_tarball(tarball: &Tarball, from: &str, to: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let dir = format!("releases/{to}/");
    let text = |path: &str| {
        tarball
            .files
            .get(path)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    // The .rel: releases/<to>/<name>.rel.
    let rel = tarball
        .files
        .keys()
        .find(|p| p.starts_with(&dir) && p.ends_with(".rel") && !p[dir.len()..].contains('/'))
        .cloned();
    match &rel {
        None => errors.push(format!(
            "no {dir}<rel>.rel: this is not a release package of version {to}"
        )),
        Some(path) => match text(path).map(|t| consult(&t)) {
            Some(Ok(terms)) => match terms.first().and_then(Term::elements) {
                Some([Term::Atom(tag), Term::Tuple(nv), ..]) if tag == "release" => {
                    let vsn = nv.get(1).and_then(Term::string).unwrap_or_default();
                    if vsn != to {
                        errors.push(format!(
                            "{path} is release version {vsn}, but the script installs {to}"
                        ));
                    }
                }
                _ => errors.push(format!("{path} is not {{release, {{Name, Vsn}}, ..}}")),
            },
            Some(Err(e)) => errors.push(format!("{path} does not parse: {e}")),
            None => {}
        },
    }
    if !tarball.files.contains_key(&format!("{dir}start.boot")) {
        errors.push(format!("no boot file {dir}start.boot"));
    }
    // sys.config (relx's .src gets the node's variables at start: any value stands in).
    match (
        text(&format!("{dir}sys.config")),
        text(&format!("{dir}sys.config.src")),
    ) {
        (None, None) => errors.push(format!("no {dir}sys.config or sys.config.src")),
        (plain, src) => {
            let (name, body) = match plain {
                Some(p) => ("sys.config", p),
                None => ("sys.config.src", replace_vars(&src.unwrap_or_default())),
            };
            match consult(&body) {
                Ok(terms) if matches!(terms.as_slice(), [Term::List(_)]) => {}
                Ok(_) => errors.push(format!("{dir}{name} is not one list of app configs")),
                Err(e) => errors.push(format!("{dir}{name} does not parse: {e}")),
            }
        }
    }
    let relup_path = format!("{dir}relup");
    let Some(relup) = text(&relup_path) else {
        errors.push(format!(
            "no {relup_path}: the release cannot be upgraded to in place (build it with \
             `rebar3 as prod relup -v {to} -u {from}` before `rebar3 as prod tar`)"
        ));
        return errors;
    };
    let terms = match consult(&relup) {
        Ok(terms) => terms,
        Err(e) => {
            errors.push(format!("{relup_path} does not parse: {e}"));
            return errors;
        }
    };
    let Some([vsn, Term::List(up), Term::List(down)]) = terms.first().and_then(Term::elements)
    else {
        errors.push(format!("{relup_path} is not {{Vsn, UpFrom, DownTo}}"));
        return errors;
    };
    if vsn.string().as_deref() != Some(to) {
        errors.push(format!(
            "{relup_path} is for version {}, not {to}",
            vsn.string().unwrap_or_default()
        ));
    }
    let froms: Vec<String> = up
        .iter()
        .filter_map(|e| e.elements()?.first()?.string())
        .collect();
    if !froms.iter().any(|f| f == from) {
        errors.push(format!(
            "{relup_path} has no UpFrom entry for {from} (it upgrades from: {})",
            if froms.is_empty() {
                "nothing".to_string()
            } else {
                froms.join(", ")
            }
        ));
    }
    for (kind, entries) in [("UpFrom", up), ("DownTo", down)] {
        for entry in entries {
            let Some([version, _, Term::List(instructions)]) = entry.elements() else {
                errors.push(format!(
                    "{relup_path}: a {kind} entry is not {{Vsn, Descr, Instructions}}"
                ));
                continue;
            };
            let version = version.string().unwrap_or_default();
            for (index, instruction) in instructions.iter().enumerate() {
                let (name, args) = match instruction {
                    Term::Atom(a) => (a.as_str(), &[][..]),
                    Term::Tuple(items) => match items.split_first() {
                        Some((Term::Atom(a), rest)) => (a.as_str(), rest),
                        _ => continue,
                    },
                    _ => continue,
                };
                if name == "sync_nodes" {
                    errors.push(format!(
                        "{relup_path}: {kind} \"{version}\" instruction {} is OTP's sync_nodes, \
                         which waits without a deadline: hotroll refuses it; remove it from the \
                         appup and use a hotroll barrier instead ({{ sync_nodes = \"<id>\" }} in \
                         the script, which has a timeout)",
                        index + 1
                    ));
                }
                if kind == "UpFrom"
                    && name == "load_object_code"
                    && let Some(Term::Tuple(lib)) = args.first()
                    && let [Term::Atom(app), vsn, ..] = lib.as_slice()
                {
                    let dir = format!("{app}-{}", vsn.string().unwrap_or_default());
                    if !tarball.libs.contains(&dir) {
                        errors.push(format!(
                            "{relup_path}: UpFrom \"{version}\" loads {app}'s code from lib/{dir}, \
                             which the tarball does not hold"
                        ));
                    }
                }
            }
        }
    }
    errors
}

/// relx's `${VAR}` substitution with a stand-in value, so the file can be parsed.
fn replace_vars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                out.push('0');
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The tarball of every `unpack_release` of an otp_release script, checked; errors point at the
/// artifact's `source`.
pub fn check_release_tarballs(script: &Script, script_dir: &Path) -> Vec<Diagnostic> {
    if script.runtime != Runtime::OtpRelease {
        return Vec::new();
    }
    let mut out = Vec::new();
    for step in &script.up {
        let Instruction::UnpackRelease { artifact, .. } = &step.instruction else {
            continue;
        };
        let Some(declared) = script
            .artifacts
            .iter()
            .find(|a| a.name.value == artifact.value)
        else {
            continue; // Reported by the validator.
        };
        let path = script_dir.join(&declared.source.value);
        if !path.is_file() {
            continue; // Reported with the artifact files.
        }
        let problems = match read_tarball(&path) {
            Ok(tarball) => check_tarball(&tarball, &script.from.value, &script.to.value),
            Err(e) => vec![e],
        };
        for problem in problems {
            out.push(Diagnostic::error(
                declared.source.span,
                format!("release package `{}`: {problem}", declared.source.value),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELUP: &str = "{\"0.2.0\",\n [{\"0.1.0\",[],\n   [{load_object_code,{pm,\"0.2.0\",[pm]}},\n    point_of_no_return,\n    {suspend,[pm]},\n    {code_change,up,[{pm,[]}]},\n    {resume,[pm]}]}],\n [{\"0.1.0\",[],[point_of_no_return]}]}.\n";

    fn tarball(relup: Option<&str>, sys_config: &str) -> Tarball {
        let mut t = Tarball::default();
        let mut put = |path: &str, text: &str| {
            t.files.insert(path.to_string(), text.as_bytes().to_vec());
        };
        put(
            "releases/0.2.0/pm.rel",
            "{release,{\"pm\",\"0.2.0\"},{erts,\"13.1.5\"},[{kernel,\"8.5.3\"},{pm,\"0.2.0\"}]}.",
        );
        put("releases/0.2.0/start.boot", "boot");
        put("releases/0.2.0/sys.config.src", sys_config);
        if let Some(relup) = relup {
            put("releases/0.2.0/relup", relup);
        }
        t.libs.insert("pm-0.2.0".to_string());
        t
    }

    #[test]
    fn a_good_package_passes() {
        let t = tarball(Some(RELUP), "[{pm, [{node, \"${NODE_NAME}\"}]}].");
        assert_eq!(check_tarball(&t, "0.1.0", "0.2.0"), Vec::<String>::new());
    }

    #[test]
    fn what_is_wrong_is_said() {
        let t = tarball(None, "[{pm, [}].");
        let errors = check_tarball(&t, "0.1.0", "0.2.0").join("\n");
        assert!(errors.contains("no releases/0.2.0/relup"), "{errors}");
        assert!(
            errors.contains("sys.config.src does not parse: line 1"),
            "{errors}"
        );

        let t = tarball(Some(RELUP), "[].");
        let errors = check_tarball(&t, "0.0.9", "0.2.0").join("\n");
        assert!(
            errors.contains("no UpFrom entry for 0.0.9 (it upgrades from: 0.1.0)"),
            "{errors}"
        );
        let errors = check_tarball(&t, "0.1.0", "0.3.0").join("\n");
        assert!(
            errors.contains("not a release package of version 0.3.0"),
            "{errors}"
        );

        let mut t = tarball(Some(RELUP), "[].");
        t.libs.clear();
        let errors = check_tarball(&t, "0.1.0", "0.2.0").join("\n");
        assert!(errors.contains("lib/pm-0.2.0"), "{errors}");
    }

    #[test]
    fn otp_sync_nodes_is_refused_with_its_place() {
        let relup = RELUP.replace(
            "point_of_no_return,\n    {suspend",
            "point_of_no_return,\n    {sync_nodes, id, [a@h]},\n    {suspend",
        );
        let t = tarball(Some(&relup), "[].");
        let errors = check_tarball(&t, "0.1.0", "0.2.0").join("\n");
        assert!(
            errors.contains("UpFrom \"0.1.0\" instruction 3 is OTP's sync_nodes")
                && errors.contains("use a hotroll barrier instead"),
            "{errors}"
        );
    }
}
