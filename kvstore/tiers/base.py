"""The tier protocol that the memory, disk and remote tiers implement, and their counters.

Every call is batch-first and answers per key:
- `contains(keys) -> [bool]`, `get(keys, out) -> [Chunk | None]`, `put(chunks) -> [bool]`,
  `delete(keys) -> count`, `pin(keys) -> [bool]`, `unpin(keys)`, `usage() -> TierUsage`, `clear(ns)`;
- two phases for a write whose data others go on reading: `prepare_store(chunks) -> Prepared` stores
  the chunks and hands back a stable copy of each (the tier's own copy, pinned, where it can), valid until
  `complete_store(prepared)` (vLLM's `prepare_store` / `complete_store`);
- `watch_evictions(callback)`: `callback(chunk)` for each entry the tier evicts, called before the
  victim's memory is reused (the chunk's tensor is only valid during the call).
Guarantees every tier gives:
- a pinned entry is never evicted; `delete` of a pinned entry takes effect at its last `unpin`;
- `put` of a key already present is a no-op that returns True (keys are content hashes);
- a fault on one key (corrupt bytes, I/O error) is a miss for that key, counted, never an exception;
  a caller's error (an `out` buffer that does not fit) is raised, `InvalidChunkError`.
A tier sets up its name, counters and eviction hook through `Tier.__init__`, and says what a put it
acknowledged survives (`durability`): nothing (memory), a crash of the process (a file written to the page
cache, a remote server), or a power loss (a file fsynced with its directory).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Literal, Sequence

import numpy as np
import torch

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey


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

# What a put that a tier acknowledged survives, weakest first.
Durability = Literal["none", "process-crash", "power-loss"]
DURABILITY_ORDER: tuple[Durability, ...] = ("none", "process-crash", "power-loss")


@dataclass(frozen=True, slots=True)
class Prepared:
    """What `prepare_store` hands back: per chunk given, whether the tier accepted it and a copy of its KV
    that stays valid and unchanged until `complete_store`; `pinned`, the keys the tier holds until then."""

    chunks: list[Chunk]
    accepted: list[bool]
    pinned: list[ChunkKey]


class Tier(ABC):
    # True for tiers across a network: when behind, the store drops their writes instead of waiting.
    drop_when_behind: ClassVar[bool] = False
    # What a put this tier acknowledged survives (memory: nothing; a tier may set its own per instance).
    durability: Durability = "none"

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = TierStats()
        self._on_evict: EvictCallback | None = None

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey], tokens: Sequence[np.ndarray] | None = None) -> list[bool]:
        """Which keys are stored. Tiers that keep token ids in memory also check them against `tokens`."""

    @abstractmethod
    def get(self, keys: Sequence[ChunkKey], out: Sequence[torch.Tensor | None] | None = None) -> list[Chunk | None]:
        """Chunks for `keys` (None on a miss); KV delivered into `out[i]` where given (see `chunk.check_out`)."""

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

    # -- two-phase store -----------------------------------------------------------------------------

    def prepare_store(self, chunks: Sequence[Chunk]) -> Prepared:
        """Store `chunks` and return a stable copy of each (here: private CPU copies; a tier that holds
        decoded KV hands out its own copies, pinned). The caller may reuse its tensors at once."""
        return Prepared([c.copy() for c in chunks], self.put(chunks), [])

    def complete_store(self, prepared: Prepared) -> None:
        """Release what `prepare_store` holds; its copies are not to be read after this."""
        if prepared.pinned:
            self.unpin(prepared.pinned)

    # -- evictions -----------------------------------------------------------------------------------

    def watch_evictions(self, callback: EvictCallback | None) -> None:
        """Have `callback(chunk)` called for each entry this tier evicts, before its memory is reused.
        Tiers that never evict by themselves (a remote server evicts on its own) never call it."""
        self._on_evict = callback

    def _evicted(self, chunk: Chunk) -> None:
        if self._on_evict is not None:
            self._on_evict(chunk)
