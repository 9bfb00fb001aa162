//! `ptxgrad eval` and `ptxgrad predict`: a checkpoint's accuracy on the test set, and its
//! predictions for the first test images; as text, or with `--json` as one JSON line per image
//! (its logits) and one of totals.

use anyhow::{bail, Context, Result};
use serde_json::json;

use ptxgrad::data::fashion_mnist::{FashionMnist, CLASS_NAMES};
use ptxgrad::nn::model::Model;
use ptxgrad::nn::saved::{self, Expect, Loaded, Source};
use ptxgrad::ops::softmax_xent::argmax_rows_cpu;
use ptxgrad::train;
use ptxgrad::Device;

use crate::args::CheckpointArgs;
use crate::report::print_predictions;
use crate::setup::{check_memory, compute_of, load_data, missing_checkpoint, pick_device};

/// The checkpoint's model on the device `a` names, set to run as `a` says, and the test set
/// (cut to `--max-examples`).
fn open(a: &CheckpointArgs) -> Result<(Loaded, FashionMnist, Device)> {
    let path = a.path();
    if !path.exists() {
        bail!(missing_checkpoint("", &path));
    }
    let device = pick_device(&a.data.device, None)?;
    let compute = compute_of(&a.data, &device)?;
    let expect = Expect { net: a.model, resolution: a.resize };
    // The errors of `saved::load` name the file already.
    let mut loaded = saved::load(&path, &device, expect).context("loading a checkpoint")?;
    loaded.model = loaded.model.with_compute(compute)?;
    let model = &loaded.model;
    let need = model.net.footprint(model.resolution, train::EVAL_BATCH, false)?;
    let r = model.resolution;
    check_memory(&device, need, &format!("the checkpoint's {r}x{r} inputs"), "evaluation")?;
    if let (Source::StateDict { note }, false) = (&loaded.source, a.json) {
        println!("{}: {note}", path.display());
    }
    let mut data = load_data(&a.data, None)?;
    if let Some(n) = a.max_examples {
        data.test.truncate(n);
    }
    Ok((loaded, data, device))
}

/// The JSON line of test image `index`: its label, the predicted class (torch.argmax of the
/// logits, as the device's accuracy counts it) and the logits.
fn image_json(index: usize, label: u8, predicted: u32, logits: &[f32]) -> serde_json::Value {
    json!({
        "kind": "image", "index": index, "label": label, "label_name": CLASS_NAMES.get(label as usize),
        "predicted": predicted, "predicted_name": CLASS_NAMES.get(predicted as usize), "logits": logits,
    })
}

/// Prints every image's JSON line for the first `n` test images and returns how many were
/// predicted correctly.
fn print_images(model: &Model, data: &FashionMnist, n: usize) -> Result<usize> {
    let classes = model.net.classes;
    let logits = train::logits(model, &data.test, n)?;
    let predicted = argmax_rows_cpu(&logits, classes);
    let mut correct = 0;
    for (i, (row, &p)) in logits.chunks(classes).zip(&predicted).enumerate() {
        let label = data.test.labels[i];
        correct += usize::from(p == label as u32);
        println!("{}", image_json(i, label, p, row));
    }
    Ok(correct)
}

/// The `"kind": "totals"` line.
fn totals_json(a: &CheckpointArgs, loaded: &Loaded, device: &Device, n: usize, correct: usize) -> serde_json::Value {
    let m = &loaded.model;
    json!({
        "kind": "totals", "checkpoint": a.path().display().to_string(), "model": m.net.name,
        "epoch": loaded.epoch(), "resolution": m.resolution, "examples": n, "correct": correct,
        "accuracy": if n == 0 { None } else { Some(correct as f64 / n as f64) },
        "device": device.label(), "device_name": device.hardware_name(),
        "plain_state_dict": matches!(loaded.source, Source::StateDict { .. }),
    })
}

pub fn eval(a: CheckpointArgs) -> Result<()> {
    let (loaded, data, device) = open(&a)?;
    if data.test.is_empty() {
        bail!("no test examples to evaluate on");
    }
    let model = &loaded.model;
    let n = data.test.len();
    if a.json {
        let correct = print_images(model, &data, n)?;
        println!("{}", totals_json(&a, &loaded, &device, n, correct));
        return Ok(());
    }
    let acc = train::evaluate(model, &data.test, model.resolution)?;
    println!(
        "{}: {} after epoch {}, {}x{}, test acc {acc:.4} on {n} examples",
        a.path().display(),
        model.net.title,
        loaded.epoch(),
        model.resolution,
        model.resolution,
    );
    Ok(())
}

pub fn predict(a: CheckpointArgs, count: usize) -> Result<()> {
    let (loaded, data, device) = open(&a)?;
    if a.json {
        let n = count.min(data.test.len());
        let correct = print_images(&loaded.model, &data, n)?;
        println!("{}", totals_json(&a, &loaded, &device, n, correct));
        return Ok(());
    }
    print_predictions(&loaded.model, &data, count)
}
