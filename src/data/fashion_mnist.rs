//! Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 training and 10,000 test images of 28x28
//! grayscale clothing, 10 classes, in the four standard IDX .gz files. Plus the batching used by
//! training (shuffled per epoch) and evaluation (in order).

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::idx::{self, IdxImages};
use crate::error::{Error, Result};

/// Class names, indexed by label.
pub const CLASS_NAMES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

/// Number of classes: every label is < this.
pub const NUM_CLASSES: usize = CLASS_NAMES.len();

pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

/// Environment variable naming the data directory (when no `--data-dir` flag is given).
pub const DATA_ENV: &str = "PTXGRAD_DATA";

/// One split (train or test): images and their labels, same count, labels < 10.
#[derive(Clone, Debug)]
pub struct Split {
    pub images: IdxImages,
    pub labels: Vec<u8>,
}

impl Split {
    /// Pairs images with labels, checking that the counts match and every label is a class.
    /// `images_name` and `labels_name` (usually the file paths) are used in error messages.
    pub fn new(images: IdxImages, labels: Vec<u8>, images_name: &str, labels_name: &str) -> Result<Self> {
        if images.n != labels.len() {
            return Err(Error::Dataset(format!(
                "{images_name}: {} images but {labels_name} has {} labels",
                images.n,
                labels.len()
            )));
        }
        if let Some((i, &label)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= NUM_CLASSES) {
            return Err(Error::Dataset(format!(
                "{labels_name}: label at index {i} is {label}: expected 0..={} ({NUM_CLASSES} classes)",
                NUM_CLASSES - 1
            )));
        }
        Ok(Split { images, labels })
    }

    /// Reads and checks one split from its two files.
    pub fn from_files(images_path: &Path, labels_path: &Path) -> Result<Self> {
        let images = idx::read_images(images_path)?;
        let labels = idx::read_labels(labels_path)?;
        Split::new(images, labels, &images_path.display().to_string(), &labels_path.display().to_string())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keeps only the first `n` examples (a cap for quick runs); a no-op when `n >= len()`.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.images.n = n;
        self.images.pixels.truncate(n * self.images.image_len());
        self.labels.truncate(n);
    }

    /// Gathers the examples at `indices` into (pixels u8 (B*H*W), labels u32 (B)) — the host side
    /// of a batch, in the order of `indices`.
    ///
    /// # Panics
    /// If an index is `>= len()`: indices come from [`epoch_batches`] / [`sequential_batches`]
    /// over `0..len()`, so an out-of-range one is a bug in the caller, not bad data.
    pub fn gather(&self, indices: &[usize]) -> (Vec<u8>, Vec<u32>) {
        let hw = self.images.image_len();
        let mut pixels = Vec::with_capacity(indices.len() * hw);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            assert!(i < self.len(), "Split::gather: index {i} out of range for a split of {} examples", self.len());
            pixels.extend_from_slice(&self.images.pixels[i * hw..(i + 1) * hw]);
            labels.push(self.labels[i] as u32);
        }
        (pixels, labels)
    }
}

/// The whole dataset.
#[derive(Clone, Debug)]
pub struct FashionMnist {
    pub train: Split,
    pub test: Split,
}

impl FashionMnist {
    /// Loads the four standard files from `dir`. Train and test must have the same image size.
    pub fn load(dir: &Path) -> Result<Self> {
        // Say up front which file is missing or is not a file, and how to point at the right
        // folder, rather than surfacing a bare "No such file or directory".
        let expects = format!(
            "Fashion-MNIST expects {TRAIN_IMAGES}, {TRAIN_LABELS}, {TEST_IMAGES} and {TEST_LABELS} in {}; pass \
             --data-dir DIR or set {DATA_ENV}=DIR to the folder that holds them",
            dir.display()
        );
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::Dataset(format!(
                    "{}: expected the data directory, found a file; {expects}",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Dataset(format!("{}: data directory not found; {expects}", dir.display())))
            }
            // Anything else (e.g. no permission to look inside) shows up on the files below.
            _ => {}
        }
        for file in [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS] {
            let path = dir.join(file);
            // metadata follows symlinks: a link to a file is a file, a dangling link is missing.
            let problem = match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => continue,
                Ok(meta) if meta.is_dir() => "expected a file, found a directory".to_string(),
                Ok(_) => "expected a regular file, found something else (a device, socket or pipe)".to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "file not found".to_string(),
                Err(e) => format!("cannot be read ({e})"),
            };
            return Err(Error::Dataset(format!("{}: {problem}; {expects}", path.display())));
        }
        let train = Split::from_files(&dir.join(TRAIN_IMAGES), &dir.join(TRAIN_LABELS))?;
        let test = Split::from_files(&dir.join(TEST_IMAGES), &dir.join(TEST_LABELS))?;
        let (tr, te) = (&train.images, &test.images);
        if (tr.h, tr.w) != (te.h, te.w) {
            return Err(Error::Dataset(format!(
                "{}: test images are {}x{}, expected {}x{} like the training images in {TRAIN_IMAGES}",
                dir.join(TEST_IMAGES).display(),
                te.h,
                te.w,
                tr.h,
                tr.w
            )));
        }
        Ok(FashionMnist { train, test })
    }
}

/// Where the data lives: explicit flag, else `$PTXGRAD_DATA`, else `./data/fashion-mnist` if it
/// exists, else the crate's own `data/fashion-mnist` (the checkout this binary was built from —
/// only a last fallback, as the binary may have moved since).
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os(DATA_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("data/fashion-mnist");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist"))
}

/// Per-epoch shuffled batches: a permutation of `0..n`, seeded by (`seed`, `epoch`), cut into
/// batches of `batch` indices; the last partial batch is kept. The same (seed, epoch) always gives
/// the same batches (with this build's `rand`); different epochs give different orders.
///
/// # Panics
/// If `batch == 0` (the CLI validates the batch size before training starts).
pub fn epoch_batches(n: usize, batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    assert!(batch > 0, "epoch_batches: batch size must be at least 1");
    // Spread the epoch over all 64 bits (golden-ratio multiplier) before mixing it into the seed,
    // so (seed, epoch) and (seed ^ 1, epoch ^ 1) etc. do not collide in an obvious way.
    let mixed = seed ^ (epoch as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = StdRng::seed_from_u64(mixed);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    perm.chunks(batch).map(<[usize]>::to_vec).collect()
}

/// Sequential batches `0..n` in order (evaluation); the last partial batch is kept.
///
/// # Panics
/// If `batch == 0`.
pub fn sequential_batches(n: usize, batch: usize) -> Vec<Vec<usize>> {
    assert!(batch > 0, "sequential_batches: batch size must be at least 1");
    (0..n).step_by(batch).map(|start| (start..(start + batch).min(n)).collect()).collect()
}
