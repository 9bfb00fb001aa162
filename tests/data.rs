//! The IDX reader, the Fashion-MNIST loader and batching: good files, every kind of broken file
//! (each must give a clear error, never a panic), the real shipped dataset, and the batch orders.
mod common;
use common::{assert_mentions, err_msg, TempDir};

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use ptxgrad::data::fashion_mnist::{TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};
use ptxgrad::data::{
    epoch_batches, parse_images, parse_labels, read_images, read_labels, resolve_data_dir, sequential_batches,
    FashionMnist, Split, CLASS_NAMES,
};

// ---------------------------------------------------------------------------------------------
// Helpers: synthetic IDX files in a fresh temp dir per test.

fn temp_dir(test: &str) -> TempDir {
    TempDir::new(&format!("data-{test}"))
}

/// Raw (uncompressed) IDX images: magic 2051, dims (n, h, w), then pixel k = (k * 7 + seed) % 256.
fn idx_images(n: u32, h: u32, w: u32, seed: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    for v in [2051u32, n, h, w] {
        bytes.extend(v.to_be_bytes());
    }
    bytes.extend((0..(n * h * w) as usize).map(|k| (k * 7 + seed as usize) as u8));
    bytes
}

/// Raw (uncompressed) IDX labels: magic 2049, dim n, then the labels.
fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend(2049u32.to_be_bytes());
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend(labels);
    bytes
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(raw).unwrap();
    enc.finish().unwrap()
}

fn write_gz(path: &Path, raw: &[u8]) {
    std::fs::write(path, gzip(raw)).unwrap();
}

/// Labels 0..10 repeating.
fn cycle_labels(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 10) as u8).collect()
}

/// A complete small dataset: 12 train and 5 test images of 28x28.
fn write_dataset(dir: &Path) {
    write_gz(&dir.join(TRAIN_IMAGES), &idx_images(12, 28, 28, 1));
    write_gz(&dir.join(TRAIN_LABELS), &idx_labels(&cycle_labels(12)));
    write_gz(&dir.join(TEST_IMAGES), &idx_images(5, 28, 28, 2));
    write_gz(&dir.join(TEST_LABELS), &idx_labels(&cycle_labels(5)));
}

// ---------------------------------------------------------------------------------------------
// IDX parsing (bytes).

#[test]
fn parses_good_images_and_labels() {
    let imgs = parse_images(&idx_images(3, 2, 4, 5), "x").unwrap();
    assert_eq!((imgs.n, imgs.h, imgs.w), (3, 2, 4));
    assert_eq!(imgs.pixels, (0..24).map(|k| (k * 7 + 5) as u8).collect::<Vec<_>>());
    assert_eq!(parse_labels(&idx_labels(&[3, 1, 4]), "y").unwrap(), vec![3, 1, 4]);
    // Zero images is a valid (empty) file.
    assert_eq!(parse_images(&idx_images(0, 28, 28, 0), "x").unwrap().n, 0);
}

#[test]
fn wrong_magic_says_expected_and_found() {
    // A labels file given where images are expected, and vice versa.
    let msg = err_msg(parse_images(&idx_labels(&[1, 2]), "a.gz"));
    assert_mentions(&msg, &["a.gz", "wrong magic number", "expected 2051", "found 2049", "IDX labels"]);
    let msg = err_msg(parse_labels(&idx_images(1, 2, 2, 0), "b.gz"));
    assert_mentions(&msg, &["b.gz", "expected 2049", "found 2051"]);
    let mut junk = idx_images(1, 2, 2, 0);
    junk[2] = 0x09;
    assert_mentions(&err_msg(parse_images(&junk, "c.gz")), &["c.gz", "expected 2051", "found 2307"]);
}

