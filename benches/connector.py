#!/usr/bin/env python3
"""`benches/run connector [--quick] [--trace FILE] [--disk-dir DIR]`: kvmesh's vLLM KV connector on
real vLLM engines (the CPU build and the tiny random-weight model of tests/vllm), against the same
engines without it. Prints a table and writes target/bench/connector.json.

Part 1, time to first token (TTFT) for 2k- and 4k-token prompts, streamed, one request at a time:

* ``ttft_host_ms_*``: a prompt the connector offloaded, asked again after vLLM's own prefix cache
  was emptied (``POST /reset_prefix_cache``; the connector's store is kept): every block but the
  last comes back from the store's host tier (engine "host": a host tier that holds everything).
* ``ttft_disk_ms_*``: the same on engine "disk", whose host tier holds only a few blocks in front
  of a disk tier (O_DIRECT, in ``--disk-dir``): the blocks come back from disk.
* ``ttft_recompute_ms_*``: a never-seen prompt of the same length on a plain engine (no connector):
  what vLLM pays to compute it.
* ``miss_overhead_pct_*``: the connector's cost when nothing is cached: the same never-seen prompt
  sent to the plain engine and to engine "host", interleaved (alternating which goes first);
  (median connector TTFT - median plain TTFT) / median plain TTFT * 100. ``miss_overhead_pct`` is
  the larger of the two sizes (target: at most 5%).

Where each reload came from is checked with vLLM's own counters
(``vllm:prompt_tokens_cached_by_source_total{source="host"|"disk"}``) and reported as
``host_reload_pct_*`` / ``disk_reload_pct_*``: the share of the prompt served from that tier.

Part 2, a multi-turn chat workload on two engines with small KV caches (a conversation's history
does not stay in an engine's own cache), several clients in a closed loop:

* kvmesh: two connector engines, a ``kvmesh serve`` daemon subscribed to both engines' KV events
  (vLLM's own and the connector's tier events); each request goes to the engine the daemon scores
  best for its tokens (ties: the engine with fewer requests in flight).
* baseline (``baseline_`` prefix): two plain engines with the same settings, no daemon; each
  request goes to the engine with fewer requests in flight (ties alternate).

Two rounds, each with fresh token ids, kvmesh and baseline alternating (kvmesh, baseline, then
baseline, kvmesh); every engine's own cache is emptied before each run. Figures, each the median of
the two rounds: ``throughput_rps`` (requests / wall time), ``ttft_p50_ms``, ``ttft_p90_ms`` (over
every request of the round, the routing decision included), and the share of prompt tokens served
from cache (``prefix_hit_pct``).

By default the conversations are synthetic: each turn is the history (a shared system prompt, a
document, the earlier turns and their replies) plus new user text, random token ids. ``--trace
FILE`` replays a Mooncake JSONL trace's prompts instead (each hash id becomes a block of
``--trace-block-tokens`` tokens, 64 by default: the trace's 512-token blocks scaled down for a CPU
engine; prompts are cut at 4,000 tokens), in trace order.

Five engines are started once, concurrently: plain, host and disk on core 0 for part 1 (one
OpenMP thread each, the connector's copies on the same core); plain and host are reused in part 2
with plain2 and host2 on core 1. Only one engine, or one pair, is busy at a time, and part 1 leaves
1.2 s between requests to different engines (vLLM's worker polls its queue for a second after
each request). Timings on a small shared machine are noisy: medians throughout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import shutil
import signal
import statistics
import tempfile
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from engine import MODEL_NAME, Engine, EngineError, free_port  # noqa: E402

BLOCK = 32  # tokens per vLLM block (tests/vllm engines run --block-size 32)
# One block of the tiny model: 4 layers x (K, V) x 2 KV heads x 32 tokens x 64 x bf16.
BLOCK_BYTES = 4 * 2 * 2 * BLOCK * 64 * 2
NUM_BLOCKS = 160  # each engine's own KV cache: 5,088 tokens, one 4k prompt and a bit
MAX_MODEL_LEN = 4224
HOST_BYTES = 512 << 20  # host tier of the "host" engines: 8,192 blocks, everything fits
DISK_HOST_BLOCKS = 4  # host tier in front of the disk tier of the "disk" engine
DISK_BYTES = 1 << 30
SIZES = {"2k": 2048, "4k": 4096}
VOCAB = (10, 4000)
TRACE_MAX_TOKENS = 4000


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[connector] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# engines, requests, metrics


def connector_config(host_bytes: int, disk_path: str | None = None) -> str:
    extra: dict = {"host_bytes": host_bytes}
    if disk_path is not None:
        extra.update({"disk_path": disk_path, "disk_bytes": DISK_BYTES})
    return json.dumps({
        "kv_connector": "KvmeshConnector",
        "kv_connector_module_path": "kvmesh.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    })


def make_engine(name: str, core: str, kv_transfer: str | None) -> Engine:
    extra = ["--kv-transfer-config", kv_transfer] if kv_transfer else []
    return Engine(
        f"bench-{name}", free_port(), free_port(), free_port(),
        num_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN, omp_threads_bind=core,
        extra_args=extra, extra_env={"VLLM_SERVER_DEV_MODE": "1"},
    )


def start_all(engines: list[Engine]) -> None:
    """Starts the engines concurrently. Each engine's start-up wait launches the next one through
    its `abort` hook, so every process is spawned from the main thread (and gets engine.py's
    parent-death signal); a failed start stops the ones already launched."""

    def chain(i: int) -> None:
        if i == len(engines):
            return
        launched = False
        launched_error: list[BaseException | None] = [None]

        def next_one() -> bool:
            nonlocal launched
            if not launched:
                launched = True
                try:
                    chain(i + 1)
                except BaseException as err:
                    launched_error[0] = err
                    raise
            return False

        e = engines[i]
        for attempt in range(3):
            log(f"starting {e.name} (log {e.log_path})")
            try:
                e.start(timeout=900, abort=next_one)
                break
            except EngineError as err:
                # Ports are picked free but can be taken before the engine binds them: retry
                # this engine (not one started from its wait) on fresh ports.
                if launched_error[0] is not None or "Address already in use" not in str(err) or attempt == 2:
                    raise
                log(f"{e.name}: a port was taken meanwhile; retrying on fresh ports")
                e.port, e.pub_port, e.replay_port = free_port(), free_port(), free_port()
                e.log_path = e.log_path.with_name(f"{e.name}-{e.port}.log")
        log(f"{e.name} ready")

    t = time.monotonic()
    chain(0)
    log(f"{len(engines)} engines ready in {time.monotonic() - t:.0f}s")


def reset_prefix_cache(e: Engine) -> None:
    req = urllib.request.Request(f"{e.url}/reset_prefix_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        if r.status != 200:
            raise BenchError(f"{e.name}: reset_prefix_cache answered {r.status}")


def metric(e: Engine, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{e.url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cached_by_source(e: Engine) -> dict[str, float]:
    return {s: metric(e, "vllm:prompt_tokens_cached_by_source_total", source=s) for s in ("host", "disk")}


class Result:
    __slots__ = ("ttft", "total", "cached", "prompt_tokens")

    def __init__(self, ttft: float, total: float, cached: int, prompt_tokens: int) -> None:
        self.ttft, self.total, self.cached, self.prompt_tokens = ttft, total, cached, prompt_tokens


def stream(e: Engine, prompt: list[int], max_tokens: int, t0: float | None = None) -> Result:
    """One streamed completion; TTFT is the time to the first chunk carrying a token (from `t0`
    when given, e.g. to count the routing decision)."""
    body = json.dumps({
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection(e.host, e.port, timeout=600)
    try:
        start = time.perf_counter() if t0 is None else t0
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"{e.name}: /v1/completions answered {resp.status}: {resp.read()[:500]!r}")
        ttft = None
        cached = prompt_tokens = 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if ttft is None and obj.get("choices"):
                ttft = time.perf_counter() - start
            usage = obj.get("usage")
            if usage:
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens") or 0)
        total = time.perf_counter() - start
    finally:
        conn.close()
    if ttft is None:
        raise BenchError(f"{e.name}: the stream ended without a token")
    return Result(ttft, total, cached, prompt_tokens)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def pctl(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]


# ------------------------------------------------------------------------------------------
# part 1: TTFT


# After a request, vLLM's worker keeps polling its message queue (busy, with sched_yield) for
# about a second; the part-1 engines share a core, so the next request to another engine waits
# that long, or it would compete with the poll.
SPIN_S = 1.2
# A connector's background copies after a request: the host tier's, the disk tier's write-behind.
SETTLE_HOST_S = 0.3
SETTLE_DISK_S = 1.0


class Pacer:
    """Spaces requests: SPIN_S after any request before one to another engine, `settle` seconds
    before the next one to the same engine."""

    def __init__(self) -> None:
        self.last: tuple[Engine | None, float] = (None, 0.0)

    def stream(self, e: Engine, prompt: list[int], settle: float = SETTLE_HOST_S) -> Result:
        last, at = self.last
        wait = at + (settle if last is e else SPIN_S) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            return stream(e, prompt, 1)
        finally:
            self.last = (e, time.monotonic())


def reload_ttft(pace: Pacer, e: Engine, prompt: list[int], tier: str, settle: float) -> tuple[float, float]:
    """Empties vLLM's own cache, asks `prompt` again (offloaded by the previous request to `e`);
    returns (TTFT, share of the prompt that vLLM's counters say came from `tier`)."""
    time.sleep(settle)
    reset_prefix_cache(e)
    before = cached_by_source(e)
    r = pace.stream(e, prompt, settle=0.0)
    after = cached_by_source(e)
    from_tier = after[tier] - before[tier]
    return r.ttft, from_tier / len(prompt)


def part_ttft(plain: Engine, host: Engine, disk: Engine, reps: int, pairs: int, seed: int,
              figures: dict) -> None:
    """`reps` prompts per size reloaded from each tier; `pairs` (at least `reps`) never-seen
    prompts on the plain and the connector engine."""
    rng = random.Random(seed)
    pace = Pacer()
    for label, n in SIZES.items():
        recompute, miss, host_t, disk_t = [], [], [], []
        host_share, disk_share = [], []
        # Warm-up (first requests of an engine are slower): one throwaway prompt each.
        w = tokens(rng, n)
        for e in (plain, host, disk):
            pace.stream(e, w)
        for i in range(max(reps, pairs)):
            p = tokens(rng, n)
            # A never-seen prompt on the plain engine and on the connector engine, alternating
            # which goes first.
            order = [(plain, recompute), (host, miss)]
            if i % 2:
                order.reverse()
            for e, out in order:
                out.append(pace.stream(e, p).ttft)
            if i >= reps:
                log(f"{label} pair {i + 1}/{pairs}: recompute {recompute[-1] * 1e3:.0f} ms, miss "
                    f"{miss[-1] * 1e3:.0f} ms")
                continue
            t, share = reload_ttft(pace, host, p, "host", SETTLE_HOST_S)
            host_t.append(t)
            host_share.append(share)
            q = tokens(rng, n)
            pace.stream(disk, q)
            t, share = reload_ttft(pace, disk, q, "disk", SETTLE_DISK_S)
            disk_t.append(t)
            disk_share.append(share)
            log(f"{label} rep {i + 1}/{reps}: recompute {recompute[-1] * 1e3:.0f} ms, miss "
                f"{miss[-1] * 1e3:.0f} ms, host {host_t[-1] * 1e3:.0f} ms ({share_pct(host_share[-1])}), "
                f"disk {disk_t[-1] * 1e3:.0f} ms ({share_pct(disk_share[-1])})")
        figures[f"ttft_recompute_ms_{label}"] = median_ms(recompute)
        figures[f"ttft_miss_ms_{label}"] = median_ms(miss)
        figures[f"ttft_host_ms_{label}"] = median_ms(host_t)
        figures[f"ttft_disk_ms_{label}"] = median_ms(disk_t)
        figures[f"miss_overhead_pct_{label}"] = (
            (figures[f"ttft_miss_ms_{label}"] - figures[f"ttft_recompute_ms_{label}"])
            / figures[f"ttft_recompute_ms_{label}"] * 100
        )
        figures[f"host_reload_pct_{label}"] = statistics.median(host_share) * 100
        figures[f"disk_reload_pct_{label}"] = statistics.median(disk_share) * 100
        for tier, shares in (("host", host_share), ("disk", disk_share)):
            if statistics.median(shares) < 0.5:
                raise BenchError(
                    f"{label}: reloads on the {tier} engine came from its {tier} tier for only "
                    f"{statistics.median(shares) * 100:.0f}% of the prompt: the figure would not be "
                    f"the {tier} tier's")
    figures["miss_overhead_pct"] = max(figures[f"miss_overhead_pct_{k}"] for k in SIZES)


def share_pct(x: float) -> str:
    return f"{x * 100:.0f}% from tier"


# ------------------------------------------------------------------------------------------
# part 2: multi-turn chat


class Workload:
    """Requests in a closed loop: `next()` hands a ready request (a conversation's next turn, or
    the trace's next prompt) to a client, `done()` makes the conversation's following turn ready."""

    def __init__(self, convs: list[list[list[int]]]) -> None:
        # convs[c][t]: the prompt of turn t of conversation c (histories included)
        self.convs = convs
        self.ready = list(range(len(convs)))  # FIFO of conversations whose next turn may go
        self.turn = [0] * len(convs)
        self.outstanding = sum(len(c) for c in convs)
        self.cv = threading.Condition()

    def next(self) -> tuple[int, list[int]] | None:
        with self.cv:
            while not self.ready:
                if self.outstanding == 0:
                    return None
                self.cv.wait()
            c = self.ready.pop(0)
            return c, self.convs[c][self.turn[c]]

    def done(self, c: int) -> None:
        with self.cv:
            self.turn[c] += 1
            self.outstanding -= 1
            if self.turn[c] < len(self.convs[c]):
                self.ready.append(c)
            self.cv.notify_all()

    @property
    def requests(self) -> int:
        return sum(len(c) for c in self.convs)


def synthetic_chat(seed: int, conversations: int, turns: int) -> list[list[list[int]]]:
    """Each conversation: a system prompt shared by all (128 tokens), a document (1,024 tokens)
    and a question (128) in turn 1; each later turn adds the previous reply (64) and a new user
    message (256)."""
    rng = random.Random(seed)
    system = tokens(rng, 128)
    convs = []
    for _ in range(conversations):
        history = system + tokens(rng, 1024) + tokens(rng, 128)
        prompts = [list(history)]
        for _ in range(turns - 1):
            history += tokens(rng, 64) + tokens(rng, 256)
            prompts.append(list(history))
        convs.append(prompts)
    return convs


def trace_chat(path: Path, requests: int, block_tokens: int) -> list[list[list[int]]]:
    """The first `requests` prompts of a Mooncake JSONL trace, each its own one-turn
    "conversation" (the trace's shared prefixes are its hash ids): hash id h becomes
    `block_tokens` tokens drawn from a generator seeded with h, the prompt is cut at
    input_length * block_tokens / 512 tokens (and at TRACE_MAX_TOKENS)."""
    out = []
    blocks: dict[int, list[int]] = {}
    try:
        f = open(path)
    except OSError as e:
        raise BenchError(f"cannot read the trace {path}: {e}") from e
    with f:
        for lineno, line in enumerate(f, 1):
            if len(out) == requests:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids = [int(h) for h in rec["hash_ids"]]
                length = int(rec["input_length"])
            except (ValueError, KeyError, TypeError) as e:
                raise BenchError(f"{path}:{lineno}: not a Mooncake trace record ({e})") from e
            if not ids or length <= 0:
                continue
            prompt: list[int] = []
            for h in ids:
                if h not in blocks:
                    blocks[h] = tokens(random.Random(h), block_tokens)
                prompt += blocks[h]
            n = min(len(prompt), max(1, math.ceil(length * block_tokens / 512)), TRACE_MAX_TOKENS)
            out.append([prompt[:n]])
    if not out:
        raise BenchError(f"{path}: no requests")
    return out


class Daemon:
    """`kvmesh serve` subscribed to the given engines' KV events."""

    def __init__(self, engines: list[Engine]) -> None:
        self.bin = kvmesh_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ROOT / "target" / "bench" / "connector-daemon.log"
        args = [str(self.bin), "serve", "--listen", f"127.0.0.1:{self.port}", "--grpc-listen", "off",
                "--model", MODEL_NAME]
        for e in engines:
            args += ["--engine", f"{e.name}={e.pub_endpoint},replay={e.replay_endpoint}"]
        self.names = [e.name for e in engines]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT))
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        t = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"kvmesh serve exited with {self.proc.returncode}; log {self.log_path}")
            try:
                # "waiting" until an engine's first event: being subscribed is enough.
                states = {s.name: s.state for s in self.client().engines()}
                if all(n in states for n in self.names):
                    time.sleep(0.5)  # let the ZMQ subscriptions settle
                    return
            except Exception:  # noqa: BLE001 (not up yet: connection refused, or a KvmeshError)
                pass
            if time.monotonic() - t > 30:
                raise BenchError(f"kvmesh serve not ready after 30s; log {self.log_path}")
            time.sleep(0.1)

    def client(self):
        import kvmesh

        return kvmesh.IndexClient(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kvmesh_binary() -> Path:
    """target/release/kvmesh, or where CARGO_TARGET_DIR put it (benches/run builds it)."""
    cands = []
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "kvmesh")
    cands.append(ROOT / "target" / "release" / "kvmesh")
    for c in cands:
        if c.is_file():
            return c
    raise BenchError("the kvmesh binary is missing: cargo build --release --bin kvmesh (benches/run connector does it)")


