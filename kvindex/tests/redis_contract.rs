//! The backend contract, run against the memory index and the Redis index, and the Redis index's
//! sharing between replicas. The Redis tests start their own `redis-server` and fail (never skip)
//! if it cannot be started.

mod common;

use kvindex::Index;

#[test]
fn memory_backend_meets_the_contract() {
    common::contract_suite(&|| Box::new(Index::default()));
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kvindex::{
        EngineHash, IndexBackend, IndexConfig, IndexError, KvEvent, Medium, Namespace, QueryBlocks,
        RedisIndex,
    };

    use super::common::{self, batch, by_tokens, query, removed, spec, stored, summary, toks};

    fn connect(url: &str, prefix: &str) -> RedisIndex {
        RedisIndex::connect(url, prefix, IndexConfig::default()).expect("connect to redis")
    }

    #[test]
    fn redis_backend_meets_the_contract() {
        let server = common::RedisServer::start();
        let url = server.url();
        let n = AtomicUsize::new(0);
        common::contract_suite(&|| {
            let prefix = format!("contract{}", n.fetch_add(1, Ordering::Relaxed));
            Box::new(connect(&url, &prefix)) as Box<dyn IndexBackend>
        });
    }

    #[test]
    fn applied_sequence_numbers_are_shared_and_forgotten_with_the_engine() {
        let server = common::RedisServer::start();
        let (r1, r2) = (connect(&server.url(), "seq"), connect(&server.url(), "seq"));
        let a = r1.add_engine(spec("a")).unwrap();
        assert_eq!(r1.applied_seq(a), None);
        r1.apply_at(a, 7, &batch(vec![stored(&[1], None, toks(0, 16), 16)]))
            .unwrap();
        r1.apply_at(a, 8, &batch(vec![stored(&[2], Some(1), toks(16, 32), 16)]))
            .unwrap();
        // Another replica (an ingester taking over after a restart) resumes after batch 8.
        assert_eq!(r2.applied_seq(a), Some(8));
        assert_eq!(
            by_tokens(&r2, &Namespace::model("m"), &toks(0, 32))[0].matched_blocks,
            2
        );
        r2.remove_engine(a).unwrap();
        let a = r1.add_engine(spec("a")).unwrap();
        assert_eq!(r1.applied_seq(a), None, "a new registration starts afresh");
    }

    #[test]
    fn prefixes_are_separate_indexes() {
        let server = common::RedisServer::start();
        let (x, y) = (connect(&server.url(), "x"), connect(&server.url(), "y"));
        let a = x.add_engine(spec("a")).unwrap();
        let t = toks(0, 16);
        x.apply(a, &batch(vec![stored(&[1], None, t.clone(), 16)]))
            .unwrap();
        let ns = Namespace::model("m");
        assert_eq!(by_tokens(&x, &ns, &t).len(), 1);
        assert!(by_tokens(&y, &ns, &t).is_empty());
        assert!(y.engines().unwrap().is_empty());
    }

    #[test]
    fn replicas_share_engines_and_writes() {
        let server = common::RedisServer::start();
        let (r1, r2) = (
            connect(&server.url(), "shared"),
            connect(&server.url(), "shared"),
        );
        let ns = Namespace::model("m");
        let t = toks(0, 48);
        // Both replicas get the same id for the same engine, whoever registers it first.
        let a1 = r1.add_engine(spec("a")).unwrap();
        let a2 = r2.add_engine(spec("a")).unwrap();
        assert_eq!(a1, a2);
        let b2 = r2.add_engine(spec("b")).unwrap();
        assert_eq!(r1.add_engine(spec("b")).unwrap(), b2);
        // Writes through one replica are seen by the other, including engines it never saw
        // register and block sizes it never saw learned.
        r1.apply(a1, &batch(vec![stored(&[1, 2, 3], None, t.clone(), 16)]))
            .unwrap();
        let c2 = r2.add_engine(spec("c")).unwrap();
        r2.apply(c2, &batch(vec![stored(&[1], None, t[..16].to_vec(), 16)]))
            .unwrap();
        let want = [("a".to_string(), 3), ("c".to_string(), 1)];
        assert_eq!(summary(&by_tokens(&r1, &ns, &t)), want);
        assert_eq!(summary(&by_tokens(&r2, &ns, &t)), want);
        // The engine hash aliases are shared: r2 removes and continues a's chain.
        let rep = r2.apply(a1, &batch(vec![removed(3, Medium::Gpu)])).unwrap();
        assert_eq!(rep.blocks_removed, 1);
        let rep = r2
            .apply(a1, &batch(vec![stored(&[4], Some(2), toks(100, 116), 16)]))
            .unwrap();
        assert_eq!((rep.blocks_stored, rep.orphans.len()), (1, 0));
        let hashes = [1, 2, 4].map(EngineHash);
        let r = query(&r1, &ns, QueryBlocks::VllmHashes(&hashes), None);
        assert_eq!(summary(&r), [("a".to_string(), 3), ("c".to_string(), 1)]);
        // Reference counts are shared: an announcement through each replica needs two removals.
        r1.apply(c2, &batch(vec![stored(&[1], None, t[..16].to_vec(), 16)]))
            .unwrap();
        r2.apply(c2, &batch(vec![removed(1, Medium::Gpu)])).unwrap();
        assert_eq!(by_tokens(&r1, &ns, &t).len(), 2);
        r1.apply(c2, &batch(vec![KvEvent::BlockRemoved(Default::default())]))
            .unwrap();
        r1.apply(c2, &batch(vec![removed(1, Medium::Gpu)])).unwrap();
        assert_eq!(summary(&by_tokens(&r2, &ns, &t)), [("a".to_string(), 2)]);
        // An engine removed through one replica is gone for the other.
        r2.remove_engine(a1).unwrap();
        assert!(by_tokens(&r1, &ns, &t).is_empty());
        let r = r1.apply(a1, &batch(vec![stored(&[1], None, t[..16].to_vec(), 16)]));
        assert!(matches!(r, Err(IndexError::UnknownEngine(_))), "{r:?}");
        assert!(matches!(
            r1.clear_engine(a1),
            Err(IndexError::UnknownEngine(_))
        ));
        let names: Vec<String> = r1
            .engines()
            .unwrap()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names, ["b", "c"]);
        // Registering it again gives a fresh engine, with nothing held.
        let a3 = r1.add_engine(spec("a")).unwrap();
        assert_ne!(a3, a1);
        assert_eq!(r2.add_engine(spec("a")).unwrap(), a3);
        assert!(by_tokens(&r2, &ns, &t).is_empty());
    }

    #[test]
    fn unreachable_redis_is_an_error() {
        // Port 1 on loopback refuses connections.
        match RedisIndex::connect("redis://127.0.0.1:1/", "p", IndexConfig::default()) {
            Err(IndexError::Redis(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected to a closed port"),
        }
        assert!(matches!(
            RedisIndex::connect("not a url", "p", IndexConfig::default()),
            Err(IndexError::Redis(_))
        ));
    }
}
