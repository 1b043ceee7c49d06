//! Build script: writes the ABI's numbers for the assembler, the C compiler
//! and the linker, then builds every image into the static ELF64 executable
//! `$OUT_DIR/<name>.elf` (plus a link map `$OUT_DIR/<name>.map`), which
//! `src/images.rs` embeds with `include_bytes!`. No binary is checked in.
//!
//! * `asm/<name>.S`: assembled with GNU `as` and linked with `ld -T link.ld`.
//!   Plain GNU as (Intel syntax, no C preprocessor); they include the
//!   hand-written `asm/abi.inc` (which includes `abi-numbers.inc`) and, for
//!   the workloads, `asm/workload.inc`.
//! * `c/<name>.c`: compiled and linked in one `cc` call with the C guest kit
//!   of `c/kit/` (its `start.S`, `support.c` and `ksmlab.ld`), with the flags
//!   of `c/kit/cflags` (the ones `c/kit/ksmlab-cc` gives a user's guest) plus
//!   [`BUILTIN_CFLAGS`].
//!
//! The numbers come from `src/abi/numbers.rs`, the one place they are
//! defined (the crate's `abi` module includes the same file):
//! `$OUT_DIR/abi-numbers.inc` holds one `.set` line each,
//! `$OUT_DIR/ksmlab-abi.h` one `#define KSMLAB_<name>` each, and
//! `$OUT_DIR/abi-numbers.ld` the image base for both linker scripts. The
//! tools can be overridden with the environment variables `GUEST_IMAGES_AS`,
//! `GUEST_IMAGES_LD` and `GUEST_IMAGES_CC` (e.g. `x86_64-linux-gnu-as` on a
//! non-x86 host).

use std::env;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The ABI's numbers, from the file the crate's `abi` module includes too.
#[allow(dead_code, unreachable_pub)]
mod abi {
    include!("src/abi/numbers.rs");
}

/// The numbers the C guests share with their models, from the file that is
/// the crate's `guest_numbers` module.
#[allow(dead_code, unreachable_pub)]
mod guest_numbers {
    include!("src/guest_numbers.rs");
}

/// Flags the built-in C guests get on top of `c/kit/cflags`: warnings, and
/// no SSE or x87 at all, so that every memory access they make is one KVM's
/// instruction emulator can perform. The memslot view completes the first
/// access to a page the secondary MMU zapped by emulating it, and KVM's
/// emulator has the SSE moves (`movdqu`, `movaps`, ...) but not SSE
/// arithmetic on memory (`paddq xmm, m128`), which GCC's vectorizer emits at
/// -O2 (guest-images/README.md, "The C guest kit"). A user's guest may use
/// SSE as the ABI allows.
const BUILTIN_CFLAGS: &[&str] = &["-Wall", "-Wextra", "-mgeneral-regs-only"];

/// Where build.rs reads and writes.
struct Paths {
    asm_dir: PathBuf,
    link_script: PathBuf,
    /// The built-in C guests (`c/<name>.c`) and the headers they share.
    c_dir: PathBuf,
    /// The C guest kit: ksmlab.h, start.S, support.c, ksmlab.ld, cflags.
    kit_dir: PathBuf,
    out_dir: PathBuf,
}

/// The assembler, the linker, the C compiler, and what the linker supports.
struct Tools {
    assembler: String,
    linker: String,
    compiler: String,
    /// ld >= 2.39 warns about our single RWX segment; older ld lacks the switch.
    quiet_rwx: bool,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let paths = Paths {
        asm_dir: manifest_dir.join("asm"),
        link_script: manifest_dir.join("link.ld"),
        c_dir: manifest_dir.join("c"),
        kit_dir: manifest_dir.join("c/kit"),
        out_dir: PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")),
    };

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", manifest_dir.join("src/abi/numbers.rs").display());
    println!("cargo:rerun-if-changed={}", manifest_dir.join("src/guest_numbers.rs").display());
    println!("cargo:rerun-if-changed={}", paths.link_script.display());
    for var in ["GUEST_IMAGES_AS", "GUEST_IMAGES_LD", "GUEST_IMAGES_CC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    write_file(&paths.out_dir.join("abi-numbers.inc"), &asm_numbers());
    write_file(&paths.out_dir.join("ksmlab-abi.h"), &c_numbers());
    write_file(&paths.out_dir.join("guest-numbers.h"), &guest_numbers_header());
    write_file(&paths.out_dir.join("abi-numbers.ld"), &ld_numbers());

    let linker = env::var("GUEST_IMAGES_LD").unwrap_or_else(|_| "ld".to_owned());
    let tools = Tools {
        assembler: env::var("GUEST_IMAGES_AS").unwrap_or_else(|_| "as".to_owned()),
        quiet_rwx: linker_supports(&linker, "--no-warn-rwx-segments"),
        linker,
        compiler: env::var("GUEST_IMAGES_CC").unwrap_or_else(|_| "cc".to_owned()),
    };
    for source in sources(&paths.asm_dir, "S") {
        build_asm_image(&tools, &paths, &source);
    }
    watch(&paths.kit_dir);
    let cflags = read_cflags(&paths.kit_dir.join("cflags"));
    for source in sources(&paths.c_dir, "c") {
        build_c_image(&tools, &paths, &cflags, &source);
    }
}

/// The files of `dir`, sorted; each (source or include alike) and the
/// directory itself are a reason to rebuild when they change.
fn watch(dir: &Path) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable source directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    entries.sort();
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    entries
}

