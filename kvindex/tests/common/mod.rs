//! Shared test support: a contract suite every [`IndexBackend`] must pass, event builders, and a
//! throw-away `redis-server`.
//!
//! The scenarios are deterministic and use only the [`IndexBackend`] trait, so the memory index and
//! the Redis index are held to the same answers. They never assume engine id values.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvindex::{
    BlockKey, BlockRemoved, BlockStored, EngineHash, EngineId, EngineMatch, EngineSpec, EventBatch,
    ExtraKey, IndexBackend, IndexError, KeyHasher, KvEvent, Medium, MmItem, Namespace, Query,
    QueryBlocks,
};

/// Makes a fresh, empty backend.
pub type Make<'a> = &'a dyn Fn() -> Box<dyn IndexBackend>;

/// One scenario of the contract.
pub type Scenario = fn(Make<'_>);

/// Every scenario of the contract, by name.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("stores_queries_and_removes", stores_queries_and_removes),
    (
        "reference_counts_tiers_and_clear",
        reference_counts_tiers_and_clear,
    ),
    (
        "orphans_are_reported_not_dropped",
        orphans_are_reported_not_dropped,
    ),
    (
        "ancestry_restores_without_counting",
        ancestry_restores_without_counting,
    ),
    (
        "lora_and_salt_from_events_match_queries",
        lora_and_salt_from_events_match_queries,
    ),
    (
        "multimodal_items_match_queries",
        multimodal_items_match_queries,
    ),
    (
        "many_engines_and_engine_removal",
        many_engines_and_engine_removal,
    ),
    (
        "engine_registration_and_unknown_engines",
        engine_registration_and_unknown_engines,
    ),
    (
        "block_sizes_models_and_filters",
        block_sizes_models_and_filters,
    ),
    (
        "ignored_and_unresolved_events",
        ignored_and_unresolved_events,
    ),
    (
        "alias_conflicts_and_dead_aliases",
        alias_conflicts_and_dead_aliases,
    ),
    ("chains_within_one_batch", chains_within_one_batch),
    ("walks_stop_at_the_first_gap", walks_stop_at_the_first_gap),
    ("scores_tiers_and_ordering", scores_tiers_and_ordering),
];

/// Runs every scenario, each on a fresh backend from `make`.
pub fn contract_suite(make: &dyn Fn() -> Box<dyn IndexBackend>) {
    for (name, scenario) in SCENARIOS {
        eprintln!("contract scenario: {name}");
        scenario(make);
    }
}

/// An engine of model `m`, data-parallel rank 0.
pub fn spec(pod: &str) -> EngineSpec {
    EngineSpec {
        pod: pod.into(),
        dp_rank: 0,
        model: "m".into(),
    }
}

/// An engine of `model`.
pub fn spec_of(pod: &str, model: &str) -> EngineSpec {
    EngineSpec {
        pod: pod.into(),
        dp_rank: 0,
        model: model.into(),
    }
}

/// A GPU `BlockStored` event's payload.
pub fn stored_ev(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> BlockStored {
    BlockStored {
        block_hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
        parent_block_hash: parent.map(EngineHash),
        token_ids: tokens,
        block_size: bs,
        medium: Some(Medium::Gpu),
        ..Default::default()
    }
}

/// A GPU `BlockStored` event.
pub fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
    KvEvent::BlockStored(stored_ev(hashes, parent, tokens, bs))
}

/// A `BlockStored` event on `medium`.
pub fn stored_on(
    medium: Medium,
    hashes: &[u64],
    parent: Option<u64>,
    tokens: Vec<u32>,
    bs: u32,
) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        medium: Some(medium),
        ..stored_ev(hashes, parent, tokens, bs)
    })
}

/// A tokenless placeholder `BlockStored` on `medium`.
pub fn placeholder(hashes: &[u64], medium: Medium) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
        medium: Some(medium),
        ..Default::default()
    })
}

/// A `BlockRemoved` of one block on `medium`.
pub fn removed(h: u64, medium: Medium) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineHash(h)],
        medium: Some(medium),
        ..Default::default()
    })
}

/// A batch of events.
pub fn batch(events: Vec<KvEvent>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: Some(0),
    }
}

