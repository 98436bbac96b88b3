//! `hotroll plan release --tar NEW.tar.gz [--from VSN] [--app NAME] [-o FILE]`: the script of
//! an OTP release upgrade from the tarball `rebar3 as prod relup` + `rebar3 as prod tar` made
//! (read with `hotroll-otp-release`), and what the relup will do on each node: its low-level
//! instructions for every UpFrom version (load_object_code, point_of_no_return,
//! suspend/load/code_change/resume, restart_new_emulator meaning a node restart).
//!
//! The script goes to FILE (the instructions to stdout) or, without `-o`, to stdout (the
//! instructions to stderr). A package `hotroll check` would refuse exits 2 with what is wrong,
//! and no script is written.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use hotroll_otp_release::{check_tarball, describe, read_tarball, release_of, relup};

#[derive(Debug, Clone, clap::Args)]
pub struct ReleaseArgs {
    /// The new release's tarball (`_build/prod/rel/<rel>/<rel>-<vsn>.tar.gz`).
    #[arg(long, value_name = "NEW.tar.gz")]
    pub tar: PathBuf,
    /// The version the fleet runs (default: the relup's UpFrom, when it has exactly one).
    #[arg(long, value_name = "VSN")]
    pub from: Option<String>,
    /// The app name in the script and in agent.toml's `[[release]]` (default: the release's).
    #[arg(long)]
    pub app: Option<String>,
    /// Where to write the script (default: stdout).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: &ReleaseArgs) -> anyhow::Result<u8> {
    let tarball =
        read_tarball(&args.tar).with_context(|| format!("cannot read {}", args.tar.display()))?;
    let (name, to) = release_of(&tarball).with_context(|| {
        format!(
            "{} holds no releases/<vsn>/<rel>.rel: not a release package",
            args.tar.display()
        )
    })?;
    let relup = relup(&tarball, &to).with_context(|| {
        format!(
            "{}: the release cannot be upgraded to in place (build it with `rebar3 as prod relup` before `rebar3 as prod tar`)",
            args.tar.display()
        )
    })?;
    let froms = relup.froms();
    let from = match (&args.from, froms.as_slice()) {
        (Some(from), _) => from.clone(),
        (None, [only]) => only.clone(),
        (None, _) => bail!(
            "the relup of {to} upgrades from {}: say which with --from",
            if froms.is_empty() {
                "nothing".to_string()
            } else {
                froms.join(", ")
            }
        ),
    };
    let mut said = String::new();
    for (kind, entries) in [("UpFrom", &relup.up_from), ("DownTo", &relup.down_to)] {
        for entry in entries {
            let _ = writeln!(
                said,
                "relup {to} {kind} {} ({} instructions):",
                entry.version,
                entry.instructions.len()
            );
            for (i, instruction) in entry.instructions.iter().enumerate() {
                let _ = writeln!(said, "  {:>3}. {}", i + 1, describe(instruction));
            }
        }
    }
    let problems = check_tarball(&tarball, &from, &to);
    let to_screen = |text: &str| {
        if args.output.is_some() {
            print!("{text}");
        } else {
            eprint!("{text}");
        }
    };
    to_screen(&said);
    if !problems.is_empty() {
        eprintln!("{} cannot be rolled out:", args.tar.display());
        for problem in &problems {
            eprintln!("  - {problem}");
        }
        return Ok(crate::exit::INVALID);
    }
    let source = std::fs::canonicalize(&args.tar)
        .with_context(|| format!("cannot resolve {}", args.tar.display()))?;
    let app = args.app.clone().unwrap_or(name.clone());
    let artifact = format!("{name}-{to}.tar.gz");
    let text = render(&app, &from, &to, &artifact, &source.display().to_string());
    let file = args
        .output
        .as_ref()
        .map_or_else(|| "plan.toml".to_string(), |p| p.display().to_string());
    if let Err(diagnostics) = hotroll_script::parse(&file, &text) {
        bail!(
            "the generated script does not validate (a bug in `hotroll plan release`):\n{}\n{text}",
            diagnostics.to_short_lines().join("\n")
        );
    }
    match &args.output {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(crate::exit::OK)
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// The fleet version of relx's `bin/<rel> upgrade`: unpack (the vote), a barrier, the point of
/// no return, install (the relup runs, wave by wave), a barrier; make_permanent at the end.
fn render(app: &str, from: &str, to: &str, artifact: &str, source: &str) -> String {
    format!(
        r#"# Written by `hotroll plan release`: {app} {from} -> {to}.
app = {app_q}
runtime = "otp_release"
from = {from_q}
to = {to_q}

[[artifacts]]
name = {artifact_q}
source = {source_q}

[rollout]
canary = 1
max_failures = 0
on_failure = "rollback_all"
barrier_timeout = "60s"
step_timeout = "60s"

[script]
up = [
  {{ unpack_release = {artifact_q} }},  # unpack_release + check_install_release: the vote
  {{ sync_nodes = "unpacked" }},
  "point_of_no_return",
  "install_release",                       # the relup runs
  {{ sync_nodes = "installed" }},
]
"#,
        app_q = quote(app),
        from_q = quote(from),
        to_q = quote(to),
        artifact_q = quote(artifact),
        source_q = quote(source),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_validates() {
        let text = render(
            "pm",
            "0.1.0",
            "0.2.0",
            "pm-0.2.0.tar.gz",
            "/tmp/pm-0.2.0.tar.gz",
        );
        assert!(hotroll_script::parse("plan.toml", &text).is_ok(), "{text}");
    }
}
