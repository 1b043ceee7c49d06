//! What a run is asked to do: the guest, its RAM, the deduplication policy
//! and view, and the experiment hooks ([`RunConfig`]).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use ksm::KsmKnobs;
use shadow_mmu::{Policy, PrimaryMmu};

use crate::image::GuestImage;
use crate::view::ViewKind;

/// Deduplication policy of a run: off, or how the secondary MMU follows
/// the host while pages are deduplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupPolicy {
    /// No deduplication: the baseline.
    Off,
    /// The seed series' proposal: honour MMU_NOTIFIER_USE_CHANGE_PTE and
    /// update entries in place (see `shadow_mmu::Policy::ChangePte` for
    /// where it differs from KVM's own handler).
    ChangePte,
    /// Zap on every invalidation; no change_pte (KVM since Linux 6.9).
    RangeFlush,
    /// KVM from Linux 3.7 (2012) to 6.8: zap on every invalidation, then
    /// change_pte finds nothing (the flag never reached mainline).
    Legacy,
    /// The seed's whole proposal: change-pte, plus ranges that only remove
    /// write permission (soft-dirty rounds, mprotect to read-only)
    /// write-protected in place instead of zapped.
    EventAware,
    /// The host's own KSM merges guest RAM (MADV_MERGEABLE) and the host
    /// KVM is the secondary MMU (see `host_ksm`); needs root.
    Kernel,
}

impl DedupPolicy {
    /// The name used on the command line and in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            DedupPolicy::Off => "off",
            DedupPolicy::ChangePte => "change-pte",
            DedupPolicy::RangeFlush => "range-flush",
            DedupPolicy::Legacy => "legacy",
            DedupPolicy::EventAware => "event-aware",
            DedupPolicy::Kernel => "kernel",
        }
    }

    /// Every policy, in the order `vmm compare` runs them by default.
    pub const ALL: [DedupPolicy; 6] = [
        DedupPolicy::Off,
        DedupPolicy::ChangePte,
        DedupPolicy::RangeFlush,
        DedupPolicy::Legacy,
        DedupPolicy::EventAware,
        DedupPolicy::Kernel,
    ];

    /// The view a run of this policy really uses: the `kernel` policy maps
    /// guest RAM through the memslot view whatever `--view` says (the host
    /// KVM is then its secondary MMU).
    pub fn effective_view(self, view: ViewKind) -> ViewKind {
        match self {
            DedupPolicy::Kernel => ViewKind::Memslot,
            _ => view,
        }
    }

    /// The secondary MMU's policy. With deduplication off nothing ever
    /// invalidates the secondary MMU; it is set up as today's KVM.
    pub fn mmu_policy(self) -> Policy {
        match self {
            DedupPolicy::Off | DedupPolicy::RangeFlush | DedupPolicy::Kernel => Policy::RangeFlush,
            DedupPolicy::ChangePte => Policy::ChangePte,
            DedupPolicy::Legacy => Policy::Legacy,
            DedupPolicy::EventAware => Policy::EventAware,
        }
    }
}

/// When a [`MmHook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// The guest started phase n (after the previous phase was closed).
    PhaseStart(u32),
    /// The guest wrote this value to the dedup control port.
    DedupRequest(u32),
}

/// A host-side experiment run while the vCPU waits: it changes the primary
/// MMU through the same notifier paths the deduplicator uses
/// (`write_protect_page`, `replace_page`, ...). Returns an error to end the run.
pub type MmHook = Box<dyn FnMut(HookPoint, &mut PrimaryMmu) -> Result<(), MmHookError> + Send>;

/// What a [`MmHook`] returns when it fails: any error.
pub type MmHookError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a run needs to know.
pub struct RunConfig {
    /// The guest image.
    pub image: GuestImage,
    /// Guest RAM in bytes (checked by [`crate::memory::check_mem_size`]).
    pub mem_bytes: u64,
    /// The deduplication policy.
    pub dedup: DedupPolicy,
    /// The EPT view backend.
    pub view: ViewKind,
    /// End the run after this long.
    pub timeout: Option<Duration>,
    /// Where the guest's console output goes.
    pub console: Box<dyn Write + Send>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Host-side changes driven at phase starts and dedup requests (tests, experiments).
    pub mm_hook: Option<MmHook>,
    /// The deduplicator's knobs (ignored when `dedup` is off).
    pub ksm: KsmKnobs,
    /// Whether the built-in deduplicator runs (when `dedup` is not off).
    /// Experiments whose host hook is the deduplicator turn it off.
    pub builtin_ksm: bool,
    /// A lower memslot budget for the memslot view than KVM's (to reach its
    /// limit in tests); None: KVM_CAP_NR_MEMSLOTS.
    pub memslot_limit: Option<u32>,
    /// Listen for run-state changes on this Unix socket (see `control`).
    pub control: Option<PathBuf>,
    /// Make a soft-dirty round this often from a thread (`--soft-dirty-ms`),
    /// as a live migration's pre-copy loop would (see `soft_dirty`).
    pub soft_dirty_interval: Option<Duration>,
    /// Guests of the same image run together (`--guests`, ABI 1.1 fleets):
    /// 1 is a guest alone; each more is its own KVM VM, vCPU thread and
    /// mm, all deduplicated together (see `crate::fleet`).
    pub guests: u32,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("image", &self.image.name)
            .field("mem_bytes", &self.mem_bytes)
            .field("dedup", &self.dedup)
            .field("view", &self.view)
            .field("guests", &self.guests)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
