//! GoogLeNet and ResNet-18, the networks whose branches join (Inception's concatenation,
//! ResNet's shortcut) and whose batch norm has state that is not a parameter, end to end on the
//! CPU at a small input: evaluation against training mode, the running statistics a step leaves,
//! checkpoints that carry them, and a short run that learns.
mod common;
use common::*;
use ptxgrad::checkpoint::Claim;
use ptxgrad::data::fashion_mnist::FashionMnist;
use ptxgrad::nn::model::Model;
use ptxgrad::nn::models::{ALEXNET, GOOGLENET, RESNET18};
use ptxgrad::nn::saved;
use ptxgrad::train::{self, prepare_batch, train_step, NoProgress, Stop, TrainConfig};
use ptxgrad::{Device, Tape, Tensor};

/// A batch of `n` synthetic 28x28 images resized to `r` and their labels.
fn batch(n: usize, r: usize) -> (Tensor, ptxgrad::tensor::Labels) {
    let pixels: Vec<u8> = (0..n * 784).map(|i| ((i * 37 + i / 784 * 11) % 256) as u8).collect();
    let labels = (0..n as u32).map(|i| i * 3 % 10).collect();
    prepare_batch(pixels, labels, (28, 28), r, &Device::Cpu).unwrap()
}

/// GoogLeNet has neither batch norm nor dropout: evaluation and training compute the same
/// logits, bit for bit.
#[test]
fn googlenet_evaluates_as_it_trains() {
    let model = Model::new(&GOOGLENET, 32, 0, &Device::Cpu).unwrap();
    let (x, _) = batch(3, 32);
    let (train_logits, stats) = model.forward_stats(&mut Tape::train(), &x, 5).unwrap();
    assert!(stats.is_empty(), "no batch norm");
    assert_eq!(model.infer(&x).unwrap().to_vec().unwrap(), train_logits.to_vec().unwrap());
}

/// ResNet-18's batch norm: evaluation uses the running statistics, training the batch's. With
/// PyTorch's initial running statistics (mean 0, variance 1) the two differ; with each layer's
/// running statistics set to the batch's own (biased) ones, evaluation gives the training logits.
#[test]
fn resnet18_evaluates_with_its_running_statistics() {
    let mut model = Model::new(&RESNET18, 32, 0, &Device::Cpu).unwrap();
    let (x, _) = batch(4, 32);
    let (train_logits, stats) = model.forward_stats(&mut Tape::train(), &x, 5).unwrap();
    let train_logits = train_logits.to_vec().unwrap();
    assert_eq!(stats.len(), model.running.len(), "every batch norm layer reports its statistics");
    assert_eq!(model.running.len(), 1 + 8 * 2, "the stem's and two per residual block");
    let fresh = model.infer(&x).unwrap().to_vec().unwrap();
    let gap = fresh.iter().zip(&train_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap > 1e-2, "eval with mean 0 / variance 1 should differ from training (max gap {gap})");
    for (i, s) in stats {
        model.running[i].mean = s.mean;
        model.running[i].var = s.var;
    }
    let eval = model.infer(&x).unwrap().to_vec().unwrap();
    assert_close("eval on the batch's statistics vs training", &train_logits, &eval, 1e-4, 1e-3);
    // And evaluation is deterministic and records nothing.
    assert_eq!(model.infer(&x).unwrap().to_vec().unwrap(), eval);
}

/// Dropout is the identity in evaluation only: AlexNet's training logits depend on the masks'
/// seed, its evaluation logits on nothing.
#[test]
fn dropout_is_off_in_evaluation_only() {
    let model = Model::new(&ALEXNET, 65, 0, &Device::Cpu).unwrap();
    let (x, _) = batch(2, 65);
    let train = |seed| model.forward_stats(&mut Tape::train(), &x, seed).unwrap().0.to_vec().unwrap();
    assert_ne!(train(1), train(2), "training: the masks change the logits");
    assert_eq!(model.infer(&x).unwrap().to_vec().unwrap(), model.infer(&x).unwrap().to_vec().unwrap());
    assert_ne!(model.infer(&x).unwrap().to_vec().unwrap(), train(1));
}

