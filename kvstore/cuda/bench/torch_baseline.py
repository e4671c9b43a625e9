"""The torch baseline of `benches/run gpu`: index_select into a contiguous GPU buffer, then one
copy to pinned host memory (and the reverse: one copy up, then index_copy_ into the cache).

This is torch's best case: the whole cache is one [layers, blocks, page] int8 tensor (so one
index_select covers all layers, where vLLM's per-layer views would need one per layer), the host
side is one contiguous pinned tensor, and the GPU staging buffer is allocated once outside the
timing. Prints one JSON object: {"torch_d2h_gbps_<size>": ..., "torch_h2d_gbps_<size>": ...}, or
{"error": "..."} when torch or a GPU is missing.
"""

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", required=True, help="comma-separated page sizes in bytes")
    ap.add_argument("--names", required=True, help="comma-separated figure suffixes")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--total", type=int, required=True, help="bytes per transfer")
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means no baseline
        print(json.dumps({"error": f"torch not importable: {e}"}))
        return
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return
    out = {"torch_version": torch.__version__}
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    dev = torch.device("cuda")
    for size, name in zip(map(int, a.sizes.split(",")), a.names.split(",")):
        n = max(1, a.total // (a.layers * size))
        blocks = 4 * n
        cache = torch.randint(-128, 127, (a.layers, blocks, size), dtype=torch.int8, device=dev)
        ids = torch.randperm(blocks, generator=g)[:n].to(dev)
        staging = torch.empty((a.layers, n, size), dtype=torch.int8, device=dev)
        host = torch.empty((a.layers, n, size), dtype=torch.int8, pin_memory=True)
        nbytes = a.layers * n * size

        def d2h():
            torch.index_select(cache, 1, ids, out=staging)
            host.copy_(staging, non_blocking=True)

        def h2d():
            staging.copy_(host, non_blocking=True)
            cache.index_copy_(1, ids, staging)

        for label, fn in (("d2h", d2h), ("h2d", h2d)):
            times = []
            for i in range(a.reps + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t)
            out[f"torch_{label}_gbps_{name}"] = nbytes / statistics.median(times) / 1e9
        # Check the round trip once (outside the timing): what went down comes back.
        d2h()
        torch.cuda.synchronize()
        want = cache.index_select(1, ids).cpu()
        if not torch.equal(host, want):
            print(json.dumps({"error": f"torch round trip mismatch at {name}"}))
            return
        del cache, staging, host
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
