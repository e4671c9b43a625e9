//! GPU tests of the copy engine: round trips GPU → host → GPU checked byte for byte against the
//! CPU reference, destinations poisoned first; bad pointers, bad moves and out-of-memory as errors.
//!
//! Without a GPU they print why and pass (CI is CPU-only); with `KVMESH_REQUIRE_GPU=1` (set by
//! `kvstore/cuda/run-gpu.sh`) a missing GPU fails instead. Plain `main` (no libtest harness) so
//! the skip reason and each case's result are always printed.

use std::time::Instant;

use kvstore_cuda::layout::{gather_on_cpu, scatter_on_cpu};
use kvstore_cuda::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const HOST_POISON: u8 = 0xA5;
const GPU_POISON: u8 = 0x5A;
/// A case returning `Err` with this prefix was skipped, with the reason after it.
const SKIP: &str = "skip: ";

type Case = (&'static str, fn(&Engine, &mut StdRng) -> Result<(), String>);

fn main() {
    let cases: &[Case] = &[
        ("round_trip_all_layouts_and_paths", round_trip_all),
        ("round_trip_block_outer_strides", round_trip_block_outer),
        ("both_directions_at_once", both_directions),
        ("staged_in_several_pieces", staged_pieces),
        ("torch_made_caches_over_ipc", torch_caches),
        ("registered_host_memory_and_stream_order", registered_host),
        ("bad_pointers_are_errors", bad_pointers),
        ("bad_moves_are_errors_and_write_nothing", bad_moves),
        ("out_of_memory_is_an_error", out_of_memory),
        ("many_transfers_in_flight", many_in_flight),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let Some(reason) = gpu_unavailable_reason() {
        if std::env::var("KVMESH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            println!("FAILED: KVMESH_REQUIRE_GPU=1 but no usable GPU: {reason}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
        println!(
            "SKIPPED {} GPU tests: no usable GPU ({reason})",
            cases.len()
        );
        println!("0 passed, 0 failed, {} skipped", cases.len());
        return;
    }
    let engine = match Engine::new(EngineConfig::default()) {
        Ok(e) => e,
        Err(e) => {
            println!("FAILED: the engine could not start: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let seed: u64 = std::env::var("KVMESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!(
        "device: {} (driver {}), seed {seed} (KVMESH_TEST_SEED to repeat)",
        engine.device().name().unwrap_or_default(),
        engine.device().driver_version().unwrap_or(0)
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(seed ^ fxhash(name));
        let t = Instant::now();
        match case(&engine, &mut rng) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.2?})", t.elapsed());
            }
            Err(e) if e.starts_with(SKIP) => {
                skipped += 1;
                println!("test {name} ... skipped: {}", &e[SKIP.len()..]);
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A GPU cache of `layers` layers in one device allocation, either layer-outer (vLLM's LB*
/// layouts: each layer's blocks contiguous) or block-outer (each block holds all its layers).
struct Cache {
    buf: DeviceBuffer,
    cache: KvCache,
}

fn make_cache(
    engine: &Engine,
    layers: usize,
    num_blocks: u32,
    shape: PageShape,
    layout: KvLayout,
    block_outer: bool,
) -> Result<Cache, String> {
    let page = shape.page_bytes();
    let total = layers as u64 * num_blocks as u64 * page;
    let buf = DeviceBuffer::alloc(engine.device(), total as usize).map_err(|e| e.to_string())?;
    let spec = if block_outer {
        CacheSpec {
            layers: (0..layers as u64).map(|l| buf.ptr() + l * page).collect(),
            num_blocks,
            block_stride: layers as u64 * page,
            shape,
            layout,
        }
    } else {
        CacheSpec::contiguous(
            (0..layers as u64)
                .map(|l| buf.ptr() + l * num_blocks as u64 * page)
                .collect(),
            num_blocks,
            shape,
            layout,
        )
    };
    // SAFETY: `buf` lives in the same struct as the registration and outlives every transfer.
    let cache = unsafe { engine.register_cache(spec) }.map_err(|e| e.to_string())?;
    Ok(Cache { buf, cache })
}

impl Cache {
    /// Each layer's bytes as the CPU reference wants them (from the layer base).
    fn layer_images(&self) -> Result<Vec<Vec<u8>>, String> {
        let mut all = vec![0u8; self.buf.len()];
        self.buf.read(0, &mut all).map_err(|e| e.to_string())?;
        let spec = self.cache.spec();
        Ok(spec
            .layers
            .iter()
            .map(|&b| {
                let o = (b - self.buf.ptr()) as usize;
                all[o..o + spec.layer_span() as usize].to_vec()
            })
            .collect())
    }
}

fn random_moves(rng: &mut StdRng, num_blocks: u32, num_slots: u32, n: usize) -> Vec<BlockMove> {
    let mut blocks: Vec<u32> = (0..num_blocks).collect();
    let mut slots: Vec<u32> = (0..num_slots).collect();
    blocks.shuffle(rng);
    slots.shuffle(rng);
    blocks
        .into_iter()
        .zip(slots)
        .take(n)
        .map(|(block, slot)| BlockMove { block, slot })
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Compares every (layer, block) page of two sets of layer images; every byte of a cache
/// belongs to exactly one page, so this covers the whole allocation.
fn compare_pages(
    spec: &CacheSpec,
    got: &[Vec<u8>],
    want: &[Vec<u8>],
) -> Option<(usize, u32, usize)> {
    let page = spec.shape.page_bytes() as usize;
    for l in 0..spec.layers.len() {
        for b in 0..spec.num_blocks {
            let o = spec.block_offset(b) as usize;
            if let Some(i) = first_difference(&got[l][o..o + page], &want[l][o..o + page]) {
                return Some((l, b, i));
            }
        }
    }
    None
}

/// Fills the cache with random bytes, gathers random blocks into poisoned host slots, checks
/// the whole host buffer against the CPU reference, scatters the slots into a poisoned second
/// cache at other random blocks and checks that whole cache too; finally scatters back to the
/// original block ids and checks the pages equal the source's.
#[allow(clippy::too_many_arguments)]
fn round_trip(
    engine: &Engine,
    rng: &mut StdRng,
    layers: usize,
    num_blocks: u32,
    shape: PageShape,
    gpu_layout: KvLayout,
    host_layout: KvLayout,
    block_outer: bool,
    path: CopyPath,
    n: usize,
) -> Result<(), String> {
    let what = format!(
        "{layers} layers x {num_blocks} blocks, {shape:?}, gpu {gpu_layout:?}, host {host_layout:?}, \
         block_outer {block_outer}, {path:?}, {n} moves"
    );
    let src = make_cache(engine, layers, num_blocks, shape, gpu_layout, block_outer)?;
    let dst = make_cache(engine, layers, num_blocks, shape, gpu_layout, block_outer)?;
    let mut fill = vec![0u8; src.buf.len()];
    rng.fill_bytes(&mut fill);
    src.buf.write(0, &fill).map_err(|e| e.to_string())?;
    dst.buf.fill(GPU_POISON).map_err(|e| e.to_string())?;
    let num_slots = n as u32 + 3;
    let slots = SlotSpec::packed(src.cache.spec(), num_slots, host_layout);
    let mut host =
        PinnedBuffer::alloc(engine.device(), slots.bytes() as usize).map_err(|e| e.to_string())?;
    host.as_mut_slice().fill(HOST_POISON);
    let moves = random_moves(rng, num_blocks, num_slots, n);

    engine
        .gather(&src.cache, &mut host, &slots, &moves, path)
        .and_then(|t| t.wait())
        .map_err(|e| format!("{what}: gather: {e}"))?;
    let images = src.layer_images()?;
    let refs: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
    let mut expect = vec![HOST_POISON; slots.bytes() as usize];
    gather_on_cpu(src.cache.spec(), &refs, &slots, &mut expect, &moves);
    if let Some(i) = first_difference(host.as_slice(), &expect) {
        return Err(format!(
            "{what}: gathered host bytes differ from the reference at byte {i}"
        ));
    }

    // Scatter the slots to other random blocks of the poisoned cache.
    let mut targets: Vec<u32> = (0..num_blocks).collect();
    targets.shuffle(rng);
    let back: Vec<BlockMove> = moves
        .iter()
        .zip(targets)
        .map(|(m, block)| BlockMove {
            block,
            slot: m.slot,
        })
        .collect();
    engine
        .scatter(&host, &slots, &dst.cache, &back, path)
        .and_then(|t| t.wait())
        .map_err(|e| format!("{what}: scatter: {e}"))?;
    let got = dst.layer_images()?;
    let mut want: Vec<Vec<u8>> = got.iter().map(|v| vec![GPU_POISON; v.len()]).collect();
    let mut want_refs: Vec<&mut [u8]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
    scatter_on_cpu(
        &slots,
        host.as_slice(),
        dst.cache.spec(),
        &mut want_refs,
        &back,
    );
    if let Some((l, b, i)) = compare_pages(dst.cache.spec(), &got, &want) {
        return Err(format!(
            "{what}: scattered GPU bytes differ from the reference in layer {l} block {b} byte {i}"
        ));
    }

    // And home again: the original block ids, pages equal to the source's.
    dst.buf.fill(GPU_POISON).map_err(|e| e.to_string())?;
    engine
        .scatter(&host, &slots, &dst.cache, &moves, path)
        .and_then(|t| t.wait())
        .map_err(|e| format!("{what}: scatter home: {e}"))?;
    let home = dst.layer_images()?;
    let page = shape.page_bytes() as usize;
    let spec = src.cache.spec();
    for m in &moves {
        for l in 0..layers {
            let o = spec.block_offset(m.block) as usize;
            if images[l][o..o + page] != home[l][o..o + page] {
                return Err(format!(
                    "{what}: block {} layer {l} did not survive the round trip",
                    m.block
                ));
            }
        }
    }
    Ok(())
}

fn round_trip_all(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    // (layers, blocks, shape, moves): Llama-3-8B (64 KiB pages), Llama-3-70B at TP8 (8 KiB),
    // a 4 KiB page, a 1 MiB page (DMA under Auto? no: 2 MiB threshold) and an odd small shape.
    let shapes = [
        (
            32usize,
            96u32,
            PageShape {
                num_heads: 8,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            40usize,
        ),
        (
            80,
            256,
            PageShape {
                num_heads: 1,
                tokens_per_block: 16,
                entry_bytes: 512,
            },
            100,
        ),
        (
            3,
            512,
            PageShape {
                num_heads: 2,
                tokens_per_block: 16,
                entry_bytes: 128,
            },
            300,
        ),
        (
            2,
            12,
            PageShape {
                num_heads: 8,
                tokens_per_block: 256,
                entry_bytes: 512,
            },
            5,
        ),
        (
            1,
            64,
            PageShape {
                num_heads: 4,
                tokens_per_block: 32,
                entry_bytes: 64,
            },
            63,
        ),
    ];
    let mut runs = 0;
    for &(layers, blocks, shape, n) in &shapes {
        for gpu_layout in [KvLayout::Lbnhc, KvLayout::Lbhnc] {
            for host_layout in [KvLayout::Lbnhc, KvLayout::Lbhnc] {
                let paths: &[CopyPath] = if gpu_layout == host_layout {
                    &[
                        CopyPath::Auto,
                        CopyPath::Kernel,
                        CopyPath::Dma,
                        CopyPath::Batch,
                        CopyPath::Bulk,
                        CopyPath::Staged,
                    ]
                } else {
                    &[CopyPath::Auto, CopyPath::Kernel, CopyPath::Staged]
                };
                for &path in paths {
                    if (path == CopyPath::Batch && !engine.has_batch_copy())
                        || (path == CopyPath::Bulk && !engine.has_bulk_copy())
                    {
                        continue;
                    }
                    round_trip(
                        engine,
                        rng,
                        layers,
                        blocks,
                        shape,
                        gpu_layout,
                        host_layout,
                        false,
                        path,
                        n,
                    )?;
                    runs += 1;
                }
            }
        }
    }
    if runs < 40 {
        return Err(format!("only {runs} round trips ran"));
    }
    Ok(())
}

fn round_trip_block_outer(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    let shape = PageShape {
        num_heads: 8,
        tokens_per_block: 16,
        entry_bytes: 256,
    };
    for path in [CopyPath::Kernel, CopyPath::Dma, CopyPath::Bulk] {
        if path == CopyPath::Bulk && !engine.has_bulk_copy() {
            continue;
        }
        round_trip(
            engine,
            rng,
            4,
            64,
            shape,
            KvLayout::Lbnhc,
            KvLayout::Lbnhc,
            true,
            path,
            20,
        )?;
    }
    round_trip(
        engine,
        rng,
        4,
        64,
        shape,
        KvLayout::Lbhnc,
        KvLayout::Lbnhc,
        true,
        CopyPath::Kernel,
        20,
    )
}

fn staged_pieces(_engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    // Staging room for 3 slots: 40 moves go through it in 14 pieces.
    let shape = PageShape {
        num_heads: 1,
        tokens_per_block: 16,
        entry_bytes: 512,
    };
    let small = Engine::new(EngineConfig {
        staging_bytes: 3 * 80 * shape.page_bytes(),
        ..EngineConfig::default()
    })
    .map_err(|e| e.to_string())?;
    for host_layout in [KvLayout::Lbnhc, KvLayout::Lbhnc] {
        round_trip(
            &small,
            rng,
            80,
            128,
            shape,
            KvLayout::Lbnhc,
            host_layout,
            false,
            CopyPath::Staged,
            40,
        )?;
    }
    Ok(())
}

fn both_directions(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    let shape = PageShape {
        num_heads: 8,
        tokens_per_block: 16,
        entry_bytes: 512,
    };
    let (layers, blocks, n) = (32, 128, 64);
    let a = make_cache(engine, layers, blocks, shape, KvLayout::Lbnhc, false)?;
    let b = make_cache(engine, layers, blocks, shape, KvLayout::Lbnhc, false)?;
    let mut fill = vec![0u8; a.buf.len()];
    rng.fill_bytes(&mut fill);
    a.buf.write(0, &fill).map_err(|e| e.to_string())?;
    b.buf.fill(GPU_POISON).map_err(|e| e.to_string())?;
    let slots = SlotSpec::packed(a.cache.spec(), n as u32, KvLayout::Lbnhc);
    let mut out =
        PinnedBuffer::alloc(engine.device(), slots.bytes() as usize).map_err(|e| e.to_string())?;
    out.as_mut_slice().fill(HOST_POISON);
    let mut inp =
        PinnedBuffer::alloc(engine.device(), slots.bytes() as usize).map_err(|e| e.to_string())?;
    rng.fill_bytes(inp.as_mut_slice());
    let gm = random_moves(rng, blocks, n as u32, n);
    let sm = random_moves(rng, blocks, n as u32, n);
    let g = engine
        .gather(&a.cache, &mut out, &slots, &gm, CopyPath::Auto)
        .map_err(|e| e.to_string())?;
    let s = engine
        .scatter(&inp, &slots, &b.cache, &sm, CopyPath::Auto)
        .map_err(|e| e.to_string())?;
    g.wait().map_err(|e| e.to_string())?;
    s.wait().map_err(|e| e.to_string())?;
    let images = a.layer_images()?;
    let refs: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
    let mut expect = vec![HOST_POISON; slots.bytes() as usize];
    gather_on_cpu(a.cache.spec(), &refs, &slots, &mut expect, &gm);
    if let Some(i) = first_difference(out.as_slice(), &expect) {
        return Err(format!("gather differs at byte {i}"));
    }
    let got = b.layer_images()?;
    let mut want: Vec<Vec<u8>> = got.iter().map(|v| vec![GPU_POISON; v.len()]).collect();
    let mut want_refs: Vec<&mut [u8]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
    scatter_on_cpu(&slots, inp.as_slice(), b.cache.spec(), &mut want_refs, &sm);
    if let Some((l, blk, i)) = compare_pages(b.cache.spec(), &got, &want) {
        return Err(format!("scatter differs in layer {l} block {blk} byte {i}"));
    }
    Ok(())
}

fn expect_err<T>(what: &str, r: Result<T, CudaError>, kind: ErrorKind) -> Result<(), String> {
    match r {
        Ok(_) => Err(format!("{what}: accepted")),
        Err(e) if e.kind() == kind => {
            println!("  {what}: {e}");
            Ok(())
        }
        Err(e) => Err(format!("{what}: wrong error kind {:?}: {e}", e.kind())),
    }
}

fn bad_pointers(engine: &Engine, _rng: &mut StdRng) -> Result<(), String> {
    let shape = PageShape {
        num_heads: 1,
        tokens_per_block: 16,
        entry_bytes: 256,
    };
    let page = shape.page_bytes();
    let buf =
        DeviceBuffer::alloc(engine.device(), (page * 64) as usize).map_err(|e| e.to_string())?;
    let heap = vec![0u8; (page * 64) as usize];
    let pinned =
        PinnedBuffer::alloc(engine.device(), (page * 64) as usize).map_err(|e| e.to_string())?;
    let cases: Vec<(&str, CacheSpec)> = vec![
        (
            "a made-up address",
            CacheSpec::contiguous(vec![0xdead_0000_0000], 64, shape, KvLayout::Lbnhc),
        ),
        (
            "a host heap pointer",
            CacheSpec::contiguous(vec![heap.as_ptr() as u64], 64, shape, KvLayout::Lbnhc),
        ),
        (
            "more blocks than the allocation holds",
            CacheSpec::contiguous(vec![buf.ptr()], 65, shape, KvLayout::Lbnhc),
        ),
        (
            "a base inside the allocation running past its end",
            CacheSpec::contiguous(vec![buf.ptr() + page], 64, shape, KvLayout::Lbnhc),
        ),
        (
            "a second layer outside any allocation",
            CacheSpec::contiguous(vec![buf.ptr(), 0x10], 64, shape, KvLayout::Lbnhc),
        ),
    ];
    for (what, spec) in cases {
        // SAFETY: registration is expected to fail; nothing is transferred.
        let r = unsafe { engine.register_cache(spec) };
        expect_err(what, r, ErrorKind::InvalidArgument)?;
    }
    // Mapped pinned host memory is reachable from the GPU, and the driver may report it as an
    // allocation: accepting it is harmless (the copies stay inside it). Print what happened.
    // SAFETY: as above.
    match unsafe {
        engine.register_cache(CacheSpec::contiguous(
            vec![pinned.addr()],
            64,
            shape,
            KvLayout::Lbnhc,
        ))
    } {
        Ok(_) => println!("  note: the driver reports pinned host memory as an allocation"),
        Err(e) => println!("  pinned host memory as a cache: {e}"),
    }
    // The good one registers.
    // SAFETY: `buf` outlives the registration, which is dropped at once.
    unsafe {
        engine.register_cache(CacheSpec::contiguous(
            vec![buf.ptr()],
            64,
            shape,
            KvLayout::Lbnhc,
        ))
    }
    .map_err(|e| format!("a valid cache was refused: {e}"))?;
    Ok(())
}

fn bad_moves(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    let shape = PageShape {
        num_heads: 2,
        tokens_per_block: 16,
        entry_bytes: 256,
    };
    let c = make_cache(engine, 2, 32, shape, KvLayout::Lbnhc, false)?;
    let mut fill = vec![0u8; c.buf.len()];
    rng.fill_bytes(&mut fill);
    c.buf.write(0, &fill).map_err(|e| e.to_string())?;
    let slots = SlotSpec::packed(c.cache.spec(), 8, KvLayout::Lbnhc);
    let mut host =
        PinnedBuffer::alloc(engine.device(), slots.bytes() as usize).map_err(|e| e.to_string())?;
    host.as_mut_slice().fill(HOST_POISON);
    let ok = BlockMove { block: 1, slot: 1 };
    let bad: Vec<(&str, Vec<BlockMove>, SlotSpec)> = vec![
        (
            "block out of range",
            vec![ok, BlockMove { block: 32, slot: 0 }],
            slots,
        ),
        (
            "slot out of range",
            vec![ok, BlockMove { block: 2, slot: 8 }],
            slots,
        ),
        (
            "two moves into one slot",
            vec![ok, BlockMove { block: 2, slot: 1 }],
            slots,
        ),
        (
            "slots larger than the host buffer",
            vec![ok],
            SlotSpec {
                num_slots: 9,
                ..slots
            },
        ),
        (
            "slot stride smaller than a block",
            vec![ok],
            SlotSpec {
                slot_stride: shape.page_bytes(),
                ..slots
            },
        ),
    ];
    for (what, moves, s) in bad {
        for path in [CopyPath::Kernel, CopyPath::Dma] {
            expect_err(
                what,
                engine
                    .gather(&c.cache, &mut host, &s, &moves, path)
                    .and_then(|t| t.wait()),
                ErrorKind::InvalidArgument,
            )?;
        }
    }
    if host.as_slice().iter().any(|&b| b != HOST_POISON) {
        return Err("a refused transfer wrote host memory".into());
    }
    // Scatter with a repeated destination block is refused and leaves the cache alone.
    expect_err(
        "two moves into one block",
        engine
            .scatter(
                &host,
                &slots,
                &c.cache,
                &[
                    BlockMove { block: 3, slot: 0 },
                    BlockMove { block: 3, slot: 1 },
                ],
                CopyPath::Kernel,
            )
            .and_then(|t| t.wait()),
        ErrorKind::InvalidArgument,
    )?;
    let mut after = vec![0u8; c.buf.len()];
    c.buf.read(0, &mut after).map_err(|e| e.to_string())?;
    if after != fill {
        return Err("a refused scatter wrote GPU memory".into());
    }
    // Layout conversion cannot go by DMA.
    let other = SlotSpec::packed(c.cache.spec(), 8, KvLayout::Lbhnc);
    expect_err(
        "LBNHC to LBHNC by DMA",
        engine
            .gather(&c.cache, &mut host, &other, &[ok], CopyPath::Dma)
            .and_then(|t| t.wait()),
        ErrorKind::InvalidArgument,
    )?;
    // The engine still works after all that.
    engine
        .gather(&c.cache, &mut host, &slots, &[ok], CopyPath::Kernel)
        .and_then(|t| t.wait())
        .map_err(|e| format!("engine broken after refusals: {e}"))?;
    Ok(())
}

fn out_of_memory(engine: &Engine, _rng: &mut StdRng) -> Result<(), String> {
    expect_err(
        "a 64 TiB device allocation",
        DeviceBuffer::alloc(engine.device(), 64 << 40),
        ErrorKind::OutOfMemory,
    )?;
    match PinnedBuffer::alloc(engine.device(), 64 << 40) {
        Ok(_) => return Err("a 64 TiB pinned allocation succeeded".into()),
        Err(e) => println!("  a 64 TiB pinned allocation: {e}"),
    }
    // Still usable afterwards.
    let b = DeviceBuffer::alloc(engine.device(), 1 << 20).map_err(|e| e.to_string())?;
    b.fill(1).map_err(|e| e.to_string())?;
    Ok(())
}

fn many_in_flight(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    // Several gathers queued back to back on one stream, each into its own host buffer, reusing
    // the engine's descriptor staging between them.
    let shape = PageShape {
        num_heads: 1,
        tokens_per_block: 16,
        entry_bytes: 256,
    };
    let c = make_cache(engine, 8, 1024, shape, KvLayout::Lbhnc, false)?;
    let mut fill = vec![0u8; c.buf.len()];
    rng.fill_bytes(&mut fill);
    c.buf.write(0, &fill).map_err(|e| e.to_string())?;
    let slots = SlotSpec::packed(c.cache.spec(), 200, KvLayout::Lbhnc);
    let mut hosts: Vec<PinnedBuffer> = (0..6)
        .map(|_| PinnedBuffer::alloc(engine.device(), slots.bytes() as usize))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let moves: Vec<Vec<BlockMove>> = (0..6)
        .map(|i| random_moves(rng, 1024, 200, 50 + 30 * i))
        .collect();
    let mut transfers = Vec::new();
    for (h, m) in hosts.iter_mut().zip(&moves) {
        h.as_mut_slice().fill(HOST_POISON);
        transfers.push(
            engine
                .gather(&c.cache, h, &slots, m, CopyPath::Kernel)
                .map_err(|e| e.to_string())?,
        );
    }
    for t in transfers {
        t.wait().map_err(|e| e.to_string())?;
    }
    let images = c.layer_images()?;
    let refs: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
    for (i, (h, m)) in hosts.iter().zip(&moves).enumerate() {
        let mut expect = vec![HOST_POISON; slots.bytes() as usize];
        gather_on_cpu(c.cache.spec(), &refs, &slots, &mut expect, m);
        if let Some(b) = first_difference(h.as_slice(), &expect) {
            return Err(format!("transfer {i} differs at byte {b}"));
        }
    }
    Ok(())
}

/// The helper script, found from the repository root, the crate or the build's source tree.
fn torch_script() -> Option<std::path::PathBuf> {
    [
        "kvstore/cuda/tests/torch_cache.py",
        "tests/torch_cache.py",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/torch_cache.py"),
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

/// vLLM-shaped caches made by torch in another process, reached over CUDA IPC: the engine
/// registers them from the offsets and strides torch reports, gathers random blocks of one into
/// host slots and scatters them into the other (a different layout), and torch checks the result
/// token by token and head by head.
fn torch_caches(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let require = std::env::var("KVMESH_REQUIRE_TORCH").is_ok_and(|v| v == "1");
    let skip = |why: String| {
        if require {
            Err(format!("KVMESH_REQUIRE_TORCH=1 but {why}"))
        } else {
            Err(format!("{SKIP}{why}"))
        }
    };
    let Some(script) = torch_script() else {
        return skip("tests/torch_cache.py not found".into());
    };
    let python = std::env::var("KVMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    // (layers, blocks, heads, tokens, head_size, src layout, dst layout, host layout, path, moves)
    let configs = [
        (
            4,
            64,
            8,
            16,
            128,
            "LBNHC",
            "LBHNC",
            KvLayout::Lbhnc,
            CopyPath::Auto,
            24,
        ),
        (
            4,
            64,
            8,
            16,
            128,
            "LBHNC",
            "LBNHC",
            KvLayout::Lbnhc,
            CopyPath::Staged,
            24,
        ),
        (
            80,
            96,
            1,
            16,
            128,
            "LBHNC",
            "LBNHC",
            KvLayout::Lbnhc,
            CopyPath::Auto,
            40,
        ),
        (
            32,
            40,
            8,
            16,
            128,
            "LBNHC",
            "LBNHC",
            KvLayout::Lbnhc,
            CopyPath::Auto,
            16,
        ),
    ];
    for (layers, blocks, heads, tokens, head_size, sl, dl, host_layout, path, n) in configs {
        let what = format!(
            "{layers} layers, {heads} heads, {sl} -> {dl} via {host_layout:?} slots, {path:?}"
        );
        let mut child = Command::new(&python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{SKIP}could not run {python}: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let mut read = || -> Result<serde_json::Value, String> {
            let line = lines
                .next()
                .ok_or("the torch helper exited early")?
                .map_err(|e| e.to_string())?;
            serde_json::from_str(&line).map_err(|e| format!("helper said {line:?}: {e}"))
        };
        let cfg = serde_json::json!({
            "layers": layers, "blocks": blocks, "heads": heads, "tokens": tokens,
            "head_size": head_size, "src_layout": sl, "dst_layout": dl, "poison": GPU_POISON,
        });
        writeln!(stdin, "{cfg}").map_err(|e| e.to_string())?;
        let shared = read()?;
        if let Some(e) = shared.get("error") {
            let _ = child.wait();
            return skip(format!("torch helper: {e}"));
        }
        let result = (|| -> Result<(), String> {
            let open = |side: &str, layout: KvLayout| -> Result<(IpcMemory, KvCache), String> {
                let s = &shared[side];
                let hex = s["handle"].as_str().ok_or("no handle")?;
                let handle: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                let mem = IpcMemory::open(engine.device(), &handle).map_err(|e| e.to_string())?;
                let offsets: Vec<u64> = s["layers"]
                    .as_array()
                    .ok_or("no layers")?
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .collect();
                let spec = CacheSpec {
                    layers: offsets.iter().map(|o| mem.ptr() + o).collect(),
                    num_blocks: blocks,
                    block_stride: s["block_stride"].as_u64().ok_or("no stride")?,
                    shape: PageShape {
                        num_heads: heads,
                        tokens_per_block: tokens,
                        entry_bytes: 2 * head_size * 2,
                    },
                    layout,
                };
                // SAFETY: the helper keeps the memory until told we are done, after `mem` drops.
                let cache = unsafe { engine.register_cache(spec) }.map_err(|e| e.to_string())?;
                Ok((mem, cache))
            };
            let layout = |s: &str| KvLayout::from_vllm(s).ok_or(format!("layout {s}"));
            let (_src_mem, src) = open("src", layout(sl)?)?;
            let (_dst_mem, dst) = open("dst", layout(dl)?)?;
            let num_slots = n as u32 + 5;
            let slots = SlotSpec::packed(src.spec(), num_slots, host_layout);
            let mut host = PinnedBuffer::alloc(engine.device(), slots.bytes() as usize)
                .map_err(|e| e.to_string())?;
            host.as_mut_slice().fill(HOST_POISON);
            let moves = random_moves(rng, blocks, num_slots, n);
            engine
                .gather(&src, &mut host, &slots, &moves, path)
                .and_then(|t| t.wait())
                .map_err(|e| format!("gather: {e}"))?;
            let mut targets: Vec<u32> = (0..blocks).collect();
            targets.shuffle(rng);
            let back: Vec<BlockMove> = moves
                .iter()
                .zip(&targets)
                .map(|(m, &block)| BlockMove {
                    block,
                    slot: m.slot,
                })
                .collect();
            engine
                .scatter(&host, &slots, &dst, &back, path)
                .and_then(|t| t.wait())
                .map_err(|e| format!("scatter: {e}"))?;
            let pairs: Vec<[u32; 2]> = moves
                .iter()
                .zip(&back)
                .map(|(g, s)| [g.block, s.block])
                .collect();
            writeln!(stdin, "{}", serde_json::json!({ "moves": pairs }))
                .map_err(|e| e.to_string())?;
            let verdict = read()?;
            match verdict.get("ok") {
                Some(k) if k.as_u64() == Some(n as u64) => Ok(()),
                _ => Err(format!("torch says {verdict}")),
            }
        })();
        // The mappings are closed by now; let the helper free its memory and exit.
        let _ = writeln!(stdin, "done");
        drop(stdin);
        let _ = child.wait();
        result.map_err(|e| format!("{what}: {e}"))?;
        println!("  torch checked {what}");
    }
    Ok(())
}

/// A host tier's own memory (page-aligned, allocated by Rust) registered with the driver and
/// used as slots by every path; the engine's streams ordered after the legacy default stream,
/// and that stream made to wait for a transfer.
fn registered_host(engine: &Engine, rng: &mut StdRng) -> Result<(), String> {
    let shape = PageShape {
        num_heads: 8,
        tokens_per_block: 16,
        entry_bytes: 256,
    };
    let c = make_cache(engine, 6, 128, shape, KvLayout::Lbnhc, false)?;
    let mut fill = vec![0u8; c.buf.len()];
    rng.fill_bytes(&mut fill);
    c.buf.write(0, &fill).map_err(|e| e.to_string())?;
    let slots = SlotSpec::packed(c.cache.spec(), 48, KvLayout::Lbnhc);
    let layout = std::alloc::Layout::from_size_align(slots.bytes() as usize, 4096)
        .map_err(|e| e.to_string())?;
    // SAFETY: non-zero size; freed below after the registration is dropped.
    let raw = unsafe { std::alloc::alloc(layout) };
    if raw.is_null() {
        return Err("host allocation failed".into());
    }
    let result = (|| -> Result<(), String> {
        // SAFETY: `raw` is valid for `slots.bytes()` bytes and outlives `host` (dropped at the
        // end of this closure, before the memory is freed); nothing else touches it.
        let mut host =
            unsafe { PinnedBuffer::register(engine.device(), raw, slots.bytes() as usize) }
                .map_err(|e| format!("register: {e}"))?;
        let images = c.layer_images()?;
        let refs: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
        for path in [CopyPath::Kernel, CopyPath::Staged, CopyPath::Dma] {
            host.as_mut_slice().fill(HOST_POISON);
            let moves = random_moves(rng, 128, 48, 40);
            // SAFETY: null is the legacy default stream of the current (primary) context.
            unsafe { engine.order_after(std::ptr::null_mut()) }.map_err(|e| e.to_string())?;
            let t = engine
                .gather(&c.cache, &mut host, &slots, &moves, path)
                .map_err(|e| format!("{path:?}: {e}"))?;
            // SAFETY: as above.
            unsafe { t.make_stream_wait(std::ptr::null_mut()) }.map_err(|e| e.to_string())?;
            t.wait().map_err(|e| format!("{path:?}: {e}"))?;
            let mut expect = vec![HOST_POISON; slots.bytes() as usize];
            gather_on_cpu(c.cache.spec(), &refs, &slots, &mut expect, &moves);
            if let Some(i) = first_difference(host.as_slice(), &expect) {
                return Err(format!("{path:?}: registered slots differ at byte {i}"));
            }
        }
        engine.device().synchronize().map_err(|e| e.to_string())
    })();
    // SAFETY: allocated above with this layout; the registration was dropped in the closure.
    unsafe { std::alloc::dealloc(raw, layout) };
    result
}
