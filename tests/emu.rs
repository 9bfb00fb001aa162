//! The whole CUDA path on the kernel emulator (`Device::parse("emu")`: every kernel from its
//! CUDA source, on the CPU) against the CPU path: one AlexNet training step — resize,
//! every layer's forward and backward, dropout masks, the loss, SGD — must give the same loss
//! and the same updated parameters. This checks the launch glue (kernel names, argument order,
//! grids, buffer sizes) on machines without a GPU; the kernels' arithmetic is checked per op.
mod common;
use common::*;
use ptxgrad::nn::network::{Layer, Network, Source};
use ptxgrad::nn::Compute;
use ptxgrad::nn::{
    model::Model,
    models::{ALEXNET, GOOGLENET, LENET, NIN, RESNET18, VGG11},
};
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::train::{prepare_batch, train_step};
use ptxgrad::Device;

/// The loss of one step and each parameter's change (after - before).
type Step = (f32, Vec<Vec<f32>>);

/// One AlexNet training step (a batch of two synthetic 28x28 images resized to 65x65, the
/// smallest input the graph takes) on `dev` with the conv algorithm `algo` and GEMMs in `math`.
fn one_step(dev: &Device, algo: ConvAlgo, math: GemmMath) -> Step {
    net_step(&ALEXNET, 65, dev, algo, math)
}

/// One training step of `net` on a batch of two synthetic 28x28 images resized to `resolution`.
fn net_step(net: &'static Network, resolution: usize, dev: &Device, algo: ConvAlgo, math: GemmMath) -> Step {
    net_step_model(net, resolution, dev, algo, math).0
}

/// `net_step`, and the model after it (for batch norm's running statistics).
fn net_step_model(
    net: &'static Network,
    resolution: usize,
    dev: &Device,
    algo: ConvAlgo,
    math: GemmMath,
) -> (Step, Model) {
    let batch = 2;
    let compute = Compute { gemm: GemmOpts::math(math), conv: algo };
    let mut model = Model::new(net, resolution, 7, dev).unwrap().with_compute(compute).unwrap();
    let before: Vec<Vec<f32>> = model.params.iter().map(|p| p.value.to_vec().unwrap()).collect();
    let pixels: Vec<u8> = (0..batch * 784).map(|i| ((i * 37) % 256) as u8).collect();
    let (x, labels) = prepare_batch(pixels, vec![3, 8], (28, 28), resolution, dev).unwrap();
    let loss = train_step(&mut model, &x, &labels, 11, 0.05, None).unwrap();
    let changes = model.params.iter().zip(before).map(|(p, before)| {
        let after = p.value.to_vec().unwrap();
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    });
    let step = (loss.to_vec().unwrap()[0], changes.collect());
    (step, model)
}

/// Asserts the emulated step's loss within `rtol` of the CPU's (relative to max(|loss|, 1)).
fn assert_losses_agree(what: &str, cpu_loss: f32, emu_loss: f32, rtol: f32) {
    let allowed = rtol * cpu_loss.abs().max(1.0);
    assert!((cpu_loss - emu_loss).abs() <= allowed, "{what}: loss {cpu_loss} on the CPU vs {emu_loss} emulated");
}

/// Asserts every parameter's change in the emulated step close to the CPU's, elementwise. The
/// SGD update (lr x gradient): the gradients' sums differ in order only (1e-5 relative), the
/// subtraction w - (w - update) rounds at the weights' scale (|w| < 0.2: 1.5e-8), so 1e-3
/// relative + 2e-7 holds with room, while a wrong or missing gradient term does not.
fn assert_changes_agree(what: &str, cpu_changes: &[Vec<f32>], emu_changes: &[Vec<f32>]) {
    assert_eq!(cpu_changes.len(), emu_changes.len());
    for (i, (cpu, emu)) in cpu_changes.iter().zip(emu_changes).enumerate() {
        assert!(cpu.iter().any(|&d| d != 0.0), "{what}: parameter {i} did not change on the CPU");
        assert_close(&format!("{what}: change of parameter {i} in one step"), cpu, emu, 2e-7, 1e-3);
    }
}

