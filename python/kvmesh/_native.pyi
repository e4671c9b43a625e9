from typing import Optional, Sequence

__version__: str

class KvmeshError(Exception):
    """The daemon refused a request: ``args == (message, status)``."""

class EngineScore:
    name: str
    matched_blocks: int
    matched_tokens: int
    gpu: int
    cpu: int
    storage: int
    remote: int
    score: float

class EngineStatus:
    name: str
    model: Optional[str]
    state: str
    last_seq: Optional[int]
    blocks: Optional[dict[str, int]]

class IndexClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: Optional[str] = None,
        grpc: bool = False,
        ca_pem: Optional[bytes] = None,
    ) -> None: ...
    def score(
        self,
        model: str,
        token_ids: Optional[Sequence[int]] = None,
        *,
        block_hashes: Optional[Sequence[int]] = None,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
        engines: Optional[Sequence[str]] = None,
    ) -> list[EngineScore]: ...
    def score_many(
        self,
        model: str,
        prompts: Sequence[Sequence[int]],
        *,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
        engines: Optional[Sequence[str]] = None,
    ) -> list[list[EngineScore]]: ...
    def engines(self) -> list[EngineStatus]: ...
    def add_engine(
        self,
        name: str,
        endpoint: str,
        *,
        replay_endpoint: Optional[str] = None,
        model: Optional[str] = None,
    ) -> None: ...
    def remove_engine(self, name: str) -> None: ...

class BlockStore:
    """kvstore's tiered store (host memory, optionally a disk tier) with copies between an
    engine's KV pages and the store done natively, the GIL released."""

    def __init__(
        self,
        block_bytes: int,
        host_bytes: int,
        disk_path: Optional[str] = None,
        disk_bytes: int = 0,
        lock_memory: bool = False,
    ) -> None: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def host_capacity_blocks(self) -> int: ...
    def register_layers(
        self, layers: Sequence[tuple[int, int]], page_bytes: int, num_blocks: int
    ) -> None: ...
    def save(self, keys: Sequence[int], block_ids: Sequence[int]) -> list[int]: ...
    def load(self, keys: Sequence[int], block_ids: Sequence[int]) -> list[bool]: ...
    def put(self, key: int, data: bytes) -> None: ...
    def get(self, key: int) -> Optional[bytes]: ...
    def lookup(self, keys: Sequence[int]) -> list[str]: ...
    def arena(self) -> tuple[int, int]: ...
    def lease(self, keys: Sequence[int], ttl_s: float) -> tuple[int, list[int]]: ...
    def release(self, lease: int) -> bool: ...
    def expire_leases(self) -> int: ...
    @property
    def leases_held(self) -> int: ...
    def inject_load_failures(self, n: int) -> None: ...
    def flush(self) -> None: ...
    def take_events(self) -> list[tuple[bool, str, int]]: ...
    def stats(self) -> dict[str, dict[str, int]]: ...

class Transfer:
    """A posted kvtransfer READ or WRITE."""

    def status(self) -> str: ...
    def wait(self, timeout_s: float) -> int: ...
    def cancel(self) -> None: ...
    @property
    def backend(self) -> str: ...

class TransferAgent:
    """A kvtransfer agent: registered memory, a metadata side channel, batched READ/WRITE."""

    def __init__(
        self,
        name: str,
        listen: str = "127.0.0.1:0",
        advertise: Optional[str] = None,
        timeout_s: float = 10.0,
        shm: bool = True,
        ucx: bool = False,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def address(self) -> tuple[str, int]: ...
    def register(self, address: int, length: int, gpu: Optional[int] = None) -> int: ...
    def connect(self, host: str, port: int) -> str: ...
    def transfer_blocks(
        self,
        op: str,
        remote: str,
        local_layers: Sequence[tuple[int, int]],
        remote_layers: Sequence[tuple[int, int]],
        page_bytes: int,
        local_ids: Sequence[int],
        remote_ids: Sequence[int],
        notif: Optional[bytes] = None,
        backend: Optional[str] = None,
        local_gpu: Optional[int] = None,
        remote_gpu: Optional[int] = None,
    ) -> Transfer: ...
    def transfer(
        self,
        op: str,
        remote: str,
        local: Sequence[tuple[int, int]],
        remote_regions: Sequence[tuple[int, int]],
        notif: Optional[bytes] = None,
        backend: Optional[str] = None,
        local_gpu: Optional[int] = None,
        remote_gpu: Optional[int] = None,
    ) -> Transfer: ...
    def wait_notif(self, timeout_s: float) -> Optional[tuple[str, bytes]]: ...
    def send_notif(self, remote: str, msg: bytes) -> None: ...
    def get_notifs(self) -> list[tuple[str, bytes]]: ...
