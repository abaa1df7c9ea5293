//! The per-queue request pipeline, independent of the vhost-user plumbing
//! (so the unit tests drive it with virtio-queue's mock queues):
//!
//! 1. [`QueueCtx::pop_and_start`] pops the available chains, up to a limit
//!    (with EVENT_IDX: disable notifications, pop, re-enable, pop again if
//!    the guest raced us; a pop that reaches the limit returns with
//!    notifications still off, and the worker comes back for the rest after
//!    completing this chunk), parses each one and spawns one task per valid
//!    request on the thread's runtime. Refused chains complete at once.
//! 2. The caller runs the runtime ([`Runtime::turn`]): every task that can
//!    run does, and their I/O goes to io_uring in one submission.
//! 3. [`QueueCtx::complete`] moves everything that finished into the used
//!    ring in one go and says whether the guest needs an interrupt.
//!
//! Finished requests are collected in a list owned by the queue thread (no
//! lock, and no allocation once the list has grown), in completion order —
//! requests complete out of order.
//!
//! Request tasks are never cancelled: a started request runs to completion
//! (a worker drains its runtime before dropping it), and it holds the guest
//! memory snapshot its buffers point into, so memory the kernel may still be
//! reading or writing is never unmapped under it. The queue keeps the
//! snapshot it last loaded while it works ([`QueueCtx::release_memory`]
//! when it goes idle), and its requests share it through an `Rc`: an `Arc`
//! clone per request would write the one reference count that every queue
//! thread of the export shares.
//!
//! After the frontend went away the context is *detached*: requests still in
//! flight run to completion against the node, but nothing more is written to
//! the used ring. The frontend re-submits everything past the used index
//! when it reconnects (QEMU restores `last_avail_idx` from the used index),
//! and a used-ring write racing with that would complete a request twice.

use std::cell::{Cell, RefCell};
use std::num::Wrapping;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::device::Device;
use super::request::{self, parse, Desc, Parsed, Reason, Request, S_IOERR};
use super::ring::Rings;
use crate::block::BlockError;
use crate::runtime::Runtime;

/// Per-queue state living on the queue's thread.
pub struct QueueCtx {
    dev: Arc<Device>,
    index: u16,
    done: RefCell<Vec<(u16, u32)>>,
    scratch: RefCell<Vec<Desc>>,
    detached: Cell<bool>,
    /// The guest memory snapshot this thread loaded last (see the module docs).
    mem: RefCell<Option<MemRef>>,
}

/// A guest memory snapshot as the requests of one queue thread share it.
pub type MemRef = Rc<Arc<GuestMemoryMmap>>;

impl QueueCtx {
    /// A context for queue `index` of `dev`.
    pub fn new(dev: Arc<Device>, index: u16) -> Rc<Self> {
        Rc::new(QueueCtx { dev, index, done: RefCell::new(Vec::new()), scratch: RefCell::new(Vec::new()), detached: Cell::new(false), mem: RefCell::new(None) })
    }

    /// Stops writing to the used ring (the frontend is gone).
    pub fn detach(&self) {
        self.detached.set(true);
        self.release_memory();
    }

    /// The current guest memory snapshot: the one this thread holds while
    /// the frontend has not changed the memory table, else the new one.
    fn snapshot(&self, gm: &GuestMemoryAtomic<GuestMemoryMmap>) -> MemRef {
        let now = gm.memory();
        let mut held = self.mem.borrow_mut();
        // The held `Arc` keeps its snapshot alive, so an equal address
        // is the same snapshot, never a new one at a reused address.
        if let Some(m) = held.as_ref().filter(|m| std::ptr::eq(Arc::as_ptr(m), &*now)) {
            return m.clone();
        }
        let m = Rc::new(now.into_inner());
        *held = Some(m.clone());
        m
    }

    /// Drops the held snapshot (requests in flight keep theirs): called
    /// before the queue thread sleeps, so memory the frontend removed
    /// meanwhile is not kept mapped by an idle queue.
    pub fn release_memory(&self) {
        self.mem.borrow_mut().take();
    }