/// The files of `dir` whose extension is `ext`, sorted (all of them watched).
fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut entries = watch(dir);
    entries.retain(|p| p.extension() == Some(OsStr::new(ext)));
    entries
}

/// Each number's doc comment, as `prefix`ed lines, then `line(name, value)`.
fn numbers_text(heading: &str, prefix: &str, line: impl Fn(&str, u64) -> String) -> String {
    let mut text = heading.to_owned();
    for number in abi::NUMBERS {
        text.push('\n');
        for doc in number.doc.lines() {
            writeln!(text, "{prefix}{doc}").expect("writing to a String");
        }
        text.push_str(&line(number.name, number.value));
    }
    text
}

/// The GNU as include of the ABI's numbers: each doc comment, then its
/// `.set NAME, VALUE` line.
fn asm_numbers() -> String {
    let heading = format!(
        "# abi-numbers.inc - the numbers of the tiny-guest ABI, version {}.{}, for GNU as.\n\
         # Generated by guest-images/build.rs from guest-images/src/abi/numbers.rs\n\
         # (the Rust crate's guest_images::abi): do not edit. asm/abi.inc includes it.\n",
        abi::ABI_VERSION_MAJOR,
        abi::ABI_VERSION_MINOR
    );
    numbers_text(&heading, "#", |name, value| format!("        .set {name}, {value:#x}\n"))
}

/// The C header of the ABI's numbers, for C and for assembly through the C
/// preprocessor: each doc comment, then `#define KSMLAB_NAME VALUE`.
fn c_numbers() -> String {
    let heading = format!(
        "/* ksmlab-abi.h - the numbers of the tiny-guest ABI, version {}.{}, for C.\n \
         * Generated by guest-images/build.rs from guest-images/src/abi/numbers.rs\n \
         * (the Rust crate's guest_images::abi): do not edit. c/kit/ksmlab.h and\n \
         * c/kit/start.S include it. Each name is the Rust one with KSMLAB_ before it. */\n\
         #ifndef KSMLAB_ABI_H\n#define KSMLAB_ABI_H\n",
        abi::ABI_VERSION_MAJOR,
        abi::ABI_VERSION_MINOR
    );
    let mut text = numbers_text(&heading, "//", |name, value| format!("#define KSMLAB_{name} {value:#x}\n"));
    text.push_str("\n#endif /* KSMLAB_ABI_H */\n");
    text
}

/// The C header of the built-in C guests' own numbers: `#define NAME VALUE`.
fn guest_numbers_header() -> String {
    let mut text = String::from(
        "/* guest-numbers.h - the numbers the built-in C guests share with their Rust models.\n \
         * Generated by guest-images/build.rs from guest-images/src/guest_numbers.rs: do not\n \
         * edit. c/guest.h includes it. */\n\
         #ifndef GUEST_NUMBERS_H\n#define GUEST_NUMBERS_H\n\n",
    );
    for (name, value) in guest_numbers::GUEST_NUMBERS {
        writeln!(text, "#define {name} {value:#x}ULL").expect("writing to a String");
    }
    text.push_str("\n#endif /* GUEST_NUMBERS_H */\n");
    text
}

