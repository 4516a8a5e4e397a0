"""Worker-side data plane of the vLLM connector (`connectors.vllm.worker`) on a real store and CPU pages
laid out like vLLM's "vec" ISA (K transposed per page), without an engine."""

from __future__ import annotations

import time

import pytest
import torch

from connectors.vllm.layout import CpuPages, PageLayout
from connectors.vllm.metrics import Counters, KVStoreStats
from connectors.vllm.plan import ChunkMove, RequestLoad, RequestSave, StepPlan
from kvstore.config import build_store, load_config
from kvstore.keys import chunk_refs

L, H, D, B, C = 2, 2, 8, 4, 8  # layers, heads, head dim, block size, chunk tokens (2 blocks)


def vec_layout() -> PageLayout:
    n = B * D
    pos = torch.empty(2, B, D, dtype=torch.long)
    pos[0] = torch.arange(D).view(1, D) * B + torch.arange(B).view(B, 1)  # K: [D][N]
    pos[1] = n + torch.arange(n).view(B, D)  # V: [N][D]
    code = torch.empty(2 * n, dtype=torch.long)
    code[pos.view(-1)] = torch.arange(2 * n)
    return PageLayout.from_code(code, B, D)


@pytest.fixture
def store(tmp_path):
    s = build_store(load_config(env={}, overrides={"disk.path": str(tmp_path), "memory.capacity": "16MiB",
                                                   "chunk_tokens": str(C), "disk.codec": "raw"}))
    yield s
    s.close()


def make_worker(store, caches, **kw):
    from connectors.vllm.worker import WorkerSide

    return WorkerSide(store, CpuPages(caches, vec_layout()), fingerprint="fp", chunk_shape=(L, 2, C, H, D),
                      dtype=torch.float32, counters=Counters(), **kw)


def caches(seed=None):
    buf = torch.zeros(L, 16, H, B, 2 * D) if seed is None else torch.randn(L, 16, H, B, 2 * D,
                                                                          generator=torch.Generator().manual_seed(seed))
    return buf, [buf[i] for i in range(L)]


def moves(tokens, blocks, seed_refs="fp"):
    refs = chunk_refs(tokens, namespace="default", fingerprint=seed_refs, chunk_tokens=C)
    return [ChunkMove(r, blocks[i * 2:(i + 1) * 2]) for i, r in enumerate(refs)]


def test_save_then_load_into_other_blocks_round_trips(store):
    src_buf, src = caches(seed=1)
    toks = list(range(100, 124))  # three chunks
    w = make_worker(store, src)
    w.save(StepPlan(saves=[RequestSave("a", moves(toks, [3, 4, 5, 6, 7, 8]))]))
    assert w.flush(10)
    dst_buf, dst = caches()
    r = make_worker(store, dst)
    r.load(StepPlan(loads=[RequestLoad("b", moves(toks, [9, 10, 11, 12, 13, 14]))]))
    assert r.take_invalid_blocks() == set()
    assert torch.equal(dst_buf[:, 9:15], src_buf[:, 3:9])
    assert not dst_buf[:, :9].any() and not dst_buf[:, 15:].any()
    stats = r.counters.take()
    assert stats["loaded_tokens|cpu"] == 24 and stats["tier_hits|cpu"] == 3
    assert w.counters.totals()["saved_tokens|"] == 24
    w.close(), r.close()


def test_failed_chunk_reports_its_blocks_and_later_ones_and_skips_that_requests_saves(store):
    _, src = caches(seed=2)
    toks = list(range(200, 224))
    w = make_worker(store, src)
    w.save(StepPlan(saves=[RequestSave("a", moves(toks, [1, 2, 3, 4, 5, 6]))]))
    w.flush(10)
    store.delete([moves(toks, [0] * 6)[1].ref.key])  # chunk 1 evicted between lookup and load
    dst_buf, dst = caches()
    r = make_worker(store, dst)
    load = RequestLoad("b", moves(toks, [7, 8, 9, 10, 11, 12]))
    other = list(range(300, 308))
    plan = StepPlan(loads=[load], saves=[RequestSave("b", moves(toks + list(range(8)), [0] * 6 + [13, 14])[3:]),
                                         RequestSave("c", moves(other, [15, 0]))])
    r.load(plan)
    assert r.take_invalid_blocks() == {9, 10, 11, 12}  # chunk 1's blocks and chunk 2's
    assert r.take_invalid_blocks() == set()  # reported once
    assert dst_buf[:, 7:9].any() and not dst_buf[:, 9:13].any()  # chunk 0 loaded, nothing after the failure
    r.save(plan)
    r.flush(10)
    saved = store.contains([m.ref.key for s in plan.saves for m in s.chunks])
    assert saved == [False, True]  # "b" computed its last chunk over a failed load: not saved; "c" saved
    assert r.counters.totals()["load_failures|"] == 2
    w.close(), r.close()


