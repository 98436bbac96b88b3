//! Drawing a [`View`] as lines of text for the terminal: a header, a progress bar and one row
//! per node. Pure: the caller passes the time and the terminal's size, and writes the lines.

use hotroll_proto::v1 as pb;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::text::format_duration_ms;
use super::view::{NodeRow, View};
use crate::states::{node_state_name, rollout_state_name};

/// How a piece of text is emphasised on a colour terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Bold,
    Good,
    Bad,
    Warn,
    Busy,
    Dim,
}

/// A run of text with one tone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub text: String,
    pub tone: Tone,
}

/// One line of the view.
pub type Line = Vec<Span>;

fn span(text: impl Into<String>, tone: Tone) -> Span {
    Span {
        text: text.into(),
        tone,
    }
}

/// The line without styling.
pub fn plain(line: &[Span]) -> String {
    line.iter().map(|s| s.text.as_str()).collect()
}

/// The line with ANSI colours.
pub fn ansi(line: &[Span]) -> String {
    use crossterm::style::Stylize;
    line.iter()
        .map(|s| match s.tone {
            Tone::Plain => s.text.clone(),
            Tone::Bold => s.text.as_str().bold().to_string(),
            Tone::Good => s.text.as_str().green().to_string(),
            Tone::Bad => s.text.as_str().red().bold().to_string(),
            Tone::Warn => s.text.as_str().yellow().to_string(),
            Tone::Busy => s.text.as_str().cyan().to_string(),
            Tone::Dim => s.text.as_str().dark_grey().to_string(),
        })
        .collect()
}

/// Cut `line` to at most `width` columns (an ellipsis marks the cut), so it never wraps.
pub fn fit(line: Line, width: usize) -> Line {
    let total: usize = line.iter().map(|s| s.text.width()).sum();
    if total <= width {
        return line;
    }
    let budget = width.saturating_sub(1);
    let mut used = 0;
    let mut out = Vec::new();
    for s in line {
        if used >= budget {
            break;
        }
        let mut text = String::new();
        for c in s.text.chars() {
            let w = c.width().unwrap_or(0);
            if used + w > budget {
                used = budget;
                break;
            }
            used += w;
            text.push(c);
        }
        out.push(Span { text, tone: s.tone });
    }
    if width > 0 {
        out.push(span("…", Tone::Dim));
    }
    out
}

pub fn rollout_tone(state: pb::RolloutState) -> Tone {
    match state {
        pb::RolloutState::Succeeded => Tone::Good,
        pb::RolloutState::Paused => Tone::Warn,
        pb::RolloutState::Preparing | pb::RolloutState::Committing => Tone::Busy,
        pb::RolloutState::Pending | pb::RolloutState::Unspecified => Tone::Plain,
        _ => Tone::Bad,
    }
}

fn node_tone(state: pb::NodeState) -> Tone {
    match state {
        pb::NodeState::Committed | pb::NodeState::Permanent => Tone::Good,
        pb::NodeState::Failed | pb::NodeState::RolledBack | pb::NodeState::Aborted => Tone::Bad,
        pb::NodeState::RollingBack => Tone::Warn,
        pb::NodeState::Preparing | pb::NodeState::Committing => Tone::Busy,
        _ => Tone::Plain,
    }
}

/// `[#######.......]` of `width` cells for `done` of `total`.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = done
        .saturating_mul(width as u64)
        .checked_div(total)
        .map_or(0, |f| usize::try_from(f).unwrap_or(width))
        .min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn pad(text: &str, width: usize) -> String {
    let w = text.width();
    if w >= width {
        text.to_string()
    } else {
        format!("{text}{}", " ".repeat(width - w))
    }
}

/// Cells of one node row: name, wave, state, step, time in it, error.
fn row_cells(node: &NodeRow, steps_total: u32, now_ms: u64) -> [String; 6] {
    let step = match node.step {
        Some(i) if steps_total > 0 => format!("{}/{steps_total} {}", i + 1, node.instruction),
        Some(i) => format!("{} {}", i + 1, node.instruction),
        None => "-".to_string(),
    };
    let time = match node.step_started_ms {
        Some(started) if node.is_busy() => format_duration_ms(now_ms.saturating_sub(started)),
        _ => "-".to_string(),
    };
    [
        node.name.clone(),
        if node.wave > 0 {
            node.wave.to_string()
        } else {
            "-".into()
        },
        node_state_name(node.state as i32).to_string(),
        step,
        time,
        node.error.clone().unwrap_or_default(),
    ]
}

