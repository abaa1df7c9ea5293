//! One io_uring per thread, and the futures that wait on it.
//!
//! An [`Op`] owns everything the kernel reads after submission (the iovec
//! array, a timespec) so that memory stays valid until the completion arrives.
//! Submissions are batched: ops push their SQE during a poll and
//! [`Reactor::submit`] makes one `io_uring_enter` for the whole batch after the
//! executor has run everything that was ready.
//!
//! The data buffers an op points at belong to the caller. If an `Op` is dropped
//! before its completion, its `Drop` waits for the completion before returning,
//! so the buffers (dropped after the op, as they were created before it) are
//! never freed while the kernel may still write them.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, types, IoUring};

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(i32),
}

/// The per-thread io_uring and its table of in-flight operations.
pub struct Reactor {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    unsubmitted: Cell<u32>,
    in_flight: Cell<usize>,
    /// The eventfd completions signal (the thread's wake fd).
    notify_fd: RawFd,
    /// Submissions are failing (logged once until they work again).
    failing: Cell<bool>,
}

/// Waits before retrying an `io_uring_enter` that failed for lack of kernel
/// memory (EAGAIN, ENOMEM) or took nothing, and how many times in one
/// [`Reactor::submit`].
const SUBMIT_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
const SUBMIT_RETRIES: u32 = 10;

impl Reactor {
    /// Creates a ring of `entries` submission slots and `cq_entries`
    /// completion slots whose completions also signal `notify_fd`.
    ///
    /// More operations than `cq_entries` may be in flight: the kernel keeps
    /// the completions that do not fit (IORING_FEAT_NODROP) and [`Reactor::reap`]
    /// flushes them into the ring.
    ///
    /// The ring is set up with IORING_SETUP_SUBMIT_ALL where the kernel has
    /// it (5.18): an SQE the kernel refuses (it completes with the error)
    /// does not stop the ones queued behind it; elsewhere
    /// [`Reactor::submit`] submits the rest itself.
    pub fn new(entries: u32, cq_entries: u32, notify_fd: RawFd) -> io::Result<Rc<Self>> {
        match Self::build(entries, cq_entries, notify_fd, true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Self::build(entries, cq_entries, notify_fd, false),
            r => r,
        }
    }

