//! `hotroll plan beam --from OLD_EBIN --to NEW_EBIN [--app NAME] [-o FILE]`: write the upgrade
//! script of an Erlang app from its two ebin directories, without a hand-written appup. With
//! `--node NAME` instead of `--from`, the running node says which modules it has loaded and their
//! md5 (`plan_node.rs`), and only the modules that really differ are planned.
//!
//! * Modules are compared by the chunks that make their code (`Code`, `AtU8`/`Atom`, `ImpT`,
//!   `ExpT`, `LitT`, `FunT`, `StrT`, `Attr`): changed, added and removed.
//! * Loads are ordered by the calls between modules (each BEAM file's import table, `ImpT`): a
//!   module is loaded after the modules it calls, so new code never calls a function that is
//!   not there yet (cycles are broken by name).
//! * Classes: supervisors (`-behaviour(supervisor)`), modules that export `code_change/3`
//!   (processes whose state may change: suspended, code_changed, resumed) and plain modules
//!   (loaded). Every changed or added module goes into ONE suspend…resume group, which the
//!   agent runs inside the node in one call: the processes see all new code at once.
//! * Removed modules are listed in a comment: hotroll does not delete modules.
//!
//! The BEAM chunk format is read here in plain Rust (IFF: `FOR1`, size, `BEAM`, chunks of
//! id + size + data padded to 4 bytes); `Attr` is an external term, decoded with `eetf`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// `hotroll plan ...`
#[derive(Debug, clap::Subcommand)]
pub enum PlanCommand {
    /// Write the upgrade script of an Erlang app from its old and new ebin directories.
    Beam(BeamArgs),
    /// Write the script of an OTP release upgrade from its tarball and print what its relup
    /// does per UpFrom version.
    Release(crate::plan_release::ReleaseArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct BeamArgs {
    /// The ebin directory of the running (old) release.
    #[arg(
        long,
        value_name = "OLD_EBIN",
        required_unless_present = "node",
        conflicts_with = "node"
    )]
    pub from: Option<PathBuf>,
    /// Instead of OLD_EBIN, the running node (`name@host`): it is asked which modules it has
    /// loaded and their md5 (`erl_call`, read-only), and only what really differs is planned.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// The node's cookie file (with --node; default: ~/.erlang.cookie).
    #[arg(long, value_name = "FILE", requires = "node")]
    pub cookie_file: Option<PathBuf>,
    /// The ebin directory of the new release.
    #[arg(long, value_name = "NEW_EBIN")]
    pub to: PathBuf,
    /// The app's name (default: the `.app` file in NEW_EBIN).
    #[arg(long)]
    pub app: Option<String>,
    /// The old version (default: `vsn` of the `.app` file in OLD_EBIN).
    #[arg(long, value_name = "VSN")]
    pub from_version: Option<String>,
    /// The new version (default: `vsn` of the `.app` file in NEW_EBIN).
    #[arg(long, value_name = "VSN")]
    pub to_version: Option<String>,
    /// Where to write the script (default: stdout).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub async fn run(command: PlanCommand) -> anyhow::Result<u8> {
    match command {
        PlanCommand::Beam(args) => run_beam(&args).map(|()| crate::exit::OK),
        PlanCommand::Release(args) => crate::plan_release::run(&args),
    }
}

