//! Request flags and overlap serialisation.
//!
//! A write whose head or tail is not aligned to the driver's
//! `request_alignment` becomes a read-modify-write (RMW) of whole blocks. An
//! RMW must not interleave with any other write to the blocks it touches, or
//! the older data it read back would overwrite the newer write. The
//! [`Tracker`] makes RMW writes *serialising*:
//!
//! - An ordinary (aligned) write takes the fast path — two atomic operations
//!   on its thread's own counter ([`Sharded`]), no lock — as long as no
//!   serialising write exists on the node.
//! - A serialising write announces itself, waits until the fast-path writes
//!   already in flight have drained, and enters the tracked list.
//! - While any serialising write exists, every write enters the tracked list
//!   and waits for overlapping serialising entries (and a serialising write
//!   waits for every overlapping entry) to finish.
//!
//! Waiting is asynchronous (`event-listener`): a waiting request never blocks
//! its queue thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use event_listener::Event;

use super::shard::{self, Sharded};

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

/// Tracks in-flight writes of one node for overlap serialisation.
#[derive(Default)]
pub struct Tracker {
    /// Fast-path writes in flight, per thread.
    fast: Sharded<AtomicUsize>,
    serialising: AtomicUsize,
    next_id: AtomicU64,
    list: Mutex<Vec<Entry>>,
    changed: Event,
}

/// Held while a write is in flight; dropping it lets waiters go.
pub struct WriteGuard<'a> {
    tracker: &'a Tracker,
    tracked: Option<u64>,
    serialising: bool,
    /// The `fast` copy a fast-path write counted itself in.
    shard: usize,
}

