//! Ingestion over real ZMQ sockets: a publisher speaking vLLM's protocol (PUB + replay ROUTER)
//! and the ingestor, with late joins, lost batches, engine restarts and orphans.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvindex::ingest::{EngineEndpoint, IngestConfig, Ingestor, StreamStatus};
use kvindex::publish::{EventPublisher, PublisherConfig};
use kvindex::{
    BlockStored, EngineHash, EventBatch, Index, KvEvent, Medium, Namespace, Query, QueryBlocks,
};

fn stored(hashes: &[u64], parent: Option<u64>, first_token: u32) -> EventBatch {
    let n = hashes.len() as u32;
    EventBatch {
        ts: 1.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
            parent_block_hash: parent.map(EngineHash),
            token_ids: (first_token..first_token + 16 * n).collect(),
            block_size: 16,
            medium: Some(Medium::Gpu),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    }
}

fn publisher(ctx: &zmq::Context, endpoint: &str, replay: &str) -> EventPublisher {
    // ZMQ closes listeners asynchronously: a restarted publisher may need a moment to rebind.
    let t = Instant::now();
    loop {
        let cfg = PublisherConfig {
            replay_endpoint: Some(replay.into()),
            topic: "kv@pod@m".into(),
            ..PublisherConfig::new(endpoint)
        };
        match EventPublisher::start(ctx, cfg) {
            Ok(p) => return p,
            Err(e) if t.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("publisher cannot bind {endpoint}: {e}"),
        }
    }
}

