//! Disk tier I/O paths for large blocks: native AIO (parts submitted together, checksummed as
//! they arrive or while they are written) and the `pread`/`pwrite` path taken when native AIO is
//! switched off or refused, or when a part comes back short. Both must store and return the same
//! bytes, verify every checksum, and never return a block they could not read in full.
//!
//! Everything runs on a real disk file system with O_DIRECT required; nothing is mocked. The
//! tests take one lock so that the count of native AIO contexts of the system
//! (`/proc/sys/fs/aio-nr`) shows which path a read took.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{content, Scratch};
use kvstore::disk::{data_file_name, AlignedBuf};
use kvstore::{BlockKey, DirectIo, DiskConfig, DiskTier, StoreError};
use parking_lot::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn cfg(dir: &Path, block: usize, slots: usize, aio: bool) -> DiskConfig {
    let mut c = DiskConfig::new(dir, (slots * block) as u64, block);
    c.direct = DirectIo::Require;
    c.native_aio = aio;
    c.stripes = 1;
    c.staging = false;
    c
}

/// As [`cfg`], with the tier's huge-page staging buffers on.
fn staged(dir: &Path, block: usize, slots: usize, aio: bool) -> DiskConfig {
    DiskConfig {
        staging: true,
        ..cfg(dir, block, slots, aio)
    }
}

/// Whether this system has transparent huge pages (what staging needs).
fn thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

fn aio_contexts() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/aio-nr")
        .expect("/proc/sys/fs/aio-nr")
        .trim()
        .parse()
        .unwrap()
}

/// Reads `key` on a fresh thread (whose native AIO context, if it makes one, is new) and says
/// whether the system's count of AIO contexts grew while that thread was alive.
fn read_on_new_thread(t: &DiskTier, key: BlockKey, dst: &mut [u8]) -> (bool, bool) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let before = aio_contexts();
            let hit = t.get_into(key, dst).expect("read");
            (hit, aio_contexts() > before)
        })
        .join()
        .unwrap()
    })
}

const SIZES: [usize; 3] = [128 << 10, 256 << 10, 2 << 20];

#[test]
fn aio_and_pread_paths_store_and_return_the_same_bytes() {
    let _g = SERIAL.lock();
    for bb in SIZES {
        let d = Scratch::new("aio-same");
        let keys_a: Vec<BlockKey> = (2..8).map(BlockKey).collect();
        let keys_b: Vec<BlockKey> = (100..106).map(BlockKey).collect();
        // Written through native AIO: from a page-aligned buffer and from an unaligned Vec
        // (through the tier's bounce buffer).
        {
            let t = DiskTier::open(&cfg(d.path(), bb, 16, true)).unwrap();
            assert!(t.direct_io());
            let mut al = AlignedBuf::zeroed(bb);
            for (i, &k) in keys_a.iter().enumerate() {
                if i % 2 == 0 {
                    al.copy_from_slice(&content(k, bb));
                    t.put(k, &al).unwrap();
                } else {
                    t.put(k, &content(k, bb)).unwrap();
                }
            }
            let mut dst = AlignedBuf::zeroed(bb);
            let (hit, made_ctx) = read_on_new_thread(&t, keys_a[0], &mut dst);
            assert!(
                hit && made_ctx,
                "{bb}: a native AIO read made no AIO context"
            );
            assert!(dst[..] == content(keys_a[0], bb)[..]);
        }
        // Read with pread, and more written with pwrite.
        {
            let t = DiskTier::open(&cfg(d.path(), bb, 16, false)).unwrap();
            assert_eq!(t.recovery().blocks, keys_a.len());
            let mut dst = AlignedBuf::zeroed(bb);
            for &k in &keys_a {
                let (hit, made_ctx) = read_on_new_thread(&t, k, &mut dst);
                assert!(hit);
                assert!(!made_ctx, "{bb}: native_aio = false still used native AIO");
                assert!(dst[..] == content(k, bb)[..], "{bb}: {k:?} differs");
                // Unaligned destination: through a bounce buffer.
                let mut v = vec![0u8; bb + 1];
                assert!(t.get_into(k, &mut v[1..]).unwrap());
                assert!(v[1..] == content(k, bb)[..]);
            }
            for &k in &keys_b {
                t.put(k, &content(k, bb)).unwrap();
            }
            let st = t.stats();
            assert_eq!((st.errors, st.corrupt), (0, 0));
        }
        // Everything read back through native AIO.
        let t = DiskTier::open(&cfg(d.path(), bb, 16, true)).unwrap();
        assert_eq!(t.recovery().blocks, keys_a.len() + keys_b.len());
        for &k in keys_a.iter().chain(&keys_b) {
            assert_eq!(
                &t.get(k).unwrap().expect("held")[..],
                &content(k, bb)[..],
                "{bb}: {k:?} differs"
            );
        }
        let st = t.stats();
        assert_eq!((st.errors, st.corrupt), (0, 0));
    }
}

