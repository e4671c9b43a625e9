//! Unit tests of the in-memory index.

use super::*;

fn spec(pod: &str) -> EngineSpec {
    EngineSpec {
        pod: pod.into(),
        dp_rank: 0,
        model: "m".into(),
    }
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
        parent_block_hash: parent.map(EngineHash),
        token_ids: tokens,
        block_size: bs,
        medium: Some(Medium::Gpu),
        ..Default::default()
    })
}

fn removed(h: u64, medium: Medium) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineHash(h)],
        medium: Some(medium),
        ..Default::default()
    })
}

fn batch(events: Vec<KvEvent>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: Some(0),
    }
}

fn q_tokens<'a>(ns: &'a Namespace, tokens: &'a [u32]) -> Query<'a> {
    Query {
        namespace: ns,
        blocks: QueryBlocks::Tokens { tokens, mm: &[] },
        engines: None,
    }
}

#[test]
fn stores_queries_and_removes() {
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let toks: Vec<u32> = (0..64).collect();
    idx.apply(
        a,
        &batch(vec![stored(&[10, 11], None, toks[..32].to_vec(), 16)]),
    )
    .unwrap();
    idx.apply(
        a,
        &batch(vec![stored(&[12, 13], Some(11), toks[32..].to_vec(), 16)]),
    )
    .unwrap();
    idx.apply(
        b,
        &batch(vec![stored(&[10], None, toks[..16].to_vec(), 16)]),
    )
    .unwrap();
    let ns = Namespace::model("m");
    let r = idx.query(&q_tokens(&ns, &toks));
    assert_eq!(r.len(), 2);
    assert_eq!(
        (&*r[0].name, r[0].matched_blocks, r[0].matched_tokens),
        ("a", 4, 64)
    );
    assert_eq!((&*r[1].name, r[1].matched_blocks), ("b", 1));
    // Removing block 1 of a cuts its consecutive prefix to 1.
    idx.apply(a, &batch(vec![removed(11, Medium::Gpu)]))
        .unwrap();
    let r = idx.query(&q_tokens(&ns, &toks));
    assert!(r.iter().all(|m| m.matched_blocks == 1));
    // Another model's namespace sees nothing.
    assert!(idx
        .query(&q_tokens(&Namespace::model("other"), &toks))
        .is_empty());
    // By vLLM hash and by key.
    let keys = KeyHasher::new().chain(&ns, &toks, 16);
    let by_key = idx.query(&Query {
        namespace: &ns,
        blocks: QueryBlocks::Keys(&keys),
        engines: None,
    });
    assert_eq!(by_key.len(), 2);
    let hashes = [EngineHash(10), EngineHash(11)];
    let by_hash = idx.query(&Query {
        namespace: &ns,
        blocks: QueryBlocks::VllmHashes(&hashes),
        engines: Some(&[a]),
    });
    assert_eq!(by_hash.len(), 1);
    assert_eq!(by_hash[0].matched_blocks, 1);
    let s = idx.stats();
    assert_eq!(s.blocks, 3);
    assert_eq!(s.memberships, 4);
}

#[test]
fn reference_counts_tiers_and_clear() {
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let toks: Vec<u32> = (100..116).collect();
    idx.apply(a, &batch(vec![stored(&[7], None, toks.clone(), 16)]))
        .unwrap();
    idx.apply(a, &batch(vec![stored(&[7], None, toks.clone(), 16)]))
        .unwrap();
    // A tokenless CPU placeholder resolves through the engine hash.
    let placeholder = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(7)],
        medium: Some(Medium::Cpu),
        ..Default::default()
    });
    let rep = idx.apply(a, &batch(vec![placeholder])).unwrap();
    assert_eq!(rep.blocks_stored, 1);
    let ns = Namespace::model("m");
    let r = idx.query(&q_tokens(&ns, &toks));
    assert_eq!(r[0].tiers, [1, 1, 0, 0]);
    assert_eq!(r[0].score, 1.0);
    idx.apply(a, &batch(vec![removed(7, Medium::Gpu)])).unwrap();
    assert_eq!(idx.query(&q_tokens(&ns, &toks))[0].tiers, [1, 1, 0, 0]);
    idx.apply(a, &batch(vec![removed(7, Medium::Gpu)])).unwrap();
    let r = idx.query(&q_tokens(&ns, &toks));
    assert_eq!(r[0].tiers, [0, 1, 0, 0]);
    assert!((r[0].score - 0.8).abs() < 1e-9);
    idx.apply(a, &batch(vec![KvEvent::AllBlocksCleared]))
        .unwrap();
    assert!(idx.query(&q_tokens(&ns, &toks)).is_empty());
    assert_eq!(idx.stats().memberships, 0);
}

