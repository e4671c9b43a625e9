//! Crash safety of the disk tier: a child process writes blocks from several threads (with
//! evictions, so slots are overwritten) and is killed with SIGKILL at a random moment; the
//! parent reopens the tier and reads every recovered block back. Any torn or corrupt block
//! returned, or any block with the wrong contents, fails the test. Rounds alternate between
//! 64 KiB blocks (one `pwrite` each) and 512 KiB blocks (written as parts with native AIO).
//!
//! `KVSTORE_CRASH_ITERS` sets the number of kills (100 by default; `kvstore/scripts/crash-long.sh`
//! runs thousands).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{content, Scratch};
use kvstore::{BlockKey, DiskConfig, DiskTier, StoreError};
use rand::Rng;

const BB: usize = 64 << 10;
const BB_LARGE: usize = 512 << 10;
const SLOTS: usize = 48;

fn cfg(dir: &Path, bb: usize) -> DiskConfig {
    let mut c = DiskConfig::new(dir, (SLOTS * bb) as u64, bb);
    c.preallocate = true;
    c
}

fn child(dir: &str, bb: usize) {
    let t = DiskTier::open(&cfg(Path::new(dir), bb)).expect("child open");
    println!("KVSTORE-CHILD-READY");
    let seed: u64 = rand::rng().random();
    std::thread::scope(|s| {
        for th in 0..3u64 {
            let t = t.clone();
            s.spawn(move || {
                let mut i = 0u64;
                loop {
                    // Keys from a range larger than the tier: constant eviction and slot reuse.
                    let k = BlockKey(2 + (seed.wrapping_add(i * 31 + th * 7)) % 400);
                    match t.put(k, &content(k, bb)) {
                        Ok(_) | Err(StoreError::AllPinned { .. }) => {}
                        Err(e) => panic!("child write failed: {e}"),
                    }
                    if i.is_multiple_of(5) {
                        let _ = t.get(k);
                    }
                    i += 1;
                }
            });
        }
    });
}

#[test]
fn kill_9_during_writes_never_yields_a_torn_block() {
    if let Ok(dir) = std::env::var("KVSTORE_CRASH_CHILD") {
        let bb = std::env::var("KVSTORE_CRASH_BLOCK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(BB);
        child(&dir, bb);
        return;
    }
    let iters: usize = std::env::var("KVSTORE_CRASH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dirs = [Scratch::new("crash"), Scratch::new("crash-large")];
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let (mut total, mut max_seen, mut bad_headers) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for it in 0..iters {
        let (d, bb) = if it % 2 == 0 {
            (&dirs[0], BB)
        } else {
            (&dirs[1], BB_LARGE)
        };
        let mut ch = Command::new(&exe)
            .args([
                "--exact",
                "kill_9_during_writes_never_yields_a_torn_block",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVSTORE_CRASH_CHILD", d.path())
            .env("KVSTORE_CRASH_BLOCK", bb.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let out = ch.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            loop {
                line.clear();
                match out.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.contains("KVSTORE-CHILD-READY") => {
                        let _ = tx.send(());
                    }
                    Ok(_) => {}
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = ch.kill();
            let _ = ch.wait();
            panic!("iteration {it}: the child never became ready");
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(1_000..40_000)));
        // SIGKILL: no destructor, no flush, mid-write.
        ch.kill().unwrap();
        let st = ch.wait().unwrap();
        assert!(!st.success(), "the child must have been killed");

        let t = DiskTier::open(&cfg(d.path(), bb)).expect("reopen after kill -9");
        let rec = t.recovery();
        bad_headers += rec.bad_headers;
        let keys = t.keys();
        for k in &keys {
            match t.get(*k) {
                Ok(Some(b)) => assert!(
                    b[..] == content(*k, bb)[..],
                    "iteration {it}: block {k:?} has wrong contents"
                ),
                Ok(None) => panic!("iteration {it}: listed block {k:?} vanished"),
                Err(e) => panic!("iteration {it}: block {k:?} unreadable after recovery: {e}"),
            }
        }
        total += keys.len();
        max_seen = max_seen.max(keys.len());
    }
    eprintln!(
        "{iters} kills in {:.1}s: {total} blocks recovered and verified (max {max_seen} at once), {bad_headers} damaged headers dropped",
        started.elapsed().as_secs_f64()
    );
    assert!(
        max_seen > 0,
        "no block was ever recovered: the child wrote nothing"
    );
}
