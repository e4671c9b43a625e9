//! `kvmesh demo`: kvindex routing a real trace, against round-robin and random routing.
//!
//! Each simulated engine is an LRU prefix cache of fixed capacity that publishes genuine vLLM KV
//! events (msgpack batches, sequence numbers, a replay socket) over real ZMQ sockets on loopback.
//! A `kvmesh serve` daemon, started in this process, subscribes to all of them, and every request
//! of the trace goes to the engine the daemon (asked over its HTTP API) scores best (the longest cached prefix; ties and overloaded engines settled by load). The same
//! trace then runs with round-robin and random routing on fresh engines, and the cluster hit rates
//! are compared.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvindex::publish::{EventPublisher, PublisherConfig};
use kvindex::trace::{
    default_engine_hash, engine_hashes, load_trace, prompt_tokens, LruEngine, TraceRequest,
};
use kvmesh::client::{IndexClient, ScoreRequest};
use kvmesh::serve::{Daemon, EngineConfig, ServeConfig};

use crate::DemoArgs;

const MODEL: &str = "demo-model";

/// Hit counts of one routing policy.
#[derive(Default, Clone)]
struct Tally {
    requests: Vec<u64>,
    hit_blocks: Vec<u64>,
    prompt_blocks: Vec<u64>,
}

impl Tally {
    fn new(n: usize) -> Self {
        Tally {
            requests: vec![0; n],
            hit_blocks: vec![0; n],
            prompt_blocks: vec![0; n],
        }
    }
    fn add(&mut self, e: usize, hit: usize, total: usize) {
        self.requests[e] += 1;
        self.hit_blocks[e] += hit as u64;
        self.prompt_blocks[e] += total as u64;
    }
    fn rate(&self) -> f64 {
        let t: u64 = self.prompt_blocks.iter().sum();
        if t == 0 {
            0.0
        } else {
            self.hit_blocks.iter().sum::<u64>() as f64 / t as f64
        }
    }
}

struct Prepared {
    tokens: Vec<u32>,
    hashes: Vec<u64>,
}

fn prepare(reqs: &[TraceRequest], bs: usize) -> Vec<Prepared> {
    reqs.iter()
        .map(|r| {
            let tokens = prompt_tokens(r, bs);
            let hashes = engine_hashes(&tokens, bs, &default_engine_hash);
            Prepared { tokens, hashes }
        })
        .collect()
}

