//! The host KSM's knobs in /sys/kernel/mm/ksm, and this VMM's record of
//! them: the lock two runs never share and the saved values a killed run
//! leaves for the next one to restore.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::HostKsmError;

/// Where Linux exposes KSM.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";
/// Where the lock and the saved knobs live.
pub const STATE_DIR: &str = "/run/vmm";

/// The knobs a run may change (saved before, restored after), in the order
/// they are restored: with ksmd stopped, `max_page_sharing` first (the kernel
/// refuses it while KSM pages exist), `advisor_mode` after `pages_to_scan`
/// (the kernel refuses `pages_to_scan` while an advisor runs), `run` last.
pub(super) const KNOBS: [&str; 7] =
    ["max_page_sharing", "use_zero_pages", "smart_scan", "pages_to_scan", "sleep_millisecs", "advisor_mode", "run"];

pub(super) fn knob_err(name: &str) -> impl FnOnce(std::io::Error) -> HostKsmError + '_ {
    move |source| HostKsmError::Knob { name: name.to_string(), source }
}

/// The host KSM's sysfs directory and this VMM's state directory (both
/// replaceable, so that save and restore are tested without a real KSM).
#[derive(Debug, Clone)]
pub struct HostKsmPaths {
    /// /sys/kernel/mm/ksm.
    pub sysfs: PathBuf,
    /// /run/vmm: `host-ksm.lock` and `host-ksm.saved`.
    pub state: PathBuf,
}

impl Default for HostKsmPaths {
    fn default() -> Self {
        Self { sysfs: KSM_SYSFS.into(), state: STATE_DIR.into() }
    }
}

impl HostKsmPaths {
    pub(super) fn knob(&self, name: &str) -> PathBuf {
        self.sysfs.join(name)
    }

    pub(super) fn lock_file(&self) -> PathBuf {
        self.state.join("host-ksm.lock")
    }

    pub(super) fn saved_file(&self) -> PathBuf {
        self.state.join("host-ksm.saved")
    }

    /// Reads a knob or counter, trimmed; for a choice (`[none] scan-time`),
    /// the chosen word.
    pub fn read(&self, name: &str) -> Result<String, HostKsmError> {
        let text = std::fs::read_to_string(self.knob(name)).map_err(knob_err(name))?;
        let text = text.trim();
        Ok(match (text.find('['), text.find(']')) {
            (Some(a), Some(b)) if a < b => text[a + 1..b].to_string(),
            _ => text.to_string(),
        })
    }

    /// Reads a numeric counter; None if the kernel has no such file.
    /// Signed figures (general_profit) are clamped at zero.
    pub fn read_u64(&self, name: &str) -> Option<u64> {
        let s = self.read(name).ok()?;
        s.parse::<u64>().ok().or_else(|| s.parse::<i64>().ok().map(|v| v.max(0) as u64))
    }

    pub(super) fn write(&self, name: &str, value: &str) -> Result<(), HostKsmError> {
        std::fs::write(self.knob(name), value).map_err(knob_err(name))
    }

    /// Whether the kernel policy can run here: KSM exists and its knobs are
    /// writable by this process. The message says what to do otherwise.
    pub fn check_available(&self) -> Result<(), HostKsmError> {
        let run = self.knob("run");
        if !run.exists() {
            return Err(HostKsmError::NoKsm(run.display().to_string()));
        }
        if std::fs::OpenOptions::new().write(true).open(&run).is_err() {
            return Err(HostKsmError::NotPermitted(self.sysfs.display().to_string()));
        }
        Ok(())
    }
}

/// The knob values found before a run, as written to the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SavedKnobs(pub(super) Vec<(String, String)>);

impl SavedKnobs {
    pub(super) fn read(paths: &HostKsmPaths) -> Result<Self, HostKsmError> {
        let mut v = Vec::new();
        for name in KNOBS {
            // Older kernels lack some knobs (smart_scan came in 6.7).
            if paths.knob(name).exists() {
                v.push((name.to_string(), paths.read(name)?));
            }
        }
        Ok(Self(v))
    }

    pub(super) fn to_text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    pub(super) fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(k, _)| KNOBS.contains(k))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    /// Writes every saved value back, ksmd stopped meanwhile, in the order
    /// of [`KNOBS`] (`run` last). Returns the knobs that could not be restored.
    pub(super) fn restore(&self, paths: &HostKsmPaths) -> Vec<String> {
        let mut failed = Vec::new();
        if paths.read("run").is_ok_and(|r| r != "0") {
            if let Err(e) = paths.write("run", "0") {
                failed.push(format!("run=0 ({e})"));
            }
        }
        let mut ordered: Vec<&(String, String)> = self.0.iter().collect();
        ordered.sort_by_key(|(k, _)| KNOBS.iter().position(|n| n == k));
        for (name, value) in ordered {
            if paths.read(name).is_ok_and(|now| &now == value) {
                continue;
            }
            if let Err(e) = paths.write(name, value) {
                failed.push(format!("{name}={value} ({e})"));
            }
        }
        failed
    }
}

pub(super) fn take_lock(paths: &HostKsmPaths) -> Result<File, HostKsmError> {
    let state = |source| HostKsmError::State { path: paths.state.display().to_string(), source };
    std::fs::create_dir_all(&paths.state).map_err(state)?;
    let path = paths.lock_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| HostKsmError::State { path: path.display().to_string(), source })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(HostKsmError::Busy(path.display().to_string()));
    }
    Ok(file)
}

/// Writes `text` to `path` atomically (a temporary file, synced, renamed).
pub(super) fn write_durably(path: &Path, text: &str) -> Result<(), HostKsmError> {
    let err = |source| HostKsmError::State { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
