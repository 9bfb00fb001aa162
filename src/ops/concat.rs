//! Concatenation along channels, `torch.cat(xs, dim=1)`: `xs[i]` (N, C_i, H, W) -> y (N, sum C_i,
//! H, W), GoogLeNet's inception join. The backward splits gy back into the inputs' channel
//! slices. Both are copies (kernels/concat.cu): results are bit-identical on every device.
//!
//! Every input must have at least one element (C_i, and N, H, W, at least 1), unlike PyTorch,
//! which accepts zero-channel inputs: a zero-channel input's gradient would be a zero-size
//! buffer, which CUDA cannot allocate on every GPU, and no layer of ptxgrad makes such a tensor.
//!
//! ReLU facts pass through: y is a ReLU's output (`ReluFact::Output`) when every input is, so a
//! max-pool after the concat masks its gradient for free (`ops::maxpool2d`); a gradient already
//! masked for y (`ReluFact::MaskedFor(y)`) is masked for each input in its slice, so each
//! input's own ReLU skips its masking pass (`ops::relu::through_fused_relu`).

use crate::device::grid_planes;
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

const OP: &str = "concat_channels";

/// Mirrors `ConcatParams` in kernels/concat.cu, field for field: the copy of one input, (N, C_i,
/// H, W), to or from channels [c_offset, c_offset + C_i) of (N, C, H, W).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcatParams {
    /// N, the samples.
    pub n: u32,
    /// C_i, this input's channels.
    pub c_in: u32,
    /// C, the concatenation's channels (sum over the inputs).
    pub c_out: u32,
    /// Where this input's channels start in the concatenation.
    pub c_offset: u32,
    /// H * W.
    pub plane: u64,
}

// SAFETY: #[repr(C)] plain data (4 u32 then a u64: no padding), mirrored field for field by the
// kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for ConcatParams {}

impl ConcatParams {
    /// The floats of one sample of this input: C_i * H * W.
    pub fn part(&self) -> usize {
        self.c_in as usize * self.plane as usize
    }

    /// The floats of one sample of the concatenation: C * H * W.
    pub fn whole(&self) -> usize {
        self.c_out as usize * self.plane as usize
    }

    /// Where this input's slice starts in a sample of the concatenation: c_offset * H * W.
    pub fn offset(&self) -> usize {
        self.c_offset as usize * self.plane as usize
    }

    /// The launch: x over the samples, y over one sample's `part` elements (`grid_planes`, whose
    /// grid the kernel loops over where a run exceeds it).
    fn launch(&self) -> cudarc::driver::LaunchConfig {
        grid_planes(self.n as usize, self.part().min(u32::MAX as usize) as u32)
    }
}

/// Each input's copy, for N samples of inputs of `channels` (the C_i) channels and `plane` = H * W
/// elements per channel, or a TooLarge error naming `op` where the sizes overflow the params.
fn plan(op: &'static str, n: usize, channels: &[usize], plane: usize) -> Result<Vec<ConcatParams>> {
    let c_out: usize = channels.iter().sum();
    let too_big = || {
        Error::TooLarge(format!(
            "{op}: expected N and the channel count C below 2^32, found N = {n}, C = {c_out} (channels {channels:?})"
        ))
    };
    let u32_of = |v: usize| u32::try_from(v).map_err(|_| too_big());
    let (n32, c_out32) = (u32_of(n)?, u32_of(c_out)?);
    // The total must be addressable: the kernels' 64-bit offsets then cannot overflow.
    n.checked_mul(c_out).and_then(|v| v.checked_mul(plane)).ok_or_else(too_big)?;
    let mut c_offset = 0u32;
    let mut plans = Vec::with_capacity(channels.len());
    for &c in channels {
        let c_in = c as u32; // c <= c_out < 2^32
        plans.push(ConcatParams { n: n32, c_in, c_out: c_out32, c_offset, plane: plane as u64 });
        c_offset += c_in;
    }
    Ok(plans)
}

