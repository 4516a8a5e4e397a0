"""`KVStoreConnector`: kvstore as vLLM's KV cache (vLLM KV connector v1, loaded out of tree).

    KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm.connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config={...})

A thin facade: vLLM makes one instance per role. In the scheduler process it answers lookups and plans
each step (`scheduler.SchedulerSide`, over the persistent tiers: `config.lookup_store`); in each worker
process it moves the planned chunks (`worker.WorkerSide`, over the configured store:
`config.worker_store`) between the store and vLLM's blocks (`layout`). Start-up checks (each a clear
error): chunk size a multiple of vLLM's block size, a persistent tier, one KV cache group, no pipeline
parallelism, a float KV cache. Loads are synchronous (`(n, False)`); saves never block the forward pass
longer than a copy; a chunk that fails to load is reported and recomputed (with
`kv_load_failure_policy="recompute"`; vLLM's default, "fail", fails the request instead: warned at
start-up). Metrics go through vLLM's connector stats (`metrics`).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from connectors.vllm import metrics
from connectors.vllm.config import ConnectorConfig, connector_config, lookup_store, worker_store
from connectors.vllm.fingerprint import vllm_fingerprint
from connectors.vllm.layout import CpuPages, DevicePages, PagedKV, probe_page_layout, vllm_cpu_page_write
from connectors.vllm.plan import StepPlan, rekey
from connectors.vllm.scheduler import SchedulerSide
from connectors.vllm.worker import WorkerSide
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

log = logging.getLogger("kvstore.vllm")
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.cfg: ConnectorConfig = connector_config(transfer.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.cfg.check_block_size(self.block_size)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError("the kvstore connector does not support pipeline parallelism (tensor parallelism is fine)")
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise ConfigError("the kvstore connector supports models with one KV cache group (no hybrid/SSM models)")
        self.tp_size = parallel.tensor_parallel_size
        self.kv_dtype = _kv_dtype(vllm_config)
        self.load = self.cfg.load and transfer.kv_role in ("kv_both", "kv_consumer")
        self.save = self.cfg.save and transfer.kv_role in ("kv_both", "kv_producer")
        if self.load and transfer.kv_load_failure_policy != "recompute":
            log.warning("kvstore connector: kv_load_failure_policy is %r: a chunk that fails to load will fail its "
                        "request; set kv_load_failure_policy='recompute' to recompute it instead",
                        transfer.kv_load_failure_policy)
        self.counters = metrics.Counters()
        self.sched: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self.store = None
        self._closed = False
        if role == KVConnectorRole.SCHEDULER:
            fingerprint = self._fingerprint(0)
            ranks = [self._fingerprint(r) for r in range(self.tp_size)]
            self.store = lookup_store(self.cfg) if self.load else None
            store = self.store

            def lookup(refs):
                # A chunk is usable when every tensor-parallel rank stored its heads of it.
                return min(store.lookup_refs([rekey(r, fp) for r in refs]) for fp in ranks)

            self.sched = SchedulerSide(chunk_tokens=self.cfg.chunk_tokens, block_size=self.block_size,
                                       namespace=self.cfg.namespace, fingerprint=fingerprint,
                                       lookup=lookup if self.load else None, save=self.save)
        else:
            self.store = worker_store(self.cfg)
        atexit.register(self.shutdown)

    def _fingerprint(self, rank: int) -> str:
        if self.cfg.fingerprint:
            return self.cfg.fingerprint + (f"-tp{self.tp_size}r{rank}" if self.tp_size > 1 else "")
        mc = self._vllm_config.model_config
        runtime = {"quantization": getattr(mc, "quantization", None), "hf_overrides": getattr(mc, "hf_overrides", None)}
        return vllm_fingerprint(_model_folder(mc), kv_dtype=self.kv_dtype, tp_size=self.tp_size, tp_rank=rank,
                                runtime=runtime)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss

    # -- scheduler side ------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.sched.matched(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.sched.admitted(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.sched.plan(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.sched.finished(request.request_id)
        return False, None

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = _layer_order(kv_caches)
        tensors, seen = [], set()
        for name in names:  # layers that share one cache (KV sharing) are moved once
            t = kv_caches[name]
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors.append(t)
        first = tensors[0]
        if first.dtype not in KV_DTYPES.values():
            raise ConfigError(f"the kvstore connector moves float32/float16/bfloat16 KV caches, not {first.dtype} "
                              f"(fp8 KV caches are not supported)")
        pages, heads, head_dim, kernel_block = _pages(self._vllm_config, names[0], tensors)
        if self.block_size % kernel_block:
            raise ConfigError(f"vLLM's block size {self.block_size} is not a multiple of its kernel block size {kernel_block}")
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
        shape = (len(tensors), 2, self.cfg.chunk_tokens, heads, head_dim)
        self.worker = WorkerSide(self.store, pages, fingerprint=self._fingerprint(rank), chunk_shape=shape,
                                 dtype=first.dtype, block_ratio=self.block_size // kernel_block,
                                 counters=self.counters, max_pending_bytes=self.cfg.max_pending_save_bytes,
                                 any_failed=_tp_any_failed if self.tp_size > 1 else None)
        log.info("kvstore connector: %d layers, %d KV heads x %d, %s, fingerprint %s, tiers %s", len(tensors), heads,
                 head_dim, first.dtype, self.worker.fingerprint, [t.name for t in self.store.tiers])

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.worker is None:
            return
        plan = self._plan()
        if plan is not None and plan.loads:
            self.worker.load(plan)
        meta = self._connector_metadata
        self.worker.forward_started(meta.scheduled_tokens if isinstance(meta, StepPlan) else 0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous (start_load_kv)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # saves copy all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        if self.worker is None:
            return
        self.worker.forward_finished()
        plan = self._plan()
        if plan is not None and (plan.saves or plan.loads):
            self.worker.save(plan)

    def _plan(self) -> StepPlan | None:
        plan = self._connector_metadata
        return plan if isinstance(plan, StepPlan) and not plan.is_empty() else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_invalid_blocks() if self.worker is not None else set()

    # -- stats and lifetime --------------------------------------------------------------------------

    def get_kv_connector_stats(self):
        if self.sched is not None:
            for name, value in self.sched.stats.take().items():
                self.counters.add(name, value)
        data = self.counters.take()
        return metrics.KVStoreStats(data=data) if any(data.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return metrics.KVStoreStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return metrics.build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for this worker's saves to reach every tier (tests, benchmarks, orderly shutdown)."""
        return self.worker.flush(timeout) if self.worker is not None else True

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.worker is not None:
                self.worker.close()
            elif self.store is not None:
                self.store.close()
        except Exception as e:  # shutting down: report, never raise into vLLM's teardown
            log.warning("kvstore connector: shutdown: %s", e)


