//! The `vmm` command; see `vmm --help`.

fn main() -> std::process::ExitCode {
    vmm_lab::cli::main_with_args(std::env::args_os())
}
