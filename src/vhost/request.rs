//! virtio-blk requests: parse a descriptor chain into a typed [`Request`]
//! once, validating everything, then execute it against a [`BlockNode`].
//!
//! [`parse`] is the only place that looks at guest-controlled layout. It
//! accepts any framing the virtio 1.x spec allows (the 16-byte header may be
//! split over several device-readable descriptors, the status byte may share
//! its descriptor with read data) and classifies every malformed chain:
//!
//! - no device-writable last descriptor, or a status byte outside guest
//!   memory: [`Parsed::Drop`] — the chain goes back with used length 0;
//! - anything else wrong: [`Parsed::Fail`] with `IOERR` or `UNSUPP`, written
//!   at once, used length 1.
//!
//! Execution never re-checks the layout. Data buffers are [`IoVecs`] that
//! point straight into guest memory; the request owns a reference to the
//! guest memory snapshot it was parsed against ([`MemRef`]), so a region the
//! frontend removes (REM_MEM_REG) stays mapped until the request is done.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use virtio_bindings::virtio_blk as vb;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::config::{ID_BYTES, MAX_DISCARD_SECTORS, SECTOR_SIZE};
use super::queue::MemRef;
use crate::block::{BlockError, BlockNode, BlockResult, ErrorKind, IoVecs, WriteFlags};

/// Status byte: success.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Status byte: I/O error.
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: unsupported request.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

/// What the parser needs to know about the device.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Length of the node in bytes.
    pub capacity: u64,
    /// Logical block size (a power of two ≥ 512).
    pub lbs: u32,
    /// Write-type requests are refused.
    pub read_only: bool,
}

/// One descriptor of a chain, as collected by the parser.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

impl Desc {
    /// A descriptor as read from the ring.
    pub(super) fn new(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    /// (addr, len, device-writable), for tests.
    #[cfg(test)]
    pub(super) fn parts(&self) -> (u64, u32, bool) {
        (self.addr, self.len, self.write)
    }
}

/// The operation of a parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES, with the UNMAP flag.
    WriteZeroes {
        /// The guest allows deallocation.
        unmap: bool,
    },
}

/// A validated request.
pub struct Request {
    /// The operation.
    pub op: Op,
    /// Byte offset on the node.
    pub offset: u64,
    /// Byte length (data length, or the discard / write-zeroes range).
    pub len: u64,
    /// The guest's data buffers (reads, writes, GET_ID).
    pub data: IoVecs,
    /// Descriptor index of the chain head.
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Used length reported on success.
    pub used_len: u32,
    // Declared last so it drops after `data`, whose pointers it keeps valid.
    mem: MemRef,
}