    pub(super) fn build(entries: u32, cq_entries: u32, notify_fd: RawFd, submit_all: bool) -> io::Result<Rc<Self>> {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries);
        if submit_all {
            builder.setup_submit_all();
        }
        let ring = builder.build(entries)?;
        ring.submitter().register_eventfd(notify_fd)?;
        Ok(Rc::new(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            unsubmitted: Cell::new(0),
            in_flight: Cell::new(0),
            notify_fd,
            failing: Cell::new(false),
        }))
    }

    /// Makes `reactor` the current thread's reactor.
    pub fn install(reactor: &Rc<Reactor>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(reactor.clone()));
    }

    /// Removes the current thread's reactor.
    pub fn uninstall() {
        let _ = CURRENT.try_with(|c| c.borrow_mut().take());
    }

    /// The current thread's reactor, if this thread runs one.
    pub fn current() -> Option<Rc<Reactor>> {
        CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
    }

    /// Number of operations submitted or queued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    fn alloc(&self, waker: Waker) -> usize {
        let mut slots = self.slots.borrow_mut();
        self.in_flight.set(self.in_flight.get() + 1);
        if let Some(i) = self.free.borrow_mut().pop() {
            slots[i] = Slot::Waiting(Some(waker));
            return i;
        }
        slots.push(Slot::Waiting(Some(waker)));
        slots.len() - 1
    }

    fn finish(&self, idx: usize) {
        self.slots.borrow_mut()[idx] = Slot::Free;
        self.free.borrow_mut().push(idx);
        self.in_flight.set(self.in_flight.get() - 1);
    }

    fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: every pointer in `entry` refers to memory owned by the
            // `Op` that built it or by its caller, valid until the completion
            // (see the module documentation).
            if unsafe { ring.submission().push(entry) }.is_ok() {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                return Ok(());
            }
            drop(ring);
            self.submit_now()?;
        }
    }

    /// Submits every queued SQE. A partial submission (the kernel refused an
    /// SQE, without SUBMIT_ALL) goes on with the rest; a full completion
    /// ring (EBUSY) is reaped first; a lack of kernel memory is retried a few
    /// times. What is still queued after an error stays counted, so the
    /// next call tries again.
    fn submit_now(&self) -> io::Result<()> {
        let mut retries = 0;
        loop {
            // The ring's own count: what the kernel has not consumed yet.
            let queued = self.ring.borrow_mut().submission().len();
            self.unsubmitted.set(u32::try_from(queued).unwrap_or(u32::MAX));
            if queued == 0 {
                return Ok(());
            }
            let res = self.ring.borrow().submit();
            let res = match res {
                Ok(0) => Err(io::Error::other(format!("the kernel took none of {queued} queued submissions"))),
                r => r,
            };
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap();
                }
                // Out of kernel memory, or (never seen) nothing taken: wait
                // a little, a few times, so that a retry loop through the
                // wake fd cannot spin.
                Err(e) if retries < SUBMIT_RETRIES && e.raw_os_error().is_none_or(|c| c == libc::EAGAIN || c == libc::ENOMEM) => {
                    retries += 1;
                    std::thread::sleep(SUBMIT_RETRY_WAIT);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits every queued SQE with one system call (more only after a
    /// partial submission). If submitting fails, the queued SQEs stay in
    /// the ring and the thread's wake fd is signalled, so its loop comes
    /// back and tries again instead of sleeping with requests unsent.
    pub fn submit(&self) {
        if self.unsubmitted.get() == 0 {
            return;
        }
        match self.submit_now() {
            Ok(()) => {
                if self.failing.replace(false) {
                    log::warn!("io_uring submissions work again");
                }
            }
            Err(e) => {
                if !self.failing.replace(true) {
                    log::error!("io_uring submit failed, retrying: {e}");
                }
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a local array to an eventfd
                // this reactor was created with and that outlives it.
                unsafe { libc::write(self.notify_fd, one.as_ptr().cast(), one.len()) };
            }
        }
    }

    /// Collects completions and wakes their tasks. Returns how many arrived.
    ///
    /// Completions that overflowed the completion ring wait in the kernel
    /// until an `io_uring_enter` with GETEVENTS moves them over; no eventfd
    /// signal announces them again, so this flushes them while the ring
    /// reports an overflow.
    pub fn reap(&self) -> usize {
        let mut wakers = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            loop {
                for cqe in ring.completion() {
                    let idx = cqe.user_data() as usize;
                    if let Some(slot) = slots.get_mut(idx) {
                        if let Slot::Waiting(w) = std::mem::replace(slot, Slot::Done(cqe.result())) {
                            wakers.extend(w);
                        }
                    }
                }
                if !ring.submission().cq_overflow() {
                    break;
                }
                // The crate's submit adds GETEVENTS when the overflow flag is
                // set; it also submits anything queued, which is harmless.
                match ring.submit() {
                    Ok(_) => {
                        let left = ring.submission().len();
                        self.unsubmitted.set(u32::try_from(left).unwrap_or(u32::MAX));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        log::error!("io_uring: cannot flush overflowed completions: {e}");
                        break;
                    }
                }
            }
        }
        let n = wakers.len();
        for w in wakers {
            w.wake();
        }
        n
    }

    fn poll_slot(&self, idx: usize, waker: &Waker) -> Option<i32> {
        let mut slots = self.slots.borrow_mut();
        match &mut slots[idx] {
            Slot::Done(res) => Some(*res),
            Slot::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *w = Some(waker.clone());
                }
                None
            }
            Slot::Free => Some(-libc::EIO),
        }
    }

    fn wait_slot(&self, idx: usize) {
        loop {
            if matches!(self.slots.borrow()[idx], Slot::Done(_) | Slot::Free) {
                return;
            }
            let r = self.ring.borrow().submit_and_wait(1);
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring wait failed: {e}");
                    return;
                }
            }
            let left = self.ring.borrow_mut().submission().len();
            self.unsubmitted.set(u32::try_from(left).unwrap_or(u32::MAX));
            self.reap();
        }
    }
}

