"""kvmesh.vllm.KvmeshConnector on real vLLM engines (the CPU build, the tiny random-weight test
model from tests/vllm), greedy decoding throughout.

Two engines are started once for the module: one plain, one with the connector (a small host tier
backed by a disk tier). vLLM's own prefix cache is emptied between the steps of a test with its
dev endpoint ``POST /reset_prefix_cache`` (the connector's store is kept), so a repeated prompt
can only be served from kvstore.

Prefill/decode runs two more connector engines, each in its own network namespace (its own
network stack and address), with `kvmesh proxy` in front: the decode engine pulls the prompt's
blocks from the prefill engine over kvtransfer (TCP across the namespaces). The same two engines
publish their KV events to a `kvmesh serve` daemon on the host, which their connectors ask for
east-west pulls: a prompt one engine offloaded to its host tier is pulled from there by the other.
"""

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from engine import Engine, free_port, http_post_json  # noqa: E402

BLOCK = 32  # tokens per vLLM block (the engines' --block-size)
# The tiny model: 4 layers, 2 KV heads, head size 64, bf16: 4 * 2 * 32 * 128 * 2 bytes per block.
BLOCK_BYTES = 4 * 2 * BLOCK * 128 * 2
HOST_BLOCKS = 16


def connector_config(disk_path: str, **extra) -> str:
    cfg = {
        "kv_connector": "KvmeshConnector",
        "kv_connector_module_path": "kvmesh.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "host_bytes": HOST_BLOCKS * BLOCK_BYTES,
            "disk_path": disk_path,
            "disk_bytes": 64 << 20,
            **extra,
        },
    }
    return json.dumps(cfg)


@pytest.fixture(scope="module")
def disk_dir():
    with tempfile.TemporaryDirectory(prefix="kvmesh-connector-") as d:
        yield d


@pytest.fixture(scope="module")
def engines(disk_dir):
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    plain = Engine("plain", free_port(), free_port(), free_port(), num_blocks=48,
                   omp_threads_bind="0", extra_env=env)
    conn = Engine("conn", free_port(), free_port(), free_port(), num_blocks=48,
                  omp_threads_bind="1", extra_env=env,
                  extra_args=["--kv-transfer-config", connector_config(disk_dir)])
    try:
        plain.start()
        conn.start()
        yield plain, conn
    finally:
        for e in (conn, plain):
            e.stop()


def reset_gpu_cache(e: Engine) -> None:
    req = urllib.request.Request(f"{e.url}/reset_prefix_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, f"reset_prefix_cache answered {r.status}"


def metric(e: Engine, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"{e.url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(e: Engine, prompt, max_tokens=16):
    r = e.complete(prompt, max_tokens=max_tokens)
    return r["choices"][0]["text"], Engine.cached_tokens(r)


def ttft(e: Engine, prompt) -> float:
    t = time.perf_counter()
    e.complete(prompt, max_tokens=1)
    return time.perf_counter() - t


def prompts(seed, n, length):
    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(length)] for _ in range(n)]


def test_outputs_identical_with_and_without_connector(engines):
    plain, conn = engines
    ps = prompts(1, 4, 300) + prompts(2, 2, 700)
    for p in ps:
        want, _ = complete(plain, p)
        first, _ = complete(conn, p)
        assert first == want, "the connector changed the output of a first (uncached) request"
    reset_gpu_cache(conn)
    reloaded = 0
    for p in ps:
        want, _ = complete(plain, p)
        got, cached = complete(conn, p)
        reloaded += cached
        assert got == want, "a request served from kvstore gave a different output"
    assert reloaded > 0, "no prompt was served from kvstore after vLLM's cache was emptied"