#[test]
fn truncated_files_say_what_the_header_promised() {
    let full = idx_images(10, 28, 28, 0);
    let msg = err_msg(parse_images(&full[..16 + 1000], "imgs.gz"));
    assert_mentions(&msg, &["imgs.gz", "truncated", "10 images of 28x28 (7840 bytes)", "1000 bytes"]);
    // Cut inside the header, and inside the magic number.
    assert_mentions(&err_msg(parse_images(&full[..10], "imgs.gz")), &["truncated header", "16 bytes", "has 10"]);
    assert_mentions(&err_msg(parse_images(&full[..3], "imgs.gz")), &["truncated", "3 bytes"]);
    assert_mentions(&err_msg(parse_images(&[], "imgs.gz")), &["truncated", "0 bytes"]);

    let labels = idx_labels(&[1, 2, 3, 4]);
    assert_mentions(&err_msg(parse_labels(&labels[..10], "l.gz")), &["l.gz", "truncated", "4 labels", "has 2"]);
    assert_mentions(&err_msg(parse_labels(&labels[..6], "l.gz")), &["truncated header", "8 bytes"]);
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut imgs = idx_images(2, 3, 3, 0);
    imgs.extend([0, 0, 0]);
    assert_mentions(
        &err_msg(parse_images(&imgs, "i.gz")),
        &["i.gz", "trailing data", "18 bytes", "21 bytes of pixels", "3 bytes too many"],
    );
    let mut labels = idx_labels(&[1, 2]);
    labels.push(7);
    assert_mentions(
        &err_msg(parse_labels(&labels, "l.gz")),
        &["l.gz", "trailing data", "2 labels", "has 3 labels", "1 byte too many"],
    );
}

#[test]
fn absurd_header_sizes_do_not_panic_or_allocate() {
    // 2^32-1 images of 2^32-1 x 2^32-1: the size overflows 64 bits.
    let mut bytes = Vec::new();
    for v in [2051u32, u32::MAX, u32::MAX, u32::MAX] {
        bytes.extend(v.to_be_bytes());
    }
    assert_mentions(&err_msg(parse_images(&bytes, "big.gz")), &["big.gz", "overflows"]);
    // Through the gzip path too: the reservation is capped by the compressed size.
    let dir = temp_dir("absurd");
    let path = dir.join("big.gz");
    let mut bytes = Vec::new();
    for v in [2051u32, 60000, 60000, 60000] {
        bytes.extend(v.to_be_bytes());
    }
    write_gz(&path, &bytes);
    assert_mentions(&err_msg(read_images(&path)), &["truncated", "60000 images of 60000x60000"]);
}

// ---------------------------------------------------------------------------------------------
// IDX reading (gzip files).

#[test]
fn reads_gzip_files() {
    let dir = temp_dir("reads_gzip");
    write_gz(&dir.join("i.gz"), &idx_images(4, 5, 6, 9));
    write_gz(&dir.join("l.gz"), &idx_labels(&[9, 8, 7, 6]));
    let imgs = read_images(&dir.join("i.gz")).unwrap();
    assert_eq!(imgs, parse_images(&idx_images(4, 5, 6, 9), "").unwrap());
    assert_eq!(read_labels(&dir.join("l.gz")).unwrap(), vec![9, 8, 7, 6]);
}

