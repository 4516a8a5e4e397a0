"""kvstore as vLLM's KV cache: a KV connector (v1) that vLLM loads out of tree.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "connectors.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {...}}'

Modules, each owning one thing (see docs/VLLM.md):
- `connector`: `KVStoreConnector`, the facade vLLM instantiates in its scheduler and worker processes;
- `scheduler`: lookups and the per-step load/save plan (pure bookkeeping, no vLLM import);
- `plan`: the picklable per-step plan the scheduler sends the workers;
- `worker`: loads and saves between the store and vLLM's blocks;
- `layout`: block moves for vLLM's CPU page layout (probed from its own kernel) and the CUDA layouts;
- `fingerprint`: the model fingerprint of the keys, from the model folder;
- `config`: `kv_connector_extra_config` and the stores it builds;
- `metrics`: counters, vLLM's connector stats and Prometheus metrics;
- `driver`: an offline engine in a child process, driven over pipes (tests, benchmarks).
`connector` and `driver` need vLLM; `plan` and `metrics` subclass its base classes when it is installed, and
the rest never imports it (the scheduler logic, layouts and stores are tested without an engine).
"""


def __getattr__(name: str):
    if name == "KVStoreConnector":
        from connectors.vllm.connector import KVStoreConnector

        return KVStoreConnector
    raise AttributeError(name)


__all__ = ["KVStoreConnector"]
