//! The KVM system: opening the device with errors that say what to do, and
//! the API version and capabilities this VMM needs.

use std::ffi::CString;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Errors of opening and checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device path cannot be passed to open(2).
    #[error("{0}: the path contains a NUL byte")]
    NulInPath(String),
    /// No KVM device at the path.
    #[error("{0} does not exist: this machine offers no KVM (load the kvm module or use a host with virtualisation)")]
    Missing(String),
    /// The device is there but this process may not use it.
    #[error("cannot open {0}: permission denied (run as root or add your user to the kvm group)")]
    Denied(String),
    /// The path is not a KVM device.
    #[error("{0} is not a KVM device")]
    NotKvm(String),
    /// open(2) failed otherwise.
    #[error("cannot open {path}")]
    Open {
        /// The device path.
        path: String,
        /// The OS error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_API_VERSION failed.
    #[error("{0} is not a KVM device (KVM_GET_API_VERSION failed)")]
    NoApiVersion(String),
    /// The device speaks another API.
    #[error("{path} speaks KVM API {version}, not 12")]
    ApiVersion {
        /// The device path.
        path: String,
        /// What it answered.
        version: i32,
    },
    /// A capability the VMM needs is missing.
    #[error("the host KVM lacks {0}, which the VMM needs")]
    MissingCap(&'static str),
}

/// Opens the KVM device.
pub fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    let shown = path.display().to_string();
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| KvmError::NulInPath(shown.clone()))?;
    Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing(shown),
        libc::EACCES | libc::EPERM => KvmError::Denied(shown),
        libc::ENOTTY | libc::EINVAL => KvmError::NotKvm(shown),
        _ => KvmError::Open { path: shown, source: e },
    })
}

/// Opens the KVM device and checks its API version and the capabilities
/// the VMM needs (user memory, and an MMU kept in sync with the host's).
pub fn open_checked(path: &Path) -> Result<Kvm, KvmError> {
    let kvm = open_kvm(path)?;
    let shown = || path.display().to_string();
    match kvm.get_api_version() {
        12 => {}
        v if v < 0 => return Err(KvmError::NoApiVersion(shown())),
        version => return Err(KvmError::ApiVersion { path: shown(), version }),
    }
    for (cap, name) in [(Cap::UserMemory, "KVM_CAP_USER_MEMORY"), (Cap::SyncMmu, "KVM_CAP_SYNC_MMU")] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}
