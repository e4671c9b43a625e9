"""Helper process of tests/gpu.rs: vLLM-shaped KV caches made with torch, shared over CUDA IPC.

Reads one JSON line (the geometry), makes two caches the way vLLM does (one int8 backing buffer,
per-layer strided views of logical shape [blocks, heads, tokens, 2 * head_size] in the physical
order of the layout), fills the source with random bytes and the destination with a poison byte,
and prints their IPC handles and per-layer offsets and strides as torch sees them. Then it reads
the moves the engine made (source block -> destination block) and checks with torch that every
moved block holds the source's values (token by token, head by head, whatever the two layouts)
and that every other destination block still holds the poison. Prints one JSON line per step;
{"error": ...} when torch or CUDA is missing.
"""

import json
import sys


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        emit({"error": f"torch not importable: {e}"})
        return 0
    if not torch.cuda.is_available():
        emit({"error": "torch sees no CUDA device"})
        return 0
    cfg = json.loads(sys.stdin.readline())
    layers, blocks = cfg["layers"], cfg["blocks"]
    heads, tokens, head_size = cfg["heads"], cfg["tokens"], cfg["head_size"]
    dtype = torch.bfloat16
    esize = 2
    page = heads * tokens * 2 * head_size * esize
    poison = cfg["poison"]

    def make(layout, random):
        buf = torch.empty(layers * blocks * page, dtype=torch.int8, device="cuda")
        if random:
            buf.random_(-128, 128)
        else:
            buf.fill_(poison - 256 if poison > 127 else poison)
        views = []
        for l in range(layers):
            raw = buf[l * blocks * page:(l + 1) * blocks * page].view(dtype)
            if layout == "LBNHC":
                v = raw.view(blocks, tokens, heads, 2 * head_size).permute(0, 2, 1, 3)
            elif layout == "LBHNC":
                v = raw.view(blocks, heads, tokens, 2 * head_size)
            else:
                raise ValueError(layout)
            views.append(v)  # logical [blocks, heads, tokens, 2 * head_size]
        return buf, views

    src_buf, src = make(cfg["src_layout"], True)
    dst_buf, dst = make(cfg["dst_layout"], False)
    torch.cuda.synchronize()

    def export(buf, views):
        share = buf.untyped_storage()._share_cuda_()
        handle, offset = share[1], share[3]
        # Recent torch prefixes the cudaIpcMemHandle_t with a version byte and a kind byte
        # ('c' for memory from cudaMalloc, 'e' for expandable segments, which this does not map).
        if len(handle) == 66 and handle[1:2] == b"c":
            handle = handle[2:]
        if len(handle) != 64:
            raise ValueError(f"unsupported torch IPC handle of {len(handle)} bytes: {handle[:2]!r}")
        return {
            "handle": handle.hex(),
            "offset": offset,
            "layers": [offset + v.data_ptr() - buf.data_ptr() for v in views],
            "block_stride": views[0].stride(0) * esize,
        }

    emit({"src": export(src_buf, src), "dst": export(dst_buf, dst)})

    try:
        moves = json.loads(sys.stdin.readline())["moves"]
    except (ValueError, KeyError):
        return 0  # the engine side failed and said so
    torch.cuda.synchronize()
    bits = lambda t: t.contiguous().view(torch.int16)  # noqa: E731 - compare bits (NaNs too)
    moved = set()
    for s, d in moves:
        moved.add(d)
        for l in range(layers):
            if not torch.equal(bits(dst[l][d]), bits(src[l][s])):
                emit({"error": f"block {s} -> {d}, layer {l}: values differ"})
                return 0
    rest = torch.tensor([b for b in range(blocks) if b not in moved], dtype=torch.long, device="cuda")
    want = torch.tensor(poison * 257, dtype=torch.int32).to(torch.int16)
    for l in range(layers):
        if rest.numel() and not bool((bits(dst[l].index_select(0, rest)) == want.cuda()).all()):
            emit({"error": f"layer {l}: a block that was not a destination was written"})
            return 0
    emit({"ok": len(moves)})
    sys.stdin.readline()  # the engine has unmapped the caches
    return 0


if __name__ == "__main__":
    sys.exit(main())
