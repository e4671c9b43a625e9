#!/usr/bin/env python3
"""Start one real vLLM (CPU) OpenAI server as a subprocess, for end-to-end tests.

Importable (stdlib only, any python3 can import it):

    from engine import Engine
    with Engine(name="e1", port=8100, pub_port=5557, replay_port=5558, num_blocks=64) as e:
        e.url            # http://127.0.0.1:8100
        e.pub_endpoint   # tcp://127.0.0.1:5557  (ZMQ PUB, topic "kv@e1@tiny")

CLI (runs until killed with SIGINT/SIGTERM, then stops the engine):

    python3 tests/vllm/engine.py --name e1 --port 8100 --pub-port 5557 --replay-port 5558 [--num-blocks N]

The engine runs from the venv made by tests/vllm/setup.sh (.cache/vllm-venv) with the model
from .cache/tiny-llama. Output goes to a log file; on a failed start the tail is printed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KVMESH_CACHE", ROOT / ".cache"))
DEFAULT_PYTHON = CACHE / "vllm-venv" / "bin" / "python"
DEFAULT_MODEL = CACHE / "tiny-llama"
DEFAULT_LOG_DIR = CACHE / "engine-logs"
MODEL_NAME = "tiny"
RUN_DIR_PREFIX = "kvmesh-vllm-"


def log(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (racy, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class EngineError(RuntimeError):
    pass


class Engine:
    """One vLLM OpenAI API server (plus its EngineCore child) in its own process group."""

    def __init__(
        self,
        name: str,
        port: int,
        pub_port: int,
        replay_port: int,
        *,
        num_blocks: int | None = None,
        kvcache_gib: int = 1,
        max_model_len: int = 4096,
        max_num_seqs: int = 4,
        block_size: int = 32,
        model: str | os.PathLike = DEFAULT_MODEL,
        python: str | os.PathLike = DEFAULT_PYTHON,
        log_path: str | os.PathLike | None = None,
        omp_threads_bind: str | None = None,
        enforce_eager: bool = True,
        extra_args: list[str] | tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if block_size % 32:
            raise ValueError("block_size must be a multiple of 32 on the CPU backend")
        self.name = name
        self.port = port
        self.pub_port = pub_port
        self.replay_port = replay_port
        self.num_blocks = num_blocks
        self.kvcache_gib = kvcache_gib
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.model = str(model)
        self.python = str(python)
        self.host = host
        self.omp_threads_bind = omp_threads_bind
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.log_path = Path(log_path) if log_path else DEFAULT_LOG_DIR / f"{name}-{port}.log"
        self.topic = f"kv@{name}@{MODEL_NAME}"
        self.proc: subprocess.Popen | None = None
        self.run_dir: str | None = None
        self.start_seconds: float | None = None

    # --- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.pub_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    # --- command line ----------------------------------------------------------------------
    def kv_events_config(self) -> dict:
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.pub_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": self.topic,
        }

    def effective_max_model_len(self) -> int:
        """vLLM refuses to start unless one max-length request fits in the KV cache; block 0
        is the reserved null block, so N blocks hold (N - 1) * block_size tokens."""
        if self.num_blocks is None:
            return self.max_model_len
        fit = (self.num_blocks - 1) * self.block_size
        if fit < self.block_size:
            raise ValueError("num_blocks must be at least 2")
        return min(self.max_model_len, fit)

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", MODEL_NAME,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", "bfloat16",
            "--block-size", str(self.block_size),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo", "sha256_cbor",
            "--enable-prompt-tokens-details",
            "--kv-events-config", json.dumps(self.kv_events_config(), separators=(",", ":")),
            "--max-model-len", str(self.effective_max_model_len()),
            "--max-num-seqs", str(self.max_num_seqs),
            "--seed", "0",
            "--disable-uvicorn-access-log",
        ]
        if self.num_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(self.num_blocks)]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Offline, quiet, reproducible.
        env.update({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONHASHSEED": "0",
            # Integer GiB; vLLM turns it into kv_cache_memory_bytes (and it wins over
            # --kv-cache-memory-bytes). --num-gpu-blocks-override then caps the block count.
            "VLLM_CPU_KVCACHE_SPACE": str(int(self.kvcache_gib)),
            "VLLM_CACHE_ROOT": str(CACHE / "vllm-runtime"),
        })
        if self.run_dir is not None:
            # vLLM leaves ZMQ ipc sockets, gloo rendezvous files and inductor output in the
            # temp dir; a private one is removed on stop(). (Kept short: unix socket paths.)
            env["TMPDIR"] = self.run_dir
            env["VLLM_RPC_BASE_PATH"] = self.run_dir
        if self.omp_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_threads_bind
        env.update(self.extra_env)
        return env

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 600.0, abort=None) -> "Engine":
        """Launch and wait for /health. `abort()` returning True gives up early."""
        if self.proc is not None:
            raise EngineError(f"engine {self.name} already started")
        if not Path(self.python).exists():
            raise EngineError(f"{self.python} missing: run tests/vllm/setup.sh first")
        if not (Path(self.model) / "config.json").exists():
            raise EngineError(f"model {self.model} missing: run tests/vllm/setup.sh first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_run_dirs()
        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{self.name}-", dir="/tmp")
        Path(self.run_dir, "owner.pid").write_text(str(os.getpid()))
        t0 = time.monotonic()
        with open(self.log_path, "wb") as logf:
            logf.write(("$ " + " ".join(self.command()) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=str(ROOT),
                start_new_session=True,  # own process group: stop() reaches EngineCore too
                # SIGTERM the server if we die (even by SIGKILL). Only from the main thread:
                # the kernel fires it when the spawning *thread* exits.
                preexec_fn=(_set_parent_death_signal
                            if threading.current_thread() is threading.main_thread() else None),
            )
        try:
            self.wait_ready(timeout, t0, abort)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float, t0: float | None = None, abort=None) -> None:
        t0 = time.monotonic() if t0 is None else t0
        while True:
            if abort is not None and abort():
                raise EngineError(f"engine {self.name}: start aborted")
            rc = self.proc.poll()
            if rc is not None:
                raise EngineError(
                    f"engine {self.name} exited with {rc} during startup; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                status, _ = http_get(f"{self.url}/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise EngineError(
                    f"engine {self.name} not healthy after {timeout:.0f}s; log {self.log_path}:\n"
                    + self.log_tail()
                )
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the engine's process group, SIGKILL it after `grace` seconds."""
        if self.proc is None:
            self._remove_run_dir()
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                if not _group_alive(pgid):
                    break
                time.sleep(0.2)
            else:
                continue
            break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        _LIVE.discard(self)
        self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            data = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(data[-lines:])

    def __enter__(self) -> "Engine":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- small client helpers --------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        r = http_post_json(f"{self.url}/tokenize", {
            "model": MODEL_NAME, "prompt": text, "add_special_tokens": add_special_tokens})
        return r["tokens"]

    def complete(self, prompt, max_tokens: int = 1, **kw) -> dict:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, **kw}
        return http_post_json(f"{self.url}/v1/completions", body)

    @staticmethod
    def cached_tokens(response: dict) -> int:
        details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


