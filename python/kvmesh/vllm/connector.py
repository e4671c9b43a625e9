"""``KvmeshConnector``: vLLM KV-cache offload to kvmesh's tiered store, and reload from it.

What it does, per engine:

* **Offload.** Every full block the engine computes is copied into a kvmesh ``BlockStore`` (host
  memory, and a local disk tier when ``disk_path`` is set) after the step's forward pass, on a
  background thread: the forward pass never waits for it. A request's blocks are kept by vLLM
  until their copies are done (``request_finished`` asks vLLM to delay the free; the worker
  reports the request in ``finished_sending`` when its copies are done), and a preemption waits
  for in-flight copies before vLLM may reuse the blocks.
* **Reload.** For a new request, ``get_num_new_matched_tokens`` reports how many blocks beyond
  vLLM's own prefix-cache hit the store holds; they are copied into the blocks vLLM allocates
  before the forward pass that needs them. A block that cannot be loaded is reported through
  ``get_block_ids_with_load_errors`` and vLLM recomputes it (the connector sets vLLM's
  ``kv_load_failure_policy`` to ``"recompute"`` unless ``load_failure_policy`` says ``"fail"``).
  KV is never served from a block whose load failed.
* **Prefill/decode.** With vLLM's NixlConnector conventions in ``kv_transfer_params``: a request
  sent to the prefill engine with ``do_remote_decode: true`` keeps its blocks after it finishes and
  returns the parameters a decode engine needs (``do_remote_prefill``, ``remote_block_ids``,
  ``remote_engine_id``, ``remote_request_id``, ``remote_host``, ``remote_port``, plus kvmesh's
  ``remote_layers``/``remote_page_bytes``). The decode engine, given them, pulls the blocks it does
  not hold with one batched kvtransfer READ (TCP, shared memory or UCX) and notifies the prefill
  engine, which then frees them (or after ``kv_lease_s`` if no decode engine ever reads them). A
  failed READ is reported to vLLM as failed loads: the decode engine recomputes. ``kvmesh proxy``
  sends requests this way.
* **East-west.** With ``index_url`` (a ``kvmesh serve`` daemon fed by the engines' KV events),
  a prompt whose blocks this engine's store lacks is looked up in the index; when another engine
  holds a longer prefix of it in its host tier, its blocks are pulled from there: the peer pins
  them in its store (a lease, answered over kvtransfer notifications) and this engine READs them
  in place from the peer's host arena straight into the blocks vLLM allocated, then releases the
  lease with the READ's notification. Blocks the peer no longer has, a dead peer or a failed
  READ make vLLM recompute those blocks. Peers are found by their names in the index: ``peers``
  maps names to kvtransfer addresses; otherwise, with ``peer_port``, an engine named
  ``PREFIX-IP`` (as ``kvmesh serve --engine-dns`` names them) is reached at IP:``peer_port``.
  The engines must hash blocks alike (vLLM's default ``sha256``, or one ``PYTHONHASHSEED``).
* **Tier events.** Every block stored in or evicted from a tier is published with vLLM's own KV
  events (``BlockStored``/``BlockRemoved`` with medium ``CPU`` or ``STORAGE`` and vLLM's block
  hash), so kvindex sees which engine holds which prefix on which tier.

Blocks are keyed by vLLM's own block hash (which already covers the tokens of the whole prefix,
LoRA adapter, multimodal inputs and cache salt), folded with the model, the KV layout, the dtype,
the block size and the tensor-parallel size: two engines share store keys exactly when their KV
bytes for a prefix are the same.

Options (``kv_connector_extra_config``):

``host_bytes``              host memory for blocks (default 1 GiB)
``disk_path``               folder of a disk tier (default none)
``disk_bytes``              capacity of the disk tier (default 10 GiB)
``load_failure_policy``     ``"recompute"`` (default) or ``"fail"``
``publish_tier_events``     publish tier events with vLLM's KV events (default true)
``inject_load_failures``    make the first N block loads fail (tests of the recompute path)
``transfer_host``           address the engine's kvtransfer agent listens on and advertises
                            (default ``$VLLM_HOST_IP``, else 127.0.0.1)
``transfer_port``           its port (default 0: any free port)
``transfer_backend``        ``auto`` (shared memory on one host, TCP across hosts), ``tcp``,
                            ``shm`` or ``ucx``
``kv_lease_s``              how long a prefill engine keeps blocks no decode engine has read
                            (default 120)
``io_cpus``                 CPUs for kvmesh's transfer and store threads (default: all; vLLM
                            binds its worker to its OpenMP cores, whose idle spin would starve
                            them)
``index_url``               a ``kvmesh serve`` daemon to find prefixes held by other engines
                            (default none: no east-west pulls)
``engine_name``             this engine's name in that index (it never pulls from itself)
``peers``                   ``{engine name: "host:port"}``: the kvtransfer addresses of peers
``peer_port``               kvtransfer port of peers not in ``peers`` (engines named PREFIX-IP)
``peer_min_blocks``         pull from a peer only when it holds at least this many more blocks
                            than this engine's own store (default 2)
``peer_timeout_s``          how long a peer may take to answer and to deliver (default 5)
``index_model``             the model name for index queries (default: the served model name)
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = init_logger("kvmesh.vllm")

GIB = 1 << 30


@contextmanager
def _threads_on(cpus: Optional[set[int]]):
    """Threads started inside run on `cpus` (None: every CPU of the machine).

    vLLM's CPU worker binds its main thread to the cores of its OpenMP threads, and new threads
    inherit that binding; the worker's idle loop spins there, which starves kvmesh's I/O threads
    (the transfer agent's side channel, the store's writers) when they share its core: a peer's
    hello then goes unanswered for many seconds. They are started with a wider binding instead;
    the calling thread's own binding is restored on the way out.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    want = cpus or set(range(os.cpu_count() or 1))
    try:
        os.sched_setaffinity(0, want)
    except OSError as e:
        log.warning("kvmesh: cannot run I/O threads on CPUs %s (%s); they share the worker's", sorted(want), e)
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Transfer:
    """Blocks of one request to move between the store and the engine."""

    req_id: str
    keys: list[int]
    block_ids: list[int]


