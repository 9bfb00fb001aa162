//! Concatenation along channels (torch.cat(xs, dim=1)) and its split backward: every device
//! against a naive index-by-index oracle (bit-exact: both are copies), the recorded op against
//! finite differences, gradients only for the inputs that need one, a tensor passed twice, the
//! ReLU facts it passes through, and argument errors.
mod common;
use common::*;
use ptxgrad::ops::concat::{concat_channels, concat_channels_fwd, split_channels};
use ptxgrad::ops::maxpool2d::{maxpool2d, maxpool2d_bwd, maxpool2d_fwd};
use ptxgrad::ops::relu::{relu, relu_bwd, relu_fwd};
use ptxgrad::{Device, ReluFact, Tape, Tensor};

/// (N, [C_i], H, W)
type Case = (usize, &'static [usize], usize, usize);

const CASES: &[Case] = &[
    (2, &[64, 128, 32, 32], 3, 3), // GoogLeNet's inception 3a join (4 branches), small planes
    (2, &[5], 4, 4),               // a single input: y is a copy of it
    (4, &[3, 1, 7], 1, 1),         // 1x1 planes (GoogLeNet after its global pool would be)
    (3, &[3, 5], 7, 9),            // odd sizes
    (1, &[2, 3, 4], 5, 5),         // batch 1
    (2, &[1; 10], 3, 2),           // ten single-channel inputs
    (2, &[1, 16, 1], 6, 6),        // single channels around a wide one
    (2, &[256, 320, 128, 128], 1, 1), // inception 4e's channels on 1x1 planes
    (2, &[2, 3], 40, 41),          // runs of 3280 and 4920 floats: several blocks per sample
    (5, &[4, 4], 2, 3),            // equal inputs
    (8, &[128, 192, 96, 64], 28, 28), // inception 3b at batch 8, 28x28: GPUs and the CPU only
    (2, &[3, 5], 300, 301),        // large planes: runs of 271k and 452k floats
];

/// The emulator runs the cases up to this many output elements (it runs a kernel's threads one
/// after another, and again under AddressSanitizer in CI).
const EMULATED_MAX: usize = 100_000;

fn elems((n, channels, h, w): Case) -> usize {
    n * channels.iter().sum::<usize>() * h * w
}

/// The CASES that run on `dev` (`case_runs_on`), with their index.
fn cases_on(dev: &Device) -> impl Iterator<Item = (usize, Case)> + '_ {
    CASES.iter().copied().enumerate().filter(move |&(_, c)| case_runs_on(dev, elems(c), EMULATED_MAX))
}

/// The naive oracle, index by index: y[s, c_offset_i + c, h, w] = xs[i][s, c, h, w], xs[i]
/// (N, C_i, H, W) -> y (N, sum C_i, H, W).
fn naive_concat(xs: &[Vec<f32>], (n, channels, h, w): Case) -> Vec<f32> {
    let c_out: usize = channels.iter().sum();
    let mut y = vec![f32::NAN; n * c_out * h * w];
    let mut c_offset = 0;
    for (x, &ci) in xs.iter().zip(channels) {
        for s in 0..n {
            for c in 0..ci {
                for p in 0..h * w {
                    y[(s * c_out + c_offset + c) * h * w + p] = x[(s * ci + c) * h * w + p];
                }
            }
        }
        c_offset += ci;
    }
    y
}

/// The naive backward: piece i of gy (N, C, H, W) is gy[:, c_offset_i : c_offset_i + C_i].
fn naive_split(gy: &[f32], (n, channels, h, w): Case) -> Vec<Vec<f32>> {
    let c_out: usize = channels.iter().sum();
    let mut c_offset = 0;
    let mut pieces = Vec::new();
    for &ci in channels {
        let mut g = Vec::new();
        for s in 0..n {
            for c in 0..ci {
                let start = (s * c_out + c_offset + c) * h * w;
                g.extend_from_slice(&gy[start..start + h * w]);
            }
        }
        pieces.push(g);
        c_offset += ci;
    }
    pieces
}

/// The inputs of a case: (host data, tensors), seeded by the case index.
fn inputs_of(i: usize, (n, channels, h, w): Case, dev: &Device) -> (Vec<Vec<f32>>, Vec<Tensor>) {
    channels.iter().enumerate().map(|(j, &c)| rand_host_and_tensor(&[n, c, h, w], (100 * i + j) as u64, dev)).unzip()
}

