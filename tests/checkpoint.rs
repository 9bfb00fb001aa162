//! safetensors checkpoints: round trip, atomic writes, clear errors for bad files, and the
//! background writer that training saves through.
mod common;
use common::{assert_mentions, err_msg, TempDir};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ptxgrad::checkpoint::{load, metadata, save, tmp_path, Claim, NamedTensor, Values, Writer};
use safetensors::tensor::{Dtype, TensorView};

fn temp_dir(test: &str) -> TempDir {
    TempDir::new(&format!("checkpoint-{test}"))
}

fn tensor(name: &str, shape: &[usize], offset: f32) -> NamedTensor {
    let n: usize = shape.iter().product();
    NamedTensor::f32(name, shape, (0..n).map(|i| offset + i as f32 * 0.25).collect())
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Files in `dir` (names only), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn round_trip_keeps_names_shapes_values_and_metadata() {
    let dir = temp_dir("round_trip");
    // Parent directory does not exist yet: save creates it.
    let path = dir.join("run1/ckpt.safetensors");
    let mut tensors = vec![
        tensor("net.conv1.weight", &[96, 1, 11, 11], -3.0),
        tensor("net.conv1.bias", &[96], 1.5),
        tensor("fc.weight", &[10, 4096], 0.0),
        tensor("scalar", &[], 42.0),
        tensor("empty", &[0, 3], 0.0),
    ];
    // Values that must survive bit for bit.
    let Values::F32(data) = &mut tensors[1].data else { unreachable!("made as f32") };
    data[0] = f32::MIN_POSITIVE / 2.0; // subnormal
    data[1] = -0.0;
    data[2] = f32::MAX;
    data[3] = f32::NAN;
    let metadata = meta(&[("epoch", "3"), ("seed", "42"), ("step", "1407"), ("format", "ptxgrad-1")]);
    save(&path, &tensors, &metadata).unwrap();

    let (loaded, loaded_meta) = load(&path).unwrap();
    assert_eq!(loaded_meta, metadata);
    // Loaded in file order: sorted by name (all tensors are f32).
    let mut expected = tensors.clone();
    expected.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(loaded.len(), expected.len());
    for (got, want) in loaded.iter().zip(&expected) {
        assert_eq!((&got.name, &got.shape), (&want.name, &want.shape));
        let bits = |d: &Values| match d {
            Values::F32(v) => v.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            Values::I64(_) => unreachable!("made as f32"),
        };
        assert_eq!(bits(&got.data), bits(&want.data), "tensor {}", want.name);
    }
}

#[test]
fn empty_metadata_and_no_tensors() {
    let dir = temp_dir("empty");
    let path = dir.join("c.safetensors");
    save(&path, &[], &BTreeMap::new()).unwrap();
    let (tensors, metadata) = load(&path).unwrap();
    assert!(tensors.is_empty() && metadata.is_empty());
}

#[test]
fn file_layout_is_standard_safetensors() {
    // What PyTorch's safetensors.torch.load_file reads: u64 LE header length, a JSON header with
    // dtype "F32", shape and data_offsets per tensor and string-to-string __metadata__, then LE data.
    let dir = temp_dir("layout");
    let path = dir.join("c.safetensors");
    let t = NamedTensor::f32("w", &[2], vec![1.0, -2.0]);
    save(&path, &[t], &meta(&[("epoch", "1")])).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["w"]["dtype"], "F32");
    assert_eq!(header["w"]["shape"], serde_json::json!([2]));
    assert_eq!(header["w"]["data_offsets"], serde_json::json!([0, 8]));
    assert_eq!(header["__metadata__"]["epoch"], "1");
    assert_eq!(&bytes[8 + n..], [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
}

#[test]
fn save_is_atomic_and_overwrites() {
    let dir = temp_dir("atomic");
    let path = dir.join("ckpt.safetensors");
    save(&path, &[tensor("a", &[4], 0.0)], &meta(&[("epoch", "1")])).unwrap();
    assert_eq!(listing(&dir), ["ckpt.safetensors"], "no .tmp left behind");

    // Each process writes a temp file of its own: another process's (here, a killed run's) is
    // not touched by a save.
    std::fs::write(dir.join("ckpt.safetensors.12345.tmp"), b"half a checkpoint").unwrap();
    save(&path, &[tensor("a", &[4], 10.0), tensor("b", &[2], 0.0)], &meta(&[("epoch", "2")])).unwrap();
    assert_eq!(listing(&dir), ["ckpt.safetensors", "ckpt.safetensors.12345.tmp"]);
    let (tensors, metadata) = load(&path).unwrap();
    assert_eq!(metadata["epoch"], "2");
    assert_eq!(tensors[0], tensor("a", &[4], 10.0));
    assert_eq!(tensors.len(), 2);
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let dir = temp_dir("failed_save");
    let path = dir.join("ckpt.safetensors");
    save(&path, &[tensor("a", &[3], 1.0)], &meta(&[("epoch", "1")])).unwrap();
    // Bad input is rejected before anything is written.
    let bad = NamedTensor::f32("a", &[2, 3], vec![0.0; 5]);
    assert_mentions(&err_msg(save(&path, &[bad], &BTreeMap::new())), &["`a`", "[2, 3]", "needs 6 values, found 5"]);
    let dup = [tensor("a", &[1], 0.0), tensor("a", &[1], 0.0)];
    assert_mentions(&err_msg(save(&path, &dup, &BTreeMap::new())), &["`a`", "twice"]);
    // The tmp path is occupied by a directory, so the write itself fails.
    let tmp = tmp_path(&path);
    std::fs::create_dir(&tmp).unwrap();
    let msg = err_msg(save(&path, &[tensor("a", &[3], 9.0)], &BTreeMap::new()));
    assert_mentions(&msg, &[&tmp.display().to_string()]);
    let (tensors, metadata) = load(&path).unwrap();
    assert_eq!((tensors, metadata["epoch"].as_str()), (vec![tensor("a", &[3], 1.0)], "1"));
}

#[test]
fn corrupt_files_give_clear_errors() {
    let dir = temp_dir("corrupt");
    let path = dir.join("good.safetensors");
    save(&path, &[tensor("w", &[16], 0.0)], &meta(&[("epoch", "1")])).unwrap();
    let good = std::fs::read(&path).unwrap();

    // Cut short (e.g. a copy interrupted), garbage, empty, and a header length that lies.
    let mut lying = good.clone();
    lying[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: [(&str, Vec<u8>); 4] = [
        ("cut.safetensors", good[..good.len() - 10].to_vec()),
        ("garbage.safetensors", b"this is not a checkpoint at all".to_vec()),
        ("empty.safetensors", vec![]),
        ("lying.safetensors", lying),
    ];
    for (file, bytes) in cases {
        let p = dir.join(file);
        std::fs::write(&p, bytes).unwrap();
        assert_mentions(&err_msg(load(&p)), &[file, "not a valid safetensors checkpoint"]);
    }
    assert_mentions(&err_msg(load(&dir.join("missing.safetensors"))), &["missing.safetensors"]);
}

#[test]
fn tensors_other_than_f32_and_i64_are_rejected_by_name_and_dtype() {
    let dir = temp_dir("dtype");
    let path = dir.join("mixed.safetensors");
    let f32_bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes = [0u8; 4];
    let views = vec![
        ("weight", TensorView::new(Dtype::F32, vec![2], &f32_bytes).unwrap()),
        ("step", TensorView::new(Dtype::F16, vec![2], &f16_bytes).unwrap()),
    ];
    safetensors::tensor::serialize_to_file(views, None::<HashMap<String, String>>, &path).unwrap();
    assert_mentions(
        &err_msg(load(&path)),
        &["mixed.safetensors", "`step`", "F16", "expected F32 (or I64 for a count)"],
    );
}

#[test]
fn int64_counts_round_trip() {
    // Batch norm's `num_batches_tracked`: an int64 scalar (shape []), as PyTorch keeps it.
    let dir = temp_dir("i64");
    let path = dir.join("counts.safetensors");
    let count = NamedTensor { name: "0.1.num_batches_tracked".into(), shape: vec![], data: Values::I64(vec![4690]) };
    let tensors = vec![tensor("0.1.weight", &[3], 1.0), count.clone()];
    save(&path, &tensors, &BTreeMap::new()).unwrap();
    let (got, _) = load(&path).unwrap();
    assert_eq!(got.iter().find(|t| t.name == count.name), Some(&count));
}

#[test]
fn writer_saves_in_order_and_finish_waits() {
    let dir = temp_dir("writer_order");
    let path = dir.join("ckpt.safetensors");
    let mut writer = Writer::default();
    assert!(!writer.in_flight());
    // 4 MB tensors, so that the first save may still be running when the second starts.
    writer.start(&path, vec![tensor("w", &[1 << 20], 1.0)], meta(&[("epoch", "1")])).unwrap();
    assert!(writer.in_flight());
    writer.start(&path, vec![tensor("w", &[1 << 20], 2.0)], meta(&[("epoch", "2")])).unwrap();
    writer.finish().unwrap();
    assert!(!writer.in_flight());
    let (tensors, metadata) = load(&path).unwrap();
    assert_eq!((tensors, metadata["epoch"].as_str()), (vec![tensor("w", &[1 << 20], 2.0)], "2"), "the later save wins");
    assert_eq!(listing(&dir), ["ckpt.safetensors"], "no temp file left behind");
    writer.finish().unwrap(); // nothing in flight: nothing to wait for
}

#[test]
fn writer_reports_a_failed_save_and_drop_waits() {
    let dir = temp_dir("writer_fail");
    // A regular file where the checkpoint's directory should be: the save cannot create it.
    std::fs::write(dir.join("not-a-dir"), b"").unwrap();
    let bad = dir.join("not-a-dir/ckpt.safetensors");
    let mut writer = Writer::default();
    writer.start(&bad, vec![tensor("a", &[3], 1.0)], BTreeMap::new()).unwrap();
    // poll never waits: it reports the failure once the save has ended.
    let started = std::time::Instant::now();
    let err = loop {
        match writer.poll() {
            Err(e) => break e,
            Ok(()) if !writer.in_flight() => panic!("the save into a file's path succeeded"),
            Ok(()) => assert!(started.elapsed().as_secs() < 30, "the failing save never ended"),
        }
        std::thread::yield_now();
    };
    assert_mentions(&err.to_string(), &["saving the checkpoint", "not-a-dir/ckpt.safetensors"]);
    // The writer is usable after a failure; dropping it waits for the save in flight.
    let good = dir.join("ckpt.safetensors");
    writer.start(&good, vec![tensor("b", &[1 << 20], 3.0)], BTreeMap::new()).unwrap();
    drop(writer);
    assert_eq!(load(&good).unwrap().0, vec![tensor("b", &[1 << 20], 3.0)]);
}

#[test]
fn temp_files_are_per_process() {
    let path = Path::new("/some/dir/ckpt.safetensors");
    let tmp = tmp_path(path);
    assert_eq!(tmp, Path::new(&format!("/some/dir/ckpt.safetensors.{}.tmp", std::process::id())));
}

#[test]
fn a_claim_is_exclusive_follows_symlinks_and_removes_stale_temp_files() {
    let dir = temp_dir("claim");
    let path = dir.join("ckpt.safetensors");
    // What killed runs leave: temp files of other processes (and the plain `.tmp` name); a
    // file of another name is not one of them.
    for stale in ["ckpt.safetensors.tmp", "ckpt.safetensors.999999.tmp"] {
        std::fs::write(dir.join(stale), b"half").unwrap();
    }
    std::fs::write(dir.join("ckpt.safetensors.notes.tmp"), b"mine").unwrap();
    let claim = Claim::acquire(&path).unwrap();
    let removed: Vec<_> = claim.removed_stale().iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(removed, ["ckpt.safetensors.999999.tmp", "ckpt.safetensors.tmp"]);
    assert_eq!(listing(&dir), ["ckpt.safetensors.lock", "ckpt.safetensors.notes.tmp"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("ckpt.safetensors.lock")).unwrap(),
        format!("process {} (ptxgrad train)", std::process::id())
    );
    // A second claim, by name or through a symlink (locks are per open file, so this process
    // stands in for another one), fails at once and names the holder.
    std::os::unix::fs::symlink(&path, dir.join("link")).unwrap();
    for p in [path.clone(), dir.join("link"), dir.join(".").join("ckpt.safetensors")] {
        let msg = err_msg(Claim::acquire(&p));
        assert_mentions(&msg, &["is in use", &format!("process {}", std::process::id()), "ckpt.safetensors.lock"]);
    }
    // Released when the claim (and every clone of it) is dropped; the lock file goes with it.
    let clone = claim.clone();
    drop(claim);
    assert!(Claim::acquire(&path).is_err(), "a clone still holds it");
    drop(clone);
    let again = Claim::acquire(&dir.join("link")).unwrap();
    assert_eq!(again.path(), std::fs::canonicalize(&*dir).unwrap().join("ckpt.safetensors"));
    drop(again);
    assert_eq!(listing(&dir), ["ckpt.safetensors.notes.tmp", "link"]);
}

#[test]
fn claims_refuse_directories_and_loops() {
    let dir = temp_dir("claim-refusals");
    assert_mentions(&err_msg(Claim::acquire(&dir)), &["expected a checkpoint file path, found a directory"]);
    assert_mentions(&err_msg(Claim::acquire(Path::new(""))), &["expected a file path, found an empty one"]);
    std::os::unix::fs::symlink(dir.join("b"), dir.join("a")).unwrap();
    std::os::unix::fs::symlink(dir.join("a"), dir.join("b")).unwrap();
    assert_mentions(&err_msg(Claim::acquire(&dir.join("a"))), &["too many levels of symbolic links"]);
}

#[test]
fn metadata_reads_the_header_alone() {
    let dir = temp_dir("metadata");
    let path = dir.join("m.safetensors");
    save(&path, &[tensor("a", &[3], 1.0)], &meta(&[("epoch", "4"), ("lr", "0.5")])).unwrap();
    assert_eq!(metadata(&path).unwrap(), meta(&[("epoch", "4"), ("lr", "0.5")]));
    std::fs::write(&path, [0xff; 16]).unwrap();
    assert_mentions(&err_msg(metadata(&path)), &["m.safetensors", "not a valid safetensors checkpoint"]);
}
