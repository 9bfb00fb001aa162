//! The convolution as implicit GEMMs on the shared core in `kernels/gemm.cuh` (see the header of
//! `kernels/conv2d.cu`): the forward (M = Cout, N = batch*OH*OW, K = Cin*KH*KW), the input grad
//! (M = Cin, N = batch*H*W, K = Cout*KH*KW) and the weight grad (M = Cout, N = Cin*KH*KW, K =
//! batch*OH*OW, split-K), plus the bias grad's reduction. `plan` names each pass's kernel and
//! grid; the CUDA path and the emulated kernel tests (tests/conv2d.rs) both take their launches
//! from it.

use crate::device::{DeviceBuf, Gpu};
use crate::error::Result;
use crate::ops::conv2d::params::Conv2dParams;
use crate::ops::gemm::plan::Planner;
use crate::ops::gemm::GemmOpts;
use crate::ptx::Module;

/// Which kernel each pass launches, on which grid. `tile` None lets the planner pick; tests pass
/// a tile to reach every variant.
pub mod plan {
    use cudarc::driver::LaunchConfig;

    use crate::device::grid_1d;
    use crate::error::Result;
    use crate::ops::conv2d::params::Conv2dParams;
    use crate::ops::gemm::math::{gemm_kernel_names, GemmMath};
    use crate::ops::gemm::plan::{split_chunk, Planner, Tile};

