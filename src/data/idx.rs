//! The IDX file format (LeCun's MNIST format, also used by Fashion-MNIST), gzip-compressed.
//!
//! An IDX file is a big-endian u32 magic number, one big-endian u32 per dimension, then the data:
//!
//! ```text
//! magic = 0x00 0x00 <type> <ndims>      type 0x08 = unsigned byte
//! 2051 = 0x00000803: u8, 3 dims (N, H, W)   -> images
//! 2049 = 0x00000801: u8, 1 dim  (N)         -> labels
//! ```
//!
//! Everything in the file is checked against its header: a file shorter than the header says is
//! truncated, and a longer one is not what the header says either (both are errors). Nothing in
//! a file's contents can make these functions panic.
//!
//! A gzip file may hold several members one after the other (what `cat a.gz b.gz`, pigz and
//! bgzip write); their contents, concatenated, are the file's contents.

use std::fs;
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::error::{Error, Result};

/// Magic number of an IDX file of u8 with 3 dimensions (images: N, H, W).
pub const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX file of u8 with 1 dimension (labels: N).
pub const LABELS_MAGIC: u32 = 2049;

/// Bytes before the pixels of an images file: magic + 3 dims.
const IMAGES_HEADER: usize = 16;
/// Bytes before the labels of a labels file: magic + 1 dim.
const LABELS_HEADER: usize = 8;

/// The most a deflate stream can expand (about 1032:1): caps how much we reserve up front, so a
/// lying header cannot make us allocate more than the compressed file could possibly hold.
const MAX_DEFLATE_RATIO: usize = 1032;

/// A stack of `n` grayscale images of `h` x `w` pixels, row-major: pixel (i, y, x) is at
/// `pixels[(i * h + y) * w + x]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Pixels in one image (`h * w`).
    pub fn image_len(&self) -> usize {
        self.h * self.w
    }
}

/// Reads a gzip-compressed IDX images file (magic 2051).
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let name = path.display().to_string();
    let mut bytes = decompress(path)?;
    let (n, h, w) = images_header(&bytes, &name)?;
    // Drop the header in place (a memmove) rather than copying the 47 MB of pixels.
    bytes.drain(..IMAGES_HEADER);
    Ok(IdxImages { n, h, w, pixels: bytes })
}

/// Reads a gzip-compressed IDX labels file (magic 2049). Values are not range-checked here: the
/// number of classes belongs to the dataset, not to the file format.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    let mut bytes = decompress(path)?;
    labels_header(&bytes, &name)?;
    bytes.drain(..LABELS_HEADER);
    Ok(bytes)
}

/// Parses an (already decompressed) IDX images file; `name` is used in error messages.
pub fn parse_images(bytes: &[u8], name: &str) -> Result<IdxImages> {
    let (n, h, w) = images_header(bytes, name)?;
    Ok(IdxImages { n, h, w, pixels: bytes[IMAGES_HEADER..].to_vec() })
}

/// Parses an (already decompressed) IDX labels file; `name` is used in error messages.
pub fn parse_labels(bytes: &[u8], name: &str) -> Result<Vec<u8>> {
    labels_header(bytes, name)?;
    Ok(bytes[LABELS_HEADER..].to_vec())
}

/// Checks an images file against its header; returns (n, h, w). On success the file is exactly
/// `16 + n*h*w` bytes long.
fn images_header(bytes: &[u8], name: &str) -> Result<(usize, usize, usize)> {
    check_magic(bytes, name, IMAGES_MAGIC)?;
    if bytes.len() < IMAGES_HEADER {
        return Err(Error::Dataset(format!(
            "{name}: truncated header: expected {IMAGES_HEADER} bytes (magic + 3 dims) for IDX images, file has {}",
            bytes.len()
        )));
    }
    let (n, h, w) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12));
    let expected = n.checked_mul(h).and_then(|x| x.checked_mul(w)).ok_or_else(|| {
        Error::Dataset(format!("{name}: header says {n} images of {h}x{w}, which overflows the address space"))
    })?;
    let found = bytes.len() - IMAGES_HEADER;
    check_len(name, found, expected, || format!("{n} images of {h}x{w} ({expected} bytes)"), "bytes of pixels")?;
    Ok((n, h, w))
}