/// Tokens `lo..hi`.
pub fn toks(lo: u32, hi: u32) -> Vec<u32> {
    (lo..hi).collect()
}

/// A token query over every engine.
pub fn by_tokens(idx: &dyn IndexBackend, ns: &Namespace, tokens: &[u32]) -> Vec<EngineMatch> {
    let q = Query {
        namespace: ns,
        blocks: QueryBlocks::Tokens { tokens, mm: &[] },
        engines: None,
    };
    idx.query(&q).expect("query")
}

/// A query with every option.
pub fn query(
    idx: &dyn IndexBackend,
    ns: &Namespace,
    blocks: QueryBlocks<'_>,
    engines: Option<&[EngineId]>,
) -> Vec<EngineMatch> {
    idx.query(&Query {
        namespace: ns,
        blocks,
        engines,
    })
    .expect("query")
}

/// `(name, matched_blocks)` of every match, in order.
pub fn summary(r: &[EngineMatch]) -> Vec<(String, u32)> {
    r.iter()
        .map(|m| (m.name.to_string(), m.matched_blocks))
        .collect()
}

fn apply(idx: &dyn IndexBackend, e: EngineId, events: Vec<KvEvent>) -> kvindex::ApplyReport {
    idx.apply(e, &batch(events)).expect("apply")
}

fn ns() -> Namespace {
    Namespace::model("m")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn stores_queries_and_removes(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let t = toks(0, 64);
    let rep = apply(idx, a, vec![stored(&[10, 11], None, t[..32].to_vec(), 16)]);
    assert_eq!(rep.blocks_stored, 2);
    apply(
        idx,
        a,
        vec![stored(&[12, 13], Some(11), t[32..].to_vec(), 16)],
    );
    apply(idx, b, vec![stored(&[10], None, t[..16].to_vec(), 16)]);
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (&*r[0].name, r[0].matched_blocks, r[0].matched_tokens),
        ("a", 4, 64)
    );
    assert_eq!(
        (r[0].engine, r[0].tiers, r[0].score),
        (a, [4, 0, 0, 0], 4.0)
    );
    assert_eq!((&*r[1].name, r[1].matched_blocks, r[1].engine), ("b", 1, b));
    // A partial trailing block is not keyed.
    assert_eq!(by_tokens(idx, &ns(), &t[..63])[0].matched_blocks, 3);
    // Removing block 1 of a cuts its consecutive prefix to 1.
    let rep = apply(idx, a, vec![removed(11, Medium::Gpu)]);
    assert_eq!(rep.blocks_removed, 1);
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(summary(&r), [("a".to_string(), 1), ("b".to_string(), 1)]);
    // Another model's namespace sees nothing.
    assert!(by_tokens(idx, &Namespace::model("other"), &t).is_empty());
    // By key and by vLLM hash.
    let keys = KeyHasher::new().chain(&ns(), &t, 16);
    assert_eq!(query(idx, &ns(), QueryBlocks::Keys(&keys), None).len(), 2);
    let hashes = [EngineHash(10), EngineHash(11)];
    let r = query(idx, &ns(), QueryBlocks::VllmHashes(&hashes), Some(&[a]));
    assert_eq!(summary(&r), [("a".to_string(), 1)]);
    // Blocks 2 and 3 of a are still held: by key from block 2 they match.
    let r = query(idx, &ns(), QueryBlocks::Keys(&keys[2..]), None);
    assert_eq!(summary(&r), [("a".to_string(), 2)]);
    // Nothing asked, nothing matched.
    assert!(by_tokens(idx, &ns(), &[]).is_empty());
}

