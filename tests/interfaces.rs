//! The interfaces people read and scripts parse, on real KVM: phase names
//! (port 0x504), the exit times and units in the statistics, `--stats-json -`
//! and `--format`, the control socket's JSON lines and `vmm ctl watch`,
//! `compare --out`'s ownership of its directory, the chart rendered to
//! pixels, and `vmm report`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::stats::RunStats;

mod common;

use common::require_kvm;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// A fresh path under this test binary's scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-interfaces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let _ = std::fs::remove_file(&path);
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn output(args: &[&str]) -> Output {
    vmm().args(args).output().expect("spawn vmm")
}

/// A static ELF64 image with one PT_LOAD at 1 MiB holding `code`, then
/// `data` (whose address is returned by `layout` before the code is known).
fn elf(code: &[u8], data: &[u8]) -> Vec<u8> {
    let mut image = code.to_vec();
    image.resize(DATA_OFFSET, 0x90);
    image.extend_from_slice(data);
    common::guests::static_elf(&image, 7)
}

/// Where a guest's data starts: 1 MiB + this.
const DATA_OFFSET: usize = 0x200;

/// `mov edx, port; mov eax, value; out dx, eax`.
fn out32(port: u16, value: u32) -> Vec<u8> {
    let mut c = vec![0xBA];
    c.extend(u32::from(port).to_le_bytes());
    c.push(0xB8);
    c.extend(value.to_le_bytes());
    c.push(0xEF);
    c
}

/// A guest that names its phases (port 0x504) and sends the VMM four names
/// it must refuse: phase 0 unnamed; phase 1 "fill, then read" (with the
/// refusals: an address in the low megabyte, a 64-byte name, a name with a
/// newline, an 8-bit write); phase 2 unnamed; phase 3 named twice (the
/// second name stays); exit 0.
fn naming_guest() -> Vec<u8> {
    let names: [&[u8]; 5] = [b"fill, then read\0", &[b'x'; 64], b"two\nlines\0", b"third\0", b"third, renamed\0"];
    let mut data = Vec::new();
    let mut addr = Vec::new();
    for n in names {
        addr.push(0x10_0000 + (DATA_OFFSET + data.len()) as u32);
        data.extend_from_slice(n);
    }
    data.push(0);
    let mut code = out32(0x500, 1);
    code.extend(out32(0x504, addr[0]));
    code.extend(out32(0x504, 0x1000));
    code.extend(out32(0x504, addr[1]));
    code.extend(out32(0x504, addr[2]));
    code.extend([0xBA, 0x04, 0x05, 0, 0, 0xB0, 0x01, 0xEE]); // mov edx, 0x504; mov al, 1; out dx, al
    code.extend(out32(0x500, 2));
    code.extend(out32(0x500, 3));
    code.extend(out32(0x504, addr[3]));
    code.extend(out32(0x504, addr[4]));
    code.extend(out32(0xF4, 0));
    code.push(0xF4); // hlt
    assert!(code.len() <= DATA_OFFSET);
    elf(&code, &data)
}