/// Why a chain was refused; shown in the (rate-limited) log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The chain has no descriptors.
    EmptyChain,
    /// The last descriptor is not device-writable (or empty).
    NoStatus,
    /// The status byte is not in guest memory.
    StatusOutsideMemory,
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    HeaderTooShort,
    /// The header is not in guest memory.
    HeaderOutsideMemory,
    /// A data buffer is not in guest memory.
    DataOutsideMemory,
    /// Data buffers of the wrong direction for the request type.
    WrongDirection,
    /// Data length not a multiple of the logical block size.
    LengthNotMultiple(u64),
    /// Sector not aligned to the logical block size.
    Unaligned(u64),
    /// The range reaches past the end (or overflows).
    PastEnd(u64, u64),
    /// A write-type request on a read-only export.
    ReadOnly,
    /// More than one discard / write-zeroes segment.
    SegmentCount(u64),
    /// The discard / write-zeroes segment is shorter than 16 bytes.
    SegmentTooShort(u64),
    /// Flag bits other than UNMAP (or UNMAP on a discard).
    BadFlags(u32),
    /// A segment of more sectors than advertised.
    SegmentTooLarge(u32),
    /// Request type this device does not implement.
    UnknownType(u32),
    /// GET_ID buffer shorter than 20 bytes.
    IdBufferShort(u64),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::EmptyChain => write!(f, "empty descriptor chain"),
            Reason::NoStatus => write!(f, "no device-writable status byte at the end of the chain"),
            Reason::StatusOutsideMemory => write!(f, "status byte outside guest memory"),
            Reason::ReadableAfterWritable => write!(f, "device-readable descriptor after a device-writable one"),
            Reason::HeaderTooShort => write!(f, "chain too short for a request header"),
            Reason::HeaderOutsideMemory => write!(f, "request header outside guest memory"),
            Reason::DataOutsideMemory => write!(f, "data buffer outside guest memory"),
            Reason::WrongDirection => write!(f, "data buffer of the wrong direction"),
            Reason::LengthNotMultiple(l) => write!(f, "length {l} is not a multiple of the block size"),
            Reason::Unaligned(s) => write!(f, "sector {s} is not aligned to the block size"),
            Reason::PastEnd(s, l) => write!(f, "sector {s} + {l} bytes is past the end of the disk"),
            Reason::ReadOnly => write!(f, "write-type request on a read-only export"),
            Reason::SegmentCount(l) => write!(f, "{l} bytes of segments: only one segment is supported"),
            Reason::SegmentTooShort(l) => write!(f, "segment of {l} bytes is shorter than 16"),
            Reason::BadFlags(x) => write!(f, "unsupported segment flags {x:#x}"),
            Reason::SegmentTooLarge(n) => write!(f, "segment of {n} sectors is over the limit of {MAX_DISCARD_SECTORS}"),
            Reason::UnknownType(t) => write!(f, "unsupported request type {t}"),
            Reason::IdBufferShort(l) => write!(f, "GET_ID buffer of {l} bytes is shorter than {ID_BYTES}"),
        }
    }
}

/// The outcome of parsing one chain.
pub enum Parsed {
    /// A valid request, to be executed.
    Ok(Request),
    /// Refused: write `code` at `status`, used length 1.
    Fail {
        /// Chain head.
        head: u16,
        /// Status byte address.
        status: GuestAddress,
        /// `S_IOERR` or `S_UNSUPP`.
        code: u8,
        /// Why.
        why: Reason,
    },
    /// No usable status byte: return the chain with used length 0.
    Drop {
        /// Chain head.
        head: u16,
        /// Why.
        why: Reason,
    },
}

/// A refusal before the request type is known to be valid.
struct Refuse(u8, Reason);

fn ioerr(r: Reason) -> Refuse {
    Refuse(S_IOERR, r)
}

/// The descriptor layout of a chain, split in its readable and writable parts.
struct Layout<'a> {
    readable: &'a [Desc],
    writable: &'a [Desc],
    r_len: u64,
    w_len: u64,
}

/// Parses one chain. `scratch` is reused between calls to avoid allocating.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &MemRef, g: &Geometry, scratch: &mut Vec<Desc>) -> Parsed
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    scratch.clear();
    scratch.extend(chain.map(|d| Desc { addr: d.addr().0, len: d.len(), write: d.is_write_only() }));
    parse_descs(head, scratch, mem, g)
}

/// Parses the descriptors of the chain at `head`, as collected from the ring.
pub fn parse_descs(head: u16, descs: &[Desc], mem: &MemRef, g: &Geometry) -> Parsed {
    let status = match status_addr(descs, mem) {
        Ok(s) => s,
        Err(why) => return Parsed::Drop { head, why },
    };
    match parse_body(descs, mem, g) {
        Ok((op, offset, len, data, used_len)) => Parsed::Ok(Request { op, offset, len, data, head, status, used_len, mem: mem.clone() }),
        Err(Refuse(code, why)) => Parsed::Fail { head, status, code, why },
    }
}

fn status_addr(descs: &[Desc], mem: &GuestMemoryMmap) -> Result<GuestAddress, Reason> {
    let last = descs.last().ok_or(Reason::EmptyChain)?;
    if !last.write || last.len == 0 {
        return Err(Reason::NoStatus);
    }
    let addr = last.addr.checked_add(u64::from(last.len) - 1).ok_or(Reason::StatusOutsideMemory)?;
    let addr = GuestAddress(addr);
    if !mem.address_in_range(addr) {
        return Err(Reason::StatusOutsideMemory);
    }
    Ok(addr)
}

