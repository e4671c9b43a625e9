//! The tiered pipeline: write-behind, backpressure, single-flight loads, prefetch deadlines,
//! prefix lookups, async gets, and tier events over real ZMQ sockets into kvindex.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{content, Scratch};
use kvindex::codec::decode_batch;
use kvindex::publish::PublisherConfig;
use kvindex::{EngineSpec, Index, KeyHasher, KvEvent, Medium, Namespace, Query, QueryBlocks, Tier};
use kvstore::{
    BlockKey, BlockMeta, BlockSource, DiskConfig, HostConfig, PeerConfig, PeerServer, PeerTier,
    Prefetched, RemoteConfig, StoreConfig, StoreError, TierEvents, TierKind, TieredStore,
};

const BB: usize = 64 << 10;

fn store(dir: &std::path::Path, host_blocks: usize) -> TieredStore {
    let mut c = StoreConfig::new(HostConfig::new((host_blocks * BB) as u64, BB));
    c.disk = Some(DiskConfig::new(dir, (256 * BB) as u64, BB));
    TieredStore::new(c).unwrap()
}

#[test]
fn write_behind_reaches_disk_and_survives_a_restart() {
    let d = Scratch::new("wb");
    let keys: Vec<BlockKey> = (100..140).map(BlockKey).collect();
    {
        let s = store(d.path(), 16);
        for &k in &keys {
            s.put(k, &content(k, BB), None).unwrap();
        }
        s.flush();
        let st = s.stats();
        assert_eq!(st.pipeline.written, 40);
        assert_eq!(st.pipeline.write_errors, 0);
        assert_eq!(st.disk.as_ref().unwrap().blocks, 40);
        assert_eq!(st.host.blocks, 16, "the host tier holds its capacity");
        assert_eq!(st.host.evictions, 24);
        // Evicted from the host, served from disk and promoted.
        let (b, t) = s.get_from(keys[0]).unwrap().unwrap();
        assert_eq!(t, TierKind::Disk);
        assert!(b[..] == content(keys[0], BB)[..]);
        assert_eq!(s.get_from(keys[0]).unwrap().unwrap().1, TierKind::Host);
        assert_eq!(s.stats().pipeline.promotions, 1);
    }
    let s = store(d.path(), 16);
    assert_eq!(s.lookup(&keys, false).on(TierKind::Disk), 40);
    for &k in &keys {
        assert!(s.get(k).unwrap().unwrap()[..] == content(k, BB)[..]);
    }
}