/// `one_step` with the implicit GEMM on the CPU, then on the emulator with the GEMMs in `math`.
fn cpu_and_emulated_steps(math: GemmMath) -> (Step, Step) {
    let algo = ConvAlgo::ImplicitGemm;
    let cpu = one_step(&Device::Cpu, algo, GemmMath::Fp32);
    (cpu, one_step(&Device::parse("emu").unwrap(), algo, math))
}

/// Every other network's step (at its smallest input, LeNet at its own 28x28): their layers
/// (sigmoid, average pooling, the global pool, VGG's and NiN's blocks) on the kernels as on
/// the CPU references.
#[test]
fn every_networks_emulated_step_matches_the_cpu() {
    let emu = Device::parse("emu").unwrap();
    for net in [&LENET, &VGG11, &NIN] {
        let r = if net.name == "lenet" { 28 } else { net.min_resolution() };
        let what = format!("{} at {r}x{r}", net.title);
        let (cpu_loss, cpu_changes) = net_step(net, r, &Device::Cpu, ConvAlgo::ImplicitGemm, GemmMath::Fp32);
        let (emu_loss, emu_changes) = net_step(net, r, &emu, ConvAlgo::ImplicitGemm, GemmMath::Fp32);
        assert_losses_agree(&what, cpu_loss, emu_loss, 1e-4);
        assert_changes_agree(&what, &cpu_changes, &emu_changes);
    }
}

/// GoogLeNet and ResNet-18 at a small input: Inception's concatenation and padded max-pools,
/// ResNet's shortcuts and batch norm, on the kernels as on the CPU references: the loss, every
/// parameter's change and batch norm's running statistics after the step.
#[test]
fn branching_networks_emulated_step_matches_the_cpu() {
    let emu = Device::parse("emu").unwrap();
    for (net, r) in [(&GOOGLENET, 16), (&RESNET18, 48)] {
        let what = format!("{} at {r}x{r}", net.title);
        let ((cpu_loss, cpu_changes), cpu) =
            net_step_model(net, r, &Device::Cpu, ConvAlgo::ImplicitGemm, GemmMath::Fp32);
        let ((emu_loss, emu_changes), emu) = net_step_model(net, r, &emu, ConvAlgo::ImplicitGemm, GemmMath::Fp32);
        assert_losses_agree(&what, cpu_loss, emu_loss, 1e-4);
        // Batch norm's backward, count * gy - sum(gy) - xhat * sum(gy * xhat), cancels: an
        // element far below its tensor's largest keeps fewer digits than in the other networks.
        // Hence a tolerance relative to each tensor's largest change; a wrong or missing term
        // is off at that scale. At least assert_changes_agree's 2e-7: the rounding of the update
        // at the weights' scale.
        // The bias of a conv that batch norm follows has a zero gradient (the mean it adds is
        // taken out again): its change is rounding noise, to be small on both.
        let leaves = net.leaves();
        let before_bn: Vec<String> = (0..leaves.len().saturating_sub(1))
            .filter(|&j| leaves[j + 1].layer == Layer::BatchNorm2d && leaves[j + 1].inputs == [Source::Leaf(j)])
            .map(|j| format!("{}.bias", leaves[j].path))
            .collect();
        for (i, (c, e)) in cpu_changes.iter().zip(&emu_changes).enumerate() {
            if before_bn.contains(&cpu.params[i].name) {
                let noise = c.iter().chain(e).fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(noise < 1e-5, "{what}: `{}` changed by {noise}: its gradient is 0", cpu.params[i].name);
                continue;
            }
            let scale = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: parameter {i} did not change on the CPU");
            assert_close(&format!("{what}: change of parameter {i}"), c, e, (1e-3 * scale).max(2e-7), 1e-3);
        }
        assert_eq!(cpu.running.len(), emu.running.len());
        for (c, e) in cpu.running.iter().zip(&emu.running) {
            assert_eq!((c.batches, e.batches), (1, 1), "{what}: {} counts the step", c.path);
            let stat = |t: &ptxgrad::Tensor| t.to_vec().unwrap();
            assert_close(&format!("{what}: {}.running_mean", c.path), &stat(&c.mean), &stat(&e.mean), 1e-6, 1e-4);
            assert_close(&format!("{what}: {}.running_var", c.path), &stat(&c.var), &stat(&e.var), 1e-6, 1e-4);
        }
    }
}

