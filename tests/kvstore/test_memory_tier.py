"""Memory tier and its arena: LRU in bytes, pins, deferred deletes, eviction callback, free-list."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, TierError
from kvstore.tiers.arena import ALIGN, Arena
from kvstore.tiers.memory import MemoryTier

TINY = (1, 2, 4, 1, 8)  # 128 bytes of fp16: one ALIGN-sized slot each


def slots(n: int) -> int:
    return n * ALIGN


# -- basics --------------------------------------------------------------------------------------------


def test_put_get_contains(chunk_factory, same_bits):
    tier = MemoryTier(1 << 20)
    chunks = [chunk_factory(i, dtype=dt) for i, dt in enumerate([torch.float16, torch.bfloat16, torch.float32])]
    assert tier.put(chunks) == [True] * 3
    assert tier.contains([c.key for c in chunks]) == [True] * 3
    got = tier.get([c.key for c in chunks])
    for g, c in zip(got, chunks):
        assert g.key == c.key and g.start_pos == c.start_pos and np.array_equal(g.tokens, c.tokens)
        assert same_bits(g.kv, c.kv)
    # The result is a copy: changing it does not change the stored entry.
    got[0].kv.fill_(0)
    assert same_bits(tier.get([chunks[0].key])[0].kv, chunks[0].kv)
    other = chunk_factory(99)
    assert tier.get([other.key]) == [None]
    assert tier.contains([other.key]) == [False]
    s = tier.stats.snapshot()
    assert s["hits"] == 4 and s["misses"] == 1 and s["puts"] == 3
    assert s["bytes_written"] == sum(c.nbytes for c in chunks)
    u = tier.usage()
    assert u.entries == 3 and u.pinned == 0 and u.used_bytes >= sum(c.nbytes for c in chunks)


def test_contains_checks_tokens(chunk_factory):
    tier = MemoryTier(1 << 20)
    c = chunk_factory(1)
    tier.put([c])
    assert tier.contains([c.key], [c.tokens]) == [True]
    wrong = c.tokens.copy()
    wrong[3] += 1
    assert tier.contains([c.key], [wrong]) == [False]
    assert tier.contains([c.key], [c.tokens[:-1]]) == [False]


def test_put_of_a_present_key_is_a_no_op(chunk_factory):
    tier = MemoryTier(1 << 20)
    c = chunk_factory(1)
    assert tier.put([c]) == [True]
    used = tier.usage().used_bytes
    assert tier.put([c, c]) == [True, True]
    assert tier.usage().used_bytes == used and tier.usage().entries == 1
    assert tier.stats.puts == 1


def test_chunk_larger_than_the_tier_is_rejected(chunk_factory):
    tier = MemoryTier(1024)
    c = chunk_factory(1)  # 2 KiB
    assert tier.put([c]) == [False]
    assert tier.stats.put_rejected == 1 and tier.usage().used_bytes == 0


def test_get_into_out(chunk_factory, same_bits):
    tier = MemoryTier(1 << 20)
    a, b = chunk_factory(1), chunk_factory(2, dtype=torch.bfloat16)
    tier.put([a, b])
    out_a = torch.empty_like(a.kv)
    got = tier.get([a.key, b.key], [out_a, None])
    assert got[0].kv is out_a and same_bits(out_a, a.kv)
    assert same_bits(got[1].kv, b.kv)
    strided = torch.empty(a.kv.shape[::-1], dtype=a.kv.dtype).permute(4, 3, 2, 1, 0)
    got = tier.get([a.key], [strided])
    assert got[0].kv is strided and same_bits(strided, a.kv)


@pytest.mark.parametrize(
    "out",
    [torch.empty(2, 2, 16, 2, 4, dtype=torch.float16), torch.empty(2, 2, 16, 2, 8, dtype=torch.float32), torch.empty(1024, dtype=torch.float16)],
    ids=["shape", "dtype", "flat"],
)
def test_get_into_wrong_out_raises(chunk_factory, out):
    tier = MemoryTier(1 << 20)
    c = chunk_factory(1)
    tier.put([c])
    with pytest.raises(InvalidChunkError):
        tier.get([c.key], [out])
    # The failed get released its reference: the entry can be deleted and its memory comes back.
    assert tier.delete([c.key]) == 1
    assert tier.usage().used_bytes == 0


def test_lru_order(chunk_factory):
    tier = MemoryTier(slots(3))
    a, b, c, d, e = (chunk_factory(i, TINY) for i in range(5))
    tier.put([a, b, c])
    tier.get([a.key])  # a becomes the most recent
    tier.put([d])  # evicts b, the least recently used
    assert tier.contains([a.key, b.key, c.key, d.key]) == [True, False, True, True]
    tier.put([c])  # a put of a present key refreshes it too
    tier.put([e])  # evicts a
    assert tier.contains([a.key, c.key, d.key, e.key]) == [False, True, True, True]
    tier.contains([d.key])  # contains does not refresh
    tier.put([b])  # evicts d
    assert tier.contains([c.key, d.key, e.key, b.key]) == [True, False, True, True]
    assert tier.stats.evictions == 3


def _device_tier_round_trip(device: str, chunk_factory, same_bits) -> None:
    """Put, get (as the tier's copies and into host tensors), LRU eviction and delete on `device`."""
    tier = MemoryTier(slots(3), device=device)
    a, b, c, d = (chunk_factory(i, TINY, dtype=dt) for i, dt in
                  enumerate([torch.float16, torch.bfloat16, torch.float32, torch.float16]))
    assert tier.put([a, b, c]) == [True] * 3
    for g, want in zip(tier.get([a.key, b.key, c.key]), [a, b, c]):
        assert g.kv.device.type == torch.device(device).type and same_bits(g.kv.cpu(), want.kv)
    out = torch.empty_like(b.kv)  # host memory
    assert tier.get([b.key], [out])[0].kv is out and same_bits(out, b.kv)
    tier.put([d])  # evicts a, the least recently used
    assert tier.contains([a.key, b.key, c.key, d.key]) == [False, True, True, True]
    assert tier.delete([b.key, c.key, d.key]) == 3 and tier.usage().used_bytes == 0


def test_cpu_tier_round_trip(chunk_factory, same_bits):
    _device_tier_round_trip("cpu", chunk_factory, same_bits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_round_trip(chunk_factory, same_bits):
    """CUDA twin of test_cpu_tier_round_trip: the arena in device memory, chunks put from the host."""
    _device_tier_round_trip("cuda", chunk_factory, same_bits)


def test_eviction_never_drops_a_pinned_entry(chunk_factory):
    tier = MemoryTier(slots(2))
    a, b, c = (chunk_factory(i, TINY) for i in range(3))
    tier.put([a, b])
    assert tier.pin([a.key, c.key]) == [True, False]
    assert tier.put([c]) == [True]  # evicts b, not the older but pinned a
    assert tier.contains([a.key, b.key, c.key]) == [True, False, True]
    tier.pin([c.key])
    assert tier.put([b]) == [False]  # everything is pinned: no room
    assert tier.stats.put_rejected == 1
    assert tier.usage().pinned == 2
    tier.unpin([a.key])
    assert tier.put([b]) == [True]
    assert tier.contains([a.key, b.key, c.key]) == [False, True, True]


def test_delete_of_a_pinned_entry_takes_effect_at_unpin(chunk_factory, same_bits):
    tier = MemoryTier(slots(4))
    a = chunk_factory(1, TINY)
    tier.put([a])
    tier.pin([a.key])
    tier.pin([a.key])
    view = tier.peek(a.key)
    assert tier.delete([a.key]) == 1
    assert tier.contains([a.key]) == [False] and tier.get([a.key]) == [None]
    assert tier.usage().used_bytes == ALIGN  # still held for the pin
    # The pinned region is not handed out to new chunks while the pins last.
    tier.put([chunk_factory(i, TINY) for i in range(10, 13)])
    assert same_bits(view.kv, a.kv)
    tier.unpin([a.key])
    assert tier.usage().used_bytes == 4 * ALIGN
    tier.unpin([a.key])  # the last unpin frees it
    assert tier.usage().used_bytes == 3 * ALIGN
    tier.unpin([a.key])  # one unpin too many is harmless
    assert tier.usage().used_bytes == 3 * ALIGN


def test_put_again_while_a_delete_is_deferred(chunk_factory, same_bits):
    tier = MemoryTier(slots(4))
    a = chunk_factory(1, TINY)
    tier.put([a])
    tier.pin([a.key])
    tier.delete([a.key])
    assert tier.put([a]) == [True]
    assert tier.contains([a.key]) == [True] and same_bits(tier.get([a.key])[0].kv, a.kv)
    tier.unpin([a.key])
    assert tier.usage().used_bytes == ALIGN  # one copy, not two
    assert tier.delete([a.key]) == 1
    assert tier.usage().used_bytes == 0  # nothing leaked


def test_peek_needs_a_pin(chunk_factory, same_bits):
    tier = MemoryTier(1 << 20)
    c = chunk_factory(1)
    tier.put([c])
    with pytest.raises(TierError):
        tier.peek(c.key)
    assert tier.peek(chunk_factory(2).key) is None
    tier.pin([c.key])
    view = tier.peek(c.key)
    assert same_bits(view.kv, c.kv) and view.key == c.key
    buf = tier.arena.buffer
    assert buf.data_ptr() <= view.kv.data_ptr() < buf.data_ptr() + buf.numel()  # a view, not a copy


def test_on_evict_sees_the_victim_before_its_memory_is_reused(chunk_factory, same_bits):
    tier = MemoryTier(slots(2))
    chunks = [chunk_factory(i, TINY) for i in range(6)]
    seen = []

    def on_evict(victim: Chunk) -> None:
        # The view must still hold the victim's own bytes (the new chunk is not copied in yet).
        seen.append((victim.key, victim.kv.clone(), victim.tokens.copy(), victim.start_pos))

    tier.watch_evictions(on_evict)
    for c in chunks:
        tier.put([c])
    assert [k for k, *_ in seen] == [c.key for c in chunks[:4]]
    for (key, kv, tokens, start), c in zip(seen, chunks):
        assert key == c.key and same_bits(kv, c.kv) and np.array_equal(tokens, c.tokens) and start == c.start_pos


def test_clear_keeps_pinned(chunk_factory):
    tier = MemoryTier(1 << 20)
    chunks = [chunk_factory(i) for i in range(4)]
    tier.put(chunks)
    tier.pin([chunks[0].key])
    assert tier.clear() == 3
    assert tier.contains([c.key for c in chunks]) == [True, False, False, False]


def test_closed_tier_refuses_puts(chunk_factory):
    tier = MemoryTier(1 << 20)
    tier.close()
    with pytest.raises(TierError):
        tier.put([chunk_factory(1)])


def test_capacity_is_aligned():
    assert MemoryTier(3 * ALIGN + 5).usage().capacity_bytes == 3 * ALIGN


# -- model-based: random operation sequences against a plain model ----------------------------------------

N_KEYS, N_SLOTS = 7, 4


class MemoryTierMachine(RuleBasedStateMachine):
    """Equal-size chunks (one slot each), so the model is exact: which key is evicted, when, with which
    data; byte usage; pins; deferred deletes."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = chunks
        self.tier = MemoryTier(slots(N_SLOTS))
        self.tier.watch_evictions(lambda c: self.evicted.append((c.key, c.kv.clone())))
        self.evicted = []
        self.present: OrderedDict[int, int] = OrderedDict()  # key index -> pins, LRU order
        self.doomed: dict[int, int] = {}  # deleted while pinned: key index -> pins

    def _check_evictions(self, expected: list[int]) -> None:
        assert [k for k, _ in self.evicted] == [self.chunks[i].key for i in expected]
        for (_, kv), i in zip(self.evicted, expected):
            assert torch.equal(kv.view(torch.int16), self.chunks[i].kv.view(torch.int16))
        self.evicted.clear()

    def _model_put(self, i: int) -> tuple[bool, list[int]]:
        if i in self.present:
            self.present.move_to_end(i)
            return True, []
        if i in self.doomed:  # put again while the delete waits for unpin: the entry comes back
            self.present[i] = self.doomed.pop(i)
            return True, []
        victims = []
        if len(self.present) + len(self.doomed) >= N_SLOTS:
            victim = next((k for k, pins in self.present.items() if not pins), None)
            if victim is None:
                return False, []
            del self.present[victim]
            victims.append(victim)
        self.present[i] = 0
        return True, victims

    @rule(i=st.integers(0, N_KEYS - 1))
    def put(self, i):
        ok, victims = self._model_put(i)
        assert self.tier.put([self.chunks[i]]) == [ok]
        self._check_evictions(victims)

    @rule(i=st.integers(0, N_KEYS - 1), j=st.integers(0, N_KEYS - 1))
    def put_batch(self, i, j):
        ok_i, vi = self._model_put(i)
        ok_j, vj = self._model_put(j)
        assert self.tier.put([self.chunks[i], self.chunks[j]]) == [ok_i, ok_j]
        self._check_evictions(vi + vj)

    @rule(i=st.integers(0, N_KEYS - 1), into_out=st.booleans())
    def get(self, i, into_out):
        c = self.chunks[i]
        out = [torch.empty_like(c.kv)] if into_out else None
        got = self.tier.get([c.key], out)[0]
        if i in self.present:
            self.present.move_to_end(i)
            assert got is not None and torch.equal(got.kv.view(torch.int16), c.kv.view(torch.int16))
            assert np.array_equal(got.tokens, c.tokens)
            if into_out:
                assert got.kv is out[0]
        else:
            assert got is None

    @rule(i=st.integers(0, N_KEYS - 1))
    def pin(self, i):
        assert self.tier.pin([self.chunks[i].key]) == [i in self.present]
        if i in self.present:
            self.present[i] += 1

    @rule(i=st.integers(0, N_KEYS - 1))
    def unpin(self, i):
        self.tier.unpin([self.chunks[i].key])
        if self.present.get(i):
            self.present[i] -= 1
        elif self.doomed.get(i):
            self.doomed[i] -= 1
            if not self.doomed[i]:
                del self.doomed[i]

    @rule(i=st.integers(0, N_KEYS - 1))
    def delete(self, i):
        assert self.tier.delete([self.chunks[i].key]) == (1 if i in self.present else 0)
        if i in self.present:
            pins = self.present.pop(i)
            if pins:
                self.doomed[i] = pins

    @rule()
    def clear(self):
        unpinned = [k for k, pins in self.present.items() if not pins]
        assert self.tier.clear() == len(unpinned)
        for k in unpinned:
            del self.present[k]

    @invariant()
    def matches_model(self):
        u = self.tier.usage()
        assert u.used_bytes == (len(self.present) + len(self.doomed)) * ALIGN <= u.capacity_bytes
        assert u.entries == len(self.present)
        assert u.pinned == sum(1 for p in self.present.values() if p)
        keys = [c.key for c in self.chunks]
        assert self.tier.contains(keys) == [i in self.present for i in range(N_KEYS)]


def test_memory_tier_against_model(chunk_factory):
    chunks = [chunk_factory(i, TINY) for i in range(N_KEYS)]
    run_state_machine_as_test(
        lambda: MemoryTierMachine(chunks),
        settings=settings(max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "delete"]), st.integers(0, 11)),
        min_size=1,
        max_size=80,
    )
)
def test_mixed_sizes_random_ops_keep_invariants(ops, chunk_factory, same_bits):
    # Chunks of 1 to 6 tokens: allocations of different sizes fragment the arena.
    chunks = [chunk_factory(i, (1, 2, 1 + i % 6, 2, 32)) for i in range(12)]
    tier = MemoryTier(6 * ALIGN + 100)
    pins = [0] * 12
    for op, i in ops:
        c = chunks[i]
        if op == "put":
            ok = tier.put([c])[0]
            if pins[i]:
                assert ok
        elif op == "get":
            got = tier.get([c.key])[0]
            assert got is None or same_bits(got.kv, c.kv)
        elif op == "pin":
            if tier.pin([c.key])[0]:
                pins[i] += 1
        elif op == "unpin":
            tier.unpin([c.key])
            pins[i] = max(0, pins[i] - 1)
        else:
            if tier.delete([c.key]):
                pins[i] = 0  # takes effect once its pins are gone
                tier.unpin([c.key] * 10)
        u = tier.usage()
        assert u.used_bytes <= u.capacity_bytes == tier.arena.capacity
        present = tier.contains([ch.key for ch in chunks])
        assert all(present[k] for k in range(12) if pins[k])  # a pinned entry is never evicted
        for ch, there in zip(chunks, present):
            if there:
                assert same_bits(tier.get([ch.key])[0].kv, ch.kv)
    tier.unpin([c.key for c in chunks] * 10)
    tier.clear()
    assert tier.usage().used_bytes == 0 and tier.usage().entries == 0
    assert tier.arena.largest_free() == tier.arena.capacity


# -- arena ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000), st.integers(0, 50)), max_size=120))
def test_arena_free_list_coalesces(ops):
    capacity = 32 * ALIGN
    arena = Arena(capacity, torch.device("cpu"))
    live: list[tuple[int, int]] = []  # (offset, nbytes)
    rounded = lambda n: -(-n // ALIGN) * ALIGN  # noqa: E731
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            off = arena.alloc(nbytes)
            if off is None:
                assert arena.largest_free() < rounded(nbytes)
                continue
            assert off % ALIGN == 0 and off + rounded(nbytes) <= arena.capacity
            for o, n in live:  # never overlapping a live allocation
                assert off + rounded(nbytes) <= o or o + rounded(n) <= off
            live.append((off, nbytes))
        else:
            off, n = live.pop(pick % len(live))
            arena.free(off, n)
        assert arena.used == sum(rounded(n) for _, n in live)
        assert arena.largest_free() <= arena.capacity - arena.used
    for off, n in reversed(live) if len(live) % 2 else live:
        arena.free(off, n)
    assert arena.used == 0
    assert arena.largest_free() == arena.capacity
    assert arena._free_offsets == [0] and arena._free_sizes == [capacity]  # one region again


def test_arena_views_are_typed_windows():
    arena = Arena(4 * ALIGN, torch.device("cpu"))
    off = arena.alloc(64)
    v = arena.view(off, (2, 2, 2, 2, 2), torch.float32)
    v.fill_(1.5)
    assert v.shape == (2, 2, 2, 2, 2) and v.dtype == torch.float32
    assert torch.equal(arena.buffer[off : off + 128].view(torch.float32), torch.full((32,), 1.5))
    assert arena.alloc(4 * ALIGN) is None
    assert arena.alloc(3 * ALIGN) == ALIGN
