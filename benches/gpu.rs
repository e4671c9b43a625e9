//! `benches/run gpu`: kvstore's CUDA copy engine against the usual ways of moving scattered KV
//! pages between GPU memory and pinned host memory, all in this one run on one GPU:
//!
//! * ours (`d2h_gbps_<size>`, `h2d_gbps_<size>`): the engine's default path (the copy kernel over
//!   mapped pinned memory below its DMA threshold, one DMA per page at or above it);
//! * one `cudaMemcpyAsync` per page (`memcpy_*`), what vLLM's own block swap does;
//! * one `cudaMemcpyBatchAsync` for all pages (`batch_*`), CUDA 12.8+;
//! * torch `index_select` into a GPU buffer plus one copy (`torch_*`), run by
//!   `kvstore/cuda/bench/torch_baseline.py` when torch with CUDA is importable;
//! * the kernel and DMA paths forced (`kernel_*`, `dma_*` = `memcpy_*`), to show the threshold.
//!
//! Sizes are page (fragment) sizes from 4 KiB to 2 MiB, 8 layers, random blocks of a cache four
//! times the transfer, into random host slots; each transfer moves about 128 MiB (32 MiB with
//! `--quick`). Two model shapes: Llama-3-8B (32 layers of 64 KiB pages: 8 KV heads x 16 tokens x
//! 512 bytes, 64 blocks) and Llama-3-70B at tensor-parallel 8 (80 layers of 8 KiB pages, 200
//! blocks). `bidir_gbps` is the Llama-3-8B shape moved both ways at once (gather on one stream,
//! scatter on the other), counting the bytes of both directions. Figures are GB/s (1e9 bytes),
//! medians of timed repetitions, wall time from submission to completion.
//!
//! Without a GPU it prints why and exits 0 with an empty result (CI is CPU-only).

use std::process::Command;
use std::time::Instant;

use kvstore_cuda::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use serde_json::{Map, Value};

const SIZES: [(u64, &str); 6] = [
    (4 << 10, "4k"),
    (16 << 10, "16k"),
    (64 << 10, "64k"),
    (256 << 10, "256k"),
    (1 << 20, "1m"),
    (2 << 20, "2m"),
];
const SWEEP_LAYERS: usize = 8;

struct Args {
    quick: bool,
    torch: bool,
    explore: bool,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        torch: true,
        explore: false,
    };
    for s in std::env::args().skip(1) {
        match s.as_str() {
            "--quick" => a.quick = true,
            "--no-torch" => a.torch = false,
            "--explore" => a.explore = true,
            "--bench" => {}
            other => {
                eprintln!("usage: benches/run gpu [--quick] [--no-torch] (unknown {other})");
                std::process::exit(2);
            }
        }
    }
    a
}

