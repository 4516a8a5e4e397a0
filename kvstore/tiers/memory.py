"""Memory tier: decoded chunks in an arena on one torch device (GPU, or CPU host memory).

Primitives: batch `contains`/`get`/`put`/`delete`, `pin`/`unpin`, LRU eviction bounded in bytes.
- A put reserves a region under the lock, copies outside it, then publishes the entry: a reader never
  sees a half-copied chunk, and copies of different chunks run concurrently.
- A get takes a reference on the entry for the length of its copy, so eviction and delete wait for it
  (they skip it, or defer the free to the last release) instead of handing its memory to a new chunk.
- On CPU with CUDA present the arena is pinned host memory, so transfers to the GPU can be async.
On a machine without a GPU the device tier is this same class on the CPU device, so it is tested here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvstore.chunk import Chunk
from kvstore.errors import InvalidChunkError, TierError
from kvstore.keys import ChunkKey
from kvstore.tiers.arena import Arena
from kvstore.tiers.base import Tier, TierStats, TierUsage, Timer


@dataclass(slots=True)
class _Entry:
    key: ChunkKey
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    tokens: np.ndarray  # [T] uint32
    token_bytes: bytes
    start_pos: int
    pins: int = 0  # caller pins
    readers: int = 0  # gets copying out right now
    doomed: bool = False  # deleted while referenced: free at the last release


class MemoryTier(Tier):
    def __init__(self, capacity_bytes: int, device: str | torch.device = "cpu", pin_memory: bool | None = None, name: str | None = None) -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TierError("a CUDA memory tier was configured but no CUDA device is available")
        if pin_memory is None:
            pin_memory = device.type == "cpu" and torch.cuda.is_available()
        self.name = name or ("gpu" if device.type == "cuda" else "cpu")
        self.device = device
        self.arena = Arena(capacity_bytes, device, pin_memory=pin_memory)
        self.stats = TierStats()
        self.on_evict = None
        self._lock = threading.Lock()
        self._index: OrderedDict[ChunkKey, _Entry] = OrderedDict()  # LRU order: oldest first
        self._writing: set[ChunkKey] = set()
        self._doomed: list[_Entry] = []
        self._closed = False

    # -- queries -------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey], tokens: Sequence[np.ndarray] | None = None) -> list[bool]:
        """Which keys are stored; where `tokens` is given, only those whose stored token ids equal it."""
        index = self._index
        if tokens is None:
            return [k in index for k in keys]
        out = []
        for k, t in zip(keys, tokens):
            e = index.get(k)
            out.append(e is not None and e.token_bytes == t.tobytes())
        return out

    def peek(self, key: ChunkKey) -> Chunk | None:
        """A view of a pinned entry's KV, valid until it is unpinned; None when not stored."""
        with self._lock:
            e = self._index.get(key)
            if e is None:
                return None
            if not e.pins:
                raise TierError("peek needs the entry to be pinned for as long as the view is used")
            return Chunk(key, self.arena.view(e.offset, e.shape, e.dtype), e.tokens, e.start_pos)

    def usage(self) -> TierUsage:
        with self._lock:
            pinned = sum(1 for e in self._index.values() if e.pins)
            return TierUsage(self.arena.used, self.arena.capacity, len(self._index), pinned)

    # -- data movement -------------------------------------------------------------------------------

    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        with Timer() as t:
            results: list[Chunk | None] = []
            nbytes = hits = 0
            for i, key in enumerate(keys):
                with self._lock:
                    e = self._index.get(key)
                    if e is not None:
                        self._index.move_to_end(key)
                        e.readers += 1
                if e is None:
                    results.append(None)
                    continue
                try:
                    src = self.arena.view(e.offset, e.shape, e.dtype)
                    dst = out[i] if out is not None else None
                    if dst is None:
                        dst = src.clone()
                    else:
                        if tuple(dst.shape) != e.shape or dst.dtype != e.dtype:
                            raise InvalidChunkError(f"output buffer {tuple(dst.shape)} {dst.dtype} does not fit chunk {e.shape} {e.dtype}")
                        dst.copy_(src)
                finally:
                    self._release(e)
                results.append(Chunk(key, dst, e.tokens, e.start_pos))
                hits += 1
                nbytes += e.nbytes
        self.stats.add(hits=hits, misses=len(keys) - hits, bytes_read=nbytes, get_calls=1, get_seconds=t.seconds)
        return results

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        with Timer() as t:
            results = []
            stored = nbytes = 0
            for chunk in chunks:
                ok, entry = self._reserve(chunk)
                if entry is not None:
                    try:
                        self.arena.view(entry.offset, entry.shape, entry.dtype).copy_(chunk.kv)
                    except BaseException:
                        with self._lock:
                            self._writing.discard(entry.key)
                            self.arena.free(entry.offset, entry.nbytes)
                        raise
                    with self._lock:
                        self._writing.discard(entry.key)
                        self._index[entry.key] = entry
                    stored += 1
                    nbytes += entry.nbytes
                results.append(ok)
        self.stats.add(puts=stored, put_rejected=results.count(False), bytes_written=nbytes, put_calls=1, put_seconds=t.seconds)
        return results

    def _reserve(self, chunk: Chunk) -> tuple[bool, _Entry | None]:
        """(accepted, entry to fill): (True, None) when already stored, (False, None) when no room."""
        key, kv = chunk.key, chunk.kv
        nbytes = chunk.nbytes
        with self._lock:
            if self._closed:
                raise TierError(f"{self.name} tier is closed")
            if key in self._index:
                self._index.move_to_end(key)
                return True, None
            if key in self._writing:
                return True, None
            doomed = next((d for d in self._doomed if d.key == key), None)
            if doomed is not None:
                # Deleted while pinned or read, and put again: the region still holds this very chunk, so
                # it comes back with its pins. A fresh copy instead would leave the old region owned by
                # pins that `unpin` (which finds the new entry first) could never release.
                self._doomed.remove(doomed)
                doomed.doomed = False
                self._index[key] = doomed
                return True, None
            if nbytes > self.arena.capacity:
                return False, None
            offset = self.arena.alloc(nbytes)
            while offset is None:
                if not self._evict_one():
                    return False, None
                offset = self.arena.alloc(nbytes)
            tokens = np.ascontiguousarray(chunk.tokens, dtype=np.uint32)
            entry = _Entry(key, offset, nbytes, tuple(kv.shape), kv.dtype, tokens, tokens.tobytes(), chunk.start_pos)
            self._writing.add(key)
            return True, entry

    def _evict_one(self) -> bool:
        """Evict the least recently used unreferenced entry (lock held). False if every entry is in use."""
        victim = next((e for e in self._index.values() if not e.pins and not e.readers), None)
        if victim is None:
            return False
        del self._index[victim.key]
        if self.on_evict is not None:
            # The callback must copy what it keeps: the region is reused as soon as it returns.
            self.on_evict(Chunk(victim.key, self.arena.view(victim.offset, victim.shape, victim.dtype), victim.tokens, victim.start_pos))
        self.arena.free(victim.offset, victim.nbytes)
        self.stats.add(evictions=1)
        return True

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.readers -= 1
            self._free_if_doomed(e)

    def _free_if_doomed(self, e: _Entry) -> None:
        if e.doomed and not e.pins and not e.readers:
            self._doomed.remove(e)
            self.arena.free(e.offset, e.nbytes)

    # -- control -------------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                e = self._index.pop(key, None)
                if e is None:
                    continue
                removed += 1
                if e.pins or e.readers:
                    e.doomed = True
                    self._doomed.append(e)
                else:
                    self.arena.free(e.offset, e.nbytes)
        return removed

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = []
        with self._lock:
            for key in keys:
                e = self._index.get(key)
                if e is not None:
                    e.pins += 1
                out.append(e is not None)
        return out

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                e = self._index.get(key) or next((d for d in self._doomed if d.key == key and d.pins), None)
                if e is not None and e.pins:
                    e.pins -= 1
                    self._free_if_doomed(e)

    def clear(self, namespace: str | None = None) -> int:
        with self._lock:
            victims = [k for k, e in self._index.items()
                       if not e.pins and not e.readers and (namespace is None or k.namespace == namespace)]
        return self.delete(victims)

    def close(self) -> None:
        with self._lock:
            self._closed = True