fn layout(descs: &[Desc]) -> Result<Layout<'_>, Refuse> {
    let split = descs.iter().position(|d| d.write).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    if writable.iter().any(|d| !d.write) {
        return Err(ioerr(Reason::ReadableAfterWritable));
    }
    let sum = |ds: &[Desc]| ds.iter().map(|d| u64::from(d.len)).sum::<u64>();
    Ok(Layout { readable, writable, r_len: sum(readable), w_len: sum(writable) })
}

type Body = (Op, u64, u64, IoVecs, u32);

fn parse_body(descs: &[Desc], mem: &GuestMemoryMmap, g: &Geometry) -> Result<Body, Refuse> {
    let l = layout(descs)?;
    if l.r_len < HEADER_LEN {
        return Err(ioerr(Reason::HeaderTooShort));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if !read_bytes(mem, l.readable, 0, &mut hdr) {
        return Err(ioerr(Reason::HeaderOutsideMemory));
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    let in_data = l.w_len - 1; // the status byte is the last writable byte
    let out_data = l.r_len - HEADER_LEN;
    match req_type {
        vb::VIRTIO_BLK_T_IN => {
            if out_data != 0 {
                return Err(ioerr(Reason::WrongDirection));
            }
            let offset = rw_range(g, sector, in_data)?;
            let data = gather(mem, l.writable, 0, in_data)?;
            Ok((Op::Read, offset, in_data, data, used(l.w_len)))
        }
        vb::VIRTIO_BLK_T_OUT => {
            check_writable(g)?;
            if in_data != 0 {
                return Err(ioerr(Reason::WrongDirection));
            }
            let offset = rw_range(g, sector, out_data)?;
            let data = gather(mem, l.readable, HEADER_LEN, out_data)?;
            Ok((Op::Write, offset, out_data, data, 1))
        }
        vb::VIRTIO_BLK_T_FLUSH => Ok((Op::Flush, 0, 0, IoVecs::new(), 1)),
        vb::VIRTIO_BLK_T_GET_ID => {
            if in_data < ID_BYTES as u64 {
                return Err(ioerr(Reason::IdBufferShort(in_data)));
            }
            let data = gather(mem, l.writable, 0, ID_BYTES as u64)?;
            Ok((Op::GetId, 0, ID_BYTES as u64, data, ID_BYTES as u32 + 1))
        }
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
            check_writable(g)?;
            if in_data != 0 {
                return Err(ioerr(Reason::WrongDirection));
            }
            let (op, offset, len) = parse_segment(mem, &l, g, req_type == vb::VIRTIO_BLK_T_DISCARD)?;
            Ok((op, offset, len, IoVecs::new(), 1))
        }
        t => Err(Refuse(S_UNSUPP, Reason::UnknownType(t))),
    }
}

fn used(w_len: u64) -> u32 {
    // The chain iterator caps a chain at u32::MAX bytes in total.
    u32::try_from(w_len).unwrap_or(u32::MAX)
}

fn check_writable(g: &Geometry) -> Result<(), Refuse> {
    if g.read_only {
        return Err(ioerr(Reason::ReadOnly));
    }
    Ok(())
}

/// Checks a read/write range; returns its byte offset.
fn rw_range(g: &Geometry, sector: u64, len: u64) -> Result<u64, Refuse> {
    if len % u64::from(g.lbs) != 0 {
        return Err(ioerr(Reason::LengthNotMultiple(len)));
    }
    sector_range(g, sector, len)
}

fn sector_range(g: &Geometry, sector: u64, len: u64) -> Result<u64, Refuse> {
    if sector % (u64::from(g.lbs) / SECTOR_SIZE) != 0 {
        return Err(ioerr(Reason::Unaligned(sector)));
    }
    let offset = sector.checked_mul(SECTOR_SIZE);
    match offset.and_then(|o| o.checked_add(len)) {
        Some(end) if end <= g.capacity => Ok(offset.unwrap_or(0)),
        _ => Err(ioerr(Reason::PastEnd(sector, len))),
    }
}

fn parse_segment(mem: &GuestMemoryMmap, l: &Layout<'_>, g: &Geometry, discard: bool) -> Result<(Op, u64, u64), Refuse> {
    let seg_len = l.r_len - HEADER_LEN;
    if seg_len < SEGMENT_LEN {
        return Err(ioerr(Reason::SegmentTooShort(seg_len)));
    }
    if seg_len > SEGMENT_LEN {
        return Err(Refuse(S_UNSUPP, Reason::SegmentCount(seg_len)));
    }
    let mut seg = [0u8; SEGMENT_LEN as usize];
    if !read_bytes(mem, l.readable, HEADER_LEN, &mut seg) {
        return Err(ioerr(Reason::DataOutsideMemory));
    }
    let sector = u64::from_le_bytes([seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7]]);
    let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let unmap_bit = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // The spec reserves UNMAP for write-zeroes; a discard with it is UNSUPP.
    if flags & !unmap_bit != 0 || (discard && flags != 0) {
        return Err(Refuse(S_UNSUPP, Reason::BadFlags(flags)));
    }
    if num > MAX_DISCARD_SECTORS {
        return Err(ioerr(Reason::SegmentTooLarge(num)));
    }
    let align = u64::from(g.lbs) / SECTOR_SIZE;
    if u64::from(num) % align != 0 {
        return Err(ioerr(Reason::LengthNotMultiple(u64::from(num) * SECTOR_SIZE)));
    }
    let len = u64::from(num) * SECTOR_SIZE;
    let offset = sector_range(g, sector, len)?;
    let op = if discard { Op::Discard } else { Op::WriteZeroes { unmap: flags & unmap_bit != 0 } };
    Ok((op, offset, len))
}

