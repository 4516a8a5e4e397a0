"""Every registered codec through the store's byte tiers (disk, Redis, and the tiered store), with the
cachegen codebook found by the chunk's model fingerprint; a record whose codebook is unknown is a miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import codec_names, make_codec
from codec.cachegen import LEVELS, CacheGenCodec, count_symbols
from codec.codebook import codebooks, missing_codebooks, profile_codebook
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.record import decode_record, encode_record, parse_header
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier
from kvstore.tiers.redis import RedisTier
from benchmarks.servers import RedisServer

CT = 32
SHAPE = (2, 2, CT, 2, 16)
MODEL = "tiers-test-model"
LOSSY_TOL = {"int8": 0.02, "kivi4": 0.12, "kivi2": 0.5, "cachegen": 0.22, "cachegen1": 0.45, "cachegen3": 0.1, "cachegen4": 0.04}


def chunks(n: int, seed: int = 0, fingerprint: str = MODEL) -> list[Chunk]:
    refs = chunk_refs(np.arange(n * CT) + seed * 10_000, namespace="t", fingerprint=fingerprint, chunk_tokens=CT)
    g = torch.Generator().manual_seed(seed)
    return [Chunk.from_ref(r, torch.randn(SHAPE, generator=g).to(torch.float16)) for r in refs]


@pytest.fixture(scope="module", autouse=True)
def codebook():
    counts = {lv: None for lv in LEVELS}
    for c in chunks(4, seed=100):
        for lv, spec in LEVELS.items():
            counts[lv] = count_symbols(c.kv, spec, counts[lv])
    cb = profile_codebook(MODEL, counts, 2, 32)
    codebooks.register(cb)
    return cb


def close_enough(name: str, got: torch.Tensor, want: torch.Tensor, level: int | None = None) -> bool:
    if make_codec(name).lossless:
        return torch.equal(got, want)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    return rel < LOSSY_TOL.get(f"{name}{level}", LOSSY_TOL[name])


CODECS = [(n, None) for n in codec_names() if n != "cachegen"] + [("cachegen", lv) for lv in sorted(LEVELS)]


@pytest.mark.parametrize("name,level", CODECS)
def test_disk_tier(tmp_path, name, level):
    tier = DiskTier(tmp_path, 1 << 30, make_codec(name, level), fsync=False)
    cs = chunks(3)
    assert tier.put(cs) == [True] * 3
    got = tier.get([c.key for c in cs])
    assert all(g is not None and close_enough(name, g.kv, c.kv, level) for g, c in zip(got, cs))


def test_cachegen_record_names_the_codebook(codebook):
    c = chunks(1)[0]
    header, payload = encode_record(c, make_codec("cachegen", 2))
    h = parse_header(header + bytes(payload))
    assert h.codec == "cachegen" and h.codec_params[2:] == codebook.digest
    assert close_enough("cachegen", decode_record(header + bytes(payload)).kv, c.kv)
    # a chunk of a model without a codebook carries its own tables
    other = chunks(1, fingerprint="no-codebook-model")[0]
    header, payload = encode_record(other, make_codec("cachegen", 2))
    assert len(parse_header(header + bytes(payload)).codec_params) == 2


def test_missing_codebook_is_counted_and_warned_once(tmp_path, caplog):
    model = "counted-no-codebook-model"
    store = TieredStore([DiskTier(tmp_path, 1 << 30, make_codec("cachegen", 2), fsync=False)])
    with caplog.at_level("WARNING", logger="codec.codebook"):
        store.put(chunks(3, fingerprint=model))
        store.put(chunks(2, seed=1, fingerprint=model))
        store.flush()
    warned = [r for r in caplog.records if model in r.getMessage()]
    assert len(warned) == 1 and "--dtype" in warned[0].getMessage()
    assert store.stats()["chunks_without_codebook"][model] == 5
    assert missing_codebooks.snapshot()[model] == 5
    # the model with a codebook is not counted
    store.put(chunks(1, seed=2))
    store.flush()
    assert MODEL not in store.stats()["chunks_without_codebook"]
    store.close()


def test_codebook_registered_after_a_miss_is_used():
    codec = CacheGenCodec(2)
    model = "late-codebook-model"
    assert codec.bind(model).codebook is None and codec.bind(model).fingerprint == model
    counts = {2: count_symbols(chunks(1, fingerprint=model)[0].kv, LEVELS[2])}
    cb = profile_codebook(model, counts, 2, 32)
    codebooks.register(cb)
    assert codec.bind(model).codebook is cb


def test_unknown_codebook_is_a_miss(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30, make_codec("cachegen", 2), fsync=False)
    c = chunks(1)[0]
    tier.put([c])
    saved = dict(codebooks._by_digest)
    codebooks._by_digest.clear()
    codebooks._last_scan = float("inf")  # no rescan finds it again
    try:
        assert tier.get([c.key]) == [None]
    finally:
        codebooks._by_digest.update(saved)
        codebooks._last_scan = -1e9


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.kill()


@pytest.mark.parametrize("name,level", CODECS)
def test_redis_tier(server, name, level):
    tier = RedisTier(server.url, make_codec(name, level), prefix=f"codec-{name}-{level}:")
    cs = chunks(2, seed=7)
    assert tier.put(cs) == [True] * 2
    got = tier.get([c.key for c in cs])
    assert all(g is not None and close_enough(name, g.kv, c.kv, level) for g, c in zip(got, cs))
    tier.close()


@pytest.mark.parametrize("name,level", [("cachegen", 2), ("kivi2", None), ("int8", None)])
def test_store_memory_disk_redis(tmp_path, server, name, level):
    mem = MemoryTier(1 << 20)
    disk = DiskTier(tmp_path, 1 << 30, make_codec(name, level), fsync=False)
    remote = RedisTier(server.url, make_codec(name, level), prefix=f"store-{name}:")
    store = TieredStore([mem, disk, remote], chunk_tokens=CT)
    cs = chunks(3, seed=11)
    store.put(cs)
    assert store.flush(10)
    # a fresh store over the same disk and Redis (no memory copy) loads through the codec
    fresh = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 30, make_codec(name, level), fsync=False),
                         RedisTier(server.url, make_codec(name, level), prefix=f"store-{name}:")], chunk_tokens=CT)
    got = fresh.get([c.key for c in cs])
    assert all(g is not None and close_enough(name, g.kv, c.kv, level) for g, c in zip(got, cs))
    for s in (store, fresh):
        s.close()
