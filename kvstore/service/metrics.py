"""What the sidecar exports on `/metrics` (Prometheus text): request counts and latencies per endpoint,
and the store's counters and usage, read at scrape time; with `[adaptive]`, its counters
(`kvstore_adaptive_<name>`, `kvstore_adaptive_chunks{level}`) and measured figures (gauges
`kvstore_adaptive_bandwidth_bytes_per_second`, `kvstore_adaptive_prefill_tokens_per_second`). A
`StoreCollector` registered in any prometheus_client registry exports the same for an embedding process
(the HF connector's store)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvstore.store import TieredStore

_TIER_COUNTERS = {
    "hits": "chunks found", "misses": "chunks not found", "puts": "chunks stored",
    "put_rejected": "chunks a put could not store", "evictions": "chunks evicted",
    "corrupt": "records that failed a check", "errors": "I/O or service errors turned into misses",
    "bytes_read": "bytes read", "bytes_written": "bytes written",
}


class StoreCollector:
    """Exports `store.stats()` at scrape time: counters per tier and of the store, usage gauges per tier."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self):
        s = self.store.stats()
        tiers = s["tiers"]
        for name, doc in _TIER_COUNTERS.items():
            fam = CounterMetricFamily(f"kvstore_tier_{name}", f"Per tier: {doc}.", labels=["tier"])
            for tier, t in tiers.items():
                fam.add_metric([tier], t["stats"][name])
            yield fam
        for name in ("used_bytes", "capacity_bytes", "entries", "pinned"):
            fam = GaugeMetricFamily(f"kvstore_tier_{name}", f"Per tier: {name.replace('_', ' ')} now.", labels=["tier"])
            for tier, t in tiers.items():
                fam.add_metric([tier], getattr(t["usage"], name))
            yield fam
        for name, value in s["store"].items():
            yield CounterMetricFamily(f"kvstore_store_{name}", f"Store counter {name}.", value=value)
        yield GaugeMetricFamily("kvstore_store_pending_bytes", "Bytes queued for the slower tiers.", value=s["pending_bytes"])
        fam = CounterMetricFamily("kvstore_codec_chunks_without_codebook",
                                  "Chunks cachegen encoded with per-chunk tables: no codebook for their model.", labels=["model"])
        for fingerprint, n in s["chunks_without_codebook"].items():
            fam.add_metric([fingerprint], n)
        yield fam
        if "adaptive" in s:
            yield from _adaptive_metrics(s["adaptive"])


def _adaptive_metrics(a: dict):
    for name in ("loads", "fetched_chunks", "recomputed_chunks", "replans", "fetch_failures", "copies_stored",
                 "copies_failed"):
        yield CounterMetricFamily(f"kvstore_adaptive_{name}", f"Adaptive loading: {name.replace('_', ' ')}.",
                                  value=a[name])
    fam = CounterMetricFamily("kvstore_adaptive_chunks", "Chunks adaptive loads fetched, by codec level.", labels=["level"])
    for level, n in a["chunks_by_level"].items():
        fam.add_metric([level], n)
    yield fam
    yield GaugeMetricFamily("kvstore_adaptive_bandwidth_bytes_per_second", "Measured bandwidth of the adaptive tier.",
                            value=a["bandwidth_bytes_s"])
    yield GaugeMetricFamily("kvstore_adaptive_prefill_tokens_per_second", "Measured prefill speed (0: not yet).",
                            value=a["prefill_tokens_s"])


class Metrics:
    def __init__(self, store: TieredStore) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvstore_http_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("kvstore_http_request_seconds", "HTTP request latency by endpoint.", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.registry.register(StoreCollector(store))

