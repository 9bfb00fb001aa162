//! What `train`, `eval` and `predict` share before any work: the device, the memory check, the
//! data, and what a missing checkpoint is told with.

use std::path::Path;

use anyhow::{bail, Context, Result};

use ptxgrad::data::fashion_mnist::{resolve_data_dir, FashionMnist};
use ptxgrad::nn::network::Footprint;
use ptxgrad::nn::Compute;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::Device;

use crate::args::DataArgs;

/// Picks the device; `auto` without a usable GPU falls back to the CPU with a warning (how slow
/// that is depends on the input size: `resolution`, where known).
pub fn pick_device(spec: &str, resolution: Option<usize>) -> Result<Device> {
    if spec == "auto" {
        return Ok(match Device::parse("cuda") {
            Ok(d) => d,
            Err(e) => {
                let slow = match resolution {
                    Some(r) if r > 96 => format!(", which is very slow at {r}x{r}"),
                    _ => String::new(),
                };
                eprintln!("warning: no GPU ({e}); running on the CPU{slow}");
                Device::Cpu
            }
        });
    }
    Ok(Device::parse(spec)?)
}

/// Bytes as GB (or MB below one GB), for messages.
fn gigabytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.0} MB", bytes as f64 / 1e6)
    }
}

/// Refuses a run whose model, at `flags`' sizes, cannot fit the memory `device` has left, before
/// anything is allocated: what the OOM killer or a failed allocation would say later, hours in.
pub fn check_memory(device: &Device, need: Footprint, flags: &str, what: &str) -> Result<()> {
    let free = device.memory_available()?;
    let parts = format!(
        "{} of parameters{}, {} of activations",
        gigabytes(need.params),
        if what == "training" { " and gradients" } else { "" },
        gigabytes(need.activations)
    );
    let advice = "use a smaller --resize or --batch-size";
    match (free.device, device) {
        (Some(avail), Device::Cuda(g)) if !g.is_emu() && need.device > avail => bail!(
            "{flags}: {what} needs at least {} of GPU memory ({parts}), but {} has {} free; {advice}",
            gigabytes(need.device),
            device.label(),
            gigabytes(avail)
        ),
        _ => {}
    }
    // On the CPU and the emulator the model's memory is the host's too.
    let on_host = match device {
        Device::Cuda(g) if !g.is_emu() => need.host,
        _ => need.host.saturating_add(need.device),
    };
    if let Some(avail) = free.host.filter(|&a| on_host > a) {
        bail!(
            "{flags}: {what} needs at least {} of host memory ({parts}, and the copies a checkpoint is made of), \
             but {} is available; {advice}",
            gigabytes(on_host),
            gigabytes(avail)
        );
    }
    Ok(())
}

/// Fashion-MNIST from `--data-dir` (or its default), each split cut to its first `cap` examples.
pub fn load_data(args: &DataArgs, cap: Option<usize>) -> Result<FashionMnist> {
    let dir = resolve_data_dir(args.data_dir.as_deref());
    let mut data = FashionMnist::load(&dir).with_context(|| format!("loading Fashion-MNIST from {}", dir.display()))?;
    if let Some(n) = cap {
        data.train.truncate(n);
        data.test.truncate(n);
    }
    Ok(data)
}

/// What a missing checkpoint is told with; `what` prefixes it (the flag that asked for it).
pub fn missing_checkpoint(what: &str, checkpoint: &Path) -> String {
    format!(
        "{what}no checkpoint at {}: `ptxgrad train` writes one after every epoch (--checkpoint PATH names another \
         file)",
        checkpoint.display()
    )
}

/// How the model runs its GEMMs and convolutions, as --math and --conv-algo say; refused at once
/// where the device cannot run it.
pub fn compute_of(data: &DataArgs, device: &Device) -> Result<Compute> {
    let compute = Compute { gemm: GemmOpts::math(data.math), conv: data.conv_algo };
    compute.gemm.check_device(device)?;
    Ok(compute)
}
