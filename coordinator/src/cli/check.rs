//! `hotroll check FILE`: temporary stand-in until the plan compiler lands (owned by the script work).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The upgrade script to check.
    pub file: PathBuf,
}

pub fn run(args: &CheckArgs) -> ExitCode {
    let source = match std::fs::read_to_string(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(1);
        }
    };
    match hotroll_script::parse(&args.file.display().to_string(), &source) {
        Ok(_) => ExitCode::SUCCESS,
        Err(d) => {
            eprintln!("{d}");
            ExitCode::from(2)
        }
    }
}
