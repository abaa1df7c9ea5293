//! Direct access to a split virtqueue's rings, for the queue worker's hot
//! path.
//!
//! virtio-queue reads every 16-byte descriptor, available-ring entry and
//! used element through vm-memory's generic slice iterators and a `memmove`
//! call; on a page-cached 4k request that was 8–13 % of the queue thread's
//! time. [`Rings`] resolves the descriptor table, the available ring and the
//! used ring to host pointers once per batch (one region lookup each) and
//! reads and writes them directly, with the checks virtio-queue makes:
//!
//! - a chain ends after as many descriptors as its table has (no loops), at
//!   a `next` index outside the table, at a descriptor that cannot be read,
//!   or when its lengths add up past `u32::MAX`;
//! - an indirect descriptor inside an indirect table, or an indirect table
//!   whose length is not a multiple of 16 or longer than 65535 entries,
//!   ends the chain;
//! - a head index outside the table gives an empty chain, and is never put
//!   into the used ring.
//!
//! The queue's own state (`next_avail`, `next_used`) stays in virtio-queue's
//! [`Queue`], which the vhost-user plumbing reads (GET_VRING_BASE) and which
//! the notification calls use. Used elements of one batch are written first
//! and published with one release store of the used index.
//!
//! Rings that do not lie in one mapped region, or are misaligned, are left
//! to virtio-queue ([`Rings::new`] returns `None`): QEMU, libblkio and
//! cloud-hypervisor put them in one RAM block.

use std::marker::PhantomData;
use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{host_range, Desc};

const DESC_SIZE: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Host views of one queue's rings, valid while the memory snapshot they
/// were resolved in is borrowed.
pub struct Rings<'m> {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    _mem: PhantomData<&'m GuestMemoryMmap>,
}

/// Where a descriptor table is: mapped (the common case) or only reachable
/// through vm-memory (an indirect table that crosses a region boundary).
#[derive(Clone, Copy)]
enum Table {
    Host(*const u8),
    Guest(u64),
}

