//! Resident memory and CPU time of a process, from `/proc/<pid>/{status,stat}`.

use anyhow::{Context, bail};

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which the kernel's ABI fixes
/// at 100 on Linux whatever the kernel's internal HZ.
const USER_HZ: f64 = 100.0;

/// Resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest
                .split_whitespace()
                .next()
                .with_context(|| format!("{path}: empty VmRSS"))?;
            return kib
                .parse()
                .with_context(|| format!("{path}: bad VmRSS `{kib}`"));
        }
    }
    bail!("{path} has no VmRSS line")
}

/// User + system CPU time of the whole process (every thread, including exited ones), seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: count from after it.
    let after = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .with_context(|| format!("{path}: no `)`"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), 1-based over the whole line; `after` starts at field 3.
    let tick = |n: usize| -> anyhow::Result<f64> {
        let raw = fields
            .get(n - 3)
            .with_context(|| format!("{path}: too few fields"))?;
        let ticks: u64 = raw
            .parse()
            .with_context(|| format!("{path}: bad field {n} `{raw}`"))?;
        Ok(ticks as f64 / USER_HZ)
    };
    Ok(tick(14)? + tick(15)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        // Burn a little CPU so the counter is not trivially zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        assert!(x != 1);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
