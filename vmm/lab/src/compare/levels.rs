//! Which of the host KVM's statistics are levels, read from a throwaway VM.

use std::collections::BTreeSet;
use std::path::Path;

use vmm::kvm::KvmError;
use vmm::kvm_stats::{KvmStats, KvmStatsError};

/// Why the host KVM's statistics descriptors cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LevelsError {
    /// The KVM device could not be opened.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating the throwaway VM or vCPU failed.
    #[error("cannot read the host KVM's statistics descriptors: {what}")]
    Create {
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The statistics file descriptor could not be read.
    #[error("cannot read the host KVM's statistics descriptors")]
    Stats(#[source] KvmStatsError),
}

/// The host KVM's scalar statistics that are levels (KVM_STATS_TYPE_INSTANT
/// or _PEAK: a run reports their value, and only when they changed) rather
/// than cumulative counters, under the names a run's `kvm` section uses
/// (a vCPU statistic also as `vcpu.<name>`, the name a run gives it when a
/// VM statistic has the same name). Read from a throwaway VM and vCPU.
pub fn kvm_level_stats(kvm_device: &Path) -> Result<BTreeSet<String>, LevelsError> {
    let kvm = vmm::kvm::open_kvm(kvm_device)?;
    let vm = kvm.create_vm().map_err(|source| LevelsError::Create { what: "KVM_CREATE_VM", source })?;
    let vcpu = vm.create_vcpu(0).map_err(|source| LevelsError::Create { what: "KVM_CREATE_VCPU", source })?;
    let levels_of = |stats: KvmStats| -> Vec<String> { stats.level_names().map(str::to_string).collect() };
    let mut levels: BTreeSet<String> =
        levels_of(KvmStats::open(&vm).map_err(LevelsError::Stats)?).into_iter().collect();
    for name in levels_of(KvmStats::open(&vcpu).map_err(LevelsError::Stats)?) {
        levels.insert(format!("vcpu.{name}"));
        levels.insert(name);
    }
    Ok(levels)
}