    fn block_256(grid: (usize, usize, usize)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// conv2d_ktable_u32's launch and the table's length in u32: 2K, K = Cin*KH*KW for the
    /// forward and weight grad, Cout*KH*KW for the input grad.
    pub fn ktable(p: &Conv2dParams, input_grad: bool) -> (LaunchConfig, usize) {
        let khw = (p.kh * p.kw) as usize;
        let k = if input_grad { p.c_out as usize } else { p.c_in as usize } * khw;
        (grid_1d(k, 256), 2 * k)
    }

    /// conv2d_wperm_f32's launch: one thread per filter element.
    pub fn wperm(p: &Conv2dParams) -> LaunchConfig {
        grid_1d(p.w_len(), 256)
    }

    /// The forward GEMM in `math`: M = Cout, N = batch*OH*OW.
    pub fn forward(
        p: &Conv2dParams,
        plan: &Planner,
        math: GemmMath,
        tile: Option<Tile>,
    ) -> Result<(&'static str, LaunchConfig)> {
        let (cfg, tile) = plan.launch(p.c_out as usize, p.n as usize * p.ohw(), 1, tile)?;
        Ok((math.kernel(&gemm_kernel_names!("conv2d_fwd"), tile), cfg))
    }

    /// The input-grad GEMM in `math`: M = Cin, N = batch*H*W; strides above 1 take the 64-tile
    /// kernel that handles them (fp32 FFMAs only: AlexNet's one strided layer, conv1, needs no
    /// input grad).
    pub fn input_grad(
        p: &Conv2dParams,
        plan: &Planner,
        math: GemmMath,
        tile: Option<Tile>,
    ) -> Result<(&'static str, LaunchConfig)> {
        let (m, n) = (p.c_in as usize, p.n as usize * (p.h * p.w) as usize);
        if p.stride != 1 {
            return Ok(("conv2d_bwd_input_f32_t64_strided", block_256((n.div_ceil(64), m.div_ceil(64), 1))));
        }
        let (cfg, tile) = plan.launch(m, n, 1, tile)?;
        Ok((math.kernel(&gemm_kernel_names!("conv2d_bwd_input"), tile), cfg))
    }

    /// The weight-grad GEMM in `math` (M = Cout, N = Cin*KH*KW) on the 128 x 128 tile (96 x 128
    /// where that leaves fewer rows empty: `Planner::rows_for`; `tile` Some(t) uses t), its
    /// reduction over N*OH*OW split so that the grid has ~4 blocks per SM, each split summing at
    /// least 512 terms. Sets p.k_chunk; returns the number of splits (partials to add up).
    pub fn weight_grad(
        p: &mut Conv2dParams,
        plan: &Planner,
        math: GemmMath,
        tile: Option<Tile>,
    ) -> (&'static str, LaunchConfig, usize) {
        let (m, n, k_total) = (p.c_out as usize, p.k(), p.n as usize * p.ohw());
        let tile = tile.unwrap_or(plan.rows_for(m));
        let (bm, bn) = tile.size();
        let tiles = m.div_ceil(bm) * n.div_ceil(bn);
        let (splits, chunk) = split_chunk(k_total, plan.split_count(tiles, k_total.div_ceil(512)));
        p.k_chunk = chunk as u32;
        let name = math.kernel(&gemm_kernel_names!("conv2d_bwd_weight"), tile);
        (name, block_256((n.div_ceil(bn), m.div_ceil(bm), splits)), splits)
    }

    /// The bias grad: blocks (channel, image split), split over images until there are ~8
    /// blocks per SM (conv1 on 132 SMs: 96 channels x 11 splits). Returns the number of splits.
    pub fn bias_grad(p: &Conv2dParams, plan: &Planner) -> (LaunchConfig, usize) {
        let cout = p.c_out as usize;
        let splits = (p.n as usize).min((8 * plan.sms).div_ceil(cout)).max(1);
        (block_256((cout, splits, 1)), splits)
    }

    /// conv2d_splitk_sum_f32 over `len` outputs.
    pub fn splitk_sum(len: usize) -> LaunchConfig {
        grid_1d(len, 256)
    }
}

/// The k-table of kernels/conv2d.cu (per reduction index: the offsets and (kh, kw) that would
/// otherwise cost integer divisions in the GEMM's loads).
fn ktable(gpu: &Gpu, p: &Conv2dParams, input_grad: bool) -> Result<DeviceBuf<u32>> {
    let (cfg, words) = plan::ktable(p, input_grad);
    let mut tab = gpu.uninit::<u32>(words)?;
    let mode = input_grad as u32;
    crate::launch!(gpu, Module::Conv2d, "conv2d_ktable_u32", cfg, &mut tab, p, &mode)?;
    Ok(tab)
}

/// The filters permuted for the forward (`input_grad` false) or input-grad GEMM's A operand
/// (conv2d_wperm_f32: rows along m contiguous, so that the GEMM copies them 16 bytes at a time).
fn filters_for_gemm(gpu: &Gpu, w: &DeviceBuf<f32>, p: &Conv2dParams, input_grad: bool) -> Result<DeviceBuf<f32>> {
    let mut wt = gpu.uninit::<f32>(p.w_len())?;
    let mode = input_grad as u32;
    crate::launch!(gpu, Module::Conv2d, "conv2d_wperm_f32", plan::wperm(p), w, &mut wt, p, &mode)?;
    Ok(wt)
}

/// Adds the `splits` partial sums in `parts` (splits, len) into a new buffer of `len`.
fn sum_splits(gpu: &Gpu, parts: &DeviceBuf<f32>, len: usize, splits: usize) -> Result<DeviceBuf<f32>> {
    let mut out = gpu.uninit::<f32>(len)?;
    let (len32, nsplit) = (len as u32, splits as u32);
    let cfg = plan::splitk_sum(len);
    crate::launch!(gpu, Module::Conv2d, "conv2d_splitk_sum_f32", cfg, parts, &mut out, &len32, &nsplit)?;
    Ok(out)
}

/// y (N, Cout, OH, OW) = conv(x, w) + b, then the ReLU if p.relu.
pub fn forward(
    gpu: &Gpu,
    (x, w, b): (&DeviceBuf<f32>, &DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    let mut y = gpu.uninit::<f32>(p.y_len())?;
    let tab = ktable(gpu, p, false)?;
    let wt = filters_for_gemm(gpu, w, p, false)?;
    let (name, cfg) = plan::forward(p, &Planner::new(gpu, opts), opts.math, None)?;
    crate::launch!(gpu, Module::Conv2d, name, cfg, x, &wt, b, &mut y, &tab, p)?;
    Ok(y)
}

/// gx (N, Cin, H, W) from w and gy (N, Cout, OH, OW) (any ReLU mask already applied).
pub fn input_grad(
    gpu: &Gpu,
    (w, gy): (&DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    let mut gx = gpu.uninit::<f32>(p.x_len())?;
    let tab = ktable(gpu, p, true)?;
    let wt = filters_for_gemm(gpu, w, p, true)?;
    let (name, cfg) = plan::input_grad(p, &Planner::new(gpu, opts), opts.math, None)?;
    crate::launch!(gpu, Module::Conv2d, name, cfg, &wt, gy, &mut gx, &tab, p)?;
    Ok(gx)
}

/// gw (Cout, Cin, KH, KW) from x and gy: split-K partials, then their sum.
pub fn weight_grad(
    gpu: &Gpu,
    (x, gy): (&DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    let mut p = *p;
    let (name, cfg, splits) = plan::weight_grad(&mut p, &Planner::new(gpu, opts), opts.math, None);
    let tab = ktable(gpu, &p, false)?;
    let mut parts = gpu.uninit::<f32>(splits * p.w_len())?;
    crate::launch!(gpu, Module::Conv2d, name, cfg, x, gy, &mut parts, &tab, &p)?;
    if splits == 1 {
        return Ok(parts);
    }
    sum_splits(gpu, &parts, p.w_len(), splits)
}

/// gb (Cout) = the sum of gy over (N, OH, OW): per-split partials, then their sum.
pub fn bias_grad(gpu: &Gpu, gy: &DeviceBuf<f32>, p: &Conv2dParams, opts: GemmOpts) -> Result<DeviceBuf<f32>> {
    let c_out = p.c_out as usize;
    let (cfg, splits) = plan::bias_grad(p, &Planner::new(gpu, opts));
    let mut parts = gpu.uninit::<f32>(splits * c_out)?;
    crate::launch!(gpu, Module::Conv2d, "conv2d_bwd_bias_f32", cfg, gy, &mut parts, p)?;
    if splits == 1 {
        return Ok(parts);
    }
    sum_splits(gpu, &parts, c_out, splits)
}
