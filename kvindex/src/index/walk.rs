//! The query walk: following a prompt's chain of block keys through the block table, engines
//! 32 at a time as bit masks, with the next blocks' slots prefetched ahead.
//!
//! Where an 8k-token query's time goes (`benches/run index --quick --only-kvindex`, 64 engines,
//! a 72 MB index, the development VM): hashing the prompt's tokens 6.3–7.1 µs (2.0 µs when the
//! tokens are already in cache: the rest is reading them from memory), the walk of its ~490
//! matched blocks given the keys 16.5 µs, of which 2.7 µs does not depend on the length. The walk
//! is bound by how many random cache lines it fetches: profiles put its time on the loads of
//! slots and on the prefetch instructions themselves (which stall once every line-fill buffer is
//! taken), and random lines come at 20–24 ns each on that machine when fetched one per key,
//! against 30–40 ns a key for two. So each key prefetches only its home bucket (one line): the
//! walk given the keys went from 20.6–21.6 µs (home bucket and the one after) to 16.5 µs, and a
//! key whose slots run past its bucket reads the next line on demand.
//!
//! Tried and measured slower, 2026-12-07: placing the four blocks of a chain segment in one
//! window of two to four lines (keys carrying their segment's anchor bits, a window per anchor
//! bucket, a fallback home when the window is full). Segments took 1.3 lines on average, but
//! the window scans cost more than the lines saved (walk 19–22 µs, ingest 35% slower, with
//! ~9% of windows overflowing at 70% load). Earlier: prefetching 12, 20 or 32 blocks ahead made
//! no difference; 128-byte buckets were slower (20–21 µs).

use super::*;
use crate::table::Hits;

/// Per query scratch, sized to the engine slots by [`Walk::reset`].
#[derive(Default)]
pub(super) struct Walk {
    pub(super) matched: Vec<u32>,
    pub(super) tiers: Vec<[u32; TIERS]>,
    /// Per tier: matched blocks whose best tier that is.
    pub(super) best: Vec<[u32; TIERS]>,
    /// Where each engine's current run on a tier (and as best tier) began.
    pub(super) since: Vec<[u32; TIERS]>,
    pub(super) best_since: Vec<[u32; TIERS]>,
    pub(super) score: Vec<f64>,
    pub(super) allowed: Vec<bool>,
    /// Per group of 32 engines, and the groups still running (kept to reuse their memory).
    groups: Vec<GroupWalk>,
    live: Vec<usize>,
}

impl Walk {
    /// Clears the scratch for a query over `n` engine slots, keeping its allocations.
    pub(super) fn reset(&mut self, n: usize) {
        fn fill<T: Clone>(v: &mut Vec<T>, n: usize, x: T) {
            v.clear();
            v.resize(n, x);
        }
        fill(&mut self.matched, n, 0);
        fill(&mut self.tiers, n, [0; TIERS]);
        fill(&mut self.best, n, [0; TIERS]);
        fill(&mut self.since, n, [0; TIERS]);
        fill(&mut self.best_since, n, [0; TIERS]);
        fill(&mut self.score, n, 0.0);
        fill(&mut self.allowed, n, false);
    }

    /// Group `g`'s holding masks change from `old` to `new` at block `depth`: engines whose bit
    /// turns on start a run there, engines whose bit turns off are credited with theirs.
    fn transition(
        &mut self,
        g: usize,
        old: &[u32; TIERS],
        new: &[u32; TIERS],
        depth: u32,
        by_weight: &[usize; TIERS],
    ) {
        let base = g * LANES as usize;
        let best = |m: &[u32; TIERS]| {
            let mut out = [0u32; TIERS];
            let mut better = 0u32;
            for &t in by_weight {
                out[t] = m[t] & !better;
                better |= m[t];
            }
            out
        };
        let (old_best, new_best) = (best(old), best(new));
        for t in 0..TIERS {
            let mut on = new[t] & !old[t];
            while on != 0 {
                let lane = on.trailing_zeros() as usize;
                on &= on - 1;
                self.since[base + lane][t] = depth;
            }
            let mut off = old[t] & !new[t];
            while off != 0 {
                let lane = off.trailing_zeros() as usize;
                off &= off - 1;
                self.tiers[base + lane][t] += depth - self.since[base + lane][t];
            }
            let mut on = new_best[t] & !old_best[t];
            while on != 0 {
                let lane = on.trailing_zeros() as usize;
                on &= on - 1;
                self.best_since[base + lane][t] = depth;
            }
            let mut off = old_best[t] & !new_best[t];
            while off != 0 {
                let lane = off.trailing_zeros() as usize;
                off &= off - 1;
                self.best[base + lane][t] += depth - self.best_since[base + lane][t];
            }
        }
    }
}

/// A walk's state for one group of 32 engines.
#[derive(Clone, Copy, Default)]
struct GroupWalk {
    /// Engines still on a consecutive run from block 0.
    active: u32,
    /// Of those, the ones holding the current block: tier t's mask in bits 32t..32t+32 (one
    /// word, so writing it per slot and reading it per block stay the same width).
    holding: u128,
    /// The holding masks of the previous block (an engine is credited when its bit turns off).
    prev: u128,
}

#[inline]
fn unpack(m: u128) -> [u32; TIERS] {
    [
        m as u32,
        (m >> 32) as u32,
        (m >> 64) as u32,
        (m >> 96) as u32,
    ]
}

