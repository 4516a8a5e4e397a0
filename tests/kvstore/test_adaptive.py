"""Adaptive loading over a real disk tier: level copies stored and found by the chunk's content key,
loads that re-plan when the link's measured bandwidth changes, bad copies as misses, and the `[adaptive]`
configuration's typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.paced import PacedTier
from codec import make_codec
from kvstore.adaptive import FAILED, FETCH_AHEAD, AdaptiveLoading
from kvstore.config import build_store, load_config
from kvstore.errors import ConfigError
from kvstore.keys import ChunkKind, chunk_refs, level_key
from kvstore.levels import AdaptiveConfig
from kvstore.planner import RECOMPUTE, LoadPlan
from kvstore.tiers import DiskTier

SHAPE = (2, 2, 64, 2, 16)  # [L, 2, T, H, D]: 16 KiB of fp16 KV a chunk
N = 12


@pytest.fixture
def chunks(chunk_factory):
    tokens = np.arange(N * SHAPE[2], dtype=np.uint32)
    refs = chunk_refs(tokens, namespace="test", fingerprint="m", chunk_tokens=SHAPE[2], kind=ChunkKind.PREFIX)
    made = [chunk_factory(i, SHAPE, tokens=r.tokens) for i, r in enumerate(refs)]
    return refs, [type(c)(r.key, c.kv, r.tokens, r.start) for c, r in zip(made, refs)]


def loading(tmp_path, rate=1e12, **kw):
    disk = DiskTier(tmp_path, 1 << 30, make_codec("zstd"), fsync=False)
    tier = PacedTier(disk, rate)
    return AdaptiveLoading(AdaptiveConfig(**{"levels": ("int8", "raw"), **kw}), tier), tier


def test_copies_are_found_from_the_content_key(tmp_path, chunks):
    refs, cs = chunks
    ad, tier = loading(tmp_path)
    assert ad.store_levels(cs) == [True] * N
    assert ad.store_levels(cs) == [True] * N  # already there: kept, not written again
    assert ad.counters.snapshot()["copies_stored"] == 2 * N
    assert tier.contains([level_key(r.key, "int8") for r in refs]) == [True] * N
    assert not any(tier.contains([r.key for r in refs]))  # the plain key stays the tier's own copy
    assert level_key(refs[0].key, "int8") != level_key(refs[0].key, "raw")
    assert ad.available(refs[:2] + [refs[2]._replace(key=refs[2].key._replace(chunk_hash=bytes(16)))]) == \
        [frozenset({"int8", "raw"})] * 2 + [frozenset()]


def test_which_copies_exist_is_one_request_to_the_tier_and_a_failing_tier_holds_none(tmp_path, chunks, monkeypatch):
    refs, cs = chunks
    ad, tier = loading(tmp_path)
    ad.store_levels(cs[:4])
    calls = []
    real = tier.contains
    monkeypatch.setattr(tier, "contains", lambda keys, tokens=None: calls.append(len(keys)) or real(keys, tokens))
    assert ad.available(refs[:6]) == [frozenset({"int8", "raw"})] * 4 + [frozenset()] * 2
    assert ad.holds_every_copy([r.key for r in refs[:6]]) == [True] * 4 + [False] * 2
    assert calls == [12, 12]  # every level's keys in one call (one round trip to a remote tier)

    def down(keys, tokens=None):  # a fault that a local disk cannot produce
        raise OSError("connection refused")
    monkeypatch.setattr(tier, "contains", down)
    assert ad.available(refs[:6]) == [frozenset()] * 6


def test_a_load_replans_when_the_bandwidth_drops(tmp_path, chunks):
    refs, cs = chunks
    ad, tier = loading(tmp_path, rate=1e9)
    ad.store_levels(cs)
    ad.estimates.observe_fetch(16 << 10, 16e-6)  # as measured by earlier loads: a chunk at 1 GB/s
    avail = ad.available(refs)
    kv_bytes = cs[0].nbytes
    plan = ad.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=kv_bytes, element_bytes=2)
    assert plan.actions() == ["raw"] * N  # fast link: the most faithful copy
    stream = ad.stream(refs, avail, plan, chunk_tokens=SHAPE[2], kv_bytes=kv_bytes)
    got = []
    for i, chunk in stream:
        assert chunk is not None and chunk.key == refs[i].key
        got.append(i)
        tier.rate = 2e5  # the link slows down to 200 KB/s: 80 ms a raw chunk, ~40 ms an int8 one
    report = stream.report()
    assert got == list(range(N))
    assert report.replans >= 1
    assert report.actions[0] == "raw" and report.actions[-1] == "int8"
    assert report.bandwidth < 1e6
    stats = ad.stats()
    assert stats["fetched_chunks"] == N and stats["replans"] == report.replans
    assert sum(stats["chunks_by_level"].values()) == N


def test_a_link_that_changed_between_loads_is_replanned_for_once(tmp_path, chunks):
    """The estimate from earlier loads says fast; this load's link is steadily slow: its first transfer
    shows it, and the rest of the load is planned once from this load's own figure (a moving average
    from the stale figure would halve its way down and re-plan at every chunk)."""
    refs, cs = chunks
    ad, tier = loading(tmp_path, rate=2e5)
    ad.store_levels(cs)
    ad.estimates.observe_fetch(16 << 10, 16e-6)  # earlier loads: a chunk at 1 GB/s
    avail = ad.available(refs)
    plan = ad.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2)
    assert plan.actions() == ["raw"] * N
    stream = ad.stream(refs, avail, plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
    assert all(chunk is not None for _, chunk in stream)
    report = stream.report()
    assert report.replans == 1
    assert report.actions.count("int8") >= N - 1 - FETCH_AHEAD  # all but what was requested before it knew


def test_a_reader_that_never_encoded_plans_from_the_codecs_nominal_sizes(tmp_path, chunks):
    """Copies stored by another process (a precompute job): this loading has measured no level's size.
    Each level's nominal size stands in for it, so a slow link takes int8, not the first level it measured
    (before the priors it kept to zstd, whose measured 0.94 beat an unmeasured level's assumed 1.0)."""
    refs, cs = chunks
    writer, tier = loading(tmp_path, rate=2e5, levels=("int8", "zstd"))
    writer.store_levels(cs)
    reader = AdaptiveLoading(writer.config, tier)
    reader.estimates.observe_fetch(2 << 10, 0.01)  # the link measured at 200 KB/s by earlier fetches
    avail = reader.available(refs)
    plan = reader.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2)
    assert plan.actions() == ["int8"] * N
    assert reader.estimates.figures().ratio == {}
    assert reader.estimates.figures().size_ratio("int8") == pytest.approx(8.1 / 16)
    stream = reader.stream(refs, avail, plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
    assert all(chunk is not None for _, chunk in stream)
    assert stream.report().actions == ["int8"] * N
    assert 0.5 < reader.estimates.figures().size_ratio("int8") < 0.6  # measured now: the prior is replaced


def test_the_link_keeps_fetching_while_the_head_is_recomputed(tmp_path, chunks):
    """A plan that recomputes leading chunks counts on the transfers made meanwhile: the fetcher may run
    that many copies ahead of the decodes (a queue of FETCH_AHEAD stalled the link after two)."""
    refs, cs = chunks
    ad, _ = loading(tmp_path, levels=("raw",))
    ad.store_levels(cs)
    ad.estimates.observe_prefill(1000, 1.0)  # 128 tokens (two chunks): 0.128 s
    ad.estimates.observe_fetch(16 << 10, 0.02)  # a raw chunk: 0.02 s
    plan = LoadPlan(2, ("raw",) * (N - 2), 0, 0.0)
    stream = ad.stream(refs, ad.available(refs), plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
    assert stream._queue.maxsize == FETCH_AHEAD + 7  # ceil(0.128 / 0.02) copies arrive during the head
    assert [i for i, c in stream if c is not None] == list(range(2, N))
    stream.report()
    no_head = ad.stream(refs, ad.available(refs), LoadPlan(0, ("raw",) * N, 0, 0.0), chunk_tokens=SHAPE[2],
                        kv_bytes=cs[0].nbytes)
    assert no_head._queue.maxsize == FETCH_AHEAD
    no_head.close()


def test_fetched_copies_are_exact_for_a_lossless_level(tmp_path, chunks):
    refs, cs = chunks
    ad, _ = loading(tmp_path, floor="lossless")
    ad.store_levels(cs)
    avail = ad.available(refs)
    assert avail == [frozenset({"raw"})] * N  # only lossless levels are allowed
    plan = ad.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2)
    stream = ad.stream(refs, avail, plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
    for i, chunk in stream:
        assert np.array_equal(chunk.kv.numpy(), cs[i].kv.numpy())
    assert stream.report().actions == ["raw"] * N


@pytest.mark.parametrize("floor,promoted", [("lossless", True), ("int8", False)])  # promoted: every chunk
def test_exact_loads_are_promoted_into_the_memory_tier_and_lossy_ones_never(tmp_path, chunks, floor, promoted):
    refs, cs = chunks
    settings = {"disk.path": str(tmp_path), "memory.capacity": "16MiB", "chunk_tokens": str(SHAPE[2]),
                "disk.codec": "zstd", "adaptive.levels": "int8,raw", "adaptive.floor": floor,
                "adaptive.recompute": "false"}
    with build_store(load_config(env={}, overrides=settings)) as store:
        ad = store.adaptive
        ad.store_levels(cs)
        ad.estimates.observe_fetch(1 << 10, 1.0)  # a slow link: the lossy floor takes int8
        avail = ad.available(refs)
        stream = ad.stream(refs, avail, ad.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2),
                           chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
        assert all(chunk is not None for _, chunk in stream)
        actions = stream.report().actions
        assert ("int8" in actions) != promoted  # planned at 1 KB/s: the first chunks are int8 at a lossy floor
        memory = store.tiers[0]
        exact = [a == "raw" for a in actions]
        assert memory.contains([r.key for r in refs]) == exact  # the raw copies, never the int8 ones
        got = memory.get([r.key for r, e in zip(refs, exact) if e])
        assert all(np.array_equal(g.kv.numpy(), c.kv.numpy()) for g, c in zip(got, [c for c, e in zip(cs, exact) if e]))
        assert store.stats()["store"]["promotions"] == sum(exact)


def test_a_missing_copy_ends_the_stream_and_the_rest_is_recomputed(tmp_path, chunks):
    refs, cs = chunks
    ad, tier = loading(tmp_path, levels=("raw",))
    ad.store_levels(cs)
    avail = ad.available(refs)
    tier.inner.delete([level_key(refs[3].key, "raw")])
    plan = ad.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2)
    stream = ad.stream(refs, avail, plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
    got = list(stream)
    assert [i for i, c in got if c is not None] == [0, 1, 2] and got[-1] == (3, None)
    report = stream.report()
    assert report.actions[3] == FAILED and set(report.actions[4:]) == {RECOMPUTE}
    assert ad.stats()["fetch_failures"] == 1


@pytest.mark.parametrize("settings,message", [
    ({}, "at least one"),
    ({"adaptive.levels": "nosuchcodec"}, "not one of"),
    ({"adaptive.levels": "cachegen:x"}, "integer level"),
    ({"adaptive.levels": "cachegen:99"}, "cachegen:99"),
    ({"adaptive.levels": "int8,raw", "adaptive.floor": "zstd"}, "floor"),
    ({"adaptive.levels": "int8,kivi2", "adaptive.floor": "lossless"}, "lossless"),
    ({"adaptive.levels": "int8,int8"}, "twice"),
    ({"adaptive.levels": "int8", "adaptive.replan_threshold": "0"}, "replan_threshold"),
    ({"adaptive.levels": "int8", "adaptive.recompute": "maybe"}, "true or false"),
    ({"adaptive.levels": "int8", "adaptive.speed": "1"}, "unknown setting"),
])
def test_bad_adaptive_config_is_a_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"adaptive.enabled": "true", **settings})


