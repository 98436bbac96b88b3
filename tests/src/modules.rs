//! The module graph of a crate, read from its sources, for the architecture test's "no import
//! cycles between modules" rule (ARCHITECTURE.md, invariants).
//!
//! A module is a file (`foo.rs`, `foo/mod.rs`) or an inline `mod name { .. }`; a reference is any
//! path that starts with `crate::` or `super::` (in a `use` tree or in code). An edge from module
//! `a` to module `b` is lifted to the two children of their lowest common ancestor that contain
//! them; a reference between a module and one of its ancestors or descendants does not count (a
//! parent declares its children and re-exports them; a child may use its parent's items). The
//! rule: in every module, the graph of its children is acyclic.
//!
//! This reads the source text, not the compiler's view: good enough for our own code, which
//! does not generate modules with macros.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A module path inside a crate (`["engine", "machine"]`); the crate root is empty.
pub type ModulePath = Vec<String>;

/// One reference that made an edge, for the message.
#[derive(Debug, Clone)]
pub struct Reference {
    pub file: PathBuf,
    pub line: usize,
    pub path: String,
}

/// A crate's modules and the lifted sibling edges between them.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    pub modules: BTreeSet<ModulePath>,
    /// (from, to) siblings → the references behind the edge.
    pub edges: BTreeMap<(ModulePath, ModulePath), Vec<Reference>>,
}

/// A cycle: its modules in order, each with one reference to the next.
#[derive(Debug)]
pub struct Cycle {
    pub modules: Vec<ModulePath>,
    pub references: Vec<Reference>,
}

impl std::fmt::Display for Cycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.modules.iter().map(display).collect();
        write!(f, "{} -> {}", names.join(" -> "), names[0])?;
        for r in &self.references {
            write!(f, "\n    {}:{}: {}", r.file.display(), r.line, r.path)?;
        }
        Ok(())
    }
}

fn display(module: &ModulePath) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

/// Read the crate whose root file is `root` (`src/lib.rs` or `src/main.rs`).
pub fn read_crate(root: &Path) -> anyhow::Result<ModuleGraph> {
    let mut sources = Vec::new();
    collect(root, Vec::new(), true, &mut sources)?;
    let mut graph = ModuleGraph::default();
    for source in &sources {
        for (module, _) in &source.inline {
            graph.modules.insert(module.clone());
        }
        graph.modules.insert(source.module.clone());
    }
    for source in &sources {
        for (line, from, path) in references(source) {
            let Some(target) = resolve(&graph.modules, &from, &path) else {
                continue;
            };
            let common = from.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == target.len() {
                continue;
            }
            let a = from[..=common].to_vec();
            let b = target[..=common].to_vec();
            graph.edges.entry((a, b)).or_default().push(Reference {
                file: source.file.clone(),
                line,
                path: path.join("::"),
            });
        }
    }
    Ok(graph)
}

impl ModuleGraph {
    /// Every cycle among siblings (one per strongly connected component of more than one).
    pub fn cycles(&self) -> Vec<Cycle> {
        let mut successors: BTreeMap<&ModulePath, BTreeSet<&ModulePath>> = BTreeMap::new();
        for (a, b) in self.edges.keys() {
            successors.entry(a).or_default().insert(b);
        }
        let mut cycles = Vec::new();
        for component in strongly_connected(&successors) {
            if component.len() < 2 {
                continue;
            }
            cycles.push(self.cycle_in(&component, &successors));
        }
        cycles
    }

