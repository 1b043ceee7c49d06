//! A minimal VMM on real KVM for measuring what page deduplication costs a
//! running guest in VM exits.
//!
//! It runs tiny guests written against the tiny-guest ABI v1
//! (guest-images/README.md) at CPL 3 in long mode, backs their RAM with a
//! memfd frame pool, makes guest memory reachable through an EPT view, and
//! counts every exit by reason and by guest phase, together with the host
//! KVM's own binary statistics.
//!
//! ```no_run
//! use vmm::image::GuestImage;
//! use vmm::vm::{DedupPolicy, RunConfig};
//! use vmm::view::ViewKind;
//!
//! let config = RunConfig {
//!     image: GuestImage::resolve("hello", 64 << 20).unwrap(),
//!     mem_bytes: 64 << 20,
//!     dedup: DedupPolicy::Off,
//!     view: ViewKind::Memslot,
//!     timeout: None,
//!     console: Box::new(std::io::stdout()),
//!     kvm_device: "/dev/kvm".into(),
//!     mm_hook: None,
//!     ksm: Default::default(),
//!     builtin_ksm: true,
//!     memslot_limit: None,
//!     control: None,
//!     soft_dirty_interval: None,
//!     guests: 1,
//! };
//! let stats = vmm::run::run(config).unwrap();
//! assert_eq!(stats.guest.exit_code, Some(0));
//! println!("{}", serde_json::to_string_pretty(&stats).unwrap());
//! ```
//!
//! The command line, comparisons, benches, charts and the end-of-run table
//! are the laboratory's: the `vmm-lab` crate (`vmm/lab/`), which uses only
//! this crate's public API.

pub mod builder;
pub mod config;
pub mod control;
pub mod dedup;
pub mod exit_times;
pub mod fleet;
pub mod fleet_stats;
pub mod guest_ram;
pub mod image;
pub mod kvm;
pub mod kvm_stats;
pub mod memory;
pub mod phase_name;
pub mod phases;
pub mod run;
pub mod serial;
pub mod signals;
pub mod size;
pub mod soft_dirty;
pub mod stats;
pub mod units;
pub mod vcpu;
pub mod vcpu_gate;
pub mod view;
pub mod vm;
pub mod x86;

/// An error and its chain of causes on one line, as people read it:
/// "what failed: why: why that". A cause whose text the line already
/// holds is not repeated (errors of other crates sometimes quote their
/// cause in their own message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
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
        assert_eq!(error_chain(&Outer("out/compare.json", io())), "cannot write out/compare.json: disk full");
        assert_eq!(error_chain(&Quoting(io())), "quoting: disk full");
    }
}
