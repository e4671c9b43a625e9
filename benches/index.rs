//! `benches/run index`: kvindex against dynamo-kv-router on the Mooncake conversation trace.
//!
//! The trace's requests are expanded to 16-token blocks and routed round-robin to simulated
//! engines (LRU prefix caches of fixed capacity) that publish genuine vLLM msgpack batches. The
//! same batches are then, in this one process and on one thread each:
//!
//! * decoded and applied by kvindex (`ingest_blocks_per_s`, block operations = blocks stored plus
//!   blocks removed), then queried with the prompts of a sample of requests (`query_p50_us`,
//!   `query_p99_us`, and `query_8k_p99_us` for prompts cut to 8192 tokens; each the median of
//!   three timed passes); the query includes hashing the prompt's tokens;
//! * decoded by dynamo's own vLLM decoder (`zmq_wire`) and applied to its two fastest indexers,
//!   the concurrent compressed radix tree (its production default) and the positional
//!   ("flash") indexer, and asked the same questions (its query also hashes the tokens).
//!
//! The simulated engines name their blocks with Dynamo's sequence hash, which its positional
//! indexer needs; kvindex treats engine hashes as opaque ids and computes its own keys.
//! Memory is measured with a counting allocator (everything each index allocated and still holds).
//! `dynamo_*` figures are the better of dynamo's two indexers for each figure; both are also
//! reported separately.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dynamo_kv_router::indexer::positional::SearchMode;
use dynamo_kv_router::indexer::WorkerTask;
use dynamo_kv_router::protocols::{
    compute_block_hash_for_seq, compute_seq_hash_for_block, BlockHashOptions, LocalBlockHash,
    RouterEvent, WorkerWithDpRank,
};
use dynamo_kv_router::zmq_wire::{decode_event_batch, ZmqEventNormalizer};
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, PositionalIndexer, SyncIndexer};
use kvindex::codec::{encode_batch, BatchDecoder};
use kvindex::trace::{load_trace, prompt_tokens, LruEngine};
use kvindex::{EngineSpec, Index, IndexConfig, KvEvent, Namespace, Query, QueryBlocks};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const BS: usize = 16;
const MODEL: &str = "mooncake";

