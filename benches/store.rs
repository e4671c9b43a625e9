//! `benches/run store [--quick] [--dir DIR]`: kvstore's tiers against their baselines, measured in
//! one run on one machine, for blocks of 16 KiB to 2 MiB.
//!
//! * host tier: `host_put_gbps` (copy a block into the arena: lookup, slot allocation or
//!   eviction, copy) and `host_get_gbps` (lookup, pin, copy out) against `memcpy_gbps` (the same
//!   copies between two plain prefaulted buffers), one thread;
//! * disk tier: `disk_write_gbps`/`disk_read_gbps` (sequential slot order) and
//!   `disk_write_rand_gbps`/`disk_read_rand_gbps` (random slot order), 4 threads, O_DIRECT,
//!   checksums computed and verified, against `fio` with O_DIRECT, psync and 4 jobs on the same
//!   directory (`fio_write_gbps`, `fio_read_gbps`, `fio_write_rand_gbps`, `fio_read_rand_gbps`).
//!   Like each fio job, each thread moves its blocks through one buffer of its own (a block's
//!   index is stamped into its first bytes, so blocks differ and each read is checked to be the
//!   right block; a sample is compared byte for byte outside the timed loops);
//!   `fio_uring_read_rand_gbps` (io_uring, iodepth 4) shows what a second I/O engine would gain;
//! * Redis tier: `redis_put_gbps`/`redis_get_gbps` (header, checksum and verification included)
//!   against raw `SET`/`GET` of the same bytes on the same `redis-server`, one connection.
//!
//! Each headline figure is the median over block sizes of per-size medians; per-size figures
//! carry a `_<size>` suffix and every ratio to its baseline is reported (`*_vs_*`, and the worst
//! size as `*_vs_*_min`). The disk tier and fio take turns in rounds
//! (eight in a full run, two in a quick one), each round the tier's four passes and then fio's
//! or the other way round, alternating; the disk ratios are the medians of the rounds' own
//! ratios: this machine's shared disk drifts by ±20% within a minute, which a ratio of two
//! separately taken medians would carry into the result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvstore::disk::AlignedBuf;
use kvstore::{
    BlockKey, DirectIo, DiskConfig, DiskTier, HostConfig, HostTier, RedisConfig, RedisTier,
    RemoteTier,
};
use rand::seq::SliceRandom;
use rand::RngCore;

const SIZES: [usize; 5] = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];
const THREADS: usize = 4;

/// Block sizes to run (`--sizes 64k,256k`); all of [`SIZES`] by default.
static SELECTED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

fn sizes() -> Vec<usize> {
    SELECTED.get().cloned().unwrap_or_else(|| SIZES.to_vec())
}

struct Args {
    quick: bool,
    dir: PathBuf,
    /// Only these tiers (`--only host,disk,redis`); all by default.
    only: Option<String>,
}

impl Args {
    fn runs(&self, tier: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.split(',').any(|t| t == tier))
    }
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        dir: PathBuf::from("target/bench/store-disk"),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--dir" => a.dir = PathBuf::from(it.next().expect("--dir DIR")),
            "--only" => a.only = Some(it.next().expect("--only host,disk,redis")),
            "--sizes" => {
                let v = it.next().expect("--sizes 16k,64k,...");
                let keep: Vec<usize> = SIZES
                    .iter()
                    .copied()
                    .filter(|s| v.split(',').any(|x| x == size_name(*s)))
                    .collect();
                let _ = SELECTED.set(keep);
            }
            "--bench" => {}
            other => {
                eprintln!("unknown option {other}; usage: benches/run store [--quick] [--dir DIR] [--only host,disk,redis] [--sizes 16k,64k,256k,1m,2m]");
                std::process::exit(2);
            }
        }
    }
    a
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
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|k| format!(", {} GiB RAM", k >> 20))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores{mem}")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn size_name(s: usize) -> String {
    if s >= 1 << 20 {
        format!("{}m", s >> 20)
    } else {
        format!("{}k", s >> 10)
    }
}

fn random_fill(buf: &mut [u8]) {
    rand::rng().fill_bytes(buf);
}

#[derive(Default)]
struct Figures {
    per_size: PerSize,
    /// Ratios measured pairwise (`<ours>_vs_<baseline>`, per size), where a baseline ran beside
    /// each pass; other ratios are taken between the two medians.
    ratios: PerSize,
}

type PerSize = BTreeMap<String, Vec<(usize, f64)>>;

fn put_at(m: &mut PerSize, name: &str, size: usize, v: f64) {
    m.entry(name.to_string()).or_default().push((size, v));
}

