//! Assembles every kernel module's PTX with ptxas for sm_80 (A100) and sm_90 (H100/H200):
//! any ptxas error fails, and so does any use of local memory: a register spill or a stack frame
//! (local memory is slow and the kernels are designed not to need it). Prints registers and local
//! bytes per kernel. (What a GPU runs is checked by tests/kernel_resources.rs.) The machine code
//! the binaries embed for sm_90 (build.rs) must be exactly ptxas's of the embedded PTX.
//!
//! Then reads that machine code (SASS, from nvdisasm) of the GEMM kernels and measures the
//! instruction mix of each k-loop: the share of FFMA (the useful work) among the instructions
//! the loop issues. It is a static figure, not a speed, but it is the part of a GEMM's speed
//! that can be checked without a GPU: every copy, index and branch instruction in the loop
//! takes an issue slot from an FFMA.
//!
//! ptxas and nvdisasm come from $PTXAS / $NVDISASM, the project's `.cuda/` wheels
//! (scripts/cuda-wheels.sh), a CUDA toolkit, or PATH. Without them the tests skip with a
//! reason, unless PTXGRAD_REQUIRE_KERNELS=1 (CI), where a missing tool or a CPU-only build is a
//! failure.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `tool` from $`env`, the project's wheels (`wheel` under .cuda/nvidia), a toolkit, or PATH.
fn find_tool(tool: &str, env: &str, wheel: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os(env).map(PathBuf::from).into_iter().collect();
    // Set by cargo when it runs the test (absent when the binary runs elsewhere).
    if let Some(root) = std::env::var_os("CARGO_MANIFEST_DIR") {
        candidates.push(PathBuf::from(root).join(".cuda/nvidia").join(wheel).join("bin").join(tool));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(var) {
            candidates.push(PathBuf::from(r).join("bin").join(tool));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin").join(tool));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(tool)));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// `tool` (see find_tool), or None after saying why; with PTXGRAD_REQUIRE_KERNELS=1 (CI) a
/// missing tool fails instead.
fn tool_or_skip(tool: &str, env: &str, wheel: &str) -> Option<PathBuf> {
    let found = find_tool(tool, env, wheel);
    if found.is_none() {
        assert!(!required(), "PTXGRAD_REQUIRE_KERNELS=1 but no {tool} found (run scripts/cuda-wheels.sh)");
        eprintln!("SKIPPED: no {tool} found (set {env} or run scripts/cuda-wheels.sh)");
    }
    found
}

/// A fresh scratch directory for one test's files.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ptxgrad-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn required() -> bool {
    std::env::var("PTXGRAD_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// Every (module, PTX), or None (after saying why) in a CPU-only build, which CI makes a failure.
fn modules_or_skip() -> Option<Vec<(&'static str, &'static str)>> {
    let modules = ptxgrad::ptx::all();
    if modules.iter().any(|(_, ptx)| ptx.is_none()) {
        assert!(!required(), "PTXGRAD_REQUIRE_KERNELS=1 but this is a CPU-only build (no PTX embedded)");
        eprintln!("SKIPPED: CPU-only build, no PTX to check");
        return None;
    }
    Some(modules.iter().filter_map(|&(stem, ptx)| Some((stem, ptx?))).collect())
}

/// (kernel, registers, local bytes) from `ptxas -v` output: the local memory a thread uses, its
/// stack frame (arrays indexed at run time) plus its register spills.
fn parse_report(stderr: &str) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut local = 0;
    for line in stderr.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().unwrap_or("").to_string();
            local = 0;
        } else if line.contains("bytes spill stores") {
            let n = |key: &str| -> u32 {
                line.split(',')
                    .find(|p| p.contains(key))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            local = n("stack frame") + n("spill stores") + n("spill loads");
        } else if let Some(rest) = line.split("Used ").nth(1) {
            let regs = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((current.clone(), regs, local));
        }
    }
    out
}

/// A block's registers must fit in one SM's register file (64K 32-bit registers on sm_80 and
/// sm_90, allocated per warp in units of 256, i.e. a thread's count rounded up to a multiple of
/// 8): a launch whose block needs more fails on a GPU ("too many resources requested"), which
/// neither the emulator nor ptxas reports. Checked at the most threads the kernel may be launched
/// with, its `.maxntid` (or 1024 without launch bounds).
const REGISTER_FILE: u32 = 65536;

fn block_registers(regs: u32, threads: u32) -> u32 {
    regs.div_ceil(8) * 8 * threads
}

#[test]
fn every_kernel_assembles_for_sm80_and_sm90_without_local_memory() {
    let Some(modules) = modules_or_skip() else { return };
    let Some(ptxas) = tool_or_skip("ptxas", "PTXAS", "cuda_nvcc") else { return };
    let dir = scratch_dir("ptxas");
    let mut failures = Vec::new();
    let mut kernels = 0;
    println!("{:<32} {:>6} {:>10} {:>7} {:>11}", "kernel", "arch", "registers", "local", "max threads");
    for (stem, ptx) in modules {
        let src = dir.join(format!("{stem}.ptx"));
        std::fs::write(&src, ptx).unwrap();
        let max_threads: std::collections::HashMap<&str, u32> =
            ptxgrad::ptx::entries(ptx).into_iter().map(|e| (e.name, e.max_threads.unwrap_or(1024))).collect();
        for arch in ["sm_80", "sm_90"] {
            let out = Command::new(&ptxas)
                .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
                .arg(&src)
                .output()
                .expect("run ptxas");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                failures.push(format!("{stem} ({arch}): ptxas failed:\n{stderr}"));
                continue;
            }
            for (kernel, regs, local) in parse_report(&stderr) {
                let threads = max_threads.get(kernel.as_str()).copied().unwrap_or(1024);
                println!("{kernel:<32} {arch:>6} {regs:>10} {local:>7} {threads:>11}");
                kernels += 1;
                if local > 0 {
                    failures.push(format!("{kernel} ({arch}): {local} bytes of local memory (stack frame, spills)"));
                }
                if block_registers(regs, threads) > REGISTER_FILE {
                    failures.push(format!(
                        "{kernel} ({arch}): {regs} registers x {threads} threads = {} registers per block, more \
                         than an SM's {REGISTER_FILE}: give it launch bounds of the threads it is launched with",
                        block_registers(regs, threads)
                    ));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "ptxas problems:\n{}", failures.join("\n"));
    assert!(kernels > 0, "ptxas reported no kernels at all");
}

/// The rounding the register check assumes: 255 registers (the most a thread may have) fit a
/// 256-thread block, 65 at 1024 threads (72 after rounding) do not, 64 do.
#[test]
fn block_register_rounding() {
    assert!(block_registers(255, 256) <= REGISTER_FILE);
    assert!(block_registers(64, 1024) <= REGISTER_FILE);
    assert!(block_registers(65, 1024) > REGISTER_FILE);
    assert_eq!(block_registers(121, 256), 128 * 256);
}

/// One loop of a kernel's SASS: the instructions from a label to the branch back to it.
struct Loop {
    kernel: String,
    instructions: usize,
    ffma: usize,
    /// Tensor-core mma.sync (HMMA.1688.F32.TF32 or .BF16) among them.
    hmma: usize,
    /// 16-byte cp.async (LDGSTS.E.BYPASS.128) among them: the vector loads.
    vector_copies: usize,
}

impl Loop {
    fn ffma_share(&self) -> f64 {
        self.ffma as f64 / self.instructions as f64
    }
}

/// The kernels of an `nvdisasm -c` listing, each with its lines. Listing lines: `.text.<kernel>:`
/// starts a kernel, `.L_x_N:` is a label, and an instruction is `/*addr*/ [@pred] OPCODE[.mods]
/// operands ;`.
fn kernels_in(sass: &str) -> Vec<(String, Vec<&str>)> {
    let mut kernels: Vec<(String, Vec<&str>)> = Vec::new();
    for line in sass.lines() {
        if let Some(name) = line.strip_prefix(".text.").and_then(|r| r.strip_suffix(':')) {
            kernels.push((name.to_string(), Vec::new()));
        } else if let Some((_, body)) = kernels.last_mut() {
            body.push(line);
        }
    }
    kernels
}

/// An instruction line's opcode (with its modifiers, after any predicate) and its text after the
/// address; None for any other line.
fn instruction(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix("/*").and_then(|r| r.split_once("*/")).map(|(_, r)| r.trim())?;
    let op = rest.split_whitespace().find(|w| !w.starts_with('@')).unwrap_or("");
    Some((op.trim_end_matches(';'), rest))
}

/// The loops of every kernel in an `nvdisasm -c` listing that hold at least `min_ffma` FFMAs or
/// at least 4 HMMAs.
fn loops_in(sass: &str, min_ffma: usize) -> Vec<Loop> {
    let mut out = Vec::new();
    for (kernel, lines) in kernels_in(sass) {
        // (opcode with modifiers, branch target) per instruction; label -> instruction index.
        let mut ins: Vec<(String, Option<String>)> = Vec::new();
        let mut labels = std::collections::HashMap::new();
        for line in lines {
            let t = line.trim();
            if let Some(label) = t.strip_suffix(':').filter(|l| l.starts_with(".L_x_")) {
                labels.insert(label.to_string(), ins.len());
            } else if let Some((op, rest)) = instruction(t) {
                let target = rest.split("`(").nth(1).and_then(|r| r.split(')').next()).map(str::to_string);
                ins.push((op.to_string(), target));
            }
        }
        for (i, (op, target)) in ins.iter().enumerate() {
            let Some(start) = target.as_ref().filter(|_| op.starts_with("BRA")).and_then(|t| labels.get(t)) else {
                continue;
            };
            if *start > i {
                continue; // a forward branch
            }
            let body = &ins[*start..=i];
            let count = |f: &dyn Fn(&str) -> bool| body.iter().filter(|(o, _)| f(o)).count();
            let ffma = count(&|o| o == "FFMA");
            let hmma = count(&|o| o.starts_with("HMMA") && (o.ends_with(".TF32") || o.ends_with(".BF16")));
            if ffma >= min_ffma || hmma >= 4 {
                out.push(Loop {
                    kernel: kernel.clone(),
                    instructions: body.len(),
                    ffma,
                    hmma,
                    vector_copies: count(&|o| o.starts_with("LDGSTS") && o.ends_with(".128")),
                });
            }
        }
    }
    out
}

/// The GEMM kernels' k-loops, as the sm_90 SASS has them: printed for every GEMM kernel, and
/// checked where the design promises something. The Winograd GEMM (plain row-major operands)
/// has two k-loops, with 4-byte and with 16-byte loads (gemm.cuh picks one per block); the
/// 16-byte one must stay lean: one copy instruction per operand and k-tile for the 128-wide
/// tiles, and FFMA at least 84% (t128) / 75% (t128x64) / 66% (t64) / 82% (t96) / 81% (t128x96) of
/// what it issues (2-3 points under what ptxas 12.9 gives).
#[test]
fn gemm_k_loops_are_mostly_ffma() {
    let Some(sass) = gemm_sass() else { return };
    let mut loops: Vec<Loop> = sass.iter().flat_map(|s| loops_in(s, 64)).collect();
    // The GEMM kernels are the ones with a block-tile suffix (the tile transforms loop too).
    loops.retain(|l| is_gemm(&l.kernel));
    println!(
        "{:<37} {:>12} {:>6} {:>7} {:>6} {:>11}",
        "kernel (sm_90)", "instructions", "FFMA", "share", "HMMA", "16-byte cp"
    );
    for l in &loops {
        let share = 100.0 * l.ffma_share();
        let (i, f, h, v) = (l.instructions, l.ffma, l.hmma, l.vector_copies);
        println!("{:<37} {i:>12} {f:>6} {share:>6.1}% {h:>6} {v:>11}", l.kernel);
    }
    let mut failures = Vec::new();
    // The tensor-core kernels: every k-loop issues the mma.sync of whole k-tiles (MF x NF
    // fragments per warp, three times for 3xtf32: gemm.cuh's MmaMicro) and no FFMA.
    // (ptxas 12.9 turns bf16 conversions into F2FP.BF16.F32.PACK_AB, not FFMA.)
    for (tile, per_tile) in [("t128", 16), ("t128x64", 8), ("t64", 4), ("t96", 12), ("t128x96", 12)] {
        for (math, times) in [("tf32", 1), ("3xtf32", 3), ("bf16", 1)] {
            let families = ["winograd_gemm", "dense_fwd", "dense_bwd_input", "dense_bwd_weight"];
            for family in families.into_iter().chain(["conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight"]) {
                let kernel = format!("{family}_{math}_{tile}");
                let ks: Vec<&Loop> = loops.iter().filter(|l| l.kernel == kernel).collect();
                let per = per_tile * times;
                if ks.is_empty() || ks.iter().any(|l| l.ffma > 0 || l.hmma == 0 || l.hmma % per != 0) {
                    let found: Vec<(usize, usize)> = ks.iter().map(|l| (l.hmma, l.ffma)).collect();
                    failures.push(format!("{kernel}: expected k-loops of a multiple of {per} HMMA and no FFMA, found (HMMA, FFMA) {found:?}"));
                }
            }
        }
    }
    for (tile, floor, copies) in
        [("t128", 0.84, 2), ("t128x64", 0.75, 2), ("t64", 0.66, 2), ("t96", 0.82, 2), ("t128x96", 0.81, 2)]
    {
        let kernel = format!("winograd_gemm_f32_{tile}");
        let ks: Vec<&Loop> = loops.iter().filter(|l| l.kernel == kernel).collect();
        let vector: Vec<&&Loop> = ks.iter().filter(|l| l.vector_copies > 0).collect();
        if ks.len() != 2 || vector.len() != 1 {
            failures.push(format!("{kernel}: expected a 4-byte and a 16-byte k-loop, found {} loops", ks.len()));
            continue;
        }
        let v = vector[0];
        if v.ffma_share() < floor || v.vector_copies > copies {
            failures.push(format!(
                "{kernel}: 16-byte k-loop is {:.1}% FFMA with {} copies, expected >= {:.0}% and <= {copies}",
                100.0 * v.ffma_share(),
                v.vector_copies,
                100.0 * floor
            ));
        }
    }
    assert!(loops.len() >= 175, "found only {} GEMM k-loops: has the listing format changed?", loops.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The GEMM kernels: the ones with a block-tile suffix.
fn is_gemm(kernel: &str) -> bool {
    ["_t128", "_t128x64", "_t64", "_t96", "_t128x96", "_t64_strided"].iter().any(|t| kernel.ends_with(t))
}

/// `ptx::entries` reads the launch bounds that `ptxgrad kernels` checks the driver's build against
/// on a GPU (tests/kernel_resources.rs): every GEMM kernel has `__launch_bounds__(256, 2)`, the
/// others at most a thread bound (they run whatever number of blocks fits).
#[test]
fn ptx_entries_read_the_launch_bounds() {
    let Some(modules) = modules_or_skip() else { return };
    let entries: Vec<_> = modules.iter().flat_map(|&(_, ptx)| ptxgrad::ptx::entries(ptx)).collect();
    let (gemm, other): (Vec<_>, Vec<_>) = entries.iter().partition(|e| is_gemm(e.name));
    assert!(gemm.len() >= 140 && other.len() >= 20, "{} GEMM and {} other kernels", gemm.len(), other.len());
    for e in &gemm {
        assert_eq!((e.max_threads, e.min_blocks), (Some(256), Some(2)), "{}", e.name);
    }
    for e in &other {
        assert_eq!(e.min_blocks, None, "{}", e.name);
    }
    let bounded: Vec<_> = other.iter().filter(|e| e.max_threads.is_some()).map(|e| e.name).collect();
    assert!(bounded.contains(&"winograd_gather_f32_a8") && bounded.contains(&"conv2d_bwd_bias_f32"), "{bounded:?}");
}

/// The sm_90 SASS listings of the modules that hold GEMM kernels (conv2d, dense, winograd),
/// disassembled once for the tests that read them: the machine code the binaries embed (what an
/// sm_90 GPU runs, see build.rs), or, in a build without it, ptxas's of the embedded PTX. None
/// (after saying why) without the tools.
fn gemm_sass() -> Option<&'static [String]> {
    static SASS: std::sync::OnceLock<Option<Vec<String>>> = std::sync::OnceLock::new();
    SASS.get_or_init(|| {
        let modules = modules_or_skip()?;
        let nvdisasm = tool_or_skip("nvdisasm", "NVDISASM", "cu13")?;
        let dir = scratch_dir("sass");
        let mut sass = Vec::new();
        for (stem, ptx) in modules.into_iter().filter(|(s, _)| ["conv2d", "dense", "winograd"].contains(s)) {
            let cubin = match module(stem).sass(90) {
                Some(embedded) => embedded,
                None => cubin_of(&tool_or_skip("ptxas", "PTXAS", "cuda_nvcc")?, &dir, stem, ptx, 90),
            };
            sass.push(disassemble(&nvdisasm, &dir, stem, &cubin));
        }
        std::fs::remove_dir_all(&dir).ok();
        Some(sass)
    })
    .as_deref()
}

/// Per kernel of a listing: its global stores of 4 and of 8 bytes, its stores to generic
/// addresses (ST.*: where the compiler lost track of a pointer being global), and its calls
/// (CALL.*: the subroutines of 64-bit integer division, say).
struct Stores {
    kernel: String,
    scalar: usize,
    paired: usize,
    generic: usize,
    calls: usize,
}

fn stores_in(sass: &str) -> Vec<Stores> {
    let mut out = Vec::new();
    for (kernel, lines) in kernels_in(sass) {
        let mut k = Stores { kernel, scalar: 0, paired: 0, generic: 0, calls: 0 };
        for (op, _) in lines.into_iter().filter_map(instruction) {
            match op {
                "STG.E" => k.scalar += 1,
                "STG.E.64" => k.paired += 1,
                o if o.starts_with("ST.") => k.generic += 1,
                o if o.starts_with("CALL") => k.calls += 1,
                _ => {}
            }
        }
        out.push(k);
    }
    out
}

/// gemm.cuh's epilogue rule, in the machine code: the tensor-core GEMMs and the FFMA GEMMs of the
/// Winograd GEMM, the conv forward and the dense weight grad store two columns at a time (STG.E.64);
/// the FFMA GEMMs of the other families (`vec_unless_ffma`: at the register limit) store none so.
/// And every GEMM stores to global addresses (dense's split-K slice once went through generic ST)
/// and calls no subroutine (no division sequence of 64-bit integers, no slow-path call).
#[test]
fn gemm_kernels_store_as_gemm_cuh_says() {
    let Some(sass) = gemm_sass() else { return };
    let kernels: Vec<Stores> = sass
        .iter()
        .flat_map(|s| stores_in(s))
        .filter(|k| is_gemm(&k.kernel) && !k.kernel.ends_with("_strided"))
        .collect();
    let paired_ffma = ["winograd_gemm_f32_", "conv2d_fwd_f32_", "dense_bwd_weight_f32_"];
    let mut failures = Vec::new();
    for Stores { kernel, scalar, paired, generic, calls } in &kernels {
        let want = !kernel.contains("_f32_") || paired_ffma.iter().any(|f| kernel.starts_with(f));
        if (*paired > 0) != want || *generic > 0 || *calls > 0 {
            failures.push(format!(
                "{kernel}: {paired} paired, {scalar} single and {generic} generic stores, {calls} calls; \
                 expected paired: {want}, no generic store, no call"
            ));
        }
    }
    assert!(kernels.len() >= 100, "found only {} GEMM kernels: has the listing format changed?", kernels.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The module named `stem`.
fn module(stem: &str) -> ptxgrad::ptx::Module {
    *ptxgrad::ptx::Module::ALL.iter().find(|m| m.stem() == stem).expect("a module of that name")
}

/// `ptx` assembled by `ptxas` for sm_<arch>: the cubin's bytes.
fn cubin_of(ptxas: &Path, dir: &Path, stem: &str, ptx: &str, arch: u32) -> Vec<u8> {
    let (src, cubin) = (dir.join(format!("{stem}.ptx")), dir.join(format!("{stem}.sm_{arch}.cubin")));
    std::fs::write(&src, ptx).unwrap();
    let out = Command::new(ptxas)
        .arg(format!("-arch=sm_{arch}"))
        .arg("-o")
        .arg(&cubin)
        .arg(&src)
        .output()
        .expect("run ptxas");
    assert!(out.status.success(), "ptxas {stem}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&cubin).unwrap()
}

/// A cubin's SASS listing (nvdisasm -c).
fn disassemble(nvdisasm: &Path, dir: &Path, stem: &str, cubin: &[u8]) -> String {
    let path = dir.join(format!("{stem}.listed.cubin"));
    std::fs::write(&path, cubin).unwrap();
    let out = Command::new(nvdisasm).arg("-c").arg(&path).output().expect("run nvdisasm");
    assert!(out.status.success(), "nvdisasm {stem}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The machine code the binaries embed (build.rs) is exactly what ptxas makes of the embedded
/// PTX, for every module and every GPU it was built for: the two cannot drift apart, and what
/// the SASS tests above read is what an sm_90 GPU runs. CI's build must have sm_90's.
#[test]
fn embedded_machine_code_is_ptxas_of_the_embedded_ptx() {
    let Some(modules) = modules_or_skip() else { return };
    let archs = ptxgrad::ptx::SASS_ARCHS;
    assert!(!required() || archs.contains(&90), "PTXGRAD_REQUIRE_KERNELS=1 but no sm_90 machine code: {archs:?}");
    if archs.is_empty() {
        eprintln!("SKIPPED: this build embeds no machine code (PTXGRAD_SASS=none, or no ptxas when it was built)");
        return;
    }
    let Some(ptxas) = tool_or_skip("ptxas", "PTXAS", "cuda_nvcc") else { return };
    let dir = scratch_dir("embedded");
    for (stem, ptx) in modules {
        for &arch in archs {
            let embedded = module(stem).sass(arch).expect("every module has every arch of SASS_ARCHS");
            assert!(
                embedded == cubin_of(&ptxas, &dir, stem, ptx, arch),
                "{stem}: the embedded sm_{arch} machine code ({} bytes, by {}) differs from what {} makes of the \
                 embedded PTX: rebuild with one ptxas",
                embedded.len(),
                ptxgrad::ptx::SASS_COMPILER,
                ptxas.display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The emulator's kernel table (module, launch bounds), from which it refuses the launches a
/// GPU would refuse, equals what the GPU loads: every `.entry` of every PTX module, with its
/// `.maxntid`. So a launch the emulated tests accept finds its kernel in that module on a GPU.
#[test]
fn emulator_kernel_table_matches_the_ptx() {
    let Some(modules) = modules_or_skip() else { return };
    let mut ptx: Vec<(String, String, u32)> = modules
        .iter()
        .flat_map(|&(stem, ptx)| {
            ptxgrad::ptx::entries(ptx)
                .into_iter()
                .map(move |e| (e.name.to_string(), stem.to_string(), e.max_threads.unwrap_or(1024)))
        })
        .collect();
    let mut emu: Vec<(String, String, u32)> = ptxgrad_emu::KERNELS
        .iter()
        .filter(|k| k.module != "selftest")
        .map(|k| (k.name.to_string(), k.module.to_string(), k.max_threads))
        .collect();
    ptx.sort();
    emu.sort();
    assert!(ptx.len() > 40, "found only {} PTX entries", ptx.len());
    assert_eq!(emu, ptx, "emulator table (left) vs PTX (right)");
}

/// `ptx::Module` is generated from kernels/: one variant per .cu file, in file-name order, each
/// naming its own file, and every one embedded in the build.
#[test]
fn every_kernel_file_is_a_module() {
    use ptxgrad::ptx::Module;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut stems: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    stems.sort();
    let modules: Vec<&str> = Module::ALL.iter().map(|m| m.stem()).collect();
    assert_eq!(modules, stems);
    let built: Vec<&str> = ptxgrad::ptx::all().iter().map(|(stem, _)| *stem).collect();
    assert_eq!(built, stems);
    // The variant names follow the file names: softmax_xent.cu is Module::SoftmaxXent.
    assert_eq!(format!("{:?}", Module::SoftmaxXent), "SoftmaxXent");
    assert_eq!(Module::SoftmaxXent.stem(), "softmax_xent");
}
