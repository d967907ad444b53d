//! Compiles the C datapath into a BPF object with clang. Missing tools fail the
//! build with one line that names the Debian packages to install.
use std::{env, path::PathBuf, process::Command};

const HINT: &str = "install them with: apt-get install clang libbpf-dev linux-libc-dev";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let include = manifest.join("include");
    // Directories: cargo rebuilds when any file in them changes, so a new header
    // (bpf/*.h, included by the .bpf.c files) needs no line here.
    println!("cargo:rerun-if-changed={}", manifest.join("bpf").display());
    println!("cargo:rerun-if-changed={}", include.display());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");

    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    if !std::path::Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(&format!("libbpf headers (bpf/bpf_helpers.h) not found; {HINT}"));
    }
    // linux/types.h pulls asm/types.h from the multiarch directory.
    let multiarch = Command::new("gcc").arg("-print-multiarch").output().ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "x86_64-linux-gnu".into());
    // bpf_tracing.h (kprobe arguments) and the splice guard's syscall numbers
    // (bpf/splice.h, BP_NR_*) depend on the architecture: only these two are known.
    let target = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let arch = match target.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => fail(&format!(
            "target architecture `{other}` is not supported (x86_64 and aarch64 are): \
             add its syscall numbers for splice/sendfile to bpf/splice.h first"
        )),
    };
    // The socket datapath and the link datapath are separate objects.
    for name in ["bypass", "link"] {
        let src = manifest.join(format!("bpf/{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-D__TARGET_ARCH_{arch}"))
            .arg(format!("-I{}", include.display()))
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => fail(&format!("clang failed to compile {} ({s})", src.display())),
            Err(e) => fail(&format!("cannot run {clang} ({e}); {HINT}")),
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: bypassd-ebpf: {msg}");
    println!("cargo:warning=bypassd-ebpf: {msg}");
    std::process::exit(1);
}
