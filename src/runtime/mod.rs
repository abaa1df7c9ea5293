//! The per-thread asynchronous runtime: an executor and an io_uring reactor
//! sharing one eventfd.
//!
//! Every thread that performs block I/O runs one [`Runtime`]: export queue
//! workers (driven by their own epoll loop through [`Runtime::turn`]), NBD
//! connections and the control thread (through [`Runtime::block_on`]).
//! Driver futures find the thread's io_uring through [`Reactor::current`].

pub mod affinity;
mod executor;
mod reactor;

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::rc::Rc;

pub use executor::Executor;
pub use reactor::{Op, Reactor};

/// Size of each thread's submission queue. A larger batch is submitted in
/// several calls (`Reactor::push` submits when the queue is full).
const RING_ENTRIES: u32 = 128;
/// Size of each thread's completion queue: a queue of QEMU's default size
/// (256) completes into it without overflowing; more in flight is still
/// correct (see `Reactor::reap`). Every entry of both rings is resident
/// memory (64 bytes per SQE, 16 per CQE), so they are kept this small.
const RING_CQ_ENTRIES: u32 = 512;
/// How many task polls one turn makes before looking at the ring again.
const POLL_BUDGET: usize = 256;

/// Counts a spawned task as live until it is dropped: when it finishes, and
/// also when it panics (the executor drops a future that panicked), so
/// [`Runtime::drain`] does not wait for a task that will never finish (a
/// failed assertion in a test would otherwise hang it).
struct Live(Rc<Cell<usize>>);

impl Live {
    fn new(count: &Rc<Cell<usize>>) -> Live {
        count.set(count.get() + 1);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// An executor and a reactor for the current thread.
pub struct Runtime {
    exec: Executor,
    reactor: Rc<Reactor>,
    live: Rc<Cell<usize>>,
}

impl Runtime {
    /// Creates the runtime and installs its reactor as the thread's current one.
    pub fn new() -> io::Result<Self> {
        Self::with_rings(RING_ENTRIES, RING_CQ_ENTRIES)
    }

    fn with_rings(entries: u32, cq_entries: u32) -> io::Result<Self> {
        Self::with_reactor(|fd| Reactor::new(entries, cq_entries, fd))
    }

    /// A runtime whose ring lacks IORING_SETUP_SUBMIT_ALL, as on kernels
    /// before 5.18.
    #[cfg(test)]
    fn without_submit_all() -> io::Result<Self> {
        Self::with_reactor(|fd| Reactor::build(RING_ENTRIES, RING_CQ_ENTRIES, fd, false))
    }

    /// The runtime around the reactor `make` creates for the wake fd.
    fn with_reactor(make: impl FnOnce(i32) -> io::Result<Rc<Reactor>>) -> io::Result<Self> {
        let exec = Executor::new()?;
        let reactor = make(exec.wake_raw_fd())?;
        Reactor::install(&reactor);
        Ok(Runtime { exec, reactor, live: Rc::new(Cell::new(0)) })
    }

    /// The fd to watch for readiness (task wake-ups and io_uring completions).
    pub fn wake_fd(&self) -> i32 {
        self.exec.wake_raw_fd()
    }

    /// Spawns a task on this thread.
    pub fn spawn<F: Future<Output = ()> + 'static>(&self, fut: F) {
        let live = Live::new(&self.live);
        self.exec.spawn(async move {
            let _live = live;
            fut.await;
        });
    }

    /// Number of spawned tasks that have not finished.
    pub fn live_tasks(&self) -> usize {
        self.live.get()
    }

    /// Runs everything that can run without blocking: ready tasks, one
    /// batched submission, completions; repeated until nothing moves.
    pub fn turn(&self) {
        self.exec.clear_wake();
        self.run_pending();
    }

    /// Like [`Runtime::turn`] but leaves the wake fd as it is: for callers
    /// that run because of some other event (a guest kick, a poll loop) and
    /// so need not pay a syscall to clear a wake-up that may not be there.
    /// A pending wake-up stays readable and is handled by the next `turn`.
    pub fn run_pending(&self) {
        loop {
            let ran = self.exec.run_ready(POLL_BUDGET);
            self.reactor.submit();
            let reaped = self.reactor.reap();
            if ran == 0 && reaped == 0 && !self.exec.has_ready() {
                break;
            }
        }
    }

    /// Blocks until the wake fd is readable.
    pub fn wait(&self) {
        let mut pfd = libc::pollfd { fd: self.wake_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, -1) };
    }

