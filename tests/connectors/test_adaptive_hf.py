"""HFConnector with adaptive loading on the tiny model: chunks stored at two levels, loaded at the level
the measured figures choose; with a lossless floor the output equals `model.generate` token for token,
whatever the plan (fetched, or recomputed while the rest arrives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.paced import PacedTier
from codec import make_codec
from connectors.hf import HFConnector
from connectors.models import load_model
from kvstore.adaptive import AdaptiveLoading
from kvstore.levels import AdaptiveConfig
from kvstore.planner import RECOMPUTE
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier

CT = 32
NEW = 6


@pytest.fixture(scope="module")
def shipped():
    return load_model("tiny", torch.float32)


@pytest.fixture(scope="module")
def ids(shipped):
    from benchmarks.models.evalset import load_rag

    _, tok = shipped
    return np.asarray(tok(load_rag()[3].prompt(), add_special_tokens=False)["input_ids"], dtype=np.uint32)[:300]


def reference(model, ids) -> list[int]:
    t = torch.from_numpy(ids.astype(np.int64)).reshape(1, -1)
    with torch.inference_mode():
        out = model.generate(t, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, t.shape[1]:].tolist()


def adaptive_store(path, rate: float, floor: str = "", first_memory: bool = False, recompute: bool = True) -> TieredStore:
    disk = DiskTier(path, 1 << 30, make_codec("zstd"), fsync=False)
    tiers = ([MemoryTier(64 << 20)] if first_memory else []) + [disk]
    loading = AdaptiveLoading(AdaptiveConfig(levels=("int8", "zstd"), floor=floor, recompute=recompute), PacedTier(disk, rate))
    return TieredStore(tiers, chunk_tokens=CT, adaptive=loading)


def test_stored_at_two_levels_and_loaded_losslessly(shipped, ids, tmp_path):
    model, _ = shipped
    ref = reference(model, ids)
    store = adaptive_store(tmp_path, 1e12, floor="lossless")
    with HFConnector(model, store) as conn:
        first = conn.generate(ids, NEW)
        assert first.report.adaptive is None  # nothing stored yet: the ordinary path
        conn.wait_stored()
        n = (len(ids) - 1) // CT
        assert store.adaptive.counters.snapshot()["copies_stored"] == 2 * n  # every chunk at both levels
        again = conn.generate(ids, NEW)
    rep = again.report
    assert again.tokens == ref
    assert rep.adaptive.actions == ["zstd"] * n  # the floor: lossless copies only
    assert rep.reused_tokens == n * CT and rep.tokens_by_tier == {"disk": n * CT}
    assert store.stats()["adaptive"]["chunks_by_level"] == {"zstd": n}


def test_a_slow_link_picks_the_small_level(shipped, ids, tmp_path):
    model, _ = shipped
    store = adaptive_store(tmp_path, 1e12, recompute=False)  # only the levels compete
    with HFConnector(model, store) as conn:
        conn.generate(ids, NEW)
        conn.wait_stored()
        store.adaptive.tier.rate = 2e5  # 200 KB/s: a zstd chunk (~30 KB) takes ~0.15 s, int8 about half
        store.adaptive.estimates.observe_fetch(200_000, 1.0)
        got = conn.prefill(ids)
    assert set(got.report.adaptive.actions) == {"int8"}
    assert got.report.reused_tokens == len(got.report.adaptive.actions) * CT


def test_a_hopeless_link_recomputes_leading_chunks_and_keeps_the_output(shipped, ids, tmp_path):
    model, _ = shipped
    ref = reference(model, ids)
    store = adaptive_store(tmp_path, 1e12, floor="lossless")
    with HFConnector(model, store) as conn:
        conn.generate(ids, NEW)
        conn.wait_stored()
        assert store.adaptive.estimates.figures().prefill  # measured on the first, full prefill
        store.adaptive.tier.rate = 5e4  # 50 KB/s: fetching a chunk costs more than prefilling it
        store.adaptive.estimates.observe_fetch(50_000, 1.0)
        again = conn.generate(ids, NEW)
    actions = again.report.adaptive.actions
    assert actions[0] == RECOMPUTE
    assert again.tokens == ref
    assert again.report.reused_tokens == sum(a == "zstd" for a in actions) * CT


def test_chunks_in_the_first_memory_tier_take_the_ordinary_path(shipped, ids, tmp_path):
    model, _ = shipped
    store = adaptive_store(tmp_path, 1e12, first_memory=True)
    with HFConnector(model, store) as conn:
        conn.generate(ids, NEW)
        conn.wait_stored()
        again = conn.prefill(ids)
    assert again.report.adaptive is None and again.report.tokens_by_tier.get("cpu")
