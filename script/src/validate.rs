//! Validation rules (docs/design.md §3). Pure: no I/O.
//!
//! Script-only rules run inside [`crate::parse()`] (and are available on their own as
//! [`validate()`]); [`validate_against`] checks a script against what a node's config declares.
//!
//! The rules, and the choices made where the design is silent, are listed on [`validate()`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::diagnostic::Diagnostic;
use crate::model::{ChangeMode, Instruction, Located, Runtime, Script, Span, Step};
use crate::suggest;

const UNTRUSTED_PATH_HELP: &str =
    "paths from the network are never trusted: give a path relative to the release directory";

/// What a node's own config declares: the only names a script may use on that node.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub hooks: BTreeSet<String>,
    pub services: BTreeSet<String>,
    /// Allowed `module:function/arity` for `apply` in the beam runtime.
    pub mfas: BTreeSet<String>,
    /// Instructions this agent's runtimes can execute. Empty = none.
    pub supported_instructions: BTreeSet<&'static str>,
}

impl Declared {
    /// Marks every instruction of the language as supported.
    pub fn with_all_instructions(mut self) -> Self {
        self.supported_instructions
            .extend(Instruction::NAMES.iter().copied());
        self
    }
}

/// Errors for every hook, service, MFA or instruction `script` uses that `declared` does not
/// allow. Empty = the node may run the script. Sorted by position.
pub fn validate_against(script: &Script, declared: &Declared) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let hooks: Vec<String> = declared.hooks.iter().cloned().collect();
    let services: Vec<String> = declared.services.iter().cloned().collect();
    let mfas: Vec<String> = declared.mfas.iter().cloned().collect();
    let undeclared = |out: &mut Vec<Diagnostic>,
                      name: &Located<String>,
                      kind: &str,
                      all: &[String],
                      set: &BTreeSet<String>| {
        if set.contains(&name.value) {
            return;
        }
        let mut diagnostic = Diagnostic::error(
            name.span,
            format!(
                "{kind} `{}` is not declared in this agent's config",
                name.value
            ),
        );
        diagnostic = match suggest::closest_owned(&name.value, all) {
            Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
            None => diagnostic.with_help(format!(
                "the agent runs only the {kind}s its own config declares"
            )),
        };
        out.push(diagnostic);
    };
    let steps = script.up.iter().chain(script.down.iter().flatten());
    for step in steps {
        let name = step.instruction.name();
        if !declared.supported_instructions.contains(name) {
            out.push(Diagnostic::error(
                step.span,
                format!("instruction `{name}` is not supported by this agent yet"),
            ));
        }
        match (&step.instruction, script.runtime) {
            (
                Instruction::Check {
                    hook: Some(hook), ..
                },
                Runtime::Process | Runtime::OtpRelease,
            )
            | (Instruction::Apply { hook, .. }, Runtime::Process | Runtime::OtpRelease) => {
                undeclared(&mut out, hook, "hook", &hooks, &declared.hooks);
            }
            (Instruction::Apply { hook, .. }, Runtime::Beam)
                if !declared.mfas.contains(&hook.value) =>
            {
                let mut diagnostic = Diagnostic::error(
                    hook.span,
                    format!("MFA `{}` is not in this agent's allow-list", hook.value),
                );
                if let Some(near) = suggest::closest_owned(&hook.value, &mfas) {
                    diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
                }
                out.push(diagnostic);
            }
            (
                Instruction::Suspend { targets, .. }
                | Instruction::Resume { targets }
                | Instruction::Stop { targets }
                | Instruction::Start { targets }
                | Instruction::Restart { targets }
                | Instruction::CodeChange { targets, .. },
                Runtime::Process,
            ) => {
                for target in targets {
                    undeclared(&mut out, target, "service", &services, &declared.services);
                }
            }
            (Instruction::Health { service, .. }, Runtime::Process) => {
                undeclared(&mut out, service, "service", &services, &declared.services);
            }
            _ => {}
        }
    }
    out.sort_by_key(|d| (d.span.start, d.span.end));
    out
}

