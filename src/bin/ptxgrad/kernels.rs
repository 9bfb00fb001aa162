//! `ptxgrad kernels`: every kernel's resources as the GPU's driver reports them, checked
//! against the kernels' design rules.

use anyhow::{bail, Result};

use ptxgrad::{kernel_resources, Device};

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
            println!("{}", k.to_json());
        }
    } else {
        println!("{} (driver {}), {}:", gpu.name, ptxgrad::device::driver_version(), gpu.kernel_code());
        print!("{}", kernel_resources::report(&kernels));
    }
    let breaking = kernel_resources::broken_rules(&kernels);
    if !breaking.is_empty() {
        bail!("{} design rule(s) broken:\n  {}", breaking.len(), breaking.join("\n  "));
    }
    Ok(())
}
