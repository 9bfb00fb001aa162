//! `ptxgrad kernels`: every kernel's resources as the GPU's driver reports them, checked
//! against the kernels' design rules.

use anyhow::{bail, Result};

use serde_json::json;

use ptxgrad::device::LoadedCode;
use ptxgrad::kernel_resources::{self, KernelResources};
use ptxgrad::Device;

/// Prints the table (or one JSON line per kernel, `json`) for the GPU `spec` names; fails,
/// listing them, if any design rule is broken.
pub fn run(spec: &str, json: bool) -> Result<()> {
    let gpu = match Device::parse(spec)? {
        Device::Cuda(g) if !g.is_emu() => g,
        d => bail!("`kernels` reports what a GPU runs: expected --device cuda or cuda:N, found {d:?}"),
    };
    let kernels = kernel_resources::kernel_resources(&gpu)?;
    if json {
        for k in &kernels {
            println!("{}", kernel_json(k));
        }
    } else {
        println!("{} (driver {}), {}:", gpu.name, ptxgrad::device::driver_version(), gpu.kernel_code());
        print!("{}", table(&kernels));
    }
    let breaking = kernel_resources::broken_rules(&kernels);
    if !breaking.is_empty() {
        bail!("{} design rule(s) broken:\n  {}", breaking.len(), breaking.join("\n  "));
    }
    Ok(())
}

/// One kernel as a JSON line (`"kind": "kernel"`).
fn kernel_json(k: &KernelResources) -> serde_json::Value {
    json!({
        "kind": "kernel", "module": k.module, "kernel": k.kernel,
        "registers": k.registers, "local_bytes": k.local_bytes,
        "shared_bytes": k.shared_bytes, "max_threads": k.max_threads,
        "bound_threads": k.bound_threads, "bound_blocks": k.bound_blocks,
        "blocks_per_sm": k.blocks_per_sm, "binary_version": k.binary_version,
        "code": k.code.to_string(), "violations": k.violations(),
    })
}

/// A table of `kernels`, one line each, then a line of totals.
fn table(kernels: &[KernelResources]) -> String {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    let mut s = format!(
        "{:<12} {:<34} {:>5} {:>4} {:>6} {:>7} {:>7} {:>7} {:>7}  {}\n",
        "module", "kernel", "code", "regs", "local", "shared", "threads", "blk/SM", "bounds", "breaks"
    );
    for k in kernels {
        let bounds = format!("{}x{}", opt(k.bound_threads), opt(k.bound_blocks));
        s += &format!(
            "{:<12} {:<34} {:>5} {:>4} {:>6} {:>7} {:>7} {:>7} {:>7}  {}\n",
            k.module,
            k.kernel,
            match k.code {
                LoadedCode::Sass(arch) => format!("sm_{arch}"),
                LoadedCode::Ptx(_) => "ptx".into(),
            },
            k.registers,
            k.local_bytes,
            k.shared_bytes,
            k.max_threads,
            opt(k.blocks_per_sm),
            bounds,
            k.violations().join("; ")
        );
    }
    let breaking = kernels.iter().filter(|k| !k.violations().is_empty()).count();
    let arch: std::collections::BTreeSet<u32> = kernels.iter().map(|k| k.binary_version).collect();
    s += &format!(
        "{} kernels (machine code for sm_{}), {} with local memory, {} breaking a design rule\n",
        kernels.len(),
        arch.iter().map(u32::to_string).collect::<Vec<_>>().join("/sm_"),
        kernels.iter().filter(|k| k.local_bytes > 0).count(),
        breaking
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GEMM kernel as the rules want it: 128 registers, 2 blocks of 256 threads per SM.
    fn gemm_kernel() -> KernelResources {
        KernelResources {
            module: "conv2d",
            kernel: "conv2d_fwd_f32_t128",
            registers: 128,
            local_bytes: 0,
            shared_bytes: 25_088,
            max_threads: 256,
            bound_threads: Some(256),
            bound_blocks: Some(2),
            blocks_per_sm: Some(2),
            binary_version: 90,
            code: LoadedCode::Sass(90),
        }
    }

    #[test]
    fn the_table_lists_every_kernel_and_the_totals() {
        let kernels =
            [gemm_kernel(), KernelResources { kernel: "conv2d_fwd_f32_t64", local_bytes: 8, ..gemm_kernel() }];
        let table = table(&kernels);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].contains("conv2d_fwd_f32_t128") && lines[1].trim_end().ends_with("256x2"), "{table}");
        assert!(lines[1].contains(" sm_90 "), "{table}");
        assert!(lines[2].contains("8 bytes of local memory"), "{table}");
        assert_eq!(lines[3], "2 kernels (machine code for sm_90), 1 with local memory, 1 breaking a design rule");
        let json = kernel_json(&kernels[1]);
        assert_eq!(json["local_bytes"], 8);
        assert_eq!(json["violations"].as_array().map(Vec::len), Some(1));
    }
}
