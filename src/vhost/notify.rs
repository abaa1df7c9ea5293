//! Config-change notifications to the frontend (a resize the guest sees).
//!
//! A virtio-blk driver re-reads the configuration space (the capacity) only
//! when the device says it changed. For vhost-user that is the backend's
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (request 2) on the *backend request
//! channel*: a unix stream socket whose other end the frontend keeps (QEMU
//! makes a socketpair) and passes to us with VHOST_USER_SET_BACKEND_REQ_FD,
//! once protocol feature BACKEND_REQ is negotiated.
//!
//! vhost 0.18 wraps that socket in `vhost::vhost_user::Backend`, which
//! offers no way to send CONFIG_CHANGE_MSG and no way to get at its fd; the
//! crates are pinned and must not be patched. So we find the socket's fd in
//! our own fd table and write the 12-byte message header ourselves.
//!
//! # Finding the fd: drop and observe
//!
//! vhost-user-backend hands us the `Backend` by value, freshly made from
//! the received fd (`Backend::from_stream`), and keeps no clone of it: we are
//! its only owner, so dropping it closes exactly that fd. Hence, under a
//! process-wide mutex (so two exports never do this at the same time):
//!
//! 1. scan `/proc/self/fd`; `dup` every unix stream socket (the vhost crate
//!    checked that the received fd is one) whose socket is not already
//!    claimed by another connection; remember each (fd number, identity =
//!    st_dev/st_ino of the socket). The dups keep every candidate socket
//!    alive;
//! 2. drop the `Backend`: its fd number is closed (the socket lives on in
//!    our dup);
//! 3. look at every candidate's fd number again: the candidates whose number
//!    no longer refers to the same socket are *gone*. Ours is always gone (we
//!    just closed it). If exactly one is gone it is ours: keep its dup,
//!    record its identity as claimed, close the other dups.
//!
//! Anything unexpected makes us refuse rather than guess; the connection
//! then works without resize notifications (a warning says so):
//!
//! - another thread of the daemon closes (or closes and re-opens) a
//!   candidate's fd number between steps 1 and 3 (microseconds): two are
//!   gone, we cannot tell which is ours;
//! - fd numbers are reused at once by new opens: a reused number refers to a
//!   different socket or file, so it counts as gone (never as "still
//!   there"); the same socket can come back under that number only through a
//!   dup of it, and only we hold one;
//! - a fd that disappears during the scan is simply not a candidate; one
//!   that appears after it cannot be ours (ours existed before we were
//!   called);
//! - two frontend connections (one QEMU process attaching two disks at the
//!   same instant, or two exports of this daemon) are handled one after the
//!   other under the mutex, and a socket claimed by one connection is
//!   never a candidate for another: claims are released when the
//!   connection's notifier is dropped (the connection ended);
//! - the scan itself fails (no /proc, fd limit reached while dup'ing): we
//!   keep the `Backend` (the channel stays open) and send nothing.
//!
//! In the refusal case of step 3 the `Backend` is already dropped; our side
//! of the channel closes, which QEMU handles by closing its side of the
//! backend channel (not an error for the device).
//!
//! This needs no peer-pid heuristics: SO_PEERCRED of the chosen socket is
//! only logged.
//!
//! # Sending
//!
//! The notification is the bare header `{request: 2, flags: 1 (version 1,
//! no NEED_REPLY, so no reply is to be read), size: 0}`, sent with
//! `MSG_DONTWAIT | MSG_NOSIGNAL` from the resize hook (a QMP thread must
//! never block on a frontend). A 12-byte send on a unix stream socket is
//! queued whole or not at all; a full buffer (EAGAIN), a closed peer (EPIPE)
//! or a short write is logged and the notification is lost (a short write
//! also marks the channel broken: the stream would be out of step). Sends
//! are serialised by a mutex so two resizes never interleave their bytes.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;

use vhost::vhost_user::Backend;

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
pub const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: version 1, no NEED_REPLY.
pub const HDR_FLAGS_V1: u32 = 0x1;

/// The 12-byte header of a CONFIG_CHANGE_MSG without a reply.
pub fn config_change_header() -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    h[4..8].copy_from_slice(&HDR_FLAGS_V1.to_le_bytes());
    h[8..12].copy_from_slice(&0u32.to_le_bytes());
    h
}

/// Identity of an open socket: (st_dev, st_ino) of its fd.
pub type SockKey = (u64, u64);

/// Sockets claimed by live notifiers; its mutex also serialises discovery.
static CLAIMED: Mutex<Option<HashSet<SockKey>>> = Mutex::new(None);

fn claimed() -> std::sync::MutexGuard<'static, Option<HashSet<SockKey>>> {
    CLAIMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `key` is claimed by a live notifier.
