//! Save and restore of the host's knobs against a fake sysfs.

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
    let mut k = HostKsm::new(host.paths.clone(), knobs, pool(), vec![(1, 8)]).expect("take");
    assert_eq!(host.paths.read("pages_to_scan").expect("read"), "5000");
    assert_eq!(host.paths.read("sleep_millisecs").expect("read"), "0");
    assert_eq!(host.paths.read("use_zero_pages").expect("read"), "1");
    assert!(host.paths.saved_file().exists());
    k.set_run(1).expect("run");
    assert_eq!(host.paths.read("run").expect("read"), "1");
    // A second run is refused while the first holds the host's KSM.
    let second = HostKsm::new(host.paths.clone(), knobs, pool(), vec![(1, 8)]);
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
    let e = HostKsm::new(host.paths.clone(), knobs, pool(), vec![(1, 8)]).expect_err("refused");
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
    let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect("take");
    // The saved values were restored before this run saved its own.
    assert_eq!(k.saved.0, before);
    drop(k);
    assert_eq!(host.knobs(), before);
}

#[test]
fn counters_use_the_builtin_names_and_clamp_signed_figures() {
    let host = FakeHost::new("counters");
    let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect("take");
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
    let e = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect_err("refused");
    assert!(matches!(e, HostKsmError::Leftover { .. }), "{e}");
    assert_eq!(std::fs::read_to_string(host.paths.saved_file()).expect("kept"), left);
}

#[test]
fn an_advisor_is_switched_off_for_the_run_and_back_on_after() {
    let host = FakeHost::new("advisor");
    std::fs::write(host.paths.knob("advisor_mode"), "none [scan-time]\n").expect("knob");
    assert_eq!(host.paths.read("advisor_mode").expect("read"), "scan-time");
    let k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect("take");
    assert_eq!(std::fs::read_to_string(host.paths.knob("advisor_mode")).expect("read"), "none");
    drop(k);
    assert_eq!(std::fs::read_to_string(host.paths.knob("advisor_mode")).expect("read"), "scan-time");
}

#[test]
fn a_released_host_ksm_refuses_further_changes() {
    let host = FakeHost::new("released");
    let mut k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect("take");
    k.release().expect("release");
    assert!(matches!(k.set_run(1), Err(HostKsmError::Released)));
    assert_eq!(host.paths.read("run").expect("read"), "0");
}

#[test]
fn without_ksm_or_permission_the_policy_is_refused_with_a_reason() {
    let host = FakeHost::new("absent");
    let paths = HostKsmPaths { sysfs: host.paths.sysfs.join("nowhere"), state: host.paths.state.clone() };
    let e = HostKsm::new(paths, KsmKnobs::default(), pool(), vec![(1, 8)]).expect_err("no ksm");
    assert!(e.to_string().contains("CONFIG_KSM"), "{e}");
}

#[test]
fn a_pass_reaches_its_fixpoint_however_many_scans_ksmd_makes_between_looks() {
    // A guest of a few pages: ksmd makes ~100 scans a millisecond, so the
    // first look already sees many scans and the merges they made.
    let mut f = Fixpoint::new(1_000, 0);
    assert_eq!(f.observe(1_000, 0), Verdict::NoScan);
    assert_eq!(f.observe(1_100, 6), Verdict::Scanned);
    assert_eq!(f.observe(1_200, 6), Verdict::Reached);
    // A large guest: one scan a look; the partial first scan does not count.
    let mut f = Fixpoint::new(7, 0);
    assert_eq!(f.observe(8, 0), Verdict::Scanned);
    assert_eq!(f.observe(9, 100), Verdict::Scanned);
    assert_eq!(f.observe(10, 200), Verdict::Scanned);
    assert_eq!(f.observe(11, 200), Verdict::Reached);
    // Nothing mergeable: done after two complete scans.
    let mut f = Fixpoint::new(0, 0);
    assert_eq!(f.observe(1, 0), Verdict::Scanned);
    assert_eq!(f.observe(3, 0), Verdict::Reached);
    // Still merging at every look: the pass gives up after its rounds.
    let mut f = Fixpoint::new(0, 0);
    let verdicts: Vec<Verdict> = (1..=u64::from(MAX_PASS_ROUNDS)).map(|r| f.observe(r * 10, r)).collect();
    assert_eq!(verdicts.last(), Some(&Verdict::NotReached));
    assert!(verdicts[..verdicts.len() - 1].iter().all(|v| *v == Verdict::Scanned));
}

