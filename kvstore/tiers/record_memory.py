"""Record memory tier: whole records, as bytes, in host memory; the memory tier of a record server.

A byte tier (`ByteTier`) like the disk tier, with memory for a medium: a put copies each record's bytes
into a preallocated arena (`Arena`: memory reused as records come and go, so a put is one copy into
pages already mapped, not a fresh allocation whose every page faults), and `get_bytes` hands them back
as they are: a memoryview of the arena, nothing copied, the entry held (a reader: never evicted or
reused) until the caller closes it. `get` decodes them like any byte tier. Holding records rather than
decoded KV, it holds as many chunks per byte as the disk tier does (a cachegen record is a tenth of its
KV), and a hit costs no encode.

The index is `PinnedLRU` (LRU order, pins, readers, deferred deletes), bounded in bytes by the arena.
A put reserves its region under the index's lock, copies outside it, then publishes the entry, so a
reader never sees half a record. What a put here survives: nothing (`durability = "none"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from codec import Codec, make_codec
from kvstore.errors import TierError
from kvstore.keys import ChunkKey
from kvstore.record import DEFAULT_MAX_KV_BYTES
from kvstore.tiers.arena import Arena
from kvstore.tiers.base import TierUsage
from kvstore.tiers.byte_tier import ByteTier, RecordBytes, RecordParts
from kvstore.tiers.lru import Entry, IndexedByKey, PinnedLRU


@dataclass(slots=True)
class _Record(Entry):
    offset: int = 0


class RecordMemoryTier(IndexedByKey, ByteTier):
    def __init__(self, capacity_bytes: int, codec: Codec | None = None, *, name: str = "cpu",
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES) -> None:
        super().__init__(name, codec or make_codec("raw"), max_kv_bytes=max_kv_bytes)
        self.arena = Arena(capacity_bytes, torch.device("cpu"))
        self.index: PinnedLRU[ChunkKey, _Record] = PinnedLRU(self._free)
        self._bytes = memoryview(self.arena.buffer.numpy())  # uint8 [capacity]
        self._closed = False

    def _free(self, e: _Record, evicted: bool) -> None:
        if evicted:
            self.stats.add(evictions=1)
        self.arena.free(e.offset, e.size)

    def _view(self, e: _Record) -> memoryview:
        return self._bytes[e.offset : e.offset + e.size]

    # -- records -------------------------------------------------------------------------------------

    def _sources(self, keys: Sequence[ChunkKey]) -> Iterator[tuple[int, tuple[ChunkKey, _Record], int]]:
        # A reader on each: its region is not reused while the caller reads it.
        return ((i, (key, e), e.size) for i, key, e in self.index.held(keys))

    def _read(self, source: tuple[ChunkKey, _Record], key, out):
        return super()._read(self._view(source[1]), key, out)

    def _hold(self, source: tuple[ChunkKey, _Record], size: int) -> RecordBytes | None:
        key, e = source
        if not self.index.hold(key, e):
            return None
        return RecordBytes(size, data=self._view(e), release=lambda: self.index.release(key, e))

    def _write(self, keys: Sequence[ChunkKey], records: Sequence[RecordParts]) -> tuple[list[bool], int, int]:
        ok, written, nbytes = [], 0, 0
        for key, parts in zip(keys, records):
            size = sum(memoryview(p).nbytes for p in parts)
            with self.index.lock:
                if self._closed:
                    raise TierError(f"{self.name} tier is closed")
                if not self.index.claim_locked(key):
                    ok.append(True)
                    continue
                offset = self.arena.alloc(size) if size <= self.arena.capacity else None
                while offset is None and size <= self.arena.capacity and self.index.evict_one_locked():
                    offset = self.arena.alloc(size)
                if offset is None:
                    self.index.abandon_locked(key)
                    ok.append(False)
                    continue
            e = _Record(size, offset=offset)
            try:
                pos = offset
                for p in parts:  # outside the lock: copies of different records run side by side
                    view = memoryview(p).cast("B")
                    self._bytes[pos : pos + len(view)] = view
                    pos += len(view)
            except BaseException:
                with self.index.lock:
                    self.index.abandon_locked(key)
                    self.arena.free(offset, size)
                raise
            with self.index.lock:
                self.index.publish_locked(key, e)
            ok.append(True)
            written += 1
            nbytes += size
        return ok, written, nbytes

    # -- protocol ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens=None) -> list[bool]:
        index = self.index
        return [k in index for k in keys]

    def usage(self) -> TierUsage:
        return TierUsage(self.arena.used, self.arena.capacity, len(self.index), self.index.pinned())
