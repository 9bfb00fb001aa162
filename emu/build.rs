//! Compiles the kernel files listed in KERNELS as host C++ (with cuda_host.h force-included and
//! PTXGRAD_HOST_EMU defined) plus the launcher, into one static library.

/// The kernel files (stems in ../kernels) whose kernels the emulator provides. A file is added
/// here once it compiles as host C++ (inline PTX needs a PTXGRAD_HOST_EMU branch, as in gemm.cuh).
const KERNELS: &[&str] =
    &["add", "conv2d", "dense", "dropout", "maxpool2d", "relu", "resize", "sgd", "softmax_xent", "winograd"];

fn main() {
    let here = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let kernels = here.join("../kernels").canonicalize().expect("kernels/ next to emu/");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("PTXGRAD_HOST_EMU", None)
        .include(&here)
        .flag("-include")
        .flag(here.join("cuda_host.h").to_str().expect("UTF-8 path"))
        .flag("-fno-strict-aliasing") // kernels read float arrays as float4
        .flag("-ffp-contract=off") // a * b + c stays two roundings, as written (fmaf is explicit)
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2)
        .file(here.join("launch.cpp"));
    // Each kernel file is its own module on a GPU, but here they link into one library: a
    // namespace per file keeps same-named helpers (FwdEpi in conv2d.cu and dense.cu, say) apart.
    // The kernels themselves are extern "C": their symbols stay unqualified.
    for k in KERNELS {
        let wrapper = out.join(format!("emu_{k}.cpp"));
        let src =
            format!("namespace ptxgrad_emu_{k} {{\n#include \"{}\"\n}}\n", kernels.join(format!("{k}.cu")).display());
        std::fs::write(&wrapper, src).expect("write the wrapper");
        build.file(wrapper);
    }
    build.compile("ptxgrad_kernels_emu");
    println!("cargo:rerun-if-changed={}", kernels.display());
    for f in ["cuda_host.h", "launch.cpp", "build.rs"] {
        println!("cargo:rerun-if-changed={}", here.join(f).display());
    }
    for entry in std::fs::read_dir(&kernels).expect("kernels/").flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
