//! A fixed-capacity open-addressing table of `u64 → u64` that readers use without locks.
//!
//! One writer (serialised by the caller) and any number of concurrent readers. Every slot is a
//! pair of atomics. Linear probing from the first slot of a key's home bucket (one cache line).
//! Deletion leaves no tombstones: the slots after the deleted one are shifted back into the gap
//! (backward-shift deletion), so probes stay as short as the live load allows and the table never
//! fills up with dead slots. Keys may repeat (a multimap): the block table keeps one slot per
//! (key, engine group, tier); a shift never reorders the slots of one key.
//!
//! Readers take no lock. A shift moves slots, which a probe running at the same time could miss
//! or see half-written, so the table carries a sequence counter: the writer makes it odd before a
//! shift and even after, and a reader that saw it odd, or changed, across its probe probes again.
//! Readers collect what they found and act on it only once the probe is known clean. Inserting
//! into an empty slot (value first, then key) and updating a value need no retry: a reader sees
//! the slot either before or after.
//!
//! The table never resizes itself: the owner builds a larger (or smaller) table with
//! [`Table::rebuild`] and swaps it in; readers still holding the old one finish on it.
//!
//! Tried and measured slower, 2026-12-08 (`benches/run index --only-kvindex`, alternating
//! runs): probes guided by a per-bucket overflow count instead of stopping at the first empty
//! slot (as F14 and Swiss tables do), with deletion by clearing the slot and no shifts. With
//! four-slot buckets nearly every bucket of a cluster has overflow at the loads the index runs
//! at, so probes for absent keys got longer: ingest 2.2 M block ops/s against 3.3, query p99
//! 404-447 us against 205-272. Keeping emptied block slots (presence mask zero) for a later
//! sweep instead of shifting at once gained nothing either: the sweep's shifts at 85% load cost
//! what the removals saved.

use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Key of an empty slot.
pub const EMPTY: u64 = 0;
/// A reserved key, never stored (tables once marked deleted slots with it); keys are above it.
pub const TOMB: u64 = 1;
/// A key bit the table ignores when placing a key: a slot whose key is `k | MARK` lies where `k`
/// would, so an owner whose keys leave this bit clear can mark a slot (see [`Table::set_key`])
/// without moving it, and find the marked slot again by probing for `k | MARK`.
pub const MARK: u64 = 1 << 63;

struct Slot {
    key: AtomicU64,
    val: AtomicU64,
}

/// Bytes one slot occupies.
pub const SLOT_BYTES: usize = std::mem::size_of::<u64>() * 2;

/// The table. See the module docs for the concurrency contract.
pub struct Table {
    slots: SlotBuf,
    /// Odd while the writer shifts slots; bumped by every shift (see the module docs).
    seq: AtomicU64,
}

/// The slots' memory: zeroed (all slots empty), aligned to 2 MiB and marked for transparent huge
/// pages when large, because lookups land on random slots and 4 KiB pages would miss the TLB on
/// nearly every one.
struct SlotBuf {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    layout: std::alloc::Layout,
}

const HUGE_PAGE: usize = 2 << 20;
/// A cache line: the slots of one bucket.
const LINE: usize = 64;
/// Slots per bucket (one cache line). A key's probe starts at the first slot of its home bucket,
/// so the one line fetched for it holds its first four candidate slots.
const BUCKET: usize = LINE / std::mem::size_of::<Slot>();

impl SlotBuf {
    fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<Slot>();
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { LINE };
        let layout = match std::alloc::Layout::from_size_align(bytes, align) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>()),
        };
        #[allow(unsafe_code)]
        // SAFETY: `layout` has a non-zero size (len >= 8). The memory is advised (a hint, no
        // effect on validity), then fully zeroed before any slot is read; an all-zero `Slot` is
        // valid (two atomics holding 0, i.e. an empty slot).
        let ptr = unsafe {
            let raw = std::alloc::alloc(layout);
            if raw.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            #[cfg(target_os = "linux")]
            if align == HUGE_PAGE {
                libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE);
            }
            std::ptr::write_bytes(raw, 0, bytes);
            std::ptr::NonNull::new_unchecked(raw.cast::<Slot>())
        };
        SlotBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for SlotBuf {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        #[allow(unsafe_code)]
        // SAFETY: `ptr` points to `len` initialised slots owned by this buffer until drop.
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }
}