    /// One concrete cycle through a component (a walk that returns to its start).
    fn cycle_in(
        &self,
        component: &BTreeSet<&ModulePath>,
        successors: &BTreeMap<&ModulePath, BTreeSet<&ModulePath>>,
    ) -> Cycle {
        let start = *component.iter().next().expect("non-empty component");
        // Breadth-first from `start` back to `start` inside the component.
        let mut previous: BTreeMap<&ModulePath, &ModulePath> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut end = None;
        while let Some(node) = queue.pop_front() {
            for next in successors.get(node).into_iter().flatten() {
                if !component.contains(next) {
                    continue;
                }
                if *next == start {
                    end = Some(node);
                    queue.clear();
                    break;
                }
                if !previous.contains_key(next) {
                    previous.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        let mut walk = vec![end.unwrap_or(start)];
        while let Some(prev) = previous.get(walk[walk.len() - 1]) {
            walk.push(prev);
        }
        walk.reverse();
        let modules: Vec<ModulePath> = walk.iter().map(|m| (*m).clone()).collect();
        let references = (0..modules.len())
            .filter_map(|i| {
                let key = (modules[i].clone(), modules[(i + 1) % modules.len()].clone());
                self.edges.get(&key).and_then(|refs| refs.first().cloned())
            })
            .collect();
        Cycle {
            modules,
            references,
        }
    }
}

/// Tarjan's algorithm, iteratively simple enough for a few hundred modules (recursive).
fn strongly_connected<'a>(
    successors: &BTreeMap<&'a ModulePath, BTreeSet<&'a ModulePath>>,
) -> Vec<BTreeSet<&'a ModulePath>> {
    struct State<'a> {
        index: usize,
        indices: BTreeMap<&'a ModulePath, usize>,
        low: BTreeMap<&'a ModulePath, usize>,
        stack: Vec<&'a ModulePath>,
        on_stack: BTreeSet<&'a ModulePath>,
        components: Vec<BTreeSet<&'a ModulePath>>,
    }
    fn visit<'a>(
        node: &'a ModulePath,
        successors: &BTreeMap<&'a ModulePath, BTreeSet<&'a ModulePath>>,
        s: &mut State<'a>,
    ) {
        s.indices.insert(node, s.index);
        s.low.insert(node, s.index);
        s.index += 1;
        s.stack.push(node);
        s.on_stack.insert(node);
        for next in successors.get(node).into_iter().flatten() {
            if !s.indices.contains_key(next) {
                visit(next, successors, s);
                let low = s.low[node].min(s.low[next]);
                s.low.insert(node, low);
            } else if s.on_stack.contains(next) {
                let low = s.low[node].min(s.indices[next]);
                s.low.insert(node, low);
            }
        }
        if s.low[node] == s.indices[node] {
            let mut component = BTreeSet::new();
            while let Some(top) = s.stack.pop() {
                s.on_stack.remove(top);
                component.insert(top);
                if top == node {
                    break;
                }
            }
            s.components.push(component);
        }
    }
    let mut state = State {
        index: 0,
        indices: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in successors.keys() {
        if !state.indices.contains_key(node) {
            visit(node, successors, &mut state);
        }
    }
    state.components
}

/// One source file: the module it is, and the inline modules inside it with their line spans.
struct Source {
    file: PathBuf,
    module: ModulePath,
    text: String,
    /// Inline modules: path and the byte range of their body.
    inline: Vec<(ModulePath, std::ops::Range<usize>)>,
}

/// Read `file` as `module`, then the files of the modules it declares.
fn collect(
    file: &Path,
    module: ModulePath,
    owns_dir: bool,
    out: &mut Vec<Source>,
) -> anyhow::Result<()> {
    let raw = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let text = strip(&raw);
    let dir = if owns_dir {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        file.parent().unwrap_or(Path::new(".")).join(stem)
    };
    let mut inline = Vec::new();
    let mut children = Vec::new();
    scan_mods(
        &text,
        0..text.len(),
        &module,
        &dir,
        &mut inline,
        &mut children,
    );
    out.push(Source {
        file: file.to_path_buf(),
        module,
        text,
        inline,
    });
    for (child, dir) in children {
        let name = child.last().cloned().unwrap_or_default();
        let flat = dir.join(format!("{name}.rs"));
        let nested = dir.join(&name).join("mod.rs");
        if flat.exists() {
            collect(&flat, child, false, out)?;
        } else if nested.exists() {
            collect(&nested, child, true, out)?;
        }
    }
    Ok(())
}

