"""The Redis tier against real servers: a single node and a 3-node cluster, faults caused for real
(SIGKILL, a server blocked by DEBUG SLEEP, garbage values)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
import torch

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError
from kvstore.keys import chunk_refs
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier
from kvstore.tiers.redis import RedisTier
from benchmarks.servers import RedisCluster, RedisServer

CT = 16
SHAPE = (2, 2, CT, 2, 8)


def chunks_for(n: int, seed: int = 0, namespace: str = "t") -> list[Chunk]:
    refs = chunk_refs(np.arange(n * CT) + seed * 1_000_000, namespace=namespace, fingerprint="m", chunk_tokens=CT)
    g = torch.Generator().manual_seed(seed)
    return [Chunk.from_ref(r, torch.randn(SHAPE, generator=g).to(torch.float16)) for r in refs]


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


def test_round_trip_single_node(server):
    tier = RedisTier(server.url, make_codec("zstd"), ttl_seconds=600)
    cs = chunks_for(5)
    assert tier.put(cs) == [True] * 5
    assert tier.contains([c.key for c in cs] + [chunks_for(1, seed=9)[0].key]) == [True] * 5 + [False]
    got = tier.get([c.key for c in cs])
    assert all(g is not None and torch.equal(g.kv, c.kv) and np.array_equal(g.tokens, c.tokens) for g, c in zip(got, cs))
    out = torch.empty(SHAPE, dtype=torch.float16)
    assert tier.get([cs[2].key], [out])[0] is not None and torch.equal(out, cs[2].kv)
    raw = redis.Redis.from_url(server.url)
    name = f"kvs:t:{cs[0].key.hex()}"
    assert raw.exists(name) and 0 < raw.ttl(name) <= 600
    assert tier.delete([cs[0].key, cs[0].key]) == 1
    assert tier.get([cs[0].key]) == [None]
    assert tier.stats.hits == 6 and tier.stats.misses == 1
    tier.close()


def test_namespaces_and_clear(server):
    tier = RedisTier(server.url, make_codec("raw"))
    a, b = chunks_for(3, namespace="a"), chunks_for(2, seed=1, namespace="b")
    tier.put(a + b)
    assert tier.clear("a") == 3
    assert tier.contains([c.key for c in a + b]) == [False] * 3 + [True] * 2
    assert tier.clear() == 2
    tier.close()


@pytest.mark.parametrize("garbage", [b"not a record", b"KVSR" + bytes(100), "swap"])
def test_bad_value_is_a_miss_and_deleted(server, garbage):
    tier = RedisTier(server.url, make_codec("raw"))
    cs = chunks_for(2)
    tier.put(cs)
    raw = redis.Redis.from_url(server.url)
    victim = f"kvs:t:{cs[0].key.hex()}"
    if garbage == "swap":  # a valid record, but of another key
        raw.set(victim, raw.get(f"kvs:t:{cs[1].key.hex()}"))
    else:
        raw.set(victim, garbage)
    assert tier.get([cs[0].key, cs[1].key])[0] is None
    assert not raw.exists(victim)
    assert tier.stats.corrupt == 1
    assert tier.get([cs[1].key])[0] is not None
    tier.close()


def test_wrongly_shaped_out_is_the_callers_error_and_keeps_the_record(server):
    # Regression: a caller's buffer that does not fit used to be taken for a bad record, and the valid,
    # shared record was deleted from Redis.
    tier = RedisTier(server.url, make_codec("zstd"))
    cs = chunks_for(2)
    tier.put(cs)
    for bad in (torch.empty(2, 2, CT, 2, 4, dtype=torch.float16), torch.empty(SHAPE, dtype=torch.float32)):
        with pytest.raises(InvalidChunkError):
            tier.get([cs[0].key], [bad])
    raw = redis.Redis.from_url(server.url)
    assert raw.exists(f"kvs:t:{cs[0].key.hex()}")
    assert tier.stats.corrupt == 0
    got = tier.get([c.key for c in cs])
    assert all(g is not None and torch.equal(g.kv, c.kv) for g, c in zip(got, cs))
    tier.close()


def test_records_move_between_byte_tiers_as_bytes(tmp_path, server):
    disk = DiskTier(tmp_path / "d", 1 << 30, make_codec("zstd"), fsync=False)
    cs = chunks_for(3)
    disk.put(cs)
    keys = [c.key for c in cs] + [chunks_for(1, seed=9)[0].key]
    held = disk.get_bytes(keys)
    assert held[-1] is None
    records = [bytes(r.read()) for r in held[:3]]
    for r in held[:3]:
        r.close()
    tier = RedisTier(server.url, make_codec("raw"))  # another codec: the records keep their own
    assert tier.put_bytes(keys[:3], records) == [True] * 3
    assert [r.read() for r in tier.get_bytes(keys[:3])] == records  # the very bytes, never decoded and re-encoded
    got = tier.get(keys[:3])
    assert all(torch.equal(g.kv, c.kv) and np.array_equal(g.tokens, c.tokens) for g, c in zip(got, cs))
    raw = redis.Redis.from_url(server.url)
    raw.set(f"kvs:t:{cs[1].key.hex()}", records[0])  # a valid record under another key: not served
    assert tier.get_bytes([cs[1].key]) == [None] and tier.stats.corrupt == 1
    assert disk.get_bytes(keys[:1], check="header")[0].read() == records[0]  # a file, its header checked
    disk.close()
    tier.close()


def test_cluster_batches_span_slots(cluster):
    tier = RedisTier(cluster.url, make_codec("zstd"), cluster=True, prefix="kvsc:")
    cs = chunks_for(24, seed=3)
    assert tier.put(cs) == [True] * 24
    # The keys really are spread: every node holds some.
    per_node = [redis.Redis(port=n.port).dbsize() for n in cluster.nodes]
    assert all(n > 0 for n in per_node) and sum(per_node) >= 24
    got = tier.get([c.key for c in cs])
    assert all(g is not None and torch.equal(g.kv, c.kv) for g, c in zip(got, cs))
    assert tier.contains([c.key for c in cs]) == [True] * 24
    assert tier.usage().entries >= 24
    assert tier.clear() == 24
    tier.close()


def test_unreachable_redis_costs_bounded_misses(tmp_path):
    from benchmarks.servers import free_port

    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", make_codec("raw"), timeout=0.5, retry_after=5)
    cs = chunks_for(3)
    t = time.monotonic()
    assert tier.contains([c.key for c in cs]) == [False] * 3
    assert tier.get([c.key for c in cs]) == [None] * 3  # down: answered at once
    assert tier.put(cs) == [False] * 3
    assert time.monotonic() - t < 2.0
    assert not tier.available() and tier.stats.errors >= 1
    tier.close()


def make_store(tmp_path, url: str, **kw) -> TieredStore:
    mem = MemoryTier(64 * 2 * 2 * CT * 2 * 8 * 2)
    disk = DiskTier(tmp_path / "disk", 1 << 30, make_codec("raw"), fsync=False)
    remote = RedisTier(url, make_codec("zstd"), timeout=0.5, retry_after=0.5)
    return TieredStore([mem, disk, remote], chunk_tokens=CT, **kw)


def test_store_survives_redis_killed_and_uses_it_again(tmp_path, server):
    store = make_store(tmp_path, server.url)
    cs = chunks_for(4)
    store.put(cs)
    assert store.flush(10)
    remote = store.tiers[2]
    assert remote.contains([c.key for c in cs]) == [True] * 4
    server.kill()
    # Local tiers keep answering; the dead remote costs bounded time and no exception.
    t = time.monotonic()
    tokens = np.arange(4 * CT)
    assert store.lookup(tokens, fingerprint="m", namespace="t") == 4 * CT
    got = store.get(store.chunk_refs(tokens, fingerprint="m", namespace="t"))
    assert all(g is not None for g in got)
    more = chunks_for(3, seed=5)
    assert store.put(more) == [True] * 3
    assert store.flush(10)
    assert remote.contains([more[0].key]) == [False]
    assert store.get([chunks_for(1, seed=77)[0].key]) == [None]  # a miss everywhere, quickly
    assert time.monotonic() - t < 5
    assert remote.stats.errors >= 1
    # Redis comes back (empty: persistence is off) on the same port: the tier uses it again by itself.
    server.start()
    time.sleep(0.6)
    again = chunks_for(2, seed=6)
    store.put(again)
    assert store.flush(10)
    assert remote.contains([c.key for c in again]) == [True, True]
    store.tiers[0].clear()
    store.tiers[1].clear()
    got = store.get([c.key for c in again])
    assert all(g is not None and torch.equal(g.kv, c.kv) for g, c in zip(got, again))
    assert remote.stats.hits >= 2
    store.close()


def test_slow_redis_never_blocks_puts(tmp_path, server):
    """A server blocked by DEBUG SLEEP: puts return at once, remote writes are dropped and counted."""
    store = make_store(tmp_path, server.url, max_pending_bytes=2 * 2 * 2 * CT * 2 * 8 * 2)
    blocker = threading.Thread(target=lambda: redis.Redis.from_url(server.url).execute_command("DEBUG", "SLEEP", "2"))
    blocker.start()
    time.sleep(0.2)
    t = time.monotonic()
    for i in range(6):
        assert store.put(chunks_for(2, seed=10 + i)) == [True, True]
    put_s = time.monotonic() - t
    assert put_s < 1.0  # the remote's timeout is 0.5 s and nothing waits on it
    assert store.counters.dropped_writes > 0
    blocker.join()
    assert store.flush(10)
    # Nothing was lost locally: every chunk is on disk.
    for i in range(6):
        assert all(store.tiers[1].contains([c.key for c in chunks_for(2, seed=10 + i)]))
    store.close()


def test_a_key_of_the_wrong_type_is_its_own_miss_and_is_removed(server):
    """A LIST where a record should be (issue 15, D5): a miss for that key alone, counted and deleted;
    the rest of the batch is served and the tier stays up."""
    tier = RedisTier(server.url, make_codec("raw"))
    cs = chunks_for(3, seed=5)
    assert tier.put(cs) == [True] * 3
    raw = redis.Redis.from_url(server.url)
    name = f"kvs:t:{cs[1].key.hex()}"
    raw.delete(name)
    raw.rpush(name, b"not a record")
    for _ in range(2):
        got = tier.get([c.key for c in cs])
        assert got[1] is None and all(torch.equal(g.kv, c.kv) for g, c in zip([got[0], got[2]], [cs[0], cs[2]]))
        assert tier.available() and tier.stats.errors == 0
    assert tier.stats.corrupt == 1 and raw.exists(name) == 0  # removed at the first miss
    assert tier.put([cs[1]]) == [True] and torch.equal(tier.get([cs[1].key])[0].kv, cs[1].kv)
    raw.rpush(name + "x", b"y")
    assert tier.get_bytes([cs[0].key])[0].read() and tier.available()
    tier.close()
