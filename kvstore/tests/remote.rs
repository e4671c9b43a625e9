//! Remote tiers against real servers: a `redis-server` started here, and peer kvstore nodes over
//! TCP. Bad values, dead servers and silent servers must fail closed, within the timeout.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{content, Redis};
use kvstore::{
    BlockKey, HostConfig, PeerConfig, PeerServer, PeerTier, RedisConfig, RedisTier, RemoteConfig,
    RemoteTier, StoreConfig, StoreError, TierKind, TieredStore,
};

const BB: usize = 32 << 10;

fn fast(mut r: RemoteConfig) -> RemoteConfig {
    r.timeout = Duration::from_millis(300);
    r.retries = 1;
    r
}

fn raw_redis(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

#[test]
fn redis_round_trip_and_bad_values_fail_closed() {
    let srv = Redis::start();
    let mut cfg = RedisConfig::new(srv.url(), BB);
    cfg.remote = fast(cfg.remote);
    let r = RedisTier::new(cfg).unwrap();
    let (a, b) = (BlockKey(0xA1), BlockKey(0xB2));
    r.put(a, &content(a, BB)).unwrap();
    r.put(b, &content(b, BB)).unwrap();
    assert_eq!(&r.get(a).unwrap().unwrap()[..], &content(a, BB)[..]);
    assert!(r.contains(b).unwrap());
    assert!(r.get(BlockKey(0xC3)).unwrap().is_none());
    assert!(matches!(r.put(a, &[1, 2, 3]), Err(StoreError::Invalid(_))));

    let mut raw = raw_redis(&srv.url());
    let ka = format!("kvmesh:blk:{:016x}", a.0);
    let kb = format!("kvmesh:blk:{:016x}", b.0);
    let good_a: Vec<u8> = redis::cmd("GET").arg(&ka).query(&mut raw).unwrap();
    // b's value under a's key: the key in the header does not match.
    let _: () = redis::cmd("SET")
        .arg(&kb)
        .arg(&good_a)
        .query(&mut raw)
        .unwrap();
    assert!(matches!(r.get(b), Err(StoreError::Corrupt { .. })));
    assert!(!r.contains(b).unwrap(), "a bad value is deleted");
    // A flipped payload byte, a truncated value, garbage.
    let mut flipped = good_a.clone();
    flipped[100] ^= 1;
    for bad in [
        flipped,
        good_a[..good_a.len() - 1].to_vec(),
        b"garbage".to_vec(),
    ] {
        let _: () = redis::cmd("SET")
            .arg(&ka)
            .arg(&bad)
            .query(&mut raw)
            .unwrap();
        match r.get(a) {
            Err(StoreError::Corrupt { .. }) => {}
            other => panic!(
                "bad value not refused: {:?}",
                other.map(|o| o.map(|b| b.len()))
            ),
        }
    }
    let s = r.stats();
    assert_eq!(s.corrupt, 4);
    assert!(s.hits >= 1 && s.stores == 2);
}

#[test]
fn dead_redis_fails_within_the_timeout() {
    let mut srv = Redis::start();
    let mut cfg = RedisConfig::new(srv.url(), BB);
    cfg.remote = fast(cfg.remote);
    let r = RedisTier::new(cfg).unwrap();
    let k = BlockKey(77);
    r.put(k, &content(k, BB)).unwrap();
    srv.kill();
    let t0 = Instant::now();
    let e = r.get(k).unwrap_err();
    assert!(
        matches!(e, StoreError::Remote { .. } | StoreError::Timeout { .. }),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert!(r.put(k, &content(k, BB)).is_err());
    assert!(r.stats().errors >= 2);
}

fn node(host_blocks: usize) -> TieredStore {
    TieredStore::new(StoreConfig::new(HostConfig::new(
        (host_blocks * BB) as u64,
        BB,
    )))
    .unwrap()
}

#[test]
fn peer_node_serves_puts_gets_and_refuses_bad_requests() {
    let a = node(64);
    let srv = PeerServer::start(Arc::new(a.clone()), "127.0.0.1:0").unwrap();
    let p = PeerTier::new(PeerConfig {
        addr: srv.addr().to_string(),
        remote: fast(RemoteConfig::new(BB)),
    });
    let k = BlockKey(0x1234);
    p.put(k, &content(k, BB)).unwrap();
    assert!(a.host().contains(k));
    assert!(p.contains(k).unwrap());
    assert_eq!(&p.get(k).unwrap().unwrap()[..], &content(k, BB)[..]);
    assert!(p.get(BlockKey(99)).unwrap().is_none());
    assert!(!p.contains(BlockKey(99)).unwrap());
    assert!(matches!(p.put(k, &[0u8; 10]), Err(StoreError::Invalid(_))));

    // Garbage and oversized requests: an error answer, the connection closed, the node fine.
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(&[0xFFu8; 28]).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert_eq!(resp.first(), Some(&2u8), "error status for garbage");
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&0x4b56_5031u32.to_le_bytes());
    h[4] = 2; // PUT
    h[16..20].copy_from_slice(&(1u32 << 30).to_le_bytes());
    s.write_all(&h).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert_eq!(
        resp.first(),
        Some(&2u8),
        "error status for an oversized PUT"
    );
    assert_eq!(&p.get(k).unwrap().unwrap()[..], &content(k, BB)[..]);

    // Dead peer: fails closed, quickly.
    let addr = srv.addr();
    drop(srv);
    let p2 = PeerTier::new(PeerConfig {
        addr: addr.to_string(),
        remote: fast(RemoteConfig::new(BB)),
    });
    let t0 = Instant::now();
    assert!(p2.get(k).is_err());
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn silent_peer_times_out() {
    // Accepts connections and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hold = std::thread::spawn(move || {
        let mut conns = Vec::new();
        l.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok((c, _)) = l.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let p = PeerTier::new(PeerConfig {
        addr: addr.to_string(),
        remote: fast(RemoteConfig::new(BB)),
    });
    let t0 = Instant::now();
    match p.get(BlockKey(5)) {
        Err(StoreError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {:?}", other.map(|o| o.is_some())),
    }
    let el = t0.elapsed();
    assert!(
        el >= Duration::from_millis(550) && el < Duration::from_secs(3),
        "{el:?}"
    );
    drop(hold);
}

#[test]
fn stores_share_blocks_through_redis_and_peers() {
    let srv = Redis::start();
    let mk_redis = || {
        let mut c = RedisConfig::new(srv.url(), BB);
        c.remote = fast(c.remote);
        Arc::new(RedisTier::new(c).unwrap()) as Arc<dyn RemoteTier>
    };
    // Store A writes behind to Redis.
    let mut ca = StoreConfig::new(HostConfig::new((16 * BB) as u64, BB));
    ca.remotes = vec![mk_redis()];
    let a = TieredStore::new(ca).unwrap();
    let keys: Vec<BlockKey> = (10..20).map(BlockKey).collect();
    for &k in &keys {
        a.put(k, &content(k, BB), None).unwrap();
    }
    a.flush();
    assert_eq!(a.stats().pipeline.written, 10);
    // Store B (empty) finds them in Redis and promotes them.
    let mut cb = StoreConfig::new(HostConfig::new((16 * BB) as u64, BB));
    cb.remotes = vec![mk_redis()];
    let b = TieredStore::new(cb).unwrap();
    assert_eq!(b.lookup(&keys, false).blocks(), 0);
    assert_eq!(b.lookup(&keys, true).on(TierKind::Remote(0)), 10);
    let (got, tier) = b.get_from(keys[3]).unwrap().unwrap();
    assert_eq!(tier, TierKind::Remote(0));
    assert_eq!(&got[..], &content(keys[3], BB)[..]);
    assert_eq!(b.get_from(keys[3]).unwrap().unwrap().1, TierKind::Host);

    // Store C reaches A as a peer.
    let srv_a = PeerServer::start(Arc::new(a.clone()), "127.0.0.1:0").unwrap();
    let mut cc = StoreConfig::new(HostConfig::new((16 * BB) as u64, BB));
    cc.remotes = vec![Arc::new(PeerTier::new(PeerConfig {
        addr: srv_a.addr().to_string(),
        remote: fast(RemoteConfig::new(BB)),
    }))];
    let c = TieredStore::new(cc).unwrap();
    let (got, tier) = c.get_from(keys[7]).unwrap().unwrap();
    assert_eq!(tier, TierKind::Remote(0));
    assert_eq!(&got[..], &content(keys[7], BB)[..]);
    assert!(c.get(BlockKey(12345)).unwrap().is_none());
}
