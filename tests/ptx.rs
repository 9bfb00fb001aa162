//! Assembles every kernel module's PTX with ptxas for sm_80 (A100) and sm_90 (H100/H200):
//! any ptxas error fails, and so does a register spill (spills to local memory are slow and
//! the kernels are designed not to need them). Prints registers and spills per kernel.
//!
//! ptxas comes from $PTXAS, the project's `.cuda/` wheels (scripts/cuda-wheels.sh), a CUDA
//! toolkit, or PATH. Without one the test skips with a reason, unless PTXGRAD_REQUIRE_KERNELS=1
//! (CI), where a missing ptxas or a CPU-only build is a failure.

use std::path::PathBuf;
use std::process::Command;

fn find_ptxas() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PTXAS").map(PathBuf::from).into_iter().collect();
    // Set by cargo when it runs the test (absent when the binary runs elsewhere).
    if let Some(root) = std::env::var_os("CARGO_MANIFEST_DIR") {
        candidates.push(PathBuf::from(root).join(".cuda/nvidia/cuda_nvcc/bin/ptxas"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(var) {
            candidates.push(PathBuf::from(r).join("bin/ptxas"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("ptxas")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn required() -> bool {
    std::env::var("PTXGRAD_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// (kernel, registers, spill bytes) from `ptxas -v` output.
fn parse_report(stderr: &str) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut spills = 0;
    for line in stderr.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().unwrap_or("").to_string();
            spills = 0;
        } else if line.contains("bytes spill stores") {
            let n = |key: &str| -> u32 {
                line.split(',')
                    .find(|p| p.contains(key))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            spills = n("spill stores") + n("spill loads");
        } else if let Some(rest) = line.split("Used ").nth(1) {
            let regs = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((current.clone(), regs, spills));
        }
    }
    out
}

#[test]
fn every_kernel_assembles_for_sm80_and_sm90_without_spills() {
    let modules = ptxgrad::ptx::all();
    if modules.iter().any(|(_, ptx)| ptx.is_none()) {
        assert!(!required(), "PTXGRAD_REQUIRE_KERNELS=1 but this is a CPU-only build (no PTX embedded)");
        eprintln!("SKIPPED: CPU-only build, no PTX to check");
        return;
    }
    let Some(ptxas) = find_ptxas() else {
        assert!(!required(), "PTXGRAD_REQUIRE_KERNELS=1 but no ptxas found (run scripts/cuda-wheels.sh)");
        eprintln!("SKIPPED: no ptxas found (set PTXAS or run scripts/cuda-wheels.sh)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("ptxgrad-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    let mut kernels = 0;
    println!("{:<32} {:>6} {:>10} {:>7}", "kernel", "arch", "registers", "spills");
    for (stem, ptx) in modules {
        let src = dir.join(format!("{stem}.ptx"));
        std::fs::write(&src, ptx.unwrap()).unwrap();
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
            for (kernel, regs, spills) in parse_report(&stderr) {
                println!("{kernel:<32} {arch:>6} {regs:>10} {spills:>7}");
                kernels += 1;
                if spills > 0 {
                    failures.push(format!("{kernel} ({arch}): {spills} bytes of register spills"));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "ptxas problems:\n{}", failures.join("\n"));
    assert!(kernels > 0, "ptxas reported no kernels at all");
}
