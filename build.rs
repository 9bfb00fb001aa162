//! Compiles every `kernels/*.cu` to PTX and writes `$OUT_DIR/ptx.rs`, a table of the PTX texts
//! that `src/ptx.rs` includes, each zlib-compressed (`<stem>.ptx.z`; `src/ptx.rs` inflates a
//! module's text when it is first loaded). Every binary of the crate embeds all of them, and
//! the 27 binaries travel to a GPU machine together in at most 64 MiB with the working tree:
//! compressed, the 9.3 MB of PTX weighs 1.7 MB per binary.
//!
//! Compiler search, first hit wins:
//! 1. nvcc: `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `/usr/local/cuda/bin`, `$PATH`;
//! 2. NVRTC (libnvrtc.so.12): `$PTXGRAD_CUDA_WHEELS/cuda_nvrtc/lib`, the project's `.cuda/` (made
//!    by `scripts/cuda-wheels.sh`), `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!    `/usr/local/cuda/lib64`, `$LD_LIBRARY_PATH`, then the system loader's own search.
//!
//! Neither found: a cargo warning and a CPU-only build (the CUDA path then fails at run time with
//! a message saying so); with `PTXGRAD_REQUIRE_KERNELS=1` that is a build error instead.
//! The PTX targets `compute_80` (it JIT-loads on Ampere, Ada and Hopper); `PTXGRAD_CUDA_ARCH`
//! overrides. `PTXGRAD_LINEINFO=1` adds source-line information (`-lineinfo`, for a profiler's
//! source view); it is off by default because it makes the PTX, which every binary embeds, 75%
//! larger.
//! This script never talks to a GPU: building needs no driver and no device.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PTXGRAD_CUDA_ARCH",
        "PTXGRAD_LINEINFO",
        "PTXGRAD_REQUIRE_KERNELS",
        "PTXGRAD_CUDA_WHEELS",
        "LD_LIBRARY_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");

    let mut sources: Vec<PathBuf> =
        fs::read_dir(&kernel_dir).expect("kernels/ exists").filter_map(|e| e.ok().map(|e| e.path())).collect();
    sources.sort();
    for s in &sources {
        // Headers are listed too, so that editing common.cuh rebuilds every kernel.
        println!("cargo:rerun-if-changed={}", s.display());
    }
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));

    let arch = env::var("PTXGRAD_CUDA_ARCH").unwrap_or_else(|_| "compute_80".to_string());
    let require = env::var("PTXGRAD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let compiler = find_nvcc().map(Compiler::Nvcc).or_else(|| find_nvrtc(&manifest).map(Compiler::Nvrtc));
    let Some(compiler) = compiler else {
        let msg = "no CUDA compiler found (nvcc or libnvrtc): building CPU-only; \
                   run `eval \"$(scripts/cuda-wheels.sh)\"` to get NVRTC without a toolkit";
        if require {
            panic!("PTXGRAD_REQUIRE_KERNELS=1 but {msg}");
        }
        println!("cargo:warning={msg}");
        write_table(&out, &sources, None, "none");
        return;
    };

    let include = include_dirs(&manifest, &compiler);
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let dst = out.join(format!("{stem}.ptx"));
        let result = match &compiler {
            Compiler::Nvcc(nvcc) => compile_nvcc(nvcc, src, &dst, &arch, &kernel_dir),
            Compiler::Nvrtc(_) => compile_nvrtc(src, &dst, &arch, &kernel_dir, &include),
        };
        if let Err(e) = result {
            panic!("compiling {} failed:\n{e}", src.display());
        }
    }
    let name = match &compiler {
        Compiler::Nvcc(p) => format!("nvcc ({})", p.display()),
        Compiler::Nvrtc(p) => format!("nvrtc ({})", p.display()),
    };
    write_table(&out, &sources, Some(&arch), &name);
}

enum Compiler {
    Nvcc(PathBuf),
    /// The libnvrtc file that was loaded.
    Nvrtc(PathBuf),
}

fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(|v| env::var_os(v).map(PathBuf::from)).collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = cuda_roots().into_iter().map(|r| r.join("bin")).collect();
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join("nvcc")).find(|p| p.is_file())
}

fn wheel_dirs(manifest: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PTXGRAD_CUDA_WHEELS").map(PathBuf::from).into_iter().collect();
    dirs.push(manifest.join(".cuda").join("nvidia"));
    dirs
}