def test_evicted_prompt_is_served_from_kvstore_with_lower_ttft(engines):
    plain, conn = engines
    (p,) = prompts(3, 1, 800)
    want, _ = complete(plain, p)
    hits0 = metric(conn, "vllm:external_prefix_cache_hits_total")
    host0 = metric(conn, "vllm:prompt_tokens_cached_by_source_total", source="host")
    disk0 = metric(conn, "vllm:prompt_tokens_cached_by_source_total", source="disk")
    first, cached = complete(conn, p)
    assert first == want and cached == 0
    time.sleep(0.5)  # let the background copies finish and reach the scheduler
    reset_gpu_cache(conn)
    got, cached = complete(conn, p)
    assert got == want
    # Every full block but the one holding the last prompt token ((800 - 1) // 32 blocks).
    assert cached == (len(p) - 1) // BLOCK * BLOCK, f"cached_tokens {cached}"
    assert metric(conn, "vllm:external_prefix_cache_hits_total") - hits0 == cached
    # 25 blocks do not fit the 16-block host tier: the oldest come back from the disk tier.
    host = metric(conn, "vllm:prompt_tokens_cached_by_source_total", source="host") - host0
    disk = metric(conn, "vllm:prompt_tokens_cached_by_source_total", source="disk") - disk0
    assert host > 0 and disk > 0 and host + disk == cached, (host, disk, cached)

    # TTFT: reloading against recomputing the same length (fresh prompts), medians of 5.
    reload, recompute = [], []
    for i, q in enumerate(prompts(4, 5, 800)):
        recompute.append(ttft(conn, q))
        time.sleep(0.3)
        reset_gpu_cache(conn)
        reload.append(ttft(conn, q))
    r, c = statistics.median(reload), statistics.median(recompute)
    print(f"ttft reload {r * 1e3:.1f} ms, recompute {c * 1e3:.1f} ms")
    assert r < c, f"reload from kvstore ({r * 1e3:.1f} ms) is not faster than recompute ({c * 1e3:.1f} ms)"


def test_failed_load_makes_vllm_recompute(engines, disk_dir):
    plain, conn = engines
    (p,) = prompts(5, 1, 900)
    want, _ = complete(plain, p)
    assert complete(conn, p)[0] == want
    time.sleep(0.5)
    # Let the disk tier's writes land, then overwrite every data file: each block read from disk
    # now fails its checksum.
    reset_gpu_cache(conn)
    data = sorted(Path(disk_dir).glob("kvstore.*.dat"))
    assert data, f"no disk-tier data files in {disk_dir}"
    time.sleep(1.0)
    for f in data:
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            for off in range(0, size, 1 << 20):
                fh.write(b"\xa5" * min(1 << 20, size - off))
            fh.flush()
            os.fsync(fh.fileno())
    log0 = conn.log_tail(1 << 30)
    got, cached = complete(conn, p)
    assert got == want, "a failed load changed the output"
    log1 = conn.log_tail(1 << 30)
    assert log1.count("block loads failed") > log0.count("block loads failed"), (
        "the connector reported no failed load to vLLM")
    recovered = "Recovered from KV load failure"
    assert log1.count(recovered) > log0.count(recovered), "vLLM did not recompute the failed blocks"


def kvmesh_bin() -> str:
    path = os.environ.get("KVMESH_BIN") or str(ROOT / "target" / "debug" / "kvmesh")
    assert os.path.exists(path), f"no kvmesh binary at {path}: run `cargo build` or set KVMESH_BIN"
    return path


