"""kvmesh.BlockStore with the KV cache in GPU memory: vLLM's CUDA layouts made with torch
(FlashAttention's [2, blocks, tokens, heads, head_size] and FlashInfer's [blocks, 2, ...], each
with tokens outside heads (NHD) and heads outside tokens (HND, vLLM's stride permutation), and
MLA's [blocks, tokens, head_size]), described by ``kvmesh.kvcache`` as the connector does, saved
into the store and loaded back into other blocks by kvstore's CUDA copy engine. Destinations are
poisoned first; every moved block must be bit-exact and every other block untouched.

Without a GPU (CI) the module is skipped with the reason; `kvstore/cuda/run-gpu.sh` runs it on a
GPU machine.
"""

import random
import tempfile
import time

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch: the GPU store tests need one", allow_module_level=True)

from kvmesh import BlockStore, kvcache  # noqa: E402

LAYERS, BLOCKS, TOKENS, HEADS, HEAD = 4, 96, 16, 8, 128
POISON = 0x5A5A


def cache(kind: str, layers=LAYERS, blocks=BLOCKS, tokens=TOKENS, heads=HEADS, head=HEAD):
    """Per-layer bf16 KV tensors of random bits in vLLM's layout `kind`, and a function giving a
    block's whole data (every page list) of one layer as int16."""

    def rnd(*shape):
        return torch.randint(-32768, 32767, shape, dtype=torch.int16, device="cuda").view(torch.bfloat16)

    out = {}
    for layer in range(layers):
        if kind == "flash_nhd":
            t = rnd(2, blocks, tokens, heads, head)
        elif kind == "flash_hnd":
            t = rnd(2, blocks, heads, tokens, head).permute(0, 1, 3, 2, 4)
        elif kind == "flashinfer_nhd":
            t = rnd(blocks, 2, tokens, heads, head)
        elif kind == "flashinfer_hnd":
            t = rnd(blocks, 2, heads, tokens, head).permute(0, 1, 3, 2, 4)
        elif kind == "mla":
            t = rnd(blocks, tokens, head)
        else:
            raise ValueError(kind)
        out[f"model.layers.{layer}.self_attn"] = t

    def block(t, b):
        v = t[:, b] if kind.startswith("flash_") else t[b]
        return v.contiguous().view(torch.int16)

    return out, block


def poison(caches: dict, kind: str, ids: list[int]) -> None:
    idx = torch.tensor(ids, device="cuda")
    value = torch.tensor(POISON, dtype=torch.int16, device="cuda").view(torch.bfloat16)
    for t in caches.values():
        if kind.startswith("flash_"):
            t[:, idx] = value
        else:
            t[idx] = value


