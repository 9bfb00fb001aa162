//! Datasets: the IDX file format and Fashion-MNIST on top of it (loading, checks, batching).
//! Everything here is host-side; batches are uploaded to the device by the training loop.

pub mod fashion_mnist;
pub mod idx;

pub use fashion_mnist::{
    epoch_batches, resolve_data_dir, sequential_batches, FashionMnist, Split, CLASS_NAMES, NUM_CLASSES,
};
pub use idx::{parse_images, parse_labels, read_images, read_labels, IdxImages};
