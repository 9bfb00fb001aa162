//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ptxgrad::{Device, Error, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub mod kernels;
pub mod naive;

/// The CUDA device, or None with a printed reason when no GPU is present (`Error::NoCuda`: a
/// build without kernels, no driver, no device). A GPU that is present but cannot be used fails
/// the test, as does a missing one when PTXGRAD_REQUIRE_GPU is set (to any value): a GPU run
/// must not count skipped tests as passed.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    let required = std::env::var_os("PTXGRAD_REQUIRE_GPU").is_some();
    match Device::parse("cuda") {
        Ok(d) => Some(d),
        Err(e @ Error::NoCuda(_)) if !required => {
            eprintln!("SKIPPED {test}: no GPU ({e})");
            None
        }
        Err(e @ Error::NoCuda(_)) => panic!("{test}: PTXGRAD_REQUIRE_GPU is set but no GPU can be used: {e}"),
        Err(e) => panic!("{test}: a GPU is present but cannot be used: {e}"),
    }
}

/// Runs a test body once per available device: always on the CPU and on the kernel emulator
/// (the CUDA path, every kernel emulated on the CPU), and on cuda:0 when a GPU is present (see
/// `gpu_or_skip`). The body gets `dev: Device`.
#[macro_export]
macro_rules! test_device {
    ($name:ident, |$dev:ident| $body:block) => {
        mod $name {
            use super::*;
            fn body($dev: ptxgrad::Device) $body
            #[test]
            fn cpu() {
                body(ptxgrad::Device::Cpu)
            }
            #[test]
            fn emulated() {
                body(ptxgrad::Device::parse("emu").expect("the emulator is always there"))
            }
            #[test]
            fn cuda() {
                if let Some(d) = $crate::common::gpu_or_skip(concat!(stringify!($name), "::cuda")) {
                    body(d)
                }
            }
        }
    };
}

/// The largest case, in elements, that the op tests run on the CPU. The AlexNet-sized cases (tens
/// of millions of elements at batch 128) are there for a GPU's launch limits; the CPU path has
/// no code that only they reach (its worker pool splits from 2^18 elements on), and each costs
/// seconds on CI's two cores.
pub const CPU_CASE_MAX: usize = 1 << 22;

/// Whether a test case of `elems` elements runs on `dev`: every case on a GPU, up to
/// CPU_CASE_MAX on the CPU, up to `emulated_max` on the kernel emulator (which runs a kernel's
/// threads one after another, and runs again under AddressSanitizer in CI).
pub fn case_runs_on(dev: &Device, elems: usize, emulated_max: usize) -> bool {
    match dev {
        Device::Cpu => elems <= CPU_CASE_MAX,
        Device::Cuda(gpu) if gpu.is_emu() => elems <= emulated_max,
        Device::Cuda(_) => true,
    }
}

/// Seeded uniform values in [lo, hi).
pub fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// A seeded tensor with values in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    rand_host_and_tensor(shape, seed, dev).1
}

/// `rand_tensor`'s values and the tensor of them: the host copy is what an oracle reads.
pub fn rand_host_and_tensor(shape: &[usize], seed: u64, dev: &Device) -> (Vec<f32>, Tensor) {
    let values = uniform(shape.iter().product(), -1.0, 1.0, seed);
    (values.clone(), Tensor::from_vec(shape, values, dev).expect("tensor"))
}

/// The cases of `shapes` that run on `dev` (`case_runs_on`), as (index, shape, elements).
pub fn cases_on<'a>(
    dev: &'a Device,
    shapes: &'a [&'a [usize]],
    emulated_max: usize,
) -> impl Iterator<Item = (usize, &'a [usize], usize)> + 'a {
    let cases = shapes.iter().enumerate().map(|(k, &shape)| (k, shape, shape.iter().product()));
    cases.filter(move |&(_, _, n)| case_runs_on(dev, n, emulated_max))
}

/// Asserts |reference - got| <= atol + rtol * |reference| elementwise, naming the worst element.
pub fn assert_close(what: &str, reference: &[f32], got: &[f32], atol: f32, rtol: f32) {
    assert_eq!(reference.len(), got.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        let err = (r - g).abs();
        let excess = err - (atol + rtol * r.abs());
        // NaN in either value fails (comparisons with NaN are false).
        let ok = excess <= 0.0;
        if !ok && (excess > worst.1 || excess.is_nan()) {
            worst = (i, if g.is_nan() { f32::INFINITY } else { excess });
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i}: reference {} vs got {} (|diff| {} > atol {atol} + rtol {rtol} * |ref|)",
            reference[i],
            got[i],
            (reference[i] - got[i]).abs()
        );
    }
}

