//! The `kernel` policy: the host's own KSM (mm/ksm.c) deduplicates guest RAM.
//!
//! Guest RAM is anonymous private memory marked MADV_MERGEABLE, mapped into
//! KVM by one memslot; the host's ksmd merges it while the guest runs and the
//! host KVM, through its own mmu notifier, is the secondary MMU. Nothing of
//! `shadow_mmu` or `ksm` takes part. What happened is read from the host:
//! /sys/kernel/mm/ksm (global: every mergeable process on the host counts),
//! /proc/self/ksm_stat (this process only), ksmd's CPU time from
//! /proc/PID/schedstat, and KVM's binary statistics (read per phase anyway).
//!
//! The knobs are the host's, shared with every process: a run takes an
//! exclusive lock (so two runs never fight over them), writes the original
//! values to a state file before changing any, and puts them back when it
//! ends, also on error and on Ctrl-C (which end the run cleanly). If a run is
//! killed outright, the next `kernel` run finds the state file and restores
//! from it first.
//!
//! Linux counterparts: `run`, `pages_to_scan`, `sleep_millisecs`,
//! `smart_scan`, `use_zero_pages`, `max_page_sharing` in
//! Documentation/admin-guide/mm/ksm.rst. Since Linux 6.9 KVM ignores
//! `change_pte` (and 6.10 removed it), so on a current host this policy is
//! the kernel's range-flush.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ksm::KsmKnobs;
use shadow_mmu::{FramePool, Pfn};

/// Where Linux exposes KSM.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";
/// Where the lock and the saved knobs live.
pub const STATE_DIR: &str = "/run/vmm";

/// The knobs a run may change (saved before, restored after), in the order
/// they are restored: with ksmd stopped, `max_page_sharing` first (the kernel
/// refuses it while KSM pages exist), `advisor_mode` after `pages_to_scan`
/// (the kernel refuses `pages_to_scan` while an advisor runs), `run` last.
const KNOBS: [&str; 7] =
    ["max_page_sharing", "use_zero_pages", "smart_scan", "pages_to_scan", "sleep_millisecs", "advisor_mode", "run"];

/// A synchronous pass scans this many pages per ksmd batch, without sleeping
/// (the built-in pass is synchronous too). ksmd stops only between batches,
/// so a pass overshoots its last scan by up to one batch: small enough to
/// be negligible, large enough that batching costs nothing (host-facts.md:
/// 5,000 and 100,000 pages per batch converge alike).
const PASS_PAGES_TO_SCAN: u32 = 4096;
/// The longest a pass waits for ksmd to complete its next scan.
const PASS_STALL: Duration = Duration::from_secs(60);
/// Complete scans after which a pass that still merges gives up (a guest
/// that waits on its pass does not write, so this is never reached).
const MAX_PASS_SCANS: i64 = 64;
/// The longest a run waits, at its end, for ksmd to forget its pages.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How often a pass looks at ksmd's progress.
const PASS_POLL: Duration = Duration::from_millis(1);

/// Errors of the host-KSM policy.
#[derive(Debug, thiserror::Error)]
pub enum HostKsmError {
    /// The host has no KSM.
    #[error("the kernel policy needs the host's KSM, and {0} does not exist (a kernel without CONFIG_KSM)")]
    NoKsm(String),
    /// The knobs cannot be written.
    #[error(
        "the kernel policy switches the host's KSM at {0}, which this process cannot write: run as root (the \
         other policies need no root)"
    )]
    NotPermitted(String),
    /// Another run holds the host's KSM.
    #[error("another vmm run is using the host's KSM (lock {0} is held): wait for it to end")]
    Busy(String),
    /// A knob could not be read or written.
    #[error("host KSM knob {name}: {source}")]
    Knob {
        /// The knob.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The run asked for a max_page_sharing other than the host's.
    #[error(
        "the kernel policy keeps the host's max_page_sharing ({current}), and {wanted} was asked: the kernel \
         refuses to change it while any process has pages merged, so it could not be put back; pass \
         --max-page-sharing {current}"
    )]
    MaxPageSharingFixed {
        /// The host's value.
        current: String,
        /// What was asked.
        wanted: u32,
    },
    /// The lock or state file could not be used.
    #[error("host KSM state file {path}: {source}")]
    State {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// madvise on guest RAM failed.
    #[error(transparent)]
    Madvise(#[from] shadow_mmu::FramePoolError),
    /// A killed run left knobs changed that cannot be restored now.
    #[error(
        "a previous run left the host KSM knobs changed and {failed} cannot be restored now: restore them by hand \
         from {path}, then delete it"
    )]
    Leftover {
        /// The saved file.
        path: String,
        /// The knobs that failed.
        failed: String,
    },
    /// The host's KSM was given back; the run is ending.
    #[error("the host's KSM has been given back: the run is ending")]
    Released,
    /// The host's ksmd made no progress.
    #[error("the host's ksmd did not finish a pass: {0}")]
    Stalled(String),
    /// A pass was cancelled (timeout or Ctrl-C) before ksmd finished.
    #[error("the host KSM pass was cancelled before it finished")]
    Cancelled,
}

