//! Division by a divisor the kernels know only at run time, as a multiply-high and a shift.

/// n / d for 0 <= n < 2^31 as (umulhi(n, mul) + n) >> shift (Granlund and Montgomery's
/// division by invariant integers): a multiply-high, an add and a shift in the kernels instead of
/// the ~25 instructions of a division by a runtime value. Mirrored by `struct FastDiv` in
/// kernels/common.cuh; the conv and max-pool kernels divide their flat indices with it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastDiv {
    pub mul: u32,
    pub shift: u32,
}

impl FastDiv {
    /// For a divisor 1 <= d < 2^31 (so that shift < 32): shift = ceil(log2 d),
    /// mul = floor(2^32 (2^shift - d) / d) + 1. The ops check that their sizes are below 2^31.
    pub fn new(d: u32) -> FastDiv {
        assert!((1..1 << 31).contains(&d), "FastDiv of {d}: expected 1 <= d < 2^31");
        let shift = 32 - (d - 1).leading_zeros();
        let mul = ((1u64 << 32) * ((1u64 << shift) - d as u64) / d as u64 + 1) as u32;
        FastDiv { mul, shift }
    }
    /// What the kernels compute (for n < 2^31).
    pub fn quotient(self, n: u32) -> u32 {
        let hi = ((n as u64 * self.mul as u64) >> 32) as u32;
        (hi + n) >> self.shift
    }
}

#[cfg(test)]
mod tests {
    use super::FastDiv;

    /// The kernels divide flat indices with FastDiv: it must equal integer division for every
    /// index they can pass (0 <= n < 2^31) and every divisor.
    #[test]
    fn fast_div_equals_division() {
        let mut divisors: Vec<u32> = (1..=3000).collect();
        divisors.extend([2916, 4096, 50_625, 65_535, 65_536, 1_000_003, (1 << 30) + 1, (1 << 31) - 1]);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for d in divisors {
            let f = FastDiv::new(d);
            let mut ns: Vec<u32> = vec![0, 1, d - 1, d, d.saturating_add(1), (1 << 31) - 1, (1 << 31) - 2];
            ns.extend((1..50u32).map(|k| k.saturating_mul(d)).flat_map(|m| [m.saturating_sub(1), m]));
            for _ in 0..200 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                ns.push((rng >> 33) as u32);
            }
            for n in ns.into_iter().filter(|&n| n < 1 << 31) {
                assert_eq!(f.quotient(n), n / d, "{n} / {d} with {f:?}");
            }
        }
    }
}
