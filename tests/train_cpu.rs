//! End-to-end training on the CPU reference: a slice of Fashion-MNIST at 65x65 (the smallest
//! input the graph takes), checkpoints, resume, and the divergence guard.
mod common;
use common::TempDir;
use std::path::PathBuf;

use ptxgrad::checkpoint::Claim;
use ptxgrad::data::fashion_mnist::FashionMnist;
use ptxgrad::nn::{model::Model, models::ALEXNET, saved};
use ptxgrad::train::{self, EpochReport, NoProgress, Progress, Stop, TrainConfig};
use ptxgrad::{Device, Tensor};

/// A checkpoint read back onto the CPU: (model, epochs done).
fn load(path: &std::path::Path) -> (Model, usize) {
    let loaded = saved::load(path, &Device::Cpu, saved::Expect::default()).unwrap();
    let epoch = loaded.epoch();
    (loaded.model, epoch)
}

fn data(train_n: usize, test_n: usize) -> FashionMnist {
    // Relative to the working directory (the crate root under `cargo test`).
    let mut d =
        FashionMnist::load(std::path::Path::new("data/fashion-mnist")).expect("the shipped Fashion-MNIST loads");
    d.train.truncate(train_n);
    d.test.truncate(test_n);
    d
}

/// A run's configuration; its checkpoint, if any, claimed for as long as the value lives.
fn config(epochs: usize, batch_size: usize, lr: f32, checkpoint: Option<PathBuf>) -> TrainConfig {
    let checkpoint = checkpoint.map(|p| Claim::acquire(&p).expect("the checkpoint path can be claimed"));
    TrainConfig { epochs, batch_size, lr, resolution: RES, seed: 0, checkpoint, stop: Stop::default() }
}

const RES: usize = 65;

#[test]
fn cpu_training_lowers_the_loss_and_beats_chance() {
    // 400 SGD steps of 8 examples (about two minutes on two cores): the book's lr of 0.01 with
    // batches of 128 needs thousands of examples to leave the initial plateau; small batches
    // and lr 0.05 get there within the first epoch. Seen here: loss 2.27 then 1.68, test acc
    // 0.26 then 0.43.
    let d = data(1600, 500);
    let dir = TempDir::new("train-cpu-lowers");
    let ckpt = dir.join("alexnet.safetensors");
    let mut model = Model::new(&ALEXNET, RES, 1, &Device::Cpu).unwrap();
    let reports =
        train::train(&mut model, &d.train, &d.test, &config(2, 8, 0.05, Some(ckpt.clone())), 0, &mut NoProgress)
            .unwrap();
    for r in &reports {
        eprintln!("epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}", r.epoch, r.loss, r.train_acc, r.test_acc);
    }
    // Chance is 0.1 and ln(10) = 2.303 for ten classes.
    assert!(reports[1].loss < reports[0].loss, "the loss falls between epochs");
    assert!(reports[1].loss < 2.1, "loss {} after two epochs", reports[1].loss);
    assert!(reports[1].test_acc > 0.25, "test acc {} should clearly beat chance (0.1)", reports[1].test_acc);

    // The checkpoint holds the trained model: same test accuracy after a round trip.
    let (loaded, epoch) = load(&ckpt);
    assert_eq!(epoch, 2);
    let acc = train::evaluate(&loaded, &d.test, RES).unwrap();
    assert_eq!(acc, reports[1].test_acc);
    assert!(!ckpt.with_extension("safetensors.tmp").exists(), "no temp file left behind");
}

#[test]
fn resume_continues_from_the_checkpoint_epoch() {
    let d = data(64, 50);
    let dir = TempDir::new("train-cpu-resume");
    let ckpt = dir.join("resume.safetensors");
    let mut model = Model::new(&ALEXNET, RES, 2, &Device::Cpu).unwrap();
    train::train(&mut model, &d.train, &d.test, &config(1, 32, 0.01, Some(ckpt.clone())), 0, &mut NoProgress).unwrap();
    let (mut resumed, epoch) = load(&ckpt);
    assert_eq!(epoch, 1);
    let reports =
        train::train(&mut resumed, &d.train, &d.test, &config(2, 32, 0.01, Some(ckpt.clone())), epoch, &mut NoProgress)
            .unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].epoch, 2);
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let d = data(256, 50);
    let dir = TempDir::new("train-cpu-diverge");
    let ckpt = dir.join("diverge.safetensors");
    let mut model = Model::new(&ALEXNET, RES, 3, &Device::Cpu).unwrap();
    train::train(&mut model, &d.train, &d.test, &config(1, 32, 0.01, Some(ckpt.clone())), 0, &mut NoProgress).unwrap();
    let before = std::fs::read(&ckpt).unwrap();
    // What an overflow leaves behind: the output layer's bias is NaN, so every logit and the
    // loss are too, from the first step of epoch 2. (A huge learning rate is no reliable way to
    // get there: softmax-cross-entropy stays finite for logits up to f32's range.)
    let bias = model.params.last_mut().unwrap();
    assert_eq!(bias.name, "20.bias");
    bias.value = Tensor::from_vec(&[10], vec![f32::NAN; 10], &Device::Cpu).unwrap();
    let err = train::train(&mut model, &d.train, &d.test, &config(2, 32, 0.01, Some(ckpt.clone())), 1, &mut NoProgress)
        .expect_err("training must stop");
    let msg = err.to_string();
    assert!(msg.contains("non-finite loss (NaN) in epoch 2 at step 1 of 8"), "{msg}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the last good checkpoint is untouched");
}