/// The shape checks of a concatenation: `xs` non-empty, each 4-D with at least one element, all
/// of one N, H and W (input 0's), all on one device. Returns (N, [C_i], H, W).
fn check_inputs(xs: &[&Tensor]) -> Result<(usize, Vec<usize>, usize, usize)> {
    let first = xs.first().ok_or_else(|| Error::Invalid(format!("{OP}: expected at least one input, found none")))?;
    let dims = |i: usize, x: &Tensor| {
        let d = <[usize; 4]>::try_from(x.shape())
            .map_err(|_| Error::shape(OP, "4-D (N, C, H, W) inputs", format!("input {i} of shape {:?}", x.shape())))?;
        if d.contains(&0) {
            return Err(Error::shape(
                OP,
                "inputs of at least one element (N, C, H and W all at least 1)",
                format!("input {i} of shape {:?}", x.shape()),
            ));
        }
        Ok(d)
    };
    let [n, _, h, w] = dims(0, first)?;
    let mut channels = Vec::with_capacity(xs.len());
    for (i, x) in xs.iter().enumerate() {
        let [ni, ci, hi, wi] = dims(i, x)?;
        if (ni, hi, wi) != (n, h, w) {
            return Err(Error::shape(
                OP,
                format!("every input of N = {n}, H = {h}, W = {w} (input 0's: only C may differ)"),
                format!("input {i} of shape {:?}", x.shape()),
            ));
        }
        channels.push(ci);
    }
    let devices: Vec<_> = xs.iter().map(|x| x.device()).collect();
    common_device(OP, &devices)?;
    Ok((n, channels, h, w))
}

/// CPU reference, forward: y (N, C, H, W) from the inputs' data (each (N, C_i, H, W)), `plans`
/// from `plan`. Sample by sample, each input's run of C_i * H * W floats in turn.
pub fn concat_channels_cpu(xs: &[&[f32]], plans: &[ConcatParams]) -> Vec<f32> {
    let (n, whole) = plans.first().map_or((0, 0), |p| (p.n as usize, p.whole()));
    let mut y = Vec::with_capacity(n * whole);
    for s in 0..n {
        for (x, p) in xs.iter().zip(plans) {
            y.extend_from_slice(&x[s * p.part()..(s + 1) * p.part()]);
        }
    }
    y
}

/// CPU reference, backward: input i's slice of gy (N, C, H, W), as (N, C_i, H, W) data.
pub fn split_channels_cpu(gy: &[f32], p: &ConcatParams) -> Vec<f32> {
    let (part, whole, off) = (p.part(), p.whole(), p.offset());
    let mut gx = Vec::with_capacity(p.n as usize * part);
    for sample in gy.chunks_exact(whole) {
        gx.extend_from_slice(&sample[off..off + part]);
    }
    gx
}

