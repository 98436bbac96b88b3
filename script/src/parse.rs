//! TOML source -> [`Script`], keeping the span of every value.
//!
//! The TOML is first read with `toml::de::DeTable::parse`, which keeps the byte span of every
//! key, table, array element and value (inline tables included); this module then walks that tree
//! by hand so that it can report *every* problem at once (unknown keys, wrong types, bad
//! durations, …) instead of stopping at the first one as serde would.
//!
//! The forms accepted for every instruction are listed in the crate documentation (lib.rs).

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::Parsed;
use crate::count::NodeCount;
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::duration::parse_duration;
use crate::gates::{Comparison, DEFAULT_GATE_INTERVAL, DEFAULT_GATE_TIMEOUT};
use crate::model::{
    Artifact, ChangeMode, FleetGate, GateSpec, Instruction, Located, OnFailure, RolloutPolicy,
    Runtime, Script, Span, Step,
};
use crate::suggest;
use crate::validate::{self, Broken, Completeness};
use crate::windows::Window;

type Value<'i> = Spanned<DeValue<'i>>;

/// Marker: the problem was already pushed as a diagnostic.
#[derive(Debug, Clone, Copy)]
struct Reported;

type Parse<T> = Result<T, Reported>;

const TOP_KEYS: &[&str] = &[
    "app",
    "runtime",
    "from",
    "to",
    "description",
    "artifacts",
    "rollout",
    "script",
];
const ARTIFACT_KEYS: &[&str] = &["name", "source", "sha256", "unpack", "mode"];
const ROLLOUT_KEYS: &[&str] = &[
    "select",
    "canary",
    "max_in_flight",
    "max_failures",
    "on_failure",
    "barrier_timeout",
    "step_timeout",
    "pause_after_canary",
    "skip_unreachable",
    "waves_by",
    "order",
    "windows",
    "window_timeout",
    "gates",
];
const FLEET_GATE_KEYS: &[&str] = &["name", "query", "pass_if", "hold", "interval", "timeout"];
const GATE_KEYS: &[&str] = &["query", "pass_if", "hold", "interval", "timeout"];
const SCRIPT_KEYS: &[&str] = &["up", "down"];
const RUNTIMES: &[&str] = &["process", "beam", "otp_release"];
const ON_FAILURE: &[&str] = &["rollback_node", "rollback_all", "halt"];
/// Highest file mode an artifact may ask for (permission bits plus setuid/setgid/sticky).
const MAX_MODE: u32 = 0o7777;

pub(crate) fn parse_and_validate(name: &str, source: &str) -> Result<Parsed, Diagnostics> {
    let (script, diagnostics) = parse_partial(name, source);
    match script {
        Some(script) if !diagnostics.has_errors() => Ok(Parsed {
            script,
            warnings: diagnostics.items,
        }),
        _ => Err(diagnostics),
    }
}

/// The script as far as it could be built, and every diagnostic sorted by position. The script
/// is `None` only when the source is not TOML.
pub(crate) fn parse_partial(name: &str, source: &str) -> (Option<Script>, Diagnostics) {
    let diagnostics = |items| Diagnostics {
        name: name.to_string(),
        source: source.to_string(),
        items,
    };
    let root = match DeTable::parse(source) {
        Ok(root) => root,
        Err(error) => {
            let span = error
                .span()
                .map(|r| Span::new(r.start.min(source.len()), r.end.min(source.len())))
                .unwrap_or_default();
            let message = format!("invalid TOML: {}", error.message());
            return (None, diagnostics(vec![Diagnostic::error(span, message)]));
        }
    };
    let mut parser = Parser::default();
    let (script, completeness) = parser.script(root.get_ref());
    let mut items = parser.diagnostics;
    items.extend(validate::check_script(&script, &completeness));
    items.sort_by_key(|d| (d.span.start, d.span.end));
    (Some(script), diagnostics(items))
}

fn span_of<T>(value: &Spanned<T>) -> Span {
    let range = value.span();
    Span::new(range.start, range.end)
}

/// "a string", "an integer", … for "found …" in messages.
fn describe(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The option keys an instruction's table form accepts in `runtime`.
fn option_keys(instruction: &str, runtime: Runtime) -> &'static [&'static str] {
    use Runtime::{Beam, OtpRelease, Process};
    match (instruction, runtime) {
        ("load_object_code", _) => &["artifacts"],
        ("check", Process | OtpRelease) | ("apply", Process | OtpRelease) => {
            &["hook", "args", "timeout"]
        }
        ("unpack_release", _) => &["artifact", "timeout"],
        ("install_release", _) => &["timeout"],
        ("check", Beam) | ("suspend", Beam) => &["modules", "timeout"],
        ("sync_nodes", _) => &["id", "timeout", "nodes"],
        ("suspend", Process) => &["services", "timeout"],
        ("load", Process) => &["app"],
        ("load", Beam) | ("resume", Beam) => &["modules"],
        ("code_change", Process) => &["service", "extra", "timeout"],
        ("code_change", Beam) => &["modules", "extra", "mode", "timeout"],
        ("resume", Process) | ("stop", _) | ("start", _) | ("restart", _) => &["services"],
        ("apply", Beam) => &["mfa", "args", "timeout"],
        ("health", _) => &["service", "timeout"],
        ("gate", _) => GATE_KEYS,
        ("purge", Process) => &["releases"],
        ("purge", Beam) => &["modules", "brutal"],
        _ => &[],
    }
}

/// An example of the instruction with arguments, for "needs arguments" help.
fn example(instruction: &str, runtime: Runtime) -> &'static str {
    use Runtime::{Beam, Process};
    match (instruction, runtime) {
        ("load_object_code", _) => r#"{ load_object_code = ["<artifact>"] }"#,
        ("check", Process | Runtime::OtpRelease) => r#"{ check = "<hook>" }"#,
        ("check", Beam) => r#"{ check = { modules = ["<module>"] } }"#,
        ("sync_nodes", _) => r#"{ sync_nodes = "<barrier id>" }"#,
        ("suspend", Process) => r#"{ suspend = ["<service>"] }"#,
        ("load", Process) => r#"{ load = "<app>" }"#,
        ("code_change", Process) => r#"{ code_change = { service = "<service>", extra = "…" } }"#,
        ("code_change", Beam) => r#"{ code_change = { modules = ["<module>"], extra = "…" } }"#,
        ("apply", Process | Runtime::OtpRelease) => r#"{ apply = "<hook>" }"#,
        ("apply", Beam) => r#"{ apply = { mfa = "<module>:<function>/<arity>", args = [..] } }"#,
        ("health", _) => r#"{ health = "<service>" }"#,
        ("gate", _) => {
            r#"{ gate = { query = "rate(errors_total{node=\"$node\"}[1m])", pass_if = "< 0.5", hold = "30s" } }"#
        }
        ("unpack_release", _) => r#"{ unpack_release = "<rel>-<vsn>.tar.gz" }"#,
        ("install_release", _) => {
            r#""install_release" or { install_release = { timeout = "1m" } }"#
        }
        ("suspend" | "load" | "resume", Beam) => r#"{ <instruction> = ["<module>"] }"#,
        _ => r#"{ <instruction> = ["<service>"] }"#,
    }
}