#[test]
fn a_saved_file_that_is_a_directory_refuses_the_run_and_leaves_nothing_behind() {
    let host = FakeHost::new("savedir");
    let before = host.knobs();
    std::fs::create_dir_all(host.paths.saved_file()).expect("a directory where the record goes");
    let e = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect_err("refused");
    assert!(matches!(e, HostKsmError::State { .. }), "{e}");
    assert_eq!(host.knobs(), before, "nothing written to the host");
    let names: Vec<_> =
        std::fs::read_dir(&host.paths.state).expect("state dir").flatten().map(|e| e.file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "a temporary file was left: {names:?}");
}

#[test]
fn a_leftover_is_checked_before_anything_is_written_to_the_host() {
    // The host's own max_page_sharing (the leftover's) is not the run's:
    // refused, and the leftover's run=1 is not written first.
    let host = FakeHost::new("leftover-mps");
    std::fs::create_dir_all(&host.paths.state).expect("state dir");
    let left = "run=1\nmax_page_sharing=256\n";
    write_durably(&host.paths.saved_file(), left).expect("save");
    let knobs = KsmKnobs { max_page_sharing: 512, ..KsmKnobs::default() };
    let e = HostKsm::new(host.paths.clone(), knobs, pool(), vec![(1, 8)]).expect_err("refused");
    assert!(matches!(e, HostKsmError::MaxPageSharingFixed { .. }), "{e}");
    assert_eq!(host.paths.read("run").expect("read"), "0", "the leftover was written before the refusal");
    // A record this VMM did not write is not restored at all.
    for bad in ["run=1\nrm -rf=/\n", "run=7\n", "pages_to_scan=many\n", "run=1\nrun=0\n", "garbage\n"] {
        write_durably(&host.paths.saved_file(), bad).expect("save");
        let e = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool(), vec![(1, 8)]).expect_err("refused");
        assert!(matches!(e, HostKsmError::BadLeftover { .. }), "{bad:?}: {e}");
        assert_eq!(host.paths.read("run").expect("read"), "0", "{bad:?} was written to the host");
        assert_eq!(std::fs::read_to_string(host.paths.saved_file()).expect("kept"), bad);
    }
}

/// Whether the mapping at `addr` is MADV_MERGEABLE (VmFlags `mg` in
/// /proc/self/smaps).
fn is_mergeable(addr: usize) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (a, b) = range.split_once('-').expect("range");
            let (a, b) = (usize::from_str_radix(a, 16).unwrap_or(0), usize::from_str_radix(b, 16).unwrap_or(0));
            inside = (a..b).contains(&addr);
        } else if inside && line.starts_with("VmFlags:") {
            return line.split_whitespace().any(|f| f == "mg");
        }
    }
    false
}

#[test]
fn an_unmerge_leaves_guest_ram_unmergeable_until_a_pass_or_ksmd_is_asked_for() {
    let host = FakeHost::new("unmerge");
    let pool = pool();
    let addr = pool.frame_hva(1).expect("frame") as usize;
    let mut k = HostKsm::new(host.paths.clone(), KsmKnobs::default(), pool, vec![(1, 8)]).expect("take");
    assert!(is_mergeable(addr), "guest RAM is mergeable for the run");
    k.set_run(2).expect("unmerge");
    assert!(!is_mergeable(addr), "an unmerged guest must not be merged again by a running ksmd");
    assert_eq!(host.paths.read("run").expect("read"), "0");
    k.set_run(0).expect("stop");
    assert!(!is_mergeable(addr), "stopping ksmd does not make it mergeable");
    k.set_run(1).expect("start");
    assert!(is_mergeable(addr), "asking for ksmd makes it mergeable again");
    k.release().expect("release");
}
