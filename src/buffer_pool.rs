//! The buffer cache behind every device allocation: a buffer that is dropped goes back to a
//! free list keyed by (element type, length), and the next request of that type and length takes
//! it instead of allocating. A training step asks for the same buffers in the same order every
//! time, so from the second step on it allocates nothing: no driver or pool call, only a
//! hash-map lookup per tensor.
//!
//! Reuse is safe without synchronisation because each device has one stream: a buffer is dropped
//! on the host after the kernels that use it were queued, and whatever kernel writes it next is
//! queued after them. The cache holds at most `cap_bytes`; a buffer that would exceed it is freed
//! instead (back to the driver's stream-ordered pool), and `clear` empties the cache, which the
//! device does before retrying an allocation that ran out of memory.
//!
//! Generic over the buffer type (`B`: `CudaSlice<T>` on a GPU) so that the bookkeeping is tested on
//! machines without one.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Mutex;

/// Counters since the cache was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Requests that found no cached buffer and allocated.
    pub fresh: u64,
    /// Requests served from the cache.
    pub reused: u64,
    /// Bytes held in the cache now (free buffers only).
    pub cached_bytes: usize,
}

/// A cached buffer, type-erased, with its size in bytes.
type Cached = (Box<dyn Any + Send>, usize);

#[derive(Default)]
struct State {
    /// Free buffers by (buffer type, element count).
    free: HashMap<(TypeId, usize), Vec<Cached>>,
    stats: PoolStats,
}

pub struct BufferPool {
    cap_bytes: usize,
    state: Mutex<State>,
}

impl BufferPool {
    pub fn new(cap_bytes: usize) -> Self {
        BufferPool { cap_bytes, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every update is one call).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A cached buffer of type B and `len` elements, if there is one; else None, counted as a
    /// fresh allocation (the caller allocates).
    pub fn take<B: Any + Send>(&self, len: usize) -> Option<B> {
        let mut s = self.state();
        let found = s.free.get_mut(&(TypeId::of::<B>(), len)).and_then(Vec::pop);
        match found {
            Some((buf, bytes)) => {
                s.stats.reused += 1;
                s.stats.cached_bytes -= bytes;
                // The key holds the type: the downcast cannot fail.
                buf.downcast::<B>().ok().map(|b| *b)
            }
            None => {
                s.stats.fresh += 1;
                None
            }
        }
    }

    /// Returns a buffer of `len` elements and `bytes` bytes to the cache, or drops it (freeing it)
    /// when the cache is full.
    pub fn give<B: Any + Send>(&self, len: usize, bytes: usize, buf: B) {
        let mut s = self.state();
        if s.stats.cached_bytes + bytes > self.cap_bytes {
            drop(s);
            drop(buf);
            return;
        }
        s.stats.cached_bytes += bytes;
        s.free.entry((TypeId::of::<B>(), len)).or_default().push((Box::new(buf), bytes));
    }

    /// Frees every cached buffer.
    pub fn clear(&self) {
        let free = {
            let mut s = self.state();
            s.stats.cached_bytes = 0;
            std::mem::take(&mut s.free)
        };
        drop(free); // outside the lock: freeing calls the driver
    }

    pub fn stats(&self) -> PoolStats {
        self.state().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_type_and_length() {
        let pool = BufferPool::new(1 << 20);
        assert_eq!(pool.take::<Vec<f32>>(4), None);
        pool.give(4, 16, vec![1.0f32; 4]);
        assert_eq!(pool.take::<Vec<u32>>(4), None, "another type");
        assert_eq!(pool.take::<Vec<f32>>(5), None, "another length");
        assert_eq!(pool.take::<Vec<f32>>(4), Some(vec![1.0f32; 4]));
        assert_eq!(pool.take::<Vec<f32>>(4), None, "taken once");
        assert_eq!(pool.stats(), PoolStats { fresh: 4, reused: 1, cached_bytes: 0 });
    }

    #[test]
    fn frees_beyond_the_cap_and_on_clear() {
        let pool = BufferPool::new(100);
        pool.give(10, 60, vec![0u8; 10]);
        pool.give(10, 60, vec![0u8; 10]); // 120 > 100: freed
        assert_eq!(pool.stats().cached_bytes, 60);
        assert!(pool.take::<Vec<u8>>(10).is_some());
        assert!(pool.take::<Vec<u8>>(10).is_none());
        pool.give(10, 60, vec![0u8; 10]);
        pool.clear();
        assert_eq!(pool.stats().cached_bytes, 0);
        assert!(pool.take::<Vec<u8>>(10).is_none());
    }
}
