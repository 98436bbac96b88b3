//! Scraping `hotroll serve --metrics-listen` and reading the Prometheus (OpenMetrics) text.
//!
//! [`scrape`] sends `GET /metrics` over a plain TCP connection to 127.0.0.1 and [`Scrape::parse`]
//! checks the text line by line: `# HELP`/`# TYPE`/`# UNIT` lines, samples
//! `name{label="value",...} value`, every sample of a declared family, and the closing `# EOF`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail, ensure};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
}

/// `GET /metrics` from `addr`; the body, after checking the status and the content type.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to the metrics endpoint {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("reading the metrics response")?;
    let text = String::from_utf8(raw).context("the metrics response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in: {text}"))?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(status.contains(" 200 "), "metrics answered `{status}`");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type").then(|| v.trim())
        })
        .unwrap_or_default();
    ensure!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain"),
        "unexpected content type `{content_type}`"
    );
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked metrics responses are not read by this helper"
    );
    Ok(body.to_string())
}

/// [`fetch`] and [`Scrape::parse`].
pub fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    Scrape::parse(&fetch(addr, Duration::from_secs(5))?)
}

fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(labels);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        ensure!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name `{key}` in `{text}`"
        );
        ensure!(
            chars.next() == Some('"'),
            "label `{key}` has no quoted value"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => bail!("dangling escape in `{text}`"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => bail!("unterminated label value in `{text}`"),
            }
        }
        labels.insert(key, value);
    }
}

fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
        .iter()
        .find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            types.contains_key(base).then_some(base)
        })
}

impl Scrape {
    /// Parse the text format; fails on any line that is not well formed.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut scrape = Scrape::default();
        let mut eof = false;
        for (n, line) in text.lines().enumerate() {
            let at = || format!("line {}: `{line}`", n + 1);
            ensure!(!eof, "{}: text after # EOF", at());
            if line == "# EOF" {
                eof = true;
                continue;
            }
            if let Some(meta) = line.strip_prefix("# ") {
                let mut parts = meta.splitn(3, ' ');
                let kind = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default();
                let rest = parts.next().unwrap_or_default();
                match kind {
                    "TYPE" => {
                        ensure!(
                            [
                                "counter",
                                "gauge",
                                "histogram",
                                "summary",
                                "info",
                                "stateset",
                                "gaugehistogram",
                                "unknown",
                                "untyped"
                            ]
                            .contains(&rest),
                            "{}: unknown type",
                            at()
                        );
                        scrape.types.insert(name.to_string(), rest.to_string());
                    }
                    "HELP" | "UNIT" => {}
                    _ => bail!("{}: unknown comment", at()),
                }
                continue;
            }
            ensure!(!line.trim().is_empty(), "{}: empty line", at());
            let (key, value) = match line.find('}') {
                Some(close) => (&line[..=close], line[close + 1..].trim()),
                None => line
                    .split_once(' ')
                    .with_context(|| format!("{}: no value", at()))?,
            };
            let value = value.split(' ').next().unwrap_or_default();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("{}: bad value `{v}`", at()))?,
            };
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').unwrap_or(rest)).with_context(at)?,
                ),
                None => (key, BTreeMap::new()),
            };
            ensure!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{}: bad metric name",
                at()
            );
            ensure!(
                family_of(name, &scrape.types).is_some(),
                "{}: sample of an undeclared family",
                at()
            );
            scrape.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        ensure!(eof, "the text does not end with # EOF");
        Ok(scrape)
    }

    /// The value of the sample `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
            })
            .map(|s| s.value)
    }

    /// Like [`Scrape::value`], 0 when absent.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The sum over every sample `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_text_parses() {
        let text = "# HELP hotroll_rollouts Rollouts.\n# TYPE hotroll_rollouts gauge\n\
                    hotroll_rollouts{state=\"succeeded\"} 2\n\
                    # TYPE hotroll_bytes counter\nhotroll_bytes_total 10\n\
                    # TYPE h histogram\nh_bucket{le=\"0.5\",x=\"a\\\"b\"} 1\nh_bucket{le=\"+Inf\",x=\"a\\\"b\"} 2\n\
                    h_sum{x=\"a\\\"b\"} 0.7\nh_count{x=\"a\\\"b\"} 2\n# EOF\n";
        let scrape = Scrape::parse(text).unwrap();
        assert_eq!(
            scrape.value("hotroll_rollouts", &[("state", "succeeded")]),
            Some(2.0)
        );
        assert_eq!(scrape.value("hotroll_bytes_total", &[]), Some(10.0));
        assert_eq!(scrape.value("h_count", &[("x", "a\"b")]), Some(2.0));
        assert_eq!(scrape.sum("h_bucket"), 3.0);
    }

    #[test]
    fn malformed_text_is_refused() {
        assert!(Scrape::parse("x 1\n# EOF\n").is_err(), "undeclared family");
        assert!(Scrape::parse("# TYPE x gauge\nx one\n# EOF\n").is_err());
        assert!(Scrape::parse("# TYPE x gauge\nx 1\n").is_err(), "no EOF");
        assert!(Scrape::parse("# TYPE x gauge\nx{a=\"1} 1\n# EOF\n").is_err());
    }
}
