//! `vmm ctl`: a request to a running `vmm run --control SOCKET`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::CliError;

pub(super) const AFTER_HELP: &str = "\
Example:
  vmm run mixed --dedup range-flush --control /tmp/vmm.sock &
  vmm ctl /tmp/vmm.sock run 1
  vmm ctl /tmp/vmm.sock status

The change is made before the reply comes back, so it shows in the statistics of the phase \
under way and of every phase after. Exit status: 0 done, 1 refused (the reason on stderr), 2 the \
socket cannot be reached.";

#[derive(Debug, clap::Args)]
pub(super) struct CtlArgs {
    /// The socket given to `vmm run --control`.
    socket: PathBuf,
    /// The request: `run 0|1|2` or `status`.
    #[arg(required = true, num_args = 1.., value_name = "REQUEST")]
    request: Vec<String>,
}

/// Sends the request and prints the reply: status 0, or 1 with the reason
/// on standard error when the run refused it.
pub(super) fn ctl_command(args: &CtlArgs) -> Result<ExitCode, CliError> {
    let reply = vmm::control::request(&args.socket, &args.request.join(" "))?;
    match reply.strip_prefix("error: ") {
        Some(why) => {
            eprintln!("vmm ctl: {why}");
            Ok(ExitCode::from(1))
        }
        None => super::print_out(reply).map(|()| ExitCode::SUCCESS),
    }
}
