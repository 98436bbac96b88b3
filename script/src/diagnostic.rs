//! Diagnostics with spans, rendered as `FILE:LINE:COL: message` plus a source snippet (miette).

use serde::Serialize;

use crate::model::Span;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub span: Span,
    /// Short text shown under the snippet, e.g. "first declared here".
    pub label: Option<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(span: Span, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
            span,
            label: None,
            help: None,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(span, message)
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// 1-based line and column (in characters) of byte offset `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let mut line = 1;
    let mut line_start = 0;
    for (i, b) in source.bytes().enumerate() {
        if i >= offset {
            break;
        }
        if b == b'\n' {
            line += 1;
            line_start = i + 1;
        }
    }
    // Count characters, not bytes; fall back to bytes if the offset is not a char boundary.
    let col = source
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count())
        + 1;
    (line, col)
}

/// Every diagnostic of one script, with the source they point into.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub name: String,
    pub source: String,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.is_error())
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    /// `FILE:LINE:COL: severity: message`, one line per diagnostic (no snippet).
    pub fn to_short_lines(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|d| render_short(&self.name, &self.source, d))
            .collect()
    }

    /// JSON-friendly records with resolved line and column.
    pub fn to_records(&self) -> Vec<DiagnosticRecord> {
        self.items
            .iter()
            .map(|d| DiagnosticRecord::new(&self.name, &self.source, d))
            .collect()
    }

    /// Full rendering: `FILE:LINE:COL: message` followed by miette's snippet for each item.
    /// Only with the `render` feature (the CLI): the daemons never draw terminal graphics.
    #[cfg(feature = "render")]
    pub fn render(&self, color: bool) -> String {
        self.items
            .iter()
            .map(|d| render_full(&self.name, &self.source, d, color))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in self.to_short_lines() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiagnosticRecord {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Byte offsets into the source, for editors.
    pub span: Span,
    pub severity: Severity,
    pub message: String,
    pub label: Option<String>,
    pub help: Option<String>,
}

impl DiagnosticRecord {
    pub fn new(name: &str, source: &str, d: &Diagnostic) -> Self {
        let (line, column) = line_col(source, d.span.start);
        Self {
            file: name.to_string(),
            line,
            column,
            span: d.span,
            severity: d.severity,
            message: d.message.clone(),
            label: d.label.clone(),
            help: d.help.clone(),
        }
    }
}

pub fn render_short(name: &str, source: &str, d: &Diagnostic) -> String {
    let (line, col) = line_col(source, d.span.start);
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    format!("{name}:{line}:{col}: {severity}: {}", d.message)
}

/// One diagnostic as miette sees it. `miette::Diagnostic` is implemented by hand because the
/// derive cannot take the severity from a field.
#[cfg(feature = "render")]
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct MietteView {
    message: String,
    src: miette::NamedSource<String>,
    at: miette::SourceSpan,
    label: Option<String>,
    help: Option<String>,
    severity: miette::Severity,
}

#[cfg(feature = "render")]
impl miette::Diagnostic for MietteView {
    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display + 'a>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.src)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let text = self.label.clone().unwrap_or_else(|| "here".to_string());
        Some(Box::new(std::iter::once(
            miette::LabeledSpan::new_with_span(Some(text), self.at),
        )))
    }
}

#[cfg(feature = "render")]
fn render_full(name: &str, source: &str, d: &Diagnostic, color: bool) -> String {
    let view = MietteView {
        message: render_short(name, source, d),
        src: miette::NamedSource::new(name, source.to_string()),
        at: {
            // Clamp so a span past the end still renders (miette refuses out-of-range spans).
            let start = d.span.start.min(source.len());
            let end = d.span.end.clamp(start, source.len());
            (start, end - start).into()
        },
        label: d.label.clone(),
        help: d.help.clone(),
        severity: match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        },
    };
    let theme = if color {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    };
    let handler = miette::GraphicalReportHandler::new_themed(theme).with_context_lines(1);
    let mut out = String::new();
    if handler.render_report(&mut out, &view).is_err() {
        return render_short(name, source, d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based_and_counts_chars() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        // 'é' is two bytes; the '=' after "bé " is the 4th character.
        assert_eq!(line_col(src, 10), (2, 4));
        assert_eq!(line_col(src, 10_000), (3, 1));
    }
}