fn get_at(m: &PerSize, name: &str, size: usize) -> Option<f64> {
    m.get(name)?.iter().find(|(s, _)| *s == size).map(|x| x.1)
}

impl Figures {
    fn add(&mut self, name: &str, size: usize, v: f64) {
        put_at(&mut self.per_size, name, size, v);
    }
    fn get(&self, name: &str, size: usize) -> Option<f64> {
        get_at(&self.per_size, name, size)
    }
    fn ratio(&mut self, name: &str, size: usize, v: f64) {
        put_at(&mut self.ratios, name, size, v);
    }
    fn get_ratio(&self, name: &str, size: usize) -> Option<f64> {
        get_at(&self.ratios, name, size)
    }
}

// ------------------------------------------------------------------------------------------
// Host tier

fn bench_host(f: &mut Figures, quick: bool) {
    let total: usize = if quick { 128 << 20 } else { 1 << 30 };
    let reps = if quick { 3 } else { 5 };
    let mut src = vec![0u8; total];
    random_fill(&mut src);
    let mut dst = vec![1u8; total];
    for s in sizes() {
        let n = total / s;
        let host = HostTier::new(&HostConfig::new(total as u64, s)).expect("host tier");
        let mut mc = Vec::new();
        let mut put = Vec::new();
        let mut get = Vec::new();
        for r in 0..reps {
            let t0 = Instant::now();
            for i in 0..n {
                dst[i * s..(i + 1) * s].copy_from_slice(&src[i * s..(i + 1) * s]);
            }
            mc.push(gbps(n * s, t0.elapsed()));
            std::hint::black_box(&dst);
            // New keys every round: the first fills the arena, later ones evict.
            let base = 2 + (r * n) as u64;
            let t0 = Instant::now();
            for i in 0..n {
                host.put(BlockKey(base + i as u64), &src[i * s..(i + 1) * s])
                    .expect("host put");
            }
            put.push(gbps(n * s, t0.elapsed()));
            let t0 = Instant::now();
            for i in 0..n {
                let hit = host
                    .get_into(BlockKey(base + i as u64), &mut dst[i * s..(i + 1) * s])
                    .expect("host get");
                assert!(hit);
            }
            get.push(gbps(n * s, t0.elapsed()));
        }
        assert!(dst[..s] == src[..s], "host tier returned wrong bytes");
        f.add("memcpy_gbps", s, median(mc));
        f.add("host_put_gbps", s, median(put));
        f.add("host_get_gbps", s, median(get));
        eprintln!(
            "[store] host {:>4}: put {:6.2} get {:6.2} memcpy {:6.2} GB/s",
            size_name(s),
            f.get("host_put_gbps", s).unwrap(),
            f.get("host_get_gbps", s).unwrap(),
            f.get("memcpy_gbps", s).unwrap()
        );
    }
}

// ------------------------------------------------------------------------------------------
// Disk tier

/// Runs `op(i, buf)` for every `i` of `order` on [`THREADS`] threads, each moving its blocks
/// through one block buffer of its own (a copy of `base`), as each fio job does.
fn parallel(order: &[usize], base: &[u8], op: impl Fn(usize, &mut [u8]) + Sync) -> Duration {
    let next = AtomicUsize::new(0);
    let bufs: Vec<AlignedBuf> = (0..THREADS)
        .map(|_| {
            let mut b = AlignedBuf::zeroed(base.len());
            b.copy_from_slice(base);
            b
        })
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for mut b in bufs {
            let (next, op) = (&next, &op);
            sc.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= order.len() {
                    break;
                }
                op(order[i], &mut b);
            });
        }
    });
    t0.elapsed()
}

/// Block `i`'s content: the random base block with `i` in its first 8 bytes.
fn stamp(buf: &mut [u8], i: usize) {
    buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
}

fn stamped(buf: &[u8]) -> usize {
    u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize
}