/// Finds libnvrtc and loads it by full path. cudarc later asks the loader for
/// `libnvrtc.so.12`, which then resolves to this already-loaded library (same SONAME), so
/// no LD_LIBRARY_PATH is needed. The library stays loaded until the build script exits.
fn find_nvrtc(manifest: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = wheel_dirs(manifest).into_iter().map(|w| w.join("cuda_nvrtc").join("lib")).collect();
    dirs.extend(cuda_roots().into_iter().map(|r| r.join("lib64")));
    if let Some(p) = env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(env::split_paths(&p));
    }
    for dir in dirs {
        for name in ["libnvrtc.so.12", "libnvrtc.so"] {
            let lib = dir.join(name);
            if lib.is_file() {
                // SAFETY: loading libnvrtc runs only its (trusted, NVIDIA's) initialisers.
                if let Ok(handle) = unsafe { libloading::Library::new(&lib) } {
                    std::mem::forget(handle);
                    return Some(lib);
                }
            }
        }
    }
    None
}

/// Where cuda_fp16.h and friends live for NVRTC (nvcc knows its own).
fn include_dirs(manifest: &Path, compiler: &Compiler) -> Vec<String> {
    if matches!(compiler, Compiler::Nvcc(_)) {
        return vec![];
    }
    let mut dirs: Vec<PathBuf> =
        wheel_dirs(manifest).into_iter().map(|w| w.join("cuda_runtime").join("include")).collect();
    dirs.extend(cuda_roots().into_iter().map(|r| r.join("include")));
    dirs.into_iter().filter(|d| d.join("cuda_fp16.h").is_file()).map(|d| d.display().to_string()).collect()
}

/// `-lineinfo` when PTXGRAD_LINEINFO=1 (see the top of this file).
fn line_info() -> Option<&'static str> {
    env::var("PTXGRAD_LINEINFO").is_ok_and(|v| v == "1").then_some("-lineinfo")
}

fn compile_nvcc(nvcc: &Path, src: &Path, dst: &Path, arch: &str, kernel_dir: &Path) -> Result<(), String> {
    let output = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .args(line_info())
        .arg(format!("-arch={arch}"))
        .arg("-I")
        .arg(kernel_dir)
        .arg(src)
        .arg("-o")
        .arg(dst)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn compile_nvrtc(src: &Path, dst: &Path, arch: &str, kernel_dir: &Path, include: &[String]) -> Result<(), String> {
    let code = fs::read_to_string(src).map_err(|e| e.to_string())?;
    let mut include_paths = vec![kernel_dir.display().to_string()];
    include_paths.extend(include.iter().cloned());
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        include_paths,
        options: ["-std=c++17"].into_iter().chain(line_info()).map(String::from).collect(),
        name: Some(src.file_name().unwrap().to_string_lossy().into_owned()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(code, opts).map_err(|e| format!("{e:?}"))?;
    fs::write(dst, ptx.to_src()).map_err(|e| e.to_string())
}

/// `<stem>.ptx` -> `<stem>.ptx.z` (zlib, best compression); returns the PTX's length in bytes.
fn compress(ptx: &Path) -> usize {
    use std::io::Write as _;
    let text = fs::read(ptx).unwrap_or_else(|e| panic!("reading {}: {e}", ptx.display()));
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&text).expect("compressing into memory");
    fs::write(ptx.with_extension("ptx.z"), z.finish().expect("compressing into memory")).expect("write .ptx.z");
    text.len()
}

/// `$OUT_DIR/ptx.rs`: one `Embedded` (src/ptx.rs) per kernel file, plus build facts.
fn write_table(out: &Path, sources: &[PathBuf], arch: Option<&str>, compiler: &str) {
    let mut s = String::from("// Generated by build.rs: the PTX of every kernels/*.cu file, zlib-compressed.\n");
    writeln!(s, "pub const COMPILER: &str = {compiler:?};").unwrap();
    writeln!(s, "pub const ARCH: Option<&str> = {arch:?};").unwrap();
    writeln!(s, "pub const COUNT: usize = {};", sources.len()).unwrap();
    s.push_str("pub const MODULES: [super::Embedded; COUNT] = [\n");
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy();
        if arch.is_some() {
            let ptx = out.join(format!("{stem}.ptx"));
            let len = compress(&ptx);
            let z = ptx.with_extension("ptx.z").display().to_string();
            writeln!(s, "    super::Embedded {{ stem: {stem:?}, zlib: Some(include_bytes!({z:?})), len: {len} }},")
                .unwrap();
        } else {
            writeln!(s, "    super::Embedded {{ stem: {stem:?}, zlib: None, len: 0 }},").unwrap();
        }
    }
    s.push_str("];\n");
    fs::write(out.join("ptx.rs"), s).expect("write ptx.rs");
}
