//! `benches/run gpu2`: kvtransfer moving KV blocks from one GPU to another GPU of the same host,
//! between two processes (CUDA IPC, [`Backend::CudaIpc`]), against a plain peer
//! `cudaMemcpyAsync` of the same bytes in one contiguous piece, measured in the same run.
//!
//! This process holds the destination on GPU 0; it starts itself again as the peer, which
//! holds the source on GPU 1 (on a machine with one GPU, GPU 0 as well: the figures are then
//! device-to-device copies on one GPU, not peer copies, and `gpus` says 1). For each fragment
//! size from 4 KiB to 2 MiB, random source fragments are READ into random destination
//! fragments; `p2p_gbps_<size>` is the median of the repeats, from posting to completion.
//! `peer_memcpy_gbps` copies the whole buffer contiguously from the peer's memory (mapped the
//! same way) with one `cuMemcpyAsync`. Target: `p2p_gbps_16k` at least 85% of it
//! (`p2p_vs_memcpy_16k`).

use std::io::{BufRead, Read};
use std::time::{Duration, Instant};

use kvstore_cuda::{Device, DeviceBuffer, IpcMemory};
use kvtransfer::{Agent, AgentConfig, Backend, DescList, MemKind, Op};
use rand::{Rng, SeedableRng};

const SIZES: [(usize, &str); 6] = [
    (4 << 10, "4k"),
    (16 << 10, "16k"),
    (64 << 10, "64k"),
    (256 << 10, "256k"),
    (1 << 20, "1m"),
    (2 << 20, "2m"),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn agent(name: &str) -> Agent {
    let mut c = AgentConfig::new(name);
    c.listen = "127.0.0.1:0".parse().unwrap();
    Agent::new(c).expect("agent")
}

/// The peer: `len` bytes of GPU `ordinal` registered; prints `READY <addr> <base>`, then waits
/// for its standard input to close.
fn peer(ordinal: usize, len: usize) {
    let dev = Device::open(ordinal).expect("GPU");
    let a = agent("gpu2-peer");
    let buf = DeviceBuffer::alloc(&dev, len).expect("device memory");
    buf.fill(0x5a).unwrap();
    // SAFETY: `buf` outlives the agent's use of it (this process ends after the loop).
    unsafe { a.register_raw(buf.ptr(), len as u64, MemKind::Vram, ordinal as u32) }.unwrap();
    println!("READY {} {}", a.listen_addr(), buf.ptr());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total: usize = if quick { 64 << 20 } else { 256 << 20 };
    let reps = if quick { 3 } else { 7 };
    if let Ok(o) = std::env::var("KVMESH_GPU2_PEER") {
        peer(o.parse().expect("ordinal"), total);
        return;
    }
    let t0 = Instant::now();
    let dev = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu2 benchmark failed: no GPU ({e})");
            std::process::exit(1);
        }
    };
    let gpus = if Device::open(1).is_ok() { 2 } else { 1 };
    let peer_gpu = gpus - 1;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(std::env::args().skip(1))
        .env("KVMESH_GPU2_PEER", peer_gpu.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the peer process");
    eprintln!("[gpu2] waiting for the peer process on GPU {peer_gpu}");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (addr, base): (std::net::SocketAddr, u64) = loop {
        let l = lines.next().expect("the peer said READY").unwrap();
        if let Some(rest) = l.strip_prefix("READY ") {
            let mut it = rest.split_whitespace();
            break (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            );
        }
    };
    let a = agent("gpu2-local");
    let mine = DeviceBuffer::alloc(&dev, total).expect("device memory");
    // SAFETY: `mine` outlives the agent's use of it (both live to the end of main).
    unsafe { a.register_raw(mine.ptr(), total as u64, MemKind::Vram, 0) }.unwrap();
    let name = a.connect(addr).expect("connect");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut json = serde_json::Map::new();
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "benches/run gpu2".into())
            .into(),
    );
    json.insert(
        "machine".into(),
        format!(
            "{} x{gpus}, driver {}",
            dev.name().unwrap_or_default(),
            dev.driver_version().unwrap_or(0)
        )
        .into(),
    );
    json.insert("gpus".into(), gpus.into());
    // The baseline: one contiguous copy of the same bytes from the peer's mapped memory.
    let meta = a.remote_metadata(&name).expect("metadata");
    let (handle, alloc_base) = meta.regions[0]
        .ipc_handle()
        .expect("the peer's GPU memory is exported for CUDA IPC");
    let mapped = IpcMemory::open(&dev, handle).expect("mapping the peer's memory");
    let from = mapped.ptr() + (base - alloc_base);
    let mut rates = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        // SAFETY: both ranges are `total` bytes of live device memory (ours, and the peer's,
        // registered and mapped), and nothing else writes ours meanwhile.
        unsafe { dev.copy_batch(&[(mine.ptr(), from, total)]) }.expect("peer copy");
        rates.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let memcpy = median(rates);
    println!("contiguous peer cudaMemcpyAsync: {memcpy:.1} GB/s");
    json.insert("peer_memcpy_gbps".into(), memcpy.into());
    // Close the mapping: the agent maps the same allocation itself.
    drop(mapped);
    if gpus == 1 {
        println!("one GPU: both processes use GPU 0 (device-to-device copies, not peer copies)");
    }
    println!("{:>8} {:>12}", "fragment", "p2p GB/s");
    let mut p2p16 = 0.0;
    for (size, label) in SIZES {
        let n = total / size;
        let mut src: Vec<usize> = (0..n).collect();
        let mut dst: Vec<usize> = (0..n).collect();
        let mut rates = Vec::new();
        for _ in 0..reps {
            for v in [&mut src, &mut dst] {
                for i in (1..n).rev() {
                    v.swap(i, rng.random_range(0..=i));
                }
            }
            let mut l = DescList::new(MemKind::Vram);
            let mut r = DescList::new(MemKind::Vram);
            for i in 0..n {
                l.push(mine.ptr() + (dst[i] * size) as u64, size as u64, 0);
                r.push(base + (src[i] * size) as u64, size as u64, peer_gpu as u32);
            }
            let h = a.prepare(Op::Read, &l, &name, &r, None).expect("prepare");
            assert_eq!(
                h.backend(),
                Backend::CudaIpc,
                "GPU to GPU on one host uses CUDA IPC"
            );
            h.post(None).unwrap();
            let st = h.wait_timeout(Duration::from_secs(60)).expect("transfer");
            rates.push(st.gbps());
        }
        let g = median(rates);
        if size == 16 << 10 {
            p2p16 = g;
        }
        println!("{label:>8} {g:>12.1}");
        json.insert(format!("p2p_gbps_{label}"), g.into());
    }
    println!(
        "p2p at 16 KiB fragments: {:.0}% of the contiguous peer copy (target 85%)",
        100.0 * p2p16 / memcpy
    );
    json.insert("p2p_vs_memcpy_16k".into(), (p2p16 / memcpy).into());
    drop(child.stdin.take());
    let _ = child.wait();
    // benches/run sets the directory (cargo runs this bench from kvtransfer/).
    let out = std::path::PathBuf::from(
        std::env::var("KVMESH_BENCH_DIR").unwrap_or_else(|_| "target/bench".into()),
    );
    std::fs::create_dir_all(&out).ok();
    let path = out.join("gpu2.json");
    if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()) {
        eprintln!("could not write {}: {e}", path.display());
        std::process::exit(1);
    }
    eprintln!(
        "[gpu2] wrote target/bench/gpu2.json in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
