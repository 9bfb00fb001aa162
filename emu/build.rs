//! Compiles every kernel file (../kernels/*.cu) as host C++ (cuda_host.h force-included,
//! PTXGRAD_HOST_EMU defined) plus the launcher into one static library, and generates, per
//! kernel, a trampoline `ptxgrad_emu_call_<name>(void** args)` that unpacks a CUDA-style argument
//! array (one pointer per argument, as cuLaunchKernel takes) and calls the kernel; the Rust
//! table `KERNELS` in $OUT_DIR/kernels.rs lists each kernel with its file (its module on a GPU),
//! its launch bounds and its trampoline.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The stems of the kernel files, ../kernels/*.cu, as the crate's build.rs finds them (inline PTX
/// needs a PTXGRAD_HOST_EMU branch, as in gemm.cuh).
fn kernel_stems(kernels: &Path) -> Vec<String> {
    let mut stems: Vec<String> = std::fs::read_dir(kernels)
        .expect("kernels/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
        .collect();
    stems.sort();
    stems
}

/// A kernel definition found in a kernel file.
struct Signature {
    name: String,
    /// The C++ type of each parameter, in order.
    types: Vec<String>,
    /// The most threads per block it may be launched with: its `__launch_bounds__`, else 1024.
    max_threads: u32,
}

/// Every `extern "C" void [ptxgrad_launch_bounds(max, ...)] name(params) {` in a kernel file
/// preprocessed with PTXGRAD_EMU_PROBE (which turns `__launch_bounds__` into the marker).
fn kernel_signatures(preprocessed: &str) -> Vec<Signature> {
    const BOUNDS: &str = "ptxgrad_launch_bounds(";
    let mut out = Vec::new();
    let mut rest = preprocessed;
    while let Some(at) = rest.find("extern \"C\"") {
        rest = rest[at + "extern \"C\"".len()..].trim_start();
        let Some(after_void) = rest.strip_prefix("void ") else { continue };
        let mut decl = after_void.trim_start();
        let mut max_threads = 1024;
        if let Some(bounds) = decl.strip_prefix(BOUNDS) {
            let close = bounds.find(')').expect("launch bounds end with `)`");
            let first = bounds[..close].split(',').next().unwrap_or("").trim();
            max_threads = first.parse().unwrap_or_else(|_| {
                panic!("emu/build.rs reads launch bounds as a literal thread count, found `{first}`")
            });
            decl = bounds[close + 1..].trim_start();
        }
        let Some(open) = decl.find('(') else { break };
        let name = decl[..open].trim();
        let Some(close) = decl[open..].find(')') else { break };
        let params = &decl[open + 1..open + close];
        let after = decl[open + close + 1..].trim_start();
        // Definitions of kernels only: `void name(...) {`.
        if name.is_empty() || name.contains(char::is_whitespace) || !after.starts_with('{') {
            continue;
        }
        let types = params
            .split(',')
            .map(|p| {
                let p = p.replace("__restrict__", " ");
                let words: Vec<&str> = p.split_whitespace().collect();
                let ty = words[..words.len() - 1].join(" ");
                // `float* x` splits as ["float*", "x"]; `float *x` as ["float", "*x"].
                let stars = words[words.len() - 1].chars().take_while(|&c| c == '*').count();
                format!("{ty}{}", "*".repeat(stars))
            })
            .collect();
        out.push(Signature { name: name.to_string(), types, max_threads });
    }
    out
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let kernels = here.join("../kernels").canonicalize().expect("kernels/ next to emu/");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("PTXGRAD_HOST_EMU", None)
        .include(&here)
        .flag("-include")
        .flag(here.join("cuda_host.h").to_str().expect("UTF-8 path"))
        .flag("-fno-strict-aliasing") // kernels read float arrays as float4
        .flag("-ffp-contract=off") // a * b + c stays two roundings, as written (fmaf is explicit)
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2);
    // The kernels call fmaf() everywhere: without the FMA instruction it is a slow library
    // routine (most of the emulator's time). Used when the building machine has it, as every
    // x86-64 server of the last decade does (the emulator runs where it is built, or on a GPU host).
    if std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|w| w == "fma")) {
        build.flag("-mfma");
    }
    // PTXGRAD_EMU_UCONTEXT=1: the portable fiber switch (what non-x86-64 machines get), to test it.
    println!("cargo:rerun-if-env-changed=PTXGRAD_EMU_UCONTEXT");
    if std::env::var("PTXGRAD_EMU_UCONTEXT").is_ok_and(|v| v == "1") {
        build.define("PTXGRAD_EMU_UCONTEXT", None);
    }
    // PTXGRAD_EMU_ASAN=1: the kernels under AddressSanitizer, so that an emulated kernel's read
    // or write outside its buffers stops the test with a report (scripts/emu-asan.sh; the binary
    // then needs the ASan runtime preloaded, as that script does).
    println!("cargo:rerun-if-env-changed=PTXGRAD_EMU_ASAN");
    if std::env::var("PTXGRAD_EMU_ASAN").is_ok_and(|v| v == "1") {
        build.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    let compiler = build.get_compiler();
    let mut table = String::from("// Generated by emu/build.rs.\n");
    let mut entries = String::new();
    // The engine's kernel files, and the emulator's self-test kernels (module "selftest").
    let files = kernel_stems(&kernels).into_iter().map(|k| (kernels.join(format!("{k}.cu")), k));
    for (file, k) in files.chain([(here.join("selftest.cu"), "selftest".to_string())]) {
        // Each kernel file is its own module on a GPU, but here they link into one library: a
        // namespace per file keeps same-named helpers (FwdEpi in conv2d.cu and dense.cu, say)
        // apart. The kernels and trampolines are extern "C": their symbols stay unqualified.
        let include = format!("namespace ptxgrad_emu_{k} {{\n#include \"{}\"\n", file.display());
        let probe = out.join(format!("emu_{k}_pre.cpp"));
        std::fs::write(&probe, format!("{include}}}\n")).expect("write the probe");
        let pre = Command::new(compiler.path())
            .args(compiler.args())
            .arg("-E")
            .arg("-DPTXGRAD_EMU_PROBE")
            .arg(&probe)
            .output()
            .expect("run the C++ preprocessor");
        assert!(pre.status.success(), "preprocessing {k}.cu failed:\n{}", String::from_utf8_lossy(&pre.stderr));
        let mut src = include;
        for Signature { name, types, max_threads } in kernel_signatures(&String::from_utf8_lossy(&pre.stdout)) {
            let args: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("*({t}*)a[{i}]")).collect();
            src += &format!("extern \"C\" void ptxgrad_emu_call_{name}(void** a) {{ {name}({}); }}\n", args.join(", "));
            table += &format!("    fn ptxgrad_emu_call_{name}(args: *const *mut c_void);\n");
            entries += &format!(
                "    Kernel {{ name: \"{name}\", module: \"{k}\", max_threads: {max_threads}, run: ptxgrad_emu_call_{name} }},\n"
            );
        }
        src += "}\n";
        let wrapper = out.join(format!("emu_{k}.cpp"));
        std::fs::write(&wrapper, src).expect("write the wrapper");
        build.file(wrapper);
    }
    build.file(here.join("launch.cpp"));
    build.compile("ptxgrad_kernels_emu");
    let rust = format!(
        "extern \"C\" {{\n{table}}}\n\n/// Every kernel of kernels/*.cu.\npub static KERNELS: &[Kernel] = &[\n{entries}];\n"
    );
    std::fs::write(out.join("kernels.rs"), rust).expect("write kernels.rs");
    watch(&here, &kernels);
}

fn watch(here: &Path, kernels: &Path) {
    println!("cargo:rerun-if-changed={}", kernels.display());
    for f in ["cuda_host.h", "launch.cpp", "selftest.cu", "build.rs"] {
        println!("cargo:rerun-if-changed={}", here.join(f).display());
    }
    for entry in std::fs::read_dir(kernels).expect("kernels/").flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