#[test]
fn emulated_training_step_matches_the_cpu() {
    let emu = Device::parse("emu").unwrap();
    assert_eq!(emu.label(), "emu");
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        let (cpu_loss, cpu_changes) = one_step(&Device::Cpu, algo, GemmMath::Fp32);
        let (emu_loss, emu_changes) = one_step(&emu, algo, GemmMath::Fp32);
        assert_losses_agree(&algo.to_string(), cpu_loss, emu_loss, 1e-4);
        assert_changes_agree(&algo.to_string(), &cpu_changes, &emu_changes);
    }
}

/// The same step with the tensor-core GEMMs in 3xtf32 (ops::gemm::math): every GEMM kernel of the
/// step through its mma.sync variant, held to the fp32 step's tolerances (3xtf32 is
/// fp32-accurate; a wrong fragment index or a missing product term is not). The implicit GEMM
/// only: an emulated mma step takes about ten times an FFMA one.
#[test]
fn emulated_training_step_with_3xtf32_gemms_matches_the_cpu() {
    let ((cpu_loss, cpu_changes), (emu_loss, emu_changes)) = cpu_and_emulated_steps(GemmMath::Tf32x3);
    assert_losses_agree("3xtf32", cpu_loss, emu_loss, 1e-4);
    assert_changes_agree("3xtf32", &cpu_changes, &emu_changes);
}

/// The same step with the GEMMs in bf16: every GEMM kernel of the step through its bf16 mma.sync
/// variant. The loss must agree within 1e-3; each parameter's change within 30% of its norm
/// (|e - c|_2 <= 0.3 |c|_2). That is loose because one step's gradients are not smooth in the
/// products' rounding: a ReLU whose input is near 0, or a max-pool window with a near tie, routes
/// its gradient differently, and 8 significant bits flip more of them than TF32's 11 (measured
/// here: 13-20% for the conv layers under bf16, 3-4% under tf32, 1e-5 of the last bias). A wrong
/// fragment index or a missing term costs 100% or more.
#[test]
fn emulated_training_step_with_bf16_gemms_is_close_to_the_cpu() {
    let ((cpu_loss, cpu_changes), (emu_loss, emu_changes)) = cpu_and_emulated_steps(GemmMath::Bf16);
    assert_losses_agree("bf16", cpu_loss, emu_loss, 1e-3);
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x as f64 * x as f64).sum::<f64>().sqrt();
    for (i, (cpu, emu)) in cpu_changes.iter().zip(&emu_changes).enumerate() {
        let rel = norm(&mut cpu.iter().zip(emu).map(|(a, b)| a - b)) / norm(&mut cpu.iter().copied());
        assert!(rel <= 0.3, "bf16: change of parameter {i} in one step is {rel:.3} of its norm off the CPU's");
    }
}

