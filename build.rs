//! Compiles every `kernels/*.cu` to PTX and writes `$OUT_DIR/ptx.rs`, a table of the PTX texts
//! (and of the machine code below) that `src/ptx.rs` includes, each zlib-compressed
//! (`<stem>.ptx.z`; `src/ptx.rs` inflates a module when it is first loaded). Every binary of the
//! crate embeds all of them: compressed, the 9.3 MB of PTX weighs 1.7 MB per binary, the 5.1 MB
//! of sm_90 cubins 1.7 MB.
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
//!
//! Machine code ahead of time: each module's PTX is also assembled by ptxas for the GPUs named in
//! `PTXGRAD_SASS` (default `sm_90`, the H100/H200 this project is measured on; a comma list, or
//! `none`) and embedded the same way (`<stem>.<arch>.cubin.z`). On such a GPU the machine code is
//! loaded as built, so what tests/ptx.rs reads of the SASS (registers, spills, the k-loops) is what
//! runs, and the driver compiles nothing; other GPUs get the PTX. ptxas: `$PTXAS`, the wheels'
//! `cuda_nvcc/bin`, a toolkit's `bin`, `$PATH`. Without it, a warning and PTX only; with
//! `PTXGRAD_REQUIRE_KERNELS=1`, an error.
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
        "PTXAS",
        "PTXGRAD_SASS",
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
        write_table(&out, &sources, None, "none", &MachineCode::default());
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
    let sass = machine_code(&manifest, &out, &sources, require);
    write_table(&out, &sources, Some(&arch), &name, &sass);
}

/// The machine code assembled ahead of time: for which GPUs (e.g. 90 for sm_90), and by what.
#[derive(Default)]
struct MachineCode {
    archs: Vec<u32>,
    ptxas: String,
}

/// The GPUs `PTXGRAD_SASS` names (see the top of this file): 90 for `sm_90`.
fn sass_archs() -> Vec<u32> {
    let spec = env::var("PTXGRAD_SASS").unwrap_or_else(|_| "sm_90".to_string());
    if spec.trim() == "none" {
        return vec![];
    }
    spec.split(',')
        .map(|a| {
            a.trim().strip_prefix("sm_").and_then(|n| n.parse().ok()).unwrap_or_else(|| {
                panic!("PTXGRAD_SASS: expected a comma list such as sm_90 or sm_80,sm_90 (or none), found `{spec}`")
            })
        })
        .collect()
}

