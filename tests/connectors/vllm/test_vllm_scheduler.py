"""Scheduler-side logic of the vLLM connector (`connectors.vllm.scheduler`), without an engine.

Requests and scheduler outputs are vLLM's own dataclasses where it is installed (so a renamed field
fails here), else stand-ins with the same fields. The lookup is a fake store: a set of stored chunk keys.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from connectors.vllm.plan import StepPlan
from connectors.vllm.scheduler import SchedulerSide
from kvstore.keys import chunk_refs
from tests.support.engines import require_vllm

C, B = 256, 128  # chunk tokens, block size

try:
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
except ImportError:  # pragma: no cover
    CachedRequestData = NewRequestData = SchedulerOutput = None


def request(rid: str, tokens, *, lora=None, cache_salt=None, mm=False, outputs=0):
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(tokens), num_tokens=len(tokens) + outputs,
                           mm_features=["image"] if mm else [], prompt_embeds=None, pooling_params=None,
                           lora_request=lora, cache_salt=cache_salt)


def new_data(req, block_ids, num_computed):
    fields = dict(req_id=req.request_id, prompt_token_ids=req.prompt_token_ids, mm_features=req.mm_features,
                  sampling_params=None, pooling_params=None, block_ids=(list(block_ids),),
                  num_computed_tokens=num_computed, lora_request=req.lora_request)
    return NewRequestData(**fields) if NewRequestData else SimpleNamespace(**fields)


def cached_data(entries, resumed=()):
    """entries: (req_id, new block ids or None, num_computed_tokens)."""
    fields = dict(req_ids=[e[0] for e in entries], resumed_req_ids=set(resumed), new_token_ids=[], all_token_ids={},
                  new_block_ids=[(list(e[1]),) if e[1] is not None else None for e in entries],
                  num_computed_tokens=[e[2] for e in entries], num_output_tokens=[0] * len(entries))
    return CachedRequestData(**fields) if CachedRequestData else SimpleNamespace(**fields)


def output(new=(), cached=None, scheduled=None):
    fields = dict(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached or cached_data([]),
                  num_scheduled_tokens=dict(scheduled or {}), total_num_scheduled_tokens=sum((scheduled or {}).values()),
                  scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
                  free_encoder_mm_hashes=[])
    return SchedulerOutput(**fields) if SchedulerOutput else SimpleNamespace(**fields)


class FakeStore:
    def __init__(self):
        self.keys = set()
        self.calls = 0

    def lookup(self, refs):
        self.calls += 1
        n = 0
        for r in refs:
            if r.key not in self.keys:
                break
            n += 1
        return n

    def store(self, side, req, n_chunks):
        self.keys.update(r.key for r in side.refs(req)[:n_chunks])


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def side(store):
    return SchedulerSide(chunk_tokens=C, block_size=B, namespace="ns", fingerprint="fp", lookup=store.lookup)


def test_lookup_is_memoized_and_capped_to_leave_one_token(side, store):
    req = request("a", tokens(1024))
    store.store(side, req, 4)  # the whole prompt is stored
    assert [side.matched(req, 0) for _ in range(3)] == [1023, 1023, 1023]
    assert store.calls == 1  # vLLM may ask again: one lookup per admission
    side.admitted(req, 1023)
    plan = side.plan(output([new_data(req, range(1, 9), 1023)], scheduled={"a": 1}))
    (load,) = plan.loads
    assert [m.ref.start for m in load.chunks] == [0, 256, 512, 768]  # the last chunk whole: its last token recomputed
    assert [m.block_ids for m in load.chunks] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert plan.saves == []  # nothing newly computed is a full chunk not loaded


def test_partial_hit_loads_stored_chunks_and_saves_the_rest(side, store):
    req = request("a", tokens(1100))
    store.store(side, req, 2)
    assert side.matched(req, 0) == 512
    side.admitted(req, 512)
    plan = side.plan(output([new_data(req, range(10, 19), 512)], scheduled={"a": 588}))
    assert [m.ref.start for m in plan.loads[0].chunks] == [0, 256]
    (save,) = plan.saves  # 512 + 588 = 1100 computed: chunks 2 and 3 are complete, chunk 4 is not
    assert [m.ref.start for m in save.chunks] == [512, 768]
    assert [m.block_ids for m in save.chunks] == [[14, 15], [16, 17]]
    assert save.chunks[0].ref.key == side.refs(req)[2].key


def test_mid_chunk_start_skips_vllm_local_blocks(side, store):
    req = request("a", tokens(1100))
    store.store(side, req, 3)
    assert side.matched(req, 128) == 640  # local hit of one block, not chunk-aligned
    side.admitted(req, 640)
    plan = side.plan(output([new_data(req, range(1, 10), 768)], scheduled={"a": 332}))
    first, *rest = plan.loads[0].chunks
    assert first.ref.start == 0 and first.block_ids == [-1, 2]  # block 1 is vLLM's own (maybe shared) block
    assert [m.block_ids for m in rest] == [[3, 4], [5, 6]]
    assert [m.ref.start for m in plan.saves[0].chunks] == [768]


def test_local_hit_beyond_the_store_matches_nothing(side, store):
    req = request("a", tokens(1100))
    store.store(side, req, 1)
    assert side.matched(req, 512) == 0


def test_chunked_prefill_saves_each_chunk_in_the_step_that_completes_it(side):
    req = request("a", tokens(1400))
    assert side.matched(req, 0) == 0
    side.admitted(req, 0)
    saved = []
    plan = side.plan(output([new_data(req, range(1, 5), 0)], scheduled={"a": 512}))
    saved.append([m.ref.start for s in plan.saves for m in s.chunks])
    plan = side.plan(output(cached=cached_data([("a", [5, 6, 7], 512)]), scheduled={"a": 500}))
    saved.append([m.ref.start for s in plan.saves for m in s.chunks])
    plan = side.plan(output(cached=cached_data([("a", [8, 9, 10, 11], 1012)]), scheduled={"a": 388}))
    saved.append([m.ref.start for s in plan.saves for m in s.chunks])
    assert [m.block_ids for m in plan.saves[0].chunks] == [[7, 8], [9, 10]]  # chunks 3-4: logical blocks 6-9
    plan = side.plan(output(cached=cached_data([("a", None, 1400)]), scheduled={"a": 1}))  # decode
    assert plan.is_empty()
    assert saved == [[0, 256], [512], [768, 1024]]  # 1400 tokens: five full chunks, the sixth never


def test_shared_prefix_different_suffix(side, store):
    prefix = tokens(600, seed=1)
    a, b = request("a", prefix + tokens(500, seed=2)), request("b", prefix + tokens(500, seed=3))
    ra, rb = side.refs(a), side.refs(b)
    assert [r.key for r in ra[:2]] == [r.key for r in rb[:2]]  # chunks 0-1 lie inside the shared 600 tokens
    assert ra[2].key != rb[2].key
    store.store(side, a, 4)
    assert side.matched(b, 0) == 512


def test_failed_load_lets_recomputed_chunks_be_saved_again(side, store):
    req = request("a", tokens(1100))
    store.store(side, req, 3)
    side.matched(req, 0)
    side.admitted(req, 768)
    plan = side.plan(output([new_data(req, range(1, 10), 768)], scheduled={"a": 332}))
    assert len(plan.loads[0].chunks) == 3 and [m.ref.start for m in plan.saves[0].chunks] == [768]
    # The load of chunk 1 failed: vLLM truncated the request to 256 computed tokens and recomputes.
    plan = side.plan(output(cached=cached_data([("a", None, 256)]), scheduled={"a": 844}))
    assert plan.loads == []
    assert [m.ref.start for m in plan.saves[0].chunks] == [256, 512, 768]


def test_preempted_request_is_looked_up_again_with_its_new_blocks(side, store):
    req = request("a", tokens(1100))
    side.matched(req, 0)
    side.admitted(req, 0)
    side.plan(output([new_data(req, range(1, 10), 0)], scheduled={"a": 1100}))
    store.store(side, req, 4)  # saved meanwhile (by this very request)
    req.num_tokens += 3  # preempted after three output tokens
    assert side.matched(req, 0) == 1024
    side.admitted(req, 1024)
    plan = side.plan(output(cached=cached_data([("a", range(20, 30), 1024)], resumed={"a"}), scheduled={"a": 79}))
    assert [m.block_ids for m in plan.loads[0].chunks] == [[20, 21], [22, 23], [24, 25], [26, 27]]
    assert plan.saves == []


def test_salts_and_ineligible_requests(side, store):
    ids = tokens(600)
    plain, lora = request("a", ids), request("b", ids, lora=SimpleNamespace(lora_name="x", lora_int_id=1))
    salted = request("c", ids, cache_salt="tenant")
    keys = [side.refs(r)[0].key for r in (plain, lora, salted)]
    assert len(set(keys)) == 3
    store.store(side, plain, 2)
    assert side.matched(lora, 0) == 0 and side.matched(salted, 0) == 0
    mm = request("d", ids, mm=True)
    assert side.refs(mm) is None and side.matched(mm, 0) == 0
    side.admitted(mm, 0)
    assert side.plan(output([new_data(mm, range(1, 6), 0)], scheduled={"d": 600})).is_empty()


def test_load_off_and_save_off(store):
    req = request("a", tokens(600))
    off = SchedulerSide(chunk_tokens=C, block_size=B, namespace="ns", fingerprint="fp", lookup=None, save=False)
    assert off.matched(req, 0) == 0
    off.admitted(req, 0)
    assert off.plan(output([new_data(req, range(1, 6), 0)], scheduled={"a": 600})).is_empty()
    assert store.calls == 0


def test_finished_requests_are_forgotten(side):
    req = request("a", tokens(600))
    side.matched(req, 0)
    side.admitted(req, 0)
    side.plan(output([new_data(req, range(1, 6), 0)], scheduled={"a": 300}))
    side.finished("a")
    assert side._requests == {} and side._lookups == {} and side._admitted == {}
    assert side.plan(output(cached=cached_data([("a", None, 300)]), scheduled={"a": 300})).is_empty()


def test_plan_pickles_and_keys_carry_the_fingerprint(side, store):
    import pickle

    req = request("a", tokens(700))
    store.store(side, req, 1)
    side.matched(req, 0)
    side.admitted(req, 256)
    plan = side.plan(output([new_data(req, range(1, 7), 256)], scheduled={"a": 444}))
    again = pickle.loads(pickle.dumps(plan))
    assert isinstance(again, StepPlan)
    assert again.loads[0].chunks[0].ref.key == plan.loads[0].chunks[0].ref.key
    assert np.array_equal(again.saves[0].chunks[0].ref.tokens, np.asarray(req.prompt_token_ids[256:512]))
    assert plan.loads[0].chunks[0].ref.key == chunk_refs(req.prompt_token_ids, namespace="ns", fingerprint="fp",
                                                         chunk_tokens=C)[0].key


def test_real_vllm_request_is_understood(side, store):
    require_vllm()
    from vllm import SamplingParams
    from vllm.v1.request import Request

    ids = tokens(700)
    req = Request(request_id="r", prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=4),
                  pooling_params=None, cache_salt="s")
    store.keys.update(r.key for r in side.refs(req)[:2])
    assert side.matched(req, 0) == 512
    assert side.refs(req)[0].key != side.refs(request("x", ids))[0].key  # cache_salt is read
