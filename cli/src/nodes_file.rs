//! The nodes file of `hotroll check --nodes-file`: the fleet a plan's waves are formed for,
//! as names with labels.
//!
//! ```toml
//! [[node]]
//! name = "node-1"
//! labels = { zone = "a", role = "miner" }
//! ```
//!
//! Errors carry `FILE:LINE:COL` like a script's (they are [`Diagnostics`]).

use std::collections::BTreeMap;

use hotroll_script::{Diagnostic, Diagnostics, Span};
use serde::Deserialize;
use toml::Spanned;

/// One node of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    node: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Spanned<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The nodes `source` lists, sorted by name as the coordinator orders its fleet; every
/// problem found otherwise.
pub fn parse(name: &str, source: &str) -> Result<Vec<FileNode>, Diagnostics> {
    let fail = |items: Vec<Diagnostic>| Diagnostics {
        name: name.to_string(),
        source: source.to_string(),
        items,
    };
    let file: File = toml::from_str(source).map_err(|error| {
        let span = error
            .span()
            .map(|r| Span::new(r.start, r.end))
            .unwrap_or_default();
        fail(vec![
            Diagnostic::error(span, error.message().to_string()).with_help(
                r#"a nodes file lists [[node]] tables: name = "node-1", labels = { zone = "a" }"#,
            ),
        ])
    })?;
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, Span> = BTreeMap::new();
    let mut nodes = Vec::new();
    for entry in file.node {
        let span = Span::new(entry.name.span().start, entry.name.span().end);
        let node_name = entry.name.into_inner();
        if node_name.is_empty() {
            problems.push(Diagnostic::error(span, "a node's `name` cannot be empty"));
        } else if seen.insert(node_name.clone(), span).is_some() {
            problems.push(Diagnostic::error(
                span,
                format!("node `{node_name}` is listed twice"),
            ));
        } else {
            nodes.push(FileNode {
                name: node_name,
                labels: entry.labels,
            });
        }
    }
    if nodes.is_empty() && problems.is_empty() {
        problems.push(
            Diagnostic::error(Span::default(), "the nodes file lists no node")
                .with_help(r#"add [[node]] tables: name = "node-1", labels = { zone = "a" }"#),
        );
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_labels_sorted_by_name() {
        let nodes = parse(
            "n.toml",
            "[[node]]\nname = \"b\"\nlabels = { zone = \"x\" }\n[[node]]\nname = \"a\"\n",
        )
        .unwrap_or_else(|d| panic!("{:?}", d.to_short_lines()));
        assert_eq!(
            nodes,
            vec![
                FileNode {
                    name: "a".into(),
                    labels: BTreeMap::new()
                },
                FileNode {
                    name: "b".into(),
                    labels: [("zone".to_string(), "x".to_string())].into()
                },
            ]
        );
    }

    #[test]
    fn a_name_twice_and_unknown_keys_are_errors_with_their_place() {
        let twice = parse("n.toml", "[[node]]\nname = \"a\"\n[[node]]\nname = \"a\"\n")
            .err()
            .map(|d| d.to_short_lines());
        assert_eq!(
            twice,
            Some(vec![
                "n.toml:4:8: error: node `a` is listed twice".to_string()
            ])
        );
        let unknown = parse("n.toml", "[[node]]\nname = \"a\"\nzone = \"x\"\n")
            .err()
            .map(|d| d.to_short_lines())
            .unwrap_or_default();
        assert!(
            unknown.len() == 1 && unknown[0].starts_with("n.toml:"),
            "{unknown:?}"
        );
    }
}
