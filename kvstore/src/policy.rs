//! Eviction policies over slot indices: LRU and S3-FIFO, both O(1) per operation.
//!
//! Slots are linked in intrusive doubly-linked lists (two `u32` arrays), so no allocation happens
//! per block. Pinned slots are skipped (rotated to the head of their queue) and never chosen.

use std::collections::{HashMap, VecDeque};

use kvindex::BlockKey;

/// Which eviction policy a tier uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO (10% of the slots), a main
    /// FIFO with reinsertion of blocks read since their last pass, and a ghost FIFO of recently
    /// evicted keys so a returning block goes straight to the main queue. Scan-resistant: a
    /// one-pass sweep of new blocks does not flush the blocks that are reused.
    S3Fifo,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "s3fifo" | "s3-fifo" => Ok(PolicyKind::S3Fifo),
            _ => Err(format!("unknown eviction policy {s:?} (lru, s3fifo)")),
        }
    }
}

const NIL: u32 = u32::MAX;
const NONE: u8 = 0;
const MAIN: u8 = 1;
const SMALL: u8 = 2;
const MAX_FREQ: u8 = 3;

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

pub(crate) struct Policy {
    kind: PolicyKind,
    prev: Vec<u32>,
    next: Vec<u32>,
    queue: Vec<u8>,
    freq: Vec<u8>,
    lists: [List; 3],
    small_target: usize,
    ghost: VecDeque<BlockKey>,
    ghost_live: HashMap<BlockKey, u32>,
    ghost_cap: usize,
}

impl Policy {
    pub(crate) fn new(kind: PolicyKind, slots: usize) -> Self {
        Policy {
            kind,
            prev: vec![NIL; slots],
            next: vec![NIL; slots],
            queue: vec![NONE; slots],
            freq: vec![0; slots],
            lists: [List::EMPTY; 3],
            small_target: (slots / 10).max(1),
            ghost: VecDeque::new(),
            ghost_live: HashMap::new(),
            ghost_cap: slots,
        }
    }