@dataclass
class Recv:
    """Blocks a decode engine pulls from a prefill engine for one request."""

    req_id: str
    local_ids: list[int]
    remote_ids: list[int]
    host: str
    port: int
    remote_request_id: str
    remote_layers: list[tuple[int, int]]
    page_bytes: int
    # The prefill engine's page order ("host" for vLLM's CPU caches, else the GPU layout) and
    # the GPU its pages are on (None: host memory).
    kv_layout: str = "host"
    gpu: Optional[int] = None


@dataclass
class Pull:
    """East-west: blocks of one request loaded from this engine's store (``keys``/``block_ids``)
    and, after them, pulled from a peer engine's host tier (``peer_keys``/``peer_ids``)."""

    req_id: str
    keys: list[int]
    block_ids: list[int]
    peer_keys: list[int]
    peer_ids: list[int]
    host: str
    port: int


# Prefix of the notifications peers exchange for east-west pulls (request ids, the other
# notifications, never start with a NUL byte).
_EW = b"\x00kvmesh-ew "


@dataclass
class KvmeshConnectorMetadata(KVConnectorMetadata):
    """Scheduler to workers, once per step: blocks to load before the forward pass, blocks to
    save after it, blocks to pull from prefill engines, requests whose blocks this (prefill)
    engine keeps until a decode engine has read them (request id, deadline), and blocks to pull
    from peers' host tiers."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    recvs: list[Recv] = field(default_factory=list)
    sends: list[tuple[str, float]] = field(default_factory=list)
    pulls: list[Pull] = field(default_factory=list)


@dataclass
class KvmeshHandshake(KVConnectorHandshakeMetadata):
    """Worker to scheduler, once: where the worker's kvtransfer agent is and its KV layout."""

    host: str
    port: int
    agent: str
    layers: list[tuple[int, int]]
    page_bytes: int
    kv_layout: str = "host"
    gpu: Optional[int] = None


@dataclass
class KvmeshWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers to scheduler, once per step: what changed in each worker's store."""

    # (tp_rank, stored, medium, key)
    events: list[tuple[int, bool, str, int]] = field(default_factory=list)
    # (tp_rank, key): saves that did not make it into the store
    failed_saves: list[tuple[int, int]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KvmeshWorkerMetadata)
        return KvmeshWorkerMetadata(
            self.events + other.events, self.failed_saves + other.failed_saves
        )


@dataclass
class _Req:
    """The scheduler's view of one request."""

    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    # Blocks below this index were loaded, saved or found already held.
    saved_upto: int = 0
    has_saves: bool = False
    # Leading blocks loaded from the store for this request, by tier.
    loaded_tiers: list[str] = field(default_factory=list)
    # Blocks were pulled from a peer (asynchronously) for this request.
    pulled: bool = False


def _namespace(vllm_config: "VllmConfig", block_size: int) -> bytes:
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    parts = [
        "kvmesh-vllm-v1",
        # Where the cache is and which attention backend lays it out decide the pages' byte order.
        str(getattr(vllm_config.device_config, "device_type", "")),
        os.environ.get("VLLM_ATTENTION_BACKEND", ""),
        os.environ.get("VLLM_KV_CACHE_LAYOUT", ""),
        str(mc.model),
        str(getattr(mc, "revision", None)),
        str(cc.cache_dtype),
        str(mc.dtype),
        str(block_size),
        str(pc.tensor_parallel_size),
        str(cc.prefix_caching_hash_algo),
    ]
    return "\x1f".join(parts).encode()