impl<'m> Rings<'m> {
    /// Resolves the rings of `queue` in `mem`; `None` when the queue is not
    /// ready or a ring is not in one region or misaligned.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<Rings<'m>> {
        let size = queue.size();
        // virtio-queue only accepts powers of two (as the specification
        // requires of split rings); slots are then found with a mask.
        if !queue.ready() || !size.is_power_of_two() {
            return None;
        }
        let n = usize::from(size);
        // used_event / avail_event follow the rings.
        let extra = if queue.event_idx_enabled() { 2 } else { 0 };
        let desc = host_range(mem, queue.desc_table(), DESC_SIZE * n)?;
        let avail = host_range(mem, queue.avail_ring(), 4 + 2 * n + extra)?;
        let used = host_range(mem, queue.used_ring(), 4 + 8 * n + extra)?;
        // The index fields are accessed atomically.
        if avail as usize % 2 != 0 || used as usize % 4 != 0 {
            return None;
        }
        Some(Rings { desc, avail, used, size, event_idx: queue.event_idx_enabled(), _mem: PhantomData })
    }

    fn atomic_u16(&self, p: *const u8) -> &AtomicU16 {
        // SAFETY: callers pass a 2-aligned address inside a ring checked by
        // `new` (an index field or the event word), mapped for 'm; guest
        // memory is shared with the driver, which accesses it concurrently,
        // hence the atomic.
        unsafe { AtomicU16::from_ptr(p as *mut u16) }
    }

    /// The driver's available index (acquire: the entries and descriptors
    /// it covers are visible after this).
    pub fn avail_idx(&self) -> u16 {
        // SAFETY (pointer arithmetic): offset 2 is inside the ring (4 + 2n bytes).
        u16::from_le(self.atomic_u16(self.avail.wrapping_add(2)).load(Ordering::Acquire))
    }

    /// The head index in available-ring slot `idx % size`.
    pub fn avail_head(&self, idx: u16) -> u16 {
        let slot = usize::from(idx & (self.size - 1));
        // SAFETY: `4 + 2 * slot + 2 ≤ 4 + 2n`, inside the ring checked by
        // `new`; a volatile read because the driver owns the ring.
        let b = unsafe { std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const [u8; 2]) };
        u16::from_le_bytes(b)
    }

    /// Starts loading what popping the `n` chains from available slot
    /// `idx` on will read first: their head descriptors, then the bytes
    /// each head points at (the request header, or an indirect table).
    /// The driver just wrote all of them on another CPU, so each is a cache
    /// miss; asked for together they overlap instead of stalling the pop
    /// one after the other. Only hints: nothing is read for the request
    /// from here, and a head or address out of range is skipped.
    pub fn prefetch(&self, mem: &GuestMemoryMmap, idx: u16, n: usize) {
        self.prefetch_targets(mem, idx, n, prefetch);
    }

    /// Calls `hint` with each address [`Self::prefetch`] loads: descriptor
    /// slots inside the table first, then mapped guest bytes.
    #[inline(always)]
    fn prefetch_targets(&self, mem: &GuestMemoryMmap, idx: u16, n: usize, mut hint: impl FnMut(*const u8)) {
        for i in 0..n {
            let head = self.avail_head(idx.wrapping_add(i as u16));
            if head < self.size {
                // `head` < size: the slot is inside the table.
                hint(self.desc.wrapping_add(DESC_SIZE * usize::from(head)));
            }
        }
        for i in 0..n {
            let head = self.avail_head(idx.wrapping_add(i as u16));
            if head >= self.size {
                continue;
            }
            if let Some((addr, _, _, _)) = read_desc(mem, Table::Host(self.desc), head) {
                if let Some(p) = host_range(mem, addr, 1) {
                    hint(p);
                }
            }
        }
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn used_event(&self) -> u16 {
        let off = 4 + 2 * usize::from(self.size);
        // SAFETY: with EVENT_IDX `new` checked 2 more bytes past the ring;
        // without it this is never called (`needs_interrupt`).
        u16::from_le(self.atomic_u16(self.avail.wrapping_add(off)).load(Ordering::Relaxed))
    }

    /// Collects the descriptors of the chain at `head` into `out` (cleared
    /// first), ending it as virtio-queue's iterator would.
    pub fn walk(&self, mem: &GuestMemoryMmap, head: u16, out: &mut Vec<Desc>) {
        out.clear();
        let mut table = Table::Host(self.desc);
        let mut table_len = self.size;
        let mut index = head;
        let mut ttl = self.size;
        let mut indirect = false;
        let mut bytes = 0u32;
        while ttl > 0 && index < table_len {
            let Some((addr, len, flags, next)) = read_desc(mem, table, index) else { return };
            if flags & F_INDIRECT != 0 {
                if indirect || len as usize % DESC_SIZE != 0 {
                    return;
                }
                let Ok(n) = u16::try_from(len as usize / DESC_SIZE) else { return };
                table = match host_range(mem, addr, len as usize) {
                    Some(p) => Table::Host(p),
                    None => Table::Guest(addr),
                };
                table_len = n;
                ttl = n;
                index = 0;
                indirect = true;
                continue;
            }
            let Some(b) = bytes.checked_add(len) else { return };
            bytes = b;
            out.push(Desc::new(addr, len, flags & F_WRITE != 0));
            if flags & F_NEXT == 0 {
                return;
            }
            index = next;
            ttl -= 1;
        }
    }

    /// Writes used element `idx % size`. Not visible to the driver before
    /// [`Self::publish_used`].
    pub fn put_used(&self, idx: u16, id: u16, len: u32) {
        let slot = usize::from(idx & (self.size - 1));
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&u32::from(id).to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: `4 + 8 * slot + 8 ≤ 4 + 8n`, inside the used ring checked
        // by `new`, which the device owns; volatile because the driver reads it.
        unsafe { std::ptr::write_volatile(self.used.add(4 + 8 * slot) as *mut [u8; 8], e) };
    }

    /// Publishes the used index (release: the elements written before it
    /// are visible to the driver first).
    pub fn publish_used(&self, idx: u16) {
        // SAFETY (pointer arithmetic): offset 2 is inside the used ring.
        self.atomic_u16(self.used.wrapping_add(2)).store(idx.to_le(), Ordering::Release);
    }

    /// Whether the driver wants an interrupt now that the used index moved
    /// from `old` to `new` (EVENT_IDX: `used_event` was passed; otherwise
    /// always, as virtio-queue does).
    pub fn needs_interrupt(&self, old: u16, new: u16) -> bool {
        if !self.event_idx {
            return true;
        }
        // The used index store must be visible before used_event is read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (new, old, event) = (Wrapping(new), Wrapping(old), Wrapping(self.used_event()));
        new - event - Wrapping(1) < new - old
    }
}