/// The forward alone: y = torch.cat(xs, dim=1), `xs[i]` (N, C_i, H, W) -> y (N, sum C_i, H, W).
/// y is marked a ReLU's output when every input is one (see the module comment).
pub fn concat_channels_fwd(xs: &[&Tensor]) -> Result<Tensor> {
    let (n, channels, h, w) = check_inputs(xs)?;
    let plans = plan(OP, n, &channels, h * w)?;
    let c_out: usize = channels.iter().sum();
    let out_shape = vec![n, c_out, h, w];
    let storage = match xs[0].storage() {
        Storage::Cpu(_) => {
            let data: Option<Vec<&[f32]>> = xs.iter().map(|x| x.cpu()).collect();
            let data = data.ok_or_else(|| Error::Invalid(format!("{OP}: inputs on mixed devices")))?;
            Storage::Cpu(concat_channels_cpu(&data, &plans))
        }
        Storage::Cuda { gpu, .. } => {
            // Every element of y is written: each input fills its channels of every sample.
            let mut y = gpu.uninit::<f32>(n * c_out * h * w)?;
            for (x, p) in xs.iter().zip(&plans) {
                let (_, xbuf) = x.cuda().ok_or_else(|| Error::Invalid(format!("{OP}: inputs on mixed devices")))?;
                crate::launch!(gpu, Module::Concat, "concat_fwd_f32", p.launch(), xbuf, &mut y, p)?;
            }
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    let all_relu = xs.iter().all(|x| x.relu_fact() == ReluFact::Output);
    Ok(Tensor::from_storage(out_shape, storage).with_relu_fact(ReluFact::output_if(all_relu)))
}

/// The backward: gy (N, sum C_i, H, W) split into its (N, C_i, H, W) pieces, `channels` = `[C_i]`
/// (each at least 1, summing to gy's C).
pub fn split_channels(gy: &Tensor, channels: &[usize]) -> Result<Vec<Tensor>> {
    let need = vec![true; channels.len()];
    Ok(split_some(gy, channels, &need)?.into_iter().flatten().collect())
}

/// `split_channels`, making only the pieces i with `need[i]` (None for the others).
fn split_some(gy: &Tensor, channels: &[usize], need: &[bool]) -> Result<Vec<Option<Tensor>>> {
    const OP: &str = "split_channels";
    let [n, c, h, w] = gy.dims4(OP)?;
    if channels.is_empty() || channels.contains(&0) || channels.iter().sum::<usize>() != c {
        return Err(Error::shape(
            OP,
            format!("one or more channel counts, each at least 1, summing to gy's C = {c} (gy {:?})", gy.shape()),
            format!("channels {channels:?} (sum {})", channels.iter().sum::<usize>()),
        ));
    }
    if gy.is_empty() {
        return Err(Error::shape(OP, "a gy of at least one element", format!("shape {:?}", gy.shape())));
    }
    let plans = plan(OP, n, channels, h * w)?;
    let mut pieces = Vec::with_capacity(channels.len());
    for (p, &needed) in plans.iter().zip(need) {
        if !needed {
            pieces.push(None);
            continue;
        }
        let shape = vec![n, p.c_in as usize, h, w];
        let storage = match gy.storage() {
            Storage::Cpu(g) => Storage::Cpu(split_channels_cpu(g, p)),
            Storage::Cuda { gpu, buf } => {
                // Every element of the piece is written.
                let mut gx = gpu.uninit::<f32>(n * p.part())?;
                crate::launch!(gpu, Module::Concat, "concat_bwd_f32", p.launch(), buf, &mut gx, p)?;
                Storage::Cuda { gpu: gpu.clone(), buf: gx }
            }
        };
        pieces.push(Some(Tensor::from_storage(shape, storage)));
    }
    Ok(pieces)
}

/// y = torch.cat(xs, dim=1): `xs[i]` (N, C_i, H, W) -> y (N, sum C_i, H, W). Records the backward:
/// each input that requires a gradient gets its channel slice of gy (one passed twice gets the
/// sum of both slices); the others get nothing, and their slices are never copied.
pub fn concat_channels(tape: &mut Tape, xs: &[&Tensor]) -> Result<Tensor> {
    let y = concat_channels_fwd(xs)?;
    let need: Vec<bool> = xs.iter().map(|x| tape.requires_grad(x)).collect();
    let ids: Vec<_> = xs.iter().map(|x| x.id()).collect();
    let channels: Vec<usize> = xs.iter().map(|x| x.shape()[1]).collect(); // 4-D: checked
    let y_id = y.id();
    tape.record(&y, xs, move |gy, grads| {
        // Masked for y: each slice is zero wherever its input is <= 0, so masked for it.
        let masked = gy.relu_fact() == ReluFact::MaskedFor(y_id);
        for (id, g) in ids.into_iter().zip(split_some(gy, &channels, &need)?) {
            if let Some(g) = g {
                let fact = if masked { ReluFact::MaskedFor(id) } else { ReluFact::None };
                grads.accumulate(id, g.with_relu_fact(fact))?;
            }
        }
        Ok(())
    });
    Ok(y)
}