def _kv_dtype(vllm_config) -> str:
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        if cache_dtype not in KV_DTYPES:
            raise ConfigError(f"the kvstore connector does not support kv_cache_dtype={cache_dtype!r} (fp8 KV caches)")
        return cache_dtype
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def _model_folder(model_config) -> Path:
    path = Path(str(model_config.model)).expanduser()
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_config.model), revision=getattr(model_config, "revision", None),
                                      local_files_only=True))
    except Exception as e:
        raise ConfigError(f"cannot find the files of model {model_config.model!r} to fingerprint it ({e}); set "
                          f"kv_connector_extra_config.fingerprint to name the model yourself") from None


def _layer_order(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    """Layer names in model order (the layer index of a chunk must mean the same in every engine)."""
    try:
        from vllm.model_executor.models.utils import extract_layer_index

        return sorted(kv_caches, key=extract_layer_index)
    except Exception:
        return list(kv_caches)


def _pages(vllm_config, layer_name: str, tensors: list[torch.Tensor]) -> tuple[PagedKV, int, int, int]:
    """The block mover for these caches: (mover, KV heads, head dim, kernel block size)."""
    from vllm.platforms import current_platform

    first = tensors[0]
    if current_platform.is_cpu():
        if first.dim() != 4:
            raise ConfigError(f"unexpected CPU KV cache shape {tuple(first.shape)} (MLA is not supported)")
        _, heads, block, fused = first.shape
        head_dim = fused // 2
        isa = _cpu_isa(vllm_config, layer_name, first.dtype, block, head_dim)
        layout = probe_page_layout(vllm_cpu_page_write(isa), block, head_dim, first.dtype)
        log.info("kvstore connector: CPU page layout of ISA %s is %s", isa, "affine" if layout.affine else "a permutation")
        return CpuPages(tensors, layout), heads, head_dim, block
    if first.dim() != 5:
        raise ConfigError(f"unexpected KV cache shape {tuple(first.shape)} (MLA and other layouts are not supported)")
    block, heads, head_dim = first.shape[2], first.shape[3], first.shape[4]
    return DevicePages(tensors, block), heads, head_dim, block


def _cpu_isa(vllm_config, layer_name: str, dtype: torch.dtype, block: int, head_dim: int) -> str:
    layer = vllm_config.compilation_config.static_forward_context.get(layer_name)
    isa = getattr(layer, "isa", None)
    if isa:
        return isa
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block, head_dim, vllm_config.cache_config.cache_dtype)


def _tp_any_failed(local: bool) -> bool:
    """Whether any tensor-parallel rank failed a load this step (all ranks call this in the same steps)."""
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=get_tp_group().cpu_group)
    return bool(flag.item())
