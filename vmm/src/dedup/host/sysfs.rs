//! The host KSM's knobs in /sys/kernel/mm/ksm, and this VMM's record of
//! them: the lock two runs never share and the saved values a killed run
//! leaves for the next one to restore.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::HostKsmError;

/// Why a saved record is not one this VMM wrote.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A line without `=`.
    #[error("line '{0}' is not knob=value")]
    NotKnobValue(String),
    /// A knob a run never changes.
    #[error("'{0}' is not a knob a run changes")]
    UnknownKnob(String),
    /// A value the knob cannot hold, or a knob given twice.
    #[error("'{0}' is not a value its knob held, or names the knob again")]
    BadValue(String),
}

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

    /// Parses a record written by [`Self::to_text`]: every line a known
    /// knob and a value it can hold; anything else is refused whole, so
    /// that nothing is written to the host from a file this VMM did not
    /// write.
    pub(super) fn parse(text: &str) -> Result<Self, RecordError> {
        let mut knobs = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (name, value) = line.split_once('=').ok_or_else(|| RecordError::NotKnobValue(line.to_string()))?;
            let value = value.trim();
            if !KNOBS.contains(&name) {
                return Err(RecordError::UnknownKnob(name.to_string()));
            }
            let legal = match name {
                "advisor_mode" => matches!(value, "none" | "scan-time"),
                "run" => matches!(value, "0" | "1" | "2"),
                _ => value.parse::<u64>().is_ok(),
            };
            if !legal || knobs.iter().any(|(k, _): &(String, String)| k == name) {
                return Err(RecordError::BadValue(line.to_string()));
            }
            knobs.push((name.to_string(), value.to_string()));
        }
        Ok(Self(knobs))
    }

    /// The value saved for `name`.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// What a killed run left in the state directory, if anything: the
    /// record must be a file this VMM wrote.
    pub(super) fn leftover(paths: &HostKsmPaths) -> Result<Option<Self>, HostKsmError> {
        let path = paths.saved_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HostKsmError::State { path: path.display().to_string(), source }),
        };
        let bad = |why| HostKsmError::BadLeftover { path: path.display().to_string(), why };
        Self::parse(&text).map(Some).map_err(bad)
    }

    /// Restores what a killed run left. The record stays when a knob
    /// cannot be restored: it is the only record of the values.
    pub(super) fn restore_leftover(&self, paths: &HostKsmPaths) -> Result<(), HostKsmError> {
        let failed = self.restore(paths);
        if !failed.is_empty() {
            return Err(HostKsmError::Leftover {
                path: paths.saved_file().display().to_string(),
                failed: failed.join(", "),
            });
        }
        eprintln!(
            "vmm: restored the host KSM knobs a previous run left changed ({})",
            self.to_text().trim().replace('\n', ", ")
        );
        Ok(())
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

/// Writes `text` to `path` atomically (a temporary file, synced, renamed);
/// on failure the temporary file is removed.
pub(super) fn write_durably(path: &Path, text: &str) -> Result<(), HostKsmError> {
    let err = |source| HostKsmError::State { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}