def test_adaptive_config_builds_on_a_byte_tier(tmp_path):
    cfg = load_config(overrides={"disk.path": str(tmp_path), "adaptive.levels": "int8, zstd",
                                 "adaptive.floor": "lossless"})
    assert cfg.adaptive.levels == ("int8", "zstd") and cfg.adaptive.allowed == ("zstd",)
    with build_store(cfg) as store:
        assert store.adaptive.tier.name == "disk" and "adaptive" in store.stats()
    assert build_store(load_config(overrides={"disk.path": str(tmp_path)})).adaptive is None
    with pytest.raises(ConfigError, match="adaptive.tier"):
        build_store(load_config(overrides={"disk.path": str(tmp_path), "adaptive.levels": "int8",
                                           "adaptive.tier": "cpu"}))
    with pytest.raises(ConfigError, match="byte tier"):
        build_store(load_config(overrides={"disk.enabled": "false", "adaptive.levels": "int8"}))


def test_store_metrics_export_the_adaptive_counters(tmp_path, chunks):
    from prometheus_client import CollectorRegistry, generate_latest

    from kvstore.service.metrics import StoreCollector

    refs, cs = chunks
    cfg = load_config(overrides={"disk.path": str(tmp_path), "memory.enabled": "false", "adaptive.levels": "raw"})
    with build_store(cfg) as store:
        store.adaptive.store_levels(cs[:2])
        avail = store.adaptive.available(refs[:2])
        plan = store.adaptive.plan(avail, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes, element_bytes=2)
        stream = store.adaptive.stream(refs[:2], avail, plan, chunk_tokens=SHAPE[2], kv_bytes=cs[0].nbytes)
        assert all(c is not None for _, c in stream)
        stream.report()
        registry = CollectorRegistry()
        registry.register(StoreCollector(store))
        text = generate_latest(registry).decode()
    assert 'kvstore_adaptive_chunks_total{level="raw"} 2.0' in text
    assert "kvstore_adaptive_copies_stored_total 2.0" in text and "kvstore_adaptive_bandwidth_bytes_per_second" in text