fn find_ptxas(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("PTXAS").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = wheel_dirs(manifest).into_iter().map(|w| w.join("cuda_nvcc").join("bin")).collect();
    dirs.extend(cuda_roots().into_iter().map(|r| r.join("bin")));
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// Assembles every `<stem>.ptx` in `out` for each GPU of `PTXGRAD_SASS`, one thread per module
/// (ptxas takes seconds on the GEMM modules), into `<stem>.sm_<arch>.cubin`.
fn machine_code(manifest: &Path, out: &Path, sources: &[PathBuf], require: bool) -> MachineCode {
    let archs = sass_archs();
    if archs.is_empty() {
        return MachineCode::default();
    }
    let Some(ptxas) = find_ptxas(manifest) else {
        let msg = "no ptxas found: the kernels ship as PTX only, which the driver compiles when they load; \
                   run `eval \"$(scripts/cuda-wheels.sh)\"` (or set PTXGRAD_SASS=none)";
        if require {
            panic!("PTXGRAD_REQUIRE_KERNELS=1 but {msg}");
        }
        println!("cargo:warning={msg}");
        return MachineCode::default();
    };
    println!("cargo:rerun-if-changed={}", ptxas.display());
    let stems: Vec<String> = sources.iter().map(|s| s.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    std::thread::scope(|scope| {
        let jobs: Vec<_> = stems
            .iter()
            .flat_map(|stem| archs.iter().map(move |&arch| (stem, arch)))
            .map(|(stem, arch)| {
                let ptxas = &ptxas;
                scope.spawn(move || {
                    let (ptx, cubin) = (out.join(format!("{stem}.ptx")), out.join(format!("{stem}.sm_{arch}.cubin")));
                    let output = Command::new(ptxas)
                        .arg(format!("-arch=sm_{arch}"))
                        .arg("-o")
                        .arg(&cubin)
                        .arg(&ptx)
                        .output()
                        .unwrap_or_else(|e| panic!("could not run {}: {e}", ptxas.display()));
                    if !output.status.success() {
                        panic!("ptxas -arch=sm_{arch} {stem}.ptx failed:\n{}", String::from_utf8_lossy(&output.stderr));
                    }
                })
            })
            .collect();
        for job in jobs {
            if let Err(panic) = job.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let version = Command::new(&ptxas)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| l.split("release ").nth(1).map(String::from))
        })
        .unwrap_or_else(|| "version unknown".into());
    MachineCode { archs, ptxas: format!("ptxas {version} ({})", ptxas.display()) }
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

/// `<file>` -> `<file>.z` (zlib, best compression); returns (the .z path, the file's length).
fn compress(file: &Path) -> (String, usize) {
    use std::io::Write as _;
    let bytes = fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&bytes).expect("compressing into memory");
    let mut dst = file.as_os_str().to_owned();
    dst.push(".z");
    fs::write(&dst, z.finish().expect("compressing into memory")).expect("write the .z file");
    (PathBuf::from(dst).display().to_string(), bytes.len())
}

/// `$OUT_DIR/ptx.rs`: one `Embedded` (src/ptx.rs) per kernel file, plus build facts.
fn write_table(out: &Path, sources: &[PathBuf], arch: Option<&str>, compiler: &str, sass: &MachineCode) {
    let mut s = String::from(
        "// Generated by build.rs: the PTX (and machine code) of every kernels/*.cu file, zlib-compressed.\n",
    );
    writeln!(s, "pub const COMPILER: &str = {compiler:?};").unwrap();
    writeln!(s, "pub const ARCH: Option<&str> = {arch:?};").unwrap();
    writeln!(s, "pub const SASS_ARCHS: &[u32] = &{:?};", sass.archs).unwrap();
    writeln!(s, "pub const SASS_COMPILER: &str = {:?};", sass.ptxas).unwrap();
    writeln!(s, "pub const COUNT: usize = {};", sources.len()).unwrap();
    s.push_str("pub const MODULES: [super::Embedded; COUNT] = [\n");
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy();
        if arch.is_some() {
            let (z, len) = compress(&out.join(format!("{stem}.ptx")));
            let mut machine = String::new();
            for a in &sass.archs {
                let (cz, clen) = compress(&out.join(format!("{stem}.sm_{a}.cubin")));
                write!(machine, "super::Sass {{ arch: {a}, zlib: include_bytes!({cz:?}), len: {clen} }}, ").unwrap();
            }
            writeln!(
                s,
                "    super::Embedded {{ stem: {stem:?}, zlib: Some(include_bytes!({z:?})), len: {len}, sass: &[{machine}] }},"
            )
            .unwrap();
        } else {
            writeln!(s, "    super::Embedded {{ stem: {stem:?}, zlib: None, len: 0, sass: &[] }},").unwrap();
        }
    }
    s.push_str("];\n");
    write_module_enum(&mut s, sources);
    fs::write(out.join("ptx.rs"), s).expect("write ptx.rs");
}

/// `enum Module`, one variant per kernel file (the CamelCase of its stem: softmax_xent ->
/// SoftmaxXent), in `MODULES` order, so that a variant's discriminant is its index there and a
/// new kernels/<op>.cu needs no edit anywhere else to be launched as `Module::<Op>`.
fn write_module_enum(s: &mut String, sources: &[PathBuf]) {
    let stems: Vec<String> = sources.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    let camel = |stem: &str| -> String {
        stem.split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .collect()
    };
    s.push_str("/// One variant per `kernels/<stem>.cu`, in the order of `MODULES`.\n");
    s.push_str("#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]\npub enum Module {\n");
    for stem in &stems {
        writeln!(s, "    /// kernels/{stem}.cu\n    {},", camel(stem)).unwrap();
    }
    s.push_str("}\n\nimpl Module {\n    /// Every module, in `MODULES` order.\n");
    writeln!(s, "    pub const ALL: [Module; {}] = [", stems.len()).unwrap();
    for stem in &stems {
        writeln!(s, "        Module::{},", camel(stem)).unwrap();
    }
    s.push_str("    ];\n\n    /// The file stem in `kernels/`.\n    pub fn stem(self) -> &'static str {\n        MODULES[self as usize].stem\n    }\n}\n");
}
