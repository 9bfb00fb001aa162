//! Non-finite counts: every device's counts against the number planted, on AlexNet's parameter
//! shapes (scaled to the emulator) and awkward sizes, with NaN, +Inf and -Inf planted at seeded
//! positions (always the first and the last element); finite extremes counted as finite; a list
//! of tensors counted in one call with one read back; device mismatches refused; and the kernel's
//! count the same for any launch configuration and alignment.
mod common;
use std::collections::BTreeSet;
use std::sync::RwLock;

use common::*;
use ptxgrad::ops::nonfinite::nonfinite_counts;
use ptxgrad::{Device, Error, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// 1.67M elements in all: the emulator runs each of these in about a second or less.
const SHAPES: &[&[usize]] = &[
    &[1],
    &[7],
    &[33],
    &[1023],
    &[1025],
    &[3, 5, 7],
    &[96, 1, 11, 11], // AlexNet (d2l, 1 input channel) conv1 weight and bias
    &[96],
    &[256, 96, 5, 5], // conv2 weight
    &[10, 4096],      // dense3 weight and bias
    &[10],
    &[4097],
    &[1000003],
];

/// Held for reading by every test that uses the emulator, and for writing by the one that counts
/// its host traffic: the emulated device (and its counters) is shared by the whole binary.
static EMU: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EMU.read().unwrap_or_else(|p| p.into_inner())
}

/// The non-finite values planted: quiet and signalling NaNs of either sign, and both infinities.
const NONFINITE: [f32; 6] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::from_bits(0xffff_ffff), // negative NaN, every payload bit set
    f32::from_bits(0x7f80_0001), // signalling NaN, smallest payload
    f32::from_bits(0xff80_0000), // -Inf by its bits
];

/// `n` seeded finite values in [-1, 1) with non-finite ones planted at the first, the last and
/// about n / 50 more seeded positions; returns the values and the positions planted.
fn planted_at(n: usize, seed: u64) -> (Vec<f32>, BTreeSet<usize>) {
    let mut x = uniform(n, -1.0, 1.0, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let mut at: BTreeSet<usize> = [0, n - 1].into();
    for _ in 0..n / 50 + 3 {
        at.insert(rng.random_range(0..n));
    }
    for &i in &at {
        x[i] = NONFINITE[rng.random_range(0..NONFINITE.len())];
    }
    (x, at)
}

/// `planted_at`'s values and how many were planted.
fn planted(n: usize, seed: u64) -> (Vec<f32>, u64) {
    let (x, at) = planted_at(n, seed);
    (x, at.len() as u64)
}

/// A tensor of no elements, where the device can make one (the CPU and the emulator must; a
/// GPU's allocator may refuse a 0-byte buffer, which is not this op's concern).
fn empty_tensor(dev: &Device) -> Option<Tensor> {
    let t = Tensor::from_vec(&[0, 3], vec![], dev);
    match dev {
        Device::Cuda(g) if !g.is_emu() => t.map_err(|e| eprintln!("no empty tensor on {}: {e}", dev.label())).ok(),
        _ => Some(t.expect("an empty tensor")),
    }
}

test_device!(counts_match_the_planted_ones, |dev| {
    let _emu = shared();
    for (k, shape) in SHAPES.iter().enumerate() {
        let (x, want) = planted(shape.iter().product(), 10 + k as u64);
        let t = Tensor::from_vec(shape, x, &dev).unwrap();
        assert_eq!(nonfinite_counts(&[&t]).unwrap(), vec![want], "{shape:?} on {}", dev.label());
    }
});

test_device!(all_finite_tensors_count_zero, |dev| {
    let _emu = shared();
    for (k, shape) in SHAPES.iter().enumerate() {
        let t = rand_tensor(shape, k as u64, &dev);
        assert_eq!(nonfinite_counts(&[&t]).unwrap(), vec![0], "{shape:?}");
    }
    // The finite extremes, one by one and cycled through a tensor of an odd size (so they fall in
    // the float4 body and the tail).
    let extremes = [
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),           // the smallest subnormal
        f32::from_bits(0x007f_ffff), // the largest subnormal
        f32::from_bits(0x807f_ffff), // its negative
        -0.0,
        0.0,
        f32::EPSILON,
    ];
    for v in extremes {
        let t = Tensor::from_vec(&[1], vec![v], &dev).unwrap();
        assert_eq!(nonfinite_counts(&[&t]).unwrap(), vec![0], "{v:e} ({:#010x})", v.to_bits());
    }
    let cycled: Vec<f32> = (0..1031).map(|i| extremes[i % extremes.len()]).collect();
    let t = Tensor::from_vec(&[1031], cycled, &dev).unwrap();
    assert_eq!(nonfinite_counts(&[&t]).unwrap(), vec![0]);
});

test_device!(each_tensor_of_a_list_gets_its_own_count, |dev| {
    let _emu = shared();
    assert_eq!(nonfinite_counts(&[]).unwrap(), Vec::<u64>::new());
    let mut tensors = Vec::new();
    let mut want = Vec::new();
    for (k, shape) in SHAPES.iter().enumerate() {
        // Every other tensor all finite, so that a count leaking into a neighbour's shows.
        let n = shape.iter().product();
        let (x, count) = if k % 2 == 0 { planted(n, 100 + k as u64) } else { (uniform(n, -1.0, 1.0, k as u64), 0) };
        tensors.push(Tensor::from_vec(shape, x, &dev).unwrap());
        want.push(count);
    }
    if let Some(empty) = empty_tensor(&dev) {
        tensors.insert(3, empty);
        want.insert(3, 0);
    }
    // The same tensor twice counts twice.
    tensors.push(tensors[0].clone());
    want.push(want[0]);
    let refs: Vec<&Tensor> = tensors.iter().collect();
    assert_eq!(nonfinite_counts(&refs).unwrap(), want);
    // And in reverse order.
    let reversed: Vec<&Tensor> = tensors.iter().rev().collect();
    assert_eq!(nonfinite_counts(&reversed).unwrap(), want.iter().rev().copied().collect::<Vec<_>>());
});

