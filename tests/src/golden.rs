//! Comparing `hotroll rollout watch` lines (stdout not a terminal) with a golden file.
//!
//! Each line is `<UTC time>  <who> <what>` where `who` is `rollout` or a node name. Before the
//! comparison, [`mask`] replaces what changes from run to run: the timestamp (`<time>`),
//! durations in parentheses (`(<duration>)`) and barrier arrival counts (`(?/3 arrived)`,
//! which depend on the order in which nodes arrive).
//!
//! The nodes of a rollout run concurrently, so how their lines interleave differs between
//! runs. [`compare`] therefore checks that the masked output has exactly the golden lines, and
//! that each lane (the rollout's own lines, and each node's) is in the golden order: what any
//! one node did, and what the rollout decided, must match line for line.

use std::collections::BTreeMap;

/// The masked form of one watch line.
pub fn mask_line(line: &str) -> String {
    let mut out = line.to_string();
    // `2026-03-21T14:05:09.042Z  ` at the start.
    if out.len() >= 24
        && out.as_bytes().get(23) == Some(&b'Z')
        && out.as_bytes().get(10) == Some(&b'T')
    {
        out.replace_range(..24, "<time>");
    }
    // `(15 ms)`, `(1.2 s)`, `(4m05s)`, `(2h03m)`.
    let mut masked = String::new();
    let mut rest = out.as_str();
    while let Some(open) = rest.find('(') {
        let (before, after) = rest.split_at(open);
        masked.push_str(before);
        match after.find(')') {
            Some(close) if is_duration(&after[1..close]) => {
                masked.push_str("(<duration>)");
                rest = &after[close + 1..];
            }
            Some(close) if after[1..close].ends_with(" arrived") => {
                let inner = &after[1..close];
                let expected = inner
                    .split_once('/')
                    .map_or("", |(_, e)| e.trim_end_matches(" arrived"));
                masked.push_str(&format!("(?/{expected} arrived)"));
                rest = &after[close + 1..];
            }
            _ => {
                masked.push('(');
                rest = &after[1..];
            }
        }
    }
    masked.push_str(rest);
    masked
}

fn is_duration(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    if let Some(n) = s.strip_suffix(" ms").or_else(|| s.strip_suffix(" s")) {
        return digits(n);
    }
    let compact = s.chars().all(|c| c.is_ascii_digit() || "hms".contains(c));
    compact && (s.ends_with('s') || s.ends_with('m')) && s.chars().any(|c| c.is_ascii_digit())
}

/// Mask every line of `text` (empty lines dropped).
pub fn mask(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(mask_line)
        .collect()
}

/// The lane of a masked line: `rollout` or the node name.
pub fn lane(line: &str) -> &str {
    line.trim_start_matches("<time>")
        .split_whitespace()
        .next()
        .unwrap_or_default()
}

fn lanes(lines: &[String]) -> BTreeMap<&str, Vec<&str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in lines {
        out.entry(lane(line)).or_default().push(line);
    }
    out
}

/// Compare masked `actual` lines with `golden` (see the module docs); the error shows both.
pub fn compare(actual: &[String], golden: &[String]) -> Result<(), String> {
    let report = |why: String| {
        Err(format!(
            "{why}\n--- actual (masked)\n{}\n--- golden\n{}",
            actual.join("\n"),
            golden.join("\n")
        ))
    };
    let mut a = actual.to_vec();
    let mut g = golden.to_vec();
    a.sort();
    g.sort();
    if a != g {
        let missing: Vec<_> = g.iter().filter(|l| !a.contains(l)).collect();
        let extra: Vec<_> = a.iter().filter(|l| !g.contains(l)).collect();
        return report(format!(
            "the lines differ; missing: {missing:#?}\nunexpected: {extra:#?}"
        ));
    }
    let (la, lg) = (lanes(actual), lanes(golden));
    for (name, golden_lane) in &lg {
        let actual_lane = la.get(name).cloned().unwrap_or_default();
        if &actual_lane != golden_lane {
            return report(format!(
                "lane `{name}` is out of order:\n{}\nexpected:\n{}",
                actual_lane.join("\n"),
                golden_lane.join("\n")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_masked() {
        assert_eq!(
            mask_line("2026-11-21T20:42:56.152Z  node-1     step 1 check ok (5 ms)"),
            "<time>  node-1     step 1 check ok (<duration>)"
        );
        assert_eq!(
            mask_line("2026-11-21T20:42:56.152Z  node-1     step 4 apply ok (1.2 s)"),
            "<time>  node-1     step 4 apply ok (<duration>)"
        );
        assert_eq!(
            mask_line(
                "2026-11-21T20:42:56.154Z  node-2     arrived at barrier `staged` (1/3 arrived)"
            ),
            "<time>  node-2     arrived at barrier `staged` (?/3 arrived)"
        );
        assert_eq!(
            mask_line("x (not a duration) 4m05s"),
            "x (not a duration) 4m05s"
        );
        assert_eq!(mask_line("(4m05s)"), "(<duration>)");
    }

    #[test]
    fn interleaving_of_lanes_is_free_but_each_lane_is_ordered() {
        let golden: Vec<String> = ["<time>a x", "<time>b x", "<time>a y", "<time>rollout z"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let shuffled: Vec<String> = ["<time>b x", "<time>a x", "<time>rollout z", "<time>a y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(compare(&shuffled, &golden).is_ok());
        let reordered: Vec<String> = ["<time>a y", "<time>b x", "<time>a x", "<time>rollout z"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(compare(&reordered, &golden).is_err());
        assert!(compare(&golden[..3], &golden).is_err());
    }
}
