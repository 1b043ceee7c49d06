//! The `vmm` command; see `vmm --help`.

fn main() -> std::process::ExitCode {
    vmm::cli::main_with_args(std::env::args_os())
}
