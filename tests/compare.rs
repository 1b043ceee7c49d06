//! `vmm compare` and `vmm ctl` on real KVM.