def test_saves_beyond_the_pending_bound_are_dropped_not_waited_for(store):
    _, src = caches(seed=3)
    chunk_bytes = L * 2 * C * H * D * 4
    w = make_worker(store, src, max_pending_bytes=chunk_bytes)  # room for one chunk in flight
    w._writer.submit(lambda: __import__("time").sleep(0.5))  # the writer is busy
    w.save(StepPlan(saves=[RequestSave("a", moves(list(range(16)), [1, 2, 3, 4]))]))
    assert w.counters.totals()["saves_dropped|"] == 1
    w.flush(10)
    assert w.counters.totals()["saved_tokens|"] == C
    w.close()


def test_tensor_parallel_ranks_agree_on_failures(store):
    _, src = caches(seed=4)
    calls = []
    w = make_worker(store, src, any_failed=lambda local: calls.append(local) or True)  # another rank failed
    toks = list(range(400, 416))
    plan = StepPlan(loads=[RequestLoad("a", [])], saves=[RequestSave("a", moves(toks, [1, 2, 3, 4]))])
    w.load(plan)
    w.save(plan)
    w.flush(10)
    assert calls == [False] and store.contains([m.ref.key for m in plan.saves[0].chunks]) == [False, False]
    w.save(StepPlan(saves=plan.saves))  # no load in this step: no collective, saved
    w.flush(10)
    assert calls == [False] and store.contains([m.ref.key for m in plan.saves[0].chunks]) == [True, True]
    w.close()


def test_rekeyed_to_the_workers_fingerprint(store):
    _, src = caches(seed=5)
    w = make_worker(store, src)
    toks = list(range(500, 508))
    w.save(StepPlan(saves=[RequestSave("a", moves(toks, [1, 2], seed_refs="scheduler-fp"))]))
    w.flush(10)
    (ref,) = chunk_refs(toks, namespace="default", fingerprint="fp", chunk_tokens=C)
    assert store.contains([ref.key]) == [True]
    w.close()


def test_stats_aggregate_and_reduce():
    a, b = KVStoreStats({"loaded_tokens|disk": 256}), KVStoreStats({"loaded_tokens|disk": 256, "lookups|": 1})
    merged = a.aggregate(b)
    assert merged.data == {"loaded_tokens|disk": 512, "lookups|": 1}
    assert merged.reduce() == {"loaded_tokens.disk": 512, "lookups": 1}
    assert KVStoreStats({"lookups|": 0}).is_empty() and not merged.is_empty()


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_layout_round_trip_through_the_kernels(store, device):
    """What a GPU worker does: flash-attention caches [2, num_blocks, B, H, D] per layer, moved by
    kernels.gather_paged / scatter_paged (the torch reference on CPU, the Triton kernels on CUDA)."""
    from connectors.vllm.layout import DevicePages
    from connectors.vllm.worker import WorkerSide

    g = torch.Generator().manual_seed(7)
    src = [torch.randn(2, 16, B, H, D, generator=g).to(device) for _ in range(L)]
    dst = [torch.zeros(2, 16, B, H, D, device=device) for _ in range(L)]
    toks = list(range(600, 616))
    w = WorkerSide(store, DevicePages(src, B), fingerprint="fp", chunk_shape=(L, 2, C, H, D), dtype=torch.float32)
    w.save(StepPlan(saves=[RequestSave("a", moves(toks, [2, 3, 4, 5]))]))
    assert w.flush(10)
    r = WorkerSide(store, DevicePages(dst, B), fingerprint="fp", chunk_shape=(L, 2, C, H, D), dtype=torch.float32)
    r.load(StepPlan(loads=[RequestLoad("b", moves(toks, [-1, 9, 10, 11]))]))  # block 8 is vLLM's own: skipped
    for s_layer, d_layer in zip(src, dst):
        assert torch.equal(d_layer[:, 9:12].cpu(), s_layer[:, 3:6].cpu())
        assert not d_layer[:, :9].any() and not d_layer[:, 12:].any()
    w.close(), r.close()


