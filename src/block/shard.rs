//! Per-thread copies of the counters every request updates.
//!
//! A counter that all queue threads of a multi-queue export update is one
//! cache line that moves between their CPUs on every request; with eight
//! queues at a few hundred thousand requests per second each, the line
//! itself becomes the limit. [`Sharded`] keeps [`SHARDS`] cache-padded
//! copies instead: a thread updates the copy at its [`index`] (handed out
//! round-robin the first time the thread asks) and readers fold all copies.
//! Up to [`SHARDS`] threads update disjoint lines; more share copies, which
//! stays correct (the copies are atomics) and only costs the sharing.
//!
//! Measured with two threads on two CPUs of the development VM (scratch
//! program, 5M updates each): a node's statistics update went from 36 ns
//! alone to 70 ns shared, a write tracker's fast path from 4 to 34-44 ns.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

/// Copies per sharded counter set.
pub const SHARDS: usize = 16;

thread_local! {
    /// This thread's shard; `usize::MAX` until it first asks.
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The next shard to hand out.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// This thread's shard index, below [`SHARDS`].
pub fn index() -> usize {
    let i = INDEX.get();
    if i < SHARDS {
        return i;
    }
    let i = NEXT.fetch_add(1, Relaxed) % SHARDS;
    INDEX.set(i);
    i
}

/// [`SHARDS`] cache-padded copies of `T`.
pub struct Sharded<T>(Box<[CachePadded<T>; SHARDS]>);

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded(Box::new(std::array::from_fn(|_| CachePadded::new(T::default()))))
    }
}

impl<T> Sharded<T> {
    /// This thread's copy.
    pub fn local(&self) -> &T {
        self.at(index())
    }

    /// The copy at `i` (taken modulo [`SHARDS`]).
    pub fn at(&self, i: usize) -> &T {
        &self.0[i % SHARDS]
    }

    /// Every copy, for readers that fold them.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|c| &**c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn threads_get_their_own_copy_and_readers_see_all() {
        let s: Sharded<AtomicU64> = Sharded::default();
        let mine = index();
        assert_eq!(index(), mine, "a thread keeps its shard");
        s.local().fetch_add(1, Relaxed);
        let theirs = std::thread::scope(|sc| {
            sc.spawn(|| {
                s.local().fetch_add(10, Relaxed);
                index()
            })
            .join()
            .expect("thread")
        });
        assert!(theirs < SHARDS);
        assert_eq!(s.iter().map(|c| c.load(Relaxed)).sum::<u64>(), 11);
        if theirs != mine {
            assert_eq!(s.at(mine).load(Relaxed), 1, "the other thread wrote its own copy");
        }
        // Copies do not share a cache line.
        let a = s.at(0) as *const AtomicU64 as usize;
        let b = s.at(1) as *const AtomicU64 as usize;
        assert!(b - a >= 64);
    }
}
