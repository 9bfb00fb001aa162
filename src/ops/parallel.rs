//! Splits CPU reference work over the machine's cores, on rayon's persistent worker pool
//! (threads spawned per op cost more than the work at small sizes: each exit unmaps a stack).

use std::ops::Range;

use rayon::prelude::*;

/// Number of parts to split `items` into: the pool's size, at most `items`.
fn parts(items: usize) -> usize {
    rayon::current_num_threads().min(items).max(1)
}

/// Runs `f` on contiguous sub-ranges of `0..items`, one per worker, and returns the results in
/// range order. (Callers that add the results up get sums whose rounding depends on the
/// number of cores; the references are compared with tolerances, never bit for bit, to GPUs.)
pub fn map_ranges<T: Send>(items: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let n = parts(items);
    let per = items.div_ceil(n).max(1);
    (0..n).into_par_iter().map(|i| f((i * per).min(items)..((i + 1) * per).min(items))).collect()
}

/// Calls `f(row, slice)` for every row of `out`, seen as rows of `chunk` elements, in parallel.
pub fn for_each_row(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    out.par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, row)| f(i, row));
}

/// Elements per task of `map_elementwise`: enough that a task outweighs handing it to a worker.
const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// `f(i)` for every index of an output of `len` elements, computed in chunks over the cores.
/// Collected straight into the new vector: zero-filling it first would cost as much as the work.
pub fn map_elementwise(len: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Vec<f32> {
    (0..len).into_par_iter().with_min_len(ELEMENTWISE_CHUNK).map(f).collect()
}
