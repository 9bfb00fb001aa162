//! Checkpoints as safetensors files: f32 tensors (little-endian, row-major; batch norm's
//! `num_batches_tracked` as int64, PyTorch's dtype for it) plus string metadata
//! (epoch, seed, step, format version...) in the header's `__metadata__`. PyTorch reads them with
//! `safetensors.torch.load_file(path)`.
//!
//! Saving is atomic: the file is written to `<path>.<pid>.tmp` in the same directory (a name no
//! other process uses), fsynced, then renamed over `path`. A crash mid-save leaves the previous
//! checkpoint intact, and at worst a stale temp file, which the next run on that path removes.
//!
//! One writer per checkpoint: a run holds a [`Claim`] on its path for as long as it may write
//! there, an advisory lock on `<path>.lock` that the OS releases when the process ends, however
//! it ends. A second run on the same file (under any name: symlinks are followed) fails at once,
//! naming the process that holds it.
//!
//! Training saves through a [`Writer`]: the tensors are copied to the host at once, and the
//! serialising, writing and fsyncing (hundreds of milliseconds for AlexNet's 187 MB) run on a
//! thread while the next epoch trains.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read as _, Seek as _, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

/// A tensor's values, row-major, in the dtype the file holds them in.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// Parameters and running statistics.
    F32(Vec<f32>),
    /// Counts (batch norm's `num_batches_tracked`).
    I64(Vec<i64>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype as safetensors names it.
    fn dtype(&self) -> Dtype {
        match self {
            Values::F32(_) => Dtype::F32,
            Values::I64(_) => Dtype::I64,
        }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One named tensor (a parameter, a running statistic or a count).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Values,
}

impl NamedTensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape: shape.to_vec(), data: Values::F32(data) }
    }
}

/// Writes `tensors` and `metadata` to `path` atomically (see the module docs), creating the
/// parent directory. Names must be unique and each tensor's data must fill its shape.
pub fn save(path: &Path, tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let name = path.display().to_string();
    let mut seen = HashSet::new();
    let mut bytes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::Checkpoint(format!("{name}: tensor `{}` appears twice: names must be unique", t.name)));
        }
        let elems = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elems != Some(t.data.len()) {
            return Err(Error::Checkpoint(format!(
                "{name}: tensor `{}`: shape {:?} needs {} values, found {}",
                t.name,
                t.shape,
                elems.map_or("too many".to_string(), |e| e.to_string()),
                t.data.len()
            )));
        }
        bytes.push(t.data.to_le_bytes());
    }
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let view = TensorView::new(t.data.dtype(), t.shape.clone(), b)
                .map_err(|e| Error::Checkpoint(format!("{name}: tensor `{}`: {e}", t.name)))?;
            Ok((t.name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let file = safetensors::tensor::serialize(views, meta)
        .map_err(|e| Error::Checkpoint(format!("{name}: cannot serialise checkpoint: {e}")))?;
    write_atomic(path, &file)
}

/// Reads a checkpoint written by [`save`] (or any safetensors file of f32 and int64 tensors).
/// Tensors come back in file order.
pub fn load(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let name = path.display().to_string();
    let bytes = fs::read(path).map_err(io_error(path))?;
    let invalid = |e: safetensors::SafeTensorError| {
        Error::Checkpoint(format!("{name}: not a valid safetensors checkpoint ({} bytes): {e}", bytes.len()))
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let file = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let mut tensors = Vec::with_capacity(file.len());
    for key in header.offset_keys() {
        let view = file.tensor(&key).map_err(invalid)?;
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => {
                Values::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::I64 => Values::I64(
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunks"))).collect(),
            ),
            other => {
                return Err(Error::Checkpoint(format!(
                    "{name}: tensor `{key}` has dtype {other:?}: expected F32 (or I64 for a count)"
                )))
            }
        };
        tensors.push(NamedTensor { name: key, shape: view.shape().to_vec(), data });
    }
    let metadata = header.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok((tensors, metadata))
}

/// A checkpoint's metadata alone, read from its header (not the tensors).
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let name = path.display();
    let mut file = fs::File::open(path).map_err(io_error(path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io_error(path))?;
    let len = u64::from_le_bytes(len);
    // safetensors caps its header at 100 MB.
    if len > 100_000_000 {
        return Err(Error::Checkpoint(format!("{name}: not a valid safetensors checkpoint (a {len}-byte header)")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io_error(path))?;
    let invalid = |why: String| Error::Checkpoint(format!("{name}: not a valid safetensors checkpoint: {why}"));
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    let Some(meta) = json.get("__metadata__") else { return Ok(BTreeMap::new()) };
    let meta = meta.as_object().ok_or_else(|| invalid("`__metadata__` is not an object".into()))?;
    meta.iter()
        .map(|(k, v)| match v.as_str() {
            Some(v) => Ok((k.clone(), v.to_string())),
            None => Err(invalid(format!("metadata `{k}` is not a string"))),
        })
        .collect()
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
        let failed = |why: String| Error::Checkpoint(format!("saving the checkpoint {}: {why}", path.display()));
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
        return Err(Error::Checkpoint(format!("{}: expected a directory, found a file", file.display())));
    }
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    Ok(Some(dir))
}

/// `path` with `suffix` appended to its file name: same directory, so the final rename never
/// crosses filesystems.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// This process's temp file for `path`: `<path>.<pid>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    with_suffix(path, &format!(".{}.tmp", std::process::id()))
}

/// Whether `name` is a temp file of checkpoint `file` (`<file>.<digits>.tmp`, or a plain
/// `<file>.tmp`), and of which process.
fn temp_of(name: &str, file: &str) -> Option<Option<u32>> {
    let rest = name.strip_prefix(file)?.strip_prefix('.')?.strip_suffix("tmp")?;
    if rest.is_empty() {
        return Some(None);
    }
    let pid = rest.strip_suffix('.')?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().ok())
}

/// The file a checkpoint path names, with symlinks followed (so that a linked checkpoint is
/// written where the link points, never replaced by a file) and the directory made absolute (so
/// that two spellings of one file share one lock). A link may name a file yet to be written;
/// a directory is refused.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err(Error::Checkpoint("--checkpoint: expected a file path, found an empty one".into()));
    }
    // Symlinks followed by hand (a link may name a checkpoint that does not exist yet), with
    // the kernel's limit on a chain's length.
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&at).map_err(io_error(&at))?;
                at = at.parent().map_or(target.clone(), |dir| dir.join(&target));
            }
            _ => break,
        }
    }
    if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::Checkpoint(format!("{shown}: too many levels of symbolic links")));
    }
    let Some(name) = at.file_name() else {
        return Err(Error::Checkpoint(format!("{shown}: expected a checkpoint file path, found a directory")));
    };
    let dir = create_parent(&at)?.unwrap_or(Path::new("."));
    let resolved = fs::canonicalize(dir).map_err(io_error(dir))?.join(name);
    if resolved.is_dir() {
        return Err(Error::Checkpoint(format!(
            "{shown}: expected a checkpoint file path, found a directory (name a file in it, such as {})",
            path.join("alexnet.safetensors").display()
        )));
    }
    Ok(resolved)
}