#[test]
fn orphans_are_reported_not_dropped() {
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let rep = idx
        .apply(
            a,
            &batch(vec![stored(&[2], Some(99), (0..16).collect(), 16)]),
        )
        .unwrap();
    assert_eq!(rep.orphans.len(), 1);
    assert_eq!(idx.stats().orphans, 1);
    // With the ancestry recovered, the orphan applies.
    let anc = match stored(&[99], None, (50..66).collect(), 16) {
        KvEvent::BlockStored(s) => s,
        _ => unreachable!(),
    };
    assert!(idx
        .apply_stored_with_ancestry(a, &[anc], &rep.orphans[0])
        .unwrap());
    let toks: Vec<u32> = (50..66).chain(0..16).collect();
    let ns = Namespace::model("m");
    assert_eq!(idx.query(&q_tokens(&ns, &toks))[0].matched_blocks, 2);
    assert_eq!((idx.stats().orphans, idx.stats().orphans_recovered), (1, 1));
}

#[test]
fn lora_and_salt_from_events_match_queries() {
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let toks: Vec<u32> = (0..32).collect();
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(1), EngineHash(2)],
        token_ids: toks.clone(),
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
    idx.apply(a, &batch(vec![ev])).unwrap();
    let plain = Namespace::model("m");
    assert!(idx.query(&q_tokens(&plain, &toks)).is_empty());
    let lora_only = Namespace {
        lora_name: Some("ad".into()),
        ..Namespace::model("m")
    };
    assert!(idx.query(&q_tokens(&lora_only, &toks)).is_empty());
    let full = Namespace {
        lora_name: Some("ad".into()),
        cache_salt: Some("tenant".into()),
        ..Namespace::model("m")
    };
    assert_eq!(idx.query(&q_tokens(&full, &toks))[0].matched_blocks, 2);
}

#[test]
fn many_engines_and_engine_removal() {
    let idx = Index::default();
    let toks: Vec<u32> = (0..32).collect();
    let ids: Vec<EngineId> = (0..40)
        .map(|i| idx.add_engine(spec(&format!("e{i}"))).unwrap())
        .collect();
    for (i, &id) in ids.iter().enumerate() {
        let n = 1 + i % 2;
        idx.apply(
            id,
            &batch(vec![stored(
                &[1, 2][..n],
                None,
                toks[..16 * n].to_vec(),
                16,
            )]),
        )
        .unwrap();
    }
    let ns = Namespace::model("m");
    let r = idx.query(&q_tokens(&ns, &toks));
    assert_eq!(r.len(), 40);
    assert_eq!(r.iter().filter(|m| m.matched_blocks == 2).count(), 20);
    idx.remove_engine(ids[1]).unwrap();
    assert_eq!(idx.query(&q_tokens(&ns, &toks)).len(), 39);
    // 20 engines hold 2 blocks, 20 hold 1; the removed one held 2.
    assert_eq!(idx.stats().memberships, 20 * 2 + 20 - 2);
}

