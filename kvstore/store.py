"""The tiered store: one API over an ordered list of tiers, fastest first.

Primitives:
- `lookup(tokens, fingerprint=..)`: how many leading tokens are stored (consecutive chunk hits from the
  start, in any tier; token ids checked where a tier keeps them in memory).
- `get(refs)`: chunks from the fastest tier holding each, token ids verified against the refs; hits in
  a slower tier are promoted (copied) into the faster ones.
- `put(chunks)`: synchronous into the first tier; asynchronous into the slower ones (write-through)
  through one `BoundedWriter` per slower tier (bounded pending bytes); `flush()` waits for them. The
  writers read the first tier's own copies, held through the tier protocol's two phases
  (`prepare_store` / `complete_store`), whatever kind of tier comes first. `put(chunks, durable=True)`
  returns once the durable tier (the first whose puts survive a crash: `durability`) has each chunk,
  and says per chunk whether it does: False is a put that tier refused (no room, an I/O error).
- Records as bytes, for a record server (`kvstore serve`): `put_records` stores checked records as
  they are, synchronously into the byte tiers up to the durable one (its answer is the put's);
  `get_records` hands back the stored bytes of the fastest byte tier holding each (no decode, no copy).
- Eviction from the first tier (which the store watches: `watch_evictions`) demotes (writes back) the
  victim to the next tier when that tier does not already hold it.
- Pins protect entries in flight; counters per tier and for the store.
- `adaptive` (None unless configured): copies of chunks at several codec levels in one byte tier and the
  measured figures that choose between them at load time (`kvstore.adaptive`); engines' connectors use it.

Degrade, don't fail: a tier that raises on a get is a miss for that call, a failed async write is
counted and logged; the caller (an engine) recomputes. Only bad input raises.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from codec.codebook import missing_codebooks
from kvstore.chunk import Chunk, deliver
from kvstore.errors import InvalidChunkError
from kvstore.keys import DEFAULT_NAMESPACE, ChunkKey, ChunkKind, ChunkRef, chunk_refs
from kvstore.tiers.base import Counters, Durability, Tier
from kvstore.tiers.byte_tier import Buffer, ByteTier, Check, RecordBytes, RecordParts
from kvstore.writer import BoundedWriter

if TYPE_CHECKING:
    from kvstore.adaptive import AdaptiveLoading

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoreCounters(Counters):
    lookups: int = 0  # `lookup` calls
    lookup_tokens: int = 0  # tokens they asked about
    lookup_hit_tokens: int = 0  # leading tokens found stored
    token_mismatches: int = 0  # hits whose stored token ids differ from the ref's: served as misses
    tier_failures: int = 0  # tier calls that raised (counted as misses)
    promotions: int = 0  # chunks copied into faster tiers on a hit
    demotions: int = 0  # chunks evicted from the first tier and written back to the next
    async_writes: int = 0  # chunks the slower tiers' writers stored
    async_failures: int = 0  # chunks whose write to a slower tier failed or was refused
    refused_puts: int = 0  # chunks or records a durable put could not make durable (logged)
    dropped_writes: int = 0  # chunks a remote tier skipped because it was behind


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        chunk_tokens: int = 256,
        write_through: bool = True,
        promote_on_hit: bool = True,
        max_pending_bytes: int = 1 << 30,
        adaptive: "AdaptiveLoading | None" = None,
    ) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = list(tiers)
        self.chunk_tokens = chunk_tokens
        self.write_through = write_through
        self.promote_on_hit = promote_on_hit
        self.max_pending_bytes = max_pending_bytes
        self.counters = StoreCounters()
        self.adaptive = adaptive
        if adaptive is not None:
            adaptive.promote = self._promote_exact_copies
        # One writer per slower tier, one job at a time each, in order.
        self._writers = [BoundedWriter(f"kvstore-{t.name}", max_pending_bytes=max_pending_bytes) for t in self.tiers[1:]]
        # Chunks evicted from the first tier whose write-back has not landed yet: still served from here,
        # so that a demotion never opens a window in which a stored chunk is in no tier.
        self._demoting: dict[ChunkKey, Chunk] = {}
        self._demoting_lock = threading.Lock()
        self._closed = False
        # The durable tier: the first whose acknowledged puts survive a crash (None: memory only).
        self._durable = next((i for i, t in enumerate(self.tiers) if t.durability != "none"), None)
        if len(self.tiers) > 1:
            self.tiers[0].watch_evictions(self._demote)

    @property
    def durability(self) -> Durability:
        """What a durable put (`put(durable=True)`, `put_records`) survives once it returned True."""
        return self.tiers[self._durable].durability if self._durable is not None else "none"

    # -- keys and lookup -----------------------------------------------------------------------------

    def chunk_refs(self, tokens, *, fingerprint: str, namespace: str = DEFAULT_NAMESPACE, kind: ChunkKind = ChunkKind.PREFIX, include_partial: bool = False) -> list[ChunkRef]:
        return chunk_refs(tokens, namespace=namespace, fingerprint=fingerprint, chunk_tokens=self.chunk_tokens, kind=kind, include_partial=include_partial)

    def lookup(self, tokens, *, fingerprint: str, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Number of leading tokens whose chunks are all stored (a multiple of `chunk_tokens`)."""
        refs = self.chunk_refs(tokens, fingerprint=fingerprint, namespace=namespace)
        n = self.lookup_refs(refs)
        self.counters.add(lookups=1, lookup_tokens=len(tokens), lookup_hit_tokens=n * self.chunk_tokens)
        return n * self.chunk_tokens

    def lookup_refs(self, refs: Sequence[ChunkRef]) -> int:
        """Number of leading refs stored in some tier."""
        keys = [r.key for r in refs]
        found = self._contains(self.tiers[0], keys, [r.tokens for r in refs])
        if self._demoting:
            demoting = self._demoting
            found = [f or k in demoting for f, k in zip(found, keys)]
        for tier in self.tiers[1:]:
            if all(found):
                break
            first = found.index(False)
            missing = [i for i in range(first, len(keys)) if not found[i]]
            sub = self._contains(tier, [keys[i] for i in missing], [refs[i].tokens for i in missing])
            for i, hit in zip(missing, sub):
                found[i] = found[i] or hit
        return found.index(False) if not all(found) else len(found)

    def _contains(self, tier: Tier, keys: list[ChunkKey], tokens: list[np.ndarray]) -> list[bool]:
        try:
            return tier.contains(keys, tokens)
        except Exception as e:  # a failing tier is a miss, not an error (degrade, don't fail)
            log.warning("tier %s failed on contains: %s", tier.name, e)
            self.counters.add(tier_failures=1)
            return [False] * len(keys)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        for tier in self.tiers:
            for i, hit in enumerate(self._contains(tier, list(keys), None)):
                found[i] = found[i] or hit
        return found

    # -- get -----------------------------------------------------------------------------------------

    def get(
        self,
        refs: Sequence[ChunkRef | ChunkKey],
        out: Sequence[torch.Tensor | None] | None = None,
        sources: list[str | None] | None = None,
    ) -> list[Chunk | None]:
        """Chunks for `refs` (None where no tier has a valid copy), decoded into `out[i]` where given.

        With `ChunkRef`s the token ids stored with each chunk are compared with the ref's: a mismatch (a
        hash collision, or a poisoned entry) is a miss, never wrong KV. `sources`, when given (a list as
        long as `refs`), receives the name of the tier each chunk came from (None for a miss).
        """
        if sources is not None and len(sources) != len(refs):
            raise ValueError(f"sources has {len(sources)} entries for {len(refs)} refs")
        keys = [r.key if isinstance(r, ChunkRef) else r for r in refs]
        results: list[Chunk | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            try:
                got = tier.get([keys[i] for i in todo], [out[i] for i in todo] if out is not None else None)
            except InvalidChunkError:  # the caller's buffer does not fit: the caller's error
                raise
            except Exception as e:
                log.warning("tier %s failed on get: %s", tier.name, e)
                self.counters.add(tier_failures=1)
                continue
            if level == 0 and self._demoting:
                got = [c if c is not None else self._from_demoting(keys[i], out[i] if out is not None else None)
                       for i, c in zip(todo, got)]
            promote = []
            still = []
            for i, chunk in zip(todo, got):
                if chunk is not None and isinstance(refs[i], ChunkRef) and not np.array_equal(chunk.tokens, refs[i].tokens):
                    self.counters.add(token_mismatches=1)
                    chunk = None
                if chunk is None:
                    still.append(i)
                else:
                    results[i] = chunk
                    promote.append(chunk)
                    if sources is not None:
                        sources[i] = tier.name
            self._promote(promote, level)
            todo = still
        return results

    def _promote(self, chunks: Sequence[Chunk], level: int) -> None:
        """Copy chunks found in tier `level` into the faster tiers (with `promote_on_hit`)."""
        if not level or not chunks or not self.promote_on_hit:
            return
        for faster in self.tiers[:level]:
            try:
                faster.put(chunks)
            except Exception as e:
                log.warning("promotion into tier %s failed: %s", faster.name, e)
        self.counters.add(promotions=len(chunks))

    def _promote_exact_copies(self, chunks: Sequence[Chunk], tier: Tier) -> None:
        """Adaptive loading's exact loads (a lossless level's copy, fetched from `tier`): promoted like hits,
        so the next load of those chunks is a hit in a faster tier."""
        level = next((i for i, t in enumerate(self.tiers) if t is tier), 0)
        self._promote(chunks, level)

    # -- put -----------------------------------------------------------------------------------------

    def put(self, chunks: Sequence[Chunk], *, durable: bool = False) -> list[bool]:
        """Store `chunks`: in the first tier now, in the slower tiers asynchronously (see `flush`).

        Returns per chunk whether some tier accepted it (the first tier now, or a slower tier's write
        queued). With `durable`, the tiers up to the durable one are written now, and the answer is
        whether the durable tier holds each chunk (what it survives: `durability`); a refusal is counted
        (`refused_puts`) and logged. The caller may reuse its tensors as soon as this returns.
        """
        first = self.tiers[0]
        if len(self.tiers) == 1 or not self.write_through:
            ok = first.put(chunks)
            if durable and self._durable not in (None, 0):
                ok = self._put_into(self.tiers[self._durable], list(chunks), durable=True)
            return ok
        # The first tier hands back stable copies (its own, pinned: one copy per put) that the slower
        # tiers' writers read until the last of them completes the store.
        prepared = first.prepare_store(chunks)
        now = self._durable if durable and self._durable is not None else 0
        ok = prepared.accepted
        for tier in self.tiers[1 : now + 1]:
            ok = self._put_into(tier, prepared.chunks, durable=True)
        self._submit(prepared.chunks, lambda: first.complete_store(prepared), start=now + 1)
        return ok if durable else [True] * len(chunks)

    def _submit(self, chunks: list[Chunk], complete: Callable[[], None], start: int = 1) -> None:
        """Queue `chunks` for every tier from `start` on; `complete()` once the last of those writes has
        run. A tier's writer that is behind by `max_pending_bytes` makes this wait (local disk: back-pressure,
        nothing lost) or, for a tier that sets `drop_when_behind` (remote tiers), skips these chunks and
        counts them: a slow network must never stall the engine."""
        nbytes = sum(c.nbytes for c in chunks)
        todo = list(zip(self.tiers[start:], self._writers[start - 1 :]))
        if not todo:
            complete()
            return
        remaining = [len(todo)]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                complete()

        for tier, writer in todo:
            job = lambda tier=tier: self._write(tier, chunks, done)  # noqa: E731
            if not writer.submit(job, nbytes, "drop" if tier.drop_when_behind else "wait"):
                self.counters.add(dropped_writes=len(chunks))
                done()

    def _write(self, tier: Tier, chunks: list[Chunk], done: Callable[[], None] | None = None) -> None:
        try:
            self._put_into(tier, chunks)
        finally:
            if done is not None:
                done()

    def _put_into(self, tier: Tier, chunks: list[Chunk], *, durable: bool = False) -> list[bool]:
        """Store `chunks` into `tier` unless it holds them; per chunk whether it does now. A failure or a
        refusal is counted (`refused_puts` for a durable put, else `async_failures`) and logged."""
        try:
            has = tier.contains([c.key for c in chunks])
            todo = [c for c, h in zip(chunks, has) if not h]
            stored = iter(tier.put(todo) if todo else [])
            ok = [h or next(stored) for h in has]
            if not durable:
                self.counters.add(async_writes=sum(ok) - sum(has))
        except Exception as e:
            log.warning("write to tier %s failed: %s", tier.name, e)
            ok = [False] * len(chunks)
        self._count_refused(tier, ok, durable)
        return ok

    def _count_refused(self, tier: Tier, ok: list[bool], durable: bool) -> None:
        refused = ok.count(False)
        if refused:
            self.counters.add(**{"refused_puts" if durable else "async_failures": refused})
            log.warning("tier %s did not store %d of %d %s (no room, or an I/O error: see its counters)",
                        tier.name, refused, len(ok), "records" if durable else "chunks")

    # -- records as bytes ----------------------------------------------------------------------------

    def _byte_tiers(self) -> list[tuple[int, ByteTier]]:
        return [(i, t) for i, t in enumerate(self.tiers) if isinstance(t, ByteTier)]

    def put_records(self, keys: Sequence[ChunkKey], records: Sequence[Buffer | RecordParts]) -> list[bool]:
        """Store checked records as they are (`verify_record` passed), each under its key: synchronously
        into the byte tiers up to the durable one, whose answer this is (True: it holds the record, and
        it survives what `durability` says); into the slower byte tiers asynchronously. A refusal (no
        room, an I/O error) is counted (`refused_puts`) and logged. Tiers of decoded KV are not written."""
        tiers = self._byte_tiers()
        if not tiers:
            raise InvalidChunkError("this store has no byte tier to hold records")
        durable = next((j for j, (i, _) in enumerate(tiers) if i == self._durable), 0)
        try:
            ok = tiers[durable][1].put_bytes(keys, records)
        except Exception as e:
            log.warning("write to tier %s failed: %s", tiers[durable][1].name, e)
            ok = [False] * len(keys)
        self._count_refused(tiers[durable][1], ok, True)
        kept_keys = [k for k, o in zip(keys, ok) if o]
        kept = [r for r, o in zip(records, ok) if o]
        if not kept:
            return ok
        for _, faster in tiers[:durable]:  # a cache: what it has no room for, it simply lacks
            self._cache_bytes(faster, kept_keys, kept)
        nbytes = sum(len(r) if isinstance(r, (bytes, bytearray, memoryview)) else sum(map(len, r)) for r in kept)
        for i, slower in tiers[durable + 1 :]:
            job = lambda t=slower: self._cache_bytes(t, kept_keys, kept)  # noqa: E731
            if not self._writers[i - 1].submit(job, nbytes, "drop" if slower.drop_when_behind else "wait"):
                self.counters.add(dropped_writes=len(kept))
        return ok

    def _cache_bytes(self, tier: ByteTier, keys: list[ChunkKey], records: list) -> None:
        try:
            tier.put_bytes(keys, records)
        except Exception as e:
            log.warning("write to tier %s failed: %s", tier.name, e)

    def get_records(self, keys: Sequence[ChunkKey], *, check: Check = "header") -> list[RecordBytes | None]:
        """Each key's record as stored, from the fastest byte tier that holds it (None on a miss), checked
        as `check` says (`ByteTier.get_bytes`), never decoded; close each one. Not promoted: a record
        server's disk hits come from the page cache, sent with sendfile."""
        results: list[RecordBytes | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for _, tier in self._byte_tiers():
            if not todo:
                break
            try:
                got = tier.get_bytes([keys[i] for i in todo], check=check)
            except Exception as e:
                log.warning("tier %s failed on get: %s", tier.name, e)
                self.counters.add(tier_failures=1)
                continue
            for i, rec in zip(todo, got):
                results[i] = rec
            todo = [i for i in todo if results[i] is None]
        return results

    def _from_demoting(self, key: ChunkKey, out: torch.Tensor | None) -> Chunk | None:
        chunk = self._demoting.get(key)
        if chunk is None:
            return None
        return Chunk(key, deliver(chunk.kv, out), chunk.tokens, chunk.start_pos)

    def _demote(self, victim: Chunk) -> None:
        """Eviction watcher of the first tier: write the victim back to the next tier if it lacks it."""
        nxt = self.tiers[1]
        try:
            if nxt.contains([victim.key])[0]:
                return
        except Exception:
            return
        self.counters.add(demotions=1)
        copy = victim.copy()  # the victim's memory is reused as soon as this returns
        with self._demoting_lock:
            self._demoting[copy.key] = copy

        def write() -> None:
            try:
                self._write(nxt, [copy])
            finally:
                with self._demoting_lock:
                    if self._demoting.get(copy.key) is copy:
                        del self._demoting[copy.key]

        # Admitted even when the writer is behind: the victim has no other copy, and waiting here would
        # hold up the first tier (this runs under its lock).
        self._writers[0].submit(write, copy.nbytes, "admit")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write to the slower tiers has finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for w in self._writers:
                if not w.flush(None if deadline is None else max(deadline - time.monotonic(), 0.0)):
                    return False
            if all(w.idle for w in self._writers):  # no write was queued meanwhile (a demotion)
                return True

    # -- control -------------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        self.flush()
        return max(tier.delete(keys) for tier in self.tiers)

    def pin(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Pin `keys` in every tier that holds them; True where at least one tier does."""
        found = [False] * len(keys)
        for tier in self.tiers:
            for i, ok in enumerate(tier.pin(keys)):
                found[i] = found[i] or ok
        return found

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            tier.unpin(keys)

    def clear(self, namespace: str | None = None) -> int:
        """Remove every unpinned chunk (of `namespace`, where given) from every tier."""
        self.flush()
        return sum(tier.clear(namespace) for tier in self.tiers)

    def stats(self) -> dict:
        return {
            "store": self.counters.snapshot(),
            "pending_bytes": sum(w.pending_bytes for w in self._writers),
            "tiers": {t.name: {"usage": t.usage(), "stats": t.stats.snapshot()} for t in self.tiers},
            # per model fingerprint: chunks encoded without its codebook (process-wide: codecs are shared)
            "chunks_without_codebook": missing_codebooks.snapshot(),
            **({"adaptive": self.adaptive.stats()} if self.adaptive is not None else {}),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        for w in self._writers:
            w.close()
        for t in self.tiers:
            t.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