/// Which nodes get a row when not all fit in `room` rows: the ones that are doing something
/// or went wrong first, then the rest in order; the last row then summarises the others.
fn pick_rows(view: &View, room: usize) -> (Vec<usize>, Option<String>) {
    let n = view.nodes.len();
    if n <= room {
        return ((0..n).collect(), None);
    }
    let shown = room.saturating_sub(1);
    let interesting = |node: &NodeRow| {
        node.is_busy()
            || node.error.is_some()
            || matches!(
                node.state,
                pb::NodeState::RollingBack | pb::NodeState::Failed | pb::NodeState::RolledBack
            )
    };
    let mut picked: Vec<usize> = (0..n)
        .filter(|&i| interesting(&view.nodes[i]))
        .take(shown)
        .collect();
    for i in 0..n {
        if picked.len() >= shown {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked.sort_unstable();
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for (i, node) in view.nodes.iter().enumerate() {
        if picked.contains(&i) {
            continue;
        }
        let name = node_state_name(node.state as i32);
        match counts.iter_mut().find(|(s, _)| *s == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    let hidden = n - picked.len();
    let summary = format!(
        "… {hidden} more node{}: {}",
        if hidden == 1 { "" } else { "s" },
        counts
            .iter()
            .map(|(s, c)| format!("{c} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    (picked, Some(summary))
}

/// The whole view as lines no wider than `width`, at most `height` of them (when the terminal
/// is too short, some node rows are summarised in one line).
pub fn render(view: &View, now_ms: u64, width: usize, height: usize) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::new();
    let end = view.finished_ms.unwrap_or(now_ms);
    let elapsed = end.saturating_sub(view.created_ms);

    lines.push(vec![
        span("rollout ", Tone::Plain),
        span(view.id.clone(), Tone::Bold),
        span(
            format!("  {} {} -> {}  ", view.app, view.from, view.to),
            Tone::Plain,
        ),
        span(
            rollout_state_name(view.state as i32),
            rollout_tone(view.state),
        ),
        span(
            format!("  elapsed {}", format_duration_ms(elapsed)),
            Tone::Plain,
        ),
    ]);

    let mut second = vec![
        span(
            if view.wave == 0 {
                format!("wave -/{} (prepare)", view.waves)
            } else {
                format!("wave {}/{}", view.wave, view.waves)
            },
            Tone::Plain,
        ),
        span("  failures ", Tone::Plain),
        span(
            format!("{}/{}", view.failures, view.max_failures),
            if view.failures > 0 {
                Tone::Bad
            } else {
                Tone::Plain
            },
        ),
    ];
    if let Some(b) = view.barriers.last() {
        second.push(span(
            format!("  barrier `{}`: {}/{} arrived", b.id, b.arrived, b.expected),
            Tone::Busy,
        ));
    }
    if let Some(note) = &view.operator {
        second.push(span(format!("  {note}"), Tone::Warn));
    }
    if let Some(held) = &view.held {
        second.push(span(format!("  held: {held}"), Tone::Bad));
    }
    if let Some(notice) = &view.notice {
        second.push(span(format!("  ({notice})"), Tone::Dim));
    }
    lines.push(second);

    let (done, total) = view.progress();
    let bar_width = width.saturating_sub(30).clamp(10, 50);
    let percent = (done * 100).checked_div(total).unwrap_or(0);
    lines.push(vec![
        span(bar(done, total, bar_width), rollout_tone(view.state)),
        span(
            format!("  {percent:>3}%  {done}/{total} instructions"),
            Tone::Plain,
        ),
    ]);
    lines.push(Vec::new());

    let footer: Vec<Line> = if view.is_final() {
        let mut line = vec![
            span("rollout ", Tone::Plain),
            span(
                rollout_state_name(view.state as i32),
                rollout_tone(view.state),
            ),
            span(
                format!(" after {}", format_duration_ms(elapsed)),
                Tone::Plain,
            ),
        ];
        if let Some(e) = &view.error {
            line.push(span(format!(": {e}"), Tone::Plain));
        }
        vec![Vec::new(), line]
    } else {
        Vec::new()
    };

    let room = height.saturating_sub(lines.len() + 1 + footer.len()).max(1);
    let (picked, summary) = pick_rows(view, room);
    let header = [
        "NODE".to_string(),
        "WAVE".into(),
        "STATE".into(),
        "STEP".into(),
        "TIME".into(),
        "ERROR".into(),
    ];
    let rows: Vec<(usize, [String; 6])> = picked
        .iter()
        .map(|&i| (i, row_cells(&view.nodes[i], view.steps_total, now_ms)))
        .collect();
    let mut widths = [0usize; 5];
    for (col, w) in widths.iter_mut().enumerate() {
        *w = rows
            .iter()
            .map(|(_, cells)| cells[col].width())
            .chain([header[col].width()])
            .max()
            .unwrap_or(0);
    }
    let mut header_line = String::new();
    for (col, w) in widths.iter().enumerate() {
        header_line.push_str(&pad(&header[col], *w));
        header_line.push_str("  ");
    }
    header_line.push_str(&header[5]);
    lines.push(vec![span(header_line, Tone::Dim)]);
    for (i, cells) in rows {
        let node = &view.nodes[i];
        let mut line = Vec::new();
        for (col, w) in widths.iter().enumerate() {
            let tone = if col == 2 {
                node_tone(node.state)
            } else {
                Tone::Plain
            };
            line.push(span(pad(&cells[col], *w), tone));
            line.push(span("  ", Tone::Plain));
        }
        if !cells[5].is_empty() {
            line.push(span(cells[5].clone(), Tone::Bad));
        }
        lines.push(line);
    }
    if let Some(summary) = summary {
        lines.push(vec![span(summary, Tone::Dim)]);
    }
    lines.extend(footer);
    lines
        .into_iter()
        .map(|line| {
            // Trailing spaces are noise on a terminal and in tests.
            let mut line = fit(line, width);
            while let Some(last) = line.last_mut() {
                let trimmed = last.text.trim_end().len();
                if trimmed == 0 {
                    line.pop();
                } else {
                    last.text.truncate(trimmed);
                    break;
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::view::tests::{T0, status, three_node_rollout};
    use super::*;

    fn screen(view: &View, now: u64, width: usize, height: usize) -> String {
        render(view, now, width, height)
            .iter()
            .map(|l| plain(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_view_mid_rollout() {
        let script = three_node_rollout();
        let mut view = View::new(&status(&[("node-1", 1), ("node-2", 2), ("node-3", 2)], 4));
        let upto = script
            .events
            .iter()
            .position(|e| e.kind == "step" && e.node == "node-1" && e.instruction == "apply")
            .unwrap();
        for e in &script.events[..=upto] {
            view.apply(e);
        }
        let expected = "\
rollout 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b  demo 1.0.0 -> 2.0.0  committing  elapsed 576 ms
wave 1/2  failures 0/1
[#############################.....................]   58%  7/12 instructions

NODE    WAVE  STATE       STEP                    TIME    ERROR
node-1  1     committing  4/4 apply               500 ms
node-2  2     prepared    3/4 point_of_no_return  513 ms
node-3  2     prepared    3/4 point_of_no_return  513 ms";
        assert_eq!(screen(&view, T0 + 576, 100, 40), expected);
    }

    #[test]
    fn the_view_at_the_end() {
        let script = three_node_rollout();
        let mut view = View::new(&status(&[("node-1", 1), ("node-2", 2), ("node-3", 2)], 4));
        for e in &script.events {
            view.apply(e);
        }
        view.failures = 1;
        let expected = "\
rollout 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b  demo 1.0.0 -> 2.0.0  partially_rolled_back  elapsed 2.1 s
wave 2/2  failures 1/1
[##################################################]  100%  12/12 instructions

NODE    WAVE  STATE        STEP       TIME  ERROR
node-1  1     committed    4/4 apply  -
node-2  2     committed    4/4 apply  -
node-3  2     rolled_back  4/4 apply  -     hook `apply` exited 1

rollout partially_rolled_back after 2.1 s: 1 node rolled back";
        // Time passing after the end changes nothing.
        assert_eq!(screen(&view, T0 + 99_000, 120, 40), expected);
    }

    #[test]
    fn narrow_and_short_terminals_get_cut_not_wrapped() {
        let script = three_node_rollout();
        let mut view = View::new(&status(&[("node-1", 1), ("node-2", 2), ("node-3", 2)], 4));
        for e in &script.events[..12] {
            view.apply(e);
        }
        let lines = render(&view, T0 + 30, 40, 7);
        assert!(lines.len() <= 7, "{lines:?}");
        for line in &lines {
            assert!(plain(line).width() <= 40, "{:?}", plain(line));
        }
        let text = screen(&view, T0 + 30, 40, 7);
        assert!(text.contains("more node"), "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with("barri…"), "{text}");
    }

    #[test]
    fn colours_are_only_added_on_request() {
        let line = vec![span("ok", Tone::Good), span(" plain", Tone::Plain)];
        assert_eq!(plain(&line), "ok plain");
        assert!(ansi(&line).contains('\u{1b}'));
        assert!(ansi(&line).ends_with(" plain"));
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        let line = vec![span("abcdef", Tone::Plain), span("ghij", Tone::Bad)];
        assert_eq!(plain(&fit(line.clone(), 20)), "abcdefghij");
        assert_eq!(plain(&fit(line.clone(), 8)), "abcdefg…");
        assert_eq!(plain(&fit(line, 4)), "abc…");
    }
}