/// Empty tensors count 0, on the devices that must make them (see `empty_tensor`): the CUDA
/// path launches nothing for one, host code that the emulator runs as a GPU would.
#[test]
fn empty_tensors_count_zero_on_cpu_and_emulated() {
    let _emu = shared();
    for dev in [Device::Cpu, Device::parse("emu").unwrap()] {
        let empty = empty_tensor(&dev).expect("the CPU and the emulator make empty tensors");
        assert_eq!(nonfinite_counts(&[&empty]).unwrap(), vec![0], "{}", dev.label());
        assert_eq!(nonfinite_counts(&[&empty, &empty]).unwrap(), vec![0, 0], "{}", dev.label());
    }
}

#[test]
fn mismatched_devices_are_refused() {
    let _emu = shared();
    let cpu = Tensor::from_vec(&[2], vec![f32::NAN, 1.0], &Device::Cpu).unwrap();
    let emu = cpu.to_device(&Device::parse("emu").unwrap()).unwrap();
    for list in [[&cpu, &emu], [&emu, &cpu]] {
        let err = nonfinite_counts(&list).unwrap_err();
        assert!(matches!(err, Error::DeviceMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("nonfinite_counts") && msg.contains("cpu") && msg.contains("emu"), "{msg}");
    }
}

/// On the CUDA path a list costs one copy to the host (the counters), nothing uploaded, no other
/// wait: checked on the emulator, which counts the same calls as a GPU.
#[test]
fn a_list_is_read_back_once_emulated() {
    let dev = Device::parse("emu").unwrap();
    let Device::Cuda(gpu) = &dev else { unreachable!("emu is a CUDA-path device") };
    let tensors: Vec<Tensor> = (0..5).map(|k| Tensor::from_vec(&[257], planted(257, k).0, &dev).unwrap()).collect();
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let _alone = EMU.write().unwrap_or_else(|p| p.into_inner());
    let before = gpu.host_traffic();
    let counts = nonfinite_counts(&refs).unwrap();
    let traffic = gpu.host_traffic() - before;
    assert_eq!((traffic.downloads, traffic.uploads, traffic.synchronizations), (1, 0, 0), "{traffic:?}");
    assert!(counts.iter().all(|&c| c >= 2), "{counts:?}");
}

/// Runs the emulated kernel on `x` with a `blocks` x `threads` grid, adding into slot 1 of three
/// counters that start at 5, 7 and 9; returns them.
fn emulated_kernel(x: &[f32], blocks: u32, threads: u32) -> Result<[u64; 3], String> {
    use std::ffi::c_void;
    let mut counts = [5u64, 7, 9];
    let (mut x_ptr, mut counts_ptr) = (x.as_ptr() as u64, counts.as_mut_ptr() as u64);
    let (mut slot, mut n) = (1u64, x.len() as u64);
    let args = [&mut x_ptr, &mut counts_ptr, &mut slot, &mut n].map(|a| a as *mut u64 as *mut c_void);
    // SAFETY: the argument list mirrors nonfinite_count_f32's; x holds n elements, counts 3.
    unsafe { ptxgrad_emu::call("nonfinite", "nonfinite_count_f32", (blocks, 1, 1), threads, &args) }?;
    Ok(counts)
}

/// The count is an exact integer sum: the same for any grid (one block to more threads than
/// elements), and on the element-by-element path taken where x is not 16-byte aligned (never
/// for driver buffers, so only reachable here). It adds into its slot and touches no other.
#[test]
fn kernel_count_is_independent_of_the_launch_emulated() {
    let _emu = shared();
    let n = 10_007;
    let (x, at) = planted_at(n + 3, 7);
    for offset in 0..4 {
        let want = at.range(offset..offset + n).count() as u64;
        for (blocks, threads) in [(1, 32), (1, 256), (3, 64), (7, 256), (40, 256), (100, 128)] {
            let got = emulated_kernel(&x[offset..offset + n], blocks, threads).unwrap();
            assert_eq!(got, [5, 7 + want, 9], "offset {offset}, {blocks} x {threads}");
        }
    }
}

/// A GPU faults on a 64-bit atomic at an address that is not a multiple of 8; so does the
/// emulator.
#[test]
fn emulator_refuses_a_misaligned_64_bit_atomic() {
    use std::ffi::c_void;
    let _emu = shared();
    let x = [f32::NAN; 8];
    let mut counts = [0u64; 2];
    let (mut x_ptr, mut counts_ptr) = (x.as_ptr() as u64, counts.as_mut_ptr() as u64 + 4);
    let (mut slot, mut n) = (0u64, 8u64);
    let args = [&mut x_ptr, &mut counts_ptr, &mut slot, &mut n].map(|a| a as *mut u64 as *mut c_void);
    // SAFETY: as in emulated_kernel; the counter at counts_ptr lies inside `counts`.
    let err = unsafe { ptxgrad_emu::call("nonfinite", "nonfinite_count_f32", (1, 1, 1), 32, &args) }.unwrap_err();
    assert!(err.contains("misaligned 64-bit atomicAdd"), "{err}");
}