fn machine(engine: Option<&Engine>) -> String {
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
    match engine {
        Some(e) => format!(
            "{}, driver {}, {cpu}, {cores} cores",
            e.device().name().unwrap_or_default(),
            e.device().driver_version().unwrap_or(0)
        ),
        None => format!("no GPU, {cpu}, {cores} cores"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A cache, random moves into it and host slots for them, in one geometry.
struct Setup {
    _buf: DeviceBuffer,
    cache: KvCache,
    slots: SlotSpec,
    host_out: PinnedBuffer,
    host_in: PinnedBuffer,
    gather_moves: Vec<BlockMove>,
    scatter_moves: Vec<BlockMove>,
    bytes: u64,
}

fn setup(
    engine: &Engine,
    rng: &mut StdRng,
    layers: usize,
    shape: PageShape,
    n: u32,
    layout: KvLayout,
    host_layout: KvLayout,
) -> Result<Setup> {
    let page = shape.page_bytes();
    let num_blocks = 4 * n;
    let total = layers as u64 * num_blocks as u64 * page;
    let buf = DeviceBuffer::alloc(engine.device(), total as usize)?;
    let mut chunk = vec![0u8; (8 << 20).min(total as usize)];
    rng.fill_bytes(&mut chunk);
    let mut off = 0usize;
    while off < total as usize {
        let len = chunk.len().min(total as usize - off);
        buf.write(off, &chunk[..len])?;
        off += len;
    }
    let spec = CacheSpec::contiguous(
        (0..layers as u64)
            .map(|l| buf.ptr() + l * num_blocks as u64 * page)
            .collect(),
        num_blocks,
        shape,
        layout,
    );
    // SAFETY: `buf` lives in the same Setup and outlives every transfer.
    let cache = unsafe { engine.register_cache(spec)? };
    let num_slots = 2 * n;
    let slots = SlotSpec::packed(cache.spec(), num_slots, host_layout);
    let host_out = PinnedBuffer::alloc(engine.device(), slots.bytes() as usize)?;
    let mut host_in = PinnedBuffer::alloc(engine.device(), slots.bytes() as usize)?;
    for c in host_in.as_mut_slice().chunks_mut(chunk.len()) {
        c.copy_from_slice(&chunk[..c.len()]);
    }
    let moves = |rng: &mut StdRng| {
        let mut b: Vec<u32> = (0..num_blocks).collect();
        let mut s: Vec<u32> = (0..num_slots).collect();
        b.shuffle(rng);
        s.shuffle(rng);
        b.into_iter()
            .zip(s)
            .take(n as usize)
            .map(|(block, slot)| BlockMove { block, slot })
            .collect::<Vec<_>>()
    };
    let gather_moves = moves(rng);
    let scatter_moves = moves(rng);
    Ok(Setup {
        _buf: buf,
        cache,
        slots,
        host_out,
        host_in,
        gather_moves,
        scatter_moves,
        bytes: n as u64 * layers as u64 * page,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    D2h,
    H2d,
    Both,
}

/// Median GB/s of `reps` timed transfers (after two untimed ones).
fn measure(engine: &Engine, s: &mut Setup, dir: Dir, path: CopyPath, reps: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps + 2 {
        let t = Instant::now();
        match dir {
            Dir::D2h => engine
                .gather(&s.cache, &mut s.host_out, &s.slots, &s.gather_moves, path)?
                .wait()?,
            Dir::H2d => engine
                .scatter(&s.host_in, &s.slots, &s.cache, &s.scatter_moves, path)?
                .wait()?,
            Dir::Both => {
                let g =
                    engine.gather(&s.cache, &mut s.host_out, &s.slots, &s.gather_moves, path)?;
                let h = engine.scatter(&s.host_in, &s.slots, &s.cache, &s.scatter_moves, path)?;
                g.wait()?;
                h.wait()?;
            }
        }
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let bytes = if dir == Dir::Both {
        2 * s.bytes
    } else {
        s.bytes
    };
    Ok(bytes as f64 / median(times) / 1e9)
}

/// Gather with (`ed`, `pd`) and scatter with (`eh`, `ph`) at once: median GB/s of both together,
/// and of each direction by its own completion time.
fn measure_pair(
    ed: &Engine,
    pd: CopyPath,
    eh: &Engine,
    ph: CopyPath,
    s: &mut Setup,
    reps: usize,
) -> Result<(f64, f64, f64)> {
    let (mut tot, mut td, mut th) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps + 2 {
        let t = Instant::now();
        let g = ed.gather(&s.cache, &mut s.host_out, &s.slots, &s.gather_moves, pd)?;
        let h = eh.scatter(&s.host_in, &s.slots, &s.cache, &s.scatter_moves, ph)?;
        let (mut dg, mut dh) = (None, None);
        while dg.is_none() || dh.is_none() {
            if dg.is_none() && g.is_done() {
                dg = Some(t.elapsed().as_secs_f64());
            }
            if dh.is_none() && h.is_done() {
                dh = Some(t.elapsed().as_secs_f64());
            }
        }
        g.wait()?;
        h.wait()?;
        let all = t.elapsed().as_secs_f64();
        if i >= 2 {
            tot.push(all);
            td.push(dg.unwrap_or(all));
            th.push(dh.unwrap_or(all));
        }
    }
    let b = s.bytes as f64 / 1e9;
    Ok((2.0 * b / median(tot), b / median(td), b / median(th)))
}

/// Variants of the kernel and mixes of paths, both directions at once (printed only).
fn explore(engine: &Engine, rng: &mut StdRng) -> Result<()> {
    let mk = |l2: u32, unroll: u32| {
        Engine::new(EngineConfig {
            l2_prefetch: l2,
            unroll,
            ..EngineConfig::default()
        })
    };
    let l2_128 = mk(128, 4)?;
    let l2_256 = mk(256, 4)?;
    let unroll8 = mk(0, 8)?;
    let unroll2 = mk(0, 2)?;
    let reps = 7;
    println!();
    println!(
        "{:<10} {:<22} | {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "shape", "variant", "d2h", "h2d", "bidir", "bi d2h", "bi h2d"
    );
    let shapes: Vec<(&str, usize, PageShape, u32)> = vec![
        (
            "4k",
            8,
            PageShape {
                num_heads: 1,
                tokens_per_block: 8,
                entry_bytes: 512,
            },
            4096,
        ),
        (
            "64k",
            8,
            PageShape {
                num_heads: 1,
                tokens_per_block: 128,
                entry_bytes: 512,
            },
            256,
        ),
        (
            "256k",
            8,
            PageShape {
                num_heads: 1,
                tokens_per_block: 512,
                entry_bytes: 512,
            },
            64,
        ),
        (
            "1m",
            8,
            PageShape {
                num_heads: 1,
                tokens_per_block: 2048,
                entry_bytes: 512,
            },
            16,
        ),
        (
            "llama70b8",
            80,
            PageShape {
                num_heads: 1,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            200,
        ),
        (
            "llama8b",
            32,
            PageShape {
                num_heads: 8,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            64,
        ),
    ];
    for (name, layers, shape, n) in shapes {
        let mut s = setup(
            engine,
            rng,
            layers,
            shape,
            n,
            KvLayout::Lbnhc,
            KvLayout::Lbnhc,
        )?;
        let variants: Vec<(&str, &Engine, CopyPath, &Engine, CopyPath)> = vec![
            ("kernel", engine, CopyPath::Kernel, engine, CopyPath::Kernel),
            (
                "kernel l2 128B",
                &l2_128,
                CopyPath::Kernel,
                &l2_128,
                CopyPath::Kernel,
            ),
            (
                "kernel l2 256B",
                &l2_256,
                CopyPath::Kernel,
                &l2_256,
                CopyPath::Kernel,
            ),
            (
                "kernel unroll 8",
                &unroll8,
                CopyPath::Kernel,
                &unroll8,
                CopyPath::Kernel,
            ),
            (
                "kernel unroll 2",
                &unroll2,
                CopyPath::Kernel,
                &unroll2,
                CopyPath::Kernel,
            ),
            ("staged", engine, CopyPath::Staged, engine, CopyPath::Staged),
            (
                "staged> kernel<",
                engine,
                CopyPath::Staged,
                engine,
                CopyPath::Kernel,
            ),
            (
                "kernel> staged<",
                engine,
                CopyPath::Kernel,
                engine,
                CopyPath::Staged,
            ),
            ("bulk", engine, CopyPath::Bulk, engine, CopyPath::Bulk),
            (
                "bulk> kernel<",
                engine,
                CopyPath::Bulk,
                engine,
                CopyPath::Kernel,
            ),
            (
                "kernel> bulk<",
                engine,
                CopyPath::Kernel,
                engine,
                CopyPath::Bulk,
            ),
            (
                "kernel> dma<",
                engine,
                CopyPath::Kernel,
                engine,
                CopyPath::Dma,
            ),
            (
                "dma> kernel<",
                engine,
                CopyPath::Dma,
                engine,
                CopyPath::Kernel,
            ),
            ("batch", engine, CopyPath::Batch, engine, CopyPath::Batch),
            ("dma", engine, CopyPath::Dma, engine, CopyPath::Dma),
        ];
        for (label, ed, pd, eh, ph) in variants {
            let d = measure(ed, &mut s, Dir::D2h, pd, reps)?;
            let h = measure(eh, &mut s, Dir::H2d, ph, reps)?;
            let (b, bd, bh) = measure_pair(ed, pd, eh, ph, &mut s, reps)?;
            println!("{name:<10} {label:<22} | {d:>7.1} {h:>7.1} | {b:>7.1} {bd:>7.1} {bh:>7.1}");
        }
    }
    Ok(())
}

fn torch_baseline(
    quick: bool,
    total: u64,
    reps: usize,
) -> std::result::Result<Map<String, Value>, String> {
    let sizes: Vec<String> = SIZES.iter().map(|(s, _)| s.to_string()).collect();
    let names: Vec<&str> = SIZES.iter().map(|(_, n)| *n).collect();
    let python = std::env::var("KVMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg("kvstore/cuda/bench/torch_baseline.py")
        .args(["--sizes", &sizes.join(",")])
        .args(["--names", &names.join(",")])
        .args(["--layers", &SWEEP_LAYERS.to_string()])
        .args(["--total", &total.to_string()])
        .args(["--reps", &(if quick { 3 } else { reps }).to_string()])
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line).map_err(|e| {
        format!(
            "{python} printed no result ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    match v {
        Value::Object(m) if m.contains_key("error") => Err(m["error"].to_string()),
        Value::Object(m) => Ok(m),
        _ => Err("unexpected output".into()),
    }
}

fn run(a: &Args, engine: &Engine, json: &mut Map<String, Value>) -> Result<()> {
    let reps = if a.quick { 5 } else { 15 };
    let total: u64 = if a.quick { 32 << 20 } else { 128 << 20 };
    let mut rng = StdRng::seed_from_u64(7);
    let put = |json: &mut Map<String, Value>, k: String, v: f64| {
        json.insert(k, ((v * 100.0).round() / 100.0).into());
    };
    println!(
        "{:<8} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7}",
        "page",
        "moves",
        "d2h",
        "h2d",
        "bidir",
        "memcpy>",
        "memcpy<",
        "batch>",
        "batch<",
        "kernel>",
        "kernel<",
        "vs memcpy>"
    );
    for (size, name) in SIZES {
        let shape = PageShape {
            num_heads: 1,
            tokens_per_block: (size / 512) as u32,
            entry_bytes: 512,
        };
        let n = (total / (SWEEP_LAYERS as u64 * size)).max(1) as u32;
        let mut s = setup(
            engine,
            &mut rng,
            SWEEP_LAYERS,
            shape,
            n,
            KvLayout::Lbnhc,
            KvLayout::Lbnhc,
        )?;
        let d2h = measure(engine, &mut s, Dir::D2h, CopyPath::Auto, reps)?;
        let h2d = measure(engine, &mut s, Dir::H2d, CopyPath::Auto, reps)?;
        let both = measure(engine, &mut s, Dir::Both, CopyPath::Auto, reps)?;
        let md = measure(engine, &mut s, Dir::D2h, CopyPath::Dma, reps)?;
        let mh = measure(engine, &mut s, Dir::H2d, CopyPath::Dma, reps)?;
        let (bd, bh) = if engine.has_batch_copy() {
            (
                measure(engine, &mut s, Dir::D2h, CopyPath::Batch, reps)?,
                measure(engine, &mut s, Dir::H2d, CopyPath::Batch, reps)?,
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        let kd = measure(engine, &mut s, Dir::D2h, CopyPath::Kernel, reps)?;
        let kh = measure(engine, &mut s, Dir::H2d, CopyPath::Kernel, reps)?;
        println!(
            "{:<8} {:>6} | {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>6.1}x",
            name, n, d2h, h2d, both, md, mh, bd, bh, kd, kh, d2h / md
        );
        put(json, format!("d2h_gbps_{name}"), d2h);
        put(json, format!("h2d_gbps_{name}"), h2d);
        put(json, format!("bidir_gbps_{name}"), both);
        put(json, format!("memcpy_d2h_gbps_{name}"), md);
        put(json, format!("memcpy_h2d_gbps_{name}"), mh);
        if engine.has_batch_copy() {
            put(json, format!("batch_d2h_gbps_{name}"), bd);
            put(json, format!("batch_h2d_gbps_{name}"), bh);
        }
        put(json, format!("kernel_d2h_gbps_{name}"), kd);
        put(json, format!("kernel_h2d_gbps_{name}"), kh);
        put(json, format!("d2h_vs_memcpy_{name}"), d2h / md);
        put(json, format!("h2d_vs_memcpy_{name}"), h2d / mh);
    }

    println!();
    println!(
        "{:<22} {:>6} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7}",
        "model shape",
        "blocks",
        "d2h",
        "h2d",
        "bidir",
        "memcpy>",
        "memcpy<",
        "batch>",
        "batch<",
        "NHC>HNC",
        "HNC>NHC"
    );
    let models = [
        (
            "llama8b",
            32usize,
            PageShape {
                num_heads: 8,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            64u32,
        ),
        (
            "llama70b_tp8",
            80,
            PageShape {
                num_heads: 1,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            200,
        ),
    ];
    for (name, layers, shape, blocks) in models {
        let blocks = if a.quick { blocks / 4 } else { blocks };
        let mut s = setup(
            engine,
            &mut rng,
            layers,
            shape,
            blocks,
            KvLayout::Lbnhc,
            KvLayout::Lbnhc,
        )?;
        let d2h = measure(engine, &mut s, Dir::D2h, CopyPath::Auto, reps)?;
        let h2d = measure(engine, &mut s, Dir::H2d, CopyPath::Auto, reps)?;
        let both = measure(engine, &mut s, Dir::Both, CopyPath::Auto, reps)?;
        let kb = measure(engine, &mut s, Dir::Both, CopyPath::Kernel, reps)?;
        let sb = measure(engine, &mut s, Dir::Both, CopyPath::Staged, reps)?;
        let sd = measure(engine, &mut s, Dir::D2h, CopyPath::Staged, reps)?;
        let sh = measure(engine, &mut s, Dir::H2d, CopyPath::Staged, reps)?;
        let md = measure(engine, &mut s, Dir::D2h, CopyPath::Dma, reps)?;
        let mh = measure(engine, &mut s, Dir::H2d, CopyPath::Dma, reps)?;
        let (bd, bh) = if engine.has_batch_copy() {
            (
                measure(engine, &mut s, Dir::D2h, CopyPath::Batch, reps)?,
                measure(engine, &mut s, Dir::H2d, CopyPath::Batch, reps)?,
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        drop(s);
        // Layout conversion on the way: an LBNHC cache stored as LBHNC slots, and back.
        let mut t = setup(
            engine,
            &mut rng,
            layers,
            shape,
            blocks,
            KvLayout::Lbnhc,
            KvLayout::Lbhnc,
        )?;
        let conv_d = measure(engine, &mut t, Dir::D2h, CopyPath::Auto, reps)?;
        let conv_h = measure(engine, &mut t, Dir::H2d, CopyPath::Auto, reps)?;
        println!(
            "{:<22} {:>6} | {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1}",
            name, blocks, d2h, h2d, both, md, mh, bd, bh, conv_d, conv_h
        );
        println!(
            "{:<22} {:>6} | kernel bidir {kb:.1}; staged d2h {sd:.1} h2d {sh:.1} bidir {sb:.1}",
            "", ""
        );
        put(json, format!("{name}_kernel_bidir_gbps"), kb);
        put(json, format!("{name}_staged_d2h_gbps"), sd);
        put(json, format!("{name}_staged_h2d_gbps"), sh);
        put(json, format!("{name}_staged_bidir_gbps"), sb);
        put(json, format!("{name}_d2h_gbps"), d2h);
        put(json, format!("{name}_h2d_gbps"), h2d);
        put(json, format!("{name}_bidir_gbps"), both);
        put(json, format!("{name}_memcpy_d2h_gbps"), md);
        put(json, format!("{name}_memcpy_h2d_gbps"), mh);
        if engine.has_batch_copy() {
            put(json, format!("{name}_batch_d2h_gbps"), bd);
            put(json, format!("{name}_batch_h2d_gbps"), bh);
        }
        put(json, format!("{name}_d2h_gbps_lbnhc_to_lbhnc"), conv_d);
        put(json, format!("{name}_h2d_gbps_lbhnc_to_lbnhc"), conv_h);
        if name == "llama8b" {
            put(json, "bidir_gbps".into(), both);
        }
    }

    if !a.quick {
        // How many thread blocks the kernel needs: fewer leave more SMs to the model.
        println!();
        println!(
            "{:<10} {:>5} | {:>7} {:>7} {:>7}",
            "page", "ctas", "d2h", "h2d", "bidir"
        );
        for ctas in [8u32, 16, 32, 66] {
            let e = Engine::new(EngineConfig {
                max_ctas: ctas,
                ..EngineConfig::default()
            })?;
            for (size, name) in [(4u64 << 10, "4k"), (64 << 10, "64k")] {
                let shape = PageShape {
                    num_heads: 1,
                    tokens_per_block: (size / 512) as u32,
                    entry_bytes: 512,
                };
                let n = (total / (SWEEP_LAYERS as u64 * size)) as u32;
                let mut s = setup(
                    &e,
                    &mut rng,
                    SWEEP_LAYERS,
                    shape,
                    n,
                    KvLayout::Lbnhc,
                    KvLayout::Lbnhc,
                )?;
                let d = measure(&e, &mut s, Dir::D2h, CopyPath::Kernel, reps)?;
                let h = measure(&e, &mut s, Dir::H2d, CopyPath::Kernel, reps)?;
                let b = measure(&e, &mut s, Dir::Both, CopyPath::Kernel, reps)?;
                println!("{name:<10} {ctas:>5} | {d:>7.1} {h:>7.1} {b:>7.1}");
                put(json, format!("ctas{ctas}_d2h_gbps_{name}"), d);
                put(json, format!("ctas{ctas}_h2d_gbps_{name}"), h);
                put(json, format!("ctas{ctas}_bidir_gbps_{name}"), b);
            }
        }
    }

    if a.explore {
        explore(engine, &mut rng)?;
    }

    if a.torch {
        println!();
        match torch_baseline(a.quick, total, reps) {
            Ok(m) => {
                println!(
                    "{:<8} | {:>9} {:>9} | {:>9} {:>9}",
                    "page", "torch d2h", "torch h2d", "ours/t d2h", "ours/t h2d"
                );
                for (_, name) in SIZES {
                    let td = m
                        .get(&format!("torch_d2h_gbps_{name}"))
                        .and_then(Value::as_f64);
                    let th = m
                        .get(&format!("torch_h2d_gbps_{name}"))
                        .and_then(Value::as_f64);
                    if let (Some(td), Some(th)) = (td, th) {
                        let od = json[&format!("d2h_gbps_{name}")].as_f64().unwrap_or(0.0);
                        let oh = json[&format!("h2d_gbps_{name}")].as_f64().unwrap_or(0.0);
                        println!(
                            "{name:<8} | {td:>9.1} {th:>9.1} | {:>9.2}x {:>9.2}x",
                            od / td,
                            oh / th
                        );
                        put(json, format!("torch_d2h_gbps_{name}"), td);
                        put(json, format!("torch_h2d_gbps_{name}"), th);
                        put(json, format!("d2h_vs_torch_{name}"), od / td);
                        put(json, format!("h2d_vs_torch_{name}"), oh / th);
                    }
                }
            }
            Err(e) => println!("torch baseline not run: {e}"),
        }
    }
    Ok(())
}

fn main() {
    let a = args();
    let t0 = Instant::now();
    let mut json = Map::new();
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "cargo bench --bench gpu".into())
            .into(),
    );
    let engine = match gpu_unavailable_reason() {
        Some(reason) if std::env::var("KVMESH_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            eprintln!("gpu benchmark failed: KVMESH_REQUIRE_GPU=1 but no usable GPU ({reason})");
            std::process::exit(1);
        }
        Some(reason) => {
            println!("gpu benchmark skipped: no usable GPU ({reason})");
            None
        }
        None => match Engine::new(EngineConfig::default()) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("gpu benchmark failed: the engine could not start: {e}");
                std::process::exit(1);
            }
        },
    };
    json.insert("machine".into(), machine(engine.as_ref()).into());
    if let Some(engine) = &engine {
        if let Err(e) = run(&a, engine, &mut json) {
            eprintln!("gpu benchmark failed: {e}");
            std::process::exit(1);
        }
    }
    std::fs::create_dir_all("target/bench").ok();
    if let Err(e) = std::fs::write(
        "target/bench/gpu.json",
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    ) {
        eprintln!("could not write target/bench/gpu.json: {e}");
        std::process::exit(1);
    }
    eprintln!(
        "[gpu] wrote target/bench/gpu.json in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
