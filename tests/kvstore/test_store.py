"""TieredStore over a memory tier and a disk tier: prefix lookup, token verification, promotion,
demotion, write-through, concurrency, and degrading (not failing) when a tier breaks."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, TierError
from kvstore.keys import ChunkRef
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier, TierUsage

CT = 16  # chunk_tokens
SHAPE = (2, 2, CT, 2, 8)  # 2 KiB of fp16 per chunk: a multiple of the arena alignment
CHUNK_BYTES = 2 * 2 * CT * 2 * 8 * 2
MODEL = "model-a"


def make_store(tmp_path, mem_chunks: int = 64, write_through: bool = True, codec: str = "zstd", memory_cls=MemoryTier, disk_cls=DiskTier, **kw) -> TieredStore:
    mem = memory_cls(mem_chunks * CHUNK_BYTES)
    disk = disk_cls(tmp_path / "disk", 1 << 30, make_codec(codec), fsync=False)
    return TieredStore([mem, disk], chunk_tokens=CT, write_through=write_through, **kw)


def prompt(store: TieredStore, n_chunks: int = 4, seed: int = 0, kv_factory=None):
    """(tokens, refs, chunks) of a prompt of n_chunks full chunks; KV deterministic per chunk."""
    tokens = (np.arange(n_chunks * CT) * 7 + seed * 100_000) % 32_000
    refs = store.chunk_refs(tokens, fingerprint=MODEL)
    chunks = [Chunk.from_ref(r, kv_factory(SHAPE, torch.float16, seed=seed * 1000 + i)) for i, r in enumerate(refs)]
    return tokens, refs, chunks


@pytest.fixture
def store(tmp_path):
    s = make_store(tmp_path)
    yield s
    s.close()


# -- lookup --------------------------------------------------------------------------------------------


def test_lookup_prefix_semantics(store, kv_factory):
    tokens, refs, chunks = prompt(store, 4, kv_factory=kv_factory)
    assert store.lookup(tokens, fingerprint=MODEL) == 0
    store.put(chunks[:2])
    assert store.lookup(tokens, fingerprint=MODEL) == 2 * CT  # partial hit
    store.put(chunks[3:])
    assert store.lookup(tokens, fingerprint=MODEL) == 2 * CT  # a gap stops the prefix
    store.put(chunks[2:3])
    assert store.lookup(tokens, fingerprint=MODEL) == 4 * CT  # full hit
    assert store.lookup(np.concatenate([tokens, [1, 2, 3]]), fingerprint=MODEL) == 4 * CT  # a partial tail never counts
    assert store.lookup(tokens[: 3 * CT + 5], fingerprint=MODEL) == 3 * CT
    for k in range(4):  # a changed token in chunk k: the hit ends at chunk k
        changed = tokens.copy()
        changed[k * CT + 3] += 1
        assert store.lookup(changed, fingerprint=MODEL) == k * CT
    assert store.lookup(tokens, fingerprint="model-b") == 0  # another model never matches
    c = store.counters.snapshot()
    assert c["lookups"] == 11 and c["lookup_hit_tokens"] == (2 + 2 + 4 + 4 + 3 + 0 + 1 + 2 + 3) * CT


def test_lookup_first_chunk_missing(store, kv_factory):
    tokens, _, chunks = prompt(store, 4, kv_factory=kv_factory)
    store.put(chunks[1:])
    assert store.lookup(tokens, fingerprint=MODEL) == 0


def test_lookup_counts_chunks_only_on_disk(store, kv_factory):
    tokens, _, chunks = prompt(store, 4, kv_factory=kv_factory)
    store.put(chunks)
    assert store.flush(10)
    store.tiers[0].delete([c.key for c in chunks[1:3]])  # chunks 1 and 2 now only on disk
    assert store.tiers[0].contains([c.key for c in chunks]) == [True, False, False, True]
    assert store.lookup(tokens, fingerprint=MODEL) == 4 * CT
    store.tiers[1].delete([chunks[2].key])
    assert store.lookup(tokens, fingerprint=MODEL) == 2 * CT


def test_namespaces_are_disjoint(store, kv_factory):
    tokens, _, chunks = prompt(store, 2, kv_factory=kv_factory)
    store.put(chunks)
    assert store.lookup(tokens, fingerprint=MODEL, namespace="default") == 2 * CT
    assert store.lookup(tokens, fingerprint=MODEL, namespace="tenant-b") == 0


# -- token verification --------------------------------------------------------------------------------


def test_poisoned_entry_is_a_miss(tmp_path, kv_factory, same_bits):
    # A chunk stored under a key whose token ids differ from the request's (a collision, or a poisoned
    # entry): never served as the KV of the requested tokens.
    store = make_store(tmp_path, write_through=False)
    tokens, refs, chunks = prompt(store, 3, kv_factory=kv_factory)
    wrong = refs[1].tokens.copy()
    wrong[0] += 1
    poisoned = Chunk(refs[1].key, chunks[1].kv, wrong, refs[1].start)
    store.put([chunks[0], poisoned, chunks[2]])
    assert store.lookup(tokens, fingerprint=MODEL) == CT  # the memory tier compares token ids
    got = store.get(refs)
    assert got[1] is None
    assert same_bits(got[0].kv, chunks[0].kv) and same_bits(got[2].kv, chunks[2].kv)
    assert store.counters.token_mismatches == 1
    # Asked by bare key (no tokens to compare), the entry is served as stored.
    assert np.array_equal(store.get([refs[1].key])[0].tokens, wrong)
    store.close()


def test_poisoned_entry_on_disk_is_a_miss(tmp_path, kv_factory):
    store = make_store(tmp_path)
    tokens, refs, chunks = prompt(store, 2, kv_factory=kv_factory)
    wrong = refs[0].tokens[::-1].copy()
    store.put([Chunk(refs[0].key, chunks[0].kv, wrong, 0)])
    assert store.flush(10)
    store.tiers[0].clear()
    assert store.get(refs[:1]) == [None]
    assert store.counters.token_mismatches == 1
    assert store.tiers[0].usage().entries == 0  # a mismatching chunk is not promoted
    store.close()


# -- tiers: promotion, demotion, write-through ---------------------------------------------------------


def test_write_through_and_flush(store, kv_factory, same_bits):
    tokens, refs, chunks = prompt(store, 4, kv_factory=kv_factory)
    assert store.put(chunks) == [True] * 4
    assert store.flush(10)
    mem, disk = store.tiers
    assert disk.contains([c.key for c in chunks]) == [True] * 4
    for got, c in zip(disk.get([c.key for c in chunks]), chunks):
        assert same_bits(got.kv, c.kv)
    assert mem.usage().pinned == 0  # the pins held for the writers are released
    assert store.counters.async_writes == 4
    assert store.stats()["pending_bytes"] == 0
    # The caller may reuse its tensors right after put: the stored copies are unaffected.
    more_tokens, _, more = prompt(store, 2, seed=5, kv_factory=kv_factory)
    originals = [c.kv.clone() for c in more]
    store.put(more)
    for c in more:
        c.kv.fill_(0)
    assert store.flush(10)
    for got, kv in zip(disk.get([c.key for c in more]), originals):
        assert same_bits(got.kv, kv)


def test_get_promotes_disk_hits(store, kv_factory, same_bits):
    tokens, refs, chunks = prompt(store, 4, kv_factory=kv_factory)
    store.put(chunks)
    assert store.flush(10)
    mem, disk = store.tiers
    mem.clear()
    got = store.get(refs)
    assert all(same_bits(g.kv, c.kv) for g, c in zip(got, chunks))
    assert store.counters.promotions == 4
    assert mem.contains([c.key for c in chunks], [c.tokens for c in chunks]) == [True] * 4
    disk_hits = disk.stats.hits
    got = store.get(refs)  # now served by memory
    assert disk.stats.hits == disk_hits
    assert all(same_bits(g.kv, c.kv) for g, c in zip(got, chunks))


def test_no_promotion_when_disabled(tmp_path, kv_factory):
    store = make_store(tmp_path, promote_on_hit=False)
    _, refs, chunks = prompt(store, 2, kv_factory=kv_factory)
    store.put(chunks)
    store.flush(10)
    store.tiers[0].clear()
    assert all(g is not None for g in store.get(refs))
    assert store.tiers[0].usage().entries == 0 and store.counters.promotions == 0
    store.close()


def test_demotion_on_eviction_without_write_through(tmp_path, kv_factory, same_bits):
    store = make_store(tmp_path, mem_chunks=2, write_through=False)
    tokens, refs, chunks = prompt(store, 5, kv_factory=kv_factory)
    mem, disk = store.tiers
    assert store.put(chunks[:2]) == [True, True]
    assert store.flush(10)
    assert disk.usage().entries == 0  # nothing written through
    store.put(chunks[2:])  # evicts chunks 0..2 from memory, each demoted to disk
    assert store.flush(10)
    assert store.counters.demotions == 3
    assert disk.contains([c.key for c in chunks]) == [True, True, True, False, False]
    assert mem.contains([c.key for c in chunks]) == [False, False, False, True, True]
    for got, c in zip(store.get(refs), chunks):
        assert got is not None and same_bits(got.kv, c.kv)
    # Those gets promoted chunks 0..2 back into memory, evicting (demoting) 3 and 4 in turn; once the
    # demotions are written every chunk is in some tier.
    assert store.flush(10)
    assert store.counters.demotions == 5
    assert store.lookup(tokens, fingerprint=MODEL) == 5 * CT
    store.close()


class SlowDisk(DiskTier):
    """A disk whose puts wait for a gate: a slow device, which this machine cannot produce on demand."""

    gate: threading.Event

    def put(self, chunks):
        self.gate.wait(10)
        return super().put(chunks)


def test_demoted_chunk_stays_visible_until_written(tmp_path, kv_factory, same_bits):
    store = make_store(tmp_path, mem_chunks=2, write_through=False, disk_cls=SlowDisk)
    mem, disk = store.tiers
    disk.gate = threading.Event()
    tokens, refs, chunks = prompt(store, 3, kv_factory=kv_factory)
    store.put(chunks)  # chunk 0 is evicted; its write-back waits at the gate
    assert mem.contains([chunks[0].key]) == [False] and disk.contains([chunks[0].key]) == [False]
    assert store.lookup(tokens, fingerprint=MODEL) == 3 * CT
    out = torch.empty(SHAPE, dtype=torch.float16)
    got = store.get([refs[0]], [out])[0]
    assert got is not None and same_bits(out, chunks[0].kv)
    disk.gate.set()
    assert store.flush(10)
    assert disk.contains([chunks[0].key]) == [True]
    assert store._demoting == {}
    store.close()


def test_get_into_out(store, kv_factory, same_bits):
    _, refs, chunks = prompt(store, 3, kv_factory=kv_factory)
    store.put(chunks)
    store.flush(10)
    store.tiers[0].delete([chunks[1].key])  # chunk 1 comes from disk
    out = [torch.empty(SHAPE, dtype=torch.float16) for _ in chunks]
    got = store.get(refs, out)
    for g, o, c in zip(got, out, chunks):
        assert g.kv is o and same_bits(o, c.kv)
    with pytest.raises(InvalidChunkError):  # bad input is the caller's error, not a tier failure
        store.get(refs[:1], [torch.empty(1, 2, 3, 4, 5)])
    assert store.counters.tier_failures == 0


def test_delete_and_clear(store, kv_factory):
    _, refs, chunks = prompt(store, 3, kv_factory=kv_factory)
    store.put(chunks)
    assert store.delete([chunks[0].key]) == 1
    assert store.contains([c.key for c in chunks]) == [False, True, True]
    assert store.get(refs[:1]) == [None]
    assert store.clear() >= 2
    assert store.contains([c.key for c in chunks]) == [False, False, False]


def test_clear_one_namespace(store, kv_factory):
    tokens, _, chunks = prompt(store, 2, kv_factory=kv_factory)
    other_refs = store.chunk_refs(tokens, fingerprint=MODEL, namespace="other")
    others = [Chunk.from_ref(r, c.kv) for r, c in zip(other_refs, chunks)]
    store.put(chunks + others)
    assert store.clear("other") == 4  # two chunks, in both tiers
    assert store.lookup(tokens, fingerprint=MODEL, namespace="other") == 0
    assert store.lookup(tokens, fingerprint=MODEL) == 2 * CT
    assert store.tiers[1].contains([c.key for c in chunks]) == [True, True]


def test_backpressure_bounds_pending_writes(tmp_path, kv_factory, same_bits):
    store = make_store(tmp_path, max_pending_bytes=2 * CHUNK_BYTES)
    _, refs, chunks = prompt(store, 12, kv_factory=kv_factory)
    for c in chunks:
        store.put([c])
        assert store.stats()["pending_bytes"] <= 2 * CHUNK_BYTES
    assert store.flush(10)
    assert all(store.tiers[1].contains([c.key for c in chunks]))
    store.close()


# -- concurrency ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("write_through", [True, False])
def test_concurrent_puts_and_gets_lose_nothing(tmp_path, write_through, kv_factory, same_bits):
    store = make_store(tmp_path, mem_chunks=4, write_through=write_through)
    _, _, a = prompt(store, 6, seed=1, kv_factory=kv_factory)
    _, _, b = prompt(store, 6, seed=2, kv_factory=kv_factory)
    chunks = a + b  # 12 keys over a memory tier of 4: constant eviction, demotion, promotion
    refs = [ChunkRef(c.key, c.tokens, c.start_pos) for c in chunks]
    accepted: set[int] = set()
    errors: list[str] = []
    lock = threading.Lock()

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        try:
            for _ in range(50):
                idx = rng.sample(range(len(chunks)), rng.randint(1, 3))
                if rng.random() < 0.5:
                    ok = store.put([chunks[i] for i in idx])
                    with lock:
                        accepted.update(i for i, o in zip(idx, ok) if o)
                else:
                    out = [torch.empty(SHAPE, dtype=torch.float16) for _ in idx] if rng.random() < 0.5 else None
                    for i, g in zip(idx, store.get([refs[i] for i in idx], out)):
                        if g is not None and not same_bits(g.kv, chunks[i].kv):
                            errors.append(f"thread {tid}: wrong KV for chunk {i}")
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert store.flush(30)
    assert accepted == set(range(len(chunks)))
    got = store.get(refs)
    missing = [i for i, g in enumerate(got) if g is None]
    assert missing == []
    assert all(same_bits(g.kv, c.kv) for g, c in zip(got, chunks))
    mem = store.tiers[0].usage()
    assert mem.used_bytes <= mem.capacity_bytes and mem.pinned == 0
    assert store.counters.tier_failures == 0 and store.counters.async_failures == 0
    store.close()


# -- degrade, don't fail -------------------------------------------------------------------------------


class BrokenDisk(DiskTier):
    """A disk that fails every read: the fault of a dying device, which a test cannot cause for real."""

    def get(self, keys, out=None):
        raise OSError("input/output error")

    def contains(self, keys, tokens=None):
        raise OSError("input/output error")


class BrokenMemory(MemoryTier):
    def get(self, keys, out=None):
        raise OSError("device lost")

    def contains(self, keys, tokens=None):
        raise OSError("device lost")


class UnwritableDisk(DiskTier):
    def put(self, chunks):
        raise OSError("no space left on device")


def test_failing_slow_tier_costs_misses(tmp_path, kv_factory, same_bits):
    store = make_store(tmp_path, disk_cls=BrokenDisk)
    tokens, refs, chunks = prompt(store, 4, kv_factory=kv_factory)
    assert store.put(chunks) == [True] * 4
    assert store.flush(10)
    assert store.counters.async_failures == 4  # the writer's contains failed; counted, not raised
    store.tiers[0].delete([chunks[2].key])
    assert store.lookup(tokens, fingerprint=MODEL) == 2 * CT
    got = store.get(refs)
    assert got[2] is None and all(same_bits(got[i].kv, chunks[i].kv) for i in (0, 1, 3))
    assert store.contains([c.key for c in chunks]) == [True, True, False, True]
    assert store.counters.tier_failures >= 3
    store.close()


def test_failing_fast_tier_falls_through_to_disk(tmp_path, kv_factory, same_bits):
    store = make_store(tmp_path, memory_cls=BrokenMemory)
    tokens, refs, chunks = prompt(store, 3, kv_factory=kv_factory)
    store.put(chunks)
    assert store.flush(10)
    assert store.lookup(tokens, fingerprint=MODEL) == 3 * CT  # answered by the disk tier
    got = store.get(refs)
    assert all(g is not None and same_bits(g.kv, c.kv) for g, c in zip(got, chunks))
    assert store.counters.tier_failures == 2
    store.close()


def test_failing_async_write_is_counted(tmp_path, kv_factory):
    store = make_store(tmp_path, disk_cls=UnwritableDisk)
    _, refs, chunks = prompt(store, 2, kv_factory=kv_factory)
    assert store.put(chunks) == [True, True]
    assert store.flush(10)
    assert store.counters.async_failures == 2
    assert store.tiers[0].usage().pinned == 0  # pins released even when the write failed
    assert all(g is not None for g in store.get(refs))  # memory still serves them
    store.close()


# -- control -------------------------------------------------------------------------------------------


def test_stats_shape(store, kv_factory):
    _, refs, chunks = prompt(store, 2, kv_factory=kv_factory)
    store.put(chunks)
    store.flush(10)
    store.get(refs)
    s = store.stats()
    assert set(s) == {"store", "pending_bytes", "tiers", "chunks_without_codebook"}
    assert all(isinstance(n, int) for n in s["chunks_without_codebook"].values())
    assert set(s["store"]) >= {"lookups", "lookup_tokens", "lookup_hit_tokens", "token_mismatches", "tier_failures",
                               "promotions", "demotions", "async_writes", "async_failures"}
    assert not any(k.startswith("_") for k in s["store"])
    assert list(s["tiers"]) == ["cpu", "disk"]
    for name, t in s["tiers"].items():
        assert isinstance(t["usage"], TierUsage)
        assert {"hits", "misses", "puts", "evictions", "corrupt", "errors", "bytes_read", "bytes_written",
                "hit_rate", "get_ms_avg", "put_ms_avg"} <= set(t["stats"])
    assert s["tiers"]["cpu"]["stats"]["hits"] == 2 and s["tiers"]["cpu"]["stats"]["hit_rate"] == 1.0
    assert s["tiers"]["disk"]["usage"].entries == 2


def test_close_is_idempotent_and_final(tmp_path, kv_factory):
    store = make_store(tmp_path)
    _, _, chunks = prompt(store, 2, kv_factory=kv_factory)
    store.put(chunks)
    store.close()  # flushes first
    store.close()
    with pytest.raises(TierError):
        store.put(chunks)
    with make_store(tmp_path) as again:  # the writes made it to disk before close returned
        assert again.tiers[1].contains([c.key for c in chunks]) == [True, True]


def test_store_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStore([])


# -- durable puts (issue 15, D1) ---------------------------------------------------------------------------


def test_a_durable_put_answers_with_the_disk_tiers_result_on_a_full_filesystem(tmp_path, kv_factory):
    """A real 2 MiB filesystem: the puts that return True are on disk (a new tier finds them), the others
    return False and are counted, where the store used to answer True for all of them."""
    from tests.support.fs import tiny_fs

    with tiny_fs(tmp_path / "fs", "2m") as fs:
        store = TieredStore([MemoryTier(1 << 24), DiskTier(fs / "store", 1 << 30, make_codec("raw"))], chunk_tokens=CT)
        big = (4, 2, CT, 16, 64)  # 128 KiB
        cs = [Chunk.from_ref(r, kv_factory(big, torch.float16, seed=i))
              for i, r in enumerate(store.chunk_refs(np.arange(24 * CT), fingerprint=MODEL))]
        ok = store.put(cs, durable=True)
        assert True in ok and False in ok
        assert store.counters.refused_puts == ok.count(False) and store.durability == "process-crash"
        store.close()
        again = DiskTier(fs / "store", 1 << 30, make_codec("raw"))
        assert again.contains([c.key for c in cs]) == ok
        again.close()


def test_a_durable_put_refused_by_the_disk_tier_is_false_without_a_mount(tmp_path, kv_factory, monkeypatch):
    """The same with ENOSPC simulated (for machines where a tmpfs cannot be mounted)."""
    import errno

    import kvstore.tiers.disk as disk_module

    store = make_store(tmp_path)
    _, _, chunks = prompt(store, 3, kv_factory=kv_factory)
    real = disk_module.write_file

    def full(final, parts, fsync):
        if "full" in calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(final, parts, fsync)

    calls = set()
    monkeypatch.setattr(disk_module, "write_file", full)
    assert store.put(chunks[:1], durable=True) == [True]
    calls.add("full")
    assert store.put(chunks[1:], durable=True) == [False, False]
    assert store.counters.refused_puts == 2 and store.tiers[1].stats.errors == 2
    assert store.tiers[1].contains([c.key for c in chunks]) == [True, False, False]
    # Asynchronous writes that fail are counted too (they used to count as written).
    store.put([Chunk.from_ref(r, c.kv) for r, c in zip(store.chunk_refs(np.arange(CT) + 5, fingerprint=MODEL), chunks)])
    assert store.flush(10) and store.counters.async_failures == 1
    store.close()