    fn unlink(&mut self, s: u32) {
        let q = self.queue[s as usize] as usize;
        if q == NONE as usize {
            return;
        }
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.lists[q].head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.lists[q].tail = p;
        }
        self.lists[q].len -= 1;
        self.queue[s as usize] = NONE;
        self.prev[s as usize] = NIL;
        self.next[s as usize] = NIL;
    }

    fn push_head(&mut self, q: u8, s: u32) {
        let l = &mut self.lists[q as usize];
        self.prev[s as usize] = NIL;
        self.next[s as usize] = l.head;
        if l.head != NIL {
            self.prev[l.head as usize] = s;
        } else {
            l.tail = s;
        }
        l.head = s;
        l.len += 1;
        self.queue[s as usize] = q;
    }

    /// A new block entered slot `s`.
    pub(crate) fn insert(&mut self, s: u32, key: BlockKey) {
        self.unlink(s);
        self.freq[s as usize] = 0;
        match self.kind {
            PolicyKind::Lru => self.push_head(MAIN, s),
            PolicyKind::S3Fifo => {
                let q = if self.ghost_live.remove(&key).is_some() {
                    MAIN
                } else {
                    SMALL
                };
                self.push_head(q, s)
            }
        }
    }

    /// The block in slot `s` was read.
    pub(crate) fn touch(&mut self, s: u32) {
        match self.kind {
            PolicyKind::Lru => {
                if self.queue[s as usize] != NONE {
                    self.unlink(s);
                    self.push_head(MAIN, s);
                }
            }
            PolicyKind::S3Fifo => {
                let f = &mut self.freq[s as usize];
                *f = (*f + 1).min(MAX_FREQ);
            }
        }
    }

    /// Slot `s` was emptied explicitly.
    pub(crate) fn remove(&mut self, s: u32) {
        self.unlink(s);
    }

    fn remember_ghost(&mut self, key: BlockKey) {
        if self.ghost_cap == 0 {
            return;
        }
        while self.ghost.len() >= self.ghost_cap {
            if let Some(old) = self.ghost.pop_front() {
                if let Some(c) = self.ghost_live.get_mut(&old) {
                    *c -= 1;
                    if *c == 0 {
                        self.ghost_live.remove(&old);
                    }
                }
            }
        }
        self.ghost.push_back(key);
        *self.ghost_live.entry(key).or_insert(0) += 1;
    }

    /// Chooses a victim that `pinned` does not protect, unlinks it and returns it, or `None` when
    /// every linked slot is pinned.
    pub(crate) fn victim(
        &mut self,
        pinned: impl Fn(u32) -> bool,
        key_of: impl Fn(u32) -> BlockKey,
    ) -> Option<u32> {
        match self.kind {
            PolicyKind::Lru => {
                let mut s = self.lists[MAIN as usize].tail;
                while s != NIL {
                    if !pinned(s) {
                        self.unlink(s);
                        return Some(s);
                    }
                    s = self.prev[s as usize];
                }
                None
            }
            PolicyKind::S3Fifo => {
                let total = self.lists[SMALL as usize].len + self.lists[MAIN as usize].len;
                // Each unpinned block is passed over at most MAX_FREQ + 2 times before it goes.
                let mut budget = total * (MAX_FREQ as usize + 3) + 4;
                while budget > 0 {
                    budget -= 1;
                    let small = self.lists[SMALL as usize];
                    let main = self.lists[MAIN as usize];
                    if small.len == 0 && main.len == 0 {
                        return None;
                    }
                    if small.len > 0 && (small.len >= self.small_target || main.len == 0) {
                        let t = small.tail;
                        if pinned(t) {
                            self.unlink(t);
                            self.push_head(SMALL, t);
                            // A queue of pinned blocks must not starve the main queue.
                            if main.len > 0 && budget.is_multiple_of(2) {
                                if let Some(v) = self.evict_main_step(&pinned) {
                                    return Some(v);
                                }
                            }
                            continue;
                        }
                        self.unlink(t);
                        if self.freq[t as usize] > 0 {
                            self.freq[t as usize] = 0;
                            self.push_head(MAIN, t);
                        } else {
                            self.remember_ghost(key_of(t));
                            return Some(t);
                        }
                    } else if let Some(v) = self.evict_main_step(&pinned) {
                        return Some(v);
                    }
                }
                None
            }
        }
    }

    fn evict_main_step(&mut self, pinned: &impl Fn(u32) -> bool) -> Option<u32> {
        let t = self.lists[MAIN as usize].tail;
        if t == NIL {
            return None;
        }
        self.unlink(t);
        if pinned(t) {
            self.push_head(MAIN, t);
            return None;
        }
        if self.freq[t as usize] > 0 {
            self.freq[t as usize] -= 1;
            self.push_head(MAIN, t);
            return None;
        }
        Some(t)
    }

    /// Number of linked slots.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lists.iter().map(|l| l.len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recent_and_skips_pinned() {
        let mut p = Policy::new(PolicyKind::Lru, 4);
        for s in 0..4 {
            p.insert(s, BlockKey(s as u64 + 10));
        }
        p.touch(0);
        assert_eq!(p.victim(|_| false, |s| BlockKey(s as u64)), Some(1));
        assert_eq!(p.victim(|s| s == 2, |s| BlockKey(s as u64)), Some(3));
        assert_eq!(p.victim(|_| true, |s| BlockKey(s as u64)), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn s3fifo_keeps_reused_blocks_through_a_scan() {
        let n = 20u32;
        let mut p = Policy::new(PolicyKind::S3Fifo, n as usize);
        let mut resident: Vec<Option<u64>> = vec![None; n as usize];
        let mut free: Vec<u32> = (0..n).collect();
        let mut put = |p: &mut Policy, resident: &mut Vec<Option<u64>>, k: u64| {
            let s = match free.pop() {
                Some(s) => s,
                None => p
                    .victim(|_| false, |s| BlockKey(resident[s as usize].unwrap()))
                    .unwrap(),
            };
            resident[s as usize] = Some(k);
            p.insert(s, BlockKey(k));
            s
        };
        // Hot blocks, each read twice.
        let hot: Vec<u32> = (0..5).map(|k| put(&mut p, &mut resident, k)).collect();
        for &s in &hot {
            p.touch(s);
            p.touch(s);
        }
        // A scan of 100 one-time blocks.
        for k in 100..200 {
            put(&mut p, &mut resident, k);
        }
        for k in 0..5u64 {
            assert!(resident.contains(&Some(k)), "hot block {k} was flushed");
        }
    }

    #[test]
    fn s3fifo_all_pinned_terminates() {
        let mut p = Policy::new(PolicyKind::S3Fifo, 8);
        for s in 0..8 {
            p.insert(s, BlockKey(s as u64));
            p.touch(s);
        }
        assert_eq!(p.victim(|_| true, |s| BlockKey(s as u64)), None);
        assert_eq!(p.victim(|s| s != 5, |s| BlockKey(s as u64)), Some(5));
    }
}
