//! A per-thread task queue built on `async-task`.
//!
//! Each worker thread owns one [`Executor`]. Tasks are `!Send` futures spawned
//! on it; a waker may be called from any thread (a throttle timer, a blkdebug
//! resume from the control thread, an I/O thread pool). A wake from the owning
//! thread only queues the task; a wake from another thread also writes the
//! worker's eventfd so its epoll loop comes back and runs the task.
//!
//! Futures spawned here are always run to completion: [`Executor`] never drops
//! a pending task while its thread is alive except through
//! [`Executor::drain`], which first runs every task to the end. I/O futures
//! rely on that (see `reactor`).

use std::cell::Cell;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use async_task::Runnable;
use concurrent_queue::ConcurrentQueue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

thread_local! {
    /// Address of the `Shared` of the executor that runs on this thread (0 if none).
    static OWNER: Cell<usize> = const { Cell::new(0) };
}

struct Shared {
    queue: ConcurrentQueue<Runnable>,
    wake: EventFd,
}

impl Shared {
    fn schedule(self: &Arc<Self>, runnable: Runnable) {
        // The queue is unbounded, so push only fails when closed, at shutdown.
        if self.queue.push(runnable).is_err() {
            return;
        }
        let me = Arc::as_ptr(self) as usize;
        if OWNER.try_with(|o| o.get()).unwrap_or(0) != me {
            // A full eventfd counter means a wake-up is already pending.
            let _ = self.wake.write(1);
        }
    }
}

/// A single-threaded executor whose wake-ups arrive on an eventfd.
pub struct Executor {
    shared: Arc<Shared>,
}

impl Executor {
    /// Creates an executor for the current thread.
    pub fn new() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: ConcurrentQueue::unbounded(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        });
        OWNER.with(|o| o.set(Arc::as_ptr(&shared) as usize));
        Ok(Executor { shared })
    }

    /// The eventfd that becomes readable when a task was woken from another
    /// thread (the reactor registers it for io_uring completions as well).
    pub fn wake_fd(&self) -> &EventFd {
        &self.shared.wake
    }

    /// Raw fd of [`Self::wake_fd`].
    pub fn wake_raw_fd(&self) -> i32 {
        self.shared.wake.as_raw_fd()
    }

    /// Clears the eventfd after a wake-up.
    pub fn clear_wake(&self) {
        let _ = self.shared.wake.read();
    }

    /// Spawns a task; it runs on the next [`Self::run_ready`].
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + 'static,
    {
        let shared = self.shared.clone();
        let (runnable, task) = async_task::spawn_local(fut, move |r| shared.schedule(r));
        task.detach();
        runnable.schedule();
    }

    /// Runs queued tasks until none is ready or `budget` polls were made.
    /// Returns the number of polls.
    pub fn run_ready(&self, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            match self.shared.queue.pop() {
                Ok(r) => {
                    r.run();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    /// Whether a task is waiting to run.
    pub fn has_ready(&self) -> bool {
        !self.shared.queue.is_empty()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = OWNER.try_with(|o| {
            if o.get() == Arc::as_ptr(&self.shared) as usize {
                o.set(0)
            }
        });
        self.shared.queue.close();
        while let Ok(r) = self.shared.queue.pop() {
            drop(r);
        }
    }
}