/// Memory an op keeps alive until its completion.
enum Keep {
    None,
    Iovecs(#[allow(dead_code)] Vec<libc::iovec>),
    Timespec(#[allow(dead_code)] Box<types::Timespec>),
}

/// A future for one io_uring operation; resolves to the CQE result
/// (a negative errno on failure).
pub struct Op {
    entry: Option<squeue::Entry>,
    _keep: Keep,
    slot: Option<(Rc<Reactor>, usize)>,
}

impl Op {
    /// Wraps an SQE that refers to no memory beyond what the caller keeps alive.
    ///
    /// # Safety
    /// Every buffer `entry` points at must stay valid until this op completes
    /// or is dropped (drop waits for the completion).
    pub unsafe fn new(entry: squeue::Entry) -> Op {
        Op { entry: Some(entry), _keep: Keep::None, slot: None }
    }

    /// A vectored read or write of `iovecs` at `offset`.
    ///
    /// # Safety
    /// The buffers the iovecs describe must stay valid until this op
    /// completes or is dropped.
    pub unsafe fn rw(fd: RawFd, write: bool, iovecs: Vec<libc::iovec>, offset: u64, rw_flags: i32) -> Op {
        let (ptr, n) = (iovecs.as_ptr(), iovecs.len() as u32);
        let entry = if write {
            io_uring::opcode::Writev::new(types::Fd(fd), ptr, n).offset(offset).rw_flags(rw_flags).build()
        } else {
            io_uring::opcode::Readv::new(types::Fd(fd), ptr, n).offset(offset).rw_flags(rw_flags).build()
        };
        Op { entry: Some(entry), _keep: Keep::Iovecs(iovecs), slot: None }
    }

    /// A vectored read or write of an iovec array the caller keeps alive.
    ///
    /// # Safety
    /// `iov..iov+n` and the buffers it describes must stay valid until this op
    /// completes or is dropped.
    pub unsafe fn rw_borrowed(fd: RawFd, write: bool, iov: *const libc::iovec, n: u32, offset: u64, rw_flags: i32) -> Op {
        let entry = if write {
            io_uring::opcode::Writev::new(types::Fd(fd), iov, n).offset(offset).rw_flags(rw_flags).build()
        } else {
            io_uring::opcode::Readv::new(types::Fd(fd), iov, n).offset(offset).rw_flags(rw_flags).build()
        };
        Op { entry: Some(entry), _keep: Keep::None, slot: None }
    }

    /// Asks io_uring to run the op in its worker pool at once instead of
    /// trying it inline first (lets large copies proceed in parallel).
    pub fn force_async(mut self) -> Op {
        if let Some(e) = self.entry.take() {
            self.entry = Some(e.flags(squeue::Flags::ASYNC));
        }
        self
    }

    /// Completes after `dur`.
    pub fn sleep(dur: std::time::Duration) -> Op {
        let ts = Box::new(types::Timespec::from(dur));
        let entry = io_uring::opcode::Timeout::new(&*ts as *const _).build();
        Op { entry: Some(entry), _keep: Keep::Timespec(ts), slot: None }
    }
}

impl Future for Op {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        if let Some((reactor, idx)) = self.slot.take() {
            if let Some(res) = reactor.poll_slot(idx, cx.waker()) {
                reactor.finish(idx);
                return Poll::Ready(res);
            }
            self.slot = Some((reactor, idx));
            return Poll::Pending;
        }
        let Some(reactor) = Reactor::current() else {
            log::error!("block I/O issued on a thread without a reactor");
            return Poll::Ready(-libc::EIO);
        };
        let Some(entry) = self.entry.take() else { return Poll::Ready(-libc::EIO) };
        let idx = reactor.alloc(cx.waker().clone());
        if let Err(e) = reactor.push(&entry.user_data(idx as u64)) {
            reactor.finish(idx);
            return Poll::Ready(-e.raw_os_error().unwrap_or(libc::EIO));
        }
        self.slot = Some((reactor, idx));
        Poll::Pending
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let Some((reactor, idx)) = self.slot.take() {
            reactor.wait_slot(idx);
            reactor.finish(idx);
        }
    }
}