impl Drop for SlotBuf {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: allocated in `zeroed` with exactly this layout; `Slot` needs no drop.
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout)
        }
    }
}

#[allow(unsafe_code)]
// SAFETY: the buffer owns its slots, which are atomics: sharing and sending them is sound, as for
// `Box<[Slot]>`.
unsafe impl Send for SlotBuf {}
#[allow(unsafe_code)]
// SAFETY: as above; all access goes through the slots' atomics.
unsafe impl Sync for SlotBuf {}

/// Hints the CPU to fetch the cache line at `p` (any address: a prefetch never faults).
#[inline]
pub(crate) fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: `_mm_prefetch` only needs SSE, which every x86-64 CPU has; a prefetch is a hint
    // that never faults, whatever the address, and writes nothing.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The writer's bookkeeping for a table (kept outside it, under the writer's lock).
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy {
    /// Slots holding a key.
    pub live: usize,
}

/// What a reader's probe found: `(slot index, value)` pairs, a few inline.
pub struct Hits {
    n: usize,
    inline: [(usize, u64); HITS_INLINE],
    spill: Vec<(usize, u64)>,
}

const HITS_INLINE: usize = 8;

impl Hits {
    /// An empty set of hits.
    #[inline]
    pub fn new() -> Self {
        Hits {
            n: 0,
            inline: [(0, 0); HITS_INLINE],
            spill: Vec::new(),
        }
    }

    #[inline]
    fn clear(&mut self) {
        self.n = 0;
        self.spill.clear();
    }

    #[inline]
    fn push(&mut self, idx: usize, v: u64) {
        if self.n < HITS_INLINE {
            self.inline[self.n] = (idx, v);
        } else {
            self.spill.push((idx, v));
        }
        self.n += 1;
    }

    /// The hits, in probe order.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.inline[..self.n.min(HITS_INLINE)]
            .iter()
            .chain(self.spill.iter())
            .copied()
    }
}

impl Default for Hits {
    fn default() -> Self {
        Hits::new()
    }
}

