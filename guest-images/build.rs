//! Build script: assembles every `asm/<name>.S` with GNU `as` and links it
//! with `ld -T link.ld` into the static ELF64 executable
//! `$OUT_DIR/<name>.elf` (plus a link map `$OUT_DIR/<name>.map`), which
//! `src/lib.rs` embeds with `include_bytes!`. No binary is checked in.
//!
//! The sources are plain GNU as (Intel syntax, no C preprocessor) and share
//! `asm/abi.inc`. The tools can be overridden with the environment variables
//! `GUEST_IMAGES_AS` and `GUEST_IMAGES_LD` (e.g. `x86_64-linux-gnu-as` on a
//! non-x86 host).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let asm_dir = manifest_dir.join("asm");
    let link_script = manifest_dir.join("link.ld");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", link_script.display());
    println!("cargo:rerun-if-changed={}", asm_dir.display());
    println!("cargo:rerun-if-env-changed=GUEST_IMAGES_AS");
    println!("cargo:rerun-if-env-changed=GUEST_IMAGES_LD");

    let assembler = env::var("GUEST_IMAGES_AS").unwrap_or_else(|_| "as".to_owned());
    let linker = env::var("GUEST_IMAGES_LD").unwrap_or_else(|_| "ld".to_owned());

    let mut entries: Vec<PathBuf> = fs::read_dir(&asm_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", asm_dir.display()))
        .map(|entry| entry.expect("readable asm/ directory entry").path())
        .collect();
    entries.sort();
    for path in &entries {
        // Every file there is a source or an include: rebuild when any changes.
        println!("cargo:rerun-if-changed={}", path.display());
    }

    // ld >= 2.39 warns about our single RWX segment; older ld lacks the switch.
    let quiet_rwx = linker_supports(&linker, "--no-warn-rwx-segments");

    let sources = entries.iter().filter(|p| p.extension() == Some(OsStr::new("S")));
    for source in sources {
        let name = source.file_stem().and_then(OsStr::to_str).expect("asm source names are UTF-8");
        let object = out_dir.join(format!("{name}.o"));
        let elf = out_dir.join(format!("{name}.elf"));
        let map = out_dir.join(format!("{name}.map"));

        let mut assemble = Command::new(&assembler);
        assemble.arg("--64").arg("--noexecstack").arg("-I").arg(&asm_dir).arg("-o").arg(&object).arg(source);
        run(&mut assemble, &assembler, name);

        let mut link = Command::new(&linker);
        link.arg("-T").arg(&link_script).args(["-static", "-nostdlib", "-z", "noexecstack", "--build-id=none"]);
        if quiet_rwx {
            link.arg("--no-warn-rwx-segments");
        }
        link.arg("-Map").arg(&map).arg("-o").arg(&elf).arg(&object);
        run(&mut link, &linker, name);
    }
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
            "guest-images: `{tool}` not found: install GNU binutils (`as` and `ld`, \
             e.g. `apt-get install binutils`) to build the guest images, or point \
             GUEST_IMAGES_AS / GUEST_IMAGES_LD at an x86-64 assembler and linker"
        ),
        Err(e) => panic!("guest-images: cannot run `{tool}`: {e}"),
    }
}

/// Whether `linker --help` mentions `option`.
fn linker_supports(linker: &str, option: &str) -> bool {
    let output = spawn(Command::new(linker).arg("--help"), linker);
    String::from_utf8_lossy(&output.stdout).contains(option)
}