#[test]
fn queries_do_not_wait_behind_ingestion() {
    use std::sync::atomic::AtomicBool;
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let toks: Vec<u32> = (0..32).collect();
    idx.apply(a, &batch(vec![stored(&[1, 2], None, toks.clone(), 16)]))
        .unwrap();
    // One huge batch keeps the writer busy (and its lock held) for a long time.
    let big: Vec<u64> = (10..400_010).collect();
    let big_toks: Vec<u32> = (0..big.len() as u32 * 16)
        .map(|t| t % 30_000 + 40_000)
        .collect();
    let big_batch = batch(vec![stored(&big, None, big_toks, 16)]);
    let writing = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let ns = Namespace::model("m");
    let answered_during_write = std::thread::scope(|s| {
        s.spawn(|| {
            writing.store(true, Ordering::SeqCst);
            idx.apply(a, &big_batch).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        while !writing.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let mut answered = 0;
        while !done.load(Ordering::SeqCst) {
            let r = idx.query(&q_tokens(&ns, &toks));
            assert_eq!(r[0].matched_blocks, 2);
            if !done.load(Ordering::SeqCst) {
                answered += 1;
            }
        }
        answered
    });
    // A query that took the writer's lock could slip in at most once before the writer got
    // it; many answers mean queries ran alongside the write.
    assert!(
        answered_during_write >= 10,
        "only {answered_during_write} queries completed while the writer was busy"
    );
}

#[test]
fn snapshot_restores_everything() {
    let idx = Index::default();
    let ids: Vec<EngineId> = (0..40)
        .map(|i| idx.add_engine(spec(&format!("e{i}"))).unwrap())
        .collect();
    let toks: Vec<u32> = (0..64).collect();
    for (i, &id) in ids.iter().enumerate() {
        let n = 1 + i % 4;
        let b = batch(vec![stored(
            &[1, 2, 3, 4][..n],
            None,
            toks[..16 * n].to_vec(),
            16,
        )]);
        idx.apply_at(id, 7, &b).unwrap();
    }
    idx.apply(
        ids[0],
        &batch(vec![stored(&[1], None, toks[..16].to_vec(), 16)]),
    )
    .unwrap();
    idx.remove_engine(ids[5]).unwrap();
    let bytes = crate::snapshot::encode(&idx.snapshot()).unwrap();
    let back = Index::restore(
        IndexConfig::default(),
        &crate::snapshot::decode(&bytes).unwrap(),
    )
    .unwrap();
    let ns = Namespace::model("m");
    assert_eq!(
        back.query(&q_tokens(&ns, &toks)),
        idx.query(&q_tokens(&ns, &toks))
    );
    assert_eq!(back.memberships(), idx.memberships());
    assert_eq!(back.applied_seq(ids[3]), Some(7));
    assert_eq!(back.applied_seq(ids[5]), None);
    let (s1, s2) = (idx.stats(), back.stats());
    assert_eq!(
        (s1.blocks, s1.memberships, s1.engines),
        (s2.blocks, s2.memberships, s2.engines)
    );
    // Reference counts survive: e0 announced block 1 twice, so one removal leaves it held.
    back.apply(ids[0], &batch(vec![removed(1, Medium::Gpu)]))
        .unwrap();
    let r = back.query(&Query {
        namespace: &ns,
        blocks: QueryBlocks::Tokens {
            tokens: &toks,
            mm: &[],
        },
        engines: Some(&[ids[0]]),
    });
    assert_eq!(r[0].matched_blocks, 1);
}

#[test]
fn byte_budget_is_respected_by_evicting() {
    let cfg = IndexConfig {
        byte_budget: 64 * 1024,
        initial_slots: 64,
        ..Default::default()
    };
    let idx = Index::new(cfg);
    let a = idx.add_engine(spec("a")).unwrap();
    let mut parent = None;
    for i in 0..20_000u64 {
        let toks: Vec<u32> = (0..16).map(|t| (i * 16 + t) as u32).collect();
        idx.apply(a, &batch(vec![stored(&[i + 100], parent, toks, 16)]))
            .unwrap();
        parent = Some(i + 100);
    }
    let s = idx.stats();
    assert!(s.bytes <= 64 * 1024 + 1024, "bytes {}", s.bytes);
    assert!(s.evicted_blocks > 0);
    assert!(s.blocks > 1000);
}

#[test]
fn a_dropped_block_is_still_named_by_its_hash_for_late_events() {
    let idx = Index::default();
    let a = idx.add_engine(spec("a")).unwrap();
    let b = idx.add_engine(spec("b")).unwrap();
    let toks: Vec<u32> = (0..32).collect();
    let ns = Namespace::model("m");
    idx.apply(a, &batch(vec![stored(&[10, 11], None, toks.clone(), 16)]))
        .unwrap();
    let key = idx.resolve(EngineHash(11)).expect("alias of a held block");
    // The GPU copy goes: no engine holds block 11, and readers no longer resolve its hash.
    idx.apply(a, &batch(vec![removed(11, Medium::Gpu)]))
        .unwrap();
    assert_eq!(idx.resolve(EngineHash(11)), None);
    assert_eq!(idx.stats().aliases, 1);
    // A second removal of it is unknown, not an error.
    idx.apply(a, &batch(vec![removed(11, Medium::Gpu)]))
        .unwrap();
    assert_eq!(idx.stats().unknown_removals, 1);
    // The offload of that block to the CPU completes late: its placeholder event still resolves.
    let late = KvEvent::BlockStored(BlockStored {
        block_hashes: vec![EngineHash(11)],
        medium: Some(Medium::Cpu),
        ..Default::default()
    });
    let rep = idx.apply(a, &batch(vec![late])).unwrap();
    assert!(rep.unresolved.is_empty());
    assert_eq!(idx.resolve(EngineHash(11)), Some(key));
    assert_eq!(idx.stats().aliases, 2);
    let r = idx.query(&q_tokens(&ns, &toks));
    assert_eq!((r[0].matched_blocks, r[0].tiers), (2, [1, 1, 0, 0]));
    // A child stored by another engine under the dropped block's hash finds its parent too.
    idx.apply(a, &batch(vec![removed(11, Medium::Cpu)]))
        .unwrap();
    assert_eq!(idx.resolve(EngineHash(11)), None);
    let more: Vec<u32> = (32..48).collect();
    let rep = idx
        .apply(b, &batch(vec![stored(&[12], Some(11), more, 16)]))
        .unwrap();
    assert!(rep.orphans.is_empty());
    // Stored again by its tokens, the block's alias lives again.
    idx.apply(b, &batch(vec![stored(&[10, 11], None, toks.clone(), 16)]))
        .unwrap();
    assert_eq!(idx.resolve(EngineHash(11)), Some(key));
    let all: Vec<u32> = (0..48).collect();
    let r = idx.query(&q_tokens(&ns, &all));
    assert_eq!((&*r[0].name, r[0].matched_blocks), ("b", 3));
}

#[test]
fn dead_aliases_are_swept_and_the_table_stays_bounded() {
    // One engine stores and drops chains over and over: its aliases die by removal (marked) and
    // are swept, so the alias table stays about the size of what is held.
    let idx = Index::new(IndexConfig {
        initial_slots: 64,
        ..Default::default()
    });
    let a = idx.add_engine(spec("a")).unwrap();
    let ns = Namespace::model("m");
    for round in 0..2000u64 {
        let base = round * 100;
        let toks: Vec<u32> = (0..64).map(|t| (base * 64 + t) as u32).collect();
        let hashes = [base + 2, base + 3, base + 4, base + 5];
        idx.apply(a, &batch(vec![stored(&hashes, None, toks.clone(), 16)]))
            .unwrap();
        let r = idx.query(&q_tokens(&ns, &toks));
        assert_eq!(r[0].matched_blocks, 4, "round {round}");
        if round >= 8 {
            let old = (round - 8) * 100;
            let gone: Vec<KvEvent> = (2..6).map(|i| removed(old + i, Medium::Gpu)).collect();
            idx.apply(a, &batch(gone)).unwrap();
        }
    }
    let s = idx.stats();
    assert_eq!(s.blocks, 32);
    assert_eq!(s.aliases, 32);
    assert!(
        s.alias_capacity <= 256,
        "alias table of {} slots",
        s.alias_capacity
    );
    assert_eq!(s.unknown_removals, 0);
}
