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
//!     image: GuestImage::resolve("hello").unwrap(),
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
//! };
//! let stats = vmm::run::run(config).unwrap();
//! assert_eq!(stats.guest.exit_code, Some(0));
//! println!("{}", serde_json::to_string_pretty(&stats).unwrap());
//! ```
//!
//! The command line, comparisons, benches, charts and the end-of-run table
//! are the laboratory's: the `vmm-lab` crate (`vmm/lab/`), which uses only
//! this crate's public API.

pub mod control;
pub mod dedup;
pub mod host_ksm;
pub mod image;
pub mod kvm_stats;
pub mod phases;
pub mod run;
pub mod serial;
pub mod signals;
pub mod size;
pub mod stats;
pub mod vcpu;
pub mod vcpu_gate;
pub mod view;
pub mod vm;
pub mod x86;
