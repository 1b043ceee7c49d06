//! The laboratory around the VMM core: the experiments, comparisons, benches
//! and charts that measure what page deduplication costs a running guest,
//! and the `vmm` command that runs them.
//!
//! The VMM itself (KVM objects, boot state, EPT views, the vCPU and its run
//! loop, the statistics a run counts) is the `vmm` crate; this crate uses
//! only its public API, and the core depends on nothing here (neither on
//! plotters nor on the command line).
//!
//! # Modules
//!
//! | module | job |
//! | --- | --- |
//! | [`cli`] | the `vmm` command: `run`, `images`, `compare`, `ctl`, `bench`; one module per subcommand; argument checks that give one-line errors |
//! | [`run_table`] | the per-phase table `vmm run` prints at the end of a run |
//! | [`compare`] | `vmm compare`: child `vmm run`s interleaved, the compare.json document and how runs fold into it, the side-by-side table |
//! | [`chart`] | compare.svg with plotters: exits and wall time per phase per policy |
//! | [`mod@bench`] | `vmm bench`: the exit floor, the secondary-MMU fault against its bare mechanism, the deduplicator against the host's KSM |
//!
//! # Example
//!
//! Run a built-in guest on the core and print the table `vmm run` prints:
//!
//! ```no_run
//! use vmm::image::GuestImage;
//! use vmm::view::ViewKind;
//! use vmm::vm::{DedupPolicy, RunConfig};
//!
//! let config = RunConfig {
//!     image: GuestImage::resolve("pagefill").unwrap(),
//!     mem_bytes: 16 << 20,
//!     dedup: DedupPolicy::ChangePte,
//!     view: ViewKind::Memslot,
//!     timeout: None,
//!     console: Box::new(std::io::sink()),
//!     kvm_device: "/dev/kvm".into(),
//!     mm_hook: None,
//!     ksm: Default::default(),
//!     builtin_ksm: true,
//!     memslot_limit: None,
//!     control: None,
//! };
//! let stats = vmm::run::run(config).unwrap();
//! println!("{}", vmm_lab::run_table::render_table(&stats));
//! ```
//!
//! Or the whole command line, as the `vmm` binary does:
//!
//! ```no_run
//! let status = vmm_lab::cli::main_with_args(["vmm", "compare", "pagefill", "--repeat", "1"].map(Into::into));
//! ```

pub mod bench;
pub mod chart;
pub mod cli;
pub mod compare;
pub mod run_table;

/// An error and its chain of causes on one line, `error: cause: cause`,
/// the way the command line and compare.json report them.
///
/// A cause whose text the line already holds is not repeated (some errors
/// of the core quote their cause in their own message).
pub fn error_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("quoting: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(error_line(&Outer("out/compare.json", io())), "cannot write out/compare.json: disk full");
        assert_eq!(error_line(&Quoting(io())), "quoting: disk full");
    }
}
