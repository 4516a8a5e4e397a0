"""Memory tier: decoded chunks in an arena on one torch device (GPU, or CPU host memory).

Primitives: batch `contains`/`get`/`put`/`delete`, `pin`/`unpin`, LRU eviction bounded in bytes (the
index, pins and deferred frees are `PinnedLRU`'s; this tier supplies the arena and how to free a region).
- A put reserves a region under the lock, copies outside it, then publishes the entry: a reader never
  sees a half-copied chunk, and copies of different chunks run concurrently.
- A get takes a reader reference on the entry for the length of its copy, so eviction and delete wait for
  it (they skip it, or defer the free to the last release) instead of handing its memory to a new chunk.
- `prepare_store` hands out views of this tier's own copies, pinned until `complete_store`: the store's
  writers read them instead of a second copy.
- Eviction tells the watcher (`watch_evictions`) before the victim's region is reused.
- On CPU with CUDA present the arena is pinned host memory, so transfers to the GPU can be async.
On a machine without a GPU the device tier is this same class on the CPU device, so it is tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvstore.chunk import Chunk, deliver
from kvstore.errors import TierError
from kvstore.keys import ChunkKey
from kvstore.tiers.arena import Arena
from kvstore.tiers.base import Prepared, Tier, TierUsage, Timer
from kvstore.tiers.lru import Entry, IndexedByKey, PinnedLRU


@dataclass(slots=True)
class _Region(Entry):
    key: ChunkKey | None = None
    offset: int = 0
    shape: tuple[int, ...] = ()  # [L, 2, T, H, D]
    dtype: torch.dtype = torch.float16
    tokens: np.ndarray | None = None  # [T] uint32
    token_bytes: bytes = b""
    start_pos: int = 0


class MemoryTier(IndexedByKey, Tier):
    def __init__(self, capacity_bytes: int, device: str | torch.device = "cpu", pin_memory: bool | None = None, name: str | None = None) -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TierError("a CUDA memory tier was configured but no CUDA device is available")
        if pin_memory is None:
            pin_memory = device.type == "cpu" and torch.cuda.is_available()
        super().__init__(name or ("gpu" if device.type == "cuda" else "cpu"))
        self.device = device
        self.arena = Arena(capacity_bytes, device, pin_memory=pin_memory)
        self.index: PinnedLRU[ChunkKey, _Region] = PinnedLRU(self._free)
        self._closed = False

    def _chunk(self, e: _Region) -> Chunk:
        """A view of the entry's region: valid while the entry is referenced (read, pinned, or locked)."""
        return Chunk(e.key, self.arena.view(e.offset, e.shape, e.dtype), e.tokens, e.start_pos)

    def _free(self, e: _Region, evicted: bool) -> None:
        if evicted:
            self.stats.add(evictions=1)
            self._evicted(self._chunk(e))  # the watcher copies what it keeps: the region is reused next
        self.arena.free(e.offset, e.size)

    # -- queries -------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens: Sequence[np.ndarray] | None = None) -> list[bool]:
        """Which keys are stored; where `tokens` is given, only those whose stored token ids equal it."""
        index = self.index
        if tokens is None:
            return [k in index for k in keys]
        out = []
        for k, t in zip(keys, tokens):
            e = index.peek(k)
            out.append(e is not None and e.token_bytes == t.tobytes())
        return out

    def peek(self, key: ChunkKey) -> Chunk | None:
        """A view of a pinned entry's KV, valid until it is unpinned; None when not stored."""
        with self.index.lock:
            e = self.index.peek(key)
            if e is None:
                return None
            if not e.pins:
                raise TierError("peek needs the entry to be pinned for as long as the view is used")
            return self._chunk(e)

    def usage(self) -> TierUsage:
        return TierUsage(self.arena.used, self.arena.capacity, len(self.index), self.index.pinned())

    # -- data movement -------------------------------------------------------------------------------

    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        with Timer() as t:
            results: list[Chunk | None] = []
            nbytes = hits = 0
            for i, key in enumerate(keys):
                e = self.index.acquire(key)
                if e is None:
                    results.append(None)
                    continue
                try:
                    kv = deliver(self.arena.view(e.offset, e.shape, e.dtype), out[i] if out is not None else None)
                finally:
                    self.index.release(key, e)
                results.append(Chunk(key, kv, e.tokens, e.start_pos))
                hits += 1
                nbytes += e.size
        self.stats.add(hits=hits, misses=len(keys) - hits, bytes_read=nbytes, get_calls=1, get_seconds=t.seconds)
        return results

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        with Timer() as t:
            results = []
            stored = nbytes = 0
            for chunk in chunks:
                ok, e = self._reserve(chunk)
                if e is not None:
                    try:
                        self.arena.view(e.offset, e.shape, e.dtype).copy_(chunk.kv)
                    except BaseException:
                        with self.index.lock:
                            self.index.abandon_locked(e.key)
                            self.arena.free(e.offset, e.size)
                        raise
                    with self.index.lock:
                        self.index.publish_locked(e.key, e)
                    stored += 1
                    nbytes += e.size
                results.append(ok)
        self.stats.add(puts=stored, put_rejected=results.count(False), bytes_written=nbytes, put_calls=1, put_seconds=t.seconds)
        return results

    def _reserve(self, chunk: Chunk) -> tuple[bool, _Region | None]:
        """(accepted, entry to fill): (True, None) when there is nothing to copy, (False, None) when no room."""
        key, kv = chunk.key, chunk.kv
        nbytes = chunk.nbytes
        with self.index.lock:
            if self._closed:
                raise TierError(f"{self.name} tier is closed")
            if not self.index.claim_locked(key):
                return True, None
            offset = self.arena.alloc(nbytes) if nbytes <= self.arena.capacity else None
            while offset is None and nbytes <= self.arena.capacity and self.index.evict_one_locked():
                offset = self.arena.alloc(nbytes)
            if offset is None:
                self.index.abandon_locked(key)
                return False, None
            tokens = np.ascontiguousarray(chunk.tokens, dtype=np.uint32)
            return True, _Region(nbytes, key=key, offset=offset, shape=tuple(kv.shape), dtype=kv.dtype,
                                 tokens=tokens, token_bytes=tokens.tobytes(), start_pos=chunk.start_pos)

    def prepare_store(self, chunks: Sequence[Chunk]) -> Prepared:
        """Store `chunks`; hand back views of this tier's copies, pinned until `complete_store` (one copy
        per put), and private copies of the chunks it has no room for."""
        accepted = self.put(chunks)
        views: list[Chunk | None] = [None] * len(chunks)
        pinned = []
        with self.index.lock:  # pinned and viewed at once: no eviction in between
            for i, (c, ok) in enumerate(zip(chunks, accepted)):
                e = self.index.pin_locked(c.key) if ok else None
                if e is not None:
                    pinned.append(c.key)
                    views[i] = self._chunk(e)
        return Prepared([v if v is not None else c.copy() for v, c in zip(views, chunks)], accepted, pinned)
