//! `ptxgrad eval` and `ptxgrad predict`: a checkpoint's accuracy on the test set, and its
//! predictions for the first test images.

use std::path::Path;

use anyhow::{bail, Result};

use ptxgrad::nn::model::Model;
use ptxgrad::nn::Compute;
use ptxgrad::train;
use ptxgrad::Device;

use crate::args::CheckpointArgs;
use crate::report::print_predictions;
use crate::setup::{check_memory, compute_of, load_data, open_checkpoint, pick_device};

fn load_model(checkpoint: &Path, compute: Compute, device: &Device) -> Result<(Model, usize)> {
    let (model, epoch) = open_checkpoint(checkpoint, device, "")?;
    Ok((model.with_compute(compute)?, epoch))
}

/// `check_memory` for evaluating `model` in batches of `train::EVAL_BATCH`.
fn check_eval_memory(model: &Model, device: &Device) -> Result<()> {
    let need = model.net.footprint(model.resolution, train::EVAL_BATCH, false)?;
    let r = model.resolution;
    check_memory(device, need, &format!("the checkpoint's {r}x{r} inputs"), "evaluation")
}

pub fn eval(a: CheckpointArgs) -> Result<()> {
    let device = pick_device(&a.data.device, None)?;
    let compute = compute_of(&a.data, &device)?;
    let (model, epoch) = load_model(&a.checkpoint, compute, &device)?;
    let data = load_data(&a.data, None)?;
    check_eval_memory(&model, &device)?;
    if data.test.is_empty() {
        bail!("no test examples to evaluate on");
    }
    let acc = train::evaluate(&model, &data.test, model.resolution)?;
    println!(
        "{}: epoch {epoch}, {}x{}, test acc {acc:.4} on {} examples",
        a.checkpoint.display(),
        model.resolution,
        model.resolution,
        data.test.len()
    );
    Ok(())
}

pub fn predict(a: CheckpointArgs, count: usize) -> Result<()> {
    let device = pick_device(&a.data.device, None)?;
    let compute = compute_of(&a.data, &device)?;
    let (model, _) = load_model(&a.checkpoint, compute, &device)?;
    let data = load_data(&a.data, None)?;
    check_eval_memory(&model, &device)?;
    print_predictions(&model, &data, count)
}
