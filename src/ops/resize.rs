//! Bilinear resize of u8 images to f32 in [0, 1], matching PyTorch's
//! `F.interpolate(x.float() / 255, size=(OH, OW), mode="bilinear", align_corners=False)`.
//! Used once per batch to turn 28x28 Fashion-MNIST into AlexNet's 224x224 input; not differentiated.

use crate::device::grid_1d;
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tensor::{Storage, Tensor};

/// Mirrors `ResizeParams` in kernels/resize.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeParams {
    pub n: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    /// in / out along each axis, in f32 as PyTorch computes it.
    pub scale_h: f32,
    pub scale_w: f32,
}

// SAFETY: #[repr(C)] plain data, mirrored field for field by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for ResizeParams {}

impl ResizeParams {
    pub fn new(shape: &[usize], oh: usize, ow: usize) -> Result<Self> {
        let [n, c, h, w] = <[usize; 4]>::try_from(shape)
            .map_err(|_| Error::shape("resize_bilinear", "4-D (N, C, H, W) images", format!("shape {shape:?}")))?;
        if n == 0 || c == 0 || h == 0 || w == 0 || oh == 0 || ow == 0 {
            return Err(Error::shape(
                "resize_bilinear",
                "non-empty images and output size",
                format!("input {shape:?}, output {oh}x{ow}"),
            ));
        }
        let fits = |v: usize| u32::try_from(v).ok();
        let too_big =
            || Error::shape("resize_bilinear", "dims and plane sizes below 2^32", format!("{shape:?} -> {oh}x{ow}"));
        fits(h * w).zip(fits(oh * ow)).ok_or_else(too_big)?;
        Ok(ResizeParams {
            n: fits(n).ok_or_else(too_big)?,
            c: fits(c).ok_or_else(too_big)?,
            h: h as u32,
            w: w as u32,
            oh: oh as u32,
            ow: ow as u32,
            scale_h: h as f32 / oh as f32,
            scale_w: w as f32 / ow as f32,
        })
    }
}

/// (i0, i1, lambda1) along one axis; the same f32 operations, in the same order, as the kernel.
fn source(dst: u32, scale: f32, len: u32) -> (usize, usize, f32) {
    let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src as u32).min(len - 1);
    let i1 = (i0 + 1).min(len - 1);
    (i0 as usize, i1 as usize, src - i0 as f32)
}

/// CPU reference: images (N, C, H, W) u8 -> (N, C, OH, OW) f32.
pub fn resize_bilinear_cpu(x: &[u8], p: &ResizeParams) -> Vec<f32> {
    let (h, w) = (p.h as usize, p.w as usize);
    let rows: Vec<_> = (0..p.oh).map(|o| source(o, p.scale_h, p.h)).collect();
    let cols: Vec<_> = (0..p.ow).map(|o| source(o, p.scale_w, p.w)).collect();
    let mut y = Vec::with_capacity(p.n as usize * p.c as usize * rows.len() * cols.len());
    for xp in x.chunks_exact(h * w) {
        let v = |r: usize, c: usize| xp[r * w + c] as f32 / 255.0;
        for &(y0, y1, ly) in &rows {
            for &(x0, x1, lx) in &cols {
                let (l0y, l0x) = (1.0 - ly, 1.0 - lx);
                let top = l0x * v(y0, x0) + lx * v(y0, x1);
                let bot = l0x * v(y1, x0) + lx * v(y1, x1);
                y.push(l0y * top + ly * bot);
            }
        }
    }
    y
}

/// Bilinear resize (align_corners=False) of u8 images (N, C, H, W) to (N, C, OH, OW) f32 in [0, 1].
pub fn resize_bilinear(images: &Tensor<u8>, oh: usize, ow: usize) -> Result<Tensor> {
    let p = ResizeParams::new(images.shape(), oh, ow)?;
    let out_shape = vec![p.n as usize, p.c as usize, oh, ow];
    let n_out: usize = out_shape.iter().product();
    let storage = match images.storage() {
        Storage::Cpu(x) => Storage::Cpu(resize_bilinear_cpu(x, &p)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(n_out)?;
            crate::launch!(gpu, Module::Resize, "resize_bilinear_u8_f32", grid_1d(n_out, 256), buf, &mut y, &p)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(out_shape, storage))
}