/// Which parts of a script parsed without error. A rule that needs to see every instruction of
/// some kind (balance, references) is skipped when an instruction of that kind failed to parse,
/// so one typo does not cascade into errors about the instructions around it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Completeness {
    /// `app`, `from` and `to` are all present.
    pub header: bool,
    /// Every `[[artifacts]]` entry parsed.
    pub artifacts: bool,
    pub up: Broken,
    pub down: Broken,
}

/// The instructions of a list that failed to parse: by name, or by the name a typo most likely
/// means.
#[derive(Debug, Clone, Default)]
pub(crate) struct Broken(BTreeSet<&'static str>);

impl Broken {
    pub fn insert(&mut self, name: &'static str) {
        self.0.insert(name);
    }

    /// As if every instruction had failed: the list itself is missing or not a list.
    pub fn everything() -> Self {
        Broken(Instruction::NAMES.iter().copied().collect())
    }

    /// No instruction named in `names` failed to parse.
    pub fn none_of(&self, names: &[&str]) -> bool {
        names.iter().all(|name| !self.0.contains(name))
    }
}

impl Completeness {
    fn whole() -> Self {
        Completeness {
            header: true,
            artifacts: true,
            ..Completeness::default()
        }
    }
}

/// The instructions whose balance `check_balance` tracks.
const SUSPENSION: &[&str] = &["suspend", "resume", "code_change"];
const STOPPING: &[&str] = &["stop", "start"];

/// Every script-only rule of docs/design.md §3 on an already built script, sorted by position
/// ([`crate::parse()`] runs them already):
///
/// * `app`, `from`, `to` are single path components (they name directories on the nodes), and
///   `from != to`;
/// * artifact names are unique, non-empty, relative and free of `..`; `sha256` is 64 hex
///   characters; every artifact `load_object_code` stages is declared, and one that is never
///   staged is a warning;
/// * at most one `point_of_no_return`; `load_object_code`/`check` only before it, instructions
///   that change the system (`suspend`, `load`, `code_change`, `resume`, `stop`, `start`,
///   `restart`, `health`, `purge`) only after it; without an explicit one, no staging after the
///   first change;
/// * barrier ids are unique; `restart_new_emulator` only first (in `up` and in `down`);
/// * every `load` has an earlier `load_object_code` (beam: one staging `<module>.beam`); a
///   process `load` names the script's app. `load` in `down` needs none: it re-activates what is
///   already on the node;
/// * `suspend`/`resume` and `stop`/`start` balance within `up`, and within `down`;
///   `code_change` only on suspended targets; `restart` needs no balancing;
/// * `down` holds no `sync_nodes`, `point_of_no_return`, `load_object_code` or `check` (a
///   rollback runs on one node, past the point of no return, back to a release already there);
///   a beam `code_change` in `down` with mode "up" is a warning;
/// * process `purge` never names `from` (rollback needs it) or `to`; a beam `apply` names a
///   well-formed `module:function/arity` whose arity matches `args`.
pub fn validate(script: &Script) -> Vec<Diagnostic> {
    let mut out = check_script(script, &Completeness::whole());
    out.sort_by_key(|d| (d.span.start, d.span.end));
    out
}

pub(crate) fn check_script(script: &Script, complete: &Completeness) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    check_header(script, complete, &mut out);
    check_artifacts(script, complete, &mut out);
    check_up(script, complete, &mut out);
    if let Some(down) = &script.down {
        check_down(script, down, &complete.down, &mut out);
    }
    for step in script.up.iter().chain(script.down.iter().flatten()) {
        check_instruction(script, step, &mut out);
    }
    check_otp_release(script, complete, &mut out);
    out
}

// ----- header -----------------------------------------------------------------------------------

