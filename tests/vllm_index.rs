//! End to end with real vLLM: two engines (CPU build, tiny random-weight model) publish KV events
//! over ZMQ; kvindex ingests them in process, and a `kvmesh serve` daemon ingests them too and is
//! asked over HTTP and over gRPC (both must agree). Before each request, the index's predicted prefix hit for the
//! target engine must equal the `cached_tokens` vLLM then reports. One engine has a KV cache small
//! enough to force evictions; the other is killed and restarted half-way.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_vllm, Engine};
use kvindex::ingest::{EngineEndpoint, IngestConfig, Ingestor};
use kvindex::vllm_hash::{VllmHashAlgo, VllmHasher};
use kvindex::{EngineHash, EngineId, Index, Namespace, Query, QueryBlocks};
use kvmesh::client::{GrpcIndexClient, ScoreRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 32;
const MODEL: &str = "tiny";

/// Waits until the ingestor has applied everything the engines published: no new batch for a
/// while.
fn settle(ing: &Ingestor) {
    let total = || {
        ing.status()
            .iter()
            .map(|s| s.batches + s.lost_batches)
            .sum::<u64>()
    };
    let mut last = total();
    let mut stable_since = Instant::now();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = total();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(150) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "events never settled"
        );
    }
}

/// The index's predicted hit for `prompt` on engine `id`: asked by token ids, and asked by vLLM's
/// own block hashes (sha256_cbor, computed here from the tokens); both must agree.
fn predicted(index: &Index, id: EngineId, prompt: &[u32]) -> u64 {
    let ns = Namespace::model(MODEL);
    let ask = |blocks| {
        let q = Query {
            namespace: &ns,
            blocks,
            engines: Some(&[id]),
        };
        index
            .query(&q)
            .first()
            .map_or(0, |m| u64::from(m.matched_blocks))
            * BLOCK as u64
    };
    let by_tokens = ask(QueryBlocks::Tokens {
        tokens: prompt,
        mm: &[],
    });
    // tests/vllm/engine.py runs vLLM with PYTHONHASHSEED=0, which is then vLLM's NONE_HASH seed.
    let hasher = VllmHasher::new(VllmHashAlgo::Sha256Cbor, "0");
    let hashes: Vec<EngineHash> = hasher
        .hash_blocks(prompt, BLOCK)
        .expect("hash")
        .iter()
        .map(|d| d.engine_hash())
        .collect();
    let by_hash = ask(QueryBlocks::VllmHashes(&hashes));
    assert_eq!(
        by_tokens, by_hash,
        "asking by tokens and by vLLM hashes must agree"
    );
    // vLLM always computes the last prompt token, so a full hit stops one block short.
    let cap = ((prompt.len() as u64 - 1) / BLOCK as u64) * BLOCK as u64;
    by_tokens.min(cap)
}

