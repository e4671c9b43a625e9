//! Disk tier: O_DIRECT verification and fallback, recovery, a property test with restarts,
//! corruption, admission, full disks and read-only directories.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{content, is_root, Scratch, Tmpfs};
use kvstore::{
    Admission, BlockKey, DirectIo, DiskConfig, DiskPut, DiskTier, PolicyKind, StoreError,
};
use proptest::prelude::*;

const BB: usize = 16 << 10;

fn cfg(dir: &Path, slots: usize) -> DiskConfig {
    DiskConfig::new(dir, (slots * BB) as u64, BB)
}

#[test]
fn o_direct_is_verified_on_a_disk_file_system() {
    let d = Scratch::new("direct");
    let mut c = cfg(d.path(), 8);
    c.direct = DirectIo::Require;
    let t = DiskTier::open(&c).unwrap_or_else(|e| {
        panic!(
            "O_DIRECT must work on cargo's target directory ({}): {e}",
            d.path().display()
        )
    });
    assert!(t.direct_io());
    t.put(BlockKey(5), &content(BlockKey(5), BB)).unwrap();
    assert_eq!(
        &t.get(BlockKey(5)).unwrap().unwrap()[..],
        &content(BlockKey(5), BB)[..]
    );
}

#[test]
fn tmpfs_falls_back_explicitly() {
    // tmpfs accepts the O_DIRECT flag but serves misaligned direct reads: the probe sees it.
    let shm = Path::new("/dev/shm");
    let st = std::fs::metadata(shm).expect("/dev/shm is needed for this test");
    assert!(st.is_dir());
    let dir = shm.join(format!("kvstore-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = cfg(&dir, 4);
    c.direct = DirectIo::Require;
    match DiskTier::open(&c) {
        Err(StoreError::DirectIoUnavailable { reason, .. }) => eprintln!("refused: {reason}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("/dev/shm claimed O_DIRECT"),
    }
    c.direct = DirectIo::Prefer;
    let t = DiskTier::open(&c).unwrap();
    assert!(!t.direct_io());
    t.put(BlockKey(3), &content(BlockKey(3), BB)).unwrap();
    assert!(t.get(BlockKey(3)).unwrap().is_some());
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restart_recovers_blocks_and_refuses_other_geometry() {
    let d = Scratch::new("restart");
    {
        let t = DiskTier::open(&cfg(d.path(), 16)).unwrap();
        for k in 2..12 {
            assert!(matches!(
                t.put(BlockKey(k), &content(BlockKey(k), BB)).unwrap(),
                DiskPut::Stored { .. }
            ));
        }
        // Unaligned source buffers go through a bounce buffer.
        let mut v = vec![0u8; BB + 1];
        v[1..].copy_from_slice(&content(BlockKey(40), BB));
        t.put(BlockKey(40), &v[1..]).unwrap();
        assert!(t.remove(BlockKey(11)).unwrap());
        // A second opener of the same directory is refused while the first holds it.
        let e = DiskTier::open(&cfg(d.path(), 16))
            .err()
            .expect("double open");
        assert!(e.to_string().contains("in use"), "{e}");
    }
    let other = DiskTier::open(&cfg(d.path(), 32))
        .err()
        .expect("geometry change");
    assert!(matches!(other, StoreError::Incompatible { .. }), "{other}");
    let t = DiskTier::open(&cfg(d.path(), 16)).unwrap();
    assert_eq!(t.recovery().blocks, 10);
    for k in (2..11).chain([40]) {
        let got = t.get(BlockKey(k)).unwrap().expect("recovered");
        assert!(got[..] == content(BlockKey(k), BB)[..]);
    }
    assert!(t.get(BlockKey(11)).unwrap().is_none());
    let mut dst = vec![0u8; BB];
    assert!(t.get_into(BlockKey(40), &mut dst).unwrap());
    assert_eq!(dst, content(BlockKey(40), BB));
}

#[test]
fn torn_payloads_and_headers_are_detected_never_returned() {
    let d = Scratch::new("torn");
    {
        let t = DiskTier::open(&cfg(d.path(), 8)).unwrap();
        for k in 2..6 {
            t.put(BlockKey(k), &content(BlockKey(k), BB)).unwrap();
        }
    }
    // Slots fill from 0 upwards: key 2 is slot 0, key 3 slot 1, key 4 slot 2, key 5 slot 3;
    // with 8 stripes, slot i is at the start of file i.
    let data_file = |i: usize| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(kvstore::disk::data_file_name(i)))
            .unwrap()
    };
    data_file(0).write_all_at(&[0xAB; 100], 5000).unwrap(); // tear key 2's payload
    let hdr = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("kvstore.hdr"))
        .unwrap();
    hdr.write_all_at(&[0x5A; 20], 4096 + 64 + 10).unwrap(); // garble key 3's header
                                                            // Truncated data file (a block cut short): key 5, slot 3 is cut in half.
    data_file(3).set_len((BB / 2) as u64).unwrap();
    drop(hdr);
    let t = DiskTier::open(&cfg(d.path(), 8)).unwrap();
    assert_eq!(t.recovery().bad_headers, 1);
    assert!(!t.contains(BlockKey(3)));
    match t.get(BlockKey(2)) {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("torn payload returned as {other:?}"),
    }
    assert!(!t.contains(BlockKey(2)), "a corrupt block is dropped");
    assert!(matches!(
        t.get(BlockKey(5)),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(
        &t.get(BlockKey(4)).unwrap().unwrap()[..],
        &content(BlockKey(4), BB)[..]
    );
    assert_eq!(t.stats().corrupt, 2);
    // The slots are reusable.
    t.put(BlockKey(2), &content(BlockKey(2), BB)).unwrap();
    assert_eq!(
        &t.get(BlockKey(2)).unwrap().unwrap()[..],
        &content(BlockKey(2), BB)[..]
    );
    // A header table that is not ours is refused, not overwritten.
    drop(t);
    std::fs::write(d.path().join("kvstore.hdr"), b"garbage").unwrap();
    assert!(matches!(
        DiskTier::open(&cfg(d.path(), 8)),
        Err(StoreError::Incompatible { .. })
    ));
}

#[test]
fn admission_takes_blocks_seen_twice() {
    let d = Scratch::new("admit");
    let mut c = cfg(d.path(), 8);
    c.admission = Admission::SeenTwice { tracked: 1000 };
    let t = DiskTier::open(&c).unwrap();
    let b = content(BlockKey(9), BB);
    assert_eq!(t.put(BlockKey(9), &b).unwrap(), DiskPut::NotAdmitted);
    assert!(!t.contains(BlockKey(9)));
    assert!(t.would_admit(BlockKey(9)));
    assert!(matches!(
        t.put(BlockKey(9), &b).unwrap(),
        DiskPut::Stored { .. }
    ));
    assert_eq!(t.put(BlockKey(9), &b).unwrap(), DiskPut::Present);
    assert!(matches!(
        t.put_admitted(BlockKey(10), &b).unwrap(),
        DiskPut::Stored { .. }
    ));
    assert_eq!(t.stats().rejected, 1);
}

#[derive(Clone, Debug)]
enum Op {
    Put(u64),
    Get(u64),
    Remove(u64),
    Restart,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Puts, gets, removes, evictions and restarts against an LRU model whose order after a
    /// restart is the write order.
    #[test]
    fn disk_matches_model(ops in prop::collection::vec(prop_oneof![
        5 => (2u64..14).prop_map(Op::Put),
        4 => (2u64..14).prop_map(Op::Get),
        1 => (2u64..14).prop_map(Op::Remove),
        1 => Just(Op::Restart),
    ], 1..60)) {
        const SLOTS: usize = 6;
        let d = Scratch::new("prop");
        let mut c = cfg(d.path(), SLOTS);
        c.policy = PolicyKind::Lru;
        c.preallocate = false;
        let mut t = Some(DiskTier::open(&c).unwrap());
        let mut order: Vec<u64> = Vec::new(); // LRU first
        let mut seq: std::collections::HashMap<u64, u64> = Default::default();
        let mut n = 0u64;
        for o in ops {
            let tier = t.as_ref().unwrap();
            match o {
                Op::Put(k) => {
                    let r = tier.put(BlockKey(k), &content(BlockKey(k), BB)).unwrap();
                    if order.contains(&k) {
                        prop_assert_eq!(r, DiskPut::Present);
                    } else {
                        let ev = if order.len() == SLOTS { vec![BlockKey(order.remove(0))] } else { vec![] };
                        prop_assert_eq!(r, DiskPut::Stored { evicted: ev });
                        order.push(k);
                        n += 1;
                        seq.insert(k, n);
                    }
                }
                Op::Get(k) => {
                    let g = tier.get(BlockKey(k)).unwrap();
                    prop_assert_eq!(g.is_some(), order.contains(&k));
                    if let Some(b) = g {
                        prop_assert!(b[..] == content(BlockKey(k), BB)[..]);
                        order.retain(|&x| x != k);
                        order.push(k);
                    }
                }
                Op::Remove(k) => {
                    let had = order.contains(&k);
                    prop_assert_eq!(tier.remove(BlockKey(k)).unwrap(), had);
                    order.retain(|&x| x != k);
                }
                Op::Restart => {
                    drop(t.take());
                    let reopened = DiskTier::open(&c).unwrap();
                    prop_assert_eq!(reopened.recovery().blocks, order.len());
                    prop_assert_eq!(reopened.recovery().bad_headers, 0);
                    t = Some(reopened);
                    order.sort_by_key(|k| seq[k]);
                }
            }
            prop_assert_eq!(t.as_ref().unwrap().len(), order.len());
        }
    }
}

fn fill_until_full(t: &DiskTier) -> (Vec<BlockKey>, StoreError) {
    let mut stored = Vec::new();
    for k in 2..10_000u64 {
        match t.put(BlockKey(k), &content(BlockKey(k), BB)) {
            Ok(DiskPut::Stored { evicted }) => {
                assert!(evicted.is_empty(), "capacity exceeds the file system");
                stored.push(BlockKey(k));
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => return (stored, e),
        }
    }
    panic!("the disk never filled up");
}

fn check_all(t: &DiskTier, keys: &[BlockKey]) {
    for &k in keys {
        let b = t
            .get(k)
            .unwrap_or_else(|e| panic!("{k:?}: {e}"))
            .expect("kept");
        assert!(b[..] == content(k, BB)[..]);
    }
}

/// A full file system: a clear error, nothing stored before is lost, also after a restart.
#[test]
fn full_disk_gives_a_clear_error_and_loses_nothing() {
    if !is_root() {
        return full_disk_with_a_file_size_limit();
    }
    let fs = Tmpfs::mount(256 << 10).expect("a small tmpfs (this test runs as root)");
    let mut c = cfg(fs.path(), 64); // 1 MiB configured on a 256 KiB file system
    c.preallocate = true;
    match DiskTier::open(&c) {
        Err(StoreError::DiskFull { .. }) => {}
        other => panic!(
            "preallocating 1 MiB on 256 KiB must fail as DiskFull: {:?}",
            other.err()
        ),
    }
    for i in 0..8 {
        let _ = std::fs::remove_file(fs.path().join(kvstore::disk::data_file_name(i)));
    }
    c.preallocate = false;
    let t = DiskTier::open(&c).unwrap();
    let (stored, err) = fill_until_full(&t);
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("out of space"), "{err}");
    assert!(stored.len() >= 4, "only {} blocks fit", stored.len());
    check_all(&t, &stored);
    // Still full: a second try fails the same way and breaks nothing.
    assert!(t.put(BlockKey(999_999), &content(BlockKey(9), BB)).is_err());
    assert!(t.stats().errors >= 2);
    drop(t);
    let t = DiskTier::open(&c).unwrap();
    assert_eq!(t.recovery().blocks, stored.len());
    check_all(&t, &stored);
}

fn full_disk_with_a_file_size_limit() {
    // Not root: a child process with RLIMIT_FSIZE plays the full disk.
    if let Ok(dir) = std::env::var("KVSTORE_FSIZE_CHILD") {
        // SAFETY: setting a signal disposition and a resource limit of this process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 256 << 10,
                rlim_max: 256 << 10,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let mut c = cfg(Path::new(&dir), 64);
        c.preallocate = false;
        let t = DiskTier::open(&c).unwrap();
        let (stored, err) = fill_until_full(&t);
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
        check_all(&t, &stored);
        println!("STORED {}", stored.len());
        return;
    }
    let d = Scratch::new("fsize");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "full_disk_gives_a_clear_error_and_loses_nothing",
            "--nocapture",
        ])
        .env("KVSTORE_FSIZE_CHILD", d.path())
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: usize = so
        .lines()
        .find_map(|l| l.strip_prefix("STORED "))
        .expect("child report")
        .trim()
        .parse()
        .unwrap();
    let t = DiskTier::open(&cfg(d.path(), 64)).unwrap();
    assert_eq!(t.recovery().blocks, n);
    check_all(&t, &(2..2 + n as u64).map(BlockKey).collect::<Vec<_>>());
}

/// A read-only directory: the tier opens read-only, every block reads back, writes fail clearly.
#[test]
fn read_only_directory_serves_reads_and_refuses_writes() {
    let keys: Vec<BlockKey> = (2..8).map(BlockKey).collect();
    let write = |dir: &Path| {
        let t = DiskTier::open(&cfg(dir, 16)).unwrap();
        for &k in &keys {
            t.put(k, &content(k, BB)).unwrap();
        }
    };
    let check = |dir: &Path| {
        let t = DiskTier::open(&cfg(dir, 16)).unwrap();
        assert!(t.read_only());
        assert_eq!(t.recovery().blocks, keys.len());
        check_all(&t, &keys);
        let e = t
            .put(BlockKey(100), &content(BlockKey(100), BB))
            .unwrap_err();
        assert!(matches!(e, StoreError::ReadOnly(_)), "{e}");
        assert!(e.to_string().contains("read-only"));
        assert!(t.remove(keys[0]).is_err());
        check_all(&t, &keys);
    };
    if is_root() {
        // Root ignores permission bits: use a file system mounted read-only.
        let fs = Tmpfs::mount(4 << 20).expect("tmpfs (this test runs as root)");
        write(fs.path());
        fs.remount(true);
        check(fs.path());
        fs.remount(false);
    } else {
        use std::os::unix::fs::PermissionsExt;
        let d = Scratch::new("ro");
        write(d.path());
        for f in std::fs::read_dir(d.path()).unwrap() {
            let p = f.unwrap().path();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        check(d.path());
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
