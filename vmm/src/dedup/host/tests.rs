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
