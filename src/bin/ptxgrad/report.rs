//! Printing shared by the commands: accuracies and the table of predictions.

use anyhow::Result;

use ptxgrad::data::fashion_mnist::{FashionMnist, CLASS_NAMES};
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
    let pred = train::predict(model, &data.test, model.resolution, n)?;
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