#[test]
fn both_paths_verify_checksums_in_every_part() {
    let _g = SERIAL.lock();
    let bb = 256 << 10;
    for (aio, stage) in [(true, false), (false, false), (true, true), (false, true)] {
        let conf = |d: &Path| {
            if stage {
                staged(d, bb, 4, aio)
            } else {
                cfg(d, bb, 4, aio)
            }
        };
        let d = Scratch::new("aio-corrupt");
        let keys: Vec<BlockKey> = (2..6).map(BlockKey).collect();
        {
            let t = DiskTier::open(&conf(d.path())).unwrap();
            assert_eq!(t.staging(), stage && thp());
            for &k in &keys {
                t.put(k, &content(k, bb)).unwrap();
            }
        }
        // Slot i (one data file) is at i × bb. One flipped byte in a different quarter (a
        // different part of a chunked read) of each block.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join(data_file_name(0)))
            .unwrap();
        for i in 0..keys.len() {
            let off = (i * bb + i * (bb / 4) + 12345) as u64;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            b[0] ^= 0x40;
            f.write_all_at(&b, off).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let t = DiskTier::open(&conf(d.path())).unwrap();
        assert_eq!(t.recovery().blocks, keys.len());
        let mut dst = vec![0u8; bb];
        for (i, &k) in keys.iter().enumerate() {
            // Half through `get`, half into the caller's memory.
            let r = if i % 2 == 0 {
                t.get(k).map(|_| ())
            } else {
                t.get_into(k, &mut dst).map(|_| ())
            };
            match r {
                Err(StoreError::Corrupt { .. }) => {}
                other => panic!("aio {aio} staging {stage}: corrupt block {k:?} gave {other:?}"),
            }
            assert!(!t.contains(k), "a corrupt block must be dropped");
        }
        assert_eq!(t.stats().corrupt, keys.len() as u64);
    }
}

#[test]
fn a_short_part_is_reread_and_a_block_never_returned_incomplete() {
    let _g = SERIAL.lock();
    let bb = 256 << 10;
    let part = bb / 4;
    for (aio, stage) in [(true, false), (false, false), (true, true), (false, true)] {
        let d = Scratch::new("aio-short");
        let keys: Vec<BlockKey> = (2..6).map(BlockKey).collect();
        let c = if stage {
            staged(d.path(), bb, 4, aio)
        } else {
            cfg(d.path(), bb, 4, aio)
        };
        let t = DiskTier::open(&c).unwrap();
        assert_eq!(t.staging(), stage && thp());
        for &k in &keys {
            t.put(k, &content(k, bb)).unwrap();
        }
        // The last block is the last slot of the file. Cut the file in its third part: with
        // native AIO the first two parts arrive whole, the third comes back short and the
        // fourth empty, and re-reading them with pread finds the end of the file.
        let last = *keys.last().unwrap();
        let path = d.path().join(data_file_name(0));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let cut = (3 * bb + 2 * part + part / 2) as u64;
        f.set_len(cut).unwrap();
        let mut dst = AlignedBuf::zeroed(bb);
        match t.get_into(last, &mut dst) {
            Err(StoreError::Corrupt { .. }) => panic!("aio {aio}: a short read is not corruption"),
            Err(e) => eprintln!("aio {aio}: short block refused: {e}"),
            Ok(hit) => panic!("aio {aio}: a block cut short was returned (hit {hit})"),
        }
        assert_eq!(t.stats().errors, 1);
        // An I/O error does not drop the block: with the file whole again it reads back.
        assert!(t.contains(last));
        f.set_len((4 * bb) as u64).unwrap();
        f.write_all_at(&content(last, bb)[cut as usize - 3 * bb..], cut)
            .unwrap();
        f.sync_all().unwrap();
        for &k in &keys {
            assert!(t.get_into(k, &mut dst).unwrap(), "aio {aio}: {k:?} lost");
            assert!(dst[..] == content(k, bb)[..], "aio {aio}: {k:?} differs");
        }
        assert_eq!(t.stats().corrupt, 0);
    }
}

#[test]
fn staged_and_direct_io_store_and_return_the_same_bytes() {
    let _g = SERIAL.lock();
    for bb in [64 << 10, 256 << 10, 2 << 20] {
        for aio in [true, false] {
            let d = Scratch::new("staged-same");
            let keys: Vec<BlockKey> = (2..10).map(BlockKey).collect();
            // Written half staged, half straight from the caller's memory.
            {
                let t = DiskTier::open(&staged(d.path(), bb, 16, aio)).unwrap();
                assert_eq!(t.staging(), thp(), "{bb}: staging should follow THP");
                for &k in &keys[..4] {
                    t.put(k, &content(k, bb)).unwrap();
                }
            }
            {
                let t = DiskTier::open(&cfg(d.path(), bb, 16, aio)).unwrap();
                assert!(!t.staging());
                for &k in &keys[4..] {
                    t.put(k, &content(k, bb)).unwrap();
                }
            }
            // Everything read back both ways, through `get` and into aligned and unaligned
            // memory.
            for stage in [true, false] {
                let c = if stage {
                    staged(d.path(), bb, 16, aio)
                } else {
                    cfg(d.path(), bb, 16, aio)
                };
                let t = DiskTier::open(&c).unwrap();
                assert_eq!(t.recovery().blocks, keys.len());
                let mut al = AlignedBuf::zeroed(bb);
                let mut v = vec![0u8; bb + 1];
                for &k in &keys {
                    let want = content(k, bb);
                    assert!(
                        t.get(k).unwrap().expect("held")[..] == want[..],
                        "{bb} {stage}: get {k:?}"
                    );
                    assert!(t.get_into(k, &mut al).unwrap());
                    assert!(al[..] == want[..], "{bb} {stage}: aligned {k:?}");
                    assert!(t.get_into(k, &mut v[1..]).unwrap());
                    assert!(v[1..] == want[..], "{bb} {stage}: unaligned {k:?}");
                }
                let st = t.stats();
                assert_eq!((st.errors, st.corrupt), (0, 0));
            }
        }
    }
}