    /// Pops every available chain and starts it. Without a runtime (`rt` is
    /// `None`: this thread could not set one up) every request fails with
    /// IOERR. Returns the number of chains popped.
    ///
    /// With `rearm` false the pop leaves guest notifications off: a polling
    /// worker looks at the ring again soon anyway, and must call
    /// [`Self::rearm`] before it stops polling.
    pub fn pop_and_start(self: &Rc<Self>, rt: Option<&Runtime>, queue: &mut Queue, gm: &GuestMemoryAtomic<GuestMemoryMmap>, limit: usize, rearm: bool) -> usize {
        let event_idx = queue.event_idx_enabled();
        let mut popped = 0;
        loop {
            // Without EVENT_IDX this sets NO_NOTIFY, which only a polling
            // pop wants (a normal pop would have to clear it again at once).
            if event_idx || !rearm {
                if let Err(e) = queue.disable_notification(&*gm.memory()) {
                    self.warn(format_args!("cannot disable notifications: {e}"));
                }
            }
            popped += self.pop_batch(rt, queue, gm, limit - popped);
            if popped >= limit || !rearm {
                // More may be waiting: the caller comes back with
                // notifications still off.
                break;
            }
            if !event_idx {
                break;
            }
            match queue.enable_notification(&*gm.memory()) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warn(format_args!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        popped
    }

    /// Turns guest notifications back on after polling pops. Returns true
    /// when chains arrived meanwhile (the caller must pop them: the guest
    /// will not kick for them).
    pub fn rearm(&self, queue: &mut Queue, gm: &GuestMemoryAtomic<GuestMemoryMmap>) -> bool {
        match queue.enable_notification(&*gm.memory()) {
            Ok(more) => more,
            Err(e) => {
                self.warn(format_args!("cannot enable notifications: {e}"));
                false
            }
        }
    }

    /// Pops the chains available now. The available index is read first and
    /// the guest memory map loaded after it: every region the driver added
    /// (ADD_MEM_REG) before publishing these chains is then in the map, so
    /// no valid request is refused for pointing at memory added a moment ago.
    fn pop_batch(self: &Rc<Self>, rt: Option<&Runtime>, queue: &mut Queue, gm: &GuestMemoryAtomic<GuestMemoryMmap>, limit: usize) -> usize {
        if !queue.ready() {
            return 0;
        }
        let ring_mem = self.snapshot(gm);
        let Some(rings) = Rings::new(queue, &ring_mem) else {
            return self.pop_batch_slow(rt, queue, gm, limit);
        };
        let avail = rings.avail_idx();
        let next = Wrapping(queue.next_avail());
        let pending = (Wrapping(avail) - next).0;
        if pending > queue.size() {
            // A corrupt available index: nothing can be popped safely.
            self.warn(format_args!("cannot read the available ring: index {avail} is {pending} entries past {}", next.0));
            return 0;
        }
        let pending = usize::from(pending).min(limit);
        if pending == 0 {
            return 0;
        }
        // Loaded after the index: see above.
        let mem = self.snapshot(gm);
        let g = self.dev.geometry();
        let mut scratch = self.scratch.borrow_mut();
        rings.prefetch(&mem, next.0, pending);
        let mut idx = next;
        for _ in 0..pending {
            let head = rings.avail_head(idx.0);
            idx += Wrapping(1);
            rings.walk(&mem, head, &mut scratch);
            let parsed = request::parse_descs(head, &scratch, &mem, &g);
            self.start(rt, parsed, &mem);
        }
        queue.set_next_avail(idx.0);
        pending
    }

    /// [`Self::pop_batch`] through virtio-queue's iterators, for rings
    /// [`Rings`] cannot map directly.
    fn pop_batch_slow(self: &Rc<Self>, rt: Option<&Runtime>, queue: &mut Queue, gm: &GuestMemoryAtomic<GuestMemoryMmap>, limit: usize) -> usize {
        let avail = match queue.avail_idx(&*gm.memory(), Ordering::Acquire) {
            Ok(idx) => idx,
            Err(e) => {
                self.warn(format_args!("cannot read the available index: {e}"));
                return 0;
            }
        };
        let pending = usize::from((avail - Wrapping(queue.next_avail())).0).min(limit);
        if pending == 0 {
            return 0;
        }
        let mem = self.snapshot(gm);
        let g = self.dev.geometry();
        let iter = match queue.iter(&**mem) {
            Ok(iter) => iter,
            Err(virtio_queue::Error::QueueNotReady) => return 0,
            Err(e) => {
                // A corrupt available index: nothing can be popped safely.
                self.warn(format_args!("cannot read the available ring: {e}"));
                return 0;
            }
        };
        let mut n = 0;
        let mut scratch = self.scratch.borrow_mut();
        for chain in iter.take(pending) {
            n += 1;
            let parsed = parse(chain, &mem, &g, &mut scratch);
            self.start(rt, parsed, &mem);
        }
        n
    }

    fn start(self: &Rc<Self>, rt: Option<&Runtime>, parsed: Parsed, mem: &GuestMemoryMmap) {
        match parsed {
            Parsed::Ok(req) => match rt {
                Some(rt) => {
                    let dev = &self.dev;
                    if let Some(out) = req.execute_now(&dev.node, &dev.id_bytes, dev.write_through()) {
                        self.finish(&req, out);
                        return;
                    }
                    let ctx = self.clone();
                    rt.spawn(async move { ctx.run(req).await });
                }
                None => {
                    let used = if req.write_status(S_IOERR) { 1 } else { 0 };
                    self.done.borrow_mut().push((req.head, used));
                }
            },
            Parsed::Fail { head, status, code, why } => {
                self.dev.count_refused();
                self.warn(format_args!("request refused (status {code}): {why}"));
                let used = if request::write_status(mem, status, code) { 1 } else { 0 };
                self.done.borrow_mut().push((head, used));
            }
            Parsed::Drop { head, why } => {
                self.dev.count_refused();
                self.warn(format_args!("chain {head} returned without status: {why}"));
                self.done.borrow_mut().push((head, 0));
            }
        }
    }

    async fn run(&self, req: Request) {
        let out = req.execute(&self.dev.node, &self.dev.id_bytes, self.dev.write_through()).await;
        self.finish(&req, out);
    }

    /// Writes a finished request's status and queues it for the used ring.
    fn finish(&self, req: &Request, (code, mut used, err): (u8, u32, Option<BlockError>)) {
        if let Some(e) = err {
            self.warn(format_args!("{:?} at {}+{} failed: {e}", req.op, req.offset, req.len));
        }
        if !req.write_status(code) {
            self.warn(format_args!("chain {}: {}", req.head, Reason::StatusOutsideMemory));
            used = 0;
        }
        self.done.borrow_mut().push((req.head, used));
    }

    /// Number of finished requests not yet in the used ring.
    pub fn pending_completions(&self) -> usize {
        self.done.borrow().len()
    }

    /// Moves finished requests into the used ring. Returns whether the
    /// driver wants an interrupt for them.
    pub fn complete(&self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut done = self.done.borrow_mut();
        if done.is_empty() {
            return false;
        }
        if self.detached.get() {
            done.clear();
            return false;
        }
        let Some(rings) = Rings::new(queue, mem) else {
            for &(head, len) in done.iter() {
                if let Err(e) = queue.add_used(mem, head, len) {
                    self.warn(format_args!("cannot return chain {head} to the used ring: {e}"));
                }
            }
            done.clear();
            return queue.needs_notification(mem).unwrap_or(true);
        };
        let old = queue.next_used();
        let mut idx = Wrapping(old);
        for &(head, len) in done.iter() {
            if head >= queue.size() {
                self.warn(format_args!("cannot return chain {head} to the used ring: index out of range"));
                continue;
            }
            rings.put_used(idx.0, head, len);
            idx += Wrapping(1);
        }
        done.clear();
        queue.set_next_used(idx.0);
        rings.publish_used(idx.0);
        rings.needs_interrupt(old, idx.0)
    }

    /// Logs a rate-limited warning about this queue.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) {
        self.dev.log.warn(self.dev.id(), format_args!("queue {}: {args}", self.index));
    }
}