/// `kvmesh serve` as a child process, killed at the end.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon's prediction over HTTP, once it has applied each engine's stream as far as the
/// in-process ingestor (both read the same streams).
fn daemon_prediction(
    base: &str,
    grpc_url: &str,
    ing: &Ingestor,
    engine: &str,
    prompt: &[u32],
) -> u64 {
    let t = Instant::now();
    loop {
        // Read afresh each time: an engine may publish a late batch while we wait, and then both
        // readers move on, so only equality of the two current positions means "caught up".
        let want: std::collections::HashMap<String, Option<u64>> = ing
            .status()
            .into_iter()
            .map(|s| (s.name.clone(), s.last_seq))
            .collect();
        let v: serde_json::Value = ureq::get(&format!("{base}/v1/engines"))
            .call()
            .expect("GET /v1/engines")
            .body_mut()
            .read_json()
            .expect("engines JSON");
        let caught_up = v["engines"].as_array().is_some_and(|list| {
            want.iter().all(|(name, n)| {
                list.iter()
                    .any(|e| e["name"] == name.as_str() && e["last_seq"].as_u64() == *n)
            })
        });
        if caught_up {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the daemon never caught up with the in-process ingestor ({want:?}): {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = serde_json::json!({ "model": MODEL, "token_ids": prompt, "engines": [engine] });
    let v: serde_json::Value = ureq::post(&format!("{base}/v1/score"))
        .send_json(&body)
        .expect("POST /v1/score")
        .body_mut()
        .read_json()
        .expect("score JSON");
    let matched = v["engines"][0]["matched_tokens"].as_u64().unwrap_or(0);
    // The gRPC API answers the same.
    let grpc = GrpcIndexClient::connect(grpc_url, None, None).expect("gRPC connects");
    let mut req = ScoreRequest::tokens(MODEL, prompt.to_vec());
    req.engines = Some(vec![engine.to_owned()]);
    let by_grpc = grpc
        .score(&req)
        .expect("gRPC score")
        .first()
        .map_or(0, |e| u64::from(e.matched_tokens));
    assert_eq!(by_grpc, matched, "gRPC and HTTP disagree on {engine}");
    let cap = ((prompt.len() as u64 - 1) / BLOCK as u64) * BLOCK as u64;
    matched.min(cap)
}

#[test]
fn index_predicts_vllm_prefix_hits() {
    require_vllm();
    // e1: a large cache, killed and restarted half-way. e2: 48 blocks, so it evicts constantly.
    let (mut e1, e2) = std::thread::scope(|s| {
        let a = s.spawn(|| Engine::start("e1", None, Some("0")));
        let b = s.spawn(|| Engine::start("e2", Some(48), Some("1")));
        (a.join().expect("e1 starts"), b.join().expect("e2 starts"))
    });
    let index = Index::default();
    let ing = Ingestor::new(Arc::new(index.clone()), IngestConfig::default());
    let mut ids = Vec::new();
    for e in [&e1, &e2] {
        ids.push(
            ing.add(EngineEndpoint {
                pod: e.name.clone(),
                model: MODEL.into(),
                dp_rank: 0,
                endpoint: e.pub_endpoint.clone(),
                replay_endpoint: Some(e.replay_endpoint.clone()),
                topic: format!("kv@{}@", e.name),
            })
            .expect("subscribe"),
        );
    }
    // The daemon subscribes to the same engines (PUB and replay sockets serve many readers).
    let http = common::free_port();
    let grpc_port = common::free_port();
    let grpc_url = format!("http://127.0.0.1:{grpc_port}");
    let snap = std::env::temp_dir().join(format!("kvmesh-e2e-{}.snap", std::process::id()));
    let _ = std::fs::remove_file(&snap);
    // Removed when the test ends, pass or fail (declared before the daemon, so dropped after it).
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _snap_file = RemoveOnDrop(snap.clone());
    // The engines keep their ports across a restart: the daemon's arguments can be fixed now.
    // e1 is given by its event endpoints; e2 is discovered from its own `GET /kv_event_sources`.
    let engine_args = [
        format!("e1={},replay={}", e1.pub_endpoint, e1.replay_endpoint),
        format!("e2={}", e2.url),
    ];
    let start_daemon = || {
        Daemon(
            std::process::Command::new(env!("CARGO_BIN_EXE_kvmesh"))
                .args([
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{http}"),
                    "--grpc-listen",
                    &format!("127.0.0.1:{grpc_port}"),
                    "--model",
                    MODEL,
                ])
                .args(["--snapshot-interval", "1", "--snapshot"])
                .arg(&snap)
                .args(["--engine", &engine_args[0], "--engine-url", &engine_args[1]])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("kvmesh serve starts"),
        )
    };
    let mut daemon = start_daemon();
    let base = format!("http://127.0.0.1:{http}");
    let t = Instant::now();
    while ureq::get(&format!("{base}/healthz")).call().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "kvmesh serve did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    // Prompts share prefixes: a few documents, cut at random lengths, plus a random tail.
    let mut rng = StdRng::seed_from_u64(7);
    let docs: Vec<Vec<u32>> = (0..8)
        .map(|_| (0..700).map(|_| rng.random_range(5..4000)).collect())
        .collect();
    let requests = 300;
    let (mut mismatches, mut hits, mut checked) = (Vec::new(), 0u64, 0);
    for i in 0..requests {
        if i == requests / 2 {
            e1.restart();
            std::thread::sleep(Duration::from_millis(500));
        }
        if i == requests * 3 / 4 {
            // The daemon dies without warning and comes back from its last snapshot.
            std::thread::sleep(Duration::from_millis(1500));
            drop(daemon);
            daemon = start_daemon();
            let t = Instant::now();
            while ureq::get(&format!("{base}/healthz")).call().is_err() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "kvmesh serve did not come back"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let target = rng.random_range(0..2usize);
        let doc = &docs[rng.random_range(0..docs.len())];
        let cut = rng.random_range(40..doc.len());
        let mut prompt: Vec<u32> = doc[..cut].to_vec();
        let tail = rng.random_range(1..60);
        prompt.extend((0..tail).map(|_| rng.random_range(5..4000u32)));
        settle(&ing);
        let engine = if target == 0 { &e1 } else { &e2 };
        let mut want = predicted(&index, ids[target], &prompt);
        let mut by_daemon = daemon_prediction(&base, &grpc_url, &ing, &engine.name, &prompt);
        // The two indexes read the same stream: when they disagree, one of them has not seen a
        // late batch yet (vLLM publishes from a background thread; under load a batch can come
        // after the quiet window). Let both catch up before asking vLLM.
        for _ in 0..5 {
            if want == by_daemon {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            settle(&ing);
            want = predicted(&index, ids[target], &prompt);
            by_daemon = daemon_prediction(&base, &grpc_url, &ing, &engine.name, &prompt);
        }
        let resp = engine.complete(&prompt);
        let got = Engine::cached_tokens(&resp);
        checked += 1;
        hits += got;
        if want != got || by_daemon != got {
            mismatches.push(format!(
                "request {i} to {}: {} tokens, index predicted {want}, daemon {by_daemon}, vLLM cached {got}",
                engine.name,
                prompt.len()
            ));
        }
    }
    settle(&ing);
    let status = ing.status();
    let s1 = status.iter().find(|s| s.name == "e1").expect("e1 status");
    let s2 = status.iter().find(|s| s.name == "e2").expect("e2 status");
    let stats = index.stats();
    eprintln!("checked {checked} requests, {hits} cached tokens in all; index {stats:?}; e1 {s1:?}; e2 {s2:?}");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(checked >= 200);
    assert!(hits > 0, "the workload must produce prefix hits");
    assert!(stats.blocks_removed > 0, "the small engine must evict");
    assert_eq!(s1.restarts, 1, "the restart of e1 must be detected");
    assert_eq!(s1.lost_batches + s2.lost_batches, 0);
    drop(e2);
}