#[test]
fn non_gzip_and_corrupt_gzip_files() {
    let dir = temp_dir("non_gzip");
    // An uncompressed IDX file where a .gz is expected.
    let raw = dir.join("raw.gz");
    std::fs::write(&raw, idx_images(1, 2, 2, 0)).unwrap();
    assert_mentions(&err_msg(read_images(&raw)), &["raw.gz", "not a gzip file", "1f 8b", "found 00 00"]);
    let empty = dir.join("empty.gz");
    std::fs::write(&empty, b"").unwrap();
    assert_mentions(&err_msg(read_labels(&empty)), &["empty.gz", "not a gzip file", "empty file"]);
    // A gzip file cut short (e.g. an interrupted download).
    let gz = gzip(&idx_images(50, 28, 28, 3));
    let cut = dir.join("cut.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    assert_mentions(&err_msg(read_images(&cut)), &["cut.gz", "corrupt or truncated gzip"]);
    // A flipped byte in the compressed stream: the deflate data or the CRC check catches it.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let flipped = dir.join("flipped.gz");
    std::fs::write(&flipped, &bad).unwrap();
    let msg = err_msg(read_images(&flipped));
    assert!(msg.contains("flipped.gz"), "{msg}");
}

#[test]
fn multi_member_gzip_files_are_read_whole() {
    // What `cat a.gz b.gz`, pigz and bgzip write: the members' contents, concatenated, are the
    // file. Cut inside the magic number, inside the dims, at the header's end and in the pixels.
    let dir = temp_dir("multi_member");
    let raw = idx_images(20, 28, 28, 4);
    for cut in [2, 10, 16, raw.len() / 2, raw.len() - 1] {
        let path = dir.join(&format!("two-{cut}.gz"));
        std::fs::write(&path, [gzip(&raw[..cut]), gzip(&raw[cut..])].concat()).unwrap();
        assert_eq!(read_images(&path).unwrap(), parse_images(&raw, "").unwrap(), "cut at {cut}");
    }
    // Three members, one of them empty (pigz can write those).
    let labels = idx_labels(&cycle_labels(30));
    let path = dir.join("three.gz");
    std::fs::write(&path, [gzip(&labels[..5]), gzip(&[]), gzip(&labels[5..])].concat()).unwrap();
    assert_eq!(read_labels(&path).unwrap(), cycle_labels(30));

    // The second member cut short: truncated, as for one member.
    let (first, second) = (gzip(&raw[..16]), gzip(&raw[16..]));
    let cut = dir.join("cut-second.gz");
    std::fs::write(&cut, [&first[..], &second[..second.len() / 2]].concat()).unwrap();
    assert_mentions(&err_msg(read_images(&cut)), &["cut-second.gz", "corrupt or truncated gzip"]);
    // Bytes after the last member that are no gzip member are an error, not ignored.
    let junk = dir.join("junk.gz");
    std::fs::write(&junk, [gzip(&raw), b"not gzip".to_vec()].concat()).unwrap();
    assert_mentions(&err_msg(read_images(&junk)), &["junk.gz", "corrupt or truncated gzip"]);
    // A whole IDX file in the first member and more pixels in a second: trailing data.
    let more = dir.join("more.gz");
    std::fs::write(&more, [gzip(&raw), gzip(&[1, 2, 3])].concat()).unwrap();
    assert_mentions(&err_msg(read_images(&more)), &["more.gz", "trailing data", "3 bytes too many"]);
}

#[test]
fn a_directory_where_a_file_should_be() {
    let dir = temp_dir("dir_for_file");
    let sub = dir.join("images.gz");
    std::fs::create_dir(&sub).unwrap();
    for msg in [err_msg(read_images(&sub)), err_msg(read_labels(&sub))] {
        assert_mentions(&msg, &[&sub.display().to_string(), "expected a gzip-compressed IDX file, found a directory"]);
    }
    for file in [TRAIN_IMAGES, TEST_LABELS] {
        let dir = temp_dir(&format!("dir_for_{file}"));
        write_dataset(&dir);
        std::fs::remove_file(dir.join(file)).unwrap();
        std::fs::create_dir(dir.join(file)).unwrap();
        let msg = err_msg(FashionMnist::load(&dir));
        assert_mentions(&msg, &[&dir.join(file).display().to_string(), "expected a file, found a directory"]);
        assert!(!msg.contains("not found"), "{msg}");
    }
}

#[test]
fn data_dir_that_is_missing_or_a_file() {
    let dir = temp_dir("bad_data_dir");
    let missing = dir.join("nowhere");
    let msg = err_msg(FashionMnist::load(&missing));
    assert_mentions(&msg, &[&missing.display().to_string(), "data directory not found", "--data-dir", "PTXGRAD_DATA"]);
    let file = dir.join(TRAIN_IMAGES);
    write_gz(&file, &idx_images(1, 28, 28, 0));
    let msg = err_msg(FashionMnist::load(&file));
    assert_mentions(&msg, &[&file.display().to_string(), "expected the data directory, found a file", "--data-dir"]);
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = temp_dir("missing_idx");
    let msg = err_msg(read_labels(&dir.join("nope.gz")));
    assert_mentions(&msg, &["nope.gz"]);
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST loading (synthetic data set).

#[test]
fn loads_a_small_dataset() {
    let dir = temp_dir("small_dataset");
    write_dataset(&dir);
    let ds = FashionMnist::load(&dir).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (12, 5));
    assert_eq!((ds.train.images.h, ds.train.images.w), (28, 28));
    assert_eq!(ds.train.labels, cycle_labels(12));
    assert_eq!(ds.test.images.pixels, idx_images(5, 28, 28, 2)[16..].to_vec());
}

#[test]
fn missing_file_names_it_and_hints_at_the_flag_and_env() {
    for file in [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS] {
        let dir = temp_dir(&format!("missing_{file}"));
        write_dataset(&dir);
        std::fs::remove_file(dir.join(file)).unwrap();
        let msg = err_msg(FashionMnist::load(&dir));
        assert_mentions(&msg, &[&dir.join(file).display().to_string(), "not found", "--data-dir", "PTXGRAD_DATA"]);
    }
}

#[test]
fn image_label_count_mismatch() {
    let dir = temp_dir("count_mismatch");
    write_dataset(&dir);
    write_gz(&dir.join(TRAIN_LABELS), &idx_labels(&cycle_labels(11)));
    let msg = err_msg(FashionMnist::load(&dir));
    assert_mentions(&msg, &[TRAIN_IMAGES, "12 images but", TRAIN_LABELS, "has 11 labels"]);
}

#[test]
fn label_out_of_range_names_the_index() {
    let dir = temp_dir("bad_label");
    write_dataset(&dir);
    let mut labels = cycle_labels(5);
    labels[3] = 10;
    write_gz(&dir.join(TEST_LABELS), &idx_labels(&labels));
    let msg = err_msg(FashionMnist::load(&dir));
    assert_mentions(&msg, &[TEST_LABELS, "index 3", "is 10", "0..=9"]);
}

#[test]
fn broken_file_inside_the_dataset_names_it() {
    let dir = temp_dir("broken_in_dataset");
    write_dataset(&dir);
    // Train images truncated to 1000 pixel bytes.
    let raw = idx_images(12, 28, 28, 1);
    write_gz(&dir.join(TRAIN_IMAGES), &raw[..16 + 1000]);
    let msg = err_msg(FashionMnist::load(&dir));
    assert_mentions(&msg, &[TRAIN_IMAGES, "truncated", "12 images of 28x28 (9408 bytes)", "1000 bytes"]);
    // Test images swapped for a labels file.
    write_dataset(&dir);
    write_gz(&dir.join(TEST_IMAGES), &idx_labels(&cycle_labels(5)));
    assert_mentions(&err_msg(FashionMnist::load(&dir)), &[TEST_IMAGES, "expected 2051", "found 2049"]);
}

#[test]
fn train_and_test_image_sizes_must_agree() {
    let dir = temp_dir("size_mismatch");
    write_dataset(&dir);
    write_gz(&dir.join(TEST_IMAGES), &idx_images(5, 32, 32, 2));
    assert_mentions(&err_msg(FashionMnist::load(&dir)), &[TEST_IMAGES, "32x32", "expected 28x28"]);
}

#[test]
fn split_truncate_and_gather() {
    let images = parse_images(&idx_images(6, 2, 3, 0), "i").unwrap();
    let mut split = Split::new(images.clone(), vec![0, 1, 2, 3, 4, 5], "i", "l").unwrap();
    // Gather keeps the order of the indices, duplicates allowed.
    let (pixels, labels) = split.gather(&[4, 1, 4]);
    assert_eq!(labels, vec![4, 1, 4]);
    let img = |i: usize| images.pixels[i * 6..(i + 1) * 6].to_vec();
    assert_eq!(pixels, [img(4), img(1), img(4)].concat());
    assert_eq!(split.gather(&[]), (vec![], vec![]));

    split.truncate(4);
    assert_eq!((split.len(), split.images.n, split.images.pixels.len()), (4, 4, 24));
    assert_eq!(split.labels, vec![0, 1, 2, 3]);
    split.truncate(100); // larger than the split: no-op
    assert_eq!(split.len(), 4);
    split.truncate(0);
    assert!(split.is_empty());
}

#[test]
fn data_dir_resolution_order() {
    // The only test that touches PTXGRAD_DATA (tests run in parallel threads of one process).
    let flag = Path::new("/some/flag/dir");
    std::env::set_var("PTXGRAD_DATA", "/from/env");
    assert_eq!(resolve_data_dir(Some(flag)), flag);
    assert_eq!(resolve_data_dir(None), Path::new("/from/env"));
    std::env::remove_var("PTXGRAD_DATA");
    // Tests run from the crate root, where ./data/fashion-mnist exists.
    assert_eq!(resolve_data_dir(None), Path::new("data/fashion-mnist"));
}

// ---------------------------------------------------------------------------------------------
// The real shipped data.

#[test]
fn real_fashion_mnist_loads() {
    // Relative to the working directory: the crate root under `cargo test`, the repository
    // root under .gpu/run.sh (no absolute build paths baked in).
    let dir = Path::new("data/fashion-mnist");
    let t0 = std::time::Instant::now();
    let ds = FashionMnist::load(dir).unwrap();
    eprintln!("loaded Fashion-MNIST in {:.2?}", t0.elapsed());
    assert_eq!((ds.train.len(), ds.test.len()), (60000, 10000));
    for split in [&ds.train, &ds.test] {
        assert_eq!((split.images.h, split.images.w), (28, 28));
        assert_eq!(split.images.pixels.len(), split.len() * 784);
    }
    assert_eq!(CLASS_NAMES[ds.train.labels[0] as usize], "ankle boot");
    assert_eq!(ds.train.labels[0], 9);
    // Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    for (split, per_class) in [(&ds.train, 6000), (&ds.test, 1000)] {
        let mut counts = [0usize; 10];
        for &l in &split.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
    }
    // Real images: not blank, full 8-bit range used.
    let first = &ds.train.images.pixels[..784];
    assert!(first.iter().any(|&p| p > 200) && first.iter().filter(|&&p| p == 0).count() > 100);
}

