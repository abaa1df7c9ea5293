//! A connected client socket: blocking I/O for the handshake, io_uring for
//! the transmission phase.
//!
//! The handshake is a strict request/reply exchange, so it uses ordinary
//! blocking reads and writes with a deadline (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
//! The transmission phase runs on the connection thread's [`Runtime`]: the
//! reader and every request task issue `recv`/`sendmsg` through the thread's
//! io_uring, so many requests can be in flight while the next header is read.
//!
//! Each I/O future borrows its buffer for as long as its [`Op`] lives; an
//! `Op` dropped early waits for its completion (see `runtime::reactor`), so
//! the kernel never writes into freed memory.
//!
//! [`Runtime`]: crate::runtime::Runtime

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use io_uring::{opcode, types};

use crate::runtime::Op;

/// A client connection, Unix or TCP.
#[derive(Debug)]
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    /// The raw fd, for io_uring operations.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Shuts down one or both directions. A blocked or queued `recv` then
    /// returns end-of-file; errors (already closed) are ignored.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }

    /// Sets (or with `None`, clears) the blocking read and write timeouts.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).read(buf),
            Socket::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).write(buf),
            Socket::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`recv_exact`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// The buffer is full.
    Full,
    /// The peer closed (or the socket was shut down) before the first byte.
    Eof,
}

fn retryable(res: i32) -> bool {
    res == -libc::EINTR || res == -libc::EAGAIN
}

/// A `recv` or `sendmsg` result as io_uring would give it: bytes, or a
/// negative errno.
fn res_of(n: isize) -> i32 {
    if n < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// Fills `buf` from the socket: first with non-blocking `recv`s while data
/// is already there (a client that pipelines requests sends them ahead, and
/// a ring round trip per header would cost a task switch each), then
/// through io_uring. End-of-file after part of the buffer arrived is an
/// `UnexpectedEof` error.
pub async fn recv_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of its length during the call.
        let res = res_of(unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) });
        match res {
            0 if done == 0 => return Ok(Recv::Eof),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message")),
            r if r == -libc::EINTR => continue,
            r if r == -libc::EAGAIN => break,
            r if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
            r => done += r as usize,
        }
    }
    while done < buf.len() {
        let want = u32::try_from(buf.len() - done).unwrap_or(u32::MAX);
        let rest = &mut buf[done..];
        let entry = opcode::Recv::new(types::Fd(fd), rest.as_mut_ptr(), want).flags(libc::MSG_WAITALL).build();
        // SAFETY: `rest` is borrowed mutably until this op completes: the op is
        // awaited right here, and if this future is dropped first the op's
        // drop waits for the completion before `rest` is released.
        let res = unsafe { Op::new(entry) }.await;
        match res {
            0 if done == 0 => return Ok(Recv::Eof),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message")),
            r if retryable(r) => continue,
            r if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
            r => done += r as usize,
        }
    }
    Ok(Recv::Full)
}

/// Reads and throws away `n` bytes (a payload of a request that failed
/// validation), with a small scratch buffer.
pub async fn discard_exact(fd: RawFd, mut n: usize) -> io::Result<()> {
    let mut scratch = vec![0u8; n.min(64 * 1024)];
    while n > 0 {
        let k = n.min(scratch.len());
        if recv_exact(fd, &mut scratch[..k]).await? == Recv::Eof {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-payload"));
        }
        n -= k;
    }
    Ok(())
}