fn reference_counts_tiers_and_clear(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(100, 116);
    apply(idx, a, vec![stored(&[7], None, t.clone(), 16)]);
    apply(idx, a, vec![stored(&[7], None, t.clone(), 16)]);
    // A tokenless CPU placeholder resolves through the engine hash.
    let rep = apply(idx, a, vec![placeholder(&[7], Medium::Cpu)]);
    assert_eq!((rep.blocks_stored, rep.unresolved.len()), (1, 0));
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!((r[0].tiers, r[0].score), ([1, 1, 0, 0], 1.0));
    // Two GPU announcements need two removals.
    apply(idx, a, vec![removed(7, Medium::Gpu)]);
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 1, 0, 0]);
    apply(idx, a, vec![removed(7, Medium::Gpu)]);
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(r[0].tiers, [0, 1, 0, 0]);
    assert!(close(r[0].score, 0.8));
    // A third removal finds nothing on the GPU tier.
    assert_eq!(
        apply(idx, a, vec![removed(7, Medium::Gpu)]).blocks_removed,
        0
    );
    let rep = apply(idx, a, vec![KvEvent::AllBlocksCleared]);
    assert!(rep.cleared);
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    assert_eq!(
        apply(idx, a, vec![removed(7, Medium::Cpu)]).blocks_removed,
        0
    );
    // After a clear, the engine stores again from scratch; clear_engine does the same.
    apply(
        idx,
        a,
        vec![
            stored(&[7], None, t.clone(), 16),
            stored(&[7], None, t.clone(), 16),
        ],
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 0, 0, 0]);
    idx.clear_engine(a).unwrap();
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    // A clear in the middle of a batch drops what came before it only.
    let rep = apply(
        idx,
        a,
        vec![
            stored(&[7], None, t.clone(), 16),
            KvEvent::AllBlocksCleared,
            placeholder(&[7], Medium::Storage),
        ],
    );
    assert_eq!((rep.blocks_stored, rep.cleared), (2, true));
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(r[0].tiers, [0, 0, 1, 0]);
    assert!(close(r[0].score, 0.5));
}

fn orphans_are_reported_not_dropped(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let rep = apply(idx, a, vec![stored(&[2], Some(99), toks(0, 16), 16)]);
    assert_eq!((rep.orphans.len(), rep.blocks_stored), (1, 0));
    assert_eq!(rep.orphans[0], stored_ev(&[2], Some(99), toks(0, 16), 16));
    // With the ancestry recovered, the orphan applies.
    let anc = stored_ev(&[99], None, toks(50, 66), 16);
    assert!(idx
        .apply_stored_with_ancestry(a, &[anc], &rep.orphans[0])
        .unwrap());
    let t: Vec<u32> = (50..66).chain(0..16).collect();
    assert_eq!(by_tokens(idx, &ns(), &t)[0].matched_blocks, 2);
    // An ancestry that does not connect applies nothing.
    let orphan = stored_ev(&[4], Some(3), toks(200, 216), 16);
    let anc = stored_ev(&[3], Some(77), toks(300, 316), 16);
    assert!(!idx.apply_stored_with_ancestry(a, &[anc], &orphan).unwrap());
    let keys = KeyHasher::new().chain(&ns(), &toks(300, 316), 16);
    assert!(query(idx, &ns(), QueryBlocks::VllmHashes(&[EngineHash(3)]), None).is_empty());
    assert!(query(idx, &ns(), QueryBlocks::Keys(&keys), None).is_empty());
    // Nor does an orphan whose ancestry still leaves its parent unknown.
    let anc = stored_ev(&[5], None, toks(400, 416), 16);
    let orphan = stored_ev(&[6], Some(55), toks(500, 516), 16);
    assert!(!idx.apply_stored_with_ancestry(a, &[anc], &orphan).unwrap());
    assert!(query(idx, &ns(), QueryBlocks::VllmHashes(&[EngineHash(6)]), None).is_empty());
    // ... though its ancestry was applied.
    assert_eq!(
        query(idx, &ns(), QueryBlocks::VllmHashes(&[EngineHash(5)]), None).len(),
        1
    );
    // Orphans in a batch do not stop the rest of it.
    let rep = apply(
        idx,
        a,
        vec![
            stored(&[8], Some(88), toks(0, 16), 16),
            stored(&[9], Some(99), toks(600, 616), 16),
        ],
    );
    assert_eq!((rep.orphans.len(), rep.blocks_stored), (1, 1));
}