/// Calls `f(addr, len)` for the pieces of `descs` covering bytes `[skip, skip+len)`
/// of their concatenation.
fn for_range(descs: &[Desc], mut skip: u64, mut len: u64, mut f: impl FnMut(u64, u64) -> bool) -> bool {
    for d in descs {
        if len == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(len);
        let Some(addr) = d.addr.checked_add(skip) else { return false };
        if !f(addr, n) {
            return false;
        }
        skip = 0;
        len -= n;
    }
    len == 0
}

/// The host address of guest bytes `[addr, addr+len)` when they lie in one
/// mapped region: the common case, found with one binary search and no
/// iterator (vm-memory's `get_slices` / `read_slice` cost several percent of
/// a 4k request). `None` sends the caller to the general path.
#[inline]
pub(super) fn host_range(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(GuestAddress(addr))?;
    let off = addr.checked_sub(region.start_addr().0)?;
    if off.checked_add(len as u64)? > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(off)).ok()
}

fn read_bytes(mem: &GuestMemoryMmap, descs: &[Desc], skip: u64, out: &mut [u8]) -> bool {
    let mut done = 0usize;
    for_range(descs, skip, out.len() as u64, |addr, n| {
        let n = n as usize; // n ≤ out.len()
        let dst = &mut out[done..done + n];
        let ok = match host_range(mem, addr, n) {
            Some(src) => {
                // SAFETY: `src..src+n` lies in one mapped region of `mem`
                // (checked by `host_range`), which stays mapped while `mem`
                // is borrowed; `dst` is our own buffer, so they cannot
                // overlap. The guest may change the bytes concurrently: we
                // copy them once and parse only the copy.
                unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), n) };
                true
            }
            None => mem.read_slice(dst, GuestAddress(addr)).is_ok(),
        };
        done += n;
        ok
    })
}

