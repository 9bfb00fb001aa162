//! Checkpoints as safetensors files: f32 tensors (little-endian, row-major) plus string metadata
//! (epoch, seed, step, format version...) in the header's `__metadata__`. PyTorch reads them with
//! `safetensors.torch.load_file(path)`.
//!
//! Saving is atomic: the file is written to `<path>.tmp` in the same directory, fsynced, then
//! renamed over `path`. A crash mid-save leaves the previous checkpoint intact (and at worst a
//! stale `.tmp`, which the next save overwrites).
//!
//! Training saves through a [`Writer`]: the tensors are copied to the host at once, and the
//! serialising, writing and fsyncing (hundreds of milliseconds for AlexNet's 187 MB) run on a
//! thread while the next epoch trains.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

/// One named f32 tensor (a parameter or an optimiser buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` and `metadata` to `path` atomically (see the module docs), creating the
/// parent directory. Names must be unique and each tensor's data must fill its shape.
pub fn save(path: &Path, tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let name = path.display().to_string();
    let mut seen = HashSet::new();
    let mut bytes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::Data(format!("{name}: tensor `{}` appears twice: names must be unique", t.name)));
        }
        let elems = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elems != Some(t.data.len()) {
            return Err(Error::Data(format!(
                "{name}: tensor `{}`: shape {:?} needs {} values, found {}",
                t.name,
                t.shape,
                elems.map_or("too many".to_string(), |e| e.to_string()),
                t.data.len()
            )));
        }
        bytes.push(t.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map_err(|e| Error::Data(format!("{name}: tensor `{}`: {e}", t.name)))?;
            Ok((t.name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let file = safetensors::tensor::serialize(views, meta)
        .map_err(|e| Error::Data(format!("{name}: cannot serialise checkpoint: {e}")))?;
    write_atomic(path, &file)
}

/// Reads a checkpoint written by [`save`] (or any safetensors file of f32 tensors). Tensors come
/// back in file order (for an all-f32 file: sorted by name).
pub fn load(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let name = path.display().to_string();
    let bytes = fs::read(path).map_err(io_error(path))?;
    let invalid = |e: safetensors::SafeTensorError| {
        Error::Data(format!("{name}: not a valid safetensors checkpoint ({} bytes): {e}", bytes.len()))
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let file = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let mut tensors = Vec::with_capacity(file.len());
    for key in header.offset_keys() {
        let view = file.tensor(&key).map_err(invalid)?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::Data(format!("{name}: tensor `{key}` has dtype {:?}: expected F32", view.dtype())));
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.push(NamedTensor { name: key, shape: view.shape().to_vec(), data });
    }
    let metadata = header.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok((tensors, metadata))
}

/// Saves checkpoints on a background thread, one at a time: [`Writer::start`] waits for the save
/// in flight (if any) before it starts the next, so saves land in order and at most one copy of
/// the tensors waits in memory. Nothing is lost on failure: a failed save is reported by the next
/// `start`, `poll` or `finish`, and dropping the writer still waits for the save in flight (a
/// failure then can only be printed), so the file is whole when training stops on an error.
#[derive(Default)]
pub struct Writer {
    pending: Option<(PathBuf, JoinHandle<Result<()>>)>,
}

impl Writer {
    /// Waits for the save in flight, then saves `tensors` to `path` on a new thread.
    pub fn start(&mut self, path: &Path, tensors: Vec<NamedTensor>, metadata: BTreeMap<String, String>) -> Result<()> {
        self.finish()?;
        let owned = path.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || save(&owned, &tensors, &metadata))
            .map_err(|reason| Error::Io { path: format!("{} (starting its writer thread)", path.display()), reason })?;
        self.pending = Some((path.to_path_buf(), handle));
        Ok(())
    }

    /// The outcome of the save in flight if it has ended (its error, if it failed); Ok while it
    /// runs or when there is none. Never waits.
    pub fn poll(&mut self) -> Result<()> {
        match &self.pending {
            Some((_, handle)) if handle.is_finished() => self.finish(),
            _ => Ok(()),
        }
    }

    /// Waits for the save in flight, if any: Ok once it is on disk. A failure names the
    /// checkpoint, since it surfaces away from the code that asked for the save.
    pub fn finish(&mut self) -> Result<()> {
        let Some((path, handle)) = self.pending.take() else { return Ok(()) };
        let failed = |why: String| Error::Data(format!("saving the checkpoint {}: {why}", path.display()));
        match handle.join() {
            Ok(saved) => saved.map_err(|e| failed(e.to_string())),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(failed(format!("the writer thread panicked: {why}")))
            }
        }
    }

    /// Whether a save has been started and not yet waited for.
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("error: {e}");
        }
    }
}

/// Checks, before any work is done for it, that a checkpoint can be written at `path`: creates
/// its directory and `<path>.tmp` (removed again). A path in a missing mount or a read-only
/// directory then fails at once instead of after the first epoch. An existing checkpoint at
/// `path` is not touched.
pub fn probe_writable(path: &Path) -> Result<()> {
    create_parent(path)?;
    let tmp = tmp_path(path);
    fs::File::create(&tmp).map_err(io_error(&tmp))?;
    fs::remove_file(&tmp).map_err(io_error(&tmp))
}

/// Error::Io for `path`, as a map_err argument.
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |reason| Error::Io { path, reason }
}

/// Creates `path`'s directory if missing (saying so when a file stands where a directory should);
/// returns it (None for a bare file name: the working directory).
fn create_parent(path: &Path) -> Result<Option<&Path>> {
    let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(None) };
    if let Some(file) = dir.ancestors().find(|a| a.exists()).filter(|a| !a.is_dir()) {
        return Err(Error::Data(format!("{}: expected a directory, found a file", file.display())));
    }
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    Ok(Some(dir))
}

/// `<path>.tmp`: same directory, so the final rename never crosses filesystems.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Write to `<path>.tmp`, fsync, rename over `path`, then fsync the directory so the rename
/// itself is durable.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let parent = create_parent(path)?;
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written.map_err(io_error(&tmp)) {
        let _ = fs::remove_file(&tmp); // best effort: the error above is the one to report
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path)(e));
    }
    // Directory fsync makes the rename survive a power cut; only Unix can open a directory for it.
    #[cfg(unix)]
    {
        let dir = parent.unwrap_or(Path::new("."));
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    }
    Ok(())
}
