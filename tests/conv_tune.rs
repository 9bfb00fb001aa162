//! `--conv-algo auto` (nn::conv_tune): on the kernel emulator, the tuning runs every candidate
//! of every AlexNet conv layer through the CUDA path, checks each against the implicit GEMM and
//! picks one; the model then runs the picks. On the CPU nothing is timed and every layer takes
//! the implicit GEMM. (The picks on the emulator follow its wall time, which says nothing about
//! a GPU: the test checks the machinery, not the choice.)
mod common;
use common::*;
use ptxgrad::nn::conv_tune::{candidates, tune, ConvLayer, LayerTuning, AGREE, AGREE_TF32};
use ptxgrad::nn::model::Model;
use ptxgrad::nn::models::ALEXNET;
use ptxgrad::nn::network::Layer;
use ptxgrad::nn::Compute;
use ptxgrad::ops::conv2d::{Conv2dParams, ConvAlgo};
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::train::train_step;
use ptxgrad::{Device, Labels, Tensor};

const RES: usize = 65; // the smallest resolution AlexNet takes: small emulated convolutions

fn conv_layers() -> Vec<usize> {
    let leaves = ALEXNET.leaves();
    (0..leaves.len()).filter(|&i| matches!(leaves[i].layer, Layer::Conv2d { .. })).collect()
}

/// AlexNet at `res` on `dev`, its convolutions tuned (`--conv-algo auto`).
fn auto_model(dev: &Device, res: usize) -> Model {
    let auto = Compute { conv: ConvAlgo::Auto, ..Compute::default() };
    Model::new(&ALEXNET, res, 3, dev).unwrap().with_compute(auto).unwrap()
}

/// Checks a tuning report: each layer's candidates were all tried (timed, compared with the
/// implicit GEMM) and the choice is one that agrees, within `tolerance`.
fn check_report(tunings: &[LayerTuning], tolerance: f32) {
    for t in tunings {
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
            assert_eq!(tr.tolerance, tolerance, "{what}: {}'s tolerance", tr.algo);
            if !tr.out_of_memory {
                assert!(tr.ms > 0.0 && tr.ms.is_finite(), "{what}: {} took {} ms", tr.algo, tr.ms);
            }
        }
        assert!(cands.contains(&t.chosen), "{what}: chose {} outside {cands:?}", t.chosen);
        if let Some(tr) = t.trials.iter().find(|tr| tr.algo == t.chosen) {
            assert!(tr.agrees(), "{what}: chose {}, which differs from gemm by {:e}", tr.algo, tr.rel_err);
        }
    }
}

/// Tunes every conv layer of AlexNet at `res` on `dev` at `batch` inputs, checks the report
/// (`check_report`) and returns it.
fn check_tuning(dev: &Device, batch: usize, res: usize) -> Vec<LayerTuning> {
    let tunings = auto_model(dev, res).tune_convs(batch, 1).unwrap();
    assert_eq!(tunings.iter().map(|t| t.layer).collect::<Vec<_>>(), conv_layers());
    check_report(&tunings, AGREE);
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

/// The tuner on layers it is handed (not a model's): each tuned in the order given, under the
/// layer index given, with the agreement tolerance of the GEMM arithmetic it is told (TF32's).
#[test]
fn tuning_given_layers_keeps_their_order_and_the_math_tolerance() {
    // x (2, 4, 8, 8), 3x3 filters: gemm and winograd:2, :4, :6; x (2, 3, 9, 9), 5x5 stride 2:
    // gemm only.
    let layers = [
        ConvLayer {
            layer: 7,
            params: Conv2dParams::new(2, 4, 8, 8, 4, 3, 3, 1, 1).unwrap(),
            relu: true,
            input_grad: true,
        },
        ConvLayer {
            layer: 2,
            params: Conv2dParams::new(2, 3, 9, 9, 4, 5, 5, 2, 2).unwrap(),
            relu: false,
            input_grad: false,
        },
    ];
    let tunings = tune(&Device::parse("emu").unwrap(), &layers, GemmOpts::math(GemmMath::Tf32), 1).unwrap();
    assert_eq!(tunings.iter().map(|t| t.layer).collect::<Vec<_>>(), [7, 2]);
    assert_eq!(tunings[0].trials.len(), 4, "gemm and three Winograd tiles");
    check_report(&tunings, AGREE_TF32);
    // On the CPU the same layers take the implicit GEMM, untimed.
    for t in tune(&Device::Cpu, &layers, GemmOpts::default(), 1).unwrap() {
        assert!(t.trials.is_empty());
        assert_eq!(t.chosen, ConvAlgo::ImplicitGemm);
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
    let mut model = auto_model(&dev, RES);
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
    // Setting the compute again forgets the tuning; other choices are not tuned.
    let auto = model.compute();
    let model = model.with_compute(auto).unwrap();
    assert_eq!(model.conv_algo_of(3), ConvAlgo::ImplicitGemm, "a new compute forgets the tuning");
    let wino = Compute { conv: ConvAlgo::Winograd { tile: None }, ..auto };
    let mut model = model.with_compute(wino).unwrap();
    assert!(model.tune_convs(2, 1).unwrap().is_empty());
    assert_eq!(model.conv_algo_of(3), ConvAlgo::Winograd { tile: None });
    assert_eq!(model.compute(), wino);
}

#[test]
fn auto_on_the_cpu_takes_the_implicit_gemm_untimed() {
    let mut model = auto_model(&Device::Cpu, RES);
    let tunings = model.tune_convs(2, 1).unwrap();
    assert_eq!(tunings.len(), conv_layers().len());
    for t in &tunings {
        assert!(t.trials.is_empty());
        assert_eq!(model.conv_algo_of(t.layer), ConvAlgo::ImplicitGemm);
    }
}
