//! `ptxgrad bench`: the library's `bench::run`, printed as JSON lines as each figure comes
//! (`"kind"`: env, conv_tune, bench, profiled, layer), then the per-layer table.

use anyhow::{bail, Context, Result};
use serde_json::json;

use ptxgrad::bench::{self, BenchConfig, LayerTime, Measured, StepTimes, LAYER_REPS};
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::Device;

use crate::args::BenchArgs;

pub fn run(a: &BenchArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let net = a.model;
    let batch_size = a.batch_size.unwrap_or(net.recipe.batch_size);
    let resolution = a.resize.unwrap_or(net.recipe.resolution);
    net.leaf_shapes(&net.input_shape(1, resolution)).context("--resize")?;
    if batch_size == 0 || a.steps == 0 {
        bail!("--batch-size and --steps must be at least 1");
    }
    GemmOpts::math(a.math).check_device(&device)?;
    if a.profile_steps > 0 && !device.is_cuda() {
        bail!("--profile-steps needs a CUDA device (or emu), not {}", device.label());
    }
    let cfg = BenchConfig {
        net,
        device,
        batch_size,
        warmup: a.warmup,
        steps: a.steps,
        resolution,
        layers: !a.no_layers,
        profile_steps: a.profile_steps,
        conv_algo: a.conv_algo,
        math: a.math,
    };
    bench::run(&cfg, |m| match m {
        Measured::Env(env) => println!(
            "{}",
            json!({"kind": "env", "engine": "ptxgrad", "model": cfg.net.name, "device": env.device, "device_name": env.device_name, "kernels": env.kernels})
        ),
        Measured::Tunings(tunings) => {
            for t in tunings {
                println!("{}", crate::report::tuning_json(t));
            }
        }
        Measured::Steps(s) => println!("{}", steps_json(&cfg, s)),
        Measured::Profiled { steps, first_step } => {
            println!("{}", json!({"kind": "profiled", "steps": steps, "first_step": first_step}))
        }
        Measured::Layers(rows) => print_layers(&cfg, rows),
    })?;
    Ok(())
}

/// The `"kind": "bench"` line: the figures rounded as a table shows them (the rate to 0.1
/// examples/sec, the step to a microsecond, memory to 0.01 GiB).
fn steps_json(cfg: &BenchConfig, s: &StepTimes) -> serde_json::Value {
    let round = |v: f64, scale: f64| (v * scale).round() / scale;
    let peak_gib = s.peak_pool_bytes.map(|b| b as f64 / (1u64 << 30) as f64);
    let conv_algos: Vec<String> = s.conv_algos.iter().map(|a| a.to_string()).collect();
    json!({
        "kind": "bench", "model": cfg.net.name, "config": format!("ptxgrad-{}", cfg.math), "math": cfg.math.to_string(),
        "conv_algo": cfg.conv_algo.to_string(), "conv_algos": conv_algos,
        "batch": cfg.batch_size, "resolution": cfg.resolution,
        "examples_per_sec": round(s.examples_per_sec(cfg.batch_size), 10.0),
        "ms_per_step": round(s.ms_per_step, 1e3), "warmup_s": round(s.warmup_s, 100.0),
        "peak_mem_gib": peak_gib.map(|m| round(m, 100.0)),
        "kernel_code": s.kernel_code,
        "allocations_in_timed_steps": s.counts.map(|c| c.allocations),
        "host_copies_in_timed_steps": s.counts.map(|c| c.traffic.uploads + c.traffic.downloads),
        "synchronizations_in_timed_steps": s.counts.map(|c| c.traffic.synchronizations),
    })
}

/// One `"kind": "layer"` line per case, then the table with each case's share of the total.
fn print_layers(cfg: &BenchConfig, rows: &[LayerTime]) {
    let (b, r) = (cfg.batch_size, cfg.resolution);
    let total: f32 = rows.iter().map(|r| r.fwd_ms + r.bwd_ms).sum();
    for row in rows {
        println!(
            "{}",
            json!({"kind": "layer", "layer": row.name.trim(), "algo": row.algo.map(|a| a.to_string()),
                   "output": row.output, "fwd_ms": row.fwd_ms, "bwd_ms": row.bwd_ms})
        );
    }
    let emulated = matches!(&cfg.device, Device::Cuda(g) if g.is_emu());
    let clock = if emulated { "wall time on the kernel emulator" } else { "CUDA events" };
    println!("\nper-layer GPU time of {}, batch {b} at {r}x{r} ({clock}, mean of {LAYER_REPS}):", cfg.net.title);
    println!("{:<22} {:<11} {:>20} {:>9} {:>9} {:>7}", "layer", "algorithm", "output", "fwd ms", "bwd ms", "share");
    for row in rows {
        println!(
            "{:<22} {:<11} {:>20} {:>9.3} {:>9.3} {:>6.1}%",
            row.name,
            row.algo.map_or(String::new(), |a| a.to_string()),
            format!("{:?}", row.output),
            row.fwd_ms,
            row.bwd_ms,
            100.0 * (row.fwd_ms + row.bwd_ms) / total
        );
    }
    println!("{:<22} {:<11} {:>20} {:>19.3}", "total", "", "", total);
}
