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

mod procfs;
mod sysfs;

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ksm::KsmKnobs;
use shadow_mmu::{FramePool, Pfn};

use procfs::{find_ksmd, ksm_stat, ksm_stat_signed, ksmd_cpu_ns, merging_pages, rmap_items};
use sysfs::{take_lock, write_durably, SavedKnobs};
pub use sysfs::{HostKsmPaths, RecordError, KSM_SYSFS, STATE_DIR};

/// A synchronous pass scans this many pages per ksmd batch, without sleeping
/// (the built-in pass is synchronous too). ksmd stops only between batches,
/// so a pass overshoots its last scan by up to one batch: small enough to
/// be negligible, large enough that batching costs nothing (host-facts.md:
/// 5,000 and 100,000 pages per batch converge alike).
const PASS_PAGES_TO_SCAN: u32 = 4096;
/// The longest a pass waits for ksmd to complete its next scan.
const PASS_STALL: Duration = Duration::from_secs(60);
/// Looks at ksmd's progress (each after at least one complete scan) after
/// which a pass that still merges gives up (a guest that waits on its pass
/// does not write, so this is never reached).
const MAX_PASS_ROUNDS: u32 = 64;
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
    #[error("host KSM knob {name}")]
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
    #[error("host KSM state file {path}")]
    State {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// madvise on guest RAM failed.
    #[error(transparent)]
    Madvise(#[from] shadow_mmu::FramePoolError),
    /// The record a killed run left is not one this VMM wrote.
    #[error("{path} is not a record of host KSM knobs: check the host's knobs by hand, then delete it")]
    BadLeftover {
        /// The saved file.
        path: String,
        /// What is wrong with it.
        #[source]
        why: RecordError,
    },
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

/// The host's KSM, held for one run: the lock, the saved knobs, and guest RAM
/// marked mergeable.
#[derive(Debug)]
pub struct HostKsm {
    paths: HostKsmPaths,
    saved: SavedKnobs,
    /// Held (flock) for the life of the run.
    _lock: File,
    pool: Arc<FramePool>,
    /// Guest RAM: (first frame, frames) of each guest.
    ranges: Vec<(Pfn, u64)>,
    knobs: KsmKnobs,
    /// Whether ksmd runs for this guest (`run` 1) outside passes.
    running: bool,
    /// Whether guest RAM is MADV_MERGEABLE (not since an unmerge).
    mergeable: bool,
    ksmd_pid: Option<u32>,
    pass_ns: u64,
    restored: bool,
}

impl HostKsm {
    /// Takes the host's KSM for a run: lock, restore what a killed run left,
    /// save the knobs, set `knobs` (ksmd stopped), and mark the frames of
    /// `ranges` ((first frame, frames) of each guest's RAM) of `pool`
    /// mergeable. `knobs.max_page_sharing` must be the host's: it is the one
    /// knob a run could not put back.
    pub fn new(
        paths: HostKsmPaths,
        knobs: KsmKnobs,
        pool: Arc<FramePool>,
        ranges: Vec<(Pfn, u64)>,
    ) -> Result<Self, HostKsmError> {
        paths.check_available()?;
        let lock = take_lock(&paths)?;
        let leftover = SavedKnobs::leftover(&paths)?;
        // max_page_sharing is never written: the kernel refuses a change
        // (EBUSY) while any KSM page exists, and ksmd, run at full speed in
        // a pass, may merge other processes' mergeable memory too, which
        // would leave the run unable to put the host's value back. It is
        // checked against the host's own value (the leftover's, if a killed
        // run left one) before anything is written.
        let current = match leftover.as_ref().and_then(|l| l.get("max_page_sharing")) {
            Some(v) => v.to_string(),
            None => paths.read("max_page_sharing")?,
        };
        if current != knobs.max_page_sharing.to_string() {
            return Err(HostKsmError::MaxPageSharingFixed { current, wanted: knobs.max_page_sharing });
        }
        if let Some(left) = leftover {
            left.restore_leftover(&paths)?;
        }
        let saved_path = paths.saved_file();
        let saved = SavedKnobs::read(&paths)?;
        write_durably(&saved_path, &saved.to_text())?;
        let mut this = Self {
            paths,
            saved,
            _lock: lock,
            pool,
            ranges,
            knobs,
            running: false,
            mergeable: false,
            ksmd_pid: find_ksmd(),
            pass_ns: 0,
            restored: false,
        };
        // From here on, Drop restores whatever was changed.
        this.apply_knobs()?;
        this.set_mergeable()?;
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
            0 => {
                self.paths.write("run", "0")?;
                self.running = false;
                Ok(())
            }
            1 => {
                self.set_mergeable()?;
                self.paths.write("run", "1")?;
                self.running = true;
                Ok(())
            }
            _ => {
                self.set_run(0)?;
                self.unmerge()
            }
        }
    }

    /// Breaks every merged page of this guest (each gets its own frame
    /// again) and leaves guest RAM unmergeable, so that nothing is merged
    /// again until the guest asks for a pass or for ksmd (as sysfs `run` =
    /// 2 leaves ksmd stopped).
    pub fn unmerge(&mut self) -> Result<(), HostKsmError> {
        if self.restored {
            return Err(HostKsmError::Released);
        }
        self.advise(libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE")?;
        self.mergeable = false;
        Ok(())
    }

    /// madvise(`advice`) over every guest's RAM.
    fn advise(&self, advice: libc::c_int, name: &'static str) -> Result<(), shadow_mmu::FramePoolError> {
        self.ranges.iter().try_for_each(|&(first, pages)| self.pool.madvise(first, pages, advice, name))
    }

    /// Marks guest RAM mergeable again after an unmerge.
    fn set_mergeable(&mut self) -> Result<(), HostKsmError> {
        if !self.mergeable {
            self.advise(libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
            self.mergeable = true;
        }
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
        self.set_mergeable()?;
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
        let mut fixpoint = Fixpoint::new(scans()?, merging_pages());
        let mut progress = Instant::now();
        loop {
            if cancelled() {
                return Err(HostKsmError::Cancelled);
            }
            std::thread::sleep(PASS_POLL);
            let now = scans()?;
            match fixpoint.observe(now, merging_pages()) {
                Verdict::Reached => return Ok(()),
                Verdict::NotReached => {
                    return Err(HostKsmError::Stalled(format!(
                        "no fixpoint after {MAX_PASS_ROUNDS} observations of a complete scan"
                    )))
                }
                Verdict::Scanned => progress = Instant::now(),
                // ksmd is stopped or stuck (someone wrote run=0?): give up
                // rather than wait forever.
                Verdict::NoScan if progress.elapsed() > PASS_STALL => {
                    return Err(HostKsmError::Stalled(format!(
                        "full_scans stayed at {now} for {} s",
                        PASS_STALL.as_secs()
                    )))
                }
                Verdict::NoScan => {}
            }
        }
    }

    /// The figures Linux shows signed, with their sign: the host's
    /// `general_profit` (sysfs) and this process's `ksm_process_profit`
    /// (/proc/self/ksm_stat); those the kernel does not have are left out.
    pub fn signed_counters(&self) -> Vec<(&'static str, i64)> {
        let general = self.paths.read("general_profit").ok().and_then(|s| s.parse().ok());
        let process = ksm_stat_signed("ksm_process_profit");
        [("general_profit", general), ("ksm_process_profit", process)]
            .into_iter()
            .filter_map(|(name, v)| v.map(|v| (name, v)))
            .collect()
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
        let unmerged = self.advise(libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE");
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
            eprintln!("vmm: {}", crate::error_chain(&e));
        }
    }
}

/// When a pass driven through the host's ksmd is done: a complete scan
/// merged nothing more, after at least two complete scans (a page's
/// checksum must hold for a scan before it is merged). ksmd may finish many
/// scans between two looks (a small guest takes microseconds a scan), so
/// the looks are counted, not the scans.
#[derive(Debug)]
struct Fixpoint {
    full_scans: u64,
    /// Complete scans seen: the one under way at the start is partial.
    complete: i64,
    merging: u64,
    rounds: u32,
}

/// What one look at ksmd's progress says.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// No scan completed since the last look.
    NoScan,
    /// Scans completed, and the pass goes on.
    Scanned,
    /// The fixpoint.
    Reached,
    /// [`MAX_PASS_ROUNDS`] looks, each after a complete scan, and still merging.
    NotReached,
}

impl Fixpoint {
    fn new(full_scans: u64, merging: u64) -> Self {
        Self { full_scans, complete: -1, merging, rounds: 0 }
    }

    /// Looks at `full_scans` and this guest's `ksm_merging_pages` now.
    fn observe(&mut self, full_scans: u64, merging: u64) -> Verdict {
        if full_scans <= self.full_scans {
            return Verdict::NoScan;
        }
        self.complete = self.complete.saturating_add(i64::try_from(full_scans - self.full_scans).unwrap_or(i64::MAX));
        self.full_scans = full_scans;
        self.rounds += 1;
        if self.complete >= 2 && merging == self.merging {
            return Verdict::Reached;
        }
        self.merging = merging;
        if self.rounds >= MAX_PASS_ROUNDS {
            return Verdict::NotReached;
        }
        Verdict::Scanned
    }
}

#[cfg(test)]
mod tests;
