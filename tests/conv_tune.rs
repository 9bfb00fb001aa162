//! `--conv-algo auto` (nn::conv_tune): on the kernel emulator, the tuning runs every candidate
//! of every AlexNet conv layer through the CUDA path, checks each against the implicit GEMM and
//! picks one; the model then runs the picks. On the CPU nothing is timed and every layer takes
//! the implicit GEMM. (The picks on the emulator follow its wall time, which says nothing about
//! a GPU: the test checks the machinery, not the choice.)
mod common;
use common::*;
use ptxgrad::nn::alexnet::{AlexNet, Layer, LAYERS};
use ptxgrad::nn::conv_tune::{candidates, tune, LayerTuning};
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::train::train_step;
use ptxgrad::{Device, Labels, Tensor};

const RES: usize = 65; // the smallest resolution AlexNet takes: small emulated convolutions

fn conv_layers() -> Vec<usize> {
    (0..LAYERS.len()).filter(|&i| matches!(LAYERS[i], Layer::Conv2d { .. })).collect()
}

/// Tunes every conv layer of AlexNet at `res` on `dev` and checks the report: each layer's
/// candidates were all tried (timed, compared with the implicit GEMM), and the choice is one that
/// agrees. Returns the tunings.
fn check_tuning(dev: &Device, batch: usize, res: usize) -> Vec<LayerTuning> {
    let tunings = tune(dev, batch, res, 1).unwrap();
    assert_eq!(tunings.iter().map(|t| t.layer).collect::<Vec<_>>(), conv_layers());
    for t in &tunings {
        let cands = candidates(&t.params);
        let what = format!("conv layer {}", t.layer);
        if cands.len() == 1 {
            // conv1 (11x11, stride 4): only the implicit GEMM applies, nothing to time.
            assert!(t.trials.is_empty(), "{what}: timed a single candidate");
        } else {
            assert_eq!(t.trials.iter().map(|tr| tr.algo).collect::<Vec<_>>(), cands, "{what}: trials");
        }
        for tr in &t.trials {
            eprintln!("{what}: {} {:.3} ms, differs from gemm by {:.1e}", tr.algo, tr.ms, tr.rel_err);
            if !tr.out_of_memory {
                assert!(tr.ms > 0.0 && tr.ms.is_finite(), "{what}: {} took {} ms", tr.algo, tr.ms);
            }
        }
        assert!(cands.contains(&t.chosen), "{what}: chose {} outside {cands:?}", t.chosen);
        if let Some(tr) = t.trials.iter().find(|tr| tr.algo == t.chosen) {
            assert!(tr.agrees(), "{what}: chose {}, which differs from gemm by {:e}", tr.algo, tr.rel_err);
        }
    }
    tunings
}

#[test]
fn tuning_on_the_emulator_times_every_candidate_and_they_agree() {
    let tunings = check_tuning(&Device::parse("emu").unwrap(), 2, RES);
    // Every Winograd candidate agrees with the implicit GEMM, and every kernel alpha was exercised.
    for tr in tunings.iter().flat_map(|t| &t.trials) {
        assert!(tr.agrees(), "{} differs from gemm by {:e}", tr.algo, tr.rel_err);
    }
    let algos: Vec<ConvAlgo> = tunings.iter().flat_map(|t| t.trials.iter().map(|tr| tr.algo)).collect();
    for m in [2, 4, 6] {
        assert!(algos.contains(&ConvAlgo::Winograd { tile: Some(m) }), "winograd:{m} never tried");
    }
}

/// The tuning on a real GPU, at AlexNet's real size (224 x 224) and a small batch: CUDA-event
/// timings, the comparison with the implicit GEMM, a choice that agrees.
#[test]
fn tuning_on_cuda_times_every_candidate_and_picks_one_that_agrees() {
    let Some(dev) = gpu_or_skip("tuning_on_cuda_times_every_candidate_and_picks_one_that_agrees") else { return };
    check_tuning(&dev, 16, 224);
}

#[test]
fn auto_model_runs_the_tuned_choice() {
    let dev = Device::parse("emu").unwrap();
    let mut model = AlexNet::new(RES, 3, &dev).unwrap();
    model.conv_algo = ConvAlgo::Auto;
    assert_eq!(model.conv_algo_of(3), ConvAlgo::ImplicitGemm, "untuned auto runs the implicit GEMM");
    let tunings = model.tune_convs(2, 1).unwrap();
    for t in &tunings {
        assert_eq!(model.conv_algo_of(t.layer), t.chosen);
    }
    // A training step with the picks: finite loss, every parameter updated.
    let x = Tensor::from_vec(&[2, 1, RES, RES], uniform(2 * RES * RES, 0.0, 1.0, 9), &dev).unwrap();
    let y = Labels::from_vec(&[2], vec![3, 7], &dev).unwrap();
    let before: Vec<Vec<f32>> = model.params.iter().map(|p| p.value.to_vec().unwrap()).collect();
    let loss = train_step(&mut model, &x, &y, 1, 0.01, None).unwrap().to_vec().unwrap()[0];
    assert!(loss.is_finite(), "loss {loss}");
    for (p, old) in model.params.iter().zip(&before) {
        assert_ne!(&p.value.to_vec().unwrap(), old, "{} unchanged", p.name);
    }
    // Other choices are not tuned.
    model.conv_algo = ConvAlgo::Winograd { tile: None };
    assert!(model.tune_convs(2, 1).unwrap().is_empty());
    assert_eq!(model.conv_algo_of(3), ConvAlgo::Winograd { tile: None });
}

#[test]
fn auto_on_the_cpu_takes_the_implicit_gemm_untimed() {
    let mut model = AlexNet::new(RES, 3, &Device::Cpu).unwrap();
    model.conv_algo = ConvAlgo::Auto;
    let tunings = model.tune_convs(2, 1).unwrap();
    assert_eq!(tunings.len(), conv_layers().len());
    for t in &tunings {
        assert!(t.trials.is_empty());
        assert_eq!(model.conv_algo_of(t.layer), ConvAlgo::ImplicitGemm);
    }
}
