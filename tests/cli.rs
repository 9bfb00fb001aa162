//! The `ptxgrad` command: bad flags and bad paths give a clear error and exit status 1, never a
//! panic; `train` runs end to end and says what it measured.
mod common;

fn ptxgrad(args: &[&str]) -> (i32, String, String) {
    common::run_ptxgrad(args)
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
    let plot = dir.join("curves.svg");
    let plot_s = plot.display().to_string();
    let args = ["train", "--device", "cpu", "--resize", "65", "--max-examples", "64", "--epochs", "2"];
    let rest = ["--batch-size", "32", "--quiet", "--checkpoint", &ckpt_s, "--json", &json_s, "--plot", &plot_s];
    let (code, out, err) = ptxgrad(&[&args[..], &rest[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("epoch 2: loss"), "{out}");
    assert!(out.contains("end to end (2 epochs in "), "{out}");
    assert!(out.contains(" first reached after epoch "), "{out}");
    // The figure of both epochs, titled with the run's recipe.
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("AlexNet on Fashion-MNIST: lr 0.01, batch 32, 65x65"), "{svg}");
    for label in ["train loss", "train acc", "test acc"] {
        assert!(svg.contains(label), "no `{label}` in the figure");
    }
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let epochs: Vec<_> = lines.iter().filter(|v| v["kind"] == "epoch").map(|v| v["epoch"].as_u64()).collect();
    assert_eq!(epochs, [Some(1), Some(2)]);
    let last = lines.last().unwrap();
    assert_eq!(last["kind"], "final", "{last}");
    assert!(last["final_test_acc_first_epoch"].as_u64().is_some_and(|e| (1..=2).contains(&e)), "{last}");
    let (rate, e2e) =
        (last["examples_per_sec"].as_f64().unwrap(), last["end_to_end_examples_per_sec"].as_f64().unwrap());
    assert!(e2e > 0.0 && e2e <= rate, "end to end {e2e} counts more than the steps' {rate}");
    assert!(last["seconds"].as_f64().is_some_and(|s| s > 0.0), "{last}");
    // Written on the checkpoint thread, complete when the command returns.
    assert!(ckpt.is_file() && !dir.join("a.safetensors.tmp").exists());
}

/// A checkpoint made by the library (an untrained AlexNet at 65x65 after "epoch 1", recorded
/// with batch size 32, lr 0.01 and seed 7), without training anything.
fn small_checkpoint(path: &std::path::Path) {
    use ptxgrad::nn::{model::Model, models::ALEXNET};
    let model = Model::new(&ALEXNET, 65, 7, &ptxgrad::Device::Cpu).unwrap();
    let (tensors, meta) = ptxgrad::nn::saved::contents(&model, 1, 7, 0.01, 32).unwrap();
    ptxgrad::checkpoint::save(path, &tensors, &meta).unwrap();
}

#[test]
fn train_refuses_to_replace_a_checkpoint_unless_told() {
    let dir = common::TempDir::new("cli-overwrite");
    let ckpt = dir.join("a.safetensors");
    std::fs::write(&ckpt, b"a finished run").unwrap();
    let c = ckpt.display().to_string();
    // Refused before any work (no data is read, nothing trains): the file is untouched.
    fails_with(&["train", "--device", "cpu", "--checkpoint", &c], "exists already: --resume continues it, --overwrite");
    fails_with(&["train", "--device", "cpu", "--checkpoint", &c, "--resume", "--overwrite"], "cannot be used with");
    assert_eq!(std::fs::read(&ckpt).unwrap(), b"a finished run");
    // A directory is no checkpoint path, refused at once too.
    let d = dir.display().to_string();
    fails_with(&["train", "--device", "cpu", "--checkpoint", &d], "expected a checkpoint file path, found a directory");
    fails_with(&["train", "--device", "cpu", "--checkpoint", "."], "found a directory");
    assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 1, "nothing was created beside the checkpoint");
}

