"""Adaptive loading (CacheGen's streaming idea): chunks stored at several codec levels, and loads that
pick per chunk the level to fetch, or recompute it, from measured figures.

Primitives:
- `AdaptiveLoading(config, tier)`: owned by the `TieredStore` (`store.adaptive`) when `[adaptive]` is
  configured; `for_tiers` picks its byte tier. It keeps the `planner.Estimates` (updated from every
  encode, fetch, decode and the engines' prefills) and the counters (`stats()`).
  - `store_levels(chunks)`: each chunk encoded at every configured level and put into the tier under
    `level_key(key, level)` (copies already there are skipped);
  - `available(refs)` -> the allowed levels stored for each chunk; `leading(available)` -> how many
    leading chunks have one; `holds_every_copy(keys)` -> whether every configured copy is stored;
  - `plan(available, ...)` -> a `planner.LoadPlan` from the current figures (a level whose size is not
    measured yet: its codec's `nominal_bits`);
  - `stream(refs, available, plan, ...)` -> an `AdaptiveStream`.
- `adaptive_candidates(store, refs)`: what an engine's connector asks first: the allowed levels stored for
  each leading chunk that has one, or [] where the ordinary path is better (not configured, no copies,
  or the store's first tier holds every one of those chunks decoded, in memory).
- `AdaptiveStream`: a fetcher thread requests the planned copies one by one (record bytes over the
  tier's link, timed); iterating the stream decodes each in order on the caller's thread (timed) and
  yields `(index, Chunk | None)`, None for a copy that could not be had (missing, corrupt, wrong tokens:
  the stream ends there, the caller recomputes from it). After each chunk, when this load's own
  bandwidth (its transfers' bytes over their seconds, each earlier transfer weighing `RECENT_DECAY` times
  the next) differs from the figure the plan was made with by more than `replan_threshold`, the chunks
  the fetcher has not requested yet are planned again (another level, or recomputed as a tail) with this
  load's figure: a link that changed between loads is re-planned for once, not chased through the
  figure kept across loads, and a slower link shows at once (its seconds dominate).
  A chunk fetched at a lossless level is exact, so the store promotes it into its faster tiers like any
  hit (`promote`, set by the owning store); a lossy one never is (a faster tier holds exact KV only).
  `report()` -> `AdaptiveReport`, the decisions (also counted in `stats()`).

Guarantees: a copy's token ids are checked against the ref's (a mismatch is a miss); a chunk is only
ever taken at a level the quality floor allows; nothing here raises for a tier that fails (a miss).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from kvstore.chunk import Chunk
from kvstore.errors import ConfigError, RecordError
from kvstore.keys import ChunkKey, ChunkRef, level_key
from kvstore.levels import AdaptiveConfig, make_level_codec
from kvstore.planner import RECOMPUTE, DecayedRate, Estimates, LoadPlan, plan_load
from kvstore.record import decode_record, encode_record
from kvstore.tiers.base import Counters, Tier
from kvstore.tiers.byte_tier import ByteTier

if TYPE_CHECKING:
    from kvstore.store import TieredStore

log = logging.getLogger(__name__)

FETCH_AHEAD = 2  # fetched copies waiting for their decode (more during a recomputed head): decisions stay late
RECENT_DECAY = 0.5  # a load's own bandwidth: the weight of each transfer against the one after it
FAILED = "failed"  # the action of a chunk whose copy could not be had (recomputed with the rest)


@dataclass(slots=True)
class AdaptiveCounters(Counters):
    loads: int = 0  # planned loads
    fetched_chunks: int = 0  # chunks fetched and decoded (per level: `chunks_by_level`)
    recomputed_chunks: int = 0  # chunks the plans chose to recompute
    replans: int = 0  # plans changed during a load after the measured bandwidth moved
    fetch_failures: int = 0  # copies the lookup found that could not be had (recomputed)
    copies_stored: int = 0  # level copies put into the tier
    copies_failed: int = 0  # level copies the tier refused or that failed to encode


@dataclass(slots=True)
class AdaptiveReport:
    """What an adaptive load decided and saw."""

    actions: list[str]  # per chunk: its level, "recompute", or "failed"
    planned_s: float  # the first plan's time estimate
    replans: int = 0  # times the load's remaining plan changed (the bandwidth moved enough to change it)
    bandwidth: float | None = None  # bytes/s, the estimate after the load
    floor: str = ""

    @property
    def chunks_by_level(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.actions:
            out[a] = out.get(a, 0) + 1
        return out


class AdaptiveLoading:
    def __init__(self, config: AdaptiveConfig, tier: ByteTier) -> None:
        self.config = config
        self.tier = tier
        self.allowed = config.allowed
        self.codecs = {level: make_level_codec(level) for level in config.levels}
        self.estimates = Estimates()
        self.counters = AdaptiveCounters()
        # Set by the store that owns this: where exact loads (a lossless level's copy) are promoted to.
        self.promote: Callable[[Sequence[Chunk], Tier], None] | None = None
        self._by_level: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_tiers(cls, config: AdaptiveConfig, tiers: Sequence[Tier]) -> "AdaptiveLoading":
        """On the byte tier named by `config.tier`, or the slowest byte tier of `tiers`."""
        byte_tiers = [t for t in tiers if isinstance(t, ByteTier)]
        if config.tier:
            tier = next((t for t in byte_tiers if t.name == config.tier), None)
            if tier is None:
                raise ConfigError(f"adaptive.tier {config.tier!r} is not a configured byte tier "
                                  f"(have: {', '.join(t.name for t in byte_tiers) or 'none'})")
        elif not byte_tiers:
            raise ConfigError("[adaptive] needs a byte tier ([disk], [redis] or [sidecar]) to hold its copies")
        else:
            tier = byte_tiers[-1]
        return cls(config, tier)

    # -- storing ----------------------------------------------------------------------------------------

    def store_levels(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Put each chunk into the tier at every level (copies already there are kept); per chunk whether
        the tier holds every copy now. Never raises for a tier or codec that fails: counted and logged."""
        ok = [True] * len(chunks)
        for level, codec in self.codecs.items():
            keys = [level_key(c.key, level) for c in chunks]
            try:
                has = self.tier.contains(keys)
                todo = [i for i, h in enumerate(has) if not h]
                records = []
                for i in todo:
                    c = chunks[i]
                    header, payload = encode_record(Chunk(keys[i], c.kv, c.tokens, c.start_pos), codec)
                    self.estimates.observe_size(level, len(header) + len(payload), c.nbytes)
                    records.append((header, payload))
                stored = self.tier.put_bytes([keys[i] for i in todo], records) if todo else []
            except Exception as e:  # a copy is an optimisation: a failure is logged and counted
                log.warning("storing %d chunks at level %s failed: %s", len(chunks), level, e)
                self.counters.add(copies_failed=len(chunks))
                ok = [False] * len(chunks)
                continue
            for i, s in zip(todo, stored):
                ok[i] = ok[i] and s
            self.counters.add(copies_stored=sum(stored), copies_failed=len(stored) - sum(stored))
        return ok

    # -- planning ---------------------------------------------------------------------------------------

    def _held(self, keys: Sequence[ChunkKey], levels: Sequence[str]) -> list[frozenset[str]]:
        """Per chunk key, which of `levels` the tier holds a copy at: one `contains` call for every level's
        keys (one round trip to a remote tier); raises as the tier does."""
        if not keys:
            return []
        n = len(keys)
        has = self.tier.contains([level_key(k, level) for level in levels for k in keys])
        return [frozenset(level for j, level in enumerate(levels) if has[j * n + i]) for i in range(n)]

    def holds_every_copy(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Per chunk key, whether the tier holds its copy at every configured level (raises as the tier does)."""
        return [len(held) == len(self.codecs) for held in self._held(keys, list(self.codecs))]

    def available(self, refs: Sequence[ChunkRef]) -> list[frozenset[str]]:
        """The allowed levels the tier holds for each ref; a tier that fails on `contains` holds nothing."""
        try:
            return self._held([r.key for r in refs], self.allowed)
        except Exception as e:
            log.warning("tier %s failed on contains: %s", self.tier.name, e)
            return [frozenset()] * len(refs)

    @staticmethod
    def leading(available: Sequence[frozenset[str]]) -> int:
        return next((i for i, a in enumerate(available) if not a), len(available))

    def plan(self, available: Sequence[frozenset[str]], *, chunk_tokens: int, kv_bytes: int, element_bytes: int,
             head: bool = True) -> LoadPlan:
        """The plan for chunks that each have an allowed copy, from the figures measured so far (a level
        not measured yet: its codec's nominal size for KV of `element_bytes`)."""
        bits = 8 * element_bytes
        self.estimates.set_prior({level: codec.nominal_bits(bits) / bits for level, codec in self.codecs.items()})
        stats = self.tier.stats.snapshot()
        if stats["get_seconds"] > 0:  # no transfer of ours yet: the tier's own counters measured some
            self.estimates.seed_bandwidth(stats["bytes_read"] / stats["get_seconds"])
        return plan_load(available, self.allowed, chunk_tokens=chunk_tokens, kv_bytes=kv_bytes,
                         figures=self.estimates.figures(), recompute=self.config.recompute, head=head)

    def stream(self, refs: Sequence[ChunkRef], available: Sequence[frozenset[str]], plan: LoadPlan, *,
               chunk_tokens: int, kv_bytes: int) -> "AdaptiveStream":
        self.counters.add(loads=1)
        return AdaptiveStream(self, refs, available, plan, chunk_tokens=chunk_tokens, kv_bytes=kv_bytes)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine's prefill of `tokens` took `seconds` (what recomputing costs)."""
        self.estimates.observe_prefill(tokens, seconds)

    def _count(self, report: AdaptiveReport) -> None:
        by_level = report.chunks_by_level
        self.counters.add(recomputed_chunks=by_level.get(RECOMPUTE, 0), replans=report.replans)
        with self._lock:
            for level, n in by_level.items():
                if level not in (RECOMPUTE, FAILED):
                    self._by_level[level] = self._by_level.get(level, 0) + n

    def stats(self) -> dict:
        f = self.estimates.figures()
        with self._lock:
            by_level = dict(self._by_level)
        return {**self.counters.snapshot(), "chunks_by_level": by_level, "tier": self.tier.name,
                "bandwidth_bytes_s": f.bandwidth or 0.0, "prefill_tokens_s": f.prefill or 0.0,
                "decode_bytes_s": dict(f.decode), "size_ratio": dict(f.ratio)}


def adaptive_candidates(store: "TieredStore", refs: Sequence[ChunkRef]) -> list[frozenset[str]]:
    """The allowed levels stored for each leading chunk of `refs` that has one; [] for the ordinary path."""
    adaptive = store.adaptive
    if adaptive is None or not refs:
        return []
    available = adaptive.available(refs)
    available = available[: adaptive.leading(available)]
    first = store.tiers[0]
    if not available or isinstance(first, ByteTier):
        return available
    head = refs[: len(available)]
    try:
        in_memory = all(first.contains([r.key for r in head], [r.tokens for r in head]))
    except Exception as e:  # a failing tier is a miss
        log.warning("tier %s failed on contains: %s", first.name, e)
        in_memory = False
    return [] if in_memory else available


@dataclass(slots=True)
class _Fetched:
    index: int
    level: str
    data: bytes | None
    seconds: float


@dataclass(slots=True)
class _State:
    actions: list[str]  # per chunk; the fetcher reads the level of each chunk as it requests it
    fetch_end: int  # chunks from here on are recomputed (tail)
    next: int  # the next chunk the fetcher requests
    plan_bandwidth: float | None
    replans: int = 0
    recent: DecayedRate = field(default_factory=lambda: DecayedRate(RECENT_DECAY))  # this load's bandwidth
    stop: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class AdaptiveStream:
    def __init__(self, loading: AdaptiveLoading, refs: Sequence[ChunkRef], available: Sequence[frozenset[str]],
                 plan: LoadPlan, *, chunk_tokens: int, kv_bytes: int) -> None:
        self.loading = loading
        self.refs = list(refs[:plan.num_chunks])
        self.available = list(available[:plan.num_chunks])
        self.chunk_tokens = chunk_tokens
        self.kv_bytes = kv_bytes
        self.planned_s = plan.estimate_s
        self.head = plan.head
        self._state = _State(plan.actions(), plan.head + len(plan.levels), plan.head,
                             loading.estimates.figures().bandwidth)
        self._queue: queue.Queue[_Fetched | None] = queue.Queue(self._fetch_ahead(plan))
        self._thread = threading.Thread(target=self._fetch_all, name="kvstore-adaptive-fetch", daemon=True)
        self._thread.start()

    def _fetch_ahead(self, plan: LoadPlan) -> int:
        """How many fetched copies may wait for their decode: FETCH_AHEAD, plus the copies the link brings
        while the caller prefills the plan's head (the time model counts on those transfers; a queue of
        FETCH_AHEAD would stall the link after two of them and make a recomputed head a loss)."""
        if not plan.head or not plan.levels:
            return FETCH_AHEAD
        figures = self.loading.estimates.figures()
        prefill = figures.prefill_seconds(plan.head * self.chunk_tokens)
        fetch = figures.fetch_seconds(plan.levels[0], self.kv_bytes)
        if not math.isfinite(prefill):
            return FETCH_AHEAD
        during = len(plan.levels) if fetch <= 0 else math.ceil(prefill / fetch)
        return max(FETCH_AHEAD, min(len(plan.levels), FETCH_AHEAD + during))

    @property
    def fetch_end(self) -> int:
        """Chunks from here on are recomputed (a tail chosen by a re-plan, or where a fetch failed)."""
        return self._state.fetch_end

    # -- the fetcher (its own thread: transfers overlap the caller's decodes and prefills) ---------------

    def _fetch_all(self) -> None:
        st, tier = self._state, self.loading.tier
        try:
            while True:
                with st.lock:
                    i = st.next
                    if st.stop or i >= st.fetch_end:
                        break
                    level = st.actions[i]
                    st.next = i + 1
                t0 = time.perf_counter()
                data = None
                try:
                    rec = tier.get_bytes([level_key(self.refs[i].key, level)], check="header")[0]
                    if rec is not None:
                        with rec:
                            data = bytes(rec.read())
                except Exception as e:  # a failing tier is a miss
                    log.warning("tier %s failed fetching a level copy: %s", tier.name, e)
                if not self._put(_Fetched(i, level, data, time.perf_counter() - t0)) or data is None:
                    break
        finally:
            self._put(None)

    def _put(self, item: _Fetched | None) -> bool:
        while not self._state.stop:
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    # -- the caller's side -----------------------------------------------------------------------------

    def __iter__(self):
        """(index, Chunk | None) of each fetched chunk in order; the stream ends after a None."""
        est = self.loading.estimates
        while True:
            item = self._queue.get()
            if item is None:
                return
            chunk = self._decode(item)
            if chunk is None:
                self._fail(item.index)
                yield item.index, None
                return
            est.observe_fetch(len(item.data), item.seconds)
            self.loading.counters.add(fetched_chunks=1)
            if self.loading.promote is not None and self.loading.codecs[item.level].lossless:
                self.loading.promote([chunk], self.loading.tier)
            self._maybe_replan(len(item.data), item.seconds)
            yield item.index, chunk

    def _decode(self, item: _Fetched) -> Chunk | None:
        ref = self.refs[item.index]
        if item.data is None:
            return None
        t0 = time.perf_counter()
        try:
            got = decode_record(item.data, key=level_key(ref.key, item.level))
        except RecordError as e:
            log.warning("level copy %s of %s is bad: %s", item.level, ref.key, e)
            return None
        seconds = time.perf_counter() - t0
        if not np.array_equal(got.tokens, ref.tokens):
            return None
        self.loading.estimates.observe_decode(item.level, got.nbytes, seconds)
        self.loading.estimates.observe_size(item.level, len(item.data), got.nbytes)
        return Chunk(ref.key, got.kv, ref.tokens, got.start_pos)

    def _fail(self, index: int) -> None:
        st = self._state
        with st.lock:
            st.stop = True
            st.actions[index] = FAILED
            for j in range(index + 1, st.fetch_end):
                st.actions[j] = RECOMPUTE
            st.fetch_end = index
        self.loading.counters.add(fetch_failures=1)

    def _maybe_replan(self, nbytes: int, seconds: float) -> None:
        st = self._state
        if nbytes <= 0 or seconds <= 0:
            return
        st.recent.add(nbytes, seconds)
        rate = st.recent.value
        base = st.plan_bandwidth
        if base is not None and abs(rate / base - 1) <= self.loading.config.replan_threshold:
            return
        figures = replace(self.loading.estimates.figures(), bandwidth=rate)
        with st.lock:
            first = st.next  # the chunks from here on are not requested yet
            n = len(st.actions)
            if first >= n:
                st.plan_bandwidth = figures.bandwidth
                return
            queued = self._queue.qsize()
            cpu_start = queued * figures.decode_seconds(st.actions[first - 1], self.kv_bytes) if first else 0.0
            plan = plan_load(self.available[first:], self.loading.allowed, chunk_tokens=self.chunk_tokens,
                             kv_bytes=self.kv_bytes, figures=figures, recompute=self.loading.config.recompute,
                             head=False, cpu_start=cpu_start)
            st.plan_bandwidth = figures.bandwidth
            if plan.actions() != st.actions[first:]:
                st.actions[first:] = plan.actions()
                st.fetch_end = first + len(plan.levels)
                st.replans += 1

    def close(self) -> None:
        """Stop the fetcher (a caller that stops iterating early must call this)."""
        self._state.stop = True
        self._thread.join()

    def report(self) -> AdaptiveReport:
        """The decisions, once iteration ended; counted in the loading's stats once."""
        self.close()
        st = self._state
        report = AdaptiveReport(list(st.actions), self.planned_s, st.replans,
                                self.loading.estimates.figures().bandwidth,
                                self.loading.config.floor or self.loading.config.levels[0])
        self.loading._count(report)
        return report
