//! Shared helpers of the integration tests: run the real `vmm` binary and
//! read back its statistics.

#![allow(dead_code, unreachable_pub)] // each test binary uses a subset

use std::path::PathBuf;
use std::process::{Command, Output};

use vmm::stats::RunStats;

pub mod control;
pub mod guests;
pub mod host_ksm;
pub mod pagefill;
pub mod phase_model;
pub mod processes;
pub mod workloads;

/// Fails the test unless /dev/kvm can be opened read-write. Every test that
/// calls it is `#[ignore]`d, so that `cargo test` lists it as not run where
/// KVM may be missing; scripts/test.sh runs the ignored tests where
/// /dev/kvm is usable, and always with `CI` set (CI machines have KVM, so
/// there a missing /dev/kvm is a failure, not a skip).
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but /dev/kvm cannot be opened ({e}): KVM tests must run in CI");
        }
        panic!("/dev/kvm cannot be opened ({e}): this test needs KVM");
    }
}

/// Whether the policy updates secondary-MMU entries in place for KSM's
/// pte changes (USE_CHANGE_PTE): change-pte, and event-aware, which adds
/// only the batch ranges KSM never makes.
pub fn updates_in_place(policy: vmm::vm::DedupPolicy) -> bool {
    matches!(policy, vmm::vm::DedupPolicy::ChangePte | vmm::vm::DedupPolicy::EventAware)
}

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// A fresh path for a test's output file.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

/// Polls `done` every 10 ms for up to `timeout`; whether it held in time.
pub fn poll_until(timeout: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// The result of one `vmm run`.
pub struct Run {
    pub output: Output,
    pub stats: RunStats,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn status(&self) -> i32 {
        self.output.status.code().expect("exited, not killed")
    }

    /// Exit counts of the phase with this number (the first if it repeats).
    pub fn phase(&self, n: u32) -> &vmm::stats::Figures {
        &self.stats.phases.iter().find(|p| p.phase == n).unwrap_or_else(|| panic!("no phase {n}")).figures
    }
}

/// Runs `vmm run IMAGE EXTRA... --stats-json F` and parses F.
pub fn run(image: &str, extra: &[&str]) -> Run {
    let json = scratch(&format!("{}-{}.json", image.replace('/', "_"), extra.join("_").replace('/', "_")));
    let output = vmm().arg("run").arg(image).args(extra).arg("--stats-json").arg(&json).output().expect("spawn vmm");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!("no statistics from `vmm run {image}` ({e}); stderr: {}", String::from_utf8_lossy(&output.stderr))
    });
    let stats: RunStats = serde_json::from_str(&text).expect("statistics parse as schema 1");
    Run { output, stats }
}

/// Runs a built-in guest in this process (so a host hook can drive the
/// primary MMU) and returns its statistics. With a hook, the hook is the
/// deduplicator; without one, the built-in one runs with Linux's defaults.
pub fn run_in_process(
    image: &str,
    mem: &str,
    dedup: vmm::vm::DedupPolicy,
    view: vmm::view::ViewKind,
    mm_hook: Option<vmm::vm::MmHook>,
) -> RunStats {
    let builtin_ksm = mm_hook.is_none();
    run_with(image, mem, dedup, view, mm_hook, builtin_ksm, ksm::KsmKnobs::default())
}

/// [`run_in_process`] with every setting given.
pub fn run_with(
    image: &str,
    mem: &str,
    dedup: vmm::vm::DedupPolicy,
    view: vmm::view::ViewKind,
    mm_hook: Option<vmm::vm::MmHook>,
    builtin_ksm: bool,
    knobs: ksm::KsmKnobs,
) -> RunStats {
    vmm::signals::install(false).expect("kick signal handler");
    let config = vmm::vm::RunConfig {
        image: vmm::image::GuestImage::resolve(image, 64 << 30).expect("built-in image"),
        mem_bytes: vmm::size::parse_size(mem).expect("size"),
        dedup,
        view,
        timeout: Some(std::time::Duration::from_secs(120)),
        console: Box::new(std::io::sink()),
        kvm_device: "/dev/kvm".into(),
        mm_hook,
        ksm: knobs,
        builtin_ksm,
        memslot_limit: None,
        control: None,
        soft_dirty_interval: None,
        guests: 1,
    };
    vmm::run::run(config).expect("the VM builds")
}
