"""Record memory tier: whole records, as bytes, in host memory; the memory tier of a record server.

A byte tier (`ByteTier`) like the disk tier, with memory for a medium: a put keeps each record's bytes
(the very buffer it was handed when that is one immutable `bytes`, as the service's are: no copy), and
`get_bytes` hands them back as they are (nothing copied: a reader sends them with a memoryview), while
`get` decodes them like any byte tier's. Holding records rather than decoded KV, it holds as many chunks
per byte as the disk tier does (a cachegen record is a tenth of its KV), and a hit costs no encode.

The index is `PinnedLRU` (LRU order, pins, deferred deletes), bounded in bytes. A buffer handed out
stays valid after its entry is evicted or deleted: it is a Python object its reader holds a reference
to, so eviction never waits for a reader. What a put here survives: nothing (`durability = "none"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from codec import Codec, make_codec
from kvstore.errors import TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import ByteTier, RecordParts
from kvstore.tiers.lru import Entry, PinnedLRU


@dataclass(slots=True)
class _Record(Entry):
    data: bytes = b""


class RecordMemoryTier(ByteTier):
    def __init__(self, capacity_bytes: int, codec: Codec | None = None, *, name: str = "cpu",
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> None:
        super().__init__(name, codec or make_codec("raw"), max_kv_bytes=max_kv_bytes)
        self.capacity = capacity_bytes
        self.index: PinnedLRU[ChunkKey, _Record] = PinnedLRU(self._free)
        self._closed = False

    def _free(self, e: _Record, evicted: bool) -> None:
        if evicted:
            self.stats.add(evictions=1)

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, bytes, int]]:
        for i, key in enumerate(keys):
            e = self.index.acquire(key)  # for the LRU order: the bytes need no reader to stay valid
            if e is not None:
                self.index.release(key, e)
                yield i, e.data, e.size

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        ok, written, nbytes = [], 0, 0
        for key, parts in zip(keys, records):
            # One immutable buffer is kept as it is; anything else is copied (its owner may reuse it).
            data = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
            with self.index.lock:
                if self._closed:
                    raise TierError(f"{self.name} tier is closed")
                if not self.index.claim_locked(key):
                    ok.append(True)
                    continue
                fits = len(data) <= self.capacity
                while fits and self.index.used + len(data) > self.capacity:
                    fits = self.index.evict_one_locked()
                if not fits:
                    self.index.abandon_locked(key)
                    ok.append(False)
                    continue
                self.index.publish_locked(key, _Record(len(data), data=data))
            ok.append(True)
            written += 1
            nbytes += len(data)
        return ok, written, nbytes

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        index = self.index
        return [k in index for k in keys]

    def usage(self) -> TierUsage:
        return TierUsage(self.index.used, self.capacity, len(self.index), self.index.pinned())

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self.index.delete(keys)

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.index.pin(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self.index.unpin(keys)

    def clear(self, namespace: str | None = None) -> int:
        return self.index.clear(lambda k, e: namespace is None or k.namespace == namespace)

    def close(self) -> None:
        with self.index.lock:
            self._closed = True