def test_tier_events_reach_kvmesh_serve(engines):
    """The connector's CPU/STORAGE tier events go out with vLLM's own KV events: a kvmesh daemon
    fed by the engine sees the offloaded prefix on those tiers once vLLM dropped it from its own."""
    import kvmesh

    _, conn = engines
    proc = subprocess.Popen(
        [kvmesh_bin(), "serve", "--listen", "127.0.0.1:0", "--grpc-listen", "off",
         "--model", "tiny",
         "--engine", f"conn={conn.pub_endpoint},replay={conn.replay_endpoint}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        t = time.time()
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "kvmesh serve exited"
            if "listening on" in line:
                url = line.split("listening on", 1)[1].strip().split()[0]
            assert time.time() - t < 30, "kvmesh serve did not start"
        client = kvmesh.IndexClient(url)
        time.sleep(1.0)  # the daemon's ZMQ subscription is up before the engine publishes
        (p,) = prompts(8, 1, 640)
        complete(conn, p)
        time.sleep(1.0)
        reset_gpu_cache(conn)
        full = len(p) // BLOCK
        deadline = time.time() + 20
        while True:
            scores = {s.name: s for s in client.score("tiny", p)}
            s = scores.get("conn")
            # Every block on the disk tier, the newest HOST_BLOCKS also in host memory. (vLLM's
            # own GPU copies stay indexed: its cache reset publishes no removal.)
            if s is not None and s.storage == full and s.cpu == min(HOST_BLOCKS, full):
                break
            assert time.time() < deadline, (
                f"the daemon never saw the offloaded prefix: gpu {s.gpu}, cpu {s.cpu}, storage {s.storage}"
                if s else f"no score for the engine: {scores}")
            time.sleep(0.2)
        assert s.matched_blocks == full, s
    finally:
        proc.terminate()
        proc.wait(10)


# --- prefill/decode across two network namespaces -------------------------------------------

def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"`ip {' '.join(args)}` failed: {r.stderr.strip()}"


class NetnsEngine(Engine):
    """An engine started inside a network namespace (its own network stack and address)."""

    def __init__(self, netns: str, *a, **kw):
        super().__init__(*a, **kw)
        self.netns = netns

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces, 10.78.0.2 and 10.78.0.3, on a bridge with this host at 10.78.0.1."""
    assert os.geteuid() == 0, "the prefill/decode test needs root to create network namespaces"
    tag = str(os.getpid() % 10000)
    br, hosts = f"kvbr{tag}", [(f"kvp{tag}", "10.78.0.2"), (f"kvd{tag}", "10.78.0.3")]
    made = []
    try:
        ip("link", "add", br, "type", "bridge")
        made.append(("link", br))
        ip("addr", "add", "10.78.0.1/24", "dev", br)
        ip("link", "set", br, "up")
        for i, (ns, addr) in enumerate(hosts):
            ip("netns", "add", ns)
            made.append(("netns", ns))
            host_end, ns_end = f"kvh{tag}{i}", f"kvn{tag}{i}"
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            made.append(("link", host_end))
            ip("link", "set", ns_end, "netns", ns)
            ip("link", "set", host_end, "master", br)
            ip("link", "set", host_end, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
            ip("-n", ns, "link", "set", ns_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for kind, name in reversed(made):
            subprocess.run(["ip", kind, "del", name], capture_output=True)


def pd_engine(netns: str, name: str, addr: str, core: str, pub_port: int, replay_port: int,
              **extra) -> NetnsEngine:
    """A connector engine in `netns` whose kvtransfer agent listens on `addr` (TCP)."""
    cfg = {"kv_connector": "KvmeshConnector", "kv_connector_module_path": "kvmesh.vllm",
           "kv_role": "kv_both",
           "kv_connector_extra_config": {"transfer_host": addr, "transfer_backend": "tcp",
                                         "engine_name": name, **extra}}
    return NetnsEngine(netns, name, free_port(), pub_port, replay_port, num_blocks=48,
                       host=addr, omp_threads_bind=core,
                       extra_args=["--kv-transfer-config", json.dumps(cfg)])


def start_daemon(listen: str, *args: str):
    """`kvmesh serve` on `listen` (port 0); returns the process and its HTTP URL."""
    proc = subprocess.Popen(
        [kvmesh_bin(), "serve", "--listen", listen, "--grpc-listen", "off", "--model", "tiny", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while True:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "kvmesh serve exited"
        if "listening on" in line:
            return proc, line.split("listening on", 1)[1].strip().split()[0]
        assert time.time() - t < 30, "kvmesh serve did not start"


@pytest.fixture(scope="module")
def pd(two_hosts, engines):
    (pns, pip), (dns, dip) = two_hosts
    started = []
    daemon = None
    try:
        # Every port is free inside a fresh namespace: fixed ports name the engines' endpoints.
        tport, pub, replay = free_port(), free_port(), free_port()
        peers = {"prefill": f"{pip}:{tport}", "decode": f"{dip}:{tport}"}
        # The index both engines publish to and ask for east-west pulls, on the bridge.
        daemon, index = start_daemon(
            "10.78.0.1:0",
            "--engine", f"prefill=tcp://{pip}:{pub},replay=tcp://{pip}:{replay}",
            "--engine", f"decode=tcp://{dip}:{pub},replay=tcp://{dip}:{replay}")
        ew = {"index_url": index, "peers": peers, "transfer_port": tport}
        # One core each (the engines' idle loops spin on their cores).
        p = pd_engine(pns, "prefill", pip, "0", pub, replay, **ew)
        d = pd_engine(dns, "decode", dip, "1", pub, replay, **ew)
        for e in (p, d):
            started.append(e)
            e.start()
        # Port 0: the proxy picks a free port and says which on its first line.
        proxy = subprocess.Popen(
            [kvmesh_bin(), "proxy", "--listen", "127.0.0.1:0", "--prefill", p.url, "--decode", d.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = proxy.stderr.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"kvmesh proxy did not start: {line}{proxy.stderr.read() if proxy.poll() is not None else ''}"
        url = m.group(1)
        yield p, d, url, index
        proxy.terminate()
        proxy.wait(10)
    finally:
        for e in reversed(started):
            e.stop()
        if daemon is not None:
            daemon.terminate()
            daemon.wait(10)


def test_prefill_decode_across_network_namespaces(pd, engines):
    p, d, url, _ = pd
    plain, _ = engines
    long = prompts(6, 4, 500)
    # The second prompt shares ten blocks with the first: the decode engine holds those itself
    # and pulls only the blocks after them.
    shared = long[0][:320] + prompts(8, 1, 180)[0]
    for i, q in enumerate(long[:1] + [shared] + long[1:] + prompts(7, 2, 130)):
        want, _ = complete(plain, q)
        r = http_post_json(f"{url}/v1/completions", {
            "model": "tiny", "prompt": q, "max_tokens": 16, "temperature": 0})
        assert r["choices"][0]["text"] == want, f"prompt {i}: prefill/decode changed the output"
    # The decode engine pulled the prompts' full blocks from the prefill engine (source p2p),
    # all but the block holding each prompt's last token, and for the shared prompt only those
    # past its own ten; the prefill engine freed them after the reads.
    pulled = metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
    want_pulled = 4 * 480 + (480 - 320) + 2 * 128
    assert pulled == want_pulled, f"the decode engine pulled {pulled} tokens, not {want_pulled}"
    t = time.time()
    while metric(p, "vllm:kv_cache_usage_perc") > 0.0 and time.time() - t < 10:
        time.sleep(0.2)
    assert metric(p, "vllm:kv_cache_usage_perc") == 0.0, "the prefill engine kept blocks nobody reads"


def wait_for_host_tier(index: str, engine: str, prompt, blocks: int) -> None:
    """Waits until the daemon says `engine` holds the first `blocks` blocks of `prompt` in its host
    tier."""
    import kvmesh

    client = kvmesh.IndexClient(index)
    deadline = time.time() + 30
    while True:
        s = {x.name: x for x in client.score("tiny", prompt)}.get(engine)
        if s is not None and min(s.matched_blocks, s.cpu) >= blocks:
            return
        assert time.time() < deadline, f"the daemon never saw {engine}'s offloaded prefix: {s}"
        time.sleep(0.2)


def test_east_west_pull_from_a_peer_host_tier(pd, engines):
    """A prompt computed (and offloaded) on one engine is served on the other from the first one's
    host tier, found through the daemon; once that peer is dead, the other recomputes."""
    p, d, _, index = pd
    plain, _ = engines
    q, q2 = prompts(21, 2, 500)
    full = (len(q) - 1) // BLOCK  # all blocks but the one holding the last prompt token
    want, _ = complete(plain, q)
    assert complete(p, q)[0] == want
    wait_for_host_tier(index, "prefill", q, full)
    p2p = metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
    text, cached = complete(d, q)
    assert text == want, "the output changed with blocks pulled from the peer"
    assert cached == full * BLOCK, f"{cached} cached tokens, not the peer's {full * BLOCK}"
    got = metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p") - p2p
    assert got == full * BLOCK, f"{got} tokens came from the peer, not {full * BLOCK}"

    # The index still lists the peer's blocks, but the peer is gone: the engine recomputes.
    want2, _ = complete(plain, q2)
    assert complete(p, q2)[0] == want2
    wait_for_host_tier(index, "prefill", q2, full)
    p.stop()
    p2p = metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
    text2, cached2 = complete(d, q2)
    assert text2 == want2, "the output changed after a failed pull from a dead peer"
    assert metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p") == p2p
