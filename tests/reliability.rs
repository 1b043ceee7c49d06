//! Every way a run was seen to hang, panic or leave the host changed
//! (issue 14), each closed and kept closed: closed pipes and full disks,
//! devices and FIFOs given as files, signals that end a run, and the host
//! KSM given back whatever ends the run.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::host_ksm::{host_knobs, require_host_ksm, HOST_KSM};
use common::{require_kvm, scratch, vmm};

/// Runs `cmd` with its standard output a pipe whose reader has gone: the
/// pipe is closed before the command writes anything.
fn with_closed_stdout(mut cmd: Command) -> std::process::Output {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just created and are owned here alone.
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1]))
    };
    drop(reader);
    cmd.stdout(writer).stderr(Stdio::piped());
    let out = cmd.output().expect("spawn vmm");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `vmm ARGS`, killed after `limit`: returns its output, or fails the
/// test if it had to be killed (it hung).
fn within(limit: Duration, args: &[&str]) -> std::process::Output {
    let mut child = vmm().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn vmm");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("`vmm {}` still running after {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// One line on standard error, status 2, nothing on standard output.
fn refused_in_one_line(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn images_into_a_closed_pipe_is_one_line_and_a_status_not_a_panic() {
    let mut cmd = vmm();
    cmd.arg("images");
    let out = with_closed_stdout(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot write to standard output"), "{stderr}");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_run_into_a_closed_pipe_still_writes_its_statistics() {
    require_kvm();
    let json = scratch("closed-pipe.json");
    let mut cmd = vmm();
    cmd.args(["run", "hello", "--stats-json"]).arg(&json);
    let out = with_closed_stdout(cmd);
    assert_ne!(out.status.code(), Some(0), "the output was lost: the status says so");
    let stats: vmm::stats::RunStats =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("statistics written")).expect("schema 1");
    // The console's first write raises SIGPIPE (a clean end of the run), or
    // the guest finished first and only the table was lost.
    assert!(matches!(stats.guest.end.reason.as_str(), "exit" | "interrupted"), "{:?}", stats.guest.end);
}

#[test]
fn devices_and_fifos_are_refused_as_images_before_anything_is_read() {
    for dev in ["/dev/zero", "/dev/urandom"] {
        let out = within(Duration::from_secs(20), &["run", dev, "--mem", "8M"]);
        refused_in_one_line(&out, "not a regular file");
    }
    let fifo = scratch("image.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = within(Duration::from_secs(20), &["run", fifo.to_str().expect("utf-8")]);
    refused_in_one_line(&out, "not a regular file");
}

#[test]
fn an_image_larger_than_guest_ram_is_refused_unread() {
    let big = scratch("huge-sparse.elf");
    let mut bytes = guest_images::find("hello").expect("hello").elf.to_vec();
    bytes.resize(4096, 0);
    std::fs::write(&big, &bytes).expect("write");
    std::fs::OpenOptions::new().write(true).open(&big).expect("open").set_len(1 << 30).expect("sparse 1 GiB");
    let out = within(Duration::from_secs(20), &["run", big.to_str().expect("utf-8"), "--mem", "8M"]);
    refused_in_one_line(&out, "more than the 8388608 bytes of guest RAM");
}

#[test]
fn a_fifo_nobody_reads_is_refused_as_stats_json() {
    let fifo = scratch("stats.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = within(Duration::from_secs(20), &["run", "hello", "--stats-json", fifo.to_str().expect("utf-8")]);
    refused_in_one_line(&out, "FIFO with no reader");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn statistics_reach_a_pipe_with_a_reader_and_dev_null() {
    require_kvm();
    let out = within(Duration::from_secs(60), &["run", "hello", "--no-table", "--stats-json", "/dev/null"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let fifo = scratch("stats-read.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let path = fifo.clone();
    let reader = std::thread::spawn(move || {
        // Opening for reading waits for the writer, as a `>(jq .)` does.
        let mut text = String::new();
        std::fs::File::open(path).expect("open fifo").read_to_string(&mut text).expect("read");
        text
    });
    std::thread::sleep(Duration::from_millis(100));
    let out =
        within(Duration::from_secs(60), &["run", "hello", "--no-table", "--stats-json", fifo.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = reader.join().expect("reader");
    let stats: vmm::stats::RunStats = serde_json::from_str(&text).expect("the document came through the pipe");
    assert_eq!(stats.guest.exit_code, Some(0));
}

#[test]
fn a_refused_image_leaves_no_statistics_file_behind() {
    let json = scratch("refused.json");
    let _ = std::fs::remove_file(&json);
    // hello with its segment moved past 8 MiB of RAM: read, then refused
    // when the VM is built, after --stats-json was opened.
    let mut bytes = guest_images::find("hello").expect("hello").elf.to_vec();
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().expect("e_phoff")) as usize;
    bytes[phoff + 24..phoff + 32].copy_from_slice(&0x7f00_0000u64.to_le_bytes());
    let image = scratch("beyond-ram.elf");
    std::fs::write(&image, &bytes).expect("write");
    let out = within(
        Duration::from_secs(20),
        &["run", image.to_str().expect("utf-8"), "--mem", "8M", "--stats-json", json.to_str().expect("utf-8")],
    );
    refused_in_one_line(&out, "does not fit");
    assert!(!json.exists(), "a refused run left {}", json.display());
    // An earlier file is kept as it was.
    std::fs::write(&json, "{\"earlier\": 1}\n").expect("write");
    let out = within(Duration::from_secs(20), &["run", "/dev/zero", "--stats-json", json.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&json).expect("kept"), "{\"earlier\": 1}\n");
}

#[test]
fn an_elf_version_other_than_current_is_refused() {
    let mut bytes = guest_images::find("hello").expect("hello").elf.to_vec();
    bytes[20..24].copy_from_slice(&2u32.to_le_bytes());
    let path = scratch("version2.elf");
    std::fs::write(&path, &bytes).expect("write");
    let out = within(Duration::from_secs(20), &["run", path.to_str().expect("utf-8")]);
    refused_in_one_line(&out, "ELF version 2");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_ending_signal_ends_a_kernel_run_cleanly_with_the_host_ksm_given_back() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _host_ksm = HOST_KSM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (sig, name) in [(libc::SIGHUP, "SIGHUP"), (libc::SIGQUIT, "SIGQUIT"), (libc::SIGTERM, "SIGTERM")] {
        let before = host_knobs();
        let json = scratch(&format!("signal-{name}.json"));
        let mut child = vmm()
            .args(["run", "misbehave-spin", "--mem", "8M", "--dedup", "kernel", "--ksm-run", "1", "--stats-json"])
            .arg(&json)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(800));
        // SAFETY: a standard signal to our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(3), "{name}: ended by the signal instead of cleanly");
        let stats: vmm::stats::RunStats =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("stats")).expect("schema 1");
        assert_eq!(stats.guest.end.reason, "interrupted", "{name}");
        assert!(stats.guest.end.detail.contains(name), "{name}: {}", stats.guest.end.detail);
        assert_eq!(host_knobs(), before, "{name} left the host's KSM changed");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_kernel_pass_over_a_few_pages_reaches_its_fixpoint() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _host_ksm = HOST_KSM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // pagefill over 8 pages: ksmd makes many scans between two looks.
    let run = common::run("pagefill", &["--mem", "2080K", "--dedup", "kernel"]);
    assert_eq!(run.stats.guest.exit_code, Some(0), "{}", run.stats.guest.end.detail);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_signal_during_a_kernel_pass_ends_the_run_as_interrupted() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _host_ksm = HOST_KSM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = host_knobs();
    let json = scratch("signal-in-pass.json");
    // converge fills 256 MiB with ksmd stopped (run 0), then asks for a
    // pass, which runs ksmd (run 1) for a few hundred milliseconds.
    let mut child = vmm()
        .args(["run", "converge", "--mem", "257M", "--dedup", "kernel", "--stats-json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string("/sys/kernel/mm/ksm/run").is_ok_and(|r| r.trim() != "1") {
        assert!(Instant::now() < deadline, "the pass never started");
        assert!(child.try_wait().expect("wait").is_none(), "the run ended before its pass");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: a standard signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let stats: vmm::stats::RunStats =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("stats")).expect("schema 1");
    assert_eq!(status.code(), Some(3));
    assert_eq!(stats.guest.end.reason, "interrupted", "{}", stats.guest.end.detail);
    assert_eq!(host_knobs(), before, "the host's KSM was not given back");
}
