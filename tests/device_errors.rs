//! What the device layer tells the user: the "no CUDA" error names the ways to run without a
//! GPU, and the memory queries (for refusing sizes that cannot fit) report sane figures.
mod common;

use ptxgrad::device::{host_memory_available, MemoryAvailable};
use ptxgrad::{Device, Error};

/// The hints every "CUDA is not available" message must carry.
fn assert_names_the_alternatives(msg: &str) {
    for piece in ["CUDA is not available", "--device cpu", "CPU", "--device emu", "emulator"] {
        assert!(msg.contains(piece), "{msg:?} should mention {piece:?}");
    }
}

#[test]
fn no_cuda_message_names_cpu_and_emu() {
    // Built directly, so the check means something on a machine with a GPU too.
    let msg = Error::NoCuda("the NVIDIA driver library (libcuda.so) was not found".into()).to_string();
    assert_names_the_alternatives(&msg);
    assert!(msg.contains("libcuda.so"), "{msg}");
}

#[test]
fn asking_for_cuda_without_a_gpu_says_how_to_run_anyway() {
    // A device number no machine has: the same error on every machine, GPU or not.
    match Device::parse("cuda:4096") {
        Err(e @ Error::NoCuda(_)) => assert_names_the_alternatives(&e.to_string()),
        Err(e) => panic!("expected Error::NoCuda for cuda:4096, got {e}"),
        Ok(d) => panic!("cuda:4096 opened as {d:?}"),
    }
    // Plain `cuda` where no GPU can be used.
    match Device::parse("cuda") {
        Ok(_) => eprintln!("a GPU is present: `--device cuda` opened, the no-GPU message is not reachable here"),
        Err(e @ Error::NoCuda(_)) => assert_names_the_alternatives(&e.to_string()),
        Err(e) => panic!("expected Error::NoCuda without a GPU, got {e}"),
    }
}

/// MemTotal of /proc/meminfo, in bytes.
fn mem_total() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:")).expect("MemTotal in /proc/meminfo");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("MemTotal's value");
    kb * 1024
}

#[test]
#[cfg(target_os = "linux")]
fn host_memory_is_known_on_linux_and_plausible() {
    let total = mem_total();
    let available = host_memory_available().expect("Linux has /proc/meminfo");
    assert!(available > 1 << 20, "{available} bytes available: expected more than 1 MB");
    assert!(available <= total, "{available} bytes available: expected at most MemTotal, {total}");
}

#[test]
fn cpu_has_host_memory_only() {
    let MemoryAvailable { host, device } = Device::Cpu.memory_available().unwrap();
    assert_eq!(device, None);
    if cfg!(target_os = "linux") {
        assert!(host.is_some_and(|h| h > 1 << 20), "{host:?}");
    }
}

/// a and b within 5% of the larger (memory changes between two reads).
fn close(a: u64, b: u64) -> bool {
    a.abs_diff(b) as f64 <= 0.05 * a.max(b) as f64
}

#[test]
fn emulator_memory_is_host_memory() {
    let emu = Device::parse("emu").expect("the emulator is always there");
    let MemoryAvailable { host, device } = emu.memory_available().unwrap();
    assert_eq!(host.is_some(), device.is_some(), "host {host:?}, device {device:?}");
    if let (Some(h), Some(d)) = (host, device) {
        assert!(close(h, d), "emulator: device {d} vs host {h} bytes");
        let now = host_memory_available().expect("read just before");
        assert!(close(h, now), "host {h} then {now} bytes");
    }
    if cfg!(target_os = "linux") {
        assert!(host.is_some());
    }
}

#[test]
fn gpu_memory_is_free_device_memory() {
    let Some(gpu) = common::gpu_or_skip("gpu_memory_is_free_device_memory") else { return };
    let MemoryAvailable { host, device } = gpu.memory_available().unwrap();
    let free = device.expect("a GPU reports its free memory");
    assert!(free > 1 << 20, "{free} bytes free on {}: expected more than 1 MB", gpu.hardware_name());
    if cfg!(target_os = "linux") {
        assert!(host.is_some());
    }
    // Allocating 256 MB lowers the free figure by about as much (the driver's pool may round up).
    let Device::Cuda(g) = &gpu else { unreachable!() };
    let buf = g.zeros::<u8>(256 << 20).unwrap();
    gpu.synchronize().unwrap();
    let after = gpu.memory_available().unwrap().device.unwrap();
    assert!(after + (200 << 20) <= free, "free {free} bytes, {after} after allocating 256 MB");
    drop(buf);
}