/// A training step gives bit-identical results whichever order the emulator runs a block's
/// threads in between barriers, and a launch's blocks (ascending or descending:
/// ptxgrad_emu::Schedule). A GPU promises no order, so every kernel of the step must be free of
/// races: a thread reading a word that another writes before the same barrier sees the old value
/// in one order and the new one in the other (`emulator_reverse_schedule_exposes_a_missing_barrier`).
/// Both conv algorithms, so the implicit-GEMM and Winograd kernels all run; no tolerance, since
/// nothing else changes.
#[test]
fn emulated_training_step_does_not_depend_on_thread_order() {
    use ptxgrad_emu::{set_schedule, Schedule};
    let emu = Device::parse("emu").unwrap();
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        let previous = set_schedule(Schedule::Forward);
        let forward = one_step(&emu, algo, GemmMath::Fp32);
        set_schedule(Schedule::Reverse);
        let reverse = one_step(&emu, algo, GemmMath::Fp32);
        set_schedule(previous);
        assert_eq!(forward.0.to_bits(), reverse.0.to_bits(), "{algo}: loss {} vs {}", forward.0, reverse.0);
        for (i, (f, r)) in forward.1.iter().zip(&reverse.1).enumerate() {
            let differ = f.iter().zip(r).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{algo}: parameter {i}'s change differs in {differ} of {} elements", f.len());
        }
    }
}

/// The two things the emulator makes hostile (launch.cpp) catch a missing barrier that the
/// ascending order alone would hide: with the barrier, both orders give every thread its left
/// neighbour's word; without it, the ascending order still does (the writer happens to run first),
/// the descending order reads the NaN that the block's shared memory starts with, even right
/// after a launch that left the right values there.
#[test]
fn emulator_reverse_schedule_exposes_a_missing_barrier() {
    use ptxgrad_emu::{set_schedule, Schedule};
    use std::ffi::c_void;
    let run = |schedule: Schedule, barrier: bool| {
        let mut out = vec![-1.0f32; 64];
        let mut ptr = out.as_mut_ptr() as u64;
        let mut barrier = barrier as i32;
        let args = [&mut ptr as *mut u64 as *mut c_void, &mut barrier as *mut i32 as *mut c_void];
        let previous = set_schedule(schedule);
        // SAFETY: one 64-thread block; thread t writes out[t] only.
        let done = unsafe { ptxgrad_emu::call("selftest", "emu_selftest_left_neighbour", (1, 1, 1), 64, &args) };
        set_schedule(previous);
        done.unwrap();
        out
    };
    let want: Vec<f32> = (0..64).map(|t: i32| (t - 1).max(0) as f32).collect();
    assert_eq!(run(Schedule::Forward, true), want);
    assert_eq!(run(Schedule::Reverse, true), want);
    assert_eq!(run(Schedule::Forward, false), want, "ascending order hides this race");
    let racy = run(Schedule::Reverse, false);
    assert_eq!(racy[0], 0.0);
    assert!(racy[1..].iter().all(|v| v.is_nan()), "descending order: {racy:?}");
}

/// A warp exchange needs the whole warp: a full-mask shuffle (or mma.sync.aligned) in a warp
/// whose other lanes have exited, or in the partial last warp of a block of 48 threads, is
/// undefined on a GPU, and the emulator fails the launch.
#[test]
fn emulator_refuses_a_warp_exchange_without_all_lanes() {
    use std::ffi::c_void;
    let run = |threads: u32, live: i32| {
        let mut out = vec![0.0f32; 64];
        let (mut ptr, mut live) = (out.as_mut_ptr() as u64, live);
        let args = [&mut ptr as *mut u64 as *mut c_void, &mut live as *mut i32 as *mut c_void];
        // SAFETY: at most 64 threads, thread t writes out[t] only.
        unsafe { ptxgrad_emu::call("selftest", "emu_selftest_warp_sum", (1, 1, 1), threads, &args) }.map(|()| out)
    };
    assert_eq!(run(64, 32).unwrap(), vec![32.0; 64]);
    for (threads, live) in [(32, 16), (64, 31), (48, 32)] {
        let e = run(threads, live).unwrap_err();
        assert!(e.contains("all 32 lanes"), "{threads} threads, {live} live lanes: {e}");
    }
}