def run_chat(engines: list[Engine], convs: list[list[list[int]]], clients: int, max_tokens: int,
             route) -> dict:
    """Runs the workload; `route(prompt, busy)` picks an engine index."""
    work = Workload(convs)
    busy = [0] * len(engines)
    lock = threading.Lock()
    results: list[tuple[int, Result]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not errors:
                item = work.next()
                if item is None:
                    return
                c, prompt = item
                t0 = time.perf_counter()
                with lock:
                    snapshot = list(busy)
                i = route(prompt, snapshot)
                with lock:
                    busy[i] += 1
                try:
                    r = stream(engines[i], prompt, max_tokens, t0=t0)
                finally:
                    with lock:
                        busy[i] -= 1
                with lock:
                    results.append((i, r))
                    if len(results) % 10 == 0:
                        log(f"  {len(results)}/{work.requests} requests")
                work.done(c)
        except BaseException as e:  # reported by the caller
            errors.append(e)
            with work.cv:
                work.outstanding = 0
                work.ready.clear()
                work.cv.notify_all()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise errors[0]
    ttfts = [r.ttft for _, r in results]
    prompt_tokens = sum(r.prompt_tokens for _, r in results)
    return {
        "throughput_rps": len(results) / wall,
        "ttft_p50_ms": pctl(ttfts, 0.5) * 1e3,
        "ttft_p90_ms": pctl(ttfts, 0.9) * 1e3,
        "prefix_hit_pct": 100 * sum(r.cached for _, r in results) / max(1, prompt_tokens),
        "requests": len(results),
        "per_engine": [sum(1 for i, _ in results if i == k) for k in range(len(engines))],
    }


def least_busy_router(n: int):
    turn = [0]
    lock = threading.Lock()

    def route(_prompt: list[int], busy: list[int]) -> int:
        low = min(busy)
        cands = [i for i in range(n) if busy[i] == low]
        with lock:
            turn[0] += 1
            return cands[turn[0] % len(cands)]

    return route


def kvmesh_router(client, names: list[str]):
    turn = [0]
    lock = threading.Lock()

    def route(prompt: list[int], busy: list[int]) -> int:
        scores = {s.name: s.matched_blocks for s in client.score(MODEL_NAME, prompt)}
        matched = [scores.get(n, 0) for n in names]
        best = max(matched)
        cands = [i for i in range(len(names)) if matched[i] == best]
        low = min(busy[i] for i in cands)
        cands = [i for i in cands if busy[i] == low]
        with lock:
            turn[0] += 1
            return cands[turn[0] % len(cands)]

    return route


def part_chat(kv: list[Engine], base: list[Engine], args, trace, figures: dict) -> None:
    rounds = 2
    for e in kv + base:
        reset_prefix_cache(e)
    daemon = Daemon(kv)
    try:
        client = daemon.client()
        kv_runs, base_runs = [], []
        # kvmesh and baseline alternate (A B, then B A), each round with fresh token ids.
        for r in range(rounds):
            if trace is not None:
                convs = trace
                if r:
                    # fresh ids for the second round: same structure, different tokens
                    shift = r * 4093
                    convs = [[[VOCAB[0] + (t - VOCAB[0] + shift) % (VOCAB[1] - VOCAB[0]) for t in p] for p in c]
                             for c in convs]
            else:
                convs = synthetic_chat(args.seed + 100 + r, args.conversations, args.turns)
            order = [("kvmesh", kv), ("baseline", base)]
            if r % 2:
                order.reverse()
            for which, engines in order:
                log(f"chat round {r + 1}/{rounds}: {which}, {sum(len(c) for c in convs)} requests, "
                    f"{args.clients} clients")
                for e in engines:
                    reset_prefix_cache(e)
                time.sleep(SPIN_S)  # the other pair's workers stop polling
                if which == "kvmesh":
                    route = kvmesh_router(client, [e.name for e in engines])
                else:
                    route = least_busy_router(len(engines))
                res = run_chat(engines, convs, args.clients, args.max_tokens, route)
                log(f"  {which}: {res['throughput_rps']:.2f} req/s, TTFT p50 {res['ttft_p50_ms']:.0f} ms, "
                    f"p90 {res['ttft_p90_ms']:.0f} ms, {res['prefix_hit_pct']:.0f}% of prompt tokens cached, "
                    f"requests per engine {res['per_engine']}")
                (kv_runs if which == "kvmesh" else base_runs).append(res)
    finally:
        daemon.stop()
    for prefix, runs in (("", kv_runs), ("baseline_", base_runs)):
        for k in ("throughput_rps", "ttft_p50_ms", "ttft_p90_ms", "prefix_hit_pct"):
            figures[prefix + k] = statistics.median(x[k] for x in runs)
    figures["chat_requests"] = sum(x["requests"] for x in kv_runs)


# ------------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / (1 << 20):.0f} GiB memory"
    except (OSError, ValueError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}"


def print_table(f: dict) -> None:
    print()
    print(f"{'TTFT (ms, median)':<28}{'2k':>12}{'4k':>12}")
    for name, key in (("reload from host tier", "ttft_host_ms"), ("reload from disk tier", "ttft_disk_ms"),
                      ("recompute (plain vLLM)", "ttft_recompute_ms"), ("miss (connector)", "ttft_miss_ms")):
        print(f"{name:<28}{f[key + '_2k']:>12.1f}{f[key + '_4k']:>12.1f}")
    print(f"{'miss overhead %':<28}{f['miss_overhead_pct_2k']:>12.1f}{f['miss_overhead_pct_4k']:>12.1f}")
    print(f"{'host reload: % from host':<28}{f['host_reload_pct_2k']:>12.0f}{f['host_reload_pct_4k']:>12.0f}")
    print(f"{'disk reload: % from disk':<28}{f['disk_reload_pct_2k']:>12.0f}{f['disk_reload_pct_4k']:>12.0f}")
    print()
    print(f"{'multi-turn chat, 2 engines':<28}{'kvmesh':>12}{'baseline':>12}")
    for name, key, fmt in (("throughput (req/s)", "throughput_rps", ".2f"), ("TTFT p50 (ms)", "ttft_p50_ms", ".1f"),
                           ("TTFT p90 (ms)", "ttft_p90_ms", ".1f"), ("prompt tokens cached %", "prefix_hit_pct", ".0f")):
        print(f"{name:<28}{format(f[key], fmt):>12}{format(f['baseline_' + key], fmt):>12}")
    print()


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description="kvmesh's vLLM connector on real vLLM engines",
                                 usage="benches/run connector [--quick] [--trace FILE] [--disk-dir DIR]")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller chat workload")
    ap.add_argument("--trace", default=None, help="Mooncake JSONL trace to replay in the chat workload")
    ap.add_argument("--trace-block-tokens", type=int, default=64, help="tokens per trace hash id (default 64)")
    ap.add_argument("--trace-requests", type=int, default=None, help="trace requests to replay")
    ap.add_argument("--disk-dir", default=str(ROOT / "target" / "bench"),
                    help="the disk engine's tier goes in a new folder in DIR, removed after (default target/bench)")
    ap.add_argument("--reps", type=int, default=None, help="reloads per size and tier in the TTFT part")
    ap.add_argument("--miss-pairs", type=int, default=None,
                    help="never-seen prompts per size on the plain and the connector engine (even: both orders)")
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per chat request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-ttft", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-chat", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name, quick, full in (("reps", 4, 16), ("miss_pairs", 6, 24), ("conversations", 8, 12), ("turns", 4, 6),
                              ("trace_requests", 32, 96)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.miss_pairs = max(a.miss_pairs, a.reps)
    for name in ("reps", "miss_pairs", "conversations", "turns", "clients", "max_tokens", "trace_block_tokens", "trace_requests"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if a.trace and not Path(a.trace).is_file():
        ap.error(f"--trace {a.trace}: no such file")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = ROOT / "target" / "bench" / "connector.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)

    try:
        # Read the trace before any engine starts: a bad one fails at once.
        trace = trace_chat(Path(args.trace), args.trace_requests, args.trace_block_tokens) if args.trace else None
        Path(args.disk_dir).mkdir(parents=True, exist_ok=True)
        disk_dir = Path(tempfile.mkdtemp(prefix="connector-disk-", dir=args.disk_dir))
    except (BenchError, OSError) as e:
        log(f"error: {e}")
        return 1
    plain = make_engine("plain", "0", None)
    host = make_engine("host", "0", connector_config(HOST_BYTES))
    disk = make_engine("disk", "0", connector_config(DISK_HOST_BLOCKS * BLOCK_BYTES, str(disk_dir)))
    plain2 = make_engine("plain2", "1", None)
    host2 = make_engine("host2", "1", connector_config(HOST_BYTES))
    engines = [plain, host, disk, plain2, host2]
    figures: dict = {}
    try:
        start_all(engines)
        t = time.monotonic()
        if not args.skip_ttft:
            log(f"TTFT: {args.reps} reloads and {args.miss_pairs} never-seen prompts per size")
            part_ttft(plain, host, disk, args.reps, args.miss_pairs, args.seed, figures)
        disk.stop()
        if not args.skip_chat:
            part_chat([host, host2], [plain, plain2], args, trace, figures)
        log(f"measurement took {time.monotonic() - t:.0f}s")
    except (BenchError, EngineError, OSError) as e:
        log(f"error: {e}")
        return 1
    finally:
        for e in engines:
            e.stop()
        shutil.rmtree(disk_dir, ignore_errors=True)
    if args.skip_ttft or args.skip_chat:
        print(json.dumps(figures, indent=2))
        return 0
    print_table(figures)
    doc = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}
    doc["command"] = os.environ.get("KVMESH_BENCH_COMMAND", " ".join(["benches/connector.py", *sys.argv[1:]]))
    doc["machine"] = machine()
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
