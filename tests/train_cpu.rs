//! End-to-end training on the CPU reference: a slice of Fashion-MNIST at 67x67 (the smallest
//! input the graph takes), checkpoints, resume, and the divergence guard.
mod common;
use common::TempDir;
use std::path::PathBuf;

use ptxgrad::data::fashion_mnist::FashionMnist;
use ptxgrad::nn::alexnet::AlexNet;
use ptxgrad::train::{self, TrainConfig};
use ptxgrad::Device;

fn data(train_n: usize, test_n: usize) -> FashionMnist {
    // Relative to the working directory (the crate root under `cargo test`).
    let mut d =
        FashionMnist::load(std::path::Path::new("data/fashion-mnist")).expect("the shipped Fashion-MNIST loads");
    d.train.truncate(train_n);
    d.test.truncate(test_n);
    d
}

fn config(epochs: usize, lr: f32, checkpoint: Option<PathBuf>) -> TrainConfig {
    TrainConfig { epochs, batch_size: 32, lr, resolution: 67, seed: 1, checkpoint, progress: false }
}

#[test]
fn cpu_training_lowers_the_loss_and_beats_chance() {
    let d = data(1024, 500);
    let dir = TempDir::new("train-cpu-lowers");
    let ckpt = dir.join("alexnet.safetensors");
    let mut model = AlexNet::new(67, 1, &Device::Cpu).unwrap();
    let reports =
        train::train(&mut model, &d.train, &d.test, &config(2, 0.05, Some(ckpt.clone())), 0, |_| Ok(())).unwrap();
    for r in &reports {
        eprintln!("epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}", r.epoch, r.loss, r.train_acc, r.test_acc);
    }
    // Chance is 0.1 and ln(10) = 2.303 for ten classes.
    assert!(reports[1].loss < reports[0].loss, "the loss falls between epochs");
    assert!(reports[1].loss < 2.2, "loss {} after two epochs", reports[1].loss);
    assert!(reports[1].test_acc > 0.3, "test acc {} should clearly beat chance (0.1)", reports[1].test_acc);

    // The checkpoint holds the trained model: same test accuracy after a round trip.
    let (loaded, epoch) = train::load_checkpoint(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(epoch, 2);
    let acc = train::evaluate(&loaded, &d.test, 67).unwrap();
    assert_eq!(acc, reports[1].test_acc);
    assert!(!ckpt.with_extension("safetensors.tmp").exists(), "no temp file left behind");
}

#[test]
fn resume_continues_from_the_checkpoint_epoch() {
    let d = data(64, 50);
    let dir = TempDir::new("train-cpu-resume");
    let ckpt = dir.join("resume.safetensors");
    let mut model = AlexNet::new(67, 2, &Device::Cpu).unwrap();
    train::train(&mut model, &d.train, &d.test, &config(1, 0.01, Some(ckpt.clone())), 0, |_| Ok(())).unwrap();
    let (mut resumed, epoch) = train::load_checkpoint(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(epoch, 1);
    let reports =
        train::train(&mut resumed, &d.train, &d.test, &config(2, 0.01, Some(ckpt.clone())), epoch, |_| Ok(())).unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].epoch, 2);
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let d = data(256, 50);
    let dir = TempDir::new("train-cpu-diverge");
    let ckpt = dir.join("diverge.safetensors");
    let mut model = AlexNet::new(67, 3, &Device::Cpu).unwrap();
    train::train(&mut model, &d.train, &d.test, &config(1, 0.01, Some(ckpt.clone())), 0, |_| Ok(())).unwrap();
    let before = std::fs::read(&ckpt).unwrap();
    // An absurd learning rate blows the weights up within a few steps.
    let err = train::train(&mut model, &d.train, &d.test, &config(2, 1e30, Some(ckpt.clone())), 1, |_| Ok(()))
        .expect_err("training must stop");
    let msg = err.to_string();
    assert!(msg.contains("non-finite loss in epoch 2") && msg.contains("step"), "{msg}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the last good checkpoint is untouched");
}