fn check_header(script: &Script, complete: &Completeness, out: &mut Vec<Diagnostic>) {
    for (key, value) in [
        ("app", &script.app),
        ("from", &script.from),
        ("to", &script.to),
    ] {
        // Each becomes a directory name on every node (apps/<app>/releases/<version>).
        if let Some(reason) = not_a_single_component(&value.value) {
            out.push(
                Diagnostic::error(
                    value.span,
                    format!("`{key}` becomes a directory name on every node and {reason}"),
                )
                .with_help("paths from the network are never trusted"),
            );
        }
    }
    if complete.header && script.from.value == script.to.value {
        out.push(Diagnostic::error(
            script.to.span,
            format!(
                "`to` is the same version as `from` (\"{}\"): there is nothing to upgrade",
                script.to.value
            ),
        ));
    }
}

fn not_a_single_component(name: &str) -> Option<&'static str> {
    if name.contains(['/', '\\']) {
        Some("cannot contain a path separator")
    } else if name == "." || name == ".." {
        Some("cannot be `.` or `..`")
    } else if name.chars().any(char::is_control) {
        Some("cannot contain control characters")
    } else {
        None
    }
}

// ----- artifacts --------------------------------------------------------------------------------

fn check_artifacts(script: &Script, complete: &Completeness, out: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, artifact) in script.artifacts.iter().enumerate() {
        let name = &artifact.name;
        if let Some(problem) = untrusted_path(&name.value) {
            out.push(Diagnostic::error(name.span, problem).with_help(UNTRUSTED_PATH_HELP));
        }
        if let Some(first) = seen.insert(&name.value, index + 1) {
            // Keep pointing at the first declaration for a third duplicate.
            seen.insert(&name.value, first);
            out.push(
                Diagnostic::error(
                    name.span,
                    format!("artifact `{}` is declared twice", name.value),
                )
                .with_help(format!("artifact #{first} already declares this name")),
            );
        }
        if artifact.source.value.is_empty() {
            out.push(Diagnostic::error(
                artifact.source.span,
                "the artifact's `source` cannot be empty",
            ));
        }
        if let Some(digest) = &artifact.sha256 {
            let length = digest.value.chars().count();
            if length != 64 {
                out.push(Diagnostic::error(
                    digest.span,
                    format!("`sha256` must be 64 hexadecimal characters, found {length}"),
                ));
            } else if !digest.value.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push(Diagnostic::error(
                    digest.span,
                    "`sha256` must contain only hexadecimal characters (0-9, a-f)",
                ));
            }
        }
    }

    // References from `load_object_code`.
    if !complete.artifacts {
        return;
    }
    let declared: Vec<String> = script
        .artifacts
        .iter()
        .map(|a| a.name.value.clone())
        .collect();
    let mut staged: BTreeSet<&str> = BTreeSet::new();
    for step in &script.up {
        let (verb, references) = match &step.instruction {
            Instruction::LoadObjectCode { artifacts } => ("stages", artifacts.as_slice()),
            Instruction::UnpackRelease { artifact, .. } => {
                ("unpacks", std::slice::from_ref(artifact))
            }
            _ => continue,
        };
        for reference in references {
            staged.insert(&reference.value);
            if declared.contains(&reference.value) {
                continue;
            }
            let mut diagnostic = Diagnostic::error(
                reference.span,
                format!(
                    "`{}` {verb} `{}`, which no [[artifacts]] entry declares",
                    step.instruction.name(),
                    reference.value
                ),
            );
            if let Some(near) = suggest::closest_owned(&reference.value, &declared) {
                diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
            }
            out.push(diagnostic);
        }
    }
    if complete.up.none_of(&["load_object_code", "unpack_release"]) {
        for artifact in &script.artifacts {
            if !staged.contains(artifact.name.value.as_str()) {
                out.push(
                    Diagnostic::warning(
                        artifact.name.span,
                        format!(
                            "artifact `{}` is declared but no `load_object_code` stages it",
                            artifact.name.value
                        ),
                    )
                    .with_help("stage it in `up` or remove it"),
                );
            }
        }
    }
}