fn ancestry_restores_without_counting(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(0, 48);
    apply(idx, a, vec![stored(&[99], None, t[..16].to_vec(), 16)]);
    let rep = apply(idx, a, vec![stored(&[2], Some(98), t[32..].to_vec(), 16)]);
    assert_eq!(rep.orphans.len(), 1);
    // The ancestry re-announces 99 (held) and 98 (not held).
    let ancestors = [
        stored_ev(&[99], None, t[..16].to_vec(), 16),
        stored_ev(&[98], Some(99), t[16..32].to_vec(), 16),
    ];
    assert!(idx
        .apply_stored_with_ancestry(a, &ancestors, &rep.orphans[0])
        .unwrap());
    assert_eq!(by_tokens(idx, &ns(), &t)[0].matched_blocks, 3);
    // 99 was not counted twice: one removal drops it.
    apply(idx, a, vec![removed(99, Medium::Gpu)]);
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    // 98 is held once.
    apply(idx, a, vec![removed(98, Medium::Gpu)]);
    let keys = KeyHasher::new().chain(&ns(), &t, 16);
    assert!(query(idx, &ns(), QueryBlocks::Keys(&keys[1..]), None).is_empty());
    assert_eq!(
        query(idx, &ns(), QueryBlocks::Keys(&keys[2..]), None).len(),
        1
    );
}

fn lora_and_salt_from_events_match_queries(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(0, 32);
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(1), EngineHash(2)],
        token_ids: t.clone(),
        block_size: 16,
        lora_name: Some("ad".into()),
        extra_keys: Some(vec![
            Some(vec![
                ExtraKey::Str("ad".into()),
                ExtraKey::Str("tenant".into()),
            ]),
            Some(vec![ExtraKey::Str("ad".into())]),
        ]),
        ..Default::default()
    });
    apply(idx, a, vec![ev]);
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    let lora_only = Namespace {
        lora_name: Some("ad".into()),
        ..ns()
    };
    assert!(by_tokens(idx, &lora_only, &t).is_empty());
    let salt_only = Namespace {
        cache_salt: Some("tenant".into()),
        ..ns()
    };
    assert!(by_tokens(idx, &salt_only, &t).is_empty());
    let full = Namespace {
        lora_name: Some("ad".into()),
        cache_salt: Some("tenant".into()),
        ..ns()
    };
    assert_eq!(by_tokens(idx, &full, &t)[0].matched_blocks, 2);
    // A continuation inherits the namespace through its parent's key.
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(3)],
        parent_block_hash: Some(EngineHash(2)),
        token_ids: toks(32, 48),
        block_size: 16,
        lora_name: Some("ad".into()),
        extra_keys: Some(vec![Some(vec![ExtraKey::Str("ad".into())])]),
        ..Default::default()
    });
    apply(idx, a, vec![ev]);
    assert_eq!(by_tokens(idx, &full, &toks(0, 48))[0].matched_blocks, 3);
}

fn multimodal_items_match_queries(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(0, 48);
    // An image at tokens 4..24 touches blocks 0 and 1.
    let mm = |o: i64| {
        Some(vec![ExtraKey::Mm {
            identifier: "img".into(),
            offset: o,
        }])
    };
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(1), EngineHash(2), EngineHash(3)],
        token_ids: t.clone(),
        block_size: 16,
        extra_keys: Some(vec![mm(4), mm(-12), None]),
        ..Default::default()
    });
    apply(idx, a, vec![ev]);
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    let ns = ns();
    let items = [MmItem {
        identifier: "img".into(),
        offset: 4,
        length: 20,
    }];
    let q = |items: &[MmItem]| {
        query(
            idx,
            &ns,
            QueryBlocks::Tokens {
                tokens: &t,
                mm: items,
            },
            None,
        )
    };
    assert_eq!(q(&items)[0].matched_blocks, 3);
    let other = [MmItem {
        identifier: "other".into(),
        offset: 4,
        length: 20,
    }];
    assert!(q(&other).is_empty());
    let moved = [MmItem {
        identifier: "img".into(),
        offset: 5,
        length: 20,
    }];
    assert!(q(&moved).is_empty());
}

