//! Arguments several subcommands share, and their checks: the KVM device,
//! the output format, guest RAM, timeouts, repeats, the policies, the
//! deduplicator's knobs.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::ValueEnum;
use vmm::vm::DedupPolicy;

use vmm::memory::{check_fleet_size, check_mem_size, MemoryError};
use vmm::size::{parse_size, SizeError};

/// Most repeats a comparison takes.
const MAX_REPEAT: u32 = 1000;

/// Arguments that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub(super) enum ArgError {
    /// `--mem` is not a size.
    #[error("--mem")]
    Size(#[source] SizeError),
    /// `--mem` (or `--guests` of it) is a size ABI v1 or the host cannot honour.
    #[error(transparent)]
    MemSize(MemoryError),
    /// `--timeout` is not a number.
    #[error("--timeout '{0}' is not a number of seconds")]
    TimeoutNotANumber(String),
    /// `--timeout` is not a positive number of seconds.
    #[error("--timeout '{0}' must be a positive number of seconds")]
    TimeoutOutOfRange(String),
    /// `--repeat` is 0 or too large.
    #[error("--repeat {0} must be between 1 and {MAX_REPEAT}")]
    Repeat(u32),
    /// A 0-or-1 knob is neither.
    #[error("--{name} takes 0 or 1, not {value}")]
    Flag {
        /// The option, without its dashes.
        name: &'static str,
        /// What was given.
        value: u8,
    },
    /// The deduplicator's knobs are out of range.
    #[error(transparent)]
    Knobs(ksm::KsmError),
    /// This executable cannot be found, to run the child `vmm run`s.
    #[error("cannot find the vmm executable to run")]
    CurrentExe(#[source] std::io::Error),
}

/// The KVM device node, for the commands that run guests.
#[derive(Debug, clap::Args)]
pub(super) struct KvmArg {
    /// The KVM device node [default: /dev/kvm].
    #[arg(long, value_name = "PATH")]
    kvm: Option<PathBuf>,
}

impl KvmArg {
    /// The device: this option, else the one given before the subcommand
    /// (still accepted there, unlisted, for scripts written before it
    /// moved), else /dev/kvm.
    pub(super) fn device(&self, before_subcommand: Option<PathBuf>) -> PathBuf {
        self.kvm.clone().or(before_subcommand).unwrap_or_else(|| PathBuf::from("/dev/kvm"))
    }
}

/// How a command writes its result on standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Format {
    /// Tables for people.
    Table,
    /// One JSON document.
    Json,
    /// Comma-separated records, a header first.
    Csv,
}

/// What each policy does, for `--help` (the core's own descriptions are
/// for readers of its code).
fn policy_help(policy: DedupPolicy) -> &'static str {
    match policy {
        DedupPolicy::Off => "no deduplication: the baseline",
        DedupPolicy::ChangePte => "honour MMU_NOTIFIER_USE_CHANGE_PTE: update secondary-MMU entries in place",
        DedupPolicy::RangeFlush => "zap every invalidated range, no change_pte (KVM since Linux 6.9)",
        DedupPolicy::Legacy => "zap, then change_pte finds nothing (KVM from Linux 3.7 to 6.8)",
        DedupPolicy::EventAware => {
            "change-pte, and ranges that only remove write permission write-protected in place (the seed's whole proposal)"
        }
        DedupPolicy::Kernel => "the host's own KSM merges guest RAM, the host KVM follows it (needs root)",
    }
}

/// Parses a policy name, with the help above for each value.
pub(super) fn policy_parser() -> impl TypedValueParser<Value = DedupPolicy> {
    let values = DedupPolicy::value_variants().iter().map(|&p| PossibleValue::new(p.name()).help(policy_help(p)));
    PossibleValuesParser::new(values).try_map(|name| DedupPolicy::from_str(&name, false))
}

/// The deduplicator's knobs, with the names and defaults of /sys/kernel/mm/ksm.
#[derive(Debug, clap::Args)]
pub(super) struct KsmArgs {
    /// ksmd at launch: 0 stopped (the guest may start it through port 0x501), 1 running, 2 unmerge.
    #[arg(long, default_value_t = 0, value_name = "0|1|2", help_heading = "Deduplicator (ksm)")]
    ksm_run: u32,
    /// Pages ksmd scans per batch.
    #[arg(long, default_value_t = 100, value_name = "N", help_heading = "Deduplicator (ksm)")]
    pages_to_scan: u32,
    /// Sleep between ksmd batches.
    #[arg(long, default_value_t = 20, value_name = "MS", help_heading = "Deduplicator (ksm)")]
    sleep_millisecs: u32,
    /// Most pages sharing one KSM page.
    #[arg(long, default_value_t = 256, value_name = "N", help_heading = "Deduplicator (ksm)")]
    max_page_sharing: u32,
    /// Merge zero-filled pages with the zero page.
    #[arg(long, default_value_t = 0, value_name = "0|1", help_heading = "Deduplicator (ksm)")]
    use_zero_pages: u8,
    /// Skip pages that keep failing to merge.
    #[arg(long, default_value_t = 1, value_name = "0|1", help_heading = "Deduplicator (ksm)")]
    smart_scan: u8,
}

impl KsmArgs {
    /// The knobs, checked whatever the policy: a bad knob is bad input even
    /// with deduplication off.
    pub(super) fn knobs(&self) -> Result<ksm::KsmKnobs, ArgError> {
        let flag = |name: &'static str, value: u8| match value {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ArgError::Flag { name, value }),
        };
        let knobs = ksm::KsmKnobs {
            run: self.ksm_run,
            pages_to_scan: self.pages_to_scan,
            sleep_millisecs: self.sleep_millisecs,
            max_page_sharing: self.max_page_sharing,
            use_zero_pages: flag("use-zero-pages", self.use_zero_pages)?,
            smart_scan: flag("smart-scan", self.smart_scan)?,
        };
        knobs.check().map_err(ArgError::Knobs)?;
        Ok(knobs)
    }
}

/// `--timeout`: a positive number of seconds.
pub(super) fn parse_timeout(text: &str) -> Result<Duration, ArgError> {
    let secs: f64 = text.parse().map_err(|_| ArgError::TimeoutNotANumber(text.into()))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(ArgError::TimeoutOutOfRange(text.into()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--mem`: parsed and checked against ABI v1 and the host.
pub(super) fn guest_mem(text: &str) -> Result<u64, ArgError> {
    let bytes = parse_size(text).map_err(ArgError::Size)?;
    check_mem_size(bytes).map_err(ArgError::MemSize)?;
    Ok(bytes)
}

/// `--guests` of `--mem` each: at least one, within the VMM's limit and the
/// host's memory (checked before any run, as `vmm run` checks it).
pub(super) fn check_guests(guests: u32, mem_bytes: u64) -> Result<(), ArgError> {
    check_fleet_size(guests, mem_bytes).map_err(ArgError::MemSize)
}

/// `--repeat`: between 1 and MAX_REPEAT.
pub(super) fn check_repeat(repeat: u32) -> Result<(), ArgError> {
    if repeat == 0 || repeat > MAX_REPEAT {
        return Err(ArgError::Repeat(repeat));
    }
    Ok(())
}

/// This executable, which runs each child `vmm run`.
pub(super) fn this_vmm() -> Result<PathBuf, ArgError> {
    std::env::current_exe().map_err(ArgError::CurrentExe)
}