/// Find `mod name;` (a file module) and `mod name { .. }` (inline) in `range` of `text`.
fn scan_mods(
    text: &str,
    range: std::ops::Range<usize>,
    module: &ModulePath,
    dir: &Path,
    inline: &mut Vec<(ModulePath, std::ops::Range<usize>)>,
    files: &mut Vec<(ModulePath, PathBuf)>,
) {
    let bytes = text.as_bytes();
    let mut i = range.start;
    while let Some(found) = text[i..range.end].find("mod ") {
        let at = i + found;
        i = at + 4;
        if at > 0 && is_ident(bytes[at - 1]) {
            continue;
        }
        let name: String = text[i..range.end]
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        let after_name = i + text[i..].find(&name).unwrap_or(0) + name.len();
        let rest = text[after_name..range.end].trim_start();
        let mut child = module.clone();
        child.push(name.clone());
        if rest.starts_with(';') {
            files.push((child, dir.to_path_buf()));
        } else if rest.starts_with('{') {
            let open = after_name + text[after_name..].find('{').unwrap_or(0);
            let close = matching_brace(text, open).min(range.end);
            inline.push((child.clone(), open..close));
            let child_dir = dir.join(&name);
            scan_mods(text, open + 1..close, &child, &child_dir, inline, files);
            i = close;
        }
    }
}

fn matching_brace(text: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (offset, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + offset;
                }
            }
            _ => {}
        }
    }
    text.len()
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every `crate::..`/`super::..` path in a source, with its line and the module it is in.
fn references(source: &Source) -> Vec<(usize, ModulePath, Vec<String>)> {
    let text = &source.text;
    let mut out = Vec::new();
    for (start, path) in paths(text) {
        let module = source
            .inline
            .iter()
            .filter(|(_, range)| range.contains(&start))
            .max_by_key(|(m, _)| m.len())
            .map(|(m, _)| m.clone())
            .unwrap_or_else(|| source.module.clone());
        let line = text[..start].matches('\n').count() + 1;
        out.push((line, module, path));
    }
    out
}

/// Paths starting with `crate` or `super`, with `use` trees expanded.
fn paths(text: &str) -> Vec<(usize, Vec<String>)> {
    let tokens = tokenize(text);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (at, ref word) = tokens[i];
        let starts = (word == "crate" || word == "super")
            && (i == 0 || tokens[i - 1].1 != "::")
            && tokens.get(i + 1).is_some_and(|t| t.1 == "::");
        if starts {
            let (end, expanded) = use_tree(&tokens, i);
            for path in expanded {
                out.push((at, path));
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Expand the path (or `use` tree) starting at token `i`: returns the index after it and the
/// leaf paths.
fn use_tree(tokens: &[(usize, String)], mut i: usize) -> (usize, Vec<Vec<String>>) {
    let mut prefix = Vec::new();
    loop {
        match tokens.get(i).map(|t| t.1.as_str()) {
            Some("{") => {
                let mut paths = Vec::new();
                i += 1;
                loop {
                    match tokens.get(i).map(|t| t.1.as_str()) {
                        None => return (i, paths),
                        Some("}") => {
                            return (
                                i + 1,
                                paths
                                    .into_iter()
                                    .map(|p: Vec<String>| [prefix.clone(), p].concat())
                                    .collect(),
                            );
                        }
                        Some(",") => i += 1,
                        Some(_) => {
                            let (next, inner) = use_tree(tokens, i);
                            paths.extend(inner);
                            i = next.max(i + 1);
                        }
                    }
                }
            }
            Some(word) if word.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                if word != "self" {
                    prefix.push(word.to_string());
                }
                i += 1;
                if tokens.get(i).map(|t| t.1.as_str()) == Some("::") {
                    i += 1;
                } else {
                    return (i, vec![prefix]);
                }
            }
            _ => return (i, vec![prefix]),
        }
    }
}

/// Identifiers, `::`, and every other non-blank byte as a token of its own (paths end there).
fn tokenize(text: &str) -> Vec<(usize, String)> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_ident(b) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            tokens.push((start, text[start..i].to_string()));
        } else if b == b':' && bytes.get(i + 1) == Some(&b':') {
            tokens.push((i, "::".to_string()));
            i += 2;
        } else {
            if !b.is_ascii_whitespace() {
                tokens.push((i, (b as char).to_string()));
            }
            i += 1;
        }
    }
    tokens
}

