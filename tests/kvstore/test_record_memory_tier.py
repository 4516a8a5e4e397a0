"""The record memory tier (a record server's memory): records kept and handed back as they are, a held
record never reused under its reader, LRU eviction within the arena, decoding like any byte tier."""

from __future__ import annotations


from codec import make_codec
from kvstore.record import encode_record
from kvstore.tiers import RecordMemoryTier


def record(chunk, codec="zstd") -> bytes:
    header, payload = encode_record(chunk, make_codec(codec))
    return header + bytes(payload)


def test_records_come_back_as_they_were_put_and_decode(chunk_factory, same_bits):
    tier = RecordMemoryTier(1 << 20)
    cs = [chunk_factory(i) for i in range(3)]
    data = [record(c) for c in cs]
    assert tier.put_bytes([c.key for c in cs], data) == [True] * 3
    held = tier.get_bytes([c.key for c in cs], check="header")
    assert [bytes(h.data) for h in held] == data  # the very bytes
    for h in held:
        h.close()
    got = tier.get([c.key for c in cs])
    assert all(same_bits(g.kv, c.kv) for g, c in zip(got, cs))
    assert tier.put([chunk_factory(9)]) == [True] and tier.usage().entries == 4  # put encodes (raw)
    assert tier.durability == "none"


def test_a_held_record_is_never_evicted_and_eviction_is_lru(chunk_factory):
    one = len(record(chunk_factory(0), "raw"))
    tier = RecordMemoryTier(2 * one + 1024)
    cs = [chunk_factory(i) for i in range(4)]
    data = [record(c, "raw") for c in cs]
    tier.put_bytes([cs[0].key, cs[1].key], data[:2])
    (held,) = tier.get_bytes([cs[0].key], check="full")  # a reader on record 0
    assert tier.put_bytes([cs[2].key], [data[2]]) == [True]  # evicts record 1, not the held record 0
    assert tier.contains([c.key for c in cs[:3]]) == [True, False, True]
    assert tier.put_bytes([cs[3].key], [data[3]]) == [True]  # evicts record 2: 0 is held
    assert tier.contains([c.key for c in cs]) == [True, False, False, True] and tier.stats.evictions == 2
    assert bytes(held.data) == data[0]  # untouched under its reader
    held.close()
    assert tier.put_bytes([cs[1].key], [data[1]]) == [True]  # now 0, the least recently used, goes
    assert tier.contains([c.key for c in cs]) == [False, True, False, True]
    assert tier.put_bytes([cs[1].key], [b"x" * (3 * one)]) == [True]  # present already: a no-op
    assert tier.put_bytes([cs[2].key], [b"x" * (3 * one)]) == [False]  # larger than the tier
