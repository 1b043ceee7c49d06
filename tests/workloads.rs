//! The comparison workloads on real KVM.