/// The longest known module that `path` (from `from`) names.
fn resolve(
    modules: &BTreeSet<ModulePath>,
    from: &ModulePath,
    path: &[String],
) -> Option<ModulePath> {
    let mut base: ModulePath;
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base = Vec::new();
            rest = &rest[1..];
        }
        Some("super") => {
            base = from.clone();
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    for segment in rest {
        let mut next = base.clone();
        next.push(segment.clone());
        if modules.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

/// The text with comments, string and char literals blanked (same length, newlines kept).
fn strip(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = bytes.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                let end = raw[i..].find('\n').map_or(bytes.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = raw[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |n| i + 2 + n + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b'r' if (bytes.get(i + 1) == Some(&b'"') || bytes.get(i + 1) == Some(&b'#'))
                && (i == 0 || !is_ident(bytes[i - 1])) =>
            {
                let hashes = bytes[i + 1..].iter().take_while(|b| **b == b'#').count();
                if bytes.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                let end = raw[body..]
                    .find(&close)
                    .map_or(bytes.len(), |n| body + n + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != b'"' {
                    if bytes[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let end = (j + 1).min(bytes.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'\'' => {
                // A char literal ('a', '\n', '\u{..}'), not a lifetime ('a).
                let end = if bytes.get(i + 1) == Some(&b'\\') {
                    raw[i + 2..].find('\'').map(|n| i + 2 + n + 1)
                } else if bytes.get(i + 2) == Some(&b'\'') {
                    Some(i + 3)
                } else {
                    raw[i + 1..]
                        .char_indices()
                        .nth(1)
                        .filter(|(_, c)| *c == '\'')
                        .map(|(n, _)| i + 1 + n + 1)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end);
                        i = end;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_of(files: &[(&str, &str)]) -> ModuleGraph {
        let dir = tempfile::tempdir().expect("temp dir");
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
            std::fs::write(path, text).expect("write");
        }
        read_crate(&dir.path().join("lib.rs")).expect("read")
    }

    #[test]
    fn siblings_that_use_each_other_are_a_cycle() {
        let graph = graph_of(&[
            ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
            ("a.rs", "use crate::b::Thing;\n"),
            (
                "b.rs",
                "use crate::{c::{self, Other}};\n// crate::a::X in a comment\n",
            ),
            (
                "c.rs",
                "fn f() { super::a::g(); let s = \"crate::b::x\"; }\n",
            ),
        ]);
        let cycles = graph.cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].modules.len(), 3);
    }

    #[test]
    fn parents_and_children_and_one_way_siblings_are_not() {
        let graph = graph_of(&[
            ("lib.rs", "mod a;\nmod b;\nuse a::x;\n"),
            (
                "a/mod.rs",
                "mod inner;\npub use inner::X;\nuse crate::b::Y;\n",
            ),
            ("a/inner.rs", "use super::super::a::Z;\nuse crate::b::W;\n"),
            ("b.rs", "mod tests { use super::*; use crate::b::V; }\n"),
        ]);
        assert!(graph.cycles().is_empty(), "{:?}", graph.cycles());
        assert!(
            graph
                .edges
                .contains_key(&(vec!["a".into()], vec!["b".into()]))
        );
        assert!(
            graph
                .modules
                .contains(&vec!["b".to_string(), "tests".to_string()])
        );
    }
}