#[test]
fn a_symlinked_checkpoint_is_written_where_it_points() {
    let dir = common::TempDir::new("cli-symlink");
    let (target, link) = (dir.join("runs/real.safetensors"), dir.join("link.safetensors"));
    std::fs::create_dir(dir.join("runs")).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap(); // dangling until the first save
    let l = link.display().to_string();
    let args = ["train", "--device", "cpu", "--resize", "65", "--max-examples", "32", "--batch-size", "32"];
    let (code, out, err) = ptxgrad(&[&args[..], &["--epochs", "1", "--quiet", "--checkpoint", &l]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("checkpoint: {l} (-> {})", target.display())), "{out}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is still a link");
    assert_eq!(ptxgrad::checkpoint::metadata(&target).unwrap()["epoch"], "1");
    let (code, out, err) = ptxgrad(&["eval", "--device", "cpu", "--checkpoint", &l]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("epoch 1, 65x65, test acc"), "{out}");
}

#[test]
fn impossible_sizes_are_refused_up_front_with_the_memory_they_need() {
    // Each would panic, abort or be killed by the OOM killer if it were allocated.
    let cpu = ["train", "--device", "cpu", "--checkpoint", "/nonexistent-dir-ptxgrad/x.safetensors"];
    for (extra, needle) in [
        (&["--resize", "100000000"][..], "--resize: AlexNet: expected sizes that fit in 64 bits"),
        (&["--resize", "18446744073709551615"][..], "--resize: AlexNet: expected sizes that fit in 64 bits"),
        (&["--resize", "5000", "--max-examples", "256"][..], "--resize 5000 --batch-size 128: training needs at least"),
        (&["--batch-size", "100000"][..], "--resize 224 --batch-size 100000: training needs at least"),
    ] {
        let dir = common::TempDir::new("cli-sizes");
        let c = dir.join("x.safetensors").display().to_string();
        let mut args = cpu.to_vec();
        args[4] = &c;
        fails_with(&[&args[..], extra].concat(), needle);
        let (_, _, err) = ptxgrad(&[&args[..], extra].concat());
        if needle.contains("needs at least") {
            assert!(
                err.contains("GB of host memory") && err.contains("use a smaller --resize or --batch-size"),
                "{err}"
            );
        }
        assert!(!dir.join("x.safetensors").exists());
    }
    fails_with(&["summary", "--resize", "200000000"], "expected sizes that fit in 64 bits");
    fails_with(&["summary", "--resize", "18446744073709551615"], "expected sizes that fit in 64 bits");
}

#[test]
fn a_diverged_run_fails_naming_the_epoch_and_saves_nothing() {
    // lr 1e9 overflows the weights within the first steps; NaN then propagates through every
    // op (ReLU included) to the loss, which stops the run.
    let dir = common::TempDir::new("cli-diverge");
    let c = dir.join("d.safetensors").display().to_string();
    let args = ["train", "--lr", "1e9", "--resize", "65", "--max-examples", "256", "--batch-size", "64"];
    let (code, _, err) =
        ptxgrad(&[&args[..], &["--epochs", "1", "--device", "cpu", "--quiet", "--checkpoint", &c]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("training diverged") && err.contains("epoch 1"), "{err}");
    assert!(err.contains(&format!("nothing was written to {}", dir.join("d.safetensors").display())), "{err}");
    assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 0, "no checkpoint, temp file or lock left");
}

#[test]
fn checkpoints_holding_nan_are_refused_naming_the_tensor() {
    let dir = common::TempDir::new("cli-nan-ckpt");
    let path = dir.join("nan.safetensors");
    small_checkpoint(&path);
    let (mut tensors, meta) = ptxgrad::checkpoint::load(&path).unwrap();
    let bias = tensors.iter_mut().find(|t| t.name == "3.bias").unwrap();
    let ptxgrad::checkpoint::Values::F32(data) = &mut bias.data else { panic!("a bias is f32") };
    data[5] = f32::NAN;
    data[6] = f32::INFINITY;
    ptxgrad::checkpoint::save(&path, &tensors, &meta).unwrap();
    let p = path.display().to_string();
    fails_with(&["eval", "--device", "cpu", "--checkpoint", &p], "holds NaN or Inf (`3.bias`: 2 of 256 values)");
    fails_with(&["predict", "--device", "cpu", "--checkpoint", &p], "`3.bias`");
    fails_with(&["train", "--device", "cpu", "--resume", "--epochs", "2", "--checkpoint", &p], "`3.bias`");
    // A resolution in the metadata that no AlexNet has names the file too.
    let mut meta = meta;
    meta.insert("resolution".into(), "0".into());
    ptxgrad::checkpoint::save(&path, &tensors, &meta).unwrap();
    fails_with(&["eval", "--device", "cpu", "--checkpoint", &p], &format!("{p}: metadata `resolution` is 0"));
}