#[cfg(test)]
pub fn is_claimed(key: SockKey) -> bool {
    claimed().as_ref().is_some_and(|s| s.contains(&key))
}

/// The identity of whatever fd number `fd` refers to now, if it is open.
fn identity(fd: RawFd) -> Option<SockKey> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `st`, a valid stat buffer; any integer
    // is acceptable as fd (a closed one gives EBADF) and nothing is closed.
    let r = unsafe { libc::fstat(fd, &mut st) };
    if r != 0 {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

/// Whether `fd` (which must be open) is a socket.
fn is_socket(fd: RawFd) -> bool {
    // SAFETY: as in `identity`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as in `identity`.
    let r = unsafe { libc::fstat(fd, &mut st) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes and `len` is `v`'s size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// Whether `fd` is a connected-type (non-listening) AF_UNIX SOCK_STREAM socket.
fn is_unix_stream(fd: RawFd) -> bool {
    is_socket(fd)
        && sockopt_int(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt_int(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && sockopt_int(fd, libc::SO_ACCEPTCONN) == Some(0)
}

/// The pid of the socket's peer (SO_PEERCRED), if any.
pub fn peer_pid(fd: RawFd) -> Option<i32> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` and `len` are valid for writes and `len` is `c`'s size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut c as *mut libc::ucred).cast(), &mut len) };
    (r == 0 && c.pid > 0).then_some(c.pid)
}

/// A dup of fd number `num` taken during the scan.
#[derive(Debug)]
pub struct Candidate {
    /// The fd number in our table at scan time.
    pub num: RawFd,
    /// The identity of the socket it referred to.
    pub key: SockKey,
    /// Our own reference to that socket.
    pub dup: OwnedFd,
}

fn dup_cloexec(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd (or fails); it does not
    // touch memory and leaves `fd` as it is.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return None;
    }
    // SAFETY: `d` was just created by fcntl and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(d) })
}

/// Step 1: a dup of every unclaimed unix stream socket in our fd table.
fn scan(claimed: &HashSet<SockKey>) -> io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Some(num) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else { continue };
        // Dup first, then inspect the dup: what we inspect is what we hold,
        // even if the number is closed or reused meanwhile.
        let Some(dup) = dup_cloexec(num) else { continue };
        if !is_unix_stream(dup.as_raw_fd()) {
            continue;
        }
        let Some(key) = identity(dup.as_raw_fd()) else { continue };
        if claimed.contains(&key) {
            continue;
        }
        out.push(Candidate { num, key, dup });
    }
    Ok(out)
}

/// Step 3: the one candidate whose fd number no longer refers to its
/// socket, given `now(num)` = the identity at that number now.
/// `Err(n)`: `n` candidates are gone (0 or several: refuse).
pub fn pick_gone(cands: Vec<Candidate>, now: impl Fn(RawFd) -> Option<SockKey>) -> Result<Candidate, usize> {
    let mut gone: Vec<Candidate> = cands.into_iter().filter(|c| now(c.num) != Some(c.key)).collect();
    match gone.len() {
        1 => gone.pop().ok_or(1),
        n => Err(n),
    }
}

/// Why the channel of a connection could not be found.
pub enum Unavailable {
    /// The fd table could not be scanned; the `Backend` is handed back so
    /// that the channel stays open.
    Scan(io::Error, Backend),
    /// The drop-and-observe step was ambiguous (`n` candidates gone).
    Ambiguous(usize),
}

/// Our own handle on a connection's backend request channel.
#[derive(Debug)]
pub struct ConfigNotifier {
    fd: OwnedFd,
    key: SockKey,
    broken: AtomicBool,
    send: Mutex<()>,
}

impl ConfigNotifier {
    /// Takes over `backend`'s socket (see the module docs).
    pub fn claim(backend: Backend) -> Result<ConfigNotifier, Unavailable> {
        let mut reg = claimed();
        let set = reg.get_or_insert_with(HashSet::new);
        let cands = match scan(set) {
            Ok(c) => c,
            Err(e) => return Err(Unavailable::Scan(e, backend)),
        };
        drop(backend);
        let c = pick_gone(cands, identity).map_err(Unavailable::Ambiguous)?;
        set.insert(c.key);
        Ok(ConfigNotifier { fd: c.dup, key: c.key, broken: AtomicBool::new(false), send: Mutex::new(()) })
    }

    /// A notifier on `fd` (tests).
    #[cfg(test)]
    pub fn from_fd(fd: OwnedFd) -> Option<ConfigNotifier> {
        let key = identity(fd.as_raw_fd())?;
        claimed().get_or_insert_with(HashSet::new).insert(key);
        Some(ConfigNotifier { fd, key, broken: AtomicBool::new(false), send: Mutex::new(()) })
    }

    /// The claimed socket's identity.
    #[cfg(test)]
    pub fn key(&self) -> SockKey {
        self.key
    }

    /// The pid of the frontend end of the channel (for the log).
    pub fn peer_pid(&self) -> Option<i32> {
        peer_pid(self.fd.as_raw_fd())
    }

    /// Sends CONFIG_CHANGE_MSG without blocking.
    pub fn notify(&self) -> io::Result<()> {
        let _g = self.send.lock().unwrap_or_else(|p| p.into_inner());
        if self.broken.load(SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the channel is out of step after a short write"));
        }
        let h = config_change_header();
        // SAFETY: `h` is valid for reads of `h.len()` bytes; the fd is ours.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), h.as_ptr().cast(), h.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != h.len() {
            self.broken.store(true, SeqCst);
            return Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write: {n} of {} bytes", h.len())));
        }
        Ok(())
    }
}

impl Drop for ConfigNotifier {
    fn drop(&mut self) {
        if let Some(s) = claimed().as_mut() {
            s.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn fake(num: RawFd, key: SockKey) -> Candidate {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        Candidate { num, key, dup: OwnedFd::from(a) }
    }

    #[test]
    fn header_is_config_change_v1_without_reply() {
        assert_eq!(config_change_header(), [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn exactly_one_gone_is_picked_otherwise_refused() {
        let keys = [(1, 10), (1, 11), (1, 12)];
        let mk = || keys.iter().enumerate().map(|(i, &k)| fake(100 + i as RawFd, k)).collect::<Vec<_>>();
        // fd 101 was closed, the others still refer to their sockets.
        let now = |n: RawFd| match n {
            100 => Some((1, 10)),
            102 => Some((1, 12)),
            _ => None,
        };
        let c = pick_gone(mk(), now).expect("one gone");
        assert_eq!((c.num, c.key), (101, (1, 11)));
        // Reused number (another file now) counts as gone: two gone, refused.
        let now2 = |n: RawFd| match n {
            100 => Some((1, 99)),
            102 => Some((1, 12)),
            _ => None,
        };
        assert_eq!(pick_gone(mk(), now2).err(), Some(2));
        // Nothing gone (ours was not a candidate): refused.
        let all = |n: RawFd| keys.get((n - 100) as usize).copied();
        assert_eq!(pick_gone(mk(), all).err(), Some(0));
        assert_eq!(pick_gone(Vec::new(), all).err(), Some(0));
    }

    fn read_header(s: &mut UnixStream) -> [u8; 12] {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut h = [0u8; 12];
        s.read_exact(&mut h).expect("read the header");
        h
    }

    /// Socketpairs in this process that look just like the channel (unix
    /// stream, unnamed, our own pid as peer) are not mistaken for it; a
    /// claimed socket is never a candidate again until released.
    #[test]
    fn claim_finds_the_backends_socket_among_look_alikes() {
        let _decoys: Vec<_> = (0..4).map(|_| UnixStream::pair().expect("socketpair")).collect();
        let (ours, mut frontend) = UnixStream::pair().expect("socketpair");
        let key = identity(ours.as_raw_fd()).expect("identity");
        let pid = std::process::id() as i32;
        // Other tests of this process open and close sockets concurrently;
        // a refusal (two gone) is correct behaviour, a wrong pick is not.
        let n = match ConfigNotifier::claim(Backend::from_stream(ours)) {
            Ok(n) => n,
            Err(Unavailable::Ambiguous(k)) => {
                eprintln!("refused (ambiguous: {k} gone) because of concurrent closes; acceptable");
                return;
            }
            Err(Unavailable::Scan(e, _)) => panic!("scan failed: {e}"),
        };
        assert_eq!(n.key(), key, "picked the Backend's own socket");
        assert!(is_claimed(key));
        assert_eq!(n.peer_pid(), Some(pid));
        n.notify().expect("notify");
        assert_eq!(read_header(&mut frontend), config_change_header());
        // The claimed socket is not a candidate any more.
        let set = claimed().clone().unwrap_or_default();
        let cands = scan(&set).expect("scan");
        assert!(cands.iter().all(|c| c.key != key));
        drop(cands);
        drop(n);
        assert!(!is_claimed(key));
    }

    #[test]
    fn notify_does_not_block_on_a_full_channel_and_reports_a_gone_peer() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let n = ConfigNotifier::from_fd(OwnedFd::from(a)).expect("notifier");
        // Fill the channel: the frontend never reads.
        let mut full = false;
        for _ in 0..1_000_000 {
            match n.notify() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    full = true;
                    break;
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert!(full, "the channel never filled up");
        drop(b);
        let e = n.notify().expect_err("peer gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
