//! A model as a checkpoint file, both ways. ptxgrad writes safetensors files whose tensors are
//! the PyTorch `state_dict` of the peer's `nn.Sequential` (so `load_state_dict(strict=True)`
//! takes them as they are) and whose metadata says what PyTorch's file does not: the network,
//! the input size, the epochs done and the recipe. It reads those, and plain state_dicts too,
//! as `safetensors.torch.save_file(net.state_dict(), path)` writes them: the network is then
//! found from the tensor names, the input size from the shapes (or the caller's), the epoch
//! count is 0.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::checkpoint::{self, NamedTensor, Values};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::model::Model;
use crate::nn::models::{self, ALEXNET};
use crate::nn::network::{describe_sizes, Network};
use crate::ops::nonfinite::count_nonfinite_cpu;

/// Metadata keys of ptxgrad's checkpoints.
pub const META_FORMAT: &str = "format";
pub const META_MODEL: &str = "model";
pub const META_EPOCH: &str = "epoch";
pub const META_RESOLUTION: &str = "resolution";
pub const META_SEED: &str = "seed";
pub const META_LR: &str = "lr";
pub const META_BATCH_SIZE: &str = "batch_size";

/// The format this version writes. Files without `model` (the first format, AlexNet only) load
/// as AlexNet.
pub const FORMAT: &str = "ptxgrad v2 (torch nn.Sequential state_dict names)";

/// How the run that wrote a checkpoint trained: recorded so that `--resume` continues with it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Recorded {
    pub seed: Option<u64>,
    pub lr: Option<f32>,
    pub batch_size: Option<usize>,
}

impl Recorded {
    fn of(meta: &BTreeMap<String, String>) -> Recorded {
        Recorded {
            seed: meta.get(META_SEED).and_then(|v| v.parse().ok()),
            lr: meta.get(META_LR).and_then(|v| v.parse().ok()),
            batch_size: meta.get(META_BATCH_SIZE).and_then(|v| v.parse().ok()),
        }
    }
}

