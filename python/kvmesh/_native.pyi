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