/// Runs `vmm run IMAGE ARGS --stats-json -` and parses standard output.
fn run_json(image: &str, args: &[&str]) -> (RunStats, Output) {
    let out = vmm().arg("run").arg(image).args(args).args(["--stats-json", "-"]).output().expect("spawn");
    let stats = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the statistics alone ({e}); stderr: {}", text(&out.stderr)));
    (stats, out)
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn phases_carry_the_names_the_guest_gave_and_bad_names_are_refused_in_a_few_notes() {
    require_kvm();
    let image = scratch("naming.elf");
    std::fs::write(&image, naming_guest()).expect("write the guest");
    let (stats, out) = run_json(image.to_str().expect("utf-8"), &["--mem", "4M"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let names: Vec<(u32, Option<&str>)> = stats.phases.iter().map(|p| (p.phase, p.name.as_deref())).collect();
    assert_eq!(names, [(0, None), (1, Some("fill, then read")), (2, None), (3, Some("third, renamed"))]);
    let refusals: Vec<&str> = stderr.lines().filter(|l| l.contains("port 0x504")).collect();
    assert_eq!(refusals.len(), 3, "the first three refusals are noted: {stderr}");
    assert!(refusals[0].contains("0x1000") && refusals[0].contains("low megabyte"), "{}", refusals[0]);
    assert!(refusals[1].contains("longer than 63 bytes") && refusals[2].contains("not printable"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("phase names refused; no longer printed")).count(), 1);
    // Every write to the port is an io exit, named or refused, in the
    // phase it was written in.
    let named = &stats.phases[1].figures.exit_times["io:phase_name"];
    assert_eq!(named.samples, 5, "one good name, four refused");
    assert_eq!(stats.phases[3].figures.exit_times["io:phase_name"].samples, 2);
    // The JSON of a phase without a name has no "name" key.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["phases"][0].get("name").is_none() && v["phases"][1]["name"] == "fill, then read");
}

/// The exits counted by reason in `f` are the samples timed by event.
fn assert_times_match_counts(f: &vmm::stats::Figures, what: &str) {
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    for (event, t) in &f.exit_times {
        let reason = event.split(':').next().unwrap_or(event);
        *by_reason.entry(reason.to_string()).or_default() += t.samples;
        // Every event is timed, the userfaultfd view's faults too (from
        // the fault thread's taking them to the handler's return).
        assert!(t.total_ns.is_some(), "{what}: {event} not timed: {t:?}");
        if let (Some(min), Some(max), Some(total)) = (t.min_ns, t.max_ns, t.total_ns) {
            assert!(min <= max && min * t.samples <= total && total <= max * t.samples, "{what}: {event} {t:?}");
        }
    }
    for (reason, n) in f.exits.columns() {
        if reason != "total" {
            assert_eq!(by_reason.get(reason).copied().unwrap_or(0), n, "{what}: {reason}");
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_exit_is_timed_under_its_event_and_every_figure_has_a_unit() {
    require_kvm();
    for view in ["memslot", "uffd"] {
        let (stats, out) = run_json("pagefill", &["--mem", "8M", "--dedup", "range-flush", "--view", view]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        for p in &stats.phases {
            assert_times_match_counts(&p.figures, &format!("{view} phase {}", p.phase));
        }
        assert_times_match_counts(&stats.total, &format!("{view} total"));
        // pagefill's reads after the merge: one refault per merged page,
        // an exit under the memslot view, a fault-thread fault under uffd.
        let reads = if view == "memslot" { "ept_read" } else { "ept_read:uffd" };
        let n = (8u64 << 20) / 4096 - 512;
        assert_eq!(stats.phases[3].figures.exit_times[reads].samples, n, "{view}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        for (i, f) in v["phases"].as_array().expect("phases").iter().chain([&v["total"]]).enumerate() {
            let mut names = vec!["wall_ns".to_string()];
            for section in ["exits", "shadow_mmu", "ksm", "kvm"] {
                names.extend(f[section].as_object().expect("section").keys().map(|k| format!("{section}.{k}")));
            }
            for name in names {
                let unit = &v["units"][&name];
                assert!(unit["unit"].is_string() && unit["kind"].is_string(), "{view} #{i}: {name} has no unit");
            }
        }
        assert_eq!(v["units"]["kvm.pages_4k"]["kind"], "level", "from KVM's descriptor");
        assert_eq!(v["units"]["wall_ns"]["unit"], "ns");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn stats_json_dash_and_formats_leave_stdout_to_the_document() {
    require_kvm();
    let (stats, out) = run_json("hello", &[]);
    assert_eq!(stats.guest.exit_code, Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with(guest_images::HELLO_MESSAGE), "the console goes to stderr: {stderr}");
    assert!(stderr.contains("VM exits by reason") && stderr.contains("VM-EXIT"), "the table too: {stderr}");
    assert!(!Path::new("-").exists(), "no file named -");

    let json = output(&["run", "hello", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--format json: stdout is JSON");
    assert_eq!(v["schema"], 1);
    let csv = output(&["run", "hello", "--format", "csv"]);
    let csv = text(&csv.stdout);
    assert!(csv.starts_with("position,phase,name,figure,value,unit,kind\n"), "{csv}");
    assert!(csv.contains(",,total,exits.io,25,exits,count\n"), "{csv}");

    let both = output(&["run", "hello", "--stats-json", "-", "--format", "json"]);
    assert_eq!(both.status.code(), Some(2));
    assert!(text(&both.stderr).contains("both write standard output"));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn bench_and_compare_take_the_formats_too() {
    require_kvm();
    let out = output(&["bench", "--exits", "1000", "--warmup", "10"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json by default");
    assert_eq!(v["units"]["median_ns"], serde_json::json!({"unit": "ns", "kind": "time"}));
    let out = output(&["bench", "--exits", "1000", "--warmup", "10", "--format", "csv", "--quiet"]);
    let csv = text(&out.stdout);
    assert!(csv.starts_with("figure,value,unit,kind\n") && csv.contains("port_io_exit.samples,1000,samples,count"));
    assert!(out.stderr.is_empty(), "--quiet: {}", text(&out.stderr));
}

/// Waits up to `limit` for `ok`.
fn poll_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ok()
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_control_socket_greets_with_its_version_and_watch_follows_the_run_to_its_end() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm();
    let socket = scratch("mixed.sock");
    let mut run = vmm()
        .args(["run", "mixed", "--mem", "16M", "--dedup", "range-flush", "--no-table", "--control"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm run");
    assert!(poll_until(Duration::from_secs(30), || socket.exists()), "no control socket");
    // The wire: a greeting, then one JSON reply per request.
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    let greeting: serde_json::Value = serde_json::from_str(&line).expect("greeting is JSON");
    assert_eq!((greeting["protocol"].as_str(), greeting["version"].as_u64()), (Some("vmm-control"), Some(1)));
    writeln!(&stream, "status").expect("request");
    line.clear();
    reader.read_line(&mut line).expect("reply");
    let status: serde_json::Value = serde_json::from_str(&line).expect("reply is JSON");
    assert_eq!(status["ok"], true);
    assert!(status["exits"]["io"].as_u64().is_some() && status["kvm"].is_object(), "{status}");
    let watch = vmm().arg("ctl").arg(&socket).args(["watch", "--interval", "50"]).output().expect("spawn watch");
    let frames = text(&watch.stdout);
    assert_eq!(watch.status.code(), Some(0), "{}", text(&watch.stderr));
    assert!(frames.matches("vmm statistics - range-flush policy").count() >= 2, "{frames}");
    assert!(frames.contains("CurAvg/s") && frames.contains("io:phase"), "{frames}");
    assert!(frames.trim_end().ends_with("vmm ctl: the run ended"), "{frames}");
    assert_eq!(run.wait().expect("wait").code(), Some(0));
}

/// An SVG rendered to a PNG next to it; the pixels, for checks.
fn svg_to_png(svg: &Path) -> resvg::tiny_skia::Pixmap {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    // plotters asks for "sans-serif"; fontdb maps it to Arial unless told.
    opt.fontdb_mut().set_sans_serif_family("DejaVu Sans");
    let tree = resvg::usvg::Tree::from_str(&std::fs::read_to_string(svg).expect("svg"), &opt).expect("valid SVG");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("pixmap");
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.save_png(svg.with_extension("png")).expect("write the PNG");
    pixmap
}

/// Share of pixels that are not white.
fn ink(p: &resvg::tiny_skia::Pixmap) -> f64 {
    let inked =
        p.pixels().iter().filter(|c| c.alpha() > 0 && (c.red(), c.green(), c.blue()) != (255, 255, 255)).count();
    inked as f64 / p.pixels().len() as f64
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn compare_owns_its_out_directory_draws_its_chart_and_report_renders_it() {
    require_kvm();
    let out = scratch("compare-own");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("notes.txt"), "mine").expect("write");
    let args = [
        "compare",
        "pagefill",
        "--mem",
        "8M",
        "--repeat",
        "1",
        "--policies",
        "off,change-pte,range-flush",
        "--view",
        "memslot",
    ];
    let refused = vmm().args(args).arg("--out").arg(&out).output().expect("spawn");
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(text(&refused.stderr).lines().count(), 1, "{}", text(&refused.stderr));
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).expect("left alone"), "mine");
    std::fs::remove_file(out.join("notes.txt")).expect("rm");
    for _ in 0..2 {
        let done = vmm().args(args).arg("--out").arg(&out).output().expect("spawn");
        assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
        assert!(done.stderr.is_empty(), "no progress when stderr is not a terminal: {}", text(&done.stderr));
        std::fs::write(out.join("runs/extra.json"), "{}").expect("write");
    }
    // The second comparison replaced the first whole: its stray file is gone.
    let runs: Vec<_> = std::fs::read_dir(out.join("runs")).expect("runs").flatten().map(|e| e.file_name()).collect();
    assert_eq!(runs.len(), 4, "three runs and the file written after: {runs:?}");
    let pixels = svg_to_png(&out.join("compare.svg"));
    assert!(ink(&pixels) > 0.05, "compare.svg rendered nearly blank");
    eprintln!("chart: {}", out.join("compare.png").display());

    let report = output(&["report", out.to_str().expect("utf-8"), "--charts", out.to_str().expect("utf-8")]);
    let md = text(&report.stdout);
    assert_eq!(report.status.code(), Some(0), "{}", text(&report.stderr));
    let row = md.lines().find(|l| l.starts_with("| range-flush | memslot |")).expect("range-flush row");
    // Every merged page (1,536 at 8 MiB) refaults on the two reads and breaks on the write.
    assert!(row.contains("| 4,608 |"), "{row}");
    assert!(md.contains("![pagefill") && out.join("pagefill.svg").exists(), "{md}");
}
