//! Printing shared by the commands: accuracies, the table of predictions, and what
//! `--conv-algo auto` measured.

use anyhow::Result;

use serde_json::json;

use ptxgrad::data::fashion_mnist::{FashionMnist, CLASS_NAMES};
use ptxgrad::nn::conv_tune::LayerTuning;
use ptxgrad::nn::model::Model;
use ptxgrad::train;

/// An accuracy for printing: "n/a" where there was nothing to measure it on (NaN).
pub fn accuracy(acc: f64) -> String {
    if acc.is_nan() {
        "n/a".into()
    } else {
        format!("{acc:.3}")
    }
}

/// True and predicted labels of the first `count` test images, and the accuracy on them.
pub fn print_predictions(model: &Model, data: &FashionMnist, count: usize) -> Result<()> {
    let n = count.min(data.test.len());
    if n == 0 {
        println!("no test images to predict");
        return Ok(());
    }
    let pred = train::predict(model, &data.test, n)?;
    println!("first {n} test images:");
    println!("  {:>3}  {:<12} {:<12}", "#", "true", "predicted");
    let mut correct = 0;
    for (i, &p) in pred.iter().enumerate() {
        let t = data.test.labels[i] as usize;
        correct += usize::from(t == p as usize);
        let mark = if t == p as usize { "" } else { "  <- wrong" };
        println!("  {i:>3}  {:<12} {:<12}{mark}", CLASS_NAMES[t], CLASS_NAMES[p as usize % CLASS_NAMES.len()]);
    }
    println!("accuracy on these {n}: {:.3}", correct as f64 / n.max(1) as f64);
    Ok(())
}

/// One line per conv layer: its shape, the choice, and what each candidate measured.
pub fn tunings_table(tunings: &[LayerTuning]) -> String {
    let mut out = String::new();
    for t in tunings {
        let p = &t.params;
        let shape =
            format!("{}x{} stride {}, ({}, {}, {}, {}) -> {}", p.kh, p.kw, p.stride, p.n, p.c_in, p.h, p.w, p.c_out);
        let trials: Vec<String> = t
            .trials
            .iter()
            .map(|tr| {
                if tr.out_of_memory {
                    format!("{} out of memory", tr.algo)
                } else if tr.agrees() {
                    format!("{} {:.3} ms", tr.algo, tr.ms)
                } else {
                    format!("{} disagrees ({:.1e})", tr.algo, tr.rel_err)
                }
            })
            .collect();
        let measured = if trials.is_empty() { "not timed".to_string() } else { trials.join(", ") };
        out.push_str(&format!("  conv {:>2} {shape}: {} [{measured}]\n", t.layer, t.chosen));
    }
    out
}

/// One layer's tuning as a JSON line (`"kind": "conv_tune"`), for `bench` and `train --json`.
pub fn tuning_json(t: &LayerTuning) -> serde_json::Value {
    let trials: Vec<_> = t
        .trials
        .iter()
        .map(|tr| {
            // NaN and infinity are not JSON: null where the candidate did not run.
            let finite = |v: f32| v.is_finite().then_some(v);
            json!({"algo": tr.algo.to_string(), "ms": finite(tr.ms), "rel_err": finite(tr.rel_err),
                   "agrees": tr.agrees(), "out_of_memory": tr.out_of_memory})
        })
        .collect();
    json!({"kind": "conv_tune", "layer": t.layer, "chosen": t.chosen.to_string(), "trials": trials})
}