impl Tracker {
    /// Registers a write to `[start, end)`; waits while it conflicts.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> WriteGuard<'_> {
        if serialising {
            self.serialising.fetch_add(1, SeqCst);
            self.wait_fast_drained().await;
        } else if let Some(g) = self.try_begin_fast() {
            return g;
        }
        let id = self.next_id.fetch_add(1, SeqCst);
        let entry = Entry { id, start, end, serialising };
        loop {
            if self.try_insert(entry) {
                return WriteGuard { tracker: self, tracked: Some(id), serialising, shard: 0 };
            }
            let listener = self.changed.listen();
            if self.try_insert(entry) {
                return WriteGuard { tracker: self, tracked: Some(id), serialising, shard: 0 };
            }
            listener.await;
        }
    }

    /// The fast path of [`Self::begin`] for a non-serialising write, which
    /// never waits: `None` while a serialising write exists (the write must
    /// then go through `begin`).
    pub fn try_begin_fast(&self) -> Option<WriteGuard<'_>> {
        // Sequentially consistent with `begin`'s increment of `serialising`
        // and its reads of every copy of `fast`: either this write sees the
        // serialising write, or the serialising write sees this one.
        let shard = shard::index();
        let fast = self.fast.at(shard);
        fast.fetch_add(1, SeqCst);
        if self.serialising.load(SeqCst) == 0 {
            return Some(WriteGuard { tracker: self, tracked: None, serialising: false, shard });
        }
        fast.fetch_sub(1, SeqCst);
        self.changed.notify(usize::MAX);
        None
    }

    fn fast_drained(&self) -> bool {
        self.fast.iter().all(|c| c.load(SeqCst) == 0)
    }

    async fn wait_fast_drained(&self) {
        while !self.fast_drained() {
            let listener = self.changed.listen();
            if self.fast_drained() {
                return;
            }
            listener.await;
        }
    }

    fn try_insert(&self, e: Entry) -> bool {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let conflict = list
            .iter()
            .any(|o| o.start < e.end && e.start < o.end && (o.serialising || e.serialising));
        if !conflict {
            list.push(e);
        }
        !conflict
    }

    fn end(&self, guard: &WriteGuard<'_>) {
        match guard.tracked {
            None => {
                self.fast.at(guard.shard).fetch_sub(1, SeqCst);
                if self.serialising.load(SeqCst) != 0 {
                    self.changed.notify(usize::MAX);
                }
            }
            Some(id) => {
                {
                    let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
                    list.retain(|e| e.id != id);
                }
                if guard.serialising {
                    self.serialising.fetch_sub(1, SeqCst);
                }
                self.changed.notify(usize::MAX);
            }
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.tracker.end(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn serialising_write_waits_for_overlapping_fast_write() {
        let rt = crate::runtime::Runtime::new().expect("runtime");
        let t = Rc::new(Tracker::default());
        let order = Rc::new(RefCell::new(Vec::new()));
        rt.block_on({
            let t = t.clone();
            async move {
                let g = t.begin(0, 4096, false).await;
                assert!(g.tracked.is_none(), "no serialising write: fast path");
                // Leak the guard into the test so it stays "in flight".
                std::mem::forget(g);
            }
        });
        {
            let (t, order) = (t.clone(), order.clone());
            rt.spawn(async move {
                let _g = t.begin(512, 1024, true).await;
                order.borrow_mut().push("rmw");
            });
        }
        rt.turn();
        assert!(order.borrow().is_empty(), "rmw must wait for the in-flight fast write");
        // End the forgotten fast write by hand.
        drop(WriteGuard { tracker: &t, tracked: None, serialising: false, shard: shard::index() });
        rt.turn();
        assert_eq!(*order.borrow(), vec!["rmw"]);
    }

    #[test]
    fn serialising_write_waits_for_fast_writes_of_other_threads() {
        let rt = crate::runtime::Runtime::new().expect("runtime");
        let t: &'static Tracker = Box::leak(Box::default());
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let g = t.try_begin_fast().expect("no serialising write yet");
            let _ = started_tx.send(shard::index());
            let _ = wait.recv();
            drop(g);
        });
        let their_shard = started.recv().expect("started");
        assert_ne!(t.fast.at(their_shard).load(SeqCst), 0, "counted in the other thread's copy");
        let done = Rc::new(std::cell::Cell::new(false));
        {
            let done = done.clone();
            rt.spawn(async move {
                let _g = t.begin(0, 512, true).await;
                done.set(true);
            });
        }
        rt.turn();
        assert!(!done.get(), "the serialising write must wait for the other thread's fast write");
        assert!(t.try_begin_fast().is_none(), "no fast path while a serialising write waits");
        let _ = release.send(());
        other.join().expect("other thread");
        rt.block_on({
            let done = done.clone();
            async move {
                while !done.get() {
                    crate::runtime::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        });
        assert!(t.fast_drained());
    }

    #[test]
    fn writes_wait_for_overlapping_serialising_entry_only() {
        let rt = crate::runtime::Runtime::new().expect("runtime");
        let t: &'static Tracker = Box::leak(Box::default());
        let order = Rc::new(RefCell::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Rc::new(RefCell::new(Some(rx)));
        {
            let order = order.clone();
            rt.spawn(async move {
                let g = t.begin(0, 4096, true).await;
                order.borrow_mut().push("rmw-start");
                // Yield until the test says go.
                while rx.borrow().as_ref().is_some_and(|r| r.try_recv().is_err()) {
                    crate::runtime::sleep(std::time::Duration::from_millis(1)).await;
                }
                order.borrow_mut().push("rmw-end");
                drop(g);
            });
        }
        rt.turn();
        for (name, start) in [("overlap", 1024u64), ("disjoint", 8192)] {
            let order = order.clone();
            rt.spawn(async move {
                let _g = t.begin(start, start + 512, false).await;
                order.borrow_mut().push(name);
            });
        }
        rt.turn();
        assert_eq!(*order.borrow(), vec!["rmw-start", "disjoint"]);
        tx.send(()).expect("send");
        rt.drain();
        assert_eq!(*order.borrow(), vec!["rmw-start", "disjoint", "rmw-end", "overlap"]);
    }
}