fn many_engines_and_engine_removal(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let t = toks(0, 32);
    let ids: Vec<EngineId> = (0..40)
        .map(|i| idx.add_engine(spec(&format!("e{i:02}"))).unwrap())
        .collect();
    for (i, &id) in ids.iter().enumerate() {
        let n = 1 + i % 2;
        apply(
            idx,
            id,
            vec![stored(&[1, 2][..n], None, t[..16 * n].to_vec(), 16)],
        );
    }
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(r.len(), 40);
    assert_eq!(r.iter().filter(|m| m.matched_blocks == 2).count(), 20);
    // Best first, then by name.
    assert_eq!(&*r[0].name, "e01");
    assert_eq!(&*r[20].name, "e00");
    idx.remove_engine(ids[1]).unwrap();
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(r.len(), 39);
    assert!(r.iter().all(|m| m.engine != ids[1]));
    assert_eq!(r.iter().filter(|m| m.matched_blocks == 2).count(), 19);
    // A removed engine is unknown; registering it again starts empty.
    assert!(matches!(
        idx.remove_engine(ids[1]),
        Err(IndexError::UnknownEngine(_))
    ));
    assert!(matches!(
        idx.apply(ids[1], &batch(vec![])),
        Err(IndexError::UnknownEngine(_))
    ));
    let again = idx.add_engine(spec("e01")).unwrap();
    let r = by_tokens(idx, &ns(), &t);
    assert!(r.iter().all(|m| m.engine != again && &*m.name != "e01"));
    apply(idx, again, vec![stored(&[1], None, t[..16].to_vec(), 16)]);
    assert_eq!(by_tokens(idx, &ns(), &t).len(), 40);
    // Engines filter.
    let only = [ids[3], ids[4]];
    let r = query(
        idx,
        &ns(),
        QueryBlocks::Tokens {
            tokens: &t,
            mm: &[],
        },
        Some(&only),
    );
    assert_eq!(
        summary(&r),
        [("e03".to_string(), 2), ("e04".to_string(), 1)]
    );
}

fn engine_registration_and_unknown_engines(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    assert_eq!(idx.add_engine(spec("a")).unwrap(), a);
    let dp = idx
        .add_engine(EngineSpec {
            pod: "a".into(),
            dp_rank: 2,
            model: "m".into(),
        })
        .unwrap();
    let other_model = idx.add_engine(spec_of("a", "m2")).unwrap();
    assert!(dp != a && other_model != a && other_model != dp);
    apply(idx, dp, vec![stored(&[1], None, toks(0, 16), 16)]);
    assert_eq!(&*by_tokens(idx, &ns(), &toks(0, 16))[0].name, "a#dp2");
    let bogus = EngineId(1_000_000);
    let unknown = |r: kvindex::Result<()>| matches!(r, Err(IndexError::UnknownEngine(_)));
    assert!(unknown(idx.apply(bogus, &batch(vec![])).map(|_| ())));
    assert!(unknown(idx.clear_engine(bogus)));
    assert!(unknown(idx.remove_engine(bogus)));
    let orphan = stored_ev(&[2], Some(1), toks(16, 32), 16);
    assert!(unknown(
        idx.apply_stored_with_ancestry(bogus, &[], &orphan)
            .map(|_| ())
    ));
    // Queries ignore unknown engines in their filter.
    let r = query(
        idx,
        &ns(),
        QueryBlocks::Tokens {
            tokens: &toks(0, 16),
            mm: &[],
        },
        Some(&[bogus]),
    );
    assert!(r.is_empty());
}

