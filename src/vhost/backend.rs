//! The `VhostUserBackend` of one connection, and the glue between the queue
//! threads' epoll loops and their async runtimes.
//!
//! vhost-user-backend runs one epoll thread per entry of
//! `queues_per_thread`; we ask for one thread per queue. Each thread lazily
//! creates, on its first event, a [`Worker`]: a [`Runtime`] (executor +
//! io_uring), stored in a thread-local because the library only calls us
//! back with `&self`. The runtime's wake eventfd and a per-queue *quit*
//! eventfd are registered with the thread's `VringEpollHandler`, so the
//! thread wakes for kicks, for I/O completions and for teardown alike:
//!
//! - kick (event 0): pop and start every available request, run the
//!   runtime once (one io_uring submission for the batch), fill the used
//!   ring, signal the guest once;
//! - wake (`num_queues + 1`): run the runtime, fill the used ring, signal;
//! - quit (`num_queues + 2`): the connection is over: detach from the used
//!   ring, run every in-flight request to completion, drop the runtime.
//!
//! `stop_vring` (GET_VRING_BASE) blocks the frontend's request thread until
//! the queue has no request in flight, as the vhost-user spec requires;
//! the queue thread publishes its in-flight count after every event, and a
//! `busy` flag covers the window in which it pops new requests.
//!
//! Teardown order matters for the thread-local: the runtime must be dropped
//! while the reactor's own thread-local is still alive. The quit event does
//! that explicitly. As a fallback (a queue thread that dies on an epoll
//! error), the worker's thread-local is first touched only *after* the
//! runtime exists, so it is registered after the reactor's and destroyed
//! before it (thread-local destructors run in reverse registration order).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{config_slice, protocol_features, virtio_features};
use super::device::Device;
use super::notify::{ConfigNotifier, Unavailable};
use super::poll::Polling;
use super::queue::QueueCtx;
use crate::block::stats;
use crate::runtime::{affinity, Runtime};

/// Guest memory as the backend sees it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type.
pub type Vring = VringMutex<GuestMem>;
/// The epoll handler type of our backend.
pub type EpollHandler = VringEpollHandler<Arc<BlkBackend>>;

/// Lifecycle of a queue thread's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No worker yet.
    None,
    /// The worker exists and serves the queue.
    Running,
    /// The worker was torn down.
    Done,
}

struct QueueState {
    phase: Phase,
    /// The connection is over: no new worker may be created.
    closing: bool,
}

/// Cross-thread view of one queue.
struct QueueSync {
    quit: EventFd,
    /// Set with `quit`: a polling queue thread stops polling (see
    /// [`Worker::serve_until_idle`]), so a frontend that never lets the
    /// queue go idle cannot hold off the teardown.
    stopping: AtomicBool,
    inflight: AtomicUsize,
    busy: AtomicBool,
    waiters: AtomicUsize,
    state: Mutex<QueueState>,
    cv: Condvar,
}

