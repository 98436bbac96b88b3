//! Property tests: `parse` never panics, and every diagnostic's span lies inside the source,
//! for random bytes and for random mutations of valid scripts. Rendering, `validate_against` and
//! `plan::compile` are exercised on the results too.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use hotroll_script::{Declared, Diagnostic, parse, plan, validate_against};
use proptest::prelude::*;

const EXAMPLES: [&str; 3] = [
    include_str!("../../deploy/examples/hot-upgrade.toml"),
    include_str!("../../deploy/examples/restart-upgrade.toml"),
    include_str!("../../deploy/examples/erlang-module-upgrade.toml"),
];

/// A beam script with an explicit `down` list, to reach more code paths than the examples.
const EXTRA: &str = r#"app = "counter"
runtime = "beam"
from = "1.0.0"
to = "1.1.0"
[[artifacts]]
name = "counter_server.beam"
source = "b"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
mode = 0o644
[rollout]
select = { zone = "a" }
[script]
up = [
  { load_object_code = { artifacts = ["counter_server.beam"] } },
  { check = { modules = ["counter_server"], timeout = "5s" } },
  { sync_nodes = { id = "staged", timeout = "20s", nodes = ["n1"] } },
  "point_of_no_return",
  { suspend = { modules = ["counter_server"], timeout = "1s" } },
  { load = { modules = ["counter_server"] } },
  { code_change = { modules = ["counter_server"], extra = "x", mode = "up" } },
  { resume = ["counter_server"] },
  { apply = { mfa = "counter_server:f/1", args = ["a"] } },
  { purge = { modules = ["counter_server"], brutal = true } },
]
down = [
  { stop = "counter_sup" },
  { start = "counter_sup" },
]
"#;

fn assert_spans_inside(source: &str, items: &[Diagnostic]) {
    for d in items {
        assert!(
            d.span.start <= d.span.end && d.span.end <= source.len(),
            "span {:?} outside a source of {} bytes: {}",
            d.span,
            source.len(),
            d.message
        );
    }
}

fn check(source: &str) {
    match parse("fuzz.toml", source) {
        Ok(parsed) => {
            assert_spans_inside(source, &parsed.warnings);
            let declared = Declared::default().with_all_instructions();
            assert_spans_inside(source, &validate_against(&parsed.script, &declared));
            let compiled = plan::compile(&parsed.script, 7);
            let _ = compiled.to_string();
        }
        Err(diagnostics) => {
            assert!(diagnostics.has_errors());
            assert_spans_inside(source, &diagnostics.items);
            #[cfg(feature = "render")]
            let _ = diagnostics.render(false);
        }
    }
    let (_, diagnostics) = hotroll_script::parse_partial("fuzz.toml", source);
    assert_spans_inside(source, &diagnostics.items);
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, char),
    Delete(usize),
    Replace(usize, char),
    DropLine(usize),
    DuplicateLine(usize),
}

fn interesting_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(vec![
            '"', '\'', '[', ']', '{', '}', '=', ',', '\n', '#', '.', '-', '0', '9', 's', 'h', 'm',
            '\\', ' ', '_', '/', 'é',
        ]),
        1 => any::<char>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), interesting_char()).prop_map(|(at, c)| Mutation::Insert(at, c)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), interesting_char()).prop_map(|(at, c)| Mutation::Replace(at, c)),
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
    ]
}

/// The char boundary at or before the `at`-th position (modulo the length).
fn boundary(text: &str, at: usize) -> usize {
    let chars: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    chars[at % chars.len()]
}

fn apply(text: &mut String, mutation: &Mutation) {
    match *mutation {
        Mutation::Insert(at, c) => {
            let at = boundary(text, at);
            text.insert(at, c);
        }
        Mutation::Delete(at) | Mutation::Replace(at, _) => {
            if text.is_empty() {
                return;
            }
            let at = boundary(text, at);
            if at < text.len() {
                text.remove(at);
                if let Mutation::Replace(_, c) = mutation {
                    text.insert(at, *c);
                }
            }
        }
        Mutation::DropLine(line) | Mutation::DuplicateLine(line) => {
            let mut lines: Vec<&str> = text.split('\n').collect();
            let index = line % lines.len();
            if matches!(mutation, Mutation::DropLine(_)) {
                lines.remove(index);
            } else {
                lines.insert(index, lines[index]);
            }
            *text = lines.join("\n");
        }
    }
}

fn base() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![EXAMPLES[0], EXAMPLES[1], EXAMPLES[2], EXTRA])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_toml_like_text_never_panics(chars in prop::collection::vec(interesting_char(), 0..200)) {
        check(&chars.into_iter().collect::<String>());
    }

    #[test]
    fn mutated_scripts_never_panic(
        base in base(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let mut text = base.to_string();
        for m in &mutations {
            apply(&mut text, m);
        }
        check(&text);
    }
}

#[test]
fn the_unmutated_bases_are_valid() {
    for source in EXAMPLES.iter().chain([&EXTRA]) {
        if let Err(d) = parse("base.toml", source) {
            panic!("{d}");
        }
    }
}