/// The instructions a list element that failed to parse was most likely meant to be: its
/// name(s) if known, or what a misspelt name most likely means.
fn attempted_instructions(item: &Value<'_>) -> Vec<&'static str> {
    let known = |name: &str| {
        Instruction::NAMES
            .iter()
            .copied()
            .find(|known| *known == name)
            .or_else(|| suggest::instruction(name, &Instruction::NAMES))
    };
    match item.get_ref() {
        DeValue::String(name) => known(name).into_iter().collect(),
        DeValue::Table(table) => table
            .iter()
            .filter_map(|(key, _)| known(key.get_ref()))
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Default)]
struct Parser {
    diagnostics: Vec<Diagnostic>,
    runtime: Runtime,
}

impl Parser {
    fn error(&mut self, span: Span, message: impl Into<String>) -> Reported {
        self.diagnostics.push(Diagnostic::error(span, message));
        Reported
    }

    fn push(&mut self, diagnostic: Diagnostic) -> Reported {
        self.diagnostics.push(diagnostic);
        Reported
    }

    // ----- keys -------------------------------------------------------------------------------

    /// Reports every key of `table` that is not in `known`. `place` completes "unknown key `x` …";
    /// `hint` may give a better help than the closest known key.
    fn unknown_keys(
        &mut self,
        table: &DeTable<'_>,
        known: &[&str],
        place: &str,
        hint: &dyn Fn(&str) -> Option<String>,
    ) {
        for (key, _) in table.iter() {
            let key_name: &str = key.get_ref();
            if known.contains(&key_name) {
                continue;
            }
            let help = hint(key_name)
                .or_else(|| {
                    suggest::closest(key_name, known).map(|near| format!("did you mean `{near}`?"))
                })
                .unwrap_or_else(|| format!("known keys: {}", known.join(", ")));
            self.push(
                Diagnostic::error(span_of(key), format!("unknown key `{key_name}` {place}"))
                    .with_help(help),
            );
        }
    }

    fn required<'a, 'i>(
        &mut self,
        table: &'a DeTable<'i>,
        key: &str,
        at: Span,
        place: &str,
    ) -> Parse<&'a Value<'i>> {
        table
            .get(key)
            .ok_or_else(|| self.error(at, format!("missing required key `{key}` {place}")))
    }

    // ----- scalar values ----------------------------------------------------------------------

    fn string(&mut self, value: &Value<'_>, what: &str) -> Parse<Located<String>> {
        match value.get_ref() {
            DeValue::String(s) => Ok(Located::new(s.to_string(), span_of(value))),
            other => Err(self.error(
                span_of(value),
                format!("{what} must be a string, found {}", describe(other)),
            )),
        }
    }

    /// A non-empty string naming something (service, module, hook, barrier, …).
    fn name(&mut self, value: &Value<'_>, what: &str) -> Parse<Located<String>> {
        let name = self.string(value, what)?;
        if name.value.is_empty() {
            return Err(self.error(name.span, format!("{what} cannot be empty")));
        }
        Ok(name)
    }

    fn boolean(&mut self, value: &Value<'_>, what: &str) -> Parse<bool> {
        match value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => Err(self.error(
                span_of(value),
                format!("{what} must be true or false, found {}", describe(other)),
            )),
        }
    }

    /// A non-negative integer that fits in a u32.
    fn count(&mut self, value: &Value<'_>, what: &str) -> Parse<u32> {
        let span = span_of(value);
        let integer = match value.get_ref() {
            DeValue::Integer(i) => i,
            DeValue::Float(_) => {
                return Err(self.error(span, format!("{what} must be a whole number")));
            }
            other => {
                return Err(self.error(
                    span,
                    format!("{what} must be an integer, found {}", describe(other)),
                ));
            }
        };
        match i128::from_str_radix(integer.as_str(), integer.radix()) {
            Ok(n) if n < 0 => Err(self.error(span, format!("{what} cannot be negative"))),
            Ok(n) => u32::try_from(n).map_err(|_| {
                self.error(span, format!("{what} is too large (at most {})", u32::MAX))
            }),
            Err(_) => Err(self.error(span, format!("{what} is out of range"))),
        }
    }

    /// A number of nodes: a non-negative integer or a percentage string `"1%"`..`"100%"`.
    fn node_count(&mut self, value: &Value<'_>, what: &str) -> Parse<NodeCount> {
        let span = span_of(value);
        let DeValue::String(text) = value.get_ref() else {
            return match value.get_ref() {
                DeValue::Integer(_) => self.count(value, what).map(NodeCount::nodes),
                DeValue::Float(_) => {
                    Err(self.error(span, format!("{what} must be a whole number")))
                }
                other => Err(self.push(
                    Diagnostic::error(
                        span,
                        format!(
                            "{what} must be a number of nodes or a percentage, found {}",
                            describe(other)
                        ),
                    )
                    .with_help(r#"write e.g. 2 or "10%""#),
                )),
            };
        };
        let percent = text
            .strip_suffix('%')
            .map(str::trim)
            .and_then(|digits| digits.parse::<u32>().ok());
        match percent {
            Some(p) if (1..=100).contains(&p) => Ok(NodeCount::Percent(p)),
            Some(p) => Err(self.push(
                Diagnostic::error(span, format!("{what} {p}% is not between 1% and 100%"))
                    .with_help("write 0 for none"),
            )),
            None => Err(self.push(
                Diagnostic::error(
                    span,
                    format!("{what} `{text}` is neither a number of nodes nor a percentage"),
                )
                .with_help(r#"write e.g. 2 or "10%""#),
            )),
        }
    }

    /// `windows`: each string a window (`Mon-Fri 02:00-05:00 UTC`), errors at its string.
    fn windows(&mut self, value: &Value<'_>) -> Vec<Window> {
        let Ok(texts) = self.names(value, "`windows`", "window", false) else {
            return Vec::new();
        };
        let mut windows = Vec::new();
        for text in texts {
            match Window::parse(&text.value) {
                Ok(window) => windows.push(window),
                Err(why) => {
                    self.push(Diagnostic::error(text.span, why).with_help(
                        r#"write e.g. "Mon-Fri 02:00-05:00 UTC" or "daily 22:00-02:00 UTC""#,
                    ));
                }
            }
        }
        windows
    }

    /// `order`: the `waves_by` values in the order their waves run; each named once.
    fn wave_order(&mut self, value: &Value<'_>, has_waves_by: bool) -> Vec<String> {
        let Ok(values) = self.names(value, "`order`", "label value", false) else {
            return Vec::new();
        };
        if !has_waves_by {
            self.push(
                Diagnostic::error(span_of(value), "`order` needs `waves_by`")
                    .with_help(r#"add waves_by = "zone" (the label whose values `order` lists)"#),
            );
            return Vec::new();
        }
        let mut order: Vec<String> = Vec::new();
        for v in values {
            if order.contains(&v.value) {
                self.error(v.span, format!("`order` names `{}` twice", v.value));
            } else {
                order.push(v.value);
            }
        }
        order
    }

    fn duration(&mut self, value: &Value<'_>, what: &str) -> Parse<Duration> {
        let span = span_of(value);
        match value.get_ref() {
            DeValue::String(text) => parse_duration(text)
                .map_err(|error| self.error(span, format!("invalid duration for {what}: {error}"))),
            DeValue::Integer(_) | DeValue::Float(_) => Err(self.push(
                Diagnostic::error(
                    span,
                    format!("{what} must be a duration string with a unit"),
                )
                .with_help(r#"write e.g. "500ms", "30s", "5m" or "1h""#),
            )),
            other => Err(self.error(
                span,
                format!(
                    "{what} must be a duration string such as \"30s\", found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// `"a"` (when `single_ok`) or `["a", "b"]`: a non-empty list of non-empty names.
    fn names(
        &mut self,
        value: &Value<'_>,
        what: &str,
        noun: &str,
        single_ok: bool,
    ) -> Parse<Vec<Located<String>>> {
        match value.get_ref() {
            DeValue::String(_) if single_ok => Ok(vec![self.name(value, what)?]),
            DeValue::Array(items) => {
                if items.is_empty() {
                    return Err(self.error(
                        span_of(value),
                        format!("{what} must list at least one {noun}"),
                    ));
                }
                let element_what = format!("every {noun} of {what}");
                let parsed: Vec<_> = items
                    .iter()
                    .map(|item| self.name(item, &element_what))
                    .collect();
                parsed.into_iter().collect()
            }
            other => {
                let expected = if single_ok {
                    "a string or an array of strings"
                } else {
                    "an array of strings"
                };
                Err(self.error(
                    span_of(value),
                    format!("{what} must be {expected}, found {}", describe(other)),
                ))
            }
        }
    }

    /// An array of strings (possibly empty): arguments of hooks and MFAs.
    fn arguments(&mut self, value: &Value<'_>, what: &str) -> Parse<Vec<String>> {
        match value.get_ref() {
            DeValue::Array(items) => {
                let element_what = format!("every argument of {what}");
                let parsed: Vec<_> = items
                    .iter()
                    .map(|item| self.string(item, &element_what).map(|s| s.value))
                    .collect();
                parsed.into_iter().collect()
            }
            other => Err(self.error(
                span_of(value),
                format!(
                    "{what} must be an array of strings, found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn optional<T>(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        read: impl FnOnce(&mut Self, &Value<'_>) -> Parse<T>,
    ) -> Parse<Option<T>> {
        match table.get(key) {
            Some(value) => read(self, value).map(Some),
            None => Ok(None),
        }
    }

    // ----- the document -----------------------------------------------------------------------

    fn script(&mut self, root: &DeTable<'_>) -> (Script, Completeness) {
        let top = Span::default();
        self.unknown_keys(root, TOP_KEYS, "at the top level", &|key| {
            if SCRIPT_KEYS.contains(&key) {
                Some(format!("`{key}` belongs in the [script] table"))
            } else if ROLLOUT_KEYS.contains(&key) {
                Some(format!("`{key}` belongs in the [rollout] table"))
            } else if key == "artifact" {
                Some("did you mean `artifacts` ([[artifacts]])?".to_string())
            } else {
                None
            }
        });

        self.runtime = self.runtime(root.get("runtime"));
        let mut header_ok = true;
        let mut header = |parser: &mut Self, key: &str| {
            let found = parser
                .required(root, key, top, "at the top level")
                .and_then(|value| parser.name(value, &format!("`{key}`")));
            found.unwrap_or_else(|_| {
                header_ok = false;
                Located::new(String::new(), top)
            })
        };
        let app = header(self, "app");
        let from = header(self, "from");
        let to = header(self, "to");
        let description = self
            .optional(root, "description", |p, v| p.string(v, "`description`"))
            .ok()
            .flatten()
            .map(|d| d.value);

        let (artifacts, artifacts_complete) = self.artifacts(root.get("artifacts"));
        let rollout = self.rollout(root.get("rollout"));
        let (up, up_broken, down, down_broken) = self.script_table(root.get("script"));

        let script = Script {
            app,
            runtime: self.runtime,
            from,
            to,
            description,
            artifacts,
            rollout,
            up,
            down,
        };
        let completeness = Completeness {
            header: header_ok,
            artifacts: artifacts_complete,
            up: up_broken,
            down: down_broken,
        };
        (script, completeness)
    }

    fn runtime(&mut self, value: Option<&Value<'_>>) -> Runtime {
        let Some(value) = value else {
            return Runtime::Process;
        };
        let Ok(text) = self.string(value, "`runtime`") else {
            return Runtime::Process;
        };
        match text.value.as_str() {
            "process" => Runtime::Process,
            "beam" => Runtime::Beam,
            "otp_release" => Runtime::OtpRelease,
            other => {
                let help = suggest::closest(other, RUNTIMES)
                    .map(|near| format!("did you mean `{near}`?"))
                    .unwrap_or_else(|| {
                        "the runtimes are `process`, `beam` and `otp_release`".to_string()
                    });
                self.push(
                    Diagnostic::error(
                        text.span,
                        format!(
                            "unknown runtime `{other}`: expected `process`, `beam` or `otp_release`"
                        ),
                    )
                    .with_help(help),
                );
                // Go on as a process script so the rest still gets checked.
                Runtime::Process
            }
        }
    }

    fn artifacts(&mut self, value: Option<&Value<'_>>) -> (Vec<Artifact>, bool) {
        let Some(value) = value else {
            return (Vec::new(), true);
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.push(
                Diagnostic::error(
                    span_of(value),
                    format!(
                        "`artifacts` must be an array of tables, found {}",
                        describe(value.get_ref())
                    ),
                )
                .with_help("declare each artifact under its own [[artifacts]] header"),
            );
            return (Vec::new(), false);
        };
        let mut artifacts = Vec::new();
        let mut complete = true;
        for item in items.iter() {
            let parsed = match item.get_ref() {
                DeValue::Table(table) => self.artifact(table, span_of(item)),
                other => Err(self.error(
                    span_of(item),
                    format!("an artifact must be a table, found {}", describe(other)),
                )),
            };
            match parsed {
                Ok(artifact) => artifacts.push(artifact),
                Err(Reported) => complete = false,
            }
        }
        (artifacts, complete)
    }

    fn artifact(&mut self, table: &DeTable<'_>, span: Span) -> Parse<Artifact> {
        self.unknown_keys(table, ARTIFACT_KEYS, "in [[artifacts]]", &|_| None);
        let name = self
            .required(table, "name", span, "in [[artifacts]]")
            .and_then(|v| self.string(v, "the artifact's `name`"));
        let source = self
            .required(table, "source", span, "in [[artifacts]]")
            .and_then(|v| self.string(v, "the artifact's `source`"));
        let sha256 = self.optional(table, "sha256", |p, v| {
            let digest = p.string(v, "`sha256`")?;
            // Digests compare in lowercase; the validator checks the form.
            Ok(Located::new(digest.value.to_ascii_lowercase(), digest.span))
        });
        let unpack = self.optional(table, "unpack", |p, v| p.boolean(v, "`unpack`"));
        let mode = self.optional(table, "mode", Self::mode);
        Ok(Artifact {
            name: name?,
            source: source?,
            sha256: sha256?,
            unpack: unpack?.unwrap_or(false),
            mode: mode?,
            span,
        })
    }

    fn mode(&mut self, value: &Value<'_>) -> Parse<u32> {
        let span = span_of(value);
        let mode = match value.get_ref() {
            DeValue::String(text) => {
                let digits = text.strip_prefix("0o").unwrap_or(text);
                if digits.is_empty() || !digits.chars().all(|c| matches!(c, '0'..='7')) {
                    return Err(self.push(
                        Diagnostic::error(
                            span,
                            format!("`mode` \"{text}\" is not a string of octal digits"),
                        )
                        .with_help(r#"write e.g. mode = "0755""#),
                    ));
                }
                u32::from_str_radix(digits, 8).ok()
            }
            DeValue::Integer(integer) if integer.radix() == 10 => {
                return Err(self.push(
                    Diagnostic::error(
                        span,
                        format!("`mode` {integer} is a decimal integer; file modes are octal"),
                    )
                    .with_help(format!(
                        r#"write mode = "0{integer}" or mode = 0o{integer}"#
                    )),
                ));
            }
            DeValue::Integer(integer) => {
                u32::from_str_radix(integer.as_str(), integer.radix()).ok()
            }
            other => {
                return Err(self.error(
                    span,
                    format!(
                        "`mode` must be an octal string such as \"0755\", found {}",
                        describe(other)
                    ),
                ));
            }
        };
        match mode {
            Some(mode) if mode <= MAX_MODE => Ok(mode),
            _ => Err(self.error(span, "`mode` is out of range (at most 0o7777)")),
        }
    }

    fn rollout(&mut self, value: Option<&Value<'_>>) -> RolloutPolicy {
        let mut policy = RolloutPolicy::default();
        let Some(value) = value else {
            return policy;
        };
        let DeValue::Table(table) = value.get_ref() else {
            self.error(
                span_of(value),
                format!(
                    "`rollout` must be a table ([rollout]), found {}",
                    describe(value.get_ref())
                ),
            );
            return policy;
        };
        self.unknown_keys(table, ROLLOUT_KEYS, "in [rollout]", &|_| None);
        // Each field keeps its default when invalid: the error is reported, and the rest of the
        // script still gets checked.
        if let Some(select) = table.get("select") {
            policy.select = self.select(select);
        }
        let count = |parser: &mut Self, key: &str, slot: &mut u32| {
            if let Ok(Some(n)) = parser.optional(table, key, |p, v| p.count(v, &format!("`{key}`")))
            {
                *slot = n;
            }
        };
        let node_count = |parser: &mut Self, key: &str, slot: &mut NodeCount| {
            if let Ok(Some(n)) =
                parser.optional(table, key, |p, v| p.node_count(v, &format!("`{key}`")))
            {
                *slot = n;
            }
        };
        node_count(self, "canary", &mut policy.canary);
        node_count(self, "max_in_flight", &mut policy.max_in_flight);
        if let Ok(Some(label)) = self.optional(table, "waves_by", |p, v| p.name(v, "`waves_by`")) {
            policy.waves_by = Some(label.value);
        }
        if let Some(order) = table.get("order") {
            policy.order = self.wave_order(order, policy.waves_by.is_some());
        }
        if let Some(windows) = table.get("windows") {
            policy.windows = self.windows(windows);
        }
        if let Some(gates) = table.get("gates") {
            policy.gates = self.fleet_gates(gates);
        }
        if let Ok(Some(d)) = self.optional(table, "window_timeout", |p, v| {
            p.duration(v, "`window_timeout`")
        }) {
            policy.window_timeout = d;
        }
        count(self, "max_failures", &mut policy.max_failures);
        if let Ok(Some(on_failure)) = self.optional(table, "on_failure", Self::on_failure) {
            policy.on_failure = on_failure;
        }
        if let Ok(Some(d)) = self.optional(table, "barrier_timeout", |p, v| {
            p.duration(v, "`barrier_timeout`")
        }) {
            policy.barrier_timeout = d;
        }
        if let Ok(Some(d)) = self.optional(table, "step_timeout", |p, v| {
            p.duration(v, "`step_timeout`")
        }) {
            policy.step_timeout = d;
        }
        if let Some(pause) = table.get("pause_after_canary")
            && let Ok(flag) = self.boolean(pause, "`pause_after_canary`")
        {
            policy.pause_after_canary = flag;
            if flag && policy.canary.is_none() {
                self.diagnostics.push(
                    Diagnostic::warning(
                        span_of(pause),
                        "`pause_after_canary` has no effect without a canary wave",
                    )
                    .with_help("set `canary` to the number of nodes in the first wave"),
                );
            }
        }
        if let Some(skip) = table.get("skip_unreachable")
            && let Ok(flag) = self.boolean(skip, "`skip_unreachable`")
        {
            policy.skip_unreachable = flag;
        }
        policy
    }

    /// `[[rollout.gates]]`: each a named fleet gate; names unique.
    fn fleet_gates(&mut self, value: &Value<'_>) -> Vec<FleetGate> {
        let DeValue::Array(items) = value.get_ref() else {
            self.push(
                Diagnostic::error(
                    span_of(value),
                    format!(
                        "`gates` must be an array of tables ([[rollout.gates]]), found {}",
                        describe(value.get_ref())
                    ),
                )
                .with_help("write [[rollout.gates]] with name, query and pass_if"),
            );
            return Vec::new();
        };
        let mut gates: Vec<FleetGate> = Vec::new();
        for item in items.iter() {
            let span = span_of(item);
            let DeValue::Table(table) = item.get_ref() else {
                self.error(
                    span,
                    format!("a gate must be a table, found {}", describe(item.get_ref())),
                );
                continue;
            };
            self.unknown_keys(table, FLEET_GATE_KEYS, "in [[rollout.gates]]", &|_| None);
            let name = self
                .required(table, "name", span, "in [[rollout.gates]]")
                .and_then(|v| self.name(v, "`name` of a gate"));
            let gate = self.gate_spec(table, span, "in [[rollout.gates]]", "a gate");
            let (Ok(name), Ok(gate)) = (name, gate) else {
                continue;
            };
            if gates.iter().any(|g| g.name.value == name.value) {
                self.error(
                    name.span,
                    format!("gate `{}` is named twice in [[rollout.gates]]", name.value),
                );
                continue;
            }
            gates.push(FleetGate { name, gate, span });
        }
        gates
    }

    /// The keys every gate has: `query`, `pass_if`, `hold`, `interval`, `timeout`.
    fn gate_spec(
        &mut self,
        table: &DeTable<'_>,
        at: Span,
        place: &str,
        what: &str,
    ) -> Parse<GateSpec> {
        let query = self
            .required(table, "query", at, place)
            .and_then(|v| self.name(v, &format!("`query` of {what}")));
        let pass_if = self
            .required(table, "pass_if", at, place)
            .and_then(|v| self.string(v, &format!("`pass_if` of {what}")))
            .and_then(|text| {
                Comparison::parse(&text.value).map_err(|why| {
                    self.push(
                        Diagnostic::error(text.span, format!("`pass_if` of {what}: {why}"))
                            .with_help(r#"write e.g. "< 0.5", "<= 10" or ">= 99.9""#),
                    )
                })
            });
        let duration = |parser: &mut Self, key: &str| {
            parser.optional(table, key, |p, v| {
                p.duration(v, &format!("`{key}` of {what}"))
                    .map(|d| (d, span_of(v)))
            })
        };
        let hold = duration(self, "hold");
        let interval = duration(self, "interval");
        let timeout = duration(self, "timeout");
        let (query, pass_if, hold, interval, timeout) =
            (query?, pass_if?, hold?, interval?, timeout?);
        let timeout = timeout.map_or(DEFAULT_GATE_TIMEOUT, |(d, _)| d);
        if let Some((hold, span)) = hold
            && hold > timeout
        {
            return Err(self.push(
                Diagnostic::error(
                    span,
                    format!(
                        "`hold` of {what} ({}) is longer than its `timeout` ({}): it could never pass",
                        crate::duration::format_duration(hold),
                        crate::duration::format_duration(timeout)
                    ),
                )
                .with_help("make `timeout` longer than `hold`"),
            ));
        }
        if let Some((interval, span)) = interval
            && interval > timeout
        {
            return Err(self.push(Diagnostic::error(
                span,
                format!(
                    "`interval` of {what} ({}) is longer than its `timeout` ({})",
                    crate::duration::format_duration(interval),
                    crate::duration::format_duration(timeout)
                ),
            )));
        }
        Ok(GateSpec {
            query,
            pass_if,
            hold: hold.map_or(Duration::ZERO, |(d, _)| d),
            interval: interval.map_or(DEFAULT_GATE_INTERVAL.min(timeout), |(d, _)| d),
            timeout,
        })
    }

    fn select(&mut self, value: &Value<'_>) -> BTreeMap<String, String> {
        let DeValue::Table(labels) = value.get_ref() else {
            self.push(
                Diagnostic::error(
                    span_of(value),
                    format!(
                        "`select` must be a table of node labels, found {}",
                        describe(value.get_ref())
                    ),
                )
                .with_help(r#"write e.g. select = { role = "miner" }"#),
            );
            return BTreeMap::new();
        };
        let mut select = BTreeMap::new();
        for (key, label) in labels.iter() {
            let key: &str = key.get_ref();
            if let Ok(label) = self.string(label, &format!("the label `{key}` in `select`")) {
                select.insert(key.to_string(), label.value);
            }
        }
        select
    }

    fn on_failure(&mut self, value: &Value<'_>) -> Parse<OnFailure> {
        let text = self.string(value, "`on_failure`")?;
        match text.value.as_str() {
            "rollback_node" => Ok(OnFailure::RollbackNode),
            "rollback_all" => Ok(OnFailure::RollbackAll),
            "halt" => Ok(OnFailure::Halt),
            other => {
                let help = suggest::closest(other, ON_FAILURE)
                    .map(|near| format!("did you mean `{near}`?"))
                    .unwrap_or_else(|| format!("expected one of: {}", ON_FAILURE.join(", ")));
                Err(self.push(
                    Diagnostic::error(text.span, format!("unknown `on_failure` policy `{other}`"))
                        .with_help(help),
                ))
            }
        }
    }

    /// `[script]`: returns `up` and `down` with the instructions of each that failed to parse.
    fn script_table(
        &mut self,
        value: Option<&Value<'_>>,
    ) -> (Vec<Step>, Broken, Option<Vec<Step>>, Broken) {
        let Some(value) = value else {
            self.push(
                Diagnostic::error(Span::default(), "missing the [script] table")
                    .with_help("add [script] with `up = [ … ]`, the upgrade instructions"),
            );
            return (Vec::new(), Broken::everything(), None, Broken::default());
        };
        let DeValue::Table(table) = value.get_ref() else {
            self.error(
                span_of(value),
                format!(
                    "`script` must be a table ([script]), found {}",
                    describe(value.get_ref())
                ),
            );
            return (Vec::new(), Broken::everything(), None, Broken::default());
        };
        self.unknown_keys(table, SCRIPT_KEYS, "in [script]", &|key| {
            matches!(key, "rollback" | "downgrade")
                .then(|| "did you mean `down`, the rollback instructions?".to_string())
        });
        let (up, up_broken) = match self.required(table, "up", span_of(value), "in [script]") {
            Ok(up) => {
                let (steps, broken) = self.steps(up, "up");
                if matches!(up.get_ref(), DeValue::Array(items) if items.is_empty()) {
                    self.error(span_of(up), "`up` has no instructions");
                }
                (steps, broken)
            }
            Err(Reported) => (Vec::new(), Broken::everything()),
        };
        let (down, down_broken) = match table.get("down") {
            Some(down) => {
                let (steps, broken) = self.steps(down, "down");
                if matches!(down.get_ref(), DeValue::Array(items) if items.is_empty()) {
                    self.push(
                        Diagnostic::warning(
                            span_of(down),
                            "an empty `down` list makes rollback do nothing on the node",
                        )
                        .with_help(
                            "omit `down` to get the default rollback (re-activate the permanent \
                             release, restart the app's services on it)",
                        ),
                    );
                }
                (Some(steps), broken)
            }
            None => (None, Broken::default()),
        };
        (up, up_broken, down, down_broken)
    }

    // ----- instructions -----------------------------------------------------------------------

    fn steps(&mut self, value: &Value<'_>, list: &str) -> (Vec<Step>, Broken) {
        let DeValue::Array(items) = value.get_ref() else {
            self.error(
                span_of(value),
                format!(
                    "`{list}` must be an array of instructions, found {}",
                    describe(value.get_ref())
                ),
            );
            return (Vec::new(), Broken::everything());
        };
        let mut steps = Vec::new();
        let mut broken = Broken::default();
        for item in items.iter() {
            match self.step(item) {
                Ok(instruction) => steps.push(Step {
                    instruction,
                    span: span_of(item),
                }),
                Err(Reported) => {
                    for name in attempted_instructions(item) {
                        broken.insert(name);
                    }
                }
            }
        }
        (steps, broken)
    }

    fn step(&mut self, item: &Value<'_>) -> Parse<Instruction> {
        let span = span_of(item);
        match item.get_ref() {
            DeValue::String(name) => self.bare_instruction(name, span),
            DeValue::Table(table) => {
                let mut entries = table.iter();
                let (Some((name, argument)), None) = (entries.next(), entries.next()) else {
                    return Err(self.table_instruction_shape(table, span));
                };
                let name_text: &str = name.get_ref();
                self.instruction(name_text, span_of(name), argument)
            }
            other => Err(self.push(
                Diagnostic::error(
                    span,
                    format!(
                        "an instruction must be a string or a table with one key, found {}",
                        describe(other)
                    ),
                )
                .with_help(r#"write e.g. "point_of_no_return" or { suspend = ["primes"] }"#),
            )),
        }
    }

    /// A table instruction with zero or several keys.
    fn table_instruction_shape(&mut self, table: &DeTable<'_>, span: Span) -> Reported {
        let keys: Vec<&str> = table.iter().map(|(k, _)| -> &str { k.get_ref() }).collect();
        let Some(first) = keys.first() else {
            return self.push(
                Diagnostic::error(span, "an empty table is not an instruction")
                    .with_help(r#"write e.g. { sync_nodes = "staged" }"#),
            );
        };
        let listed = keys
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut diagnostic = Diagnostic::error(
            span,
            format!(
                "an instruction is a table with exactly one key, its name; found {} keys: {listed}",
                keys.len()
            ),
        );
        // `{ sync_nodes = "x", timeout = "5s" }`: options belong in a nested table.
        if let Some(name) = keys.iter().find(|k| Instruction::NAMES.contains(*k)) {
            diagnostic = diagnostic.with_help(format!(
                "put the options of `{name}` in a nested table: {{ {name} = {{ … }} }}"
            ));
        } else if !Instruction::NAMES.contains(first) {
            diagnostic = diagnostic.with_help(format!(
                "known instructions: {}",
                Instruction::NAMES.join(", ")
            ));
        }
        self.push(diagnostic)
    }

    fn unknown_instruction(&mut self, name: &str, span: Span) -> Reported {
        let help = match suggest::instruction(name, &Instruction::NAMES) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!("known instructions: {}", Instruction::NAMES.join(", ")),
        };
        self.push(Diagnostic::error(span, format!("unknown instruction `{name}`")).with_help(help))
    }

    fn bare_instruction(&mut self, name: &str, span: Span) -> Parse<Instruction> {
        match name {
            "point_of_no_return" => Ok(Instruction::PointOfNoReturn),
            "restart_new_emulator" => Ok(Instruction::RestartNewEmulator),
            "install_release" => Ok(Instruction::InstallRelease { timeout: None }),
            "purge" => Ok(Instruction::Purge {
                targets: Vec::new(),
                brutal: false,
            }),
            known if Instruction::NAMES.contains(&known) => Err(self.push(
                Diagnostic::error(span, format!("`{known}` needs arguments"))
                    .with_help(format!("write e.g. {}", example(known, self.runtime))),
            )),
            unknown => Err(self.unknown_instruction(unknown, span)),
        }
    }

    /// Reports unknown options of an instruction's table form; an option of the other runtime
    /// gets a message saying so.
    fn options(&mut self, instruction: &str, table: &DeTable<'_>) {
        let runtime = self.runtime;
        let known = option_keys(instruction, runtime);
        let other = match runtime {
            Runtime::Process | Runtime::OtpRelease => Runtime::Beam,
            Runtime::Beam => Runtime::Process,
        };
        let other_keys = option_keys(instruction, other);
        for (key, _) in table.iter() {
            let key_name: &str = key.get_ref();
            if known.contains(&key_name) {
                continue;
            }
            let diagnostic = if other_keys.contains(&key_name) {
                Diagnostic::error(
                    span_of(key),
                    format!(
                        "`{key_name}` is an option of `{instruction}` in the {} runtime, but this \
                         script's runtime is {}",
                        other.as_str(),
                        runtime.as_str()
                    ),
                )
                .with_help(format!("`{instruction}` takes: {}", known.join(", ")))
            } else {
                let help = suggest::closest(key_name, known)
                    .map(|near| format!("did you mean `{near}`?"))
                    .unwrap_or_else(|| format!("`{instruction}` takes: {}", known.join(", ")));
                Diagnostic::error(
                    span_of(key),
                    format!("unknown option `{key_name}` for `{instruction}`"),
                )
                .with_help(help)
            };
            self.diagnostics.push(diagnostic);
        }
    }

    fn wrong_form(&mut self, instruction: &str, argument: &Value<'_>, expected: &str) -> Reported {
        self.push(
            Diagnostic::error(
                span_of(argument),
                format!(
                    "`{instruction}` takes {expected}, found {}",
                    describe(argument.get_ref())
                ),
            )
            .with_help(format!("write e.g. {}", example(instruction, self.runtime))),
        )
    }

    /// Short form (`"x"` / `["x", "y"]`) or table form with the list under `key`; returns the
    /// list and, for the table form, the table (for the instruction's other options).
    fn targets<'a, 'i>(
        &mut self,
        instruction: &str,
        argument: &'a Value<'i>,
        key: &str,
        noun: &str,
        required: bool,
    ) -> (Parse<Vec<Located<String>>>, Option<&'a DeTable<'i>>) {
        let what = format!("`{instruction}`");
        match argument.get_ref() {
            DeValue::String(_) | DeValue::Array(_) => {
                (self.names(argument, &what, noun, true), None)
            }
            DeValue::Table(table) => {
                self.options(instruction, table);
                let what = format!("`{key}` of `{instruction}`");
                let targets = match table.get(key) {
                    Some(list) => self.names(list, &what, noun, true),
                    None if required => {
                        Err(self.error(span_of(argument), format!("`{instruction}` needs `{key}`")))
                    }
                    None => Ok(Vec::new()),
                };
                (targets, Some(table))
            }
            _ => (
                Err(self.wrong_form(
                    instruction,
                    argument,
                    &format!("a {noun}, an array of {noun}s or a table"),
                )),
                None,
            ),
        }
    }

    /// The `timeout` option of an instruction's table form.
    fn timeout(
        &mut self,
        instruction: &str,
        table: Option<&DeTable<'_>>,
    ) -> Parse<Option<Duration>> {
        match table {
            Some(table) => self.optional(table, "timeout", |p, v| {
                p.duration(v, &format!("`timeout` of `{instruction}`"))
            }),
            None => Ok(None),
        }
    }

    fn extra(&mut self, instruction: &str, table: Option<&DeTable<'_>>) -> Parse<Option<String>> {
        match table {
            Some(table) => self
                .optional(table, "extra", |p, v| {
                    p.string(v, &format!("`extra` of `{instruction}`"))
                })
                .map(|extra| extra.map(|e| e.value)),
            None => Ok(None),
        }
    }

    fn args(&mut self, instruction: &str, table: Option<&DeTable<'_>>) -> Parse<Vec<String>> {
        match table {
            Some(table) => self
                .optional(table, "args", |p, v| {
                    p.arguments(v, &format!("`args` of `{instruction}`"))
                })
                .map(Option::unwrap_or_default),
            None => Ok(Vec::new()),
        }
    }

    /// Short form `"name"` or table form with the name under `key` (plus other options).
    fn single<'a, 'i>(
        &mut self,
        instruction: &str,
        argument: &'a Value<'i>,
        key: &str,
        noun: &str,
    ) -> (Parse<Located<String>>, Option<&'a DeTable<'i>>) {
        match argument.get_ref() {
            DeValue::String(_) => (self.name(argument, &format!("`{instruction}`")), None),
            DeValue::Table(table) => {
                self.options(instruction, table);
                let name = self
                    .required(
                        table,
                        key,
                        span_of(argument),
                        &format!("for `{instruction}`"),
                    )
                    .and_then(|v| self.name(v, &format!("`{key}` of `{instruction}`")));
                (name, Some(table))
            }
            _ => (
                Err(self.wrong_form(instruction, argument, &format!("a {noun} or a table"))),
                None,
            ),
        }
    }

    fn instruction(
        &mut self,
        name: &str,
        name_span: Span,
        argument: &Value<'_>,
    ) -> Parse<Instruction> {
        let beam = self.runtime == Runtime::Beam;
        match name {
            "load_object_code" => {
                let (artifacts, _) = self.targets(name, argument, "artifacts", "artifact", true);
                Ok(Instruction::LoadObjectCode {
                    artifacts: artifacts?,
                })
            }
            "check" if beam => {
                let (modules, table) = self.targets(name, argument, "modules", "module", true);
                let timeout = self.timeout(name, table);
                Ok(Instruction::Check {
                    hook: None,
                    args: Vec::new(),
                    modules: modules?,
                    timeout: timeout?,
                })
            }
            "check" => {
                let (hook, table) = self.single(name, argument, "hook", "hook name");
                let args = self.args(name, table);
                let timeout = self.timeout(name, table);
                Ok(Instruction::Check {
                    hook: Some(hook?),
                    args: args?,
                    modules: Vec::new(),
                    timeout: timeout?,
                })
            }
            "sync_nodes" => {
                let (id, table) = self.single(name, argument, "id", "barrier id");
                let timeout = self.timeout(name, table);
                let nodes = match table {
                    Some(table) => self.optional(table, "nodes", |p, v| {
                        p.names(v, "`nodes` of `sync_nodes`", "node", false)
                    }),
                    None => Ok(None),
                };
                Ok(Instruction::SyncNodes {
                    id: id?,
                    timeout: timeout?,
                    nodes: nodes?
                        .unwrap_or_default()
                        .into_iter()
                        .map(|n| n.value)
                        .collect(),
                })
            }
            "suspend" => {
                let (key, noun) = if beam {
                    ("modules", "module")
                } else {
                    ("services", "service")
                };
                let (targets, table) = self.targets(name, argument, key, noun, true);
                let timeout = self.timeout(name, table);
                Ok(Instruction::Suspend {
                    targets: targets?,
                    timeout: timeout?,
                })
            }
            "load" if beam => {
                let (modules, _) = self.targets(name, argument, "modules", "module", true);
                Ok(Instruction::Load { targets: modules? })
            }
            "load" => {
                if matches!(argument.get_ref(), DeValue::Array(_)) {
                    return Err(self.wrong_form(name, argument, "the app name (process runtime)"));
                }
                let (app, _) = self.single(name, argument, "app", "app name");
                Ok(Instruction::Load {
                    targets: vec![app?],
                })
            }
            "code_change" if beam => {
                let (modules, table) = self.targets(name, argument, "modules", "module", true);
                let extra = self.extra(name, table);
                let mode = match table {
                    Some(table) => self.optional(table, "mode", Self::change_mode),
                    None => Ok(None),
                };
                let timeout = self.timeout(name, table);
                Ok(Instruction::CodeChange {
                    targets: modules?,
                    extra: extra?,
                    mode: mode?.unwrap_or(ChangeMode::Up),
                    timeout: timeout?,
                })
            }
            "code_change" => {
                if matches!(argument.get_ref(), DeValue::Array(_)) {
                    return Err(self.wrong_form(
                        name,
                        argument,
                        "one service (process runtime): write one code_change per service",
                    ));
                }
                let (service, table) = self.single(name, argument, "service", "service name");
                let extra = self.extra(name, table);
                let timeout = self.timeout(name, table);
                Ok(Instruction::CodeChange {
                    targets: vec![service?],
                    extra: extra?,
                    mode: ChangeMode::Up,
                    timeout: timeout?,
                })
            }
            "resume" => {
                let (key, noun) = if beam {
                    ("modules", "module")
                } else {
                    ("services", "service")
                };
                let (targets, _) = self.targets(name, argument, key, noun, true);
                Ok(Instruction::Resume { targets: targets? })
            }
            "stop" | "start" | "restart" => {
                let noun = if beam { "child" } else { "service" };
                let (targets, _) = self.targets(name, argument, "services", noun, true);
                let targets = targets?;
                Ok(match name {
                    "stop" => Instruction::Stop { targets },
                    "start" => Instruction::Start { targets },
                    _ => Instruction::Restart { targets },
                })
            }
            "apply" => {
                let (key, noun) = if beam {
                    ("mfa", "MFA")
                } else {
                    ("hook", "hook name")
                };
                let (hook, table) = self.single(name, argument, key, noun);
                let args = self.args(name, table);
                let timeout = self.timeout(name, table);
                Ok(Instruction::Apply {
                    hook: hook?,
                    args: args?,
                    timeout: timeout?,
                })
            }
            "health" => {
                let (service, table) = self.single(name, argument, "service", "service name");
                let timeout = self.timeout(name, table);
                Ok(Instruction::Health {
                    service: service?,
                    timeout: timeout?,
                })
            }
            "purge" => self.purge(argument),
            "gate" => {
                let DeValue::Table(table) = argument.get_ref() else {
                    return Err(self.wrong_form(name, argument, "a table"));
                };
                self.options(name, table);
                let gate = self.gate_spec(table, span_of(argument), "for `gate`", "`gate`")?;
                Ok(Instruction::Gate { gate })
            }
            "unpack_release" => {
                let (artifact, table) = self.single(name, argument, "artifact", "artifact name");
                let timeout = self.timeout(name, table);
                Ok(Instruction::UnpackRelease {
                    artifact: artifact?,
                    timeout: timeout?,
                })
            }
            "install_release" => {
                let DeValue::Table(table) = argument.get_ref() else {
                    return Err(self.wrong_form(name, argument, "a table of options"));
                };
                self.options(name, table);
                let timeout = self.timeout(name, Some(table));
                Ok(Instruction::InstallRelease { timeout: timeout? })
            }
            "point_of_no_return" | "restart_new_emulator" => Err(self.push(
                Diagnostic::error(name_span, format!("`{name}` takes no arguments")).with_help(
                    format!("write the bare string \"{name}\" as the instruction"),
                ),
            )),
            unknown => Err(self.unknown_instruction(unknown, name_span)),
        }
    }

    fn change_mode(&mut self, value: &Value<'_>) -> Parse<ChangeMode> {
        let mode = self.string(value, "`mode` of `code_change`")?;
        match mode.value.as_str() {
            "up" => Ok(ChangeMode::Up),
            "down" => Ok(ChangeMode::Down),
            other => Err(self.error(
                mode.span,
                format!("`mode` of `code_change` must be \"up\" or \"down\", found \"{other}\""),
            )),
        }
    }

    fn purge(&mut self, argument: &Value<'_>) -> Parse<Instruction> {
        const NAME: &str = "purge";
        if self.runtime == Runtime::Beam {
            let (modules, table) = self.targets(NAME, argument, "modules", "module", false);
            let brutal = match table {
                Some(table) => {
                    self.optional(table, "brutal", |p, v| p.boolean(v, "`brutal` of `purge`"))
                }
                None => Ok(None),
            };
            return Ok(Instruction::Purge {
                targets: modules?,
                brutal: brutal?.unwrap_or(false),
            });
        }
        let DeValue::Table(table) = argument.get_ref() else {
            let (releases, _) = self.targets(NAME, argument, "releases", "release", true);
            return Ok(Instruction::Purge {
                targets: releases?,
                brutal: false,
            });
        };
        self.options(NAME, table);
        let targets = match table.get("releases") {
            None => Vec::new(),
            Some(releases) => match releases.get_ref() {
                // `releases = true`: every old release, like the bare form.
                DeValue::Boolean(true) => Vec::new(),
                DeValue::Boolean(false) => {
                    return Err(self.push(
                        Diagnostic::error(span_of(releases), "`releases = false` purges nothing")
                            .with_help("remove the `purge` instruction instead"),
                    ));
                }
                _ => self.names(releases, "`releases` of `purge`", "release", true)?,
            },
        };
        Ok(Instruction::Purge {
            targets,
            brutal: false,
        })
    }
}