fn bench_disk(f: &mut Figures, dir: &Path, quick: bool, fio: bool) {
    let total: usize = if quick { 64 << 20 } else { 512 << 20 };
    let reps = if quick { 2 } else { 8 };
    let tier_dir = dir.join("kvstore");
    let fio_dir = dir.join("fio");
    for s in sizes() {
        let n = total / s;
        let mut base = vec![0u8; s];
        random_fill(&mut base);
        let seq: Vec<usize> = (0..n).collect();
        let mut rnd = seq.clone();
        let (mut w, mut r, mut wr, mut rr) = (vec![], vec![], vec![], vec![]);
        let (mut fw, mut fr, mut fwr, mut frr) = (vec![], vec![], vec![], vec![]);
        // One fio round: the same passes as one round of the tier, on a fresh directory.
        let fio_round =
            |fw: &mut Vec<f64>, fr: &mut Vec<f64>, frr: &mut Vec<f64>, fwr: &mut Vec<f64>| {
                let _ = std::fs::remove_dir_all(&fio_dir);
                std::fs::create_dir_all(&fio_dir).unwrap();
                fw.push(run_fio(&fio_dir, "write", s, total, "psync", 1));
                fr.push(run_fio(&fio_dir, "read", s, total, "psync", 1));
                frr.push(run_fio(&fio_dir, "randread", s, total, "psync", 1));
                fwr.push(run_fio(&fio_dir, "randwrite", s, total, "psync", 1));
                let _ = std::fs::remove_dir_all(&fio_dir);
            };
        for rep in 0..reps {
            // A round is the tier's four passes and fio's four passes, each system's reads
            // following its own writes; which system goes first alternates with the round (an
            // even number of rounds), and a round's ratios are taken within the round, so both
            // sides sample the same stretch of this shared, drifting disk.
            if fio && rep % 2 == 1 {
                fio_round(&mut fw, &mut fr, &mut frr, &mut fwr);
            }
            let _ = std::fs::remove_dir_all(&tier_dir);
            let mut c = DiskConfig::new(&tier_dir, total as u64, s);
            c.direct = DirectIo::Require;
            let t = DiskTier::open(&c).unwrap_or_else(|e| {
                panic!(
                    "disk tier on {}: {e} (use --dir on a disk file system)",
                    tier_dir.display()
                )
            });
            let key = |i: usize| BlockKey(2 + i as u64);
            let put = |k: BlockKey, i: usize, b: &mut [u8]| {
                stamp(b, i);
                t.put(k, b).expect("disk put");
            };
            // The tier verifies every block's checksum; the stamp shows it is the right block.
            let get = |k: BlockKey, i: usize, b: &mut [u8]| {
                assert!(t.get_into(k, b).expect("disk get"));
                assert_eq!(stamped(b), i, "disk tier returned another block");
            };
            w.push(gbps(n * s, parallel(&seq, &base, |i, b| put(key(i), i, b))));
            r.push(gbps(n * s, parallel(&seq, &base, |i, b| get(key(i), i, b))));
            rnd.shuffle(&mut rand::rng());
            rr.push(gbps(n * s, parallel(&rnd, &base, |i, b| get(key(i), i, b))));
            // Free the slots in random order: the next writes land in random slots.
            for &i in &rnd {
                t.remove(key(i)).expect("remove");
            }
            let key2 = |i: usize| BlockKey(10_000_000 + i as u64);
            wr.push(gbps(
                n * s,
                parallel(&seq, &base, |i, b| put(key2(i), i, b)),
            ));
            // Every byte of a sample of blocks, outside the timed loops.
            let mut b = vec![0u8; s];
            for i in (0..n).step_by(7) {
                assert!(t.get_into(key2(i), &mut b).expect("disk get"));
                stamp(&mut base, i);
                assert!(b == base, "disk tier returned wrong bytes");
            }
            drop(t);
            let _ = std::fs::remove_dir_all(&tier_dir);
            if fio && rep % 2 == 0 {
                fio_round(&mut fw, &mut fr, &mut frr, &mut fwr);
            }
        }
        if fio {
            // Ratios to fio: the median of the rounds' paired ratios.
            for (name, ours, theirs) in [
                ("disk_write_vs_fio_write", &w, &fw),
                ("disk_read_vs_fio_read", &r, &fr),
                ("disk_write_rand_vs_fio_write_rand", &wr, &fwr),
                ("disk_read_rand_vs_fio_read_rand", &rr, &frr),
            ] {
                let paired: Vec<f64> = ours
                    .iter()
                    .zip(theirs.iter())
                    .filter(|(_, b)| **b > 0.0)
                    .map(|(a, b)| a / b)
                    .collect();
                if !paired.is_empty() {
                    f.ratio(name, s, median(paired));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&tier_dir);
        f.add("disk_write_gbps", s, median(w));
        f.add("disk_read_gbps", s, median(r));
        f.add("disk_write_rand_gbps", s, median(wr));
        f.add("disk_read_rand_gbps", s, median(rr));
        if fio {
            f.add("fio_write_gbps", s, median(fw));
            f.add("fio_read_gbps", s, median(fr));
            f.add("fio_write_rand_gbps", s, median(fwr));
            f.add("fio_read_rand_gbps", s, median(frr));
            if s == 256 << 10 || s == 16 << 10 {
                std::fs::create_dir_all(&fio_dir).unwrap();
                let u = run_fio(&fio_dir, "randread", s, total, "io_uring", 4);
                if u > 0.0 {
                    f.add("fio_uring_read_rand_gbps", s, u);
                }
            }
            let _ = std::fs::remove_dir_all(&fio_dir);
        }
        eprintln!(
            "[store] disk {:>4}: write {:5.2} (fio {:5.2}) read {:5.2} (fio {:5.2}) rand write {:5.2} (fio {:5.2}) rand read {:5.2} (fio {:5.2}) GB/s",
            size_name(s),
            f.get("disk_write_gbps", s).unwrap(),
            f.get("fio_write_gbps", s).unwrap_or(0.0),
            f.get("disk_read_gbps", s).unwrap(),
            f.get("fio_read_gbps", s).unwrap_or(0.0),
            f.get("disk_write_rand_gbps", s).unwrap(),
            f.get("fio_write_rand_gbps", s).unwrap_or(0.0),
            f.get("disk_read_rand_gbps", s).unwrap(),
            f.get("fio_read_rand_gbps", s).unwrap_or(0.0),
        );
    }
}

fn ensure_fio() -> bool {
    if Command::new("fio").arg("--version").output().is_ok() {
        return true;
    }
    eprintln!("[store] fio is missing: installing the Debian package");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    let sudo: &[&str] = if root { &[] } else { &["sudo", "-n"] };
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.extend_from_slice(args);
        Command::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let _ = run(&["apt-get", "update", "-qq"]);
    run(&["apt-get", "install", "-y", "-qq", "fio"])
        && Command::new("fio").arg("--version").output().is_ok()
}

/// One fio run with O_DIRECT on `dir`; returns GB/s (0 when the engine is unavailable).
fn run_fio(dir: &Path, rw: &str, bs: usize, total: usize, engine: &str, depth: usize) -> f64 {
    let out = Command::new("fio")
        .arg("--name=kvstore")
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={}", total / THREADS))
        .arg(format!("--numjobs={THREADS}"))
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--iodepth={depth}"))
        .args(["--direct=1", "--group_reporting", "--output-format=json"])
        .args(["--fallocate=native", "--end_fsync=0", "--randrepeat=0"])
        .output()
        .expect("run fio");
    if !out.status.success() {
        eprintln!(
            "[store] fio {rw} {engine} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return 0.0;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[start..]).expect("fio json");
    let dirn = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][dirn]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e9
}

// ------------------------------------------------------------------------------------------
// Redis tier

struct RedisProc(std::process::Child, PathBuf);

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start_redis() -> (RedisProc, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = PathBuf::from(format!("target/bench/store-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (Debian: redis-server)");
    let p = RedisProc(child, dir);
    let url = format!("redis://127.0.0.1:{port}/");
    let c = redis::Client::open(url.as_str()).unwrap();
    let t0 = Instant::now();
    while c.get_connection().is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, url)
}

fn bench_redis(f: &mut Figures, quick: bool) {
    let (_srv, url) = start_redis();
    let total: usize = if quick { 32 << 20 } else { 256 << 20 };
    let reps = if quick { 3 } else { 5 };
    let mut src = vec![0u8; total];
    random_fill(&mut src);
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    for s in sizes() {
        let n = total / s;
        let tier = RedisTier::new(RedisConfig::new(url.clone(), s)).unwrap();
        let (mut sp, mut sg, mut rp, mut rg) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            let t0 = Instant::now();
            for i in 0..n {
                let _: () = redis::cmd("SET")
                    .arg(format!("raw:{i}"))
                    .arg(&src[i * s..(i + 1) * s])
                    .query(&mut raw)
                    .unwrap();
            }
            rp.push(gbps(n * s, t0.elapsed()));
            let t0 = Instant::now();
            for i in 0..n {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(format!("raw:{i}"))
                    .query(&mut raw)
                    .unwrap();
                assert_eq!(v.len(), s);
            }
            rg.push(gbps(n * s, t0.elapsed()));
            let t0 = Instant::now();
            for i in 0..n {
                tier.put(BlockKey(2 + i as u64), &src[i * s..(i + 1) * s])
                    .unwrap();
            }
            sp.push(gbps(n * s, t0.elapsed()));
            let t0 = Instant::now();
            for i in 0..n {
                let b = tier.get(BlockKey(2 + i as u64)).unwrap().unwrap();
                assert_eq!(b.len(), s);
            }
            sg.push(gbps(n * s, t0.elapsed()));
        }
        let _: () = redis::cmd("FLUSHALL").query(&mut raw).unwrap();
        f.add("redis_put_gbps", s, median(sp));
        f.add("redis_get_gbps", s, median(sg));
        f.add("raw_set_gbps", s, median(rp));
        f.add("raw_get_gbps", s, median(rg));
        eprintln!(
            "[store] redis {:>4}: put {:5.2} (SET {:5.2}) get {:5.2} (GET {:5.2}) GB/s",
            size_name(s),
            f.get("redis_put_gbps", s).unwrap(),
            f.get("raw_set_gbps", s).unwrap(),
            f.get("redis_get_gbps", s).unwrap(),
            f.get("raw_get_gbps", s).unwrap()
        );
    }
}

// ------------------------------------------------------------------------------------------

fn main() {
    let a = args();
    let started = Instant::now();
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::create_dir_all(&a.dir).unwrap();
    let fio = a.runs("disk") && ensure_fio();
    if a.runs("disk") && !fio {
        eprintln!("[store] error: fio is not available and could not be installed; the disk baselines are missing");
    }
    let mut f = Figures::default();
    if a.runs("host") {
        bench_host(&mut f, a.quick);
    }
    if a.runs("disk") {
        bench_disk(&mut f, &a.dir, a.quick, fio);
    }
    if a.runs("redis") {
        bench_redis(&mut f, a.quick);
    }

    let pairs = [
        ("host_put_gbps", "memcpy_gbps"),
        ("host_get_gbps", "memcpy_gbps"),
        ("disk_write_gbps", "fio_write_gbps"),
        ("disk_read_gbps", "fio_read_gbps"),
        ("disk_write_rand_gbps", "fio_write_rand_gbps"),
        ("disk_read_rand_gbps", "fio_read_rand_gbps"),
        ("redis_put_gbps", "raw_set_gbps"),
        ("redis_get_gbps", "raw_get_gbps"),
    ];
    let mut json = serde_json::Map::new();
    for (name, vals) in &f.per_size {
        json.insert(
            name.clone(),
            median(vals.iter().map(|v| v.1).collect()).into(),
        );
        for (s, v) in vals {
            json.insert(format!("{name}_{}", size_name(*s)), (*v).into());
        }
    }
    println!();
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8} {:>8}   {:<20} {:>7}",
        "figure (GB/s)", "16k", "64k", "256k", "1m", "2m", "baseline", "ratio"
    );
    for (ours, base) in pairs {
        if !f.per_size.contains_key(ours) {
            continue; // a tier left out with --only
        }
        let mut ratios = vec![];
        let mut row = format!("{ours:<22}");
        for &s in &SIZES {
            let v = f.get(ours, s).unwrap_or(0.0);
            row += &format!(" {v:>8.2}");
            if let Some(b) = f.get(base, s).filter(|b| *b > 0.0) {
                let name = format!(
                    "{}_vs_{}",
                    ours.trim_end_matches("_gbps"),
                    base.trim_end_matches("_gbps")
                );
                let r = f.get_ratio(&name, s).unwrap_or(v / b);
                ratios.push(r);
                json.insert(format!("{name}_{}", size_name(s)), r.into());
            }
        }
        if !ratios.is_empty() {
            let key = format!(
                "{}_vs_{}",
                ours.trim_end_matches("_gbps"),
                base.trim_end_matches("_gbps")
            );
            let med = median(ratios.clone());
            let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
            json.insert(key.clone(), med.into());
            json.insert(format!("{key}_min"), min.into());
            row += &format!("   {base:<20} {:>6.0}%", med * 100.0);
        }
        println!("{row}");
        let mut brow = format!("{base:<22}");
        for &s in &SIZES {
            brow += &format!(" {:>8.2}", f.get(base, s).unwrap_or(0.0));
        }
        println!("{brow}");
        if ratios.len() == SIZES.len() {
            let mut rrow = format!("{:<22}", "  ratio");
            for r in &ratios {
                rrow += &format!(" {:>7.0}%", r * 100.0);
            }
            println!("{rrow}");
        }
    }
    if let Some(v) = f.per_size.get("fio_uring_read_rand_gbps") {
        for (s, u) in v {
            println!(
                "fio random read at {}: io_uring (depth 4) {:.2} GB/s, psync {:.2} GB/s",
                size_name(*s),
                u,
                f.get("fio_read_rand_gbps", *s).unwrap_or(0.0)
            );
        }
    }
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "benches/run store".into())
            .into(),
    );
    json.insert("machine".into(), machine().into());
    json.insert("quick".into(), a.quick.into());
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::write(
        "target/bench/store.json",
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write target/bench/store.json");
    eprintln!(
        "[store] wrote target/bench/store.json in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
