//! A log-linear latency histogram in nanoseconds.
//!
//! Values below 2^SUB_BITS are counted exactly; above that each power of two is
//! split into 2^SUB_BITS equal buckets, so a bucket is at most 1/64 (1.6 %) of its
//! value wide. The table is allocated once; recording is a few integer
//! instructions and never allocates.

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Groups 0 (exact values) to 58 (values with bit 63 set).
const GROUPS: usize = 64 - SUB_BITS as usize + 1;
const BUCKETS: usize = GROUPS * SUB;

/// Latency histogram with exact count, sum, minimum and maximum.
#[derive(Clone)]
pub struct Histogram {
    buckets: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket a value falls in.
fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let group = shift as usize + 1;
    let low = ((v >> shift) as usize) - SUB;
    group * SUB + low
}

/// The smallest value and the width of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    let (group, low) = (i / SUB, (i % SUB) as u64);
    if group == 0 {
        return (low, 1);
    }
    let shift = group as u32 - 1;
    ((SUB as u64 + low) << shift, 1u64 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            buckets: vec![0u64; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Counts one value (nanoseconds).
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.buckets[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds all values of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean value, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Smallest value, 0 when empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the middle of the bucket holding the
    /// ceil(q * count)-th smallest value, clamped to the exact min and max.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, width) = bucket_range(i);
                let mid = lo + (width - 1) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_monotonic_and_in_range() {
        let mut last = 0;
        let mut v = 0u64;
        while v < (1 << 40) {
            let i = index(v);
            assert!(i >= last && i < BUCKETS, "v={v} i={i}");
            let (lo, w) = bucket_range(i);
            assert!(lo <= v && v < lo + w, "v={v} lo={lo} w={w}");
            last = i;
            v = v + 1 + v / 37;
        }
        assert!(index(u64::MAX) < BUCKETS);
        let (lo, w) = bucket_range(index(u64::MAX));
        assert_eq!(lo.checked_add(w - 1), Some(u64::MAX));
    }

    #[test]
    fn quantiles_within_bucket_error() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!(h.min(), 10);
        assert_eq!(h.max(), 1_000_000);
        for (q, want) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q={q} got={got}");
        }
        assert!((h.mean() - 500_005.0).abs() < 1.0);
    }

    #[test]
    fn empty_and_merge() {
        let mut a = Histogram::new();
        assert_eq!(a.quantile(0.5), 0);
        assert_eq!(a.min(), 0);
        let mut b = Histogram::new();
        b.record(7);
        b.record(9);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.quantile(0.5), 7);
        assert_eq!(a.quantile(1.0), 9);
    }
}