// ---------------------------------------------------------------------------------------------
// Batching.

#[test]
fn epoch_batches_cover_every_index_once_and_keep_the_last_partial_batch() {
    for (n, batch) in [(1000, 128), (1024, 128), (5, 128), (1, 1), (7, 3), (0, 4)] {
        let batches = epoch_batches(n, batch, 42, 0);
        assert_eq!(batches.len(), n.div_ceil(batch), "n={n} batch={batch}");
        for (i, b) in batches.iter().enumerate() {
            let expected = if i + 1 < batches.len() { batch } else { n - batch * i };
            assert_eq!(b.len(), expected, "batch {i} of n={n} batch={batch}");
        }
        let mut all: Vec<usize> = batches.concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "n={n} batch={batch}: not a permutation");
    }
    assert_eq!(epoch_batches(1000, 128, 0, 0).last().unwrap().len(), 1000 - 7 * 128);
}

#[test]
fn epoch_batches_are_deterministic_and_reshuffled() {
    let n = 1000;
    assert_eq!(epoch_batches(n, 128, 7, 3), epoch_batches(n, 128, 7, 3));
    // Different epochs, and different seeds, give different orders (and the order is not identity).
    let orders: Vec<Vec<usize>> = [(7, 0), (7, 1), (7, 2), (8, 0), (0, 0)]
        .iter()
        .map(|&(seed, epoch)| epoch_batches(n, 128, seed, epoch).concat())
        .collect();
    let distinct: HashSet<_> = orders.iter().collect();
    assert_eq!(distinct.len(), orders.len(), "some (seed, epoch) pairs gave the same order");
    assert!(orders.iter().all(|o| *o != (0..n).collect::<Vec<_>>()));
    // The batch size only cuts the permutation: same order for another batch size.
    assert_eq!(epoch_batches(n, 100, 7, 1).concat(), orders[1]);
}

#[test]
fn sequential_batches_in_order() {
    assert_eq!(sequential_batches(7, 3), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert_eq!(sequential_batches(6, 3), vec![vec![0, 1, 2], vec![3, 4, 5]]);
    assert_eq!(sequential_batches(2, 128), vec![vec![0, 1]]);
    assert!(sequential_batches(0, 128).is_empty());
    assert_eq!(sequential_batches(10000, 128).concat(), (0..10000).collect::<Vec<_>>());
}
