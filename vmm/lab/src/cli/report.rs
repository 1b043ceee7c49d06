//! `vmm report`: the README's Results section and the charts, from the JSON
//! `vmm compare` and `vmm bench` wrote.

use std::path::PathBuf;
use std::process::ExitCode;

use super::CliError;
use crate::report::markdown::{render, Links};
use crate::report::{splice, write_charts, Inputs, ReportError};

pub(super) const AFTER_HELP: &str = "\
Each DIR holds bench reports (floor.json, fault-<view>.json, dedup.json) and comparisons
(summary.json or compare.json, in DIR or in its subdirectories, as `vmm compare --out` writes
them). The section goes to standard output, or replaces the one between the
<!-- results:begin --> and <!-- results:end --> markers of --readme FILE. One chart per
workload, every view that ran side by side, is written to --charts (default: the first DIR).
A figure the JSON does not have is shown as `-`, never as 0.

Example:
  vmm report docs/results --readme README.md";

#[derive(Debug, clap::Args)]
pub(super) struct ReportArgs {
    /// Results directories.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// Replace the results section of this Markdown file instead of printing it.
    #[arg(long, value_name = "FILE")]
    readme: Option<PathBuf>,
    /// Where the charts go (default: the first DIR).
    #[arg(long, value_name = "DIR")]
    charts: Option<PathBuf>,
    /// Write no charts.
    #[arg(long)]
    no_charts: bool,
}

/// Renders the section (and the charts).
pub(super) fn report_command(args: &ReportArgs) -> Result<ExitCode, CliError> {
    let inputs = Inputs::read(&args.dirs)?;
    let charts_dir = args.charts.clone().unwrap_or_else(|| args.dirs[0].clone());
    let charts = if args.no_charts { Default::default() } else { write_charts(&inputs, &charts_dir)? };
    let base = args
        .readme
        .as_ref()
        .and_then(|r| r.parent().map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() }))
        .unwrap_or_else(|| PathBuf::from("."));
    let section = render(&inputs, &charts, &Links { base });
    let Some(readme) = &args.readme else {
        super::print_out(section.trim_end())?;
        return Ok(ExitCode::SUCCESS);
    };
    let io = |what, source| ReportError::Io { what, path: readme.display().to_string(), source };
    let text = std::fs::read_to_string(readme).map_err(|e| io("read", e))?;
    let new = splice(&text, &section, readme)?;
    std::fs::write(readme, new).map_err(|e| io("write", e))?;
    Ok(ExitCode::SUCCESS)
}