/// Why an artifact name is not a safe relative path inside the release, if it is not.
fn untrusted_path(name: &str) -> Option<String> {
    let drive_prefix = {
        let mut chars = name.chars();
        matches!((chars.next(), chars.next()), (Some(c), Some(':')) if c.is_ascii_alphabetic())
    };
    if name.is_empty() {
        Some("an artifact name cannot be empty".to_string())
    } else if name.starts_with(['/', '\\']) || drive_prefix {
        Some(format!("artifact name `{name}` is an absolute path"))
    } else if name.split(['/', '\\']).any(|part| part == "..") {
        Some(format!(
            "artifact name `{name}` contains `..` and could leave the release directory"
        ))
    } else if name.chars().any(char::is_control) {
        Some(format!(
            "artifact name `{name:?}` contains control characters"
        ))
    } else {
        None
    }
}

// ----- up ---------------------------------------------------------------------------------------

fn check_up(script: &Script, complete: &Completeness, out: &mut Vec<Diagnostic>) {
    let up = &script.up;
    let ponrs: Vec<usize> = up
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.instruction, Instruction::PointOfNoReturn))
        .map(|(i, _)| i)
        .collect();
    // A `point_of_no_return` that failed to parse would make the order rules misfire.
    let ponr_known = complete.up.none_of(&["point_of_no_return"]);
    if let Some((&first, rest)) = ponrs.split_first() {
        for &extra in rest {
            out.push(
                Diagnostic::error(up[extra].span, "more than one `point_of_no_return`").with_help(
                    format!(
                        "a script has at most one point of no return; step {} is the first",
                        first + 1
                    ),
                ),
            );
        }
        for (index, step) in up.iter().enumerate() {
            let name = step.instruction.name();
            if index > first && step.instruction.prepare_only() {
                out.push(
                    Diagnostic::error(step.span, format!("`{name}` after the point of no return"))
                        .with_help(format!(
                            "staging and checks must not change the running system: move it before \
                         `point_of_no_return` (step {})",
                            first + 1
                        )),
                );
            }
            if index < first && step.instruction.commit_only() {
                out.push(
                    Diagnostic::error(
                        step.span,
                        format!(
                            "`{name}` changes the running system before the point of no return"
                        ),
                    )
                    .with_help(format!(
                        "move it after `point_of_no_return` (step {}): before it, nothing may \
                         change on any node",
                        first + 1
                    )),
                );
            }
        }
    } else if ponr_known
        && let Some(first_change) = up.iter().position(|s| s.instruction.commit_only())
    {
        // Implicit point of no return: it sits after the last staging step, so every staging
        // step must come before the first change.
        let change = up[first_change].instruction.name();
        for step in &up[first_change + 1..] {
            if step.instruction.prepare_only() {
                out.push(
                    Diagnostic::error(
                        step.span,
                        format!(
                            "`{}` after `{change}` (step {}), which changes the running system",
                            step.instruction.name(),
                            first_change + 1
                        ),
                    )
                    .with_help(
                        "staging and checks go before the (implicit) point of no return, which \
                         is the first change",
                    ),
                );
            }
        }
    }

    // Barrier ids are unique within a script.
    let mut barriers: HashMap<&str, usize> = HashMap::new();
    for (index, step) in up.iter().enumerate() {
        if let Instruction::SyncNodes { id, .. } = &step.instruction {
            if let Some(&first) = barriers.get(id.value.as_str()) {
                out.push(
                    Diagnostic::error(id.span, format!("barrier id `{}` is used twice", id.value))
                        .with_help(format!("step {} already uses it", first + 1)),
                );
            } else {
                barriers.insert(&id.value, index);
            }
        }
    }

    // Safe on a partial list: a step that failed to parse can only move it closer to the front.
    check_first_only(up, out);
    if complete.up.none_of(&["load_object_code"]) {
        check_loads(script, out);
    }
    check_balance(
        up,
        complete.up.none_of(SUSPENSION),
        complete.up.none_of(STOPPING),
        out,
    );
}

fn check_first_only(steps: &[Step], out: &mut Vec<Diagnostic>) {
    for step in steps.iter().skip(1) {
        if matches!(step.instruction, Instruction::RestartNewEmulator) {
            out.push(
                Diagnostic::error(
                    step.span,
                    "`restart_new_emulator` must be the first instruction",
                )
                .with_help(
                    "it restarts everything on the new release, so nothing can come before it",
                ),
            );
        }
    }
}