fn progress(label: &str, done: usize, total: usize, tally: &Tally, started: Instant) {
    eprint!(
        "\r[demo] {label:<11} {done:>6}/{total} requests  cluster hit rate {:5.1}%  {:5.1}s",
        100.0 * tally.rate(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().flush();
}

/// Runs a trace on fresh engines with a routing function that needs no index.
fn baseline(
    name: &str,
    a: &DemoArgs,
    prepared: &[Prepared],
    mut route: impl FnMut(usize) -> usize,
) -> Tally {
    let mut engines: Vec<LruEngine> = (0..a.engines)
        .map(|_| LruEngine::new(a.capacity, a.block_size))
        .collect();
    let mut tally = Tally::new(a.engines);
    let started = Instant::now();
    for (i, p) in prepared.iter().enumerate() {
        let e = route(i);
        let out = engines[e].serve(&p.tokens, &p.hashes, 0.0);
        tally.add(e, out.hit_blocks, out.prompt_blocks);
        if i % 500 == 0 || i + 1 == prepared.len() {
            progress(name, i + 1, prepared.len(), &tally, started);
        }
    }
    eprintln!();
    tally
}

/// Picks the engine with the longest cached prefix, unless it is overloaded.
fn choose(scores: &HashMap<String, u32>, ids: &[String], load: &[u64]) -> usize {
    let total: u64 = load.iter().sum();
    // Prefix affinity wins unless an engine carries 50% more than its share.
    let limit = (total as f64 / ids.len() as f64) * 1.5 + 8.0;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&e| {
        (
            std::cmp::Reverse(scores.get(&ids[e]).copied().unwrap_or(0)),
            load[e],
        )
    });
    order
        .iter()
        .copied()
        .find(|&e| (load[e] as f64) <= limit)
        .unwrap_or_else(|| (0..ids.len()).min_by_key(|&e| load[e]).unwrap_or(0))
}

pub fn run(a: &DemoArgs) -> Result<()> {
    if a.engines == 0 || a.capacity == 0 {
        bail!("--engines and --capacity must be positive");
    }
    if a.block_size == 0 || 512 % a.block_size != 0 {
        bail!("--block-size must divide 512 (the trace's block of hash ids)");
    }
    let reqs = load_trace(&a.trace, a.requests).with_context(|| {
        format!(
            "reading the trace (pass --trace FILE to use another): {}",
            a.trace.display()
        )
    })?;
    if reqs.is_empty() {
        bail!("the trace {} has no requests", a.trace.display());
    }
    eprintln!(
        "[demo] {} requests from {}; {} engines x {} blocks of {} tokens",
        reqs.len(),
        a.trace.display(),
        a.engines,
        a.capacity,
        a.block_size
    );
    let prepared = prepare(&reqs, a.block_size);

    // kvmesh routing: the daemon in this process, engines publishing over ZMQ.
    let ctx = zmq::Context::new();
    let mut publishers = Vec::new();
    let mut ids = Vec::new();
    let mut config = ServeConfig {
        listen: "127.0.0.1:0".into(),
        grpc_listen: "off".into(),
        model: MODEL.into(),
        ..ServeConfig::default()
    };
    for e in 0..a.engines {
        let name = format!("engine-{e}");
        let publ = EventPublisher::start(
            &ctx,
            PublisherConfig {
                replay_endpoint: Some("tcp://127.0.0.1:0".into()),
                topic: format!("kv@{name}@{MODEL}"),
                ..PublisherConfig::new("tcp://127.0.0.1:0")
            },
        )
        .context("starting an engine's event publisher")?;
        config.engines.push(EngineConfig {
            name: name.clone(),
            endpoint: publ.endpoint().to_owned(),
            replay_endpoint: publ.replay_endpoint().map(str::to_owned),
            model: None,
            dp_rank: 0,
            topic: String::new(),
        });
        publishers.push(publ);
        ids.push(name);
    }
    let daemon = Daemon::start(config).context("starting the kvmesh daemon")?;
    eprintln!(
        "[demo] kvmesh serve listening on http://{} (in this process)",
        daemon.http_addr()
    );
    let client = IndexClient::new(format!("http://{}", daemon.http_addr()));
    std::thread::sleep(Duration::from_millis(300));
    let mut engines: Vec<LruEngine> = (0..a.engines)
        .map(|_| LruEngine::new(a.capacity, a.block_size))
        .collect();
    let mut tally = Tally::new(a.engines);
    let mut load = vec![0u64; a.engines];
    let started = Instant::now();
    let mut query_us = Vec::with_capacity(prepared.len());
    for (i, p) in prepared.iter().enumerate() {
        let t = Instant::now();
        let matches = client
            .score(&ScoreRequest::tokens(MODEL, p.tokens.clone()))
            .context("asking the daemon for scores")?;
        query_us.push(t.elapsed().as_secs_f64() * 1e6);
        let scores: HashMap<String, u32> = matches
            .into_iter()
            .map(|m| (m.name, m.matched_blocks))
            .collect();
        let e = choose(&scores, &ids, &load);
        load[e] += 1;
        let out = engines[e].serve(&p.tokens, &p.hashes, reqs[i].timestamp as f64 / 1000.0);
        tally.add(e, out.hit_blocks, out.prompt_blocks);
        if !out.batch.events.is_empty() {
            publishers[e]
                .publish(&out.batch)
                .context("publishing events")?;
        }
        if i % 250 == 0 || i + 1 == prepared.len() {
            progress("kvmesh", i + 1, prepared.len(), &tally, started);
        }
    }
    eprintln!();
    // Let the last events arrive before reading the daemon's picture.
    let app = daemon.app().clone();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let held: u64 = app
            .engines()
            .iter()
            .map(|s| s.blocks.map_or(0, |b| b.gpu))
            .sum();
        if held as usize == engines.iter().map(LruEngine::len).sum::<usize>() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rr = baseline("round-robin", a, &prepared, |i| i % a.engines);
    let mut rng = a.seed.max(1);
    let random = baseline("random", a, &prepared, |_| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % a.engines as u64) as usize
    });

    // Report. Read the daemon's picture, then stop it before the engines go away (their
    // disconnection would clear them).
    let status = app.engines();
    let st = app.index_stats();
    drop(daemon);
    println!();
    println!("kvmesh routing, per engine");
    println!(
        "{:<10} {:>9} {:>13} {:>13} {:>9} {:>12} {:>12} {:>8} {:>8}",
        "engine",
        "requests",
        "prompt blks",
        "hit blks",
        "hit rate",
        "held (sim)",
        "held (index)",
        "cpu",
        "storage"
    );
    for (e, id) in ids.iter().enumerate() {
        let blocks = status
            .iter()
            .find(|s| &s.name == id)
            .and_then(|s| s.blocks)
            .unwrap_or_default();
        let rate = if tally.prompt_blocks[e] == 0 {
            0.0
        } else {
            tally.hit_blocks[e] as f64 / tally.prompt_blocks[e] as f64
        };
        println!(
            "{:<10} {:>9} {:>13} {:>13} {:>8.1}% {:>12} {:>12} {:>8} {:>8}",
            format!("engine-{e}"),
            tally.requests[e],
            tally.prompt_blocks[e],
            tally.hit_blocks[e],
            100.0 * rate,
            engines[e].len(),
            blocks.gpu,
            blocks.cpu,
            blocks.storage,
        );
    }
    query_us.sort_by(f64::total_cmp);
    let q = |p: f64| query_us[((query_us.len() - 1) as f64 * p) as usize];
    let events: u64 = status.iter().map(|s| s.events).sum();
    let lost: u64 = status.iter().map(|s| s.lost_batches).sum();
    let replays: u64 = status.iter().map(|s| s.replays).sum();
    println!();
    println!(
        "index: {} blocks ({} memberships) in {:.1} MiB, {:.1} bytes per block; {} events ingested ({} replays, {} batches lost); score over HTTP p50 {:.1} us, p99 {:.1} us",
        st.blocks,
        st.memberships,
        st.bytes as f64 / (1 << 20) as f64,
        st.bytes_per_block,
        events,
        replays,
        lost,
        q(0.5),
        q(0.99)
    );
    println!();
    println!("cluster prefix-cache hit rate (share of prompt blocks served from cache)");
    println!(
        "{:<14} {:>9} {:>16}",
        "routing", "hit rate", "vs round-robin"
    );
    for (name, t) in [
        ("kvmesh", &tally),
        ("round-robin", &rr),
        ("random", &random),
    ] {
        println!(
            "{:<14} {:>8.1}% {:>15.2}x",
            name,
            100.0 * t.rate(),
            t.rate() / rr.rate().max(1e-12)
        );
    }
    Ok(())
}