fn run_beam(args: &BeamArgs) -> anyhow::Result<()> {
    let new = read_ebin(&args.to)?;
    let new_app = read_app_file(&args.to);
    let app = args
        .app
        .clone()
        .or_else(|| new_app.as_ref().map(|(name, _)| name.clone()))
        .context("no --app given and no .app file in the new ebin directory")?;
    let (old, old_vsn) = match (&args.from, &args.node) {
        (Some(dir), _) => (read_ebin(dir)?, read_app_file(dir).map(|(_, vsn)| vsn)),
        (None, Some(node)) => {
            let cookie = crate::plan_node::cookie(args.cookie_file.as_deref())?;
            let loaded = crate::plan_node::loaded(node, &cookie, &app)?;
            let local = crate::plan_node::md5s(&args.to)?;
            (as_old(&new, &loaded, &local), loaded.app_vsn)
        }
        (None, None) => bail!("give --from OLD_EBIN or --node NAME"),
    };
    let from = args
        .from_version
        .clone()
        .or(old_vsn)
        .context("no --from-version given and no vsn of the app found (old .app file, or the node's loaded app)")?;
    let to = args
        .to_version
        .clone()
        .or_else(|| new_app.as_ref().map(|(_, vsn)| vsn.clone()))
        .context("no --to-version given and no .app file with a vsn in the new ebin")?;
    let plan = diff(&old, &new);
    // Artifact sources: absolute, or relative to the script file when it is written next to
    // the ebin; absolute keeps it simple wherever the script goes.
    let to_dir = std::fs::canonicalize(&args.to)
        .with_context(|| format!("cannot resolve {}", args.to.display()))?;
    let text = render(&app, &from, &to, &plan, &to_dir);
    let name = args
        .output
        .as_ref()
        .map_or_else(|| "plan.toml".to_string(), |p| p.display().to_string());
    if let Err(diagnostics) = hotroll_script::parse(&name, &text) {
        bail!(
            "the generated script does not validate (a bug in `hotroll plan`):\n{}\n{text}",
            diagnostics.to_short_lines().join("\n")
        );
    }
    match &args.output {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    eprintln!(
        "{} changed, {} added, {} removed, {} unchanged",
        plan.changed.len(),
        plan.added.len(),
        plan.removed.len(),
        plan.unchanged
    );
    Ok(())
}

/// The "old ebin" the diff compares against: a new module the node runs with the same md5 is
/// unchanged (a copy of the new one), with another md5 changed, not loaded added. Modules the
/// node runs that the new ebin lacks are not this app's concern: none is removed.
pub fn as_old(
    new: &BTreeMap<String, BeamModule>,
    loaded: &crate::plan_node::Loaded,
    local: &BTreeMap<String, String>,
) -> BTreeMap<String, BeamModule> {
    new.iter()
        .filter_map(|(name, module)| {
            let running = loaded.md5.get(name)?;
            let mut old = module.clone();
            if local.get(name) != Some(running) {
                old.code = vec![("md5".to_string(), running.as_bytes().to_vec())];
            }
            Some((name.clone(), old))
        })
        .collect()
}

/// What a module is, for the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Supervisor,
    /// Exports code_change/3: processes run it.
    Process,
    Plain,
}

/// One BEAM file, as far as planning needs it.
#[derive(Debug, Clone)]
pub struct BeamModule {
    pub name: String,
    /// Modules it calls (its import table, without itself).
    pub imports: BTreeSet<String>,
    pub class: Class,
    /// The chunks that make its code, for comparison.
    pub code: Vec<(String, Vec<u8>)>,
    pub file: PathBuf,
}

/// The difference between two ebins.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// Changed and added modules in load order, with their class.
    pub load: Vec<(String, Class)>,
    pub changed: BTreeSet<String>,
    pub added: BTreeSet<String>,
    pub removed: BTreeSet<String>,
    pub unchanged: usize,
}

/// Every `.beam` file of `dir`, by module name.
pub fn read_ebin(dir: &Path) -> anyhow::Result<BTreeMap<String, BeamModule>> {
    let mut modules = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "beam") {
            continue;
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let module = parse_beam(&bytes, &path).with_context(|| format!("{}", path.display()))?;
        modules.insert(module.name.clone(), module);
    }
    Ok(modules)
}

/// `{application, Name, [... {vsn, "V"} ...]}` of the `.app` file in `dir`, read loosely.
fn read_app_file(dir: &Path) -> Option<(String, String)> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "app"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let name = entry.path().file_stem()?.to_str()?.to_string();
    let at = text.find("{vsn")?;
    let rest = &text[at..];
    let open = rest.find('"')?;
    let close = rest[open + 1..].find('"')?;
    Some((name, rest[open + 1..open + 1 + close].to_string()))
}

fn be32(bytes: &[u8], at: usize) -> anyhow::Result<u32> {
    let slice = bytes.get(at..at + 4).context("truncated BEAM file")?;
    Ok(u32::from_be_bytes([slice[0], slice[1], slice[2], slice[3]]))
}