#[test]
fn a_checkpoint_that_cannot_be_written_stops_training_before_it_starts() {
    // Checked up front, when the run claims its checkpoint: at 224x224 on the CPU an epoch takes
    // hours. (A save that fails later, on the background thread, is reported at the next
    // progress read: tests/checkpoint.rs.)
    let dir = TempDir::new("train-cpu-unwritable");
    std::fs::write(dir.join("file"), b"").unwrap();
    let ckpt = dir.join("file/alexnet.safetensors"); // a regular file where a directory should be
    let msg = Claim::acquire(&ckpt).expect_err("an unwritable checkpoint path cannot be claimed").to_string();
    assert!(msg.contains(&format!("{}: expected a directory, found a file", dir.join("file").display())), "{msg}");
}

#[test]
fn a_stop_request_ends_the_run_before_its_next_step_and_says_what_is_on_disk() {
    let d = data(64, 20);
    let dir = TempDir::new("train-cpu-stop");
    let ckpt = dir.join("stop.safetensors");
    let mut model = Model::new(&ALEXNET, RES, 5, &Device::Cpu).unwrap();
    let mut cfg = config(3, 32, 0.01, Some(ckpt.clone()));
    let stop = Stop::default();
    cfg.stop = stop.clone();
    // Asked for while epoch 2 is reported (its checkpoint is being written): epoch 3 never runs.
    struct StopAfter2(Stop);
    impl Progress for StopAfter2 {
        fn epoch_end(&mut self, r: &EpochReport) -> ptxgrad::Result<()> {
            if r.epoch == 2 {
                self.0.request(2);
            }
            Ok(())
        }
    }
    let err = train::train(&mut model, &d.train, &d.test, &cfg, 0, &mut StopAfter2(stop.clone()))
        .expect_err("the run must stop");
    let ptxgrad::Error::Interrupted { signal, message } = err else { panic!("not an interruption: {err}") };
    assert_eq!(signal, 2);
    let want = format!("stopped by SIGINT (Ctrl-C) in epoch 3 before step 1 of 2; {} holds epoch 2", ckpt.display());
    assert!(message.contains(&want), "{message}");
    // The save in flight was waited for: the file is whole, and it is epoch 2's.
    let (loaded, epoch) = load(&ckpt);
    assert_eq!(epoch, 2);
    for (a, b) in loaded.params.iter().zip(&model.params) {
        assert_eq!(a.value.to_vec().unwrap(), b.value.to_vec().unwrap(), "{}", a.name);
    }
    // A request before the first step: nothing trains, nothing is written.
    let fresh = dir.join("fresh.safetensors");
    let cfg = config(1, 32, 0.01, Some(fresh.clone()));
    cfg.stop.request(15);
    let err = train::train(&mut model, &d.train, &d.test, &cfg, 0, &mut NoProgress).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "stopped by SIGTERM in epoch 1 before step 1 of 2; nothing was written to {}",
            fresh.display()
        )),
        "{err}"
    );
    assert!(!fresh.exists());
}

#[test]
fn non_finite_parameters_are_found_on_the_device_and_named() {
    for dev in [Device::Cpu, Device::parse("emu").unwrap()] {
        let mut model = Model::new(&ALEXNET, RES, 6, &dev).unwrap();
        assert_eq!(train::nonfinite_params(&model).unwrap(), Vec::<String>::new());
        let p = &mut model.params[2]; // 3.weight
        let mut v = p.value.to_vec().unwrap();
        v[0] = f32::INFINITY;
        v[17] = f32::NAN;
        p.value = Tensor::from_vec(p.value.shape(), v, &dev).unwrap();
        assert_eq!(train::nonfinite_params(&model).unwrap(), ["`3.weight`: 2 of 614400 values"]);
    }
}
