//! `vmm ctl`: a request to a running `vmm run --control SOCKET`, or a live
//! view of it (`watch`).

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

use super::CliError;

pub(super) const AFTER_HELP: &str = "\
Requests:
  run 0|1|2      set the deduplicator's run state, as sysfs `run` (prints `ok run=N`)
  status         the guest's phase and its name, the run state, the deduplicator's figures, the
                 exits by reason and by event so far and the host KVM's statistics that moved,
                 as one JSON object (the control socket's reply)
  soft-dirty     one soft-dirty round (clear_refs 4) over every guest's RAM now, as a live
                 migration's pre-copy loop makes them (prints the pages written since the round
                 before)
  watch          redraw a kvm_stat-like table (totals, shares, rates per second) every
                 --interval MS until the run ends (exit status 0) or Ctrl-C

Example:
  vmm run mixed --dedup range-flush --control /tmp/vmm.sock &
  vmm ctl /tmp/vmm.sock run 1
  vmm ctl /tmp/vmm.sock watch --interval 500

The socket speaks JSON lines (a versioned greeting, then one request and one reply per
connection: README.md, \"vmm ctl\"). A change is made before the reply comes back, so it shows
in the statistics of the phase under way and of every phase after. Exit status: 0 done, 1
refused (the reason on stderr), 2 the socket cannot be reached.";

#[derive(Debug, clap::Args)]
pub(super) struct CtlArgs {
    /// The socket given to `vmm run --control`.
    socket: PathBuf,
    /// The request: `run 0|1|2`, `status`, `soft-dirty` or `watch`.
    #[arg(required = true, num_args = 1.., value_name = "REQUEST")]
    request: Vec<String>,
    /// How often `watch` redraws, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..))]
    interval: u64,
}

/// Sends the request and prints the reply: status 0, or 1 with the reason
/// on standard error when the run refused it.
pub(super) fn ctl_command(args: &CtlArgs) -> Result<ExitCode, CliError> {
    if args.request == ["watch"] {
        return super::watch::watch(&args.socket, std::time::Duration::from_millis(args.interval));
    }
    let reply = vmm::control::request(&args.socket, &args.request.join(" "))?;
    if reply["ok"] != true {
        eprintln!("vmm ctl: {}", reply["error"].as_str().unwrap_or("the run refused the request"));
        return Ok(ExitCode::from(1));
    }
    let shown = match &reply["run"] {
        Value::Number(n) if args.request.first().is_some_and(|w| w == "run") => format!("ok run={n}"),
        _ => reply.to_string(),
    };
    super::print_out(shown).map(|()| ExitCode::SUCCESS)
}