/// Sends every byte of `parts`, in order, as one message where the kernel
/// allows (a `sendmsg` with an iovec per part), looping on short sends:
/// without waiting while the socket takes the bytes, then through io_uring.
pub async fn send_all(fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let mut first = 0usize;
    // While the socket has room (nearly always), a non-blocking sendmsg
    // finishes the reply without a ring round trip.
    let mut nonblocking = true;
    while first < iov.len() {
        // SAFETY: `msghdr` is a plain C struct; all-zero is a valid value
        // (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[first..].as_mut_ptr();
        msg.msg_iovlen = (iov.len() - first) as _;
        let res = if nonblocking {
            // SAFETY: `msg` and the iovecs and buffers it points to are valid
            // for the duration of the call.
            let r = res_of(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) });
            if r == -libc::EAGAIN {
                nonblocking = false;
                continue;
            }
            r
        } else {
            let entry = opcode::SendMsg::new(types::Fd(fd), &msg).flags(libc::MSG_NOSIGNAL as u32).build();
            // SAFETY: `msg`, the iovec array and the buffers it points into
            // (the borrowed `parts`) all outlive the op, which is awaited
            // here (a dropped op waits for its completion).
            unsafe { Op::new(entry) }.await
        };
        if retryable(res) {
            continue;
        }
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        if res == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
        }
        first = advance(&mut iov, first, res as usize);
    }
    Ok(())
}

/// Consumes `n` sent bytes from `iov[first..]`; returns the new first segment.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while n > 0 && first < iov.len() {
        let seg = &mut iov[first];
        if n >= seg.iov_len {
            n -= seg.iov_len;
            first += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base stays inside the segment.
            seg.iov_base = unsafe { (seg.iov_base as *mut u8).add(n) }.cast();
            seg.iov_len -= n;
            n = 0;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Runtime;

    #[test]
    fn advance_steps_over_whole_and_partial_segments() {
        let (a, b) = ([0u8; 4], [0u8; 6]);
        let mut iov = vec![
            libc::iovec { iov_base: a.as_ptr() as *mut _, iov_len: 4 },
            libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: 6 },
        ];
        assert_eq!(advance(&mut iov, 0, 5), 1);
        assert_eq!(iov[1].iov_len, 5);
        assert_eq!(advance(&mut iov, 1, 5), 2);
    }

    #[test]
    fn recv_and_send() {
        let (a, b) = UnixStream::pair().expect("pair");
        let rt = Runtime::new().expect("runtime");
        let fa = a.as_raw_fd();
        let fb = b.as_raw_fd();
        let got = rt.block_on(async move {
            send_all(fa, &[b"hello ", b"", b"world"]).await.expect("send");
            let mut buf = [0u8; 11];
            let r = recv_exact(fb, &mut buf).await.expect("recv");
            (r, buf)
        });
        assert_eq!(got, (Recv::Full, *b"hello world"));
        a.shutdown(Shutdown::Write).expect("shutdown");
        let r = rt.block_on(async move {
            let mut buf = [0u8; 4];
            recv_exact(fb, &mut buf).await.expect("recv")
        });
        assert_eq!(r, Recv::Eof);
    }

    /// Nothing to read yet, and more to send than the socket holds: both
    /// go on through the ring after their non-blocking attempt, and finish
    /// once the peer writes or reads.
    #[test]
    fn recv_and_send_wait_through_the_ring() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let (a, b) = UnixStream::pair().expect("pair");
        let rt = Runtime::new().expect("runtime");
        let fb = b.as_raw_fd();
        let got = Rc::new(RefCell::new(None));
        let slot = got.clone();
        rt.spawn(async move {
            let mut buf = [0u8; 4];
            let r = recv_exact(fb, &mut buf).await.ok();
            *slot.borrow_mut() = Some((r, buf));
        });
        rt.turn();
        assert!(got.borrow().is_none(), "nothing was sent yet, so the receive waits");
        (&a).write_all(b"late").expect("write");
        rt.drain();
        assert_eq!(got.take(), Some((Some(Recv::Full), *b"late")));

        let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let sent = Rc::new(RefCell::new(None));
        let (slot, data) = (sent.clone(), big.clone());
        rt.spawn(async move {
            let r = send_all(fb, &[&data[..1000], &data[1000..]]).await;
            *slot.borrow_mut() = Some(r.is_ok());
        });
        rt.turn();
        assert!(sent.borrow().is_none(), "4 MiB do not fit the socket, so the send waits for the reader");
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 << 20];
            (&a).read_exact(&mut got).expect("read");
            got
        });
        rt.drain();
        assert_eq!(sent.take(), Some(true));
        assert!(reader.join().expect("reader") == big, "the bytes arrive whole and in order");
    }
}