/// Asserts `got` against `reference` elementwise: NaN exactly where the reference is NaN, the
/// same infinity where it is infinite, within atol + rtol * |reference| (and finite) elsewhere.
pub fn assert_close_nonfinite(what: &str, reference: &[f32], got: &[f32], atol: f32, rtol: f32) {
    assert_eq!(reference.len(), got.len(), "{what}: lengths differ");
    for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
        let ok = if r.is_nan() {
            g.is_nan()
        } else if r.is_infinite() {
            g == r
        } else {
            g.is_finite() && (r - g).abs() <= atol + rtol * r.abs()
        };
        assert!(ok, "{what}: element {i}: reference {r} vs got {g}");
    }
}

/// The gradients of everything `tape` watched when the gradient of its output `y` is `gy`: the
/// backward of a loss whose gradient with respect to `y` is `gy`.
pub fn backward_from(mut tape: ptxgrad::Tape, y: &Tensor, gy: &Tensor) -> ptxgrad::Gradients {
    let loss = Tensor::from_vec(&[1], vec![0.0], &y.device()).expect("a scalar");
    let (y_id, gy) = (y.id(), gy.clone());
    tape.record(&loss, &[y], move |_, grads| grads.accumulate(y_id, gy));
    tape.backward(&loss).expect("the backward runs")
}

/// Equal bit for bit (so +0.0 is not -0.0), or both NaN (of any sign and payload).
pub fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Asserts `got` equals `want` element by element as `same_bits` does, naming the first
/// difference and the input it came from (`input(i)`, e.g. the operands of element i).
pub fn assert_same_bits(what: &str, want: &[f32], got: &[f32], input: impl Fn(usize) -> String) {
    assert_eq!(want.len(), got.len(), "{what}: lengths differ");
    for i in 0..want.len() {
        assert!(same_bits(want[i], got[i]), "{what}: element {i} ({}): got {}, want {}", input(i), got[i], want[i]);
    }
}

/// Central finite differences of a scalar function, in f64.
pub fn numeric_grad(x: &[f64], eps: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let up = f(&x);
            x[i] = orig - eps;
            let down = f(&x);
            x[i] = orig;
            (up - down) / (2.0 * eps)
        })
        .collect()
}

/// `numeric_grad` at an f32 point, as f32: the function sees the point in f64.
pub fn numeric_grad_at(x: &[f32], eps: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f32> {
    naive::f32s(&numeric_grad(&naive::f64s(x), eps, f))
}

/// A fresh, empty directory under the system temp dir, unique to this process and test; removed
/// when dropped (also when the test fails).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ptxgrad-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error's message, failing the test if it is not an error.
pub fn err_msg<T: std::fmt::Debug>(r: Result<T, ptxgrad::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

/// Asserts `msg` contains every piece (so the test says which one is missing).
pub fn assert_mentions(msg: &str, pieces: &[&str]) {
    for p in pieces {
        assert!(msg.contains(p), "error message {msg:?} should mention {p:?}");
    }
}

/// Allowed |winograd - reference| for a sum of `k` products of values in [-1, 1): 0.1% of the
/// sum's typical size sqrt(k)/3 (plus 1e-3). The transforms amplify rounding (more for larger
/// tiles): on the CPU the worst seen is 7e-5 of (1 + |reference|) at alpha = 6 and 8, 10x below
/// this. A wrong or missing term changes an output by O(1/3), far above it up to k ~ 10^4.
pub fn wino_atol(k: usize) -> f32 {
    1e-3 * (1.0 + (k as f32).sqrt() / 3.0)
}

/// The `ptxgrad` binary cargo built for this test run; when the test binary was copied elsewhere
/// (the GPU machine runs packed binaries), the `ptxgrad` or `bin-ptxgrad` beside it.
pub fn ptxgrad_binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_ptxgrad"));
    if built.is_file() {
        return built;
    }
    let here = std::env::current_exe().expect("test binary path");
    let dir = here.parent().expect("test binary directory");
    ["ptxgrad", "bin-ptxgrad"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no ptxgrad binary at {} or beside {}", built.display(), here.display()))
}

/// A `ptxgrad` command with `args`, reading the Fashion-MNIST files shipped with the crate.
pub fn ptxgrad_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(ptxgrad_binary());
    cmd.args(args).env("PTXGRAD_DATA", Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist"));
    cmd
}

/// Runs `ptxgrad args`: (exit code, -1 for a signal; stdout; stderr).
pub fn run_ptxgrad(args: &[&str]) -> (i32, String, String) {
    let out = ptxgrad_command(args).output().expect("run ptxgrad");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