/// The tensors and metadata of `model`'s checkpoint after `epoch` epochs of a run with
/// that recipe: the parameters copied to the host (so that training may go on while they
/// are written).
pub fn contents(
    model: &Model,
    epoch: usize,
    seed: u64,
    lr: f32,
    batch_size: usize,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let tensors = model.to_named()?;
    let meta = [
        (META_FORMAT, FORMAT.to_string()),
        (META_MODEL, model.net.name.to_string()),
        (META_EPOCH, epoch.to_string()),
        (META_RESOLUTION, model.resolution.to_string()),
        (META_SEED, seed.to_string()),
        (META_LR, lr.to_string()),
        (META_BATCH_SIZE, batch_size.to_string()),
    ];
    Ok((tensors, meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// What the caller knows of a file before reading it: the network (`--model`) and input size
/// (`--resize`) it was told, if any. A ptxgrad checkpoint's metadata must agree with them; a
/// plain state_dict needs them only where its tensors do not say.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    pub net: Option<&'static Network>,
    pub resolution: Option<usize>,
}

/// Where a loaded model came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A checkpoint `ptxgrad train` wrote: its metadata named the network and input size.
    Ptxgrad { epoch: usize, recorded: Recorded },
    /// A state_dict without ptxgrad's metadata (as PyTorch writes one): `note` says how the
    /// network and the input size were found, for the user to see.
    StateDict { note: String },
}

/// A model read from a file.
pub struct Loaded {
    pub model: Model,
    pub source: Source,
}

impl Loaded {
    /// The epochs the file's run had done (0 for a plain state_dict).
    pub fn epoch(&self) -> usize {
        match self.source {
            Source::Ptxgrad { epoch, .. } => epoch,
            Source::StateDict { .. } => 0,
        }
    }

    /// The recipe the file's run recorded (nothing for a plain state_dict).
    pub fn recorded(&self) -> Recorded {
        match self.source {
            Source::Ptxgrad { recorded, .. } => recorded,
            Source::StateDict { .. } => Recorded::default(),
        }
    }
}

/// Reads the model at `path` onto `device`: a ptxgrad checkpoint or a plain state_dict (see the
/// module docs). Refuses, naming what is wrong: a file whose metadata contradicts `expect`, a
/// state_dict that fits no network or several (then `--model` is asked for), one whose input
/// size its shapes cannot fix and `expect` does not give (then `--resize` is asked for), and
/// tensors holding NaN or Inf (weights from a run that diverged).
pub fn load(path: &Path, device: &Device, expect: Expect) -> Result<Loaded> {
    let shown = path.display().to_string();
    let at_file = |e: Error| match e {
        Error::Checkpoint(m) if !m.starts_with(&shown) => Error::Checkpoint(format!("{shown}: {m}")),
        e => e,
    };
    let (tensors, meta) = checkpoint::load(path)?;
    let shapes: HashMap<String, Vec<usize>> = tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let (net, resolution, source) = if let Some(epoch) = meta.get(META_EPOCH) {
        let (net, resolution) = from_metadata(&meta, &shapes, expect).map_err(at_file)?;
        let epoch = number(META_EPOCH, epoch).map_err(at_file)?;
        (net, resolution, Source::Ptxgrad { epoch, recorded: Recorded::of(&meta) })
    } else {
        let (net, resolution, note) = from_shapes(&shapes, expect).map_err(at_file)?;
        (net, resolution, Source::StateDict { note })
    };
    let bad: Vec<String> = tensors
        .iter()
        .filter_map(|t| {
            let Values::F32(data) = &t.data else { return None };
            let k = count_nonfinite_cpu(data);
            (k > 0).then(|| format!("`{}`: {k} of {} values", t.name, data.len()))
        })
        .collect();
    if !bad.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{shown}: the checkpoint holds NaN or Inf ({}): it comes from a run that diverged; train afresh \
             (a lower --lr) or resume from an earlier checkpoint",
            bad.join(", ")
        )));
    }
    let model = Model::from_named(net, resolution, tensors, device).map_err(at_file)?;
    Ok(Loaded { model, source })
}

/// The recipe a checkpoint recorded, from its header alone (what `--resume` continues with).
pub fn recorded(path: &Path) -> Result<Recorded> {
    Ok(Recorded::of(&checkpoint::metadata(path)?))
}

/// Metadata `key`'s value `v` as a number.
fn number(key: &str, v: &str) -> Result<usize> {
    v.parse().map_err(|_| Error::Checkpoint(format!("metadata `{key}` is `{v}`, not a number")))
}

/// The network and input size a ptxgrad checkpoint's metadata names, checked against `expect`
/// and against its tensors' shapes.
fn from_metadata(
    meta: &BTreeMap<String, String>,
    shapes: &HashMap<String, Vec<usize>>,
    expect: Expect,
) -> Result<(&'static Network, usize)> {
    let net = match meta.get(META_MODEL) {
        Some(name) => models::by_name(name).map_err(|_| {
            Error::Checkpoint(format!("metadata `{META_MODEL}` is `{name}`, a network ptxgrad does not have"))
        })?,
        None => &ALEXNET,
    };
    if let Some(told) = expect.net.filter(|t| t.name != net.name) {
        return Err(Error::Checkpoint(format!(
            "the checkpoint holds {} (`{}`), but --model is {}",
            net.title, net.name, told.name
        )));
    }
    let recorded = meta.get(META_RESOLUTION).ok_or_else(|| {
        Error::Checkpoint(format!("not a ptxgrad checkpoint (no `{META_RESOLUTION}` in its metadata)"))
    })?;
    let recorded = number(META_RESOLUTION, recorded)?;
    net.leaf_shapes(&net.input_shape(1, recorded))
        .map_err(|e| Error::Checkpoint(format!("metadata `{META_RESOLUTION}` is {recorded}: {e}")))?;
    // Another input size than the recorded one, where the parameters fit it too.
    let resolution = expect.resolution.unwrap_or(recorded);
    if resolution != recorded && net.misfit(shapes, resolution).is_some() {
        let fits = describe_sizes(&net.fitting_resolutions(shapes));
        return Err(Error::Checkpoint(format!(
            "--resize {resolution}: the checkpoint's {} was trained at {recorded}x{recorded}, and its parameters \
             fit inputs of {fits} only",
            net.title
        )));
    }
    Ok((net, resolution))
}