/// One training step updates every running statistic as PyTorch does (momentum 0.1, the
/// unbiased variance) and counts the batch; SGD leaves them alone.
#[test]
fn a_training_step_updates_the_running_statistics() {
    let mut model = Model::new(&RESNET18, 32, 0, &Device::Cpu).unwrap();
    let (x, y) = batch(4, 32);
    let (_, stats) = model.forward_stats(&mut Tape::train(), &x, 0).unwrap();
    train_step(&mut model, &x, &y, 0, 0.05, None).unwrap();
    for (i, s) in stats {
        let r = &model.running[i];
        assert_eq!(r.batches, 1, "{}: one batch", r.path);
        let n = s.count as f32;
        let want_mean: Vec<f32> = s.mean.to_vec().unwrap().iter().map(|m| 0.1 * m).collect();
        let want_var: Vec<f32> = s.var.to_vec().unwrap().iter().map(|v| 0.9 + 0.1 * v * n / (n - 1.0)).collect();
        assert_close(&format!("{}.running_mean", r.path), &want_mean, &r.mean.to_vec().unwrap(), 1e-7, 1e-5);
        assert_close(&format!("{}.running_var", r.path), &want_var, &r.var.to_vec().unwrap(), 1e-7, 1e-5);
    }
}

fn data(train_n: usize, test_n: usize) -> FashionMnist {
    let mut d =
        FashionMnist::load(std::path::Path::new("data/fashion-mnist")).expect("the shipped Fashion-MNIST loads");
    d.train.truncate(train_n);
    d.test.truncate(test_n);
    d
}

fn config(
    epochs: usize,
    batch_size: usize,
    lr: f32,
    resolution: usize,
    checkpoint: Option<&std::path::Path>,
) -> TrainConfig {
    let checkpoint = checkpoint.map(|p| Claim::acquire(p).expect("the checkpoint path can be claimed"));
    TrainConfig { epochs, batch_size, lr, resolution, seed: 0, checkpoint, stop: Stop::default() }
}

/// A checkpoint carries batch norm's buffers under PyTorch's names, and loading it restores
/// them: the loaded model evaluates as the trained one did.
#[test]
fn resnet18_checkpoints_carry_the_running_statistics() {
    let d = data(64, 64);
    let dir = TempDir::new("resnet18-running");
    let ckpt = dir.join("resnet18.safetensors");
    let mut model = Model::new(&RESNET18, 32, 0, &Device::Cpu).unwrap();
    let reports =
        train::train(&mut model, &d.train, &d.test, &config(1, 16, 0.05, 32, Some(&ckpt)), 0, &mut NoProgress).unwrap();
    let (tensors, _) = ptxgrad::checkpoint::load(&ckpt).unwrap();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for name in ["0.1.running_mean", "0.1.running_var", "0.1.num_batches_tracked", "4.1.bn2.running_var"] {
        assert!(names.contains(&name), "the checkpoint has `{name}`");
    }
    let loaded = saved::load(&ckpt, &Device::Cpu, saved::Expect::default()).unwrap().model;
    for (a, b) in model.running.iter().zip(&loaded.running) {
        assert_eq!((a.path.as_str(), a.batches), (b.path.as_str(), 4), "64 examples in batches of 16");
        assert_eq!(a.mean.to_vec().unwrap(), b.mean.to_vec().unwrap(), "{}.running_mean", a.path);
        assert_eq!(a.var.to_vec().unwrap(), b.var.to_vec().unwrap(), "{}.running_var", a.path);
    }
    let (x, _) = batch(4, 32);
    assert_eq!(model.infer(&x).unwrap().to_vec().unwrap(), loaded.infer(&x).unwrap().to_vec().unwrap());
    let acc = train::evaluate(&loaded, &d.test, 32).unwrap();
    assert_eq!(acc, reports[0].test_acc, "the loaded model's test accuracy is the trained one's");
}