#[inline]
fn spread(key: u64) -> u64 {
    key.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Table {
    /// A table of at least `capacity` empty slots (at least 8; rounded up to whole buckets).
    pub fn new(capacity: usize) -> Self {
        // EMPTY is 0: zeroed memory is a table of empty slots.
        const _: () = assert!(EMPTY == 0);
        Table {
            slots: SlotBuf::zeroed(capacity.max(8).next_multiple_of(BUCKET)),
            seq: AtomicU64::new(0),
        }
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes the slots occupy.
    pub fn bytes(&self) -> usize {
        self.capacity() * SLOT_BYTES
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        // Multiply-shift range reduction to a bucket (any number of buckets, not only powers of
        // two), then the bucket's first slot.
        let buckets = (self.slots.len() / BUCKET) as u128;
        ((u128::from(spread(key & !MARK)) * buckets) >> 64) as usize * BUCKET
    }

    /// `i` reduced into the table, for `i < 2 * capacity`.
    #[inline]
    fn wrap(&self, i: usize) -> usize {
        if i >= self.slots.len() {
            i - self.slots.len()
        } else {
            i
        }
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// Hints the CPU to fetch the home slot of `key`.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        self.prefetch_slot(self.home(key));
    }

    /// Hints the CPU to fetch the home bucket of `key` and the bucket after it (where a key's
    /// slots land when its home bucket is full).
    #[inline]
    pub fn prefetch_probe(&self, key: u64) {
        let home = self.home(key);
        self.prefetch_slot(home);
        self.prefetch_slot(home + BUCKET);
    }

    /// Hints the CPU to fetch slot `idx` (`idx < 2 * capacity`, wrapped), without waiting for
    /// it.
    #[inline]
    pub fn prefetch_slot(&self, idx: usize) {
        prefetch_line(std::ptr::from_ref(&self.slots[self.wrap(idx)]));
    }

    /// Reader: the slots holding `key`, in probe order, into `hits`; the probe stops after a
    /// value for which `more` is false. The result is one consistent state of the table: a probe
    /// that overlapped a shift is repeated.
    #[inline]
    pub fn probe(&self, key: u64, mut more: impl FnMut(u64) -> bool, hits: &mut Hits) {
        let home = self.home(key);
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                hits.clear();
                let mut i = home;
                for _ in 0..self.slots.len() {
                    let s = &self.slots[i];
                    let k = s.key.load(Ordering::Acquire);
                    if k == EMPTY {
                        break;
                    }
                    if k == key {
                        let v = s.val.load(Ordering::Acquire);
                        // The slot may have been emptied and refilled (no shift, so no sequence
                        // change) between the two loads: take the value only if the key stayed.
                        if s.key.load(Ordering::Acquire) == key {
                            hits.push(i, v);
                            if !more(v) {
                                break;
                            }
                        }
                    }
                    i = self.next(i);
                }
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    return;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Reader: calls `f` with the value of every slot holding `key`, until `f` returns false.
    #[inline]
    pub fn for_each(&self, key: u64, mut f: impl FnMut(u64) -> bool) {
        let mut hits = Hits::new();
        self.probe(key, |_| true, &mut hits);
        for (_, v) in hits.iter() {
            if !f(v) {
                return;
            }
        }
    }

    /// Reader: the value of the first slot holding `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u64> {
        let mut hits = Hits::new();
        self.probe(key, |_| false, &mut hits);
        let first = hits.iter().next().map(|(_, v)| v);
        first
    }

    /// Reader: tries once to replace `old` with `new` in slot `idx` if it still holds `key`.
    /// `new` may differ from `old` only in bits whose loss or misplacement is harmless (a slot
    /// shifted in meanwhile with the same value gets them).
    #[inline]
    pub fn try_update(&self, idx: usize, key: u64, old: u64, new: u64) {
        let s = &self.slots[idx];
        if s.key.load(Ordering::Acquire) == key {
            let _ = s
                .val
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Writer: index of the first slot holding `key` whose value satisfies `pred`.
    #[inline]
    pub fn find(&self, key: u64, mut pred: impl FnMut(u64) -> bool) -> Option<usize> {
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let k = self.slots[i].key.load(Ordering::Relaxed);
            if k == EMPTY {
                return None;
            }
            if k == key && pred(self.slots[i].val.load(Ordering::Relaxed)) {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }

    /// Writer: the value in slot `idx`.
    #[inline]
    pub fn val(&self, idx: usize) -> u64 {
        self.slots[idx].val.load(Ordering::Relaxed)
    }

    /// Writer: the key in slot `idx` (may be [`EMPTY`]).
    #[inline]
    pub fn key(&self, idx: usize) -> u64 {
        self.slots[idx].key.load(Ordering::Relaxed)
    }

    /// Writer: replaces the value in slot `idx`.
    #[inline]
    pub fn set_val(&self, idx: usize, val: u64) {
        self.slots[idx].val.store(val, Ordering::Release);
    }

    /// Writer: replaces the key in slot `idx` by `key`, which differs from it in [`MARK`] alone
    /// (so the slot stays on its probe path). Readers see the slot under the old key or the new.
    #[inline]
    pub fn set_key(&self, idx: usize, key: u64) {
        debug_assert_eq!(self.key(idx) & !MARK, key & !MARK);
        self.slots[idx].key.store(key, Ordering::Release);
    }

    /// Writer: the value of the first slot holding `key`.
    #[inline]
    pub fn lookup(&self, key: u64) -> Option<u64> {
        self.find(key, |_| true).map(|i| self.val(i))
    }

    /// Writer: one probe that finds the first slot holding `key` whose value satisfies `pred`
    /// (`Ok(index)`), or else says where `key` would be inserted (`Err(index)`, after every slot
    /// of `key`). `seen` is set when any slot holding `key` was passed.
    #[inline]
    pub fn find_or_vacancy(
        &self,
        key: u64,
        seen: &mut bool,
        mut pred: impl FnMut(u64) -> bool,
    ) -> Result<usize, usize> {
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let k = self.slots[i].key.load(Ordering::Relaxed);
            if k == EMPTY {
                return Err(i);
            }
            if k == key {
                *seen = true;
                if pred(self.slots[i].val.load(Ordering::Relaxed)) {
                    return Ok(i);
                }
            }
            i = self.next(i);
        }
        Err(i)
    }

    /// Writer: fills the vacancy `idx` returned by [`Table::find_or_vacancy`] (with no table
    /// change in between).
    #[inline]
    pub fn fill(&self, idx: usize, key: u64, val: u64, occ: &mut Occupancy) {
        debug_assert!(key > TOMB);
        let s = &self.slots[idx];
        debug_assert_eq!(s.key.load(Ordering::Relaxed), EMPTY);
        // Value before key: a reader that sees the key also sees this value (Release/Acquire).
        s.val.store(val, Ordering::Release);
        s.key.store(key, Ordering::Release);
        occ.live += 1;
    }

    /// Writer: inserts a new slot (duplicates allowed) after every slot of its key. The caller
    /// keeps the load below 1. Returns the slot index.
    pub fn insert(&self, key: u64, val: u64, occ: &mut Occupancy) -> usize {
        let mut seen = false;
        let idx = match self.find_or_vacancy(key, &mut seen, |_| false) {
            Ok(i) | Err(i) => i,
        };
        self.fill(idx, key, val, occ);
        idx
    }

    /// Probe distance from `from` forward to `to`.
    #[inline]
    fn dist(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.slots.len() - from
        }
    }

    /// Writer: deletes slot `idx`, shifting the slots after it back into the gap where their
    /// probes allow (slot indices after `idx`, up to the next empty slot, may change).
    pub fn remove(&self, idx: usize, occ: &mut Occupancy) {
        occ.live -= 1;
        let mut j = self.next(idx);
        if self.slots[j].key.load(Ordering::Relaxed) == EMPTY {
            // Nothing to shift: readers see the slot either held or empty.
            self.slots[idx].key.store(EMPTY, Ordering::Release);
            return;
        }
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let mut hole = idx;
        loop {
            let k = self.slots[j].key.load(Ordering::Relaxed);
            if k == EMPTY {
                break;
            }
            // The slot at `j` may move to the hole if the hole lies on its probe path.
            if self.dist(self.home(k), j) >= self.dist(hole, j) {
                let v = self.slots[j].val.load(Ordering::Relaxed);
                self.slots[hole].val.store(v, Ordering::Relaxed);
                self.slots[hole].key.store(k, Ordering::Relaxed);
                hole = j;
            }
            j = self.next(j);
        }
        self.slots[hole].key.store(EMPTY, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Writer: deletes, in place, every live slot for which `drop(key, value)` is true (one
    /// pass over the table, each deletion a backward shift as in [`Table::remove`]). Returns how
    /// many were deleted.
    pub fn sweep(&self, mut drop: impl FnMut(u64, u64) -> bool, occ: &mut Occupancy) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            // A deletion shifts a later slot into `i` (or into later slots only): look again.
            loop {
                let k = self.key(i);
                if k <= TOMB || !drop(k, self.val(i)) {
                    break;
                }
                self.remove(i, occ);
                n += 1;
            }
        }
        n
    }

    /// Writer: visits every live slot as `(index, key, value)`.
    pub fn scan(&self, mut f: impl FnMut(usize, u64, u64)) {
        for (i, s) in self.slots.iter().enumerate() {
            let k = s.key.load(Ordering::Relaxed);
            if k > TOMB {
                f(i, k, s.val.load(Ordering::Relaxed));
            }
        }
    }

    /// Writer: a new table of `capacity` slots holding the live slots for which `keep` is true.
    pub fn rebuild(
        &self,
        capacity: usize,
        keep: impl FnMut(u64, u64) -> bool,
    ) -> (Table, Occupancy) {
        self.rebuild_with_more(capacity, 0, keep)
    }

    /// Like [`Table::rebuild`], for a multimap whose values carry `more` (a bit mask): set on a
    /// slot exactly when another slot of the same key follows it in probe order, so readers may
    /// stop at the first slot of a key without it.
    pub fn rebuild_with_more(
        &self,
        capacity: usize,
        more: u64,
        mut keep: impl FnMut(u64, u64) -> bool,
    ) -> (Table, Occupancy) {
        // The new table's slots are written in random order: fetch the home bucket of the live
        // slot this far ahead of the one being moved.
        const AHEAD: usize = 16;
        let t = Table::new(capacity);
        let mut occ = Occupancy::default();
        let n = self.slots.len();
        for i in 0..n {
            if let Some(s) = self.slots.get(i + AHEAD) {
                let k = s.key.load(Ordering::Relaxed);
                if k > TOMB {
                    t.prefetch(k);
                }
            }
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Relaxed);
            if k <= TOMB {
                continue;
            }
            let v = s.val.load(Ordering::Relaxed);
            if keep(k, v) {
                t.append(k, v & !more, more, &mut occ);
            }
        }
        (t, occ)
    }

    /// Writer: inserts a slot after every slot of its key, setting `more` on those (one probe).
    fn append(&self, key: u64, val: u64, more: u64, occ: &mut Occupancy) {
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Relaxed);
            if k == EMPTY {
                s.val.store(val, Ordering::Release);
                s.key.store(key, Ordering::Release);
                occ.live += 1;
                return;
            }
            if k == key && more != 0 {
                let v = s.val.load(Ordering::Relaxed);
                if v & more != more {
                    s.val.store(v | more, Ordering::Release);
                }
            }
            i = self.next(i);
        }
    }

    /// Writer: like [`Table::rebuild`], calling `ahead(key, value)` on the live slot 16 positions
    /// before it is judged by `keep`, so `keep`'s own lookups can be prefetched.
    pub fn rebuild_prefetching(
        &self,
        capacity: usize,
        ahead: impl Fn(u64, u64),
        mut keep: impl FnMut(u64, u64) -> bool,
    ) -> (Table, Occupancy) {
        const AHEAD: usize = 16;
        let t = Table::new(capacity);
        let mut occ = Occupancy::default();
        let n = self.slots.len();
        for i in 0..n {
            if let Some(s) = self.slots.get(i + AHEAD) {
                let k = s.key.load(Ordering::Relaxed);
                if k > TOMB {
                    ahead(k, s.val.load(Ordering::Relaxed));
                }
            }
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Relaxed);
            if k > TOMB {
                let v = s.val.load(Ordering::Relaxed);
                if keep(k, v) {
                    t.insert(k, v, &mut occ);
                }
            }
        }
        (t, occ)
    }

    /// Writer: the distance of slot `idx` from the home of `key` along the probe sequence.
    #[inline]
    pub fn probe_distance(&self, key: u64, idx: usize) -> usize {
        let home = self.home(key);
        if idx >= home {
            idx - home
        } else {
            idx + self.slots.len() - home
        }
    }

    /// Writer: ORs `bits` into every slot of `key` closer to its home than `limit` (a probe
    /// distance); returns whether any slot of `key` lies at or beyond `limit`.
    pub fn mark_before(&self, key: u64, limit: usize, bits: u64) -> bool {
        let mut i = self.home(key);
        let mut beyond = false;
        for d in 0..self.slots.len() {
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Relaxed);
            if k == EMPTY {
                break;
            }
            if k == key {
                if d < limit {
                    let v = s.val.load(Ordering::Relaxed);
                    if v & bits != bits {
                        s.val.store(v | bits, Ordering::Release);
                    }
                } else {
                    beyond = true;
                }
            }
            i = self.next(i);
        }
        beyond
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn insert_find_remove_against_a_map() {
        let t = Table::new(64);
        let mut occ = Occupancy::default();
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut rng = 12345u64;
        for step in 0..20_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = 2 + rng % 40;
            if let Some(idx) = t.find(key, |_| true) {
                assert_eq!(model.get(&key), Some(&t.val(idx)));
                if step % 3 == 0 {
                    t.remove(idx, &mut occ);
                    model.remove(&key);
                } else {
                    t.set_val(idx, step);
                    model.insert(key, step);
                }
            } else {
                assert!(!model.contains_key(&key));
                t.insert(key, step, &mut occ);
                model.insert(key, step);
            }
            assert_eq!(occ.live, model.len());
        }
        for (k, v) in &model {
            assert_eq!(t.get(*k), Some(*v));
        }
        let (t2, occ2) = t.rebuild(128, |_, _| true);
        assert_eq!(occ2.live, model.len());
        for (k, v) in &model {
            assert_eq!(t2.get(*k), Some(*v));
        }
    }

    #[test]
    fn multimap_visits_every_duplicate() {
        let t = Table::new(16);
        let mut occ = Occupancy::default();
        for v in 0..5 {
            t.insert(9, v, &mut occ);
        }
        t.insert(10, 100, &mut occ);
        let mut seen = vec![];
        t.for_each(9, |v| {
            seen.push(v);
            true
        });
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        let idx = t.find(9, |v| v == 2).unwrap();
        t.remove(idx, &mut occ);
        let mut n = 0;
        t.for_each(9, |_| {
            n += 1;
            true
        });
        assert_eq!(n, 4);
        assert_eq!(t.get(10), Some(100));
    }

    #[test]
    fn marked_slots_stay_found_and_sweep_leaves_the_rest() {
        // A small, nearly full table: marks sit inside long runs, and the sweep shifts them.
        let t = Table::new(64);
        let mut occ = Occupancy::default();
        let mut rng = 4242u64;
        let mut model: HashMap<u64, (u64, bool)> = HashMap::new();
        for round in 0..300u64 {
            while occ.live < 54 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = 2 + (rng >> 4) % 5000;
                if model.contains_key(&key) {
                    continue;
                }
                t.insert(key, round, &mut occ);
                model.insert(key, (round, false));
            }
            // Mark about a third, found again under their marked keys where they were.
            for (k, (_, marked)) in model.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if !*marked && rng.is_multiple_of(3) {
                    let idx = t.find(*k, |_| true).expect("held");
                    t.set_key(idx, *k | MARK);
                    assert_eq!(t.find(*k | MARK, |_| true), Some(idx));
                    assert_eq!(t.get(*k), None);
                    *marked = true;
                }
            }
            for (k, (v, marked)) in &model {
                let probe = if *marked { *k | MARK } else { *k };
                assert_eq!(t.get(probe), Some(*v), "key {k} round {round}");
            }
            let gone = t.sweep(|k, _| k & MARK != 0, &mut occ);
            let marked = model.values().filter(|(_, m)| *m).count();
            assert_eq!(gone, marked);
            model.retain(|_, (_, m)| !*m);
            assert_eq!(occ.live, model.len());
            for (k, (v, _)) in &model {
                assert_eq!(t.get(*k), Some(*v), "key {k} after sweep {round}");
            }
            let mut left = 0;
            t.scan(|_, k, _| {
                assert_eq!(k & MARK, 0);
                left += 1;
            });
            assert_eq!(left, model.len());
        }
    }

    #[test]
    fn backward_shift_keeps_every_key_reachable() {
        // A small table at high load with keys that share homes: removals shift long runs.
        let t = Table::new(64);
        let mut occ = Occupancy::default();
        let mut model: Vec<(u64, u64)> = Vec::new();
        let mut rng = 777u64;
        for step in 0..50_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if model.len() < 52 && (!rng.is_multiple_of(3) || model.is_empty()) {
                let key = 2 + (rng >> 8) % 24;
                t.insert(key, step, &mut occ);
                model.push((key, step));
            } else {
                let (key, val) = model.remove((rng >> 8) as usize % model.len());
                let idx = t.find(key, |v| v == val).expect("a held slot is found");
                t.remove(idx, &mut occ);
            }
            assert_eq!(occ.live, model.len());
            if step % 97 == 0 {
                for key in 2..26u64 {
                    let mut want: Vec<u64> = model
                        .iter()
                        .filter(|(k, _)| *k == key)
                        .map(|(_, v)| *v)
                        .collect();
                    // Slots of one key keep their insertion order through shifts.
                    let mut got = vec![];
                    t.for_each(key, |v| {
                        got.push(v);
                        true
                    });
                    assert_eq!(got, want, "key {key} at step {step}");
                    want.sort();
                    got.sort();
                    assert_eq!(got, want);
                }
            }
        }
        let mut live = 0;
        t.scan(|_, _, _| live += 1);
        assert_eq!(live, model.len());
    }

    #[test]
    fn readers_find_keys_that_stay_while_others_shift() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        // Keys 2..20 stay; keys sharing their homes come and go, so removals shift the stayers
        // back and forth under the readers' probes.
        let t = Arc::new(Table::new(128));
        let mut occ = Occupancy::default();
        for key in 2..20u64 {
            t.insert(key, key << 32, &mut occ);
        }
        let stop = Arc::new(AtomicBool::new(false));
        // The writer goes on until both readers have probed under it (a reader thread may start
        // late on a busy machine).
        let total = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, stop, total) = (t.clone(), stop.clone(), total.clone());
                std::thread::spawn(move || {
                    let mut checks = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for key in 2..20u64 {
                            assert_eq!(t.get(key), Some(key << 32), "a staying key is found");
                            checks += 1;
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                        for key in 20..120u64 {
                            t.for_each(key, |v| {
                                assert_eq!(v >> 32, key);
                                true
                            });
                        }
                    }
                    checks
                })
            })
            .collect();
        let mut held: Vec<Option<usize>> = vec![None; 120];
        let mut rng = 99u64;
        for round in 0u64.. {
            if round >= 300_000 && total.load(Ordering::Relaxed) >= 200 {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = 20 + rng % 100;
            if held[key as usize].is_some() {
                let idx = t.find(key, |_| true).unwrap();
                t.remove(idx, &mut occ);
                held[key as usize] = None;
            } else if occ.live < 100 {
                held[key as usize] = Some(t.insert(key, (key << 32) | (round & 0xffff), &mut occ));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn readers_never_see_a_foreign_value() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        // Values encode their key; a reader must never get a value belonging to another key.
        let t = Arc::new(Table::new(256));
        let stop = Arc::new(AtomicBool::new(false));
        // The writer goes on until the reader has found values under it (the reader thread may
        // start late on a busy machine).
        let found = Arc::new(AtomicU64::new(0));
        let reader = {
            let (t, stop, found) = (t.clone(), stop.clone(), found.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for key in 2..200u64 {
                        t.for_each(key, |v| {
                            assert_eq!(v >> 32, key);
                            checks += 1;
                            true
                        });
                    }
                    found.store(checks, Ordering::Relaxed);
                }
                checks
            })
        };
        let mut occ = Occupancy::default();
        for round in 0u64.. {
            if round >= 2000 && found.load(Ordering::Relaxed) >= 1000 {
                break;
            }
            for key in 2..150u64 {
                if let Some(i) = t.find(key, |_| true) {
                    t.remove(i, &mut occ);
                } else {
                    t.insert(key, (key << 32) | round, &mut occ);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