/// A buffer the engine asks for without initialising (`uninit`, for outputs a kernel writes in
/// full) holds NaN on the emulator, not the zeros of a fresh allocation or the last user's values,
/// so a kernel that leaves part of its output unwritten fails its tests.
#[test]
fn emulated_uninit_buffers_hold_poison() {
    let Device::Cuda(gpu) = Device::parse("emu").unwrap() else { panic!("emu is a CUDA-path device") };
    for round in 0..2 {
        // The second round takes the first round's buffers back from the cache.
        let floats = gpu.uninit::<f32>(1000).unwrap();
        let words = gpu.uninit::<u32>(1000).unwrap();
        let (float_values, word_values) = (gpu.download(&floats).unwrap(), gpu.download(&words).unwrap());
        assert!(float_values.iter().all(|v| v.is_nan()), "round {round}: {:?}", &float_values[..4]);
        assert!(word_values.iter().all(|&v| v == 0xa5a5_a5a5), "round {round}: {:?}", &word_values[..4]);
    }
}

/// The emulator fails the launches a GPU would fail (a kernel asked of the wrong module, more
/// threads than its launch bounds, a grid beyond the limits, a misaligned 16-byte copy), so that
/// such a mistake in the launch glue shows in CI rather than first on a GPU.
#[test]
fn emulator_refuses_what_a_gpu_refuses() {
    use ptxgrad_emu::{call, check_launch_shape, find};
    use std::ffi::c_void;

    // On a GPU, looking a kernel up in another file's module fails.
    let e = unsafe { call("dense", "relu_fwd_f32", (1, 1, 1), 32, &[]) }.unwrap_err();
    assert!(e.contains("in module `relu`"), "{e}");
    assert!(unsafe { call("relu", "no_such_kernel", (1, 1, 1), 32, &[]) }.is_err());

    // Launch bounds are read from the source: __launch_bounds__(256, 2), (256), (128), none.
    let bounds = |name: &str| find(name).unwrap_or_else(|| panic!("no kernel {name}")).max_threads;
    assert_eq!(bounds("conv2d_fwd_f32_t128"), 256);
    assert_eq!(bounds("conv2d_bwd_bias_f32"), 256);
    assert_eq!(bounds("winograd_gather_f32_a4"), 128);
    assert_eq!(bounds("relu_fwd_f32"), 1024);
    let e = unsafe { call("conv2d", "conv2d_bwd_bias_f32", (1, 1, 1), 512, &[]) }.unwrap_err();
    assert!(e.contains("launch bounds allow 256"), "{e}");

    // The grid and block limits of every CUDA GPU.
    assert!(check_launch_shape(((1 << 31) - 1, 65535, 65535), 1024).is_ok());
    for (grid, threads) in [((1, 65536, 1), 32), ((1, 1, 65536), 32), ((1 << 31, 1, 1), 32), ((0, 1, 1), 32)] {
        let e = check_launch_shape(grid, threads).unwrap_err();
        assert!(e.contains("grid"), "{grid:?}: {e}");
    }
    assert!(check_launch_shape((1, 1, 1), 1025).is_err());
    assert!(check_launch_shape((1, 1, 1), 0).is_err());

    // A 16-byte cp.async must read a 16-byte-aligned address.
    let data = [0f32; 8];
    let first_aligned = (0..4).find(|&i| (data[i..].as_ptr() as usize).is_multiple_of(16)).unwrap();
    let copy = |offset: usize| {
        let mut src = data[offset..].as_ptr() as u64;
        let args = [&mut src as *mut u64 as *mut c_void];
        // SAFETY: the kernel takes one pointer and reads 4 floats from it, all inside `data`.
        unsafe { call("selftest", "emu_selftest_copy_f32x4", (1, 1, 1), 1, &args) }
    };
    copy(first_aligned).unwrap();
    let e = copy(first_aligned + 1).unwrap_err();
    assert!(e.contains("not 16-byte aligned"), "{e}");
}