def test_a_hung_tier_costs_a_bounded_wait_then_a_reported_recompute(tmp_path):
    """A Redis that accepts connections and never answers: the load waits one socket timeout, reports
    every planned block, and the next load within `retry_after` does not wait at all."""
    import socket

    from kvstore.store import TieredStore
    from kvstore.tiers import MemoryTier, RedisTier
    from codec import make_codec

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or writes
    url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
    store = TieredStore([MemoryTier(16 << 20), RedisTier(url, make_codec("raw"), timeout=0.3, retry_after=30)],
                        chunk_tokens=C)
    _, dst = caches()
    w = make_worker(store, dst)
    plan = StepPlan(loads=[RequestLoad("a", moves(list(range(700, 716)), [1, 2, 3, 4]))])
    t = time.perf_counter()
    w.load(plan)
    first = time.perf_counter() - t
    assert w.take_invalid_blocks() == {1, 2, 3, 4}
    t = time.perf_counter()
    w.load(plan)
    again = time.perf_counter() - t
    assert w.take_invalid_blocks() == {1, 2, 3, 4}
    assert first < 2.0 and again < 0.1  # one bounded wait, then misses at once while the tier is down
    w.close()
    hung.close()


def adaptive_settings(tmp_path, **extra) -> dict:
    return {"disk.path": str(tmp_path), "memory.capacity": "16MiB", "chunk_tokens": str(C), "disk.codec": "zstd",
            "adaptive.levels": "int8,raw", **extra}


def save_three_chunks(settings: dict, toks: list[int], seed: int) -> torch.Tensor:
    """A worker saves the three chunks of `toks` from blocks 3-8 of random caches (returned); closed after."""
    src_buf, src = caches(seed=seed)
    with build_store(load_config(env={}, overrides=settings)) as store:
        w = make_worker(store, src)
        w.save(StepPlan(saves=[RequestSave("a", moves(toks, [3, 4, 5, 6, 7, 8]))]))
        assert w.flush(10)
        w.close()
    return src_buf


def test_adaptive_loads_pick_levels_and_count_them(tmp_path):
    from kvstore.keys import level_key

    settings = adaptive_settings(tmp_path, **{"adaptive.floor": "lossless"})
    toks = list(range(300, 324))  # three chunks
    src_buf = save_three_chunks(settings, toks, seed=5)
    # Another worker (its memory tier empty): the leading chunks load adaptively, at the lossless level.
    with build_store(load_config(env={}, overrides=settings)) as store:
        keys = [m.ref.key for m in moves(toks, [0] * 6)]
        assert all(store.tiers[-1].contains([level_key(k, "int8") for k in keys]))  # saved at every level
        dst_buf, dst = caches()
        r = make_worker(store, dst)
        r.load(StepPlan(loads=[RequestLoad("b", moves(toks, [9, 10, 11, 12, 13, 14]))]))
        assert r.take_invalid_blocks() == set()
        assert torch.equal(dst_buf[:, 9:15], src_buf[:, 3:9])
        stats = r.counters.take()
        assert stats["adaptive_chunks|raw"] == 3 and stats["loaded_tokens|disk"] == 24
        assert store.stats()["adaptive"]["chunks_by_level"] == {"raw": 3}
        r.close()


def test_a_timed_forward_gives_the_prefill_speed_and_a_slow_link_recomputes_the_tail(tmp_path):
    settings = adaptive_settings(tmp_path)
    toks = list(range(400, 424))  # three chunks
    save_three_chunks(settings, toks, seed=6)
    with build_store(load_config(env={}, overrides=settings)) as store:
        dst_buf, dst = caches()
        r = make_worker(store, dst)
        estimates = store.adaptive.estimates
        r.forward_started(C - 1)  # less than a chunk (a decode step, say): not timed
        r.forward_finished()
        assert estimates.figures().prefill is None
        r.forward_started(64 * C)
        time.sleep(0.01)
        r.forward_finished()
        prefill = estimates.figures().prefill
        assert prefill is not None and 0 < prefill <= 64 * C / 0.01
        # A link measured at 1 KB/s: recomputing the chunks (a tail: vLLM computes after the loads) is
        # faster than fetching any of them, so every block is handed back for vLLM to recompute.
        estimates.observe_fetch(1000, 1.0)
        r.load(StepPlan(loads=[RequestLoad("b", moves(toks, [9, 10, 11, 12, 13, 14]))]))
        assert r.take_invalid_blocks() == set(range(9, 15))
        assert not dst_buf.any()
        stats = r.counters.take()
        assert stats["adaptive_recomputed_chunks|"] == 3 and "load_failures|" not in stats
        r.close()
