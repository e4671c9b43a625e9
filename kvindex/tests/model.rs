//! Property test: random interleavings of stores (with and without tokens), removals, clears and
//! engine removals over several engines and tiers, checked after every step against a naive model.
//!
//! The generator behaves like vLLM: a store continues a chain only from a block the engine holds
//! (otherwise it starts at block 0), and a tokenless tier event names a block the engine holds.

use std::collections::HashMap;
use std::sync::Arc;

use kvindex::{
    BlockRemoved, BlockStored, EngineHash, EngineId, EngineSpec, EventBatch, Index, IndexBackend,
    IndexConfig, KeyHasher, KvEvent, Medium, Namespace, Query, QueryBlocks, Tier,
};
use proptest::prelude::*;

mod common;

const BS: usize = 4;
const BLOCKS: usize = 8;
const ENGINES: usize = 3;
/// How many leading blocks each sequence shares with sequence 0.
const SHARED: [usize; 4] = [BLOCKS, 3, 5, 0];

fn content(seq: usize, block: usize) -> u32 {
    if block < SHARED[seq] {
        block as u32
    } else {
        (100 * (seq + 1) + block) as u32
    }
}

fn tokens(seq: usize, upto: usize) -> Vec<u32> {
    (0..upto)
        .flat_map(|b| (0..BS as u32).map(move |t| content(seq, b) * BS as u32 + t))
        .collect()
}