/// The chunks of a BEAM file: (id, data).
pub fn chunks(bytes: &[u8]) -> anyhow::Result<Vec<(String, &[u8])>> {
    if bytes.get(0..4) != Some(b"FOR1") || bytes.get(8..12) != Some(b"BEAM") {
        bail!("not a BEAM file (no FOR1/BEAM header)");
    }
    let total = (be32(bytes, 4)? as usize)
        .saturating_add(8)
        .min(bytes.len());
    let mut at = 12;
    let mut out = Vec::new();
    while at + 8 <= total {
        let id = String::from_utf8_lossy(&bytes[at..at + 4]).into_owned();
        let size = be32(bytes, at + 4)? as usize;
        let data = bytes
            .get(at + 8..at + 8 + size)
            .with_context(|| format!("chunk {id} runs past the end"))?;
        out.push((id, data));
        at += 8 + size.div_ceil(4) * 4;
    }
    Ok(out)
}

/// The atom table (`AtU8`, or `Atom` in old files): index 1 is the module's name.
fn atoms(data: &[u8]) -> anyhow::Result<Vec<String>> {
    let count = be32(data, 0)?;
    if count > i32::MAX as u32 {
        bail!("compact atom tables (OTP 28) are not supported");
    }
    let mut at = 4;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = *data.get(at).context("truncated atom table")? as usize;
        let name = data
            .get(at + 1..at + 1 + len)
            .context("truncated atom table")?;
        out.push(String::from_utf8_lossy(name).into_owned());
        at += 1 + len;
    }
    Ok(out)
}

/// (module, function, arity) triples of atom indexes, 1-based.
fn triples(data: &[u8]) -> anyhow::Result<Vec<[u32; 3]>> {
    let count = be32(data, 0)? as usize;
    (0..count)
        .map(|i| {
            let base = 4 + i * 12;
            Ok([
                be32(data, base)?,
                be32(data, base + 4)?,
                be32(data, base + 8)?,
            ])
        })
        .collect()
}

const CODE_CHUNKS: [&str; 9] = [
    "Code", "AtU8", "Atom", "ImpT", "ExpT", "LitT", "FunT", "StrT", "Attr",
];

pub fn parse_beam(bytes: &[u8], file: &Path) -> anyhow::Result<BeamModule> {
    let chunks = chunks(bytes)?;
    let find = |id: &str| chunks.iter().find(|(c, _)| c == id).map(|(_, d)| *d);
    let atom_table = find("AtU8")
        .or_else(|| find("Atom"))
        .context("no atom table")?;
    let atoms = atoms(atom_table)?;
    let atom = |i: u32| -> anyhow::Result<&str> {
        atoms
            .get((i as usize).checked_sub(1).context("atom index 0")?)
            .map(String::as_str)
            .with_context(|| format!("atom index {i} out of range"))
    };
    let name = atom(1)?.to_string();
    let mut imports = BTreeSet::new();
    if let Some(imp) = find("ImpT") {
        for [m, _, _] in triples(imp)? {
            let m = atom(m)?;
            if m != name && m != "erlang" {
                imports.insert(m.to_string());
            }
        }
    }
    let mut exports_code_change = false;
    if let Some(exp) = find("ExpT") {
        for [f, a, _] in triples(exp)? {
            if atom(f)? == "code_change" && a == 3 {
                exports_code_change = true;
            }
        }
    }
    let supervisor = find("Attr")
        .and_then(|attr| eetf::Term::decode(attr).ok())
        .is_some_and(|term| behaviours(&term).iter().any(|b| b == "supervisor"));
    let class = if supervisor {
        Class::Supervisor
    } else if exports_code_change {
        Class::Process
    } else {
        Class::Plain
    };
    let code = chunks
        .iter()
        .filter(|(id, _)| CODE_CHUNKS.contains(&id.as_str()))
        .map(|(id, data)| (id.clone(), data.to_vec()))
        .collect();
    Ok(BeamModule {
        name,
        imports,
        class,
        code,
        file: file.to_path_buf(),
    })
}

