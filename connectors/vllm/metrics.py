"""The connector's metrics: per-process counters, vLLM's stats pipeline, and Prometheus.

- `Counters`: thread-safe sums keyed by (name, tier), with `take()` (the values since the last take, for
  vLLM) and `totals()` (since start, for a local Prometheus collector). Names, with the tier label
  where it applies:
  scheduler: `lookups`, `lookup_tokens`, `hit_tokens`, `lookup_seconds`;
  worker: `loaded_tokens{tier}`, `load_seconds`, `load_failures` (chunks), `saved_tokens`,
  `save_seconds` (the copy out of vLLM's blocks, on the forward path), `store_seconds` (the store's put,
  off it), `saves_dropped` (chunks), and per store tier `tier_hits{tier}`, `tier_misses{tier}`,
  `tier_errors{tier}`, `tier_corrupt{tier}`, `tier_bytes_read{tier}`, `tier_bytes_written{tier}`,
  `tier_get_seconds{tier}`, `tier_put_seconds{tier}` (deltas of the store's own counters);
  adaptive loading: `adaptive_chunks{tier}` (the label holds the codec level each chunk was fetched at),
  `adaptive_recomputed_chunks`, `adaptive_replans`.
- `KVStoreStats`: vLLM's `KVConnectorStats` for these counters. The workers and the scheduler report
  theirs every step (`get_kv_connector_stats`); vLLM sums them and hands them to its stat loggers.
- `KVStorePromMetrics`: registers them with vLLM's Prometheus metrics as counters
  `vllm:kvstore_<name>` (labels: vLLM's engine labels + `tier`), so `vllm serve`'s /metrics shows them
  and `LLM.get_metrics()` returns them (both need stats logging on).
- `CountersCollector`: the same counters as `kvstore_vllm_<name>` for a prometheus_client registry of
  the process that holds them (embedding uses).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily

NAMES = ("lookups", "lookup_tokens", "hit_tokens", "lookup_seconds", "loaded_tokens", "load_seconds", "load_failures",
         "saved_tokens", "save_seconds", "store_seconds", "saves_dropped", "tier_hits", "tier_misses", "tier_errors",
         "tier_corrupt", "tier_bytes_read", "tier_bytes_written", "tier_get_seconds", "tier_put_seconds",
         "adaptive_chunks", "adaptive_recomputed_chunks", "adaptive_replans")
_HELP = {
    "lookups": "Requests looked up in the store by vLLM's scheduler.",
    "lookup_tokens": "Prompt tokens looked up.",
    "hit_tokens": "Prompt tokens found stored beyond vLLM's own prefix hit (to be loaded).",
    "lookup_seconds": "Seconds spent in lookups (scheduler).",
    "loaded_tokens": "Tokens of KV loaded into vLLM's blocks, by the tier that served them.",
    "load_seconds": "Seconds spent loading (store get and copies into vLLM's blocks).",
    "load_failures": "Chunks that the lookup found but that could not be loaded (recomputed).",
    "saved_tokens": "Tokens of KV handed to the store.",
    "save_seconds": "Seconds spent copying KV out of vLLM's blocks for saves (forward path).",
    "store_seconds": "Seconds spent in the store's put (background thread).",
    "saves_dropped": "Chunks not saved because the store was behind (a future miss).",
    "tier_hits": "Store tier hits.",
    "tier_misses": "Store tier misses.",
    "tier_errors": "Store tier I/O or service errors.",
    "tier_corrupt": "Store tier records that failed a check.",
    "tier_bytes_read": "Bytes read from a store tier.",
    "tier_bytes_written": "Bytes written to a store tier.",
    "tier_get_seconds": "Seconds in a store tier's gets.",
    "tier_put_seconds": "Seconds in a store tier's puts.",
    "adaptive_chunks": "Chunks an adaptive load fetched, by codec level (in the tier label).",
    "adaptive_recomputed_chunks": "Chunks an adaptive load chose to recompute rather than fetch.",
    "adaptive_replans": "Adaptive load plans changed during a load after the measured bandwidth moved.",
}
_TIER_FIELDS = {"hits": "tier_hits", "misses": "tier_misses", "errors": "tier_errors", "corrupt": "tier_corrupt",
                "bytes_read": "tier_bytes_read", "bytes_written": "tier_bytes_written",
                "get_seconds": "tier_get_seconds", "put_seconds": "tier_put_seconds"}
SEP = "|"  # data keys are "name|tier" ("name|" without a tier): plain strings survive any serializer


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval: dict[str, float] = defaultdict(float)
        self._totals: dict[str, float] = defaultdict(float)
        self._tier_base: dict[str, dict[str, float]] = {}

    def add(self, name: str, value: float, tier: str = "") -> None:
        if not value:
            return
        key = f"{name}{SEP}{tier}"
        with self._lock:
            self._interval[key] += value
            self._totals[key] += value

    def add_tiers(self, tier_stats: dict[str, dict[str, float]]) -> None:
        """Add the growth of each tier's counters since the last call ({tier name: TierStats.snapshot()})."""
        for tier, now in tier_stats.items():
            base = self._tier_base.get(tier, {})
            for fieldname, name in _TIER_FIELDS.items():
                self.add(name, now.get(fieldname, 0) - base.get(fieldname, 0), tier)
            self._tier_base[tier] = {f: now.get(f, 0) for f in _TIER_FIELDS}

    def take(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._interval)
            self._interval.clear()
        return out

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)


def split_key(key: str) -> tuple[str, str]:
    name, _, tier = key.partition(SEP)
    return name, tier


def _stats_base():
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

    return KVConnectorStats


try:
    _Base = _stats_base()
except ImportError:  # pragma: no cover - vLLM not installed: the counters still work
    _Base = object


@dataclass
class KVStoreStats(_Base):
    """The connector's counters for one stats interval: `data` maps "name|tier" to a sum."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: "KVStoreStats") -> "KVStoreStats":
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k.rstrip(SEP).replace(SEP, "."): round(v, 4) for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


def build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues):
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

    class KVStorePromMetrics(KVConnectorPromMetrics):
        def __init__(self) -> None:
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            self._counters = {name: self._counter_cls(name=f"vllm:kvstore_{name}", documentation=_HELP[name],
                                                      labelnames=labelnames + ["tier"]) for name in NAMES}

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
            labels = self.per_engine_labelvalues.get(engine_idx, [])
            for key, value in (transfer_stats_data or {}).items():
                name, tier = split_key(key)
                counter = self._counters.get(name)
                if counter is not None and value > 0:
                    counter.labels(*labels, tier).inc(value)

    return KVStorePromMetrics()


class CountersCollector:
    """A prometheus_client collector over `Counters.totals()`: `registry.register(CountersCollector(c))`."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        by_name: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for key, value in self.counters.totals().items():
            name, tier = split_key(key)
            by_name[name].append((tier, value))
        for name in NAMES:
            family = CounterMetricFamily(f"kvstore_vllm_{name}", _HELP[name], labels=["tier"])
            for tier, value in by_name.get(name, []):
                family.add_metric([tier], value)
            yield family