/// A hint to load the cache line at `p` (never faults, reads nothing).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it accesses no memory
    // architecturally and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Reads descriptor `index` of `table`: (addr, len, flags, next).
fn read_desc(mem: &GuestMemoryMmap, table: Table, index: u16) -> Option<(u64, u32, u16, u16)> {
    let off = DESC_SIZE * usize::from(index);
    let b: [u8; DESC_SIZE] = match table {
        // SAFETY: `index` < the table's length, and the whole table was
        // found in one mapped region (`Rings::new` for the queue's table,
        // `walk` for an indirect one) that stays mapped for 'm; a volatile
        // read because the bytes are guest memory.
        Table::Host(p) => unsafe { std::ptr::read_volatile(p.add(off) as *const [u8; DESC_SIZE]) },
        Table::Guest(a) => {
            let mut b = [0u8; DESC_SIZE];
            mem.read_slice(&mut b, GuestAddress(a.checked_add(off as u64)?)).ok()?;
            b
        }
    };
    let addr = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let flags = u16::from_le_bytes([b[12], b[13]]);
    let next = u16::from_le_bytes([b[14], b[15]]);
    Some((addr, len, flags, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    const REGION: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(REGION), REGION as usize)]).expect("guest memory")
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        b
    }

    /// A hostile random descriptor: any flags, `next` sometimes past the
    /// table, lengths near u32::MAX, indirect tables anywhere (including
    /// across the region boundary and outside memory).
    fn random_desc(rng: &mut rand::rngs::StdRng, size: u16, tables: &[u64]) -> [u8; 16] {
        let flags = rng.gen_range(0..8u16);
        let next = if rng.gen_bool(0.1) { rng.gen_range(0..size + 8) } else { rng.gen_range(0..size) };
        let (addr, len) = if flags & F_INDIRECT != 0 {
            let t = tables[rng.gen_range(0..tables.len())];
            let n = rng.gen_range(0..12u32);
            (t, if rng.gen_bool(0.1) { n * 16 + 8 } else { n * 16 })
        } else {
            let len = if rng.gen_bool(0.05) { u32::MAX - rng.gen_range(0..4096) } else { rng.gen_range(0..8192) };
            (rng.gen_range(0..2 * REGION + 4096), len)
        };
        raw(addr, len, flags, next)
    }

    /// Every chain [`Rings::walk`] collects is the one virtio-queue's
    /// iterator yields, on random hostile descriptor tables.
    #[test]
    fn walk_matches_virtio_queue_on_hostile_chains() {
        let mem = memory();
        let size = 16u16;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Indirect tables: in region 0, straddling the boundary, outside memory.
        let tables = [0x8_0000u64, REGION - 64, 0x8_1000, 4 * REGION];
        let mut out = Vec::new();
        let mut compared = 0;
        for round in 0..400 {
            let mq = MockSplitQueue::create(&mem, GuestAddress(0), size);
            let mut queue: Queue = mq.create_queue().expect("queue");
            let desc = queue.desc_table();
            for i in 0..u64::from(size) {
                mem.write_slice(&random_desc(&mut rng, size, &tables), GuestAddress(desc + 16 * i)).expect("desc");
            }
            for &t in &tables[..3] {
                for i in 0..12u64 {
                    mem.write_slice(&random_desc(&mut rng, size, &tables), GuestAddress(t + 16 * i)).expect("table");
                }
            }
            let heads: Vec<u16> = (0..size).map(|_| if rng.gen_bool(0.05) { size + rng.gen_range(0..100) } else { rng.gen_range(0..size) }).collect();
            for (i, &h) in heads.iter().enumerate() {
                mq.avail().ring().ref_at(i).expect("slot").store(u16::to_le(h));
            }
            mq.avail().idx().store(u16::to_le(size));
            let rings = Rings::new(&queue, &mem).expect("rings in one region");
            type Chain = (u16, Vec<(u64, u32, bool)>);
            let expected: Vec<Chain> = queue
                .iter(&mem)
                .expect("iter")
                .map(|c| (c.head_index(), c.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect()))
                .collect();
            assert_eq!(rings.avail_idx(), size);
            // What a prefetch over the whole ring would load: the slot of
            // every head inside the table, then the first byte of every such
            // head's buffer that is in guest memory; nothing for the others.
            let mut hinted = Vec::new();
            rings.prefetch_targets(&mem, 0, usize::from(size), |p| hinted.push(p as usize));
            let table = rings.desc as usize;
            let in_table: Vec<usize> = heads.iter().filter(|&&h| h < size).map(|&h| table + 16 * usize::from(h)).collect();
            let in_memory: Vec<usize> = heads
                .iter()
                .filter(|&&h| h < size)
                .filter_map(|&h| {
                    let d: [u8; 16] = mem.read_obj(GuestAddress(desc + 16 * u64::from(h))).expect("desc");
                    let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
                    vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(addr)).ok().map(|p| p as usize)
                })
                .collect();
            assert_eq!(hinted, [in_table, in_memory].concat(), "round {round}");
            rings.prefetch(&mem, round as u16, usize::from(size) * 2);
            for (i, (head, descs)) in expected.iter().enumerate() {
                assert_eq!(rings.avail_head(i as u16), *head, "round {round} slot {i}");
                rings.walk(&mem, *head, &mut out);
                let got: Vec<(u64, u32, bool)> = out.iter().map(|d| d.parts()).collect();
                assert_eq!(&got, descs, "round {round} head {head}");
                compared += usize::from(!descs.is_empty());
            }
        }
        assert!(compared > 1000, "too few non-empty chains compared: {compared}");
    }

    /// Used elements and the used index land where virtio-queue puts them,
    /// and the interrupt decision follows used_event.
    #[test]
    fn used_ring_and_event_idx() {
        let mem = memory();
        let mq = MockSplitQueue::create(&mem, GuestAddress(0), 8);
        let mut queue: Queue = mq.create_queue().expect("queue");
        queue.set_event_idx(true);
        let rings = Rings::new(&queue, &mem).expect("rings");
        for i in 0..10u16 {
            rings.put_used(i, i % 8, 100 + u32::from(i));
        }
        rings.publish_used(10);
        assert_eq!(u16::from_le(mq.used().idx().load()), 10);
        // Slot 1 was written twice (index 1, then 9).
        let e = mq.used().ring().ref_at(1).expect("slot").load();
        assert_eq!((e.id(), e.len()), (1, 109));
        // used_event = 4: an interrupt when the index passes 5 (4 + 1).
        let ue = GuestAddress(queue.avail_ring() + 4 + 2 * 8);
        mem.write_obj(u16::to_le(4), ue).expect("used_event");
        assert!(rings.needs_interrupt(3, 10));
        assert!(rings.needs_interrupt(4, 5));
        assert!(!rings.needs_interrupt(5, 10));
        assert!(!rings.needs_interrupt(0, 4));
        // Without EVENT_IDX, always.
        queue.set_event_idx(false);
        assert!(Rings::new(&queue, &mem).expect("rings").needs_interrupt(5, 10));
    }

    /// A ring across two regions is left to virtio-queue.
    #[test]
    fn rings_across_regions_are_not_mapped() {
        let mem = memory();
        let mq = MockSplitQueue::create(&mem, GuestAddress(REGION - 64), 8);
        let queue: Queue = mq.create_queue().expect("queue");
        assert!(Rings::new(&queue, &mem).is_none());
        let mq = MockSplitQueue::create(&mem, GuestAddress(REGION), 8);
        let queue: Queue = mq.create_queue().expect("queue");
        assert!(Rings::new(&queue, &mem).is_some());
    }
}