/// `behaviour`/`behavior` attributes of an `Attr` chunk term.
fn behaviours(term: &eetf::Term) -> Vec<String> {
    let mut out = Vec::new();
    let eetf::Term::List(list) = term else {
        return out;
    };
    for item in &list.elements {
        let eetf::Term::Tuple(t) = item else { continue };
        let (Some(eetf::Term::Atom(key)), Some(value)) = (t.elements.first(), t.elements.get(1))
        else {
            continue;
        };
        if key.name != "behaviour" && key.name != "behavior" {
            continue;
        }
        if let eetf::Term::List(values) = value {
            for v in &values.elements {
                if let eetf::Term::Atom(a) = v {
                    out.push(a.name.clone());
                }
            }
        }
    }
    out
}

/// Compare two ebins and order the loads.
pub fn diff(old: &BTreeMap<String, BeamModule>, new: &BTreeMap<String, BeamModule>) -> Diff {
    let mut d = Diff::default();
    for (name, module) in new {
        match old.get(name) {
            None => {
                d.added.insert(name.clone());
            }
            Some(before) if before.code != module.code => {
                d.changed.insert(name.clone());
            }
            Some(_) => d.unchanged += 1,
        }
    }
    d.removed = old
        .keys()
        .filter(|name| !new.contains_key(*name))
        .cloned()
        .collect();
    let set: BTreeSet<&String> = d.changed.iter().chain(d.added.iter()).collect();
    // Depth-first topological order: callees first; a cycle is cut where it closes.
    let mut order = Vec::new();
    let mut state: BTreeMap<&String, u8> = BTreeMap::new();
    fn visit<'a>(
        name: &'a String,
        new: &'a BTreeMap<String, BeamModule>,
        set: &BTreeSet<&'a String>,
        state: &mut BTreeMap<&'a String, u8>,
        order: &mut Vec<&'a String>,
    ) {
        if state.get(name).is_some() {
            return;
        }
        state.insert(name, 1);
        if let Some(module) = new.get(name) {
            for callee in &module.imports {
                if let Some(callee) = set.get(callee) {
                    visit(callee, new, set, state, order);
                }
            }
        }
        state.insert(name, 2);
        order.push(name);
    }
    for name in &set {
        visit(name, new, &set, &mut state, &mut order);
    }
    d.load = order
        .into_iter()
        .filter_map(|name| new.get(name).map(|m| (name.clone(), m.class)))
        .collect();
    d
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The script text.
pub fn render(app: &str, from: &str, to: &str, d: &Diff, to_dir: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Generated by `hotroll plan beam`: {} changed, {} added, {} removed, {} unchanged.",
        d.changed.len(),
        d.added.len(),
        d.removed.len(),
        d.unchanged
    );
    for (name, class) in &d.load {
        let what = match class {
            Class::Supervisor => {
                "supervisor: suspended, loaded, code_change (child specs re-read), resumed"
            }
            Class::Process => "exports code_change/3: suspended, loaded, code_change, resumed",
            Class::Plain => "plain module: loaded",
        };
        let status = if d.added.contains(name) {
            "added"
        } else {
            "changed"
        };
        let _ = writeln!(s, "#   {name} ({status}; {what})");
    }
    for name in &d.removed {
        let _ = writeln!(
            s,
            "#   {name} (removed: hotroll does not delete modules; it stays loaded, unused)"
        );
    }
    let _ = writeln!(s, "app = {}", quote(app));
    let _ = writeln!(s, "runtime = \"beam\"");
    let _ = writeln!(s, "from = {}", quote(from));
    let _ = writeln!(s, "to = {}", quote(to));
    let _ = writeln!(
        s,
        "description = {}",
        quote(&format!("{app} {from} -> {to} (hotroll plan beam)"))
    );
    for (name, _) in &d.load {
        let _ = writeln!(s, "\n[[artifacts]]");
        let _ = writeln!(s, "name = {}", quote(&format!("{name}.beam")));
        let source = to_dir.join(format!("{name}.beam"));
        let _ = writeln!(s, "source = {}", quote(&source.display().to_string()));
    }
    let _ = writeln!(s, "\n[rollout]");
    let _ = writeln!(s, "max_failures = 0");
    let _ = writeln!(s, "on_failure = \"rollback_all\"");
    let _ = writeln!(s, "barrier_timeout = \"30s\"");
    let _ = writeln!(s, "step_timeout = \"30s\"");
    let _ = writeln!(s, "\n[script]\nup = [");
    let artifacts: Vec<String> = d.load.iter().map(|(n, _)| format!("{n}.beam")).collect();
    let loads: Vec<String> = d.load.iter().map(|(n, _)| n.clone()).collect();
    let with_processes: Vec<String> = d
        .load
        .iter()
        .filter(|(_, c)| *c != Class::Plain)
        .map(|(n, _)| n.clone())
        .collect();
    let changed: Vec<String> = loads
        .iter()
        .filter(|n| d.changed.contains(*n))
        .cloned()
        .collect();
    if !artifacts.is_empty() {
        let _ = writeln!(s, "  {{ load_object_code = {} }},", list(&artifacts));
    }
    if !changed.is_empty() {
        let _ = writeln!(
            s,
            "  # no process may still run old code of a module about to be replaced\n  {{ check = {{ modules = {} }} }},",
            list(&changed)
        );
    }
    let _ = writeln!(s, "  {{ sync_nodes = \"staged\" }},");
    let _ = writeln!(s, "  \"point_of_no_return\",");
    if !loads.is_empty() {
        if with_processes.is_empty() {
            let _ = writeln!(s, "  {{ load = {} }},", list(&loads));
        } else {
            let _ = writeln!(
                s,
                "  # one group, run inside the node in one call: callees load before callers"
            );
            let _ = writeln!(s, "  {{ suspend = {} }},", list(&with_processes));
            let _ = writeln!(s, "  {{ load = {} }},", list(&loads));
            let _ = writeln!(
                s,
                "  {{ code_change = {{ modules = {} }} }},",
                list(&with_processes)
            );
            let _ = writeln!(s, "  {{ resume = {} }},", list(&with_processes));
        }
    }
    let _ = writeln!(s, "  {{ sync_nodes = \"upgraded\" }},");
    let _ = writeln!(s, "]");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper module the agent ships is a real BEAM file: parse it.
    #[test]
    fn reads_a_real_beam_file() -> anyhow::Result<()> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/erlang/hotroll_upgrade.beam");
        let bytes = std::fs::read(&path)?;
        let module = parse_beam(&bytes, &path)?;
        assert_eq!(module.name, "hotroll_upgrade");
        assert_eq!(module.class, Class::Plain);
        for callee in ["sys", "code", "release_handler_1", "supervisor"] {
            assert!(
                module.imports.contains(callee),
                "{callee}: {:?}",
                module.imports
            );
        }
        assert!(!module.imports.contains("erlang"));
        assert!(chunks(b"FOR1\0\0\0\x04BEAX").is_err());
        assert!(parse_beam(&bytes[..40], &path).is_err());
        Ok(())
    }

    fn module(name: &str, imports: &[&str], class: Class, code: u8) -> BeamModule {
        BeamModule {
            name: name.into(),
            imports: imports.iter().map(|s| s.to_string()).collect(),
            class,
            code: vec![("Code".into(), vec![code])],
            file: PathBuf::from(format!("{name}.beam")),
        }
    }

    #[test]
    fn orders_callees_first_and_classifies() {
        let old: BTreeMap<String, BeamModule> = [
            module("a_server", &["z_lib"], Class::Process, 1),
            module("z_lib", &[], Class::Plain, 1),
            module("gone", &[], Class::Plain, 1),
            module("same", &[], Class::Plain, 1),
        ]
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
        let new: BTreeMap<String, BeamModule> = [
            module("a_server", &["z_lib", "new_fmt"], Class::Process, 2),
            module("z_lib", &[], Class::Plain, 2),
            module("new_fmt", &["z_lib"], Class::Plain, 1),
            module("same", &[], Class::Plain, 1),
            module("top_sup", &["a_server"], Class::Supervisor, 1),
        ]
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
        let d = diff(&old, &new);
        let order: Vec<&str> = d.load.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(order, ["z_lib", "new_fmt", "a_server", "top_sup"]);
        assert_eq!(d.removed.iter().collect::<Vec<_>>(), ["gone"]);
        assert_eq!(d.unchanged, 1);
        let text = render("app", "1", "2", &d, Path::new("/tmp/ebin"));
        let parsed = hotroll_script::parse("plan.toml", &text);
        assert!(parsed.is_ok(), "{text}");
        assert!(
            text.contains(r#"{ suspend = ["a_server", "top_sup"] }"#),
            "{text}"
        );
    }
}