test_device!(concat_channels_matches_naive_oracle, |dev| {
    for (i, case) in cases_on(&dev) {
        let (n, channels, h, w) = case;
        let c_out: usize = channels.iter().sum();
        let (xs_host, xs) = inputs_of(i, case, &dev);
        let y = concat_channels_fwd(&xs.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(y.shape(), &[n, c_out, h, w], "{case:?}");
        // A copy: bit-identical, and every element written (the emulator's fresh buffers hold
        // NaN poison, which the oracle never produces from finite inputs).
        let what = |e: usize| format!("{case:?}, element {e}");
        assert_same_bits("concat fwd", &naive_concat(&xs_host, case), &y.to_vec().unwrap(), what);

        let (gy_host, gy) = rand_host_and_tensor(y.shape(), 1000 + i as u64, &dev);
        let pieces = split_channels(&gy, channels).unwrap();
        assert_eq!(pieces.len(), channels.len());
        for (j, (piece, want)) in pieces.iter().zip(naive_split(&gy_host, case)).enumerate() {
            assert_eq!(piece.shape(), &[n, channels[j], h, w], "{case:?} piece {j}");
            let what = |e: usize| format!("{case:?}, piece {j}, element {e}");
            assert_same_bits("split (concat bwd)", &want, &piece.to_vec().unwrap(), what);
        }
    }
});

test_device!(concat_channels_backward_matches_finite_differences, |dev| {
    // L = sum(y * r) with fixed weights r: dL/dxs[i] is r's slice i. Through the tape.
    for case in [(2usize, &[2usize, 3, 1][..], 3usize, 2usize), (1, &[1, 4], 2, 5), (3, &[2], 1, 1)] {
        let (n, channels, h, w) = case;
        let (xs_host, xs) = inputs_of(7, case, &dev);
        let mut tape = Tape::train();
        xs.iter().for_each(|x| tape.watch(x));
        let y = concat_channels(&mut tape, &xs.iter().collect::<Vec<_>>()).unwrap();
        let r = uniform(y.len(), -1.0, 1.0, 9);
        let grads = backward_from(tape, &y, &Tensor::from_vec(y.shape(), r.clone(), &dev).unwrap());
        let loss = |xs: &[Vec<f64>]| -> f64 {
            let xs: Vec<Vec<f32>> = xs.iter().map(|x| x.iter().map(|&v| v as f32).collect()).collect();
            naive_concat(&xs, case).iter().zip(&r).map(|(&y, &r)| y as f64 * r as f64).sum()
        };
        let xs_f64: Vec<Vec<f64>> = xs_host.iter().map(|x| x.iter().map(|&v| v as f64).collect()).collect();
        for (j, x) in xs.iter().enumerate() {
            let numeric = numeric_grad_at(&xs_host[j], 1e-2, |xj| {
                let mut all = xs_f64.clone();
                all[j] = xj.to_vec();
                loss(&all)
            });
            let analytic = grads.get(x).expect("every input is watched").to_vec().unwrap();
            assert_eq!(analytic.len(), n * channels[j] * h * w);
            // Linear: central differences are exact but for the f64 rounding of the loss (a sum
            // of <= 108 terms below 1 in magnitude) divided by 2 eps, far below 1e-5. (The
            // inputs are rounded to f32 inside the loss, but eps = 1e-2 steps are exact in f32
            // for values in [-1, 1) to well within that.)
            assert_close(&format!("concat grad {case:?} input {j}"), &numeric, &analytic, 1e-5, 1e-5);
        }
    }
});

test_device!(concat_channels_gives_gradients_only_to_inputs_that_need_one, |dev| {
    let case: Case = (2, &[2, 3, 4], 3, 3);
    let (_, xs) = inputs_of(3, case, &dev);
    let mut tape = Tape::train();
    tape.watch(&xs[0]);
    tape.watch(&xs[2]); // xs[1] is not watched: a constant
    let y = concat_channels(&mut tape, &[&xs[0], &xs[1], &xs[2]]).unwrap();
    let (gy_host, gy) = rand_host_and_tensor(y.shape(), 5, &dev);
    let grads = backward_from(tape, &y, &gy);
    assert!(grads.get(&xs[1]).is_none(), "an input not watched gets no gradient");
    let want = naive_split(&gy_host, case);
    for j in [0, 2] {
        assert_eq!(grads.get(&xs[j]).expect("watched").to_vec().unwrap(), want[j], "input {j}");
    }

    // Nothing watched: nothing recorded, nothing computed.
    let mut tape = Tape::train();
    let _ = concat_channels(&mut tape, &[&xs[0], &xs[1]]).unwrap();
    assert!(tape.is_empty());
});

test_device!(concat_channels_of_one_tensor_twice_sums_both_slices, |dev| {
    // cat((x, x)) and cat((x, z, x)): x's gradient is the sum of its slices of gy.
    let x = rand_tensor(&[2, 3, 2, 2], 1, &dev);
    let z = rand_tensor(&[2, 1, 2, 2], 2, &dev);
    for (inputs, case) in [(vec![&x, &x], (2, &[3, 3][..], 2, 2)), (vec![&x, &z, &x], (2, &[3, 1, 3][..], 2, 2))] {
        let mut tape = Tape::train();
        tape.watch(&x);
        let y = concat_channels(&mut tape, &inputs).unwrap();
        let hosts: Vec<Vec<f32>> = inputs.iter().map(|t| t.to_vec().unwrap()).collect();
        assert_eq!(y.to_vec().unwrap(), naive_concat(&hosts, case), "{case:?}");
        let (gy_host, gy) = rand_host_and_tensor(y.shape(), 3, &dev);
        let grads = backward_from(tape, &y, &gy);
        let pieces = naive_split(&gy_host, case);
        let (first, last) = (&pieces[0], &pieces[pieces.len() - 1]);
        let want: Vec<f32> = first.iter().zip(last).map(|(a, b)| a + b).collect();
        assert_eq!(grads.get(&x).expect("x is watched").to_vec().unwrap(), want, "{case:?}");
        assert!(grads.get(&z).is_none());
    }
});

test_device!(concat_channels_passes_relu_facts_through, |dev| {
    let pre_a = rand_tensor(&[2, 2, 5, 5], 11, &dev);
    let pre_b = rand_tensor(&[2, 3, 5, 5], 12, &dev);
    let (a, b) = (relu_fwd(&pre_a).unwrap(), relu_fwd(&pre_b).unwrap());
    assert_eq!(concat_channels_fwd(&[&a, &b]).unwrap().relu_fact(), ReluFact::Output);
    assert_eq!(concat_channels_fwd(&[&a, &pre_b]).unwrap().relu_fact(), ReluFact::None);

    // pre -> relu -> concat -> maxpool (3, 2, 1), GoogLeNet's pool after an inception: the pool
    // masks for the concat's output, and the concat hands each ReLU a gradient masked for it.
    // The result is the plain chain rule's, bit for bit.
    let mut tape = Tape::train();
    tape.watch(&pre_a);
    tape.watch(&pre_b);
    let (ha, hb) = (relu(&mut tape, &pre_a).unwrap(), relu(&mut tape, &pre_b).unwrap());
    let seen: Vec<_> = (0..2).map(|_| std::rc::Rc::new(std::cell::Cell::new(None))).collect();
    // Stand-in ops between each ReLU and the concat keep the fact of the gradient handed back.
    let (pa, pb) = (ha.reshaped(ha.shape()).unwrap(), hb.reshaped(hb.shape()).unwrap());
    let (pa, pb) = (pa.with_relu_fact(ReluFact::Output), pb.with_relu_fact(ReluFact::Output));
    for ((probe, h), p) in seen.iter().zip([&ha, &hb]).zip([&pa, &pb]) {
        let (probe, h_id) = (probe.clone(), h.id());
        tape.record(p, &[h], move |g, grads| {
            probe.set(Some(g.relu_fact()));
            grads.accumulate(h_id, g.clone().with_relu_fact(ReluFact::None))
        });
    }
    let y = concat_channels(&mut tape, &[&pa, &pb]).unwrap();
    let pooled = maxpool2d(&mut tape, &y, 3, 2, 1).unwrap();
    let (gy_host, gy) = rand_host_and_tensor(pooled.shape(), 13, &dev);
    let grads = backward_from(tape, &pooled, &gy);
    assert_eq!(seen[0].get(), Some(ReluFact::MaskedFor(pa.id())));
    assert_eq!(seen[1].get(), Some(ReluFact::MaskedFor(pb.id())));

    let cpu = Device::Cpu;
    let on_cpu = |t: &Tensor| t.to_device(&cpu).unwrap();
    let y_cpu = concat_channels_fwd(&[&on_cpu(&a), &on_cpu(&b)]).unwrap();
    let (_, plain_argmax) = maxpool2d_fwd(&y_cpu, 3, 2, 1, false).unwrap();
    let gy_cpu = Tensor::from_vec(pooled.shape(), gy_host, &cpu).unwrap();
    let g_concat = maxpool2d_bwd(&plain_argmax, &gy_cpu, y.shape(), 3, 2, 1).unwrap();
    let pieces = split_channels(&g_concat, &[2, 3]).unwrap();
    for ((pre, h), piece) in [(&pre_a, &a), (&pre_b, &b)].into_iter().zip(&pieces) {
        let want = relu_bwd(&on_cpu(h), piece).unwrap().to_vec().unwrap();
        let got = grads.get(pre).expect("watched").to_vec().unwrap();
        assert_same_bits("relu -> concat -> maxpool gradient", &want, &got, |e| format!("element {e}"));
    }
});

#[test]
fn concat_channels_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = |shape: &[usize]| rand_tensor(shape, 0, &dev);
    let (a, b) = (x(&[2, 3, 4, 5]), x(&[2, 1, 4, 5]));
    assert_mentions(&err_msg(concat_channels_fwd(&[])), &["concat_channels", "at least one input", "none"]);
    // Different N, H or W: which input, what was expected, what was found.
    for bad in [x(&[3, 3, 4, 5]), x(&[2, 3, 5, 5]), x(&[2, 3, 4, 6])] {
        let msg = err_msg(concat_channels_fwd(&[&a, &b, &bad]));
        assert_mentions(&msg, &["N = 2, H = 4, W = 5", &format!("input 2 of shape {:?}", bad.shape())]);
    }
    assert_mentions(&err_msg(concat_channels_fwd(&[&a, &x(&[2, 3, 20])])), &["4-D", "input 1 of shape [2, 3, 20]"]);
    assert_mentions(&err_msg(concat_channels_fwd(&[&x(&[6, 5])])), &["4-D", "input 0 of shape [6, 5]"]);
    // Zero-channel inputs (which PyTorch accepts) and other empty ones are refused.
    let empty = Tensor::from_vec(&[2, 0, 4, 5], vec![], &dev).unwrap();
    let msg = err_msg(concat_channels_fwd(&[&a, &empty]));
    assert_mentions(&msg, &["at least one element", "input 1 of shape [2, 0, 4, 5]"]);
    let empty_batch = Tensor::from_vec(&[0, 3, 4, 5], vec![], &dev).unwrap();
    assert_mentions(&err_msg(concat_channels_fwd(&[&empty_batch])), &["input 0 of shape [0, 3, 4, 5]"]);
    // Inputs on different devices.
    let emu = Device::parse("emu").unwrap();
    let on_emu = x(&[2, 1, 4, 5]).to_device(&emu).unwrap();
    assert_mentions(&err_msg(concat_channels_fwd(&[&a, &on_emu])), &["concat_channels", "cpu", "emu"]);
    let mut tape = Tape::train();
    tape.watch(&a);
    assert_mentions(&err_msg(concat_channels(&mut tape, &[&a, &on_emu])), &["concat_channels", "emu"]);

    // Split: the channels must be at least 1 each and sum to gy's C.
    let gy = x(&[2, 4, 4, 5]);
    for channels in [&[3usize, 2][..], &[3], &[4, 0], &[]] {
        let msg = err_msg(split_channels(&gy, channels));
        assert_mentions(&msg, &["split_channels", "C = 4", &format!("channels {channels:?}")]);
    }
    assert_mentions(&err_msg(split_channels(&x(&[2, 4, 20]), &[4])), &["split_channels", "4-D", "[2, 4, 20]"]);
}