class KvmeshConnector(KVConnectorBase_V1):
    """vLLM KV connector: offload to and reload from a kvmesh tiered store."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: Optional["KVCacheConfig"] = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._opt = lambda k, d=None: cfg.get_from_extra_config(k, d)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) > 1:
            raise ValueError(
                f"KvmeshConnector supports models with one KV-cache group; this one has {len(groups)}"
            )
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("KvmeshConnector does not support pipeline parallelism yet")
        self.block_size = vllm_config.cache_config.block_size
        if groups:
            self.block_size = groups[0].kv_cache_spec.block_size
        self._ns_key = hashlib.blake2b(_namespace(vllm_config, self.block_size), digest_size=32).digest()
        self._tp = vllm_config.parallel_config.tensor_parallel_size

        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker()

    # ---------------------------------------------------------------------------------------
    # keys

    def _key(self, block_hash: bytes) -> int:
        return int.from_bytes(
            hashlib.blake2b(block_hash, digest_size=8, key=self._ns_key).digest(), "little"
        )

    @staticmethod
    def _event_hash(block_hash: bytes) -> int:
        # vLLM's own conversion for events: the last 8 bytes, big-endian.
        return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)

    # ---------------------------------------------------------------------------------------
    # scheduler side

    def _init_scheduler(self) -> None:
        policy = self._opt("load_failure_policy", "recompute")
        if policy not in ("recompute", "fail"):
            raise ValueError(f"load_failure_policy must be 'recompute' or 'fail', not {policy!r}")
        if self._kv_transfer_config.kv_load_failure_policy != policy:
            log.info("kvmesh: kv_load_failure_policy set to %r", policy)
            self._kv_transfer_config.kv_load_failure_policy = policy
        self._publish = bool(self._opt("publish_tier_events", True))
        self._reqs: dict[str, _Req] = {}
        # key -> tp rank -> media holding it
        self._held: dict[int, dict[int, set[str]]] = {}
        # keys with a save in flight
        self._pending: set[int] = set()
        # key -> what a tier event needs to describe it
        self._info: dict[int, tuple[int, Optional[int], list[int]]] = {}
        self._loads: list[Transfer] = []
        self._events: list[Any] = []
        # req id -> (first block past vLLM's hit, tiers of the store's blocks after it, peer)
        self._lookups: dict[str, tuple[int, list[str], Optional[tuple[int, str, int]]]] = {}
        self._handshake: Optional[KvmeshHandshake] = None
        self._recvs: list[Recv] = []
        self._sends: list[tuple[str, float]] = []
        self._lease_s = float(self._opt("kv_lease_s", 120.0))
        # East-west.
        self._pulls: list[Pull] = []
        self._index_url = self._opt("index_url")
        self._index: Any = None
        self._index_model = str(self._opt("index_model", self._vllm_config.model_config.served_model_name))
        self._engine_name = self._opt("engine_name")
        self._peer_map = {str(k): str(v) for k, v in (self._opt("peers") or {}).items()}
        port = self._opt("peer_port")
        self._peer_port = int(port) if port is not None else None
        self._ew_min = max(1, int(self._opt("peer_min_blocks", 2)))
        self._index_warned = 0.0

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        hs = metadata.get(0)
        if isinstance(hs, KvmeshHandshake):
            self._handshake = hs

    def _tiers_of(self, key: int) -> Optional[str]:
        ranks = self._held.get(key)
        if not ranks or len(ranks) < self._tp:
            return None
        media = set.intersection(*ranks.values()) or set.union(*ranks.values())
        return "CPU" if "CPU" in media else "STORAGE"

    def _loadable_blocks(self, request: "Request") -> int:
        """Full blocks of the request a connector may supply: all but the one holding its last
        token, which vLLM always computes itself."""
        return max(request.num_tokens - 1, 0) // self.block_size

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int, *args: Any, **kwargs: Any
    ) -> tuple[Optional[int], bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and params.get("remote_block_ids"):
            # Decode side of prefill/decode: pull the prompt's full blocks the engine lacks, async,
            # but not the block holding the last prompt token: that one is computed here, as for
            # any prefix-cache hit, so the decode engine computes the prompt's tail exactly as a
            # single engine serving a cached prefix would (a lone last token takes another
            # attention path, whose rounding can change greedy outputs).
            count = self._loadable_blocks(request) * self.block_size - num_computed_tokens
            self._lookups[request.request_id] = (num_computed_tokens // self.block_size, [], None)
            if count > 0:
                return count, True
            return 0, False
        hashes = request.block_hashes
        start = num_computed_tokens // self.block_size
        limit = min(len(hashes), self._loadable_blocks(request))
        tiers: list[str] = []
        i = start
        while i < limit:
            t = self._tiers_of(self._key(hashes[i]))
            if t is None:
                break
            tiers.append(t)
            i += 1
        # East-west pulls write the KV pages with kvtransfer (registered by the worker).
        pullable = self._handshake is not None and bool(self._handshake.layers)
        if self._index_url and pullable and limit - i >= self._ew_min:
            peer = self._find_peer(hashes, limit)
            if peer is not None and peer[0] >= i + self._ew_min:
                # Pull the blocks after this store's own from the peer, asynchronously.
                self._lookups[request.request_id] = (start, tiers, peer)
                return (peer[0] - start) * self.block_size, True
        self._lookups[request.request_id] = (start, tiers, None)
        return len(tiers) * self.block_size, False

    def _find_peer(self, hashes: list[bytes], limit: int) -> Optional[tuple[int, str, int]]:
        """The peer whose host tier holds the longest prefix of the first `limit` blocks, by the
        index: `(blocks, host, port)`, or None."""
        try:
            if self._index is None:
                import kvmesh

                self._index = kvmesh.IndexClient(str(self._index_url))
            scores = self._index.score(
                self._index_model, block_hashes=[self._event_hash(h) for h in hashes[:limit]])
        except Exception as e:
            now = time.time()
            if now - self._index_warned > 60:
                self._index_warned = now
                log.warning("kvmesh: asking the index at %s failed: %s; no east-west pulls until "
                            "it answers", self._index_url, e)
            return None
        own = (self._handshake.host, self._handshake.port) if self._handshake else None
        best = None
        for s in scores:
            n = min(s.matched_blocks, s.cpu)
            if n <= 0 or s.name == self._engine_name or (best is not None and n <= best[0]):
                continue
            addr = self._peer_addr(s.name)
            if addr is None or addr == own:
                continue
            best = (n, addr[0], addr[1])
        return best

    def _peer_addr(self, name: str) -> Optional[tuple[str, int]]:
        spec = self._peer_map.get(name)
        if spec is not None:
            host, _, port = spec.rpartition(":")
            return host.strip("[]"), int(port)
        if self._peer_port is None:
            return None
        # Engines found through DNS are named PREFIX-IP.
        try:
            return str(ipaddress.ip_address(name.rsplit("-", 1)[-1])), self._peer_port
        except ValueError:
            return None

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request)
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            start, _, _ = self._lookups.pop(request.request_id, (0, [], None))
            self._plan_recv(request, params, blocks, num_external_tokens, start)
            # One transfer per request.
            params["do_remote_prefill"] = False
            return
        if num_external_tokens <= 0:
            return
        start, tiers, peer = self._lookups.pop(request.request_id, (0, [], None))
        n = num_external_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0]
        hashes = request.block_hashes
        keys = [self._key(hashes[start + j]) for j in range(n)]
        ids = list(block_ids[start : start + n])
        if peer is None:
            self._loads.append(Transfer(request.request_id, keys, ids))
            st.loaded_tiers = tiers[:n]
        else:
            m = min(len(tiers), n)
            self._pulls.append(
                Pull(request.request_id, keys[:m], ids[:m], keys[m:], ids[m:], peer[1], peer[2]))
            st.loaded_tiers = tiers[:m] + ["PEER"] * (n - m)
            st.pulled = True
        st.saved_upto = max(st.saved_upto, start + n)

    def _plan_recv(
        self, request: "Request", params: dict, blocks: "KVCacheBlocks", num_external_tokens: int,
        start: int,
    ) -> None:
        need = ("remote_block_ids", "remote_request_id", "remote_host", "remote_port",
                "remote_layers", "remote_page_bytes")
        missing = [k for k in need if k not in params]
        if missing:
            log.warning("kvmesh: request %s: kv_transfer_params lack %s; it is computed here",
                        request.request_id, ", ".join(missing))
            return
        # Blocks start .. start + n of the prompt (those past the local prefix hit) come from the
        # prefill engine's blocks at the same positions.
        n = num_external_tokens // self.block_size
        local = list(blocks.get_block_ids()[0][start : start + n])
        remote = list(params["remote_block_ids"])[start : start + n]
        if len(remote) < len(local):
            log.warning("kvmesh: request %s: the prefill engine sent %d blocks, %d are needed",
                        request.request_id, start + len(remote), start + len(local))
            local = local[: len(remote)]
        self._recvs.append(
            Recv(
                request.request_id,
                list(local),
                remote,
                str(params["remote_host"]),
                int(params["remote_port"]),
                str(params["remote_request_id"]),
                [tuple(x) for x in params["remote_layers"]],
                int(params["remote_page_bytes"]),
                str(params.get("remote_kv_layout", "host")),
                None if params.get("remote_gpu") is None else int(params["remote_gpu"]),
            )
        )

    def get_external_cache_hit_sources(
        self, request: "Request", num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        st = self._reqs.get(request.request_id)
        if num_external_tokens and st is not None and not st.loaded_tiers:
            return {CacheHitSource.P2P: num_external_tokens}
        if num_external_tokens == 0 or st is None or not st.loaded_tiers:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        host = sum(1 for t in st.loaded_tiers if t == "CPU") * self.block_size
        peer = sum(1 for t in st.loaded_tiers if t == "PEER") * self.block_size
        out = {}
        if host:
            out[CacheHitSource.HOST] = host
        if peer:
            out[CacheHitSource.P2P] = peer
        if num_external_tokens - host - peer:
            out[CacheHitSource.DISK] = num_external_tokens - host - peer
        return out

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvmeshConnectorMetadata(loads=self._loads, recvs=self._recvs, sends=self._sends,
                                       pulls=self._pulls)
        self._loads, self._recvs, self._sends, self._pulls = [], [], [], []
        computed: dict[str, int] = {}
        for nr in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is None:
                continue
            st.block_ids = list(nr.block_ids[0])
            computed[nr.req_id] = nr.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(
                nr.req_id, 0
            )
        cr = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cr.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cr.new_block_ids[i]
            if req_id in cr.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            computed[req_id] = cr.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(
                req_id, 0
            )
        for req_id, done in computed.items():
            st = self._reqs[req_id]
            hashes = st.request.block_hashes
            full = min(done // self.block_size, len(hashes), len(st.block_ids))
            keys, ids = [], []
            tokens = st.request.all_token_ids
            for j in range(st.saved_upto, full):
                h = hashes[j]
                k = self._key(h)
                if k in self._pending or self._tiers_of(k) is not None:
                    continue
                keys.append(k)
                ids.append(st.block_ids[j])
                self._pending.add(k)
                parent = self._event_hash(hashes[j - 1]) if j > 0 else None
                self._info[k] = (
                    self._event_hash(h),
                    parent,
                    list(tokens[j * self.block_size : (j + 1) * self.block_size]),
                )
            st.saved_upto = max(st.saved_upto, full)
            if keys:
                st.has_saves = True
                meta.saves.append(Transfer(req_id, keys, ids))
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        wm = connector_output.kv_connector_worker_meta
        if not isinstance(wm, KvmeshWorkerMetadata):
            return
        for rank, key in wm.failed_saves:
            self._pending.discard(key)
        for rank, stored, medium, key in wm.events:
            ranks = self._held.setdefault(key, {})
            if stored:
                ranks.setdefault(rank, set()).add(medium)
                self._pending.discard(key)
            else:
                media = ranks.get(rank)
                if media is not None:
                    media.discard(medium)
                    if not media:
                        del ranks[rank]
                if not ranks:
                    del self._held[key]
            if rank == 0 and self._publish:
                self._tier_event(stored, medium, key)
            if key not in self._held and key not in self._pending:
                self._info.pop(key, None)

    def _tier_event(self, stored: bool, medium: str, key: int) -> None:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        info = self._info.get(key)
        if info is None:
            return
        h, parent, tokens = info
        if stored:
            self._events.append(
                BlockStored(
                    block_hashes=[h],
                    parent_block_hash=parent,
                    token_ids=tokens,
                    block_size=self.block_size,
                    lora_id=None,
                    medium=medium,
                    lora_name=None,
                )
            )
        else:
            self._events.append(BlockRemoved(block_hashes=[h], medium=medium))

    def take_events(self):
        ev, self._events = self._events, []
        return ev

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, Optional[dict[str, Any]]]:
        from vllm.v1.request import RequestStatus

        st = self._reqs.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        # Saves read the request's blocks on a worker thread, and a pull may still be writing
        # them (a request aborted while it waits for a peer): keep the blocks until the worker
        # says it is done with them (it reports the request in finished_sending).
        delay = st is not None and (st.has_saves or st.pulled)
        params = request.kv_transfer_params
        if not params:
            return delay, None
        if params.get("do_remote_prefill"):
            # A decode request finished before it was scheduled: tell the prefill engine to
            # free its blocks (a Recv without local blocks only notifies).
            params["do_remote_prefill"] = False
            if "remote_host" in params and "remote_request_id" in params:
                self._recvs.append(Recv(request.request_id, [], [], str(params["remote_host"]),
                                        int(params["remote_port"]),
                                        str(params["remote_request_id"]), [], 0))
            return delay, None
        if not params.get("do_remote_decode"):
            return delay, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return delay, None
        hs = self._handshake
        if hs is None or not block_ids or not hs.layers:
            log.warning("kvmesh: request %s asks for remote decode but this engine has no "
                        "kvtransfer agent", request.request_id)
            return delay, None
        self._sends.append((request.request_id, time.time() + self._lease_s))
        return True, dict(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=list(block_ids),
            remote_engine_id=self._kv_transfer_config.engine_id,
            remote_request_id=request.request_id,
            remote_host=hs.host,
            remote_port=hs.port,
            remote_layers=[list(x) for x in hs.layers],
            remote_page_bytes=hs.page_bytes,
            remote_kv_layout=hs.kv_layout,
            remote_gpu=hs.gpu,
            remote_num_tokens=request.num_computed_tokens,
            tp_size=self._tp,
        )

    # ---------------------------------------------------------------------------------------
    # worker side

    def _init_worker(self) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self._rank = get_tensor_model_parallel_rank() if self._tp > 1 else 0
        self._store = None
        self._gpu = False
        self._gpu_dev: Optional[int] = None
        self._kv_layout = "host"
        self._caches: dict[str, torch.Tensor] = {}
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvmesh-save")
        self._lock = threading.Lock()
        # req id -> saves in flight
        self._inflight: dict[str, int] = defaultdict(int)
        self._futures: list[Future] = []
        # Requests whose blocks the scheduler keeps until this worker reports them finished
        # sending: those with saves, and (prefill side) those waiting for a decode engine's read.
        self._delayed: set[str] = set()
        self._finishing: set[str] = set()
        self._failed_saves: list[tuple[int, int]] = []
        self._load_errors: set[int] = set()
        self._agent = None
        self._layers: list[tuple[int, int]] = []
        self._page = 0
        self._peers: dict[tuple[str, int], str] = {}
        # decode side: req id -> (posted transfer or None if it failed to post, local block ids)
        self._recving: dict[str, tuple[Any, list[int]]] = {}
        # prefill side: req id -> deadline for a decode engine to read the blocks
        self._sending: dict[str, float] = {}
        self._read_notifs: set[str] = set()
        self._failed_recv: set[str] = set()
        self._peer_lock = threading.Lock()
        # Notifications other than east-west ones, for get_finished (the notification thread
        # takes every notification from the agent).
        self._notifs: list[bytes] = []
        self._closing = threading.Event()
        # east-west, pulling side: req id -> (pull, future of the failed block ids)
        self._pulling: dict[str, tuple[Pull, Future]] = {}
        self._puller = ThreadPoolExecutor(2, thread_name_prefix="kvmesh-pull")
        # lookup id -> (answered, (lease, addresses))
        self._replies: dict[str, list[Any]] = {}
        self._lookup_ids = itertools.count(1)
        self._peer_timeout = float(self._opt("peer_timeout_s", 5.0))
        self._served_leases = 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvmesh import kvcache
        from kvmesh._native import BlockStore

        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        try:
            desc = kvcache.describe(kv_caches, num_blocks)
        except ValueError as e:
            raise ValueError(f"KvmeshConnector: {e}") from None
        self._caches = kv_caches  # keep the tensors alive while the store and agent use them
        self._gpu = isinstance(desc, kvcache.GpuLayout)
        num_blocks = desc.num_blocks
        page = desc.page_bytes
        block_bytes = desc.block_bytes
        # What kvtransfer moves for prefill/decode and east-west pulls: per page list, its base
        # and block stride (GPU pages go through host staging).
        if self._gpu:
            layers = [(b, desc.block_stride) for b in desc.layers]
            self._gpu_dev, self._kv_layout = desc.device, desc.layout
        else:
            layers = desc.layers
        self._layers = layers
        self._page = page
        host_bytes = int(self._opt("host_bytes", GIB))
        disk_path = self._opt("disk_path")
        disk_bytes = int(self._opt("disk_bytes", 10 * GIB))
        if disk_path is not None and self._tp > 1:
            disk_path = f"{disk_path}/tp{self._rank}"
        io_cpus = self._opt("io_cpus")
        with _threads_on({int(c) for c in io_cpus} if io_cpus else None):
            self._store = BlockStore(block_bytes, host_bytes, disk_path, disk_bytes if disk_path else 0,
                                     gpu=self._gpu)
            if self._gpu:
                # kvstore's CUDA copy engine gathers and scatters the pages.
                self._store.register_gpu_layers(
                    desc.layers, desc.block_stride, desc.num_blocks, desc.num_heads,
                    desc.tokens_per_block, desc.entry_bytes, desc.layout, desc.device)
            else:
                self._store.register_layers(layers, page, num_blocks)
            self._start_agent(layers, page, num_blocks)
            # Peers read blocks in place from the store's host arena.
            self._agent.register(*self._store.arena())
            # The saver and puller threads start on their first task: start them here, with the
            # same binding.
            self._saver.submit(lambda: None).result()
            for f in [self._puller.submit(time.sleep, 0.05) for _ in range(2)]:
                f.result()
            threading.Thread(target=self._serve_notifs, name="kvmesh-notifs", daemon=True).start()
        n = int(self._opt("inject_load_failures", 0))
        if n:
            self._store.inject_load_failures(n)
        log.info(
            "kvmesh: %d %s page lists, %d blocks of %d bytes per page; store block %d bytes, host "
            "tier %d blocks%s",
            len(desc.layers),
            f"GPU ({desc.layout})" if self._gpu else "host",
            num_blocks,
            page,
            block_bytes,
            self._store.host_capacity_blocks,
            f", disk tier in {disk_path}" if disk_path else "",
        )

    def _start_agent(self, layers: list[tuple[int, int]], page: int, num_blocks: int) -> None:
        from kvmesh._native import TransferAgent

        host = str(self._opt("transfer_host", os.environ.get("VLLM_HOST_IP") or "127.0.0.1"))
        port = int(self._opt("transfer_port", 0))
        self._backend = str(self._opt("transfer_backend", "auto"))
        name = f"{self._kv_transfer_config.engine_id}-tp{self._rank}"
        self._agent = TransferAgent(name, f"{host}:{port}", ucx=self._backend == "ucx")
        for base, stride in layers:
            self._agent.register(base, stride * (num_blocks - 1) + page, gpu=self._gpu_dev)

    def get_handshake_metadata(self) -> Optional[KVConnectorHandshakeMetadata]:
        if self._agent is None:
            return None
        host, port = self._agent.address
        return KvmeshHandshake(host, port, self._agent.name, list(self._layers), self._page,
                               self._kv_layout, self._gpu_dev)

    @property
    def store(self):
        """The worker's ``kvmesh.BlockStore`` (None before ``register_kv_caches``)."""
        return self._store

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmeshConnectorMetadata)
        for req_id, deadline in meta.sends:
            with self._lock:
                self._delayed.add(req_id)
            if req_id in self._read_notifs:  # the decode engine was faster than this step
                self._read_notifs.discard(req_id)
            else:
                self._sending[req_id] = deadline
        for r in meta.recvs:
            self._start_recv(r)
        for p in meta.pulls:
            with self._lock:
                self._delayed.add(p.req_id)
            self._pulling[p.req_id] = (p, self._puller.submit(self._pull, p))
        if not meta.loads or self._store is None:
            for t in meta.loads:
                self._load_errors.update(t.block_ids)
            return
        if self._gpu:
            # The copies overwrite blocks: after the work already queued on the GPU.
            self._store.order_after(torch.cuda.current_stream().cuda_stream)
        for t in meta.loads:
            try:
                ok = self._store.load(t.keys, t.block_ids)
            except RuntimeError as e:  # a failed GPU copy: every block of it is unknown
                log.error("kvmesh: %s", e)
                ok = [False] * len(t.block_ids)
            for b, good in zip(t.block_ids, ok):
                if not good:
                    self._load_errors.add(b)
        if self._load_errors:
            log.warning("kvmesh: %d block loads failed; vLLM recomputes them", len(self._load_errors))

    def _peer(self, host: str, port: int) -> str:
        with self._peer_lock:
            name = self._peers.get((host, port))
            if name is None:
                name = self._peers[(host, port)] = self._agent.connect(host, port)
            return name

    def _forget_peer(self, host: str, port: int) -> None:
        with self._peer_lock:
            self._peers.pop((host, port), None)

    # ---------------------------------------------------------------------------------------
    # east-west

    def _serve_notifs(self) -> None:
        """Takes every notification from the agent: east-west requests and answers are handled
        here, at once; the others are left for get_finished. Expired leases are released."""
        last_sweep = time.time()
        while not self._closing.is_set():
            try:
                n = self._agent.wait_notif(0.25)
                if time.time() - last_sweep > 1.0:
                    last_sweep = time.time()
                    if self._store.expire_leases():
                        log.info("kvmesh: a peer never released its lease; its blocks are unpinned")
                if n is None:
                    continue
                src, msg = n
                if msg.startswith(_EW):
                    self._ew_message(src, msg[len(_EW):])
                else:
                    with self._lock:
                        self._notifs.append(msg)
            except Exception as e:  # a malformed message must not stop the thread
                log.warning("kvmesh: handling a notification: %s", e)

    def _ew_message(self, src: str, msg: bytes) -> None:
        kind, _, body = msg.partition(b" ")
        if kind == b"lookup":
            # A peer asks for blocks: pin the leading ones this store holds and say where they are.
            q = json.loads(body)
            lease, addrs = 0, []
            if int(q["block_bytes"]) == self._store.block_bytes:
                # Pinned for as long as the asker may take to read them (bounded).
                ttl = min(max(float(q["ttl_s"]), 1.0), 600.0)
                lease, addrs = self._store.lease([int(k) for k in q["keys"]], ttl)
            try:
                peer = self._peer(str(q["host"]), int(q["port"]))
                reply = {"id": q["id"], "lease": lease, "addrs": addrs}
                self._agent.send_notif(peer, _EW + b"lease " + json.dumps(reply).encode())
            except Exception:
                self._forget_peer(str(q["host"]), int(q["port"]))
                if lease:
                    self._store.release(lease)
                raise
            self._served_leases += 1
            log.debug("kvmesh: %s asked for %d blocks, %d are here", src, len(q["keys"]), len(addrs))
        elif kind == b"lease":
            r = json.loads(body)
            with self._lock:
                slot = self._replies.get(str(r["id"]))
            if slot is None:  # the asker gave up waiting
                if r["lease"]:
                    self._agent.send_notif(src, _EW + b"release " + str(int(r["lease"])).encode())
                return
            slot[1] = (int(r["lease"]), [int(a) for a in r["addrs"]])
            slot[0].set()
        elif kind == b"release":
            self._store.release(int(body))
        else:
            raise ValueError(f"unknown east-west message {kind!r} from {src}")

    def _pull(self, p: Pull) -> list[int]:
        """Loads a request's blocks from the store, then from the peer; returns the block ids
        that could not be filled."""
        failed = []
        if p.keys:
            ok = self._store.load(p.keys, p.block_ids)
            failed = [b for b, good in zip(p.block_ids, ok) if not good]
        got = 0
        if p.peer_ids:
            try:
                got = self._pull_from_peer(p)
            except Exception as e:
                self._forget_peer(p.host, p.port)
                log.warning("kvmesh: pulling %d blocks of %s from %s:%d failed: %s; vLLM recomputes "
                            "them", len(p.peer_ids), p.req_id, p.host, p.port, e)
            if got < len(p.peer_ids):
                log.info("kvmesh: the peer at %s:%d supplied %d of %d blocks of %s", p.host, p.port,
                         got, len(p.peer_ids), p.req_id)
        return failed + p.peer_ids[got:]

    def _pull_from_peer(self, p: Pull) -> int:
        peer = self._peer(p.host, p.port)
        lookup = f"{self._agent.name}/{next(self._lookup_ids)}"
        slot: list[Any] = [threading.Event(), None]
        with self._lock:
            self._replies[lookup] = slot
        try:
            host, port = self._agent.address
            # The lease outlives this side's wait for the answer plus its wait for the READ.
            q = {"id": lookup, "keys": p.peer_keys, "block_bytes": self._store.block_bytes,
                 "host": host, "port": port, "ttl_s": 4 * self._peer_timeout}
            self._agent.send_notif(peer, _EW + b"lookup " + json.dumps(q).encode())
            if not slot[0].wait(self._peer_timeout):
                raise TimeoutError(f"no answer in {self._peer_timeout} s")
        finally:
            with self._lock:
                self._replies.pop(lookup, None)
        lease, addrs = slot[1]
        n = min(len(addrs), len(p.peer_ids))
        if n == 0:
            return 0
        local, remote = [], []
        for b, a in zip(p.peer_ids[:n], addrs):
            for i, (base, stride) in enumerate(self._layers):
                local.append((base + b * stride, self._page))
                remote.append((a + i * self._page, self._page))
        release = _EW + b"release " + str(lease).encode()
        try:
            xfer = self._agent.transfer("read", peer, local, remote, notif=release,
                                        backend=None if self._backend == "auto" else self._backend,
                                        local_gpu=self._gpu_dev)
            try:
                xfer.wait(self._peer_timeout)
            except TimeoutError:
                # vLLM recomputes into these blocks: the READ must be over before saying so.
                xfer.cancel()
                while xfer.status() == "pending":
                    time.sleep(0.005)
                raise
        except Exception:
            try:
                self._agent.send_notif(peer, release)
            except Exception:
                pass  # the lease expires on its own
            raise
        return n

    def _start_recv(self, r: Recv, attempt: int = 1) -> None:
        try:
            if self._agent is None:
                raise RuntimeError("no kvtransfer agent (register_kv_caches was not called)")
            peer = self._peer(r.host, r.port)
            if not r.local_ids:
                self._agent.send_notif(peer, r.remote_request_id.encode())
                return
            if (r.page_bytes != self._page or len(r.remote_layers) != len(self._layers)
                    or r.kv_layout != self._kv_layout):
                raise ValueError(
                    f"the prefill engine's KV layout ({len(r.remote_layers)} {r.kv_layout} page "
                    f"lists of {r.page_bytes}-byte pages) differs from this engine's "
                    f"({len(self._layers)} {self._kv_layout} of {self._page})")
            log.debug("kvmesh: pulling %d blocks of %s from %s (%s:%d)", len(r.local_ids), r.req_id,
                      peer, r.host, r.port)
            xfer = self._agent.transfer_blocks(
                "read", peer, self._layers, r.remote_layers, self._page,
                r.local_ids, r.remote_ids, notif=r.remote_request_id.encode(),
                backend=None if self._backend == "auto" else self._backend,
                local_gpu=self._gpu_dev, remote_gpu=r.gpu)
            self._recving[r.req_id] = (xfer, r, attempt)
        except Exception as e:
            self._forget_peer(r.host, r.port)
            if r.local_ids and attempt < 2:
                log.info("kvmesh: pulling the blocks of %s from %s:%d: %s; reconnecting", r.req_id,
                         r.host, r.port, e)
                return self._start_recv(r, attempt + 1)
            log.warning("kvmesh: pulling %d blocks of %s from %s:%d failed: %s; vLLM recomputes them",
                        len(r.local_ids), r.req_id, r.host, r.port, e)
            if r.local_ids:
                self._recving[r.req_id] = (None, r, attempt)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward pass (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvmeshConnectorMetadata) or not meta.saves or self._store is None:
            return
        if self._gpu:
            # The copies read what this step's forward pass wrote: after it, on the GPU.
            self._store.order_after(torch.cuda.current_stream().cuda_stream)
        for t in meta.saves:
            with self._lock:
                self._inflight[t.req_id] += 1
                self._delayed.add(t.req_id)
            self._futures.append(self._saver.submit(self._save, t))

    def _save(self, t: Transfer) -> None:
        try:
            failed = self._store.save(t.keys, t.block_ids)
        except Exception as e:  # never lose track of the request: count it done, keys failed
            log.error("kvmesh: saving %d blocks of %s failed: %s", len(t.keys), t.req_id, e)
            failed = t.keys
        with self._lock:
            self._failed_saves.extend((self._rank, k) for k in failed)
            self._inflight[t.req_id] -= 1
            if self._inflight[t.req_id] == 0:
                del self._inflight[t.req_id]

    def _wait_saves(self) -> None:
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # A preempted request's blocks are freed at once: no copy may still read them.
        self._wait_saves()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        self._futures = [f for f in self._futures if not f.done()]
        # Prefill side: decode engines tell us (notification = our request id) they have read.
        with self._lock:
            notifs, self._notifs = self._notifs, []
        for msg in notifs:
            rid = msg.decode(errors="replace")
            if self._sending.pop(rid, None) is None:
                self._read_notifs.add(rid)
        now = time.time()
        for rid, deadline in list(self._sending.items()):
            if now > deadline:
                log.warning("kvmesh: no decode engine read the blocks of %s in time; freeing them", rid)
                del self._sending[rid]
        # Decode side: finished pulls (a failed one is reported as failed loads: recompute).
        recved = set()
        for rid, (xfer, r, attempt) in list(self._recving.items()):
            status = "failed: not posted" if xfer is None else xfer.status()
            if status == "pending":
                continue
            del self._recving[rid]
            if status != "done" and xfer is not None and attempt < 2:
                # A connection the peer closed since the last pull: once more on a fresh one.
                log.info("kvmesh: pulling the blocks of %s %s; retrying on a new connection", rid, status)
                self._forget_peer(r.host, r.port)
                self._start_recv(r, attempt + 1)
                if rid in self._recving:
                    continue
            elif status != "done":
                log.warning("kvmesh: pulling the blocks of %s %s; vLLM recomputes them", rid, status)
                self._failed_recv.add(rid)
            recved.add(rid)
        # East-west pulls: blocks that could not be filled are load errors (vLLM recomputes
        # them); a request none of whose blocks arrived is a failed receive.
        for rid, (p, fut) in list(self._pulling.items()):
            if not fut.done():
                continue
            del self._pulling[rid]
            try:
                failed = fut.result()
            except Exception as e:
                log.warning("kvmesh: loading the blocks of %s failed: %s; vLLM recomputes them", rid, e)
                failed = p.block_ids + p.peer_ids
            if failed and len(failed) == len(p.block_ids) + len(p.peer_ids):
                self._failed_recv.add(rid)
            else:
                self._load_errors.update(failed)
            recved.add(rid)
        with self._lock:
            self._finishing |= finished_req_ids & self._delayed
            done = {r for r in self._finishing
                    if r not in self._inflight and r not in self._sending and r not in self._pulling}
            self._finishing -= done
            self._delayed -= done
        return (done or None), (recved or None)

    def get_transfer_results(self, finished_req_ids: set[str]):
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        sending, recving = self.get_finished(finished_req_ids)
        failed, self._failed_recv = self._failed_recv, set()
        # A failed pull is reported as finished and failed: vLLM then recomputes the request.
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()),
            finished_recving=set(recving or ()) | failed,
            failed_recving=failed,
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        if self._store is None:
            return None
        events = [(self._rank, s, m, k) for (s, m, k) in self._store.take_events()]
        with self._lock:
            failed, self._failed_saves = self._failed_saves, []
        if not events and not failed:
            return None
        return KvmeshWorkerMetadata(events, failed)

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER:
            self._closing.set()
            self._puller.shutdown(wait=True)
            self._wait_saves()
            self._saver.shutdown(wait=True)
            if self._store is not None:
                self._store.flush()
