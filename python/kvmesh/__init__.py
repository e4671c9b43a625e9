"""kvmesh: KV-cache infrastructure for distributed LLM inference.

``IndexClient`` talks to a ``kvmesh serve`` daemon (HTTP or gRPC) so that a scheduler can route
each prompt to the engine that already holds the longest prefix of it::

    import kvmesh
    client = kvmesh.IndexClient("http://127.0.0.1:8080")
    best = client.score("my-model", token_ids)[0]

``BlockStore`` is kvmesh's tiered KV-block store (host memory and disk), and ``kvmesh.vllm``
holds ``KvmeshConnector``, the vLLM KV connector that offloads to it and reloads from it.
"""

from kvmesh._native import (
    BlockStore,
    EngineScore,
    EngineStatus,
    IndexClient,
    KvmeshError,
    Transfer,
    TransferAgent,
    __version__,
)

__all__ = [
    "BlockStore",
    "EngineScore",
    "EngineStatus",
    "IndexClient",
    "KvmeshError",
    "Transfer",
    "TransferAgent",
    "__version__",
]