@pytest.mark.parametrize("kind", ["flash_nhd", "flash_hnd", "flashinfer_nhd", "flashinfer_hnd", "mla"])
def test_round_trip_is_bit_exact(kind):
    caches, block = cache(kind)
    desc = kvcache.describe(caches, BLOCKS)
    assert isinstance(desc, kvcache.GpuLayout)
    want_layout = "LBHNC" if kind.endswith("hnd") else "LBNHC"
    assert desc.layout == want_layout, desc
    lists = 1 if kind == "mla" else 2
    assert len(desc.layers) == LAYERS * lists
    store = BlockStore(desc.block_bytes, 48 * desc.block_bytes, gpu=True)
    store.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                              desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    rng = random.Random(hash(kind) & 0xFFFF)
    ids = rng.sample(range(BLOCKS), 80)
    src, dst = ids[:40], ids[40:]
    keys = [rng.getrandbits(64) for _ in src]
    store.order_after(torch.cuda.current_stream().cuda_stream)
    assert store.save(keys, src) == []
    before = {n: t.clone() for n, t in caches.items()}
    poison(caches, kind, dst)
    torch.cuda.synchronize()
    poisoned = {n: t.clone() for n, t in caches.items()}
    assert store.load(keys, dst) == [True] * 40
    torch.cuda.synchronize()
    for name, t in caches.items():
        for s, d in zip(src, dst):
            assert torch.equal(block(t, d), block(before[name], s)), f"{name}: block {d} is not block {s}"
        untouched = [b for b in range(BLOCKS) if b not in dst]
        for b in untouched[:: max(1, len(untouched) // 16)]:
            assert torch.equal(block(t, b), block(poisoned[name], b)), f"{name}: block {b} was touched"


def test_missing_blocks_are_reported_and_left_alone():
    caches, block = cache("flash_nhd")
    desc = kvcache.describe(caches, BLOCKS)
    store = BlockStore(desc.block_bytes, 16 * desc.block_bytes, gpu=True)
    store.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                              desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    assert store.save([1, 2], [3, 4]) == []
    poison(caches, "flash_nhd", [10, 11, 12])
    torch.cuda.synchronize()
    kept = {n: t.clone() for n, t in caches.items()}
    assert store.load([1, 99, 2], [10, 11, 12]) == [True, False, True]
    torch.cuda.synchronize()
    for name, t in caches.items():
        assert torch.equal(block(t, 10), block(t, 3))
        assert torch.equal(block(t, 12), block(t, 4))
        assert torch.equal(block(t, 11), block(kept[name], 11)), "a missing block was written"
    store.inject_load_failures(1)
    assert store.load([1], [20]) == [False]


def test_blocks_come_back_from_the_disk_tier():
    caches, block = cache("flash_hnd")
    desc = kvcache.describe(caches, BLOCKS)
    with tempfile.TemporaryDirectory(prefix="kvmesh-gpu-") as d:
        # Eight host slots for forty blocks: most are read back from disk (promoted into pinned
        # host slots, then scattered).
        store = BlockStore(desc.block_bytes, 8 * desc.block_bytes, d, 64 * desc.block_bytes, gpu=True)
        store.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                                  desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
        src, dst = list(range(0, 40)), list(range(50, 90))
        keys = [1000 + i for i in src]
        assert store.save(keys, src) == []
        store.flush()
        assert store.stats()["disk"]["blocks"] >= 32
        before = {n: t.clone() for n, t in caches.items()}
        poison(caches, "flash_hnd", dst)
        # In pieces smaller than the host tier, as the connector loads a request's blocks.
        for i in range(0, 40, 4):
            assert store.load(keys[i:i + 4], dst[i:i + 4]) == [True] * 4
        torch.cuda.synchronize()
        for name, t in caches.items():
            for s, dd in zip(src, dst):
                assert torch.equal(block(t, dd), block(before[name], s))


def test_bad_registrations_are_errors():
    caches, _ = cache("flash_nhd")
    desc = kvcache.describe(caches, BLOCKS)
    plain = BlockStore(desc.block_bytes, 8 * desc.block_bytes)
    with pytest.raises(RuntimeError, match="gpu=True"):
        plain.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                                  desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    store = BlockStore(desc.block_bytes, 8 * desc.block_bytes, gpu=True)
    with pytest.raises(ValueError, match="bytes per block"):
        store.register_gpu_layers(desc.layers[:-1], desc.block_stride, desc.num_blocks, desc.num_heads,
                                  desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    # Pageable host memory (the driver counts pinned host memory as an allocation).
    host = torch.empty(len(desc.layers) * BLOCKS * desc.page_bytes, dtype=torch.uint8)
    bases = [host.data_ptr() + i * BLOCKS * desc.page_bytes for i in range(len(desc.layers))]
    with pytest.raises(RuntimeError, match="CUDA copy engine"):
        store.register_gpu_layers(bases, desc.page_bytes, BLOCKS, desc.num_heads,
                                  desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    with pytest.raises(RuntimeError, match="CUDA copy engine"):
        # Blocks past the end of the allocation.
        store.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks * 4, desc.num_heads,
                                  desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)


def test_llama_8b_shaped_throughput():
    """Llama-3-8B's KV geometry (32 layers, 8 KV heads of 128, 16-token blocks): 2 MiB blocks in
    FlashAttention's layout. Prints the save and load rates (the benchmark is `benches/run gpu`)."""
    caches, block = cache("flash_nhd", layers=32, blocks=600, tokens=16, heads=8, head=128)
    desc = kvcache.describe(caches, 600)
    assert desc.block_bytes == 2 << 20
    store = BlockStore(desc.block_bytes, 300 * desc.block_bytes, gpu=True)
    store.register_gpu_layers(desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                              desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
    torch.cuda.synchronize()
    src, dst = list(range(0, 256)), list(range(300, 556))
    keys = list(range(1, 257))
    t = time.perf_counter()
    assert store.save(keys, src) == []
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    assert store.load(keys, dst) == [True] * 256
    load_s = time.perf_counter() - t
    gb = 256 * desc.block_bytes / 1e9
    print(f"\nLlama-3-8B blocks (2 MiB): save {gb / save_s:.1f} GB/s, load {gb / load_s:.1f} GB/s")
    for name in list(caches)[:2]:
        for s, d in zip(src[:8], dst[:8]):
            assert torch.equal(block(caches[name], d), block(caches[name], s))


def test_transfer_agents_move_gpu_pages():
    """Prefill/decode and east-west on GPU engines, as the connector does them: a decode agent
    READs a prefill agent's GPU pages into its own GPU pages (kvtransfer's host staging on both
    sides), and READs blocks in place from a peer store's host arena into its GPU pages."""
    from kvmesh import TransferAgent

    def pages(desc):
        return [(b, desc.block_stride) for b in desc.layers]

    def agent(name, caches, desc):
        a = TransferAgent(name, "127.0.0.1:0")
        for base, stride in pages(desc):
            a.register(base, stride * (desc.num_blocks - 1) + desc.page_bytes, gpu=desc.device)
        return a

    src, block = cache("flash_hnd")
    dst, _ = cache("flash_hnd")
    ds, dd = kvcache.describe(src, BLOCKS), kvcache.describe(dst, BLOCKS)
    prefill, decode = agent("prefill", src, ds), agent("decode", dst, dd)
    # The peer's store, its host arena registered before anyone loads the agent's metadata (as
    # the connector does at start).
    store = BlockStore(ds.block_bytes, 16 * ds.block_bytes, gpu=True)
    store.register_gpu_layers(ds.layers, ds.block_stride, ds.num_blocks, ds.num_heads,
                              ds.tokens_per_block, ds.entry_bytes, ds.layout, ds.device)
    prefill.register(*store.arena())
    peer = decode.connect(*prefill.address)
    rng = random.Random(7)
    ids = rng.sample(range(BLOCKS), 60)
    remote_ids, local_ids = ids[:30], ids[30:]
    poison(dst, "flash_hnd", local_ids)
    torch.cuda.synchronize()
    x = decode.transfer_blocks("read", peer, pages(dd), pages(ds), dd.page_bytes, local_ids,
                               remote_ids, notif=b"read", local_gpu=0, remote_gpu=0)
    assert x.wait(30) == 30 * dd.block_bytes
    for name in dst:
        for r, loc in zip(remote_ids, local_ids):
            assert torch.equal(block(dst[name], loc), block(src[name], r)), f"{name}: block {loc}"

    # East-west: the peer's store holds blocks in its host arena; read them in place into GPU
    # pages (each store block is the page lists' pages one after another).
    keys = [11, 12, 13]
    assert store.save(keys, [1, 2, 3]) == []
    lease, addrs = store.lease(keys, 30.0)
    assert len(addrs) == 3
    targets = [70, 71, 72]
    poison(dst, "flash_hnd", targets)
    torch.cuda.synchronize()
    local, remote = [], []
    for b, a in zip(targets, addrs):
        for i, (base, stride) in enumerate(pages(dd)):
            local.append((base + b * stride, dd.page_bytes))
            remote.append((a + i * dd.page_bytes, dd.page_bytes))
    x = decode.transfer("read", peer, local, remote, notif=b"release", local_gpu=0)
    assert x.wait(30) == 3 * dd.block_bytes
    assert store.release(lease)
    for name in dst:
        for s, t in zip([1, 2, 3], targets):
            assert torch.equal(block(dst[name], t), block(src[name], s)), f"{name}: block {t}"
