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
//! | [`cli`] | the `vmm` command: `run`, `images`, `compare`, `ctl` (and `watch`), `bench`, `report`, `completions`, `man`; one module per subcommand; argument checks that give one-line errors |
//! | [`run_table`] | what `vmm run` prints at the end of a run: per phase, the exits in `perf kvm stat`'s layout and the host KVM's statistics in `kvm_stat`'s; the CSV of every figure |
//! | [`compare`] | `vmm compare`: child `vmm run`s interleaved, the compare.json document and how runs fold into it, the side-by-side table and its CSV, the projection onto cost profiles |
//! | [`cost`] | cost profiles (per-event costs of a host, versioned JSON) and the projection of a run's events onto one |
//! | [`chart`] | the charts with plotters: per named phase, secondary-MMU faults by kind beside the host KVM's exits, the whole run as ratios to `off`, every view side by side |
//! | [`report`] | `vmm report`: the README's Results section and the charts from compare and bench JSON |
//! | [`progress`] | how far a long command is, with the time left, on a terminal |
//! | [`csv`] | CSV records |
//! | [`mod@bench`] | `vmm bench`: the exit floor, the secondary-MMU fault against its bare mechanism, the deduplicator against the host's KSM, this host's cost profile, the cost model checked against measured runs |
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
//!     image: GuestImage::resolve("pagefill", 64 << 20).unwrap(),
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
//!     soft_dirty_interval: None,
//!     guests: 1,
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
pub mod cost;
pub mod csv;
pub mod progress;
pub mod report;
pub mod run_table;