fn knob_err(name: &str) -> impl FnOnce(std::io::Error) -> HostKsmError + '_ {
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
    fn knob(&self, name: &str) -> PathBuf {
        self.sysfs.join(name)
    }

    fn lock_file(&self) -> PathBuf {
        self.state.join("host-ksm.lock")
    }

    fn saved_file(&self) -> PathBuf {
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

    fn write(&self, name: &str, value: &str) -> Result<(), HostKsmError> {
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
struct SavedKnobs(Vec<(String, String)>);

impl SavedKnobs {
    fn read(paths: &HostKsmPaths) -> Result<Self, HostKsmError> {
        let mut v = Vec::new();
        for name in KNOBS {
            // Older kernels lack some knobs (smart_scan came in 6.7).
            if paths.knob(name).exists() {
                v.push((name.to_string(), paths.read(name)?));
            }
        }
        Ok(Self(v))
    }

    fn to_text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    fn parse(text: &str) -> Self {
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
    fn restore(&self, paths: &HostKsmPaths) -> Vec<String> {
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

/// The host's KSM, held for one run: the lock, the saved knobs, and guest RAM
/// marked mergeable.
#[derive(Debug)]
pub struct HostKsm {
    paths: HostKsmPaths,
    saved: SavedKnobs,
    /// Held (flock) for the life of the run.
    _lock: File,
    pool: Arc<FramePool>,
    first: Pfn,
    pages: u64,
    knobs: KsmKnobs,
    /// Whether ksmd runs for this guest (`run` 1) outside passes.
    running: bool,
    ksmd_pid: Option<u32>,
    pass_ns: u64,
    restored: bool,
}

impl HostKsm {
    /// Takes the host's KSM for a run: lock, restore what a killed run left,
    /// save the knobs, set `knobs` (ksmd stopped), and mark frames
    /// [first, first + pages) of `pool` mergeable. `knobs.max_page_sharing`
    /// must be the host's: it is the one knob a run could not put back.
    pub fn new(
        paths: HostKsmPaths,
        knobs: KsmKnobs,
        pool: Arc<FramePool>,
        first: Pfn,
        pages: u64,
    ) -> Result<Self, HostKsmError> {
        paths.check_available()?;
        let lock = take_lock(&paths)?;
        let saved_path = paths.saved_file();
        if let Ok(text) = std::fs::read_to_string(&saved_path) {
            let left = SavedKnobs::parse(&text);
            let failed = left.restore(&paths);
            if !failed.is_empty() {
                // The saved file stays: it is the only record of the values.
                return Err(HostKsmError::Leftover {
                    path: saved_path.display().to_string(),
                    failed: failed.join(", "),
                });
            }
            eprintln!(
                "vmm: restored the host KSM knobs a previous run left changed ({})",
                text.trim().replace('\n', ", ")
            );
        }
        // max_page_sharing is never written: the kernel refuses a change
        // (EBUSY) while any KSM page exists, and ksmd, run at full speed in
        // a pass, may merge other processes' mergeable memory too, which
        // would leave the run unable to put the host's value back.
        let current = paths.read("max_page_sharing")?;
        if current != knobs.max_page_sharing.to_string() {
            return Err(HostKsmError::MaxPageSharingFixed { current, wanted: knobs.max_page_sharing });
        }
        let saved = SavedKnobs::read(&paths)?;
        write_durably(&saved_path, &saved.to_text())?;
        let mut this = Self {
            paths,
            saved,
            _lock: lock,
            pool,
            first,
            pages,
            knobs,
            running: false,
            ksmd_pid: find_ksmd(),
            pass_ns: 0,
            restored: false,
        };
        // From here on, Drop restores whatever was changed.
        this.apply_knobs()?;
        this.pool.madvise(first, pages, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
        Ok(this)
    }

    /// Writes the run's knobs, ksmd stopped (`run` 0).
    fn apply_knobs(&mut self) -> Result<(), HostKsmError> {
        self.paths.write("run", "0")?;
        self.paths.write("use_zero_pages", if self.knobs.use_zero_pages { "1" } else { "0" })?;
        self.set_smart_scan(self.knobs.smart_scan)?;
        // An advisor (Linux 6.8+) sets pages_to_scan itself, and the kernel
        // refuses writes to it while one runs.
        if self.paths.knob("advisor_mode").exists() && self.paths.read("advisor_mode")? != "none" {
            self.paths.write("advisor_mode", "none")?;
        }
        self.set_scan_rate(self.knobs.pages_to_scan, self.knobs.sleep_millisecs)
    }

    /// `smart_scan`, where the kernel has it (Linux 6.7+).
    fn set_smart_scan(&self, on: bool) -> Result<(), HostKsmError> {
        if !self.paths.knob("smart_scan").exists() {
            return Ok(());
        }
        self.paths.write("smart_scan", if on { "1" } else { "0" })
    }

    fn set_scan_rate(&self, pages_to_scan: u32, sleep_millisecs: u32) -> Result<(), HostKsmError> {
        self.paths.write("pages_to_scan", &pages_to_scan.to_string())?;
        self.paths.write("sleep_millisecs", &sleep_millisecs.to_string())
    }

    /// The `run` knob: 0 stops ksmd, 1 starts it, 2 stops it and unmerges
    /// this guest's pages. Unlike sysfs `run` = 2, which unmerges every
    /// process on the host, 2 here unmerges this guest only
    /// (MADV_UNMERGEABLE, then MADV_MERGEABLE again).
    pub fn set_run(&mut self, run: u32) -> Result<(), HostKsmError> {
        if self.restored {
            return Err(HostKsmError::Released);
        }
        match run {
            0 | 1 => {
                self.paths.write("run", &run.to_string())?;
                self.running = run == 1;
                Ok(())
            }
            _ => {
                self.set_run(0)?;
                self.unmerge()
            }
        }
    }

    /// Breaks every merged page of this guest (each gets its own frame again).
    pub fn unmerge(&mut self) -> Result<(), HostKsmError> {
        if self.restored {
            return Err(HostKsmError::Released);
        }
        self.pool.madvise(self.first, self.pages, libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE")?;
        self.pool.madvise(self.first, self.pages, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
        Ok(())
    }

    /// One synchronous pass, like the built-in `full_pass`: ksmd scans as
    /// fast as it can (PASS_PAGES_TO_SCAN pages per batch, no sleep, smart
    /// scan off) until a complete scan merges nothing more, having made at
    /// least two complete scans (a page's checksum must hold for a scan
    /// before it is merged). `cancelled` is polled; then the run's knobs and
    /// run state come back.
    pub fn full_pass(&mut self, cancelled: &dyn Fn() -> bool) -> Result<(), HostKsmError> {
        if self.restored {
            return Err(HostKsmError::Released);
        }
        let start = Instant::now();
        let result = self.drive_pass(cancelled);
        let back = self.set_scan_rate(self.knobs.pages_to_scan, self.knobs.sleep_millisecs).and_then(|()| {
            self.set_smart_scan(self.knobs.smart_scan)?;
            self.paths.write("run", if self.running { "1" } else { "0" })
        });
        self.pass_ns += u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        result.and(back)
    }

    fn drive_pass(&mut self, cancelled: &dyn Fn() -> bool) -> Result<(), HostKsmError> {
        self.set_smart_scan(false)?;
        self.set_scan_rate(PASS_PAGES_TO_SCAN, 0)?;
        self.paths.write("run", "1")?;
        let scans = || {
            self.paths.read("full_scans")?.parse::<u64>().map_err(|e| HostKsmError::Knob {
                name: "full_scans".into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
        };
        // The scan that is under way when the pass starts is partial.
        let mut last = scans()?;
        let mut complete = -1i64;
        let mut merged = merging_pages();
        let mut progress = Instant::now();
        loop {
            if cancelled() {
                return Err(HostKsmError::Cancelled);
            }
            std::thread::sleep(PASS_POLL);
            let now = scans()?;
            if now <= last {
                // ksmd is stopped or stuck (someone wrote run=0?): give up
                // rather than wait forever.
                if progress.elapsed() > PASS_STALL {
                    return Err(HostKsmError::Stalled(format!(
                        "full_scans stayed at {now} for {} s",
                        PASS_STALL.as_secs()
                    )));
                }
                continue;
            }
            progress = Instant::now();
            complete += i64::try_from(now - last).unwrap_or(i64::MAX);
            last = now;
            let m = merging_pages();
            if complete >= 2 && m == merged {
                return Ok(());
            }
            if complete > MAX_PASS_SCANS {
                return Err(HostKsmError::Stalled(format!("no fixpoint after {MAX_PASS_SCANS} complete scans")));
            }
            merged = m;
        }
    }

    /// The figures of the host's KSM, under the built-in deduplicator's
    /// names where the meaning is the same: the sysfs counters (global),
    /// this process's /proc/self/ksm_stat, ksmd's CPU time and the passes'
    /// wall time.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = [
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "full_scans",
            "pages_scanned",
            "pages_skipped",
            "stable_node_chains",
            "stable_node_dups",
            "general_profit",
        ]
        .into_iter()
        .filter_map(|name| self.paths.read_u64(name).map(|v| (name, v)))
        .collect();
        let stat = ksm_stat();
        for (file, name) in [
            ("ksm_rmap_items", "rmap_items"),
            ("ksm_merging_pages", "ksm_merging_pages"),
            ("ksm_process_profit", "ksm_process_profit"),
            ("ksm_zero_pages", "ksm_zero_pages"),
        ] {
            if let Some(v) = stat.iter().find(|(k, _)| k == file).map(|(_, v)| *v) {
                out.push((name, v));
            }
        }
        if let Some(ns) = self.ksmd_pid.and_then(ksmd_cpu_ns) {
            out.push(("cpu_ns", ns));
        }
        // Not `scan_ns`: ksmd's background scanning is not in it.
        out.push(("pass_ns", self.pass_ns));
        out
    }

    /// Unmerges this guest, lets ksmd make the scans that drop its rmap
    /// items and stable nodes from the host's trees (Linux removes them
    /// lazily, while scanning: with ksmd stopped they would linger and skew
    /// the next run's global figures), and restores every knob.
    pub fn release(&mut self) -> Result<(), HostKsmError> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        let unmerged = self.pool.madvise(self.first, self.pages, libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE");
        // Nothing to forget when ksmd never saw a page of this guest.
        if unmerged.is_ok() && rmap_items() > 0 {
            let _ = self.drain();
        }
        let failed = self.saved.restore(&self.paths);
        if failed.is_empty() {
            // Only a complete restore clears the record of what to restore.
            let _ = std::fs::remove_file(self.paths.saved_file());
        } else {
            return Err(HostKsmError::Knob {
                name: failed.join(", "),
                source: std::io::Error::other(format!(
                    "not restored; {} keeps the original values",
                    self.paths.saved_file().display()
                )),
            });
        }
        unmerged.map_err(HostKsmError::from)
    }

    /// Lets ksmd scan at full speed until this process holds no rmap item
    /// (bounded by DRAIN_LIMIT). With no mergeable area left, ksmd drops
    /// the process's rmap items, and then its mm, from its list.
    fn drain(&self) -> Result<(), HostKsmError> {
        self.set_scan_rate(PASS_PAGES_TO_SCAN, 0)?;
        self.paths.write("run", "1")?;
        let deadline = Instant::now() + DRAIN_LIMIT;
        while rmap_items() > 0 && Instant::now() < deadline {
            std::thread::sleep(PASS_POLL);
        }
        self.paths.write("run", "0")
    }
}

impl Drop for HostKsm {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("vmm: {e}");
        }
    }
}

fn take_lock(paths: &HostKsmPaths) -> Result<File, HostKsmError> {
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
fn write_durably(path: &Path, text: &str) -> Result<(), HostKsmError> {
    let err = |source| HostKsmError::State { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// /proc/self/ksm_stat as (name, value) pairs (signed values clamped at 0).
fn ksm_stat() -> Vec<(String, u64)> {
    let text = std::fs::read_to_string("/proc/self/ksm_stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            let v = v.trim();
            let n = v.parse::<u64>().ok().or_else(|| v.parse::<i64>().ok().map(|x| x.max(0) as u64))?;
            Some((k.to_string(), n))
        })
        .collect()
}

fn stat_value(name: &str) -> u64 {
    ksm_stat().into_iter().find(|(k, _)| k == name).map_or(0, |(_, v)| v)
}

fn merging_pages() -> u64 {
    stat_value("ksm_merging_pages")
}

fn rmap_items() -> u64 {
    stat_value("ksm_rmap_items")
}

/// The pid of the kernel thread ksmd (a child of kthreadd, pid 2: any user
/// can name a process "ksmd").
fn find_ksmd() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // Field 4 of stat, after the parenthesised comm, is the parent pid.
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
        (comm.trim() == "ksmd" && ppid == "2").then_some(pid)
    })
}

/// A thread's time on CPU in ns, the first field of /proc/PID/schedstat.
fn ksmd_cpu_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost {
        paths: HostKsmPaths,
    }

    impl FakeHost {
        fn new(tag: &str) -> Self {
            let root = std::env::temp_dir().join(format!("vmm-host-ksm-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let paths = HostKsmPaths { sysfs: root.join("ksm"), state: root.join("state") };
            std::fs::create_dir_all(&paths.sysfs).expect("fake sysfs");
            for (k, v) in [
                ("run", "0"),
                ("pages_to_scan", "100"),
                ("sleep_millisecs", "20"),
                ("max_page_sharing", "256"),
                ("use_zero_pages", "0"),
                ("smart_scan", "1"),
                ("full_scans", "7"),
                ("general_profit", "-4096"),
            ] {
                std::fs::write(paths.knob(k), format!("{v}\n")).expect("fake knob");
            }
            Self { paths }
        }

        fn knobs(&self) -> Vec<(String, String)> {
            SavedKnobs::read(&self.paths).expect("read").0
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            if let Some(root) = self.paths.sysfs.parent() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
    }

    fn pool() -> Arc<FramePool> {
        Arc::new(FramePool::new_anonymous(16 * 4096).expect("pool"))
    }

    #[test]
    fn a_run_sets_its_knobs_and_puts_every_one_back() {
        let host = FakeHost::new("restore");
        let before = host.knobs();
        let knobs = KsmKnobs { pages_to_scan: 5000, sleep_millisecs: 0, use_zero_pages: true, ..KsmKnobs::default() };
        let mut k = HostKsm::new(host.paths.clone(), knobs, pool(), 1, 8).expect("take");
        assert_eq!(host.paths.read("pages_to_scan").expect("read"), "5000");
        assert_eq!(host.paths.read("sleep_millisecs").expect("read"), "0");
        assert_eq!(host.paths.read("use_zero_pages").expect("read"), "1");
        assert!(host.paths.saved_file().exists());
        k.set_run(1).expect("run");
        assert_eq!(host.paths.read("run").expect("read"), "1");
        // A second run is refused while the first holds the host's KSM.
        let second = HostKsm::new(host.paths.clone(), knobs, pool(), 1, 8);
        assert!(matches!(second, Err(HostKsmError::Busy(_))), "{second:?}");
        drop(k);
        assert_eq!(host.knobs(), before);
        assert!(!host.paths.saved_file().exists());
    }

    #[test]
    fn a_max_page_sharing_other_than_the_hosts_is_refused_before_anything_changes() {
        let host = FakeHost::new("mps");
        let before = host.knobs();
        let knobs = KsmKnobs { max_page_sharing: 64, pages_to_scan: 5000, ..KsmKnobs::default() };
        let e = HostKsm::new(host.paths.clone(), knobs, pool(), 1, 8).expect_err("refused");
        assert!(matches!(&e, HostKsmError::MaxPageSharingFixed { current, wanted: 64 } if current == "256"), "{e}");
        assert!(e.to_string().contains("--max-page-sharing 256"), "{e}");
        assert_eq!(host.knobs(), before);
        assert!(!host.paths.saved_file().exists());
    }

    #[test]
    fn a_run_restores_what_a_killed_run_left_changed() {
        let host = FakeHost::new("killed");
        let before = host.knobs();
        // A run that died after saving and changing the knobs.
        std::fs::create_dir_all(&host.paths.state).expect("state dir");
        write_durably(&host.paths.saved_file(), &SavedKnobs(before.clone()).to_text()).expect("save");
        host.paths.write("run", "1").expect("write");
        host.paths.write("pages_to_scan", "9999").expect("write");
        let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), 1, 8).expect("take");
        // The saved values were restored before this run saved its own.
        assert_eq!(k.saved.0, before);
        drop(k);
        assert_eq!(host.knobs(), before);
    }

    #[test]
    fn counters_use_the_builtin_names_and_clamp_signed_figures() {
        let host = FakeHost::new("counters");
        let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), 1, 8).expect("take");
        let c = k.counters();
        assert!(c.contains(&("full_scans", 7)));
        assert!(c.contains(&("general_profit", 0)));
        assert!(c.iter().any(|(n, _)| *n == "pass_ns"));
    }

    #[test]
    fn a_leftover_that_cannot_be_restored_is_kept_and_the_run_refused() {
        let host = FakeHost::new("stuck");
        std::fs::create_dir_all(&host.paths.state).expect("state dir");
        let left = "run=0\nmax_page_sharing=256\npages_to_scan=100\n";
        write_durably(&host.paths.saved_file(), left).expect("save");
        host.paths.write("max_page_sharing", "7").expect("write");
        // The knob cannot be written now (a directory in its place).
        std::fs::remove_file(host.paths.knob("max_page_sharing")).expect("rm");
        std::fs::create_dir(host.paths.knob("max_page_sharing")).expect("mkdir");
        let e = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), 1, 8).expect_err("refused");
        assert!(matches!(e, HostKsmError::Leftover { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(host.paths.saved_file()).expect("kept"), left);
    }

    #[test]
    fn an_advisor_is_switched_off_for_the_run_and_back_on_after() {
        let host = FakeHost::new("advisor");
        std::fs::write(host.paths.knob("advisor_mode"), "none [scan-time]\n").expect("knob");
        assert_eq!(host.paths.read("advisor_mode").expect("read"), "scan-time");
        let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), 1, 8).expect("take");
        assert_eq!(std::fs::read_to_string(host.paths.knob("advisor_mode")).expect("read"), "none");
        drop(k);
        assert_eq!(std::fs::read_to_string(host.paths.knob("advisor_mode")).expect("read"), "scan-time");
    }

    #[test]
    fn a_released_host_ksm_refuses_further_changes() {
        let host = FakeHost::new("released");
        let mut k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), 1, 8).expect("take");
        k.release().expect("release");
        assert!(matches!(k.set_run(1), Err(HostKsmError::Released)));
        assert_eq!(host.paths.read("run").expect("read"), "0");
    }

    #[test]
    fn without_ksm_or_permission_the_policy_is_refused_with_a_reason() {
        let host = FakeHost::new("absent");
        let paths = HostKsmPaths { sysfs: host.paths.sysfs.join("nowhere"), state: host.paths.state.clone() };
        let e = HostKsm::new(paths, KsmKnobs::default(), pool(), 1, 8).expect_err("no ksm");
        assert!(e.to_string().contains("CONFIG_KSM"), "{e}");
    }
}