/// The linker-script fragment `link.ld` and `c/kit/ksmlab.ld` include:
/// where images are linked.
fn ld_numbers() -> String {
    format!(
        "/* abi-numbers.ld - generated by guest-images/build.rs from\n   \
         guest-images/src/abi/numbers.rs: do not edit. link.ld includes it. */\n\
         GUEST_BASE = {:#x};\n",
        abi::GUEST_BASE
    )
}

/// The flags of `c/kit/cflags`: one a line, `#` lines and blank ones skipped.
fn read_cflags(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

/// Writes `text` to `path`, or panics saying where.
fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("guest-images: cannot write {}: {e}", path.display()));
}

/// The image name of a source file: its stem.
fn image_name(source: &Path) -> &str {
    source.file_stem().and_then(OsStr::to_str).expect("source names are UTF-8")
}

/// Assembles `source` and links it into `$OUT_DIR/<name>.elf`.
fn build_asm_image(tools: &Tools, paths: &Paths, source: &Path) {
    let name = image_name(source);
    let object = paths.out_dir.join(format!("{name}.o"));
    let elf = paths.out_dir.join(format!("{name}.elf"));
    let map = paths.out_dir.join(format!("{name}.map"));

    let mut assemble = Command::new(&tools.assembler);
    assemble.args(["--64", "--noexecstack"]).arg("-I").arg(&paths.asm_dir).arg("-I").arg(&paths.out_dir);
    assemble.arg("-o").arg(&object).arg(source);
    run(&mut assemble, &tools.assembler, name);

    let mut link = Command::new(&tools.linker);
    // -L first: ld reads the script, and its INCLUDE, as soon as it meets -T.
    link.arg("-L").arg(&paths.out_dir).arg("-T").arg(&paths.link_script);
    link.args(["-static", "-nostdlib", "-z", "noexecstack", "--build-id=none"]);
    if tools.quiet_rwx {
        link.arg("--no-warn-rwx-segments");
    }
    link.arg("-Map").arg(&map).arg("-o").arg(&elf).arg(&object);
    run(&mut link, &tools.linker, name);
}

/// Compiles `source` with the kit's start file and support file and links
/// them into `$OUT_DIR/<name>.elf`, in one `cc` call.
fn build_c_image(tools: &Tools, paths: &Paths, cflags: &[String], source: &Path) {
    let name = image_name(source);
    let elf = paths.out_dir.join(format!("{name}.elf"));
    let map = paths.out_dir.join(format!("{name}.map"));

    let mut cc = Command::new(&tools.compiler);
    cc.args(cflags).args(BUILTIN_CFLAGS);
    cc.arg("-I").arg(&paths.kit_dir).arg("-I").arg(&paths.c_dir).arg("-I").arg(&paths.out_dir);
    // -L first: ld reads the script, and its INCLUDE, as soon as it meets -T.
    cc.arg("-L").arg(&paths.out_dir).arg("-T").arg(paths.kit_dir.join("ksmlab.ld"));
    if tools.quiet_rwx {
        cc.arg("-Wl,--no-warn-rwx-segments");
    }
    cc.arg(format!("-Wl,-Map,{}", map.display())).arg("-o").arg(&elf);
    cc.arg(paths.kit_dir.join("start.S")).arg(paths.kit_dir.join("support.c")).arg(source);
    run(&mut cc, &tools.compiler, name);
}

/// Runs `cmd`; panics with a useful message if `tool` is missing or fails.
/// Anything the tool prints on success is passed on as a cargo warning.
fn run(cmd: &mut Command, tool: &str, image: &str) {
    let output = spawn(cmd, tool);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!("guest-images: `{tool}` failed for image `{image}` ({}):\n{cmd:?}\n{stderr}", output.status);
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={image}: {line}");
    }
}

/// Starts `cmd` and collects its output; a missing tool is a clear panic.
fn spawn(cmd: &mut Command, tool: &str) -> Output {
    match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "guest-images: `{tool}` not found: install GNU binutils (`as` and `ld`) and a C compiler \
             (`cc`), e.g. `apt-get install binutils gcc`, to build the guest images, or point \
             GUEST_IMAGES_AS / GUEST_IMAGES_LD / GUEST_IMAGES_CC at an x86-64 assembler, linker and compiler"
        ),
        Err(e) => panic!("guest-images: cannot run `{tool}`: {e}"),
    }
}

/// Whether `linker --help` mentions `option`.
fn linker_supports(linker: &str, option: &str) -> bool {
    let output = spawn(Command::new(linker).arg("--help"), linker);
    String::from_utf8_lossy(&output.stdout).contains(option)
}
