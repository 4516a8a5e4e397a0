"""The index of a local tier: entries by key in LRU order, with pins, readers and deferred frees.

Memory and disk tiers share it; a tier supplies only how to free an entry's storage (`free(entry,
evicted)`, called with the index's lock held, so that no put can claim the key in between).

Primitives and their guarantees:
- `acquire(key)` / `release(key, entry)`: a reader holds the entry for the length of its copy or read
  (`held(keys)` walks a batch that way; `hold(key, entry)` takes one more reader on an entry in hand);
- `pin(keys)` / `unpin(keys)`: a pinned entry is never evicted;
- `delete(keys)`, `clear(match)`: an entry that is pinned or read is taken out of the index at once but
  freed only at its last `unpin` or `release` (it is "doomed"); a put of that key meanwhile brings the
  very same entry back with its pins (its storage still holds this very chunk), instead of a second copy
  that the deferred free would then destroy;
- a put goes `claim_locked` (False: stored, being written, or brought back) -> write outside the lock ->
  `publish_locked` or `abandon_locked`; `evict_one_locked` frees the least recently used entry that is
  neither pinned nor read; `pin_locked` pins one entry. These run under `lock`, which the tier holds around
  its own allocation.
Reads of `in` and `peek` take no lock (one dict lookup): the hot path of lookups.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar


@dataclass(slots=True)
class Entry:
    """What the index keeps per key; tiers extend it with where the data lives."""

    size: int  # bytes the entry occupies
    pins: int = 0  # caller pins
    readers: int = 0  # gets copying or reading it right now
    doomed: bool = False  # deleted while referenced: freed at the last release

    @property
    def busy(self) -> bool:
        return bool(self.pins or self.readers)


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Entry)


class PinnedLRU(Generic[K, E]):
    def __init__(self, free: Callable[[E, bool], None]) -> None:
        self.lock = threading.Lock()
        self._free = free
        self._entries: OrderedDict[K, E] = OrderedDict()  # LRU order: oldest first
        self._doomed: dict[K, E] = {}
        self._writing: set[K] = set()
        self.used = 0  # bytes of the entries in the index (not the doomed ones)

    # -- lock-free reads -----------------------------------------------------------------------------

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: K) -> E | None:
        """The entry, without touching the LRU order or taking a reference."""
        return self._entries.get(key)

    def pinned(self) -> int:
        with self.lock:
            return sum(1 for e in self._entries.values() if e.pins)

    def items(self) -> list[tuple[K, E]]:
        with self.lock:
            return list(self._entries.items())

    # -- readers and pins ----------------------------------------------------------------------------

    def acquire(self, key: K) -> E | None:
        """The entry with a reader reference taken (release it with `release`); None when not stored."""
        with self.lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
                e.readers += 1
            return e

    def held(self, keys: Iterable[K]) -> Iterator[tuple[int, K, E]]:
        """(position, key, entry) of each stored key, a reader held on it until the caller asks for the next."""
        for i, key in enumerate(keys):
            e = self.acquire(key)
            if e is None:
                continue
            try:
                yield i, key, e
            finally:
                self.release(key, e)

    def hold(self, key: K, e: E) -> bool:
        """One more reader on `e` if it is still `key`'s entry (release it with `release`); False if not."""
        held = self.acquire(key)
        if held is not e and held is not None:
            self.release(key, held)
        return held is e

    def release(self, key: K, e: E) -> None:
        with self.lock:
            e.readers -= 1
            self._free_if_doomed(key, e)

    def pin(self, keys: Iterable[K]) -> list[bool]:
        out = []
        with self.lock:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:
                    e.pins += 1
                out.append(e is not None)
        return out

    def unpin(self, keys: Iterable[K]) -> None:
        with self.lock:
            for key in keys:
                e = self._entries.get(key) or self._doomed.get(key)
                if e is not None and e.pins:
                    e.pins -= 1
                    self._free_if_doomed(key, e)

    # -- removal -------------------------------------------------------------------------------------

    def delete(self, keys: Iterable[K]) -> int:
        removed = 0
        with self.lock:
            for key in keys:
                e = self._entries.pop(key, None)
                if e is None:
                    continue
                removed += 1
                self.used -= e.size
                if e.busy:
                    e.doomed = True
                    self._doomed[key] = e
                else:
                    self._free(e, False)
        return removed

    def clear(self, match: Callable[[K, E], bool]) -> int:
        """Remove and free every entry that is neither pinned nor read and that `match`es."""
        with self.lock:
            victims = [(k, e) for k, e in self._entries.items() if not e.busy and match(k, e)]
            for k, e in victims:
                del self._entries[k]
                self.used -= e.size
                self._free(e, False)
        return len(victims)

    def forget(self, key: K, e: E) -> bool:
        """Drop `e` from the index without freeing it (its storage is gone, or moved elsewhere)."""
        with self.lock:
            if self._entries.get(key) is not e:
                return False
            del self._entries[key]
            self.used -= e.size
            return True

    # -- the put path (lock held by the caller) ------------------------------------------------------

    def claim_locked(self, key: K) -> bool:
        """True: the caller writes `key` now and then publishes or abandons it. False: nothing to write
        (stored already, being written by another put, or brought back from a deferred delete)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        if key in self._writing:
            return False
        e = self._doomed.pop(key, None)
        if e is not None:
            e.doomed = False
            self._entries[key] = e
            self.used += e.size
            return False
        self._writing.add(key)
        return True

    def pin_locked(self, key: K) -> E | None:
        """`pin` of one key, for a caller that holds `lock` (to read the entry at the same time)."""
        e = self._entries.get(key)
        if e is not None:
            e.pins += 1
        return e

    def publish_locked(self, key: K, e: E) -> None:
        self._writing.discard(key)
        self._entries[key] = e
        self.used += e.size

    def adopt_locked(self, key: K, e: E) -> bool:
        """Index an entry whose storage appeared from elsewhere (another process's write). True if `key`
        is stored now; False if it was deleted here while referenced (not to be served again)."""
        if key in self._entries or key in self._writing:
            return True
        if key in self._doomed:
            return False
        self.publish_locked(key, e)
        return True

    def abandon_locked(self, key: K) -> None:
        self._writing.discard(key)

    def evict_one_locked(self) -> bool:
        """Free the least recently used entry that is neither pinned nor read; False if there is none."""
        victim = next(((k, e) for k, e in self._entries.items() if not e.busy), None)
        if victim is None:
            return False
        key, e = victim
        del self._entries[key]
        self.used -= e.size
        self._free(e, True)
        return True

    def _free_if_doomed(self, key: K, e: E) -> None:
        if e.doomed and not e.busy:
            if self._doomed.get(key) is e:
                del self._doomed[key]
            self._free(e, False)


class IndexedByKey:
    """The control half of a tier whose `index` is a `PinnedLRU` keyed by `ChunkKey` (the memory tiers):
    delete, pin, unpin, clear (of a namespace), and close (no puts after it)."""

    index: PinnedLRU
    _closed: bool

    def delete(self, keys) -> int:
        return self.index.delete(keys)

    def pin(self, keys) -> list[bool]:
        return self.index.pin(keys)

    def unpin(self, keys) -> None:
        self.index.unpin(keys)

    def clear(self, namespace: str | None = None) -> int:
        return self.index.clear(lambda k, e: namespace is None or k.namespace == namespace)

    def close(self) -> None:
        with self.index.lock:
            self._closed = True