/// Builds I/O vectors over bytes `[skip, skip+len)` of `descs`, pointing into guest memory.
fn gather(mem: &GuestMemoryMmap, descs: &[Desc], skip: u64, len: u64) -> Result<IoVecs, Refuse> {
    let mut iov = IoVecs::with_capacity(descs.len());
    let ok = for_range(descs, skip, len, |addr, n| {
        let Ok(n) = usize::try_from(n) else { return false };
        if let Some(ptr) = host_range(mem, addr, n) {
            // SAFETY: as below: `ptr..ptr+n` lies in one read/write region
            // of `mem`, which the request keeps mapped while the vectors live.
            unsafe { iov.push_raw(ptr, n) };
            return true;
        }
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(addr), n) {
            let Ok(slice) = slice else { return false };
            let ptr = slice.ptr_guard_mut().as_ptr();
            // SAFETY: `ptr..ptr+len` is a mapping of a region of `mem`, mapped
            // read/write. The `Request` built from these vectors holds a
            // reference to `mem` (declared after `data`, so dropped after it), so
            // the mapping outlives every use of the vectors. The memory is
            // shared with the guest, which is why the block layer only ever
            // hands it to the kernel or copies it with raw copies.
            unsafe { iov.push_raw(ptr, slice.len()) };
        }
        true
    });
    if ok {
        Ok(iov)
    } else {
        Err(ioerr(Reason::DataOutsideMemory))
    }
}

impl Request {
    /// Runs the request against `node`. Returns the status byte and the used
    /// length, and the error that made it fail, if any.
    pub async fn execute(&self, node: &BlockNode, id: &[u8; ID_BYTES], write_through: bool) -> (u8, u32, Option<BlockError>) {
        let r = match self.op {
            Op::GetId => {
                self.data.copy_from(0, id);
                Ok(())
            }
            _ => self.io(node, write_through).await,
        };
        self.outcome(r)
    }

    /// [`Self::execute`] done at once, on this thread, when the node can
    /// ([`BlockNode::read_now`], [`BlockNode::write_now`]: page-cache hits,
    /// `null-co`); `None` when the request needs `execute`. Nothing of the
    /// request has then been done that `execute` would not do again.
    pub fn execute_now(&self, node: &BlockNode, id: &[u8; ID_BYTES], write_through: bool) -> Option<(u8, u32, Option<BlockError>)> {
        let r = match self.op {
            Op::Read => node.read_now(self.offset, &self.data)?,
            Op::Write => node.write_now(self.offset, &self.data, WriteFlags { fua: write_through })?,
            Op::GetId => {
                self.data.copy_from(0, id);
                Ok(())
            }
            Op::Flush | Op::Discard | Op::WriteZeroes { .. } => return None,
        };
        Some(self.outcome(r))
    }

    /// The status code, used length and error of a finished request.
    fn outcome(&self, r: BlockResult<()>) -> (u8, u32, Option<BlockError>) {
        match r {
            Ok(()) => (S_OK, self.used_len, None),
            Err(e) if e.kind() == ErrorKind::Unsupported => (S_UNSUPP, 1, Some(e)),
            Err(e) => (S_IOERR, 1, Some(e)),
        }
    }

    /// The node operation, boxed: the block layer's futures are large (up to
    /// a kilobyte) and differ per operation, so keeping them inline would make
    /// every request task as large as the largest one, copied on each spawn.
    fn io<'a>(&'a self, node: &'a BlockNode, write_through: bool) -> Pin<Box<dyn Future<Output = BlockResult<()>> + 'a>> {
        let flags = WriteFlags { fua: write_through };
        match self.op {
            Op::Read => Box::pin(node.read(self.offset, &self.data)),
            Op::Write => Box::pin(node.write(self.offset, &self.data, flags)),
            Op::Flush => Box::pin(node.flush()),
            Op::Discard => Box::pin(node.discard(self.offset, self.len)),
            Op::WriteZeroes { unmap } => Box::pin(node.write_zeroes(self.offset, self.len, unmap, flags)),
            Op::GetId => Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// Writes the status byte into guest memory. Returns false if it could
    /// not be written (the parser checked the address, so this is a bug
    /// guard, not an expected path).
    pub fn write_status(&self, code: u8) -> bool {
        write_status(&self.mem, self.status, code)
    }
}

/// Writes a status byte for a refused chain.
pub fn write_status(mem: &GuestMemoryMmap, status: GuestAddress, code: u8) -> bool {
    match host_range(mem, status.0, 1) {
        Some(p) => {
            // SAFETY: `p` is a mapped byte of guest memory (`host_range`),
            // mapped while `mem` is borrowed; a volatile store because the
            // guest reads it concurrently.
            unsafe { std::ptr::write_volatile(p, code) };
            true
        }
        None => mem.write_obj(code, status).is_ok(),
    }
}