/// The network and input size of a state_dict without metadata: the network whose parameter
/// names these are (or `expect.net`), the input size `expect.resolution`, else the recipe's
/// where the shapes fit it, else the one size they fit. Returns a note saying which was taken.
fn from_shapes(shapes: &HashMap<String, Vec<usize>>, expect: Expect) -> Result<(&'static Network, usize, String)> {
    let names: Vec<&str> = models::ALL.iter().map(|n| n.name).collect();
    let net = match expect.net {
        Some(net) => net,
        None => {
            let matching: Vec<&'static Network> =
                models::ALL.iter().copied().filter(|n| n.has_param_names(shapes)).collect();
            match matching[..] {
                [net] => net,
                [] => {
                    let mut found: Vec<&String> = shapes.keys().collect();
                    found.sort();
                    let shown: Vec<&str> = found.iter().take(4).map(|s| s.as_str()).collect();
                    return Err(Error::Checkpoint(format!(
                        "no ptxgrad metadata, and its {} tensors ({}{}) are the state_dict of none of {}: expected \
                         the parameters of one of them under PyTorch's names",
                        found.len(),
                        shown.join(", "),
                        if found.len() > shown.len() { ", ..." } else { "" },
                        names.join(", ")
                    )));
                }
                _ => {
                    let m: Vec<&str> = matching.iter().map(|n| n.name).collect();
                    return Err(Error::Checkpoint(format!(
                        "no ptxgrad metadata, and its tensor names fit {}: give --model",
                        m.join(" and ")
                    )));
                }
            }
        }
    };
    let sizes = net.fitting_resolutions(shapes);
    let recipe = net.recipe.resolution;
    let (resolution, how) = match expect.resolution {
        Some(r) => match net.misfit(shapes, r) {
            None => (r, format!("{r}x{r} as --resize says")),
            Some(why) => {
                let fits = if sizes.is_empty() { "no input size".to_string() } else { describe_sizes(&sizes) };
                return Err(Error::Checkpoint(format!(
                    "--resize {r}: not the state_dict of {} at {r}x{r}: {why} (its shapes fit {fits})",
                    net.title
                )));
            }
        },
        None if sizes.contains(&recipe) => {
            let also = match sizes.len() {
                1 => String::new(),
                _ => format!("; its shapes fit {}, --resize takes another", describe_sizes(&sizes)),
            };
            (recipe, format!("{recipe}x{recipe}, the recipe's{also}"))
        }
        None => match sizes[..] {
            [r] => (r, format!("{r}x{r}, the one size its shapes fit")),
            [] => {
                let why = net.misfit(shapes, recipe).unwrap_or_default();
                return Err(Error::Checkpoint(format!(
                    "no ptxgrad metadata, and its tensors fit {} at no input size: {why}",
                    net.title
                )));
            }
            _ => {
                return Err(Error::Checkpoint(format!(
                    "no ptxgrad metadata, and the input size is not fixed by its shapes (they fit {}): give --resize",
                    describe_sizes(&sizes)
                )))
            }
        },
    };
    let found = if expect.net.is_some() { "as --model says" } else { "found from its tensor names" };
    Ok((net, resolution, format!("a PyTorch state_dict (no ptxgrad metadata): {} {found}, input {how}", net.title)))
}