fn block_sizes_models_and_filters(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let c = idx.add_engine(spec_of("c", "m2")).unwrap();
    let _d = idx.add_engine(spec("d")).unwrap();
    let t = toks(0, 64);
    apply(idx, a, vec![stored(&[1, 2, 3, 4], None, t.clone(), 16)]);
    apply(idx, b, vec![stored(&[21, 22], None, t.clone(), 32)]);
    apply(idx, c, vec![stored(&[31, 32, 33, 34], None, t.clone(), 16)]);
    let r = by_tokens(idx, &ns(), &t);
    assert_eq!(summary(&r), [("a".to_string(), 4), ("b".to_string(), 2)]);
    assert_eq!((r[0].matched_tokens, r[1].matched_tokens), (64, 64));
    let r = query(
        idx,
        &ns(),
        QueryBlocks::Tokens {
            tokens: &t,
            mm: &[],
        },
        Some(&[b]),
    );
    assert_eq!(summary(&r), [("b".to_string(), 2)]);
    // 40 tokens: two blocks of 16, one of 32.
    let r = by_tokens(idx, &ns(), &t[..40]);
    assert_eq!(summary(&r), [("a".to_string(), 2), ("b".to_string(), 1)]);
    let r = by_tokens(idx, &Namespace::model("m2"), &t);
    assert_eq!(summary(&r), [("c".to_string(), 4)]);
    // By key, the model is not checked: the keys themselves are scoped.
    let m2_keys = KeyHasher::new().chain(&Namespace::model("m2"), &t, 16);
    let r = query(idx, &ns(), QueryBlocks::Keys(&m2_keys), None);
    assert_eq!(summary(&r), [("c".to_string(), 4)]);
    assert_eq!(r[0].matched_tokens, 64);
    let m_keys = KeyHasher::new().chain(&ns(), &t, 32);
    let r = query(idx, &ns(), QueryBlocks::Keys(&m_keys), Some(&[a, b, c]));
    assert_eq!(summary(&r), [("b".to_string(), 2)]);
    // By vLLM hash.
    let hashes: Vec<EngineHash> = [31, 32, 33].map(EngineHash).to_vec();
    let r = query(idx, &ns(), QueryBlocks::VllmHashes(&hashes), None);
    assert_eq!(summary(&r), [("c".to_string(), 3)]);
}

fn ignored_and_unresolved_events(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(0, 16);
    // Another KV-cache group: ignored, and the block size is not learned from it.
    let other_group = KvEvent::BlockStored(BlockStored {
        group_idx: Some(1),
        ..stored_ev(&[1], None, t.clone(), 16)
    });
    // Token count not matching the blocks: ignored.
    let malformed = stored(&[2], None, toks(0, 15), 16);
    let rep = apply(idx, a, vec![other_group, malformed]);
    assert_eq!(
        (rep.blocks_stored, rep.orphans.len(), rep.unresolved.len()),
        (0, 0, 0)
    );
    assert!(by_tokens(idx, &ns(), &t).is_empty());
    assert!(query(idx, &ns(), QueryBlocks::VllmHashes(&[EngineHash(1)]), None).is_empty());
    // Unknown placeholders are reported; known ones apply.
    apply(idx, a, vec![stored(&[3], None, t.clone(), 16)]);
    let rep = apply(idx, a, vec![placeholder(&[555, 3, 556], Medium::Cpu)]);
    assert_eq!(rep.blocks_stored, 1);
    assert_eq!(rep.unresolved, [EngineHash(555), EngineHash(556)]);
    // Removals of unknown blocks, of other tiers and of other groups remove nothing.
    let other_group_removal = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineHash(3)],
        group_idx: Some(2),
        ..Default::default()
    });
    let rep = apply(
        idx,
        a,
        vec![
            removed(777, Medium::Gpu),
            removed(3, Medium::Storage),
            other_group_removal,
        ],
    );
    assert_eq!(rep.blocks_removed, 0);
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 1, 0, 0]);
    // Remote locality and unknown media are the remote tier; both are counted once.
    let remote = KvEvent::BlockStored(BlockStored {
        locality: Some("REMOTE".into()),
        ..stored_ev(&[3], None, t.clone(), 16)
    });
    apply(
        idx,
        a,
        vec![
            remote,
            stored_on(Medium::Other("NVME".into()), &[3], None, t.clone(), 16),
        ],
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 1, 0, 1]);
    let remote_removal = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineHash(3)],
        medium: Some(Medium::Gpu),
        locality: Some("remote".into()),
        ..Default::default()
    });
    assert_eq!(
        apply(idx, a, vec![remote_removal.clone()]).blocks_removed,
        1
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 1, 0, 1]);
    assert_eq!(
        apply(idx, a, vec![remote_removal.clone()]).blocks_removed,
        1
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].tiers, [1, 1, 0, 0]);
    assert_eq!(apply(idx, a, vec![remote_removal]).blocks_removed, 0);
    // An empty batch does nothing.
    assert_eq!(apply(idx, a, vec![]), kvindex::ApplyReport::default());
}