#[test]
fn resume_continues_with_the_recorded_recipe_and_says_what_changed() {
    let dir = common::TempDir::new("cli-resume-recipe");
    let path = dir.join("r.safetensors");
    small_checkpoint(&path);
    let p = path.display().to_string();
    let args = ["train", "--device", "cpu", "--resume", "--max-examples", "32", "--epochs", "2", "--quiet"];
    let (code, out, err) = ptxgrad(&[&args[..], &["--lr", "0.02", "--checkpoint", &p]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--resume: continuing with --lr 0.02 (the checkpoint was trained with 0.01)"), "{out}");
    // Resolution, batch size and seed came from the checkpoint, not the defaults (224, 128, 0).
    assert!(out.contains("at 65x65, batch 32, lr 0.02, 2 epochs"), "{out}");
    let meta = ptxgrad::checkpoint::metadata(&path).unwrap();
    let recorded = (meta["epoch"].as_str(), meta["lr"].as_str(), meta["batch_size"].as_str(), meta["seed"].as_str());
    assert_eq!(recorded, ("2", "0.02", "32", "7"));
}

#[test]
fn an_empty_test_set_is_said_not_scored() {
    let dir = common::TempDir::new("cli-empty-test");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist");
    for f in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] {
        std::os::unix::fs::symlink(data.join(f), dir.join(f)).unwrap();
    }
    // IDX headers of zero images and zero labels, gzipped.
    let gz = |path: std::path::PathBuf, bytes: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    };
    gz(dir.join("t10k-images-idx3-ubyte.gz"), &[0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28]);
    gz(dir.join("t10k-labels-idx1-ubyte.gz"), &[0, 0, 8, 1, 0, 0, 0, 0]);
    let (d, c) = (dir.display().to_string(), dir.join("e.safetensors").display().to_string());
    let args = ["train", "--device", "cpu", "--resize", "65", "--max-examples", "32", "--batch-size", "32"];
    let (code, out, err) =
        ptxgrad(&[&args[..], &["--epochs", "1", "--quiet", "--data-dir", &d, "--checkpoint", &c]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: no test examples: test accuracy is not measured"), "{err}");
    assert!(out.contains("test acc n/a") && !out.contains("test acc 0.000"), "{out}");
    fails_with(&["eval", "--device", "cpu", "--data-dir", &d, "--checkpoint", &c], "no test examples");
}

#[test]
fn the_cpu_fallback_warning_names_the_size_asked_for() {
    // Without a GPU, `--device auto` falls back to the CPU and says so; the size it calls slow
    // is the one asked for. (With a GPU there is no warning at all.)
    let dir = common::TempDir::new("cli-fallback");
    let c = dir.join("f.safetensors").display().to_string();
    for (resize, slow) in [("65", None), ("224", Some("very slow at 224x224")), ("300", Some("very slow at 300x300"))] {
        let (_, _, err) = ptxgrad(&["train", "--resize", resize, "--max-examples", "0", "--checkpoint", &c]);
        assert!(err.contains("no training examples"), "{err}");
        if err.contains("running on the CPU") {
            assert_eq!(slow.is_some_and(|s| err.contains(s)), slow.is_some(), "--resize {resize}: {err}");
            assert!(resize == "224" || !err.contains("224x224"), "--resize {resize}: {err}");
        }
    }
}

#[test]
fn every_model_is_summarised_at_its_recipes_size() {
    for (model, size, count) in [("lenet", 28, 61_706), ("vgg11", 224, 43_093_322), ("nin", 224, 1_992_166)] {
        let (code, out, err) = ptxgrad(&["summary", "--model", model]);
        assert_eq!(code, 0, "{model}: {err}");
        assert!(out.contains(&format!("parameters: {count}")), "{model}: {out}");
        // One (1, 1, size, size) input: the first layer keeps or shrinks the plane.
        assert!(out.lines().next().is_some_and(|l| l.contains("torch.Size([1, ")), "{model} at {size}: {out}");
    }
    fails_with(&["summary", "--model", "resnet"], "expected one of lenet, alexnet, vgg11, nin");
    fails_with(&["train", "--model", "resnet"], "invalid value 'resnet' for '--model");
}

/// A PyTorch-style state_dict (no metadata) of an AlexNet at 65x65, as `save_file` writes one.
fn plain_state_dict(path: &std::path::Path) {
    use ptxgrad::nn::{model::Model, models::ALEXNET};
    let model = Model::new(&ALEXNET, 65, 7, &ptxgrad::Device::Cpu).unwrap();
    ptxgrad::checkpoint::save(path, &model.to_named().unwrap(), &Default::default()).unwrap();
}

#[test]
fn eval_and_predict_read_a_plain_state_dict_and_give_logits_as_json() {
    let dir = common::TempDir::new("cli-plain");
    let path = dir.join("torch.safetensors");
    plain_state_dict(&path);
    let p = path.display().to_string();
    // Its shapes fit 65 to 96, not AlexNet's recipe (224): the size is asked for by flag name.
    fails_with(&["eval", "--device", "cpu", "--checkpoint", &p], "give --resize");
    let base = ["--device", "cpu", "--checkpoint", &p, "--resize", "65", "--max-examples", "7"];
    let (code, out, err) = ptxgrad(&[&["eval"][..], &base].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("a PyTorch state_dict (no ptxgrad metadata): AlexNet found from its tensor names"), "{out}");
    let text_acc: f64 = out
        .split("test acc ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {out}"));
    assert!(out.contains("on 7 examples"), "{out}");
    for (command, images) in [("eval", 7), ("predict", 3)] {
        let (code, out, err) = ptxgrad(
            &[&[command][..], &base, &["--json", "-n", "3"][..]]
                .concat()
                .iter()
                .copied()
                .filter(|a| command == "predict" || !["-n", "3"].contains(a))
                .collect::<Vec<_>>(),
        );
        assert_eq!(code, 0, "{command}: {err}");
        let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), images + 1, "{command}: {out}");
        let mut correct = 0;
        for (i, line) in lines[..images].iter().enumerate() {
            assert_eq!((line["kind"].as_str(), line["index"].as_u64()), (Some("image"), Some(i as u64)), "{line}");
            let logits: Vec<f64> = line["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(logits.len(), 10, "{line}");
            // The predicted class is the largest logit.
            let best = (0..10).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
            assert_eq!(line["predicted"].as_u64(), Some(best as u64), "{line}");
            correct += usize::from(line["predicted"] == line["label"]);
        }
        let totals = &lines[images];
        assert_eq!((totals["kind"].as_str(), totals["examples"].as_u64()), (Some("totals"), Some(images as u64)));
        assert_eq!(totals["correct"].as_u64(), Some(correct as u64), "{totals}");
        assert_eq!(totals["plain_state_dict"], true, "{totals}");
        if command == "eval" {
            // The device's count and the logits' agree.
            assert_eq!(format!("{:.4}", totals["accuracy"].as_f64().unwrap()), format!("{text_acc:.4}"), "{totals}");
        }
    }
}

#[test]
fn train_resumes_from_a_plain_state_dict_at_epoch_0_with_the_recipe() {
    let dir = common::TempDir::new("cli-plain-resume");
    let path = dir.join("torch.safetensors");
    plain_state_dict(&path);
    let p = path.display().to_string();
    let args = ["train", "--device", "cpu", "--resume", "--resize", "65", "--max-examples", "32", "--epochs", "1"];
    let (code, out, err) = ptxgrad(&[&args[..], &["--batch-size", "32", "--quiet", "--checkpoint", &p]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("epochs count from 0"), "{out}");
    assert!(out.contains("training AlexNet"), "{out}");
    // AlexNet's recipe lr where the file recorded none; now a ptxgrad checkpoint after epoch 1.
    assert!(out.contains("lr 0.01, 1 epochs"), "{out}");
    let meta = ptxgrad::checkpoint::metadata(&path).unwrap();
    assert_eq!((meta["model"].as_str(), meta["epoch"].as_str()), ("alexnet", "1"));
}
