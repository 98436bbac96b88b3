//! `hotroll-otp-release`: read an OTP release tarball (rebar3/relx `<rel>-<vsn>.tar.gz`)
//! before anything changes — its `.rel`, the `relup` (UpFrom/DownTo, and instructions hotroll
//! cannot honour safely, such as OTP's own `sync_nodes`), `sys.config` parses, the boot file,
//! and the applications the relup touches are in the tarball. `hotroll check`, `hotroll plan
//! release` and the coordinator at rollout start (every target's current release must have an
//! UpFrom entry) read tarballs through it. No I/O but reading the file it is given.

pub mod term;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use term::{Term, consult};

/// Why a tarball could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum TarballError {
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("not a tar archive: {0}")]
    NotTar(std::io::Error),
    #[error("broken tar archive: {0}")]
    Broken(std::io::Error),
    #[error("cannot read {name}: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
}

/// One UpFrom or DownTo entry of a relup: the version and its low-level instructions.
#[derive(Debug, Clone, PartialEq)]
pub struct RelupEntry {
    pub version: String,
    pub instructions: Vec<Term>,
}

/// `releases/<vsn>/relup`: `{Vsn, [{UpFromVsn, Descr, Instrs}], [{DownToVsn, Descr, Instrs}]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Relup {
    pub version: String,
    pub up_from: Vec<RelupEntry>,
    pub down_to: Vec<RelupEntry>,
}

impl Relup {
    /// The versions it upgrades from.
    pub fn froms(&self) -> Vec<String> {
        self.up_from.iter().map(|e| e.version.clone()).collect()
    }
}

/// The release a package holds: `(name, version)` from its `releases/<vsn>/<name>.rel`; the
/// one with a relup when there are several.
pub fn release_of(tarball: &Tarball) -> Option<(String, String)> {
    let mut found = Vec::new();
    for (path, bytes) in &tarball.files {
        let Some(rest) = path.strip_prefix("releases/") else {
            continue;
        };
        let Some((vsn, file)) = rest.split_once('/') else {
            continue;
        };
        if file.contains('/') || !file.ends_with(".rel") {
            continue;
        }
        let Ok(terms) = consult(&String::from_utf8_lossy(bytes)) else {
            continue;
        };
        if let Some([Term::Atom(tag), Term::Tuple(nv), ..]) = terms.first().and_then(Term::elements)
            && tag == "release"
            && let [name, v, ..] = nv.as_slice()
            && let (Some(name), Some(v)) = (name.string(), v.string())
            && v == vsn
        {
            let has_relup = tarball.files.contains_key(&format!("releases/{vsn}/relup"));
            found.push((has_relup, name, v));
        }
    }
    found.sort();
    found.pop().map(|(_, name, vsn)| (name, vsn))
}

/// One relup instruction in words, for `hotroll plan release`: the instruction as Erlang
/// writes it, and what it means on the node when that needs saying.
pub fn describe(instruction: &Term) -> String {
    let meaning = match instruction_name(instruction) {
        Some("point_of_no_return") => " (after it a failure means a node restart)",
        Some("restart_new_emulator") => {
            " (the node restarts on the new emulator and core apps: in-memory state is lost)"
        }
        Some("restart_emulator") => " (the node restarts at the end of the upgrade)",
        Some("suspend") => " (sys:suspend of the processes running these modules)",
        Some("code_change") => " (sys:change_code of the suspended processes)",
        Some("resume") => " (sys:resume)",
        Some("load_object_code") => " (reads the new .beam files; nothing changes yet)",
        Some("load") => " (code:load of the new version)",
        Some("sync_nodes") => {
            " (REFUSED by hotroll: no deadline; use a sync_nodes barrier in the script)"
        }
        _ => "",
    };
    format!("{instruction}{meaning}")
}

/// Why a relup could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RelupError {
    #[error("no {0}")]
    Missing(String),
    #[error("{path} does not parse: {error}")]
    Parse { path: String, error: String },
    #[error("{0} is not {{Vsn, UpFrom, DownTo}}")]
    Shape(String),
}

