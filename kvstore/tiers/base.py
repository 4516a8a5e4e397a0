"""The tier protocol that the memory, disk and remote tiers implement, and their counters.

Every call is batch-first and answers per key:
- `contains(keys) -> [bool]`, `get(keys, out) -> [Chunk | None]`, `put(chunks) -> [bool]`,
  `delete(keys) -> count`, `pin(keys) -> [bool]`, `unpin(keys)`, `usage() -> TierUsage`.
Guarantees every tier gives:
- a pinned entry is never evicted; `delete` of a pinned entry takes effect at its last `unpin`;
- `put` of a key already present is a no-op that returns True (keys are content hashes);
- a fault on one key (corrupt bytes, I/O error) is a miss for that key, counted, never an exception;
- eviction calls `on_evict(chunk)` (if set) before the victim's memory is reused, so the store can
  write it back to the next tier; the chunk's tensor is only valid during the call.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierUsage:
    used_bytes: int
    capacity_bytes: int
    entries: int
    pinned: int


@dataclass(slots=True)
class Counters:
    """Thread-safe counters: subclasses declare numeric fields; `add` and `snapshot` handle the lock."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass(slots=True)
class TierStats(Counters):
    """Counters of one tier. Latencies are sums of seconds; divide by the call counts."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_rejected: int = 0  # no room (all pinned) or too large for the tier
    evictions: int = 0
    corrupt: int = 0  # records that failed a check and were quarantined
    errors: int = 0  # I/O or service errors turned into misses or dropped puts
    bytes_read: int = 0
    bytes_written: int = 0
    get_calls: int = 0
    put_calls: int = 0
    get_seconds: float = 0.0
    put_seconds: float = 0.0

    def snapshot(self) -> dict[str, float]:
        d = Counters.snapshot(self)
        looked = d["hits"] + d["misses"]
        d["hit_rate"] = d["hits"] / looked if looked else 0.0
        d["get_ms_avg"] = 1e3 * d["get_seconds"] / d["get_calls"] if d["get_calls"] else 0.0
        d["put_ms_avg"] = 1e3 * d["put_seconds"] / d["put_calls"] if d["put_calls"] else 0.0
        return d


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    __slots__ = ("start", "seconds")

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


EvictCallback = Callable[[Chunk], None]


class Tier(ABC):
    name: str
    stats: TierStats
    on_evict: EvictCallback | None = None
    # True for tiers across a network: when behind, the store drops their writes instead of waiting.
    drop_when_behind: ClassVar[bool] = False

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey], tokens: Sequence[np.ndarray] | None = None) -> list[bool]:
        """Which keys are stored. Tiers that keep token ids in memory also check them against `tokens`."""

    @abstractmethod
    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        """Chunks for `keys` (None on a miss); decoded into `out[i]` where given (shape and dtype must fit)."""

    @abstractmethod
    def put(self, chunks: Sequence[Chunk]) -> list[bool]: ...

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> int: ...

    @abstractmethod
    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    def unpin(self, keys: Sequence[ChunkKey]) -> None: ...

    @abstractmethod
    def usage(self) -> TierUsage: ...

    @abstractmethod
    def clear(self, namespace: str | None = None) -> int:
        """Remove every unpinned entry (of `namespace`, where given); returns how many were removed."""

    def close(self) -> None:
        """Release resources; the tier answers no more calls after this."""


class RemoteTier(Tier):
    """A tier across the network (Redis, a sidecar). Degrade, don't fail: after a failed call the tier
    counts as down for `retry_after` seconds, during which callers answer misses and drop puts at once;
    the first call after that tries again."""

    drop_when_behind = True
    url: str
    retry_after: float
    _down_until: float = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after  # one float store: atomic, no lock needed
        self.stats.add(errors=1)
        log.warning("%s tier %s: %s failed (%s); treating it as down for %.1f s", self.name, self.url, what, e, self.retry_after)
