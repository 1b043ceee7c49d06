//! One child `vmm run` of a comparison and the statistics it wrote.

use std::path::Path;
use std::process::Command;

use vmm::stats::RunStats;
use vmm::vm::DedupPolicy;

use super::{child, CompareConfig};

/// Why a child run gave no statistics.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The `vmm` executable could not be started.
    #[error("cannot start {vmm}")]
    Start {
        /// The executable.
        vmm: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ended with a status that says it wrote no statistics (bad input,
    /// a setup failure), or was killed.
    #[error("{how}{}", colon(last_line))]
    Ended {
        /// "exit status N" or "killed by SIGX (signal N)".
        how: String,
        /// The last line of its standard error, or "".
        last_line: String,
    },
    /// It ended as a run that writes statistics does, but they cannot be read.
    #[error("exit status {status} but no statistics{}", colon(last_line))]
    NoStatistics {
        /// Its exit status.
        status: i32,
        /// The last line of its standard error, or "".
        last_line: String,
        /// Why the file cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The statistics file is not a schema-1 document.
    #[error("unreadable statistics")]
    Unreadable(#[source] serde_json::Error),
}

/// ": text", or "" for no text.
fn colon(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Runs one child `vmm run` of `config.image` under `policy` and reads its
/// statistics: (exit status, statistics), or why there are none (exit status
/// or signal, and the last line of the child's standard error).
///
/// The child ends when this process dies (PR_SET_PDEATHSIG), and gets the
/// SIGINT or SIGTERM this process receives while [`super::compare`] runs.
pub fn run_once(config: &CompareConfig, policy: DedupPolicy, stats_path: &Path) -> Result<(i32, RunStats), RunError> {
    // A file an earlier comparison left there is not this run's statistics.
    let _ = std::fs::remove_file(stats_path);
    let start = |source| RunError::Start { vmm: config.vmm.display().to_string(), source };
    let ended = child::run(command(config, policy, stats_path)).map_err(start)?;
    let last_line = ended.last_line().to_string();
    // 0 and 1: the guest ran and ended; 3: it ended abnormally, with statistics.
    let status = match ended.status.code() {
        Some(s @ (0 | 1 | 3)) => s,
        _ => return Err(RunError::Ended { how: child::describe(ended.status), last_line }),
    };
    let text =
        std::fs::read_to_string(stats_path).map_err(|source| RunError::NoStatistics { status, last_line, source })?;
    let stats: RunStats = serde_json::from_str(&text).map_err(RunError::Unreadable)?;
    Ok((status, stats))
}

/// `vmm run` with the comparison's settings, writing `stats_path`.
fn command(config: &CompareConfig, policy: DedupPolicy, stats_path: &Path) -> Command {
    let k = &config.knobs;
    let mut cmd = Command::new(&config.vmm);
    cmd.arg("run")
        .arg(&config.image)
        .arg("--kvm")
        .arg(&config.kvm_device)
        .args(["--mem", &config.mem_bytes.to_string()])
        .args(["--guests", &config.guests.to_string()])
        .args(["--dedup", policy.name(), "--view", config.view.name()])
        .args(["--timeout", &config.timeout_secs.to_string()])
        .args(["--ksm-run", &k.run.to_string(), "--pages-to-scan", &k.pages_to_scan.to_string()])
        .args(["--sleep-millisecs", &k.sleep_millisecs.to_string()])
        .args(["--max-page-sharing", &k.max_page_sharing.to_string()])
        .args(["--use-zero-pages", &u8::from(k.use_zero_pages).to_string()])
        .args(["--smart-scan", &u8::from(k.smart_scan).to_string()])
        .arg("--no-table")
        .arg("--stats-json")
        .arg(stats_path);
    cmd
}