/// The relup of release `to` in `tarball`.
pub fn relup(tarball: &Tarball, to: &str) -> Result<Relup, RelupError> {
    let path = format!("releases/{to}/relup");
    let text = tarball
        .files
        .get(&path)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .ok_or_else(|| RelupError::Missing(path.clone()))?;
    let terms = consult(&text).map_err(|e| RelupError::Parse {
        path: path.clone(),
        error: e.to_string(),
    })?;
    let Some([vsn, Term::List(up), Term::List(down)]) = terms.first().and_then(Term::elements)
    else {
        return Err(RelupError::Shape(path));
    };
    let entries = |list: &[Term]| -> Result<Vec<RelupEntry>, RelupError> {
        list.iter()
            .map(|entry| match entry.elements() {
                Some([version, _, Term::List(instructions)]) => Ok(RelupEntry {
                    version: version.string().unwrap_or_default(),
                    instructions: instructions.clone(),
                }),
                _ => Err(RelupError::Shape(path.clone())),
            })
            .collect()
    };
    Ok(Relup {
        version: vsn.string().unwrap_or_default(),
        up_from: entries(up)?,
        down_to: entries(down)?,
    })
}

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
pub fn read_tarball(path: &Path) -> Result<Tarball, TarballError> {
    let file = std::fs::File::open(path).map_err(TarballError::Open)?;
    let mut magic = [0u8; 2];
    let gz = {
        let mut probe = std::fs::File::open(path).map_err(TarballError::Open)?;
        probe.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Tarball::default();
    let entries = archive.entries().map_err(TarballError::NotTar)?;
    for entry in entries {
        let mut entry = entry.map_err(TarballError::Broken)?;
        let name = entry
            .path()
            .map_err(TarballError::Broken)?
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
            if let Err(source) = entry.read_to_end(&mut bytes) {
                return Err(TarballError::Read { name, source });
            }
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
                    errors.push(sync_nodes_refusal(&relup_path, kind, &version, index));
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

fn sync_nodes_refusal(relup_path: &str, kind: &str, version: &str, index: usize) -> String {
    format!(
        "{relup_path}: {kind} \"{version}\" instruction {} is OTP's sync_nodes, which waits \
         without a deadline: hotroll refuses it; remove it from the appup and use a hotroll \
         barrier instead ({{ sync_nodes = \"<id>\" }} in the script, which has a timeout)",
        index + 1
    )
}

/// The name of a relup instruction (`point_of_no_return`, `{load_object_code, ..}` ..).
pub fn instruction_name(instruction: &Term) -> Option<&str> {
    match instruction {
        Term::Atom(a) => Some(a.as_str()),
        Term::Tuple(items) => match items.first() {
            Some(Term::Atom(a)) => Some(a.as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// Every instruction of `relup` hotroll cannot honour safely (OTP's own `sync_nodes`, which
/// waits without a deadline), each with its place in the relup and what to use instead.
pub fn unsafe_instructions(relup: &Relup) -> Vec<String> {
    let path = format!("releases/{}/relup", relup.version);
    let mut out = Vec::new();
    for (kind, entries) in [("UpFrom", &relup.up_from), ("DownTo", &relup.down_to)] {
        for entry in entries {
            for (index, instruction) in entry.instructions.iter().enumerate() {
                if instruction_name(instruction) == Some("sync_nodes") {
                    out.push(sync_nodes_refusal(&path, kind, &entry.version, index));
                }
            }
        }
    }
    out
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

    fn relup_of(t: &Tarball) -> Option<Relup> {
        relup(t, "0.2.0").ok()
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
    fn the_release_and_its_instructions_are_named() -> Result<(), RelupError> {
        let t = tarball(Some(RELUP), "[].");
        assert_eq!(release_of(&t), Some(("pm".into(), "0.2.0".into())));
        let r = relup(&t, "0.2.0")?;
        let said: Vec<String> = r.up_from[0].instructions.iter().map(describe).collect();
        assert_eq!(
            said[0],
            "{load_object_code,{pm,\"0.2.0\",[pm]}} (reads the new .beam files; nothing changes yet)"
        );
        assert!(
            said[3].starts_with("{code_change,up,[{pm,[]}]}"),
            "{said:?}"
        );
        assert_eq!(Term::Atom("Odd".into()).to_string(), "'Odd'");
        Ok(())
    }

    #[test]
    fn the_relup_is_read_with_its_entries() -> Result<(), RelupError> {
        let t = tarball(Some(RELUP), "[].");
        let r = relup(&t, "0.2.0")?;
        assert_eq!(r.version, "0.2.0");
        assert_eq!(r.froms(), vec!["0.1.0".to_string()]);
        assert_eq!(r.up_from[0].instructions.len(), 5);
        assert_eq!(
            instruction_name(&r.up_from[0].instructions[1]),
            Some("point_of_no_return")
        );
        assert!(unsafe_instructions(&r).is_empty());
        assert_eq!(
            relup(&tarball(None, "[]."), "0.2.0"),
            Err(RelupError::Missing("releases/0.2.0/relup".into()))
        );
        Ok(())
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
        let found = relup_of(&t)
            .map(|r| unsafe_instructions(&r))
            .unwrap_or_default();
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("UpFrom \"0.1.0\" instruction 3 is OTP's sync_nodes"));
    }
}
