//! The `ptxgrad` command: bad flags and bad paths give a clear error and exit status 1, never a
//! panic; `train` runs end to end and says what it measured.
mod common;
use std::path::PathBuf;
use std::process::Command;

/// The binary cargo built for this test run; when the test binary was copied elsewhere (the GPU
/// machine runs packed binaries), the `ptxgrad` or `bin-ptxgrad` beside it.
fn binary() -> PathBuf {
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

fn ptxgrad(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary()).args(args).output().expect("run ptxgrad");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(args: &[&str], needle: &str) {
    let (code, _, err) = ptxgrad(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.contains(needle), "{args:?}: expected `{needle}` in: {err}");
}

#[test]
fn summary_prints_the_parameter_count() {
    let (code, out, _) = ptxgrad(&["summary"]);
    assert_eq!(code, 0);
    assert!(out.contains("Linear     output shape:\t torch.Size([1, 10])"), "{out}");
    assert!(out.contains("parameters: 46764746"), "{out}");
}

#[test]
fn bad_flags_are_clear_errors() {
    fails_with(&["train", "--epochs", "zero"], "invalid value 'zero'");
    fails_with(&["train", "--epochs", "0"], "--epochs and --batch-size must be at least 1");
    fails_with(&["train", "--lr", "-1"], "--lr must be a positive number");
    fails_with(&["train", "--resize", "50"], "from 65x65 up");
    fails_with(&["train", "--device", "tpu"], "unknown device `tpu`");
    fails_with(&["train", "--bogus"], "unexpected argument '--bogus'");
    fails_with(&["summary", "--resize", "10"], "from 65x65 up");
    fails_with(&["bench", "--device", "cpu", "--profile-steps", "1"], "--profile-steps needs a CUDA device");
}

#[test]
fn missing_data_and_checkpoints_are_named() {
    fails_with(&["train", "--device", "cpu", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm");
    fails_with(
        &["eval", "--device", "cpu", "--checkpoint", "/nonexistent/x.safetensors"],
        "/nonexistent/x.safetensors",
    );
    fails_with(
        &["train", "--device", "cpu", "--resume", "--checkpoint", "/nonexistent/y.safetensors"],
        "--resume: no checkpoint at /nonexistent/y.safetensors: `ptxgrad train` writes one",
    );
    // A path that exists but cannot be read as a file: the OS's reason, said once (an error
    // chain printed with `{:#}` repeats a `source` that the message already holds).
    let dir = std::env::temp_dir();
    let (code, _, err) = ptxgrad(&["eval", "--device", "cpu", "--checkpoint", &dir.display().to_string()]);
    assert_ne!(code, 0);
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    assert!(err.contains(&format!("{}: ", dir.display())), "{err}");
}

/// `ptxgrad bench` on the kernel emulator (the CUDA path, run on the CPU; tiny and slow): the
/// bench line reports that the timed steps allocated nothing, copied nothing between host and
/// device, and never waited for the device.
#[test]
fn emulated_bench_steps_allocate_copy_and_wait_for_nothing() {
    let args = ["bench", "--device", "emu", "--resize", "65", "--batch-size", "2", "--warmup", "1", "--steps", "1"];
    let (code, out, err) =
        ptxgrad(&[&args[..], &["--no-layers", "--conv-algo", "gemm", "--profile-steps", "1"]].concat());
    assert_eq!(code, 0, "{err}");
    // The profiled step runs after the warm-up and timed ones (on a GPU, inside
    // cuProfilerStart/Stop).
    let profiled = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "profiled")
        .unwrap_or_else(|| panic!("no profiled line in: {out}"));
    assert_eq!((profiled["steps"].as_u64(), profiled["first_step"].as_u64()), (Some(1), Some(2)), "{profiled}");
    let bench: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "bench")
        .unwrap_or_else(|| panic!("no bench line in: {out}"));
    for key in ["allocations_in_timed_steps", "host_copies_in_timed_steps", "synchronizations_in_timed_steps"] {
        assert_eq!(bench[key], 0, "{key} in {bench}");
    }
    assert!(bench["examples_per_sec"].as_f64().is_some_and(|e| e > 0.0), "{bench}");
}

/// The main command end to end on the CPU (tiny: 64 examples at 65x65, two epochs): per-epoch
/// and final JSON lines, the whole run's end-to-end rate beside the step rate, the checkpoint.
#[test]
fn train_on_the_cpu_reports_epochs_and_writes_its_checkpoint() {
    let dir = common::TempDir::new("cli-train");
    let (ckpt, json) = (dir.join("a.safetensors"), dir.join("train.jsonl"));
    let (ckpt_s, json_s) = (ckpt.display().to_string(), json.display().to_string());
    let args = ["train", "--device", "cpu", "--resize", "65", "--max-examples", "64", "--epochs", "2"];
    let rest = ["--batch-size", "32", "--quiet", "--checkpoint", &ckpt_s, "--json", &json_s];
    let (code, out, err) = ptxgrad(&[&args[..], &rest[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("epoch 2: loss"), "{out}");
    assert!(out.contains("end to end (2 epochs in "), "{out}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let epochs: Vec<_> = lines.iter().filter(|v| v["kind"] == "epoch").map(|v| v["epoch"].as_u64()).collect();
    assert_eq!(epochs, [Some(1), Some(2)]);
    let last = lines.last().unwrap();
    assert_eq!(last["kind"], "final", "{last}");
    let (rate, e2e) =
        (last["examples_per_sec"].as_f64().unwrap(), last["end_to_end_examples_per_sec"].as_f64().unwrap());
    assert!(e2e > 0.0 && e2e <= rate, "end to end {e2e} counts more than the steps' {rate}");
    assert!(last["seconds"].as_f64().is_some_and(|s| s > 0.0), "{last}");
    // Written on the checkpoint thread, complete when the command returns.
    assert!(ckpt.is_file() && !dir.join("a.safetensors.tmp").exists());
}
