//! A per-export log rate limiter: a guest that sends garbage in a loop must
//! not flood the log. At most [`LINES_PER_SEC`] lines per second get out;
//! the first line of the next second says how many were suppressed.
//!
//! Only atomics; used on error paths only, never on the fast path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Lines let through per one-second window.
pub const LINES_PER_SEC: u64 = 10;

/// Counts lines per second and suppresses the excess.
pub struct RateLimiter {
    start: Instant,
    /// Window (seconds since `start`) << 32 | lines logged in it.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter { start: Instant::now(), window: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }
}

impl RateLimiter {
    /// Whether a line may be logged now; `Some(k)` also reports `k` lines
    /// suppressed since the last line that got out.
    pub fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_secs() & 0xffff_ffff;
        let mut cur = self.window.load(Relaxed);
        loop {
            let (win, count) = (cur >> 32, cur & 0xffff_ffff);
            let next = if win == now { count + 1 } else { 1 };
            if next > LINES_PER_SEC {
                self.suppressed.fetch_add(1, Relaxed);
                return None;
            }
            match self.window.compare_exchange_weak(cur, now << 32 | next, Relaxed, Relaxed) {
                Ok(_) => return Some(self.suppressed.swap(0, Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Logs a warning for export `id` if the limit allows.
    pub fn warn(&self, id: &str, args: std::fmt::Arguments<'_>) {
        if let Some(k) = self.admit() {
            if k > 0 {
                log::warn!("vhost-user-blk export '{id}': {args} ({k} similar messages suppressed)");
            } else {
                log::warn!("vhost-user-blk export '{id}': {args}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_lines_per_window_and_counts_the_rest() {
        let r = RateLimiter::default();
        for _ in 0..LINES_PER_SEC {
            assert_eq!(r.admit(), Some(0));
        }
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
        assert_eq!(r.suppressed.load(Relaxed), 2);
        // Pretend the window moved on.
        r.window.store(u64::MAX << 32, Relaxed);
        assert_eq!(r.admit(), Some(2));
        assert_eq!(r.admit(), Some(0));
    }
}
