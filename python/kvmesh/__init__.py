"""kvmesh: KV-cache infrastructure for distributed LLM inference.

``IndexClient`` talks to a ``kvmesh serve`` daemon (HTTP or gRPC) so that a scheduler can route
each prompt to the engine that already holds the longest prefix of it::

    import kvmesh
    client = kvmesh.IndexClient("http://127.0.0.1:8080")
    best = client.score("my-model", token_ids)[0]
"""

from kvmesh._native import (
    EngineScore,
    EngineStatus,
    IndexClient,
    KvmeshError,
    __version__,
)

__all__ = ["EngineScore", "EngineStatus", "IndexClient", "KvmeshError", "__version__"]