/// Checks a labels file against its header; returns n. On success the file is `8 + n` bytes.
fn labels_header(bytes: &[u8], name: &str) -> Result<usize> {
    check_magic(bytes, name, LABELS_MAGIC)?;
    if bytes.len() < LABELS_HEADER {
        return Err(Error::Dataset(format!(
            "{name}: truncated header: expected {LABELS_HEADER} bytes (magic + 1 dim) for IDX labels, file has {}",
            bytes.len()
        )));
    }
    let n = be_u32(bytes, 4);
    let found = bytes.len() - LABELS_HEADER;
    check_len(name, found, n, || format!("{n} labels"), "labels")?;
    Ok(n)
}

fn check_magic(bytes: &[u8], name: &str, expected: u32) -> Result<()> {
    if bytes.len() < 4 {
        return Err(Error::Dataset(format!(
            "{name}: truncated: expected at least a 4-byte IDX magic number, file has {} bytes",
            bytes.len()
        )));
    }
    let found = be_u32(bytes, 0) as u32;
    if found != expected {
        return Err(Error::Dataset(format!(
            "{name}: wrong magic number: expected {expected} ({}), found {found}{}",
            describe_magic(expected),
            match found {
                IMAGES_MAGIC | LABELS_MAGIC => format!(" ({})", describe_magic(found)),
                _ => String::new(),
            }
        )));
    }
    Ok(())
}

fn describe_magic(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => "IDX images",
        LABELS_MAGIC => "IDX labels",
        _ => "unknown",
    }
}

/// The payload after the header must be exactly what the header declares: shorter is a truncated
/// file, longer means the file is not what its header says.
fn check_len(name: &str, found: usize, expected: usize, declared: impl Fn() -> String, unit: &str) -> Result<()> {
    if found < expected {
        return Err(Error::Dataset(format!("{name}: truncated: header says {}, file has {found} {unit}", declared())));
    }
    if found > expected {
        let extra = found - expected;
        return Err(Error::Dataset(format!(
            "{name}: trailing data: header says {}, file has {found} {unit} ({extra} byte{} too many)",
            declared(),
            if extra == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

/// Big-endian u32 at `at` (the caller has checked the length).
fn be_u32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
}

/// Reads and gunzips a whole file. The output Vec is sized from the IDX header (decoded first),
/// so the 47 MB train images are decompressed straight into one allocation.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    // Reading a directory fails with a bare "Is a directory" (or not at all on some systems):
    // say what was expected instead.
    if path.is_dir() {
        return Err(Error::Dataset(format!("{name}: expected a gzip-compressed IDX file, found a directory")));
    }
    let compressed = fs::read(path).map_err(|reason| Error::Io { path: name.clone(), reason })?;
    if compressed.len() < 2 || compressed[..2] != [0x1f, 0x8b] {
        return Err(Error::Dataset(format!(
            "{name}: not a gzip file: expected the gzip magic bytes 1f 8b, found {}",
            match compressed.len() {
                0 => "an empty file".to_string(),
                1 => format!("{:02x} (1 byte)", compressed[0]),
                _ => format!("{:02x} {:02x}", compressed[0], compressed[1]),
            }
        )));
    }
    let corrupt = |e: std::io::Error| Error::Dataset(format!("{name}: corrupt or truncated gzip data: {e}"));

    // Every member, not only the first: a file written by pigz, bgzip or `cat a.gz b.gz` would
    // otherwise look truncated. Bytes after the last member that do not start a member are an
    // error, not silently ignored.
    let mut decoder = MultiGzDecoder::new(&compressed[..]);
    let mut out = Vec::new();
    // Magic first: its last byte is the number of dims; then the dims give the payload size.
    (&mut decoder).take(4).read_to_end(&mut out).map_err(corrupt)?;
    if out.len() == 4 {
        let ndims = out[3] as usize;
        (&mut decoder).take(4 * ndims as u64).read_to_end(&mut out).map_err(corrupt)?;
        if out.len() == 4 + 4 * ndims {
            let payload = (0..ndims).try_fold(1usize, |acc, d| acc.checked_mul(be_u32(&out, 4 + 4 * d)));
            let cap = compressed.len().saturating_mul(MAX_DEFLATE_RATIO);
            // +1: the read that finds the end of the stream must not have to grow the Vec.
            out.reserve(payload.unwrap_or(cap).min(cap).saturating_add(1));
        }
    }
    decoder.read_to_end(&mut out).map_err(corrupt)?;
    Ok(out)
}