    /// Runs `fut` (and any tasks it spawns) on this thread until it completes.
    pub fn block_on<F: Future + 'static>(&self, fut: F) -> F::Output
    where
        F::Output: 'static,
    {
        let out = Rc::new(Cell::new(None));
        let slot = out.clone();
        self.spawn(async move { slot.set(Some(fut.await)) });
        loop {
            self.turn();
            if let Some(v) = out.take() {
                return v;
            }
            if !self.exec.has_ready() {
                self.wait();
            }
        }
    }

    /// Runs until every spawned task has finished.
    pub fn drain(&self) {
        while self.live.get() > 0 {
            self.turn();
            if self.live.get() > 0 && !self.exec.has_ready() {
                self.wait();
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // A panicking thread must not wait for tasks that may never finish;
        // in-flight io_uring ops still wait for their completions as they drop.
        if !std::thread::panicking() {
            self.drain();
        }
        Reactor::uninstall();
    }
}

/// Runs `fut` to completion on a runtime for the current thread, creating one
/// if the thread has none. For threads outside the export workers (control
/// socket, tests, command-line tools).
pub fn block_on<F: Future + 'static>(fut: F) -> io::Result<F::Output>
where
    F::Output: 'static,
{
    thread_local! {
        static RT: std::cell::OnceCell<Runtime> = const { std::cell::OnceCell::new() };
    }
    RT.with(|cell| {
        if cell.get().is_none() {
            let rt = Runtime::new()?;
            let _ = cell.set(rt);
        }
        match cell.get() {
            Some(rt) => Ok(rt.block_on(fut)),
            None => Err(io::Error::other("no runtime")),
        }
    })
}

/// Sleeps for `dur` without blocking the thread.
pub async fn sleep(dur: std::time::Duration) {
    let _ = Op::sleep(dur).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn a_task_that_panics_is_no_longer_live() {
        let rt = Runtime::new().expect("runtime");
        rt.spawn(async {});
        rt.spawn(async { panic!("injected") });
        assert_eq!(rt.live_tasks(), 2);
        // The panic comes out of the poll; the task must not stay counted,
        // or `drain` (and a runtime's drop) would wait for it forever.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.turn()));
        assert!(r.is_err(), "the panic reaches the caller");
        rt.turn();
        assert_eq!(rt.live_tasks(), 0);
        rt.drain();
    }

    /// More operations in flight than both rings hold: submissions go out in
    /// several calls, and the completions that overflow the completion ring
    /// are flushed from the kernel instead of being waited for forever.
    #[test]
    fn more_ops_in_flight_than_the_rings_hold() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = Runtime::with_rings(4, 8).expect("runtime");
            let done = Rc::new(Cell::new(0usize));
            for _ in 0..300 {
                let done = done.clone();
                rt.spawn(async move {
                    // SAFETY: a NOP refers to no memory.
                    let res = unsafe { Op::new(io_uring::opcode::Nop::new().build()) }.await;
                    assert_eq!(res, 0);
                    done.set(done.get() + 1);
                });
            }
            rt.drain();
            let _ = tx.send(done.get());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(done, Ok(300), "every op completes");
    }

    /// An SQE the kernel refuses when it is submitted (an unknown
    /// personality: EINVAL) completes with the error, and the SQE queued
    /// behind it in the same submission still goes out and completes, with
    /// SUBMIT_ALL and without it (then the kernel stops at the refused one
    /// and the reactor submits the rest). Before, the second one sat in the
    /// ring until some other submission, which here never comes.
    #[test]
    fn a_refused_submission_does_not_hold_back_the_next() {
        for submit_all in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = if submit_all { Runtime::new() } else { Runtime::without_submit_all() }.expect("runtime");
                let results = Rc::new(RefCell::new(Vec::new()));
                for personality in [0xfffe_u16, 0] {
                    let results = results.clone();
                    rt.spawn(async move {
                        let nop = io_uring::opcode::Nop::new().build().personality(personality);
                        // SAFETY: a NOP refers to no memory.
                        let res = unsafe { Op::new(nop) }.await;
                        results.borrow_mut().push((personality, res));
                    });
                }
                rt.drain();
                let _ = tx.send(results.borrow().clone());
            });
            let got = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(got, Ok(vec![(0xfffe, -libc::EINVAL), (0, 0)]), "submit_all {submit_all}");
        }
    }
}
