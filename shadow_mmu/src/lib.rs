//! The two MMUs of a KVM host and the notifier between them, in userspace.
//!
//! This crate holds the host side (the frame pool, standing for host physical
//! memory) and, as the project grows, the primary MMU's page table over guest
//! RAM, the mmu notifier, and the EPT-format secondary MMU that KVM keeps in
//! step with the primary. It never opens `/dev/kvm`: making the secondary
//! table real for a vCPU is the `vmm` crate's EPT view.

pub mod frame_pool;

pub use frame_pool::{FramePool, FramePoolError, Pfn, PAGE_SHIFT, PAGE_SIZE};