def _sweep_stale_run_dirs() -> None:
    """Remove temp dirs left by engine owners that were SIGKILLed."""
    for d in Path("/tmp").glob(RUN_DIR_PREFIX + "*"):
        try:
            pid = int((d / "owner.pid").read_text())
            os.kill(pid, 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # unreadable, or someone else's
        shutil.rmtree(d, ignore_errors=True)


def _set_parent_death_signal() -> None:
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        pass


_LIVE: set[Engine] = set()


@atexit.register
def _stop_all() -> None:
    for eng in list(_LIVE):
        eng.stop(grace=10.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; check /proc for a live member.
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="engine name; KV event topic is kv@NAME@tiny")
    ap.add_argument("--port", type=int, required=True, help="HTTP port of the OpenAI server")
    ap.add_argument("--pub-port", type=int, required=True, help="ZMQ PUB port for KV events")
    ap.add_argument("--replay-port", type=int, required=True, help="ZMQ ROUTER port for event replay")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV cache size in blocks (--num-gpu-blocks-override); small forces evictions")
    ap.add_argument("--kvcache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (integer GiB)")
    ap.add_argument("--cpu-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM default), 'nobind', or core ids like '1'")
    ap.add_argument("--compile", action="store_true",
                    help="use torch.compile (slower start, needs a C++ compiler) instead of --enforce-eager")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--python", default=str(DEFAULT_PYTHON))
    ap.add_argument("--log", default=None, help="log file (default .cache/engine-logs/NAME-PORT.log)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra vLLM arguments")
    a = ap.parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra

    eng = Engine(a.name, a.port, a.pub_port, a.replay_port, num_blocks=a.num_blocks,
                 kvcache_gib=a.kvcache_gib, max_model_len=a.max_model_len,
                 max_num_seqs=a.max_num_seqs, block_size=a.block_size, model=a.model,
                 python=a.python, log_path=a.log, omp_threads_bind=a.cpu_bind,
                 enforce_eager=not a.compile, extra_args=extra)

    stopping = False
    # Exit (stopping the engine) when whoever started us dies without killing us, e.g. a
    # Rust test harness whose Child was dropped. (Not PR_SET_PDEATHSIG on ourselves: it fires
    # when the spawning *thread* exits, and test harnesses spawn from short-lived threads.)
    parent = os.getppid()

    started = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        if not started:
            raise KeyboardInterrupt  # abort the wait; start() stops the engine

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log(f"starting {a.name} on port {a.port} (log {eng.log_path})")
    try:
        eng.start(timeout=a.timeout, abort=lambda: os.getppid() != parent)
    except EngineError as e:
        log(str(e))
        return 1
    except KeyboardInterrupt:
        eng.stop()
        log(f"{a.name} start interrupted")
        return 130
    started = True
    log(f"{a.name} ready in {eng.start_seconds:.1f}s")
    print(json.dumps({"name": a.name, "url": eng.url, "pub": eng.pub_endpoint,
                      "replay": eng.replay_endpoint, "topic": eng.topic,
                      "pid": eng.proc.pid, "log": str(eng.log_path)}), flush=True)
    rc = 0
    while not stopping:
        if os.getppid() != parent:
            log(f"parent {parent} gone")
            break
        if not eng.alive():
            log(f"{a.name} exited unexpectedly; log tail:\n{eng.log_tail()}")
            rc = 1
            break
        time.sleep(0.5)
    log(f"stopping {a.name}")
    eng.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