/// A run's exclusive claim on a checkpoint path (see the module docs): held while it lives, by an
/// advisory lock on `<path>.lock` that records the holder. Clones share one lock.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The resolved checkpoint path (see [`resolve`]).
    path: PathBuf,
    _lock: Arc<LockFile>,
    /// Temp files of killed runs that were removed when the claim was made.
    removed: Vec<PathBuf>,
}

#[derive(Debug)]
struct LockFile {
    path: PathBuf,
    /// Holds the lock; the OS releases it when the process ends, however it ends.
    _file: fs::File,
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked: a run that opened it meanwhile finds its lock on an
        // unlinked file and tries again (see `Claim::acquire`).
        let _ = fs::remove_file(&self.path);
    }
}

impl Claim {
    /// Claims `path` (resolved, see [`resolve`]) for this process, or fails at once if another
    /// process holds it, naming that process. The lock file is created beside the checkpoint, so
    /// a directory that cannot be written (read-only, a file in its place) fails here too, before
    /// any work is done for the run. Removes the temp files that killed runs left there:
    /// only a claim's holder writes them, so any that exist now are stale.
    pub fn acquire(path: &Path) -> Result<Claim> {
        let path = resolve(path)?;
        let lock_path = with_suffix(&path, ".lock");
        let shown = path.display();
        let file = loop {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .map_err(io_error(&lock_path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                    return Err(Error::Checkpoint(format!(
                        "{shown} is in use: {holder} is writing it (it holds {}); wait for that run to end, or \
                         give this one another --checkpoint",
                        lock_path.display()
                    )));
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
            }
            // The holder before us may have removed the file between our open and our lock.
            if same_file(&file, &lock_path) {
                file.set_len(0).and_then(|()| file.rewind()).map_err(io_error(&lock_path))?;
                let me = format!("process {} (ptxgrad train)", std::process::id());
                file.write_all(me.as_bytes()).and_then(|()| file.flush()).map_err(io_error(&lock_path))?;
                break file;
            }
        };
        let lock = Arc::new(LockFile { path: lock_path, _file: file });
        let removed = remove_stale_temps(&path)?;
        Ok(Claim { path, _lock: lock, removed })
    }

    /// The checkpoint's path, resolved.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temp files of killed runs that `acquire` removed.
    pub fn removed_stale(&self) -> &[PathBuf] {
        &self.removed
    }
}

/// Whether the open `file` is still the one at `path`.
#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &fs::File, path: &Path) -> bool {
    path.exists()
}

/// Removes every temp file of checkpoint `path` but this process's; returns their paths.
fn remove_stale_temps(path: &Path) -> Result<Vec<PathBuf>> {
    let (Some(dir), Some(file)) = (path.parent(), path.file_name().and_then(|f| f.to_str())) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| temp_of(n, file)) else { continue };
        if owner == Some(std::process::id()) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
        removed.push(entry.path());
    }
    removed.sort();
    Ok(removed)
}

/// Write to this process's temp file, fsync, rename over `path`, then fsync the directory so the rename
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