fn matched(index: &Index, tokens: &[u32]) -> u32 {
    let ns = Namespace::model("m");
    let q = Query {
        namespace: &ns,
        blocks: QueryBlocks::Tokens { tokens, mm: &[] },
        engines: None,
    };
    index.query(&q).first().map_or(0, |m| m.matched_blocks)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(ing: &Ingestor) -> StreamStatus {
    ing.status().into_iter().next().expect("one stream")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An ingestor feeding `index`, subscribed to one engine `pod` at `endpoint`, given a moment to
/// connect (a ZMQ SUB socket sees nothing until it has joined: the slow-joiner effect).
fn subscribe(
    index: &Index,
    pod: &str,
    endpoint: &str,
    replay: Option<&str>,
    topic: &str,
) -> Ingestor {
    let ing = Ingestor::new(Arc::new(index.clone()), IngestConfig::default());
    ing.add(EngineEndpoint {
        pod: pod.into(),
        model: "m".into(),
        dp_rank: 0,
        endpoint: endpoint.into(),
        replay_endpoint: replay.map(str::to_owned),
        topic: topic.into(),
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    ing
}

#[test]
fn late_join_gap_restart_and_orphan() {
    let ctx = zmq::Context::new();
    let (p1, p2) = (free_port(), free_port());
    let ep = format!("tcp://127.0.0.1:{p1}");
    let rep = format!("tcp://127.0.0.1:{p2}");
    let publ = publisher(&ctx, &ep, &rep);
    // Batches published before anyone subscribed: only a replay can deliver them.
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    publ.publish(&stored(&[3], Some(2), 32)).unwrap();

    let index = Index::default();
    let ing = subscribe(&index, "pod", &ep, Some(&rep), "kv@pod");
    let all: Vec<u32> = (0..96).collect();
    publ.publish(&stored(&[4], Some(3), 48)).unwrap();
    wait_for("late join replay", || matched(&index, &all) == 4);
    let s = status(&ing);
    assert_eq!(
        (s.last_seq, s.replayed_batches, s.lost_batches),
        (Some(2), 2, 0)
    );

    // A batch lost on the wire: the next one reveals the gap and the replay fills it.
    publ.publish_lost(&stored(&[5], Some(4), 64)).unwrap();
    publ.publish(&stored(&[6], Some(5), 80)).unwrap();
    wait_for("gap replay", || matched(&index, &all) == 6);
    let s = status(&ing);
    assert_eq!((s.gaps, s.lost_batches), (1, 0));

    // The engine goes away: as soon as the connection drops, its blocks are cleared.
    drop(publ);
    wait_for("disconnect clears the engine", || {
        matched(&index, &all) == 0
    });
    assert_eq!(status(&ing).disconnects, 1);
    // It comes back: its sequence starts again at 0; that is a restart.
    let publ = publisher(&ctx, &ep, &rep);
    std::thread::sleep(Duration::from_millis(300));
    publ.publish(&stored(&[100], None, 0)).unwrap();
    wait_for("restart", || status(&ing).restarts == 1);
    wait_for("restart applied", || matched(&index, &all) == 1);
    assert_eq!(status(&ing).last_seq, Some(0));

    assert_eq!(index.stats().orphans_unrecovered, 0);
    ing.remove("pod").unwrap();
    assert!(index.engines().is_empty());
}

#[test]
fn orphans_without_replay_are_counted() {
    let ctx = zmq::Context::new();
    let ep = format!("tcp://127.0.0.1:{}", free_port());
    let publ = EventPublisher::start(&ctx, PublisherConfig::new(ep.clone())).unwrap();
    let index = Index::default();
    let ing = subscribe(&index, "p", &ep, None, "");
    publ.publish(&stored(&[1], None, 0)).unwrap();
    publ.publish(&stored(&[3], Some(2), 32)).unwrap();
    wait_for("orphan counted", || status(&ing).orphans_unrecovered == 1);
    assert_eq!(index.stats().orphans_unrecovered, 1);
    assert_eq!(matched(&index, &(0..16).collect::<Vec<_>>()), 1);
}

#[test]
fn orphan_recovered_from_replay_buffer() {
    // A small index evicts old blocks (and then their aliases); a new branch off an evicted
    // block is an orphan whose ancestry the ingestor rebuilds from the engine's replay buffer.
    let ctx = zmq::Context::new();
    let ep = format!("tcp://127.0.0.1:{}", free_port());
    let rep = format!("tcp://127.0.0.1:{}", free_port());
    let publ = publisher(&ctx, &ep, &rep);
    let cfg = kvindex::IndexConfig {
        byte_budget: 32 * 1024,
        initial_slots: 64,
        ..Default::default()
    };
    let index = Index::new(cfg);
    let ing = subscribe(&index, "pod", &ep, Some(&rep), "");
    let n = 3000u64;
    publ.publish(&stored(&[10], None, 0)).unwrap();
    for i in 1..n {
        publ.publish(&stored(&[10 + i], Some(9 + i), 16 * i as u32))
            .unwrap();
    }
    wait_for("chain applied", || status(&ing).last_seq == Some(n - 1));
    assert!(index.stats().evicted_blocks > 0);
    assert!(
        index.resolve(EngineHash(15)).is_none(),
        "the early block's alias was collected"
    );
    // Branch off block 5 (hash 15): tokens of blocks 0..=5, then a new block.
    publ.publish(&stored(&[99_999], Some(15), 50_000)).unwrap();
    wait_for("orphan handled", || status(&ing).orphans == 1);
    let s = status(&ing);
    assert_eq!((s.orphans_recovered, s.orphans_unrecovered), (1, 0));
    let mut branch: Vec<u32> = (0..16 * 6).collect();
    branch.extend(50_000..50_016);
    assert_eq!(matched(&index, &branch), 7);
}

#[test]
fn data_parallel_ranks_are_separate_engines() {
    let ctx = zmq::Context::new();
    let ep = format!("tcp://127.0.0.1:{}", free_port());
    let publ = EventPublisher::start(&ctx, PublisherConfig::new(ep.clone())).unwrap();
    let index = Index::default();
    let ing = subscribe(&index, "pod", &ep, None, "");
    publ.publish(&stored(&[1], None, 0)).unwrap();
    let mut rank1 = stored(&[2, 3], None, 0);
    rank1.data_parallel_rank = Some(1);
    publ.publish(&rank1).unwrap();
    wait_for("both ranks", || index.engines().len() == 2);
    let ns = Namespace::model("m");
    let toks: Vec<u32> = (0..32).collect();
    wait_for("rank 1 applied", || {
        let q = Query {
            namespace: &ns,
            blocks: QueryBlocks::Tokens {
                tokens: &toks,
                mm: &[],
            },
            engines: None,
        };
        index.query(&q).len() == 2
    });
    let q = Query {
        namespace: &ns,
        blocks: QueryBlocks::Tokens {
            tokens: &toks,
            mm: &[],
        },
        engines: None,
    };
    let got: Vec<(String, u32)> = index
        .query(&q)
        .iter()
        .map(|m| (m.name.to_string(), m.matched_blocks))
        .collect();
    assert_eq!(
        got,
        vec![("pod#dp1".to_string(), 2), ("pod".to_string(), 1)]
    );
    // Removing the endpoint removes every rank that came through it.
    ing.remove("pod").unwrap();
    assert!(index.engines().is_empty());
}
