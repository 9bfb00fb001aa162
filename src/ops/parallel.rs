//! Splits CPU reference work over the machine's cores with scoped threads (no thread pool
//! crate: the references are simple loops over independent images or output rows).

use std::ops::Range;

/// Number of worker threads: the available parallelism, at most `items`.
fn workers(items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(items).max(1)
}

/// Runs `f` on contiguous sub-ranges of `0..items`, one per worker, and returns the results in
/// range order. (Callers that add the results up get sums whose rounding depends on the
/// number of cores; the references are compared with tolerances, never bit for bit, to GPUs.)
pub fn map_ranges<T: Send>(items: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let n = workers(items);
    if n == 1 {
        return vec![f(0..items)];
    }
    let per = items.div_ceil(n);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i * per..((i + 1) * per).min(items)))).collect();
        handles.into_iter().map(|h| h.join().expect("CPU worker thread panicked")).collect()
    })
}

/// Fills `out`, seen as `out.len() / chunk` rows of `chunk` elements, in parallel: `f(row, slice)`
/// for every row.
pub fn for_each_row(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / chunk.max(1);
    let n = workers(rows);
    let per = rows.div_ceil(n).max(1);
    let f = &f;
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per * chunk.max(1)).enumerate() {
            s.spawn(move || {
                for (j, row) in part.chunks_mut(chunk.max(1)).enumerate() {
                    f(i * per + j, row);
                }
            });
        }
    });
}
