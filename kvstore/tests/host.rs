//! Host tier: property tests against a model, pins, dedup, capacity and the arena.

mod common;

use common::content;
use kvstore::{BlockKey, GpuPin, HostConfig, HostPut, HostTier, PolicyKind, StoreError};
use proptest::prelude::*;

const BB: usize = 4096;
const SLOTS: usize = 8;

fn tier(policy: PolicyKind) -> HostTier {
    let mut c = HostConfig::new((SLOTS * BB) as u64, BB);
    c.policy = policy;
    HostTier::new(&c).expect("host tier")
}

#[derive(Clone, Debug)]
enum Op {
    Put(u64),
    Get(u64),
    Remove(u64),
    Pin(u64),
    Unpin(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (2u64..22).prop_map(Op::Put),
        3 => (2u64..22).prop_map(Op::Get),
        1 => (2u64..22).prop_map(Op::Remove),
        1 => (2u64..22).prop_map(Op::Pin),
        1 => (0usize..8).prop_map(Op::Unpin),
    ]
}

/// The LRU model: keys from least to most recently used, with pin counts.
#[derive(Default)]
struct LruModel {
    order: Vec<u64>,
    pins: std::collections::HashMap<u64, usize>,
}

impl LruModel {
    fn pinned(&self, k: u64) -> bool {
        self.pins.get(&k).copied().unwrap_or(0) > 0
    }
    fn touch(&mut self, k: u64) {
        if let Some(i) = self.order.iter().position(|&x| x == k) {
            self.order.remove(i);
            self.order.push(k);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// LRU: every answer (hit, miss, bytes, evicted keys, refusals) equals the model's.
    #[test]
    fn lru_matches_model(ops in prop::collection::vec(op(), 1..200)) {
        let t = tier(PolicyKind::Lru);
        let mut m = LruModel::default();
        let mut handles: Vec<(u64, kvstore::HostBlock)> = Vec::new();
        for o in ops {
            match o {
                Op::Put(k) => {
                    let r = t.put(BlockKey(k), &content(BlockKey(k), BB));
                    if m.order.contains(&k) {
                        prop_assert_eq!(r.unwrap(), HostPut::Present);
                    } else if m.order.len() < SLOTS {
                        prop_assert_eq!(r.unwrap(), HostPut::Stored { evicted: vec![] });
                        m.order.push(k);
                    } else {
                        match m.order.iter().position(|&x| !m.pinned(x)) {
                            Some(i) => {
                                let v = m.order.remove(i);
                                prop_assert_eq!(r.unwrap(), HostPut::Stored { evicted: vec![BlockKey(v)] });
                                m.order.push(k);
                            }
                            None => { let all_pinned = matches!(r, Err(StoreError::AllPinned { .. })); prop_assert!(all_pinned) }
                        }
                    }
                }
                Op::Get(k) => {
                    let g = t.get(BlockKey(k));
                    prop_assert_eq!(g.is_some(), m.order.contains(&k));
                    if let Some(b) = g {
                        prop_assert!(b[..] == content(BlockKey(k), BB)[..]);
                        m.touch(k);
                    }
                }
                Op::Remove(k) => {
                    let expect = m.order.contains(&k) && !m.pinned(k);
                    prop_assert_eq!(t.remove(BlockKey(k)), expect);
                    if expect {
                        m.order.retain(|&x| x != k);
                    }
                }
                Op::Pin(k) => {
                    if let Some(b) = t.get(BlockKey(k)) {
                        prop_assert!(m.order.contains(&k));
                        m.touch(k);
                        *m.pins.entry(k).or_default() += 1;
                        handles.push((k, b));
                    } else {
                        prop_assert!(!m.order.contains(&k));
                    }
                }
                Op::Unpin(i) => {
                    if i < handles.len() {
                        let (k, b) = handles.remove(i);
                        // A pinned block's bytes never change, however many puts happened.
                        prop_assert!(b[..] == content(BlockKey(k), BB)[..]);
                        drop(b);
                        *m.pins.get_mut(&k).unwrap() -= 1;
                    }
                }
            }
            prop_assert_eq!(t.len(), m.order.len());
            for (k, _) in &handles {
                prop_assert!(t.is_pinned(BlockKey(*k)));
            }
        }
        let mut keys: Vec<u64> = t.keys().into_iter().map(|k| k.0).collect();
        keys.sort();
        let mut want = m.order.clone();
        want.sort();
        prop_assert_eq!(keys, want);
    }

    /// S3-FIFO: what it holds is always a correct block, pinned blocks stay, a store with room
    /// never evicts, and the capacity is never exceeded.
    #[test]
    fn s3fifo_invariants(ops in prop::collection::vec(op(), 1..300)) {
        let t = tier(PolicyKind::S3Fifo);
        let mut handles: Vec<(u64, kvstore::HostBlock)> = Vec::new();
        let mut ever = std::collections::HashSet::new();
        for o in ops {
            let before = t.len();
            match o {
                Op::Put(k) => {
                    let present = t.contains(BlockKey(k));
                    match t.put(BlockKey(k), &content(BlockKey(k), BB)) {
                        Ok(HostPut::Present) => prop_assert!(present),
                        Ok(HostPut::Stored { evicted }) => {
                            prop_assert!(!present);
                            ever.insert(k);
                            if before < SLOTS { prop_assert!(evicted.is_empty()); }
                            else { prop_assert_eq!(evicted.len(), 1); }
                            for e in evicted {
                                prop_assert!(!handles.iter().any(|(h, _)| *h == e.0));
                                prop_assert!(!t.contains(e));
                            }
                        }
                        Err(StoreError::AllPinned { .. }) => {
                            prop_assert_eq!(before, SLOTS);
                            let pinned: std::collections::HashSet<u64> = handles.iter().map(|h| h.0).collect();
                            prop_assert_eq!(pinned.len(), SLOTS);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Get(k) | Op::Pin(k) => {
                    if let Some(b) = t.get(BlockKey(k)) {
                        prop_assert!(ever.contains(&k));
                        prop_assert!(b[..] == content(BlockKey(k), BB)[..]);
                        if matches!(o, Op::Pin(_)) { handles.push((k, b)); }
                    }
                }
                Op::Remove(k) => { t.remove(BlockKey(k)); }
                Op::Unpin(i) => { if i < handles.len() { handles.remove(i); } }
            }
            prop_assert!(t.len() <= SLOTS);
            for (k, b) in &handles {
                prop_assert!(t.contains(BlockKey(*k)));
                prop_assert!(b[..] == content(BlockKey(*k), BB)[..]);
            }
        }
    }
}

#[test]
fn rejects_wrong_sizes_and_zero_capacity() {
    let t = tier(PolicyKind::Lru);
    assert!(matches!(
        t.put(BlockKey(5), &[0u8; 100]),
        Err(StoreError::Invalid(_))
    ));
    assert!(HostTier::new(&HostConfig::new(100, BB)).is_err());
    assert!(HostTier::new(&HostConfig::new(1 << 20, 0)).is_err());
    assert!(t.is_empty());
}

#[test]
fn arena_is_page_aligned_and_reports_locking() {
    let t = HostTier::new(&HostConfig::new(4 << 20, 16 << 10)).unwrap();
    let a = t.arena();
    assert_eq!(a.ptr as usize % 4096, 0);
    assert_eq!(a.slot_stride, 16 << 10);
    assert_eq!(a.len, 4 << 20);
    assert_eq!(t.capacity_blocks(), 256);
    // Blocks that are not a page multiple still get page-aligned slots.
    let t2 = HostTier::new(&HostConfig::new(1 << 20, 5000)).unwrap();
    assert_eq!(t2.arena().slot_stride, 8192);
    t2.put(BlockKey(9), &content(BlockKey(9), 5000)).unwrap();
    let b = t2.get(BlockKey(9)).unwrap();
    assert_eq!(b.as_ptr() as usize % 4096, 0);
    assert_eq!(&b[..], &content(BlockKey(9), 5000)[..]);
    eprintln!("arena locked={} huge={:?}", a.locked, a.huge_pages);
}

#[test]
fn bytes_handles_pin_until_dropped_and_fill_in_place() {
    let t = HostTier::new(&HostConfig::new(2 * BB as u64, BB)).unwrap();
    t.put(BlockKey(2), &content(BlockKey(2), BB)).unwrap();
    let bytes = t.get(BlockKey(2)).unwrap().into_bytes();
    t.put(BlockKey(3), &content(BlockKey(3), BB)).unwrap();
    // Key 2 is pinned through the Bytes, so key 3 is evicted for key 4.
    assert_eq!(
        t.put(BlockKey(4), &content(BlockKey(4), BB)).unwrap(),
        HostPut::Stored {
            evicted: vec![BlockKey(3)]
        }
    );
    assert_eq!(&bytes[..], &content(BlockKey(2), BB)[..]);
    drop(bytes);
    assert!(!t.is_pinned(BlockKey(2)));
    // A failing fill stores nothing.
    let r = t.put_with(BlockKey(7), BB, |_| Err(StoreError::Invalid("nope".into())));
    assert!(r.is_err());
    assert!(!t.contains(BlockKey(7)));
    // Making room evicted the least recent block (2); its slot went back to the free list.
    assert!(t.contains(BlockKey(4)));
    assert_eq!(t.len(), 1);
    let s = t.stats();
    assert_eq!(s.evictions, 2);
    assert_eq!(s.errors, 1);
    assert_eq!(s.blocks, 1);
    assert!((s.occupancy() - 0.5).abs() < 1e-9);
}

#[test]
fn concurrent_puts_and_gets_never_see_torn_blocks() {
    let t = HostTier::new(&HostConfig::new(64 * BB as u64, BB)).unwrap();
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let t = t.clone();
            s.spawn(move || {
                for i in 0..2000u64 {
                    let k = BlockKey(2 + (i * 7 + th) % 200);
                    if i % 3 == 0 {
                        let _ = t.put(k, &content(k, BB));
                    } else if let Some(b) = t.get(k) {
                        assert!(b[..] == content(k, BB)[..], "torn read of {k:?}");
                    }
                }
            });
        }
    });
    assert!(t.len() <= 64);
}

/// `GpuPin`: off by default; `IfPresent` pins when a GPU (and the `cuda` feature) is there and
/// otherwise leaves plain memory that still works; `Require` fails with the reason instead.
#[test]
fn gpu_pinning_is_asked_for_and_reported() {
    let bb = 16 << 10;
    let plain = HostTier::new(&HostConfig::new((8 * bb) as u64, bb)).unwrap();
    assert!(!plain.arena().gpu_pinned);

    let mut cfg = HostConfig::new((8 * bb) as u64, bb);
    cfg.gpu_pin = GpuPin::IfPresent;
    let t = HostTier::new(&cfg).unwrap();
    let gpu = cfg!(feature = "cuda") && gpu_here();
    assert_eq!(
        t.arena().gpu_pinned,
        gpu,
        "pinned exactly when a GPU is usable"
    );
    let k = BlockKey(7);
    t.put(k, &content(k, bb)).unwrap();
    assert!(t.get(k).unwrap()[..] == content(k, bb)[..]);

    cfg.gpu_pin = GpuPin::Require;
    match HostTier::new(&cfg) {
        Ok(t) => assert!(gpu && t.arena().gpu_pinned, "Require gave an unpinned tier"),
        Err(e) => {
            assert!(!gpu, "Require failed with a GPU present: {e}");
            let m = e.to_string();
            assert!(
                m.contains("GPU") || m.contains("cuda"),
                "unclear error: {m}"
            );
            eprintln!("as expected without a GPU: {m}");
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_here() -> bool {
    kvstore::cuda::Device::open(0).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn gpu_here() -> bool {
    false
}