impl QueueSync {
    fn new() -> io::Result<Self> {
        Ok(QueueSync {
            quit: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            state: Mutex::new(QueueState { phase: Phase::None, closing: false }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
        self.cv.notify_all();
    }

    /// Publishes the number of requests in flight (after an event).
    fn publish(&self, inflight: usize) {
        self.inflight.store(inflight, SeqCst);
        self.busy.store(false, SeqCst);
        if inflight == 0 && self.waiters.load(SeqCst) > 0 {
            let _g = self.lock();
            self.cv.notify_all();
        }
    }

    fn idle(&self) -> bool {
        !self.busy.load(SeqCst) && self.inflight.load(SeqCst) == 0
    }
}

/// The backend of one vhost-user connection.
pub struct BlkBackend {
    dev: Arc<Device>,
    mem: GuestMem,
    queues: Vec<Arc<QueueSync>>,
    handlers: OnceLock<Vec<Weak<EpollHandler>>>,
    /// This connection's backend request channel (see [`super::notify`]).
    channel: Mutex<Channel>,
}

/// What we hold of the connection's backend request channel.
enum Channel {
    /// SET_BACKEND_REQ_FD not received (or the channel was given up).
    None,
    /// Our own handle on the socket, also installed in the device.
    Notifier(Arc<ConfigNotifier>),
    /// The socket could not be found: the crate's handle keeps it open.
    Kept(#[allow(dead_code)] Backend),
}

impl BlkBackend {
    /// A backend for a new connection to `dev`, sharing `mem` with the daemon.
    pub fn new(dev: Arc<Device>, mem: GuestMem) -> io::Result<Self> {
        dev.reset_cache();
        let queues = (0..dev.cfg.num_queues).map(|_| QueueSync::new().map(Arc::new)).collect::<io::Result<_>>()?;
        Ok(BlkBackend { dev, mem, queues, handlers: OnceLock::new(), channel: Mutex::new(Channel::None) })
    }

    /// Remembers the daemon's epoll handlers (one per queue thread).
    pub fn set_handlers(&self, handlers: &[Arc<EpollHandler>]) {
        let _ = self.handlers.set(handlers.iter().map(Arc::downgrade).collect());
    }

    pub(super) fn wake_id(&self) -> u16 {
        self.dev.cfg.num_queues + 1
    }

    pub(super) fn quit_id(&self) -> u16 {
        self.dev.cfg.num_queues + 2
    }

    fn channel(&self) -> MutexGuard<'_, Channel> {
        self.channel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes our side of the backend request channel and withdraws it
    /// from the device (the connection is over).
    fn drop_channel(&self) {
        let old = std::mem::replace(&mut *self.channel(), Channel::None);
        if let Channel::Notifier(n) = &old {
            self.dev.clear_notifier(n);
        }
    }

    /// Ends the connection's queue threads' work: every in-flight request
    /// runs to completion, then each worker drops its runtime. Blocks.
    pub fn teardown(&self) {
        self.drop_channel();
        for (i, q) in self.queues.iter().enumerate() {
            let mut st = q.lock();
            st.closing = true;
            q.stopping.store(true, SeqCst);
            if st.phase == Phase::Running {
                let _ = q.quit.write(1);
            }
            let since = Instant::now();
            while st.phase == Phase::Running {
                let (g, to) = q.cv.wait_timeout(st, Duration::from_secs(5)).unwrap_or_else(|p| p.into_inner());
                st = g;
                if to.timed_out() {
                    log::warn!(
                        "vhost-user-blk export '{}': queue {i} still finishing {} request(s) after {}s",
                        self.dev.id(),
                        q.inflight.load(SeqCst),
                        since.elapsed().as_secs()
                    );
                }
            }
        }
    }

    fn epoll_handler(&self, thread: usize) -> Option<Arc<EpollHandler>> {
        self.handlers.get()?.get(thread)?.upgrade()
    }

    /// Pins this thread to queue `q`'s CPU if `cpu-affinity` names one.
    fn pin(&self, q: usize) {
        let Some(cpu) = self.dev.cfg.queue_cpu(q) else { return };
        match affinity::pin_current_thread(cpu) {
            Ok(()) => log::debug!("vhost-user-blk export '{}': queue {q} runs on CPU {cpu}", self.dev.id()),
            Err(e) => log::warn!("vhost-user-blk export '{}': queue {q}: cannot pin to CPU {cpu}: {e}", self.dev.id()),
        }
    }

    /// Creates this thread's worker for queue `q`, unless the connection is closing.
    fn create_worker(&self, q: usize, vring: &Vring) -> bool {
        let sync = &self.queues[q];
        let mut st = sync.lock();
        if st.closing || st.phase != Phase::None {
            return false;
        }
        let ctx = QueueCtx::new(self.dev.clone(), q as u16);
        // The io_uring workers this thread starts (punted I/O: cache misses,
        // large buffered reads) end up on its CPU too: the scheduler cuts a
        // new thread's affinity down to the one its creator asked for, and
        // on Linux 6.18 IORING_REGISTER_IOWQ_AFF did not widen it.
        self.pin(q);
        // Create the runtime before touching WORKER (see the module docs).
        let rt = match Runtime::new() {
            Ok(rt) => Some(rt),
            Err(e) => {
                log::error!("vhost-user-blk export '{}': queue {q}: no I/O runtime ({e}); requests will fail", self.dev.id());
                None
            }
        };
        if let Some(h) = self.epoll_handler(q) {
            let fds = [(rt.as_ref().map(|r| r.wake_fd()), self.wake_id()), (Some(sync.quit.as_raw_fd()), self.quit_id())];
            for (fd, id) in fds {
                if let Some(fd) = fd {
                    if let Err(e) = h.register_listener(fd, EventSet::IN, u64::from(id)) {
                        log::error!("vhost-user-blk export '{}': queue {q}: cannot watch fd {fd}: {e}", self.dev.id());
                    }
                }
            }
        }
        let cfg = &self.dev.cfg;
        let poll = RefCell::new(Polling::new(cfg.poll_us, cfg.poll_max_ns, cfg.poll_grow, cfg.poll_shrink));
        let worker = Worker { rt, ctx, vring: vring.clone(), mem: self.mem.clone(), sync: sync.clone(), poll, idle_since: Cell::new(None) };
        WORKER.with(|w| *w.borrow_mut() = Some(worker));
        HAS_WORKER.with(|h| h.set(true));
        st.phase = Phase::Running;
        true
    }

    fn on_event(&self, event: u16, vrings: &[Vring], thread: usize) {
        let Some(vring) = vrings.first() else { return };
        if thread >= self.queues.len() {
            return;
        }
        if event == self.quit_id() {
            let _ = self.queues[thread].quit.read();
            let worker = WORKER.with(|w| w.borrow_mut().take());
            HAS_WORKER.with(|h| h.set(false));
            drop(worker);
            return;
        }
        if !HAS_WORKER.with(|h| h.get()) && !self.create_worker(thread, vring) {
            return;
        }
        let kick = event == 0;
        WORKER.with(|w| {
            if let Some(w) = w.borrow().as_ref() {
                w.serve(kick);
            }
        });
    }
}

thread_local! {
    /// Whether WORKER holds a worker (no destructor: reading it registers nothing).
    static HAS_WORKER: Cell<bool> = const { Cell::new(false) };
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// What a queue thread owns.
struct Worker {
    rt: Option<Runtime>,
    ctx: Rc<QueueCtx>,
    vring: Vring,
    mem: GuestMem,
    sync: Arc<QueueSync>,
    /// How long to poll before sleeping (`poll-us` or the adaptive window).
    poll: RefCell<Polling>,
    /// When the thread last ran out of work (its polling window began).
    idle_since: Cell<Option<Instant>>,
}

impl Worker {
    /// Handles one event: pops new requests on a kick, runs the runtime,
    /// completes; then busy-polls for the polling window (`poll-us`, or the
    /// adaptive one of `poll-max-ns`; see [`super::poll`]). While it polls,
    /// guest notifications stay off (the guest need not kick a queue that
    /// is being watched); they go back on before it stops.
    fn serve(&self, kick: bool) {
        if let Some(since) = self.idle_since.take() {
            self.poll.borrow_mut().woke_after(since.elapsed());
        }
        self.serve_until_idle(kick);
        // Before sleeping: requests still in flight keep their snapshot.
        self.ctx.release_memory();
    }

    fn serve_until_idle(&self, kick: bool) {
        let poll = self.poll.borrow().window();
        if poll.is_zero() {
            self.step(kick, true);
            self.idle_since.set(self.adaptive().then(Instant::now));
            return;
        }
        let activity = self.step(kick, false);
        // A wake-up that found nothing to do and nothing in flight does not
        // start a polling period.
        let mut last = Instant::now();
        let mut deadline = if activity == 0 && self.in_flight() == 0 { last } else { last + poll };
        loop {
            if self.sync.stopping.load(Relaxed) {
                // The quit event is waiting in epoll; it ends this worker.
                return;
            }
            if Instant::now() >= deadline {
                let more = {
                    let mut g = self.vring.get_mut();
                    self.ctx.rearm(g.get_queue_mut(), &self.mem)
                };
                if !more {
                    // The idle period began with the last activity, so the
                    // next wake-up measures polling and sleep together.
                    self.idle_since.set(self.adaptive().then_some(last));
                    return;
                }
                last = Instant::now();
                deadline = last + poll;
            }
            // Give the CPU to any other thread that wants it: the frontend
            // may share this CPU, and the request polled for is the one it is
            // about to send (on one CPU with the client, spinning instead
            // cost 17 % of `null`'s IOPS; yielding, 5 %). With nothing else
            // runnable this returns at once.
            // SAFETY: sched_yield takes no arguments and touches no memory.
            unsafe { libc::sched_yield() };
            if self.step(true, false) > 0 {
                last = Instant::now();
                deadline = last + poll;
            }
        }
    }

    fn adaptive(&self) -> bool {
        matches!(*self.poll.borrow(), Polling::Adaptive(_))
    }

    fn in_flight(&self) -> usize {
        self.rt.as_ref().map_or(0, Runtime::live_tasks)
    }

    /// One round; returns how many chains were popped plus completed.
    ///
    /// Chains are popped and started [`CHUNK`] at a time, and what finished
    /// goes to the used ring (with an interrupt) after each chunk: the
    /// frontend refills the ring with the first completions while this
    /// thread still works on the rest of a large batch, instead of both
    /// sides waiting for each other once per batch.
    fn step(&self, pop: bool, rearm: bool) -> usize {
        let sync = &self.sync;
        let mut total = 0;
        // Request times chain within the round (one clock read per request).
        let _burst = stats::Burst::begin();
        loop {
            let mut popped = 0;
            if pop {
                sync.busy.store(true, SeqCst);
                let mut g = self.vring.get_mut();
                popped = self.ctx.pop_and_start(self.rt.as_ref(), g.get_queue_mut(), &self.mem, CHUNK, rearm);
            }
            if let Some(rt) = &self.rt {
                // A kick or a poll pass need not clear the runtime's wake fd (a
                // syscall); when it is readable, epoll brings its own event.
                if pop {
                    rt.run_pending();
                } else {
                    rt.turn();
                }
            }
            let completed = self.ctx.pending_completions();
            if completed > 0 {
                let mem = self.mem.memory();
                let mut g = self.vring.get_mut();
                if self.ctx.complete(g.get_queue_mut(), &mem) {
                    if let Err(e) = g.signal_used_queue() {
                        self.ctx.warn(format_args!("cannot signal the guest: {e}"));
                    }
                }
            }
            total += popped + completed;
            if !pop || popped < CHUNK {
                break;
            }
        }
        sync.publish(self.in_flight());
        total
    }
}

/// Chains popped, run and completed at a time (see [`Worker::step`]).
/// Measured on 4k QD32 against libblkio: 16 gave about 1.05-1.1x the IOPS
/// of whole batches for reads and 1.2-1.5x for buffered writes; for reads,
/// 4 and 8 were no better than 16.
const CHUNK: usize = 16;

impl Drop for Worker {
    fn drop(&mut self) {
        self.ctx.detach();
        // Runs every in-flight request to completion (Runtime's Drop drains).
        drop(self.rt.take());
        self.sync.publish(0);
        self.sync.set_phase(Phase::Done);
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        self.drop_channel();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        virtio_features(self.dev.writable())
    }

    fn acked_features(&self, features: u64) {
        log::debug!("vhost-user-blk export '{}': features acked: {features:#x}", self.dev.id());
        self.dev.set_flush_acked(features & (1 << VIRTIO_BLK_F_FLUSH) != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let id = self.dev.id();
        // A second SET_BACKEND_REQ_FD replaces the first channel.
        self.drop_channel();
        let new = match ConfigNotifier::claim(backend) {
            Ok(n) => {
                let n = Arc::new(n);
                log::info!(
                    "vhost-user-blk export '{id}': backend request channel ready (frontend pid {}); resizes will be announced",
                    n.peer_pid().map_or_else(|| "unknown".to_string(), |p| p.to_string())
                );
                self.dev.set_notifier(n.clone());
                Channel::Notifier(n)
            }
            Err(Unavailable::Scan(e, backend)) => {
                log::warn!("vhost-user-blk export '{id}': cannot find the backend request channel ({e}); resize notifications are unavailable for this connection");
                Channel::Kept(backend)
            }
            Err(Unavailable::Ambiguous(n)) => {
                log::warn!(
                    "vhost-user-blk export '{id}': cannot identify the backend request channel ({n} candidate sockets changed at once); resize notifications are unavailable for this connection"
                );
                Channel::None
            }
        };
        *self.channel() = new;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each queue knows (Queue::event_idx_enabled).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.dev.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.dev.set_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic we share with it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.dev.cfg.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("vhost-user-blk export '{}': cannot create an exit eventfd: {e}", self.dev.id());
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(q) = self.queues.get(queue_index as usize) else { return Ok(()) };
        q.waiters.fetch_add(1, SeqCst);
        let mut st = q.lock();
        while st.phase == Phase::Running && !q.idle() {
            let (g, to) = q.cv.wait_timeout(st, Duration::from_secs(5)).unwrap_or_else(|p| p.into_inner());
            st = g;
            if to.timed_out() {
                log::warn!(
                    "vhost-user-blk export '{}': stopping queue {queue_index}: waiting for {} request(s)",
                    self.dev.id(),
                    q.inflight.load(SeqCst)
                );
            }
        }
        drop(st);
        q.waiters.fetch_sub(1, SeqCst);
        Ok(())
    }

    /// Never returns an error: one would end the queue thread's loop.
    fn handle_event(&self, device_event: u16, _evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        self.on_event(device_event, vrings, thread_id);
        Ok(())
    }
}