/// Every `load` of `up` activates something an earlier `load_object_code` staged.
fn check_loads(script: &Script, out: &mut Vec<Diagnostic>) {
    let mut staged_any = false;
    // File names (last path component) of the staged artifacts: a beam module `m` is `m.beam`.
    let mut staged_files: BTreeSet<&str> = BTreeSet::new();
    for step in &script.up {
        match &step.instruction {
            Instruction::LoadObjectCode { artifacts } => {
                staged_any = true;
                for artifact in artifacts {
                    let file = artifact
                        .value
                        .rsplit(['/', '\\'])
                        .next()
                        .unwrap_or(&artifact.value);
                    staged_files.insert(file);
                }
            }
            Instruction::Load { .. } if script.runtime == Runtime::Process && !staged_any => {
                out.push(
                    Diagnostic::error(
                        step.span,
                        "`load` has no earlier `load_object_code`: there is no staged \
                         release to activate",
                    )
                    .with_help(
                        "stage the release with `load_object_code` before the point of no return",
                    ),
                );
            }
            Instruction::Load { targets } if script.runtime == Runtime::Beam => {
                for module in targets {
                    let file = format!("{}.beam", module.value);
                    if !staged_files.contains(file.as_str()) {
                        out.push(
                            Diagnostic::error(
                                module.span,
                                format!(
                                    "`load` of module `{}` has no earlier `load_object_code` \
                                     staging `{file}`",
                                    module.value
                                ),
                            )
                            .with_help(format!(
                                "declare an artifact named `{file}` and stage it before the \
                                 point of no return"
                            )),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

/// `suspend`/`resume` and `stop`/`start` balance; `code_change` only on suspended targets.
fn check_balance(
    steps: &[Step],
    check_suspension: bool,
    check_stopping: bool,
    out: &mut Vec<Diagnostic>,
) {
    let mut suspended: BTreeMap<&str, Span> = BTreeMap::new();
    let mut stopped: BTreeMap<&str, Span> = BTreeMap::new();
    for step in steps {
        match &step.instruction {
            Instruction::Suspend { targets, .. } if check_suspension => {
                for target in targets {
                    if suspended.insert(&target.value, target.span).is_some() {
                        out.push(Diagnostic::error(
                            target.span,
                            format!("`{}` is already suspended", target.value),
                        ));
                    }
                }
            }
            Instruction::Resume { targets } if check_suspension => {
                for target in targets {
                    if suspended.remove(target.value.as_str()).is_none() {
                        out.push(
                            Diagnostic::error(
                                target.span,
                                format!("`resume` of `{}`, which is not suspended", target.value),
                            )
                            .with_help(
                                "every `resume` needs an earlier `suspend` of the same target",
                            ),
                        );
                    }
                }
            }
            Instruction::CodeChange { targets, .. } if check_suspension => {
                for target in targets {
                    if !suspended.contains_key(target.value.as_str()) {
                        out.push(
                            Diagnostic::error(
                                target.span,
                                format!(
                                    "`code_change` on `{}`, which is not suspended",
                                    target.value
                                ),
                            )
                            .with_help(format!(
                                "suspend it first: {{ suspend = [\"{}\"] }}",
                                target.value
                            )),
                        );
                    }
                }
            }
            Instruction::Stop { targets } if check_stopping => {
                for target in targets {
                    if stopped.insert(&target.value, target.span).is_some() {
                        out.push(Diagnostic::error(
                            target.span,
                            format!("`{}` is already stopped", target.value),
                        ));
                    }
                }
            }
            Instruction::Start { targets } if check_stopping => {
                for target in targets {
                    if stopped.remove(target.value.as_str()).is_none() {
                        out.push(
                            Diagnostic::error(
                                target.span,
                                format!("`start` of `{}`, which is not stopped", target.value),
                            )
                            .with_help("every `start` needs an earlier `stop` of the same target"),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    for (target, span) in suspended {
        out.push(
            Diagnostic::error(span, format!("`{target}` is suspended but never resumed"))
                .with_help(format!(
                    "add {{ resume = [\"{target}\"] }} later: a node is never left with a \
                     suspended service"
                )),
        );
    }
    for (target, span) in stopped {
        out.push(
            Diagnostic::error(span, format!("`{target}` is stopped but never started"))
                .with_help(format!("add {{ start = [\"{target}\"] }} later")),
        );
    }
}

// ----- down -------------------------------------------------------------------------------------

fn check_down(script: &Script, down: &[Step], broken: &Broken, out: &mut Vec<Diagnostic>) {
    for step in down {
        let reason = match &step.instruction {
            Instruction::SyncNodes { .. } => Some("a node rolls back on its own, without barriers"),
            Instruction::PointOfNoReturn => {
                Some("a rollback is already past the point of no return")
            }
            Instruction::LoadObjectCode { .. } | Instruction::Check { .. } => Some(
                "a rollback returns to the release already on the node: there is nothing to \
                 stage or check",
            ),
            Instruction::CodeChange {
                mode: ChangeMode::Up,
                ..
            } if script.runtime == Runtime::Beam => {
                out.push(
                    Diagnostic::warning(step.span, "`code_change` in `down` runs with mode \"up\"")
                        .with_help("going back to the old version usually needs mode = \"down\""),
                );
                None
            }
            _ => None,
        };
        if let Some(reason) = reason {
            out.push(Diagnostic::error(
                step.span,
                format!(
                    "`{}` makes no sense in `down`: {reason}",
                    step.instruction.name()
                ),
            ));
        }
    }
    check_first_only(down, out);
    check_balance(
        down,
        broken.none_of(SUSPENSION),
        broken.none_of(STOPPING),
        out,
    );
}

// ----- single instructions ----------------------------------------------------------------------

fn check_instruction(script: &Script, step: &Step, out: &mut Vec<Diagnostic>) {
    match (&step.instruction, script.runtime) {
        (Instruction::Load { targets }, Runtime::Process) => {
            for app in targets {
                if !script.app.value.is_empty() && app.value != script.app.value {
                    out.push(Diagnostic::error(
                        app.span,
                        format!(
                            "`load` activates app `{}`, but this script upgrades `{}`",
                            app.value, script.app.value
                        ),
                    ));
                }
            }
        }
        (Instruction::Purge { targets, .. }, Runtime::Process) => {
            for release in targets {
                let reason = if release.value == script.to.value {
                    Some("it is the release this script installs")
                } else if release.value == script.from.value {
                    Some(
                        "it is the permanent release, which rollback needs until the new one is permanent",
                    )
                } else {
                    None
                };
                if let Some(reason) = reason {
                    out.push(Diagnostic::error(
                        release.span,
                        format!(
                            "`purge` cannot delete release `{}`: {reason}",
                            release.value
                        ),
                    ));
                }
                if let Some(problem) = not_a_single_component(&release.value) {
                    out.push(
                        Diagnostic::error(release.span, format!("a release name {problem}"))
                            .with_help("paths from the network are never trusted"),
                    );
                }
            }
        }
        (Instruction::Apply { hook, args, .. }, Runtime::Beam) => {
            check_mfa(hook, args.len(), out);
        }
        _ => {}
    }
}

/// `module:function/arity`, with as many `args` as the arity says.
fn check_mfa(mfa: &Located<String>, arg_count: usize, out: &mut Vec<Diagnostic>) {
    let parsed = mfa.value.split_once(':').and_then(|(module, rest)| {
        let (function, arity) = rest.split_once('/')?;
        let arity: usize = arity.parse().ok()?;
        (is_atom(module) && is_atom(function)).then_some(arity)
    });
    match parsed {
        None => out.push(
            Diagnostic::error(
                mfa.span,
                format!(
                    "`{}` is not an MFA of the form module:function/arity",
                    mfa.value
                ),
            )
            .with_help("write e.g. mfa = \"counter_server:migrate/1\""),
        ),
        Some(arity) if arity != arg_count => out.push(Diagnostic::error(
            mfa.span,
            format!(
                "`{}` takes {arity} argument{}, but `args` gives {arg_count}",
                mfa.value,
                if arity == 1 { "" } else { "s" }
            ),
        )),
        Some(_) => {}
    }
}

/// An unquoted Erlang atom: a lowercase letter, then letters, digits, `_` or `@`.
fn is_atom(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@')
}

// ----- OTP releases -----------------------------------------------------------------------------

/// What an `otp_release` script may hold besides its two release instructions: the relup inside
/// the tarball carries suspend/load/code_change, and the release handler runs it.
const OTP_RELEASE_ALLOWED: &[&str] = &[
    "unpack_release",
    "install_release",
    "sync_nodes",
    "point_of_no_return",
    "check",
    "apply",
];

/// `runtime = "otp_release"`: exactly one `unpack_release` (before the point of no return, by
/// [`Instruction::prepare_only`]) and one `install_release` after it; nothing the relup does
/// itself; no `down` (the relup's downgrade, or a restart from the permanent release, is the
/// rollback). The two instructions belong to that runtime only.
fn check_otp_release(script: &Script, complete: &Completeness, out: &mut Vec<Diagnostic>) {
    let all = script.up.iter().chain(script.down.iter().flatten());
    if script.runtime != Runtime::OtpRelease {
        for step in all {
            if matches!(
                step.instruction,
                Instruction::UnpackRelease { .. } | Instruction::InstallRelease { .. }
            ) {
                out.push(
                    Diagnostic::error(
                        step.span,
                        format!(
                            "`{}` upgrades an OTP release: it needs runtime = \"otp_release\"",
                            step.instruction.name()
                        ),
                    )
                    .with_help(format!(
                        "this script's runtime is {}",
                        script.runtime.as_str()
                    )),
                );
            }
        }
        return;
    }
    for step in &script.up {
        let name = step.instruction.name();
        if !OTP_RELEASE_ALLOWED.contains(&name) {
            out.push(
                Diagnostic::error(
                    step.span,
                    format!("`{name}` has no place in an otp_release script"),
                )
                .with_help(
                    "the release's relup carries the low-level instructions and \
                     `install_release` runs it; an otp_release script holds unpack_release, \
                     install_release, sync_nodes, point_of_no_return, check and apply (hooks)",
                ),
            );
        }
    }
    if let Some(down) = &script.down
        && let Some(first) = down.first()
    {
        out.push(
            Diagnostic::error(first.span, "an otp_release script has no `down` list").with_help(
                "the rollback is the relup's downgrade when it has one, else a restart of \
                     the node from its permanent release",
            ),
        );
    }
    let unpacks: Vec<&Step> = script
        .up
        .iter()
        .filter(|s| matches!(s.instruction, Instruction::UnpackRelease { .. }))
        .collect();
    let installs: Vec<&Step> = script
        .up
        .iter()
        .filter(|s| matches!(s.instruction, Instruction::InstallRelease { .. }))
        .collect();
    for extra in unpacks.iter().skip(1) {
        out.push(Diagnostic::error(
            extra.span,
            "more than one `unpack_release`: a script moves one release",
        ));
    }
    for extra in installs.iter().skip(1) {
        out.push(Diagnostic::error(
            extra.span,
            "more than one `install_release`: a script moves one release",
        ));
    }
    let whole = complete.up.none_of(&["unpack_release", "install_release"]);
    let top = script.app.span;
    match (unpacks.first(), installs.first()) {
        (None, _) if whole => out.push(
            Diagnostic::error(top, "an otp_release script needs an `unpack_release`").with_help(
                r#"add { unpack_release = "<rel>-<vsn>.tar.gz" } before the point of no return"#,
            ),
        ),
        (Some(_), None) if whole => out.push(
            Diagnostic::error(top, "an otp_release script needs an `install_release`")
                .with_help(r#"add "install_release" after the point of no return"#),
        ),
        (Some(unpack), Some(install)) if install.span.start < unpack.span.start => {
            out.push(Diagnostic::error(
                install.span,
                "`install_release` before `unpack_release`: there is nothing to install yet",
            ));
        }
        _ => {}
    }
}
