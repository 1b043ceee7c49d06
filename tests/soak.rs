//! The soak that looks for the stall once seen in about one run in a
//! hundred (issue 14, item 9): `pagefill` under change-pte with ksmd
//! scanning at full speed (no sleep) while the guest runs, two runs at a
//! time so that the machine is loaded, alternating the views. Every run
//! must end by itself with the model's checksums; a run that hangs is
//! caught by its `--timeout` (a minute: a hang detector, not a timing).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{require_kvm, scratch, vmm};

/// Runs in all: at one in a hundred, a stall shows up in this many runs
/// with a probability of about 95%.
const RUNS: usize = 300;

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn pagefill_under_change_pte_and_a_busy_ksmd_never_stalls() {
    require_kvm();
    let mem = 8 << 20;
    let expected = guest_images::pagefill_expected_reports(mem);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= RUNS {
                    return;
                }
                let view = if i % 2 == 0 { "memslot" } else { "uffd" };
                let args = [
                    "--mem",
                    "8M",
                    "--dedup",
                    "change-pte",
                    "--view",
                    view,
                    "--ksm-run",
                    "1",
                    "--sleep-millisecs",
                    "0",
                    "--pages-to-scan",
                    "256",
                    "--timeout",
                    "60",
                    "--no-table",
                ];
                let ctx = format!("run {i} ({view})");
                let json = scratch(&format!("soak-{i}.json"));
                let out =
                    vmm().args(["run", "pagefill"]).args(args).arg("--stats-json").arg(&json).output().expect("spawn");
                let text = std::fs::read_to_string(&json)
                    .unwrap_or_else(|e| panic!("{ctx}: no statistics ({e}): {}", String::from_utf8_lossy(&out.stderr)));
                let stats: vmm::stats::RunStats = serde_json::from_str(&text).expect("schema 1");
                assert_eq!(stats.guest.end.reason, "exit", "{ctx}: {}", stats.guest.end.detail);
                assert_eq!(stats.guest.reports, expected, "{ctx}");
                let _ = std::fs::remove_file(&json);
            });
        }
    });
}