/// gemm.cuh's thread grid: every (tx, ty) of the 16 x 16 grid once, each warp a 4 (ty) x 8 (tx)
/// patch, and lanes n, n^1 on one tx (their B float4 is the same) and n, n^2 on one ty (their A
/// float4 is the same), the pairs whose LDS.128 returns the hardware can pack (see grid_x).
#[test]
fn gemm_thread_grid_pairs_lanes_for_shared_memory_reads() {
    use std::collections::HashSet;
    use std::ffi::c_void;
    let mut out = vec![-1i32; 512];
    let mut ptr = out.as_mut_ptr() as u64;
    let args = [&mut ptr as *mut u64 as *mut c_void];
    // SAFETY: the kernel writes 2 ints per thread of its one 256-thread block, all inside `out`.
    unsafe { ptxgrad_emu::call("selftest", "emu_selftest_gemm_grid", (1, 1, 1), 256, &args) }.unwrap();
    let at = |t: usize| (out[2 * t], out[2 * t + 1]);
    let all: HashSet<_> = (0..256).map(at).collect();
    assert_eq!(all.len(), 256, "not one thread per place: {out:?}");
    assert!(all.iter().all(|&(x, y)| (0..16).contains(&x) && (0..16).contains(&y)), "{out:?}");
    for warp in 0..8 {
        let lanes = warp * 32..warp * 32 + 32;
        let xs: HashSet<_> = lanes.clone().map(|t| at(t).0).collect();
        let ys: HashSet<_> = lanes.clone().map(|t| at(t).1).collect();
        assert_eq!((xs.len(), ys.len()), (8, 4), "warp {warp} is not a 4 x 8 patch: tx {xs:?}, ty {ys:?}");
        for t in lanes {
            assert_eq!(at(t).0, at(t ^ 1).0, "threads {t} and {} read different B float4s", t ^ 1);
            assert_eq!(at(t).1, at(t ^ 2).1, "threads {t} and {} read different A float4s", t ^ 2);
        }
    }
}

/// The emulator keeps cp.async's ordering: a copy lands in shared memory at the wait that
/// completes its group (wait_group n: all but the n newest groups), not at issue, commit or a
/// barrier; so a GEMM pipeline that reads a stage before waiting for it fails the emulated tests
/// as it would fail on a GPU (a wait one group short was seen to fail tests/dense.rs).
#[test]
fn emulated_cp_async_lands_at_the_wait_for_its_group() {
    use std::ffi::c_void;
    let src = [7.0f32, 9.0];
    let mut out = [0.0f32; 5];
    let (mut src_ptr, mut out_ptr) = (src.as_ptr() as u64, out.as_mut_ptr() as u64);
    let args = [&mut src_ptr as *mut u64 as *mut c_void, &mut out_ptr as *mut u64 as *mut c_void];
    // SAFETY: one thread reads src[0..2] and writes out[0..5].
    unsafe { ptxgrad_emu::call("selftest", "emu_selftest_cp_async_order", (1, 1, 1), 1, &args) }.unwrap();
    assert_eq!(
        out,
        [-1.0, 7.0, -1.0, -1.0, 9.0],
        "[before any wait, after wait 1 (x2), after a barrier, after wait 0]"
    );
}

/// The emulator's static thread-local storage stays small. glibc carves a program's static TLS
/// out of the stack of every thread it starts, and every binary here links the emulator (the
/// `ptxgrad` binary too, for `--device emu`): when its GEMM tiles were `thread_local` arrays, the
/// TLS grew past 2 MB and threads with Rust's default 2 MiB stack overflowed at once (the CPU
/// training tests did). A fresh thread must still have 1 MiB of stack to use.
#[test]
fn threads_keep_their_stack_beside_the_emulator() {
    // 256 frames of 4 KiB each, each frame's buffer read after the call below it returns (so
    // that no frame can be folded away).
    fn deep(n: usize) -> u64 {
        let buf = std::hint::black_box([n as u8; 4096]);
        let below = if n == 0 { 0 } else { deep(n - 1) };
        below + u64::from(buf[n % 4096])
    }
    let sum = std::thread::spawn(|| deep(256)).join().expect("the thread ran");
    assert_eq!(sum, (0..=256u64).map(|n| n % 256).sum::<u64>());
}