/// The engines' own hash of block `block` of `seq`: a function of the prefix, like vLLM's.
fn ehash(seq: usize, block: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in 0..=block {
        h ^= u64::from(content(seq, b));
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn medium(t: Tier) -> Medium {
    match t {
        Tier::Gpu => Medium::Gpu,
        Tier::Cpu => Medium::Cpu,
        Tier::Storage => Medium::Storage,
        Tier::Remote => Medium::Other("REMOTE".into()),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Store {
        engine: usize,
        seq: usize,
        start: usize,
        len: usize,
        tier: Tier,
    },
    Placeholder {
        engine: usize,
        seq: usize,
        block: usize,
        tier: Tier,
    },
    Remove {
        engine: usize,
        seq: usize,
        block: usize,
        tier: Tier,
    },
    Clear {
        engine: usize,
    },
    RemoveEngine {
        engine: usize,
    },
    Query {
        seq: usize,
        upto: usize,
        only: Option<usize>,
        by_hash: bool,
    },
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![4 => Just(Tier::Gpu), 2 => Just(Tier::Cpu), 1 => Just(Tier::Storage), 1 => Just(Tier::Remote)]
}

fn op() -> impl Strategy<Value = Op> {
    let e = 0..ENGINES;
    let s = 0..SHARED.len();
    prop_oneof![
        6 => (e.clone(), s.clone(), 0..BLOCKS, 1..4usize, tier())
            .prop_map(|(engine, seq, start, len, tier)| Op::Store { engine, seq, start, len, tier }),
        2 => (e.clone(), s.clone(), 0..BLOCKS, tier())
            .prop_map(|(engine, seq, block, tier)| Op::Placeholder { engine, seq, block, tier }),
        4 => (e.clone(), s.clone(), 0..BLOCKS, tier())
            .prop_map(|(engine, seq, block, tier)| Op::Remove { engine, seq, block, tier }),
        1 => e.clone().prop_map(|engine| Op::Clear { engine }),
        1 => e.clone().prop_map(|engine| Op::RemoveEngine { engine }),
        5 => (s, 1..=BLOCKS, proptest::option::of(e), any::<bool>())
            .prop_map(|(seq, upto, only, by_hash)| Op::Query { seq, upto, only, by_hash }),
    ]
}

/// The naive model: reference counts per (engine, key, tier).
#[derive(Default)]
struct Model {
    counts: HashMap<(usize, u64, Tier), u32>,
}

impl Model {
    fn holds(&self, e: usize, key: u64) -> bool {
        Tier::ALL
            .iter()
            .any(|&t| self.counts.get(&(e, key, t)).is_some_and(|&c| c > 0))
    }
    fn clear(&mut self, e: usize) {
        self.counts.retain(|&(ce, _, _), _| ce != e);
    }
}

fn spec(e: usize) -> EngineSpec {
    EngineSpec {
        pod: format!("e{e}"),
        dp_rank: 0,
        model: "m".into(),
    }
}

/// Runs `ops` against a fresh backend and the model; panics on the first disagreement.
fn run(backend: &dyn IndexBackend, ops: &[Op]) {
    let ns = Namespace::model("m");
    let keys: Vec<Vec<u64>> = (0..SHARED.len())
        .map(|s| {
            KeyHasher::new()
                .chain(&ns, &tokens(s, BLOCKS), BS)
                .iter()
                .map(|k| k.0)
                .collect()
        })
        .collect();
    let weights = IndexConfig::default().tier_weights;
    let mut model = Model::default();
    let mut ids: Vec<Option<EngineId>> = vec![None; ENGINES];
    let batch = |ev: KvEvent| EventBatch {
        ts: 0.0,
        events: vec![ev],
        data_parallel_rank: Some(0),
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Store {
                engine,
                seq,
                start,
                len,
                tier,
            } => {
                let id =
                    *ids[engine].get_or_insert_with(|| backend.add_engine(spec(engine)).unwrap());
                let start = if start > 0 && model.holds(engine, keys[seq][start - 1]) {
                    start
                } else {
                    0
                };
                let end = (start + len).min(BLOCKS);
                let ev = BlockStored {
                    block_hashes: (start..end).map(|b| EngineHash(ehash(seq, b))).collect(),
                    parent_block_hash: (start > 0).then(|| EngineHash(ehash(seq, start - 1))),
                    token_ids: tokens(seq, end)[start * BS..].to_vec(),
                    block_size: BS as u32,
                    medium: Some(medium(tier)),
                    ..Default::default()
                };
                let rep = backend.apply(id, &batch(KvEvent::BlockStored(ev))).unwrap();
                assert!(rep.orphans.is_empty(), "step {step}: unexpected orphan");
                for &key in &keys[seq][start..end] {
                    *model.counts.entry((engine, key, tier)).or_default() += 1;
                }
            }
            Op::Placeholder {
                engine,
                seq,
                block,
                tier,
            } => {
                let Some(id) = ids[engine] else { continue };
                if !model.holds(engine, keys[seq][block]) {
                    continue;
                }
                let ev = BlockStored {
                    block_hashes: vec![EngineHash(ehash(seq, block))],
                    medium: Some(medium(tier)),
                    ..Default::default()
                };
                let rep = backend.apply(id, &batch(KvEvent::BlockStored(ev))).unwrap();
                assert!(
                    rep.unresolved.is_empty(),
                    "step {step}: placeholder unresolved"
                );
                *model
                    .counts
                    .entry((engine, keys[seq][block], tier))
                    .or_default() += 1;
            }
            Op::Remove {
                engine,
                seq,
                block,
                tier,
            } => {
                let Some(id) = ids[engine] else { continue };
                let ev = BlockRemoved {
                    block_hashes: vec![EngineHash(ehash(seq, block))],
                    medium: Some(medium(tier)),
                    ..Default::default()
                };
                backend
                    .apply(id, &batch(KvEvent::BlockRemoved(ev)))
                    .unwrap();
                if let Some(c) = model.counts.get_mut(&(engine, keys[seq][block], tier)) {
                    *c -= 1;
                    if *c == 0 {
                        model.counts.remove(&(engine, keys[seq][block], tier));
                    }
                }
            }
            Op::Clear { engine } => {
                let Some(id) = ids[engine] else { continue };
                backend
                    .apply(id, &batch(KvEvent::AllBlocksCleared))
                    .unwrap();
                model.clear(engine);
            }
            Op::RemoveEngine { engine } => {
                let Some(id) = ids[engine].take() else {
                    continue;
                };
                backend.remove_engine(id).unwrap();
                model.clear(engine);
            }
            Op::Query {
                seq,
                upto,
                only,
                by_hash,
            } => {
                let toks = tokens(seq, upto);
                let hashes: Vec<EngineHash> =
                    (0..upto).map(|b| EngineHash(ehash(seq, b))).collect();
                let filter: Option<Vec<EngineId>> = only.map(|e| ids[e].into_iter().collect());
                let q = Query {
                    namespace: &ns,
                    blocks: if by_hash {
                        QueryBlocks::VllmHashes(&hashes)
                    } else {
                        QueryBlocks::Tokens {
                            tokens: &toks,
                            mm: &[],
                        }
                    },
                    engines: filter.as_deref(),
                };
                let got = backend.query(&q).unwrap();
                // Model answer.
                let mut want: Vec<(String, u32, [u32; 4], f64)> = Vec::new();
                for (e, id) in ids.iter().enumerate() {
                    if id.is_none() || only.is_some_and(|o| o != e) {
                        continue;
                    }
                    let (mut n, mut tiers, mut best) = (0u32, [0u32; 4], [0u32; 4]);
                    for &key in &keys[seq][..upto] {
                        let held: Vec<Tier> = Tier::ALL
                            .into_iter()
                            .filter(|&t| model.counts.get(&(e, key, t)).is_some_and(|&c| c > 0))
                            .collect();
                        if held.is_empty() {
                            break;
                        }
                        n += 1;
                        for &t in &held {
                            tiers[t as usize] += 1;
                        }
                        // A block scores the weight of its best tier.
                        let top = held
                            .iter()
                            .copied()
                            .max_by(|a, b| weights[*a as usize].total_cmp(&weights[*b as usize]))
                            .expect("held is not empty");
                        best[top as usize] += 1;
                    }
                    let score: f64 = (0..4).map(|t| weights[t] * f64::from(best[t])).sum();
                    if n > 0 {
                        want.push((format!("e{e}"), n, tiers, score));
                    }
                }
                want.sort_by(|a, b| b.3.total_cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
                let got_cmp: Vec<(String, u32, [u32; 4], f64)> = got
                    .iter()
                    .map(|m| (m.name.to_string(), m.matched_blocks, m.tiers, m.score))
                    .collect();
                assert_eq!(
                    got_cmp.len(),
                    want.len(),
                    "step {step}: {op:?}\n got {got_cmp:?}\nwant {want:?}"
                );
                for (g, w) in got_cmp.iter().zip(&want) {
                    assert_eq!(
                        (&g.0, g.1, g.2),
                        (&w.0, w.1, w.2),
                        "step {step}: {op:?}\n got {got_cmp:?}\nwant {want:?}"
                    );
                    assert!((g.3 - w.3).abs() < 1e-9, "step {step}: score");
                }
                if !by_hash {
                    for m in &got {
                        assert_eq!(m.matched_tokens, m.matched_blocks * BS as u32);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn memory_index_matches_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        let backend: Arc<dyn IndexBackend> = Arc::new(Index::default());
        run(&*backend, &ops);
    }

    #[test]
    fn memory_index_matches_the_model_under_table_churn(ops in proptest::collection::vec(op(), 100..300)) {
        // A tiny starting table forces growth and tombstone clean-ups during the run.
        let backend = Index::new(IndexConfig { initial_slots: 8, ..IndexConfig::default() });
        run(&backend, &ops);
    }
}

#[test]
#[cfg(feature = "redis")]
fn redis_index_matches_the_model() {
    // One real redis-server (stopped when the test ends); each case gets a fresh key prefix,
    // i.e. a fresh index.
    let server = common::RedisServer::start();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&proptest::collection::vec(op(), 1..100), |ops| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let backend = kvindex::RedisIndex::connect(
                &server.url(),
                &format!("model{n}"),
                IndexConfig::default(),
            )
            .expect("connect to the test's redis-server");
            run(&backend, &ops);
            Ok(())
        })
        .unwrap();
}
