"""NIXL (nixl-cu12 wheel, UCX backend, host memory) measured the way `benches/run transfer`
measures kvtransfer: two processes, the initiator WRITEs into the target's registered memory.

    python nixl_bench.py [--quick]          # prints one JSON object of nixl_* figures

Each process is started with the UCX_TLS it needs (all transports for the same-host figures,
tcp only for tcp_1mib_gbps), so the script runs itself as target and initiator.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MIB = 1 << 20


def agent(name):
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def target(size):
    a = agent("target")
    buf = np.zeros(size, dtype=np.uint8)
    a.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
    sys.stdout.write(f"BASE {buf.ctypes.data}\nMETA {a.get_agent_metadata().hex()}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the initiator closes our stdin
    # NIXL 1.5.1 can crash while tearing down at interpreter exit: leave without teardown.
    os._exit(0)


def wait(a, h):
    while True:
        s = a.check_xfer_state(h)
        if s == "DONE":
            return
        if s == "ERR":
            raise RuntimeError("NIXL transfer failed")


def initiator(mode, quick):
    size = 160 * MIB
    env = dict(os.environ)
    if mode == "tcp":
        env["UCX_TLS"] = "tcp"
    p = subprocess.Popen(
        [sys.executable, __file__, "--target", str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    base = meta = None
    while meta is None:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("NIXL target exited")
        if line.startswith("BASE "):
            base = int(line.split()[1])
        elif line.startswith("META "):
            meta = bytes.fromhex(line.split()[1])
    a = agent("initiator")
    buf = np.full(size, 7, dtype=np.uint8)
    lbase = buf.ctypes.data
    a.register_memory([(lbase, size, 0, "")], "DRAM")
    out = {}
    reps = 5 if quick else 15

    def xfer(descs_l, descs_r):
        ld = a.get_xfer_descs(descs_l, "DRAM")
        rd = a.get_xfer_descs(descs_r, "DRAM")
        return a.initialize_xfer("WRITE", ld, rd, "target")

    # connect_ms: metadata load, then the first (4 KiB) transfer end to end.
    t = time.perf_counter()
    name = a.add_remote_agent(meta)
    assert name in ("target", b"target"), name
    h = xfer([(lbase, 4096, 0)], [(base, 4096, 0)])
    a.transfer(h)
    wait(a, h)
    out["connect_ms"] = (time.perf_counter() - t) * 1e3

    def gbps(h, nbytes, n):
        v = []
        for _ in range(n):
            t = time.perf_counter()
            a.transfer(h)
            wait(a, h)
            v.append(nbytes / (time.perf_counter() - t) / 1e9)
        return statistics.median(v)

    if mode == "tcp":
        # 64 transfers of 1 MiB in flight together, as kvtransfer's tcp_1mib_gbps.
        hs = [xfer([(lbase + i * MIB, MIB, 0)], [(base + i * MIB, MIB, 0)]) for i in range(64)]
        v = []
        for _ in range(reps):
            t = time.perf_counter()
            for h in hs:
                a.transfer(h)
            for h in hs:
                wait(a, h)
            v.append(64 * MIB / (time.perf_counter() - t) / 1e9)
        out["tcp_1mib_gbps"] = statistics.median(v)
    else:
        h = xfer([(lbase, 64 * MIB, 0)], [(base, 64 * MIB, 0)])
        gbps(h, 64 * MIB, 2)
        out["contig_64mib_gbps"] = gbps(h, 64 * MIB, reps)
        # 4096 scattered 16 KiB blocks (stride 32 KiB on both sides: nothing merges).
        n = 4096
        rows_l = np.array([(lbase + i * 32768, 16384, 0) for i in range(n)], dtype=np.uint64)
        rows_r = np.array([(base + i * 32768, 16384, 0) for i in range(n)], dtype=np.uint64)
        # desc_build_ns: descriptor lists from arrays plus the transfer request, per descriptor.
        v = []
        for _ in range(reps):
            t = time.perf_counter()
            h = xfer(rows_l, rows_r)
            v.append((time.perf_counter() - t) * 1e9 / n)
        out["desc_build_ns"] = statistics.median(v)
        gbps(h, n * 16384, 2)
        out["scattered_16kib_gbps"] = gbps(h, n * 16384, reps)
        # post_us: the post call of a prepared 4 KiB transfer.
        h = xfer([(lbase, 4096, 0)], [(base, 4096, 0)])
        v = []
        for _ in range(200 if quick else 1000):
            t = time.perf_counter()
            a.transfer(h)
            v.append((time.perf_counter() - t) * 1e6)
            wait(a, h)
        out["post_us"] = statistics.median(v)
    p.stdin.close()
    p.wait(timeout=30)
    return out


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--target":
        target(int(sys.argv[2]))
        return
    quick = "--quick" in sys.argv
    out = {}
    out.update(initiator("all", quick))
    t = initiator("tcp", quick)
    out["tcp_1mib_gbps"] = t["tcp_1mib_gbps"]
    print(json.dumps(out), flush=True)
    # NIXL 1.5.1 can crash while tearing down at interpreter exit: leave without teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
