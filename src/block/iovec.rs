//! I/O vectors: the memory a request reads into or writes from.
//!
//! An [`IoVecs`] is a list of raw `(base, len)` segments. On the fast path the
//! segments point straight into guest memory (vhost-user) or an export's
//! buffers; the generic layer adds bounce buffers ([`AlignedBuf`]) only where
//! alignment demands it. Building an `IoVecs` from raw memory is `unsafe`: the
//! creator promises the memory stays mapped and writable for as long as the
//! `IoVecs` is used. Exports keep their memory mapping alive for the whole
//! request (vhost: a clone of the guest-memory `Arc`).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use smallvec::SmallVec;

/// Segments kept inline, without a heap allocation: a guest's 4k request is
/// one segment, and a chain's descriptor count (header and status
/// included) bounds the segments the vhost parser asks room for.
const INLINE_SEGMENTS: usize = 4;

/// A scatter/gather list of memory segments.
#[derive(Default)]
pub struct IoVecs {
    iov: SmallVec<[libc::iovec; INLINE_SEGMENTS]>,
    len: usize,
}

impl IoVecs {
    /// An empty list.
    pub fn new() -> Self {
        IoVecs { iov: SmallVec::new(), len: 0 }
    }

    /// An empty list with room for `n` segments.
    pub fn with_capacity(n: usize) -> Self {
        IoVecs { iov: SmallVec::with_capacity(n), len: 0 }
    }

    /// Appends a segment.
    ///
    /// # Safety
    /// `base..base+len` must be valid for reads and writes for as long as this
    /// `IoVecs` (or a slice of it) is used by any I/O.
    pub unsafe fn push_raw(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.iov.push(libc::iovec { iov_base: base.cast(), iov_len: len });
        self.len += len;
    }

    /// Total number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.iov.len()
    }

    /// The segments, as the kernel takes them.
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Whether every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        align <= 1
            || self.iov.iter().all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
    }

    /// The bytes `[offset, offset+len)` of this list, as a new list sharing the
    /// same memory. Out-of-range parts are cut off.
    pub fn slice(&self, offset: usize, len: usize) -> IoVecs {
        let mut out = IoVecs::new();
        let mut skip = offset;
        let mut want = len;
        for v in &self.iov {
            if want == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(want);
            // SAFETY: a sub-range of a segment this list already vouches for.
            unsafe { out.push_raw((v.iov_base as *mut u8).add(skip), n) };
            skip = 0;
            want -= n;
        }
        out
    }

    /// Copies `src` into the list starting at byte `offset`; returns bytes copied.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> usize {
        let mut done = 0;
        self.for_each_range(offset, src.len(), |ptr, n| {
            // SAFETY: `ptr..ptr+n` lies in a segment valid for writes (type
            // invariant); `src[done..done+n]` is in bounds. The ranges cannot
            // overlap: `src` is a Rust slice the caller borrows.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
            done += n;
        });
        done
    }

    /// Copies bytes from the list starting at `offset` into `dst`; returns bytes copied.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        let dst_ptr = dst.as_mut_ptr();
        self.for_each_range(offset, dst.len(), |ptr, n| {
            // SAFETY: as in `copy_from`, with the roles swapped.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst_ptr.add(done), n) };
            done += n;
        });
        done
    }

    /// Fills the whole list with zeroes.
    pub fn zero(&self) {
        for v in &self.iov {
            // SAFETY: each segment is valid for writes (type invariant).
            unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
        }
    }

    /// Whether every byte is zero.
    ///
    /// The segments may be guest memory that the guest changes at the same
    /// time, so no Rust reference is ever made over them: the bytes are
    /// copied out in chunks (as [`IoVecs::copy_to`] does) and checked there.
    pub fn is_zero(&self) -> bool {
        let mut chunk = [0u8; 4096];
        self.iov.iter().all(|v| {
            let mut off = 0;
            while off < v.iov_len {
                let n = (v.iov_len - off).min(chunk.len());
                // SAFETY: `base+off .. base+off+n` lies in a segment valid for
                // reads (type invariant); `chunk` is a local array of ≥ n bytes.
                unsafe { std::ptr::copy_nonoverlapping((v.iov_base as *const u8).add(off), chunk.as_mut_ptr(), n) };
                if chunk[..n].iter().any(|&b| b != 0) {
                    return false;
                }
                off += n;
            }
            true
        })
    }

    fn for_each_range(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        let part = self.slice(offset, len);
        for v in &part.iov {
            f(v.iov_base as *mut u8, v.iov_len);
        }
    }
}

/// A heap buffer aligned for O_DIRECT, zero-initialised.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(8)).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    /// The buffer's length.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Whether the buffer is empty (never, but clippy asks).
    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` initialised bytes, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The alignment it was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// An `IoVecs` over the whole buffer. The buffer must outlive every use of it.
    pub fn iovecs(&mut self) -> IoVecs {
        self.prefix_iovecs(self.layout.size())
    }

    /// An `IoVecs` over the first `len` bytes (at most the whole buffer).
    /// The buffer must outlive every use of it.
    pub fn prefix_iovecs(&mut self, len: usize) -> IoVecs {
        let mut v = IoVecs::with_capacity(1);
        // SAFETY: the first `len` (clamped to the size) bytes are valid for
        // reads and writes while `self` lives; callers keep the buffer alive
        // across the I/O (it is a local of the request future that awaits
        // the I/O).
        unsafe { v.push_raw(self.ptr.as_ptr(), len.min(self.layout.size())) };
        v
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lists_stay_inline_and_long_ones_spill_intact() {
        let mut buf = vec![0u8; 8 * 512];
        let base = buf.as_mut_ptr();
        let mut v = IoVecs::with_capacity(INLINE_SEGMENTS);
        for i in 0..INLINE_SEGMENTS {
            // SAFETY: inside `buf`, which outlives `v`.
            unsafe { v.push_raw(base.add(i * 512), 512) };
        }
        assert!(!v.iov.spilled(), "a short list needs no heap allocation");
        for i in INLINE_SEGMENTS..8 {
            // SAFETY: as above.
            unsafe { v.push_raw(base.add(i * 512), 512) };
        }
        assert!(v.iov.spilled());
        assert_eq!((v.segments(), v.len()), (8, 8 * 512));
        let src: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
        assert_eq!(v.copy_from(0, &src), src.len());
        assert_eq!(buf, src);
    }

    fn two_segments(a: &mut [u8], b: &mut [u8]) -> IoVecs {
        let mut v = IoVecs::new();
        // SAFETY: the slices outlive the IoVecs in each test.
        unsafe {
            v.push_raw(a.as_mut_ptr(), a.len());
            v.push_raw(b.as_mut_ptr(), b.len());
        }
        v
    }

    #[test]
    fn slice_and_copy_cross_segments() {
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        let v = two_segments(&mut a, &mut b);
        assert_eq!(v.len(), 8);
        assert_eq!(v.copy_from(2, &[1, 2, 3, 4]), 4);
        let mut out = [0u8; 8];
        assert_eq!(v.copy_to(0, &mut out), 8);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        let s = v.slice(3, 3);
        assert_eq!((s.len(), s.segments()), (3, 2));
        assert!(!v.is_zero());
        v.zero();
        assert!(v.is_zero());
    }

    #[test]
    fn alignment_checks_address_and_length() {
        let mut buf = AlignedBuf::new(8192, 4096).expect("alloc");
        let v = buf.iovecs();
        assert!(v.is_aligned(4096));
        assert!(!v.slice(512, 4096).is_aligned(4096));
        assert!(v.slice(4096, 4096).is_aligned(4096));
    }
}
