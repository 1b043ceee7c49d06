//! The host's own KSM (/sys/kernel/mm/ksm) for the tests of the `kernel`
//! policy: whether it can be used, one test at a time, and its knobs.

use std::sync::Mutex;

use vmm::dedup::HostKsmPaths;

/// Serialises the tests that take the host's KSM.
pub static HOST_KSM: Mutex<()> = Mutex::new(());

/// Whether the host's KSM can be used; fails under CI when it cannot.
pub fn require_host_ksm() -> bool {
    match HostKsmPaths::default().check_available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but the kernel policy cannot run: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// The knobs of the host's KSM a run may change.
pub const KNOBS: [&str; 7] =
    ["run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan", "advisor_mode"];

/// The host's KSM knobs now, as `name=value`.
pub fn host_knobs() -> Vec<String> {
    let paths = HostKsmPaths::default();
    KNOBS.iter().map(|k| format!("{k}={}", paths.read(k).unwrap_or_default())).collect()
}
