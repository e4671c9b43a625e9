"""kvmesh's vLLM integration.

``KvmeshConnector`` is a vLLM KV connector (``KVConnectorBase_V1``). Load it with::

    --kv-transfer-config '{"kv_connector":"KvmeshConnector",
                           "kv_connector_module_path":"kvmesh.vllm",
                           "kv_role":"kv_both",
                           "kv_connector_extra_config":{"host_bytes": 4294967296}}'

See ``kvmesh.vllm.connector`` for what it does and its options.
"""

from kvmesh.vllm.connector import KvmeshConnector, KvmeshConnectorMetadata

__all__ = ["KvmeshConnector", "KvmeshConnectorMetadata"]