fn alias_conflicts_and_dead_aliases(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let (t, u) = (toks(0, 16), toks(16, 32));
    let h5 = [EngineHash(5)];
    // b announces hash 5 for other content while a's block 5 is alive: the alias stays a's.
    apply(idx, a, vec![stored(&[5], None, t.clone(), 16)]);
    apply(idx, b, vec![stored(&[5], None, u.clone(), 16)]);
    assert_eq!(
        summary(&query(idx, &ns(), QueryBlocks::VllmHashes(&h5), None)),
        [("a".to_string(), 1)]
    );
    assert_eq!(summary(&by_tokens(idx, &ns(), &u)), [("b".to_string(), 1)]);
    // b's removal of hash 5 names a's block, which b does not hold.
    assert_eq!(
        apply(idx, b, vec![removed(5, Medium::Gpu)]).blocks_removed,
        0
    );
    assert_eq!(summary(&by_tokens(idx, &ns(), &u)), [("b".to_string(), 1)]);
    // Once a's block is gone, the dead alias is reused for the new content.
    assert_eq!(
        apply(idx, a, vec![removed(5, Medium::Gpu)]).blocks_removed,
        1
    );
    apply(idx, a, vec![stored(&[5], None, u.clone(), 16)]);
    let r = query(idx, &ns(), QueryBlocks::VllmHashes(&h5), None);
    assert_eq!(summary(&r), [("a".to_string(), 1), ("b".to_string(), 1)]);
    assert_eq!(
        apply(idx, b, vec![removed(5, Medium::Gpu)]).blocks_removed,
        1
    );
    // A dead alias still resolves placeholders and parents.
    apply(
        idx,
        a,
        vec![
            stored(&[7], None, toks(100, 116), 16),
            removed(7, Medium::Gpu),
        ],
    );
    assert!(by_tokens(idx, &ns(), &toks(100, 116)).is_empty());
    let rep = apply(idx, a, vec![placeholder(&[7], Medium::Cpu)]);
    assert_eq!((rep.blocks_stored, rep.unresolved.len()), (1, 0));
    let rep = apply(idx, b, vec![stored(&[8], Some(7), toks(116, 132), 16)]);
    assert_eq!((rep.blocks_stored, rep.orphans.len()), (1, 0));
    let r = by_tokens(idx, &ns(), &toks(100, 132));
    assert_eq!(summary(&r), [("a".to_string(), 1)]);
    assert_eq!(r[0].tiers, [0, 1, 0, 0]);
    let keys = KeyHasher::new().chain(&ns(), &toks(100, 132), 16);
    assert_eq!(
        summary(&query(idx, &ns(), QueryBlocks::Keys(&keys[1..]), None)),
        [("b".to_string(), 1)]
    );
}

fn chains_within_one_batch(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let t = toks(0, 64);
    let rep = apply(
        idx,
        a,
        vec![
            stored(&[1, 2], None, t[..32].to_vec(), 16),
            stored(&[3], Some(2), t[32..48].to_vec(), 16),
            removed(2, Medium::Gpu),
            stored(&[4], Some(3), t[48..].to_vec(), 16),
            stored(&[1], None, t[..16].to_vec(), 16),
        ],
    );
    assert_eq!(
        (rep.blocks_stored, rep.blocks_removed, rep.orphans.len()),
        (5, 1, 0)
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].matched_blocks, 1);
    let keys = KeyHasher::new().chain(&ns(), &t, 16);
    assert_eq!(
        query(idx, &ns(), QueryBlocks::Keys(&keys[2..]), None)[0].matched_blocks,
        2
    );
    // Block 2 comes back; block 1 was announced twice.
    apply(
        idx,
        a,
        vec![
            stored(&[2], Some(1), t[16..32].to_vec(), 16),
            removed(1, Medium::Gpu),
        ],
    );
    assert_eq!(by_tokens(idx, &ns(), &t)[0].matched_blocks, 4);
    apply(idx, a, vec![removed(1, Medium::Gpu)]);
    assert!(by_tokens(idx, &ns(), &t).is_empty());
}

