//! Bad input is refused before anything runs: one line on standard error
//! that says what is wrong, a non-zero status (2), and no guest output.
//! None of these needs KVM except where said: the checks come first.

mod common;

use common::{scratch, vmm};

/// Runs `vmm ARGS` and checks it was refused with one line containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = vmm().args(args).output().expect("spawn vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "`vmm {}` must be refused; stderr: {stderr}", args.join(" "));
    assert_eq!(stderr.lines().count(), 1, "exactly one line for `vmm {}`, got: {stderr}", args.join(" "));
    assert!(stderr.starts_with("vmm: error: "), "{stderr}");
    assert!(stderr.contains(needle), "`vmm {}`: expected '{needle}' in: {stderr}", args.join(" "));
    assert!(out.stdout.is_empty(), "nothing may run: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"));
}

/// Writes `bytes` to a scratch file and returns its path.
fn image_file(name: &str, bytes: &[u8]) -> String {
    let path = scratch(name);
    std::fs::write(&path, bytes).expect("write image");
    path.display().to_string()
}

/// The built-in `hello` ELF with `patch` applied.
fn patched_hello(patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = guest_images::find("hello").expect("hello").elf.to_vec();
    patch(&mut bytes);
    bytes
}

/// Byte offset of the first program header's field at `field` (ELF64 layout).
fn phdr_field(bytes: &[u8], field: usize) -> usize {
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().expect("e_phoff"));
    phoff as usize + field
}

#[test]
fn a_missing_image_is_refused() {
    refused(&["run", "/nonexistent/guest.elf"], "no image");
    refused(&["run", "no-such-builtin"], "vmm images");
}

#[test]
fn a_non_elf_image_is_refused() {
    let path = image_file("script.sh", b"#!/bin/sh\necho hi\n");
    refused(&["run", &path], "not an ELF");
    let path = image_file("empty", b"");
    refused(&["run", &path], "not an ELF");
}

#[test]
fn a_non_x86_64_or_32_bit_image_is_refused() {
    let aarch64 = patched_hello(|b| b[18..20].copy_from_slice(&183u16.to_le_bytes()));
    refused(&["run", &image_file("aarch64.elf", &aarch64)], "not x86-64");
    let elf32 = patched_hello(|b| b[4] = 1);
    refused(&["run", &image_file("elf32.elf", &elf32)], "not a 64-bit ELF");
    let truncated = patched_hello(|b| b.truncate(40));
    refused(&["run", &image_file("truncated.elf", &truncated)], "truncated");
}

#[test]
fn segments_below_1mib_or_outside_ram_are_refused() {
    let low = patched_hello(|b| {
        let at = phdr_field(b, 24); // p_paddr
        b[at..at + 8].copy_from_slice(&0x8_0000u64.to_le_bytes());
    });
    refused(&["run", &image_file("low.elf", &low)], "below 1 MiB");
    let high = patched_hello(|b| {
        let at = phdr_field(b, 24);
        b[at..at + 8].copy_from_slice(&(3u64 << 20).to_le_bytes());
    });
    refused(&["run", &image_file("high.elf", &high), "--mem", "2M"], "does not fit");
    // The same image fits once RAM is larger, so the check is RAM-relative.
    let huge = patched_hello(|b| {
        let at = phdr_field(b, 40); // p_memsz
        b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    refused(&["run", &image_file("huge.elf", &huge)], "does not fit");
}

#[test]
fn impossible_ram_sizes_are_refused() {
    refused(&["run", "hello", "--mem", "0"], "zero");
    refused(&["run", "hello", "--mem", "4097"], "multiple of 4 KiB");
    refused(&["run", "hello", "--mem", "1M"], "2 MiB minimum");
    refused(&["run", "hello", "--mem", "63G"], "this host");
    refused(&["run", "hello", "--mem", "1024G"], "64 GiB");
    refused(&["run", "hello", "--mem", "lots"], "not a size");
    refused(&["run", "hello", "--mem", "99999999999999G"], "too large");
}

#[test]
fn a_missing_or_unusable_kvm_device_is_refused() {
    refused(&["--kvm", "/nonexistent/kvm", "run", "hello"], "does not exist");
    refused(&["--kvm", "/dev/null", "run", "hello"], "not a KVM device");
}

#[test]
fn bad_timeouts_and_unwritable_stats_files_are_refused() {
    refused(&["run", "hello", "--timeout", "-1"], "positive");
    refused(&["run", "hello", "--timeout", "soon"], "not a number");
    refused(&["run", "hello", "--stats-json", "/nonexistent/dir/s.json"], "--stats-json");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_run_that_fails_to_start_leaves_an_existing_stats_file_alone() {
    common::require_kvm();
    let stats = common::scratch("kept-stats.json");
    let not_a_socket = common::scratch("kept-stats-not-a-socket");
    std::fs::write(&stats, "{\"earlier\": 1}\n").expect("write");
    std::fs::write(&not_a_socket, "").expect("write");
    let (stats_arg, control_arg) = (stats.to_string_lossy(), not_a_socket.to_string_lossy());
    // The control socket is set up after the statistics file is opened.
    refused(&["run", "hello", "--stats-json", &stats_arg, "--control", &control_arg], "not a socket");
    assert_eq!(std::fs::read_to_string(&stats).expect("read"), "{\"earlier\": 1}\n");
}

#[test]
fn bench_sample_counts_that_overflow_are_refused() {
    let max = u64::MAX.to_string();
    refused(&["bench", "--exits", &max], "--exits");
    refused(&["bench", "--warmup", &max, "--exits", "1"], "--warmup");
    refused(&["bench", "--exits", "0"], "--exits");
}

#[test]
fn out_of_range_ksm_knobs_are_refused_whatever_the_policy() {
    refused(&["run", "hello", "--ksm-run", "5"], "ksm knob run");
    refused(&["run", "hello", "--dedup", "change-pte", "--max-page-sharing", "1"], "max_page_sharing");
    refused(&["run", "hello", "--pages-to-scan", "0"], "pages_to_scan");
    refused(&["run", "hello", "--use-zero-pages", "2"], "--use-zero-pages");
}

/// `--guests` past what the VMM runs or the host holds is refused before
/// any run, by every command that takes it (no KVM needed).
#[test]
fn impossible_fleets_are_refused_before_any_run() {
    let out = std::env::temp_dir().join(format!("vmm-bad-fleet-{}", std::process::id()));
    let out = out.to_str().expect("utf-8");
    for cmd in [&["run", "hello"][..], &["compare", "hello", "--out", out][..], &["bench", "dedup"][..]] {
        for (guests, mem, says) in
            [("0", "4M", "at least one guest"), ("65", "4M", "more than the VMM runs"), ("64", "1G", "than this host")]
        {
            let args: Vec<&str> = cmd.iter().copied().chain(["--guests", guests, "--mem", mem]).collect();
            refused(&args, says);
        }
    }
}