/// Threads that put into a small host tier evict each other's blocks while those are still
/// queued for the disk and while others promote blocks back from it: every block a put accepted
/// is read back (from either tier) and reaches the disk.
#[test]
fn concurrent_puts_and_gets_lose_no_block() {
    const THREADS: u64 = 4;
    const PER: u64 = 48;
    for round in 0..8 {
        let d = Scratch::new(&format!("race{round}"));
        let s = Arc::new(store(d.path(), 8));
        let start = Arc::new(Barrier::new(THREADS as usize));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, start) = (s.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let key = |t: u64, i: u64| BlockKey(1 + t * 1000 + i);
                    for i in 0..PER {
                        s.put(key(t, i), &content(key(t, i), BB), None).unwrap();
                    }
                    let mut bad = Vec::new();
                    for u in 0..THREADS {
                        for i in 0..PER {
                            let k = key(u, i);
                            match s.get(k).unwrap() {
                                Some(b) if b[..] != content(k, BB)[..] => {
                                    bad.push((k, "wrong bytes"))
                                }
                                None if u == t => bad.push((k, "missing")),
                                _ => {}
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        for w in workers {
            let bad = w.join().unwrap();
            assert!(bad.is_empty(), "round {round}: {bad:?}");
        }
        s.flush();
        assert_eq!(
            s.stats().disk.as_ref().unwrap().blocks,
            THREADS * PER,
            "round {round}"
        );
    }
}

/// A peer node whose local put takes 100 ms: a slow lower tier.
struct Slow(TieredStore);

impl BlockSource for Slow {
    fn block_bytes(&self) -> usize {
        BB
    }
    fn get_local(&self, key: BlockKey) -> kvstore::Result<Option<Bytes>> {
        self.0.get_local(key)
    }
    fn put_local(&self, key: BlockKey, data: &[u8]) -> kvstore::Result<()> {
        std::thread::sleep(Duration::from_millis(100));
        self.0.put_local(key, data)
    }
    fn contains_local(&self, key: BlockKey) -> bool {
        self.0.contains_local(key)
    }
}

#[test]
fn full_write_queue_pushes_back() {
    let backing =
        TieredStore::new(StoreConfig::new(HostConfig::new((64 * BB) as u64, BB))).unwrap();
    let srv = PeerServer::start(Arc::new(Slow(backing.clone())), "127.0.0.1:0").unwrap();
    let mut c = StoreConfig::new(HostConfig::new((64 * BB) as u64, BB));
    c.write_queue = 2;
    c.writers = 1;
    let mut rc = RemoteConfig::new(BB);
    rc.timeout = Duration::from_secs(5);
    c.remotes = vec![Arc::new(PeerTier::new(PeerConfig {
        addr: srv.addr().to_string(),
        remote: rc,
    }))];
    let s = TieredStore::new(c).unwrap();
    // One block in the writer, two queued: the next try_put is refused.
    let mut busy = 0;
    let mut k = 2u64;
    let mut try_one = |busy: &mut i32| {
        k += 1;
        match s.try_put(BlockKey(k), &content(BlockKey(k), BB), None) {
            Ok(()) => {}
            Err(StoreError::Busy) => *busy += 1,
            Err(e) => panic!("{e}"),
        }
    };
    for _ in 0..6 {
        try_one(&mut busy);
    }
    assert!(busy >= 2, "only {busy} refusals");
    // The writer is inside its first 100 ms put now; fill the queue again.
    std::thread::sleep(Duration::from_millis(20));
    let before = busy;
    while busy == before {
        try_one(&mut busy);
    }
    // A blocking put waits for room.
    let t0 = Instant::now();
    s.put(BlockKey(50), &content(BlockKey(50), BB), None)
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t0.elapsed()
    );
    assert!(s.stats().pipeline.backpressure_waits >= 1);
    s.flush();
    assert!(backing.host().contains(BlockKey(50)));
    assert_eq!(s.stats().pipeline.in_queue, 0);
}

#[test]
fn concurrent_gets_of_one_block_share_one_load() {
    let d = Scratch::new("sf");
    let s = store(d.path(), 16);
    let big = BlockKey(7777);
    // On disk only.
    s.disk().unwrap().put(big, &content(big, BB)).unwrap();
    let n = 8;
    let bar = Barrier::new(n);
    let ok = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..n {
            sc.spawn(|| {
                bar.wait();
                let b = s.get(big).unwrap().unwrap();
                assert!(b[..] == content(big, BB)[..]);
                ok.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(ok.load(Ordering::Relaxed), n);
    let st = s.stats();
    assert_eq!(st.disk.unwrap().hits, 1, "one disk read for {n} requests");
    assert_eq!(st.pipeline.promotions, 1);
}

#[test]
fn prefetch_honours_deadlines_and_reports_each_block() {
    let d = Scratch::new("pf");
    let s = store(d.path(), 32);
    let keys: Vec<BlockKey> = (300..310).map(BlockKey).collect();
    for &k in &keys[..8] {
        s.disk().unwrap().put(k, &content(k, BB)).unwrap();
    }
    s.put(keys[8], &content(keys[8], BB), None).unwrap(); // in the host tier
                                                          // keys[9] is nowhere.
    let late = s
        .prefetch(&keys, Instant::now() - Duration::from_millis(1))
        .wait();
    assert_eq!(late[8], Prefetched::Host);
    assert!(
        late[..8].iter().all(|o| *o == Prefetched::Deadline),
        "{late:?}"
    );
    assert!(
        !s.host().contains(keys[0]),
        "nothing loaded after its deadline"
    );
    let out = s
        .prefetch(&keys, Instant::now() + Duration::from_secs(10))
        .wait();
    for o in &out[..8] {
        assert_eq!(*o, Prefetched::Loaded(TierKind::Disk));
    }
    assert_eq!(out[8], Prefetched::Host);
    assert_eq!(out[9], Prefetched::Missing);
    for &k in &keys[..9] {
        assert!(s.host().contains(k));
    }
    assert!(s.stats().pipeline.deadline_missed >= 8);
}

#[test]
fn lookup_counts_leading_blocks_per_tier_without_loading() {
    let d = Scratch::new("lk");
    let s = store(d.path(), 32);
    let ns = Namespace::model("m");
    let tokens: Vec<u32> = (0..16 * 6).collect();
    let keys = KeyHasher::new().chain(&ns, &tokens, 16);
    for &k in &keys[..3] {
        s.put(k, &content(k, BB), None).unwrap();
    }
    s.flush();
    s.disk()
        .unwrap()
        .put(keys[3], &content(keys[3], BB))
        .unwrap();
    s.put(keys[5], &content(keys[5], BB), None).unwrap(); // after a gap: not counted
    s.flush();
    let before = s.stats();
    let l = s.lookup_tokens(&ns, &tokens, 16, true);
    assert_eq!(
        l.tiers,
        vec![
            TierKind::Host,
            TierKind::Host,
            TierKind::Host,
            TierKind::Disk
        ]
    );
    assert_eq!(l.blocks(), 4);
    assert!(!s.host().contains(keys[3]), "lookup loads nothing");
    let after = s.stats();
    assert_eq!(before.disk.unwrap().hits, after.disk.unwrap().hits);
    // Another namespace shares nothing.
    assert_eq!(
        s.lookup_tokens(&Namespace::model("other"), &tokens, 16, true)
            .blocks(),
        0
    );
}

#[test]
fn async_gets_work_from_any_runtime() {
    let d = Scratch::new("async");
    let s = store(d.path(), 16);
    let k = BlockKey(4242);
    s.disk().unwrap().put(k, &content(k, BB)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (a, b, c) = rt.block_on(async {
        let (a, b, c) = tokio::join!(
            s.get_async(k),
            s.get_async(k),
            s.get_async(BlockKey(1_000_001))
        );
        (a.unwrap().unwrap(), b.unwrap().unwrap(), c.unwrap())
    });
    assert!(a[..] == content(k, BB)[..] && a == b);
    assert!(c.is_none());
}

fn subscribe(ctx: &zmq::Context, ep: &str) -> zmq::Socket {
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.set_rcvtimeo(3000).unwrap();
    sub.connect(ep).unwrap();
    sub
}

#[test]
fn tier_events_reach_kvindex_over_zmq() {
    let ctx = zmq::Context::new();
    let mut pc = PublisherConfig::new("tcp://127.0.0.1:0");
    pc.topic = "kv@store".into();
    let events = Arc::new(TierEvents::publish(&ctx, pc).unwrap());
    let sub = subscribe(&ctx, events.endpoint().unwrap());
    std::thread::sleep(Duration::from_millis(300)); // slow joiner

    let d = Scratch::new("ev");
    let mut c = StoreConfig::new(HostConfig::new((4 * BB) as u64, BB));
    c.disk = Some(DiskConfig::new(d.path(), (64 * BB) as u64, BB));
    c.events = Some(events.clone());
    let s = TieredStore::new(c).unwrap();

    let ns = Namespace::model("m");
    let tokens: Vec<u32> = (0..16 * 6).map(|t| t * 3 + 1).collect();
    let keys = KeyHasher::new().chain(&ns, &tokens, 16);
    for (i, &k) in keys.iter().enumerate() {
        let meta = BlockMeta {
            tokens: tokens[i * 16..(i + 1) * 16].to_vec(),
            parent: i.checked_sub(1).map(|p| keys[p]),
            lora_name: None,
        };
        s.put(k, &content(k, BB), Some(meta)).unwrap();
    }
    s.flush();

    // Collect: 6 CPU stores, 2 CPU removals (4 host slots), 6 STORAGE stores.
    let index = Index::default();
    let engine = index
        .add_engine(EngineSpec {
            pod: "store-node".into(),
            dp_rank: 0,
            model: "m".into(),
        })
        .unwrap();
    let (mut cpu, mut storage, mut removed, mut last_seq) = (0, 0, 0, None);
    while cpu + storage + removed < 14 {
        let msg = sub.recv_multipart(0).expect("tier events arrive");
        assert_eq!(msg.len(), 3);
        assert_eq!(msg[0], b"kv@store");
        let seq = u64::from_be_bytes(msg[1][..].try_into().unwrap());
        if let Some(l) = last_seq {
            assert_eq!(seq, l + 1, "gap-free sequence");
        }
        last_seq = Some(seq);
        let batch = decode_batch(&msg[2]).expect("vLLM msgpack batch");
        for ev in &batch.events {
            match ev {
                KvEvent::BlockStored(b) => {
                    assert_eq!(b.block_size, 16);
                    assert_eq!(b.token_ids.len(), 16);
                    match b.medium {
                        Some(Medium::Cpu) => cpu += 1,
                        Some(Medium::Storage) => storage += 1,
                        ref m => panic!("medium {m:?}"),
                    }
                }
                KvEvent::BlockRemoved(r) => {
                    assert_eq!(r.medium, Some(Medium::Cpu));
                    removed += 1;
                }
                KvEvent::AllBlocksCleared => panic!("unexpected clear"),
            }
        }
        index.apply(engine, &batch).unwrap();
    }
    assert_eq!((cpu, storage, removed), (6, 6, 2));
    // kvindex now knows the whole prefix is held by the store node, on disk at least.
    let q = Query {
        namespace: &ns,
        blocks: QueryBlocks::Tokens {
            tokens: &tokens,
            mm: &[],
        },
        engines: None,
    };
    let m = index.query(&q);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].matched_blocks, 6);
    assert_eq!(m[0].tiers[Tier::Storage as usize], 6);
    assert_eq!(m[0].tiers[Tier::Cpu as usize], 4);
}

#[test]
fn buffered_events_are_taken_in_order() {
    let events = Arc::new(TierEvents::buffered(1000));
    let mut c = StoreConfig::new(HostConfig::new((2 * BB) as u64, BB));
    c.events = Some(events.clone());
    let s = TieredStore::new(c).unwrap();
    for k in 2..5u64 {
        s.put(BlockKey(k), &content(BlockKey(k), BB), None).unwrap();
    }
    let evs = events.take_events();
    let kinds: Vec<String> = evs
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored(b) => format!("S{}", b.block_hashes[0].0),
            KvEvent::BlockRemoved(r) => format!("R{}", r.block_hashes[0].0),
            KvEvent::AllBlocksCleared => "C".into(),
        })
        .collect();
    assert_eq!(kinds, ["S2", "S3", "R2", "S4"]);
    assert!(events.take_events().is_empty());
}
