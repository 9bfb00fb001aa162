//! `--conv-algo auto` (nn::conv_tune): on the kernel emulator, the tuning runs every candidate
//! of every AlexNet conv layer through the CUDA path, checks each against the implicit GEMM and
//! picks one; the model then runs the picks. On the CPU nothing is timed and every layer takes
//! the implicit GEMM. (The picks on the emulator follow its wall time, which says nothing about
//! a GPU: the test checks the machinery, not the choice.)
mod common;
use common::*;
use ptxgrad::nn::alexnet::{AlexNet, Layer, LAYERS};
use ptxgrad::nn::conv_tune::{candidates, tune, AGREE};
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::train::train_step;
use ptxgrad::{Device, Labels, Tensor};

const RES: usize = 65; // the smallest resolution AlexNet takes: small emulated convolutions

fn conv_layers() -> Vec<usize> {
    (0..LAYERS.len()).filter(|&i| matches!(LAYERS[i], Layer::Conv2d { .. })).collect()
}

#[test]
fn tuning_on_the_emulator_times_every_candidate_and_they_agree() {
    let dev = Device::parse("emu").unwrap();
    let tunings = tune(&dev, 2, RES, 1).unwrap();
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
            assert!(tr.ms > 0.0 && tr.ms.is_finite(), "{what}: {} took {} ms", tr.algo, tr.ms);
            assert!(tr.rel_err <= AGREE, "{what}: {} differs from gemm by {:e}", tr.algo, tr.rel_err);
        }
        assert!(cands.contains(&t.chosen), "{what}: chose {} outside {cands:?}", t.chosen);
    }
    // 5x5 and 3x3 layers have Winograd candidates; every Winograd kernel alpha was exercised.
    let algos: Vec<ConvAlgo> = tunings.iter().flat_map(|t| t.trials.iter().map(|tr| tr.algo)).collect();
    for m in [2, 4, 6] {
        assert!(algos.contains(&ConvAlgo::Winograd { tile: Some(m) }), "winograd:{m} never tried");
    }
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
