//! `ptxgrad kernels`: the driver's build of every kernel against the kernels' design rules (no
//! local memory, launch bounds honoured). The rules' logic is checked here on made-up records;
//! the real check needs a GPU, whose driver compiles the PTX (`kernel_resources_cuda_*`).

mod common;

use ptxgrad::device::LoadedCode;
use ptxgrad::kernel_resources::{broken_rules, kernel_resources, KernelResources};
use ptxgrad::Device;

/// A GEMM kernel as the rules want it: 128 registers, 2 blocks of 256 threads per SM.
fn gemm_kernel() -> KernelResources {
    KernelResources {
        module: "conv2d",
        kernel: "conv2d_fwd_f32_t128",
        registers: 128,
        local_bytes: 0,
        shared_bytes: 25_088,
        max_threads: 256,
        bound_threads: Some(256),
        bound_blocks: Some(2),
        blocks_per_sm: Some(2),
        binary_version: 90,
        code: LoadedCode::Sass(90),
    }
}

#[test]
fn violations_name_each_broken_rule() {
    assert_eq!(gemm_kernel().violations(), Vec::<String>::new());

    let spilled = KernelResources { local_bytes: 48, ..gemm_kernel() };
    let v = spilled.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("48 bytes of local memory"), "{v:?}");

    // More registers than 2 blocks allow: one block per SM, and fewer threads than the bound.
    let fat = KernelResources { registers: 168, max_threads: 128, blocks_per_sm: Some(1), ..gemm_kernel() };
    let v = fat.violations();
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v[0].contains("at most 128 threads") && v[0].contains("up to 256"), "{v:?}");
    assert!(v[1].contains("fits 1 block(s) of 256 threads") && v[1].contains("ask for 2"), "{v:?}");

    // Without launch bounds only the local-memory rule applies.
    let plain = KernelResources {
        kernel: "relu_fwd_f32",
        registers: 16,
        max_threads: 1024,
        bound_threads: None,
        bound_blocks: None,
        blocks_per_sm: None,
        ..gemm_kernel()
    };
    assert!(plain.violations().is_empty());
}

#[test]
fn kernel_resources_refuse_the_emulator() {
    let Device::Cuda(emu) = Device::parse("emu").expect("the emulator is always there") else {
        panic!("emu is a CUDA-path device")
    };
    let err = kernel_resources(&emu).expect_err("the emulator has no registers to report").to_string();
    assert!(err.contains("only on a GPU"), "{err}");
}

/// On a GPU: every kernel of every module, as its driver compiled it, keeps the design rules.
#[test]
fn kernel_resources_cuda_keep_the_design_rules() {
    let Some(Device::Cuda(gpu)) = common::gpu_or_skip("kernel_resources_cuda_keep_the_design_rules") else {
        return;
    };
    let kernels = kernel_resources(&gpu).expect("every kernel loads and reports its attributes");
    println!("{} kernels, as the driver built them", kernels.len());
    let expected: usize =
        ptxgrad::ptx::all().iter().filter_map(|(_, ptx)| *ptx).map(|p| ptxgrad::ptx::entries(p).len()).sum();
    assert_eq!(kernels.len(), expected, "one record per `.entry` of the PTX");
    assert!(kernels.iter().all(|k| k.binary_version >= 80), "machine code older than sm_80");
    // Where this build has machine code for the GPU, it is what loaded (no silent fall back to PTX).
    let forced_ptx = std::env::var("PTXGRAD_KERNEL_CODE").is_ok_and(|v| v == "ptx");
    for k in kernels.iter().filter(|k| ptxgrad::ptx::SASS_ARCHS.contains(&k.binary_version) && !forced_ptx) {
        assert_eq!(k.code, LoadedCode::Sass(k.binary_version), "{}", k.kernel);
    }
    let broken = broken_rules(&kernels);
    assert!(broken.is_empty(), "the driver's build breaks the kernels' design rules:\n{}", broken.join("\n"));
}