/// Keys a walk computes (and whose buckets it prefetches) ahead of the block it looks up, at
/// most: enough to cover a memory access with the hashing of the blocks before it.
const MAX_AHEAD: usize = 32;
/// Keys computed ahead at the start of a walk.
const MIN_AHEAD: usize = 4;
/// Ring of keys computed ahead (a power of two above `MAX_AHEAD`).
const RING: usize = 64;

/// Walks a chain of `n` keys (produced lazily by `key_of`) over the block table, advancing every
/// allowed engine that holds each block consecutively from block 0; stops when none advances.
///
/// Engines are handled 32 at a time as bit masks: an engine leaves its group's active mask at the
/// first block it lacks (its match length is recorded then), and per-tier counts are kept in
/// bit-sliced counters, so a block costs a few word operations per group however many engines
/// hold it. Keys are computed ahead of the block being looked up, and their home buckets
/// prefetched, so cache misses overlap each other and the hashing; the distance ahead starts
/// small (a short match wastes little hashing) and grows with the match, up to [`MAX_AHEAD`].
pub(super) fn walk_chain(
    blocks: &Table,
    walk: &mut Walk,
    weights: &[f64; TIERS],
    stamp: u16,
    n: usize,
    mut key_of: impl FnMut(usize) -> Option<u64>,
) {
    let ngroups = walk.matched.len().div_ceil(LANES as usize);
    let mut groups = std::mem::take(&mut walk.groups);
    groups.clear();
    groups.resize(ngroups, GroupWalk::default());
    let mut live = std::mem::take(&mut walk.live);
    live.clear();
    for (g, gw) in groups.iter_mut().enumerate() {
        for lane in 0..LANES as usize {
            if walk
                .allowed
                .get(g * LANES as usize + lane)
                .copied()
                .unwrap_or(false)
            {
                gw.active |= 1 << lane;
            }
        }
        if gw.active != 0 {
            live.push(g);
        }
    }
    if live.is_empty() {
        walk.groups = groups;
        walk.live = live;
        return;
    }
    // Tiers from the highest weight down: a block scores the weight of its best tier.
    let mut by_weight = [0usize, 1, 2, 3];
    by_weight.sort_by(|a, b| weights[*b].total_cmp(&weights[*a]));
    let mut ring = [0u64; RING];
    let mut hits = Hits::new();
    // Keys computed so far; `n` shrinks to it when `key_of` ends the chain early.
    let mut produced = 0usize;
    let mut n = n;
    let mut ahead = MIN_AHEAD;
    let mut depth = 0u32;
    'walk: for i in 0..n {
        let want = (i + 1 + ahead).min(n);
        while produced < want {
            match key_of(produced) {
                Some(k) => {
                    ring[produced % RING] = k;
                    blocks.prefetch(k);
                    produced += 1;
                }
                None => {
                    n = produced;
                    break;
                }
            }
        }
        if i >= n {
            break;
        }
        if ahead < MAX_AHEAD {
            ahead += 1;
        }
        let key = ring[i % RING];
        blocks.probe(key, |v| v & MORE != 0, &mut hits);
        for (idx, v) in hits.iter() {
            let g = v_group(v) as usize;
            if let Some(gw) = groups.get_mut(g) {
                let held = v as u32 & gw.active;
                if held != 0 {
                    gw.holding |= u128::from(held) << (32 * v_tier(v));
                    if v_stamp(v) != stamp {
                        blocks.try_update(idx, key, v, with_stamp(v, stamp));
                    }
                }
            }
        }
        let mut advanced = false;
        let mut k = 0;
        while k < live.len() {
            let g = live[k];
            let gw = &mut groups[g];
            let holding = gw.holding;
            gw.holding = 0;
            let any = {
                let h = holding as u64 | (holding >> 64) as u64;
                h as u32 | (h >> 32) as u32
            };
            if any != 0 && holding == gw.prev {
                // The common case: every running engine goes on, on the same tiers.
                advanced = true;
                k += 1;
                continue;
            }
            walk.transition(g, &unpack(gw.prev), &unpack(holding), depth, &by_weight);
            gw.prev = holding;
            // Engines whose run ends here: their match is `depth` blocks long.
            let mut ended = gw.active & !any;
            while ended != 0 {
                let lane = ended.trailing_zeros();
                ended &= ended - 1;
                walk.matched[g * LANES as usize + lane as usize] = depth;
            }
            gw.active = any;
            if any == 0 {
                live.swap_remove(k);
                continue;
            }
            advanced = true;
            k += 1;
        }
        if !advanced {
            break 'walk;
        }
        depth += 1;
    }
    // Engines still running reached the end of the chain.
    for &g in &live {
        let gw = groups[g];
        walk.transition(g, &unpack(gw.prev), &[0; TIERS], depth, &by_weight);
        let mut rest = gw.active;
        while rest != 0 {
            let lane = rest.trailing_zeros();
            rest &= rest - 1;
            walk.matched[g * LANES as usize + lane as usize] = depth;
        }
    }
    walk.groups = groups;
    walk.live = live;
    for e in 0..walk.matched.len() {
        if walk.allowed[e] && walk.matched[e] > 0 {
            walk.score[e] = weights
                .iter()
                .zip(walk.best[e])
                .map(|(w, c)| w * f64::from(c))
                .sum();
        }
    }
}