struct Args {
    quick: bool,
    trace: PathBuf,
    engines: usize,
    capacity: usize,
    requests: Option<usize>,
    queries: usize,
    /// Skip the dynamo runs (for profiling kvindex alone); writes no JSON.
    only_kvindex: bool,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        trace: PathBuf::from("../shared/data/mooncake/conversation_trace.jsonl"),
        engines: 64,
        capacity: 32_768,
        requests: None,
        queries: 3000,
        only_kvindex: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--trace" => a.trace = it.next().expect("--trace FILE").into(),
            "--engines" => a.engines = it.next().and_then(|v| v.parse().ok()).expect("--engines N"),
            "--capacity" => {
                a.capacity = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--capacity BLOCKS")
            }
            "--requests" => a.requests = it.next().and_then(|v| v.parse().ok()),
            "--queries" => a.queries = it.next().and_then(|v| v.parse().ok()).expect("--queries N"),
            "--only-kvindex" => a.only_kvindex = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    if a.quick {
        a.requests = Some(a.requests.unwrap_or(2500));
        a.queries = a.queries.min(1000);
    }
    a
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Query latency percentiles, in microseconds.
struct Lat {
    p50: f64,
    p99: f64,
}

/// A count from the environment variable `name` (for profiling runs), else `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

/// Dynamo's block identity of a prompt: per-block content hashes and their sequence hashes.
fn dynamo_hashes(tokens: &[u32]) -> (Vec<LocalBlockHash>, Vec<u64>) {
    let locals = compute_block_hash_for_seq(tokens, BS as u32, BlockHashOptions::default());
    let seqs = compute_seq_hash_for_block(&locals);
    (locals, seqs)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn main() {
    let a = args();
    let t0 = Instant::now();
    let reqs = load_trace(&a.trace, a.requests).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("[index] {} requests from {}", reqs.len(), a.trace.display());

    // 1. The workload: each engine serves its requests and publishes vLLM batches.
    let mut engines: Vec<LruEngine> = (0..a.engines)
        .map(|_| LruEngine::new(a.capacity, BS))
        .collect();
    let mut payloads: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    let (mut stored, mut removed) = (0usize, 0usize);
    for (i, r) in reqs.iter().enumerate() {
        let toks = prompt_tokens(r, BS);
        let (_, seqs) = dynamo_hashes(&toks);
        let e = i % a.engines;
        let out = engines[e].serve(&toks, &seqs, r.timestamp as f64 / 1000.0);
        for ev in &out.batch.events {
            match ev {
                KvEvent::BlockStored(s) => stored += s.block_hashes.len(),
                KvEvent::BlockRemoved(r) => removed += r.block_hashes.len(),
                KvEvent::AllBlocksCleared => {}
            }
        }
        if !out.batch.events.is_empty() {
            let mut buf = Vec::new();
            encode_batch(&out.batch, &mut buf);
            payloads.push((e, buf));
        }
        prompts.push(toks);
        if i % 2000 == 1999 {
            eprintln!("[index] simulated {}/{} requests", i + 1, reqs.len());
        }
    }
    let block_ops = stored + removed;
    let memberships: usize = engines.iter().map(|e| e.len()).sum();
    // Distinct blocks held by some engine at the end (content is named by the sequence hash).
    let distinct: usize = engines
        .iter()
        .flat_map(|e| e.held())
        .collect::<HashSet<u64>>()
        .len();
    eprintln!(
        "[index] {} batches, {} block ops ({} stored, {} removed); {} blocks held ({} distinct) at the end; {:.1}s",
        payloads.len(),
        block_ops,
        stored,
        removed,
        memberships,
        distinct,
        t0.elapsed().as_secs_f64()
    );

    // Query sample: spread over the trace; and 8k-token prompts.
    let step = (prompts.len() / a.queries.max(1)).max(1);
    let sample: Vec<&Vec<u32>> = prompts.iter().step_by(step).take(a.queries).collect();
    let long: Vec<&[u32]> = prompts
        .iter()
        .filter(|p| p.len() >= 8192)
        .take(a.queries)
        .map(|p| &p[..8192])
        .collect();

    // 2. kvindex.
    // Medians of three runs: these machines are noisy.
    let runs = 3;
    let mut ours_ingest = Vec::new();
    let mut ours_mem = 0isize;
    let mut ours_index = None;
    for run in 0..runs {
        // Free the previous run's index first, so memory is measured from a clean state.
        drop(ours_index.take());
        let before = live();
        let index = Index::new(IndexConfig {
            byte_budget: 8 << 30,
            ..IndexConfig::default()
        });
        let ids: Vec<_> = (0..a.engines)
            .map(|e| {
                index
                    .add_engine(EngineSpec {
                        pod: format!("engine-{e}"),
                        dp_rank: 0,
                        model: MODEL.into(),
                    })
                    .unwrap()
            })
            .collect();
        // Decoded as kvindex's ingestion decodes a socket's stream (one decoder, its memory
        // reused from batch to batch).
        let mut decoder = BatchDecoder::new();
        let t = Instant::now();
        for (e, p) in &payloads {
            let batch = decoder.decode(p).expect("valid batch");
            index.apply(ids[*e], batch).expect("apply");
        }
        let secs = t.elapsed().as_secs_f64();
        // The decoder's buffers are not the index's memory.
        drop(decoder);
        ours_ingest.push(block_ops as f64 / secs);
        ours_mem = live() - before;
        eprintln!(
            "[index] kvindex ingest run {}: {:.2} M block ops/s",
            run + 1,
            block_ops as f64 / secs / 1e6
        );
        ours_index = Some(index);
    }
    let index = ours_index.expect("ran");
    let st = index.stats();
    assert_eq!(
        st.memberships, memberships,
        "kvindex holds what the engines hold"
    );
    let ns = Namespace::model(MODEL);
    // Each prompt set is timed in three passes (after a warm-up pass); a figure is the median of
    // the three passes' percentiles, for every system alike.
    let time_queries = |qs: &[&[u32]], f: &mut dyn FnMut(&[u32]) -> usize| -> Lat {
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let mut lat = Vec::with_capacity(qs.len());
            for q in qs {
                let t = Instant::now();
                std::hint::black_box(f(q));
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat.sort_by(f64::total_cmp);
            p50.push(pct(&lat, 0.5));
            p99.push(pct(&lat, 0.99));
        }
        Lat {
            p50: median(p50),
            p99: median(p99),
        }
    };
    let sample_s: Vec<&[u32]> = sample.iter().map(|p| p.as_slice()).collect();
    let mut ours_q = |toks: &[u32]| -> usize {
        index
            .query(&Query {
                namespace: &ns,
                blocks: QueryBlocks::Tokens {
                    tokens: toks,
                    mm: &[],
                },
                engines: None,
            })
            .len()
    };
    let _warm = time_queries(&sample_s, &mut ours_q);
    let ours_lat = time_queries(&sample_s, &mut ours_q);
    let ours_lat8 = time_queries(&long, &mut ours_q);

    if a.only_kvindex {
        // Where an 8k query's time goes: hashing the tokens alone, and the walk given the keys.
        // KVINDEX_QUERY_LOOPS=N repeats the query passes N more times first (for a profiler).
        let loops = env_count("KVINDEX_QUERY_LOOPS", 0);
        for _ in 0..loops {
            let _ = time_queries(&sample_s, &mut ours_q);
            let _ = time_queries(&long, &mut ours_q);
        }
        // Ingest's two parts: decoding the batches alone. KVINDEX_DECODE_LOOPS=N decodes them
        // N more times first (for a profiler).
        let mut decoder = BatchDecoder::new();
        for _ in 0..env_count("KVINDEX_DECODE_LOOPS", 0) {
            for (_, p) in &payloads {
                std::hint::black_box(decoder.decode(p).expect("valid batch"));
            }
        }
        let t = Instant::now();
        for (_, p) in &payloads {
            std::hint::black_box(decoder.decode(p).expect("valid batch"));
        }
        eprintln!(
            "[index] decoding alone: {:.2} M block ops/s",
            block_ops as f64 / t.elapsed().as_secs_f64() / 1e6
        );
        let mut h = kvindex::KeyHasher::new();
        let mut hash_only = |toks: &[u32]| -> usize { h.chain(&ns, toks, BS).len() };
        let hashing = time_queries(&long, &mut hash_only);
        let keys: Vec<Vec<kvindex::BlockKey>> = long.iter().map(|t| h.chain(&ns, t, BS)).collect();
        // The walk given each prompt's keys, at most `cut` of them (`usize::MAX`: all; 1: the
        // part of a query that does not depend on its length).
        let by_keys = |cut: usize| {
            let mut next = 0usize;
            let mut q = |_: &[u32]| -> usize {
                let k = &keys[next % keys.len().max(1)];
                next += 1;
                index
                    .query(&Query {
                        namespace: &ns,
                        blocks: QueryBlocks::Keys(&k[..k.len().min(cut)]),
                        engines: None,
                    })
                    .len()
            };
            time_queries(&long, &mut q)
        };
        let walk = by_keys(usize::MAX);
        // The same walk with its slots in cache (each prompt walked twice, the second timed).
        let mut cached = Vec::new();
        let reps = env_count("KVINDEX_CACHED_LOOPS", 1);
        for k in keys.iter().cycle().take(keys.len() * reps) {
            let q = Query {
                namespace: &ns,
                blocks: QueryBlocks::Keys(k),
                engines: None,
            };
            std::hint::black_box(index.query(&q));
            let t = Instant::now();
            std::hint::black_box(index.query(&q));
            cached.push(t.elapsed().as_secs_f64() * 1e6);
        }
        eprintln!(
            "[index] 8k prompts: walk in cache p50 {:.2} us",
            median(cached)
        );
        let fixed = by_keys(1);
        // How far the walks go: the longest match of each 8k prompt, in blocks.
        let mut deepest: Vec<u32> = keys
            .iter()
            .map(|k| {
                index
                    .query(&Query {
                        namespace: &ns,
                        blocks: QueryBlocks::Keys(k),
                        engines: None,
                    })
                    .iter()
                    .map(|m| m.matched_blocks)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        deepest.sort_unstable();
        let mean_deepest =
            deepest.iter().map(|&d| f64::from(d)).sum::<f64>() / deepest.len().max(1) as f64;
        eprintln!(
            "[index] 8k prompts' longest match: mean {:.0} blocks, median {} of {}",
            mean_deepest,
            deepest.get(deepest.len() / 2).copied().unwrap_or(0),
            8192 / BS
        );
        eprintln!(
            "[index] 8k prompts: hashing alone p50 {:.2} us, walk given the keys p50 {:.2} us p99 {:.2} us, first block alone p50 {:.2} us",
            hashing.p50, walk.p50, walk.p99, fixed.p50
        );
        let st = index.stats();
        eprintln!(
            "[index] kvindex stats: {} bytes, {} block slots of {}, {} aliases of {}, {} blocks",
            st.bytes, st.block_slots, st.block_capacity, st.aliases, st.alias_capacity, st.blocks
        );
        println!(
            "kvindex only: ingest {:.0} block ops/s, query p50 {:.2} us, p99 {:.2} us, 8k p99 {:.2} us, {:.2} bytes per block",
            median(ours_ingest),
            ours_lat.p50,
            ours_lat.p99,
            ours_lat8.p99,
            ours_mem as f64 / distinct.max(1) as f64
        );
        return;
    }

    // 3. dynamo: decode with its own vLLM decoder, normalise, and build RouterEvents.
    let decode_dynamo = || -> (Vec<RouterEvent>, f64) {
        let t = Instant::now();
        let mut norms: Vec<ZmqEventNormalizer> = (0..a.engines)
            .map(|_| ZmqEventNormalizer::new(BS as u32))
            .collect();
        let mut ids = vec![0u64; a.engines];
        let mut out = Vec::with_capacity(payloads.len() * 2);
        for (e, p) in &payloads {
            let batch = decode_event_batch(p).expect("dynamo decodes vLLM batches");
            let dp = batch.data_parallel_rank.unwrap_or(0) as u32;
            for raw in batch.events {
                ids[*e] += 1;
                if let Some(pe) =
                    norms[*e].normalize(raw, ids[*e], WorkerWithDpRank::new(*e as u64, dp))
                {
                    if let Some(ev) = pe.into_router_event() {
                        out.push(ev);
                    }
                }
            }
        }
        (out, t.elapsed().as_secs_f64())
    };

    // 3a. Concurrent compressed radix tree, driven by its own worker loop on one thread.
    let mut crtc_ingest = Vec::new();
    let mut crtc_mem = 0isize;
    let mut crtc_keep: Option<(
        Arc<ConcurrentRadixTreeCompressed>,
        flume::Sender<WorkerTask>,
        std::thread::JoinHandle<_>,
    )> = None;
    for run in 0..runs {
        // Stop the previous run's worker (it owns lookup maps) before measuring this one.
        if let Some((c, tx, th)) = crtc_keep.take() {
            let _ = tx.send(WorkerTask::Terminate);
            let _ = th.join();
            drop(c);
        }
        let before = live();
        let (events, dec_s) = decode_dynamo();
        let crtc = Arc::new(ConcurrentRadixTreeCompressed::new());
        let (tx, rx) = flume::unbounded::<WorkerTask>();
        for ev in events {
            tx.send(WorkerTask::Event(ev)).expect("queue");
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        tx.send(WorkerTask::Flush(done)).expect("queue");
        let c2 = crtc.clone();
        let t = Instant::now();
        let th = std::thread::spawn(move || c2.worker(rx, None));
        wait.blocking_recv().expect("flush");
        let apply_s = t.elapsed().as_secs_f64();
        crtc_ingest.push(block_ops as f64 / (dec_s + apply_s));
        // Keep the worker (it owns the per-worker lookup maps) alive while measuring.
        crtc_mem = live() - before;
        eprintln!(
            "[index] dynamo crtc ingest run {}: {:.2} M block ops/s (decode {:.2}s, apply {:.2}s)",
            run + 1,
            block_ops as f64 / (dec_s + apply_s) / 1e6,
            dec_s,
            apply_s
        );
        crtc_keep = Some((crtc, tx, th));
    }
    let (crtc, crtc_tx, crtc_th) = crtc_keep.expect("ran");
    let mut crtc_q = |toks: &[u32]| -> usize {
        let locals = compute_block_hash_for_seq(toks, BS as u32, BlockHashOptions::default());
        crtc.find_matches(&locals, false).scores.len()
    };
    let _warm = time_queries(&sample_s, &mut crtc_q);
    let crtc_lat = time_queries(&sample_s, &mut crtc_q);
    let crtc_lat8 = time_queries(&long, &mut crtc_q);

    // Sanity: both indexes agree on every sampled prompt's best match.
    let mut disagree = 0;
    for q in &sample_s {
        let ours = index.query(&Query {
            namespace: &ns,
            blocks: QueryBlocks::Tokens { tokens: q, mm: &[] },
            engines: None,
        });
        let locals = compute_block_hash_for_seq(q, BS as u32, BlockHashOptions::default());
        let theirs = crtc.find_matches(&locals, false);
        let mut a1: Vec<(u64, u32)> = ours
            .iter()
            .map(|m| (m.name[7..].parse().unwrap_or(0), m.matched_blocks))
            .collect();
        let mut b1: Vec<(u64, u32)> = theirs
            .scores
            .iter()
            .map(|(w, d)| (w.worker_id, *d))
            .collect();
        a1.sort();
        b1.sort();
        if a1 != b1 {
            disagree += 1;
        }
    }
    crtc_tx.send(WorkerTask::Terminate).ok();
    let _ = crtc_th.join();
    drop(crtc);

    // 3b. Positional indexer, applied directly.
    let mut pos_ingest = Vec::new();
    let mut pos_mem = 0isize;
    let mut pos_keep = None;
    for run in 0..runs {
        drop(pos_keep.take());
        let before = live();
        let (events, dec_s) = decode_dynamo();
        let pos = PositionalIndexer::new_with_mode(32, SearchMode::Strided);
        let mut wb = Default::default();
        let t = Instant::now();
        let mut errors = 0usize;
        for ev in events {
            if pos.apply_event(&mut wb, ev, None).is_err() {
                errors += 1;
            }
        }
        let apply_s = t.elapsed().as_secs_f64();
        pos_ingest.push(block_ops as f64 / (dec_s + apply_s));
        pos_mem = live() - before;
        eprintln!(
            "[index] dynamo positional ingest run {}: {:.2} M block ops/s (decode {:.2}s, apply {:.2}s, {} errors)",
            run + 1,
            block_ops as f64 / (dec_s + apply_s) / 1e6,
            dec_s,
            apply_s,
            errors
        );
        pos_keep = Some((pos, wb));
    }
    let (pos, _wb) = pos_keep.expect("ran");
    let mut pos_q = |toks: &[u32]| -> usize {
        let locals = compute_block_hash_for_seq(toks, BS as u32, BlockHashOptions::default());
        pos.find_matches(&locals, false).scores.len()
    };
    let _warm = time_queries(&sample_s, &mut pos_q);
    let pos_lat = time_queries(&sample_s, &mut pos_q);
    let pos_lat8 = time_queries(&long, &mut pos_q);

    // 4. Report.
    let per_block = |m: isize| m as f64 / distinct.max(1) as f64;
    let per_entry = |m: isize| m as f64 / memberships.max(1) as f64;
    let ours = [
        median(ours_ingest),
        ours_lat.p50,
        ours_lat.p99,
        ours_lat8.p99,
        per_block(ours_mem),
        per_entry(ours_mem),
    ];
    let crtc_f = [
        median(crtc_ingest),
        crtc_lat.p50,
        crtc_lat.p99,
        crtc_lat8.p99,
        per_block(crtc_mem),
        per_entry(crtc_mem),
    ];
    let pos_f = [
        median(pos_ingest),
        pos_lat.p50,
        pos_lat.p99,
        pos_lat8.p99,
        per_block(pos_mem),
        per_entry(pos_mem),
    ];
    let higher_better = [true, false, false, false, false, false];
    let best: Vec<f64> = (0..6)
        .map(|i| {
            if higher_better[i] {
                crtc_f[i].max(pos_f[i])
            } else {
                crtc_f[i].min(pos_f[i])
            }
        })
        .collect();
    let names = [
        "ingest_blocks_per_s",
        "query_p50_us",
        "query_p99_us",
        "query_8k_p99_us",
        "bytes_per_block",
        "bytes_per_entry",
    ];
    println!();
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>14} {:>9}",
        "figure", "kvindex", "dynamo best", "dynamo crtc", "dynamo pos.", "ratio"
    );
    for i in 0..6 {
        let ratio = if higher_better[i] {
            ours[i] / best[i]
        } else {
            best[i] / ours[i]
        };
        println!(
            "{:<22} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>8.2}x",
            names[i], ours[i], best[i], crtc_f[i], pos_f[i], ratio
        );
    }
    println!(
        "\n{} requests, {} engines x {} blocks, {} block ops, {} blocks held ({} distinct); {} queries ({} of 8k tokens); disagreements with dynamo crtc: {}; kvindex stats: {} bytes, {} slots, {} aliases",
        reqs.len(), a.engines, a.capacity, block_ops, memberships, distinct, sample_s.len(), long.len(), disagree, st.bytes, st.block_slots, st.aliases
    );
    let mut json = serde_json::Map::new();
    for i in 0..6 {
        json.insert(names[i].into(), ours[i].into());
        json.insert(format!("dynamo_{}", names[i]), best[i].into());
        json.insert(format!("dynamo_crtc_{}", names[i]), crtc_f[i].into());
        json.insert(format!("dynamo_positional_{}", names[i]), pos_f[i].into());
    }
    json.insert("requests".into(), reqs.len().into());
    json.insert("engines".into(), a.engines.into());
    json.insert("block_ops".into(), block_ops.into());
    json.insert("blocks_held".into(), memberships.into());
    json.insert("distinct_blocks".into(), distinct.into());
    json.insert("disagreements".into(), disagree.into());
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "cargo bench --bench index".into())
            .into(),
    );
    json.insert("machine".into(), machine().into());
    std::fs::create_dir_all("target/bench").ok();
    std::fs::write(
        "target/bench/index.json",
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write");
    eprintln!(
        "[index] wrote target/bench/index.json in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