fn walks_stop_at_the_first_gap(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let t = toks(0, 48);
    apply(idx, a, vec![stored(&[10, 11, 12], None, t.clone(), 16)]);
    // b holds blocks 1 and 2 but not 0.
    apply(
        idx,
        b,
        vec![
            stored(&[10, 11, 12], None, t.clone(), 16),
            removed(10, Medium::Gpu),
        ],
    );
    assert_eq!(summary(&by_tokens(idx, &ns(), &t)), [("a".to_string(), 3)]);
    let hashes = [10, 999, 12].map(EngineHash);
    assert_eq!(
        summary(&query(idx, &ns(), QueryBlocks::VllmHashes(&hashes), None)),
        [("a".to_string(), 1)]
    );
    let hashes = [999, 10].map(EngineHash);
    assert!(query(idx, &ns(), QueryBlocks::VllmHashes(&hashes), None).is_empty());
    let keys = KeyHasher::new().chain(&ns(), &t, 16);
    let gap = [keys[0], BlockKey(12345), keys[2]];
    assert_eq!(
        summary(&query(idx, &ns(), QueryBlocks::Keys(&gap), None)),
        [("a".to_string(), 1)]
    );
    let r = query(idx, &ns(), QueryBlocks::Keys(&keys[1..]), None);
    assert_eq!(summary(&r), [("a".to_string(), 2), ("b".to_string(), 2)]);
    assert_eq!(r[0].matched_tokens, 32);
}

fn scores_tiers_and_ordering(make: Make<'_>) {
    let idx = make();
    let idx = idx.as_ref();
    let t = toks(0, 32);
    let add = |name: &str| idx.add_engine(spec(name)).unwrap();
    let (b, a, c, d, e, f) = (add("b"), add("a"), add("c"), add("d"), add("e"), add("f"));
    apply(idx, b, vec![stored(&[1], None, t[..16].to_vec(), 16)]);
    apply(idx, a, vec![stored(&[1], None, t[..16].to_vec(), 16)]);
    apply(
        idx,
        c,
        vec![stored_on(Medium::Cpu, &[1], None, t[..16].to_vec(), 16)],
    );
    apply(
        idx,
        d,
        vec![stored_on(Medium::Storage, &[1, 2], None, t.clone(), 16)],
    );
    let remote = KvEvent::BlockStored(BlockStored {
        locality: Some("REMOTE".into()),
        ..stored_ev(&[1, 2], None, t.clone(), 16)
    });
    apply(idx, e, vec![remote]);
    // f: block 0 on GPU and CPU, block 1 on CPU only.
    apply(
        idx,
        f,
        vec![
            stored(&[1], None, t[..16].to_vec(), 16),
            placeholder(&[1], Medium::Cpu),
            stored_on(Medium::Cpu, &[2], Some(1), t[16..].to_vec(), 16),
        ],
    );
    let r = by_tokens(idx, &ns(), &t);
    let got: Vec<(String, u32, [u32; 4])> = r
        .iter()
        .map(|m| (m.name.to_string(), m.matched_blocks, m.tiers))
        .collect();
    let want = [
        ("f", 2, [1, 2, 0, 0]),
        ("a", 1, [1, 0, 0, 0]),
        ("b", 1, [1, 0, 0, 0]),
        ("d", 2, [0, 0, 2, 0]),
        ("c", 1, [0, 1, 0, 0]),
        ("e", 2, [0, 0, 0, 2]),
    ];
    let want: Vec<(String, u32, [u32; 4])> = want
        .iter()
        .map(|&(n, m, t)| (n.to_string(), m, t))
        .collect();
    assert_eq!(got, want);
    let scores: Vec<f64> = r.iter().map(|m| m.score).collect();
    for (s, w) in scores.iter().zip([1.8, 1.0, 1.0, 1.0, 0.8, 0.5]) {
        assert!(close(*s, w), "scores {scores:?}");
    }
}

/// A throw-away `redis-server` on a free loopback port, in a temporary directory, with no
/// persistence; killed (and its directory removed) on drop. Panics if it cannot be started.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl RedisServer {
    /// Starts the server and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free loopback port")
            .port();
        let dir = std::env::temp_dir().join(format!(
            "kvindex-redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("cannot create a temporary directory for redis");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); the Redis tests need it on PATH \
                     (Debian: apt-get install redis-server)"
                )
            });
        let mut server = RedisServer { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.ping() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server exited at startup ({status}) on port {port}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
