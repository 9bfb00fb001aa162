//! The planning of a GEMM launch, shared by every op whose kernels run on the GEMM core of
//! `kernels/gemm.cuh` (conv2d's implicit GEMMs, Winograd's batched GEMMs, dense): the block tile
//! (`Tile`, one kernel variant each), the grid and the tile picked for an output by a model of the
//! GPU's waves (`Planner::launch`), and the split-K sizing of long reductions. What the plan
//! depends on beyond the shape, the GPU's SM count and the tiles allowed, is a `Planner` value.

use cudarc::driver::LaunchConfig;

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::ops::gemm::GemmOpts;

/// The block tile of a GEMM launch; kernels come in one variant per tile (suffixes _t128,
/// _t128x64, _t64, _t96, _t128x96), listed in this order wherever a kernel is picked by
/// `tile as usize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    T128 = 0,
    T128x64 = 1,
    T64 = 2,
    /// 96 x 128: for M = 96 (AlexNet's conv1 output and conv2 input channels), which leaves a
    /// quarter of every 128-row tile (and of two 64-row tiles) empty.
    T96 = 3,
    /// 128 x 96: the same for N = 96 (conv2's Winograd weight grad, (Cout, Cin) = (256, 96)).
    T128x96 = 4,
}

impl Tile {
    pub const ALL: [Tile; 5] = [Tile::T128, Tile::T128x64, Tile::T64, Tile::T96, Tile::T128x96];
    /// (BM, BN): rows and columns of C per block.
    pub fn size(self) -> (usize, usize) {
        match self {
            Tile::T128 => (128, 128),
            Tile::T128x64 => (128, 64),
            Tile::T64 => (64, 64),
            Tile::T96 => (96, 128),
            Tile::T128x96 => (128, 96),
        }
    }
}

/// The inputs of a GEMM plan beyond its shape: made from the GPU (its SM count) and the model's
/// `GemmOpts` (whether the 96-wide tiles may be picked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planner {
    /// Streaming multiprocessors of the GPU (132 on an H100/H200 SXM).
    pub sms: usize,
    /// Whether the 96 x 128 and 128 x 96 tiles may be picked (`GemmOpts::wide_96`).
    pub wide_96: bool,
}

impl Planner {
    pub fn new(gpu: &Gpu, opts: GemmOpts) -> Planner {
        Planner { sms: gpu.sm_count(), wide_96: opts.wide_96 }
    }

    /// Blocks that run at once: 2 per SM (256 threads each, at the register limit of 128).
    pub fn wave(&self) -> usize {
        2 * self.sms
    }

    /// Whether a side of `len` leaves fewer elements empty in 96-wide tiles than in 128-wide
    /// ones (96, 192; not 256 or 384), where the 96-wide tiles are allowed.
    pub fn fits_96(&self, len: usize) -> bool {
        self.wide_96 && len.div_ceil(96) * 96 < len.div_ceil(128) * 128
    }

    /// The 128-row tile or the 96-row one for an M-row output with 128-wide columns, whichever
    /// computes fewer empty rows.
    pub fn rows_for(&self, m: usize) -> Tile {
        if self.fits_96(m) {
            Tile::T96
        } else {
            Tile::T128
        }
    }

    /// The GEMM grid for an M x N output over `z` slices, and its tile. Model: the GPU runs
    /// `wave()` blocks of 256 threads at once (an H100/H200: 132 SMs x 2 = 264), and the time is
    /// (waves) x (time of one block). 128 x 128 by default; 64 x 64 when the 128 grid would not
    /// fill one wave; 128 x 64 when the 128 grid's last wave is nearly empty (AlexNet's conv5
    /// forward: 288 blocks = 1.09 waves) and half-size blocks would finish sooner; 96 x 128
    /// (128 x 96) where M (N) leaves fewer rows (columns) empty in 96-wide tiles (`fits_96`: 96,
    /// AlexNet's conv1 forward, conv2 input grad and conv2's Winograd weight grad) and that takes
    /// less time. A smaller block is taken at 90% of the 128 tile's efficiency (fewer FFMAs per
    /// shared-memory read and per barrier; the SASS k-loops agree: 1.42 instructions per FFMA for
    /// 128 x 128, 1.55 for 96 x 128). `tile` Some(t) uses t instead (the emulated kernel tests
    /// reach every variant so).
    pub fn launch(&self, m: usize, n: usize, z: usize, tile: Option<Tile>) -> Result<(LaunchConfig, Tile)> {
        let wave = self.wave();
        // The model's time of each tile's grid, in 1/36 of a 128 x 128 block's time (exact
        // integers, so that ties are ties): waves x (block's share of 128 x 128, in quarters) x
        // (9, or 10 for the smaller blocks' 90%).
        let time = |tile: Tile| {
            let (bm, bn) = tile.size();
            let blocks = m.div_ceil(bm) * n.div_ceil(bn) * z;
            let quarters = bm * bn / (64 * 64);
            blocks.div_ceil(wave) * quarters * if quarters == 4 { 9 } else { 10 }
        };
        let b128 = m.div_ceil(128) * n.div_ceil(128) * z;
        let tile = tile.unwrap_or(if b128 < wave {
            Tile::T64
        } else {
            let mut candidates = vec![Tile::T128, Tile::T128x64];
            if self.fits_96(m) {
                candidates.push(Tile::T96);
            }
            if self.fits_96(n) {
                candidates.push(Tile::T128x96);
            }
            // The first of the fastest: ties keep the earlier (larger) tile.
            candidates.into_iter().min_by_key(|&t| time(t)).unwrap_or(Tile::T128)
        });
        let (bm, bn) = tile.size();
        let (gx, gy) = (n.div_ceil(bn), m.div_ceil(bm));
        if gy > 65535 || z > 65535 || gx > u32::MAX as usize {
            return Err(Error::TooLarge(format!("GEMM of {m} x {n} (x {z}) is too large for one launch")));
        }
        Ok((
            LaunchConfig { grid_dim: (gx as u32, gy as u32, z as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 },
            tile,
        ))
    }

    /// Split-K, part 1: into how many splits to cut a reduction whose grid has `blocks` blocks, so
    /// that the grid has about 4 blocks per SM (528 on an H100/H200), at most `max_splits`.
    pub fn split_count(&self, blocks: usize, max_splits: usize) -> usize {
        (4 * self.sms).div_ceil(blocks).min(max_splits).max(1)
    }
}

/// Split-K, part 2: (splits, chunk) for a reduction of `k` terms cut about `splits` ways, each
/// chunk a multiple of the 8-wide k-tile (so fewer splits may result).
pub fn split_chunk(k: usize, splits: usize) -> (usize, usize) {
    let chunk = (k.div_ceil(splits.max(1)).div_ceil(8) * 8).max(8);
    (k.div_ceil(chunk).max(1), chunk)
}
